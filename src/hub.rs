//! The hub: state shared by every core (settings, session table, router, metrics) and the
//! operations that touch more than one shim: registering, renaming, closing, routing
//! Command / CommandResponse / Echo / Who, and the timers.
//!
//! No I/O happens here. Frames for a shim are appended to its [`Outbox`](crate::shim::Outbox)
//! and the shim is listed in an [`Outgoing`], with the datagrams to send; the driver
//! flushes and sends them once the batch that produced them is done.

use crate::config::Config;
use crate::frame::{Opcode, SP, encode, encode_parts};
use crate::metrics::{Counters, Metrics};
use crate::router::{Pattern, Router};
use crate::shim::{CloseReason, Pushed, Shim, serial_of_command_id};
use crate::table::Table;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};

/// The transport a frame arrived on; replies go back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The shim's TCP connection.
    Tcp,
    /// The shim's bound UDP channel, from this source address.
    Udp(SocketAddr),
}

/// What handling a batch of input produced, for the driver to carry out afterwards.
#[derive(Default, Debug)]
pub struct Outgoing {
    /// Datagrams to send from the listening UDP socket: (destination, one whole frame).
    pub datagrams: Vec<(SocketAddr, Bytes)>,
    /// Shims whose outbox went from empty to not empty: each is flushed once.
    pub flush: Vec<Arc<Shim>>,
}

/// What Identify did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identified {
    /// First Identify: the shim is registered and was sent its Session.
    Registered,
    /// Later Identify: renamed from the old label.
    Renamed(Arc<str>),
}

/// Why an identity label is refused.
pub fn check_identity(label: &[u8]) -> Result<&str, &'static str> {
    if label.is_empty() {
        return Err("identity is empty");
    }
    if label.len() > 64 {
        return Err("identity longer than 64 bytes");
    }
    let s = std::str::from_utf8(label).map_err(|_| "identity is not UTF-8")?;
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || is_invisible(c))
    {
        return Err("identity holds a space, control or invisible character");
    }
    Ok(s)
}

/// Format characters that print as nothing (zero-width spaces and joiners, direction
/// marks and overrides, the byte-order mark): two identities that differ only by them
/// would look the same in every log and listing.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// The shared state of one server.
pub struct Hub {
    /// Settings.
    pub config: Config,
    /// Identified shims and UDP bindings.
    pub table: Table,
    /// Identities for routing.
    pub router: Router,
    /// Counters and histograms.
    pub metrics: Metrics,
    epoch: Instant,
    next_serial: AtomicU64,
}

impl Hub {
    /// A hub with no shims.
    pub fn new(config: Config) -> Arc<Hub> {
        Arc::new(Hub {
            metrics: Metrics::new(config.cores),
            config,
            table: Table::default(),
            router: Router::default(),
            epoch: Instant::now(),
            next_serial: AtomicU64::new(1),
        })
    }

