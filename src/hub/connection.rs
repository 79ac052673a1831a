//! The TCP side of the protocol: one connection's state machine.
//!
//! A [`Connection`] takes the bytes a read returned and the time, and answers with what the
//! driver must do next; replies and deliveries go out through the hub's send path into an
//! [`Effects`] the driver carries out. It does no I/O, so every protocol rule is tested
//! here without a socket, and both drivers share it.
//!
//! Work per call is bounded: [`Connection::on_bytes`] handles at most one slice of the
//! input (a number of frames, or of bytes queued for others) and says how much it took;
//! the driver flushes, lets the recipients drain, and hands in the rest. So one write of
//! many frames never turns into a burst the hub queues for everyone at once.

use super::access::Auth;
use super::send::{Effects, Route, SLICE_FRAMES, Via};
use super::shim::{CloseReason, SealedUdp, Shim};
use super::{Hub, Identified};
use crate::metrics::{Counters, Latency, Refusal, Transport};
use crate::proto::codec::{self, CodecError};
use crate::proto::reject::Reject;
use crate::proto::request::{Request, allowed_before_identify};
use crate::proto::sealed::Keys;
use crate::proto::{Frame, NEWLINE, Opcode, reply};
use crate::tls;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tracing::debug;

/// What the driver does after feeding bytes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Stop reading; the outbox holds any last frame, and the writer will shut down.
    Close(CloseReason),
}

/// What a read's bytes carry, once the transport is known ([`Connection::receive`]).
#[derive(Debug)]
pub enum Input {
    /// Plaintext: handle the bytes as read.
    Plain,
    /// A TLS connection: handle this plaintext (perhaps none yet, during the handshake),
    /// then give the buffer back ([`Connection::give_back`]).
    Decrypted(Vec<u8>),
    /// The connection ends (its last bytes are queued).
    Close(CloseReason),
}

/// How the bytes of a connection travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// Plaintext frames.
    Plain,
    /// TLS is on: the first byte decides.
    Undecided,
    /// TLS records.
    Tls,
}

/// The effects of the input in hand, made when first needed.
fn fx(out: &mut Option<Box<Effects>>) -> &mut Effects {
    out.get_or_insert_with(Box::default)
}

/// The decrypted-input buffer a TLS connection keeps between reads (larger ones are
/// freed).
const PLAIN_KEPT: usize = 4096;

/// One TCP connection's protocol state.
pub struct Connection {
    shim: Arc<Shim>,
    /// The start of a frame that a read cut in two (never more than one frame).
    partial: Vec<u8>,
    /// Whether the client presented a valid credential (the shared secret, or a user's).
    authed: bool,
    /// When the connection was accepted, for the handshake latency.
    accepted: Instant,
    /// How the bytes travel.
    wire: Wire,
    /// A TLS connection's decrypted input buffer, between reads (kept small).
    plain: Vec<u8>,
    /// What the frames handled so far produced: the driver carries it out after each
    /// slice ([`Connection::effects`]). Only while input is being handled: an idle
    /// connection holds none ([`Connection::rest`]).
    out: Option<Box<Effects>>,
}

impl Connection {
    /// A connection just accepted from `peer` on `core`.
    pub fn accept(hub: &Hub, core: usize, peer: SocketAddr, now: Instant) -> Connection {
        let shim = hub.accept(core, peer, now);
        if hub.config().tls.as_ref().is_some_and(|t| !t.optional) {
            // The handshake deadline runs from now.
            shim.mark_tls(true);
        }
        Connection {
            shim,
            partial: Vec::new(),
            authed: false,
            accepted: now,
            wire: Wire::Undecided,
            plain: Vec::new(),
            out: None,
        }
    }

