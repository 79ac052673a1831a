//! TLS benchmarks: every system with TLS 1.3 on its client port, driven by one rustls
//! client context (ring, TLS 1.3 only, no resumption, the server verified against a CA made
//! for the run), so that only the servers differ.
//!
//! (a) SERIAL: one connection at a time: TCP connect, TLS 1.3 handshake, the protocol's own
//!     handshake answered (velium: Identify -> Session; mosquitto: CONNECT -> CONNACK;
//!     nats-server: INFO in plaintext, then TLS, then CONNECT + PING -> PONG, as its
//!     clients do).
//! (b) STORM: N connections (default 2,000) with concurrency C (default 100), each the
//!     serial handshake, all held open until every one is in; handshakes/s.
//! (c) UDP: on one velium-server with TLS and `--tls-optional`, a TLS session's sealed UDP
//!     Ping -> Pong against a plaintext session's plain UDP Ping -> Pong.
//!
//! Settings (flag or environment): `--serial` / `VELIUM_BENCH_SERIAL` (3000 samples),
//! `--warmup` / `VELIUM_BENCH_WARMUP` (300), `--n` / `VELIUM_BENCH_N` (2000),
//! `--c` / `VELIUM_BENCH_C` (100), `--rounds` / `VELIUM_BENCH_ROUNDS` (5),
//! `--pings` / `VELIUM_BENCH_PINGS` (3 x serial: UDP pings of each kind per driver),
//! `VELIUM_BENCH_ONLY=uring,epoll,nats,mosquitto`, `VELIUM_BENCH_PARTS=serial,storm,udp`.

mod common;

use common::{
    CpuMeter, Hist, LatRow, Pki, QUIET, SealedUdp, Server, System, TlsShim, banner,
    cap_connections, connect_from, find_row, floor, open_fds, part, plain_ping,
    print_latency_table, ratio, runtime, selected, setting, settle_fds, source_ip, target,
    tls_handshake, tls_storm, udp_bind_confirm, udp_to, velium_identify,
};
use std::net::SocketAddr;
use std::time::Instant;
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

/// Every system, velium io_uring first (the ratio base).
const SYSTEMS: [System; 4] = [
    System::VeliumUring,
    System::VeliumEpoll,
    System::Nats,
    System::Mosquitto,
];

