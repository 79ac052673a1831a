//! Soak: a release velium-server holding a fleet of shims under steady traffic and churn
//! for a long time, to show that nothing in it grows without bound.
//!
//! Not part of `cargo bench` (registered with `bench = false`); run it on purpose:
//!
//! ```sh
//! cargo bench --bench soak                                        # 5,000 shims, 10 min
//! VELIUM_SOAK_SECONDS=120 VELIUM_SOAK_SHIMS=2000 cargo bench --bench soak
//! ```
//!
//! The fleet: a few commander shims send Commands (each answered by its target) and
//! Echoes to the others, one target or a whole zone of about fifty; every fourth shim
//! has a UDP channel and pings over it; every shim keeps the client library's TCP
//! keep-alive; and a fraction of the shims reconnect in each interval, half of them with
//! a clean Quit and half by just closing. The churn is far above what a real fleet does:
//! per-connection state is where a leak would hide, and the server's RSS climbs with
//! reconnects before it levels off (after about 30,000 with 5,000 shims), which the
//! default 10-minute run must get past.
//!
//! Every interval it prints one line: the server's RSS (VmRSS) and open descriptors (from
//! /proc), its open connections (`velium_connections` from the admin listener), the
//! command round trip the commanders measured in that interval (send to response, single
//! targets), the routed messages delivered per second (Commands, Echoes and responses
//! reaching a shim) and the frames per second the server counted. At the end, a verdict
//! compares the last interval's RSS with the first one's, and says whether it was still
//! rising over the last third of the run.
//!
//! Settings (environment): `VELIUM_SOAK_SHIMS` (5000), `VELIUM_SOAK_SECONDS` (600),
//! `VELIUM_SOAK_INTERVAL` (seconds, 30), `VELIUM_SOAK_RATE` (requests per second,
//! Commands and Echoes together, 1000), `VELIUM_SOAK_CHURN` (percent of the shims that
//! reconnect per interval, 40), `VELIUM_SOAK_IO` (`auto`, `uring` or `epoll`), and
//! `VELIUM_BENCH_SERVER_ARGS` for extra server flags.
//!
//! Descriptors: this process holds one TCP socket per shim and one UDP socket per shim
//! with a UDP channel, all under one RLIMIT_NOFILE (20,000 on the reference machine), so
//! the fleet is capped to what fits with room to spare; the server needs one per shim.

mod common;

use common::{Hist, banner, client_options, fmt_bytes, fmt_rate, nofile_limit, rss_of};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio::task::spawn_local;
use velium_server::client::{Client, ClientError, Event};

/// Every how many shims one has a UDP channel.
const UDP_EVERY: usize = 4;
/// How often a shim with a UDP channel pings over it.
const UDP_PING: Duration = Duration::from_secs(5);
/// Shims per zone: the size of a fan-out.
const ZONE: usize = 50;
/// One Command in this many, and one Echo in this many, is to a whole zone.
const FANOUT_EVERY: u64 = 20;
/// Connections being made at once.
const CONNECTING: usize = 100;
/// How long a commander waits for the responses to a Command.
const RESPONSE_WAIT: Duration = Duration::from_secs(5);
/// Descriptors this process keeps for everything but the shims' sockets.
const RESERVE_FDS: usize = 128;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a whole number, not {v:?}"))
        })
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

