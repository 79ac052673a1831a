//! Relay benchmarks.
//!
//! Every system is driven the same way, each at its best: raw protocol bytes at both ends
//! (the handshakes included), a publisher that pipelines (up to B frames per `write`,
//! default 64), subscribers that read up to K bytes per `read` (default 64 KiB) and take
//! the frames apart in place, and the same P-byte payload (default 16).
//!
//! (a) FAN-OUT 1 -> R, for each R of a list (default 1,000 and 100): one publisher sends
//!     M messages (default 10,000,000 / R, so 10M deliveries per round) to R receivers,
//!     windowed so that it is never more than W messages (default 1,024) ahead of the
//!     slowest receiver; rate = deliveries / time from the first send until every
//!     receiver has every message, the total checked exactly. velium: Echo to
//!     `bench.storm.*` (receivers `bench.storm.sN`, every Echo's Ack checked); nats-server:
//!     PUB to `bench.fan`, which the R receivers subscribed to (each confirmed by PING ->
//!     PONG). A velium receiver counts frames (each ends with its one 0x0A); a nats
//!     receiver parses each MSG header, reads its size and skips the payload. For the first
//!     R of the list, one more velium row drives every end through the client library
//!     (`Client::echo`, `Client::next_event`), to show that library's cost.
//! (b) LATENCY, open loop, for each R of a list (default 100 and 1): one publisher sends
//!     at a fixed rate (default 1,000/s) to R receivers, each payload its sequence number
//!     zero-padded to P bytes; latency per delivery = the time a receiver's read returned
//!     it - the message's intended send time (a pacing thread fixes the schedule, so a
//!     stall is charged in full: no coordinated omission). Ticks that come due while a
//!     write is in flight go out together in the next write.
//! (c) ROUND TRIP: Command -> CommandResponse between two shims on different server cores
//!     (the responder reconnects until the server's `connect ... core=N` log line puts it
//!     on another core than the requester), open loop at a fixed rate (default 2,000/s for
//!     5 s after a warm-up), latency = receive time - intended send time. velium through
//!     its client library (`command`, `next_event`, `respond`), then raw; nats
//!     request-reply (a responder subscribed to a subject, replying to the reply subject).
//!     Two diagnostic rows put both velium shims on the SAME core, to show what the
//!     cross-core hand-off costs.
//!
//! Settings (flag or environment): `--receivers` (1000,100), `--messages` (10,000,000 /
//! R), `--payload` (16), `--batch` (64 frames per write), `--read` (65536 bytes per
//! read), `--window` (1024), `--client_rows` (1; 0 leaves out the client-library rows),
//! `--publish_rate` (1000), `--lat_receivers` (100,1), `--rate` (2000, round trip),
//! `--seconds` (5, latency and round trip), `--rounds` (3), each also as
//! `VELIUM_BENCH_<NAME>`; `VELIUM_BENCH_NATS_COPY=1` (diagnostic) gives the nats
//! receivers the earlier reader, which copies each read into a second buffer and splits
//! each MSG header into words; `VELIUM_BENCH_ONLY=uring,epoll,before,nats`;
//! `VELIUM_BENCH_PARTS=fanout,latency,rtt`; `VELIUM_BENCH_BASELINE=/path/to/velium-server`
//! adds rows for that earlier build (velium-before io_uring, key `before`) and
//! after-vs-before ratios.

mod common;

use common::{
    Conn, CpuMeter, Hist, LatRow, Progress, QUIET, Server, Subject, System, Via, banner,
    cap_connections, connect_from, find_row, floor, fmt_cpu, fmt_rate, nats_handshake, part,
    print_after_vs_before, print_latency_table, ratio, runtime, selected, setting, setting_list,
    storm, target, velium_identify,
};
use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use velium_server::client::{Client, Event};

/// The fan-out subjects, velium io_uring raw first (the ratio base): raw against raw.
/// The baseline's rows (velium-before) run only when `VELIUM_BENCH_BASELINE` is set.
const FAN_SUBJECTS: [Subject; 6] = [
    Subject::raw(System::VeliumUring),
    Subject::raw(System::VeliumEpoll),
    Subject::raw(System::VeliumBefore),
    Subject::raw(System::Nats),
    Subject::client(System::VeliumUring),
    Subject::client(System::VeliumBefore),
];

/// The open-loop latency subjects, velium io_uring first (the ratio base).
const LAT_SUBJECTS: [Subject; 4] = [
    Subject::raw(System::VeliumUring),
    Subject::raw(System::VeliumEpoll),
    Subject::raw(System::VeliumBefore),
    Subject::raw(System::Nats),
];

/// The round-trip subjects, velium io_uring through the client library first.
/// (subject, same core): the last two rows put both velium shims on ONE core, as a
/// diagnostic of what the cross-core hand-off costs. The baseline (velium-before) has no
/// SAME-core rows.
const RTT_SUBJECTS: [(Subject, bool); 9] = [
    (Subject::client(System::VeliumUring), false),
    (Subject::client(System::VeliumEpoll), false),
    (Subject::client(System::VeliumBefore), false),
    (Subject::raw(System::VeliumUring), false),
    (Subject::raw(System::VeliumEpoll), false),
    (Subject::raw(System::VeliumBefore), false),
    (Subject::raw(System::Nats), false),
    (Subject::raw(System::VeliumUring), true),
    (Subject::raw(System::VeliumEpoll), true),
];

/// How every publisher and subscriber is driven, whatever the system.
#[derive(Clone, Copy)]
struct Drive {
    /// Payload bytes of every message.
    payload: usize,
    /// Frames per `write` a publisher sends at most (when it has that many ready).
    batch: usize,
    /// Bytes a subscriber reads at most per `read`.
    read: usize,
    /// Diagnostic: nats receivers with the earlier, copying reader.
    nats_copy: bool,
}

struct FanParams {
    receivers: usize,
    messages: usize,
    window: usize,
    drive: Drive,
}

/// One row's median fan-out round, by row name.
type FanMedians = Vec<(String, FanStats)>;

