//! The server on sockets: one pinned runtime per core, and the loops every driver shares.
//!
//! Each core owns a TCP listener and a UDP socket, all bound to one address with
//! SO_REUSEPORT, so the kernel spreads connections and datagram sources over the cores and
//! no accept lock is shared. The drivers hold sockets and loops only; every protocol
//! decision is made by the hub (`hub/`).
//!
//! - this file: the small [`Stream`], [`Listener`] and [`Datagrams`] traits a driver
//!   implements;
//! - `tasks.rs`: the per-core loops (accept, the readiness set, read, write, UDP,
//!   sweeper), written once over those traits;
//! - `start.rs`: binding the sockets, pinning the threads, start-up errors;
//! - `sys.rs`: every unsafe system call;
//! - `uring.rs` (tokio-uring) and `epoll.rs` (tokio): the two adapters.

pub mod cluster;
pub mod epoll;
mod start;
pub mod sys;
mod tasks;
pub mod uring;

pub use start::{Running, StartError, start};

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Waiting for room on a socket whose writes are non-blocking sends: the core's
/// readiness set reports it (see `tasks.rs`).
pub(crate) trait Room {
    /// A send found the socket full.
    fn full(&self);
    /// Waits until the socket is reported writable again.
    async fn wait(&self);
}

/// A connected TCP socket, as a driver provides it. Its input is waited for by the core's
/// readiness set (`tasks.rs`), which holds every socket of the core; the driver writes.
pub(crate) trait Stream: 'static {
    /// Whether the readiness set must report room to write (writes are non-blocking
    /// sends that wait for it), rather than writes completing in the driver.
    const WRITE_READINESS: bool;
    /// Writes all of `buf`, waiting on `room` when the socket is full (if writes are
    /// non-blocking sends).
    async fn write_all(&self, buf: Vec<u8>, room: &impl Room) -> (io::Result<()>, Vec<u8>);
    /// The descriptor: for reads, the readiness set, a shutdown, or a direct send from
    /// another core.
    fn fd(&self) -> RawFd;
    /// Reads what the socket already holds, without waiting (`WouldBlock` if nothing).
    fn try_read_now(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        sys::recv_now(self.fd(), buf)
    }
    /// Shuts both directions down (the readiness set then reports end of file).
    fn shutdown(&self);
    /// Lets every other task of the core run, and the driver do its I/O, before this one
    /// goes on (between slices of a long read).
    async fn yield_turn(&self) {
        tokio::task::yield_now().await
    }
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
    /// The descriptor, for a direct non-blocking send.
    fn fd(&self) -> RawFd;
}
