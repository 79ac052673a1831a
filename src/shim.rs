//! One connected shim, and its outbound queue.
//!
//! A [`Shim`] is shared (`Arc`) between the connection that owns its socket, the session
//! table, the router and every core that delivers to it. Everything a shim is sent goes
//! through its [`Outbox`], as nats-server does it: producers on any core append encoded
//! frames and note the outbox as "to flush"; when the producer has handled its whole read
//! batch it flushes each noted outbox once, writing straight to the socket with one
//! non-blocking send when no write is in flight. Many frames queued during one batch leave
//! in one system call, and a reply or a delivery to another core's shim costs no thread
//! wake-up. Only what the socket cannot take at once is left to the connection's writer
//! task. A shim whose queue passes the outbound limit is cut off at once: nobody ever
//! waits for a slow consumer.

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
    /// The client did not present the shared secret, or a wrong one.
    AuthFailed,
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
            CloseReason::AuthFailed => "authentication failed",
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
    /// The writer task holds bytes taken from `buf` and is writing them: a direct send
    /// now would overtake them.
    writing: bool,
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
    /// Queued behind bytes already queued: whoever queued those flushes these too.
    Queued,
    /// Queued into an empty outbox: the caller must see that [`Outbox::flush`] is called
    /// (once its batch is done).
    QueuedFirst,
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
                writing: false,
                state: OutState::Open,
                reason: None,
                fd: None,
            }),
            notify: Notify::new(),
        }
    }
}

impl Outbox {
    /// Appends bytes written by `write` to the queue; `limit` is the outbound limit in
    /// bytes. Nothing is sent until [`Outbox::flush`].
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
        if was_empty {
            Pushed::QueuedFirst
        } else {
            Pushed::Queued
        }
    }

    /// Sends what is queued: straight to the socket with one non-blocking send when the
    /// writer task is idle, handing whatever the socket cannot take now to the writer.
    pub fn flush(&self) {
        let mut g = self.inner.lock();
        if g.writing || g.buf.is_empty() || g.state == OutState::Kicked {
            return;
        }
        let Some(fd) = g.fd.filter(|_| g.state == OutState::Open) else {
            // Closing (the writer sends the last frame and shuts down) or not attached.
            drop(g);
            self.notify.notify_one();
            return;
        };
        loop {
            // SAFETY: `fd` is the connection's open socket (see `kick_locked`); the buffer
            // is valid for `len` bytes. MSG_DONTWAIT makes this one send non-blocking on
            // any socket; MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    fd,
                    g.buf.as_ptr().cast(),
                    g.buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                let n = n as usize;
                if n == g.buf.len() {
                    g.buf.clear();
                    if g.buf.capacity() > 64 * 1024 {
                        g.buf = Vec::new();
                    }
                    return;
                }
                g.buf.drain(..n);
                break; // the socket is full: the writer waits for room
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => break,
                _ => {
                    Self::kick_locked(&mut g, CloseReason::IoError);
                    break;
                }
            }
        }
        drop(g);
        self.notify.notify_one();
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
        g.writing = !out.is_empty();
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
    /// The core whose runtime serves the connection.
    pub core: u16,
    /// Frames received from the shim, on TCP and UDP.
    pub frames_in: AtomicU64,
    /// Frames queued or sent to the shim, on TCP and UDP.
    pub frames_out: AtomicU64,
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
    pub(crate) fn new(
        serial: u64,
        core: usize,
        peer: SocketAddr,
        now_ms: u64,
        unix_ms: u64,
    ) -> Shim {
        Shim {
            serial,
            token: Token::generate(),
            peer,
            core: core as u16,
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
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
    /// True once the shim was removed (its connection ended or a timer expired it).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

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
        assert_eq!(o.push(8, b"abcd"), Pushed::QueuedFirst);
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
    fn flush_sends_straight_to_the_socket_unless_a_write_is_in_flight() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server_side, _) = l.accept().unwrap();
        let o = Outbox::default();
        o.attach_fd(server_side.as_raw_fd());
        o.push(1 << 20, b"one\n");
        o.push(1 << 20, b"two\n");
        o.flush();
        assert_eq!(o.pending(), 0, "both frames left in one send");
        let mut got = [0u8; 8];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one\ntwo\n");
        // The writer holds taken bytes: a flush must not overtake them.
        o.push(1 << 20, b"a\n");
        let mut taken = Vec::new();
        o.take(&mut taken);
        o.push(1 << 20, b"b\n");
        o.flush();
        assert_eq!(o.pending(), 2, "left for the writer, behind what it holds");
        o.detach_fd();
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
        let s = Shim::new(77, 0, "127.0.0.1:1".parse().unwrap(), 0, 0);
        let a = s.next_command_id();
        let b = s.next_command_id();
        assert_ne!(a, b);
        assert_eq!(serial_of_command_id(a), 77);
        assert_eq!(serial_of_command_id(b), 77);
    }
}