    /// Takes the bytes a read returned, at `now`: on a TLS connection, hands them to the
    /// session (queuing what the handshake answers) and returns the plaintext they
    /// carried. The first bytes of a connection on a TLS port decide whether it speaks TLS
    /// (a TLS record starts with 0x16, which no opcode has).
    pub fn receive(&mut self, hub: &Hub, wire: &[u8], now: Instant) -> Input {
        if !self.shim.outbox.is_open() {
            // Closing or closed: `on_bytes` ends the read without handling anything.
            return Input::Plain;
        }
        if self.wire == Wire::Undecided && !wire.is_empty() {
            let settings = hub.config().tls.clone();
            match settings {
                Some(t) if wire[0] == tls::HANDSHAKE_RECORD => match tls::Session::new(&t) {
                    Ok(session) => {
                        self.shim.outbox.start_tls(session);
                        self.shim.mark_tls(true);
                        self.wire = Wire::Tls;
                    }
                    Err(e) => return self.tls_failed(hub, &e, now),
                },
                None if wire[0] == tls::HANDSHAKE_RECORD => {
                    let r = Reject::TlsNotServed;
                    hub.metrics.reject(&r);
                    debug!(conn = self.shim.serial, "tls client on a port without tls");
                    hub.send_last(&self.shim, CloseReason::TlsFailed, &r.frame());
                    return Input::Close(CloseReason::TlsFailed);
                }
                Some(t) if !t.optional => {
                    hub.refused_for(
                        self.shim.peer.ip(),
                        Refusal::TlsRequired,
                        "a plaintext client",
                        now,
                    );
                    let r = Reject::TlsRequired;
                    hub.send_last(&self.shim, CloseReason::TlsRequired, &r.frame());
                    return Input::Close(CloseReason::TlsRequired);
                }
                // TLS optional, or turned off by a reload since the accept.
                _ => {
                    self.wire = Wire::Plain;
                    self.shim.mark_tls(false);
                }
            }
        }
        if self.wire != Wire::Tls {
            return Input::Plain;
        }
        let mut plain = std::mem::take(&mut self.plain);
        let mut ready = None;
        let (res, flush) = self
            .shim
            .outbox
            .receive_tls(wire, &mut plain, |s| ready = Some(s.established()));
        if flush {
            fx(&mut self.out).flush.push(self.shim.clone());
        }
        if let Err(e) = res {
            // The alert is queued: the writer sends it, then shuts the socket down.
            return self.tls_failed(hub, &e, now);
        }
        if let Some(est) = ready
            && let Err(reason) = self.established(hub, est, now)
        {
            return Input::Close(reason);
        }
        Input::Decrypted(plain)
    }

    /// Gives back the buffer [`Input::Decrypted`] handed out, for the next read.
    pub fn give_back(&mut self, mut plain: Vec<u8>) {
        plain.clear();
        if plain.capacity() <= PLAIN_KEPT {
            self.plain = plain;
        }
    }

    fn tls_failed(&mut self, hub: &Hub, e: &rustls::Error, now: Instant) -> Input {
        if self.shim.is_sealed() {
            // After the handshake: a broken or altered record, not a refused client.
            hub.metrics
                .error(crate::proto::reject::ErrorKind::TlsRecord);
        } else {
            hub.refused_for(
                self.shim.peer.ip(),
                Refusal::TlsHandshake,
                &e.to_string(),
                now,
            );
        }
        debug!(conn = self.shim.serial, error = %e, "tls failed");
        self.shim.outbox.close(CloseReason::TlsFailed, &[]);
        Input::Close(CloseReason::TlsFailed)
    }

    /// The handshake finished: the sealed UDP keys, and the user a client certificate
    /// names.
    fn established(
        &mut self,
        hub: &Hub,
        est: tls::Established,
        now: Instant,
    ) -> Result<(), CloseReason> {
        Counters::bump(&hub.counters().tls_established);
        let keys = Keys::from_exporter(&est.exporter);
        let _ = self.shim.sealed.set(Box::new(SealedUdp::new(keys)));
        let Some(cert) = est.client_cert else {
            return Ok(());
        };
        // The certificate was verified against tls_client_ca: it is a credential.
        let c = hub.config();
        if c.users.is_empty() {
            self.authed = true;
            return Ok(());
        }
        let name = tls::certificate_name(&cert);
        match name.as_deref().and_then(|n| c.users.get(n)) {
            Some(user) => {
                self.authed = true;
                self.shim.set_user(Some(user.clone()));
                Ok(())
            }
            None => {
                hub.refused(self.shim.peer.ip(), Refusal::Auth, now);
                let r = Reject::CertificateUser(tls::printable(
                    name.as_deref().unwrap_or("(none, or more than one)"),
                ));
                hub.send_last(&self.shim, CloseReason::CertificateUser, &r.frame());
                Err(CloseReason::CertificateUser)
            }
        }
    }

