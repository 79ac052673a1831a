//! The state index: for each key of `state_index`, which shims hold which value and which
//! words, so that a target filter on such a key (`class=CLR`, `channels~tanks`) finds its
//! shims without looking at the rest of the fleet.
//!
//! The index only proposes candidates: each is checked against its pattern and every
//! filter on its store, as an unindexed target's pattern matches are, so an index entry a
//! moment stale can never select a shim that does not pass. It is kept in step by
//! [`Hub::set_state`] (under the shim's store lock, the index's own lock taken last and
//! held for no other) and emptied of a shim when its state goes.
//!
//! On a node of a cluster a filtered target is resolved by its pattern's matches instead:
//! the shims of other nodes are known there by their mirrored state, or not at all.

use super::Hub;
use super::shim::Shim;
use crate::metrics::Counters;
use crate::proto::target::{Target, Test, words};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

/// Shims by serial.
type Shims = HashMap<u64, Weak<Shim>>;

/// The index of one key.
#[derive(Default)]
struct KeyIndex {
    /// Each indexed shim's value, ASCII-lowercased.
    values: HashMap<u64, Box<[u8]>>,
    /// Shims by whole value (lowercased).
    equals: HashMap<Box<[u8]>, Shims>,
    /// Shims by each word of their value (lowercased).
    words: HashMap<Box<[u8]>, Shims>,
}

impl KeyIndex {
    fn remove(&mut self, serial: u64) {
        let Some(old) = self.values.remove(&serial) else {
            return;
        };
        unlist(&mut self.equals, &old, serial);
        for w in words(&old) {
            unlist(&mut self.words, w, serial);
        }
    }

    fn insert(&mut self, shim: &Arc<Shim>, value: &[u8]) {
        let v: Box<[u8]> = value.to_ascii_lowercase().into();
        let weak = Arc::downgrade(shim);
        for w in words(&v) {
            (self.words.entry(w.into()).or_default()).insert(shim.serial, weak.clone());
        }
        (self.equals.entry(v.clone()).or_default()).insert(shim.serial, weak);
        self.values.insert(shim.serial, v);
    }

    fn shims(&self, test: Test, value: &[u8]) -> Option<&Shims> {
        match test {
            Test::Equals => self.equals.get(value),
            Test::Has => self.words.get(value),
        }
    }
}

fn unlist(map: &mut HashMap<Box<[u8]>, Shims>, key: &[u8], serial: u64) {
    if let Some(set) = map.get_mut(key) {
        set.remove(&serial);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// The index of the `state_index` keys.
pub struct Index {
    /// The keys, lowercase, and each one's index.
    keys: Vec<(Box<str>, RwLock<KeyIndex>)>,
}

impl Index {
    /// An empty index of `keys` (lowercase).
    pub fn new(keys: &[Box<str>]) -> Index {
        Index {
            keys: (keys.iter())
                .map(|k| (k.clone(), RwLock::new(KeyIndex::default())))
                .collect(),
        }
    }

    fn of(&self, key: &str) -> Option<&RwLock<KeyIndex>> {
        (self.keys.iter())
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(key.as_bytes()))
            .map(|(_, i)| i)
    }

    /// Whether `key` is indexed.
    pub fn covers(&self, key: &str) -> bool {
        self.of(key).is_some()
    }

    /// Notes that `shim`'s `key` is now `value` (`None`: deleted). Called under the shim's
    /// store lock, so that two changes of one shim are indexed in their order.
    pub(crate) fn update(&self, shim: &Arc<Shim>, key: &str, value: Option<&[u8]>) {
        let Some(ix) = self.of(key) else { return };
        let mut ix = ix.write();
        ix.remove(shim.serial);
        if let Some(v) = value {
            ix.insert(shim, v);
        }
    }

    /// Forgets the shim `serial` (its state is gone).
    pub(crate) fn remove(&self, serial: u64) {
        for (_, ix) in &self.keys {
            ix.write().remove(serial);
        }
    }

    /// The shims that may pass `target`'s filters, from the narrowest indexed filter; `None`
    /// when no filter's key is indexed. A shim that passes every filter is among them.
    pub(crate) fn candidates(&self, target: &Target) -> Option<Vec<Arc<Shim>>> {
        let mut best: Option<Vec<Arc<Shim>>> = None;
        for f in &target.filters {
            let Some(ix) = self.of(&f.key) else { continue };
            let ix = ix.read();
            let n = ix.shims(f.test, &f.value).map_or(0, HashMap::len);
            if best.as_ref().is_some_and(|b| b.len() <= n) {
                continue;
            }
            let found = (ix.shims(f.test, &f.value).into_iter())
                .flat_map(|set| set.values().filter_map(Weak::upgrade))
                .collect::<Vec<_>>();
            let empty = found.is_empty();
            best = Some(found);
            if empty {
                break;
            }
        }
        best
    }
}

impl Hub {
    /// Calls `f` with each shim `target` names: its pattern's matches that pass its
    /// filters. A shim of another node whose state is not mirrored here passes when
    /// `unknown_remote` (a routed frame, which that node filters again) and not otherwise.
    pub(crate) fn for_each_selected(
        &self,
        target: &Target,
        unknown_remote: bool,
        mut f: impl FnMut(&Arc<Shim>),
    ) {
        if !target.is_filtered() {
            return self.router.for_each_match(&target.pattern, f);
        }
        let counters = self.counters();
        Counters::bump(&counters.filtered_targets);
        let mut looked = 0u64;
        let passes = |s: &Shim| {
            let g = s.state.lock();
            match g.as_ref().filter(|st| st.has_entries() || !s.is_remote()) {
                Some(store) => store.passes(target),
                None => s.is_remote() && unknown_remote,
            }
        };
        // An exact pattern names one shim at most: its lookup is the narrowest there is.
        let indexed = if self.cluster().is_none() && target.pattern.is_wildcard() {
            self.index.candidates(target)
        } else {
            None
        };
        match indexed {
            Some(found) => {
                for s in &found {
                    looked += 1;
                    if !s.is_closed() && target.pattern.matches(&s.identity()) && passes(s) {
                        f(s);
                    }
                }
            }
            None => self.router.for_each_match(&target.pattern, |s| {
                looked += 1;
                if passes(s) {
                    f(s);
                }
            }),
        }
        (counters.filter_candidates).fetch_add(looked, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_value_leaves_no_entry() {
        let mut ix = KeyIndex::default();
        ix.values.insert(7, Box::from(&b"tanks heals"[..]));
        (ix.equals.entry(Box::from(&b"tanks heals"[..])).or_default()).insert(7, Weak::new());
        for w in [&b"tanks"[..], b"heals"] {
            (ix.words.entry(Box::from(w)).or_default()).insert(7, Weak::new());
        }
        ix.remove(7);
        assert!(ix.values.is_empty() && ix.equals.is_empty() && ix.words.is_empty());
    }
}
