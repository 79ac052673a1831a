//! The per-core loops, written once over the driver traits: accept, the connections (a
//! reader while input is handled, a writer while a write would block), the UDP receive
//! loop with its bounded send queues, and the sweeper. They move bytes and time between
//! the sockets and the hub, and decide nothing.
//!
//! A connection is a task only while it has something to do. Every socket of a core is
//! in the core's readiness set (an epoll set of its own, edge-triggered, each socket
//! tagged with its key in the core's table, see [`Conns`]); a connection with nothing to
//! read and nothing for its writer leaves its state in the table and its task ends. The
//! core's readiness loop resumes it, in a new task, when the set reports input, or when
//! its outbox rings the core's doorbell because the writer is needed (a flush the socket
//! could not take, a last frame). An idle connection then holds its state and no task,
//! no read buffer and no registration of its own with the runtime.

use super::{Datagrams, Listener, Room, Stream, sys};
use crate::hub::connection::{Connection, Flow, Input};
use crate::hub::datagram::{self, QuitLimiter, SendQueue};
use crate::hub::outbox::{Doorbell, OutState};
use crate::hub::shim::{CloseReason, Shim};
use crate::hub::timers::CLOSE_LINGER;
use crate::hub::{Effects, Hub};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{debug, error, warn};

/// What a core's tasks share.
pub(crate) struct Core {
    pub hub: Arc<Hub>,
    pub index: usize,
    /// Large read buffers not in use, kept for the next busy connection.
    buffers: RefCell<Vec<Vec<u8>>>,
    /// The core's UDP socket (for what any of its tasks sends over UDP: answers, routed
    /// frames, relay state), and its bounded queue for when the socket is full.
    udp_fd: Cell<RawFd>,
    udp_queue: Rc<RefCell<SendQueue>>,
}

/// Large read buffers a core keeps between uses.
const SPARE_BUFFERS: usize = 4;

impl Core {
    /// A large, empty read buffer.
    fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(READ_LARGE))
    }

    /// Gives a large read buffer back (kept if few are spare, else freed).
    fn give_buffer(&self, mut b: Vec<u8>) {
        let mut spare = self.buffers.borrow_mut();
        if spare.len() < SPARE_BUFFERS && b.capacity() == READ_LARGE {
            b.clear();
            spare.push(b);
        }
    }
}

/// A core's connections: its table, its readiness set, and its doorbell.
pub(crate) struct Conns<S> {
    slots: RefCell<Slab<Slot<S>>>,
    /// Every connection's socket, edge-triggered, each tagged with its key in `slots`;
    /// registered itself with the core's runtime, which reports when it has events.
    epoll: AsyncFd<OwnedFd>,
    /// Rung by an outbox, from any thread, when a connection without a task needs its
    /// writer.
    bell: Arc<Doorbell>,
}

/// One connection in its core's table.
struct Slot<S> {
    shim: Arc<Shim>,
    /// The sweeper's two-sweeps flag.
    flagged: Cell<bool>,
    /// Reported readable and not drained since (input, end of file or an error waits).
    readable: bool,
    /// Reported closed by the peer, or in error: a read always has something to say (the
    /// end of file may come in the same report as the last input, before it is read).
    hung_up: bool,
    /// Reported writable and not found full since (for a driver that writes with
    /// non-blocking sends).
    writable: bool,
    /// The task waiting for `readable`, or for `writable`.
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The connection's state while it has no task.
    parked: Option<Parked<S>>,
}

/// What a connection without a task keeps.
struct Parked<S> {
    conn: Connection,
    stream: Rc<S>,
}

/// Events taken from a readiness set at a time.
const EVENTS: usize = 256;

impl<S: Stream> Conns<S> {
    fn new() -> io::Result<Conns<S>> {
        Ok(Conns {
            slots: RefCell::new(Slab::new()),
            // SAFETY: the OwnedFd is the epoll set's only owner and is dropped only with
            // this AsyncFd, and `as_raw_fd` always returns that descriptor.
            epoll: unsafe {
                AsyncFd::register_with_interest(sys::epoll_create()?, Interest::READABLE)
            }?,
            bell: Arc::default(),
        })
    }

