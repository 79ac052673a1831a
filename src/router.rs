//! The router: target patterns, and the segment index of identities they are matched on.
//!
//! Identities are dot-separated segments (`peq.ecommons.bob`: server, zone, character). A
//! pattern is an identity in which a segment `*` matches exactly one segment and a last
//! segment `>` matches one or more remaining segments. Matching ignores ASCII case.
//!
//! Identities are kept in a trie keyed by lowercased segment, as nats-server keeps
//! subjects, so a lookup walks the pattern, not the fleet: an exact identity costs one
//! hash lookup per segment whatever the number of shims, `*` visits the children of one
//! node, and `>` visits the subtree it names.

use crate::shim::Shim;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
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
#[derive(Debug, Error, PartialEq, Eq)]
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
        for (i, s) in body.split(|&b| b == b'.').enumerate() {
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

    /// Whether `identity` matches, by direct comparison (the trie's reference behaviour).
    pub fn matches(&self, identity: &str) -> bool {
        let parts: Vec<Box<str>> = identity
            .split('.')
            .map(|p| lowercase(p.as_bytes()))
            .collect();
        let mut i = 0;
        for seg in &self.segs {
            match seg {
                Seg::Rest => return i < parts.len(),
                Seg::One if i < parts.len() => {}
                Seg::Lit(l) if i < parts.len() && parts[i] == *l => {}
                _ => return false,
            }
            i += 1;
        }
        i == parts.len()
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

fn lowercase(b: &[u8]) -> Box<str> {
    String::from_utf8_lossy(b)
        .to_ascii_lowercase()
        .into_boxed_str()
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    members: Vec<Arc<Shim>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.members.is_empty()
    }

    fn visit_all(&self, f: &mut dyn FnMut(&Arc<Shim>)) {
        self.members.iter().for_each(&mut *f);
        for c in self.children.values() {
            c.visit_all(f);
        }
    }

    fn visit(&self, segs: &[Seg], f: &mut dyn FnMut(&Arc<Shim>)) {
        let Some((seg, rest)) = segs.split_first() else {
            self.members.iter().for_each(f);
            return;
        };
        match seg {
            Seg::Lit(l) => {
                if let Some(c) = self.children.get(l) {
                    c.visit(rest, f);
                }
            }
            Seg::One => {
                for c in self.children.values() {
                    c.visit(rest, f);
                }
            }
            Seg::Rest => {
                for c in self.children.values() {
                    c.visit_all(f);
                }
            }
        }
    }

    /// Removes the member with `serial` under the path `parts`; prunes emptied nodes.
    fn remove(&mut self, parts: &[Box<str>], serial: u64) -> bool {
        match parts.split_first() {
            None => {
                if let Some(i) = self.members.iter().position(|s| s.serial == serial) {
                    self.members.swap_remove(i);
                    return true;
                }
                false
            }
            Some((p, rest)) => {
                let Some(c) = self.children.get_mut(p) else {
                    return false;
                };
                let removed = c.remove(rest, serial);
                if c.is_empty() {
                    self.children.remove(p);
                }
                removed
            }
        }
    }
}

fn key_parts(identity: &str) -> Vec<Box<str>> {
    identity
        .split('.')
        .map(|p| lowercase(p.as_bytes()))
        .collect()
}

/// The index of identified shims by identity.
#[derive(Default)]
pub struct Router {
    root: RwLock<Node>,
}

impl Router {
    /// Adds `shim` under `identity`.
    pub fn insert(&self, identity: &str, shim: &Arc<Shim>) {
        let parts = key_parts(identity);
        let mut root = self.root.write();
        let mut node = &mut *root;
        for p in parts {
            node = node.children.entry(p).or_default();
        }
        node.members.push(shim.clone());
    }

    /// Removes `shim` from under `identity`.
    pub fn remove(&self, identity: &str, shim: &Shim) {
        self.root.write().remove(&key_parts(identity), shim.serial);
    }

    /// Moves `shim` from `old` to `new` in one step, so routing never sees it missing.
    pub fn rename(&self, old: &str, new: &str, shim: &Arc<Shim>) {
        let new_parts = key_parts(new);
        let mut root = self.root.write();
        root.remove(&key_parts(old), shim.serial);
        let mut node = &mut *root;
        for p in new_parts {
            node = node.children.entry(p).or_default();
        }
        node.members.push(shim.clone());
    }

    /// Calls `f` for every shim whose identity matches `pattern` (the sender included;
    /// callers apply [`Pattern::include_self`]). Runs under a read lock: `f` must not
    /// call back into the router.
    pub fn for_each_match(&self, pattern: &Pattern, mut f: impl FnMut(&Arc<Shim>)) {
        self.root.read().visit(&pattern.segs, &mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shim(serial: u64) -> Arc<Shim> {
        Arc::new(Shim::new(serial, 0, "127.0.0.1:1".parse().unwrap(), 0, 0))
    }

    fn matched(r: &Router, p: &str) -> Vec<u64> {
        let mut v = Vec::new();
        r.for_each_match(&Pattern::parse(p.as_bytes()).unwrap(), |s| v.push(s.serial));
        v.sort();
        v
    }

    #[test]
    fn pattern_forms() {
        let r = Router::default();
        let ids = [
            "peq.ecommons.bob",
            "peq.ecommons.Alice",
            "peq.nektulos.bob",
            "live.ecommons.bob",
            "peq",
        ];
        let shims: Vec<_> = (0..ids.len() as u64).map(shim).collect();
        for (id, s) in ids.iter().zip(&shims) {
            r.insert(id, s);
        }
        assert_eq!(matched(&r, "peq.ecommons.bob"), [0]);
        assert_eq!(matched(&r, "PEQ.ECommons.ALICE"), [1]);
        assert_eq!(matched(&r, "peq.ecommons.*"), [0, 1]);
        assert_eq!(matched(&r, "*.*.bob"), [0, 2, 3]);
        assert_eq!(matched(&r, "peq.>"), [0, 1, 2]);
        assert_eq!(matched(&r, ">"), [0, 1, 2, 3, 4]);
        assert_eq!(matched(&r, "*"), [4]);
        assert_eq!(matched(&r, "peq.ecommons"), Vec::<u64>::new());
        r.rename("peq.ecommons.bob", "peq.nektulos.bobby", &shims[0]);
        assert_eq!(matched(&r, "peq.ecommons.*"), [1]);
        assert_eq!(matched(&r, "peq.nektulos.*"), [0, 2]);
        r.remove("PEQ.nektulos.bob", &shims[2]);
        assert_eq!(matched(&r, "*.nektulos.*"), [0]);
    }

    #[test]
    fn parse_rules() {
        assert!(Pattern::parse(b"+peq.>").unwrap().include_self);
        assert!(!Pattern::parse(b"peq.>").unwrap().include_self);
        assert_eq!(Pattern::parse(b""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse(b"+"), Err(PatternError::Empty));
        assert_eq!(Pattern::parse(b"a.>.b"), Err(PatternError::RestNotLast));
        assert_eq!(Pattern::parse(b"a.\xff"), Err(PatternError::NotUtf8));
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

        /// The trie finds exactly the identities that direct comparison finds.
        #[test]
        fn trie_agrees_with_direct_matching(
            ids in proptest::collection::vec("[aAbB]{1,2}(\\.[aAbB]{1,2}){0,3}", 1..30),
            pat in "([aAbB]{1,2}|\\*)(\\.([aAbB]{1,2}|\\*)){0,3}(\\.>)?",
        ) {
            let r = Router::default();
            for (i, id) in ids.iter().enumerate() {
                r.insert(id, &shim(i as u64));
            }
            let p = Pattern::parse(pat.as_bytes()).unwrap();
            let mut expect: Vec<u64> = ids.iter().enumerate()
                .filter(|(_, id)| p.matches(id)).map(|(i, _)| i as u64).collect();
            expect.sort();
            prop_assert_eq!(matched(&r, &pat), expect);
        }
    }
}
