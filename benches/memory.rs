//! Memory benchmarks.
//!
//! (a) IDLE: server RSS (VmRSS) before and after N connected idle shims (default 10,000),
//!     for each velium driver, the floor, nats-server and mosquitto; bytes per idle
//!     connection. A velium shim here has done its whole handshake (Identify -> Session,
//!     UDP bind confirmed), so its UDP binding is counted too.
//! (a') IDLE-TLS: the same for velium's two drivers over TLS 1.3: server RSS per idle shim
//!     for N TLS shims (TCP connect, TLS 1.3 handshake, Identify -> Session, in raw bytes
//!     over tokio-rustls) against N plaintext shims made the same way without TLS, each
//!     kind on a fresh server of the same build (the TLS one with `--tls-cert --tls-key`),
//!     and the ratio tls/plain. Neither kind binds UDP here.
//! (b) FLEET: F velium shims (default 19,000) connected at once through the client library,
//!     spread over several source addresses (`ClientOptions::bind_ip`), each with a
//!     confirmed UDP bind, then every one sends a TCP Ping at once: how many answered, and
//!     when.
//!
//! (c) STATE: for velium's two drivers, N raw shims (default 10,000; no UDP bind) connected
//!     and idle, server RSS; then every shim sets K keys (default 22, the `state` bench's
//!     names and 10-30-byte values) in one Set frame over TCP, confirmed by a Ping -> Pong
//!     behind it; server RSS again: bytes per shim above an idle shim.
//!
//! Settings (flag or environment): `--n` / `VELIUM_BENCH_N` (10000), `--fleet` /
//! `VELIUM_BENCH_FLEET` (19000), `--c` / `VELIUM_BENCH_C` (100), `--state_keys` /
//! `VELIUM_BENCH_STATE_KEYS` (22),
//! `VELIUM_BENCH_ONLY=uring,epoll,before,floor,nats,mosquitto`,
//! `VELIUM_BENCH_PARTS=idle,idle-tls,fleet,state`;
//! `VELIUM_BENCH_BASELINE=/path/to/velium-server` adds an idle row for that earlier build
//! (velium-before io_uring, key `before`) and the after-vs-before ratio.

mod common;
#[path = "common/state.rs"]
mod state_load;

use common::{
    Conn, Hist, LatRow, Pki, QUIET, Server, System, Via, banner, cap_connections, floor, fmt_bytes,
    open_fds, part, print_after_vs_before, print_latency_table, ratio, runtime, selected, setting,
    settle_fds, storm, target, tls_storm,
};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The idle-shim systems; the baseline (velium-before) only when `VELIUM_BENCH_BASELINE` is
/// set.
const SYSTEMS: [System; 6] = [
    System::VeliumUring,
    System::VeliumEpoll,
    System::VeliumBefore,
    System::Floor,
    System::Nats,
    System::Mosquitto,
];

/// How long the server may settle before and after the shims connect.
const SETTLE: Duration = Duration::from_secs(2);

struct MemRow {
    system: System,
    before: u64,
    after: u64,
    n: usize,
}

impl MemRow {
    fn per_conn(&self) -> f64 {
        (self.after as f64 - self.before as f64) / self.n.max(1) as f64
    }
}

