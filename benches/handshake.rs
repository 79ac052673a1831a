//! Handshake benchmarks.
//!
//! (a) SERIAL: one shim at a time: TCP connect -> handshake answered (velium: Identify ->
//!     Session; nats: CONNECT+PING -> PONG; mosquitto: CONNECT -> CONNACK; floor: a line ->
//!     18 bytes), then for velium and the floor a UDP bind confirmed by a UDP Ping -> Pong.
//! (b) STORM: N shims (default 10,000) connecting with concurrency C (default 100), all
//!     held open until every one is in; handshakes/s and the latency distribution.
//!
//! velium is driven through its client library (`Client::connect`, `Client::bind_udp`),
//! and once more with raw protocol bytes, the way every other system is driven, so the
//! client library's own cost shows. Both take their source address in turn from
//! 127.0.0.1 .. 127.0.0.`SOURCES` (the client through `ClientOptions::bind_ip`), so
//! neither runs into one address's ephemeral ports in the storm.
//!
//! Settings (flag or environment): `--serial` / `VELIUM_BENCH_SERIAL` (3000 samples),
//! `--warmup` / `VELIUM_BENCH_WARMUP` (300), `--n` / `VELIUM_BENCH_N` (10000),
//! `--c` / `VELIUM_BENCH_C` (100), `--rounds` / `VELIUM_BENCH_ROUNDS` (3),
//! `VELIUM_BENCH_ONLY=uring,epoll,before,floor,nats,mosquitto`;
//! `VELIUM_BENCH_BASELINE=/path/to/velium-server` adds rows for that earlier build
//! (velium-before io_uring, key `before`) and after-vs-before ratios.

mod common;

use common::{
    CpuMeter, Hist, LatRow, QUIET, Server, Subject, System, Via, banner, cap_connections,
    client_connect, connect_from, find_row, floor, open_fds, part, print_latency_table, ratio,
    raw_handshake, runtime, selected, setting, settle_fds, source_ip, storm, target,
    udp_bind_confirm, udp_to,
};
use std::net::SocketAddr;
use std::time::Instant;

/// Every subject, velium io_uring through the client library first (the ratio base).
/// The baseline's rows (velium-before) run only when `VELIUM_BENCH_BASELINE` is set.
const SUBJECTS: [Subject; 9] = [
    Subject::client(System::VeliumUring),
    Subject::client(System::VeliumEpoll),
    Subject::client(System::VeliumBefore),
    Subject::raw(System::VeliumUring),
    Subject::raw(System::VeliumEpoll),
    Subject::raw(System::VeliumBefore),
    Subject::raw(System::Floor),
    Subject::raw(System::Nats),
    Subject::raw(System::Mosquitto),
];

