//! The hub: state shared by every core (settings, session table, router, metrics) and the
//! operations that touch more than one shim: registering, renaming, closing, routing
//! Command / CommandResponse / Echo / Who, and the timers.
//!
//! No I/O happens here. Frames for a shim are appended to its [`Outbox`](crate::shim::Outbox)
//! and the shim is listed in an [`Outgoing`], with the datagrams to send; the driver
//! flushes and sends them once the batch that produced them is done.

use crate::config::Config;
use crate::frame::{Opcode, SP, encode, encode_parts};
use crate::metrics::{Counters, Dir, ErrorKind, Metrics, Refusal, Transport};
use crate::router::{Pattern, Router};
use crate::shim::{CloseReason, Pushed, Shim, serial_of_command_id};
use crate::table::Table;
use arc_swap::{ArcSwap, Guard};
use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
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

/// Connection-limit state of one source IP.
struct Source {
    /// Connections open from it.
    open: u32,
    /// Connection attempts left in its bucket.
    tokens: u32,
    /// When the bucket was last refilled (hub milliseconds).
    refilled_ms: u64,
}

/// Sources tracked before idle ones are forgotten.
const SOURCES_PRUNE_AT: usize = 65_536;
/// How often one source's refusals are logged.
const REFUSAL_LOG_MS: u64 = 60_000;

/// The shared state of one server.
pub struct Hub {
    config: ArcSwap<Config>,
    /// Identified shims and UDP bindings.
    pub table: Table,
    /// Identities for routing.
    pub router: Router,
    /// Counters and histograms.
    pub metrics: Metrics,
    epoch: Instant,
    next_serial: AtomicU64,
    /// Open TCP connections (admitted, not yet ended).
    open: AtomicUsize,
    sources: DashMap<IpAddr, Source>,
    sources_pruned_ms: AtomicU64,
    /// When each refused source was last logged, so a flood is logged once a minute.
    refusals_logged: Mutex<HashMap<IpAddr, u64>>,
    /// The most connections the open-file limit leaves room for.
    fd_cap: usize,
    shutdown: watch::Sender<bool>,
}

impl Hub {
    /// A hub with no shims.
    pub fn new(config: Config) -> Arc<Hub> {
        Arc::new(Hub {
            metrics: Metrics::new(config.cores),
            config: ArcSwap::from_pointee(config),
            table: Table::default(),
            router: Router::default(),
            epoch: Instant::now(),
            next_serial: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            sources: DashMap::new(),
            sources_pruned_ms: AtomicU64::new(0),
            refusals_logged: Mutex::new(HashMap::new()),
            fd_cap: open_file_limit().saturating_sub(64).max(1),
            shutdown: watch::Sender::new(false),
        })
    }

    /// The settings in force (a reload may replace them at any time).
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// Applies reloaded settings: those that need a restart keep their running values.
    /// Returns the keys that changed and were applied, and those that need a restart.
    pub fn reload(&self, new: Config) -> (Vec<&'static str>, Vec<&'static str>) {
        let old = self.config.load_full();
        let (live, restart) = old.diff(&new);
        self.config.store(Arc::new(old.reloaded(new)));
        (live, restart)
    }

    /// The connection limit in force: `max_connections`, lowered to what the open-file
    /// limit leaves room for.
    pub fn max_connections(&self) -> usize {
        match self.config().max_connections {
            0 => self.fd_cap,
            n => n.min(self.fd_cap),
        }
    }