    /// Enters a connection into the table and its socket into the readiness set.
    fn insert(&self, shim: Arc<Shim>, fd: RawFd, readable: bool) -> io::Result<usize> {
        let key = self.slots.borrow_mut().insert(Slot {
            shim,
            flagged: Cell::new(false),
            readable,
            hung_up: false,
            writable: true,
            reader: None,
            writer: None,
            parked: None,
        });
        let write = S::WRITE_READINESS;
        if let Err(e) = sys::epoll_add(self.epoll.as_raw_fd(), fd, key as u64, write) {
            self.slots.borrow_mut().remove(key);
            return Err(e);
        }
        Ok(key)
    }

    fn remove(&self, key: usize) {
        self.slots.borrow_mut().remove(key);
    }

    /// Whether the connection has input waiting (or end of file); cleared by `drained`.
    fn is_readable(&self, key: usize) -> bool {
        self.slots.borrow()[key].readable
    }

    /// A read found the socket empty: wait for the readiness set from now on.
    fn drained(&self, key: usize) {
        let s = &mut self.slots.borrow_mut()[key];
        s.readable = s.hung_up;
    }

    /// Waits until the connection is reported readable.
    async fn readable(&self, key: usize) {
        poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[key];
            if s.readable {
                return Poll::Ready(());
            }
            s.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Leaves the connection's state in the table, without a task.
    fn park(&self, key: usize, conn: Connection, stream: Rc<S>) {
        let s = &mut self.slots.borrow_mut()[key];
        // A waker left from a wait the task gave up (its writer finished first) would keep
        // the ended task's memory alive for as long as the connection is idle.
        s.reader = None;
        s.parked = Some(Parked { conn, stream });
    }

    /// Applies the events of one socket of the readiness set; a connection without a task
    /// that has input now is resumed.
    fn on_event(&self, core: &Rc<Core>, this: &Rc<Self>, key: usize, bits: u32) {
        const IN: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const HUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        const OUT: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
        let parked = {
            let mut slots = self.slots.borrow_mut();
            // Events of a socket whose connection has ended (its key may be taken again
            // by then) only make a read find nothing.
            let Some(s) = slots.get_mut(key) else { return };
            if bits & OUT != 0 {
                s.writable = true;
                if let Some(w) = s.writer.take() {
                    w.wake();
                }
            }
            if bits & IN == 0 {
                return;
            }
            s.readable = true;
            s.hung_up |= bits & HUP != 0;
            if let Some(w) = s.reader.take() {
                w.wake();
            }
            s.parked.take()
        };
        if let Some(p) = parked {
            self.resume(core, this, key, p);
        }
    }

    /// A connection without a task whose writer is needed is resumed.
    fn on_bell(&self, core: &Rc<Core>, this: &Rc<Self>, key: usize) {
        let parked = self
            .slots
            .borrow_mut()
            .get_mut(key)
            .and_then(|s| s.parked.take());
        if let Some(p) = parked {
            self.resume(core, this, key, p);
        }
    }

    fn resume(&self, core: &Rc<Core>, this: &Rc<Self>, key: usize, p: Parked<S>) {
        p.conn.shim().outbox.unpark();
        tokio::task::spawn_local(run(core.clone(), this.clone(), key, p.conn, p.stream, None));
    }
}

/// Waiting for room on one connection's socket, from the readiness set.
struct SlotRoom<'a, S> {
    conns: &'a Conns<S>,
    key: usize,
}

