//! Storms: many connections held open at once, with a fixed number in flight.

use super::{
    Hist, System, Via, client_connect, connect_from, raw_handshake, source_ip, udp_bind_confirm,
    udp_to,
};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use velium_server::client::Client;

/// One connection a storm holds open.
pub enum Conn {
    /// A raw-protocol connection.
    Raw(TcpStream),
    /// A velium client-library session.
    Client(Client),
}

impl Conn {
    /// True while the connection is open as far as this side can tell without blocking.
    pub fn is_open(&self) -> bool {
        match self {
            Conn::Raw(s) => {
                let mut probe = [0u8; 64];
                match s.try_read(&mut probe) {
                    Ok(0) => false,
                    Ok(_) => true, // a peer may have sent something (e.g. a nats PING)
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            }
            Conn::Client(c) => !c.is_closed(),
        }
    }
}

/// What a storm did.
pub struct StormResult {
    /// TCP handshake latencies.
    pub tcp: Hist,
    /// UDP bind confirmed latencies (velium and floor, when asked).
    pub udp: Option<Hist>,
    /// From the first connect to the last handshake.
    pub elapsed: Duration,
    /// Connections still open at the end.
    pub held: usize,
    /// Failed handshakes.
    pub errors: usize,
    /// The first failure.
    pub first_error: String,
    /// UDP bind datagrams sent again.
    pub udp_resends: u32,
    /// The connections, open.
    pub conns: Vec<Conn>,
}

#[derive(Default)]
struct Shared {
    next: usize,
    conns: Vec<Conn>,
    errors: usize,
    first_error: String,
    udp_resends: u32,
}

/// N shims with C in flight; every connection stays open until the end.
///
/// With `udp`, velium and floor shims then confirm a UDP bind with a raw UDP socket
/// (bind datagram + Ping -> Pong, the socket's creation included), and drop that socket:
/// the server keeps the binding, and the bench stays within its descriptor limit (a
/// client's own `bind_udp` would hold a second descriptor per shim). Every connection,
/// raw or through the client library ([`client_connect`]), and its UDP socket come from
/// one of [`SOURCES`] source addresses in turn, so no source address nears the point
/// (about 14,000 connections to one port) where the kernel's ephemeral-port search slows
/// every connect down.
pub async fn storm(
    system: System,
    addr: SocketAddr,
    n: usize,
    c: usize,
    udp: bool,
    via: Via,
) -> StormResult {
    let with_udp = udp && (system.is_velium() || system == System::Floor);
    let client = via == Via::Client && system.is_velium();
    let shared = Rc::new(RefCell::new(Shared {
        conns: Vec::with_capacity(n),
        ..Shared::default()
    }));
    let local = tokio::task::LocalSet::new();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c {
        let shared = shared.clone();
        workers.push(local.spawn_local(async move {
            let mut tcp = Hist::default();
            let mut udp = Hist::default();
            loop {
                let i = {
                    let mut sh = shared.borrow_mut();
                    let i = sh.next;
                    sh.next += 1;
                    i
                };
                if i >= n {
                    break;
                }
                let src = source_ip(i);
                let name = format!("bench.storm.s{i}");
                let t0 = Instant::now();
                let res = async {
                    let (conn, token) = if client {
                        let cl = client_connect(addr, &name, i)
                            .await
                            .map_err(std::io::Error::other)?;
                        let token = cl.token().0;
                        (Conn::Client(cl), token)
                    } else {
                        let mut s = connect_from(src, addr).await?;
                        let token = raw_handshake(system, &mut s, &name).await?;
                        (Conn::Raw(s), token)
                    };
                    tcp.record(t0.elapsed());
                    let mut resends = 0;
                    if with_udp {
                        let t1 = Instant::now();
                        let u = udp_to(src, addr).await?;
                        resends = udp_bind_confirm(&u, &token, i as u64).await?;
                        udp.record(t1.elapsed());
                    }
                    Ok::<_, std::io::Error>((conn, resends))
                }
                .await;
                let mut sh = shared.borrow_mut();
                match res {
                    Ok((conn, resends)) => {
                        sh.conns.push(conn);
                        sh.udp_resends += resends;
                    }
                    Err(e) => {
                        if sh.errors == 0 {
                            sh.first_error = e.to_string();
                        }
                        sh.errors += 1;
                    }
                }
            }
            (tcp, udp)
        }));
    }
    let (tcp, udp) = local
        .run_until(async move {
            let mut tcp = Hist::default();
            let mut udp = Hist::default();
            for w in workers {
                let (t, u) = w.await.expect("storm worker");
                tcp.merge(&t);
                udp.merge(&u);
            }
            (tcp, udp)
        })
        .await;
    let elapsed = start.elapsed();
    let mut sh = shared.borrow_mut();
    let conns = std::mem::take(&mut sh.conns);
    let held = conns.iter().filter(|c| c.is_open()).count();
    StormResult {
        tcp,
        udp: with_udp.then_some(udp),
        elapsed,
        held,
        errors: sh.errors,
        first_error: std::mem::take(&mut sh.first_error),
        udp_resends: sh.udp_resends,
        conns,
    }
}