fn main() {
    floor::maybe_run();
    banner("relay");
    let rounds = setting("rounds", 3).max(1);
    let drive = Drive {
        payload: setting("payload", 16).max(1),
        batch: setting("batch", 64).max(1),
        read: setting("read", 64 * 1024).max(64),
        nats_copy: setting("nats_copy", 0) != 0,
    };
    let messages = setting("messages", 0);
    let window = setting("window", 1024).max(1);
    let client_rows = setting("client_rows", 1) != 0;
    let publish_rate = setting("publish_rate", 1000).max(1) as f64;
    let rate = setting("rate", 2000).max(1) as f64;
    let seconds = setting("seconds", 5).max(1) as f64;
    let rt = runtime();
    println!(
        "Every system is driven alike: raw protocol bytes, a publisher writing up to {} \
         frames per write, receivers reading up to {} bytes per read and parsing in place{}, \
         {}-byte payloads.",
        drive.batch,
        drive.read,
        if drive.nats_copy {
            " (nats receivers: the earlier copying reader, VELIUM_BENCH_NATS_COPY=1)"
        } else {
            ""
        },
        drive.payload
    );
    println!();

    // ----- (a) fan-out -----
    let mut fan_results: Vec<(usize, FanMedians)> = Vec::new();
    if part("fanout") {
        for (k, &r) in setting_list("receivers", &[1000, 100]).iter().enumerate() {
            let receivers = cap_connections("fan-out receivers", r.max(1), 300);
            let fan = FanParams {
                receivers,
                messages: if messages > 0 {
                    messages
                } else {
                    (10_000_000 / receivers).max(1000)
                },
                window,
                drive,
            };
            let medians = fan_part(&rt, &fan, rounds, client_rows && k == 0);
            fan_results.push((receivers, medians));
        }
    }

    // ----- (b) open-loop latency -----
    let mut lat_tables: Vec<(usize, Vec<LatRow>)> = Vec::new();
    if part("latency") {
        for &r in &setting_list("lat_receivers", &[100, 1]) {
            let receivers = cap_connections("latency receivers", r.max(1), 300);
            let rows = latency_part(&rt, receivers, publish_rate, seconds, rounds, &drive);
            lat_tables.push((receivers, rows));
        }
    }

    // ----- (c) round trip -----
    let per_round = (rate * seconds / rounds as f64).ceil() as u64;
    let warm = (rate * 0.25).ceil() as u64;
    let do_rtt = part("rtt");
    if do_rtt {
        println!(
            "## Command round trip between two shims on different server cores: open loop at \
         {rate:.0}/s, {} measured per system ({rounds} interleaved rounds of {per_round} after \
         {warm} warm-up)",
            per_round * rounds as u64
        );
        println!();
    }
    let mut rtt_rows: Vec<LatRow> = Vec::new();
    for _ in 0..rounds {
        for (subject, same_core) in RTT_SUBJECTS {
            if !selected(subject.system) || !do_rtt {
                continue;
            }
            // velium logs each connect (with its core) at info level.
            let Some(mut server) = Server::start(subject.system, "info") else {
                continue;
            };
            let r = rt.block_on(round_trip(
                subject, same_core, &server, rate, warm, per_round,
            ));
            server.assert_running();
            let name = if same_core {
                format!("{}, SAME core", subject.name())
            } else {
                subject.name()
            };
            let row = match rtt_rows.iter().position(|r| r.name == name) {
                Some(i) => &mut rtt_rows[i],
                None => {
                    rtt_rows.push(LatRow {
                        name: name.clone(),
                        hist: Hist::default(),
                        rate: None,
                        note: String::new(),
                    });
                    rtt_rows.last_mut().unwrap()
                }
            };
            match r {
                Ok(rr) => {
                    row.hist.merge(&rr.hist);
                    if !rr.note.is_empty() && !row.note.contains(&rr.note) {
                        if !row.note.is_empty() {
                            row.note.push_str("; ");
                        }
                        row.note.push_str(&rr.note);
                    }
                }
                Err(e) => {
                    if !row.note.is_empty() {
                        row.note.push_str("; ");
                    }
                    row.note.push_str(&e);
                }
            }
        }
    }
    print_latency_table(
        &format!("Round trip at {rate:.0}/s (intended send -> response received)"),
        "-",
        &rtt_rows,
    );

    // ----- targets -----
    println!("## Targets (velium io_uring, raw; epoll in brackets)");
    println!();
    let vr = Subject::raw(System::VeliumUring).name();
    let ve = Subject::raw(System::VeliumEpoll).name();
    let nats = System::Nats.name();
    for (r, medians) in &fan_results {
        let of = |name: &str| medians.iter().find(|m| m.0 == name).map(|m| m.1.rate);
        if let (Some(v), Some(n)) = (of(&vr), of(nats)) {
            let epoll = of(&ve).map_or(String::new(), |e| {
                format!(" [epoll {}/s: {}]", fmt_rate(e), ratio(e, n))
            });
            target(
                v >= 2.0 * n,
                &format!(
                    "fan-out 1 -> {} deliveries/s at least 2x nats-server's",
                    fmt_rate(*r as f64)
                ),
                &format!(
                    "velium io_uring {}/s, nats-server {}/s: {}{epoll}",
                    fmt_rate(v),
                    fmt_rate(n),
                    ratio(v, n)
                ),
            );
        }
    }
    for (r, rows) in &lat_tables {
        let q = |name: &str, p: f64| find_row(rows, name).map(|i| rows[i].hist.us(p));
        let (p, label) = if *r > 1 { (0.99, "p99") } else { (0.5, "p50") };
        if let (Some(v), Some(n)) = (q(&vr, p), q(nats, p)) {
            let epoll = q(&ve, p).map_or(String::new(), |e| {
                format!(" [epoll {e:.1} µs: {}]", ratio(e, n))
            });
            let what = format!(
                "publish -> delivery {label} at {}/s to {} receiver{} no slower than \
                 nats-server's",
                fmt_rate(publish_rate),
                fmt_rate(*r as f64),
                if *r == 1 { "" } else { "s" }
            );
            let detail = format!(
                "velium io_uring {v:.1} µs, nats-server {n:.1} µs: {}{epoll}",
                ratio(v, n)
            );
            if *r > 1 {
                target(v <= n, &what, &detail);
            } else {
                // Not one of the targets: shown for the record.
                println!("- for the record: {what}? {detail}");
            }
        }
    }
    let vc = Subject::client(System::VeliumUring).name();
    let q = |name: &str| find_row(&rtt_rows, name).map(|i| rtt_rows[i].hist.us(0.5));
    if let (Some(v), Some(n)) = (q(&vc), q(nats)) {
        let raw = q(&vr).map_or(String::new(), |r| {
            format!(" [raw {r:.1} µs: {}]", ratio(r, n))
        });
        target(
            v <= n,
            "command round trip p50 no slower than nats request-reply at the same rate",
            &format!(
                "velium io_uring (client lib) {v:.1} µs, nats-server {n:.1} µs: {}{raw}",
                ratio(v, n)
            ),
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------
// Fan-out
// ---------------------------------------------------------------------------------------

/// Runs and prints one fan-out part (1 -> `fan.receivers`); returns each row's median.
fn fan_part(
    rt: &tokio::runtime::Runtime,
    fan: &FanParams,
    rounds: usize,
    client_rows: bool,
) -> FanMedians {
    let d = fan.drive;
    println!(
        "## Fan-out 1 -> {}: {} messages of {} bytes per round, up to {} per write, window {} \
         messages, receivers reading up to {} bytes, {rounds} interleaved rounds (a fresh \
         server each; rate = median round)",
        fan.receivers, fan.messages, d.payload, d.batch, fan.window, d.read
    );
    println!();
    let mut rows: Vec<(Subject, Vec<FanStats>, Vec<String>)> = Vec::new();
    for _ in 0..rounds {
        for subject in FAN_SUBJECTS {
            if !selected(subject.system) || (subject.via == Via::Client && !client_rows) {
                continue;
            }
            let Some(mut server) = Server::start(subject.system, QUIET) else {
                continue;
            };
            let r = rt.block_on(fan_out(subject, &server, fan));
            server.assert_running();
            let slow = server.log_count("slow consumer");
            let row = match rows.iter_mut().position(|r| r.0 == subject) {
                Some(i) => &mut rows[i],
                None => {
                    rows.push((subject, Vec::new(), Vec::new()));
                    rows.last_mut().unwrap()
                }
            };
            match r {
                Ok(rate) => row.1.push(rate),
                Err(e) => row.2.push(e),
            }
            if slow > 0 {
                row.2.push(format!("{slow} slow-consumer cut-offs"));
            }
        }
    }
    let medians: Vec<Option<FanStats>> = rows
        .iter_mut()
        .map(|(_, rounds, _)| {
            rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            rounds.get(rounds.len() / 2).copied()
        })
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let base = medians.first().copied().flatten();
    println!(
        "| system | deliveries/s (median round) | every round | server CPU | bench CPU | ratio |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    for ((subject, rounds, errors), median) in rows.iter().zip(&medians) {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            subject.name(),
            median.map_or("-".into(), |m| fmt_rate(m.rate)),
            rounds
                .iter()
                .map(|r| fmt_rate(r.rate))
                .collect::<Vec<_>>()
                .join(" / "),
            median.map_or("-".into(), |m| fmt_cpu(m.server_cpu)),
            median.map_or("-".into(), |m| fmt_cpu(m.bench_cpu)),
            match (median, base) {
                (Some(m), Some(b)) => ratio(m.rate, b.rate),
                _ => "-".into(),
            }
        );
        for e in errors {
            println!("- {}: {e}", subject.name());
        }
    }
    println!();
    println!(
        "Ratio: deliveries/s over {}'s (>1 = more). CPU: share of one core used by the \
         server / by this bench process (its one runtime thread) during the measured phase \
         of the median round.",
        rows.first().map_or("-".into(), |r| r.0.name())
    );
    for ((subject, _, _), median) in rows.iter().zip(&medians) {
        if let Some(m) = median
            && m.bench_cpu >= 0.9
        {
            println!(
                "- {}: the bench's thread was {} busy: this row may be bound by the load \
                 generator, not the server.",
                subject.name(),
                fmt_cpu(m.bench_cpu)
            );
        }
    }
    println!();
    let named: FanMedians = rows
        .iter()
        .zip(&medians)
        .filter_map(|(r, m)| Some((r.0.name(), (*m)?)))
        .collect();
    print_after_vs_before(
        &format!(
            "fan-out 1 -> {} deliveries/s of the median round",
            fan.receivers
        ),
        &named
            .iter()
            .map(|(n, m)| (n.clone(), m.rate))
            .collect::<Vec<_>>(),
        fmt_rate,
        "more",
    );
    named
}

/// What one fan-out round measured.
#[derive(Clone, Copy)]
struct FanStats {
    /// Deliveries per second.
    rate: f64,
    /// Cores the server kept busy.
    server_cpu: f64,
    /// Cores this bench process kept busy.
    bench_cpu: f64,
}

/// The receivers of one run, connected with raw bytes (or, for a velium client row,
/// through the client library) as `bench.storm.sN`.
async fn connect_receivers(
    subject: Subject,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<Conn>, String> {
    let via = if subject.system.is_velium() {
        subject.via
    } else {
        Via::Raw
    };
    let r = storm(subject.system, addr, n, 100, false, via).await;
    if r.errors > 0 {
        return Err(format!("{} receivers failed: {}", r.errors, r.first_error));
    }
    Ok(r.conns)
}

/// One fan-out run.
async fn fan_out(subject: Subject, server: &Server, p: &FanParams) -> Result<FanStats, String> {
    let addr = server.addr;
    let d = p.drive;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let conns = connect_receivers(subject, addr, p.receivers).await?;
            let progress = Progress::new(conns.len());
            let mut tasks = Vec::new();
            for (i, conn) in conns.into_iter().enumerate() {
                let pr = progress.clone();
                tasks.push(match (subject.system, conn) {
                    (System::Nats, Conn::Raw(s)) => {
                        tokio::task::spawn_local(nats_receiver(s, i, pr, d))
                    }
                    (_, Conn::Raw(s)) => tokio::task::spawn_local(velium_receiver(s, i, pr, d)),
                    (_, Conn::Client(c)) => tokio::task::spawn_local(client_receiver(c, i, pr)),
                });
            }
            if subject.system == System::Nats {
                // Every subscription is registered once its PING is answered.
                progress
                    .wait_min(1, Duration::from_secs(30))
                    .await
                    .map_err(|e| format!("subscriptions: {e}"))?;
            }
            let base = if subject.system == System::Nats { 1 } else { 0 };
            let payload = "x".repeat(d.payload);
            let mut sender = Sender::connect(subject, addr, &payload).await?;
            // Warm-up: one window's worth, all delivered, then the measured run.
            let warm = p.window as u64;
            sender
                .send(&progress, base, warm, p.window as u64, d.batch)
                .await?;
            progress
                .wait_min(base + warm, Duration::from_secs(30))
                .await?;
            let cpu = CpuMeter::start(server);
            let start = Instant::now();
            let m = p.messages as u64;
            sender
                .send(&progress, base + warm, m, p.window as u64, d.batch)
                .await?;
            progress
                .wait_min(base + warm + m, Duration::from_secs(120))
                .await?;
            let elapsed = start.elapsed();
            let (server_cpu, bench_cpu) = cpu.stop();
            sender.check_acks(warm + m, p.receivers).await?;
            settle_exact(&progress, base + warm + m, tasks).await?;
            Ok(FanStats {
                rate: (m * p.receivers as u64) as f64 / elapsed.as_secs_f64(),
                server_cpu,
                bench_cpu,
            })
        })
        .await
}

/// The publisher, velium's or nats'.
enum Sender {
    /// Raw bytes: one frame per message, several per write, like a pipelining publisher.
    Raw {
        wr: tokio::net::tcp::OwnedWriteHalf,
        /// nats (PUB), else velium (Echo).
        nats: bool,
        /// The fan-out's one frame.
        frame: Vec<u8>,
        acks: Rc<Cell<u64>>,
        ack_err: Rc<RefCell<String>>,
    },
    /// velium's client library: `Client::echo` per message, up to a window in flight.
    Client {
        client: Rc<Client>,
        payload: Rc<str>,
        acks: Rc<Cell<u64>>,
        ack_err: Rc<RefCell<String>>,
    },
}

/// The Echo target that matches every receiver (velium identities `bench.storm.sN`).
const FAN_TARGET: &str = "bench.storm.*";
/// The nats subject the receivers subscribe to.
const FAN_SUBJECT: &str = "bench.fan";

/// Appends one publish of `payload`: nats `PUB bench.fan LEN\r\nPAYLOAD\r\n`, velium
/// `0x08 bench.storm.* SP PAYLOAD 0x0A` (an Echo).
fn push_publish(nats: bool, payload: &[u8], out: &mut Vec<u8>) {
    if nats {
        out.extend_from_slice(b"PUB ");
        out.extend_from_slice(FAN_SUBJECT.as_bytes());
        out.push(b' ');
        out.extend_from_slice(payload.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
    } else {
        out.push(0x08);
        out.extend_from_slice(FAN_TARGET.as_bytes());
        out.push(b' ');
        out.extend_from_slice(payload);
        out.push(0x0A);
    }
}

impl Sender {
    async fn connect(subject: Subject, addr: SocketAddr, payload: &str) -> Result<Sender, String> {
        let acks = Rc::new(Cell::new(0));
        let ack_err = Rc::new(RefCell::new(String::new()));
        if subject.system.is_velium() && subject.via == Via::Client {
            let client = Client::connect(addr, "bench.src")
                .await
                .map_err(|e| format!("sender: {e}"))?;
            return Ok(Sender::Client {
                client: Rc::new(client),
                payload: Rc::from(payload),
                acks,
                ack_err,
            });
        }
        let mut s = connect_from(Ipv4Addr::LOCALHOST, addr)
            .await
            .map_err(|e| format!("sender connect: {e}"))?;
        let nats = subject.system == System::Nats;
        if nats {
            nats_handshake(&mut s)
                .await
                .map_err(|e| format!("sender: {e}"))?;
        } else {
            velium_identify(&mut s, "bench.src")
                .await
                .map_err(|e| format!("sender: {e}"))?;
        }
        let mut frame = Vec::new();
        push_publish(nats, payload.as_bytes(), &mut frame);
        let (rd, wr) = s.into_split();
        // velium answers every Echo with an Ack: read them (or the sender itself would
        // become a slow consumer) and keep the first thing that is not one. nats sends
        // nothing but an occasional PING (answered by nobody: a run is far shorter than
        // its 2-minute ping interval).
        let (a, e) = (acks.clone(), ack_err.clone());
        tokio::task::spawn_local(async move {
            let mut r = Reader::new(rd);
            while r.fill().await {
                while let Some(line) = r.line() {
                    let line = r.slice(line);
                    if line.first() == Some(&0x0C) {
                        a.set(a.get() + 1);
                    } else if !nats && e.borrow().is_empty() {
                        // Its first 256 bytes.
                        let line = &line[..line.len().min(256)];
                        *e.borrow_mut() = String::from_utf8_lossy(line).into_owned();
                    }
                }
            }
        });
        Ok(Sender::Raw {
            wr,
            nats,
            frame,
            acks,
            ack_err,
        })
    }

    /// Sends `count` messages, up to `batch` per write, never more than `window` ahead of
    /// the slowest receiver, whose count started at `from`.
    async fn send(
        &mut self,
        progress: &Progress,
        from: u64,
        count: u64,
        window: u64,
        batch: usize,
    ) -> Result<(), String> {
        let mut sent = 0u64;
        let mut buf = Vec::new();
        while sent < count {
            let moved = progress.moved.notified();
            let behind = (from + sent).saturating_sub(progress.min());
            let room = window.saturating_sub(behind).min(count - sent);
            if room == 0 {
                if tokio::time::timeout(Duration::from_secs(30), moved)
                    .await
                    .is_err()
                {
                    return Err(format!(
                        "stalled at {sent} of {count} sent; slowest receiver at {}",
                        progress.min()
                    ));
                }
                continue;
            }
            match self {
                Sender::Raw { wr, frame, .. } => {
                    let k = room.min(batch as u64);
                    buf.clear();
                    for _ in 0..k {
                        buf.extend_from_slice(frame);
                    }
                    wr.write_all(&buf).await.map_err(|e| format!("send: {e}"))?;
                    sent += k;
                }
                Sender::Client {
                    client,
                    payload,
                    acks,
                    ack_err,
                } => {
                    for _ in 0..room {
                        let (c, t, a, e) = (
                            client.clone(),
                            payload.clone(),
                            acks.clone(),
                            ack_err.clone(),
                        );
                        tokio::task::spawn_local(async move {
                            match c.echo(FAN_TARGET, &t).await {
                                Ok(_) => a.set(a.get() + 1),
                                Err(err) => *e.borrow_mut() = err.to_string(),
                            }
                        });
                    }
                    sent += room;
                    // Let the echo tasks write before counting room again.
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(())
    }

    /// velium: every Echo was acknowledged as reaching every receiver.
    async fn check_acks(&self, want: u64, receivers: usize) -> Result<(), String> {
        let (acks, err, nats) = match self {
            Sender::Raw {
                acks,
                ack_err,
                nats,
                ..
            } => (acks, ack_err, *nats),
            Sender::Client { acks, ack_err, .. } => (acks, ack_err, false),
        };
        if nats {
            return Ok(());
        }
        let end = Instant::now() + Duration::from_secs(10);
        while acks.get() < want && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !err.borrow().is_empty() {
            return Err(format!(
                "sender got {:?} (receivers: {receivers})",
                err.borrow()
            ));
        }
        if acks.get() < want {
            return Err(format!("only {} of {want} Echo acks", acks.get()));
        }
        Ok(())
    }
}

/// A raw velium receiver: every delivered frame ends with the one 0x0A it holds.
async fn velium_receiver(mut s: TcpStream, i: usize, progress: Rc<Progress>, d: Drive) {
    let mut buf = vec![0u8; d.read];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => progress.add(i, memchr::memchr_iter(b'\n', &buf[..n]).count() as u64),
        }
    }
}

/// A velium client-library receiver: counts Echo events.
async fn client_receiver(c: Client, i: usize, progress: Rc<Progress>) {
    while let Some(ev) = c.next_event().await {
        match ev {
            Event::Echo { .. } => progress.add(i, 1),
            Event::Closed { .. } => return,
            _ => {}
        }
    }
}

/// Checks that every receiver got exactly `per_receiver` frames (after a pause in which
/// nothing more than what was sent may arrive), then stops the receivers.
async fn settle_exact(
    progress: &Progress,
    per_receiver: u64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), String> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let want = per_receiver * progress.counts.len() as u64;
    for t in tasks {
        t.abort();
    }
    if progress.total() != want {
        return Err(format!(
            "{} deliveries counted, {want} expected",
            progress.total()
        ));
    }
    Ok(())
}

/// A raw nats receiver: subscribes (confirmed by PING -> PONG, counted as one), then
/// counts MSG frames, parsed in place (or, with `VELIUM_BENCH_NATS_COPY`, by the earlier
/// copying reader).
async fn nats_receiver(mut s: TcpStream, i: usize, progress: Rc<Progress>, d: Drive) {
    let sub = format!("SUB {FAN_SUBJECT} 1\r\nPING\r\n");
    if s.write_all(sub.as_bytes()).await.is_err() {
        return;
    }
    if d.nats_copy {
        let mut r = Reader::with_chunk(s, d.read);
        while r.fill().await {
            let mut k = 0;
            while let Some(item) = r.nats() {
                match item {
                    NatsItem::Msg { .. } | NatsItem::Pong => k += 1,
                    NatsItem::Ping => {
                        let _ = r.rd.write_all(b"PONG\r\n").await;
                    }
                    NatsItem::Other => {}
                }
            }
            progress.add(i, k);
        }
        return;
    }
    let mut b = InPlace::new(d.read);
    while b.fill(&mut s).await {
        let (mut k, mut ping) = (0, false);
        while let Some(item) = b.nats() {
            match item {
                NatsItem::Msg { .. } | NatsItem::Pong => k += 1,
                NatsItem::Ping => ping = true,
                NatsItem::Other => {}
            }
        }
        if ping && s.write_all(b"PONG\r\n").await.is_err() {
            return;
        }
        progress.add(i, k);
    }
}

/// A receive buffer taken apart in place: each read takes up to `read` bytes, the frames
/// are parsed where they lie, and only what a read leaves unparsed (a frame cut at its
/// end) moves to the front before the next read.
struct InPlace {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    read: usize,
}

impl InPlace {
    fn new(read: usize) -> InPlace {
        InPlace {
            buf: vec![0u8; read],
            start: 0,
            end: 0,
            read,
        }
    }

    /// Reads up to `read` more bytes; false at the end of the stream or on an error.
    async fn fill<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> bool {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < self.end + self.read {
            self.buf.resize(self.end + self.read, 0);
        }
        match rd.read(&mut self.buf[self.end..self.end + self.read]).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.end += n;
                true
            }
        }
    }

    fn slice(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The next complete velium frame: a line, without its `\n`.
    fn line(&mut self) -> Option<std::ops::Range<usize>> {
        let start = self.start;
        let e = memchr::memchr(b'\n', &self.buf[start..self.end])?;
        self.start += e + 1;
        Some(start..start + e)
    }

    /// The next complete nats protocol item (a MSG's reply subject is not looked for).
    fn nats(&mut self) -> Option<NatsItem> {
        let rest = &self.buf[self.start..self.end];
        let nl = memchr::memchr(b'\n', rest)?;
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"MSG ") {
            // MSG subject sid [reply] size: the size is the last word.
            let (mut size, mut unit, mut j) = (0usize, 1usize, line.len());
            while j > 0 && line[j - 1].is_ascii_digit() {
                size += (line[j - 1] - b'0') as usize * unit;
                unit *= 10;
                j -= 1;
            }
            let total = nl + 1 + size + 2;
            if rest.len() < total {
                return None;
            }
            let p0 = self.start + nl + 1;
            self.start += total;
            return Some(NatsItem::Msg {
                reply: None,
                payload: p0..p0 + size,
            });
        }
        let item = match line {
            b"PING" => NatsItem::Ping,
            b"PONG" => NatsItem::Pong,
            _ => NatsItem::Other,
        };
        self.start += nl + 1;
        Some(item)
    }
}

