//! A shim's outbound queue: bounded, shared by every core that sends to the shim.
//!
//! As nats-server does it, producers on any core append encoded frames and list the
//! outbox for a flush; when the producer has handled its slice of input, the driver
//! flushes each listed outbox once, writing straight to the socket with one non-blocking
//! send when no write is in flight. Many frames queued during one slice leave in one
//! system call, and a delivery to another core's shim costs no thread wake-up. Only what
//! the socket cannot take at once is left to the connection's writer task.
//!
//! Nobody ever waits for a slow consumer: an outbox whose pending bytes pass the outbound
//! limit, or whose output has made no progress for the write deadline, is cut off.
//!
//! On a TLS connection the outbox also holds the TLS session: frames are queued as
//! plaintext and sealed into records once per flush (many frames, few records), and the
//! reader hands the records it receives to the same session under the same lock, so every
//! record, a handshake message as much as a sealed frame, leaves in the order the session
//! numbered it, whichever core sends.
//!
//! The outbox does no I/O of its own: the driver attaches the socket with the two
//! functions that touch it ([`SocketOps`]), and a flush or a cut-off from any core calls
//! those.
//!
//! A connection that waits for input has no task (see `driver/tasks.rs`): when its outbox
//! needs the writer (a flush the socket could not take, a last frame), the outbox rings
//! its core's [`Doorbell`] with the connection's key, and the core resumes it.

use super::shim::CloseReason;
use crate::tls::{self, Received};
use parking_lot::Mutex;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

/// The socket calls an outbox makes, provided by the driver (`driver/sys.rs`).
pub struct SocketOps {
    /// One non-blocking send; the bytes taken, or the error (`WouldBlock` when full).
    pub send: fn(RawFd, &[u8]) -> io::Result<usize>,
    /// Shuts both directions down, waking a reader or writer parked on the socket on any
    /// thread.
    pub shutdown: fn(RawFd),
}

/// Capacity an emptied queue keeps: a larger one is given back as it drains, unless it is
/// at least [`MAPPED_CAPACITY`].
const IDLE_CAPACITY: usize = 1024;
/// A queue buffer this large is mapped from the system rather than taken from the heap
/// (`driver/sys.rs` `tune_allocator`): a busy recipient keeps it from one flush to the
/// next (mapping and faulting it in again for every batch of a fan-out would cost more
/// than the batch), and the sweeper gives it back whole once the queue is idle
/// ([`Outbox::trim`]). Smaller ones go back to the heap as they drain, where the next
/// batch finds them again.
const MAPPED_CAPACITY: usize = 64 * 1024;

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

struct Inner {
    /// Bytes for the socket, in order (records, on a TLS connection).
    buf: Vec<u8>,
    /// A TLS connection's frames not sealed yet.
    plain: Vec<u8>,
    /// The TLS session, on a TLS connection.
    tls: Option<Box<tls::Session>>,
    /// The writer task holds bytes taken from `buf` and is writing them: a direct send
    /// now would overtake them.
    writing: bool,
    /// How many of the bytes the writer took are not written yet.
    in_flight: usize,
    /// The socket was shut down by a cut: nothing can be written any more.
    shut: bool,
    state: OutState,
    reason: Option<CloseReason>,
    /// When output last made progress, or when the queue last went from idle to busy
    /// (hub milliseconds): the write deadline counts from here.
    since_ms: u64,
    /// The socket, while it is open. Cleared under this lock before the socket is closed,
    /// so a stale descriptor is never touched.
    socket: Option<(RawFd, &'static SocketOps)>,
    /// Who is told when the writer is needed.
    wake: Wake,
}

/// Who is told when a connection's writer is needed.
enum Wake {
    /// Nobody yet: the connection's task runs, and looks before it waits.
    Unwanted,
    /// The writer is needed; the connection's task starts it when it looks.
    Wanted,
    /// The connection has no task: its core's doorbell is rung with its key.
    Parked(Arc<Doorbell>, u32),
}

/// How other threads resume a core's connections that have no task: the keys of those
/// whose writer is needed, and a wake-up for the core's loop that resumes them.
#[derive(Default)]
pub struct Doorbell {
    keys: Mutex<Vec<u32>>,
    notify: Notify,
}

impl Doorbell {
    fn ring(&self, key: u32) {
        self.keys.lock().push(key);
        self.notify.notify_one();
    }

