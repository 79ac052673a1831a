//! The server: sockets, one pinned runtime per core, and the loops every driver shares.
//!
//! Each core owns a TCP listener and a UDP socket, all bound to one address with
//! SO_REUSEPORT, so the kernel spreads connections and datagram sources over the cores and
//! no accept lock is shared. A core runs four kinds of task, all local to its thread:
//! the accept loop, one reader and one writer per connection, the UDP receive loop, and a
//! sweeper that fires identify deadlines and idle timeouts (so a silent socket is closed
//! even if it never sends a byte).
//!
//! The loops are written once, over the small [`Stream`], [`Listener`] and [`Datagrams`]
//! traits; `uring.rs` (tokio-uring) and `epoll.rs` (tokio) only implement those traits and
//! start their runtime. All protocol decisions are made by [`Connection`], [`Hub`] and
//! [`udp::on_datagram`].

pub mod epoll;
pub mod uring;

use crate::config::{Config, IoMode};
use crate::hub::{Hub, Outgoing};
use crate::metrics::Latency;
use crate::session::{Connection, Flow};
use crate::shim::{CloseReason, OutState, Shim};
use crate::udp::{self, QuitLimiter};
use bytes::Bytes;
use slab::Slab;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{debug, info, warn};

/// A connected TCP socket, as a driver provides it.
pub(crate) trait Stream: 'static {
    /// Reads into the spare capacity of `buf` (which is empty); returns the bytes read.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// The descriptor, for a shutdown or a direct send from another core.
    fn fd(&self) -> RawFd;
    /// Reads what the socket already holds into the spare capacity of `buf`, without
    /// waiting: one non-blocking recv(2), `WouldBlock` when nothing has arrived yet.
    fn try_read_now(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let spare = buf.spare_capacity_mut();
        // SAFETY: recv(2) writes at most `spare.len()` bytes into the spare capacity, and
        // exactly the count it returns are then marked initialised.
        let n = unsafe {
            libc::recv(
                self.fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above.
        unsafe { buf.set_len(buf.len() + n as usize) };
        Ok(n as usize)
    }
    /// Shuts both directions down (wakes a pending read with end of file).
    fn shutdown(&self);
}

/// A listening TCP socket.
pub(crate) trait Listener: 'static {
    /// The connection type.
    type Conn: Stream;
    /// Accepts one connection.
    async fn accept(&self) -> io::Result<(Self::Conn, SocketAddr)>;
}

/// A bound UDP socket.
pub(crate) trait Datagrams: 'static {
    /// Receives one datagram into the spare capacity of `buf`.
    async fn recv_from(&self, buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>);
    /// Sends one datagram.
    async fn send_to(&self, buf: Bytes, to: SocketAddr) -> io::Result<()>;
}

/// What a core's tasks share.
pub(crate) struct Core {
    pub hub: Arc<Hub>,
    pub index: usize,
    /// This core's connections, for the sweeper, each with a flag set when the sweeper
    /// last found one of its timers run out.
    conns: RefCell<Slab<(Arc<Shim>, Cell<bool>)>>,
}

/// Read buffer size for a quiet connection: small, so that an idle shim costs little.
const READ_SMALL: usize = 512;
/// Read buffer size a busy connection grows to.
const READ_LARGE: usize = 64 * 1024;
/// How long a closing connection may take to flush its last frame before it is cut.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

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
    });
    tokio::task::spawn_local(sweep(core.clone()));
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
                Err(why) => refuse(stream.fd(), why.message()),
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

/// Turns away a connection that a limit refused: the reason in one Error frame (nothing
/// for a source outside the allowed networks), then close. Best effort and without
/// waiting: the socket's buffer always has room for one short frame.
fn refuse(fd: RawFd, msg: &str) {
    if !msg.is_empty() {
        let mut f = Vec::with_capacity(msg.len() + 2);
        crate::frame::encode(crate::frame::Opcode::Error, msg.as_bytes(), &mut f);
        // SAFETY: plain non-blocking socket calls on a descriptor this task owns; the
        // buffers outlive the calls.
        unsafe {
            libc::send(
                fd,
                f.as_ptr().cast(),
                f.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            libc::shutdown(fd, libc::SHUT_WR);
            // Unread input would make the close send a reset, which can destroy the
            // Error frame before the client reads it.
            let mut sink = [0u8; 1024];
            libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT);
        }
    }
}

