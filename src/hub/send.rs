//! The one send path: every frame the server sends is queued, listed for the flush and
//! counted by [`Hub::send`] (or, for a connection's last frame, [`Hub::send_last`]); and
//! the limits on what one shim may make the hub send: the outbound limit, the per-shim
//! routing rates, and the bound on one slice of input.
//!
//! What a slice of input produced is gathered in an [`Effects`]: the outboxes to flush
//! and the datagrams to send, which the driver carries out once the slice is handled, and
//! the traffic counts, added to the metrics once per slice rather than once per frame.

use super::Hub;
use super::shim::{CloseReason, Shim};
use crate::metrics::{Dir, Latency, Transport};
use crate::proto::reject::{Rate, Reject};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, warn};

/// The transport a request arrived on; its replies go back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The shim's TCP connection.
    Tcp,
    /// The shim's bound UDP channel, from this source address.
    Udp(SocketAddr),
}

/// How a frame travels to its shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// An answer to the shim's own request, on the transport the request came in on.
    Reply(Via),
    /// A routed frame: over the target's UDP channel when the frame came in over UDP and
    /// the target has one, else over TCP.
    Deliver(Via),
    /// A Who listing over TCP: it may pass the outbound limit once, in a big fleet.
    Listing,
    /// The Session frame: queued before the shim can be found, never refused.
    Session,
    /// Relay state for a subscriber: over its UDP channel when `true` and it has one,
    /// else over TCP. Never holds back the producer: a busy subscriber's changes wait
    /// and coalesce (`hub/state.rs`) rather than congest.
    State(bool),
}

/// Which UDP queue a datagram waits in when the socket is full: replies go first, so a
/// quiet shim's Pong or Ack is never stuck behind a fan-out to others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// An answer to the destination's own request.
    Reply,
    /// A delivery routed from another shim.
    Delivery,
}

/// One datagram to send from the listening UDP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// Where to.
    pub to: SocketAddr,
    /// One whole frame.
    pub frame: Bytes,
    /// Its queue.
    pub class: Class,
}

/// Bytes one slice of input may queue, for all its recipients together, before the
/// driver flushes.
const SLICE_BYTES: usize = 64 * 1024 * 1024;
/// Frames one slice may handle before the driver flushes and lets other connections run.
pub(crate) const SLICE_FRAMES: usize = 1024;
/// A recipient whose output moved within this window still counts as reading.
const DRAINING_MS: u64 = 100;
/// Congested recipients one slice remembers (one is enough to end it).
const MAX_CONGESTED: usize = 64;

/// What handling a slice of input produced, for the driver to carry out afterwards.
#[derive(Debug)]
pub struct Effects {
    /// Datagrams to send from the listening UDP socket.
    pub datagrams: Vec<Datagram>,
    /// Shims whose outbox went from empty to not empty: each is flushed once.
    pub flush: Vec<Arc<Shim>>,
    /// While flushing ([`Hub::flush_listed`]): the listed outboxes of each other core.
    away: Vec<Vec<Arc<Shim>>>,
    /// Deliveries to each other core's connections, for that core to queue
    /// ([`Hub::hand_over`]).
    outgoing: Vec<super::handoff::Outgoing>,
    /// The other cores this slice pushed a delivery to directly (a bit per core, the first
    /// 64): the first delivery to a core in a slice is pushed by the producer, so a
    /// Command to one shim there costs no hand-off.
    direct: u64,
    /// The core the slice is handled on, when the driver hands deliveries to other cores
    /// (`usize::MAX`: every frame is queued here).
    pub core: usize,
    /// Subscriptions this slice marked, delivered at its end ([`Hub::deliver_state`]).
    pub(crate) state: Vec<Arc<super::state::Subscription>>,
    /// Recipients whose queue this slice filled past the high-water mark.
    congested: Vec<Arc<Shim>>,
    /// Bytes queued on outboxes during this slice.
    queued: usize,
    /// Latencies to record when the slice is done: what and since when.
    latencies: Vec<(Latency, Instant)>,
    /// Frames and bytes sent, by transport and opcode, not yet added to the metrics.
    tally: Vec<(Transport, u8, u64, u64)>,
    /// The time the slice is handled at, hub milliseconds.
    pub(crate) now_ms: u64,
    /// The same as Unix microseconds, when the driver gave an `Instant` (0: not given).
    pub(crate) now_unix_us: u64,
    /// `outbound_limit`, read once per slice rather than once per delivery.
    limit: usize,
}

