//! Relay state: each shim's keys, the subscriptions that watch them, and what reaches
//! each subscriber.
//!
//! A shim's [`Store`] holds its keys with the hub time and the sequence number of their
//! last change. A [`Subscription`] remembers, per shim it watches, the sequence number it
//! last delivered: what is pending for a subscriber is "this shim changed since", one
//! entry per shim watched, so a subscriber's pending state is bounded by what it watches
//! and never by the rate of change. Values are read when a delivery is built, so a value
//! that changed five times since the last delivery is sent once, with its latest value.
//!
//! A Set marks the subscriptions watching its shim; at the end of the setter's slice of
//! input ([`Hub::deliver_state`]) each marked subscription is delivered at once when its
//! interval has passed and its connection is not backlogged, and otherwise queued on the
//! core serving its subscriber, whose driver calls [`Hub::state_tick`] when it is due.
//!
//! Order. Every frame about one shim reaches a subscriber in the order the hub decided
//! it: a delivery is built and queued under the shim's store lock, and joins, leaves and
//! renames take that lock too, so a State never follows that shim's leave, and a
//! Subscribe's listing is queued before anything else of that subscription (it is
//! *held* until then). Each State frame carries the store's sequence number, so a
//! consumer can drop a datagram that arrives after a newer frame over TCP.
//!
//! Locks are taken in one order: the registry, a shim's store, a subscription's pending
//! state, then outboxes and the per-core queues.

use super::Hub;
use super::send::{Bucket, Effects, Route, Via, Work};
use super::shim::{CloseReason, Shim};
use crate::config::User;
use crate::metrics::Counters;
use crate::proto::Opcode;
use crate::proto::reject::{Rate, Reject};
use crate::proto::reply;
use crate::proto::state::{
    MAX_STATE_DATAGRAM, Mode, SetItem, StateFrame, Subscribe, item_len, presence,
};
use crate::proto::target::Target;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;
use tracing::debug;

/// How long a subscription that could not be delivered (its connection backlogged, or a
/// delivery of it under way on another core) waits before it is tried again.
pub const STATE_TICK_MS: u64 = 5;
/// After a delivery over UDP, how long at least until the shims it carried are sent again
/// in full over TCP; each subscription adds its own part of [`STATE_REFRESH_SPREAD_MS`],
/// so that subscriptions made together do not refresh together. A lost datagram leaves a
/// value wrong for at most the two together, even if it never changes again.
pub const STATE_REFRESH_MS: u64 = 20_000;
/// See [`STATE_REFRESH_MS`].
pub const STATE_REFRESH_SPREAD_MS: u64 = 10_000;
/// Bytes queued for a subscriber over TCP past which its changes wait; also the most one
/// delivery queues over TCP before the rest waits for the next.
const BACKLOG: usize = 64 * 1024;
/// A Subscribe or Get listing may be this many times `outbound_limit`, at most.
pub const LISTING_FACTOR: usize = 8;
/// The reason of the leave a subscriber is sent when a shim's state no longer passes the
/// subscription's filters.
pub const NOT_SELECTED: &str = "not selected";

/// One key of a shim's state.
struct Entry {
    /// The key, then the value, in one allocation.
    kv: Box<[u8]>,
    /// The key's length.
    klen: u8,
    /// When the value was set (hub milliseconds).
    at_ms: u64,
    /// The store's sequence number at its last change.
    seq: u64,
}

impl Entry {
    /// The key's bytes (ASCII): what every comparison and encoding uses.
    fn key_bytes(&self) -> &[u8] {
        &self.kv[..self.klen as usize]
    }

    fn key(&self) -> &str {
        // Keys are checked ASCII when set.
        std::str::from_utf8(&self.kv[..self.klen as usize]).unwrap_or("")
    }

    fn value(&self) -> &[u8] {
        &self.kv[self.klen as usize..]
    }

    fn size(&self) -> usize {
        self.kv.len()
    }
}

/// A shim's state, the subscriptions watching it, and its connection's own.
#[derive(Default)]
pub(crate) struct Store {
    entries: Vec<Entry>,
    /// Deleted keys with the sequence number of their deletion, so that a delta can say
    /// so; at most `state_keys` of them.
    tombs: Vec<(Box<str>, u64)>,
    /// A delta since a sequence number below this cannot be formed (a tombstone was
    /// dropped): such a subscriber is sent the whole state instead.
    floor: u64,
    /// The sequence number of the last change.
    seq: u64,
    /// When the last Set was applied, changed anything or not (hub milliseconds; 0:
    /// never): what tells a live shim from a frozen one whose values stand still.
    last_set_ms: u64,
    /// Bytes of keys and values held.
    bytes: usize,
    /// The subscriptions watching this shim.
    watchers: Vec<Arc<Subscription>>,
    /// The subscriptions this shim's connection holds.
    subs: Vec<Arc<Subscription>>,
    /// What the shim may still Set this second (made at its first Set).
    sets: Option<Bucket>,
}

impl Store {
    fn find(&self, key: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.key_bytes().eq_ignore_ascii_case(key.as_bytes()))
    }

    /// Writes the whole state, the keys `keys` lets through, into `f`.
    fn full(&self, keys: &[Box<str>], now_ms: u64, f: &mut StateFrame) {
        for e in &self.entries {
            if wanted(keys, e.key_bytes()) {
                f.value(e.key_bytes(), now_ms.saturating_sub(e.at_ms), e.value());
            }
        }
    }

    /// Keys `keys` lets through that changed at `seq` (set or deleted).
    fn changed_at(&self, seq: u64, keys: &[Box<str>]) -> u64 {
        let set = (self.entries.iter())
            .filter(|e| e.seq == seq && wanted(keys, e.key_bytes()))
            .count();
        let deleted = (self.tombs.iter())
            .filter(|(k, s)| *s == seq && wanted(keys, k.as_bytes()))
            .count();
        (set + deleted) as u64
    }

    /// The value of `key` (ignoring ASCII case).
    pub(crate) fn value_of(&self, key: &str) -> Option<&[u8]> {
        self.find(key).map(|i| self.entries[i].value())
    }

    /// Whether it passes `target`'s filters.
    pub(crate) fn passes(&self, target: &Target) -> bool {
        target.passes(|k| self.value_of(k))
    }

    /// Whether any key `target`'s filters test changed at `seq`.
    fn filters_changed(&self, seq: u64, target: &Target) -> bool {
        (self.entries.iter()).any(|e| e.seq == seq && target.tests_key(e.key_bytes()))
            || (self.tombs.iter()).any(|(k, s)| *s == seq && target.tests_key(k.as_bytes()))
    }

    /// Whether it holds any key.
    pub(crate) fn has_entries(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Whether a subscription watches it.
    pub(crate) fn is_watched(&self) -> bool {
        !self.watchers.is_empty()
    }

    fn is_idle(&self) -> bool {
        self.entries.is_empty()
            && self.tombs.is_empty()
            && self.watchers.is_empty()
            && self.subs.is_empty()
            && self.sets.is_none()
    }
}