    /// The shim this connection serves.
    pub fn shim(&self) -> &Arc<Shim> {
        &self.shim
    }

    /// What the last slice produced: outboxes to flush (this one's included), datagrams.
    pub fn effects(&mut self) -> &mut Effects {
        fx(&mut self.out)
    }

    /// The connection has no input in hand: what carrying it out needed is given back.
    pub fn rest(&mut self) {
        if self.out.as_ref().is_some_and(|o| o.is_empty()) {
            self.out = None;
        }
    }

    /// Handles one slice of `data` (bytes read from the socket) at `now`. Returns what to
    /// do next and how many bytes were taken: fewer than `data.len()` when the slice is
    /// full, in which case the driver carries out [`Connection::effects`] and calls again
    /// with the rest. An unfinished frame at the end is kept; bytes after a close are not
    /// handled.
    pub fn on_bytes(&mut self, hub: &Hub, data: &[u8], now: Instant) -> (Flow, usize) {
        let done = self.slice(hub, data, now);
        // The relay state this slice changed goes out with it.
        if let Some(out) = self.out.as_mut() {
            hub.deliver_state(out);
        }
        done
    }

    fn slice(&mut self, hub: &Hub, data: &[u8], now: Instant) -> (Flow, usize) {
        if !self.shim.outbox.is_open() || self.shim.is_closed() {
            // Cut off, closing, or expired by a timer while these bytes were on their way
            // in: none of them is handled (an Identify here would put a removed shim back
            // into the table and the router with nobody left to take it out).
            let reason = self.shim.outbox.settle_reason(CloseReason::Eof);
            return (Flow::Close(reason), data.len());
        }
        let now_ms = hub.ms(now);
        fx(&mut self.out).begin(hub, now_ms);
        if hub.handoff.is_active() {
            fx(&mut self.out).core = self.shim.core as usize;
        }
        if hub.cluster().is_some() {
            // A claim's time, for the race rule of a cluster.
            fx(&mut self.out).now_unix_us = hub.unix_us_at(now);
        }
        self.shim.touch(now_ms);
        let max = hub.config().max_frame;
        let mut used = 0;
        let mut frames = 0;
        if !self.partial.is_empty() {
            let room = max.saturating_sub(self.partial.len()).min(data.len());
            match memchr::memchr(NEWLINE, &data[..room]) {
                None if self.partial.len() + data.len() >= max => {
                    return (self.oversized(hub, max), data.len());
                }
                None => {
                    self.partial.extend_from_slice(data);
                    return (Flow::Continue, data.len());
                }
                Some(i) => {
                    let mut buf = std::mem::take(&mut self.partial);
                    buf.extend_from_slice(&data[..=i]);
                    used = i + 1;
                    frames = 1;
                    if let Ok(Some((frame, _))) = codec::decode(&buf, max) {
                        let flow = self.on_frame(hub, frame);
                        if flow != Flow::Continue {
                            return (flow, data.len());
                        }
                    }
                }
            }
        }
        loop {
            if frames >= SLICE_FRAMES || fx(&mut self.out).slice_full() {
                return (Flow::Continue, used);
            }
            if !self.shim.outbox.is_open() {
                let reason = self.shim.outbox.settle_reason(CloseReason::Eof);
                return (Flow::Close(reason), data.len());
            }
            match codec::decode(&data[used..], max) {
                Ok(Some((frame, n))) => {
                    used += n;
                    frames += 1;
                    let flow = self.on_frame(hub, frame);
                    if flow != Flow::Continue {
                        return (flow, data.len());
                    }
                }
                Ok(None) => {
                    // Exactly the tail, so a burst leaves no large buffer behind.
                    self.partial = data[used..].to_vec();
                    return (Flow::Continue, data.len());
                }
                Err(CodecError::TooLong { .. }) | Err(CodecError::NotOneFrame) => {
                    return (self.oversized(hub, max), data.len());
                }
            }
        }
    }

    fn oversized(&mut self, hub: &Hub, max: usize) -> Flow {
        debug!(conn = self.shim.serial, "oversized frame");
        let r = Reject::TooLong(max);
        hub.metrics.reject(&r);
        hub.send_last(&self.shim, CloseReason::Oversized, &r.frame());
        self.partial = Vec::new();
        Flow::Close(CloseReason::Oversized)
    }

