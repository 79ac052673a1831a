//! The epoll driver: one plain tokio runtime per core.
//!
//! The fallback where io_uring cannot be set up, and the peer the io_uring driver is
//! benchmarked against. Same loops, same protocol core; only the sockets differ.
//!
//! TCP sockets are std sockets registered with tokio's reactor through [`AsyncFd`] rather
//! than `tokio::net` types, so that the driver decides when readiness is cleared. tokio
//! clears a socket's read readiness only when a read fails with `EWOULDBLOCK`, so the
//! `readable()` + `try_read_buf()` pattern pays a second read(2) after every message just
//! to learn that nothing more is there. Here a read that returns fewer bytes than it was
//! offered has drained the socket, and the readiness is cleared at once: the next read
//! waits for epoll instead (the edge-triggered registration reports any byte that arrives
//! after the read, and a readiness event newer than the one read is never cleared).

use super::tasks::run_core;
use super::{Buffers, Datagrams, Listener, Stream};
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

/// A connected TCP socket (non-blocking) registered with the core's reactor.
pub(super) struct EpollStream(AsyncFd<std::net::TcpStream>);

impl Stream for EpollStream {
    async fn read_ready(&self, pool: &impl Buffers) -> (io::Result<usize>, Vec<u8>) {
        super::read_when_ready(&self.0, pool).await
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut off = 0;
        while off < buf.len() {
            // A socket with room is reported writable at once (no system call).
            let mut guard = match self.0.writable().await {
                Ok(g) => g,
                Err(e) => return (Err(e), buf),
            };
            match guard.try_io(|s| s.get_ref().write(&buf[off..])) {
                Ok(Ok(n)) => off += n,
                Ok(Err(e)) => return (Err(e), buf),
                Err(_would_block) => {}
            }
        }
        (Ok(()), buf)
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn shutdown(&self) {
        let _ = self.0.get_ref().shutdown(std::net::Shutdown::Both);
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
            let stream = std::net::TcpStream::from(sock);
            // SAFETY: as for the listener: the stream owns its descriptor for as long as
            // the AsyncFd holds it.
            let fd = unsafe { AsyncFd::register(stream) }?;
            return Ok((EpollStream(fd), peer));
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
