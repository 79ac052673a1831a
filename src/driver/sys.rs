//! Every unsafe system call of the server, in one place.
//!
//! Each is a plain non-blocking socket call (or a resource limit) on a descriptor the
//! caller owns or has attached to an outbox; the outbox clears that descriptor under its
//! lock before the driver closes the socket, so none of these ever touches a stale one.

use crate::hub::outbox::SocketOps;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The socket calls an outbox makes, from any core.
pub static SOCKET_OPS: SocketOps = SocketOps {
    send: send_now,
    shutdown,
};

/// One non-blocking send(2); a closed peer is `EPIPE`, never SIGPIPE.
pub fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `fd` is an open socket (see the module doc); the buffer is valid for
    // `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// shutdown(2) of both directions: wakes a reader or writer parked on the socket on any
/// thread.
pub fn shutdown(fd: RawFd) {
    // SAFETY: see the module doc; shutdown takes no memory.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// A new epoll set (close-on-exec): a core's readiness set for its connections.
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 takes no memory; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds the socket `fd` to the epoll set `epfd`, edge-triggered, reporting input (and
/// end of file), and room to write when `write` is set, each event tagged with `key`.
/// The kernel drops the registration when the socket is closed.
pub fn epoll_add(epfd: RawFd, fd: RawFd, key: u64, write: bool) -> io::Result<()> {
    let mut events = libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET;
    if write {
        events |= libc::EPOLLOUT;
    }
    let mut ev = libc::epoll_event {
        events: events as u32,
        u64: key,
    };
    // SAFETY: `ev` is valid for the call; both descriptors are the caller's.
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes the events ready in the epoll set `epfd` into `events` (cleared first), without
/// waiting.
pub fn epoll_take(epfd: RawFd, events: &mut Vec<libc::epoll_event>) -> io::Result<()> {
    events.clear();
    let room = events.capacity().min(i32::MAX as usize) as i32;
    // SAFETY: epoll_wait writes at most `room` events into the vector's spare capacity,
    // and exactly the count it returns are then marked initialised.
    let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), room, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    unsafe { events.set_len(n as usize) };
    Ok(())
}

/// Reads what the socket already holds into the spare capacity of `buf`, without
/// waiting: one non-blocking recv(2), `WouldBlock` when nothing has arrived yet.
pub fn recv_now(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recv(2) writes at most `spare.len()` bytes into the spare capacity, and
    // exactly the count it returns are then marked initialised.
    let n = unsafe {
        libc::recv(
            fd,
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

/// Receives one datagram the UDP socket `fd` already holds into the spare capacity of
/// `buf`, without waiting: one non-blocking recvfrom(2), `WouldBlock` when none is there.
pub fn recv_from_now(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<(usize, SocketAddr)> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: recvfrom(2) writes at most `spare.len()` bytes into the spare capacity and
    // at most `len` bytes of address into the storage socket2 provides; exactly the count
    // it returns are then marked initialised.
    let (n, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let n = libc::recvfrom(
                fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
                storage.cast(),
                len,
            );
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })?
    };
    let from = addr
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP source"))?;
    // SAFETY: see above.
    unsafe { buf.set_len(buf.len() + n) };
    Ok((n, from))
}

/// Datagrams one sendmmsg(2) takes at most.
pub const SEND_BATCH: usize = 64;

/// Sends the datagrams `frames` (each with its destination) from the UDP socket `fd` with
/// one non-blocking sendmmsg(2), at most [`SEND_BATCH`] of them; returns how many were
/// sent, the first in order (fewer when the socket filled up or one failed: the caller
/// sends the rest one by one, which tells which and why).
pub fn send_many_now(fd: RawFd, frames: &[(&[u8], SocketAddr)]) -> usize {
    let n = frames.len().min(SEND_BATCH);
    if n == 0 {
        return 0;
    }
    let addrs: Vec<socket2::SockAddr> = frames[..n]
        .iter()
        .map(|(_, to)| socket2::SockAddr::from(*to))
        .collect();
    let mut iov: Vec<libc::iovec> = frames[..n]
        .iter()
        .map(|(buf, _)| libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is a valid empty header; each is then pointed at one
    // iovec and one address, which outlive the call, as do the buffers they point to.
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = addrs[i].len();
            m.msg_hdr.msg_iov = &mut iov[i];
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: `msgs` holds `n` headers set up above.
    let sent = unsafe {
        libc::sendmmsg(
            fd,
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    sent.max(0) as usize
}

/// One non-blocking sendto(2) of a datagram from the UDP socket `fd`.
pub fn send_to_now(fd: RawFd, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    let addr = socket2::SockAddr::from(to);
    // SAFETY: `fd` is the core's open UDP socket; the buffer and the address are valid
    // for the duration of the call.
    let n = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            addr.as_ptr().cast(),
            addr.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Turns away a connection a limit refused: `frame` (one Error frame, or nothing), then
/// close. Best effort and without waiting: the socket's buffer always has room for one
/// short frame.
pub fn refuse(fd: RawFd, frame: &[u8]) {
    if frame.is_empty() {
        return;
    }
    let _ = send_now(fd, frame);
    // SAFETY: plain non-blocking socket calls on a descriptor the caller owns; the
    // buffer outlives the calls.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
        // Unread input would make the close send a reset, which can destroy the Error
        // frame before the client reads it.
        let mut sink = [0u8; 1024];
        libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT);
    }
}

/// Raises the soft open-file limit to the hard one and returns it: every shim holds a
/// descriptor, and the soft default (often 1024) would cap a fleet long before memory
/// does. The hard limit is the operator's (systemd `LimitNOFILE`, limits.conf).
pub fn raise_open_file_limit() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit / setrlimit read and write one rlimit struct owned here.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    usize::try_from(r.rlim_cur).unwrap_or(usize::MAX)
}

/// Has glibc's allocator give buffers of 64 KiB and more straight back to the system when
/// they are freed (mmap), instead of raising its threshold after the first such free and
/// keeping them in the heap: a burst's read and queue buffers then leave no memory behind.
/// Busy connections keep their large buffers, so this costs a map and an unmap per burst,
/// not per read.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called once at start, before
    // the cores allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Lowers the calling thread's scheduling priority by `by` nice levels (Linux sets nice
/// per thread). The admin thread calls it: on a machine whose cores are all serving, a
/// dashboard's burst of work then waits for the shims' cores rather than delaying them.
pub fn lower_thread_priority(by: i32) {
    // SAFETY: gettid takes no arguments; setpriority on our own thread id changes only
    // this thread's nice value, and its failure (no permission) is harmless.
    unsafe {
        let tid = libc::gettid();
        let now = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, (now + by).min(19));
    }
}

/// This host's name (empty if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
