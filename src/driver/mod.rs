//! The server on sockets: one pinned runtime per core, and the loops every driver shares.
//!
//! Each core owns a TCP listener and a UDP socket, all bound to one address with
//! SO_REUSEPORT, so the kernel spreads connections and datagram sources over the cores and
//! no accept lock is shared. The drivers hold sockets and loops only; every protocol
//! decision is made by the hub (`hub/`).
//!
//! - this file: the small [`Stream`], [`Listener`] and [`Datagrams`] traits a driver
//!   implements;
//! - `tasks.rs`: the per-core loops (accept, read, write, UDP, sweeper), written once over
//!   those traits;
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
use std::os::fd::{AsRawFd, RawFd};

/// Where a connection's reads go: the large buffers of its core, lent for one read and
/// its handling, so that a connection waiting for input holds no buffer at all.
pub(crate) trait Buffers {
    /// A large, empty buffer.
    fn take(&self) -> Vec<u8>;
    /// Gives a buffer back.
    fn give(&self, b: Vec<u8>);
}

/// A connected TCP socket, as a driver provides it.
pub(crate) trait Stream: 'static {
    /// Waits until the socket has input (or end of file, or an error), then reads what it
    /// holds into a buffer taken from `pool`, and returns it with the bytes read. Nothing
    /// is held while waiting. A read that comes back short has drained the socket: the
    /// next call waits for new input rather than trying a read that would find none. The
    /// buffer is returned with an error too (the caller gives it back).
    async fn read_ready(&self, pool: &impl Buffers) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf`.
    async fn write_all(&self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>);
    /// The descriptor, for a shutdown or a direct send from another core.
    fn fd(&self) -> RawFd;
    /// Reads what the socket already holds, without waiting (`WouldBlock` if nothing).
    fn try_read_now(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        sys::recv_now(self.fd(), buf)
    }
    /// Shuts both directions down (wakes a pending read with end of file).
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

/// Waits until `fd` is readable, then reads what it holds into a buffer from `pool` (see
/// [`Stream::read_ready`]): the readiness is kept after a full read and cleared after a
/// short one, which drained the socket.
async fn read_when_ready<T: AsRawFd>(
    fd: &tokio::io::unix::AsyncFd<T>,
    pool: &impl Buffers,
) -> (io::Result<usize>, Vec<u8>) {
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => return (Err(e), pool.take()),
        };
        let mut buf = pool.take();
        let offered = buf.capacity() - buf.len();
        // `try_io` clears the readiness itself when the read would block.
        match guard.try_io(|s| sys::recv_now(s.get_ref().as_raw_fd(), &mut buf)) {
            Ok(Ok(n)) => {
                // A short read emptied the receive queue: wait for readiness before the
                // next read rather than paying a read that finds nothing. (End of file,
                // n == 0, keeps its readiness: tokio never clears it.)
                if n > 0 && n < offered {
                    guard.clear_ready();
                }
                return (Ok(n), buf);
            }
            Ok(Err(e)) => return (Err(e), buf),
            Err(_would_block) => pool.give(buf),
        }
    }
}
