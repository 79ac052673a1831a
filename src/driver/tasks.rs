//! The per-core loops, written once over the driver traits: accept, one reader and one
//! writer per connection, the UDP receive loop with its bounded send queues, and the
//! sweeper. They move bytes and time between the sockets and the hub, and decide nothing.

use super::{Buffers, Datagrams, Listener, Stream, sys};
use crate::hub::connection::{Connection, Flow, Input};
use crate::hub::datagram::{self, QuitLimiter, SendQueue};
use crate::hub::outbox::OutState;
use crate::hub::shim::{CloseReason, Shim};
use crate::hub::timers::CLOSE_LINGER;
use crate::hub::{Effects, Hub};
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// What a core's tasks share.
pub(crate) struct Core {
    pub hub: Arc<Hub>,
    pub index: usize,
    /// This core's connections, for the sweeper, each with its two-sweeps flag.
    conns: RefCell<Slab<(Arc<Shim>, Cell<bool>)>>,
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

impl Buffers for Core {
    fn take(&self) -> Vec<u8> {
        self.take_buffer()
    }
    fn give(&self, b: Vec<u8>) {
        self.give_buffer(b)
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
        conns: RefCell::new(Slab::new()),
        buffers: RefCell::new(Vec::new()),
        udp_fd: Cell::new(udp.fd()),
        udp_queue: Rc::default(),
    });
    tokio::task::spawn_local(sweep(core.clone()));
    tokio::task::spawn_local(state_loop(core.clone()));
    tokio::task::spawn_local(handoff_loop(core.clone()));
    // Batches for a core whose loop has not started yet wait in its inbox until it has.
    core.hub.handoff.start();
    if core.hub.cluster().is_some() {
        tokio::task::spawn_local(cluster_loop(core.clone()));
    }
    tokio::task::spawn_local(udp_loop(core.clone(), Rc::new(udp)));
    tokio::task::spawn_local(quit_all(core.clone()));
    accept_loop(core, listener).await;
    // Accepting stopped for a graceful shutdown: the connections and the UDP socket are
    // served on until the process exits.
    std::future::pending::<()>().await;
}

async fn accept_loop<L: Listener>(core: Rc<Core>, listener: L) {
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
                    tokio::task::spawn_local(serve(core.clone(), stream, peer));
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
async fn quit_all(core: Rc<Core>) {
    core.hub.shutdown_started().await;
    let conns = core.conns.borrow();
    core.hub.quit_all(conns.iter().map(|(_, (shim, _))| shim));
}

async fn serve<S: Stream>(core: Rc<Core>, stream: S, peer: SocketAddr) {
    let stream = Rc::new(stream);
    let mut conn = Connection::accept(&core.hub, core.index, peer, Instant::now());
    let shim = conn.shim().clone();
    shim.outbox.attach(stream.fd(), &sys::SOCKET_OPS);
    let key = core
        .conns
        .borrow_mut()
        .insert((shim.clone(), Cell::new(false)));
    // No writer until a write would block (most connections never need one).
    let mut writer = None;

    // The Identify usually arrives right behind the connect: read it at once if it is
    // there, which saves the handshake a wait for readiness.
    let mut ready = {
        let mut b = core.take_buffer();
        match stream.try_read_now(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                core.give_buffer(b);
                None
            }
            res => Some((res, b)),
        }
    };
    let reason = loop {
        let (res, buf) = match ready.take() {
            Some(r) => r,
            None => next_input(&core, &stream, &shim, &mut writer).await,
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
        // Boxed: the task of an idle connection is sized for waiting, not for this.
        let end = Box::pin(consume(&core, &mut conn, &*stream, buf, n)).await;
        conn.rest();
        if let Some(r) = end {
            break r;
        }
    };

    let reason = conn.finish(&core.hub, reason);
    // The last frame and the shutdown are the writer's: the running one, or one now.
    let writer = match writer.take() {
        Some(w) => w,
        None => spawn_writer(&core, &stream, &shim),
    };
    // Boxed: the timer is large, and only a closing connection needs it.
    Box::pin(linger(writer, &shim, reason)).await;
    core.conns.borrow_mut().remove(key);
    shim.outbox.detach();
    core.hub.release(peer.ip());
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
    stream: &Rc<S>,
    shim: &Arc<Shim>,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(write_loop(core.hub.clone(), stream.clone(), shim.clone()))
}

/// Waits for a connection's next input, holding no buffer meanwhile. While no writer
/// runs, also waits for the outbox to ask for one (a flush the socket could not take, or
/// a last frame) and starts it; a running writer ends once it has written everything,
/// and from then on the outbox is watched again.
async fn next_input<S: Stream>(
    core: &Core,
    stream: &Rc<S>,
    shim: &Arc<Shim>,
    writer: &mut Option<tokio::task::JoinHandle<()>>,
) -> (io::Result<usize>, Vec<u8>) {
    loop {
        match writer {
            Some(w) => {
                tokio::select! {
                    biased;
                    r = stream.read_ready(core) => return r,
                    _ = w => *writer = None,
                }
            }
            None => {
                tokio::select! {
                    biased;
                    r = stream.read_ready(core) => return r,
                    _ = shim.outbox.wait() => *writer = Some(spawn_writer(core, stream, shim)),
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
async fn write_loop<S: Stream>(hub: Arc<Hub>, stream: Rc<S>, shim: Arc<Shim>) {
    let mut buf = Vec::new();
    loop {
        let state = shim.outbox.take(&mut buf);
        let wrote = !buf.is_empty() && state != OutState::Kicked;
        if wrote {
            let res = if buf.len() <= WRITE_CHUNK {
                let (res, b) = stream.write_all(buf).await;
                buf = b;
                res
            } else {
                Box::pin(write_chunks(&hub, &*stream, &shim, &buf)).await
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
async fn write_chunks<S: Stream>(hub: &Hub, stream: &S, shim: &Shim, buf: &[u8]) -> io::Result<()> {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    for part in buf.chunks(WRITE_CHUNK) {
        chunk.clear();
        chunk.extend_from_slice(part);
        let (r, c) = stream.write_all(chunk).await;
        chunk = c;
        r?;
        shim.outbox.progress(part.len(), hub.ms(Instant::now()));
    }
    Ok(())
}

async fn sweep(core: Rc<Core>) {
    loop {
        // Read each time round: a reload may change the timeouts.
        tokio::time::sleep(core.hub.sweep_every()).await;
        let now = Instant::now();
        for (_, (shim, flagged)) in core.conns.borrow().iter() {
            core.hub.sweep(shim, flagged, now);
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
