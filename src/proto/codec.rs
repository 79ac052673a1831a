//! The codec: splits a byte stream into frames, and checks a datagram is one frame.
//!
//! Pure functions over byte slices: the drivers hand in whatever a read returned and the
//! connection keeps the unfinished tail. Nothing here allocates.
//!
//! Two leniencies serve clients written for the original server: over TCP a `0D 0A` ends a
//! frame like `0A` (that server read lines with a reader that strips the CR, so Windows
//! shims send CRLF), and a datagram is its own frame, so its trailing `0A` is optional
//! (that server required a bind of exactly 17 bytes, `02` and the token).

use super::{CR, Frame, NEWLINE};
use thiserror::Error;

/// Why bytes could not be read as frames.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// A frame (opcode + data + 0x0A) longer than the configured maximum, or an unfinished
    /// frame that has already grown past it.
    #[error("frame longer than {max} bytes")]
    TooLong {
        /// The configured maximum frame length.
        max: usize,
    },
    /// A datagram that is not exactly one frame.
    #[error("datagram is not one frame")]
    NotOneFrame,
}

/// Reads the next frame from the front of `buf`.
///
/// Returns the frame and how many bytes it took (terminator included), `Ok(None)` when `buf`
/// holds only part of a frame, or `TooLong` when a frame is, or is bound to be, longer than
/// `max` bytes. A lone 0x0A is an empty frame with opcode 0x00 (None): it is ignored. A
/// 0x0D right before the 0x0A is not data (CRLF line ends), unless it is the opcode
/// (`0D 0A` is a Who).
#[inline]
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame<'_>, usize)>, CodecError> {
    decode_with(buf, max, true)
}

/// Reads the next frame the server sent (for clients): as [`decode`], but a 0x0D is data
/// wherever it stands, since the server never ends a frame with CRLF.
#[inline]
pub fn decode_exact(buf: &[u8], max: usize) -> Result<Option<(Frame<'_>, usize)>, CodecError> {
    decode_with(buf, max, false)
}

#[inline]
fn decode_with(
    buf: &[u8],
    max: usize,
    crlf: bool,
) -> Result<Option<(Frame<'_>, usize)>, CodecError> {
    let window = &buf[..buf.len().min(max)];
    match memchr::memchr(NEWLINE, window) {
        Some(0) => Ok(Some((Frame { op: 0, data: &[] }, 1))),
        Some(end) => {
            let data = &buf[1..end];
            let data = if crlf { strip_cr(data) } else { data };
            Ok(Some((Frame { op: buf[0], data }, end + 1)))
        }
        None if buf.len() >= max => Err(CodecError::TooLong { max }),
        None => Ok(None),
    }
}

/// Drops one 0x0D that ends frame data (the CR of a CRLF line end).
#[inline]
fn strip_cr(data: &[u8]) -> &[u8] {
    match data.split_last() {
        Some((&CR, rest)) => rest,
        _ => data,
    }
}