fn main() {
    floor::maybe_run();
    banner("tls");
    let serial_n = setting("serial", 3000);
    let warmup = setting("warmup", 300);
    let storm_n = setting("n", 2000);
    let storm_c = setting("c", 100).max(1);
    // Five rounds, not three: a TLS storm of 2,000 takes about a second, and its rate
    // moves by tens of percent from one round to the next on this shared machine.
    let rounds = setting("rounds", 5).max(1);
    let pings = setting("pings", 3 * serial_n);
    let rt = runtime();
    let pki = Pki::new();
    let tls = pki.connector();
    println!(
        "- TLS client, for every system: rustls with the ring provider, TLS 1.3 only, no \
         resumption, no client certificate, the server verified against a CA made for this \
         run; every server presents the same certificate (ECDSA P-256, SAN 127.0.0.1)"
    );
    println!(
        "- servers: velium-server --tls-cert --tls-key; nats-server with a tls block \
         (handshake timeout 5 s), INFO in plaintext first (2.9 has no handshake_first); \
         mosquitto with a TLS listener, tls_version tlsv1.3, set_tcp_nodelay true"
    );
    println!();

    // ----- (a) serial -----
    let per_round = serial_n.div_ceil(rounds);
    let mut full_rows = Vec::new();
    if part("serial") {
        println!(
            "## Serial TLS handshakes: {} samples per system ({rounds} interleaved rounds of \
             {per_round}, each after {warmup} warm-up)",
            per_round * rounds
        );
        println!();
        let tls_rows;
        (full_rows, tls_rows) = run_serial(&rt, &pki, &tls, warmup, per_round, rounds);
        print_latency_table(
            "Serial: TCP connect + TLS 1.3 handshake + the protocol's handshake answered, one \
             at a time",
            "-",
            &full_rows,
        );
        print_latency_table(
            "Serial, of which TCP connect + TLS handshake (until the client's Finished is sent; \
             nats-server: after its plaintext INFO)",
            "-",
            &tls_rows,
        );
    }

    // ----- (b) storm -----
    let n = cap_connections("TLS storm", storm_n, storm_c + 200);
    let mut storm_rows = Vec::new();
    if part("storm") {
        println!(
            "## TLS storm: {n} connections with concurrency {storm_c}, all held open ({rounds} \
             interleaved rounds, a fresh server each; latencies merged, rate = median round)"
        );
        println!();
        storm_rows = run_storms(&rt, &pki, &tls, n, storm_c, rounds);
        print_latency_table(
            &format!(
                "TLS storm: TCP connect + TLS 1.3 handshake + the protocol's handshake, {n} \
                 connections @ {storm_c} concurrent"
            ),
            "handshakes/s",
            &storm_rows,
        );
    }

    // ----- (c) sealed vs plain UDP -----
    let ping_round = pings.div_ceil(rounds);
    let mut udp_rows = Vec::new();
    if part("udp") {
        println!(
            "## UDP ping round trip, sealed vs plain: {} pings of each kind per driver ({rounds} \
             interleaved rounds of {ping_round}, each after {warmup} warm-up), one server per \
             driver with TLS and --tls-optional, {UDP_SESSIONS} TLS sessions and \
             {UDP_SESSIONS} plaintext sessions pinged in turn, the kinds alternating ping by \
             ping",
            ping_round * rounds
        );
        println!();
        udp_rows = run_udp(&rt, &pki, &tls, warmup, ping_round, rounds);
        print_latency_table(
            "UDP Ping -> Pong, one at a time (sealed: the client's sealing and opening included)",
            "-",
            &udp_rows,
        );
    }

    // ----- targets -----
    println!("## Targets (velium io_uring; epoll in brackets)");
    println!();
    let uring = System::VeliumUring.name();
    let epoll = System::VeliumEpoll.name();
    let mosq = System::Mosquitto.name();
    let nats = System::Nats.name();
    let q = |rows: &[LatRow], name: &str, quantile: f64| {
        find_row(rows, name).map(|i| rows[i].hist.us(quantile))
    };
    let rate = |rows: &[LatRow], name: &str| find_row(rows, name).and_then(|i| rows[i].rate);

    let what = "TLS handshake p50 no slower than mosquitto's";
    match (q(&full_rows, uring, 0.5), q(&full_rows, mosq, 0.5)) {
        (Some(v), Some(m)) => {
            let e = q(&full_rows, epoll, 0.5).map_or(String::new(), |e| {
                format!(" [epoll {e:.1} µs: {}]", ratio(e, m))
            });
            target(
                v <= m,
                what,
                &format!("velium {v:.1} µs, mosquitto {m:.1} µs: {}{e}", ratio(v, m)),
            );
        }
        _ => not_judged(what, "serial part not run for both"),
    }
    let what = "TLS storm handshakes/s at least nats-server's";
    match (rate(&storm_rows, uring), rate(&storm_rows, nats)) {
        (Some(v), Some(p)) => {
            let e = rate(&storm_rows, epoll).map_or(String::new(), |e| {
                format!(" [epoll {e:.0}/s: {}]", ratio(e, p))
            });
            target(
                v >= p,
                what,
                &format!("velium {v:.0}/s, nats-server {p:.0}/s: {}{e}", ratio(v, p)),
            );
        }
        _ => not_judged(what, "storm part not run for both"),
    }
    let what = "sealed UDP ping p50 within 1.2x of plain UDP";
    let sealed_vs_plain = |system: System| {
        let s = q(&udp_rows, &udp_name(system, true), 0.5)?;
        let p = q(&udp_rows, &udp_name(system, false), 0.5)?;
        Some((s, p))
    };
    match sealed_vs_plain(System::VeliumUring) {
        Some((s, p)) => {
            let e = sealed_vs_plain(System::VeliumEpoll).map_or(String::new(), |(s, p)| {
                format!(" [epoll {s:.1} vs {p:.1} µs: {}]", ratio(s, p))
            });
            target(
                s <= 1.2 * p,
                what,
                &format!("sealed {s:.1} µs, plain {p:.1} µs: {}{e}", ratio(s, p)),
            );
        }
        None => not_judged(what, "udp part not run"),
    }
    for system in [System::VeliumUring, System::VeliumEpoll] {
        if let (Some(s), Some(p)) = (
            q(&udp_rows, &udp_name(system, true), 0.99),
            q(&udp_rows, &udp_name(system, false), 0.99),
        ) {
            println!(
                "- {} sealed/plain at p99: {s:.1} / {p:.1} µs: {}",
                system.name(),
                ratio(s, p)
            );
        }
    }
    println!();
}