    /// Moves the keys rung since the last call into `out`.
    pub fn take(&self, out: &mut Vec<u32>) {
        std::mem::swap(&mut *self.keys.lock(), out);
    }

    /// Waits until a key was rung (at once if one was since the last wait).
    pub async fn rung(&self) {
        self.notify.notified().await;
    }
}

impl Inner {
    fn busy(&self) -> bool {
        !self.buf.is_empty() || !self.plain.is_empty() || self.writing
    }

    /// Bytes queued and not yet handed to the kernel, the writer's included.
    fn pending(&self) -> usize {
        self.buf.len() + self.plain.len() + self.in_flight
    }

    /// Bytes queued, sealed or not.
    fn queued(&self) -> usize {
        self.buf.len() + self.plain.len()
    }

    /// Seals a TLS connection's queued frames into records (no-op otherwise).
    fn seal(&mut self) {
        if let Some(t) = self.tls.as_mut()
            && !self.plain.is_empty()
        {
            t.seal(&self.plain, &mut self.buf);
            self.plain.clear();
            if self.plain.capacity() > IDLE_CAPACITY {
                self.plain = Vec::new();
            }
        }
    }

    /// Where frames are queued: the plaintext queue on a TLS connection.
    fn queue(&mut self) -> &mut Vec<u8> {
        if self.tls.is_some() {
            &mut self.plain
        } else {
            &mut self.buf
        }
    }

    fn shrink(&mut self) {
        let cap = self.buf.capacity();
        if self.buf.is_empty() && cap > IDLE_CAPACITY && cap < MAPPED_CAPACITY {
            self.buf = Vec::new();
        }
    }
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; `first` when into an empty outbox (the caller lists it for a flush), and
    /// the bytes now pending.
    Queued {
        /// The outbox was empty.
        first: bool,
        /// Bytes pending after the push.
        pending: usize,
    },
    /// The connection is closing or closed; the frame was dropped.
    Closed,
    /// This push made the queue pass the limit: the shim was cut off.
    SlowConsumer,
}

/// Records that the writer is needed, and rings the doorbell of a connection that has no
/// task (after the lock is released).
fn want_writer(mut g: parking_lot::MutexGuard<'_, Inner>) {
    if let Wake::Parked(bell, key) = std::mem::replace(&mut g.wake, Wake::Wanted) {
        drop(g);
        bell.ring(key);
    }
}

/// A bounded outbound byte queue with a wake-up for its writer. Aligned to a cache line:
/// a fan-out locks and fills one per recipient, and the fields around it in a [`Shim`]
/// (which change as the shim grows) then never share its lines.
///
/// [`Shim`]: super::shim::Shim
#[repr(align(64))]
pub struct Outbox {
    inner: Mutex<Inner>,
    /// Mirrors `state == Open`, for checks on every frame without the lock.
    open: AtomicBool,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            inner: Mutex::new(Inner {
                buf: Vec::new(),
                plain: Vec::new(),
                tls: None,
                writing: false,
                in_flight: 0,
                shut: false,
                state: OutState::Open,
                reason: None,
                since_ms: 0,
                socket: None,
                wake: Wake::Unwanted,
            }),
            open: AtomicBool::new(true),
        }
    }
}

impl Outbox {
    /// Appends `bytes` at `now_ms`, `limit` being the outbound limit in bytes. Nothing is
    /// sent until [`Outbox::flush`].
    pub fn push(&self, limit: usize, bytes: &[u8], now_ms: u64) -> Pushed {
        let mut g = self.inner.lock();
        if g.state != OutState::Open {
            return Pushed::Closed;
        }
        let first = g.queued() == 0;
        if !g.busy() {
            g.since_ms = now_ms;
        }
        if g.pending() + bytes.len() > limit {
            self.cut_locked(&mut g, CloseReason::SlowConsumer);
            want_writer(g);
            return Pushed::SlowConsumer;
        }
        g.queue().extend_from_slice(bytes);
        Pushed::Queued {
            first,
            pending: g.pending(),
        }
    }