    /// `now` as milliseconds on the hub's clock (what [`Shim::last_seen_ms`] is kept in).
    pub fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.metrics.counters
    }

    /// A new, unidentified shim for a connection just accepted from `peer` on `core`.
    pub fn accept(&self, core: usize, peer: SocketAddr, now: Instant) -> Arc<Shim> {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Counters::bump(&self.counters().accepted);
        info!(conn = serial, core, %peer, "connect");
        Arc::new(Shim::new(serial, peer, self.ms(now), unix_ms))
    }

    /// Applies an Identify: registers the shim (queueing its Session) or renames it.
    pub fn identify(&self, shim: &Arc<Shim>, label: &str) -> Identified {
        let label: Arc<str> = Arc::from(label);
        if shim.is_identified() {
            let old = shim.set_identity(label.clone());
            self.router.rename(&old, &label, shim);
            info!(conn = shim.serial, old = %old, new = %label, "rename");
            return Identified::Renamed(old);
        }
        shim.set_identity(label.clone());
        // The Session goes into the outbox before the shim can be found: a frame routed to
        // it by another core must never reach the client ahead of its Session. (It is
        // queued on the shim's own outbox, which its connection flushes after each batch.)
        shim.outbox.push(self.config.outbound_limit, &{
            let mut f = Vec::with_capacity(18);
            encode(Opcode::Session, &shim.token.0, &mut f);
            f
        });
        shim.mark_identified();
        self.table.insert(shim);
        self.router.insert(&label, shim);
        Counters::bump(&self.counters().identified);
        info!(conn = shim.serial, identity = %label, token = %shim.token, "identify");
        Identified::Registered
    }

    /// Removes a shim whose connection ended, logging the close line. Only the first call
    /// for a shim does anything, so a timer and the connection's reader may both call it.
    pub fn close(&self, shim: &Shim, reason: CloseReason) {
        if !shim.mark_closed() {
            return;
        }
        if shim.is_identified() {
            self.table.remove(shim);
            self.router.remove(&shim.identity(), shim);
        }
        if reason == CloseReason::SlowConsumer {
            Counters::bump(&self.counters().slow_consumers);
            warn!(conn = shim.serial, identity = %shim.identity(), "slow consumer cut off");
        }
        info!(conn = shim.serial, identity = %shim.identity(), %reason, "close");
    }

    /// Which timer, if any, has run out for `shim` at `now`: the identify deadline
    /// (measured from accept) or the idle timeout (measured from the last frame received
    /// on TCP or UDP).
    pub fn expired(&self, shim: &Shim, now: Instant) -> Option<CloseReason> {
        let now_ms = self.ms(now);
        let identify = self.config.identify_timeout.as_millis() as u64;
        if !shim.is_identified() && now_ms.saturating_sub(shim.accepted_ms()) >= identify {
            return Some(CloseReason::IdentifyTimeout);
        }
        let idle = self.config.idle_timeout.as_millis() as u64;
        (now_ms.saturating_sub(shim.last_seen_ms()) >= idle).then_some(CloseReason::Idle)
    }

    /// Ends a connection whose timer ran out: queues its last frame (Error "identify
    /// timeout", or Quit when idle), asks the writer to flush and shut down, and removes the
    /// shim from routing at once.
    pub fn expire(&self, shim: &Shim, reason: CloseReason) {
        let mut f = Vec::new();
        match reason {
            CloseReason::IdentifyTimeout => encode(Opcode::Error, b"identify timeout", &mut f),
            _ => f.extend_from_slice(&crate::session::QUIT),
        }
        shim.outbox.close(reason, &f);
        self.close(shim, reason);
    }

    /// Checks both timers and expires the connection if one ran out; true if it did.
    pub fn check_timers(&self, shim: &Shim, now: Instant) -> bool {
        self.expired(shim, now)
            .map(|r| self.expire(shim, r))
            .is_some()
    }

    /// Begins a graceful shutdown: every identified shim is sent Quit and closed.
    pub fn shutdown(&self) {
        self.table
            .for_each(|s| s.outbox.close(CloseReason::Shutdown, &crate::session::QUIT));
    }

    /// Sends one frame to the sender of a request, on the transport it came in on.
    pub fn reply(&self, to: &Arc<Shim>, via: Via, frame: &[u8], out: &mut Outgoing) {
        match via {
            Via::Tcp => {
                self.push(to, frame, out);
            }
            Via::Udp(addr) => out.datagrams.push((addr, Bytes::copy_from_slice(frame))),
        }
    }

    /// Queues `frame` on `to`'s TCP connection (listing `to` for a flush); cuts `to` off
    /// if it is a slow consumer.
    fn push(&self, to: &Arc<Shim>, frame: &[u8], out: &mut Outgoing) -> bool {
        match to.outbox.push(self.config.outbound_limit, frame) {
            Pushed::Queued => true,
            Pushed::QueuedFirst => {
                out.flush.push(to.clone());
                true
            }
            Pushed::Closed => false,
            Pushed::SlowConsumer => {
                debug!(conn = to.serial, "outbound limit passed");
                false
            }
        }
    }

    /// Delivers a routed frame to one target: over its UDP channel when the frame came in
    /// over UDP and the target has one, else over TCP.
    fn deliver(&self, to: &Arc<Shim>, via: Via, frame: &Bytes, out: &mut Outgoing) -> bool {
        if let Via::Udp(_) = via
            && let Some(addr) = to.udp_addr()
        {
            out.datagrams.push((addr, frame.clone()));
            return true;
        }
        self.push(to, frame, out)
    }

    /// Sends an Error frame back to `to` on the transport its request came in on.
    pub fn error(&self, to: &Arc<Shim>, via: Via, msg: &str, out: &mut Outgoing) {
        Counters::bump(&self.counters().rejected);
        let mut f = Vec::with_capacity(msg.len() + 2);
        encode(Opcode::Error, msg.as_bytes(), &mut f);
        self.reply(to, via, &f, out);
    }

    /// Routes a Command, Echo, CommandResponse or Who from an identified `sender`.
    pub fn route(&self, sender: &Arc<Shim>, op: Opcode, data: &[u8], via: Via, out: &mut Outgoing) {
        match op {
            Opcode::Command | Opcode::Echo => self.fan_out(sender, op, data, via, out),
            Opcode::CommandResponse => self.respond(sender, data, via, out),
            Opcode::Who => self.who(sender, data, via, out),
            _ => unreachable!("route() takes routed opcodes only"),
        }
    }

    fn fan_out(&self, sender: &Arc<Shim>, op: Opcode, data: &[u8], via: Via, out: &mut Outgoing) {
        let Some(sp) = data.iter().position(|&b| b == SP) else {
            return self.error(sender, via, "expected: TARGET SP TEXT", out);
        };
        let (target, text) = (&data[..sp], &data[sp + 1..]);
        let pattern = match Pattern::parse(target) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("bad target {}: {e}", String::from_utf8_lossy(target));
                return self.error(sender, via, &msg, out);
            }
        };
        let identity = sender.identity();
        let mut id_buf = itoa_u64(0);
        let id = if op == Opcode::Command {
            let id = sender.next_command_id();
            id_buf = itoa_u64(id);
            Some(id)
        } else {
            None
        };
        let mut f = Vec::with_capacity(identity.len() + text.len() + 24);
        match id {
            Some(_) => encode_parts(
                op,
                &[identity.as_bytes(), b" ", id_buf.as_bytes(), b" ", text],
                &mut f,
            ),
            None => encode_parts(op, &[identity.as_bytes(), b" ", text], &mut f),
        }
        let frame = Bytes::from(f);
        let mut reached = 0u64;
        self.router.for_each_match(&pattern, |to| {
            if (pattern.include_self || to.serial != sender.serial)
                && self.deliver(to, via, &frame, out)
            {
                reached += 1;
            }
        });
        if reached == 0 {
            let msg = format!("no shim matches {}", String::from_utf8_lossy(target));
            return self.error(sender, via, &msg, out);
        }
        self.counters()
            .deliveries
            .fetch_add(reached, Ordering::Relaxed);
        let mut ack = Vec::with_capacity(24);
        encode_parts(
            Opcode::Ack,
            &[id_buf.as_bytes(), b" ", itoa_u64(reached).as_bytes()],
            &mut ack,
        );
        self.reply(sender, via, &ack, out);
    }

    fn respond(&self, responder: &Arc<Shim>, data: &[u8], via: Via, out: &mut Outgoing) {
        let (id_txt, text) = match data.iter().position(|&b| b == SP) {
            Some(sp) => (&data[..sp], &data[sp + 1..]),
            None => (data, &b""[..]),
        };
        let Some(id) = std::str::from_utf8(id_txt)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return self.error(responder, via, "expected: ID SP RESPONSE", out);
        };
        let Some(sender) = self.table.by_serial(serial_of_command_id(id)) else {
            Counters::bump(&self.counters().responses_dropped);
            debug!(id, "response for a sender that has gone");
            return;
        };
        let identity = responder.identity();
        let mut f = Vec::with_capacity(id_txt.len() + identity.len() + text.len() + 4);
        encode_parts(
            Opcode::CommandResponse,
            &[id_txt, b" ", identity.as_bytes(), b" ", text],
            &mut f,
        );
        if self.deliver(&sender, via, &Bytes::from(f), out) {
            Counters::bump(&self.counters().deliveries);
        } else {
            Counters::bump(&self.counters().responses_dropped);
        }
    }

    fn who(&self, sender: &Arc<Shim>, data: &[u8], via: Via, out: &mut Outgoing) {
        if via != Via::Tcp {
            return self.error(sender, via, "Who is answered over TCP only", out);
        }
        let pattern = if data.is_empty() {
            Pattern::all()
        } else {
            match Pattern::parse(data) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("bad pattern {}: {e}", String::from_utf8_lossy(data));
                    return self.error(sender, via, &msg, out);
                }
            }
        };
        let mut listing = Vec::new();
        let mut n = 0u64;
        self.router.for_each_match(&pattern, |s| {
            n += 1;
            let udp: &[u8] = if s.udp_addr().is_some() { b"udp" } else { b"-" };
            encode_parts(
                Opcode::WhoEntry,
                &[
                    s.identity().as_bytes(),
                    b" ",
                    itoa_u64(s.connected_unix_ms).as_bytes(),
                    b" ",
                    udp,
                ],
                &mut listing,
            );
        });
        encode_parts(Opcode::Ack, &[b"0 ", itoa_u64(n).as_bytes()], &mut listing);
        // One listing may be larger than the outbound limit in a big fleet; it is allowed
        // once, but a second one queued behind an unread first still cuts the shim off.
        let limit = self.config.outbound_limit.max(listing.len());
        match sender.outbox.push(limit, &listing) {
            Pushed::SlowConsumer => debug!(conn = sender.serial, "outbound limit passed"),
            Pushed::QueuedFirst => out.flush.push(sender.clone()),
            Pushed::Queued | Pushed::Closed => {}
        }
    }
}

fn itoa_u64(v: u64) -> String {
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_rules() {
        assert!(check_identity(b"peq.ecommons.bob").is_ok());
        assert!(check_identity("héros".as_bytes()).is_ok());
        assert!(check_identity(b"").is_err());
        assert!(check_identity(&[b'a'; 65]).is_err());
        assert!(check_identity(&[b'a'; 64]).is_ok());
        assert!(check_identity(b"two words").is_err());
        assert!(check_identity(b"tab\there").is_err());
        assert!(check_identity(b"nl\x0bhere").is_err());
        assert!(check_identity(b"\xff\xfe").is_err());
        assert!(check_identity("zero\u{200B}width".as_bytes()).is_err());
    }
}
