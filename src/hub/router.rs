//! The router: the index of identified shims by identity, that patterns are matched on.
//!
//! Identities are kept in a trie keyed by lowercased segment, as nats-server keeps
//! subjects, so a lookup walks the pattern, not the fleet: an exact identity costs one
//! hash lookup per segment whatever the number of shims, `*` visits the children of one
//! node, and `>` visits the subtree it names.

use crate::hub::shim::Shim;
use crate::proto::pattern::{Pattern, Seg, lowercase};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

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

    proptest! {
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