// ---------------------------------------------------------------------------------------
// Open-loop latency
// ---------------------------------------------------------------------------------------

/// Runs and prints one latency part (1 -> `receivers` at `rate`/s); returns its rows.
fn latency_part(
    rt: &tokio::runtime::Runtime,
    receivers: usize,
    rate: f64,
    seconds: f64,
    rounds: usize,
    d: &Drive,
) -> Vec<LatRow> {
    let per_round = (rate * seconds / rounds as f64).ceil() as u64;
    let warm = (rate * 0.5).ceil() as u64;
    println!(
        "## Publish -> delivery, open loop at {rate:.0}/s to {receivers} receiver{}: {} \
         publishes measured per system ({rounds} interleaved rounds of {per_round} after \
         {warm} warm-up, a fresh server each), {}-byte payloads",
        if receivers == 1 { "" } else { "s" },
        per_round * rounds as u64,
        d.payload
    );
    println!();
    let mut rows: Vec<LatRow> = Vec::new();
    let mut cpu: Vec<(f64, f64, usize)> = Vec::new();
    for _ in 0..rounds {
        for subject in LAT_SUBJECTS {
            if !selected(subject.system) {
                continue;
            }
            let Some(mut server) = Server::start(subject.system, QUIET) else {
                continue;
            };
            let r = rt.block_on(open_loop(
                subject, &server, receivers, rate, warm, per_round, d,
            ));
            server.assert_running();
            let name = subject.name();
            let i = match rows.iter().position(|r| r.name == name) {
                Some(i) => i,
                None => {
                    rows.push(LatRow {
                        name,
                        hist: Hist::default(),
                        rate: None,
                        note: String::new(),
                    });
                    cpu.push((0.0, 0.0, 0));
                    rows.len() - 1
                }
            };
            match r {
                Ok(lr) => {
                    rows[i].hist.merge(&lr.hist);
                    cpu[i].0 += lr.server_cpu;
                    cpu[i].1 += lr.bench_cpu;
                    cpu[i].2 += 1;
                }
                Err(e) => {
                    let row = &mut rows[i];
                    if !row.note.is_empty() {
                        row.note.push_str("; ");
                    }
                    row.note.push_str(&e);
                }
            }
        }
    }
    for (row, (s, b, n)) in rows.iter_mut().zip(&cpu) {
        if *n > 0 {
            let c = format!(
                "CPU during the run: server {}, bench {}",
                fmt_cpu(s / *n as f64),
                fmt_cpu(b / *n as f64)
            );
            row.note = if row.note.is_empty() {
                c
            } else {
                format!("{c}; {}", row.note)
            };
        }
    }
    print_latency_table(
        &format!(
            "Publish -> delivery at {rate:.0}/s to {receivers} receiver{} (intended send -> \
             each receiver's read)",
            if receivers == 1 { "" } else { "s" }
        ),
        "-",
        &rows,
    );
    rows
}

