//! The source address (see "Source address" in the [client documentation](super)): the
//! TCP connect from a chosen address, with the `setsockopt` that keeps its bind from
//! reserving a port, and the local address of the UDP socket.

use super::error::ClientError;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

/// Why a connect from a chosen address failed.
pub(super) enum Connect {
    /// The address is unusable (wrong family, not local): the caller's mistake.
    Bind(ClientError),
    /// The connect itself failed.
    Io(io::Error),
}

impl From<io::Error> for Connect {
    fn from(e: io::Error) -> Connect {
        Connect::Io(e)
    }
}

/// Connects to `addr` from `ip` (see
/// [`ClientOptions::bind_ip`](super::ClientOptions::bind_ip)).
pub(super) async fn connect_from(ip: IpAddr, addr: SocketAddr) -> Result<TcpStream, Connect> {
    let invalid = |why: String| {
        Connect::Bind(ClientError::Invalid {
            what: "bind_ip",
            why,
        })
    };
    if ip.is_ipv4() != addr.is_ipv4() {
        return Err(invalid(format!(
            "{ip} is not of the same address family as the server {addr}"
        )));
    }
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Without it, bind(2) reserves a port that is free towards every destination, and an
    // address runs out of ports for all servers together. A kernel without the option
    // (before 4.2) still works, with that limit.
    let _ = set_bind_address_no_port(&sock);
    sock.bind(SocketAddr::new(ip, 0))
        .map_err(|e| invalid(format!("cannot bind to {ip}: {e}")))?;
    Ok(sock.connect(addr).await?)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux; it applies to IPv6 sockets too).
fn set_bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) on a socket this function borrows, with a pointer to an int
    // that outlives the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The local address the UDP socket binds to:
/// [`ClientOptions::bind_ip`](super::ClientOptions::bind_ip) if set, else the unspecified
/// address of the server's family; the port is the kernel's choice.
pub(super) fn udp_local(server: SocketAddr, bind_ip: Option<IpAddr>) -> SocketAddr {
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    match bind_ip {
        Some(ip) => SocketAddr::new(ip, 0),
        None => local,
    }
}
