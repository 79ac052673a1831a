//! Target patterns: which identities a Command, Echo or Who names.
//!
//! Identities are dot-separated segments (`peq.ecommons.bob`: server, zone, character). A
//! pattern is an identity in which a segment `*` matches exactly one segment and a last
//! segment `>` matches one or more remaining segments; a leading `+` includes the sender.
//! Matching ignores ASCII case. The hub matches patterns through its trie
//! (`hub/router.rs`); [`Pattern::matches`] is the direct reference it is tested against.

use thiserror::Error;

/// One segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A literal segment, lowercased.
    Lit(Box<str>),
    /// `*`: any one segment.
    One,
    /// `>`: one or more segments (only last).
    Rest,
}

/// A parsed target: which identities it names, and whether the sender is included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// The segments.
    pub segs: Vec<Seg>,
    /// A target written with a leading `+` includes the sender when it matches; without
    /// it the sender is left out (EQBC's /bcaa versus /bca).
    pub include_self: bool,
}

/// Why a target could not be parsed.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    /// Empty target.
    #[error("empty target")]
    Empty,
    /// `>` somewhere but last.
    #[error("'>' must be the last segment")]
    RestNotLast,
    /// Too long.
    #[error("target longer than 255 bytes")]
    TooLong,
    /// Not UTF-8 (identities always are, so such a target could only match by accident).
    #[error("target is not UTF-8")]
    NotUtf8,
    /// Two dots in a row, or one first or last: no identity has an empty segment, so such
    /// a target could never match (`at` is the byte offset in the target as written).
    #[error("empty segment at byte {at}: segments are joined by single dots")]
    EmptySegment {
        /// Where the empty segment starts.
        at: usize,
    },
}

impl Pattern {
    /// Parses a target as written in Command, Echo and Who frames.
    pub fn parse(target: &[u8]) -> Result<Pattern, PatternError> {
        let (include_self, body) = match target.split_first() {
            Some((b'+', rest)) => (true, rest),
            _ => (false, target),
        };
        if body.is_empty() {
            return Err(PatternError::Empty);
        }
        if body.len() > 255 {
            return Err(PatternError::TooLong);
        }
        if std::str::from_utf8(body).is_err() {
            return Err(PatternError::NotUtf8);
        }
        let n = body.split(|&b| b == b'.').count();
        let mut segs = Vec::with_capacity(n);
        let mut at = usize::from(include_self);
        for (i, s) in body.split(|&b| b == b'.').enumerate() {
            if s.is_empty() {
                return Err(PatternError::EmptySegment { at });
            }
            at += s.len() + 1;
            segs.push(match s {
                b"*" => Seg::One,
                b">" if i + 1 == n => Seg::Rest,
                b">" => return Err(PatternError::RestNotLast),
                lit => Seg::Lit(lowercase(lit)),
            });
        }
        Ok(Pattern { segs, include_self })
    }

    /// The pattern that matches every identity.
    pub fn all() -> Pattern {
        Pattern {
            segs: vec![Seg::Rest],
            include_self: true,
        }
    }

    /// Whether the pattern holds a wildcard (`*` or `>`): it may name more than one shim.
    pub fn is_wildcard(&self) -> bool {
        self.segs.iter().any(|s| !matches!(s, Seg::Lit(_)))
    }

    /// Whether `identity` matches, by direct comparison (the trie's reference behaviour).
    pub fn matches(&self, identity: &str) -> bool {
        // No allocation: access checks and Who filters call this once per shim.
        let mut parts = identity.split('.');
        for seg in &self.segs {
            match seg {
                Seg::Rest => return parts.next().is_some(),
                Seg::One if parts.next().is_some() => {}
                Seg::Lit(l) if parts.next().is_some_and(|p| p.eq_ignore_ascii_case(l)) => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }

    /// Whether every identity `other` can match is matched by `self` (the leading `+` of
    /// either is ignored). Permission rules use this, so that a decision depends on what
    /// a Command's target could name, never on which shims happen to be connected.
    pub fn covers(&self, other: &Pattern) -> bool {
        let (p, q) = (&self.segs, &other.segs);
        for i in 0.. {
            match (p.get(i), q.get(i)) {
                (Some(Seg::Rest), _) => return q.len() > i,
                (None, None) => return true,
                (None, _) | (_, None) | (_, Some(Seg::Rest)) => return false,
                (Some(Seg::One), Some(_)) => {}
                (Some(Seg::Lit(a)), Some(Seg::Lit(b))) if a == b => {}
                (Some(Seg::Lit(_)), Some(_)) => return false,
            }
        }
        unreachable!()
    }
}

/// A segment as the router keys it: ASCII-lowercased.
pub fn lowercase(b: &[u8]) -> Box<str> {
    String::from_utf8_lossy(b)
        .to_ascii_lowercase()
        .into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_rules() {
        assert!(Pattern::parse(b"+peq.>").unwrap().include_self);
        assert!(!Pattern::parse(b"peq.>").unwrap().include_self);
        assert_eq!(Pattern::parse(b""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse(b"+"), Err(PatternError::Empty));
        assert_eq!(Pattern::parse(b"a.>.b"), Err(PatternError::RestNotLast));
        assert_eq!(Pattern::parse(b"a.\xff"), Err(PatternError::NotUtf8));
        let empty = |at| Err(PatternError::EmptySegment { at });
        assert_eq!(Pattern::parse(b"peq..x"), empty(4));
        assert_eq!(Pattern::parse(b"+peq..x"), empty(5));
        assert_eq!(Pattern::parse(b".peq"), empty(0));
        assert_eq!(Pattern::parse(b"peq."), empty(4));
        assert_eq!(Pattern::parse(b"+."), empty(1));
    }

    #[test]
    fn coverage() {
        let p = |s: &str| Pattern::parse(s.as_bytes()).unwrap();
        assert!(p(">").covers(&p("a.b.c")));
        assert!(p(">").covers(&p("*")));
        assert!(p("a.>").covers(&p("a.*.c")));
        assert!(p("a.>").covers(&p("+A.>")));
        assert!(!p("a.>").covers(&p("a")));
        assert!(!p("a.>").covers(&p(">")));
        assert!(p("a.*").covers(&p("a.b")));
        assert!(!p("a.*").covers(&p("a.>")));
        assert!(!p("a.b").covers(&p("a.*")));
        assert!(p("a.b").covers(&p("a.B")));
        assert!(!p("a.b").covers(&p("a.b.c")));
    }

    proptest! {
        /// A pattern that covers another matches every identity the other matches.
        #[test]
        fn coverage_implies_matching(
            ids in proptest::collection::vec("[ab]{1}(\\.[ab]{1}){0,3}", 1..30),
            p in "([ab]|\\*)(\\.([ab]|\\*)){0,3}(\\.>)?|>",
            q in "([ab]|\\*)(\\.([ab]|\\*)){0,3}(\\.>)?|>",
        ) {
            let (p, q) = (Pattern::parse(p.as_bytes()).unwrap(), Pattern::parse(q.as_bytes()).unwrap());
            if p.covers(&q) {
                for id in &ids {
                    prop_assert!(!q.matches(id) || p.matches(id), "{:?} covers {:?} but not {}", p, q, id);
                }
            }
        }
    }
}