/// What one open-loop run measured.
struct LatResult {
    hist: Hist,
    server_cpu: f64,
    bench_cpu: f64,
}

/// Deliveries of the open-loop run: latency from each message's intended send time.
struct LatRecorder {
    /// The schedule's start: message `seq` is intended at `t0 + seq * period`.
    t0: Cell<Instant>,
    period: Duration,
    warm: u64,
    hist: RefCell<Hist>,
}

impl LatRecorder {
    /// A delivery of the message whose payload is `payload` (its zero-padded sequence
    /// number), read at `at`.
    fn record(&self, payload: &[u8], at: Instant) {
        let mut seq = 0u64;
        for &c in payload {
            if !c.is_ascii_digit() {
                return;
            }
            seq = seq * 10 + (c - b'0') as u64;
        }
        if seq >= self.warm {
            let intended = self.t0.get() + self.period.mul_f64(seq as f64);
            self.hist
                .borrow_mut()
                .record(at.saturating_duration_since(intended));
        }
    }
}

/// One open-loop run: `warm` + `n` publishes at `rate`/s to `receivers` receivers.
async fn open_loop(
    subject: Subject,
    server: &Server,
    receivers: usize,
    rate: f64,
    warm: u64,
    n: u64,
    d: &Drive,
) -> Result<LatResult, String> {
    let addr = server.addr;
    let d = *d;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let conns = receivers_of(subject, addr, receivers).await?;
            let total = warm + n;
            let progress = Progress::new(conns.len());
            let rec = Rc::new(LatRecorder {
                t0: Cell::new(Instant::now()),
                period: Duration::from_secs_f64(1.0 / rate),
                warm,
                hist: RefCell::new(Hist::default()),
            });
            let nats = subject.system == System::Nats;
            let mut tasks = Vec::new();
            for (i, s) in conns.into_iter().enumerate() {
                let (pr, rc) = (progress.clone(), rec.clone());
                tasks.push(tokio::task::spawn_local(timed_receiver(
                    s, nats, i, pr, rc, d.read,
                )));
            }
            let base = if nats { 1 } else { 0 };
            if nats {
                progress
                    .wait_min(1, Duration::from_secs(30))
                    .await
                    .map_err(|e| format!("subscriptions: {e}"))?;
            }
            let mut sender = Sender::connect(subject, addr, "").await?;
            let Sender::Raw { wr, .. } = &mut sender else {
                unreachable!("the latency publisher speaks raw bytes");
            };
            let cpu = CpuMeter::start(server);
            let (t0, mut ticks) = pacer(rate, total);
            rec.t0.set(t0);
            let mut buf = Vec::with_capacity(64 * d.payload.max(32));
            let mut payload = Vec::with_capacity(d.payload.max(20));
            let width = d.payload;
            while let Some(seq) = ticks.recv().await {
                buf.clear();
                let mut next = Some(seq);
                while let Some(seq) = next {
                    payload.clear();
                    payload.extend_from_slice(format!("{seq:0width$}").as_bytes());
                    push_publish(nats, &payload, &mut buf);
                    // Pipelined: what came due meanwhile goes in the same write.
                    next = ticks.try_recv().ok();
                }
                wr.write_all(&buf).await.map_err(|e| format!("send: {e}"))?;
            }
            progress
                .wait_min(base + total, Duration::from_secs(10))
                .await?;
            let (server_cpu, bench_cpu) = cpu.stop();
            sender.check_acks(total, receivers).await?;
            settle_exact(&progress, base + total, tasks).await?;
            let hist = rec.hist.borrow().clone();
            Ok(LatResult {
                hist,
                server_cpu,
                bench_cpu,
            })
        })
        .await
}