impl Default for Effects {
    fn default() -> Self {
        Effects {
            datagrams: Vec::new(),
            flush: Vec::new(),
            away: Vec::new(),
            outgoing: Vec::new(),
            direct: 0,
            core: usize::MAX,
            state: Vec::new(),
            congested: Vec::new(),
            queued: 0,
            latencies: Vec::new(),
            tally: Vec::new(),
            now_ms: 0,
            now_unix_us: 0,
            // Set from the settings by `begin`; a constant here, since effects are made
            // for every read (`Config::default` asks the system for the usable cores).
            limit: crate::config::DEFAULT_OUTBOUND_LIMIT,
        }
    }
}

impl Effects {
    /// Starts a slice handled at `now_ms` under the hub's current settings.
    /// (What the previous slice congested has been waited for by then.)
    pub(crate) fn begin(&mut self, hub: &Hub, now_ms: u64) {
        self.congested.clear();
        self.queued = 0;
        self.direct = 0;
        self.now_ms = now_ms;
        self.now_unix_us = 0;
        hub.tick_to(now_ms);
        self.limit = hub.config().outbound_limit;
    }

    /// Whether this slice queued as much as one slice may: a recipient's queue passed a
    /// quarter of the outbound limit (so no recipient gets much more than that from one
    /// slice, however wide the fan-out), or the slice's total passed [`SLICE_BYTES`].
    pub(crate) fn slice_full(&self) -> bool {
        !self.congested.is_empty() || self.queued >= SLICE_BYTES
    }

    /// Whether nothing is left to carry out.
    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
            && self.flush.is_empty()
            && self.congested.is_empty()
            && self.outgoing.iter().all(|o| o.is_empty())
    }

    /// Whether a delivery to core `core`'s connection is pushed here: the first of the
    /// slice to that core, before anything was gathered for it (so the frames a recipient
    /// gets directly always precede those handed over).
    fn push_direct(&mut self, core: usize) -> bool {
        if core >= 64 || self.outgoing.get(core).is_some_and(|o| !o.is_empty()) {
            return false;
        }
        let bit = 1u64 << core;
        if self.direct & bit != 0 {
            return false;
        }
        self.direct |= bit;
        true
    }

    /// Adds recipients another core left congested (see [`Hub::hand_over`]).
    pub fn add_congested(&mut self, shims: Vec<Arc<Shim>>) {
        for s in shims {
            if self.congested.len() < MAX_CONGESTED
                && !self.congested.iter().any(|c| Arc::ptr_eq(c, &s))
            {
                self.congested.push(s);
            }
        }
    }

    pub(crate) fn count(&mut self, t: Transport, op: u8, frames: u64, bytes: usize) {
        match self.tally.iter_mut().find(|e| e.0 == t && e.1 == op) {
            Some(e) => {
                e.2 += frames;
                e.3 += bytes as u64;
            }
            None => self.tally.push((t, op, frames, bytes as u64)),
        }
    }

    /// Notes a latency sample to record, started at `since`, when the slice is done.
    pub(crate) fn time(&mut self, which: Latency, since: Instant) {
        self.latencies.push((which, since));
    }

    /// Forgets the recipients this slice congested (once the producer has waited).
    pub fn release_congested(&mut self) {
        self.congested.clear();
    }

    /// Gives back memory a burst left behind.
    fn shrink(&mut self) {
        if self.datagrams.capacity() > 64 {
            self.datagrams = Vec::new();
        }
        if self.flush.capacity() > 64 {
            self.flush = Vec::new();
        }
        if self.congested.capacity() > 64 {
            self.congested = Vec::new();
        }
        if self.away.iter().any(|a| a.capacity() > 64) {
            self.away = Vec::new();
        }
    }
}

/// What a routed request is, for the rates it counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// A Command or Echo.
    FanOut,
    /// A CommandResponse.
    Response,
    /// A Who.
    Who,
}

/// Token buckets in thousandths of a token: `rate` tokens a second, up to `rate` held.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    milli: i64,
    at_ms: u64,
}

impl Bucket {
    /// A full bucket at `now_ms` (the first second's burst is free).
    pub(crate) fn full(now_ms: u64) -> Bucket {
        Bucket {
            milli: i64::MAX / 4,
            at_ms: now_ms,
        }
    }

    /// Takes one token from a bucket of `rate` a second; false when it is empty.
    pub(crate) fn take(&mut self, rate: u32, now_ms: u64) -> bool {
        self.refill(rate, now_ms);
        if self.milli < 1000 {
            return false;
        }
        self.milli -= 1000;
        true
    }