/// On a graceful shutdown, sends Quit to every connection of this core (identified or
/// not) and closes it; the readers then end as their sockets shut down.
async fn quit_all(core: Rc<Core>) {
    core.hub.shutdown_started().await;
    let conns = core.conns.borrow();
    for (_, (shim, _)) in conns.iter() {
        if shim.outbox.state() == OutState::Open {
            core.hub
                .close_with(shim, CloseReason::Shutdown, &crate::session::QUIT);
        }
    }
    debug!(
        core = core.index,
        conns = conns.len(),
        "sent Quit to every connection"
    );
}

async fn serve<S: Stream>(core: Rc<Core>, stream: S, peer: SocketAddr) {
    let accepted = Instant::now();
    let stream = Rc::new(stream);
    let mut conn = Connection::accept(&core.hub, core.index, peer, accepted);
    let shim = conn.shim().clone();
    shim.outbox.attach_fd(stream.fd());
    let key = core
        .conns
        .borrow_mut()
        .insert((shim.clone(), Cell::new(false)));
    let writer = tokio::task::spawn_local(write_loop(stream.clone(), shim.clone()));

    let mut buf = Vec::with_capacity(READ_SMALL);
    // The Identify usually arrives right behind the connect: read it at once if it is
    // there, which saves the handshake one trip through the driver.
    let mut ready = match stream.try_read_now(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        res => Some(res),
    };
    let reason = loop {
        let res = match ready.take() {
            Some(res) => res,
            None => {
                let (res, b) = stream.read(buf).await;
                buf = b;
                res
            }
        };
        match res {
            Ok(0) => break CloseReason::Eof,
            Ok(n) => {
                let flow = conn.on_bytes(&core.hub, &buf[..n], Instant::now());
                flush(conn.outgoing());
                if conn.take_session_queued() {
                    let hub = &core.hub;
                    hub.metrics
                        .record(core.index, Latency::Handshake, accepted.elapsed());
                }
                if let Flow::Close(r) = flow {
                    break r;
                }
                // Grow for a busy connection, shrink back when it goes quiet.
                let cap = buf.capacity();
                let full = n == cap;
                if full && cap < READ_LARGE {
                    buf = Vec::with_capacity((cap * 4).min(READ_LARGE));
                } else if n < READ_SMALL / 2 && cap > READ_SMALL {
                    buf = Vec::with_capacity(READ_SMALL);
                } else {
                    buf.clear();
                }
                if full {
                    // More is waiting: let every other connection on this core have its
                    // turn first, so a shim that floods cannot starve them (a read that
                    // finds data ready may not yield to the scheduler by itself).
                    tokio::task::yield_now().await;
                }
            }
            Err(e) => {
                debug!(conn = shim.serial, error = %e, "read failed");
                break CloseReason::IoError;
            }
        }
    };
    drop(buf);
    let reason = conn.finish(&core.hub, reason);
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_LINGER, &mut writer)
        .await
        .is_err()
    {
        shim.outbox.kick(reason);
        let _ = writer.await;
    }
    core.conns.borrow_mut().remove(key);
    shim.outbox.detach_fd();
    core.hub.release(peer.ip());
}

/// Flushes, once each, the outboxes a batch of input queued frames on.
fn flush(out: &mut Outgoing) {
    for shim in out.flush.drain(..) {
        shim.outbox.flush();
    }
}

