//! The identity grammar: what a shim may call itself.
//!
//! An identity names one shim in routing, listings and logs (`peq.ecommons.bob`: server,
//! zone, character), so two identities that look the same must be the same.

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
    /// Not UTF-8.
    #[error("identity is not UTF-8")]
    NotUtf8,
    /// A character that prints as a gap or as nothing.
    #[error("identity holds a space, control or invisible character")]
    Invisible,
}

/// Checks an identity label; returns it as text.
pub fn check_identity(label: &[u8]) -> Result<&str, IdentityError> {
    if label.is_empty() {
        return Err(IdentityError::Empty);
    }
    if label.len() > MAX_IDENTITY {
        return Err(IdentityError::TooLong);
    }
    let s = std::str::from_utf8(label).map_err(|_| IdentityError::NotUtf8)?;
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || is_invisible(c))
    {
        return Err(IdentityError::Invisible);
    }
    Ok(s)
}

/// Format characters that print as nothing (zero-width spaces and joiners, direction
/// marks and overrides, the byte-order mark): two identities that differ only by them
/// would look the same in every log and listing.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_rules() {
        assert!(check_identity(b"peq.ecommons.bob").is_ok());
        assert!(check_identity("héros".as_bytes()).is_ok());
        assert_eq!(check_identity(b""), Err(IdentityError::Empty));
        assert_eq!(check_identity(&[b'a'; 65]), Err(IdentityError::TooLong));
        assert!(check_identity(&[b'a'; 64]).is_ok());
        assert_eq!(check_identity(b"two words"), Err(IdentityError::Invisible));
        assert!(check_identity(b"tab\there").is_err());
        assert!(check_identity(b"nl\x0bhere").is_err());
        assert_eq!(check_identity(b"\xff\xfe"), Err(IdentityError::NotUtf8));
        assert!(check_identity("zero\u{200B}width".as_bytes()).is_err());
    }
}