    fn refuse(&mut self, hub: &Hub, r: Reject) {
        hub.refuse(&self.shim, Route::Reply(Via::Tcp), &r, fx(&mut self.out));
    }

    /// Refuses the connection for a missing or wrong secret: an Error frame, then close.
    /// (Or for a credential a reload revoked between Auth and Identify.)
    fn refuse_auth(&mut self, hub: &Hub, r: Reject) -> Flow {
        let now = hub.instant(fx(&mut self.out).now_ms);
        let (why, reason) = match r {
            Reject::Revoked(w) => (Refusal::Revoked, CloseReason::Revoked(w)),
            _ => (Refusal::Auth, CloseReason::AuthFailed),
        };
        hub.refused(self.shim.peer.ip(), why, now);
        hub.send_last(&self.shim, reason, &r.frame());
        Flow::Close(reason)
    }

    fn on_frame(&mut self, hub: &Hub, frame: Frame<'_>) -> Flow {
        hub.received(&self.shim, Transport::Tcp, frame.op, frame.data.len() + 2);
        let Some(op) = frame.opcode() else {
            self.refuse(hub, Reject::UnknownOpcode(frame.op));
            return Flow::Continue;
        };
        let identified = self.shim.is_identified();
        if !identified && !allowed_before_identify(op) {
            self.refuse(hub, Reject::IdentifyFirst);
            return Flow::Continue;
        }
        // The credential guards the first Identify; a rename is the same session (and is
        // checked against the same user).
        if op == Opcode::Identify && !identified && !self.authed && hub.config().requires_auth() {
            return self.refuse_auth(hub, Reject::AuthRequired);
        }
        let request = match Request::parse(op, frame.data) {
            Ok(Request::Bind(_)) => Err(Reject::ServerOnly(Opcode::Session)),
            other => other,
        };
        match request {
            Err(r) => self.refuse(hub, r),
            Ok(Request::Nothing | Request::Pong | Request::Bind(_)) => {}
            Ok(Request::Quit) => {
                self.shim.outbox.close(CloseReason::Quit, &[]);
                return Flow::Close(CloseReason::Quit);
            }
            Ok(Request::Ping(data)) => {
                let mut f = Vec::with_capacity(data.len() + 2);
                reply::pong(data, &mut f);
                hub.send(
                    &self.shim,
                    Route::Reply(Via::Tcp),
                    &Bytes::from(f),
                    fx(&mut self.out),
                );
            }
            Ok(Request::Auth(data)) => match hub.authenticate(data) {
                // Without credentials the frame is ignored (and proves nothing, should a
                // reload add some before this connection identifies).
                Auth::Ignored => {}
                Auth::Failed => return self.refuse_auth(hub, Reject::AuthFailed),
                // Before the first Identify the last valid Auth counts; after it, the
                // session keeps the user it identified with.
                Auth::Granted(user) if !identified => {
                    self.authed = true;
                    self.shim.set_user(user);
                }
                Auth::Granted(_) => {}
            },
            Ok(Request::Identify(label)) => {
                match hub.identify(&self.shim, label, fx(&mut self.out)) {
                    Ok(Identified::Registered) => {
                        fx(&mut self.out).time(Latency::Handshake, self.accepted)
                    }
                    Ok(_) => {}
                    // The credential it presented is gone (a reload between Auth and
                    // Identify): refused as a wrong one would have been.
                    Err(r @ (Reject::AuthRequired | Reject::Revoked(_))) => {
                        return self.refuse_auth(hub, r);
                    }
                    Err(r) => {
                        hub.log_refusal(&self.shim, &r, fx(&mut self.out).now_ms);
                        self.refuse(hub, r);
                    }
                }
            }
            Ok(Request::Route(r)) => hub.fan_out(&self.shim, &r, Via::Tcp, fx(&mut self.out)),
            Ok(Request::Respond { id, id_text, text }) => {
                hub.respond(&self.shim, id, id_text, text, Via::Tcp, fx(&mut self.out))
            }
            Ok(Request::Who(target)) => hub.who(&self.shim, &target, Via::Tcp, fx(&mut self.out)),
            Ok(Request::Set(items)) => {
                hub.set_state(&self.shim, &items, Via::Tcp, fx(&mut self.out))
            }
            Ok(Request::Subscribe(s)) => hub.subscribe(&self.shim, &s, fx(&mut self.out)),
            Ok(Request::Unsubscribe(sid)) => hub.unsubscribe(&self.shim, sid, fx(&mut self.out)),
            Ok(Request::Get { target, keys }) => {
                hub.get_state(&self.shim, &target, &keys, fx(&mut self.out))
            }
        }
        Flow::Continue
    }

