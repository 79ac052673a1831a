//! The per-connection session state machine (TCP side).
//!
//! A [`Connection`] takes the bytes a read returned and the time, and answers with what the
//! driver must do next; replies and deliveries are queued on outboxes. It does no I/O, so
//! every protocol rule is unit-tested here without a socket, and both drivers share it.

use crate::codec::{self, CodecError};
use crate::frame::{Frame, NEWLINE, Opcode, encode};
use crate::hub::{Hub, Identified, Outgoing, Via, check_identity};
use crate::metrics::{ErrorKind, Refusal, Transport};
use crate::shim::{CloseReason, Shim};
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

/// One TCP connection's protocol state.
pub struct Connection {
    shim: Arc<Shim>,
    /// Bytes of a frame that a read cut in two.
    partial: Vec<u8>,
    /// Whether the client presented the right shared secret.
    authed: bool,
    /// Set when the Session reply was queued, until the driver takes it (for the handshake
    /// latency histogram).
    session_queued: bool,
    /// What the frames handled so far produced for other shims: the driver flushes it
    /// after each batch ([`Connection::outgoing`]).
    out: Outgoing,
}

impl Connection {
    /// A connection just accepted from `peer` on `core`.
    pub fn accept(hub: &Hub, core: usize, peer: SocketAddr, now: Instant) -> Connection {
        Connection {
            shim: hub.accept(core, peer, now),
            partial: Vec::new(),
            authed: false,
            session_queued: false,
            out: Outgoing::default(),
        }
    }

    /// The shim this connection serves.
    pub fn shim(&self) -> &Arc<Shim> {
        &self.shim
    }

    /// The shims (this one included, when anything was queued for it) whose outboxes the
    /// driver must flush now that a batch was handled.
    pub fn outgoing(&mut self) -> &mut Outgoing {
        if self.shim.outbox.pending() > 0 {
            self.out.flush.push(self.shim.clone());
        }
        &mut self.out
    }

    /// True once after the Session reply was queued.
    pub fn take_session_queued(&mut self) -> bool {
        std::mem::take(&mut self.session_queued)
    }

    /// Handles bytes read from the socket.
    pub fn on_bytes(&mut self, hub: &Hub, data: &[u8], now: Instant) -> Flow {
        if self.shim.is_closed() {
            // A timer expired the connection while these bytes were on their way in: the
            // shim is already removed, and an Identify or rename here would put it back
            // into the table and the router with nobody left to take it out.
            let reason = self.shim.outbox.settle_reason(CloseReason::Eof);
            return Flow::Close(reason);
        }
        self.shim.touch(hub.ms(now));
        let max = hub.config().max_frame;
        if self.partial.is_empty() {
            let (flow, used) = self.on_frames(hub, data, max);
            if flow == Flow::Continue {
                self.partial.extend_from_slice(&data[used..]);
            }
            flow
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let (flow, used) = self.on_frames(hub, &buf, max);
            buf.drain(..used);
            if flow == Flow::Continue && !buf.is_empty() {
                self.partial = buf;
            }
            flow
        }
    }

    /// Handles every whole frame at the front of `buf`; returns how many bytes they took.
    fn on_frames(&mut self, hub: &Hub, buf: &[u8], max: usize) -> (Flow, usize) {
        let mut used = 0;
        loop {
            match codec::decode(&buf[used..], max) {
                Ok(Some((frame, n))) => {
                    used += n;
                    let flow = self.on_frame(hub, frame);
                    if flow != Flow::Continue {
                        return (flow, used);
                    }
                }
                Ok(None) => return (Flow::Continue, used),
                Err(e @ CodecError::TooLong { .. }) | Err(e @ CodecError::NotOneFrame) => {
                    hub.metrics.error(ErrorKind::Oversized);
                    debug!(conn = self.shim.serial, "oversized frame");
                    let mut f = Vec::new();
                    encode(Opcode::Error, e.to_string().as_bytes(), &mut f);
                    hub.close_with(&self.shim, CloseReason::Oversized, &f);
                    return (Flow::Close(CloseReason::Oversized), used);
                }
            }
        }
    }

    fn error(&self, hub: &Hub, kind: ErrorKind, msg: &str) {
        hub.metrics.error(kind);
        let mut f = Vec::with_capacity(msg.len() + 2);
        encode(Opcode::Error, msg.as_bytes(), &mut f);
        hub.queue(&self.shim, &f, hub.config().outbound_limit);
    }

    /// Refuses the connection for a missing or wrong secret: an Error frame, then close.
    fn refuse_auth(&self, hub: &Hub, msg: &str) -> Flow {
        hub.refused(self.shim.peer.ip(), Refusal::Auth, Instant::now());
        let mut f = Vec::with_capacity(msg.len() + 2);
        encode(Opcode::Error, msg.as_bytes(), &mut f);
        hub.close_with(&self.shim, CloseReason::AuthFailed, &f);
        Flow::Close(CloseReason::AuthFailed)
    }