/// The raw receivers of an open-loop run.
async fn receivers_of(
    subject: Subject,
    addr: SocketAddr,
    n: usize,
) -> Result<Vec<TcpStream>, String> {
    Ok(connect_receivers(subject, addr, n)
        .await?
        .into_iter()
        .filter_map(|c| match c {
            Conn::Raw(s) => Some(s),
            Conn::Client(_) => None,
        })
        .collect())
}

/// An open-loop receiver (nats: subscribed first, confirmed by PING -> PONG, counted as
/// one): records each delivery's latency, taking the time once per read.
async fn timed_receiver(
    mut s: TcpStream,
    nats: bool,
    i: usize,
    progress: Rc<Progress>,
    rec: Rc<LatRecorder>,
    read: usize,
) {
    if nats {
        let sub = format!("SUB {FAN_SUBJECT} 1\r\nPING\r\n");
        if s.write_all(sub.as_bytes()).await.is_err() {
            return;
        }
    }
    let mut b = InPlace::new(read);
    while b.fill(&mut s).await {
        let at = Instant::now();
        let (mut k, mut ping) = (0, false);
        if nats {
            while let Some(item) = b.nats() {
                match item {
                    NatsItem::Msg { payload, .. } => {
                        rec.record(b.slice(payload), at);
                        k += 1;
                    }
                    NatsItem::Pong => k += 1,
                    NatsItem::Ping => ping = true,
                    NatsItem::Other => {}
                }
            }
        } else {
            while let Some(f) = b.line() {
                // Echo: 0x08 SENDER SP TEXT
                let f = b.slice(f);
                if f.first() == Some(&0x08)
                    && let Some(sp) = memchr::memchr(b' ', f)
                {
                    rec.record(&f[sp + 1..], at);
                    k += 1;
                }
            }
        }
        if ping && s.write_all(b"PONG\r\n").await.is_err() {
            return;
        }
        progress.add(i, k);
    }
}