/// Writes what a flush could not send at once (the socket was full), and the last frame
/// of a closing connection; then shuts the socket down.
async fn write_loop<S: Stream>(stream: Rc<S>, shim: Arc<Shim>) {
    let mut buf = Vec::new();
    loop {
        let state = shim.outbox.take(&mut buf);
        let wrote = !buf.is_empty() && state != OutState::Kicked;
        if wrote {
            let (res, b) = stream.write_all(buf).await;
            buf = b;
            if let Err(e) = res {
                debug!(conn = shim.serial, error = %e, "write failed");
                shim.outbox.kick(CloseReason::IoError);
                stream.shutdown();
                return;
            }
        }
        buf.clear();
        if buf.capacity() > READ_LARGE {
            buf = Vec::new();
        }
        if state != OutState::Open {
            stream.shutdown();
            return;
        }
        // After a write, take again at once: frames queued meanwhile were not flushed by
        // their producers (a write was in flight), so they are this task's to send. Only
        // an empty take (which lets producers send directly again) waits for a wake-up.
        if !wrote {
            shim.outbox.wait().await;
        }
    }
}

async fn sweep(core: Rc<Core>) {
    loop {
        // Read each time round: a reload may change the timeouts.
        let tick = {
            let c = core.hub.config();
            (c.identify_timeout.min(c.idle_timeout) / 10)
                .clamp(Duration::from_millis(5), Duration::from_millis(250))
        };
        tokio::time::sleep(tick).await;
        let now = Instant::now();
        for (_, (shim, was_expired)) in core.conns.borrow().iter() {
            if shim.outbox.state() != OutState::Open {
                continue;
            }
            // A timer must be found run out on two sweeps in a row: after a stall of this
            // core, frames already received but not yet read get one tick to count.
            match core.hub.expired(shim, now) {
                Some(reason) if was_expired.get() => core.hub.expire(shim, reason),
                Some(_) => was_expired.set(true),
                None => was_expired.set(false),
            }
        }
    }
}

async fn udp_loop<U: Datagrams>(core: Rc<Core>, sock: Rc<U>) {
    let mut lim = QuitLimiter::new(core.hub.config().udp_quit_per_sec);
    let mut out = Outgoing::default();
    // Datagrams wait here, in order, while a fan-out is being sent: a later reply to the
    // same source must never overtake an earlier one.
    let queue: Rc<RefCell<VecDeque<(SocketAddr, Bytes)>>> = Rc::default();
    let sending = Rc::new(Cell::new(false));
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        let (res, b) = sock.recv_from(buf).await;
        buf = b;
        match res {
            Ok((n, src)) => {
                let now = Instant::now();
                if !core.hub.admit_datagram(src, now) {
                    buf.clear();
                    continue;
                }
                udp::on_datagram(
                    &core.hub,
                    core.index,
                    &mut lim,
                    src,
                    &buf[..n],
                    now,
                    &mut out,
                );
                flush(&mut out);
                if out.datagrams.len() == 1 && !sending.get() {
                    // The common case (a Pong, an Ack): send it now, no queue, no task.
                    let (to, d) = out.datagrams.pop().expect("one item");
                    count_datagram(&core.hub, &d);
                    if let Err(e) = sock.send_to(d, to).await {
                        debug!(%to, error = %e, "udp send failed");
                    }
                } else if !out.datagrams.is_empty() {
                    out.datagrams
                        .iter()
                        .for_each(|(_, d)| count_datagram(&core.hub, d));
                    queue.borrow_mut().extend(out.datagrams.drain(..));
                    if !sending.replace(true) {
                        tokio::task::spawn_local(drain_udp(
                            sock.clone(),
                            queue.clone(),
                            sending.clone(),
                        ));
                    }
                }
            }
            Err(e) => debug!(error = %e, "udp receive failed"),
        }
        buf.clear();
    }
}

fn count_datagram(hub: &Hub, d: &[u8]) {
    hub.metrics.frame(
        crate::metrics::Dir::Out,
        crate::metrics::Transport::Udp,
        d[0],
        d.len(),
    );
}

/// Sends queued datagrams in order, so that receiving goes on during a large fan-out.
async fn drain_udp<U: Datagrams>(
    sock: Rc<U>,
    queue: Rc<RefCell<VecDeque<(SocketAddr, Bytes)>>>,
    sending: Rc<Cell<bool>>,
) {
    loop {
        let next = queue.borrow_mut().pop_front();
        let Some((to, d)) = next else { break };
        if let Err(e) = sock.send_to(d, to).await {
            debug!(%to, error = %e, "udp send failed");
        }
    }
    sending.set(false);
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The address is taken.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A runtime could not be started.
    #[error("cannot start the {io} runtime: {msg}")]
    Runtime {
        /// Which driver.
        io: &'static str,
        /// Why.
        msg: String,
    },
}