fn wanted(keys: &[Box<str>], key: &[u8]) -> bool {
    keys.is_empty() || keys.iter().any(|k| k.as_bytes().eq_ignore_ascii_case(key))
}

/// One shim watched by a subscription.
struct Track {
    shim: Weak<Shim>,
    /// The identity the subscriber knows the shim by (its join, or the listing).
    identity: Arc<str>,
    /// The store's sequence number last delivered.
    delivered: u64,
    /// Listed in `Pending::dirty`.
    dirty: bool,
    /// The next delivery sends the whole state.
    full: bool,
    /// A delta went over UDP since the last whole state: the refresh resends it.
    udp: bool,
    /// It passes the subscription's filters: the subscriber knows it (a join or the
    /// listing) and is sent its state. A shim the pattern names but the filters do not is
    /// watched all the same, so that a change of its filtered keys is seen at once.
    selected: bool,
    /// Found by the Subscribe, not yet in its listing: a change of selection until then
    /// only changes `selected` (the listing says the rest).
    unlisted: bool,
}

/// What a subscription has not yet delivered, and when it runs next.
#[derive(Default)]
struct Pending {
    /// The shims watched, by serial.
    watched: HashMap<u64, Track>,
    /// Shims that changed since their last delivery.
    dirty: Vec<u64>,
    /// Key changes marked since the last delivery (to count what coalescing saved).
    marks: u64,
    /// When the last delivery was built (hub milliseconds; `None`: never).
    last_ms: Option<u64>,
    /// A delivery attempt is coming: listed in a slice's effects, or queued.
    scheduled: bool,
    /// A delivery is being built (on some core).
    delivering: bool,
    /// The Subscribe's listing is not queued yet: nothing else may go before it.
    held: bool,
    /// Presence frames that came while held, queued right after the listing.
    queued: Vec<Bytes>,
    /// When the shims that got deltas over UDP are sent again in full.
    refresh_ms: Option<u64>,
    /// Its entry in its core's queue.
    due_key: Option<(u64, u64)>,
}

/// A standing request for the state of the shims a target names.
pub struct Subscription {
    /// The subscriber's id for it.
    pub sid: u32,
    owner: Weak<Shim>,
    owner_serial: u64,
    core: usize,
    target: Target,
    /// The keys wanted; empty: every key.
    keys: Vec<Box<str>>,
    interval_ms: u64,
    pending: Mutex<Pending>,
    /// It counts in the cluster's interest (`hub/cluster.rs`).
    interested: AtomicBool,
    ended: AtomicBool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sid", &self.sid)
            .field("owner", &self.owner_serial)
            .finish()
    }
}

impl Subscription {
    /// Whether this subscription watches `shim` under `identity`, `users` telling whether
    /// the hub has users (then the subscriber's user must be allowed to read it, as the
    /// last reload left it).
    fn watches(&self, shim: &Shim, identity: &str, users: bool) -> bool {
        (self.target.pattern.include_self || shim.serial != self.owner_serial)
            && self.target.pattern.matches(identity)
            && (!users || self.reads(identity))
    }

    fn reads(&self, identity: &str) -> bool {
        let user = self.owner.upgrade().and_then(|o| o.user());
        may_read(true, user.as_deref(), identity)
    }

    /// Notes that the shim `serial` changed (`n` keys the subscription wants). True when
    /// no delivery attempt was coming (the caller lists it for one).
    fn mark(&self, serial: u64, n: u64) -> bool {
        let mut p = self.pending.lock();
        let p = &mut *p;
        let Some(t) = p.watched.get_mut(&serial).filter(|t| t.selected) else {
            return false;
        };
        if !std::mem::replace(&mut t.dirty, true) {
            p.dirty.push(serial);
        }
        p.marks += n;
        !std::mem::replace(&mut p.scheduled, true)
    }

    fn track(&self, shim: &Arc<Shim>, identity: Arc<str>, delivered: u64, full: bool) -> Track {
        Track {
            shim: Arc::downgrade(shim),
            identity,
            delivered,
            dirty: false,
            full,
            udp: false,
            selected: true,
            unlisted: false,
        }
    }

    /// Whether the shim whose store is `store` (`None`: it holds nothing) passes the
    /// filters.
    fn selects(&self, store: Option<&Store>) -> bool {
        !self.target.is_filtered() || store.is_some_and(|s| s.passes(&self.target))
    }
}

fn may_read(users: bool, reader: Option<&User>, identity: &str) -> bool {
    !users || reader.is_some_and(|u| u.reads(identity))
}

/// The subscriptions of one core's connections waiting for their time.
#[derive(Default)]
struct CoreQueue {
    /// By due time (hub milliseconds) and a number that keeps keys apart; one entry per
    /// subscription at most (`Pending::due_key`).
    due: BTreeMap<(u64, u64), Arc<Subscription>>,
    next: u64,
    /// Outboxes that were pushed presence outside any slice: flushed by the next tick.
    flush: Vec<Arc<Shim>>,
}

/// The hub's relay state: every subscription, and each core's waiting ones.
pub struct States {
    registry: Mutex<HashMap<(u64, u32), Arc<Subscription>>>,
    cores: Vec<(Mutex<CoreQueue>, Notify)>,
}

impl States {
    pub(crate) fn new(cores: usize) -> States {
        States {
            registry: Mutex::new(HashMap::new()),
            cores: (0..cores.max(1))
                .map(|_| (Mutex::new(CoreQueue::default()), Notify::new()))
                .collect(),
        }
    }

    /// Subscriptions open.
    pub fn subscriptions(&self) -> usize {
        self.registry.lock().len()
    }

    fn queue(&self, core: usize) -> &(Mutex<CoreQueue>, Notify) {
        &self.cores[core % self.cores.len()]
    }

