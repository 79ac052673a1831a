//! The router: the index of identified shims by identity, that patterns are matched on,
//! and the one place an identity is taken, so that no two live shims hold the same one.
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

/// What a claim on an identity did.
#[derive(Debug)]
pub enum Claim {
    /// The shim holds the identity now; if it took it from a live shim, that one is
    /// returned, already out of the index, for the caller to close.
    Held(Option<Arc<Shim>>),
    /// Another live shim holds it, and keeps it.
    Taken,
    /// The claimant was closed meanwhile: nothing changed.
    Closed,
}

/// The index of identified shims by identity.
#[derive(Default)]
pub struct Router {
    root: RwLock<Node>,
}

impl Router {
    /// Makes `label` the identity of `shim`, in the index and on the shim in one step
    /// (so routing never sees it missing, nor under two names), and takes it from the
    /// shim holding it (compared ignoring ASCII case) when `replace` says so. A holder
    /// already closing loses it in any case. A shim renaming to its own identity in
    /// another letter case keeps its place.
    ///
    /// `first` runs under the lock when the claim succeeds, before the shim can be found by
    /// any match (the first Identify queues the Session there, so that no frame routed to
    /// the shim can reach its client ahead of it), with the holder it displaced and the
    /// shim's old identity (a node of a cluster tells the others there, so that its
    /// changes to one identity reach them in the order they were made here).
    pub fn claim(
        &self,
        shim: &Arc<Shim>,
        label: Arc<str>,
        replace: impl FnOnce(&Shim) -> bool,
        first: impl FnOnce(Option<&Arc<Shim>>, &str),
    ) -> (Claim, Arc<str>) {
        let parts = key_parts(&label);
        let mut root = self.root.write();
        // Checked under the lock that `remove` takes after marking the shim closed:
        // either this claim is undone by that removal, or it sees the mark.
        if shim.is_closed() {
            return (Claim::Closed, shim.identity());
        }
        let mut node = &mut *root;
        for p in &parts {
            node = node.children.entry(p.clone()).or_default();
        }
        let mut displaced = None;
        if let Some(i) = node.members.iter().position(|s| s.serial != shim.serial) {
            let holder = &node.members[i];
            let live = holder.outbox.is_open() && !holder.is_closed();
            if live && !replace(holder) {
                return (Claim::Taken, shim.identity());
            }
            let holder = node.members.swap_remove(i);
            displaced = live.then_some(holder);
        }
        let here = node.members.iter().any(|s| s.serial == shim.serial);
        if !here {
            node.members.push(shim.clone());
        }
        let old = shim.set_identity(label);
        if !here && !old.is_empty() {
            root.remove(&key_parts(&old), shim.serial);
        }
        first(displaced.as_ref(), &old);
        (Claim::Held(displaced), old)
    }

    /// Takes `shim` out of the index (nothing if it is not in it).
    pub fn remove(&self, shim: &Shim) {
        self.remove_then(shim, || {});
    }

    /// Takes `shim` out of the index, then runs `then` under the same lock (see
    /// [`Router::claim`]'s `first`).
    pub fn remove_then(&self, shim: &Shim, then: impl FnOnce()) {
        let mut root = self.root.write();
        let identity = shim.identity();
        if !identity.is_empty() {
            root.remove(&key_parts(&identity), shim.serial);
        }
        then();
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

    fn claim(r: &Router, s: &Arc<Shim>, id: &str, replace: bool) -> Claim {
        r.claim(s, Arc::from(id), |_| replace, |_, _| {}).0
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
            assert!(matches!(claim(&r, s, id, false), Claim::Held(None)));
        }
        assert_eq!(matched(&r, "peq.ecommons.bob"), [0]);
        assert_eq!(matched(&r, "PEQ.ECommons.ALICE"), [1]);
        assert_eq!(matched(&r, "peq.ecommons.*"), [0, 1]);
        assert_eq!(matched(&r, "*.*.bob"), [0, 2, 3]);
        assert_eq!(matched(&r, "peq.>"), [0, 1, 2]);
        assert_eq!(matched(&r, ">"), [0, 1, 2, 3, 4]);
        assert_eq!(matched(&r, "*"), [4]);
        assert_eq!(matched(&r, "peq.ecommons"), Vec::<u64>::new());
        claim(&r, &shims[0], "peq.nektulos.bobby", false);
        assert_eq!(&*shims[0].identity(), "peq.nektulos.bobby");
        assert_eq!(matched(&r, "peq.ecommons.*"), [1]);
        assert_eq!(matched(&r, "peq.nektulos.*"), [0, 2]);
        r.remove(&shims[2]);
        assert_eq!(matched(&r, "*.nektulos.*"), [0]);
    }

    #[test]
    fn identities_are_exclusive_ignoring_case() {
        let r = Router::default();
        let (a, b, c) = (shim(1), shim(2), shim(3));
        claim(&r, &a, "peq.z.bob", false);
        assert!(matches!(claim(&r, &b, "PEQ.Z.BOB", false), Claim::Taken));
        assert_eq!(&*b.identity(), "", "a refused claim changes nothing");
        claim(&r, &c, "peq.z.carol", false);
        assert!(matches!(claim(&r, &c, "peq.z.Bob", false), Claim::Taken));
        assert_eq!(&*c.identity(), "peq.z.carol");
        // Renaming to one's own identity in another case keeps the place.
        assert!(matches!(
            claim(&r, &a, "Peq.Z.Bob", false),
            Claim::Held(None)
        ));
        assert_eq!(matched(&r, "peq.z.bob"), [1]);
        // Replace: the holder leaves the index and is handed back.
        match claim(&r, &b, "peq.z.bob", true) {
            Claim::Held(Some(old)) => assert_eq!(old.serial, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(matched(&r, "peq.z.bob"), [2]);
        // A closed shim claims nothing, and its removal takes it out wherever it is.
        assert!(b.mark_closed());
        assert!(matches!(claim(&r, &b, "peq.z.other", false), Claim::Closed));
        r.remove(&b);
        assert_eq!(matched(&r, ">"), [3]);
    }

    proptest! {
        /// The trie finds exactly the identities that direct comparison finds, and never
        /// holds two shims under one identity.
        #[test]
        fn trie_agrees_with_direct_matching(
            ids in proptest::collection::vec("[aAbB]{1,2}(\\.[aAbB]{1,2}){0,3}", 1..30),
            pat in "([aAbB]{1,2}|\\*)(\\.([aAbB]{1,2}|\\*)){0,3}(\\.>)?",
        ) {
            let r = Router::default();
            let mut held: Vec<(u64, String)> = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let taken = held.iter().any(|(_, h)| h.eq_ignore_ascii_case(id));
                match claim(&r, &shim(i as u64), id, false) {
                    Claim::Held(None) => {
                        prop_assert!(!taken);
                        held.push((i as u64, id.clone()));
                    }
                    Claim::Taken => prop_assert!(taken),
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            let p = Pattern::parse(pat.as_bytes()).unwrap();
            let mut expect: Vec<u64> = held.iter()
                .filter(|(_, id)| p.matches(id)).map(|(i, _)| *i).collect();
            expect.sort();
            prop_assert_eq!(matched(&r, &pat), expect);
        }
    }
}