/// A started server.
pub struct Running {
    /// The address served (with the real port when port 0 was asked for).
    pub addr: SocketAddr,
    /// The driver in use.
    pub io: IoMode,
    /// The shared state.
    pub hub: Arc<Hub>,
}

fn reuse_socket(addr: SocketAddr, ty: Type, reuseport: bool) -> io::Result<Socket> {
    let proto = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    Ok(s)
}

/// Fails when another socket holds `addr` (TCP or UDP), even one with SO_REUSEPORT that
/// would otherwise quietly share the port with us.
fn probe_free(addr: SocketAddr) -> io::Result<()> {
    reuse_socket(addr, Type::STREAM, false)?;
    reuse_socket(addr, Type::DGRAM, false)?;
    Ok(())
}

type CoreSockets = Vec<(std::net::TcpListener, std::net::UdpSocket)>;

fn bind_all(addr: SocketAddr, cores: usize) -> Result<(SocketAddr, CoreSockets), StartError> {
    let err = |source| StartError::Bind { addr, source };
    for _ in 0..32 {
        if addr.port() != 0 {
            probe_free(addr).map_err(err)?;
        }
        let first = reuse_socket(addr, Type::STREAM, true).map_err(err)?;
        let real = first
            .local_addr()
            .map_err(err)?
            .as_socket()
            .expect("an IP socket");
        if addr.port() == 0 && reuse_socket(real, Type::DGRAM, false).is_err() {
            continue; // the UDP side of this ephemeral port is taken: draw another
        }
        let mut out = Vec::with_capacity(cores);
        let mut tcp = Some(first);
        for _ in 0..cores {
            let t = match tcp.take() {
                Some(t) => t,
                None => reuse_socket(real, Type::STREAM, true).map_err(err)?,
            };
            t.listen(4096).map_err(err)?;
            let u = reuse_socket(real, Type::DGRAM, true).map_err(err)?;
            out.push((t.into(), u.into()));
        }
        return Ok((real, out));
    }
    Err(err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free ephemeral port for TCP and UDP",
    )))
}

/// Starts the server: binds every core's sockets, then one pinned thread per core.
/// Returns once every core is serving.
pub fn start(config: Config) -> Result<Running, StartError> {
    let io = match config.io {
        IoMode::Uring => {
            uring::probe().map_err(|e| StartError::Runtime {
                io: "io_uring",
                msg: format!("{e} (use --io epoll or --io auto)"),
            })?;
            IoMode::Uring
        }
        IoMode::Auto => match uring::probe() {
            Ok(()) => IoMode::Uring,
            Err(e) => {
                warn!(error = %e, "io_uring unavailable, falling back to epoll");
                IoMode::Epoll
            }
        },
        other => other,
    };
    let (addr, sockets) = bind_all(config.listen, config.cores)?;
    let hub = Hub::new(config);
    let core_ids = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for (index, (tcp, udp)) in sockets.into_iter().enumerate() {
        let hub = hub.clone();
        let ready = ready_tx.clone();
        let core_id = core_ids.get(index % core_ids.len().max(1)).copied();
        std::thread::Builder::new()
            .name(format!("velium-core-{index}"))
            .spawn(move || {
                if let Some(id) = core_id {
                    core_affinity::set_for_current(id);
                }
                crate::metrics::set_core(index);
                match io {
                    IoMode::Epoll => epoll::run(hub, index, tcp, udp, ready),
                    _ => uring::run(hub, index, tcp, udp, ready),
                }
            })
            .map_err(|e| StartError::Runtime {
                io: "thread",
                msg: e.to_string(),
            })?;
    }
    drop(ready_tx);
    for r in ready_rx.iter().take(hub.config().cores) {
        r.map_err(|msg| StartError::Runtime {
            io: if io == IoMode::Epoll {
                "epoll"
            } else {
                "io_uring"
            },
            msg,
        })?;
    }
    info!(%addr, cores = hub.config().cores, io = ?io, "listening");
    Ok(Running { addr, io, hub })
}
