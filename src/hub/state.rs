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
//! interval has passed and its connection is not busy, and otherwise queued on the core
//! serving its subscriber, whose driver calls [`Hub::state_tick`] until it is done.
//! Presence (join, leave) is queued the same way when the event has no slice of its own
//! (a close by a timer).
//!
//! Locks are taken in one order: the registry, then a shim's store, then a
//! subscription's pending state; a delivery copies what it needs out of the pending
//! state before it reads the stores.

use super::Hub;
use super::send::{Bucket, Effects, Route, Via};
use super::shim::{CloseReason, Shim};
use crate::config::User;
use crate::metrics::Transport;
use crate::proto::Opcode;
use crate::proto::pattern::Pattern;
use crate::proto::reject::{Rate, Reject};
use crate::proto::reply;
use crate::proto::state::{
    MAX_STATE_DATAGRAM, Mode, SetItem, StateFrame, Subscribe, item_len, presence,
};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;
use tracing::debug;

/// How long a subscription that could not be delivered (its connection busy, or its
/// interval not yet passed) waits at least before it is tried again.
pub const STATE_TICK_MS: u64 = 5;
/// After a delivery over UDP, how long until the subscriber is sent every shim it watches
/// in full over TCP: a lost datagram leaves a value wrong for at most this long, even if
/// it never changes again.
pub const STATE_REFRESH_MS: u64 = 10_000;

/// Bytes queued for a subscriber over TCP past which its changes wait, even while its
/// socket still takes what it is sent.
const BACKLOG: usize = 64 * 1024;

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

/// A shim's state and the subscriptions watching it.
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
            .position(|e| e.key().eq_ignore_ascii_case(key))
    }

    /// Writes the whole state, the keys `keys` lets through, into `f`.
    fn full(&self, keys: &[Box<str>], now_ms: u64, f: &mut StateFrame) {
        for e in &self.entries {
            if wanted(keys, e.key()) {
                f.value(e.key(), now_ms.saturating_sub(e.at_ms), e.value());
            }
        }
    }
}

fn wanted(keys: &[Box<str>], key: &str) -> bool {
    keys.is_empty() || keys.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// One shim watched by a subscription.
struct Track {
    shim: Weak<Shim>,
    /// The store's sequence number last delivered.
    delivered: u64,
    /// Listed in `Pending::dirty`.
    dirty: bool,
    /// The next delivery sends the whole state (a join after a rename).
    full: bool,
}

/// What a subscription has not yet delivered.
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
    /// Listed for a delivery: in a slice's effects, or on its core's queue.
    scheduled: bool,
    /// A delivery is being built (on some core): another waits for the next tick.
    delivering: bool,
    /// When every watched shim is sent again in full, over TCP (set by a delivery over
    /// UDP, whose datagrams may have been lost).
    refresh_ms: Option<u64>,
}

/// A standing request for the state of the shims a pattern names.
pub struct Subscription {
    /// The subscriber's id for it.
    pub sid: u32,
    owner: Weak<Shim>,
    owner_serial: u64,
    core: usize,
    pattern: Pattern,
    /// The keys wanted; empty: every key.
    keys: Vec<Box<str>>,
    interval_ms: u64,
    pending: Mutex<Pending>,
    ended: AtomicBool,
}

impl Subscription {
    /// Whether this subscription watches `shim` under `identity`, `users` telling whether
    /// the hub has users (then the subscriber's user must be allowed to read it; a reload
    /// may have changed what it may read).
    fn watches(&self, shim: &Shim, identity: &str, users: bool) -> bool {
        (self.pattern.include_self || shim.serial != self.owner_serial)
            && self.pattern.matches(identity)
            && (!users || self.reads(identity))
    }

    fn reads(&self, identity: &str) -> bool {
        let user = self.owner.upgrade().and_then(|o| o.user());
        may_read(true, user.as_deref(), identity)
    }

