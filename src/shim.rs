//! One connected shim, and its outbound queue.
//!
//! A [`Shim`] is shared (`Arc`) between the connection that owns its socket, the session
//! table, the router and every core that delivers to it. Everything a shim is sent goes
//! through its [`Outbox`]: producers on any core append encoded frames, and the
//! connection's writer takes the whole buffer and writes it with one system call, so many
//! frames queued during one wakeup leave in one write (as nats-server flushes a client
//! once per read batch). A shim whose queue passes the outbound limit is cut off at once:
//! nobody ever waits for a slow consumer.

use crate::frame::Token;
use parking_lot::{Mutex, RwLock};
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use tokio::sync::Notify;

/// Why a connection ended; logged on the close line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its end.
    Eof,
    /// The client sent Quit.
    Quit,
    /// No Identify within the identify deadline.
    IdentifyTimeout,
    /// Nothing received for the idle timeout.
    Idle,
    /// A frame longer than the maximum.
    Oversized,
    /// Outbound bytes passed the limit.
    SlowConsumer,
    /// A read or write failed.
    IoError,
    /// The server is shutting down.
    Shutdown,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Eof => "eof",
            CloseReason::Quit => "quit",
            CloseReason::IdentifyTimeout => "identify timeout",
            CloseReason::Idle => "idle timeout",
            CloseReason::Oversized => "oversized frame",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::IoError => "io error",
            CloseReason::Shutdown => "server shutdown",
        })
    }
}

/// Where the outbound side of a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutState {
    /// Accepting frames.
    Open,
    /// A last frame is queued; the writer flushes it, then shuts the socket down.
    Closing,
    /// The socket has been shut down; nothing more is written.
    Kicked,
}

struct OutboxInner {
    buf: Vec<u8>,
    state: OutState,
    reason: Option<CloseReason>,
    /// The socket, while it is open, so that any core can shut it down at once (a slow
    /// consumer's writer may be parked in a write that will never finish). Cleared under
    /// this lock before the socket is closed, so a stale descriptor is never touched.
    fd: Option<RawFd>,
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for the writer.
    Queued,
    /// The connection is closing or closed; the frame was dropped.
    Closed,
    /// This push made the queue pass the limit: the shim was cut off.
    SlowConsumer,
}

/// A bounded outbound byte queue with a wake-up for its writer.
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    notify: Notify,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            inner: Mutex::new(OutboxInner {
                buf: Vec::new(),
                state: OutState::Open,
                reason: None,
                fd: None,
            }),
            notify: Notify::new(),
        }
    }
}

