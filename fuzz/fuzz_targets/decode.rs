//! Fuzzes the TCP frame decoder and the datagram decoder (`proto::codec::decode`,
//! `proto::codec::decode_datagram`) with the invariants of `tests/harness/decode.rs`.
//!
//! Input: two bytes of maximum frame length (little-endian, reduced modulo the stream
//! length + 2, which covers every distinct case: a larger maximum decodes the same), one
//! byte giving the number of read cuts (modulo 8), two bytes per cut, then the stream.
#![no_main]

#[path = "../../tests/harness/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let cuts = usize::from(head[2] % 8);
    let Some((cut_bytes, bytes)) = rest.split_at_checked(cuts * 2) else {
        return;
    };
    let splits: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let max = usize::from(u16::from_le_bytes([head[0], head[1]])) % (bytes.len() + 2);
    harness::check_decode(bytes, max, &splits);
});
