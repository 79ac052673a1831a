//! The UDP side of the protocol: binds, pings and routed frames in datagrams.
//!
//! [`on_datagram`] takes one received datagram and returns the datagrams to send; the
//! driver sends them from the same listening socket (so they leave from the server's own
//! port). Unverified sources are answered only with `| 0x03 | 0x0A |`, never with more
//! bytes than they sent, and at most [`QuitLimiter`]'s rate: the server cannot be used
//! to reflect or amplify traffic. Cheapest checks first.

use super::Hub;
use super::send::{Class, Datagram, Effects, Route, Via};
use super::shim::Shim;
use super::table::BindOutcome;
use crate::metrics::{Counters, Dir, ErrorKind, Latency, Transport};
use crate::proto::codec::decode_datagram;
use crate::proto::reject::Reject;
use crate::proto::request::Request;
use crate::proto::sealed::{self, SealError};
use crate::proto::{Frame, Opcode, QUIT, Token, reply};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, info, warn};

/// Per-source token bucket for Quit answers. One per core: with SO_REUSEPORT a source
/// address always hashes to the same socket, so per-core is per-source.
pub struct QuitLimiter {
    per_sec: u32,
    buckets: HashMap<SocketAddr, (u32, u64)>,
}

const LIMITER_MAX_SOURCES: usize = 65_536;

impl QuitLimiter {
    /// Allows `per_sec` answers per second per source, in bursts of up to `per_sec`.
    pub fn new(per_sec: u32) -> QuitLimiter {
        QuitLimiter {
            per_sec,
            buckets: HashMap::new(),
        }
    }

    /// Changes the rate (after a reload); buckets keep what they hold, up to the new burst.
    pub fn set_rate(&mut self, per_sec: u32) {
        self.per_sec = per_sec;
    }

    /// Takes one answer from `src`'s bucket at `now_ms`; false when it is empty.
    pub fn allow(&mut self, src: SocketAddr, now_ms: u64) -> bool {
        if self.per_sec == 0 {
            return false;
        }
        if self.buckets.len() >= LIMITER_MAX_SOURCES && !self.buckets.contains_key(&src) {
            // A spray of spoofed sources: forget buckets that have refilled anyway.
            let per_sec = u64::from(self.per_sec);
            self.buckets
                .retain(|_, (_, t)| now_ms.saturating_sub(*t) * per_sec < 1000 * per_sec);
            if self.buckets.len() >= LIMITER_MAX_SOURCES {
                return false;
            }
        }
        let per_sec = self.per_sec;
        let (tokens, last) = self.buckets.entry(src).or_insert((per_sec, now_ms));
        let refill = now_ms.saturating_sub(*last) * u64::from(per_sec) / 1000;
        if refill > 0 {
            *tokens = (u64::from(*tokens) + refill).min(u64::from(per_sec)) as u32;
            *last = now_ms;
        }
        // A bucket filled under a higher rate holds no more than the current burst.
        *tokens = (*tokens).min(per_sec);
        if *tokens == 0 {
            return false;
        }
        *tokens -= 1;
        true
    }
}

/// Datagrams waiting for room in a core's UDP socket: replies to a shim's own requests in
/// a queue of their own that is sent first, so a quiet shim's Pong or Ack is never stuck
/// behind a fan-out to others; each queue in order; bounded per core and per destination.
/// The driver sends from it; when it is full, a datagram is dropped (UDP is best effort).
#[derive(Default)]
pub struct SendQueue {
    replies: VecDeque<Datagram>,
    deliveries: VecDeque<Datagram>,
    per_dest: HashMap<SocketAddr, usize>,
    /// Whether the driver has a task draining it.
    pub sending: bool,
}

