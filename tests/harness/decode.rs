//! The decoders checked against their definitions: [`codec::decode`] (the TCP stream
//! splitter) and [`codec::decode_datagram`].
//!
//! Apart from the rest because it needs no hub: the `decode` fuzz target uses only this.
//! The definitions, from `docs/protocol.md` §1 and the codec's own contract: a frame is
//! an opcode, data and a 0x0A, at most `max` bytes; a lone 0x0A is the empty None frame;
//! over TCP a 0x0D right before the 0x0A is a CRLF line end and not data, unless it is
//! the opcode (`0D 0A` is a Who); a datagram is one frame whose final 0x0A is optional
//! (and a 0x0D is dropped only before a 0x0A).

use velium_server::proto::codec::{self, CodecError};
use velium_server::proto::{CR, Frame, NEWLINE, Opcode, encoded};

/// Checks both decoders on `bytes` with a maximum frame length of `max`.
///
/// `splits` cuts the stream into reads, as a socket would; the frames found must not
/// depend on where the cuts fall.
pub fn check_decode(bytes: &[u8], max: usize, splits: &[usize]) {
    // The whole buffer at once, frame by frame.
    let mut whole = Vec::new();
    let mut rest = bytes;
    let whole_end = loop {
        match codec::decode(rest, max) {
            Ok(Some((f, n))) => {
                check_decoded_frame(rest, max, f.op, f.data, n);
                whole.push((f.op, f.data.to_vec()));
                rest = &rest[n..];
            }
            Ok(None) => {
                assert!(
                    !rest.contains(&NEWLINE),
                    "decode asked for more bytes though a 0x0A is there"
                );
                assert!(
                    rest.len() < max,
                    "an unfinished frame of {} bytes, max {max}, was not refused",
                    rest.len()
                );
                break Ok(rest.to_vec());
            }
            Err(e) => {
                assert_eq!(
                    e,
                    CodecError::TooLong { max },
                    "decode only refuses long frames"
                );
                assert!(
                    rest.len() >= max,
                    "refused {} bytes as longer than {max}",
                    rest.len()
                );
                assert!(
                    !rest[..max].contains(&NEWLINE),
                    "refused a frame that ends within {max} bytes"
                );
                break Err(());
            }
        }
    };

    // The same bytes in reads cut at `splits`, keeping the unfinished tail between reads
    // as a connection does.
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut pending = Vec::new();
    let mut chunked = Vec::new();
    let mut from = 0;
    let mut chunked_end = None;
    for cut in cuts {
        pending.extend_from_slice(&bytes[from..cut]);
        from = cut;
        let mut used = 0;
        loop {
            match codec::decode(&pending[used..], max) {
                Ok(Some((f, n))) => {
                    chunked.push((f.op, f.data.to_vec()));
                    used += n;
                }
                Ok(None) => break,
                Err(_) => {
                    chunked_end = Some(Err(()));
                    break;
                }
            }
        }
        pending.drain(..used);
        if chunked_end.is_some() {
            break;
        }
    }
    let chunked_end = chunked_end.unwrap_or(Ok(pending));
    assert_eq!(
        whole, chunked,
        "frames depend on how the stream was cut into reads"
    );
    assert_eq!(
        whole_end, chunked_end,
        "the end of the stream depends on the reads"
    );

    check_datagram(bytes, max);
}

