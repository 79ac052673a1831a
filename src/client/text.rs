//! Text both ways (see "Text" in the [client documentation](super)): what arrives has its
//! 0x0B turned back into `\n` here, what is sent is escaped by
//! [`push_text`](crate::proto::request::push_text) inside the request encoders; and the
//! checks that keep a bad argument from reaching the wire.

use super::error::ClientError;
use crate::proto::target::Target;
use crate::proto::{ALT_NEWLINE, NEWLINE, SP};

/// Text from the wire: 0x0B becomes `\n`, invalid UTF-8 is replaced (one allocation and
/// one copy when the text is valid, which is the norm).
pub(super) fn wire_text(data: &[u8]) -> String {
    let mut v = data.to_vec();
    for i in memchr::memchr_iter(ALT_NEWLINE, data) {
        v[i] = NEWLINE;
    }
    // 0x0A and 0x0B are both ASCII, so the swap cannot break a UTF-8 sequence.
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Bytes as text, invalid UTF-8 replaced (identities, and text quoted in messages).
pub(super) fn lossy(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// A target or Who pattern must be one word: the server reads a target up to the first
/// space, so a space would silently move words into the text. Then it is checked as the
/// hub checks it ([`Target::parse`]), so that a bad one is refused with the hub's reason
/// before anything is sent.
pub(super) fn check_pattern(what: &'static str, p: &str) -> Result<(), ClientError> {
    if p.bytes().any(|b| b == SP || b.is_ascii_control()) {
        return Err(ClientError::Invalid {
            what,
            why: format!("{p:?}: it holds a space or control character"),
        });
    }
    Target::parse(p.as_bytes())
        .map(drop)
        .map_err(|e| ClientError::BadTarget {
            what,
            text: p.to_string(),
            why: e.to_string(),
        })
}

/// Ping data travels raw, so it cannot hold the frame terminator.
pub(super) fn check_data(data: &[u8]) -> Result<(), ClientError> {
    if data.contains(&NEWLINE) {
        return Err(ClientError::Invalid {
            what: "ping data",
            why: "it holds a 0x0A byte".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Opcode;
    use crate::proto::reply::push_u64;
    use crate::proto::request::{encode_response, encode_routed};

    #[test]
    fn sent_text_escapes_newlines() {
        let mut b = Vec::new();
        encode_routed(Opcode::Command, "peq.*", "a\nb c", &mut b);
        assert_eq!(b, b"\x04peq.* a\x0bb c\n");
        b.clear();
        encode_response(42, "x\ny\n", &mut b);
        assert_eq!(b, b"\x0542 x\x0by\x0b\n");
        for v in [0, 7, 10, 1 << 20, u64::MAX] {
            b.clear();
            push_u64(&mut b, v);
            assert_eq!(b, v.to_string().as_bytes());
        }
    }

    #[test]
    fn wire_text_unescapes_and_tolerates_bad_utf8() {
        assert_eq!(wire_text(b"one\x0btwo"), "one\ntwo");
        assert_eq!(wire_text("héros".as_bytes()), "héros");
        assert_eq!(wire_text(b"a\xffb"), "a\u{FFFD}b");
    }

    #[test]
    fn patterns_are_one_word() {
        assert!(check_pattern("target", "+peq.*.>").is_ok());
        assert!(check_pattern("target", "").is_err());
        let e = check_pattern("target", "peq..x").unwrap_err().to_string();
        assert_eq!(
            e,
            "bad target peq..x: empty segment at byte 4: segments are joined by single dots"
        );
        let e = check_pattern("pattern", "+").unwrap_err().to_string();
        assert_eq!(e, "bad pattern +: empty target");
        let e = check_pattern("target", "").unwrap_err().to_string();
        assert_eq!(e, "bad target \"\": empty target");
        assert!(check_pattern("target", "a.>,class").is_err());
        assert!(check_pattern("target", "a b").is_err());
        assert!(check_pattern("target", "a\nb").is_err());
        assert!(check_data(b"ok").is_ok());
        assert!(check_data(b"o\nk").is_err());
    }
}
