//! The floor server: the cost of the network stack alone.
//!
//! It has velium-server's shape (one thread per core, each with its own SO_REUSEPORT TCP
//! listener and UDP socket on one port, a single-threaded tokio runtime per thread) but no
//! protocol: every line received on TCP is answered at once with a fixed 18-byte frame
//! (`0x02`, 16 fixed bytes, `0x0A`, the size of velium's Session), every TCP `0x06` Ping
//! line likewise, and every UDP datagram whose first byte is not 0x02 with the same 18
//! bytes (0x02 datagrams, velium's UDP bind, are ignored as velium ignores them).
//!
//! A bench binary becomes the floor server when started with [`FLAG`]; it prints
//! `floor-server listening on 127.0.0.1:PORT` on its first stdout line.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The argument that turns a bench binary into the floor server.
pub const FLAG: &str = "--floor-server";

/// The fixed answer.
pub const REPLY: [u8; 18] = [
    0x02, b'f', b'l', b'o', b'o', b'r', b'-', b's', b'e', b'r', b'v', b'e', b'r', b'-', b'1', b'6',
    b'b', 0x0A,
];

/// Runs the floor server (and never returns) if this process was started as one.
pub fn maybe_run() {
    if std::env::args().any(|a| a == FLAG) {
        run();
        std::process::exit(0);
    }
}

fn reuse_socket(ty: Type, proto: Protocol, addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, ty, Some(proto))?;
    s.set_reuse_port(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Binds `threads` TCP listeners and UDP sockets on one free port.
fn bind_all(threads: usize) -> (SocketAddr, Vec<(Socket, Socket)>) {
    'retry: for _ in 0..50 {
        let first = reuse_socket(Type::STREAM, Protocol::TCP, "127.0.0.1:0".parse().unwrap())
            .expect("bind floor TCP");
        let addr = first.local_addr().unwrap().as_socket().unwrap();
        let mut tcp = vec![first];
        let mut udp = Vec::new();
        for i in 0..threads {
            if i > 0 {
                match reuse_socket(Type::STREAM, Protocol::TCP, addr) {
                    Ok(s) => tcp.push(s),
                    Err(_) => continue 'retry,
                }
            }
            match reuse_socket(Type::DGRAM, Protocol::UDP, addr) {
                Ok(s) => udp.push(s),
                Err(_) => continue 'retry,
            }
        }
        for t in &tcp {
            t.listen(4096).expect("listen");
        }
        return (addr, tcp.into_iter().zip(udp).collect());
    }
    panic!("floor server: no port free for both TCP and UDP");
}

fn run() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (addr, sockets) = bind_all(threads);
    let mut handles = Vec::new();
    for (tcp, udp) in sockets {
        handles.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("floor runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let listener = tokio::net::TcpListener::from_std(tcp.into()).unwrap();
                let udp = tokio::net::UdpSocket::from_std(udp.into()).unwrap();
                tokio::task::spawn_local(udp_loop(udp));
                loop {
                    match listener.accept().await {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            tokio::task::spawn_local(serve(s));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
        }));
    }
    println!("floor-server listening on {addr} ({threads} threads)");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    for h in handles {
        let _ = h.join();
    }
}

async fn serve(mut s: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let lines = memchr::memchr_iter(b'\n', &buf[..n]).count();
        if lines == 0 {
            continue;
        }
        out.clear();
        for _ in 0..lines {
            out.extend_from_slice(&REPLY);
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn udp_loop(u: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, from)) = u.recv_from(&mut buf).await
            && n > 0
            && buf[0] != 0x02
        {
            let _ = u.send_to(&REPLY, from).await;
        }
    }
}