    /// Ends the connection: removes the shim from the table, the router and its UDP
    /// binding, logs the close line, and returns the reason that stands (the first one
    /// recorded by anybody: a timer, a slow-consumer cut, the reader).
    pub fn finish(&self, hub: &Hub, reason: CloseReason) -> CloseReason {
        let reason = self.shim.outbox.settle_reason(reason);
        // Make sure the writer stops, whatever the reader saw.
        self.shim.outbox.close(reason, &[]);
        hub.remove(&self.shim, reason);
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hub::outbox::OutState;
    use crate::proto::pattern::Pattern;

    /// Feeds all of `data`, slice after slice, as the driver does.
    fn feed(c: &mut Connection, h: &Hub, data: &[u8], now: Instant) -> Flow {
        let mut off = 0;
        loop {
            let (flow, used) = c.on_bytes(h, &data[off..], now);
            off += used;
            h.finish(0, c.effects(), now);
            if flow != Flow::Continue || off >= data.len() {
                return flow;
            }
        }
    }
    use std::time::Duration;

    fn hub() -> Arc<Hub> {
        Hub::new(Config {
            max_frame: 64,
            identify_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(1000),
            ..Config::default()
        })
    }

    fn out(c: &Connection) -> Vec<u8> {
        let mut v = Vec::new();
        c.shim().outbox.take(&mut v);
        c.shim().outbox.wrote(0);
        v
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    #[test]
    fn identify_gets_a_session_and_rename_gets_nothing() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        assert_eq!(
            feed(&mut c, &h, b"\x01peq.ecommons.bob\n", now),
            Flow::Continue
        );
        let o = out(&c);
        assert_eq!((o[0], o[17]), (0x02, 0x0A));
        assert_eq!(&o[1..17], &c.shim().token.0);
        // The Terms follow in the same write.
        let mut terms = Vec::new();
        crate::proto::reply::terms(&h.terms_for(c.shim()), &mut terms);
        assert_eq!(&o[18..], &terms[..]);
        assert!(h.table.by_token(&c.shim().token).is_some());
        feed(&mut c, &h, b"\x01peq.ecommons.bobby\n", now);
        assert!(out(&c).is_empty());
        assert_eq!(&*c.shim().identity(), "peq.ecommons.bobby");
    }

    #[test]
    fn a_long_read_is_handled_in_slices_and_leaves_no_large_buffer() {
        let h = Hub::new(Config {
            routed_per_sec: 0,
            deliveries_per_sec: 0,
            ..Config::default()
        });
        let now = Instant::now();
        let mut bob = Connection::accept(&h, 0, peer(), now);
        feed(&mut bob, &h, b"\x01a.bob\n", now);
        let mut al = Connection::accept(&h, 0, peer(), now);
        feed(&mut al, &h, b"\x01a.al\n", now);
        out(&al);
        let one = b"\x08a.bob x\n";
        let burst: Vec<u8> = one.repeat(3000);
        let (flow, used) = al.on_bytes(&h, &burst, now);
        assert_eq!((flow, used), (Flow::Continue, SLICE_FRAMES * one.len()));
        // The rest, with an unfinished frame at the end: only that tail is kept.
        let mut rest = burst[used..].to_vec();
        rest.extend_from_slice(b"\x06ab");
        assert_eq!(feed(&mut al, &h, &rest, now), Flow::Continue);
        assert_eq!(al.partial.capacity(), 3);
        let mut terms = Vec::new();
        crate::proto::reply::terms(&h.terms_for(bob.shim()), &mut terms);
        assert_eq!(
            out(&bob).len(),
            3000 * b"\x08a.al x\n".len() + 18 + terms.len()
        );
        feed(&mut al, &h, b"c\n", now);
        assert!(
            al.partial.capacity() == 0,
            "the joined frame's buffer is given back"
        );
    }

    #[test]
    fn crlf_frames_and_nothing_after_a_close() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        feed(&mut c, &h, b"\x01peq.z.bob\r\n\x06hi\r\n", now);
        assert_eq!(&*c.shim().identity(), "peq.z.bob");
        assert!(out(&c).ends_with(b"\x07hi\n"));
        assert_eq!(
            feed(&mut c, &h, b"\x03\n\x01peq.z.other\n", now),
            Flow::Close(CloseReason::Quit)
        );
        assert_eq!(
            &*c.shim().identity(),
            "peq.z.bob",
            "input after Quit is not handled"
        );
    }