    fn refill(&mut self, rate: u32, now_ms: u64) {
        let cap = i64::from(rate) * 1000;
        // The clock never runs back (the TCP and UDP sides of a shim may be served by two
        // cores with slightly different times), and the arithmetic saturates.
        let dt = now_ms.saturating_sub(self.at_ms) as i64;
        let gained = dt.saturating_mul(i64::from(rate));
        self.milli = self.milli.saturating_add(gained).min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }
}

/// What one shim may still route: frames, deliveries and Who requests per second.
#[derive(Debug)]
pub struct Buckets {
    routed: Bucket,
    deliveries: Bucket,
    who: Bucket,
}

impl Buckets {
    /// Full buckets at `now_ms` (a bucket starts full: the first second's burst is free).
    pub(crate) fn new(now_ms: u64) -> Buckets {
        let full = Bucket {
            milli: i64::MAX / 4,
            at_ms: now_ms,
        };
        Buckets {
            routed: full,
            deliveries: full,
            who: full,
        }
    }
}

impl Hub {
    /// Checks the sender's rates before a routed request is carried out: one routed frame
    /// (and one Who), and deliveries while the bucket is not in debt. A request is charged
    /// its deliveries afterwards with [`Hub::charge_deliveries`], so one Command to a
    /// fleet larger than a second's worth still goes, and the next waits. A
    /// CommandResponse counts in deliveries only: it answers a Command that was itself
    /// limited at its sender, and costs one delivery.
    pub(crate) fn allow_route(&self, sender: &Shim, work: Work, now_ms: u64) -> Result<(), Reject> {
        let c = self.config();
        let mut b = sender.buckets.lock();
        let routed = work != Work::Response && c.routed_per_sec > 0;
        let who = work == Work::Who && c.who_per_sec > 0;
        let refused = if routed && {
            b.routed.refill(c.routed_per_sec, now_ms);
            b.routed.milli < 1000
        } {
            Some(Reject::RateLimited(Rate::Routed, c.routed_per_sec))
        } else if who && {
            b.who.refill(c.who_per_sec, now_ms);
            b.who.milli < 1000
        } {
            Some(Reject::RateLimited(Rate::Who, c.who_per_sec))
        } else if c.deliveries_per_sec > 0 && {
            b.deliveries.refill(c.deliveries_per_sec, now_ms);
            b.deliveries.milli <= 0
        } {
            Some(Reject::RateLimited(Rate::Deliveries, c.deliveries_per_sec))
        } else {
            None
        };
        match refused {
            None => {
                if routed {
                    b.routed.milli -= 1000;
                }
                if who {
                    b.who.milli -= 1000;
                }
                Ok(())
            }
            Some(r) => {
                drop(b);
                self.log_refusal(sender, &r, now_ms);
                Err(r)
            }
        }
    }

    /// Charges `n` deliveries to the sender's bucket.
    pub(crate) fn charge_deliveries(&self, sender: &Shim, n: u64) {
        if self.config().deliveries_per_sec > 0 {
            let mut b = sender.buckets.lock();
            b.deliveries.milli = b.deliveries.milli.saturating_sub(n as i64 * 1000);
        }
    }

    /// Logs a shim's refusals (rates, access rules) at most once a minute.
    pub(crate) fn log_refusal(&self, sender: &Shim, r: &Reject, now_ms: u64) {
        self.log_once_a_minute(sender, now_ms, || {
            warn!(conn = sender.serial, identity = %sender.identity(), reason = %r,
                "refused (logged once a minute per shim)");
            let what = super::journal::Happened::Rate {
                identity: sender.identity(),
                reason: r.to_string(),
            };
            self.journal.push(self.unix_us(now_ms) / 1000, what);
        });
    }

    /// Runs `log` unless a line about `shim` was logged within the last minute.
    pub(crate) fn log_once_a_minute(&self, shim: &Shim, now_ms: u64, log: impl FnOnce()) {
        let last = shim.rate_logged_ms.load(Ordering::Relaxed);
        if last == 0 || now_ms + 1 >= last + 60_000 {
            shim.rate_logged_ms.store(now_ms + 1, Ordering::Relaxed);
            log();
        }
    }