impl Outbox {
    /// Appends bytes written by `write` to the queue, waking the writer when the queue was
    /// empty. `limit` is the outbound limit in bytes.
    pub fn push_with(&self, limit: usize, write: impl FnOnce(&mut Vec<u8>)) -> Pushed {
        let mut g = self.inner.lock();
        if g.state != OutState::Open {
            return Pushed::Closed;
        }
        let was_empty = g.buf.is_empty();
        write(&mut g.buf);
        if g.buf.len() > limit {
            g.buf = Vec::new();
            Self::kick_locked(&mut g, CloseReason::SlowConsumer);
            drop(g);
            self.notify.notify_one();
            return Pushed::SlowConsumer;
        }
        drop(g);
        if was_empty {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Appends `bytes` to the queue (see [`Outbox::push_with`]).
    pub fn push(&self, limit: usize, bytes: &[u8]) -> Pushed {
        self.push_with(limit, |b| b.extend_from_slice(bytes))
    }

    /// Queues `last` (usually an Error or Quit frame) and asks the writer to flush and shut
    /// the socket down. The first reason given to `close` or `kick` is the one kept.
    pub fn close(&self, reason: CloseReason, last: &[u8]) {
        let mut g = self.inner.lock();
        if g.state != OutState::Open {
            return;
        }
        g.buf.extend_from_slice(last);
        g.state = OutState::Closing;
        g.reason.get_or_insert(reason);
        drop(g);
        self.notify.notify_one();
    }

    /// Shuts the socket down now, dropping anything still queued.
    pub fn kick(&self, reason: CloseReason) {
        let mut g = self.inner.lock();
        Self::kick_locked(&mut g, reason);
        drop(g);
        self.notify.notify_one();
    }

    fn kick_locked(g: &mut OutboxInner, reason: CloseReason) {
        g.reason.get_or_insert(reason);
        if g.state == OutState::Kicked {
            return;
        }
        g.state = OutState::Kicked;
        if let Some(fd) = g.fd {
            // SAFETY: `fd` is the connection's open socket: the driver clears it under this
            // lock (detach_fd) before the socket is closed, so it cannot have been reused.
            // shutdown(2) wakes a reader or writer parked on the socket on any thread.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
    }

    /// Records the socket so that [`Outbox::kick`] can shut it down from any core.
    pub fn attach_fd(&self, fd: RawFd) {
        self.inner.lock().fd = Some(fd);
    }

    /// Forgets the socket; called before the driver closes it.
    pub fn detach_fd(&self) {
        self.inner.lock().fd = None;
    }

    /// Moves everything queued into `out` (which must be empty) and returns the state the
    /// queue was in. The writer writes `out`, then stops when the state is not `Open`.
    pub fn take(&self, out: &mut Vec<u8>) -> OutState {
        debug_assert!(out.is_empty());
        let mut g = self.inner.lock();
        std::mem::swap(&mut g.buf, out);
        if g.state == OutState::Closing {
            // The final frame is in `out`; after it is written the writer shuts down.
            g.state = OutState::Kicked;
            return OutState::Closing;
        }
        g.state
    }

    /// Waits until something was queued or the state changed.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// The first close reason recorded, if any.
    pub fn reason(&self) -> Option<CloseReason> {
        self.inner.lock().reason
    }

    /// Records `reason` if none was recorded yet, and returns the reason that stands.
    pub fn settle_reason(&self, reason: CloseReason) -> CloseReason {
        *self.inner.lock().reason.get_or_insert(reason)
    }

    /// The current state.
    pub fn state(&self) -> OutState {
        self.inner.lock().state
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn pending(&self) -> usize {
        self.inner.lock().buf.len()
    }
}

/// The UDP side of a shim.
#[derive(Default)]
pub(crate) struct UdpBinding {
    pub(crate) addr: Option<SocketAddr>,
    /// Set when the TCP connection ended; a bind racing the close then fails.
    pub(crate) dead: bool,
}

/// A connected shim.
pub struct Shim {
    /// A number unique to this connection for the life of the process.
    pub serial: u64,
    /// The session token, sent in the Session reply and used to bind UDP.
    pub token: Token,
    /// The TCP peer address.
    pub peer: SocketAddr,
    /// When the connection was accepted, in milliseconds since the Unix epoch.
    pub connected_unix_ms: u64,
    identity: RwLock<Arc<str>>,
    pub(crate) udp: Mutex<UdpBinding>,
    accepted_ms: u64,
    last_seen_ms: AtomicU64,
    identified: AtomicBool,
    closed: AtomicBool,
    next_seq: AtomicU32,
    /// Everything sent to this shim over TCP.
    pub outbox: Outbox,
}

impl Shim {
    pub(crate) fn new(serial: u64, peer: SocketAddr, now_ms: u64, unix_ms: u64) -> Shim {
        Shim {
            serial,
            token: Token::generate(),
            peer,
            connected_unix_ms: unix_ms,
            identity: RwLock::new(Arc::from("")),
            udp: Mutex::new(UdpBinding::default()),
            accepted_ms: now_ms,
            last_seen_ms: AtomicU64::new(now_ms),
            identified: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            next_seq: AtomicU32::new(0),
            outbox: Outbox::default(),
        }
    }

    /// The current identity label (empty before the first Identify).
    pub fn identity(&self) -> Arc<str> {
        self.identity.read().clone()
    }

    pub(crate) fn set_identity(&self, label: Arc<str>) -> Arc<str> {
        std::mem::replace(&mut *self.identity.write(), label)
    }

    /// True once the first Identify was accepted.
    pub fn is_identified(&self) -> bool {
        self.identified.load(Ordering::Acquire)
    }

    pub(crate) fn mark_identified(&self) {
        self.identified.store(true, Ordering::Release);
    }

    /// Marks the shim closed; true for the first caller only.
    pub(crate) fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// The UDP address bound to this shim, if any.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.lock().addr
    }

    /// Milliseconds (on the hub's clock) when the connection was accepted.
    pub fn accepted_ms(&self) -> u64 {
        self.accepted_ms
    }

    /// Milliseconds (on the hub's clock) when this shim last sent anything.
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Records activity at `now_ms` (on the hub's clock).
    pub fn touch(&self, now_ms: u64) {
        // Skip the store when the value would not change: many frames arrive per ms.
        if self.last_seen_ms.load(Ordering::Relaxed) != now_ms {
            self.last_seen_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// A fresh correlation id for a Command sent by this shim: the serial in the high bits
    /// (so a response finds its way back without a lookup table), a sequence in the low.
    pub(crate) fn next_command_id(&self) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) & 0xFFFFF;
        (self.serial << 20) | u64::from(seq)
    }
}

impl fmt::Debug for Shim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shim")
            .field("serial", &self.serial)
            .field("identity", &self.identity())
            .field("peer", &self.peer)
            .finish()
    }
}

/// The serial encoded in a correlation id.
pub fn serial_of_command_id(id: u64) -> u64 {
    id >> 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_coalesces_and_cuts_off_slow_consumers() {
        let o = Outbox::default();
        assert_eq!(o.push(8, b"abcd"), Pushed::Queued);
        assert_eq!(o.push(8, b"efgh"), Pushed::Queued);
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), OutState::Open);
        assert_eq!(out, b"abcdefgh");
        out.clear();
        assert_eq!(o.push(8, b"123456789"), Pushed::SlowConsumer);
        assert_eq!(o.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(o.push(8, b"x"), Pushed::Closed);
        assert_eq!(o.take(&mut out), OutState::Kicked);
        assert!(out.is_empty(), "a cut-off shim's backlog is dropped");
    }

    #[test]
    fn close_queues_a_last_frame_and_keeps_the_first_reason() {
        let o = Outbox::default();
        o.push(100, b"a");
        o.close(CloseReason::Idle, b"\x03\n");
        o.kick(CloseReason::IoError);
        assert_eq!(o.reason(), Some(CloseReason::Idle));
        let mut out = Vec::new();
        // kick() after close() shut the socket down; the last frame is dropped with it.
        assert_eq!(o.take(&mut out), OutState::Kicked);
    }

    #[test]
    fn command_ids_carry_the_serial() {
        let s = Shim::new(77, "127.0.0.1:1".parse().unwrap(), 0, 0);
        let a = s.next_command_id();
        let b = s.next_command_id();
        assert_ne!(a, b);
        assert_eq!(serial_of_command_id(a), 77);
        assert_eq!(serial_of_command_id(b), 77);
    }
}