/// A target that this run cannot judge (a part or a system did not run).
fn not_judged(what: &str, why: &str) {
    println!("- target NOT JUDGED: {what} ({why})");
}

/// Starts `system` with TLS; `None` when it is not selected or not installed (a line then
/// says so).
fn start(system: System, pki: &Pki, extra: &[&str]) -> Option<Server> {
    if !selected(system) {
        return None;
    }
    Server::start_tls(system, QUIET, &pki.cert, &pki.key, extra)
}

/// Serial handshakes, every server running side by side and the rounds interleaving the
/// systems (so that a noisy neighbour weighs on each of them alike): rows for the whole
/// handshake and for its TCP + TLS part.
fn run_serial(
    rt: &tokio::runtime::Runtime,
    pki: &Pki,
    tls: &TlsConnector,
    warmup: usize,
    per_round: usize,
    rounds: usize,
) -> (Vec<LatRow>, Vec<LatRow>) {
    struct Acc {
        server: Server,
        full: Hist,
        tls: Hist,
        cpu: f64,
        negotiated: String,
    }
    let mut accs: Vec<Acc> = SYSTEMS
        .into_iter()
        .filter_map(|s| start(s, pki, &[]))
        .map(|server| Acc {
            server,
            full: Hist::default(),
            tls: Hist::default(),
            cpu: 0.0,
            negotiated: String::new(),
        })
        .collect();
    for round in 0..rounds {
        for a in accs.iter_mut() {
            let cpu = CpuMeter::start(&a.server);
            let (full, t, negotiated) = rt.block_on(serial(
                a.server.system,
                tls,
                a.server.addr,
                warmup,
                per_round,
                round * (per_round + warmup),
            ));
            a.cpu += cpu.secs().0;
            a.server.assert_running();
            a.full.merge(&full);
            a.tls.merge(&t);
            a.negotiated = negotiated;
        }
    }
    let shims = (rounds * (per_round + warmup)) as f64;
    let mut full_rows = Vec::new();
    let mut tls_rows = Vec::new();
    for a in accs {
        let name = a.server.system.name().to_string();
        full_rows.push(LatRow {
            name: name.clone(),
            hist: a.full,
            rate: None,
            note: format!(
                "server CPU {:.1} µs per connection (TCP, TLS and protocol handshakes, close; \
                 warm-up included); negotiated {}",
                a.cpu * 1e6 / shims,
                a.negotiated
            ),
        });
        tls_rows.push(LatRow {
            name,
            hist: a.tls,
            rate: None,
            note: String::new(),
        });
    }
    (full_rows, tls_rows)
}

/// One system's serial run: (whole handshake, TCP + TLS part, what was negotiated).
async fn serial(
    system: System,
    tls: &TlsConnector,
    addr: SocketAddr,
    warmup: usize,
    n: usize,
    first: usize,
) -> (Hist, Hist, String) {
    let mut full = Hist::default();
    let mut t = Hist::default();
    let mut negotiated = String::new();
    for k in 0..warmup + n {
        let i = first + k;
        if k == warmup {
            full = Hist::default();
            t = Hist::default();
        }
        let name = format!("bench.tls.s{i}");
        let t0 = Instant::now();
        let shim = tls_handshake(system, tls, source_ip(i), addr, &name)
            .await
            .unwrap_or_else(|e| panic!("{}: TLS handshake {i}: {e}", system.name()));
        full.record(t0.elapsed());
        t.record(shim.tls_done - t0);
        if negotiated.is_empty() {
            negotiated = shim.negotiated();
        }
        // A raw stream closes synchronously when dropped, outside the next sample's clock.
        drop(shim);
    }
    (full, t, negotiated)
}