    /// The one send path: queues `frame` for `to` on `route`, lists `to` for the flush,
    /// counts the frame. Returns the transport used, or `None` when the frame was dropped
    /// (the connection is closing, or this push cut it off as a slow consumer).
    pub fn send(
        &self,
        to: &Arc<Shim>,
        route: Route,
        frame: &Bytes,
        out: &mut Effects,
    ) -> Option<Transport> {
        let udp = match route {
            Route::Reply(Via::Udp(addr)) => Some((addr, Class::Reply)),
            Route::Deliver(Via::Udp(_)) | Route::State(true) => {
                to.udp_addr().map(|a| (a, Class::Delivery))
            }
            _ => None,
        };
        if let Some((addr, class)) = udp {
            if !to.outbox.is_open() {
                return None;
            }
            to.frames_out.fetch_add(1, Ordering::Relaxed);
            let (op, len) = (frame[0], frame.len());
            let frame = match to.sealed.get() {
                Some(s) => Bytes::from(s.seal(frame)),
                None => frame.clone(),
            };
            out.count(Transport::Udp, op, 1, len);
            out.datagrams.push(Datagram {
                to: addr,
                frame,
                class,
            });
            return Some(Transport::Udp);
        }
        // A delivery to another core's connection is queued by that core
        // (`hub/handoff.rs`): the producer decides and counts it here.
        if matches!(route, Route::Deliver(_))
            && out.core != usize::MAX
            && to.core as usize != out.core
            && (to.core as usize) < self.handoff.cores()
            && !out.push_direct(to.core as usize)
        {
            if !to.outbox.is_open() {
                return None;
            }
            if out.outgoing.len() < self.handoff.cores() {
                out.outgoing
                    .resize_with(self.handoff.cores(), Default::default);
            }
            out.outgoing[to.core as usize].add(frame, to);
            out.queued += frame.len();
            out.count(Transport::Tcp, frame[0], 1, frame.len());
            return Some(Transport::Tcp);
        }
        let limit = match route {
            Route::Session => usize::MAX,
            Route::Listing => out.limit.max(frame.len()),
            // Behind a relay state listing (up to `LISTING_FACTOR` limits), a join or a
            // leave must not cut the subscriber; deliveries wait while it is backlogged.
            Route::State(_) => out.limit.saturating_mul(super::state::LISTING_FACTOR + 1),
            _ => out.limit,
        };
        match to.outbox.push(limit, frame, out.now_ms) {
            super::outbox::Pushed::Queued { first, pending } => {
                out.queued += frame.len();
                if route != Route::Listing {
                    // (A listing is many frames: `who` counts them.)
                    to.frames_out.fetch_add(1, Ordering::Relaxed);
                    out.count(Transport::Tcp, frame[0], 1, frame.len());
                }
                if first {
                    out.flush.push(to.clone());
                }
                // Past a quarter of the limit (crossing it now, or already past it from
                // before): the slice ends after this frame and the producer waits for it.
                // (A recipient that stopped reading is not waited for, so it ends no slice:
                // it is cut off at the limit or the write deadline instead.)
                if pending >= out.limit / 4
                    && !matches!(route, Route::State(_))
                    && out.congested.len() < MAX_CONGESTED
                    && !out.congested.iter().any(|s| Arc::ptr_eq(s, to))
                    && to.outbox.draining(out.now_ms, DRAINING_MS).1
                {
                    out.congested.push(to.clone());
                }
                Some(Transport::Tcp)
            }
            super::outbox::Pushed::Closed => None,
            super::outbox::Pushed::SlowConsumer => {
                debug!(conn = to.serial, "outbound limit passed");
                None
            }
        }
    }

    /// Sends the Error frame of `reject` to `to` on `route`, counting the refusal.
    pub fn refuse(&self, to: &Arc<Shim>, route: Route, reject: &Reject, out: &mut Effects) {
        self.metrics.reject(reject);
        self.send(to, route, &Bytes::from(reject.frame()), out);
    }

    /// Queues `to`'s last frame (a Quit or an Error, or nothing) and closes its outbox for
    /// `reason`: the writer flushes it and shuts the socket down.
    pub fn send_last(&self, to: &Shim, reason: CloseReason, last: &[u8]) {
        // (A connection already closing takes no more frames: none is counted.)
        // (`last` may be two frames: a `closing:` Error, then Quit.)
        if !last.is_empty() && to.outbox.is_open() {
            for f in last.split_inclusive(|&b| b == crate::proto::NEWLINE) {
                to.frames_out.fetch_add(1, Ordering::Relaxed);
                (self.metrics).frame(Dir::Out, Transport::Tcp, f[0], f.len());
            }
        }
        to.outbox.close(reason, last);
    }