// ---------------------------------------------------------------------------------------
// nats protocol parsing
// ---------------------------------------------------------------------------------------

enum NatsItem {
    /// `MSG subject sid [reply] size\r\npayload\r\n`: the reply subject and payload as
    /// ranges of the parser's buffer (no allocation per message).
    Msg {
        reply: Option<std::ops::Range<usize>>,
        payload: std::ops::Range<usize>,
    },
    Ping,
    Pong,
    Other,
}

/// A byte stream read a chunk at a time into a buffer that the protocol parsers
/// ([`Reader::line`], [`Reader::nats`]) take apart item by item, between reads; their
/// items point into that buffer as ranges (see [`Reader::slice`]), so that nothing is
/// allocated per item.
struct Reader<R> {
    /// The stream (a TcpStream may also be written through here).
    rd: R,
    chunk: Vec<u8>,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    fn new(rd: R) -> Reader<R> {
        Reader::with_chunk(rd, 64 * 1024)
    }

    /// A reader taking up to `chunk` bytes per read.
    fn with_chunk(rd: R, chunk: usize) -> Reader<R> {
        Reader {
            rd,
            chunk: vec![0u8; chunk],
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// Reads the next chunk, dropping what the parsers took; false at the end of the
    /// stream or on an error.
    async fn fill(&mut self) -> bool {
        let n = match self.rd.read(&mut self.chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(&self.chunk[..n]);
        true
    }
}

impl<R> Reader<R> {
    fn slice(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The next complete velium frame: a line, without its `\n`.
    fn line(&mut self) -> Option<std::ops::Range<usize>> {
        let start = self.pos;
        let e = memchr::memchr(b'\n', &self.buf[start..])?;
        self.pos += e + 1;
        Some(start..start + e)
    }

    /// The next complete nats protocol item.
    fn nats(&mut self) -> Option<NatsItem> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let eol = memchr::memmem::find(rest, b"\r\n")?;
        let line = &rest[..eol];
        if let Some(args) = line.strip_prefix(b"MSG ") {
            // subject SP sid [SP reply] SP size
            let mut words = args.rsplit(|&b| b == b' ').filter(|w| !w.is_empty());
            let size: usize = std::str::from_utf8(words.next()?).ok()?.parse().ok()?;
            let maybe_reply = words.next()?;
            let reply = words.nth(1).map(|_| {
                let off = maybe_reply.as_ptr() as usize - self.buf.as_ptr() as usize;
                off..off + maybe_reply.len()
            });
            let total = eol + 2 + size + 2;
            if rest.len() < total {
                return None;
            }
            let p0 = start + eol + 2;
            self.pos += total;
            return Some(NatsItem::Msg {
                reply,
                payload: p0..p0 + size,
            });
        }
        self.pos += eol + 2;
        Some(match line {
            b"PING" => NatsItem::Ping,
            b"PONG" => NatsItem::Pong,
            _ => NatsItem::Other,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------

struct RttResult {
    hist: Hist,
    note: String,
}

/// The open-loop schedule: a thread that wakes at each intended send time (sleeping with a
/// 1 ns timer slack, then spinning the last 30 µs) and hands the sequence number to the
/// runtime. Send `seq` is intended at `t0 + seq / rate`.
fn pacer(rate: f64, total: u64) -> (Instant, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = Instant::now() + Duration::from_millis(20);
    let period = Duration::from_secs_f64(1.0 / rate);
    std::thread::spawn(move || {
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        }
        for seq in 0..total {
            let at = t0 + period.mul_f64(seq as f64);
            let now = Instant::now();
            if at > now + Duration::from_micros(30) {
                std::thread::sleep(at - now - Duration::from_micros(30));
            }
            while Instant::now() < at {
                std::hint::spin_loop();
            }
            if tx.send(seq).is_err() {
                return;
            }
        }
    });
    (t0, rx)
}

/// Received responses: latency from the intended send time, warm-up excluded.
struct Recorder {
    t0: Instant,
    period: Duration,
    warm: u64,
    total: u64,
    hist: std::cell::RefCell<Hist>,
    got: Cell<u64>,
    seen: std::cell::RefCell<Vec<bool>>,
    done: Notify,
}

impl Recorder {
    fn record(&self, seq: u64) {
        {
            let mut seen = self.seen.borrow_mut();
            match seen.get_mut(seq as usize) {
                Some(s) if !*s => *s = true,
                _ => return, // a duplicate or a stranger: not counted
            }
        }
        let intended = self.t0 + self.period.mul_f64(seq as f64);
        if seq >= self.warm {
            self.hist
                .borrow_mut()
                .record(Instant::now().saturating_duration_since(intended));
        }
        self.got.set(self.got.get() + 1);
        if self.got.get() >= self.total {
            self.done.notify_one();
        }
    }
}

async fn round_trip(
    subject: Subject,
    same_core: bool,
    server: &Server,
    rate: f64,
    warm: u64,
    n: u64,
) -> Result<RttResult, String> {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let addr = server.addr;
            let total = warm + n;
            let mut note = String::new();
            // Connect both ends first; velium's responder lands on another core.
            let ends = match (subject.system, subject.via) {
                (System::Nats, _) => Ends::Nats(nats_ends(addr).await?),
                (_, Via::Client) => {
                    let (req, resp, target, cores) = velium_client_ends(server).await?;
                    note = cores;
                    Ends::Client(Rc::new(req), Rc::new(resp), target)
                }
                (_, Via::Raw) => {
                    let (req, resp, target, cores) = velium_raw_ends(server, same_core).await?;
                    note = cores;
                    Ends::Raw(req, resp, target)
                }
            };
            let (t0, mut ticks) = pacer(rate, total);
            let rec = Rc::new(Recorder {
                t0,
                period: Duration::from_secs_f64(1.0 / rate),
                warm,
                total,
                hist: std::cell::RefCell::new(Hist::default()),
                got: Cell::new(0),
                seen: std::cell::RefCell::new(vec![false; total as usize]),
                done: Notify::new(),
            });
            let mut tasks = Vec::new();
            match ends {
                Ends::Client(req, resp, target) => {
                    // Responder: answer every Command with its text.
                    let r = resp.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        while let Some(ev) = r.next_event().await {
                            if let Event::Command { id, text, .. } = ev
                                && r.respond(id, &text).await.is_err()
                            {
                                return;
                            }
                        }
                    }));
                    // Requester's events: the responses.
                    let (q, rc) = (req.clone(), rec.clone());
                    tasks.push(tokio::task::spawn_local(async move {
                        while let Some(ev) = q.next_event().await {
                            if let Event::Response(r) = ev
                                && let Ok(seq) = r.text.parse::<u64>()
                            {
                                rc.record(seq);
                            }
                        }
                    }));
                    // Sender: one command per tick, each awaiting its Ack in its own task.
                    let target: Rc<str> = Rc::from(target.as_str());
                    tasks.push(tokio::task::spawn_local(async move {
                        while let Some(seq) = ticks.recv().await {
                            let (q, t) = (req.clone(), target.clone());
                            tokio::task::spawn_local(async move {
                                let _ = q.command(&t, &seq.to_string()).await;
                            });
                        }
                    }));
                }
                Ends::Raw(req, resp, target) => {
                    tasks.push(tokio::task::spawn_local(velium_raw_responder(resp)));
                    let (rd, mut wr) = req.into_split();
                    let rc = rec.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        let mut r = Reader::new(rd);
                        while r.fill().await {
                            while let Some(f) = r.line() {
                                let f = r.slice(f);
                                // Response: 0x05 ID SP RESPONDER SP TEXT
                                if f.first() == Some(&0x05)
                                    && let Some(seq) = f
                                        .rsplit(|&b| b == b' ')
                                        .next()
                                        .and_then(|t| std::str::from_utf8(t).ok())
                                        .and_then(|t| t.parse::<u64>().ok())
                                {
                                    rc.record(seq);
                                }
                            }
                        }
                    }));
                    tasks.push(tokio::task::spawn_local(async move {
                        let mut f = Vec::with_capacity(64);
                        while let Some(seq) = ticks.recv().await {
                            f.clear();
                            f.push(0x04);
                            f.extend_from_slice(target.as_bytes());
                            f.push(b' ');
                            f.extend_from_slice(seq.to_string().as_bytes());
                            f.push(0x0A);
                            if wr.write_all(&f).await.is_err() {
                                return;
                            }
                        }
                        // Dropping the write half would send FIN, and the server would
                        // close the requester before the last response: hold it.
                        std::future::pending::<()>().await;
                        drop(wr);
                    }));
                }
                Ends::Nats((req, resp)) => {
                    tasks.push(tokio::task::spawn_local(nats_responder(resp)));
                    let (rd, mut wr) = req.into_split();
                    let rc = rec.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        let mut r = Reader::new(rd);
                        while r.fill().await {
                            while let Some(item) = r.nats() {
                                if let NatsItem::Msg { payload, .. } = item
                                    && let Some(seq) = std::str::from_utf8(r.slice(payload))
                                        .ok()
                                        .and_then(|t| t.parse::<u64>().ok())
                                {
                                    rc.record(seq);
                                }
                            }
                        }
                    }));
                    tasks.push(tokio::task::spawn_local(async move {
                        let mut f = Vec::with_capacity(96);
                        while let Some(seq) = ticks.recv().await {
                            let body = seq.to_string();
                            f.clear();
                            f.extend_from_slice(
                                format!(
                                    "PUB bench.rt _INBOX.rt.{seq} {}\r\n{body}\r\n",
                                    body.len()
                                )
                                .as_bytes(),
                            );
                            if wr.write_all(&f).await.is_err() {
                                return;
                            }
                        }
                        // Dropping the write half would send FIN, and the server would
                        // close the requester before the last response: hold it.
                        std::future::pending::<()>().await;
                        drop(wr);
                    }));
                }
            }
            let limit = Duration::from_secs_f64(total as f64 / rate) + Duration::from_secs(10);
            let finished = tokio::time::timeout(limit, async {
                while rec.got.get() < total {
                    rec.done.notified().await;
                }
            })
            .await;
            for t in tasks {
                t.abort();
            }
            if finished.is_err() {
                let missing: Vec<usize> = rec
                    .seen
                    .borrow()
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !**s)
                    .map(|(i, _)| i)
                    .take(5)
                    .collect();
                return Err(format!(
                    "only {} of {total} responses within {limit:?} (first missing: {missing:?})",
                    rec.got.get()
                ));
            }
            let hist = rec.hist.borrow().clone();
            Ok(RttResult { hist, note })
        })
        .await
}