    /// Notes that `shim` changed (`n` keys the subscription wants). True when the
    /// subscription was not yet listed for a delivery (the caller lists it).
    fn mark(&self, serial: u64, n: u64) -> bool {
        let mut p = self.pending.lock();
        let Some(t) = p.watched.get_mut(&serial) else {
            return false;
        };
        if !t.dirty {
            t.dirty = true;
            p.dirty.push(serial);
        }
        p.marks += n;
        !std::mem::replace(&mut p.scheduled, true)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sid", &self.sid)
            .field("owner", &self.owner_serial)
            .finish()
    }
}

fn may_read(users: bool, reader: Option<&User>, identity: &str) -> bool {
    !users || reader.is_some_and(|u| u.reads(identity))
}

/// The subscriptions of one core's connections waiting for their time.
#[derive(Default)]
struct CoreQueue {
    due: Vec<(u64, Arc<Subscription>)>,
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

    fn defer(&self, sub: &Arc<Subscription>, due_ms: u64) {
        let (q, n) = self.queue(sub.core);
        let mut q = q.lock();
        q.due.push((due_ms, sub.clone()));
        drop(q);
        n.notify_one();
    }

    fn defer_flush(&self, shim: &Arc<Shim>) {
        let (q, n) = self.queue(shim.core as usize);
        let mut q = q.lock();
        q.flush.push(shim.clone());
        drop(q);
        n.notify_one();
    }
}

/// What a Set changed, for the watchers.
struct Changed {
    keys: Vec<Box<str>>,
}

