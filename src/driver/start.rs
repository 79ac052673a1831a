//! Starting the server: binding every core's sockets and starting one pinned thread per
//! core with its runtime.

use super::{epoll, sys, uring};
use crate::config::{Config, IoMode};
use crate::hub::Hub;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tracing::{info, warn};

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
            // Accepted sockets inherit TCP_NODELAY from the listener (Linux copies the
            // listener's options into each child): no setsockopt per connection.
            t.set_tcp_nodelay(true).map_err(err)?;
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
    sys::tune_allocator();
    let open_files = sys::raise_open_file_limit();
    let now = Instant::now();
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut config = config;
    if let Some(c) = &mut config.cluster
        && c.node.is_none()
    {
        // HOSTNAME:PORT, in the characters a node name may hold.
        let host: String = (sys::hostname().chars())
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' {
                    ch
                } else {
                    '-'
                }
            })
            .collect();
        let host = if host.is_empty() {
            "velium".into()
        } else {
            host
        };
        Arc::make_mut(c).node = Some(format!("{host}:{}", addr.port()));
    }
    let cluster = config.cluster.clone();
    let hub = Hub::with_open_file_limit(config, open_files, now, unix);
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
    info!(%addr, cores = hub.config().cores, io = %io.label(), "listening");
    if let Some(settings) = cluster {
        info!(node = %hub.cluster().map_or("", |c| &*c.node), url = %settings.url,
            name = %settings.name, "joining the cluster");
        super::cluster::spawn(hub.clone(), settings).map_err(|e| StartError::Runtime {
            io: "cluster thread",
            msg: e.to_string(),
        })?;
    }
    Ok(Running { addr, io, hub })
}
