//! The epoll driver: one plain tokio runtime per core.
//!
//! The fallback where io_uring cannot be set up, and the peer the io_uring driver is
//! benchmarked against. Same loops, same protocol core; only the sockets differ.

use super::{Datagrams, Listener, Stream, run_core};
use crate::hub::Hub;
use bytes::Bytes;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

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
        let sockets = TcpListener::from_std(tcp).and_then(|l| Ok((l, UdpSocket::from_std(udp)?)));
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

impl Stream for TcpStream {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            if let Err(e) = self.readable().await {
                return (Err(e), buf);
            }
            match self.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return (res, buf),
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let mut off = 0;
        while off < buf.len() {
            match self.try_write(&buf[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.writable().await {
                        return (Err(e), buf);
                    }
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn shutdown(&self) {
        let _ = socket2::SockRef::from(self).shutdown(std::net::Shutdown::Both);
    }
}

impl Listener for TcpListener {
    type Conn = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (s, peer) = TcpListener::accept(self).await?;
        s.set_nodelay(true)?;
        Ok((s, peer))
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

    async fn send_to(&self, buf: Bytes, to: SocketAddr) -> io::Result<()> {
        UdpSocket::send_to(self, &buf, to).await.map(drop)
    }
}