/// A velium-server process with its admin listener, killed when dropped.
struct Soaked {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    banner: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Soaked {
    fn start(io: &str) -> Soaked {
        let mut child = Command::new(env!("CARGO_BIN_EXE_velium-server"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--io", io, "--log-level", "warn"])
            // The whole fleet comes from four loopback addresses.
            .args(["--connect-rate-per-source", "0"])
            .args(["--max-connections-per-source", "0"])
            // Nor per-shim rate limits, in the builds that have them.
            .args(common::shim_limit_args(&common::current_velium()))
            .args(common::velium_extra_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn velium-server");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        let mut second = String::new();
        out.read_line(&mut first).expect("the listening line");
        out.read_line(&mut second).expect("the admin line");
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let addr = first
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}: {:?}", log.lock()));
        let admin = second
            .trim()
            .strip_prefix("velium-server admin on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {second:?}: {:?}", log.lock()));
        Soaked {
            child,
            addr,
            admin,
            banner: first.trim().to_string(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its open descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    /// (open connections, frames in and out so far) from `/metrics`.
    fn metrics(&self) -> Option<(f64, f64)> {
        let (status, body) = velium_server::admin::fetch(self.admin, "GET", "/metrics").ok()?;
        if status != 200 {
            return None;
        }
        let conns = velium_server::admin::sample(&body, "velium_connections")?;
        let frames = body
            .lines()
            .filter(|l| l.starts_with("velium_frames_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Some((conns, frames))
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = self.log.lock().unwrap();
            panic!("velium-server exited ({status}); its log: {log:?}");
        }
    }
}

impl Drop for Soaked {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// What the fleet counts
// ---------------------------------------------------------------------------------------

/// Counters shared by the load (one thread) and the reporter (another).
#[derive(Default)]
struct Stats {
    /// Commands and Echoes delivered to a shim, and responses delivered to a commander.
    delivered: AtomicU64,
    /// Commands whose target was not connected (mid-reconnect).
    no_match: AtomicU64,
    /// Responses that did not come within [`RESPONSE_WAIT`].
    missing: AtomicU64,
    /// Requests that failed otherwise (closed connection, timeout).
    failed: AtomicU64,
    /// Reconnects done by the churn, and closes nobody asked for.
    reconnects: AtomicU64,
    unexpected_closes: AtomicU64,
    connect_errors: AtomicU64,
    udp_pongs: AtomicU64,
    udp_lost: AtomicU64,
    /// Round trips of single-target Commands: send to response.
    rtt: Mutex<Hist>,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------
// The fleet
// ---------------------------------------------------------------------------------------

struct Fleet {
    addr: SocketAddr,
    stats: Arc<Stats>,
    connecting: Semaphore,
    /// One per shim that answers: notified to make it reconnect.
    churn: Vec<Notify>,
    /// Shims connected once (the fleet is ready when all are).
    up: RefCell<usize>,
    all_up: Notify,
    zones: usize,
}

fn shim_name(i: usize, zones: usize) -> String {
    format!("soak.z{}.s{i}", i % zones)
}

impl Fleet {
    /// Connects shim `i` (retrying), binding UDP when it should have a channel.
    async fn connect(&self, i: usize, name: &str, udp: bool) -> Client {
        loop {
            let permit = self.connecting.acquire().await.expect("semaphore");
            let res = async {
                let c = Client::connect_with(self.addr, name, client_options(i)).await?;
                if udp {
                    c.bind_udp().await?;
                }
                Ok::<_, ClientError>(c)
            }
            .await;
            drop(permit);
            match res {
                Ok(c) => return c,
                Err(_) => {
                    bump(&self.stats.connect_errors);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn mark_up(&self) {
        let mut up = self.up.borrow_mut();
        *up += 1;
        if *up == self.churn.len() {
            self.all_up.notify_one();
        }
    }

    /// Shim `i` for ever: connect, answer every Command, count what arrives, ping over
    /// UDP if it has a channel; reconnect when the churn says so (every other time with a
    /// clean Quit, else by just closing) or when the server closed it.
    async fn responder(self: Rc<Self>, i: usize) {
        let name = shim_name(i, self.zones);
        let udp = i.is_multiple_of(UDP_EVERY);
        let mut first = true;
        let mut rounds = 0u64;
        loop {
            let client = Rc::new(self.connect(i, &name, udp).await);
            if first {
                self.mark_up();
                first = false;
            }
            let pinger = udp.then(|| {
                let (c, stats) = (client.clone(), self.stats.clone());
                spawn_local(async move {
                    let phase = Duration::from_millis(rand::rng().random_range(0..5000));
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + phase, UDP_PING);
                    loop {
                        tick.tick().await;
                        match c.ping_udp(b"soak").await {
                            Ok(_) => bump(&stats.udp_pongs),
                            Err(ClientError::UdpUnbound) => {
                                let _ = c.bind_udp().await;
                            }
                            Err(_) => bump(&stats.udp_lost),
                        }
                    }
                })
            });
            let churned = loop {
                tokio::select! {
                    ev = client.next_event() => match ev {
                        Some(Event::Command { id, .. }) => {
                            bump(&self.stats.delivered);
                            if client.respond(id, "ok").await.is_err() {
                                break false;
                            }
                        }
                        Some(Event::Echo { .. }) => bump(&self.stats.delivered),
                        Some(Event::Closed { .. }) | None => break false,
                        Some(_) => {}
                    },
                    _ = self.churn[i].notified() => break true,
                }
            };
            if let Some(p) = pinger {
                p.abort();
                let _ = p.await;
            }
            if churned {
                bump(&self.stats.reconnects);
                rounds += 1;
                if rounds.is_multiple_of(2)
                    && let Ok(c) = Rc::try_unwrap(client)
                {
                    let _ = c.close().await;
                }
            } else {
                bump(&self.stats.unexpected_closes);
            }
        }
    }

    /// Commander `k`: one request every `period`, each in its own task so a slow answer
    /// never holds up the pace. Requests alternate between Commands and Echoes, each to
    /// one random shim or (one in [`FANOUT_EVERY`]) to a whole zone.
    async fn commander(self: Rc<Self>, k: usize, shims: usize, period: Duration) {
        let name = format!("soak.cmd.c{k}");
        let i = shims + k;
        let mut client = Rc::new(self.connect(i, &name, false).await);
        let mut rng = StdRng::seed_from_u64(k as u64);
        let phase = period.mul_f64(rng.random::<f64>());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tick.tick().await;
            if client.is_closed() {
                bump(&self.stats.unexpected_closes);
                client = Rc::new(self.connect(i, &name, false).await);
            }
            let fanout = (n / 2) % FANOUT_EVERY == FANOUT_EVERY - 1;
            let target = if fanout {
                format!("soak.z{}.*", rng.random_range(0..self.zones))
            } else {
                shim_name(rng.random_range(0..shims), self.zones)
            };
            let (c, stats) = (client.clone(), self.stats.clone());
            if n % 2 == 0 {
                spawn_local(async move {
                    let t0 = Instant::now();
                    match c.command(&target, "/soak").await {
                        Ok(sent) => {
                            let got = c.collect_responses(sent.id, sent.reached, RESPONSE_WAIT);
                            let got = got.await.len();
                            if !fanout && got == 1 {
                                stats.rtt.lock().unwrap().record(t0.elapsed());
                            }
                            stats.delivered.fetch_add(got as u64, Ordering::Relaxed);
                            stats
                                .missing
                                .fetch_add((sent.reached - got) as u64, Ordering::Relaxed);
                        }
                        Err(ClientError::NoMatch { .. }) => bump(&stats.no_match),
                        Err(_) => bump(&stats.failed),
                    }
                });
            } else {
                spawn_local(async move {
                    match c.echo(&target, "soak").await {
                        Ok(_) => {}
                        Err(ClientError::NoMatch { .. }) => bump(&stats.no_match),
                        Err(_) => bump(&stats.failed),
                    }
                });
            }
        }
    }

    /// Every `interval`, makes `per_interval` random shims reconnect, spread evenly.
    async fn churner(self: Rc<Self>, per_interval: usize, interval: Duration) {
        if per_interval == 0 {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0xc4a2);
        let mut tick = tokio::time::interval(interval / per_interval as u32);
        tick.tick().await;
        loop {
            tick.tick().await;
            let i = rng.random_range(0..self.churn.len());
            self.churn[i].notify_one();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// One interval's line, kept for the verdict.
struct Sample {
    elapsed: f64,
    rss: u64,
    fds: usize,
    conns: Option<f64>,
}

fn main() {
    banner("soak");
    let wanted = env_num("VELIUM_SOAK_SHIMS", 5000) as usize;
    let seconds = env_num("VELIUM_SOAK_SECONDS", 600).max(1);
    let interval = env_num("VELIUM_SOAK_INTERVAL", 30).max(1);
    let rate = env_num("VELIUM_SOAK_RATE", 1000).max(1);
    let churn_pct = env_num("VELIUM_SOAK_CHURN", 40);
    let io = std::env::var("VELIUM_SOAK_IO").unwrap_or_else(|_| "auto".into());

    // Every shim holds a TCP socket here, every UDP_EVERY-th a UDP socket too.
    let limit = nofile_limit() as usize;
    let fit = limit.saturating_sub(RESERVE_FDS) * UDP_EVERY / (UDP_EVERY + 1);
    let total = wanted.min(fit).max(2);
    if total < wanted {
        println!(
            "> capped at {total} shims (asked for {wanted}): RLIMIT_NOFILE is {limit}, and \
             each shim holds {} descriptors here on average, less {RESERVE_FDS} kept",
            1.0 + 1.0 / UDP_EVERY as f64
        );
    }
    let commanders = (total / 100).clamp(1, 50);
    let shims = total - commanders;
    let zones = shims.div_ceil(ZONE).max(1);
    let churn_per_interval = shims * churn_pct as usize / 100;
    let period = Duration::from_secs_f64(commanders as f64 / rate as f64);

    let mut server = Soaked::start(&io);
    println!("- server: {}", server.banner);
    println!(
        "- fleet: {total} shims ({shims} answering, in {zones} zones of up to {ZONE}, every \
         {UDP_EVERY}th with a UDP channel pinging every {} s; {commanders} commanders), \
         {rate} requests/s (Commands and Echoes alternating, one in {FANOUT_EVERY} to a \
         zone), {churn_per_interval} reconnects per {interval} s interval ({churn_pct}%)",
        UDP_PING.as_secs()
    );
    println!(
        "- run: {seconds} s after the fleet is up; a line every {interval} s; RSS and fds are \
         the server's; round trips are single-target Commands, send to response"
    );
    println!();

    let stats = Arc::new(Stats::default());
    let (ready_tx, ready) = mpsc::channel();
    let run_for = Duration::from_secs(seconds);
    let load = {
        let stats = stats.clone();
        let addr = server.addr;
        std::thread::spawn(move || {
            let rt = common::runtime();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let fleet = Rc::new(Fleet {
                    addr,
                    stats,
                    connecting: Semaphore::new(CONNECTING),
                    churn: (0..shims).map(|_| Notify::new()).collect(),
                    up: RefCell::new(0),
                    all_up: Notify::new(),
                    zones,
                });
                let t0 = Instant::now();
                for i in 0..shims {
                    spawn_local(fleet.clone().responder(i));
                }
                fleet.all_up.notified().await;
                for k in 0..commanders {
                    spawn_local(fleet.clone().commander(k, shims, period));
                }
                let _ = ready_tx.send(t0.elapsed());
                spawn_local(
                    fleet
                        .clone()
                        .churner(churn_per_interval, Duration::from_secs(interval)),
                );
                tokio::time::sleep(run_for).await;
            });
        })
    };
    let connect_time = ready
        .recv_timeout(Duration::from_secs(600))
        .expect("the fleet connected");
    println!(
        "Connected {shims} shims in {:.1} s ({} connect attempts failed and were retried).",
        connect_time.as_secs_f64(),
        stats.connect_errors.load(Ordering::Relaxed)
    );
    println!();
    println!(
        "| elapsed s | server RSS | server fds | connections | cmd p50 µs | cmd p99 µs | \
         msgs/s | server frames/s | reconnects | misses |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");

    let start = Instant::now();
    let end = start + run_for;
    let mut samples: Vec<Sample> = Vec::new();
    let mut last = (
        start,
        0u64,
        0u64,
        0u64,
        server.metrics().map_or(0.0, |m| m.1),
    );
    loop {
        let next = (last.0 + Duration::from_secs(interval)).min(end);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        server.assert_running();
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-9);
        let hist = std::mem::take(&mut *stats.rtt.lock().unwrap());
        let delivered = stats.delivered.load(Ordering::Relaxed);
        let reconnects = stats.reconnects.load(Ordering::Relaxed);
        let misses = stats.no_match.load(Ordering::Relaxed)
            + stats.missing.load(Ordering::Relaxed)
            + stats.failed.load(Ordering::Relaxed);
        let metrics = server.metrics();
        let frames = metrics.map_or(last.4, |m| m.1);
        let s = Sample {
            elapsed: now.duration_since(start).as_secs_f64(),
            rss: rss_of(server.pid()),
            fds: server.fds(),
            conns: metrics.map(|m| m.0),
        };
        let quantile = |q: f64| {
            if hist.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0}", hist.us(q))
            }
        };
        println!(
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.elapsed,
            fmt_bytes(s.rss as f64),
            s.fds,
            s.conns.map_or("-".into(), |c| format!("{c:.0}")),
            quantile(0.5),
            quantile(0.99),
            fmt_rate((delivered - last.1) as f64 / dt),
            fmt_rate((frames - last.4) / dt),
            reconnects - last.2,
            misses - last.3,
        );
        let _ = std::io::stdout().flush();
        samples.push(s);
        last = (now, delivered, reconnects, misses, frames);
        if now >= end {
            break;
        }
    }
    load.join().expect("the load thread");
    server.assert_running();

    println!();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "Totals: {} messages delivered; {} reconnects by the churn, {} closes nobody asked \
         for; misses: {} requests to a shim that was reconnecting, {} responses not back \
         within {} s, {} requests failed; UDP pings: {} answered, {} lost.",
        get(&stats.delivered),
        get(&stats.reconnects),
        get(&stats.unexpected_closes),
        get(&stats.no_match),
        get(&stats.missing),
        RESPONSE_WAIT.as_secs(),
        get(&stats.failed),
        get(&stats.udp_pongs),
        get(&stats.udp_lost),
    );
    let warnings = server.log.lock().unwrap().len();
    println!("Server log: {warnings} lines at warn level or above.");
    for line in server.log.lock().unwrap().iter().take(5) {
        println!("    {line}");
    }
    println!();
    verdict(&samples);
}

/// Compares the last interval with the first (the warm-up): RSS growth in percent, and
/// growth over the last third of the run. Churn makes RSS climb for tens of thousands
/// of reconnects before it levels off, so the total alone cannot tell a leak from a
/// warm-up; a leak keeps climbing at the end of the run, a warm-up has levelled off.
fn verdict(samples: &[Sample]) {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return;
    };
    if samples.len() < 2 {
        println!("Verdict: one interval only; run longer than VELIUM_SOAK_INTERVAL to compare.");
        return;
    }
    let pct = |from: u64, to: u64| (to as f64 - from as f64) / from.max(1) as f64 * 100.0;
    let growth = pct(first.rss, last.rss);
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let conns = |s: &Sample| s.conns.map_or("-".into(), |c| format!("{c:.0}"));
    println!(
        "Verdict: server RSS {} after the first interval ({:.0} s), {} after the last \
         ({:.0} s): {growth:+.1}% (peak {}); descriptors {} -> {}; connections {} -> {}.",
        fmt_bytes(first.rss as f64),
        first.elapsed,
        fmt_bytes(last.rss as f64),
        last.elapsed,
        fmt_bytes(peak as f64),
        first.fds,
        last.fds,
        conns(first),
        conns(last),
    );
    let levelled = if samples.len() >= 4 {
        let third = (samples.len() - 1).div_ceil(3);
        let from = &samples[samples.len() - 1 - third];
        let recent = pct(from.rss, last.rss);
        let span = if third == 1 {
            "interval".to_string()
        } else {
            format!("{third} intervals")
        };
        println!(
            "Over the last {span} ({:.0} s to {:.0} s): {recent:+.1}% ({} -> {}).",
            from.elapsed,
            last.elapsed,
            fmt_bytes(from.rss as f64),
            fmt_bytes(last.rss as f64),
        );
        recent <= 1.0
    } else {
        growth <= 10.0
    };
    if levelled {
        println!("RSS has levelled off: no sign of unbounded growth.");
    } else {
        println!(
            "RSS was still rising at the end: run longer (VELIUM_SOAK_SECONDS) to see \
             whether it levels off."
        );
    }
}