fn main() {
    floor::maybe_run();
    banner("memory");
    let c = setting("c", 100).max(1);
    let n = cap_connections("idle shims", setting("n", 10_000), c + 200);
    let fleet = cap_connections("fleet", setting("fleet", 19_000), c + 200);
    let rt = runtime();
    let base_fds = open_fds();

    // ----- (a) idle shims -----
    let do_idle = part("idle");
    if do_idle {
        println!("## Server RSS per idle connection: {n} shims connected and idle");
        println!();
    }
    let mut rows = Vec::new();
    for system in SYSTEMS {
        if !selected(system) || !do_idle {
            continue;
        }
        let Some(mut server) = Server::start(system, QUIET) else {
            continue;
        };
        std::thread::sleep(SETTLE);
        let before = server.rss();
        let r = rt.block_on(storm(system, server.addr, n, c, true, Via::Client));
        std::thread::sleep(SETTLE);
        server.assert_running();
        let after = server.rss();
        if r.errors > 0 || r.held != n {
            println!(
                "> {}: {} of {n} held, {} failed: {}",
                system.name(),
                r.held,
                r.errors,
                r.first_error
            );
        }
        rows.push(MemRow {
            system,
            before,
            after,
            n: r.held,
        });
        drop(r.conns);
    }
    if !rows.is_empty() {
        println!("| system | idle connections | RSS before | RSS after | per connection | ratio |");
        println!("|---|---:|---:|---:|---:|---:|");
        let base = rows.first().map(|r| r.per_conn());
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                r.system.name(),
                r.n,
                fmt_bytes(r.before as f64),
                fmt_bytes(r.after as f64),
                fmt_bytes(r.per_conn()),
                base.map_or("-".into(), |b| ratio(r.per_conn(), b))
            );
        }
        println!();
        println!(
            "Ratio: bytes per connection over {}'s. RSS only: kernel socket buffers are not in it.",
            rows.first().map_or("-", |r| r.system.name())
        );
        println!();
        print_after_vs_before(
            "RSS per idle connection",
            &rows
                .iter()
                .map(|r| (r.system.name().to_string(), r.per_conn()))
                .collect::<Vec<_>>(),
            fmt_bytes,
            "less",
        );
    }

    // ----- (a') idle shims over TLS -----
    if part("idle-tls") {
        idle_tls(&rt, n, c, base_fds);
    }

    // ----- (b) fleet -----
    let do_fleet = part("fleet");
    if do_fleet {
        println!("## Fleet: {fleet} velium shims connected at once, every one pinged over TCP");
        println!();
    }
    let mut fleet_rows = Vec::new();
    let mut fleet_ok = Vec::new();
    for system in [System::VeliumUring, System::VeliumEpoll] {
        if !selected(system) || !do_fleet {
            continue;
        }
        let Some(mut server) = Server::start(system, QUIET) else {
            continue;
        };
        let before = server.rss();
        let r = rt.block_on(storm(system, server.addr, fleet, c, true, Via::Client));
        let connect_s = r.elapsed.as_secs_f64();
        let (streams, answered, hist, ping_s) = rt.block_on(ping_all(r.conns));
        server.assert_running();
        let after = server.rss();
        println!(
            "- {}: {} of {fleet} connected ({} failed{}) in {connect_s:.2} s; {answered} of {} \
             answered a TCP Ping, all within {ping_s:.2} s; RSS {} -> {} ({} per shim)",
            system.name(),
            streams.len(),
            r.errors,
            if r.errors > 0 {
                format!(": {}", r.first_error)
            } else {
                String::new()
            },
            streams.len(),
            fmt_bytes(before as f64),
            fmt_bytes(after as f64),
            fmt_bytes((after as f64 - before as f64) / streams.len().max(1) as f64),
        );
        fleet_ok.push((system, answered, fleet));
        fleet_rows.push(LatRow {
            name: system.name().into(),
            hist,
            rate: Some(answered as f64 / ping_s),
            note: String::new(),
        });
        drop(streams);
    }
    if !fleet_rows.is_empty() {
        println!();
        println!(
            "The fleet connects through `Client::connect_with`, its shims spread over {} \
             source addresses (`ClientOptions::bind_ip`): past about 14,000 connections from \
             one address to one port the kernel's ephemeral-port search would slow every \
             connect. The connect time still includes this bench's one thread running {fleet} \
             clients. The ping times are bound by that thread writing {fleet} pings and \
             reading {fleet} pongs.",
            common::SOURCES
        );
    }
    println!();
    print_latency_table(
        "Fleet ping: time from the start of the broadcast to each Pong",
        "pongs/s",
        &fleet_rows,
    );

    // ----- (c) state -----
    let state_rows = if part("state") {
        settle_fds(&rt, base_fds);
        state_rss(&rt, n, c)
    } else {
        Vec::new()
    };

    // ----- targets -----
    println!("## Targets");
    println!();
    if let Some(v) = rows.iter().find(|r| r.system == System::VeliumUring) {
        target(
            v.per_conn() <= 4096.0,
            "at most 4 KiB server RSS per idle shim (velium io_uring)",
            &fmt_bytes(v.per_conn()),
        );
    }
    if let Some(v) = rows.iter().find(|r| r.system == System::VeliumEpoll) {
        target(
            v.per_conn() <= 4096.0,
            "at most 4 KiB server RSS per idle shim (velium epoll)",
            &fmt_bytes(v.per_conn()),
        );
    }
    for (system, per_shim, keys) in &state_rows {
        target(
            *per_shim < 4096.0,
            &format!(
                "under 4 KiB server RSS per shim holding {keys} keys, above an idle shim ({})",
                system.name()
            ),
            &fmt_bytes(*per_shim),
        );
    }
    for (system, answered, wanted) in fleet_ok {
        target(
            answered >= 19_000 && answered == wanted,
            &format!(
                "19,000 shims connected at once, all answering pings ({})",
                system.name()
            ),
            &format!("{answered} of {wanted} answered"),
        );
    }
    println!();
}