    /// Sends what is queued: straight to the socket with one non-blocking send when the
    /// writer task is idle, handing whatever the socket cannot take now to the writer.
    pub fn flush(&self, now_ms: u64) {
        let mut g = self.inner.lock();
        if g.writing || g.queued() == 0 || g.state == OutState::Kicked {
            return;
        }
        g.seal();
        let Some((fd, ops)) = g.socket.filter(|_| g.state == OutState::Open) else {
            // Closing (the writer sends the last frame and shuts down) or not attached.
            want_writer(g);
            return;
        };
        loop {
            match (ops.send)(fd, &g.buf) {
                Ok(n) if n == g.buf.len() => {
                    g.buf.clear();
                    g.shrink();
                    g.since_ms = now_ms;
                    return;
                }
                Ok(n) => {
                    if n > 0 {
                        g.buf.drain(..n);
                        g.since_ms = now_ms;
                    }
                    break; // the socket is full: the writer waits for room
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.cut_locked(&mut g, CloseReason::IoError);
                    break;
                }
            }
        }
        want_writer(g);
    }

    /// Queues `last` (usually an Error or Quit frame) and asks the writer to flush and shut
    /// the socket down. The first reason given to `close` or `cut` is the one kept.
    pub fn close(&self, reason: CloseReason, last: &[u8]) {
        let mut g = self.inner.lock();
        if g.state != OutState::Open {
            return;
        }
        g.queue().extend_from_slice(last);
        g.state = OutState::Closing;
        self.open.store(false, Ordering::Release);
        g.reason.get_or_insert(reason);
        want_writer(g);
    }

    /// Shuts the socket down now, dropping anything still queued.
    pub fn cut(&self, reason: CloseReason) {
        let mut g = self.inner.lock();
        self.cut_locked(&mut g, reason);
        want_writer(g);
    }

    fn cut_locked(&self, g: &mut Inner, reason: CloseReason) {
        g.reason.get_or_insert(reason);
        g.state = OutState::Kicked;
        self.open.store(false, Ordering::Release);
        g.buf = Vec::new();
        g.plain = Vec::new();
        // Even after the writer took a closing connection's last frame: a writer parked on
        // a peer that stopped reading must be woken, or it would hold the socket for ever.
        if !g.shut
            && let Some((fd, ops)) = g.socket
        {
            (ops.shutdown)(fd);
            g.shut = true;
        }
    }

    /// Records the socket, so that a flush or a cut-off from any core can reach it.
    pub fn attach(&self, fd: RawFd, ops: &'static SocketOps) {
        self.inner.lock().socket = Some((fd, ops));
    }

    /// Forgets the socket; called before the driver closes it.
    pub fn detach(&self) {
        self.inner.lock().socket = None;
    }

    /// Moves everything queued into `out` (which must be empty) and returns the state the
    /// queue was in. The writer writes `out`, calls [`Outbox::wrote`], then stops when the
    /// state is not `Open`.
    pub fn take(&self, out: &mut Vec<u8>) -> OutState {
        debug_assert!(out.is_empty());
        let mut g = self.inner.lock();
        if g.state != OutState::Kicked {
            g.seal();
            if g.state == OutState::Closing
                && let Some(t) = g.tls.as_mut()
            {
                let mut alert = Vec::new();
                t.close(&mut alert);
                g.buf.extend_from_slice(&alert);
            }
        }
        std::mem::swap(&mut g.buf, out);
        if matches!(g.wake, Wake::Wanted) {
            g.wake = Wake::Unwanted;
        }
        g.writing = !out.is_empty();
        g.in_flight = out.len();
        if g.state == OutState::Closing {
            // The final frame is in `out`; after it is written the writer shuts down.
            g.state = OutState::Kicked;
            return OutState::Closing;
        }
        g.state
    }