enum Ends {
    Client(Rc<Client>, Rc<Client>, String),
    Raw(TcpStream, TcpStream, String),
    Nats((TcpStream, TcpStream)),
}

/// Requester and responder through the client library, on different cores.
async fn velium_client_ends(server: &Server) -> Result<(Client, Client, String, String), String> {
    let req = Client::connect(server.addr, "bench.rt.req")
        .await
        .map_err(|e| format!("requester: {e}"))?;
    let req_core = core_of(server, "bench.rt.req")?;
    for k in 0..40 {
        let name = format!("bench.rt.resp{k}");
        let resp = Client::connect(server.addr, &name)
            .await
            .map_err(|e| format!("responder: {e}"))?;
        let core = core_of(server, &name)?;
        if core != req_core {
            return Ok((req, resp, name, cores_note(req_core, core, k)));
        }
        drop(resp);
    }
    Err("the responder never landed on another core than the requester".into())
}

/// Requester and responder over raw sockets, on different cores (or, with `same_core`, on
/// the same one).
async fn velium_raw_ends(
    server: &Server,
    same_core: bool,
) -> Result<(TcpStream, TcpStream, String, String), String> {
    let mut req = connect_from(Ipv4Addr::LOCALHOST, server.addr)
        .await
        .map_err(|e| format!("requester: {e}"))?;
    velium_identify(&mut req, "bench.rt.req")
        .await
        .map_err(|e| format!("requester: {e}"))?;
    let req_core = core_of(server, "bench.rt.req")?;
    for k in 0..40 {
        let name = format!("bench.rt.resp{k}");
        let mut resp = connect_from(Ipv4Addr::LOCALHOST, server.addr)
            .await
            .map_err(|e| format!("responder: {e}"))?;
        velium_identify(&mut resp, &name)
            .await
            .map_err(|e| format!("responder: {e}"))?;
        let core = core_of(server, &name)?;
        if (core != req_core) != same_core {
            return Ok((req, resp, name, cores_note(req_core, core, k)));
        }
    }
    Err("the responder never landed on the core wanted".into())
}