/// Server RSS per idle shim over TLS 1.3 against plaintext, for each selected velium
/// driver: N plaintext shims (raw bytes: TCP connect, Identify -> Session) on a fresh
/// server without TLS, then N TLS shims (TCP connect, TLS 1.3 handshake, the same Identify
/// -> Session inside) on a fresh server with `--tls-cert --tls-key`; no UDP bind in either.
/// Only one kind's connections are open at a time, so the bench holds at most N sockets
/// (the descriptor limit caps N for the idle part already); `base_fds` is this process's
/// descriptor count before any part ran, waited for before each storm (client-library
/// sessions of the idle part close their sockets in tasks of the runtime).
fn idle_tls(rt: &tokio::runtime::Runtime, n: usize, c: usize, base_fds: usize) {
    println!(
        "## Server RSS per idle connection, TLS 1.3 against plaintext: {n} shims connected \
         and idle"
    );
    println!();
    let pki = Pki::new();
    let tls = pki.connector();
    // (driver, TLS?, figures); the plaintext row of a driver comes just before its TLS row.
    let mut rows: Vec<(bool, MemRow)> = Vec::new();
    let mut negotiated = None;
    for system in [System::VeliumUring, System::VeliumEpoll] {
        if !selected(system) {
            continue;
        }
        for with_tls in [false, true] {
            settle_fds(rt, base_fds);
            let server = if with_tls {
                Server::start_tls(system, QUIET, &pki.cert, &pki.key, &[])
            } else {
                Server::start(system, QUIET)
            };
            let Some(mut server) = server else {
                continue;
            };
            std::thread::sleep(SETTLE);
            let before = server.rss();
            // `after` is read while the connections are still open: each branch drops its
            // storm's connections only at its end.
            let (held, errors, first_error, after) = if with_tls {
                let r = rt.block_on(tls_storm(system, &tls, server.addr, n, c));
                if let Some(shim) = r.conns.first() {
                    negotiated.get_or_insert_with(|| shim.negotiated());
                }
                std::thread::sleep(SETTLE);
                server.assert_running();
                (r.held, r.errors, r.first_error, server.rss())
            } else {
                let r = rt.block_on(storm(system, server.addr, n, c, false, Via::Raw));
                std::thread::sleep(SETTLE);
                server.assert_running();
                (r.held, r.errors, r.first_error, server.rss())
            };
            if errors > 0 || held != n {
                println!(
                    "> {} ({}): {held} of {n} held, {errors} failed: {first_error}",
                    system.name(),
                    if with_tls { "TLS 1.3" } else { "plaintext" },
                );
            }
            rows.push((
                with_tls,
                MemRow {
                    system,
                    before,
                    after,
                    n: held,
                },
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    println!("| system | idle connections | RSS before | RSS after | per connection | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (with_tls, r) in &rows {
        let plain = rows
            .iter()
            .find(|(t, p)| !*t && p.system == r.system)
            .map(|(_, p)| p.per_conn());
        println!(
            "| {} ({}) | {} | {} | {} | {} | {} |",
            r.system.name(),
            if *with_tls { "TLS 1.3" } else { "plaintext" },
            r.n,
            fmt_bytes(r.before as f64),
            fmt_bytes(r.after as f64),
            fmt_bytes(r.per_conn()),
            plain.map_or("-".into(), |b| ratio(r.per_conn(), b))
        );
    }
    println!();
    println!(
        "Ratio: bytes per connection over the same driver's plaintext row (tls/plain). Shims in \
         raw bytes, no UDP bind; each row a fresh server of this build, the TLS one with \
         `--tls-cert --tls-key` (negotiated: {}). RSS only: kernel socket buffers are not in it.",
        negotiated.as_deref().unwrap_or("-")
    );
    println!();
}

/// Sends a TCP Ping on every connection at once (through the client library for client
/// sessions), then waits (up to 30 s) for every Pong. Returns the connections (still
/// open), how many answered, the time from the broadcast start to each Pong, and the time
/// to the last Pong.
async fn ping_all(conns: Vec<Conn>) -> (Vec<Conn>, usize, Hist, f64) {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let start = Instant::now();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut tasks = Vec::with_capacity(conns.len());
            for mut conn in conns {
                tasks.push(tokio::task::spawn_local(async move {
                    let answered = tokio::time::timeout_at(deadline, async {
                        match &mut conn {
                            Conn::Client(c) => c.ping(b"p").await.is_ok(),
                            Conn::Raw(s) => {
                                let mut b = [0u8; 3];
                                s.write_all(&[0x06, b'p', 0x0A]).await.is_ok()
                                    && s.read_exact(&mut b).await.is_ok()
                                    && b == [0x07, b'p', 0x0A]
                            }
                        }
                    })
                    .await;
                    let at = matches!(answered, Ok(true)).then(|| start.elapsed());
                    (conn, at)
                }));
            }
            let mut hist = Hist::default();
            let mut last = Duration::ZERO;
            let mut answered = 0;
            let mut back = Vec::with_capacity(tasks.len());
            for t in tasks {
                let (conn, at) = t.await.expect("ping task");
                if let Some(at) = at {
                    answered += 1;
                    hist.record(at);
                    last = last.max(at);
                }
                back.push(conn);
            }
            (back, answered, hist, last.as_secs_f64())
        })
        .await
}

/// Server RSS per shim holding state, above an idle shim, for each selected velium
/// driver: N raw shims (TCP connect, Identify -> Session, no UDP bind) on a fresh server,
/// RSS; then each sends one Set with K keys and a Ping behind it over TCP (a connection's
/// frames are handled in order, so the Pong says the Set was applied; a refused Set
/// answers with an Error first), RSS again. Returns (driver, bytes per shim, keys).
fn state_rss(rt: &tokio::runtime::Runtime, n: usize, c: usize) -> Vec<(System, f64, usize)> {
    let keys = state_load::key_names(setting("state_keys", 22).max(1));
    println!(
        "## Server RSS per shim holding state: {n} shims, each setting {} keys (values of \
         10-30 bytes) in one Set frame",
        keys.len()
    );
    println!();
    let mut out = Vec::new();
    let mut lines = Vec::new();
    for system in [System::VeliumUring, System::VeliumEpoll] {
        if !selected(system) {
            continue;
        }
        let Some(mut server) = Server::start(system, QUIET) else {
            continue;
        };
        let r = rt.block_on(storm(system, server.addr, n, c, false, Via::Raw));
        std::thread::sleep(SETTLE);
        server.assert_running();
        let idle = server.rss();
        let mut conns = r.conns;
        let (ok, errors, first_error, state_bytes) = rt.block_on(set_all(&mut conns, &keys));
        std::thread::sleep(SETTLE);
        server.assert_running();
        let after = server.rss();
        let held = ok.max(1);
        let per = (after as f64 - idle as f64) / held as f64;
        if r.errors > 0 || errors > 0 || ok != n {
            println!(
                "> {}: {} of {n} connected ({} failed: {}), {ok} Sets applied, {errors} \
                 refused or lost: {first_error}",
                system.name(),
                conns.len(),
                r.errors,
                r.first_error
            );
        }
        lines.push(format!(
            "| {} | {ok} | {} | {} | {} | {} |",
            system.name(),
            fmt_bytes(idle as f64),
            fmt_bytes(after as f64),
            fmt_bytes(per),
            fmt_bytes(state_bytes as f64 / held as f64),
        ));
        out.push((system, per, keys.len()));
        drop(conns);
    }
    if !lines.is_empty() {
        println!(
            "| system | shims with state | RSS, idle shims | RSS, after the Sets | per shim \
             above idle | keys + values per shim |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for l in lines {
            println!("{l}");
        }
        println!();
        println!(
            "Per shim above idle: (RSS after the Sets - RSS of the same shims idle) / shims. \
             Keys + values: the bytes of state itself (the `state_bytes` measure). RSS only: \
             kernel socket buffers are not in it."
        );
        println!();
    }
    out
}

/// Sends every raw connection one Set with `keys` (values unique per shim) and a Ping,
/// then reads each one's answer: (Pongs, failures, the first failure, bytes of keys and
/// values set in all).
async fn set_all(conns: &mut [Conn], keys: &[String]) -> (usize, usize, String, usize) {
    let mut frame = Vec::with_capacity(1024);
    let mut state_bytes = 0;
    let mut errors = 0;
    let mut first_error = String::new();
    let mut fail = |e: String, errors: &mut usize| {
        if first_error.is_empty() {
            first_error = e;
        }
        *errors += 1;
    };
    let mut sent = vec![false; conns.len()];
    for (i, conn) in conns.iter_mut().enumerate() {
        let Conn::Raw(s) = conn else { continue };
        let values: Vec<String> = (0..keys.len())
            .map(|k| state_load::value_of(k, i as u64, i))
            .collect();
        state_bytes += keys
            .iter()
            .zip(&values)
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
        frame.clear();
        velium_server::proto::state::encode_set(
            keys.iter()
                .zip(&values)
                .map(|(k, v)| (k.as_str(), Some(v.as_str()))),
            &mut frame,
        );
        frame.extend_from_slice(&[0x06, b's', 0x0A]);
        match s.write_all(&frame).await {
            Ok(()) => sent[i] = true,
            Err(e) => fail(format!("write: {e}"), &mut errors),
        }
    }
    let mut ok = 0;
    for (i, conn) in conns.iter_mut().enumerate() {
        let Conn::Raw(s) = conn else { continue };
        if !sent[i] {
            continue;
        }
        // The first line back: the Pong, or an Error for a refused Set.
        let mut line = Vec::new();
        let mut b = [0u8; 256];
        let got = tokio::time::timeout(Duration::from_secs(30), async {
            while !line.contains(&b'\n') {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return false,
                    Ok(k) => line.extend_from_slice(&b[..k]),
                }
            }
            true
        })
        .await;
        if got != Ok(true) {
            fail("no answer to Set + Ping".into(), &mut errors);
        } else if line.starts_with(&[0x07, b's', 0x0A]) {
            ok += 1;
        } else {
            let end = line.iter().position(|&c| c == b'\n').unwrap_or(line.len());
            fail(
                format!("{:?}", String::from_utf8_lossy(&line[..end])),
                &mut errors,
            );
        }
    }
    (ok, errors, first_error, state_bytes)
}
