//! The hub as one node of a cluster: the rules for shims served by other nodes, with no
//! I/O. The NATS connection is the driver's (`driver/cluster.rs`); the two meet here:
//!
//! - **outbound**: what this node tells the others (its shims' joins and leaves, frames
//!   routed to their shims, its shims' state, the patterns its subscriptions want), pushed
//!   by the cores as they handle input and taken by the cluster thread in batches;
//! - **inbound**: what the others said about their shims (presence, state), put by the
//!   cluster thread on one core's inbox per sending node (so that one node's messages are
//!   applied in order) and applied by [`Hub::cluster_apply`] in that core's
//!   `cluster_loop`;
//! - **routed frames** for shims here ([`Hub::cluster_routed`]), which the cluster thread
//!   delivers itself as they arrive: queueing on an outbox needs no core, and flushing one
//!   is a non-blocking send, so a Command across nodes costs no hand-over on that side.
//!
//! A shim of another node is a *remote shim*: a [`Shim`] made by [`Shim::remote`], held
//! in the router under its identity like a local one, so that Who, pattern matching,
//! exclusive identities and state subscriptions treat it as one (where it lives, its
//! [`Remote`], is kept here by its local serial, so that a local shim pays nothing for
//! it). It has no connection: frames routed to it go to its node in a [`Routed`] message,
//! and its state is a mirror of what its node publishes, kept while a subscription here
//! wants it.

use super::Hub;
use super::send::Effects;
use super::shim::{CloseReason, Shim};
use crate::metrics::Counters;
use crate::proto::cluster::{Change, Member, Routed};
use crate::proto::pattern::Pattern;
use crate::proto::reject::Reject;
use crate::proto::target::Target;
use crate::proto::{Opcode, QUIT, reply};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Frames and state waiting for the cluster thread, at most; past it they are dropped
/// and counted.
pub const OUTBOUND_LIMIT: usize = 65_536;
/// The bit that marks a proxy id.
const PROXY_BIT: u64 = 1 << 63;
/// Items waiting for the cluster thread past which presence changes are dropped too, and
/// the node's membership is sent whole.
pub const CHANGE_LIMIT: usize = 4 * OUTBOUND_LIMIT;
/// Items waiting on one core's inbox, at most (see [`Cluster::deliver`]).
pub const INBOX_LIMIT: usize = 65_536;
/// Commands from other nodes whose responses can still find their way back: the oldest
/// is forgotten first.
pub const PROXY_WINDOW: usize = 65_536;

/// What this node tells the others.
#[derive(Debug)]
pub enum Outbound {
    /// A change to this node's shims.
    Change(Change),
    /// A frame for a shim of `node`.
    Route(Arc<str>, Routed),
    /// This shim's state changed: its whole state goes out at the next batch.
    State(Arc<Shim>),
    /// A subscription here wants (true) or no longer wants (false) the shims a subject
    /// pattern names.
    Interest(String, bool),
}

/// What another node told this one, to apply on a core.
#[derive(Debug)]
pub enum Inbound {
    /// `node`'s shims changed (in order).
    Changes(Arc<str>, Vec<Change>),
    /// `node`'s whole membership: the remote shims held for it become these.
    Snapshot(Arc<str>, Vec<Member>),
    /// `node` is gone from sight, with its shims: they leave with `why`.
    NodeGone(Arc<str>, &'static str),
    /// Frames from `node` (of that epoch) that go on over UDP: a core sends them, from
    /// its UDP socket.
    Routed(Arc<str>, u64, Vec<Routed>),
    /// The whole state of `node`'s shim `serial`.
    State(Arc<str>, u64, Vec<(String, u64, Vec<u8>)>),
}

/// Where a remote shim lives.
#[derive(Debug)]
pub struct Remote {
    /// Its node.
    pub node: Arc<str>,
    /// Its serial there.
    pub serial: u64,
    /// Whether it has a UDP channel.
    pub udp: AtomicBool,
    /// The user it authenticated as.
    pub user: Option<Box<str>>,
    /// When it claimed its identity (Unix microseconds).
    pub claimed_unix_us: u64,
}

/// The traffic counters of the backplane.
#[derive(Default)]
pub struct ClusterStats {
    /// NATS messages published.
    pub messages_out: AtomicU64,
    /// NATS messages received.
    pub messages_in: AtomicU64,
    /// Bytes published.
    pub bytes_out: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Outbound items dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Times the NATS connection was lost.
    pub disconnects: AtomicU64,
    /// Snapshots asked of other nodes after missing part of their presence.
    pub resyncs: AtomicU64,
    /// Remote shims known.
    pub remote_shims: AtomicU64,
    /// Remote nodes in sight.
    pub nodes: AtomicU64,
}

/// Commands from other nodes delivered here: the local id each was given, and where the
/// answers go.
#[derive(Default)]
struct Proxies {
    /// The local sequence number of the first entry.
    base: u64,
    /// Sending node, its epoch and its id, by local sequence number from `base`.
    ids: VecDeque<(Arc<str>, u64, u64)>,
}

/// The queue to the cluster thread.
#[derive(Default)]
struct Queue {
    items: VecDeque<Outbound>,
    /// Local shims with an `Outbound::State` queued (one each, however often they change).
    states: std::collections::HashSet<u64>,
}

/// The remote shims of one node, by their serial there.
type Ghosts = HashMap<u64, Arc<Shim>>;

/// The cluster side of a hub.
pub struct Cluster {
    /// This node's name.
    pub node: Arc<str>,
    /// A number drawn at start: the other nodes tell this process from an earlier one
    /// under the same name by it.
    pub epoch: u64,
    proxies: Mutex<Proxies>,
    outbound: Mutex<Queue>,
    /// Presence changes were dropped: the cluster thread reads this node's membership
    /// again and sends it whole.
    pub lost: AtomicBool,
    /// Wakes the cluster thread.
    pub wake: Notify,
    /// Turns of the cluster thread during a shutdown that ended with everything taken
    /// published and flushed to NATS.
    pub flushed: AtomicU64,
    inboxes: Box<[(Mutex<Vec<Inbound>>, Notify)]>,
    /// Connected to NATS.
    reachable: AtomicBool,
    /// Remote shims by node and serial there.
    remote: Mutex<HashMap<Arc<str>, Ghosts>>,
    /// Where each remote shim lives, by its local serial.
    ghosts: Mutex<HashMap<u64, Arc<Remote>>>,
    /// When each local shim claimed its identity (Unix microseconds), by serial.
    claims: Mutex<HashMap<u64, u64>>,
    /// The subject patterns local subscriptions want, with how many want each.
    interest: Mutex<HashMap<String, usize>>,
    /// Counters.
    pub stats: ClusterStats,
}

impl Cluster {
    pub(crate) fn new(node: &str, cores: usize, epoch: u64) -> Cluster {
        Cluster {
            node: Arc::from(node),
            epoch,
            proxies: Mutex::default(),
            outbound: Mutex::default(),
            lost: AtomicBool::new(false),
            wake: Notify::new(),
            flushed: AtomicU64::new(0),
            inboxes: (0..cores.max(1))
                .map(|_| (Mutex::default(), Notify::new()))
                .collect(),
            reachable: AtomicBool::new(false),
            remote: Mutex::default(),
            ghosts: Mutex::default(),
            claims: Mutex::default(),
            interest: Mutex::default(),
            stats: ClusterStats::default(),
        }
    }