    #[test]
    fn frames_split_across_reads_are_joined() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        feed(&mut c, &h, b"\x06ab", now);
        assert!(out(&c).is_empty());
        feed(&mut c, &h, b"c\n\x06", now);
        assert_eq!(out(&c), b"\x07abc\n");
        feed(&mut c, &h, b"d\n", now);
        assert_eq!(out(&c), b"\x07d\n");
    }

    #[test]
    fn before_identify_only_identify_ping_quit() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        feed(&mut c, &h, b"\x08x hi\n", now);
        assert_eq!(out(&c), b"\x09identify first\n");
        feed(&mut c, &h, b"\x01bad name\n", now);
        assert!(out(&c).starts_with(b"\x09identity byte 0x20 at 3: only ASCII"));
        assert_eq!(
            feed(&mut c, &h, b"\x03\n", now),
            Flow::Close(CloseReason::Quit)
        );
    }

    #[test]
    fn unknown_opcode_keeps_the_connection() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        assert_eq!(feed(&mut c, &h, b"\x42zz\n\x06p\n", now), Flow::Continue);
        assert_eq!(out(&c), b"\x09unknown opcode 0x42\n\x07p\n");
    }

    #[test]
    fn oversized_frame_closes_with_an_error() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        let big = vec![b'x'; 100];
        assert_eq!(
            feed(&mut c, &h, &big, now),
            Flow::Close(CloseReason::Oversized)
        );
        let mut v = Vec::new();
        assert_eq!(c.shim().outbox.take(&mut v), OutState::Closing);
        assert!(v.starts_with(b"\x09frame longer than 64 bytes"));
    }

    #[test]
    fn timers_fire_without_input() {
        let h = hub();
        let t0 = Instant::now();
        let c = Connection::accept(&h, 0, peer(), t0);
        assert!(!h.check_timers(c.shim(), t0 + Duration::from_millis(50)));
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(150)));
        assert_eq!(c.shim().outbox.reason(), Some(CloseReason::IdentifyTimeout));
        assert_eq!(out(&c), b"\x09identify timeout\n");

        let mut c = Connection::accept(&h, 0, peer(), t0);
        feed(&mut c, &h, b"\x01a\n", t0);
        out(&c);
        assert!(!h.check_timers(c.shim(), t0 + Duration::from_millis(500)));
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(1000)));
        assert_eq!(
            out(&c),
            crate::proto::reject::closing("idle timeout: nothing received for 1s")
        );
    }

    #[test]
    fn input_after_a_timer_closed_the_connection_is_ignored() {
        let h = hub();
        let t0 = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), t0);
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(150)));
        assert_eq!(
            feed(&mut c, &h, b"\x01late\n", t0 + Duration::from_millis(151)),
            Flow::Close(CloseReason::IdentifyTimeout)
        );
        assert!(h.table.is_empty());
        let mut c = Connection::accept(&h, 0, peer(), t0);
        feed(&mut c, &h, b"\x01a.b\n", t0);
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(1000)));
        feed(&mut c, &h, b"\x01c.d\n", t0 + Duration::from_millis(1001));
        let mut n = 0;
        h.router.for_each_match(&Pattern::all(), |_| n += 1);
        assert_eq!((n, h.table.len()), (0, 0));
    }

    #[test]
    fn finish_removes_everything() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        feed(&mut c, &h, b"\x01a.b\n", now);
        let tok = c.shim().token;
        h.table.bind_udp(c.shim(), "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.finish(&h, CloseReason::Eof), CloseReason::Eof);
        assert!(h.table.by_token(&tok).is_none());
        assert!(h.table.by_udp(&"127.0.0.1:9".parse().unwrap()).is_none());
        let mut n = 0;
        h.router.for_each_match(&Pattern::all(), |_| n += 1);
        assert_eq!(n, 0);
    }
}

