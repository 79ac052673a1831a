//! The epoll driver: one plain tokio runtime per core.
//!
//! The fallback where io_uring cannot be set up, and the peer the io_uring driver is
//! benchmarked against. Same loops, same protocol core; only the sockets differ.
//!
//! TCP sockets are plain non-blocking std sockets: their readiness comes from the core's
//! readiness set (`tasks.rs`), which reports input and room to write, so a connection
//! holds no registration of its own with the runtime. Writes are non-blocking sends.

use super::tasks::run_core;
use super::{Datagrams, Listener, Room, Stream};
use crate::hub::Hub;
use socket2::SockRef;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

pub(super) fn run(
    hub: Arc<Hub>,
    index: usize,
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
    ready: Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let sockets = EpollListener::new(tcp).and_then(|l| Ok((l, UdpSocket::from_std(udp)?)));
        match sockets {
            Ok((listener, udp)) => {
                let _ = ready.send(Ok(()));
                run_core(hub, index, listener, udp).await;
            }
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
            }
        }
    });
}

/// A connected TCP socket (non-blocking).
pub(super) struct EpollStream(std::net::TcpStream);

impl Stream for EpollStream {
    const WRITE_READINESS: bool = true;

    async fn write_all(&self, buf: Vec<u8>, room: &impl Room) -> (io::Result<()>, Vec<u8>) {
        let mut off = 0;
        while off < buf.len() {
            match (&self.0).write(&buf[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    room.full();
                    room.wait().await;
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// The core's listening socket (non-blocking) registered with its reactor.
pub(super) struct EpollListener(AsyncFd<std::net::TcpListener>);

impl EpollListener {
    fn new(l: std::net::TcpListener) -> io::Result<EpollListener> {
        l.set_nonblocking(true)?;
        // SAFETY: a std listener owns its descriptor until it is dropped, which happens
        // only with this AsyncFd, and `as_raw_fd` always returns that descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }?;
        Ok(EpollListener(fd))
    }
}

impl Listener for EpollListener {
    type Conn = EpollStream;

    async fn accept(&self) -> io::Result<(EpollStream, SocketAddr)> {
        loop {
            let mut guard = self.0.readable().await?;
            // accept4 makes the socket non-blocking and close-on-exec in the same call.
            let accepted = guard.try_io(|l| {
                SockRef::from(l.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            });
            let (sock, peer) = match accepted {
                Ok(r) => r?,
                Err(_would_block) => continue,
            };
            // TCP_NODELAY comes from the listener (see `start.rs`).
            let peer = peer.as_socket().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP peer")
            })?;
            return Ok((EpollStream(std::net::TcpStream::from(sock)), peer));
        }
    }
}

impl Datagrams for UdpSocket {
    async fn recv_from(&self, mut buf: Vec<u8>) -> (io::Result<(usize, SocketAddr)>, Vec<u8>) {
        loop {
            if let Err(e) = self.readable().await {
                return (Err(e), buf);
            }
            match self.try_recv_buf_from(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return (res, buf),
            }
        }
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}