fn main() {
    floor::maybe_run();
    banner("handshake");
    let serial_n = setting("serial", 3000);
    let warmup = setting("warmup", 300);
    let storm_n = setting("n", 10_000);
    let storm_c = setting("c", 100).max(1);
    let rounds = setting("rounds", 3).max(1);
    let rt = runtime();

    // ----- (a) serial -----
    // All servers run side by side; the rounds interleave the systems, so that a noisy
    // neighbour on this shared machine weighs on each of them alike.
    let per_round = serial_n.div_ceil(rounds);
    let do_serial = part("serial");
    if do_serial {
        println!(
            "## Serial handshakes: {} samples per system ({rounds} interleaved rounds of \
         {per_round}, each after {warmup} warm-up)",
            per_round * rounds
        );
        println!();
    }
    let mut servers = Vec::new();
    for subject in SUBJECTS {
        if !selected(subject.system) || !do_serial {
            continue;
        }
        if let Some(server) = Server::start(subject.system, QUIET) {
            servers.push((subject, server, Hist::default(), Hist::default(), 0.0f64));
        }
    }
    for round in 0..rounds {
        for (subject, server, tcp, udp, cpu_secs) in servers.iter_mut() {
            let cpu = CpuMeter::start(server);
            let (t, u) = rt.block_on(serial(
                *subject,
                server.addr,
                warmup,
                per_round,
                round * (per_round + warmup),
            ));
            // Warm-up included: server CPU per shim over every connection it served.
            *cpu_secs += cpu.secs().0;
            server.assert_running();
            tcp.merge(&t);
            if let Some(u) = u {
                udp.merge(&u);
            }
        }
    }
    let mut tcp_rows = Vec::new();
    let mut udp_rows = Vec::new();
    for (subject, server, tcp, udp, cpu_secs) in servers {
        drop(server);
        let shims = (rounds * (per_round + warmup)) as f64;
        tcp_rows.push(LatRow {
            name: subject.name(),
            hist: tcp,
            rate: None,
            note: format!(
                "server CPU {:.1} µs per shim ({})",
                cpu_secs * 1e6 / shims,
                if subject.system.is_velium() || subject.system == System::Floor {
                    "TCP handshake, UDP bind confirmed, close"
                } else {
                    "handshake, close"
                }
            ),
        });
        if !udp.is_empty() {
            udp_rows.push(LatRow {
                name: subject.name(),
                hist: udp,
                rate: None,
                note: String::new(),
            });
        }
    }
    print_latency_table(
        "Serial TCP handshake (connect -> handshake answered), one at a time",
        "-",
        &tcp_rows,
    );
    print_latency_table(
        "Serial UDP bind confirmed (UDP socket, bind datagram + Ping -> Pong)",
        "-",
        &udp_rows,
    );

    // ----- (b) storm -----
    // The bench holds every TCP connection plus up to C UDP sockets and a few more.
    let n = cap_connections("storm", storm_n, storm_c + 200);
    let do_storm = part("storm");
    if do_storm {
        println!(
            "## Storm: {n} shims connecting with concurrency {storm_c}, all held open \
         ({rounds} interleaved rounds, a fresh server each; latencies merged, rate = median \
         round)"
        );
        println!();
    }
    // Full shim: TCP handshake then UDP bind confirmed (velium and the floor only);
    // then the TCP handshake alone, the same work for every system.
    let full: Vec<Subject> = SUBJECTS
        .into_iter()
        .filter(|s| do_storm && (s.system.is_velium() || s.system == System::Floor))
        .collect();
    let all: Vec<Subject> = SUBJECTS.into_iter().filter(|_| do_storm).collect();
    let full_rows = run_storms(&rt, &full, true, n, storm_c, rounds);
    print_latency_table(
        &format!(
            "Storm, full shim handshake (TCP handshake, then UDP bind confirmed), {n} shims @ \
             {storm_c} concurrent: TCP handshake latency"
        ),
        "shims/s",
        &full_rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
    );
    print_latency_table(
        "Storm, full shim handshake: UDP bind confirmed latency",
        "-",
        &full_rows
            .iter()
            .filter_map(|r| r.1.clone())
            .collect::<Vec<_>>(),
    );
    let tcp_only = run_storms(&rt, &all, false, n, storm_c, rounds);
    let storm_rows: Vec<LatRow> = tcp_only.into_iter().map(|r| r.0).collect();
    print_latency_table(
        &format!(
            "Storm, TCP handshake only (the same work for every system), {n} shims @ \
             {storm_c} concurrent"
        ),
        "handshakes/s",
        &storm_rows,
    );

    // ----- targets -----
    println!("## Targets (velium io_uring through the client library; raw in brackets)");
    println!();
    let vc = Subject::client(System::VeliumUring).name();
    let vr = Subject::raw(System::VeliumUring).name();
    let q = |rows: &[LatRow], name: &str, quantile: f64| {
        find_row(rows, name).map(|i| rows[i].hist.us(quantile))
    };
    let rate = |rows: &[LatRow], name: &str| find_row(rows, name).and_then(|i| rows[i].rate);
    let mosq = System::Mosquitto.name();
    let nats = System::Nats.name();
    let fl = System::Floor.name();
    if let (Some(v), Some(m)) = (q(&tcp_rows, &vc, 0.5), q(&tcp_rows, mosq, 0.5)) {
        let raw = q(&tcp_rows, &vr, 0.5).map_or(String::new(), |r| {
            format!(" [raw {r:.1} µs: {}]", ratio(r, m))
        });
        target(
            v <= m,
            "serial handshake p50 no slower than mosquitto's",
            &format!(
                "velium {v:.1} µs, mosquitto {m:.1} µs: {}{raw}",
                ratio(v, m)
            ),
        );
    }
    if let (Some(p50), Some(p99)) = (q(&tcp_rows, &vc, 0.5), q(&tcp_rows, &vc, 0.99)) {
        target(
            p99 <= 2.0 * p50,
            "serial handshake p99 within 2x of its own p50",
            &format!("p50 {p50:.1} µs, p99 {p99:.1} µs: {}", ratio(p99, p50)),
        );
    }
    if let (Some(v), Some(f)) = (q(&udp_rows, &vc, 0.5), q(&udp_rows, fl, 0.5)) {
        let raw = q(&udp_rows, &vr, 0.5).map_or(String::new(), |r| {
            format!(" [raw {r:.1} µs: {}]", ratio(r, f))
        });
        target(
            v <= 1.2 * f,
            "UDP bind confirmed p50 within 1.2x of the floor",
            &format!("velium {v:.1} µs, floor {f:.1} µs: {}{raw}", ratio(v, f)),
        );
    }
    for (peer, factor) in [(mosq, 1.0), (nats, 2.0)] {
        if let (Some(v), Some(p)) = (rate(&storm_rows, &vc), rate(&storm_rows, peer)) {
            let raw = rate(&storm_rows, &vr).map_or(String::new(), |r| {
                format!(" [raw {r:.0}/s: {}]", ratio(r, p))
            });
            let what = if factor > 1.0 {
                format!("storm handshakes/s at least 2x {peer}'s")
            } else {
                format!("storm handshakes/s more than {peer}'s")
            };
            target(
                v >= factor * p,
                &what,
                &format!("velium {v:.0}/s, {peer} {p:.0}/s: {}{raw}", ratio(v, p)),
            );
        }
        if let (Some(v), Some(p)) = (q(&storm_rows, &vc, 0.99), q(&storm_rows, peer, 0.99)) {
            let raw = q(&storm_rows, &vr, 0.99).map_or(String::new(), |r| {
                format!(" [raw {r:.0} µs: {}]", ratio(r, p))
            });
            target(
                v < p,
                &format!("storm p99 lower than {peer}'s"),
                &format!("velium {v:.0} µs, {peer} {p:.0} µs: {}{raw}", ratio(v, p)),
            );
        }
    }
    println!();
}