impl SendQueue {
    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.replies.len() + self.deliveries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether something waits that `d` must not overtake (a reply waits only behind
    /// replies).
    pub fn is_ahead_of(&self, d: &Datagram) -> bool {
        match d.class {
            Class::Reply => !self.replies.is_empty(),
            Class::Delivery => !self.is_empty(),
        }
    }

    /// Queues `d` unless `per_dest` datagrams wait for its address, or `max` in all (a
    /// reply then takes the place of the oldest delivery). Returns how many datagrams
    /// were dropped: `d`, or the delivery it replaced.
    pub fn offer(&mut self, d: Datagram, max: usize, per_dest: usize) -> usize {
        let n = self.per_dest.get(&d.to).copied().unwrap_or(0);
        if n >= per_dest {
            return 1;
        }
        let mut dropped = 0;
        if self.len() >= max {
            if d.class == Class::Delivery || self.deliveries.is_empty() {
                return 1;
            }
            let old = self.deliveries.pop_front().expect("not empty");
            self.forget(old.to);
            dropped = 1;
        }
        self.per_dest.insert(d.to, n + 1);
        match d.class {
            Class::Reply => self.replies.push_back(d),
            Class::Delivery => self.deliveries.push_back(d),
        }
        dropped
    }

    fn forget(&mut self, to: SocketAddr) {
        if let Some(n) = self.per_dest.get_mut(&to) {
            *n -= 1;
            if *n == 0 {
                self.per_dest.remove(&to);
            }
        }
    }

    /// The next datagram to send.
    pub fn front(&self) -> Option<&Datagram> {
        self.replies.front().or_else(|| self.deliveries.front())
    }

    /// Takes the next datagram; once the queue is empty, what a burst grew is given back.
    pub fn pop(&mut self) -> Option<Datagram> {
        let d = self
            .replies
            .pop_front()
            .or_else(|| self.deliveries.pop_front())?;
        self.forget(d.to);
        if self.is_empty() {
            *self = SendQueue {
                sending: self.sending,
                ..SendQueue::default()
            };
        }
        Some(d)
    }
}

fn answer_quit(hub: &Hub, lim: &mut QuitLimiter, src: SocketAddr, len: usize, out: &mut Effects) {
    // Never answer with more bytes than arrived.
    if len < QUIT.len() {
        return;
    }
    lim.set_rate(hub.config().udp_quit_per_sec);
    if lim.allow(src, out.now_ms) {
        Counters::bump(&hub.counters().udp_quit_sent);
        out.datagrams.push(Datagram {
            to: src,
            frame: Bytes::from_static(&QUIT),
            class: Class::Reply,
        });
    } else {
        Counters::bump(&hub.counters().udp_quit_suppressed);
    }
}

/// Handles one datagram from `src`, received at `now`. A datagram is one frame, with or
/// without its trailing 0x0A.
pub fn on_datagram(
    hub: &Hub,
    lim: &mut QuitLimiter,
    src: SocketAddr,
    dgram: &[u8],
    now: Instant,
    out: &mut Effects,
) {
    out.begin(hub, hub.ms(now));
    if dgram.first() == Some(&sealed::MARKER) {
        return on_sealed(hub, src, dgram, now, out);
    }
    let frame = match decode_datagram(dgram, hub.config().max_frame) {
        Ok(f) => f,
        Err(_) => {
            hub.metrics.error(ErrorKind::BadDatagram);
            if hub.table.by_udp(&src).is_none() {
                answer_quit(hub, lim, src, dgram.len(), out);
            }
            return;
        }
    };
    hub.metrics
        .frame(Dir::In, Transport::Udp, frame.op, dgram.len());

    if frame.op == Opcode::Session as u8 {
        let Some(shim) = Token::from_slice(frame.data).and_then(|t| hub.table.by_token(&t)) else {
            debug!(%src, "bind with unknown token");
            return answer_quit(hub, lim, src, dgram.len(), out);
        };
        // A TLS session's token travels only inside TLS, and its UDP is sealed: a plain
        // bind with it is a confused client or a stolen token.
        let refusal = if shim.is_tls() {
            Some(Reject::PlainUdpTls)
        } else if !hub.config().udp_plain {
            Some(Reject::PlainUdpOff)
        } else {
            None
        };
        if let Some(r) = refusal {
            hub.metrics.reject(&r);
            hub.log_refusal(&shim, &r, out.now_ms);
            return answer_quit(hub, lim, src, dgram.len(), out);
        }
        let (outcome, took) = hub.table.bind_udp(&shim, src);
        if let Some(other) = took {
            Counters::bump(&hub.counters().udp_address_taken);
            hub.log_once_a_minute(&shim, out.now_ms, || {
                warn!(conn = shim.serial, identity = %shim.identity(), %src, from = other,
                    "plain UDP bind took an address from another live session \
                     (logged once a minute per shim)")
            });
        }
        match outcome {
            BindOutcome::Dead => return answer_quit(hub, lim, src, dgram.len(), out),
            BindOutcome::Bound => {
                info!(conn = shim.serial, identity = %shim.identity(), %src, "bind");
                hub.cluster_udp(&shim, true);
            }
            BindOutcome::Rebound { from } => {
                info!(conn = shim.serial, identity = %shim.identity(), %from, to = %src, "rebind");
            }
            BindOutcome::Unchanged => {}
        }
        shim.touch(out.now_ms);
        out.time(Latency::UdpBind, now);
        return;
    }

    let Some(shim) = hub.table.by_udp(&src).filter(|_| hub.config().udp_plain) else {
        // Unbound, or bound before a reload turned plain UDP off.
        return answer_quit(hub, lim, src, dgram.len(), out);
    };
    on_frame(hub, &shim, src, frame, out);
}

/// Handles a sealed datagram (`proto/sealed.rs`), cheapest check first: its length, its
/// session id, its counter against the replay window, and only then the decryption.
/// Whatever fails is dropped and counted, never answered: the hub says nothing to a
/// source that cannot prove it holds the session's key.
fn on_sealed(hub: &Hub, src: SocketAddr, dgram: &[u8], now: Instant, out: &mut Effects) {
    let dropped = |e: SealError| {
        let i = SealError::ALL.iter().position(|x| *x == e).unwrap_or(0);
        Counters::bump(&hub.counters().sealed_dropped[i]);
    };
    let h = match sealed::header(dgram) {
        Ok(h) => h,
        Err(e) => return dropped(e),
    };
    let Some(shim) = hub.table.by_sealed(h.session) else {
        return dropped(SealError::UnknownSession);
    };
    let Some(s) = shim.sealed.get() else {
        return dropped(SealError::UnknownSession);
    };
    if !s.window.lock().check(h.counter) {
        return dropped(SealError::Replayed);
    }
    let mut buf = dgram.to_vec();
    let plain = match s.open.open(&mut buf) {
        Ok(p) => p,
        Err(e) => return dropped(e),
    };
    // Checked again under the lock (the same datagram may have reached two cores), and
    // the address moved under it too, so that of two datagrams on two cores the newer
    // one's source always stands.
    let mut w = s.window.lock();
    if !w.check(h.counter) {
        return dropped(SealError::Replayed);
    }
    let moved = w
        .accept(h.counter)
        .then(|| hub.table.move_sealed(&shim, src));
    std::mem::drop(w);
    if let Some(moved) = moved {
        match moved {
            BindOutcome::Dead => return,
            BindOutcome::Bound => {
                info!(conn = shim.serial, identity = %shim.identity(), %src, "sealed bind");
                hub.cluster_udp(&shim, true);
                out.time(Latency::UdpBind, now);
            }
            BindOutcome::Rebound { from } => {
                info!(conn = shim.serial, identity = %shim.identity(), %from, to = %src,
                    "sealed rebind");
            }
            BindOutcome::Unchanged => {}
        }
    }
    let frame = match decode_datagram(plain, hub.config().max_frame) {
        Ok(f) => f,
        Err(_) => return hub.metrics.error(ErrorKind::BadDatagram),
    };
    hub.metrics
        .frame(Dir::In, Transport::Udp, frame.op, plain.len());
    on_frame(hub, &shim, src, frame, out);
}

/// Handles one frame that arrived over `shim`'s UDP channel from `src`.
fn on_frame(hub: &Hub, shim: &Arc<Shim>, src: SocketAddr, frame: Frame<'_>, out: &mut Effects) {
    let shim = shim.clone();
    if !shim.outbox.is_open() {
        // Cut off or closing (its reader will remove it): none of its input is handled.
        return;
    }
    shim.touch(out.now_ms);
    shim.frames_in.fetch_add(1, Ordering::Relaxed);
    let via = Via::Udp(src);
    let answer = Route::Reply(via);
    let Some(op) = frame.opcode() else {
        return hub.refuse(&shim, answer, &Reject::UnknownOpcode(frame.op), out);
    };
    match op {
        Opcode::Identify | Opcode::Auth => {
            return hub.refuse(&shim, answer, &Reject::NotOverUdp(op), out);
        }
        // Whatever its pattern: a listing does not fit a datagram.
        Opcode::Who => return hub.refuse(&shim, answer, &Reject::WhoOverUdp, out),
        Opcode::Subscribe | Opcode::Unsubscribe | Opcode::Get => {
            return hub.refuse(&shim, answer, &Reject::NotOverUdp(op), out);
        }
        _ => {}
    }
    match Request::parse(op, frame.data) {
        Err(Reject::ServerOnly(op)) => hub.refuse(&shim, answer, &Reject::NotOverUdp(op), out),
        Err(r) => hub.refuse(&shim, answer, &r, out),
        // A bind inside a sealed datagram: sealed UDP needs none.
        Ok(Request::Nothing | Request::Pong | Request::Quit | Request::Bind(_)) => {}
        Ok(Request::Ping(data)) => {
            let mut f = Vec::with_capacity(data.len() + 2);
            reply::pong(data, &mut f);
            hub.send(&shim, answer, &Bytes::from(f), out);
        }
        Ok(Request::Route(r)) => hub.fan_out(&shim, &r, via, out),
        Ok(Request::Respond { id, id_text, text }) => {
            hub.respond(&shim, id, id_text, text, via, out)
        }
        Ok(Request::Set(items)) => {
            hub.set_state(&shim, &items, via, out);
            hub.deliver_state(out);
        }
        Ok(
            Request::Who(_)
            | Request::Identify(_)
            | Request::Auth(_)
            | Request::Subscribe(_)
            | Request::Unsubscribe(_)
            | Request::Get { .. },
        ) => {
            unreachable!("handled above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hub::connection::Connection;

    fn setup() -> (std::sync::Arc<Hub>, Connection, QuitLimiter) {
        let h = Hub::new(Config {
            udp_quit_per_sec: 3,
            ..Config::default()
        });
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, "127.0.0.1:5000".parse().unwrap(), now);
        c.on_bytes(&h, b"\x01peq.a.bob\n", now);
        h.finish(0, c.effects(), now);
        (h, c, QuitLimiter::new(3))
    }

    fn bind_frame(t: &Token) -> Vec<u8> {
        let mut f = vec![0x02];
        f.extend_from_slice(&t.0);
        f.push(0x0A);
        f
    }

    #[test]
    fn bind_then_ping() {
        let (h, c, mut lim) = setup();
        let src: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let mut out = Effects::default();
        on_datagram(
            &h,
            &mut lim,
            src,
            &bind_frame(&c.shim().token),
            Instant::now(),
            &mut out,
        );
        assert!(out.datagrams.is_empty(), "a valid bind gets no reply");
        on_datagram(&h, &mut lim, src, b"\x06hey\n", Instant::now(), &mut out);
        assert_eq!(
            out.datagrams,
            vec![Datagram {
                to: src,
                frame: Bytes::from_static(b"\x07hey\n"),
                class: Class::Reply
            }]
        );
        // The original server's 17-byte bind, without its 0x0A, binds too.
        let other: SocketAddr = "127.0.0.1:7004".parse().unwrap();
        let bind = &bind_frame(&c.shim().token)[..17];
        on_datagram(&h, &mut lim, other, bind, Instant::now(), &mut out);
        assert_eq!(
            h.table.by_udp(&other).map(|s| s.serial),
            Some(c.shim().serial)
        );
    }

    #[test]
    fn unbound_sources_get_small_rate_limited_quits() {
        let (h, _c, mut lim) = setup();
        let src: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let mut out = Effects::default();
        let now = Instant::now();
        for _ in 0..10 {
            on_datagram(&h, &mut lim, src, b"\x06x\n", now, &mut out);
        }
        assert_eq!(out.datagrams.len(), 3, "burst of 3 then nothing");
        assert!(
            out.datagrams
                .iter()
                .all(|d| d.to == src && d.frame[..] == QUIT)
        );
        out.datagrams.clear();
        on_datagram(
            &h,
            &mut lim,
            "127.0.0.1:7002".parse().unwrap(),
            b"\x06",
            now,
            &mut out,
        );
        assert!(
            out.datagrams.is_empty(),
            "a 1-byte datagram is not answered with 2 bytes"
        );
        let bogus = bind_frame(&Token([7; 16]));
        on_datagram(
            &h,
            &mut lim,
            "127.0.0.1:7003".parse().unwrap(),
            &bogus,
            now,
            &mut out,
        );
        assert_eq!(out.datagrams.len(), 1);
    }

    #[test]
    fn send_queue_is_bounded_and_replies_go_first() {
        let d = |port: u16, class: Class| Datagram {
            to: SocketAddr::from(([127, 0, 0, 1], port)),
            frame: Bytes::from_static(b"\x07\n"),
            class,
        };
        let mut q = SendQueue::default();
        for _ in 0..3 {
            assert_eq!(q.offer(d(1, Class::Delivery), 5, 3), 0);
        }
        assert_eq!(q.offer(d(1, Class::Delivery), 5, 3), 1, "3 per destination");
        assert_eq!(q.offer(d(2, Class::Delivery), 5, 3), 0);
        assert!(
            !q.is_ahead_of(&d(3, Class::Reply)),
            "a reply overtakes deliveries"
        );
        assert_eq!(q.offer(d(3, Class::Reply), 5, 3), 0);
        assert_eq!(q.offer(d(5, Class::Delivery), 5, 3), 1, "5 in all");
        assert_eq!(
            q.offer(d(4, Class::Reply), 5, 3),
            1,
            "a reply replaces a delivery"
        );
        assert!(q.is_ahead_of(&d(4, Class::Reply)));
        assert_eq!(q.pop().map(|x| x.to.port()), Some(3), "replies first");
        assert_eq!(q.pop().map(|x| x.to.port()), Some(4));
        let order: Vec<u16> = std::iter::from_fn(|| q.pop())
            .map(|x| x.to.port())
            .collect();
        assert_eq!(order, [1, 1, 2], "the oldest delivery made room");
        assert!(q.is_empty() && q.per_dest.capacity() == 0 && q.deliveries.capacity() == 0);
    }

    #[test]
    fn limiter_refills() {
        let mut lim = QuitLimiter::new(2);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(lim.allow(a, 0) && lim.allow(a, 0));
        assert!(!lim.allow(a, 100));
        assert!(lim.allow(a, 600));
    }
}
