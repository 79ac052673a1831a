//! The io_uring driver: one tokio-uring runtime per core.
//!
//! Accepts, the writer's writes and datagram receives are io_uring operations that own
//! their buffers. A connection's input is waited for by the core's readiness set
//! (`tasks.rs`) and read into one of the core's buffers: tokio-uring 0.5 has no poll
//! operation and no provided buffers, so a read submitted to the ring would hold a buffer
//! of its own for as long as the connection is idle. This file only adapts tokio-uring's
//! sockets to the shared loops in `tasks.rs`.

use super::tasks::run_core;
use super::{Datagrams, Listener, Room, Stream};
use crate::hub::Hub;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use tokio_uring::net::{TcpListener, TcpStream, UdpSocket};

fn builder() -> tokio_uring::Builder {
    let mut b = tokio_uring::builder();
    // Room for a burst of submissions (a login storm, a fan-out) before a flush.
    b.entries(1024);
    b
}

/// The ring as this driver wants it where the kernel allows (5.19 and later): only this
/// thread submits (SINGLE_ISSUER), and completions are not pushed to it with an
/// interrupt but run at its next entry into the kernel, which a busy core makes anyway
/// (COOP_TASKRUN).
fn tuned_builder() -> tokio_uring::Builder {
    let mut b = builder();
    b.uring_builder(
        tokio_uring::uring_builder()
            .setup_single_issuer()
            .setup_coop_taskrun(),
    );
    b
}

/// A runtime on the tuned ring, or on a plain one where the kernel refuses the flags.
fn runtime() -> io::Result<tokio_uring::Runtime> {
    tokio_uring::Runtime::new(&tuned_builder()).or_else(|_| tokio_uring::Runtime::new(&builder()))
}

/// Checks that io_uring can serve here: that a ring can be set up (kernel support, sysctl
/// `kernel.io_uring_disabled`, seccomp) and that the kernel has every operation this
/// driver submits (older kernels create rings but lack the networking operations).
pub fn probe() -> io::Result<()> {
    use io_uring::opcode::{Accept, Close, Read, RecvMsg, SendMsg, Write};
    let ring = io_uring::IoUring::new(8)?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p)?;
    let needed = [
        (Accept::CODE, "accept"),
        (Read::CODE, "read"),
        (Write::CODE, "write"),
        (RecvMsg::CODE, "recvmsg"),
        (SendMsg::CODE, "sendmsg"),
        (Close::CODE, "close"),
    ];
    if let Some((_, name)) = needed.iter().find(|(code, _)| !p.is_supported(*code)) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the kernel's io_uring lacks the {name} operation"),
        ));
    }
    runtime().map(drop)
}

pub(super) fn run(
    hub: Arc<Hub>,
    index: usize,
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
    ready: Sender<Result<(), String>>,
) {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    rt.block_on(async move {
        let listener = TcpListener::from_std(tcp);
        let udp = UdpSocket::from_std(udp);
        let _ = ready.send(Ok(()));
        run_core(hub, index, listener, udp).await;
    });
}

/// An accepted connection: the tokio-uring socket, which owns the descriptor and writes
/// through the ring.
pub(crate) struct UringStream(TcpStream);

impl Stream for UringStream {
    /// Writes complete in the ring.
    const WRITE_READINESS: bool = false;

    async fn write_all(&self, buf: Vec<u8>, _room: &impl Room) -> (io::Result<()>, Vec<u8>) {
        self.0.write_all(buf).await
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }

    /// tokio-uring submits queued operations only when its thread parks: a task that
    /// merely yields stays runnable, the thread never parks, and every other connection's
    /// reads and the UDP receive never reach the kernel. A no-op operation completes only
    /// after the next submission, so waiting for one lets the ring turn.
    async fn yield_turn(&self) {
        let _ = tokio_uring::no_op().await;
    }
}

impl Listener for TcpListener {
    type Conn = UringStream;

    async fn accept(&self) -> io::Result<(UringStream, SocketAddr)> {
        // TCP_NODELAY comes from the listener (see `start.rs`).
        let (stream, peer) = TcpListener::accept(self).await?;
        Ok((UringStream(stream), peer))
    }
}

impl Datagrams for UdpSocket {
    async fn recv_from(&self, buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>) {
        UdpSocket::recv_from(self, buf).await
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}