    fn on_frame(&mut self, hub: &Hub, frame: Frame<'_>) -> Flow {
        hub.received(&self.shim, Transport::Tcp, frame.op, frame.data.len() + 2);
        let Some(op) = frame.opcode() else {
            let msg = format!("unknown opcode 0x{:02X}", frame.op);
            self.error(hub, ErrorKind::UnknownOpcode, &msg);
            return Flow::Continue;
        };
        match op {
            Opcode::None => {}
            Opcode::Quit => {
                self.shim.outbox.close(CloseReason::Quit, &[]);
                return Flow::Close(CloseReason::Quit);
            }
            Opcode::Ping => {
                let mut f = Vec::with_capacity(frame.data.len() + 2);
                encode(Opcode::Pong, frame.data, &mut f);
                hub.queue(&self.shim, &f, hub.config().outbound_limit);
            }
            Opcode::Auth => {
                // Without a secret the frame is ignored (and proves nothing, should a
                // reload add one before this connection identifies).
                if let Some(secret) = &hub.config().secret {
                    if !secret.verify(frame.data) {
                        return self.refuse_auth(hub, "authentication failed");
                    }
                    self.authed = true;
                }
            }
            // The secret guards the first Identify; a rename is the same session.
            Opcode::Identify
                if !self.authed && !self.shim.is_identified() && hub.config().secret.is_some() =>
            {
                return self.refuse_auth(hub, "authentication required");
            }
            Opcode::Identify => match check_identity(frame.data) {
                Ok(label) => {
                    if hub.identify(&self.shim, label) == Identified::Registered {
                        self.session_queued = true;
                    }
                }
                Err(why) => self.error(hub, ErrorKind::BadIdentity, why),
            },
            _ if !self.shim.is_identified() => {
                self.error(hub, ErrorKind::IdentifyFirst, "identify first")
            }
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse | Opcode::Who => {
                hub.route(&self.shim, op, frame.data, Via::Tcp, &mut self.out);
                debug_assert!(
                    self.out.datagrams.is_empty(),
                    "TCP input is answered over TCP"
                );
            }
            // A shim may answer a server Ping; nothing to do.
            Opcode::Pong => {}
            Opcode::Session | Opcode::Error | Opcode::Ack | Opcode::WhoEntry => self.error(
                hub,
                ErrorKind::WrongOpcode,
                &format!(
                    "opcode 0x{:02X} ({}) is sent by the server only",
                    frame.op,
                    op.name()
                ),
            ),
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
        hub.close(&self.shim, reason);
        reason
    }
}

/// The Quit frame.
pub const QUIT: [u8; 2] = [Opcode::Quit as u8, NEWLINE];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::shim::OutState;
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
            c.on_bytes(&h, b"\x01peq.ecommons.bob\n", now),
            Flow::Continue
        );
        let o = out(&c);
        assert_eq!(o.len(), 18);
        assert_eq!((o[0], o[17]), (0x02, 0x0A));
        assert_eq!(&o[1..17], &c.shim().token.0);
        assert!(c.take_session_queued());
        assert!(h.table.by_token(&c.shim().token).is_some());
        c.on_bytes(&h, b"\x01peq.ecommons.bobby\n", now);
        assert!(out(&c).is_empty());
        assert_eq!(&*c.shim().identity(), "peq.ecommons.bobby");
    }

    #[test]
    fn frames_split_across_reads_are_joined() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        c.on_bytes(&h, b"\x06ab", now);
        assert!(out(&c).is_empty());
        c.on_bytes(&h, b"c\n\x06", now);
        assert_eq!(out(&c), b"\x07abc\n");
        c.on_bytes(&h, b"d\n", now);
        assert_eq!(out(&c), b"\x07d\n");
    }

    #[test]
    fn before_identify_only_identify_ping_quit() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        c.on_bytes(&h, b"\x08x hi\n", now);
        assert_eq!(out(&c), b"\x09identify first\n");
        c.on_bytes(&h, b"\x01bad name\n", now);
        assert!(out(&c).starts_with(b"\x09identity holds"));
        assert_eq!(
            c.on_bytes(&h, b"\x03\n", now),
            Flow::Close(CloseReason::Quit)
        );
    }

    #[test]
    fn unknown_opcode_keeps_the_connection() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        assert_eq!(c.on_bytes(&h, b"\x42zz\n\x06p\n", now), Flow::Continue);
        assert_eq!(out(&c), b"\x09unknown opcode 0x42\n\x07p\n");
    }

    #[test]
    fn oversized_frame_closes_with_an_error() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        let big = vec![b'x'; 100];
        assert_eq!(
            c.on_bytes(&h, &big, now),
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
        c.on_bytes(&h, b"\x01a\n", t0);
        out(&c);
        assert!(!h.check_timers(c.shim(), t0 + Duration::from_millis(500)));
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(1000)));
        assert_eq!(out(&c), QUIT);
    }

    #[test]
    fn input_after_a_timer_closed_the_connection_is_ignored() {
        let h = hub();
        let t0 = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), t0);
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(150)));
        assert_eq!(
            c.on_bytes(&h, b"\x01late\n", t0 + Duration::from_millis(151)),
            Flow::Close(CloseReason::IdentifyTimeout)
        );
        assert!(h.table.is_empty());
        let mut c = Connection::accept(&h, 0, peer(), t0);
        c.on_bytes(&h, b"\x01a.b\n", t0);
        assert!(h.check_timers(c.shim(), t0 + Duration::from_millis(1000)));
        c.on_bytes(&h, b"\x01c.d\n", t0 + Duration::from_millis(1001));
        let mut n = 0;
        h.router
            .for_each_match(&crate::router::Pattern::all(), |_| n += 1);
        assert_eq!((n, h.table.len()), (0, 0));
    }

    #[test]
    fn finish_removes_everything() {
        let h = hub();
        let now = Instant::now();
        let mut c = Connection::accept(&h, 0, peer(), now);
        c.on_bytes(&h, b"\x01a.b\n", now);
        let tok = c.shim().token;
        h.table.bind_udp(c.shim(), "127.0.0.1:9".parse().unwrap());
        assert_eq!(c.finish(&h, CloseReason::Eof), CloseReason::Eof);
        assert!(h.table.by_token(&tok).is_none());
        assert!(h.table.by_udp(&"127.0.0.1:9".parse().unwrap()).is_none());
        let mut n = 0;
        h.router
            .for_each_match(&crate::router::Pattern::all(), |_| n += 1);
        assert_eq!(n, 0);
    }
}