fn core_of(server: &Server, identity: &str) -> Result<usize, String> {
    server
        .velium_core_of(identity, Duration::from_secs(5))
        .ok_or_else(|| format!("no connect/identify log lines for {identity}"))
}

fn cores_note(req: usize, resp: usize, tries: usize) -> String {
    format!(
        "requester on core {req}, responder on core {resp}{}",
        if tries > 0 {
            format!(" (after {tries} reconnects)")
        } else {
            String::new()
        }
    )
}

/// Answers each raw Command `0x04 SENDER SP ID SP TEXT` with `0x05 ID SP TEXT`.
async fn velium_raw_responder(s: TcpStream) {
    let (rd, mut wr) = s.into_split();
    let mut r = Reader::new(rd);
    let mut out = Vec::new();
    while r.fill().await {
        out.clear();
        while let Some(f) = r.line() {
            let f = r.slice(f);
            if f.first() == Some(&0x04) {
                let mut parts = f[1..].splitn(3, |&b| b == b' ');
                let (_sender, id, text) = (parts.next(), parts.next(), parts.next());
                if let (Some(id), Some(text)) = (id, text) {
                    out.push(0x05);
                    out.extend_from_slice(id);
                    out.push(b' ');
                    out.extend_from_slice(text);
                    out.push(0x0A);
                }
            }
        }
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// nats requester (subscribed to its inbox) and responder (subscribed to `bench.rt`),
/// both subscriptions confirmed by PING -> PONG.
async fn nats_ends(addr: SocketAddr) -> Result<(TcpStream, TcpStream), String> {
    let mut ends = Vec::new();
    for sub in [
        "SUB _INBOX.rt.* 1\r\nPING\r\n",
        "SUB bench.rt 1\r\nPING\r\n",
    ] {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, addr)
            .await
            .map_err(|e| format!("nats connect: {e}"))?;
        nats_handshake(&mut s)
            .await
            .map_err(|e| format!("nats handshake: {e}"))?;
        s.write_all(sub.as_bytes())
            .await
            .map_err(|e| format!("nats sub: {e}"))?;
        let mut buf = Vec::new();
        common::read_until(&mut s, &mut buf, b"PONG\r\n")
            .await
            .map_err(|e| format!("nats sub: {e}"))?;
        ends.push(s);
    }
    let resp = ends.pop().unwrap();
    let req = ends.pop().unwrap();
    Ok((req, resp))
}

/// Answers each request on `bench.rt` by publishing its payload to the reply subject.
async fn nats_responder(s: TcpStream) {
    let (rd, mut wr) = s.into_split();
    let mut r = Reader::new(rd);
    let mut out = Vec::new();
    while r.fill().await {
        out.clear();
        while let Some(item) = r.nats() {
            match item {
                NatsItem::Msg {
                    reply: Some(reply),
                    payload,
                } => {
                    out.extend_from_slice(b"PUB ");
                    out.extend_from_slice(r.slice(reply));
                    out.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
                    out.extend_from_slice(r.slice(payload));
                    out.extend_from_slice(b"\r\n");
                }
                NatsItem::Ping => out.extend_from_slice(b"PONG\r\n"),
                _ => {}
            }
        }
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            return;
        }
    }
}