    /// Queues `item` for the cluster thread (dropped and counted when the queue is full).
    pub(crate) fn push(&self, item: Outbound) {
        let mut q = self.outbound.lock();
        if let Outbound::State(s) = &item
            && !q.states.insert(s.serial)
        {
            return; // queued already: its whole state goes, as it is then
        }
        // Past the limit, frames and state are dropped (counted). Presence changes are
        // let through to `CHANGE_LIMIT` (a gap in them leaves other nodes wrong), and past
        // it dropped too, and the node's membership is sent whole instead (`lost`).
        // Interest changes never are (the Subscribe rate bounds them).
        if matches!(item, Outbound::Change(_)) && q.items.len() >= CHANGE_LIMIT {
            drop(q);
            Counters::bump(&self.stats.dropped);
            self.lost.store(true, Ordering::Release);
            self.wake.notify_one();
            return;
        }
        if q.items.len() >= OUTBOUND_LIMIT
            && matches!(item, Outbound::Route(..) | Outbound::State(_))
        {
            if let Outbound::State(s) = &item {
                q.states.remove(&s.serial);
            }
            drop(q);
            Counters::bump(&self.stats.dropped);
            return;
        }
        let was_empty = q.items.is_empty();
        q.items.push_back(item);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Whether anything waits for the cluster thread.
    pub fn has_outbound(&self) -> bool {
        !self.outbound.lock().items.is_empty()
    }

    /// Everything queued for the cluster thread.
    pub fn take_outbound(&self) -> VecDeque<Outbound> {
        let mut q = self.outbound.lock();
        q.states.clear();
        std::mem::take(&mut q.items)
    }

    /// The core that applies what `node` says.
    pub fn core_for(&self, node: &str) -> usize {
        let h = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        (h % self.inboxes.len() as u64) as usize
    }

    /// Hands `items` to core `core` (the cluster thread calls this). Past
    /// [`INBOX_LIMIT`] waiting items, state and routed frames are dropped and counted
    /// (presence never is: it is bounded by the fleet, and a gap in it would need a
    /// snapshot).
    pub fn deliver(&self, core: usize, items: Vec<Inbound>) {
        let (q, n) = &self.inboxes[core];
        let mut q = q.lock();
        for item in items {
            if q.len() >= INBOX_LIMIT && matches!(item, Inbound::State(..) | Inbound::Routed(..)) {
                Counters::bump(&self.stats.dropped);
                continue;
            }
            q.push(item);
        }
        drop(q);
        n.notify_one();
    }

    /// Resolves when something is in core `core`'s inbox.
    pub fn notified(&self, core: usize) -> tokio::sync::futures::Notified<'_> {
        self.inboxes[core].1.notified()
    }

    /// What waits in core `core`'s inbox.
    pub fn take_inbox(&self, core: usize) -> Vec<Inbound> {
        std::mem::take(&mut *self.inboxes[core].0.lock())
    }

    /// Whether the NATS connection is up.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Records the state of the NATS connection.
    pub fn set_reachable(&self, up: bool) {
        self.reachable.store(up, Ordering::Relaxed);
    }

    /// The subject patterns local subscriptions want.
    pub fn interests(&self) -> Vec<String> {
        self.interest.lock().keys().cloned().collect()
    }

    /// Remote shims known, by node.
    pub fn remote_counts(&self) -> Vec<(Arc<str>, usize)> {
        let mut v: Vec<_> = (self.remote.lock().iter())
            .map(|(n, m)| (n.clone(), m.len()))
            .collect();
        v.sort();
        v
    }

    /// A local id for the Command `id` of `node` (in its process `epoch`): the top bit
    /// set, then a sequence number that never wraps, so that no local Command id (a
    /// serial, far below 2^43, shifted by 20) and no other proxy id is ever the same.
    fn proxy_id(&self, node: &Arc<str>, epoch: u64, id: u64) -> u64 {
        let mut p = self.proxies.lock();
        if p.ids.len() >= PROXY_WINDOW {
            p.ids.pop_front();
            p.base += 1;
        }
        let seq = p.base + p.ids.len() as u64;
        p.ids.push_back((node.clone(), epoch, id));
        PROXY_BIT | seq
    }

    /// Where the answers to the local id `id` go (node, its epoch, its id), if it stands
    /// for a remote Command that is not forgotten.
    fn proxied(&self, id: u64) -> Option<(Arc<str>, u64, u64)> {
        let seq = id.checked_sub(PROXY_BIT)?;
        let p = self.proxies.lock();
        let off = seq.checked_sub(p.base)?;
        p.ids.get(usize::try_from(off).ok()?).cloned()
    }