/// TLS through the connection's state machine, with a rustls client on the other end and
/// no socket: the records the outbox would write go straight to the client.
#[cfg(test)]
mod tls_tests {
    use super::*;
    use crate::config::Config;
    use crate::hub::outbox::OutState;
    use crate::proto::sealed::{EXPORTER_LABEL, EXPORTER_LEN};
    use crate::tls::TlsSettings;
    use rustls::pki_types::ServerName;
    use std::io::{Read, Write};

    fn settings(dir: &std::path::Path, optional: bool) -> (Arc<TlsSettings>, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let t = TlsSettings::load(&cert, &key, None, optional).unwrap();
        (Arc::new(t), ck.cert.der().to_vec())
    }

    fn client(cert_der: Vec<u8>) -> rustls::ClientConnection {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der.into()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("localhost").unwrap();
        rustls::ClientConnection::new(Arc::new(cfg), name).unwrap()
    }

    /// The records the connection queued for its socket.
    fn wire(c: &Connection) -> Vec<u8> {
        let mut out = Vec::new();
        c.shim().outbox.take(&mut out);
        c.shim().outbox.wrote(0);
        out
    }

    /// Hands the client's pending records to the connection, then its answer back.
    fn exchange(cl: &mut rustls::ClientConnection, c: &mut Connection, h: &Hub) -> Vec<u8> {
        let mut sent = Vec::new();
        while cl.wants_write() {
            cl.write_tls(&mut sent).unwrap();
        }
        let now = Instant::now();
        let mut plain = Vec::new();
        match c.receive(h, &sent, now) {
            Input::Decrypted(p) => {
                let mut off = 0;
                while off < p.len() {
                    let (_, used) = c.on_bytes(h, &p[off..], now);
                    off += used;
                }
                c.give_back(p);
            }
            other => panic!("unexpected {other:?}"),
        }
        h.finish(0, c.effects(), now);
        let back = wire(c);
        cl.read_tls(&mut &back[..]).unwrap();
        cl.process_new_packets().unwrap();
        let _ = cl.reader().read_to_end(&mut plain);
        plain
    }

