//! Relay benchmarks.
//!
//! (a) FAN-OUT 1 -> R (default 1,000): one sender publishes M messages (default 10,000) of a
//!     P-byte payload (default 64) to R receivers, windowed so that no receiver is ever
//!     more than W messages (default 1,024) behind, far from velium's 1 MiB outbound limit;
//!     rate = deliveries / time from the first send until every receiver has every
//!     message. velium: Echo to `bench.storm.*`; nats-server: PUB to a subject the R
//!     receivers subscribe to. The R passive receivers and the sender speak raw protocol
//!     bytes for both systems (a receiver counts frames by scanning bytes), the
//!     handshakes included; one more velium row drives every end through the client
//!     library (`Client::echo`, `Client::next_event`), to show that library's cost.
//! (b) ROUND TRIP: Command -> CommandResponse between two shims on different server cores
//!     (the responder reconnects until the server's `connect ... core=N` log line puts it
//!     on another core than the requester), open loop at a fixed rate (default 2,000/s for
//!     5 s after a warm-up), latency = receive time - intended send time (no coordinated
//!     omission: a pacing thread fixes the schedule, whatever the server does). velium
//!     through its client library (`command`, `next_event`, `respond`), then raw; nats
//!     request-reply (a responder subscribed to a subject, replying to the reply subject).
//!     Two diagnostic rows put both velium shims on the SAME core, to show what the
//!     cross-core hand-off costs.
//!
//! Settings (flag or environment): `--receivers` (1000), `--messages` (10000), `--payload`
//! (64), `--window` (1024), `--rate` (2000), `--seconds` (5), `--rounds` (3), each also as
//! `VELIUM_BENCH_<NAME>`; `VELIUM_BENCH_ONLY=uring,epoll,before,nats`;
//! `VELIUM_BENCH_BASELINE=/path/to/velium-server` adds rows for that earlier build
//! (velium-before io_uring, key `before`) and after-vs-before ratios.

mod common;

use common::{
    Conn, CpuMeter, Hist, LatRow, Progress, QUIET, Server, Subject, System, Via, banner,
    cap_connections, connect_from, find_row, floor, fmt_cpu, fmt_rate, nats_handshake, part,
    print_after_vs_before, print_latency_table, ratio, runtime, selected, setting, storm, target,
    velium_identify,
};
use std::cell::Cell;
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

struct FanParams {
    receivers: usize,
    messages: usize,
    payload: usize,
    window: usize,
}