    /// Whether `id` is a proxy id (its answers go to another node).
    pub(crate) fn is_proxy_id(&self, id: u64) -> bool {
        id & PROXY_BIT != 0
    }
}

/// The subject form of a pattern: lowercased, without `+`.
pub fn subject_of(p: &Pattern) -> String {
    use crate::proto::pattern::Seg;
    let mut s = String::new();
    for (i, seg) in p.segs.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        match seg {
            Seg::Lit(l) => s.push_str(l),
            Seg::One => s.push('*'),
            Seg::Rest => s.push('>'),
        }
    }
    s
}

impl Hub {
    /// The cluster this hub is a node of.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Where `shim` lives, if it is a shim of another node.
    pub fn remote_of(&self, shim: &Shim) -> Option<Arc<Remote>> {
        if !shim.is_remote() {
            return None;
        }
        self.cluster
            .as_ref()?
            .ghosts
            .lock()
            .get(&shim.serial)
            .cloned()
    }

    /// When `shim` claimed its identity (Unix microseconds; 0 off a cluster).
    pub(crate) fn claimed_us(&self, shim: &Shim) -> u64 {
        match self.remote_of(shim) {
            Some(r) => r.claimed_unix_us,
            None => (self.cluster.as_ref())
                .and_then(|c| c.claims.lock().get(&shim.serial).copied())
                .unwrap_or(0),
        }
    }

    /// Records when the local `shim` claims an identity; returns the time it replaces.
    pub(crate) fn set_claimed(&self, shim: &Shim, us: Option<u64>) -> Option<u64> {
        let c = self.cluster.as_ref()?;
        let mut claims = c.claims.lock();
        match us {
            Some(us) => claims.insert(shim.serial, us),
            None => claims.remove(&shim.serial),
        }
    }