impl<S: Stream> Room for SlotRoom<'_, S> {
    fn full(&self) {
        if let Some(s) = self.conns.slots.borrow_mut().get_mut(self.key) {
            s.writable = false;
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            let mut slots = self.conns.slots.borrow_mut();
            let Some(s) = slots.get_mut(self.key) else {
                return Poll::Ready(());
            };
            if s.writable {
                return Poll::Ready(());
            }
            s.writer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// Resumes the connections of a core's readiness set that have input, and those whose
/// outbox rang the doorbell.
async fn readiness_loop<S: Stream>(core: Rc<Core>, conns: Rc<Conns<S>>) {
    let mut events: Vec<libc::epoll_event> = Vec::with_capacity(EVENTS);
    let mut rung = Vec::new();
    loop {
        // The doorbell first, every time round, so that a busy readiness set cannot
        // keep it waiting.
        conns.bell.take(&mut rung);
        for key in rung.drain(..) {
            conns.on_bell(&core, &conns, key as usize);
        }
        if rung.capacity() > 4096 {
            rung = Vec::new();
        }
        tokio::select! {
            biased;
            guard = conns.epoll.readable() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => {
                        error!(core = core.index, error = %e,
                            "readiness set failed: this core's connections are no longer read");
                        return;
                    }
                };
                if let Err(e) = sys::epoll_take(conns.epoll.as_raw_fd(), &mut events) {
                    debug!(core = core.index, error = %e, "epoll_wait failed");
                    continue;
                }
                // Fewer than asked for: the set is drained, and the runtime reports it
                // again when a socket has new events (a report newer than this one is
                // never cleared).
                if events.len() < EVENTS {
                    guard.clear_ready();
                }
                for ev in &events {
                    let (key, bits) = (ev.u64 as usize, ev.events);
                    conns.on_event(&core, &conns, key, bits);
                }
            }
            _ = conns.bell.rung() => {}
        }
    }
}