fn main() {
    floor::maybe_run();
    banner("relay");
    let rounds = setting("rounds", 3).max(1);
    let fan = FanParams {
        receivers: cap_connections("fan-out receivers", setting("receivers", 1000), 300),
        messages: setting("messages", 10_000).max(1),
        payload: setting("payload", 64).max(1),
        window: setting("window", 1024).max(1),
    };
    let rate = setting("rate", 2000).max(1) as f64;
    let seconds = setting("seconds", 5).max(1) as f64;
    let rt = runtime();

    // ----- (a) fan-out -----
    let do_fan = part("fanout");
    if do_fan {
        println!(
            "## Fan-out 1 -> {}: {} messages of {} bytes per round, window {} messages, \
         {rounds} interleaved rounds (a fresh server each; rate = median round)",
            fan.receivers, fan.messages, fan.payload, fan.window
        );
        println!();
    }
    let mut fan_rows: Vec<(Subject, Vec<FanStats>, Vec<String>)> = Vec::new();
    for _ in 0..rounds {
        for subject in FAN_SUBJECTS {
            if !selected(subject.system) || !do_fan {
                continue;
            }
            let Some(mut server) = Server::start(subject.system, QUIET) else {
                continue;
            };
            let r = rt.block_on(fan_out(subject, &server, &fan));
            server.assert_running();
            let slow = server.log_count("slow consumer");
            let row = match fan_rows.iter_mut().find(|r| r.0 == subject) {
                Some(row) => row,
                None => {
                    fan_rows.push((subject, Vec::new(), Vec::new()));
                    fan_rows.last_mut().unwrap()
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
    let medians: Vec<Option<FanStats>> = fan_rows
        .iter_mut()
        .map(|(_, rounds, _)| {
            rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            rounds.get(rounds.len() / 2).copied()
        })
        .collect();
    let base = medians.first().copied().flatten();
    if !fan_rows.is_empty() {
        println!(
            "| system | deliveries/s (median round) | every round | server CPU | bench CPU | ratio |"
        );
        println!("|---|---:|---|---:|---:|---:|");
        for ((subject, rounds, errors), median) in fan_rows.iter().zip(&medians) {
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
            fan_rows.first().map_or("-".into(), |r| r.0.name())
        );
        println!();
        print_after_vs_before(
            "fan-out deliveries/s of the median round",
            &fan_rows
                .iter()
                .zip(&medians)
                .filter_map(|(r, m)| Some((r.0.name(), m.as_ref()?.rate)))
                .collect::<Vec<_>>(),
            fmt_rate,
            "more",
        );
    }

    // ----- (b) round trip -----
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
    println!("## Targets");
    println!();
    let vr = Subject::raw(System::VeliumUring).name();
    let nats = System::Nats.name();
    let fan_of = |name: &str| {
        fan_rows
            .iter()
            .position(|r| r.0.name() == name)
            .and_then(|i| medians[i])
            .map(|m| m.rate)
    };
    if let (Some(v), Some(n)) = (fan_of(&vr), fan_of(nats)) {
        let client = fan_of(&Subject::client(System::VeliumUring).name())
            .map_or(String::new(), |c| {
                format!(" [client lib {}/s: {}]", fmt_rate(c), ratio(c, n))
            });
        target(
            v >= n,
            "fan-out 1 -> 1,000 deliveries/s at least nats-server's",
            &format!(
                "velium io_uring {}/s, nats-server {}/s: {}{client}",
                fmt_rate(v),
                fmt_rate(n),
                ratio(v, n)
            ),
        );
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

/// One fan-out run.
async fn fan_out(subject: Subject, server: &Server, p: &FanParams) -> Result<FanStats, String> {
    let addr = server.addr;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            // Receivers: handshakes with concurrency 100 (identities bench.storm.sN).
            let via = if subject.system.is_velium() {
                subject.via
            } else {
                Via::Raw
            };
            let r = storm(subject.system, addr, p.receivers, 100, false, via).await;
            if r.errors > 0 {
                return Err(format!("{} receivers failed: {}", r.errors, r.first_error));
            }
            let progress = Progress::new(r.conns.len());
            let mut tasks = Vec::new();
            for (i, conn) in r.conns.into_iter().enumerate() {
                let pr = progress.clone();
                tasks.push(match (subject.system, conn) {
                    (System::Nats, Conn::Raw(s)) => {
                        tokio::task::spawn_local(nats_receiver(s, i, pr))
                    }
                    (_, Conn::Raw(s)) => tokio::task::spawn_local(velium_receiver(s, i, pr)),
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
            let payload = "x".repeat(p.payload);
            let mut sender = Sender::connect(subject, addr, &payload).await?;
            // Warm-up: one window's worth, all delivered, then the measured run.
            let warm = p.window as u64;
            sender.send(&progress, base, warm, p.window as u64).await?;
            progress
                .wait_min(base + warm, Duration::from_secs(30))
                .await?;
            let cpu = CpuMeter::start(server);
            let start = Instant::now();
            let m = p.messages as u64;
            sender
                .send(&progress, base + warm, m, p.window as u64)
                .await?;
            progress
                .wait_min(base + warm + m, Duration::from_secs(120))
                .await?;
            let elapsed = start.elapsed();
            let (server_cpu, bench_cpu) = cpu.stop();
            sender.check_acks(warm + m, p.receivers).await?;
            // Nothing more than what was sent may arrive.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let want = (base + warm + m) * progress.counts.len() as u64;
            if progress.total() != want {
                return Err(format!(
                    "{} deliveries counted, {want} expected",
                    progress.total()
                ));
            }
            for t in tasks {
                t.abort();
            }
            Ok(FanStats {
                rate: (m * p.receivers as u64) as f64 / elapsed.as_secs_f64(),
                server_cpu,
                bench_cpu,
            })
        })
        .await
}

/// The fan-out sender.
enum Sender {
    /// Raw bytes: one frame per message, up to 32 per write, like a batching publisher.
    Raw {
        wr: tokio::net::tcp::OwnedWriteHalf,
        frame: Vec<u8>,
        acks: Rc<Cell<u64>>,
        ack_err: Rc<std::cell::RefCell<String>>,
    },
    /// velium's client library: `Client::echo` per message, up to a window in flight.
    Client {
        client: Rc<Client>,
        payload: Rc<str>,
        acks: Rc<Cell<u64>>,
        ack_err: Rc<std::cell::RefCell<String>>,
    },
}

/// The Echo target that matches every receiver (velium identities `bench.storm.sN`).
const FAN_TARGET: &str = "bench.storm.*";
/// The nats subject the receivers subscribe to.
const FAN_SUBJECT: &str = "bench.fan";

impl Sender {
    async fn connect(subject: Subject, addr: SocketAddr, payload: &str) -> Result<Sender, String> {
        let acks = Rc::new(Cell::new(0));
        let ack_err = Rc::new(std::cell::RefCell::new(String::new()));
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
        let frame = if subject.system == System::Nats {
            nats_handshake(&mut s)
                .await
                .map_err(|e| format!("sender: {e}"))?;
            format!("PUB {FAN_SUBJECT} {}\r\n{payload}\r\n", payload.len()).into_bytes()
        } else {
            velium_identify(&mut s, "bench.src")
                .await
                .map_err(|e| format!("sender: {e}"))?;
            let mut f = vec![0x08];
            f.extend_from_slice(FAN_TARGET.as_bytes());
            f.push(b' ');
            f.extend_from_slice(payload.as_bytes());
            f.push(0x0A);
            f
        };
        let (rd, wr) = s.into_split();
        // velium answers every Echo with an Ack: read them (or the sender itself would
        // become a slow consumer) and keep the first thing that is not one.
        let (a, e) = (acks.clone(), ack_err.clone());
        tokio::task::spawn_local(async move {
            let mut r = Reader::new(rd);
            while r.fill().await {
                while let Some(line) = r.line() {
                    let line = r.slice(line);
                    if line.first() == Some(&0x0C) {
                        a.set(a.get() + 1);
                    } else if e.borrow().is_empty() {
                        // Its first 256 bytes.
                        let line = &line[..line.len().min(256)];
                        *e.borrow_mut() = String::from_utf8_lossy(line).into_owned();
                    }
                }
            }
        });
        Ok(Sender::Raw {
            wr,
            frame,
            acks,
            ack_err,
        })
    }

    /// Sends `count` messages, never more than `window` ahead of the slowest receiver,
    /// whose count started at `from`.
    async fn send(
        &mut self,
        progress: &Progress,
        from: u64,
        count: u64,
        window: u64,
    ) -> Result<(), String> {
        let mut sent = 0u64;
        let mut batch = Vec::new();
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
                    let k = room.min(32);
                    batch.clear();
                    for _ in 0..k {
                        batch.extend_from_slice(frame);
                    }
                    wr.write_all(&batch)
                        .await
                        .map_err(|e| format!("send: {e}"))?;
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
                frame,
                ..
            } => (acks, ack_err, frame.starts_with(b"PUB")),
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
async fn velium_receiver(mut s: TcpStream, i: usize, progress: Rc<Progress>) {
    let mut buf = vec![0u8; 64 * 1024];
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

/// A raw nats receiver: subscribes (confirmed by PING -> PONG, counted as one), then
/// counts MSG frames.
async fn nats_receiver(mut s: TcpStream, i: usize, progress: Rc<Progress>) {
    let sub = format!("SUB {FAN_SUBJECT} 1\r\nPING\r\n");
    if s.write_all(sub.as_bytes()).await.is_err() {
        return;
    }
    let mut r = Reader::new(s);
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
        Reader {
            rd,
            chunk: vec![0u8; 64 * 1024],
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
