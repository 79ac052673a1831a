//! The identity grammar: what a shim may call itself.
//!
//! An identity names one shim in routing, listings, logs and access rules
//! (`peq.ecommons.bob`: server, zone, character), so two identities that look the same
//! must be the same, and every identity must be something a target can name exactly.
//! Hence a grammar of plain ASCII: segments of letters, digits, `_` and `-`, joined by
//! single dots, at most 64 bytes. EverQuest character names and server and zone short
//! names are ASCII letters and digits; nothing else is needed (an apostrophe appears only
//! in zone long names, and would be one more character a shell must quote). Pattern
//! characters (`*`, `>`, `+`), white space, and every non-ASCII byte (so every invisible
//! or look-alike character) are refused. Identities compare ignoring ASCII case.

use thiserror::Error;

/// Longest identity, in bytes.
pub const MAX_IDENTITY: usize = 64;

/// Why an identity label is refused; the Display text is the Error frame's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// No bytes.
    #[error("identity is empty")]
    Empty,
    /// Longer than [`MAX_IDENTITY`].
    #[error("identity longer than 64 bytes")]
    TooLong,
    /// A leading or trailing dot, or two dots in a row: the segment starting at `at` is
    /// empty.
    #[error("identity has an empty segment at byte {at}: segments are joined by single dots")]
    EmptySegment {
        /// Byte offset where the empty segment starts.
        at: usize,
    },
    /// A byte outside the grammar.
    #[error(
        "identity byte 0x{byte:02X}{} at {at}: only ASCII letters, digits, '_', '-' and '.' are allowed",
        shown(*byte)
    )]
    Byte {
        /// The byte.
        byte: u8,
        /// Its offset.
        at: usize,
    },
}

/// A printable ASCII byte as ` 'c'`, to help read the message; nothing otherwise.
fn shown(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!(" '{}'", b as char)
    } else {
        String::new()
    }
}

/// Whether `b` may appear in a segment.
#[inline]
pub fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Checks an identity label; returns it as text.
pub fn check_identity(label: &[u8]) -> Result<&str, IdentityError> {
    if label.is_empty() {
        return Err(IdentityError::Empty);
    }
    if label.len() > MAX_IDENTITY {
        return Err(IdentityError::TooLong);
    }
    let mut start = 0;
    for (i, &b) in label.iter().enumerate() {
        if b == b'.' {
            if i == start {
                return Err(IdentityError::EmptySegment { at: start });
            }
            start = i + 1;
        } else if !is_segment_byte(b) {
            return Err(IdentityError::Byte { byte: b, at: i });
        }
    }
    if start == label.len() {
        return Err(IdentityError::EmptySegment { at: start });
    }
    // Only ASCII bytes remain.
    Ok(std::str::from_utf8(label).expect("ASCII"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identity_rules() {
        assert_eq!(check_identity(b"peq.ecommons.bob"), Ok("peq.ecommons.bob"));
        assert!(check_identity(b"Peq.E_commons.bob-2").is_ok());
        assert_eq!(check_identity(b""), Err(IdentityError::Empty));
        assert_eq!(check_identity(&[b'a'; 65]), Err(IdentityError::TooLong));
        assert!(check_identity(&[b'a'; 64]).is_ok());
        let byte = |b, at| Err(IdentityError::Byte { byte: b, at });
        assert_eq!(check_identity(b"two words"), byte(b' ', 3));
        assert_eq!(check_identity(b"peq.*"), byte(b'*', 4));
        assert_eq!(check_identity(b">"), byte(b'>', 0));
        assert_eq!(check_identity(b"+bob"), byte(b'+', 0));
        assert_eq!(check_identity(b"o'neil"), byte(b'\'', 1));
        let empty = |at| Err(IdentityError::EmptySegment { at });
        assert_eq!(check_identity(b"a..b"), empty(2));
        assert_eq!(check_identity(b".a"), empty(0));
        assert_eq!(check_identity(b"a."), empty(2));
        assert_eq!(check_identity(b"."), empty(0));
        // Invisible and look-alike characters: the first non-ASCII byte is named.
        for s in [
            "peq.z.bob\u{3164}",
            "\u{115F}bob",
            "b\u{FFA0}",
            "\u{061C}",
            "\u{2800}",
            "b\u{043E}b",
        ] {
            let at = s.bytes().position(|b| !b.is_ascii()).unwrap();
            assert_eq!(
                check_identity(s.as_bytes()),
                byte(s.as_bytes()[at], at),
                "{s:?}"
            );
        }
        assert_eq!(
            IdentityError::Byte { byte: b'*', at: 4 }.to_string(),
            "identity byte 0x2A '*' at 4: only ASCII letters, digits, '_', '-' and '.' are allowed"
        );
        assert_eq!(
            IdentityError::Byte { byte: 0xE3, at: 9 }.to_string(),
            "identity byte 0xE3 at 9: only ASCII letters, digits, '_', '-' and '.' are allowed"
        );
    }

    proptest! {
        /// Whatever is accepted is dot-joined non-empty segments of the allowed bytes.
        #[test]
        fn accepted_labels_follow_the_grammar(label in proptest::collection::vec(any::<u8>(), 0..70)) {
            if let Ok(s) = check_identity(&label) {
                prop_assert!(s.len() <= MAX_IDENTITY);
                for seg in s.split('.') {
                    prop_assert!(!seg.is_empty());
                    prop_assert!(seg.bytes().all(is_segment_byte));
                }
            }
        }
    }
}