    /// Hands each other core the deliveries this slice made to its connections, in one
    /// batch per core; returns the tickets to wait on (each done once that core has
    /// queued its batch).
    pub fn hand_over(&self, out: &mut Effects) -> Vec<Arc<super::handoff::Ticket>> {
        let mut tickets = Vec::new();
        for (core, o) in out.outgoing.iter_mut().enumerate() {
            if o.is_empty() {
                continue;
            }
            let ticket = Arc::new(super::handoff::Ticket::default());
            let groups = o.take();
            self.handoff.give_batch(
                core,
                super::handoff::Batch {
                    groups,
                    ticket: ticket.clone(),
                },
            );
            tickets.push(ticket);
        }
        tickets
    }

    /// Queues a batch another core handed over (its connections are this core's) at
    /// `now_ms`: each group's frames to each of its recipients in one push. Lists the
    /// outboxes to flush in `flush`, and returns the recipients the batch congested.
    pub fn queue_batch(
        &self,
        groups: Vec<super::handoff::Group>,
        now_ms: u64,
        flush: &mut Vec<Arc<Shim>>,
    ) -> Vec<Arc<Shim>> {
        let limit = self.config().outbound_limit;
        let mut congested: Vec<Arc<Shim>> = Vec::new();
        for g in groups {
            for to in g.shims {
                match to.outbox.push(limit, &g.bytes, now_ms) {
                    super::outbox::Pushed::Queued { first, pending } => {
                        to.frames_out.fetch_add(g.frames, Ordering::Relaxed);
                        if pending >= limit / 4
                            && congested.len() < MAX_CONGESTED
                            && !congested.iter().any(|s| Arc::ptr_eq(s, &to))
                            && to.outbox.draining(now_ms, DRAINING_MS).1
                        {
                            congested.push(to.clone());
                        }
                        if first {
                            flush.push(to);
                        }
                    }
                    super::outbox::Pushed::Closed => {}
                    super::outbox::Pushed::SlowConsumer => {
                        debug!(conn = to.serial, "outbound limit passed");
                    }
                }
            }
        }
        congested
    }

    /// Flushes the outboxes a slice listed, from core `core` at `now_ms`: this core's own at
    /// once, and each other core's handed to that core in one step
    /// ([`super::handoff`]), unless it has fewer than [`HANDOFF_MIN`] listed, which are
    /// flushed from here.
    ///
    /// [`HANDOFF_MIN`]: super::handoff::HANDOFF_MIN
    pub fn flush_listed(&self, core: usize, out: &mut Effects, now_ms: u64) {
        let cores = self.handoff.cores();
        if cores == 1 || out.flush.len() < super::handoff::HANDOFF_MIN {
            // Too few for a hand-off to pay, wherever they are.
            for shim in out.flush.drain(..) {
                shim.outbox.flush(now_ms);
            }
            return;
        }
        if out.away.len() < cores {
            out.away.resize_with(cores, Vec::new);
        }
        for shim in out.flush.drain(..) {
            let owner = shim.core as usize;
            if owner == core || owner >= cores {
                shim.outbox.flush(now_ms);
            } else {
                out.away[owner].push(shim);
            }
        }
        for (owner, list) in out.away.iter_mut().enumerate() {
            if list.len() >= super::handoff::HANDOFF_MIN {
                self.handoff.give(owner, list);
            } else {
                for shim in list.drain(..) {
                    shim.outbox.flush(now_ms);
                }
            }
        }
    }

    /// Ends a slice: adds its counts to the metrics and records its latencies at `now`
    /// (after the driver flushed it), on core `core`.
    pub fn finish(&self, core: usize, out: &mut Effects, now: Instant) {
        // Taken, not drained: an idle connection keeps no allocation for them.
        for (t, op, frames, bytes) in std::mem::take(&mut out.tally) {
            (self.metrics).frames(Dir::Out, t, op, frames, bytes as usize);
        }
        for (which, since) in std::mem::take(&mut out.latencies) {
            self.metrics
                .record(core, which, now.saturating_duration_since(since));
        }
        out.queued = 0;
        if out.is_empty() {
            out.shrink();
        }
    }

    /// Whether the producer of this slice should wait before it reads on: some recipient
    /// it filled past the high-water mark is still above half of it and still draining.
    /// A recipient that stopped reading is not waited for (it is cut off at the outbound
    /// limit or the write deadline instead), so a stuck shim never stalls its senders for
    /// long; one that reads promptly is never cut because of one producer's burst.
    pub fn congested(&self, out: &mut Effects, now_ms: u64) -> bool {
        let low = self.config().outbound_limit / 8;
        out.congested.retain(|s| {
            let (pending, draining) = s.outbox.draining(now_ms, DRAINING_MS);
            draining && pending > low
        });
        !out.congested.is_empty()
    }
}