    /// The writer wrote `n` more of the bytes it took, at `now_ms` (progress, for the write
    /// deadline and for the producers waiting on this queue).
    pub fn progress(&self, n: usize, now_ms: u64) {
        let mut g = self.inner.lock();
        g.in_flight = g.in_flight.saturating_sub(n);
        g.since_ms = now_ms;
    }

    /// The writer finished writing what it took, at `now_ms`.
    pub fn wrote(&self, now_ms: u64) {
        let mut g = self.inner.lock();
        g.writing = false;
        g.in_flight = 0;
        g.since_ms = now_ms;
        g.shrink();
    }

    /// Gives back the buffer of a queue that has nothing queued and no write in flight (the
    /// sweeper calls it, so that a shim that went quiet keeps no large buffer).
    pub fn trim(&self) {
        let mut g = self.inner.lock();
        if !g.writing && g.buf.is_empty() && g.buf.capacity() > IDLE_CAPACITY {
            g.buf = Vec::new();
        }
        if g.plain.is_empty() && g.plain.capacity() > IDLE_CAPACITY {
            g.plain = Vec::new();
        }
    }

    /// Whether the writer is needed (and takes note that it is being started).
    pub fn take_wanted(&self) -> bool {
        let mut g = self.inner.lock();
        if matches!(g.wake, Wake::Wanted) {
            g.wake = Wake::Unwanted;
            return true;
        }
        false
    }

    /// Leaves the connection without a task: from now on, when the writer is needed,
    /// `bell` is rung with `key`. Refused (false) while the writer is needed or writing.
    pub fn park(&self, bell: &Arc<Doorbell>, key: u32) -> bool {
        let mut g = self.inner.lock();
        if g.writing || matches!(g.wake, Wake::Wanted) {
            return false;
        }
        g.wake = Wake::Parked(bell.clone(), key);
        true
    }