    /// Resolves when something was queued for core `core` since the last call (create
    /// it before asking [`Hub::state_next`], so that nothing queued between is missed).
    pub fn notified(&self, core: usize) -> tokio::sync::futures::Notified<'_> {
        self.queue(core).1.notified()
    }

    /// Has `sub` tried at `at_ms`, unless it is already due no later (called with its
    /// pending state locked).
    fn defer(&self, sub: &Arc<Subscription>, p: &mut Pending, at_ms: u64) {
        let (q, n) = self.queue(sub.core);
        let mut q = q.lock();
        if let Some(k) = p.due_key {
            if k.0 <= at_ms {
                return;
            }
            q.due.remove(&k);
        }
        q.next += 1;
        let key = (at_ms, q.next);
        q.due.insert(key, sub.clone());
        p.due_key = Some(key);
        drop(q);
        n.notify_one();
    }

    /// Takes `sub` off its core's queue (called with its pending state locked).
    fn undefer(&self, sub: &Subscription, p: &mut Pending) {
        if let Some(k) = p.due_key.take() {
            self.queue(sub.core).0.lock().due.remove(&k);
        }
    }

    /// Lists `shim`'s outbox, queued outside any slice, for its core's next tick to flush.
    pub(crate) fn defer_flush(&self, shim: &Arc<Shim>) {
        let (q, n) = self.queue(shim.core as usize);
        q.lock().flush.push(shim.clone());
        n.notify_one();
    }
}

impl Hub {
    /// Calls `f` with each key `shim` holds, in the order first set: the key, the value
    /// and when it was set (hub milliseconds).
    pub fn state_items(&self, shim: &Shim, mut f: impl FnMut(&str, &[u8], u64)) {
        if let Some(store) = shim.state.lock().as_ref() {
            for e in &store.entries {
                f(e.key(), e.value(), e.at_ms);
            }
        }
    }

    /// The sequence number of `shim`'s last state change and when its last Set was applied
    /// (hub milliseconds); `None` for a shim that never set a key.
    pub fn state_mark(&self, shim: &Shim) -> Option<(u64, u64)> {
        let guard = shim.state.lock();
        let store = guard.as_ref()?;
        (store.last_set_ms > 0 || store.seq > 0).then_some((store.seq, store.last_set_ms))
    }