impl Changed {
    fn count_for(&self, keys: &[Box<str>]) -> u64 {
        self.keys.iter().filter(|k| wanted(keys, k)).count() as u64
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
        let seq = store.seq + 1;
        let mut changed = Changed { keys: Vec::new() };
        let before = store.entries.len();
        let new = keep
            .iter()
            .filter(|&&i| items[i].value.is_some() && store.find(items[i].key).is_none())
            .count();
        store.entries.reserve_exact(new);
        for &i in &keep {
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
                    e.at_ms = now_ms;
                    e.seq = seq;
                    changed.keys.push(Box::from(e.key()));
                }
                (None, Some(v)) => {
                    let mut kv = Vec::with_capacity(key.len() + v.len());
                    kv.extend_from_slice(key.as_bytes());
                    kv.extend_from_slice(v);
                    store.bytes += kv.len();
                    store.entries.push(Entry {
                        kv: kv.into_boxed_slice(),
                        klen: key.len() as u8,
                        at_ms: now_ms,
                        seq,
                    });
                    store.tombs.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
                    changed.keys.push(Box::from(key));
                }
                (Some(j), None) => {
                    let e = store.entries.remove(j);
                    store.bytes -= e.size();
                    let key: Box<str> = Box::from(e.key());
                    store.tombs.push((key.clone(), seq));
                    if store.tombs.len() > max_keys {
                        let (_, dropped) = store.tombs.remove(0);
                        store.floor = store.floor.max(dropped);
                    }
                    changed.keys.push(key);
                }
                (None, None) => {}
            }
        }
        let counters = self.counters();
        counters.state_sets.fetch_add(1, Ordering::Relaxed);
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
        if changed.keys.is_empty() {
            return;
        }
        store.seq = seq;
        counters
            .state_changes
            .fetch_add(changed.keys.len() as u64, Ordering::Relaxed);
        for sub in &store.watchers {
            let n = changed.count_for(&sub.keys);
            if n > 0 && sub.mark(shim.serial, n) {
                out.state.push(sub.clone());
            }
        }
    }

    /// Delivers what the slice marked: each subscription whose interval has passed and
    /// whose connection is not busy, now; the others when their core's tick finds them
    /// due. Called at the end of every slice of input.
    pub fn deliver_state(&self, out: &mut Effects) {
        while let Some(sub) = out.state.pop() {
            self.try_deliver(&sub, out);
        }
    }

    /// Core `core`'s waiting subscriptions and presence frames, at `out.now_ms`.
    pub fn state_tick(&self, core: usize, out: &mut Effects) {
        let now_ms = out.now_ms;
        let (due, flush) = {
            let mut q = self.states.queue(core).0.lock();
            let flush = std::mem::take(&mut q.flush);
            let mut due = Vec::new();
            q.due.retain(|(at, sub)| {
                if *at <= now_ms {
                    due.push(sub.clone());
                    false
                } else {
                    true
                }
            });
            (due, flush)
        };
        out.flush.extend(flush);
        for sub in due {
            self.try_deliver(&sub, out);
        }
    }

    /// The time until core `core` next has a subscription due (`None`: nothing waits).
    pub fn state_next(&self, core: usize, now_ms: u64) -> Option<u64> {
        let q = self.states.queue(core).0.lock();
        if !q.flush.is_empty() {
            return Some(0);
        }
        q.due.iter().map(|(at, _)| at.saturating_sub(now_ms)).min()
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
        let work = {
            let mut p = sub.pending.lock();
            if p.refresh_ms.is_some_and(|at| now_ms >= at) {
                p.refresh_ms = None;
                let p = &mut *p;
                for (serial, t) in p.watched.iter_mut() {
                    t.full = true;
                    if !std::mem::replace(&mut t.dirty, true) {
                        p.dirty.push(*serial);
                    }
                }
            }
            if p.dirty.is_empty() && !p.delivering {
                // Nothing to send (a refresh check with nothing watched, or a stale entry).
                p.scheduled = false;
                return;
            }
            let due = p.last_ms.map_or(0, |l| l + sub.interval_ms);
            // Over TCP, a connection still writing what it was sent is busy: its changes
            // wait (and coalesce) until it has caught up.
            let busy = !udp && owner.outbox.backlogged(BACKLOG);
            if p.delivering || now_ms < due || busy {
                let at = if p.delivering || busy {
                    now_ms + STATE_TICK_MS
                } else {
                    due
                };
                drop(p);
                self.states.defer(sub, at);
                return;
            }
            p.scheduled = false;
            p.delivering = true;
            p.last_ms = Some(now_ms);
            let marks = std::mem::take(&mut p.marks);
            let dirty = std::mem::take(&mut p.dirty);
            let mut work = Vec::with_capacity(dirty.len());
            for serial in dirty {
                if let Some(t) = p.watched.get_mut(&serial) {
                    t.dirty = false;
                    work.push((
                        serial,
                        t.shim.clone(),
                        t.delivered,
                        std::mem::take(&mut t.full),
                    ));
                }
            }
            (marks, work)
        };
        let (marks, work) = work;
        let mut delivered_items = 0u64;
        let mut sent_udp = false;
        let mut done = Vec::with_capacity(work.len());
        for (serial, shim, since, full) in work {
            let Some(shim) = shim.upgrade() else { continue };
            let identity = shim.identity();
            let (frames, seq, items) = {
                let g = shim.state.lock();
                let Some(store) = g.as_ref() else { continue };
                build(store, sub, &identity, since, full, now_ms, udp)
            };
            done.push((serial, seq));
            delivered_items += items;
            for (frame, over_udp) in frames {
                sent_udp |= over_udp;
                self.send(&owner, Route::State(over_udp), &Bytes::from(frame), out);
            }
        }
        {
            let mut p = sub.pending.lock();
            p.delivering = false;
            if sent_udp && p.refresh_ms.is_none() {
                let at = now_ms + STATE_REFRESH_MS;
                p.refresh_ms = Some(at);
                self.states.defer(sub, at);
            }
            for (serial, seq) in done {
                if let Some(t) = p.watched.get_mut(&serial) {
                    t.delivered = t.delivered.max(seq);
                }
            }
        }
        let c = self.counters();
        c.state_delivered
            .fetch_add(delivered_items, Ordering::Relaxed);
        c.state_coalesced
            .fetch_add(marks.saturating_sub(delivered_items), Ordering::Relaxed);
    }

    /// Subscribe over TCP: a listing of one `F` State frame per watched shim, then
    /// `Ack SID COUNT`; then deltas and presence as they come.
    pub(crate) fn subscribe(&self, sender: &Arc<Shim>, s: &Subscribe<'_>, out: &mut Effects) {
        let answer = Route::Reply(Via::Tcp);
        if let Err(r) = self.allow_route(sender, super::send::Work::Who, out.now_ms) {
            return self.refuse(sender, answer, &r, out);
        }
        let c = self.config();
        let (max, max_keys) = (c.state_subscriptions, c.state_keys);
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
                Some(Reject::SubscriptionKeys(max_keys))
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
            pattern: s.pattern.clone(),
            keys: s.keys.iter().map(|k| Box::from(*k)).collect(),
            interval_ms: s.interval_ms,
            pending: Mutex::new(Pending::default()),
            ended: AtomicBool::new(false),
        });
        let now_ms = out.now_ms;
        let mut listing = Vec::new();
        let mut n = 0u64;
        {
            let mut registry = self.states.registry.lock();
            registry.insert((sender.serial, s.sid), sub.clone());
            (sender.state.lock().get_or_insert_with(Box::default).subs).push(sub.clone());
            self.router.for_each_match(&s.pattern, |shim| {
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
                let mut f = StateFrame::new(s.sid, Mode::Full, &identity);
                store.full(&sub.keys, now_ms, &mut f);
                sub.pending.lock().watched.insert(
                    shim.serial,
                    Track {
                        shim: Arc::downgrade(shim),
                        delivered: store.seq,
                        dirty: false,
                        full: false,
                    },
                );
                drop(g);
                listing.extend_from_slice(&f.finish());
                n += 1;
            });
        }
        if sender.is_closed() {
            // Closed while subscribing: `state_closed` may have run before the push.
            self.end_subscription(&sub);
            return;
        }
        self.charge_deliveries(sender, n);
        let frames = listing.len();
        reply::ack(u64::from(s.sid), n, &mut listing);
        let ack = listing.len() - frames;
        if self
            .send(sender, Route::Listing, &Bytes::from(listing), out)
            .is_some()
        {
            out.count(Transport::Tcp, Opcode::Set as u8, n, frames);
            out.count(Transport::Tcp, Opcode::Ack as u8, 1, ack);
            sender.frames_out.fetch_add(n + 1, Ordering::Relaxed);
        }
        debug!(conn = sender.serial, sid = s.sid, watching = n, "subscribe");
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

    /// Takes `sub` out of the registry and off every shim it watched.
    fn end_subscription(&self, sub: &Arc<Subscription>) {
        sub.ended.store(true, Ordering::Release);
        let mut registry = self.states.registry.lock();
        registry.remove(&(sub.owner_serial, sub.sid));
        let watched: Vec<Weak<Shim>> = {
            let mut p = sub.pending.lock();
            p.dirty.clear();
            p.watched.drain().map(|(_, t)| t.shim).collect()
        };
        for shim in watched.iter().filter_map(Weak::upgrade) {
            if let Some(store) = shim.state.lock().as_mut() {
                store.watchers.retain(|w| !Arc::ptr_eq(w, sub));
            }
        }
        drop(registry);
    }

    /// Get over TCP: one `F` State frame (SID 0) per matching shim, then `Ack 0 COUNT`.
    pub(crate) fn get_state(
        &self,
        sender: &Arc<Shim>,
        pattern: &Pattern,
        keys: &[&str],
        out: &mut Effects,
    ) {
        if let Err(r) = self.allow_route(sender, super::send::Work::Who, out.now_ms) {
            return self.refuse(sender, Route::Reply(Via::Tcp), &r, out);
        }
        let users = !self.config().users.is_empty();
        let reader = sender.user();
        let keys: Vec<Box<str>> = keys.iter().map(|k| Box::from(*k)).collect();
        let now_ms = out.now_ms;
        let mut listing = Vec::new();
        let mut n = 0u64;
        self.router.for_each_match(pattern, |shim| {
            let identity = shim.identity();
            if !may_read(users, reader.as_deref(), &identity) {
                return;
            }
            let mut f = StateFrame::new(0, Mode::Full, &identity);
            if let Some(store) = shim.state.lock().as_ref() {
                store.full(&keys, now_ms, &mut f);
            }
            listing.extend_from_slice(&f.finish());
            n += 1;
        });
        self.charge_deliveries(sender, n);
        let frames = listing.len();
        reply::ack(0, n, &mut listing);
        let ack = listing.len() - frames;
        if self
            .send(sender, Route::Listing, &Bytes::from(listing), out)
            .is_some()
        {
            out.count(Transport::Tcp, Opcode::Set as u8, n, frames);
            out.count(Transport::Tcp, Opcode::Ack as u8, 1, ack);
            sender.frames_out.fetch_add(n + 1, Ordering::Relaxed);
        }
    }

    /// After an Identify (`old` empty) or a rename from `old`: the subscriptions that
    /// watched the old name are sent a leave (`renamed`), those that match the new one a
    /// join, and the shim's state follows the join in full.
    pub(crate) fn state_identity(&self, shim: &Arc<Shim>, old: &str, out: &mut Effects) {
        let identity = shim.identity();
        let registry = self.states.registry.lock();
        let mut g = shim.state.lock();
        if shim.is_closed() {
            return;
        }
        let left: Vec<Arc<Subscription>> = match g.as_mut() {
            Some(store) => std::mem::take(&mut store.watchers),
            None => Vec::new(),
        };
        for sub in &left {
            sub.pending.lock().watched.remove(&shim.serial);
            if let Some(owner) = sub.owner.upgrade() {
                let mut f = Vec::with_capacity(old.len() + 20);
                presence(sub.sid, old, Some("renamed"), &mut f);
                self.send(&owner, Route::State(false), &Bytes::from(f), out);
            }
        }
        let users = !self.config().users.is_empty();
        let joined: Vec<Arc<Subscription>> = registry
            .values()
            .filter(|sub| !sub.ended.load(Ordering::Acquire) && sub.watches(shim, &identity, users))
            .cloned()
            .collect();
        if joined.is_empty() {
            if g.as_ref()
                .is_some_and(|s| s.entries.is_empty() && s.tombs.is_empty() && s.subs.is_empty())
            {
                // Nothing held and nobody watching: an idle shim keeps no store.
                *g = None;
            }
            return;
        }
        let store = g.get_or_insert_with(Box::default);
        let has_keys = !store.entries.is_empty();
        let seq = store.seq;
        for sub in &joined {
            store.watchers.push(sub.clone());
            let schedule = {
                let mut p = sub.pending.lock();
                p.watched.insert(
                    shim.serial,
                    Track {
                        shim: Arc::downgrade(shim),
                        delivered: seq,
                        dirty: has_keys,
                        full: has_keys,
                    },
                );
                if has_keys {
                    p.dirty.push(shim.serial);
                    !std::mem::replace(&mut p.scheduled, true)
                } else {
                    false
                }
            };
            if let Some(owner) = sub.owner.upgrade() {
                let mut f = Vec::with_capacity(identity.len() + 16);
                presence(sub.sid, &identity, None, &mut f);
                self.send(&owner, Route::State(false), &Bytes::from(f), out);
            }
            if schedule {
                out.state.push(sub.clone());
            }
        }
    }

    /// After a reload changed the users: each subscription stops watching the shims its
    /// user may no longer read (a leave, `not permitted`). (Shims it may now read join
    /// when they next identify or rename; a new Subscribe sees them at once.)
    pub(crate) fn state_recheck(&self) {
        if self.config().users.is_empty() {
            return;
        }
        let subs: Vec<Arc<Subscription>> = self.states.registry.lock().values().cloned().collect();
        for sub in subs {
            let watched: Vec<(u64, Weak<Shim>)> = (sub.pending.lock().watched.iter())
                .map(|(serial, t)| (*serial, t.shim.clone()))
                .collect();
            for (serial, shim) in watched {
                let Some(shim) = shim.upgrade() else { continue };
                let identity = shim.identity();
                if sub.reads(&identity) {
                    continue;
                }
                if let Some(store) = shim.state.lock().as_mut() {
                    store.watchers.retain(|w| !Arc::ptr_eq(w, &sub));
                }
                if sub.pending.lock().watched.remove(&serial).is_some() {
                    let mut f = Vec::with_capacity(identity.len() + 24);
                    presence(sub.sid, &identity, Some("not permitted"), &mut f);
                    self.push_presence(&sub, Bytes::from(f));
                }
            }
        }
    }

    /// A shim is gone: its subscriptions end, its watchers are sent a leave with the
    /// reason (queued on their cores), and its state is dropped.
    pub(crate) fn state_closed(&self, shim: &Shim, reason: CloseReason) {
        let Some(store) = shim.state.lock().take() else {
            return;
        };
        for sub in &store.subs {
            self.end_subscription(sub);
        }
        let counters = self.counters();
        counters
            .state_keys
            .fetch_sub(store.entries.len() as u64, Ordering::Relaxed);
        if store.watchers.is_empty() {
            return;
        }
        let identity = shim.identity();
        let why = reason.to_string();
        for sub in &store.watchers {
            sub.pending.lock().watched.remove(&shim.serial);
            let mut f = Vec::with_capacity(identity.len() + why.len() + 16);
            presence(sub.sid, &identity, Some(&why), &mut f);
            self.push_presence(sub, Bytes::from(f));
        }
    }

    /// Queues a presence frame for `sub`'s subscriber outside any slice of input (a close
    /// by a timer, a reload): pushed now, so that it keeps its place among the frames
    /// queued for the subscriber, and flushed by its core's next tick.
    fn push_presence(&self, sub: &Arc<Subscription>, frame: Bytes) {
        let Some(owner) = sub.owner.upgrade() else {
            return;
        };
        let now_ms = self.now_ms();
        let mut out = Effects::default();
        out.begin(self, now_ms);
        self.send(&owner, Route::State(false), &frame, &mut out);
        for shim in out.flush.drain(..) {
            self.states.defer_flush(&shim);
        }
        self.finish(owner.core as usize, &mut out, self.instant(now_ms));
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

/// The frames of one delivery of `store` to `sub`: a whole state (over TCP) when asked
/// for or when a delta since `since` cannot be formed, else what changed since `since`
/// (over UDP when the subscriber has it, in datagrams of at most
/// [`MAX_STATE_DATAGRAM`] bytes). Returns the frames with their transport, the sequence
/// number they bring the subscriber to, and the items sent.
fn build(
    store: &Store,
    sub: &Subscription,
    identity: &str,
    since: u64,
    full: bool,
    now_ms: u64,
    udp: bool,
) -> (Vec<(Vec<u8>, bool)>, u64, u64) {
    if full || since < store.floor {
        let mut f = StateFrame::new(sub.sid, Mode::Full, identity);
        store.full(&sub.keys, now_ms, &mut f);
        let items = f.items() as u64;
        return (vec![(f.finish(), false)], store.seq, items);
    }
    let mut frames = Vec::new();
    let mut items = 0u64;
    let mut f = StateFrame::new(sub.sid, Mode::Delta, identity);
    let mut push = |f: &mut StateFrame, len: usize, item: &dyn Fn(&mut StateFrame)| {
        if udp && !f.is_empty() && f.len() + len > MAX_STATE_DATAGRAM {
            let done = std::mem::replace(f, StateFrame::new(sub.sid, Mode::Delta, identity));
            frames.push(done);
        }
        item(f);
        items += 1;
    };
    for e in store.entries.iter().filter(|e| e.seq > since) {
        if !wanted(&sub.keys, e.key()) {
            continue;
        }
        let age = now_ms.saturating_sub(e.at_ms);
        let len = item_len(e.key(), age, Some(e.value()));
        push(&mut f, len, &|f: &mut StateFrame| {
            f.value(e.key(), age, e.value())
        });
    }
    for (k, _) in store.tombs.iter().filter(|(_, s)| *s > since) {
        if !wanted(&sub.keys, k) {
            continue;
        }
        let len = item_len(k, 0, None);
        push(&mut f, len, &|f: &mut StateFrame| f.deleted(k));
    }
    if !f.is_empty() {
        frames.push(f);
    }
    let frames = frames
        .into_iter()
        .map(|f| {
            let fits = udp && f.len() <= MAX_STATE_DATAGRAM;
            (f.finish(), fits)
        })
        .collect();
    (frames, store.seq, items)
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
        let many: Vec<SetItem<'_>> = (0..40)
            .map(|i| item(if i % 2 == 0 { "a" } else { "b" }, None))
            .collect();
        assert_eq!(last_of_each(&many), vec![38, 39]);
    }
}