    #[test]
    fn a_session_over_tls_shares_the_sealed_keys() {
        let dir = std::env::temp_dir().join(format!("velium-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (t, der) = settings(&dir, false);
        let hub = Hub::new(Config {
            tls: Some(t),
            ..Config::default()
        });
        let mut conn = Connection::accept(&hub, 0, "127.0.0.1:9".parse().unwrap(), Instant::now());
        assert!(
            conn.shim().is_tls(),
            "the handshake deadline runs from the accept"
        );
        let mut cl = client(der);
        while cl.is_handshaking() {
            exchange(&mut cl, &mut conn, &hub);
        }
        assert!(
            !conn.shim().is_sealed(),
            "the client's Finished is still to come"
        );
        cl.writer().write_all(b"\x01peq.z.bob\n\x06x\n").unwrap();
        let got = exchange(&mut cl, &mut conn, &hub);
        assert!(conn.shim().is_sealed());
        assert_eq!(got[0], 0x02, "Session");
        assert!(got.ends_with(b"\x07x\n"), "then the Pong: {got:?}");
        let mut x = [0u8; EXPORTER_LEN];
        cl.export_keying_material(&mut x, EXPORTER_LABEL, None)
            .unwrap();
        let keys = Keys::from_exporter(&x);
        assert_eq!(conn.shim().sealed.get().unwrap().session, keys.session);
        // Sealed by the client, opened by the hub's key for that direction.
        let mut d = Vec::new();
        keys.client.seal(keys.session, 0, b"\x06u\n", &mut d);
        assert_eq!(
            conn.shim().sealed.get().unwrap().open.open(&mut d).unwrap(),
            b"\x06u\n"
        );
        // A close queues the last frame, then close_notify.
        hub.send_last(conn.shim(), CloseReason::Quit, &crate::proto::QUIT);
        let mut out = Vec::new();
        assert_eq!(conn.shim().outbox.take(&mut out), OutState::Closing);
        cl.read_tls(&mut &out[..]).unwrap();
        let st = cl.process_new_packets().unwrap();
        assert!(st.peer_has_closed());
        let mut quit = Vec::new();
        let _ = cl.reader().read_to_end(&mut quit);
        assert_eq!(quit, crate::proto::QUIT);
    }

    #[test]
    fn plaintext_is_refused_on_a_tls_port_and_served_when_optional() {
        let dir = std::env::temp_dir().join(format!("velium-tls-unit2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for optional in [false, true] {
            let (t, _) = settings(&dir, optional);
            let hub = Hub::new(Config {
                tls: Some(t),
                ..Config::default()
            });
            let peer = "127.0.0.1:9".parse().unwrap();
            let mut conn = Connection::accept(&hub, 0, peer, Instant::now());
            let input = conn.receive(&hub, b"\x01peq.z.bob\n", Instant::now());
            if optional {
                assert!(matches!(input, Input::Plain));
                assert!(!conn.shim().is_tls());
            } else {
                assert!(matches!(input, Input::Close(CloseReason::TlsRequired)));
                let mut out = Vec::new();
                conn.shim().outbox.take(&mut out);
                assert_eq!(out, b"\x09this port requires TLS\n");
            }
        }
    }

    #[test]
    fn a_reload_to_optional_tls_leaves_a_plaintext_client_no_handshake_deadline() {
        let dir = std::env::temp_dir().join(format!("velium-tls-unit4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (strict, _) = settings(&dir, false);
        let hub = Hub::new(Config {
            tls: Some(strict),
            ..Config::default()
        });
        let peer = "127.0.0.1:9".parse().unwrap();
        let mut conn = Connection::accept(&hub, 0, peer, Instant::now());
        assert!(conn.shim().is_tls());
        let (optional, _) = settings(&dir, true);
        hub.reload(Config {
            tls: Some(optional),
            ..Config::default()
        });
        let input = conn.receive(&hub, b"\x01peq.z.bob\n", Instant::now());
        assert!(matches!(input, Input::Plain));
        assert!(
            !conn.shim().is_tls(),
            "no handshake deadline, plain UDP allowed"
        );
    }

    #[test]
    fn a_tls_client_on_a_plaintext_port_is_told_and_closed() {
        let hub = Hub::new(Config::default());
        let peer = "127.0.0.1:9".parse().unwrap();
        let mut conn = Connection::accept(&hub, 0, peer, Instant::now());
        let input = conn.receive(&hub, b"\x16\x03\x01\x00\x05hello", Instant::now());
        assert!(matches!(input, Input::Close(CloseReason::TlsFailed)));
        let mut out = Vec::new();
        conn.shim().outbox.take(&mut out);
        assert_eq!(out, b"\x09this port does not speak TLS\n");
        // Later input starting with the same byte is an unknown opcode as ever.
        let mut conn = Connection::accept(&hub, 0, peer, Instant::now());
        assert!(matches!(
            conn.receive(&hub, b"\x06a\n", Instant::now()),
            Input::Plain
        ));
        assert!(matches!(
            conn.receive(&hub, b"\x16\n", Instant::now()),
            Input::Plain
        ));
    }

    #[test]
    fn a_certificate_name_is_printable_in_an_error() {
        assert_eq!(crate::tls::printable("x\n\x02AB"), "x??AB");
        assert_eq!(crate::tls::printable(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn garbage_after_the_record_byte_fails_the_handshake() {
        let dir = std::env::temp_dir().join(format!("velium-tls-unit3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (t, _) = settings(&dir, false);
        let hub = Hub::new(Config {
            tls: Some(t),
            ..Config::default()
        });
        let peer = "127.0.0.1:9".parse().unwrap();
        let mut conn = Connection::accept(&hub, 0, peer, Instant::now());
        let input = conn.receive(&hub, b"\x16\x03\x01\x00\x05hello", Instant::now());
        assert!(matches!(input, Input::Close(CloseReason::TlsFailed)));
        assert!(!conn.shim().outbox.is_open());
    }
}