/// Reads a datagram as one frame: an opcode, then data up to the end of the datagram,
/// with or without a trailing 0x0A (or 0x0D 0x0A). A 0x0A anywhere else, or no opcode, is
/// not one frame.
pub fn decode_datagram(dgram: &[u8], max: usize) -> Result<Frame<'_>, CodecError> {
    if dgram.len() > max {
        return Err(CodecError::TooLong { max });
    }
    let body = match dgram.split_last() {
        Some((&NEWLINE, rest)) => rest,
        _ => dgram,
    };
    match body.split_first() {
        Some((&op, data)) if op != NEWLINE && memchr::memchr(NEWLINE, data).is_none() => {
            let data = if body.len() < dgram.len() {
                strip_cr(data)
            } else {
                data
            };
            Ok(Frame { op, data })
        }
        _ => Err(CodecError::NotOneFrame),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Opcode, encode};
    use proptest::prelude::*;

    #[test]
    fn splits_frames_and_keeps_partial_tail() {
        let buf = b"\x01bob\n\x06x\n\x08par";
        let (f, n) = decode(buf, 64).unwrap().unwrap();
        assert_eq!((f.op, f.data, n), (1, &b"bob"[..], 5));
        let (f, n2) = decode(&buf[n..], 64).unwrap().unwrap();
        assert_eq!((f.op, f.data), (6, &b"x"[..]));
        assert_eq!(decode(&buf[n + n2..], 64).unwrap(), None);
    }

    #[test]
    fn lone_newline_is_an_empty_none_frame() {
        let (f, n) = decode(b"\n", 8).unwrap().unwrap();
        assert_eq!((f.op, f.data, n), (0, &b""[..], 1));
    }

    #[test]
    fn enforces_max_length_including_terminator() {
        // 4-byte limit: opcode + 2 data + newline fits, 3 data bytes do not.
        assert!(decode(b"\x08ab\n", 4).unwrap().is_some());
        assert_eq!(decode(b"\x08abc\n", 4), Err(CodecError::TooLong { max: 4 }));
        // An unfinished frame already at the limit can never fit.
        assert_eq!(decode(b"\x08abc", 4), Err(CodecError::TooLong { max: 4 }));
        assert_eq!(decode(b"\x08ab", 4).unwrap(), None);
    }

    #[test]
    fn crlf_ends_a_frame_but_a_cr_opcode_stays() {
        let (f, n) = decode(b"\x01peq.z.bob\r\n", 64).unwrap().unwrap();
        assert_eq!((f.op, f.data, n), (1, &b"peq.z.bob"[..], 12));
        let (f, _) = decode(b"\x0d\n", 64).unwrap().unwrap();
        assert_eq!((f.op, f.data), (0x0D, &b""[..]));
        let (f, _) = decode(b"\x0d\r\n", 64).unwrap().unwrap();
        assert_eq!((f.op, f.data), (0x0D, &b""[..]));
        let (f, _) = decode(b"\x06a\r\r\n", 64).unwrap().unwrap();
        assert_eq!(f.data, b"a\r", "only one CR is the line end");
    }

    #[test]
    fn datagram_is_one_frame_with_or_without_its_newline() {
        assert_eq!(decode_datagram(b"\x06hi\n", 64).unwrap().data, b"hi");
        assert_eq!(decode_datagram(b"\x06hi", 64).unwrap().data, b"hi");
        assert_eq!(decode_datagram(b"\x06hi\r\n", 64).unwrap().data, b"hi");
        assert_eq!(decode_datagram(b"\x06hi\r", 64).unwrap().data, b"hi\r");
        let bind: Vec<u8> = std::iter::once(2).chain([7u8; 16]).collect();
        let f = decode_datagram(&bind, 64).unwrap();
        assert_eq!((f.op, f.data.len()), (2, 16));
        assert_eq!(decode_datagram(b"\x06", 64).unwrap().data, b"");
        assert_eq!(
            decode_datagram(b"\x06a\n\x06b\n", 64),
            Err(CodecError::NotOneFrame)
        );
        assert_eq!(decode_datagram(b"\n", 64), Err(CodecError::NotOneFrame));
        assert_eq!(decode_datagram(b"", 64), Err(CodecError::NotOneFrame));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 1usize..300) {
            let mut rest = &bytes[..];
            while let Ok(Some((_, n))) = decode(rest, max) {
                prop_assert!(n >= 1 && n <= max);
                rest = &rest[n..];
            }
            let _ = decode_datagram(&bytes, max);
        }

        #[test]
        fn round_trips_what_the_encoder_writes(
            frames in proptest::collection::vec(
                (0u8..=0x0E, proptest::collection::vec(any::<u8>().prop_filter("no 0x0A", |b| *b != NEWLINE), 0..200)
                    .prop_filter("no CR before the newline", |d| d.last() != Some(&CR))),
                0..20),
            split in 0usize..4096,
        ) {
            let mut wire = Vec::new();
            for (op, data) in &frames {
                let op = Opcode::from_byte(*op).unwrap_or(Opcode::Echo);
                encode(op, data, &mut wire);
            }
            // Feed the stream in two reads at an arbitrary split, as a socket would.
            let split = split.min(wire.len());
            let mut pending = wire[..split].to_vec();
            let mut out = Vec::new();
            let feed = |pending: &mut Vec<u8>, out: &mut Vec<(u8, Vec<u8>)>| {
                let mut used = 0;
                while let Some((f, n)) = decode(&pending[used..], 1 << 20).unwrap() {
                    out.push((f.op, f.data.to_vec()));
                    used += n;
                }
                pending.drain(..used);
            };
            feed(&mut pending, &mut out);
            pending.extend_from_slice(&wire[split..]);
            feed(&mut pending, &mut out);
            prop_assert!(pending.is_empty());
            let expect: Vec<(u8, Vec<u8>)> = frames.iter().map(|(op, d)| {
                (Opcode::from_byte(*op).unwrap_or(Opcode::Echo) as u8, d.clone())
            }).collect();
            prop_assert_eq!(out, expect);
        }
    }
}