    /// A Set from `shim`: applied whole or not at all. Not answered when applied; a
    /// refusal is an Error that starts `state refused:` (it answers no request).
    pub(crate) fn set_state(
        &self,
        shim: &Arc<Shim>,
        items: &[SetItem<'_>],
        via: Via,
        out: &mut Effects,
    ) {
        let now_ms = out.now_ms;
        if let Err(r) = self.allow_set(shim, now_ms) {
            return self.refuse(shim, Route::Reply(via), &r, out);
        }
        let c = self.config();
        let (max_value, max_keys, max_bytes) = (c.state_value_bytes, c.state_keys, c.state_bytes);
        drop(c);
        // The last item of each key wins: keep the index of the last one.
        let keep = last_of_each(items);
        for &i in &keep {
            let it = &items[i];
            if let Some(v) = it.value
                && v.len() > max_value
            {
                let r = Reject::StateValue(it.key.to_string(), max_value);
                self.log_refusal(shim, &r, now_ms);
                return self.refuse(shim, Route::Reply(via), &r, out);
            }
        }
        let mut guard = shim.state.lock();
        if shim.is_closed() {
            // Removed meanwhile: its state is gone with it.
            return;
        }
        let store = guard.get_or_insert_with(Box::default);
        // What the state would be.
        let (mut keys, mut bytes) = (store.entries.len() as i64, store.bytes as i64);
        for &i in &keep {
            let it = &items[i];
            let held = store.find(it.key).map(|j| &store.entries[j]);
            match (held, it.value) {
                (Some(e), Some(v)) => bytes += v.len() as i64 - e.value().len() as i64,
                (None, Some(v)) => {
                    keys += 1;
                    bytes += (it.key.len() + v.len()) as i64;
                }
                (Some(e), None) => {
                    keys -= 1;
                    bytes -= e.size() as i64;
                }
                (None, None) => {}
            }
        }
        let refused = if keys as usize > max_keys {
            Some(Reject::StateKeys(max_keys))
        } else if bytes as usize > max_bytes {
            Some(Reject::StateBytes(max_bytes))
        } else {
            None
        };
        if let Some(r) = refused {
            drop(guard);
            self.log_refusal(shim, &r, now_ms);
            return self.refuse(shim, Route::Reply(via), &r, out);
        }
        let changed = self.apply_set(shim, store, items, &keep, max_keys, now_ms, None, out);
        drop(guard);
        if changed {
            self.cluster_state(shim, true);
        }
    }

    /// Applies `items` (the last of each key: `keep`) to `store`, the store of `shim`,
    /// locked: each value that differs is stamped with the store's next sequence number
    /// and `now_ms` (less its age in `ages`, for a mirrored state), and each watcher that
    /// wants a changed key is marked. Returns whether anything changed.
    #[allow(clippy::too_many_arguments)]
    fn apply_set(
        &self,
        shim: &Arc<Shim>,
        store: &mut Store,
        items: &[SetItem<'_>],
        keep: &[usize],
        max_keys: usize,
        now_ms: u64,
        ages: Option<&[u64]>,
        out: &mut Effects,
    ) -> bool {
        let at = |i: usize| {
            ages.map_or(now_ms, |a| {
                now_ms.saturating_sub(a.get(i).copied().unwrap_or(0))
            })
        };
        store.last_set_ms = now_ms;
        let seq = store.seq + 1;
        // Keys changed (each change is stamped `seq`: the watchers count theirs from that).
        let mut changed = 0usize;
        let before = store.entries.len();
        let new = keep
            .iter()
            .filter(|&&i| items[i].value.is_some() && store.find(items[i].key).is_none())
            .count();
        store.entries.reserve_exact(new);
        for &i in keep {
            let SetItem { key, value } = items[i];
            match (store.find(key), value) {
                (Some(j), Some(v)) => {
                    let e = &mut store.entries[j];
                    if e.value() == v {
                        continue;
                    }
                    let mut kv = Vec::with_capacity(e.klen as usize + v.len());
                    kv.extend_from_slice(&e.kv[..e.klen as usize]);
                    kv.extend_from_slice(v);
                    store.bytes = store.bytes - e.size() + kv.len();
                    e.kv = kv.into_boxed_slice();
                    e.at_ms = at(i);
                    e.seq = seq;
                    changed += 1;
                    self.index.update(shim, key, Some(v));
                }
                (None, Some(v)) => {
                    let key = first_spelling(items, key);
                    let mut kv = Vec::with_capacity(key.len() + v.len());
                    kv.extend_from_slice(key.as_bytes());
                    kv.extend_from_slice(v);
                    store.bytes += kv.len();
                    store.entries.push(Entry {
                        kv: kv.into_boxed_slice(),
                        klen: key.len() as u8,
                        at_ms: at(i),
                        seq,
                    });
                    store.tombs.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
                    changed += 1;
                    self.index.update(shim, key, Some(v));
                }
                (Some(j), None) => {
                    let e = store.entries.remove(j);
                    store.bytes -= e.size();
                    store.tombs.push((Box::from(e.key()), seq));
                    self.index.update(shim, e.key(), None);
                    if store.tombs.len() > max_keys {
                        let (_, dropped) = store.tombs.remove(0);
                        store.floor = store.floor.max(dropped);
                    }
                    changed += 1;
                }
                (None, None) => {}
            }
        }
        let counters = self.counters();
        if ages.is_none() {
            counters.state_sets.fetch_add(1, Ordering::Relaxed);
        }
        let after = store.entries.len();
        if after >= before {
            counters
                .state_keys
                .fetch_add((after - before) as u64, Ordering::Relaxed);
        } else {
            counters
                .state_keys
                .fetch_sub((before - after) as u64, Ordering::Relaxed);
        }
        if changed == 0 {
            return false;
        }
        store.seq = seq;
        counters
            .state_changes
            .fetch_add(changed as u64, Ordering::Relaxed);
        for sub in &store.watchers {
            if sub.target.is_filtered() && store.filters_changed(seq, &sub.target) {
                let now = store.passes(&sub.target);
                if self.reselect(sub, shim.serial, now, store.seq, out) {
                    continue;
                }
            }
            let n = if sub.keys.is_empty() {
                changed as u64
            } else {
                store.changed_at(seq, &sub.keys)
            };
            if n > 0 && sub.mark(shim.serial, n) {
                out.state.push(sub.clone());
            }
        }
        true
    }

    /// A change of the keys `sub`'s filters test, on the shim `serial` (its store locked,
    /// at sequence number `seq`): when the shim enters the selection the subscriber is
    /// sent its join and then its whole state; when it leaves, its leave (`not
    /// selected`). Returns whether the selection changed (nothing more to mark).
    fn reselect(
        &self,
        sub: &Arc<Subscription>,
        serial: u64,
        now: bool,
        seq: u64,
        out: &mut Effects,
    ) -> bool {
        let mut guard = sub.pending.lock();
        let p = &mut *guard;
        let Some(t) = p.watched.get_mut(&serial) else {
            return false;
        };
        if t.selected == now {
            return false;
        }
        t.selected = now;
        if t.unlisted {
            // The listing, still to be built, says whether it is there.
            return true;
        }
        let identity = t.identity.clone();
        let mut f = Vec::with_capacity(identity.len() + 24);
        if now {
            t.full = true;
            t.delivered = seq;
            if !std::mem::replace(&mut t.dirty, true) {
                p.dirty.push(serial);
            }
            presence(sub.sid, &identity, None, &mut f);
            self.present(sub, p, Bytes::from(f), Some(out));
            if !p.held && !std::mem::replace(&mut p.scheduled, true) {
                out.state.push(sub.clone());
            }
        } else {
            (t.dirty, t.full, t.udp) = (false, false, false);
            presence(sub.sid, &identity, Some(NOT_SELECTED), &mut f);
            self.present(sub, p, Bytes::from(f), Some(out));
        }
        Counters::bump(&self.counters().state_reselected);
        true
    }

    /// Replaces the state of the remote shim `shim` with `items` (key, age in
    /// milliseconds, value), as its node published it: keys it no longer holds are
    /// deleted, and its watchers here are marked as for a Set.
    pub(crate) fn mirror_state(
        &self,
        shim: &Arc<Shim>,
        items: &[(String, u64, Vec<u8>)],
        out: &mut Effects,
    ) {
        let max_keys = self.config().state_keys.max(items.len());
        let mut guard = shim.state.lock();
        if shim.is_closed() {
            return;
        }
        let store = guard.get_or_insert_with(Box::default);
        let mut set: Vec<SetItem<'_>> = Vec::with_capacity(items.len() + store.entries.len());
        let mut ages = Vec::with_capacity(items.len());
        for (k, age, v) in items {
            // What the node checked, checked again: a key must fit the grammar.
            if crate::proto::state::check_key(k.as_bytes()).is_ok() {
                set.push(SetItem {
                    key: k,
                    value: Some(v),
                });
                ages.push(*age);
            }
        }
        let gone: Vec<Box<str>> = (store.entries.iter())
            .filter(|e| {
                !set.iter()
                    .any(|it| it.key.as_bytes().eq_ignore_ascii_case(e.key_bytes()))
            })
            .map(|e| Box::from(e.key()))
            .collect();
        set.extend(gone.iter().map(|k| SetItem {
            key: k,
            value: None,
        }));
        let keep = last_of_each(&set);
        self.apply_set(
            shim,
            store,
            &set,
            &keep,
            max_keys,
            out.now_ms,
            Some(&ages),
            out,
        );
    }

    /// Delivers what the slice marked: each subscription whose interval has passed and
    /// whose connection is not backlogged, now; the others when their core's tick finds
    /// them due. Called at the end of every slice of input.
    pub fn deliver_state(&self, out: &mut Effects) {
        while let Some(sub) = out.state.pop() {
            self.try_deliver(&sub, out);
        }
    }

    /// Core `core`'s due subscriptions and outboxes to flush, at `out.now_ms`.
    pub fn state_tick(&self, core: usize, out: &mut Effects) {
        let now_ms = out.now_ms;
        let (due, flush) = {
            let mut q = self.states.queue(core).0.lock();
            let flush = std::mem::take(&mut q.flush);
            let mut due = Vec::new();
            while let Some(entry) = q.due.first_entry() {
                if entry.key().0 > now_ms {
                    break;
                }
                let (key, sub) = entry.remove_entry();
                due.push((key, sub));
            }
            (due, flush)
        };
        out.flush.extend(flush);
        for (key, sub) in due {
            {
                let mut p = sub.pending.lock();
                if p.due_key == Some(key) {
                    p.due_key = None;
                }
            }
            self.try_deliver(&sub, out);
        }
    }

    /// The time until core `core` next has something to do (`None`: nothing waits).
    pub fn state_next(&self, core: usize, now_ms: u64) -> Option<u64> {
        let q = self.states.queue(core).0.lock();
        if !q.flush.is_empty() {
            return Some(0);
        }
        q.due.keys().next().map(|k| k.0.saturating_sub(now_ms))
    }

    /// Delivers `sub` now if it may go, else queues it for when it may.
    fn try_deliver(&self, sub: &Arc<Subscription>, out: &mut Effects) {
        let now_ms = out.now_ms;
        if sub.ended.load(Ordering::Acquire) {
            return;
        }
        let Some(owner) = sub.owner.upgrade() else {
            return;
        };
        if !owner.outbox.is_open() {
            return;
        }
        let udp = owner.udp_addr().is_some();
        let (marks, work) = {
            let mut guard = sub.pending.lock();
            let p = &mut *guard;
            if p.held {
                // The Subscribe that holds it schedules it once its listing is queued.
                return;
            }
            if p.refresh_ms.is_some_and(|at| now_ms >= at) {
                p.refresh_ms = None;
                for (serial, t) in p.watched.iter_mut() {
                    if t.selected && std::mem::take(&mut t.udp) {
                        t.full = true;
                        if !std::mem::replace(&mut t.dirty, true) {
                            p.dirty.push(*serial);
                        }
                    }
                }
            }
            let watched = &p.watched;
            p.dirty.retain(|s| watched.get(s).is_some_and(|t| t.dirty));
            if p.dirty.is_empty() {
                p.scheduled = false;
                if let Some(at) = p.refresh_ms {
                    self.states.defer(sub, p, at);
                }
                return;
            }
            let due = p.last_ms.map_or(0, |l| l + sub.interval_ms);
            // A connection still writing what it was sent is backlogged: its changes wait
            // (and coalesce) until it has caught up.
            let busy = owner.outbox.backlogged(BACKLOG);
            if p.delivering || busy || now_ms < due {
                let at = if now_ms < due && !p.delivering && !busy {
                    due
                } else {
                    now_ms + STATE_TICK_MS
                };
                self.states.defer(sub, p, at.max(due));
                return;
            }
            p.delivering = true;
            p.last_ms = Some(now_ms);
            (std::mem::take(&mut p.marks), std::mem::take(&mut p.dirty))
        };
        let mut items = 0u64;
        let mut tcp_bytes = 0usize;
        let mut sent_udp = false;
        let mut left = Vec::new();
        for serial in work {
            if tcp_bytes >= BACKLOG {
                left.push(serial);
                continue;
            }
            let Some(shim) =
                (sub.pending.lock().watched.get(&serial)).and_then(|t| t.shim.upgrade())
            else {
                continue;
            };
            // Built and queued under the store's lock: a leave, a rename or an
            // Unsubscribe (which all take it) is either before this frame, and the track
            // is gone, or after it.
            let g = shim.state.lock();
            let Some(store) = g.as_ref() else { continue };
            let frames = {
                let mut p = sub.pending.lock();
                if sub.ended.load(Ordering::Acquire) {
                    break;
                }
                let Some(t) = p.watched.get_mut(&serial).filter(|t| t.selected) else {
                    continue;
                };
                let built = build(store, sub, t, now_ms, udp);
                t.dirty = false;
                t.full = false;
                t.delivered = store.seq;
                if built.iter().any(|(_, over_udp)| *over_udp) {
                    t.udp = true;
                }
                built
            };
            for (frame, over_udp) in frames {
                items += frame.items;
                sent_udp |= over_udp;
                if !over_udp {
                    tcp_bytes += frame.bytes.len();
                }
                self.send(
                    &owner,
                    Route::State(over_udp),
                    &Bytes::from(frame.bytes),
                    out,
                );
            }
            drop(g);
        }
        {
            let mut guard = sub.pending.lock();
            let p = &mut *guard;
            p.delivering = false;
            for serial in left {
                if p.watched.get(&serial).is_some_and(|t| t.dirty) {
                    p.dirty.push(serial);
                }
            }
            if sent_udp && p.refresh_ms.is_none() {
                let spread = (sub.owner_serial.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ u64::from(sub.sid))
                    % STATE_REFRESH_SPREAD_MS;
                p.refresh_ms = Some(now_ms + STATE_REFRESH_MS + spread);
            }
            if !p.dirty.is_empty() {
                // Marked while this delivery was built, or past its byte budget.
                let at = (now_ms + STATE_TICK_MS).max(now_ms + sub.interval_ms);
                self.states.defer(sub, p, at);
            } else {
                p.scheduled = false;
                if let Some(at) = p.refresh_ms {
                    self.states.defer(sub, p, at);
                }
            }
        }
        let c = self.counters();
        c.state_delivered.fetch_add(items, Ordering::Relaxed);
        c.state_coalesced
            .fetch_add(marks.saturating_sub(items), Ordering::Relaxed);
    }

    /// Sends `frame` (a join or a leave) to `sub`'s subscriber, after its listing if that
    /// is not queued yet. `out` is the slice's effects; `None` outside any slice (a close
    /// by a timer, a reload): the outbox is pushed now, keeping the frame's place, and
    /// flushed by its core's next tick. Called with `sub`'s pending state locked.
    fn present(
        &self,
        sub: &Subscription,
        p: &mut Pending,
        frame: Bytes,
        out: Option<&mut Effects>,
    ) {
        if p.held {
            p.queued.push(frame);
            return;
        }
        let Some(owner) = sub.owner.upgrade() else {
            return;
        };
        match out {
            Some(out) => {
                self.send(&owner, Route::State(false), &frame, out);
            }
            None => {
                let now_ms = self.now_ms();
                let mut out = Effects::default();
                out.begin(self, now_ms);
                self.send(&owner, Route::State(false), &frame, &mut out);
                for shim in out.flush.drain(..) {
                    self.states.defer_flush(&shim);
                }
                self.finish(owner.core as usize, &mut out, self.instant(now_ms));
            }
        }
    }

    /// Subscribe over TCP: a listing of one `F` State frame per watched shim, then
    /// `Ack SID COUNT`; then deltas and presence as they come.
    pub(crate) fn subscribe(&self, sender: &Arc<Shim>, s: &Subscribe<'_>, out: &mut Effects) {
        let answer = Route::Reply(Via::Tcp);
        if let Err(r) = self.allow_route(sender, Work::Who, out.now_ms) {
            return self.refuse(sender, answer, &r, out);
        }
        let c = self.config();
        let (max, max_keys) = (c.state_subscriptions, c.state_keys);
        let listing_cap = c.outbound_limit.saturating_mul(LISTING_FACTOR);
        let users = !c.users.is_empty();
        drop(c);
        {
            let g = sender.state.lock();
            let subs = g.as_ref().map_or(&[][..], |s| &s.subs[..]);
            let refused = if subs.iter().any(|x| x.sid == s.sid) {
                Some(Reject::SubscriptionExists(s.sid))
            } else if subs.len() >= max {
                Some(Reject::TooManySubscriptions(max))
            } else if s.keys.len() > max_keys {
                Some(Reject::KeysListed(max_keys))
            } else {
                None
            };
            if let Some(r) = refused {
                drop(g);
                return self.refuse(sender, answer, &r, out);
            }
        }
        let sub = Arc::new(Subscription {
            sid: s.sid,
            owner: Arc::downgrade(sender),
            owner_serial: sender.serial,
            core: sender.core as usize,
            target: s.target.clone(),
            keys: s.keys.iter().map(|k| Box::from(*k)).collect(),
            interval_ms: s.interval_ms,
            pending: Mutex::new(Pending {
                held: true,
                ..Pending::default()
            }),
            ended: AtomicBool::new(false),
            interested: AtomicBool::new(false),
        });
        (sender.state.lock().get_or_insert_with(Box::default).subs).push(sub.clone());
        // Registered under the registry's lock, which every join takes: a shim that
        // identifies meanwhile is either found here or joins after.
        let mut members = Vec::new();
        {
            let mut registry = self.states.registry.lock();
            registry.insert((sender.serial, s.sid), sub.clone());
            // Under the registry's lock, which the end of a subscription takes too: its
            // interest across the cluster is added once and taken away once.
            if !sub.ended.load(Ordering::Acquire) {
                self.cluster_interest(&s.target.pattern, true);
                sub.interested.store(true, Ordering::Release);
            }
            // Every shim the pattern names is watched, selected or not: a shim that comes
            // to pass the filters is seen when its keys change.
            self.router.for_each_match(&s.target.pattern, |shim| {
                let identity = shim.identity();
                if !sub.watches(shim, &identity, users) {
                    return;
                }
                let mut g = shim.state.lock();
                // Checked under the store's lock: a shim closing after this is sent its
                // leave by `state_closed`, which takes the store under the same lock.
                if shim.is_closed() {
                    return;
                }
                let store = g.get_or_insert_with(Box::default);
                if store.watchers.iter().any(|w| Arc::ptr_eq(w, &sub)) {
                    return;
                }
                store.watchers.push(sub.clone());
                let mut t = sub.track(shim, identity, store.seq, false);
                t.unlisted = true;
                sub.pending.lock().watched.insert(shim.serial, t);
                members.push(shim.clone());
            });
        }
        // The listing is built outside the registry's lock, one store at a time.
        let now_ms = out.now_ms;
        let mut listing = Vec::new();
        let mut n = 0u64;
        for shim in &members {
            let g = shim.state.lock();
            let Some(store) = g.as_ref() else { continue };
            let mut p = sub.pending.lock();
            let Some(t) = p.watched.get_mut(&shim.serial) else {
                continue;
            };
            // Decided here, under the store's lock: from now on a change of selection is
            // told by a join or a leave, queued after the listing.
            t.unlisted = false;
            t.selected = sub.selects(Some(store));
            if !t.selected {
                continue;
            }
            let mut f = StateFrame::new(s.sid, Mode::Full, &t.identity, store.seq);
            store.full(&sub.keys, now_ms, &mut f);
            t.delivered = store.seq;
            t.full = false;
            drop(p);
            drop(g);
            listing.extend_from_slice(&f.finish());
            n += 1;
            if listing.len() > listing_cap {
                self.drop_subscription(sender, &sub);
                let r = Reject::ListingTooLarge(listing_cap);
                return self.refuse(sender, answer, &r, out);
            }
        }
        if sender.is_closed() {
            // Closed while subscribing: `state_closed` may have run before the push.
            self.drop_subscription(sender, &sub);
            return;
        }
        self.send_listing(sender, Opcode::Set, n, listing, u64::from(s.sid), out);
        // Released: what came meanwhile follows the listing.
        let mut p = sub.pending.lock();
        p.held = false;
        for frame in std::mem::take(&mut p.queued) {
            self.send(sender, Route::State(false), &frame, out);
        }
        if !p.dirty.is_empty() && !std::mem::replace(&mut p.scheduled, true) {
            out.state.push(sub.clone());
        }
        drop(p);
        debug!(conn = sender.serial, sid = s.sid, watching = n, "subscribe");
    }

    /// Takes `sub` off its subscriber's list and ends it.
    fn drop_subscription(&self, sender: &Shim, sub: &Arc<Subscription>) {
        if let Some(store) = sender.state.lock().as_mut() {
            store.subs.retain(|x| !Arc::ptr_eq(x, sub));
        }
        self.end_subscription(sub);
    }

    /// Unsubscribe over TCP: `Ack SID 1`, or an Error when there is no such subscription.
    pub(crate) fn unsubscribe(&self, sender: &Arc<Shim>, sid: u32, out: &mut Effects) {
        let sub = sender.state.lock().as_mut().and_then(|s| {
            let i = s.subs.iter().position(|x| x.sid == sid)?;
            Some(s.subs.swap_remove(i))
        });
        let Some(sub) = sub else {
            let r = Reject::NoSubscription(sid.to_string());
            return self.refuse(sender, Route::Reply(Via::Tcp), &r, out);
        };
        self.end_subscription(&sub);
        let mut ack = Vec::with_capacity(16);
        reply::ack(u64::from(sid), 1, &mut ack);
        self.send(sender, Route::Reply(Via::Tcp), &Bytes::from(ack), out);
    }

    /// Takes `sub` out of the registry, its core's queue and every shim it watched. Once
    /// this returns, nothing more is queued for it: a delivery under way holds a store's
    /// lock, which this takes.
    fn end_subscription(&self, sub: &Arc<Subscription>) {
        sub.ended.store(true, Ordering::Release);
        let mut registry = self.states.registry.lock();
        registry.remove(&(sub.owner_serial, sub.sid));
        let watched: Vec<Weak<Shim>> = {
            let mut p = sub.pending.lock();
            p.dirty.clear();
            p.queued.clear();
            self.states.undefer(sub, &mut p);
            p.watched.drain().map(|(_, t)| t.shim).collect()
        };
        for shim in watched.iter().filter_map(Weak::upgrade) {
            if let Some(store) = shim.state.lock().as_mut() {
                store.watchers.retain(|w| !Arc::ptr_eq(w, sub));
            }
        }
        // After it left the stores it watched: the mirrors of remote shims nothing
        // watches any more go with the interest.
        if sub.interested.swap(false, Ordering::AcqRel) {
            self.cluster_interest(&sub.target.pattern, false);
        }
        drop(registry);
    }

    /// Get over TCP: one `F` State frame (SID 0) per shim the target names, then `Ack 0
    /// COUNT`.
    pub(crate) fn get_state(
        &self,
        sender: &Arc<Shim>,
        target: &Target,
        keys: &[&str],
        out: &mut Effects,
    ) {
        let answer = Route::Reply(Via::Tcp);
        if let Err(r) = self.allow_route(sender, Work::Who, out.now_ms) {
            return self.refuse(sender, answer, &r, out);
        }
        let c = self.config();
        let users = !c.users.is_empty();
        let (max_keys, cap) = (
            c.state_keys,
            c.outbound_limit.saturating_mul(LISTING_FACTOR),
        );
        drop(c);
        if keys.len() > max_keys {
            return self.refuse(sender, answer, &Reject::KeysListed(max_keys), out);
        }
        let reader = sender.user();
        let keys: Vec<Box<str>> = keys.iter().map(|k| Box::from(*k)).collect();
        let now_ms = out.now_ms;
        let mut listing = Vec::new();
        let mut n = 0u64;
        let mut too_large = false;
        self.for_each_selected(target, false, |shim| {
            let identity = shim.identity();
            if too_large || !may_read(users, reader.as_deref(), &identity) {
                return;
            }
            let g = shim.state.lock();
            let seq = g.as_ref().map_or(0, |s| s.seq);
            let mut f = StateFrame::new(0, Mode::Full, &identity, seq);
            if let Some(store) = g.as_ref() {
                store.full(&keys, now_ms, &mut f);
            }
            drop(g);
            listing.extend_from_slice(&f.finish());
            n += 1;
            too_large = listing.len() > cap;
        });
        if too_large {
            return self.refuse(sender, answer, &Reject::ListingTooLarge(cap), out);
        }
        self.send_listing(sender, Opcode::Set, n, listing, 0, out);
    }

    /// After an Identify or a rename: subscriptions that knew the shim by another name
    /// are sent a leave (`renamed`), those that match the new one a join, and the shim's
    /// state follows the join in full. Returns the presence frames sent (what a rename
    /// costs its sender, in deliveries).
    pub(crate) fn state_identity(&self, shim: &Arc<Shim>, out: &mut Effects) -> u64 {
        let identity = shim.identity();
        let users = !self.config().users.is_empty();
        let registry = self.states.registry.lock();
        let mut g = shim.state.lock();
        if shim.is_closed() {
            return 0;
        }
        let mut sent = 0u64;
        let mut kept = Vec::new();
        let old: Vec<Arc<Subscription>> = match g.as_mut() {
            Some(store) => std::mem::take(&mut store.watchers),
            None => Vec::new(),
        };
        for sub in old {
            let mut p = sub.pending.lock();
            let Some(t) = p.watched.get(&shim.serial) else {
                continue;
            };
            if *t.identity == *identity && sub.watches(shim, &identity, users) {
                // It found the shim under its new name already (a Subscribe between the
                // claim and this).
                drop(p);
                kept.push(sub);
                continue;
            }
            let told = t.identity.clone();
            let t = p.watched.remove(&shim.serial).expect("watched");
            if t.selected && !t.unlisted {
                let mut f = Vec::with_capacity(told.len() + 24);
                presence(sub.sid, &told, Some("renamed"), &mut f);
                self.present(&sub, &mut p, Bytes::from(f), Some(out));
                sent += 1;
            }
        }
        let joined: Vec<Arc<Subscription>> = registry
            .values()
            .filter(|sub| {
                !sub.ended.load(Ordering::Acquire)
                    && !kept.iter().any(|k| Arc::ptr_eq(k, sub))
                    && sub.watches(shim, &identity, users)
            })
            .cloned()
            .collect();
        drop(registry);
        if joined.is_empty() && kept.is_empty() {
            if let Some(store) = g.as_ref()
                && store.is_idle()
            {
                // Nothing held and nobody watching: an idle shim keeps no store.
                *g = None;
            }
            return sent;
        }
        let store = g.get_or_insert_with(Box::default);
        let has_keys = !store.entries.is_empty();
        let seq = store.seq;
        for sub in &joined {
            let selected = sub.selects(Some(store));
            let mut p = sub.pending.lock();
            // A holder of the name that was closing (so nobody displaced it) is dropped:
            // the join stands for its leave, and nothing of it follows. When this one is
            // not selected, the subscriber that knew the other is told it left.
            let mut gone = None;
            p.watched.retain(|serial, t| {
                let keep = *serial == shim.serial || !t.identity.eq_ignore_ascii_case(&identity);
                if !keep && t.selected && !t.unlisted {
                    gone = Some(t.identity.clone());
                }
                keep
            });
            let mut t = sub.track(shim, identity.clone(), seq, has_keys);
            t.selected = selected;
            let dirty = has_keys && selected;
            t.dirty = dirty;
            p.watched.insert(shim.serial, t);
            if dirty && !p.dirty.contains(&shim.serial) {
                p.dirty.push(shim.serial);
            }
            let mut f = Vec::with_capacity(identity.len() + 24);
            match (selected, gone) {
                (true, _) => presence(sub.sid, &identity, None, &mut f),
                (false, Some(told)) => presence(sub.sid, &told, Some(NOT_SELECTED), &mut f),
                (false, None) => continue,
            }
            self.present(sub, &mut p, Bytes::from(f), Some(out));
            sent += 1;
            if dirty && !p.held && !std::mem::replace(&mut p.scheduled, true) {
                out.state.push(sub.clone());
            }
        }
        kept.extend(joined);
        store.watchers = kept;
        sent
    }

    /// After a reload changed the users: each subscription stops watching the shims its
    /// user may no longer read (a leave, `not permitted`), and starts watching those it
    /// now may (a join, then their state).
    pub(crate) fn state_recheck(&self) {
        if self.config().users.is_empty() {
            return;
        }
        let registry = self.states.registry.lock();
        for sub in registry.values() {
            let mut matched = Vec::new();
            self.router
                .for_each_match(&sub.target.pattern, |s| matched.push(s.clone()));
            for shim in matched {
                let identity = shim.identity();
                let may = sub.watches(&shim, &identity, true);
                let mut g = shim.state.lock();
                if shim.is_closed() {
                    continue;
                }
                let mut p = sub.pending.lock();
                let watching = p.watched.contains_key(&shim.serial);
                if watching && !may {
                    let t = p.watched.remove(&shim.serial).expect("watched");
                    if let Some(store) = g.as_mut() {
                        store.watchers.retain(|w| !Arc::ptr_eq(w, sub));
                    }
                    if !t.selected || t.unlisted {
                        continue;
                    }
                    let mut f = Vec::with_capacity(t.identity.len() + 24);
                    presence(sub.sid, &t.identity, Some("not permitted"), &mut f);
                    self.present(sub, &mut p, Bytes::from(f), None);
                } else if !watching && may {
                    let store = g.get_or_insert_with(Box::default);
                    store.watchers.push(sub.clone());
                    let selected = sub.selects(Some(store));
                    let has_keys = !store.entries.is_empty() && selected;
                    let mut t = sub.track(&shim, identity.clone(), store.seq, has_keys);
                    t.dirty = has_keys;
                    t.selected = selected;
                    p.watched.insert(shim.serial, t);
                    if !selected {
                        continue;
                    }
                    if has_keys {
                        p.dirty.push(shim.serial);
                    }
                    let mut f = Vec::with_capacity(identity.len() + 16);
                    presence(sub.sid, &identity, None, &mut f);
                    self.present(sub, &mut p, Bytes::from(f), None);
                    if has_keys && !p.held && !std::mem::replace(&mut p.scheduled, true) {
                        self.states.defer(sub, &mut p, self.now_ms());
                    }
                }
            }
        }
    }

    /// A shim is gone: its subscriptions end, its watchers are sent a leave with the
    /// reason, and its state is dropped.
    pub(crate) fn state_closed(&self, shim: &Shim, reason: CloseReason) {
        self.state_gone(shim, &reason.to_string());
    }

    /// The state of `shim` goes: its subscriptions end, and each watcher is told `why`.
    pub(crate) fn state_gone(&self, shim: &Shim, why: &str) {
        let Some(store) = shim.state.lock().take() else {
            return;
        };
        if store.has_entries() {
            self.index.remove(shim.serial);
        }
        for sub in &store.subs {
            self.end_subscription(sub);
        }
        let counters = self.counters();
        counters
            .state_keys
            .fetch_sub(store.entries.len() as u64, Ordering::Relaxed);
        for sub in &store.watchers {
            let mut p = sub.pending.lock();
            // (No track: a newer connection that took the name joined and dropped it.)
            let Some(t) = p.watched.remove(&shim.serial) else {
                continue;
            };
            if !t.selected || t.unlisted {
                continue;
            }
            let mut f = Vec::with_capacity(t.identity.len() + why.len() + 16);
            presence(sub.sid, &t.identity, Some(why), &mut f);
            self.present(sub, &mut p, Bytes::from(f), None);
        }
    }

    /// Checks the sender's Set rate.
    fn allow_set(&self, shim: &Shim, now_ms: u64) -> Result<(), Reject> {
        let rate = self.config().state_sets_per_sec;
        if rate == 0 {
            return Ok(());
        }
        let mut g = shim.state.lock();
        let store = g.get_or_insert_with(Box::default);
        if (store.sets.get_or_insert_with(|| Bucket::full(now_ms))).take(rate, now_ms) {
            return Ok(());
        }
        drop(g);
        let r = Reject::RateLimited(Rate::Sets, rate);
        self.log_refusal(shim, &r, now_ms);
        Err(r)
    }
}

/// The index of the last item of each key (ignoring case), in frame order.
fn last_of_each(items: &[SetItem<'_>]) -> Vec<usize> {
    if items.len() <= 16 {
        return (0..items.len())
            .filter(|&i| {
                !items[i + 1..]
                    .iter()
                    .any(|later| later.key.eq_ignore_ascii_case(items[i].key))
            })
            .collect();
    }
    let mut last: HashMap<Vec<u8>, usize> = HashMap::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        last.insert(it.key.to_ascii_lowercase().into_bytes(), i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    keep
}

/// The spelling a frame first gave `key` (ignoring case): a key keeps the spelling
/// first written.
fn first_spelling<'a>(items: &[SetItem<'a>], key: &'a str) -> &'a str {
    items
        .iter()
        .find(|it| it.key.eq_ignore_ascii_case(key))
        .map_or(key, |it| it.key)
}

/// One State frame built for a subscriber.
struct Built {
    bytes: Vec<u8>,
    items: u64,
}

/// The frames of one delivery of `store` to a subscriber that has `t`: the whole state
/// (over TCP) when asked for or when a delta since what it has cannot be formed, else
/// what changed since (over UDP when the subscriber has it, in datagrams of at most
/// [`MAX_STATE_DATAGRAM`] bytes). Each with its transport: UDP when `true`.
fn build(
    store: &Store,
    sub: &Subscription,
    t: &Track,
    now_ms: u64,
    udp: bool,
) -> Vec<(Built, bool)> {
    let identity: &str = &t.identity;
    let seq = store.seq;
    // Room for every item (a key, its age and its value), so that a frame is written
    // without growing.
    let room = store.bytes + 10 * store.entries.len();
    if t.full || t.delivered < store.floor {
        let mut f = StateFrame::with_capacity(sub.sid, Mode::Full, identity, seq, room);
        store.full(&sub.keys, now_ms, &mut f);
        let items = f.items() as u64;
        return vec![(
            Built {
                bytes: f.finish(),
                items,
            },
            false,
        )];
    }
    let since = t.delivered;
    let mut frames: Vec<StateFrame> = Vec::new();
    let room = if udp {
        room.min(MAX_STATE_DATAGRAM)
    } else {
        room
    };
    let mut f = StateFrame::with_capacity(sub.sid, Mode::Delta, identity, seq, room);
    let mut add = |f: &mut StateFrame, len: usize, item: &dyn Fn(&mut StateFrame)| {
        if udp && !f.is_empty() && f.len() + len > MAX_STATE_DATAGRAM {
            let next = StateFrame::new(sub.sid, Mode::Delta, identity, seq);
            frames.push(std::mem::replace(f, next));
        }
        item(f);
    };
    for e in store.entries.iter().filter(|e| e.seq > since) {
        if !wanted(&sub.keys, e.key_bytes()) {
            continue;
        }
        let age = now_ms.saturating_sub(e.at_ms);
        let len = item_len(e.key_bytes(), age, Some(e.value()));
        add(&mut f, len, &|f: &mut StateFrame| {
            f.value(e.key_bytes(), age, e.value())
        });
    }
    for (k, _) in store.tombs.iter().filter(|(_, s)| *s > since) {
        if !wanted(&sub.keys, k.as_bytes()) {
            continue;
        }
        let len = item_len(k.as_bytes(), 0, None);
        add(&mut f, len, &|f: &mut StateFrame| f.deleted(k.as_bytes()));
    }
    if !f.is_empty() {
        frames.push(f);
    }
    frames
        .into_iter()
        .map(|f| {
            let fits = udp && f.len() <= MAX_STATE_DATAGRAM;
            let items = f.items() as u64;
            (
                Built {
                    bytes: f.finish(),
                    items,
                },
                fits,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item<'a>(key: &'a str, value: Option<&'a [u8]>) -> SetItem<'a> {
        SetItem { key, value }
    }

    #[test]
    fn the_last_item_of_a_key_wins() {
        let items = [
            item("hp", Some(b"1")),
            item("mana", Some(b"2")),
            item("HP", Some(b"3")),
        ];
        assert_eq!(last_of_each(&items), vec![1, 2]);
        assert_eq!(first_spelling(&items, "HP"), "hp");
        let many: Vec<SetItem<'_>> = (0..40)
            .map(|i| item(if i % 2 == 0 { "a" } else { "b" }, None))
            .collect();
        assert_eq!(last_of_each(&many), vec![38, 39]);
    }
}