/// Checks one frame `decode` returned from the front of `buf`, `n` bytes long.
fn check_decoded_frame(buf: &[u8], max: usize, op: u8, data: &[u8], n: usize) {
    assert!(n >= 1 && n <= max, "frame of {n} bytes with max {max}");
    assert!(n <= buf.len(), "consumed {n} of {} bytes", buf.len());
    assert_eq!(buf[n - 1], NEWLINE, "consumed bytes do not end at a 0x0A");
    assert!(!buf[..n - 1].contains(&NEWLINE), "a frame ran past a 0x0A");
    assert!(!data.contains(&NEWLINE), "frame data holds a 0x0A");
    if n == 1 {
        // A lone 0x0A is the empty None frame.
        assert_eq!(
            (op, data),
            (0, &[][..]),
            "a lone 0x0A is not the empty None frame"
        );
    } else {
        assert_eq!(op, buf[0], "opcode is not the first byte");
        // A CR right before the 0x0A ends the line with it, unless it is the opcode.
        let crlf = n >= 3 && buf[n - 2] == CR;
        let end = n - 1 - usize::from(crlf);
        assert_eq!(
            data,
            &buf[1..end],
            "data is not the bytes between opcode and line end (CRLF: {crlf})"
        );
        assert!(
            std::ptr::eq(data.as_ptr(), buf[1..].as_ptr()),
            "data is not borrowed from the buffer"
        );
        let line_end: &[u8] = if crlf { &[CR, NEWLINE] } else { &[NEWLINE] };
        let mut again = vec![op];
        again.extend_from_slice(data);
        again.extend_from_slice(line_end);
        assert_eq!(
            again,
            &buf[..n],
            "re-encoding does not give the consumed bytes"
        );
        if let Some(known) = Opcode::from_byte(op) {
            let mut e = encoded(known, data);
            if crlf {
                e.insert(e.len() - 1, CR);
            }
            assert_eq!(e, &buf[..n], "the encoder disagrees");
        }
    }
    // The answer depends only on the frame's own bytes, and `n` is the least maximum
    // that lets it through.
    let same = |r: Result<Option<(Frame<'_>, usize)>, CodecError>| {
        r.map(|o| o.map(|(f, k)| (f.op, f.data.to_vec(), k)))
    };
    let expect = Ok(Some((op, data.to_vec(), n)));
    assert_eq!(
        same(codec::decode(&buf[..n], max)),
        expect,
        "frame changes with what follows it"
    );
    assert_eq!(
        same(codec::decode(buf, n)),
        expect,
        "frame refused at max = its length"
    );
    assert_eq!(
        codec::decode(buf, n - 1).map(|o| o.map(|(_, k)| k)),
        Err(CodecError::TooLong { max: n - 1 }),
        "frame of {n} bytes accepted with max {}",
        n - 1
    );
}

/// Checks `decode_datagram` against its definition: exactly one frame (an opcode, then
/// data with no 0x0A, then an optional 0x0A), at most `max` bytes.
fn check_datagram(d: &[u8], max: usize) {
    let lf = d.last() == Some(&NEWLINE);
    let body = if lf { &d[..d.len() - 1] } else { d };
    let one_frame = !body.is_empty() && !body.contains(&NEWLINE);
    match codec::decode_datagram(d, max) {
        Ok(f) => {
            assert!(
                d.len() <= max && one_frame,
                "accepted a datagram that is not one frame within max"
            );
            // A CR is a line end only before the 0x0A, and never the opcode.
            let crlf = lf && body.len() >= 2 && body[body.len() - 1] == CR;
            let data = &body[1..body.len() - usize::from(crlf)];
            assert_eq!(
                (f.op, f.data),
                (body[0], data),
                "datagram read as the wrong frame (0x0A: {lf}, CRLF: {crlf})"
            );
            if lf {
                // A datagram with its 0x0A is one TCP frame too.
                let streamed =
                    codec::decode(d, max).map(|o| o.map(|(g, n)| (g.op, g.data.to_vec(), n)));
                assert_eq!(
                    streamed,
                    Ok(Some((f.op, f.data.to_vec(), d.len()))),
                    "stream decoder disagrees"
                );
            }
        }
        Err(CodecError::TooLong { max: m }) => {
            assert_eq!(m, max);
            assert!(
                d.len() > max,
                "refused a datagram of {} bytes as longer than {max}",
                d.len()
            );
        }
        Err(CodecError::NotOneFrame) => {
            assert!(
                d.len() <= max && !one_frame,
                "refused a datagram that is one frame"
            );
        }
    }
}