    /// The connection has a task again (it was resumed for input).
    pub fn unpark(&self) {
        let mut g = self.inner.lock();
        if matches!(g.wake, Wake::Parked(..)) {
            g.wake = Wake::Unwanted;
        }
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

    /// Whether frames are still accepted (no lock taken).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Whether the socket is behind: the writer holds bytes the socket could not take at
    /// once, or `backlog` bytes or more wait to be flushed.
    pub fn backlogged(&self, backlog: usize) -> bool {
        let g = self.inner.lock();
        g.writing || g.in_flight > 0 || g.queued() >= backlog
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn pending(&self) -> usize {
        self.inner.lock().queued()
    }

    /// Makes this a TLS connection: frames queued from now on are sealed by `session`.
    pub fn start_tls(&self, session: tls::Session) {
        self.inner.lock().tls = Some(Box::new(session));
    }

    /// Hands records received on a TLS connection to its session: the plaintext they
    /// carried is appended to `plain`, and any records the session answers with (handshake
    /// messages, an alert) are queued for the socket. Returns what happened, and whether
    /// the outbox went from empty to busy (the caller lists it for a flush). `on_ready`
    /// runs, under the lock, once when the handshake finishes.
    pub fn receive_tls(
        &self,
        input: &[u8],
        plain: &mut Vec<u8>,
        on_ready: impl FnOnce(&tls::Session),
    ) -> (Result<Received, rustls::Error>, bool) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let Some(t) = g.tls.as_mut() else {
            return (Ok(Received::default()), false);
        };
        if g.state == OutState::Kicked {
            return (Ok(Received::default()), false);
        }
        let res = t.read(input, plain, &mut g.buf);
        if let Ok(r) = &res
            && r.established
        {
            on_ready(t);
        }
        (res, !g.buf.is_empty())
    }

    /// Whether output has waited, with no progress, for `deadline_ms` at `now_ms` (and the
    /// socket is not shut down yet).
    pub fn stalled(&self, now_ms: u64, deadline_ms: u64) -> bool {
        let g = self.inner.lock();
        !g.shut && g.busy() && now_ms.saturating_sub(g.since_ms) >= deadline_ms
    }

    /// Pending bytes, and whether the queue made progress within `window_ms` of `now_ms`
    /// (a reader that keeps draining, as opposed to one that stopped).
    pub fn draining(&self, now_ms: u64, window_ms: u64) -> (usize, bool) {
        let g = self.inner.lock();
        let active = g.state == OutState::Open && now_ms.saturating_sub(g.since_ms) < window_ms;
        (g.pending(), active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_coalesces_and_cuts_off_slow_consumers() {
        let o = Outbox::default();
        assert_eq!(
            o.push(8, b"abcd", 0),
            Pushed::Queued {
                first: true,
                pending: 4
            }
        );
        assert_eq!(
            o.push(8, b"efgh", 0),
            Pushed::Queued {
                first: false,
                pending: 8
            }
        );
        let mut out = Vec::new();
        assert_eq!(o.take(&mut out), OutState::Open);
        assert_eq!(out, b"abcdefgh");
        out.clear();
        o.wrote(1);
        assert_eq!(o.push(8, b"123456789", 2), Pushed::SlowConsumer);
        assert_eq!(o.reason(), Some(CloseReason::SlowConsumer));
        assert!(!o.is_open());
        assert_eq!(o.push(8, b"x", 3), Pushed::Closed);
        assert_eq!(o.take(&mut out), OutState::Kicked);
        assert!(out.is_empty(), "a cut-off shim's backlog is dropped");
    }

    thread_local! {
        static SOCKET: std::cell::RefCell<Option<std::net::TcpStream>> = const { std::cell::RefCell::new(None) };
    }
    static TEST_OPS: SocketOps = SocketOps {
        send: |_, b| SOCKET.with(|s| std::io::Write::write(s.borrow_mut().as_mut().unwrap(), b)),
        shutdown: |_| {},
    };

    #[test]
    fn flush_sends_straight_to_the_socket_unless_a_write_is_in_flight() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server_side, _) = l.accept().unwrap();
        let o = Outbox::default();
        o.attach(server_side.as_raw_fd(), &TEST_OPS);
        SOCKET.with(|s| *s.borrow_mut() = Some(server_side));
        o.push(1 << 20, b"one\n", 0);
        o.push(1 << 20, b"two\n", 0);
        o.flush(0);
        assert_eq!(o.pending(), 0, "both frames left in one send");
        let mut got = [0u8; 8];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one\ntwo\n");
        // The writer holds taken bytes: a flush must not overtake them.
        o.push(1 << 20, b"a\n", 0);
        let mut taken = Vec::new();
        o.take(&mut taken);
        o.push(1 << 20, b"b\n", 0);
        o.flush(0);
        assert_eq!(o.pending(), 2, "left for the writer, behind what it holds");
        o.detach();
    }

    #[test]
    fn a_queue_without_progress_is_stalled_and_memory_is_given_back() {
        let o = Outbox::default();
        o.push(1 << 20, &[0u8; 100_000], 10);
        assert!(!o.stalled(500, 1000));
        assert!(o.stalled(1010, 1000));
        let mut taken = Vec::new();
        o.take(&mut taken);
        assert!(o.stalled(1010, 1000), "bytes held by the writer count too");
        o.wrote(1020);
        assert!(!o.stalled(5000, 1000), "nothing pending");
        // A queue drained by a flush keeps a mapped-size buffer until the sweeper trims it.
        o.push(1 << 20, &[0u8; 100_000], 5000);
        {
            let mut g = o.inner.lock();
            g.buf.clear();
            g.shrink();
        }
        assert!(
            o.inner.lock().buf.capacity() >= MAPPED_CAPACITY,
            "kept while busy"
        );
        o.trim();
        assert!(o.inner.lock().buf.capacity() <= IDLE_CAPACITY);
    }

    #[test]
    fn close_queues_a_last_frame_and_keeps_the_first_reason() {
        let o = Outbox::default();
        o.push(100, b"a", 0);
        o.close(CloseReason::Idle, b"\x03\n");
        o.cut(CloseReason::IoError);
        assert_eq!(o.reason(), Some(CloseReason::Idle));
        let mut out = Vec::new();
        // cut() after close() shut the socket down; the last frame is dropped with it.
        assert_eq!(o.take(&mut out), OutState::Kicked);
    }
}