    /// `now` as Unix microseconds.
    pub(crate) fn unix_us_at(&self, now: std::time::Instant) -> u64 {
        self.epoch_unix_us + now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// `now_ms` as Unix microseconds.
    pub(crate) fn unix_us(&self, now_ms: u64) -> u64 {
        self.epoch_unix_us + now_ms * 1000
    }

    /// Tells the cluster that `shim` took its identity, under the router's lock: a rename
    /// is a leave of the old name first. The claim's time decides a race between two
    /// nodes (the earlier keeps the name); a claim that takes the name from a holder keeps
    /// the holder's time, so that a third node racing for it compares with the original.
    pub(crate) fn cluster_claimed(
        &self,
        shim: &Arc<Shim>,
        old: &str,
        displaced: Option<&Arc<Shim>>,
        now_us: u64,
    ) {
        let Some(c) = &self.cluster else { return };
        let us = match displaced {
            Some(h) => self.claimed_us(h).min(now_us),
            // A rename in letter case only keeps the name, and its time.
            None if !old.is_empty() && old.eq_ignore_ascii_case(&shim.identity()) => {
                match self.claimed_us(shim) {
                    0 => now_us,
                    t => t,
                }
            }
            None => now_us,
        };
        self.set_claimed(shim, Some(us));
        if !old.is_empty() {
            c.push(Outbound::Change(Change::Leave(
                shim.serial,
                "renamed".into(),
            )));
        }
        let replaces = displaced.and_then(|h| self.remote_of(h));
        c.push(Outbound::Change(Change::Join(
            self.member(shim, replaces.as_deref()),
        )));
    }

    /// `shim` as the other nodes know it.
    pub fn member(&self, shim: &Shim, replaces: Option<&Remote>) -> Member {
        Member {
            serial: shim.serial,
            identity: shim.identity().to_string(),
            since_unix_ms: shim.connected_unix_ms,
            udp: shim.udp_addr().is_some() || shim.is_sealed(),
            user: shim.user().map(|u| u.name.to_string()),
            claimed_unix_us: self.claimed_us(shim),
            replaces: replaces.map(|r| (r.node.to_string(), r.serial)),
        }
    }

    /// Tells the cluster that the local shim `shim` left.
    pub(crate) fn cluster_left(&self, shim: &Shim, reason: CloseReason) {
        if let Some(c) = &self.cluster
            && !shim.is_remote()
            && shim.is_identified()
        {
            c.claims.lock().remove(&shim.serial);
            c.push(Outbound::Change(Change::Leave(
                shim.serial,
                reason.to_string(),
            )));
        }
    }

    /// Tells the cluster that `shim` bound or lost its UDP channel.
    pub(crate) fn cluster_udp(&self, shim: &Shim, bound: bool) {
        if let Some(c) = &self.cluster
            && shim.is_identified()
        {
            c.push(Outbound::Change(Change::Udp(shim.serial, bound)));
        }
    }

    /// Tells the cluster that the local shim `shim`'s state changed (`changed`), or that
    /// it took a new name (its state then goes out if it has any).
    pub(crate) fn cluster_state(&self, shim: &Arc<Shim>, changed: bool) {
        if let Some(c) = &self.cluster
            && !shim.is_remote()
            && (changed || shim.state.lock().as_ref().is_some_and(|s| s.has_entries()))
        {
            c.push(Outbound::State(shim.clone()));
        }
    }

    /// A local subscription on `pattern` began (true) or ended (false).
    pub(crate) fn cluster_interest(&self, pattern: &Pattern, add: bool) {
        let Some(c) = &self.cluster else { return };
        let subject = subject_of(pattern);
        let mut i = c.interest.lock();
        let changed = if add {
            let n = i.entry(subject.clone()).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            match i.get_mut(&subject) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    i.remove(&subject);
                    true
                }
                None => false,
            }
        };
        let left: Vec<Pattern> = if changed && !add {
            (i.keys())
                .filter_map(|k| Pattern::parse(k.as_bytes()).ok())
                .collect()
        } else {
            Vec::new()
        };
        drop(i);
        if changed {
            if !add {
                // The mirrored state of remote shims no subscription here covers any more
                // would go stale: it goes.
                let mut stale = Vec::new();
                self.router.for_each_match(pattern, |g| {
                    if g.is_remote() && !left.iter().any(|p| p.matches(&g.identity())) {
                        stale.push(g.clone());
                    }
                });
                for g in stale {
                    let watched = (g.state.lock().as_ref()).is_some_and(|s| s.is_watched());
                    if !watched {
                        self.state_gone(&g, "");
                    }
                }
            }
            c.push(Outbound::Interest(subject, add));
        }
    }

    /// Sends the frames `routed` to the shims of their nodes, counting them in `reached`.
    pub(crate) fn cluster_route(&self, nodes: Vec<Arc<str>>, item: Routed) {
        let Some(c) = &self.cluster else { return };
        for n in nodes {
            c.push(Outbound::Route(n, item.clone()));
        }
    }

    /// The notice after the answer to a Command, Echo or Who that could have reached
    /// shims of other nodes while this node is cut off from them (it answers no request).
    pub(crate) fn cluster_notice(&self, sender: &Arc<Shim>, via: super::Via, out: &mut Effects) {
        if let Some(c) = &self.cluster
            && !c.is_reachable()
        {
            let r = Reject::ClusterUnreachable;
            self.refuse(sender, super::Route::Reply(via), &r, out);
        }
    }

    /// The node answering `id` of a CommandResponse, if the Command came from another
    /// node: the response goes there with the id that node gave it.
    pub(crate) fn cluster_respond(
        &self,
        id: u64,
        responder: &str,
        text: &[u8],
        udp: bool,
    ) -> Option<bool> {
        let c = self.cluster.as_ref()?;
        if !c.is_proxy_id(id) {
            return None;
        }
        let Some((node, epoch, origin)) = c.proxied(id) else {
            return Some(false);
        };
        c.push(Outbound::Route(
            node,
            Routed::Response {
                epoch,
                id: origin,
                from: responder.to_owned(),
                text: text.to_vec(),
                udp,
            },
        ));
        Some(true)
    }

    /// Delivers frames another node routed to shims here. The cluster thread calls this
    /// itself, as they arrive (queueing on outboxes needs no core, and flushing one is a
    /// non-blocking send from whichever thread): a Command across nodes costs no hand-over
    /// to a core on the receiving side.
    pub fn cluster_routed(
        &self,
        node: &Arc<str>,
        epoch: u64,
        items: Vec<Routed>,
        out: &mut Effects,
    ) {
        let Some(c) = &self.cluster else { return };
        for r in items {
            self.remote_routed(c, node, epoch, r, out);
        }
    }

    /// Applies what other nodes said (on a core, from its `cluster_loop`).
    pub fn cluster_apply(&self, items: Vec<Inbound>, out: &mut Effects) {
        let Some(c) = &self.cluster else { return };
        for item in items {
            match item {
                Inbound::Changes(node, changes) => {
                    for ch in changes {
                        match ch {
                            Change::Join(m) => self.remote_join(c, &node, m, out),
                            Change::Leave(serial, why) => {
                                let ghost = c
                                    .remote
                                    .lock()
                                    .get_mut(&node)
                                    .and_then(|m| m.remove(&serial));
                                if let Some(g) = ghost {
                                    self.remove_remote(c, &g, &why);
                                }
                            }
                            Change::Udp(serial, bound) => {
                                let g = (c.remote.lock().get(&node))
                                    .and_then(|m| m.get(&serial).cloned());
                                if let Some(r) = g.and_then(|g| self.remote_of(&g)) {
                                    r.udp.store(bound, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                }
                Inbound::Snapshot(node, members) => self.remote_snapshot(c, &node, members, out),
                Inbound::NodeGone(node, why) => {
                    let gone = c.remote.lock().remove(&node);
                    for g in gone.into_iter().flat_map(|m| m.into_values()) {
                        self.remove_remote(c, &g, why);
                    }
                }
                Inbound::Routed(node, epoch, items) => {
                    for r in items {
                        self.remote_routed(c, &node, epoch, r, out);
                    }
                }
                Inbound::State(node, serial, items) => {
                    let ghost = c
                        .remote
                        .lock()
                        .get(&node)
                        .and_then(|m| m.get(&serial).cloned());
                    // Kept only while a subscription here watches it: state still on its
                    // way after the last one ended would go stale.
                    if let Some(g) = ghost
                        && (g.state.lock().as_ref()).is_some_and(|s| s.is_watched())
                    {
                        self.mirror_state(&g, &items, out);
                    }
                }
            }
        }
        let n: usize = c.remote.lock().values().map(|m| m.len()).sum();
        c.stats.remote_shims.store(n as u64, Ordering::Relaxed);
        self.deliver_state(out);
    }

    /// `node`'s whole membership: remote shims it no longer has leave, and those it has
    /// that are not held here (or under another name) join.
    fn remote_snapshot(
        &self,
        c: &Cluster,
        node: &Arc<str>,
        members: Vec<Member>,
        out: &mut Effects,
    ) {
        let held: Vec<(u64, Arc<Shim>)> = (c.remote.lock().get(node))
            .map(|g| g.iter().map(|(s, g)| (*s, g.clone())).collect())
            .unwrap_or_default();
        let by: HashMap<u64, &Member> = members.iter().map(|m| (m.serial, m)).collect();
        for (serial, g) in &held {
            if by.get(serial).is_none_or(|m| *m.identity != *g.identity()) {
                c.remote.lock().get_mut(node).map(|m| m.remove(serial));
                self.remove_remote(c, g, "left");
            }
        }
        for m in members {
            let same = held
                .iter()
                .find(|(s, g)| *s == m.serial && *g.identity() == *m.identity && !g.is_closed());
            match same.and_then(|(_, g)| self.remote_of(g)) {
                Some(r) => r.udp.store(m.udp, Ordering::Relaxed),
                None => self.remote_join(c, node, m, out),
            }
        }
    }

    /// A remote shim took an identity. Of two claims on one name, a claim that names
    /// the holder it replaces wins; otherwise the earlier claim keeps it.
    fn remote_join(&self, c: &Cluster, node: &Arc<str>, m: Member, out: &mut Effects) {
        // A rename arrives as a leave then a join with the same serial: the leave went.
        let old = c
            .remote
            .lock()
            .get_mut(node)
            .and_then(|g| g.remove(&m.serial));
        if let Some(g) = old {
            self.remove_remote(c, &g, "renamed");
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let ghost = Arc::new(Shim::remote(
            serial,
            c.core_for(node),
            m.since_unix_ms,
            out.now_ms,
        ));
        c.ghosts.lock().insert(
            serial,
            Arc::new(Remote {
                node: node.clone(),
                serial: m.serial,
                udp: AtomicBool::new(m.udp),
                user: m.user.map(Box::from),
                claimed_unix_us: m.claimed_unix_us,
            }),
        );
        let label: Arc<str> = Arc::from(m.identity.as_str());
        let replaces = m.replaces.as_ref();
        let stamp = (m.claimed_unix_us, node.clone());
        let wins = |holder: &Shim| -> bool {
            let (theirs, their_node) = match self.remote_of(holder) {
                Some(r) => {
                    // A node's changes come in the order it made them: its new claim on a
                    // name its own shim held here means that shim gave it up (replaced,
                    // or closing, its leave on the way).
                    if r.node == *node
                        || replaces.is_some_and(|(n, s)| **n == *r.node && *s == r.serial)
                    {
                        return true;
                    }
                    (r.claimed_unix_us, r.node.clone())
                }
                None => {
                    if replaces.is_some_and(|(n, s)| **n == *c.node && *s == holder.serial) {
                        return true;
                    }
                    (self.claimed_us(holder), c.node.clone())
                }
            };
            stamp < (theirs, their_node)
        };
        let (claim, _) = self.router.claim(&ghost, label, wins, |_, _| {});
        let displaced = match claim {
            super::router::Claim::Held(d) => d,
            // This node's holder keeps it; the claimant's node closes its own.
            _ => {
                debug!(node = %node, identity = %m.identity, "remote claim lost to a holder here");
                c.ghosts.lock().remove(&serial);
                return;
            }
        };
        c.remote
            .lock()
            .entry(node.clone())
            .or_default()
            .insert(m.serial, ghost.clone());
        if let Some(holder) = displaced {
            match self.remote_of(&holder) {
                Some(r) => {
                    let r_node = r.node.clone();
                    let r_serial = r.serial;
                    c.remote
                        .lock()
                        .get_mut(&r_node)
                        .map(|g| g.remove(&r_serial));
                    self.remove_remote(
                        c,
                        &holder,
                        "replaced by a newer connection with the same identity",
                    );
                }
                None if replaces.is_some_and(|(n, s)| **n == *c.node && *s == holder.serial) => {
                    Counters::bump(&self.counters().replaced);
                    info!(conn = holder.serial, identity = %holder.identity(), node = %node,
                        "identity taken by a newer connection on another node");
                    let why = format!(
                        "replaced: a newer connection on node {node} identified as {}",
                        holder.identity()
                    );
                    let last = crate::proto::reject::closing(&why);
                    self.send_last(&holder, CloseReason::Replaced, &last);
                    self.remove(&holder, CloseReason::Replaced);
                }
                None => {
                    warn!(conn = holder.serial, identity = %holder.identity(), node = %node,
                        "identity claimed earlier on another node: closing the later claim here");
                    let mut f = Vec::new();
                    let r = Reject::IdentityElsewhere(node.to_string());
                    crate::proto::encode(Opcode::Error, r.to_string().as_bytes(), &mut f);
                    f.extend_from_slice(&QUIT);
                    self.metrics.reject(&r);
                    self.send_last(&holder, CloseReason::IdentityElsewhere, &f);
                    self.remove(&holder, CloseReason::IdentityElsewhere);
                }
            }
        }
        self.state_identity(&ghost, out);
    }

    /// Forgets the remote shim `ghost`, whose identity a local claim took: its node
    /// closes it when it hears of the claim.
    pub(crate) fn displace_remote(&self, ghost: &Shim) {
        let Some(c) = &self.cluster else { return };
        if let Some(r) = self.remote_of(ghost) {
            c.remote
                .lock()
                .get_mut(&r.node)
                .map(|g| g.remove(&r.serial));
        }
        self.remove_remote(
            c,
            ghost,
            "replaced by a newer connection with the same identity",
        );
    }

    /// Takes a remote shim out of sight: out of the router, its watchers told `why`.
    fn remove_remote(&self, c: &Cluster, ghost: &Shim, why: &str) {
        if !ghost.mark_closed() {
            return;
        }
        c.ghosts.lock().remove(&ghost.serial);
        self.router.remove(ghost);
        self.state_gone(ghost, why);
    }

    /// A frame another node routed to shims here.
    fn remote_routed(
        &self,
        c: &Cluster,
        node: &Arc<str>,
        epoch: u64,
        r: Routed,
        out: &mut Effects,
    ) {
        match r {
            Routed::Route {
                op,
                from,
                id,
                target,
                text,
                udp,
            } => {
                let via = deliver_via(udp);
                let Some(op) = Opcode::from_byte(op) else {
                    return;
                };
                let Ok(target) = Target::parse(&target) else {
                    return;
                };
                let local = id.map(|id| c.proxy_id(node, epoch, id));
                let mut f = Vec::with_capacity(from.len() + text.len() + 24);
                reply::delivery(op, &from, local, &text, &mut f);
                let frame = Bytes::from(f);
                let window = self.config().answer_window;
                let mut reached = 0u64;
                self.for_each_selected(&target, false, |to| {
                    if to.is_remote() {
                        return;
                    }
                    if let Some(id) = local {
                        to.expect_answer(id, window);
                    }
                    if self
                        .send(to, super::Route::Deliver(via), &frame, out)
                        .is_some()
                    {
                        reached += 1;
                    }
                });
                (self.counters().deliveries).fetch_add(reached, Ordering::Relaxed);
            }
            Routed::Response {
                epoch,
                id,
                from,
                text,
                udp,
            } => {
                if epoch != c.epoch {
                    // For a Command of an earlier process under this node's name.
                    Counters::bump(&self.counters().responses_dropped);
                    return;
                }
                let Some(sender) = self.table.by_serial(super::shim::serial_of_command_id(id))
                else {
                    Counters::bump(&self.counters().responses_dropped);
                    return;
                };
                let mut id_text = Vec::with_capacity(20);
                reply::push_u64(&mut id_text, id);
                let mut f = Vec::with_capacity(id_text.len() + from.len() + text.len() + 4);
                reply::response(&id_text, &from, &text, &mut f);
                let sent = self.send(
                    &sender,
                    super::Route::Deliver(deliver_via(udp)),
                    &Bytes::from(f),
                    out,
                );
                match sent {
                    Some(_) => Counters::bump(&self.counters().deliveries),
                    None => Counters::bump(&self.counters().responses_dropped),
                }
            }
        }
    }
}

/// How a frame from another node goes on: over UDP (to a shim that has a channel) when it
/// came in over UDP on its node, as on one node. The address is not used for a delivery.
fn deliver_via(udp: bool) -> super::Via {
    if udp {
        super::Via::Udp(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    } else {
        super::Via::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterAuth, ClusterSettings, Config, DuplicateIdentity};
    use crate::hub::connection::{Connection, Flow};
    use std::time::Instant;

    fn hub(rule: DuplicateIdentity) -> Arc<Hub> {
        let h = Hub::new(Config {
            cores: 1,
            duplicate_identity: rule,
            cluster: Some(Arc::new(ClusterSettings {
                url: "nats://127.0.0.1:1".into(),
                name: "t".into(),
                node: Some("here".into()),
                auth: ClusterAuth::None,
            })),
            ..Config::default()
        });
        h.cluster().unwrap().set_reachable(true);
        h
    }

    fn feed(c: &mut Connection, h: &Hub, data: &[u8]) -> Flow {
        let now = Instant::now();
        let (flow, _) = c.on_bytes(h, data, now);
        h.finish(0, c.effects(), now);
        flow
    }

    fn out(c: &Connection) -> Vec<u8> {
        let mut v = Vec::new();
        c.shim().outbox.take(&mut v);
        c.shim().outbox.wrote(0);
        v
    }

    fn shim(h: &Hub, name: &str) -> Connection {
        let mut c = Connection::accept(h, 0, "127.0.0.1:5000".parse().unwrap(), Instant::now());
        feed(&mut c, h, format!("\x01{name}\n").as_bytes());
        let o = out(&c);
        assert_eq!(
            (o[0], o[17], o[18]),
            (0x02, 0x0A, 0x15),
            "{name}: a Session, then Terms"
        );
        c
    }

    fn member(serial: u64, identity: &str, claimed_unix_us: u64) -> Member {
        Member {
            serial,
            identity: identity.into(),
            since_unix_ms: 1,
            udp: false,
            user: None,
            claimed_unix_us,
            replaces: None,
        }
    }

    fn apply(h: &Hub, items: Vec<Inbound>) {
        let mut out = Effects::default();
        out.begin(h, 0);
        h.cluster_apply(items, &mut out);
        h.finish(0, &mut out, Instant::now());
    }

    fn joins(h: &Hub, node: &str, ms: Vec<Member>) {
        let changes = ms.into_iter().map(Change::Join).collect();
        apply(h, vec![Inbound::Changes(Arc::from(node), changes)]);
    }

    fn outbound(h: &Hub) -> Vec<Outbound> {
        h.cluster().unwrap().take_outbound().into_iter().collect()
    }

    #[test]
    fn remote_shims_are_found_counted_and_routed_to_once_per_node() {
        let h = hub(DuplicateIdentity::SameCredential);
        let mut alice = shim(&h, "peq.z.alice");
        assert!(
            matches!(&outbound(&h)[..], [Outbound::Change(Change::Join(m))] if m.identity == "peq.z.alice")
        );
        joins(
            &h,
            "b",
            vec![member(7, "peq.z.bob", 1), member(8, "peq.z.carol", 1)],
        );
        assert_eq!(
            h.cluster().unwrap().remote_counts(),
            vec![(Arc::from("b"), 2)]
        );
        feed(&mut alice, &h, b"\x0D>\n");
        let who = String::from_utf8_lossy(&out(&alice)).into_owned();
        assert!(
            who.contains("peq.z.bob 1 - b\n") && who.contains("peq.z.alice "),
            "{who}"
        );
        assert!(who.ends_with("\x0c0 3\n"), "{who}");
        feed(&mut alice, &h, b"\x04peq.z.* /sit\n");
        let ack = out(&alice);
        assert!(
            ack.starts_with(b"\x0c") && ack.ends_with(b" 2\n"),
            "{ack:?}"
        );
        let sent = outbound(&h);
        assert_eq!(
            sent.len(),
            1,
            "one message for node b, for both of its shims"
        );
        assert!(
            matches!(&sent[0], Outbound::Route(n, Routed::Route { target, udp: false, .. })
            if &**n == "b" && target == b"peq.z.*")
        );
    }

    #[test]
    fn a_command_from_another_node_is_answered_there() {
        let h = hub(DuplicateIdentity::SameCredential);
        let mut bob = shim(&h, "peq.z.bob");
        outbound(&h);
        let node: Arc<str> = Arc::from("a");
        let mut fx = Effects::default();
        fx.begin(&h, 0);
        let route = Routed::Route {
            op: Opcode::Command as u8,
            from: "peq.z.alice".into(),
            id: Some(1 << 20),
            target: b"peq.z.*".to_vec(),
            text: b"/sit".to_vec(),
            udp: false,
        };
        h.cluster_routed(&node, 42, vec![route], &mut fx);
        let got = String::from_utf8_lossy(&out(&bob)).into_owned();
        let id = got
            .strip_prefix("\x04peq.z.alice ")
            .and_then(|r| r.strip_suffix(" /sit\n"))
            .unwrap_or_else(|| panic!("{got:?}"))
            .to_owned();
        assert_ne!(
            id,
            (1u64 << 20).to_string(),
            "a local id stands for the remote one"
        );
        feed(&mut bob, &h, format!("\x05{id} done\n").as_bytes());
        let sent = outbound(&h);
        assert!(
            matches!(&sent[..], [Outbound::Route(n, Routed::Response { epoch: 42, id, from, text, .. })]
                if &**n == "a" && *id == 1 << 20 && from == "peq.z.bob" && text == b"done"),
            "{sent:?}"
        );
        // An id it was not sent is refused here, as on one node.
        feed(
            &mut bob,
            &h,
            format!("\x05{} x\n", (1u64 << 63) + 999).as_bytes(),
        );
        assert!(out(&bob).starts_with(b"\x09response refused:"));
        assert!(outbound(&h).is_empty());
    }

    #[test]
    fn a_remote_holder_is_refused_or_replaced_as_policy_says() {
        let h = hub(DuplicateIdentity::Refuse);
        joins(&h, "b", vec![member(7, "peq.z.bob", 1)]);
        let mut c = Connection::accept(&h, 0, "127.0.0.1:5000".parse().unwrap(), Instant::now());
        feed(&mut c, &h, b"\x01PEQ.Z.BOB\n");
        assert_eq!(out(&c), b"\x09identity in use\n");
        let h = hub(DuplicateIdentity::Replace);
        joins(&h, "b", vec![member(7, "peq.z.bob", 1)]);
        outbound(&h);
        let _c = shim(&h, "peq.z.bob");
        let sent = outbound(&h);
        assert!(
            matches!(&sent[..], [Outbound::Change(Change::Join(m))]
                if m.replaces == Some(("b".into(), 7)) && m.claimed_unix_us == 1),
            "the claim names the holder it replaces and keeps its time: {sent:?}"
        );
        assert!(
            h.cluster()
                .unwrap()
                .remote_counts()
                .iter()
                .all(|(_, n)| *n == 0)
        );
    }

    #[test]
    fn of_two_claims_made_apart_the_earlier_keeps_the_name() {
        let h = hub(DuplicateIdentity::SameCredential);
        let bob = shim(&h, "peq.z.bob");
        let mine = h.claimed_us(bob.shim());
        // A later claim elsewhere loses: nothing changes here.
        joins(&h, "b", vec![member(7, "peq.z.bob", mine + 10)]);
        assert!(!bob.shim().is_closed());
        assert_eq!(h.cluster().unwrap().remote_counts(), vec![]);
        // An earlier one wins: the shim here is told, and closed.
        joins(&h, "c", vec![member(9, "peq.z.bob", mine - 10)]);
        assert!(bob.shim().is_closed());
        let told = out(&bob);
        assert!(
            told.starts_with(b"\x09identity in use on node c\n\x03"),
            "{told:?}"
        );
        assert_eq!(
            h.cluster().unwrap().remote_counts(),
            vec![(Arc::from("c"), 1)]
        );
        assert!(
            outbound(&h)
                .iter()
                .any(|o| matches!(o, Outbound::Change(Change::Leave(..))))
        );
    }

    #[test]
    fn a_node_that_gives_a_name_to_a_newer_shim_of_its_own_is_believed() {
        // A client reconnected to node b: b's join for the new connection comes before the
        // old one's leave, with the old claim's time.
        let h = hub(DuplicateIdentity::SameCredential);
        joins(&h, "b", vec![member(7, "peq.z.bob", 5)]);
        let b: Arc<str> = Arc::from("b");
        apply(
            &h,
            vec![Inbound::Changes(
                b.clone(),
                vec![
                    Change::Join(member(8, "peq.z.bob", 5)),
                    Change::Leave(7, "replaced".into()),
                ],
            )],
        );
        let mut held = Vec::new();
        h.router.for_each_match(&Pattern::all(), |s| {
            held.push(h.remote_of(s).unwrap().serial)
        });
        assert_eq!(held, [8]);
    }

    #[test]
    fn a_snapshot_is_applied_as_the_changes_it_differs_by() {
        let h = hub(DuplicateIdentity::SameCredential);
        joins(
            &h,
            "b",
            vec![member(1, "peq.z.one", 1), member(2, "peq.z.two", 1)],
        );
        let node: Arc<str> = Arc::from("b");
        let snap = vec![member(2, "peq.z.two", 1), member(3, "peq.z.three", 1)];
        apply(&h, vec![Inbound::Snapshot(node.clone(), snap)]);
        let mut names = Vec::new();
        h.router
            .for_each_match(&Pattern::all(), |s| names.push(s.identity().to_string()));
        names.sort();
        assert_eq!(names, ["peq.z.three", "peq.z.two"]);
        apply(&h, vec![Inbound::NodeGone(node, "node lost")]);
        let mut n = 0;
        h.router.for_each_match(&Pattern::all(), |_| n += 1);
        assert_eq!(n, 0);
    }

    #[test]
    fn proxy_ids_never_alias_and_old_ones_are_forgotten() {
        let c = Cluster::new("here", 1, 5);
        let node: Arc<str> = Arc::from("a");
        let first = c.proxy_id(&node, 1, 100);
        assert!(c.is_proxy_id(first) && !c.is_proxy_id(7 << 20));
        assert_eq!(c.proxied(first), Some((node.clone(), 1, 100)));
        for i in 0..PROXY_WINDOW as u64 {
            c.proxy_id(&node, 1, i);
        }
        assert_eq!(c.proxied(first), None, "pushed out of the window");
        let last = c.proxy_id(&node, 1, 5);
        assert_eq!(c.proxied(last), Some((node, 1, 5)));
        assert_eq!(c.proxied(last + 1), None);
    }

    #[test]
    fn cut_off_a_wildcard_gets_its_answer_then_the_notice() {
        let h = hub(DuplicateIdentity::SameCredential);
        let mut alice = shim(&h, "peq.z.alice");
        let _bob = shim(&h, "peq.z.bob");
        h.cluster().unwrap().set_reachable(false);
        feed(&mut alice, &h, b"\x04peq.z.* /sit\n");
        let o = String::from_utf8_lossy(&out(&alice)).into_owned();
        let (ack, notice) = o.split_once('\n').unwrap();
        assert!(ack.starts_with('\x0c') && ack.ends_with(" 1"), "{o:?}");
        assert!(notice.starts_with("\x09cluster unreachable:"), "{o:?}");
        assert!(crate::proto::reject::answers_no_request(
            &notice.as_bytes()[1..]
        ));
        // An exact identity held here gets no notice.
        feed(&mut alice, &h, b"\x04peq.z.bob /sit\n");
        let o = out(&alice);
        assert!(
            o.starts_with(b"\x0c") && o.iter().filter(|&&b| b == b'\n').count() == 1,
            "{o:?}"
        );
    }

    /// What another node may send, as steps: joins (with any serial, name, claim time and
    /// replace mark), leaves, UDP changes, snapshots, a node gone, and local claims.
    #[derive(Debug, Clone)]
    enum Step {
        Join(u8, u64, u8, u64, Option<u64>),
        Leave(u8, u64),
        Udp(u8, u64),
        Snapshot(u8, Vec<(u64, u8, u64)>),
        Gone(u8),
        Local(u8),
        Bytes(Vec<u8>),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let node = 0u8..3;
        let serial = 1u64..6;
        let name = 0u8..4;
        prop_oneof![
            (
                node.clone(),
                serial.clone(),
                name.clone(),
                0u64..20,
                proptest::option::of(0u64..6)
            )
                .prop_map(|(n, s, i, t, r)| Step::Join(n, s, i, t, r)),
            (node.clone(), serial.clone()).prop_map(|(n, s)| Step::Leave(n, s)),
            (node.clone(), serial.clone()).prop_map(|(n, s)| Step::Udp(n, s)),
            (
                node.clone(),
                proptest::collection::vec((serial, name.clone(), 0u64..20), 0..5)
            )
                .prop_map(|(n, m)| Step::Snapshot(n, m)),
            node.prop_map(Step::Gone),
            name.prop_map(Step::Local),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Bytes),
        ]
    }

    proptest::proptest! {
        /// Whatever other nodes say, in any order, the hub never holds two live shims
        /// under one identity, and every remote shim it holds is in the router, open, and
        /// known by its node and serial.
        #[test]
        fn remote_presence_keeps_the_hub_consistent(
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let h = hub(DuplicateIdentity::SameCredential);
            let c = h.cluster().unwrap();
            let names = ["peq.z.a", "peq.z.b", "PEQ.z.a", "peq.y.c"];
            let nodes = ["n0", "n1", "n2"];
            let mut locals = Vec::new();
            for st in steps {
                let item = |n: u8, ch: Vec<Change>| Inbound::Changes(Arc::from(nodes[n as usize]), ch);
                match st {
                    Step::Join(n, s, i, t, r) => {
                        let mut m = member(s, names[i as usize], t);
                        m.replaces = r.map(|r| ("here".to_string(), r));
                        apply(&h, vec![item(n, vec![Change::Join(m)])]);
                    }
                    Step::Leave(n, s) => apply(&h, vec![item(n, vec![Change::Leave(s, "eof".into())])]),
                    Step::Udp(n, s) => apply(&h, vec![item(n, vec![Change::Udp(s, true)])]),
                    Step::Snapshot(n, ms) => {
                        let ms = ms.into_iter().map(|(s, i, t)| member(s, names[i as usize], t)).collect();
                        apply(&h, vec![Inbound::Snapshot(Arc::from(nodes[n as usize]), ms)]);
                    }
                    Step::Gone(n) => apply(&h, vec![Inbound::NodeGone(Arc::from(nodes[n as usize]), "node lost")]),
                    Step::Local(i) => {
                        let mut conn = Connection::accept(&h, 0, "127.0.0.1:5000".parse().unwrap(), Instant::now());
                        feed(&mut conn, &h, format!("\x01{}\n", names[i as usize]).as_bytes());
                        locals.push(conn);
                    }
                    Step::Bytes(b) => {
                        // Bytes that are not a message are dropped by the thread; those
                        // that are, are applied like any other.
                        if let Some(d) = crate::proto::cluster::decode::<crate::proto::cluster::Direct>(&b) {
                            let mut fx = Effects::default();
                            fx.begin(&h, 0);
                            h.cluster_routed(&Arc::from(d.node.as_str()), d.epoch, d.items, &mut fx);
                        }
                        if let Some(p) = crate::proto::cluster::decode::<crate::proto::cluster::Presence>(&b)
                            && let crate::proto::cluster::Body::Changes(ch) = p.body
                        {
                            apply(&h, vec![Inbound::Changes(Arc::from(p.node.as_str()), ch)]);
                        }
                    }
                }
                let mut held: Vec<(String, u64)> = Vec::new();
                h.router.for_each_match(&Pattern::all(), |s| {
                    held.push((s.identity().to_ascii_lowercase(), s.serial));
                });
                let mut ids: Vec<&String> = held.iter().map(|(i, _)| i).collect();
                ids.sort();
                let n = ids.len();
                ids.dedup();
                proptest::prop_assert_eq!(ids.len(), n, "two shims under one identity: {:?}", held);
                let remote = c.remote.lock();
                let ghosts = c.ghosts.lock();
                let mut count = 0;
                for (node, g) in remote.iter() {
                    for (serial, shim) in g {
                        count += 1;
                        proptest::prop_assert!(!shim.is_closed());
                        proptest::prop_assert!(held.iter().any(|(_, s)| *s == shim.serial));
                        let r = ghosts.get(&shim.serial);
                        proptest::prop_assert!(r.is_some_and(|r| r.node == *node && r.serial == *serial));
                    }
                }
                proptest::prop_assert_eq!(ghosts.len(), count);
            }
        }
    }
}