    /// Open TCP connections.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Decides whether a connection just accepted from `ip` may be served: the allowed
    /// networks, the total and per-source connection limits and the per-source attempt
    /// rate, in that order. An admitted connection must be [released](Hub::release) when
    /// it ends.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let c = self.config();
        let refused = |why| {
            self.refused(ip, why, now);
            Err(why)
        };
        if !c.allows(ip) {
            return refused(Refusal::AllowList);
        }
        if *self.shutdown.borrow() {
            return refused(Refusal::MaxConnections);
        }
        if self.open.load(Ordering::Relaxed) >= self.max_connections() {
            return refused(Refusal::MaxConnections);
        }
        let now_ms = self.ms(now);
        // Forget idle sources once there are many, at most once a second: with more
        // sources connected than the threshold, a scan per accept would cost O(sources).
        if self.sources.len() >= SOURCES_PRUNE_AT {
            let last = self.sources_pruned_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= 1000
                && self
                    .sources_pruned_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.sources
                    .retain(|_, s| s.open > 0 || now_ms.saturating_sub(s.refilled_ms) < 1000);
            }
        }
        let rate = c.connect_rate_per_source;
        let mut s = self.sources.entry(ip).or_insert(Source {
            open: 0,
            tokens: rate,
            refilled_ms: now_ms,
        });
        if rate > 0 {
            let refill = now_ms.saturating_sub(s.refilled_ms) * u64::from(rate) / 1000;
            if refill > 0 {
                s.tokens = (u64::from(s.tokens) + refill).min(u64::from(rate)) as u32;
                s.refilled_ms = now_ms;
            }
            if s.tokens == 0 {
                drop(s);
                return refused(Refusal::Rate);
            }
            s.tokens -= 1;
        }
        let per = c.max_connections_per_source;
        if per > 0 && s.open as usize >= per {
            drop(s);
            return refused(Refusal::PerSource);
        }
        s.open += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Ends an admitted connection from `ip`.
    pub fn release(&self, ip: IpAddr) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(mut s) = self.sources.get_mut(&ip) {
            s.open = s.open.saturating_sub(1);
        }
    }

    /// Counts a refusal and logs it, once a minute per source.
    pub fn refused(&self, ip: IpAddr, why: Refusal, now: Instant) {
        self.metrics.refuse(why);
        let now_ms = self.ms(now);
        let mut logged = self.refusals_logged.lock();
        if logged.len() >= SOURCES_PRUNE_AT {
            logged.retain(|_, t| now_ms.saturating_sub(*t) < REFUSAL_LOG_MS);
        }
        let last = logged.get(&ip).copied();
        if last.is_none_or(|t| now_ms.saturating_sub(t) >= REFUSAL_LOG_MS) {
            logged.insert(ip, now_ms);
            drop(logged);
            warn!(source = %ip, reason = why.label(), "refused (logged once a minute per source)");
        }
    }

    /// Whether a datagram from `src` may be handled; counts and logs it when not.
    pub fn admit_datagram(&self, src: SocketAddr, now: Instant) -> bool {
        if self.config().allows(src.ip()) {
            return true;
        }
        Counters::bump(&self.counters().datagrams_refused);
        self.refused(src.ip(), Refusal::AllowList, now);
        false
    }

    /// Starts a graceful shutdown: the cores stop accepting and send every connection
    /// Quit ([`Hub::shutdown_started`] wakes them).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once a graceful shutdown has begun.
    pub async fn shutdown_started(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Queues whole frame(s) on `to`'s TCP outbox, counting them as sent.
    pub(crate) fn queue(&self, to: &Shim, frame: &[u8], limit: usize) -> Pushed {
        let r = to.outbox.push(limit, frame);
        if matches!(r, Pushed::Queued | Pushed::QueuedFirst) {
            self.sent(to, Transport::Tcp, frame);
        }
        r
    }

    /// Closes `to`'s TCP outbox for `reason` after `last` (a final frame, or nothing).
    pub(crate) fn close_with(&self, to: &Shim, reason: CloseReason, last: &[u8]) {
        if !last.is_empty() {
            self.sent(to, Transport::Tcp, last);
        }
        to.outbox.close(reason, last);
    }

    /// Counts one frame sent to `to`.
    pub(crate) fn sent(&self, to: &Shim, t: Transport, frame: &[u8]) {
        to.frames_out.fetch_add(1, Ordering::Relaxed);
        self.metrics.frame(Dir::Out, t, frame[0], frame.len());
    }

    /// Counts one frame received from `from`.
    pub(crate) fn received(&self, from: &Shim, t: Transport, op: u8, len: usize) {
        from.frames_in.fetch_add(1, Ordering::Relaxed);
        self.metrics.frame(Dir::In, t, op, len);
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
        Arc::new(Shim::new(serial, core, peer, self.ms(now), unix_ms))
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
        let mut f = Vec::with_capacity(18);
        encode(Opcode::Session, &shim.token.0, &mut f);
        self.queue(shim, &f, usize::MAX);
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
        let c = self.config();
        let identify = c.identify_timeout.as_millis() as u64;
        if !shim.is_identified() && now_ms.saturating_sub(shim.accepted_ms()) >= identify {
            return Some(CloseReason::IdentifyTimeout);
        }
        let idle = c.idle_timeout.as_millis() as u64;
        (now_ms.saturating_sub(shim.last_seen_ms()) >= idle).then_some(CloseReason::Idle)
    }

    /// Ends a connection whose timer ran out: queues its last frame (Error "identify
    /// timeout", or Quit when idle), asks the writer to flush and shut down, and removes the
    /// shim from routing at once.
    pub fn expire(&self, shim: &Shim, reason: CloseReason) {
        let mut f = Vec::new();
        match reason {
            CloseReason::IdentifyTimeout => {
                self.metrics.error(ErrorKind::IdentifyTimeout);
                encode(Opcode::Error, b"identify timeout", &mut f)
            }
            _ => f.extend_from_slice(&crate::session::QUIT),
        }
        self.close_with(shim, reason, &f);
        self.close(shim, reason);
    }

    /// Checks both timers and expires the connection if one ran out; true if it did.
    pub fn check_timers(&self, shim: &Shim, now: Instant) -> bool {
        self.expired(shim, now)
            .map(|r| self.expire(shim, r))
            .is_some()
    }

    /// Sends one frame to the sender of a request, on the transport it came in on.
    pub fn reply(&self, to: &Arc<Shim>, via: Via, frame: &[u8], out: &mut Outgoing) {
        match via {
            Via::Tcp => {
                if self.push(to, frame, self.config().outbound_limit, out) {
                    (self.metrics).frame(Dir::Out, Transport::Tcp, frame[0], frame.len());
                }
            }
            Via::Udp(addr) => {
                to.frames_out.fetch_add(1, Ordering::Relaxed);
                out.datagrams.push((addr, Bytes::copy_from_slice(frame)))
            }
        }
    }

    /// Queues `frame` on `to`'s TCP connection (listing `to` for a flush); cuts `to` off
    /// if it is a slow consumer. Counts the frame on `to`, not in the traffic metrics: a
    /// fan-out counts those once for all its targets.
    fn push(&self, to: &Arc<Shim>, frame: &[u8], limit: usize, out: &mut Outgoing) -> bool {
        let pushed = to.outbox.push(limit, frame);
        if matches!(pushed, Pushed::Queued | Pushed::QueuedFirst) {
            to.frames_out.fetch_add(1, Ordering::Relaxed);
        }
        match pushed {
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
    /// over UDP and the target has one, else over TCP. Returns the transport used, if the
    /// frame was queued. (Datagrams are counted in the traffic metrics when sent.)
    fn deliver(
        &self,
        to: &Arc<Shim>,
        via: Via,
        frame: &Bytes,
        limit: usize,
        out: &mut Outgoing,
    ) -> Option<Transport> {
        if let Via::Udp(_) = via
            && let Some(addr) = to.udp_addr()
        {
            to.frames_out.fetch_add(1, Ordering::Relaxed);
            out.datagrams.push((addr, frame.clone()));
            return Some(Transport::Udp);
        }
        self.push(to, frame, limit, out).then_some(Transport::Tcp)
    }

    /// Sends an Error frame about `kind` back to `to` on the transport its request came
    /// in on.
    pub fn error(&self, to: &Arc<Shim>, via: Via, kind: ErrorKind, msg: &str, out: &mut Outgoing) {
        self.metrics.error(kind);
        self.error_frame(to, via, msg, out);
    }

    fn error_frame(&self, to: &Arc<Shim>, via: Via, msg: &str, out: &mut Outgoing) {
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
            return self.error(
                sender,
                via,
                ErrorKind::Malformed,
                "expected: TARGET SP TEXT",
                out,
            );
        };
        let (target, text) = (&data[..sp], &data[sp + 1..]);
        let pattern = match Pattern::parse(target) {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("bad target {}: {e}", String::from_utf8_lossy(target));
                return self.error(sender, via, ErrorKind::Malformed, &msg, out);
            }
        };
        let identity = sender.identity();
        if op == Opcode::Command && !self.config().may_command(&identity, &pattern) {
            self.metrics.refuse(Refusal::Permission);
            debug!(conn = sender.serial, identity = %identity, "command not permitted");
            let msg = format!("command not permitted: {}", String::from_utf8_lossy(target));
            return self.error_frame(sender, via, &msg, out);
        }
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
        let limit = self.config().outbound_limit;
        let (mut reached, mut over_tcp) = (0u64, 0u64);
        self.router.for_each_match(&pattern, |to| {
            if !pattern.include_self && to.serial == sender.serial {
                return;
            }
            match self.deliver(to, via, &frame, limit, out) {
                Some(Transport::Tcp) => (reached, over_tcp) = (reached + 1, over_tcp + 1),
                Some(Transport::Udp) => reached += 1,
                None => {}
            }
        });
        let bytes = over_tcp as usize * frame.len();
        (self.metrics).frames(Dir::Out, Transport::Tcp, op as u8, over_tcp, bytes);
        if reached == 0 {
            let msg = format!("no shim matches {}", String::from_utf8_lossy(target));
            return self.error(sender, via, ErrorKind::NoMatch, &msg, out);
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
            return self.error(
                responder,
                via,
                ErrorKind::Malformed,
                "expected: ID SP RESPONSE",
                out,
            );
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
        let limit = self.config().outbound_limit;
        let len = f.len();
        match self.deliver(&sender, via, &Bytes::from(f), limit, out) {
            Some(t) => {
                if t == Transport::Tcp {
                    let op = Opcode::CommandResponse as u8;
                    (self.metrics).frame(Dir::Out, Transport::Tcp, op, len);
                }
                Counters::bump(&self.counters().deliveries);
            }
            None => Counters::bump(&self.counters().responses_dropped),
        }
    }

    fn who(&self, sender: &Arc<Shim>, data: &[u8], via: Via, out: &mut Outgoing) {
        if via != Via::Tcp {
            let msg = "Who is answered over TCP only";
            return self.error(sender, via, ErrorKind::WrongOpcode, msg, out);
        }
        let pattern = if data.is_empty() {
            Pattern::all()
        } else {
            match Pattern::parse(data) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("bad pattern {}: {e}", String::from_utf8_lossy(data));
                    return self.error(sender, via, ErrorKind::Malformed, &msg, out);
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
        let entries_len = listing.len();
        encode_parts(Opcode::Ack, &[b"0 ", itoa_u64(n).as_bytes()], &mut listing);
        // One listing may be larger than the outbound limit in a big fleet; it is allowed
        // once, but a second one queued behind an unread first still cuts the shim off.
        let limit = self.config().outbound_limit.max(listing.len());
        match sender.outbox.push(limit, &listing) {
            Pushed::SlowConsumer => debug!(conn = sender.serial, "outbound limit passed"),
            Pushed::Closed => {}
            queued => {
                let op = Opcode::WhoEntry as u8;
                (self.metrics).frames(Dir::Out, Transport::Tcp, op, n, entries_len);
                self.sent(sender, Transport::Tcp, &listing[entries_len..]);
                sender.frames_out.fetch_add(n, Ordering::Relaxed);
                if queued == Pushed::QueuedFirst {
                    out.flush.push(sender.clone());
                }
            }
        }
    }
}

fn itoa_u64(v: u64) -> String {
    v.to_string()
}

/// The soft open-file limit of this process.
fn open_file_limit() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    usize::try_from(r.rlim_cur).unwrap_or(usize::MAX)
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

    #[test]
    fn admission_limits() {
        use std::time::Duration;
        let hub = Hub::new(Config {
            max_connections: 3,
            max_connections_per_source: 2,
            connect_rate_per_source: 2,
            allow_networks: vec!["10.0.0.0/8".parse().unwrap()],
            ..Config::default()
        });
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(
            hub.admit("192.168.0.1".parse().unwrap(), t0),
            Err(Refusal::AllowList)
        );
        assert_eq!(hub.admit(a, t0), Ok(()));
        assert_eq!(hub.admit(a, t0), Ok(()));
        // The bucket refills at 2 a second; the per-source cap still holds.
        assert_eq!(hub.admit(a, t0), Err(Refusal::Rate));
        assert_eq!(
            hub.admit(a, t0 + Duration::from_secs(1)),
            Err(Refusal::PerSource)
        );
        hub.release(a);
        assert_eq!(hub.admit(a, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(hub.admit(b, t0), Ok(()));
        assert_eq!(hub.connections(), 3);
        assert_eq!(hub.admit(b, t0), Err(Refusal::MaxConnections));
        let refused: u64 = hub.metrics.refusals().map(|(_, n)| n).sum();
        assert_eq!(refused, 4);
        hub.begin_shutdown();
        hub.release(b);
        assert!(hub.admit(b, t0 + Duration::from_secs(2)).is_err());
    }
}