/// The size of a core's read buffers.
const READ_LARGE: usize = 64 * 1024;
/// The largest write buffer a writer keeps between writes.
const WRITE_KEPT: usize = 1024;
/// Bytes the writer hands the socket at a time: progress is recorded after each, for the
/// write deadline and for producers waiting on this connection.
const WRITE_CHUNK: usize = 64 * 1024;
/// The longest a producer waits, per slice, for the recipients it congested to drain.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Runs one core until its runtime is dropped.
pub(crate) async fn run_core<L: Listener, U: Datagrams>(
    hub: Arc<Hub>,
    index: usize,
    listener: L,
    udp: U,
) {
    let core = Rc::new(Core {
        hub,
        index,
        buffers: RefCell::new(Vec::new()),
        udp_fd: Cell::new(udp.fd()),
        udp_queue: Rc::default(),
    });
    let conns = match Conns::<L::Conn>::new() {
        Ok(c) => Rc::new(c),
        Err(e) => {
            // Without its readiness set the core cannot serve connections. Its sockets are
            // closed, so that the kernel hands new connections and datagrams to the other
            // cores instead.
            error!(core = index, error = %e, "no readiness set: this core serves nothing");
            drop((listener, udp));
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::task::spawn_local(readiness_loop(core.clone(), conns.clone()));
    tokio::task::spawn_local(sweep(core.clone(), conns.clone()));
    tokio::task::spawn_local(state_loop(core.clone()));
    tokio::task::spawn_local(handoff_loop(core.clone()));
    // Batches for a core whose loop has not started yet wait in its inbox until it has.
    core.hub.handoff.start();
    if core.hub.cluster().is_some() {
        tokio::task::spawn_local(cluster_loop(core.clone()));
    }
    tokio::task::spawn_local(udp_loop(core.clone(), Rc::new(udp)));
    tokio::task::spawn_local(quit_all(core.clone(), conns.clone()));
    accept_loop(core, conns, listener).await;
    // Accepting stopped for a graceful shutdown: the connections and the UDP socket are
    // served on until the process exits.
    std::future::pending::<()>().await;
}

async fn accept_loop<L: Listener>(core: Rc<Core>, conns: Rc<Conns<L::Conn>>, listener: L) {
    let mut last_warn: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = core.hub.shutdown_started() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => match core.hub.admit(peer.ip(), Instant::now()) {
                Ok(()) => {
                    tokio::task::spawn_local(serve(core.clone(), conns.clone(), stream, peer));
                }
                Err(why) => sys::refuse(stream.fd(), &core.hub.refusal_frame(why)),
            },
            Err(e) => {
                // Out of descriptors or memory: back off a little, warn at most once a second.
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    warn!(core = core.index, error = %e, "accept failed");
                    last_warn = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // Dropping the listener here stops accepting: new connections are refused by the
    // kernel while the open ones are told to Quit.
    drop(listener);
    debug!(core = core.index, "stopped accepting");
}

/// On a graceful shutdown, has the hub send Quit to every connection of this core.
async fn quit_all<S: Stream>(core: Rc<Core>, conns: Rc<Conns<S>>) {
    core.hub.shutdown_started().await;
    let slots = conns.slots.borrow();
    core.hub.quit_all(slots.iter().map(|(_, s)| &s.shim));
}

/// A connection just accepted: entered into the core's table and readiness set, then
/// served.
async fn serve<S: Stream>(core: Rc<Core>, conns: Rc<Conns<S>>, stream: S, peer: SocketAddr) {
    let stream = Rc::new(stream);
    let conn = Connection::accept(&core.hub, core.index, peer, Instant::now());
    let shim = conn.shim().clone();
    let fd = stream.fd();
    shim.outbox.attach(fd, &sys::SOCKET_OPS);
    // The Identify usually arrives right behind the connect: read it at once if it is
    // there, which saves the handshake a wait for readiness. (Read before the socket
    // enters the readiness set: what arrives after this read is reported when it does.)
    let mut b = core.take_buffer();
    let first = match stream.try_read_now(&mut b) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            core.give_buffer(b);
            None
        }
        res => Some((res, b)),
    };
    let full = matches!(&first, Some((Ok(n), b)) if *n == b.capacity());
    match conns.insert(shim.clone(), fd, full) {
        Ok(key) => run(core, conns, key, conn, stream, first).await,
        Err(e) => {
            if let Some((_, b)) = first {
                core.give_buffer(b);
            }
            debug!(conn = shim.serial, error = %e, "readiness set refused the socket");
            conn.finish(&core.hub, CloseReason::IoError);
            shim.outbox.detach();
            stream.shutdown();
            core.hub.release(peer.ip());
        }
    }
}

/// Serves a connection until it has nothing to do (its state is left in the table) or
/// ends. `ready` is a read already made.
async fn run<S: Stream>(
    core: Rc<Core>,
    conns: Rc<Conns<S>>,
    key: usize,
    mut conn: Connection,
    stream: Rc<S>,
    mut ready: Option<(io::Result<usize>, Vec<u8>)>,
) {
    let shim = conn.shim().clone();
    // No writer until a write would block (most connections never need one).
    let mut writer = None;
    let reason = loop {
        let (res, buf) = match ready.take() {
            Some(r) => r,
            None => match next_input(&core, &conns, key, &stream, &shim, &mut writer).await {
                Some(r) => r,
                None => {
                    conns.park(key, conn, stream);
                    return;
                }
            },
        };
        let n = match res {
            Ok(0) => {
                core.give_buffer(buf);
                break CloseReason::Eof;
            }
            Ok(n) => n,
            Err(e) => {
                core.give_buffer(buf);
                debug!(conn = shim.serial, error = %e, "read failed");
                break CloseReason::IoError;
            }
        };
        // Boxed: the task of a connection is sized for waiting, not for this.
        let end = Box::pin(consume(&core, &mut conn, &*stream, buf, n)).await;
        conn.rest();
        if let Some(r) = end {
            break r;
        }
    };

    let reason = conn.finish(&core.hub, reason);
    // The last frame and the shutdown are the writer's: the running one, or one now.
    // (A writer that has already ended may have ended before the last frame was queued.)
    let writer = match writer.take() {
        Some(w) if !w.is_finished() => w,
        _ => spawn_writer(&core, &conns, key, &stream, &shim),
    };
    // Boxed: the timer is large, and only a closing connection needs it.
    Box::pin(linger(writer, &shim, reason)).await;
    conns.remove(key);
    shim.outbox.detach();
    core.hub.release(shim.peer.ip());
}

/// Gives a closing connection's writer [`CLOSE_LINGER`] to send the last frame, then cuts
/// the connection off.
async fn linger(mut writer: tokio::task::JoinHandle<()>, shim: &Shim, reason: CloseReason) {
    if tokio::time::timeout(CLOSE_LINGER, &mut writer)
        .await
        .is_err()
    {
        shim.outbox.cut(reason);
        let _ = writer.await;
    }
}

/// Starts a connection's writer.
fn spawn_writer<S: Stream>(
    core: &Core,
    conns: &Rc<Conns<S>>,
    key: usize,
    stream: &Rc<S>,
    shim: &Arc<Shim>,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(write_loop(
        core.hub.clone(),
        conns.clone(),
        key,
        stream.clone(),
        shim.clone(),
    ))
}

/// The connection's next read, into one of the core's buffers. While no writer runs,
/// starts one if the outbox needs it; a running writer ends once it has written
/// everything. None when there is nothing to read and no writer: the outbox then rings
/// the doorbell when the writer is needed, and the caller leaves the connection without a
/// task.
async fn next_input<S: Stream>(
    core: &Core,
    conns: &Rc<Conns<S>>,
    key: usize,
    stream: &Rc<S>,
    shim: &Arc<Shim>,
    writer: &mut Option<tokio::task::JoinHandle<()>>,
) -> Option<(io::Result<usize>, Vec<u8>)> {
    loop {
        if conns.is_readable(key) {
            let mut buf = core.take_buffer();
            let offered = buf.capacity();
            match stream.try_read_now(&mut buf) {
                Ok(n) => {
                    // A short read emptied the receive queue: wait for the readiness set
                    // before the next read rather than paying a read that finds nothing.
                    // (End of file stays readable.)
                    if n > 0 && n < offered {
                        conns.drained(key);
                    }
                    return Some((Ok(n), buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conns.drained(key);
                    core.give_buffer(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => core.give_buffer(buf),
                Err(e) => return Some((Err(e), buf)),
            }
            continue;
        }
        if writer.is_none() && shim.outbox.take_wanted() {
            *writer = Some(spawn_writer(core, conns, key, stream, shim));
        }
        match writer {
            Some(w) => {
                tokio::select! {
                    biased;
                    _ = conns.readable(key) => {}
                    _ = w => *writer = None,
                }
            }
            None => {
                if shim.outbox.park(&conns.bell, key as u32) {
                    return None;
                }
            }
        }
    }
}

/// Handles a read of `n` bytes in `big` (one of the core's buffers), then, while the reads
/// come back full, takes the rest of what is waiting into it, again and again (with a turn
/// for the core's other tasks between). Gives the buffer back; returns why the connection
/// ends, if it does.
async fn consume<S: Stream>(
    core: &Core,
    conn: &mut Connection,
    stream: &S,
    mut big: Vec<u8>,
    n: usize,
) -> Option<CloseReason> {
    let mut full = n == big.capacity();
    let mut end = None;
    let end = loop {
        let flow = handle(core, conn, stream, &big).await;
        big.clear();
        if let Flow::Close(r) = flow {
            break Some(r);
        }
        if end.is_some() || !full {
            break end;
        }
        // More is waiting: let every other connection on this core have its turn
        // first, so a shim that floods cannot starve them.
        stream.yield_turn().await;
        match stream.try_read_now(&mut big) {
            Ok(0) => end = Some(CloseReason::Eof),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                debug!(conn = conn.shim().serial, error = %e, "read failed");
                end = Some(CloseReason::IoError);
            }
        }
        full = big.len() == big.capacity();
    };
    core.give_buffer(big);
    end
}

/// Handles bytes read from a connection: on a TLS connection the session takes them first
/// and the plaintext they carried is handled (see [`slices`]).
async fn handle<S: Stream>(core: &Core, conn: &mut Connection, stream: &S, wire: &[u8]) -> Flow {
    match conn.receive(&core.hub, wire, Instant::now()) {
        Input::Plain => slices(core, conn, stream, wire).await,
        Input::Decrypted(plain) => {
            let flow = slices(core, conn, stream, &plain).await;
            conn.give_back(plain);
            flow
        }
        Input::Close(reason) => {
            carry_out(core, conn.effects()).await;
            Flow::Close(reason)
        }
    }
}

/// Handles a connection's plaintext input one slice at a time: carries out what each
/// slice produced (and lets the recipients it congested drain) before the next, and lets
/// the core's other tasks run between.
async fn slices<S: Stream>(core: &Core, conn: &mut Connection, stream: &S, data: &[u8]) -> Flow {
    let mut off = 0;
    loop {
        let (flow, used) = conn.on_bytes(&core.hub, &data[off..], Instant::now());
        off += used;
        carry_out(core, conn.effects()).await;
        if flow != Flow::Continue || off >= data.len() {
            return flow;
        }
        stream.yield_turn().await;
    }
}

/// Carries out what a slice of TCP input produced: flushes each listed outbox once,
/// hands the counts and latencies to the hub, and waits while the hub says the
/// recipients this producer filled are still draining.
async fn carry_out(core: &Core, out: &mut Effects) {
    let hub = &core.hub;
    let now = Instant::now();
    let now_ms = hub.ms(now);
    // Deliveries to other cores' connections are queued by those cores. Nothing is
    // flushed here until they have been: an Ack never reaches its sender before the
    // deliveries it counts are queued, one producer's frames to one shim stay in order,
    // and what the slice congested there is waited for like what it congested here.
    let tickets = hub.hand_over(out);
    for t in tickets {
        let congested = t.wait().await;
        out.add_congested(congested);
    }
    hub.flush_listed(core.index, out, now_ms);
    // TCP input is answered over TCP, but relay state it changed may go to subscribers
    // over UDP.
    send_datagrams(core, out);
    hub.finish(core.index, out, now);
    if hub.congested(out, now_ms) {
        Box::pin(wait_drained(hub, out)).await;
    }
}

/// Waits while the hub says the recipients a slice congested are still draining, at most
/// [`MAX_PAUSE`].
async fn wait_drained(hub: &Hub, out: &mut Effects) {
    let start = Instant::now();
    while start.elapsed() < MAX_PAUSE {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if !hub.congested(out, hub.ms(Instant::now())) {
            break;
        }
    }
    out.release_congested();
}

/// Writes what a flush could not send at once (the socket was full), until nothing is
/// left; or the last frame of a closing connection, then shuts the socket down.
async fn write_loop<S: Stream>(
    hub: Arc<Hub>,
    conns: Rc<Conns<S>>,
    key: usize,
    stream: Rc<S>,
    shim: Arc<Shim>,
) {
    let room = SlotRoom { conns: &conns, key };
    let mut buf = Vec::new();
    loop {
        let state = shim.outbox.take(&mut buf);
        let wrote = !buf.is_empty() && state != OutState::Kicked;
        if wrote {
            let res = if buf.len() <= WRITE_CHUNK {
                let (res, b) = stream.write_all(buf, &room).await;
                buf = b;
                res
            } else {
                Box::pin(write_chunks(&hub, &*stream, &room, &shim, &buf)).await
            };
            if let Err(e) = res {
                debug!(conn = shim.serial, error = %e, "write failed");
                shim.outbox.cut(CloseReason::IoError);
                stream.shutdown();
                return;
            }
        }
        buf.clear();
        if buf.capacity() > WRITE_KEPT {
            buf = Vec::new();
        }
        shim.outbox.wrote(hub.ms(Instant::now()));
        if state != OutState::Open {
            stream.shutdown();
            return;
        }
        // After a write, take again at once: frames queued meanwhile were not flushed by
        // their producers (a write was in flight), so they are this task's to send. An
        // empty take lets producers send directly again, and the writer ends: the
        // connection starts another when a write would block again.
        if !wrote {
            return;
        }
    }
}

/// Writes a large backlog in chunks, so that a slow but steady reader shows progress as it
/// goes (for the write deadline, and for the producers waiting on it).
async fn write_chunks<S: Stream>(
    hub: &Hub,
    stream: &S,
    room: &impl Room,
    shim: &Shim,
    buf: &[u8],
) -> io::Result<()> {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    for part in buf.chunks(WRITE_CHUNK) {
        chunk.clear();
        chunk.extend_from_slice(part);
        let (r, c) = stream.write_all(chunk, room).await;
        chunk = c;
        r?;
        shim.outbox.progress(part.len(), hub.ms(Instant::now()));
    }
    Ok(())
}

async fn sweep<S: Stream>(core: Rc<Core>, conns: Rc<Conns<S>>) {
    loop {
        // Read each time round: a reload may change the timeouts.
        tokio::time::sleep(core.hub.sweep_every()).await;
        let now = Instant::now();
        for (_, s) in conns.slots.borrow().iter() {
            core.hub.sweep(&s.shim, &s.flagged, now);
        }
    }
}

/// Queues the deliveries other cores handed over for this core's connections and flushes
/// them, and flushes the outboxes other cores queued frames on (`hub/handoff.rs`).
async fn handoff_loop(core: Rc<Core>) {
    let hub = core.hub.clone();
    let mut batches = Vec::new();
    let mut flush = Vec::new();
    loop {
        let notified = hub.handoff.notified(core.index);
        hub.handoff.take_batches(core.index, &mut batches);
        hub.handoff.take(core.index, &mut flush);
        if batches.is_empty() && flush.is_empty() {
            notified.await;
            continue;
        }
        let now_ms = hub.ms(Instant::now());
        for b in batches.drain(..) {
            let congested = hub.queue_batch(b.groups, now_ms, &mut flush);
            // The producer goes on while this core writes.
            b.ticket.complete(congested);
        }
        for shim in flush.drain(..) {
            shim.outbox.flush(now_ms);
        }
        if flush.capacity() > 4096 {
            flush = Vec::new();
        }
    }
}

/// Delivers the relay state and presence waiting on this core: subscriptions whose
/// interval had not passed or whose connection was busy when they changed. Sleeps while
/// nothing waits.
async fn state_loop(core: Rc<Core>) {
    let hub = core.hub.clone();
    let mut out = Effects::default();
    out.core = core.index;
    loop {
        let notified = hub.states.notified(core.index);
        match hub.state_next(core.index, hub.ms(Instant::now())) {
            None => notified.await,
            Some(0) => {}
            Some(ms) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                    _ = notified => {}
                }
            }
        }
        let now = Instant::now();
        out.begin(&hub, hub.ms(now));
        hub.state_tick(core.index, &mut out);
        carry_out_unprompted(&core, &mut out);
    }
}

/// What work done outside any connection's input produced (relay state, frames from
/// other nodes): each listed outbox flushed once, the datagrams sent, the slice counted.
/// Nobody waits for a congested recipient here.
fn carry_out_unprompted(core: &Core, out: &mut Effects) {
    let hub = &core.hub;
    let now_ms = hub.ms(Instant::now());
    // Handed over in order with what this task handed before; nobody waits here.
    drop(hub.hand_over(out));
    hub.flush_listed(core.index, out, now_ms);
    send_datagrams(core, out);
    hub.finish(core.index, out, Instant::now());
    out.release_congested();
}

/// Applies what other nodes of the cluster said, as the cluster thread hands it over:
/// their shims' joins and leaves, frames for shims here, their shims' state.
async fn cluster_loop(core: Rc<Core>) {
    let hub = core.hub.clone();
    let Some(c) = hub.cluster() else { return };
    let mut out = Effects::default();
    out.core = core.index;
    loop {
        let notified = c.notified(core.index);
        let items = c.take_inbox(core.index);
        if items.is_empty() {
            notified.await;
            continue;
        }
        let now = Instant::now();
        out.begin(&hub, hub.ms(now));
        hub.cluster_apply(items, &mut out);
        carry_out_unprompted(&core, &mut out);
    }
}

async fn udp_loop<U: Datagrams>(core: Rc<Core>, sock: Rc<U>) {
    let hub = core.hub.clone();
    let mut lim = QuitLimiter::new(hub.config().udp_quit_per_sec);
    let mut out = Effects::default();
    out.core = core.index;
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let (res, b) = sock.recv_from(buf).await;
        buf = b;
        let mut got = match res {
            Ok(d) => Some(d),
            Err(e) => {
                debug!(error = %e, "udp receive failed");
                None
            }
        };
        // What else has arrived is handled with it, up to a batch, and flushed once:
        // a tick of Sets from many shims then costs each subscriber one flush.
        let mut handled = 0;
        while let Some((n, src)) = got.take() {
            let now = Instant::now();
            if hub.admit_datagram(src, now) {
                datagram::on_datagram(&hub, &mut lim, src, &buf[..n], now, &mut out);
            }
            buf.clear();
            handled += 1;
            if handled < UDP_BATCH {
                got = sys::recv_from_now(sock.fd(), &mut buf).ok();
            }
        }
        if !out.is_empty() {
            let now_ms = hub.ms(Instant::now());
            // As in `carry_out`: the replies wait until the deliveries are queued.
            for t in hub.hand_over(&mut out) {
                let congested = t.wait().await;
                out.add_congested(congested);
            }
            hub.flush_listed(core.index, &mut out, now_ms);
            send_datagrams(&core, &mut out);
        }
        hub.finish(core.index, &mut out, Instant::now());
        out.release_congested();
        buf.clear();
    }
}

/// Datagrams handled before what they produced is sent.
const UDP_BATCH: usize = 32;

/// Sends what a datagram produced: straight from the socket while nothing waits ahead of
/// it, else into the core's bounded queue (dropped and counted when full), drained by a
/// task.
fn send_datagrams(core: &Core, out: &mut Effects) {
    if out.datagrams.is_empty() {
        return;
    }
    let (fd, queue) = (core.udp_fd.get(), &core.udp_queue);
    let hub = &core.hub;
    let (max, per_dest) = {
        let c = hub.config();
        (c.udp_queue, c.udp_queue_per_dest)
    };
    let mut q = queue.borrow_mut();
    // While nothing waits in the queue, the datagrams go out in batches, one system call
    // for many; from the first the socket does not take, one by one as before.
    let mut sent = 0;
    if q.is_empty() && out.datagrams.len() > 1 {
        while sent < out.datagrams.len() {
            let batch: Vec<(&[u8], std::net::SocketAddr)> = out.datagrams
                [sent..(sent + sys::SEND_BATCH).min(out.datagrams.len())]
                .iter()
                .map(|d| (&d.frame[..], d.to))
                .collect();
            let n = sys::send_many_now(fd, &batch);
            sent += n;
            if n < batch.len() {
                break;
            }
        }
    }
    for d in out.datagrams.drain(..).skip(sent) {
        if !q.is_ahead_of(&d) {
            match sys::send_to_now(fd, &d.frame, d.to) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(to = %d.to, error = %e, "udp send failed");
                    continue;
                }
            }
        }
        let dropped = q.offer(d, max, per_dest) as u64;
        (hub.counters().udp_dropped).fetch_add(dropped, Ordering::Relaxed);
    }
    if !q.is_empty() && !q.sending {
        q.sending = true;
        tokio::task::spawn_local(drain_udp(fd, queue.clone()));
    }
}

/// Sends queued datagrams, replies first, as the socket has room for them, so that
/// receiving goes on meanwhile. (A full non-blocking UDP socket answers `WouldBlock`,
/// which io_uring passes on rather than waiting; so this waits with a short timer.)
async fn drain_udp(fd: RawFd, queue: Rc<RefCell<SendQueue>>) {
    loop {
        {
            let mut q = queue.borrow_mut();
            while let Some(d) = q.front() {
                match sys::send_to_now(fd, &d.frame, d.to) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => debug!(to = %d.to, error = %e, "udp send failed"),
                    Ok(_) => {}
                }
                q.pop();
            }
            if q.is_empty() {
                q.sending = false;
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod size_tests {
    /// An idle connection is its slot in the core's table (and its `Shim`): keep it small.
    #[test]
    fn an_idle_connection_stays_small() {
        let uring = std::mem::size_of::<super::Slot<crate::driver::uring::UringStream>>();
        let epoll = std::mem::size_of::<super::Slot<crate::driver::epoll::EpollStream>>();
        assert!(uring <= 144, "a slot on io_uring is {uring} bytes");
        assert!(epoll <= 144, "a slot on epoll is {epoll} bytes");
    }
}