/// Storms every selected subject `rounds` times, interleaved, on a fresh server each time;
/// rows for the TCP handshake (rate: the median round) and, with `udp`, for the UDP bind
/// confirmed.
fn run_storms(
    rt: &tokio::runtime::Runtime,
    subjects: &[Subject],
    udp: bool,
    n: usize,
    c: usize,
    rounds: usize,
) -> Vec<(LatRow, Option<LatRow>)> {
    struct Acc {
        subject: Subject,
        tcp: Hist,
        udp: Option<Hist>,
        rates: Vec<f64>,
        held: usize,
        errors: usize,
        first_error: String,
        resends: u32,
        server_cpu: f64,
        bench_cpu: f64,
    }
    let mut accs: Vec<Acc> = Vec::new();
    let base_fds = open_fds();
    for round in 0..rounds {
        for &subject in subjects {
            if !selected(subject.system) {
                continue;
            }
            let Some(mut server) = Server::start(subject.system, QUIET) else {
                continue;
            };
            let cpu = CpuMeter::start(&server);
            let r = rt.block_on(storm(subject.system, server.addr, n, c, udp, subject.via));
            let (server_cpu, bench_cpu) = cpu.secs();
            server.assert_running();
            if round == 0 {
                accs.push(Acc {
                    subject,
                    tcp: Hist::default(),
                    udp: None,
                    rates: Vec::new(),
                    held: 0,
                    errors: 0,
                    first_error: String::new(),
                    resends: 0,
                    server_cpu: 0.0,
                    bench_cpu: 0.0,
                });
            }
            let a = accs
                .iter_mut()
                .find(|a| a.subject == subject)
                .expect("accumulator");
            a.tcp.merge(&r.tcp);
            if let Some(u) = &r.udp {
                a.udp.get_or_insert_with(Hist::default).merge(u);
            }
            a.rates.push(r.held as f64 / r.elapsed.as_secs_f64());
            a.held += r.held;
            a.errors += r.errors;
            if a.first_error.is_empty() {
                a.first_error = r.first_error.clone();
            }
            a.resends += r.udp_resends;
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
            let done = (a.held.max(1)) as f64;
            let mut note = format!(
                "{} of {} held open at the end; CPU per shim: server {:.1} µs, bench {:.1} µs; \
                 rounds {}",
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
            if a.resends > 0 {
                note.push_str(&format!(", {} UDP resends", a.resends));
            }
            let udp = a.udp.map(|h| LatRow {
                name: a.subject.name(),
                hist: h,
                rate: None,
                note: String::new(),
            });
            (
                LatRow {
                    name: a.subject.name(),
                    hist: a.tcp,
                    rate: Some(median),
                    note,
                },
                udp,
            )
        })
        .collect()
}

/// One subject's serial run: (TCP handshake, UDP bind confirmed if any).
async fn serial(
    subject: Subject,
    addr: SocketAddr,
    warmup: usize,
    n: usize,
    first: usize,
) -> (Hist, Option<Hist>) {
    let system = subject.system;
    let with_udp = system.is_velium() || system == System::Floor;
    let client = subject.via == Via::Client && system.is_velium();
    let mut tcp = Hist::default();
    let mut udp = Hist::default();
    for k in 0..warmup + n {
        let i = first + k;
        if k == warmup {
            tcp = Hist::default();
            udp = Hist::default();
        }
        let src = source_ip(i);
        let name = format!("bench.serial.s{i}");
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!("{}: {what} {i}: {e}", subject.name())
        };
        if client {
            let t0 = Instant::now();
            let c = client_connect(addr, &name, i)
                .await
                .unwrap_or_else(|e| fail("connect", &e));
            tcp.record(t0.elapsed());
            let t1 = Instant::now();
            c.bind_udp().await.unwrap_or_else(|e| fail("bind_udp", &e));
            udp.record(t1.elapsed());
            // Dropping a client aborts its tasks, which close the sockets when next polled:
            // let that happen now, not inside the next sample's clock (a raw stream closes
            // synchronously when dropped).
            drop(c);
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            continue;
        }
        let t0 = Instant::now();
        let mut s = connect_from(src, addr)
            .await
            .unwrap_or_else(|e| fail("connect", &e));
        let token = raw_handshake(system, &mut s, &name)
            .await
            .unwrap_or_else(|e| fail("handshake", &e));
        tcp.record(t0.elapsed());
        if with_udp {
            let t1 = Instant::now();
            let u = udp_to(src, addr).await.expect("udp socket");
            udp_bind_confirm(&u, &token, i as u64)
                .await
                .unwrap_or_else(|e| fail("udp bind", &e));
            udp.record(t1.elapsed());
        }
    }
    (tcp, with_udp.then_some(udp))
}
