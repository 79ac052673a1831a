//! Sockets: every connection a bench makes, raw or through velium's client library,
//! takes its source address in turn from 127.0.0.1 .. 127.0.0.[`SOURCES`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use velium_server::client::{Client, ClientError, ClientOptions};

/// Source addresses a bench spreads its connections over (127.0.0.1 .. 127.0.0.SOURCES),
/// so that the number of connections to one server is not bound by the ephemeral ports
/// of a single source address.
pub const SOURCES: u8 = 4;

/// The source address for connection number `i`.
pub fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES as usize) as u8)
}

/// The client options a bench shim uses: the defaults, from [`source_ip`]`(i)`.
pub fn client_options(i: usize) -> ClientOptions {
    ClientOptions {
        bind_ip: Some(IpAddr::V4(source_ip(i))),
        ..ClientOptions::default()
    }
}

/// `Client::connect` for shim number `i`, from [`source_ip`]`(i)` like the raw
/// connections ([`connect_from`]), so that client and raw rows load the kernel alike.
pub async fn client_connect(addr: SocketAddr, name: &str, i: usize) -> Result<Client, ClientError> {
    Client::connect_with(addr, name, client_options(i)).await
}

/// Connects to `dst` from `src` (any port), with TCP_NODELAY.
pub async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    // Let connect() pick the port by the whole 4-tuple instead of bind() reserving one.
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let s = sock.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A UDP socket on `src` aimed at `dst`.
pub async fn udp_to(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(src, 0))).await?;
    s.connect(dst).await?;
    Ok(s)
}