/// Storms every selected system `rounds` times, interleaved, on a fresh server each time;
/// one row each (rate: the median round).
fn run_storms(
    rt: &tokio::runtime::Runtime,
    pki: &Pki,
    tls: &TlsConnector,
    n: usize,
    c: usize,
    rounds: usize,
) -> Vec<LatRow> {
    struct Acc {
        system: System,
        hist: Hist,
        rates: Vec<f64>,
        held: usize,
        errors: usize,
        first_error: String,
        server_cpu: f64,
        bench_cpu: f64,
    }
    let mut accs: Vec<Acc> = Vec::new();
    let base_fds = open_fds();
    for _ in 0..rounds {
        for system in SYSTEMS {
            let Some(mut server) = start(system, pki, &[]) else {
                continue;
            };
            let cpu = CpuMeter::start(&server);
            let r = rt.block_on(tls_storm(system, tls, server.addr, n, c));
            let (server_cpu, bench_cpu) = cpu.secs();
            server.assert_running();
            let a = match accs.iter().position(|a| a.system == system) {
                Some(i) => &mut accs[i],
                None => {
                    accs.push(Acc {
                        system,
                        hist: Hist::default(),
                        rates: Vec::new(),
                        held: 0,
                        errors: 0,
                        first_error: String::new(),
                        server_cpu: 0.0,
                        bench_cpu: 0.0,
                    });
                    accs.last_mut().unwrap()
                }
            };
            a.hist.merge(&r.hist);
            a.rates.push(r.held as f64 / r.elapsed.as_secs_f64());
            a.held += r.held;
            a.errors += r.errors;
            if a.first_error.is_empty() {
                a.first_error = r.first_error.clone();
            }
            a.server_cpu += server_cpu;
            a.bench_cpu += bench_cpu;
            drop(r.conns);
            drop(server);
            settle_fds(rt, base_fds);
        }
    }
    accs.into_iter()
        .map(|mut a| {
            a.rates.sort_by(f64::total_cmp);
            let median = a.rates[a.rates.len() / 2];
            let done = a.held.max(1) as f64;
            let mut note = format!(
                "{} of {} held open at the end; CPU per connection: server {:.1} µs, bench \
                 {:.1} µs; rounds {}",
                a.held,
                n * a.rates.len(),
                a.server_cpu * 1e6 / done,
                a.bench_cpu * 1e6 / done,
                a.rates
                    .iter()
                    .map(|r| format!("{r:.0}/s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if a.errors > 0 {
                note.push_str(&format!(
                    ", {} failed handshakes: {}",
                    a.errors, a.first_error
                ));
            }
            LatRow {
                name: a.system.name().to_string(),
                hist: a.hist,
                rate: Some(median),
                note,
            }
        })
        .collect()
}

/// The UDP table's row name.
fn udp_name(system: System, sealed: bool) -> String {
    format!(
        "{}, {} UDP",
        system.name(),
        if sealed { "sealed" } else { "plain" }
    )
}

/// Sessions of each kind per server in the UDP part, each with its UDP socket, pinged in
/// turn: the hub's SO_REUSEPORT sockets take a datagram on the core its addresses hash to,
/// so that several sockets of each kind spread both kinds over the cores alike.
const UDP_SESSIONS: usize = 8;

/// One kind of UDP ping on one server: latencies and resends.
struct PingAcc {
    hist: Hist,
    resends: u32,
}

impl PingAcc {
    fn new() -> PingAcc {
        PingAcc {
            hist: Hist::default(),
            resends: 0,
        }
    }
}

/// The UDP part: per velium driver, one server with TLS and `--tls-optional`,
/// [`UDP_SESSIONS`] TLS sessions pinging over sealed UDP and as many plaintext sessions
/// over plain UDP, one ping at a time, the kinds alternating ping by ping and the
/// sessions of a kind in turn; the rounds interleave the drivers.
fn run_udp(
    rt: &tokio::runtime::Runtime,
    pki: &Pki,
    tls: &TlsConnector,
    warmup: usize,
    per_round: usize,
    rounds: usize,
) -> Vec<LatRow> {
    struct Setup {
        server: Server,
        // The TCP sessions, held open while their UDP channels are in use.
        _tls_sessions: Vec<TlsShim>,
        _plain_sessions: Vec<TcpStream>,
        sealed: Vec<SealedUdp>,
        plain: Vec<UdpSocket>,
        acc: [PingAcc; 2], // [plain, sealed]
        server_cpu: f64,
        bench_cpu: f64,
        pings: usize,
    }
    let mut setups: Vec<Setup> = Vec::new();
    for system in [System::VeliumUring, System::VeliumEpoll] {
        let Some(server) = start(system, pki, &["--tls-optional"]) else {
            continue;
        };
        let addr = server.addr;
        let mut setup = Setup {
            server,
            _tls_sessions: Vec::new(),
            _plain_sessions: Vec::new(),
            sealed: Vec::new(),
            plain: Vec::new(),
            acc: [PingAcc::new(), PingAcc::new()],
            server_cpu: 0.0,
            bench_cpu: 0.0,
            pings: 0,
        };
        rt.block_on(async {
            for j in 0..UDP_SESSIONS {
                let src = source_ip(j);
                let t = tls_handshake(system, tls, src, addr, &format!("bench.udp.sealed{j}"))
                    .await
                    .expect("TLS session");
                let u = udp_to(src, addr).await.expect("UDP socket");
                setup.sealed.push(SealedUdp::new(u, &t.stream));
                setup._tls_sessions.push(t);
                let mut p = connect_from(src, addr).await.expect("plaintext connect");
                let token = velium_identify(&mut p, &format!("bench.udp.plain{j}"))
                    .await
                    .expect("plaintext session");
                let u = udp_to(src, addr).await.expect("UDP socket");
                udp_bind_confirm(&u, &token, 0)
                    .await
                    .expect("plain UDP bind");
                setup.plain.push(u);
                setup._plain_sessions.push(p);
            }
        });
        setups.push(setup);
    }
    let mut buf = vec![0u8; 2048];
    for round in 0..rounds {
        for s in setups.iter_mut() {
            let system = s.server.system;
            let cpu = CpuMeter::start(&s.server);
            let mut hist = [Hist::default(), Hist::default()];
            let mut resends = [0u32; 2];
            rt.block_on(async {
                for k in 0..warmup + per_round {
                    // One ping of each kind in turn, the first kind alternating, so that a
                    // burst of noise on this shared machine weighs on both alike. The same
                    // 16 bytes of data in both.
                    let data = format!("{:016}", round * (warmup + per_round) + k);
                    let j = k % UDP_SESSIONS;
                    let order = if (k + round) % 2 == 0 { [1, 0] } else { [0, 1] };
                    for kind in order {
                        let t0 = Instant::now();
                        let r = if kind == 1 {
                            s.sealed[j].ping(data.as_bytes()).await
                        } else {
                            plain_ping(&s.plain[j], data.as_bytes(), &mut buf).await
                        };
                        let took = t0.elapsed();
                        let r = r.unwrap_or_else(|e| {
                            panic!("{}: UDP ping {k}: {e}", udp_name(system, kind == 1))
                        });
                        if k >= warmup {
                            hist[kind].record(took);
                            resends[kind] += r;
                        }
                    }
                }
            });
            let (server_cpu, bench_cpu) = cpu.secs();
            s.server.assert_running();
            for kind in 0..2 {
                s.acc[kind].hist.merge(&hist[kind]);
                s.acc[kind].resends += resends[kind];
            }
            s.server_cpu += server_cpu;
            s.bench_cpu += bench_cpu;
            s.pings += 2 * (warmup + per_round);
        }
    }
    let mut rows = Vec::new();
    for s in setups {
        let ignored: u64 = s.sealed.iter().map(|u| u.ignored).sum();
        for (kind, a) in s.acc.into_iter().enumerate() {
            let mut note = if kind == 0 {
                format!(
                    "CPU per ping, the two kinds together (they alternate; warm-up included): \
                     server {:.1} µs, bench {:.1} µs",
                    s.server_cpu * 1e6 / s.pings.max(1) as f64,
                    s.bench_cpu * 1e6 / s.pings.max(1) as f64
                )
            } else {
                String::new()
            };
            let mut add = |what: String| {
                if !note.is_empty() {
                    note.push_str(", ");
                }
                note.push_str(&what);
            };
            if a.resends > 0 {
                add(format!("{} resent after 1 s", a.resends));
            }
            if kind == 1 && ignored > 0 {
                add(format!("{ignored} datagrams ignored"));
            }
            rows.push(LatRow {
                name: udp_name(s.server.system, kind == 1),
                hist: a.hist,
                rate: None,
                note,
            });
        }
    }
    rows
}
