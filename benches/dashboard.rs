//! Dashboard benchmark: does an open dashboard slow the hub?
//!
//! In one run, rounds alternate between **pages closed** and **pages open** (closed, open,
//! closed, open, ...; default 3 of each), each on fresh servers: velium-server
//! `--io uring --cores 2` with an admin listener (`--admin 127.0.0.1:0
//! --admin-token-file F`). "Pages open" = P pages (default 4), each a plain HTTP/1.1
//! client on a thread of its own holding `GET /api/stream?keys=hp,mana,target&stale=30`
//! open and reading it as fast as the socket delivers (even pages authorize with
//! `Authorization: Bearer`, odd ones with the `velium_admin` cookie that `POST /login`
//! sets). A page de-chunks the body and counts its bytes, its SSE events by name, the rows
//! upserted (`"identity":` in `fleet` data), the rows that carry an `hp` value, the ids
//! removed, the journal entries and the gaps in their `seq`. A page that is not answered
//! 200 `text/event-stream`, whose first events are not `hello` then a `fleet` reset, that
//! sees a `problem`, whose stream ends, or that gets no `fleet` event in a window of 1 s
//! or more, fails the run (with the server's last log lines).
//!
//! Both kinds of round do the same work on the same background: S state-holding shims
//! (default 500) each Set `hp`, `mana` and `target` once; a ticker task then changes `hp`
//! of U of them a second (default 200, round robin; every 8th Set also `target`); and a
//! churn task connects K shims a second (default 40, `bench.churn.sN`), each closed 1 s
//! later. So every page tick has changed rows to send, rows to add and ids to remove, and
//! a closed round has the same Sets and connections to serve. Per round:
//!
//! (1) HANDSHAKES, on a fresh server: the S shims (`bench.fleet.sN`), the background, 1 s
//!     settle; then SERIAL: one shim at a time, raw bytes, TCP connect -> Identify ->
//!     Session, then a UDP socket, bind datagram + Ping -> Pong, the shim closed before the
//!     next (default 5,000 after 300 warm-up: about 1 s, several page ticks, each with
//!     about a thousand journal entries); then a STORM (`common::storm`, raw, full shim
//!     handshake: TCP handshake then UDP bind confirmed): N shims (default 5,000) at
//!     concurrency C (default 100), all held open; rate = shims / time from the first
//!     connect to the last handshake. The storm's window runs 1 s past its end, so that
//!     the pages' rendering of the N new rows is in it; then a HELD window (the steady
//!     time) with the S + N shims connected.
//! (2) FAN-OUT, on a fresh server: R raw receivers (default 1,000, `bench.storm.sN`, the
//!     first S of them the state-holding shims), the background, 1 s settle; a STEADY
//!     window (default 3 s) of the background alone; then one raw sender Echoes M messages
//!     of 64 bytes (default 20,000) to `bench.storm.*`, windowed (1,024) as in the relay
//!     bench; deliveries/s = M x R / time from the first send until every receiver has
//!     every message; every Echo's Ack must count R and the receivers must get exactly
//!     what was sent (a refused Set would show as an extra frame).
//!
//! Per window: CPU of the whole server (its threads' run time from
//! /proc/PID/task/*/schedstat, ns), of its admin thread (`velium-admin`, which makes the
//! pages), of its core threads (`velium-core-N`), of this bench process (/proc/self/stat,
//! the page readers included), of the page reader threads alone
//! (CLOCK_THREAD_CPUTIME_ID) and of every other process (the machine's busy time from
//! /proc/stat less the server's and the bench's: the shared machine's noise); the
//! server's RSS at the window's end; what each page read. Figures are the median over the
//! rounds of each kind, the table gives open / closed; latencies are also merged over the
//! rounds.
//!
//! Settings (flag or `VELIUM_BENCH_<NAME>`): `--rounds` (3), `--pages` (4, at most half
//! of `admin_connections`, 16 by default), `--serial` (5000), `--warmup` (300), `--n`
//! (5000), `--c` (100), `--receivers` (1000), `--messages` (20000), `--payload` (64),
//! `--window` (1024), `--fleet` (500, the state-holding shims), `--sets` (200 a second),
//! `--churn` (40 a second), `--steady` (3 s); `VELIUM_BENCH_SERVER_ARGS` adds
//! velium-server flags.

mod common;

use common::check_delivered;
use common::{
    Conn, Hist, Progress, System, TempDir, Via, banner, cap_connections, connect_from, cpu_secs,
    current_velium, floor, fmt_bytes, fmt_rate, ratio, rss_of, runtime, send_window, setting,
    shim_limit_args, source_ip, storm, udp_bind_confirm, udp_to, velium_extra_args,
    velium_identify,
};
use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

/// The keys every page asks for.
const PAGE_KEYS: &str = "hp,mana,target";
/// The Echo target that matches every fan-out receiver (`common::storm` names them
/// `bench.storm.sN`).
const FAN_TARGET: &str = "bench.storm.*";
/// How long a page may take to get its first events.
const PAGE_READY: Duration = Duration::from_secs(5);
/// Settle time after the background shims are in, and after the storm.
const SETTLE: Duration = Duration::from_secs(1);
/// How long a churn shim stays connected.
const CHURN_LIFE: Duration = Duration::from_secs(1);

type Log = Arc<Mutex<Vec<String>>>;

// ---------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------

/// velium-server with an admin listener that requires a token, killed when dropped.
struct Hub {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Log,
}

impl Hub {
    fn start(token_file: &Path, cores: usize) -> Hub {
        let bin = current_velium();
        let mut cmd = Command::new(&bin);
        cmd.args(["--listen", "127.0.0.1:0", "--io", "uring"])
            .args(["--cores", &cores.to_string()])
            .args(["--admin", "127.0.0.1:0", "--admin-token-file"])
            .arg(token_file)
            .args(["--log-level", "warn", "--idle-timeout", "10m"])
            .args(["--identify-timeout", "60s"])
            .args(["--connect-rate-per-source", "0"])
            .args(["--max-connections-per-source", "0"])
            .args(shim_limit_args(&bin))
            .args(velium_extra_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn velium-server");
        let log: Log = Arc::default();
        {
            let (l, err) = (log.clone(), child.stderr.take().unwrap());
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    l.lock().unwrap().push(line);
                }
            });
        }
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut first, mut second) = (String::new(), String::new());
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
        Hub {
            child,
            addr,
            admin,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = self.log.lock().unwrap();
            let tail: Vec<&String> = log.iter().rev().take(20).collect();
            panic!("velium-server exited mid-bench ({status}); last log lines: {tail:?}");
        }
    }

    /// Its WARN and ERROR log lines so far.
    fn warnings(&self) -> Vec<String> {
        (self.log.lock().unwrap().iter())
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run time (seconds) of the threads of `pid` whose name `want` accepts, from
/// /proc/PID/task/TID/schedstat (ns; the first field is the time spent on a CPU).
fn threads_cpu(pid: u32, want: impl Fn(&str) -> bool) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            if !want(comm.trim()) {
                return None;
            }
            let st = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns: f64 = st.split_whitespace().next()?.parse().ok()?;
            Some(ns / 1e9)
        })
        .sum()
}

/// The machine's busy CPU time so far, in seconds (/proc/stat: user, nice, system, irq,
/// softirq and steal of all CPUs).
fn machine_busy() -> f64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<f64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
            Some((at(0) + at(1) + at(2) + at(5) + at(6) + at(7)) / ticks)
        })
        .unwrap_or(0.0)
}

/// CPU time of the calling thread, in ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------
// Pages
// ---------------------------------------------------------------------------------------

/// What one page has read so far (its thread writes, the bench reads).
#[derive(Default)]
struct PageCounters {
    /// Bytes from the socket (head, chunk framing and events).
    bytes: AtomicU64,
    /// SSE events, by name.
    hello: AtomicU64,
    fleet: AtomicU64,
    events: AtomicU64,
    stats: AtomicU64,
    keys: AtomicU64,
    other: AtomicU64,
    /// Rows upserted (in `fleet` events), rows among them carrying an `hp` value, ids
    /// removed.
    upserts: AtomicU64,
    with_hp: AtomicU64,
    removed: AtomicU64,
    /// Journal entries (in `events` events), and those skipped (gaps in their `seq` after
    /// the first `events`).
    journal: AtomicU64,
    journal_skipped: AtomicU64,
    /// The first `fleet` event was a reset.
    reset: AtomicBool,
    /// The reader thread's CPU time so far.
    cpu_ns: AtomicU64,
    /// When each `fleet` event arrived.
    arrivals: Mutex<Vec<Instant>>,
    /// Why the stream failed or ended (empty while it runs).
    ended: Mutex<String>,
    /// Set by the bench before it closes the page.
    closing: AtomicBool,
}

impl PageCounters {
    fn end(&self, why: String) {
        let mut e = self.ended.lock().unwrap();
        if e.is_empty() {
            *e = why;
        }
    }
}

/// A page: the stream's socket (for closing it) and its reader thread.
struct Page {
    k: usize,
    counters: Arc<PageCounters>,
    sock: std::net::TcpStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Page {
    /// Opens page `k`: an even one sends the token as a bearer header, an odd one the
    /// cookie `cookie` (what `POST /login` set).
    fn open(admin: SocketAddr, token: &str, cookie: &str, k: usize) -> Page {
        let s = std::net::TcpStream::connect(admin)
            .unwrap_or_else(|e| panic!("page {k}: connect to the admin listener: {e}"));
        let _ = s.set_nodelay(true);
        let sock = s.try_clone().expect("clone the page socket");
        let counters = Arc::new(PageCounters::default());
        let auth = if k.is_multiple_of(2) {
            format!("Authorization: Bearer {token}\r\n")
        } else {
            format!("Cookie: {cookie}\r\n")
        };
        let request = format!(
            "GET /api/stream?keys={PAGE_KEYS}&stale=30 HTTP/1.1\r\nHost: {admin}\r\n\
             Accept: text/event-stream\r\nCache-Control: no-cache\r\n{auth}\r\n"
        );
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name(format!("dash-page-{k}"))
            .spawn(move || {
                let why = match read_page(s, &request, &c) {
                    Ok(()) => "the stream ended (chunked body's last chunk)".to_string(),
                    Err(e) => e,
                };
                c.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
                c.end(why);
            })
            .expect("spawn a page thread");
        Page {
            k,
            counters,
            sock,
            thread: Some(thread),
        }
    }

    /// Panics unless the page got `hello` and a `fleet` reset within [`PAGE_READY`].
    fn wait_ready(&self) {
        let end = Instant::now() + PAGE_READY;
        let c = &self.counters;
        loop {
            self.check();
            if c.hello.load(Ordering::Relaxed) > 0 && c.reset.load(Ordering::Relaxed) {
                return;
            }
            assert!(
                Instant::now() < end,
                "page {}: no hello and fleet reset within {PAGE_READY:?} ({} bytes read)",
                self.k,
                c.bytes.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Panics if the stream failed or ended.
    fn check(&self) {
        let e = self.counters.ended.lock().unwrap();
        assert!(
            e.is_empty(),
            "page {}: the dashboard stream failed: {e}",
            self.k
        );
    }

    fn close(mut self) {
        self.check();
        self.counters.closing.store(true, Ordering::Relaxed);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Logs in as the page's login form does (`POST /login`, `token=...`) and returns the
/// cookie the answer sets (`velium_admin=VALUE`). Panics unless it is a 303 with that
/// cookie.
fn login(admin: SocketAddr, token: &str) -> String {
    let body = format!("token={token}");
    let request = format!(
        "POST /login HTTP/1.1\r\nHost: {admin}\r\nContent-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(admin).expect("connect to the admin listener");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).expect("send the login");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or("");
    let cookie = answer
        .lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("set-cookie"))
        .filter_map(|(_, v)| v.split(';').next())
        .map(str::trim)
        .find(|c| c.starts_with("velium_admin=") && c.len() > "velium_admin=".len());
    match cookie {
        Some(c) if status.contains(" 303") => c.to_string(),
        _ => panic!("POST /login: no velium_admin cookie in the answer {answer:?}"),
    }
}

/// Opens `n` pages and waits until each has its first events.
fn open_pages(admin: SocketAddr, token: &str, n: usize) -> Vec<Page> {
    let cookie = if n > 1 {
        login(admin, token)
    } else {
        String::new()
    };
    let pages: Vec<Page> = (0..n)
        .map(|k| Page::open(admin, token, &cookie, k))
        .collect();
    for p in &pages {
        p.wait_ready();
    }
    pages
}

/// A page's reader: the request, the response head (200 `text/event-stream`, chunked
/// required), then the body de-chunked and scanned line by line, as fast as the socket
/// delivers. Returns when the stream ends; `Err` says why it failed.
fn read_page(mut s: std::net::TcpStream, request: &str, c: &PageCounters) -> Result<(), String> {
    s.write_all(request.as_bytes())
        .map_err(|e| format!("write the request: {e}"))?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut raw: Vec<u8> = Vec::with_capacity(128 * 1024);
    let read = |s: &mut std::net::TcpStream, chunk: &mut [u8]| -> Result<usize, String> {
        let n = s.read(chunk);
        c.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
        match n {
            Ok(0) if c.closing.load(Ordering::Relaxed) => Err("closed by the bench".into()),
            Ok(0) => Err("the server closed the stream".into()),
            Ok(n) => {
                c.bytes.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(_) if c.closing.load(Ordering::Relaxed) => Err("closed by the bench".into()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    // The head.
    let head_end = loop {
        let n = read(&mut s, &mut chunk)?;
        raw.extend_from_slice(&chunk[..n]);
        if let Some(e) = memchr::memmem::find(&raw, b"\r\n\r\n") {
            break e + 4;
        }
        if raw.len() > 16 * 1024 {
            return Err("no end of the response head in 16 KiB".into());
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head.lines().next().unwrap_or("").trim().to_string();
    if !status.starts_with("http/1.1 200") {
        // Read what the body holds, briefly, for the message.
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if let Ok(n) = s.read(&mut chunk) {
            raw.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&raw[head_end..]);
        return Err(format!(
            "answered {status:?}, not 200 (body: {:?})",
            &body[..body.len().min(200)]
        ));
    }
    if !head.contains("content-type: text/event-stream") {
        return Err(format!("not text/event-stream: {head:?}"));
    }
    if !head.contains("transfer-encoding: chunked") {
        return Err(format!("the body is not chunked: {head:?}"));
    }
    raw.drain(..head_end);
    let mut sse = Sse::default();
    // Bytes of chunk data still to come in the current chunk; None: a size line next.
    let mut left: Option<usize> = None;
    let mut pos = 0usize;
    loop {
        // Take apart what is buffered.
        loop {
            match left {
                Some(0) => {
                    if raw.len() - pos < 2 {
                        break;
                    }
                    if &raw[pos..pos + 2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    pos += 2;
                    left = None;
                }
                Some(k) => {
                    let take = k.min(raw.len() - pos);
                    if take == 0 {
                        break;
                    }
                    sse.feed(&raw[pos..pos + take], c)?;
                    pos += take;
                    left = Some(k - take);
                }
                None => {
                    let Some(e) = memchr::memmem::find(&raw[pos..], b"\r\n") else {
                        break;
                    };
                    let line = std::str::from_utf8(&raw[pos..pos + e])
                        .map_err(|_| "a chunk size line is not UTF-8".to_string())?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16)
                        .map_err(|_| format!("bad chunk size line {line:?}"))?;
                    pos += e + 2;
                    if size == 0 {
                        return Ok(());
                    }
                    left = Some(size);
                }
            }
        }
        raw.drain(..pos);
        pos = 0;
        let n = read(&mut s, &mut chunk)?;
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// The SSE scanner: lines across chunk boundaries, the current event's name.
#[derive(Default)]
struct Sse {
    line: Vec<u8>,
    event: Vec<u8>,
    /// The newest journal entry seen.
    last_seq: u64,
}

impl Sse {
    fn feed(&mut self, mut data: &[u8], c: &PageCounters) -> Result<(), String> {
        while let Some(e) = memchr::memchr(b'\n', data) {
            self.line.extend_from_slice(&data[..e]);
            data = &data[e + 1..];
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, c)?;
            self.line = line;
            self.line.clear();
        }
        self.line.extend_from_slice(data);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], c: &PageCounters) -> Result<(), String> {
        if let Some(name) = line.strip_prefix(b"event: ") {
            self.event.clear();
            self.event.extend_from_slice(name);
            let counter = match name {
                b"hello" => &c.hello,
                b"fleet" => {
                    c.arrivals.lock().unwrap().push(Instant::now());
                    &c.fleet
                }
                b"events" => &c.events,
                b"stats" => &c.stats,
                b"keys" => &c.keys,
                _ => &c.other,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let Some(data) = line.strip_prefix(b"data: ") else {
            return Ok(()); // a blank line ends an event; `: ping` is a comment
        };
        match &self.event[..] {
            b"fleet" => {
                let count = |needle: &[u8]| memchr::memmem::find_iter(data, needle).count() as u64;
                c.upserts
                    .fetch_add(count(b"\"identity\":"), Ordering::Relaxed);
                c.with_hp.fetch_add(count(b"\"hp\":\""), Ordering::Relaxed);
                if let Some(at) = memchr::memmem::find(data, b"\"remove\":[") {
                    let list = &data[at + 10..];
                    let end = memchr::memchr(b']', list).unwrap_or(0);
                    if end > 0 {
                        let commas = memchr::memchr_iter(b',', &list[..end]).count();
                        c.removed.fetch_add(commas as u64 + 1, Ordering::Relaxed);
                    }
                }
                if c.fleet.load(Ordering::Relaxed) == 1 {
                    if memchr::memmem::find(data, b"\"reset\":true").is_none() {
                        return Err("the first fleet event is not a reset".into());
                    }
                    c.reset.store(true, Ordering::Relaxed);
                }
            }
            b"events" => {
                let mut n = 0;
                for at in memchr::memmem::find_iter(data, b"\"seq\":") {
                    let digits = &data[at + 6..];
                    let end = digits
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(digits.len());
                    let seq: u64 = std::str::from_utf8(&digits[..end])
                        .ok()
                        .and_then(|d| d.parse().ok())
                        .ok_or("an events entry without a numeric seq")?;
                    if self.last_seq > 0 && seq > self.last_seq + 1 {
                        c.journal_skipped
                            .fetch_add(seq - self.last_seq - 1, Ordering::Relaxed);
                    }
                    self.last_seq = self.last_seq.max(seq);
                    n += 1;
                }
                c.journal.fetch_add(n, Ordering::Relaxed);
            }
            b"problem" => {
                return Err(format!(
                    "the stream sent a problem: {}",
                    String::from_utf8_lossy(data)
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Measurement windows
// ---------------------------------------------------------------------------------------

/// Everything read at one instant.
#[derive(Clone)]
struct Snap {
    t: Instant,
    server: f64,
    admin: f64,
    cores: f64,
    bench: f64,
    machine: f64,
    sets: u64,
    churn: u64,
    pages: Vec<[u64; 8]>,
}

/// Fields of a page's figures in [`Snap::pages`] and [`Window::pages`].
const BYTES: usize = 0;
const FLEET: usize = 1;
const UPSERTS: usize = 2;
const WITH_HP: usize = 3;
const REMOVED: usize = 4;
const JOURNAL: usize = 5;
const SKIPPED: usize = 6;
const CPU_NS: usize = 7;

/// What a window measured.
struct Window {
    secs: f64,
    /// CPU seconds.
    server: f64,
    admin: f64,
    cores: f64,
    bench: f64,
    readers: f64,
    /// Every other process (the machine's busy time less the server's and the bench's).
    others: f64,
    sets: u64,
    churn: u64,
    /// Server RSS at the end.
    rss: u64,
    /// Per page: bytes, fleet events, upserts, rows with hp, removed, journal entries and
    /// those skipped.
    pages: Vec<[u64; 7]>,
    /// Intervals between a page's updates (fleet events more than 50 ms apart), µs.
    gaps: Hist,
}

/// What the bench watches: the server, the pages, the ticker's count.
struct Probe<'a> {
    pid: u32,
    log: Log,
    pages: &'a [Page],
    sets: Rc<Cell<u64>>,
    churn: Rc<Cell<u64>>,
}

impl Probe<'_> {
    fn snap(&self) -> Snap {
        Snap {
            t: Instant::now(),
            server: threads_cpu(self.pid, |_| true),
            admin: threads_cpu(self.pid, |c| c == "velium-admin"),
            cores: threads_cpu(self.pid, |c| c.starts_with("velium-core-")),
            bench: cpu_secs(std::process::id()),
            machine: machine_busy(),
            sets: self.sets.get(),
            churn: self.churn.get(),
            pages: self
                .pages
                .iter()
                .map(|p| {
                    let c = &p.counters;
                    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                    [
                        l(&c.bytes),
                        l(&c.fleet),
                        l(&c.upserts),
                        l(&c.with_hp),
                        l(&c.removed),
                        l(&c.journal),
                        l(&c.journal_skipped),
                        l(&c.cpu_ns),
                    ]
                })
                .collect(),
        }
    }

    /// The window from `a` to now. Panics if a page failed, or got no update in a window
    /// of 1 s or more (every tick has changed rows).
    fn since(&self, a: &Snap, phase: &str) -> Window {
        let b = self.snap();
        let secs = (b.t - a.t).as_secs_f64();
        let mut gaps = Hist::default();
        let mut pages = Vec::new();
        let mut readers = 0.0;
        for (k, p) in self.pages.iter().enumerate() {
            let failed = p.counters.ended.lock().unwrap().clone();
            if !failed.is_empty() {
                let log = self.log.lock().unwrap();
                let tail: Vec<&String> = log.iter().rev().take(12).collect();
                let admin = threads_cpu(self.pid, |c| c == "velium-admin");
                panic!(
                    "page {k}: the dashboard stream failed in the {phase} window: {failed}; \
                     server {} (admin thread {}); its last log lines, newest first: {tail:?}",
                    if std::path::Path::new(&format!("/proc/{}", self.pid)).exists() {
                        "running"
                    } else {
                        "gone"
                    },
                    if admin > 0.0 { "present" } else { "gone" },
                );
            }
            let (x, y) = (&a.pages[k], &b.pages[k]);
            let d: [u64; 7] = std::array::from_fn(|i| y[i] - x[i]);
            readers += (y[CPU_NS] - x[CPU_NS]) as f64 / 1e9;
            assert!(
                d[FLEET] > 0 || secs < 1.0,
                "page {k}: no fleet event in the {phase} window ({secs:.2} s, {} bytes)",
                d[BYTES]
            );
            pages.push(d);
            let arrivals = p.counters.arrivals.lock().unwrap();
            let mut last: Option<Instant> = None;
            for &t in arrivals.iter().filter(|&&t| t >= a.t && t <= b.t) {
                if let Some(l) = last
                    && t - l >= Duration::from_millis(50)
                {
                    gaps.record(t - l);
                }
                if last.is_none_or(|l| t - l >= Duration::from_millis(50)) {
                    last = Some(t);
                }
            }
        }
        Window {
            secs,
            server: b.server - a.server,
            admin: b.admin - a.admin,
            cores: b.cores - a.cores,
            bench: b.bench - a.bench,
            readers,
            others: ((b.machine - a.machine) - (b.server - a.server) - (b.bench - a.bench))
                .max(0.0),
            sets: b.sets - a.sets,
            churn: b.churn - a.churn,
            rss: rss_of(self.pid),
            pages,
            gaps,
        }
    }
}

impl Window {
    /// Mean over pages of field `i`, per second.
    fn per_page_per_sec(&self, i: usize) -> f64 {
        if self.pages.is_empty() {
            return 0.0;
        }
        let sum: u64 = self.pages.iter().map(|p| p[i]).sum();
        sum as f64 / self.pages.len() as f64 / self.secs.max(1e-9)
    }

    /// Smallest over pages of field `i`.
    fn min_page(&self, i: usize) -> u64 {
        self.pages.iter().map(|p| p[i]).min().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------
// Background: state-holding shims and the ticker
// ---------------------------------------------------------------------------------------

/// A Set frame: `hp`, and with `all` also `mana` and `target`.
fn set_frame(i: usize, version: u64, all: bool) -> Vec<u8> {
    let hp = 500 + (version as usize * 37 + i * 13) % 4500;
    let mut f = vec![0x10];
    f.extend_from_slice(format!("hp={hp}/5000").as_bytes());
    if all {
        let mana = 1000 + (i * 7) % 3000;
        f.extend_from_slice(format!("\x1fmana={mana}/4000").as_bytes());
        f.extend_from_slice(format!("\x1ftarget=mob_{}", version % 97).as_bytes());
    }
    f.push(0x0A);
    f
}

/// Where a state-holding shim's Sets are written.
enum Writer {
    Whole(TcpStream),
    Half(OwnedWriteHalf),
}

impl Writer {
    fn try_write(&self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Writer::Whole(s) => s.try_write(b),
            Writer::Half(w) => w.try_write(b),
        }
    }

    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Whole(s) => s.write_all(b).await,
            Writer::Half(w) => w.write_all(b).await,
        }
    }
}

/// Each shim Sets `hp`, `mana` and `target` once.
async fn initial_sets(writers: &mut [Writer]) -> Result<(), String> {
    for (i, w) in writers.iter_mut().enumerate() {
        w.write_all(&set_frame(i, 0, true))
            .await
            .map_err(|e| format!("initial Set {i}: {e}"))?;
    }
    Ok(())
}

/// The ticker: `rate` Sets a second over `writers`, round robin, 2 per 10 ms tick (a
/// Set that the socket cannot take at once is skipped and counted). Every 8th Set also
/// changes `target`. Runs until aborted.
fn spawn_ticker(
    mut writers: Vec<Writer>,
    rate: usize,
    sent: Rc<Cell<u64>>,
    skipped: Rc<Cell<u64>>,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        if writers.is_empty() || rate == 0 {
            return std::future::pending().await;
        }
        let period = Duration::from_millis(10);
        let per_tick = (rate as f64 * period.as_secs_f64()).max(1.0);
        let mut owed = 0.0f64;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next = 0usize;
        let mut version = 1u64;
        loop {
            tick.tick().await;
            owed += per_tick;
            while owed >= 1.0 {
                owed -= 1.0;
                let i = next;
                next = (next + 1) % writers.len();
                if next == 0 {
                    version += 1;
                }
                let f = set_frame(i, version, version.is_multiple_of(8));
                match writers[i].try_write(&f) {
                    Ok(n) if n == f.len() => sent.set(sent.get() + 1),
                    Ok(n) => {
                        // Never seen on an idle connection; keep the stream whole.
                        let _ = writers[i].write_all(&f[n..]).await;
                        sent.set(sent.get() + 1);
                    }
                    Err(_) => skipped.set(skipped.get() + 1),
                }
            }
        }
    })
}

/// The churn: `rate` new shims a second (`bench.churn.sN`, raw Identify), each closed
/// `live` after it came, so that every page tick has rows to add and ids to remove. Runs
/// until aborted; counts the shims made and keeps the first failure.
fn spawn_churn(
    addr: SocketAddr,
    rate: usize,
    live: Duration,
    made: Rc<Cell<u64>>,
    failed: Rc<RefCell<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_local(async move {
        if rate == 0 {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut held: std::collections::VecDeque<(Instant, TcpStream)> = Default::default();
        for i in 0.. {
            tick.tick().await;
            while held.front().is_some_and(|(t, _)| t.elapsed() >= live) {
                held.pop_front();
            }
            let shim = async {
                let mut s = connect_from(source_ip(i), addr).await?;
                velium_identify(&mut s, &format!("bench.churn.s{i}")).await?;
                Ok::<_, std::io::Error>(s)
            };
            match shim.await {
                Ok(s) => {
                    held.push_back((Instant::now(), s));
                    made.set(made.get() + 1);
                }
                Err(e) if failed.borrow().is_empty() => {
                    *failed.borrow_mut() = format!("churn shim {i}: {e}");
                }
                Err(_) => {}
            }
        }
    })
}

/// The background of one server: the ticker and the churn, and what they count.
struct Background {
    sets: Rc<Cell<u64>>,
    skipped: Rc<Cell<u64>>,
    churn: Rc<Cell<u64>>,
    churn_failed: Rc<RefCell<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn new() -> Background {
        Background {
            sets: Rc::default(),
            skipped: Rc::default(),
            churn: Rc::default(),
            churn_failed: Rc::default(),
            tasks: Vec::new(),
        }
    }

    /// Starts the ticker over `writers` and the churn on `addr`.
    fn start(&mut self, p: &Params, writers: Vec<Writer>, addr: SocketAddr) {
        self.tasks.push(spawn_ticker(
            writers,
            p.sets,
            self.sets.clone(),
            self.skipped.clone(),
        ));
        self.tasks.push(spawn_churn(
            addr,
            p.churn,
            CHURN_LIFE,
            self.churn.clone(),
            self.churn_failed.clone(),
        ));
    }

    /// Stops both (the ticker's sockets close); `Err` if a churn shim failed.
    async fn stop(&mut self) -> Result<(), String> {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        match self.churn_failed.borrow().as_str() {
            "" => Ok(()),
            e => Err(e.to_string()),
        }
    }

    fn probe<'a>(&self, hub: &Hub, pages: &'a [Page]) -> Probe<'a> {
        Probe {
            pid: hub.pid(),
            log: hub.log.clone(),
            pages,
            sets: self.sets.clone(),
            churn: self.churn.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------

struct Params {
    pages: usize,
    cores: usize,
    serial: usize,
    warmup: usize,
    storm_n: usize,
    storm_c: usize,
    receivers: usize,
    messages: u64,
    payload: usize,
    window: u64,
    fleet: usize,
    sets: usize,
    churn: usize,
    steady: Duration,
}

/// What one run (one round of one kind) measured.
struct Run {
    open: bool,
    serial_tcp: Hist,
    serial_udp: Hist,
    storm_tcp: Hist,
    storm_rate: f64,
    fan_rate: f64,
    /// The windows: serial, storm + 1 s, the storm's shims held, steady, fan-out.
    serial: Window,
    storm: Window,
    held: Window,
    steady: Window,
    fan: Window,
    notes: Vec<String>,
}

/// What the handshake server measured.
struct Handshakes {
    serial_tcp: Hist,
    serial_udp: Hist,
    storm_tcp: Hist,
    storm_elapsed: Duration,
    serial: Window,
    storm: Window,
    held: Window,
}

fn run(rt: &tokio::runtime::Runtime, p: &Params, token: (&Path, &str), open: bool) -> Run {
    let mut notes = Vec::new();
    // (1) handshakes
    let mut hub = Hub::start(token.0, p.cores);
    let pages = if open {
        open_pages(hub.admin, token.1, p.pages)
    } else {
        Vec::new()
    };
    let local = tokio::task::LocalSet::new();
    let mut bg = Background::new();
    let probe = bg.probe(&hub, &pages);
    let h = rt
        .block_on(local.run_until(handshakes(hub.addr, &probe, p, &mut bg)))
        .unwrap_or_else(|e| panic!("handshake part ({}): {e}", condition(open)));
    hub.assert_running();
    let skipped = bg.skipped.get();
    for p in pages {
        p.close();
    }
    note_warnings(&mut notes, &hub);
    drop(hub);

    // (2) fan-out
    let mut hub = Hub::start(token.0, p.cores);
    let pages = if open {
        open_pages(hub.admin, token.1, p.pages)
    } else {
        Vec::new()
    };
    let local = tokio::task::LocalSet::new();
    let mut bg = Background::new();
    let probe = bg.probe(&hub, &pages);
    let (steady, fan, fan_rate) = rt
        .block_on(local.run_until(fan_out(hub.addr, &probe, p, &mut bg)))
        .unwrap_or_else(|e| panic!("fan-out part ({}): {e}", condition(open)));
    hub.assert_running();
    let skipped = skipped + bg.skipped.get();
    if skipped > 0 {
        notes.push(format!("{skipped} ticker Sets skipped (socket full)"));
    }
    for p in pages {
        p.close();
    }
    note_warnings(&mut notes, &hub);
    Run {
        open,
        serial_tcp: h.serial_tcp,
        serial_udp: h.serial_udp,
        storm_tcp: h.storm_tcp,
        storm_rate: p.storm_n as f64 / h.storm_elapsed.as_secs_f64(),
        fan_rate,
        serial: h.serial,
        storm: h.storm,
        held: h.held,
        steady,
        fan,
        notes,
    }
}

/// The handshake server's part: the background, then serial, storm, held.
async fn handshakes(
    addr: SocketAddr,
    probe: &Probe<'_>,
    p: &Params,
    bg: &mut Background,
) -> Result<Handshakes, String> {
    let mut fleet = Vec::with_capacity(p.fleet);
    for i in 0..p.fleet {
        let mut s = connect_from(source_ip(i), addr)
            .await
            .map_err(|e| format!("fleet shim {i}: {e}"))?;
        velium_identify(&mut s, &format!("bench.fleet.s{i}"))
            .await
            .map_err(|e| format!("fleet shim {i}: {e}"))?;
        fleet.push(Writer::Whole(s));
    }
    initial_sets(&mut fleet).await?;
    tokio::time::sleep(SETTLE).await;
    // A refused Set would have been answered with an Error.
    for (i, w) in fleet.iter().enumerate() {
        if let Writer::Whole(s) = w {
            let mut b = [0u8; 256];
            if let Ok(n) = s.try_read(&mut b) {
                return Err(format!(
                    "fleet shim {i} got {:?} after its Set",
                    String::from_utf8_lossy(&b[..n])
                ));
            }
        }
    }
    bg.start(p, fleet, addr);
    tokio::time::sleep(SETTLE).await;
    let a = probe.snap();
    let (serial_tcp, serial_udp) = serial(addr, p.warmup, p.serial).await?;
    let serial_w = probe.since(&a, "serial");
    let a = probe.snap();
    let r = storm(
        System::VeliumUring,
        addr,
        p.storm_n,
        p.storm_c,
        true,
        Via::Raw,
    )
    .await;
    if r.errors > 0 || r.held != p.storm_n {
        return Err(format!(
            "storm: {} of {} held, {} failed: {}",
            r.held, p.storm_n, r.errors, r.first_error
        ));
    }
    tokio::time::sleep(SETTLE).await;
    let storm_w = probe.since(&a, "storm");
    // The whole fleet held: what each tick costs the pages' thread at this size.
    let a = probe.snap();
    tokio::time::sleep(p.steady).await;
    let held_w = probe.since(&a, "held");
    drop(r.conns);
    bg.stop().await?;
    Ok(Handshakes {
        serial_tcp,
        serial_udp,
        storm_tcp: r.tcp,
        storm_elapsed: r.elapsed,
        serial: serial_w,
        storm: storm_w,
        held: held_w,
    })
}

/// The server's WARN and ERROR lines as notes. One kind is expected and only counted: a
/// storm shim drops its UDP socket once the bind is confirmed (as in the handshake bench),
/// so the kernel may give that port to a later shim, whose bind takes the address over.
fn note_warnings(notes: &mut Vec<String>, hub: &Hub) {
    let mut taken = 0;
    for w in hub.warnings() {
        if w.contains("plain UDP bind took an address from another live session") {
            taken += 1;
        } else {
            notes.push(w);
        }
    }
    if taken > 0 {
        notes.push(format!(
            "{taken} `plain UDP bind took an address from another live session` warnings (the \
             storm drops each UDP socket after its bind; the kernel reuses the port)"
        ));
    }
}

fn condition(open: bool) -> &'static str {
    if open { "pages open" } else { "pages closed" }
}

/// Serial handshakes, raw bytes: TCP connect -> Identify -> Session, then UDP bind
/// confirmed; each shim closed before the next. (TCP, UDP) latencies after `warmup`.
async fn serial(addr: SocketAddr, warmup: usize, n: usize) -> Result<(Hist, Hist), String> {
    let mut tcp = Hist::default();
    let mut udp = Hist::default();
    for i in 0..warmup + n {
        if i == warmup {
            tcp = Hist::default();
            udp = Hist::default();
        }
        let src = source_ip(i);
        let t0 = Instant::now();
        let mut s = connect_from(src, addr)
            .await
            .map_err(|e| format!("serial {i}: connect: {e}"))?;
        let token = velium_identify(&mut s, &format!("bench.serial.s{i}"))
            .await
            .map_err(|e| format!("serial {i}: {e}"))?;
        tcp.record(t0.elapsed());
        let t1 = Instant::now();
        let u = udp_to(src, addr)
            .await
            .map_err(|e| format!("serial {i}: udp: {e}"))?;
        udp_bind_confirm(&u, &token, i as u64)
            .await
            .map_err(|e| format!("serial {i}: udp bind: {e}"))?;
        udp.record(t1.elapsed());
    }
    Ok((tcp, udp))
}

/// The fan-out server's part: receivers, background, steady window, fan-out window.
async fn fan_out(
    addr: SocketAddr,
    probe: &Probe<'_>,
    p: &Params,
    bg: &mut Background,
) -> Result<(Window, Window, f64), String> {
    let r = storm(System::VeliumUring, addr, p.receivers, 100, false, Via::Raw).await;
    if r.errors > 0 || r.held != p.receivers {
        return Err(format!(
            "receivers: {} of {} held, {} failed: {}",
            r.held, p.receivers, r.errors, r.first_error
        ));
    }
    let progress = Progress::new(p.receivers);
    let mut tasks = Vec::new();
    let mut state_writers = Vec::new();
    let mut other_writers = Vec::new();
    for (i, conn) in r.conns.into_iter().enumerate() {
        let Conn::Raw(s) = conn else {
            return Err("a receiver is not a raw connection".into());
        };
        let (mut rd, wr) = s.into_split();
        let pr = progress.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pr.add(i, memchr::memchr_iter(b'\n', &buf[..n]).count() as u64),
                }
            }
        }));
        // Dropping a write half would send FIN: every one is kept to the end.
        if i < p.fleet {
            state_writers.push(Writer::Half(wr));
        } else {
            other_writers.push(wr);
        }
    }
    initial_sets(&mut state_writers).await?;
    bg.start(p, state_writers, addr);
    tokio::time::sleep(SETTLE).await;
    // A refused Set would be answered with an Error, which a receiver counts.
    if progress.total() != 0 {
        return Err(format!(
            "the receivers got {} frames before any Echo (a Set refused?)",
            progress.total()
        ));
    }
    let a = probe.snap();
    tokio::time::sleep(p.steady).await;
    let steady = probe.since(&a, "steady");

    // The sender; its Acks are read and checked by a task.
    let mut s = connect_from(source_ip(0), addr)
        .await
        .map_err(|e| format!("sender: {e}"))?;
    velium_identify(&mut s, "bench.src")
        .await
        .map_err(|e| format!("sender: {e}"))?;
    let (mut rd, mut wr) = s.into_split();
    let acks = Rc::new(Cell::new(0u64));
    let bad_ack: Rc<RefCell<String>> = Rc::default();
    {
        let (acks, bad, want) = (acks.clone(), bad_ack.clone(), p.receivers.to_string());
        tasks.push(tokio::task::spawn_local(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                let mut start = 0;
                while let Some(e) = memchr::memchr(b'\n', &pending[start..]) {
                    let f = &pending[start..start + e];
                    start += e + 1;
                    let data = String::from_utf8_lossy(f.get(1..).unwrap_or_default());
                    let ok = f.first() == Some(&0x0C)
                        && data.split_once(' ').is_some_and(|(_, c)| c == want);
                    if ok {
                        acks.set(acks.get() + 1);
                    } else if bad.borrow().is_empty() {
                        *bad.borrow_mut() = format!("{:#04x} {data:?}", f.first().unwrap_or(&0));
                    }
                }
                pending.drain(..start);
            }
        }));
    }
    let mut frame = vec![0x08];
    frame.extend_from_slice(FAN_TARGET.as_bytes());
    frame.push(b' ');
    frame.extend_from_slice("x".repeat(p.payload).as_bytes());
    frame.push(0x0A);
    let warm = p.window;
    send_window(&mut wr, &progress, &frame, p.window, 0, warm).await?;
    progress.wait_min(warm, Duration::from_secs(30)).await?;
    let a = probe.snap();
    send_window(&mut wr, &progress, &frame, p.window, warm, p.messages).await?;
    progress
        .wait_min(warm + p.messages, Duration::from_secs(120))
        .await?;
    let fan = probe.since(&a, "fan-out");
    let rate = (p.messages * p.receivers as u64) as f64 / fan.secs;
    // Every Echo acknowledged as reaching every receiver; nothing more delivered.
    check_delivered(&progress, &acks, &bad_ack, warm + p.messages, p.receivers).await?;
    bg.stop().await?;
    for t in tasks {
        t.abort();
    }
    drop(wr);
    drop(other_writers);
    Ok((steady, fan, rate))
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Unit {
    Rate,
    Us,
    Ms,
    Cpu,
    CpuMs,
    Bytes,
    BytesPerSec,
    PerSec,
    Share,
}

fn fmt(u: Unit, v: f64) -> String {
    match u {
        Unit::Rate => fmt_rate(v),
        Unit::Us => format!("{v:.1} µs"),
        Unit::Ms => format!("{v:.0} ms"),
        Unit::Cpu => format!("{:.1}%", v * 100.0),
        Unit::CpuMs => format!("{:.1} ms", v * 1e3),
        Unit::Bytes => fmt_bytes(v),
        Unit::BytesPerSec => format!("{}/s", fmt_bytes(v)),
        Unit::PerSec => format!("{v:.1}/s"),
        Unit::Share => format!("{:.2}", v),
    }
}

/// The figures of a run, in table order: (label, unit, value, measured in closed rounds
/// too).
fn figures(r: &Run, p: &Params) -> Vec<(String, Unit, f64, bool)> {
    let mut f: Vec<(String, Unit, f64, bool)> = Vec::new();
    let mut both = |label: String, unit: Unit, v: f64| f.push((label, unit, v, true));
    let cpu = |w: &Window, x: f64| w.server / x * 1e6;
    let share = |x: f64, w: &Window| x / w.secs.max(1e-9);
    let (s, st, h, sd, fo) = (&r.serial, &r.storm, &r.held, &r.steady, &r.fan);
    both(
        format!(
            "storm: shims/s ({} @ {}, full shim handshake)",
            p.storm_n, p.storm_c
        ),
        Unit::Rate,
        r.storm_rate,
    );
    both(
        "storm: TCP handshake p50".into(),
        Unit::Us,
        r.storm_tcp.us(0.5),
    );
    both(
        "storm: TCP handshake p99".into(),
        Unit::Us,
        r.storm_tcp.us(0.99),
    );
    both(
        "serial: TCP handshake p50".into(),
        Unit::Us,
        r.serial_tcp.us(0.5),
    );
    both(
        "serial: TCP handshake p99".into(),
        Unit::Us,
        r.serial_tcp.us(0.99),
    );
    both(
        "serial: UDP bind confirmed p50".into(),
        Unit::Us,
        r.serial_udp.us(0.5),
    );
    both(
        "serial: UDP bind confirmed p99".into(),
        Unit::Us,
        r.serial_udp.us(0.99),
    );
    both(
        format!("fan-out 1 -> {}: deliveries/s", p.receivers),
        Unit::Rate,
        r.fan_rate,
    );
    both(
        "server CPU per serial shim (warm-up included)".into(),
        Unit::Us,
        cpu(s, (p.serial + p.warmup) as f64),
    );
    both(
        "server CPU per storm shim (storm + 1 s)".into(),
        Unit::Us,
        cpu(st, p.storm_n as f64),
    );
    both("server CPU, serial".into(), Unit::Cpu, share(s.server, s));
    both(
        format!("server CPU, storm's {} shims held", p.fleet + p.storm_n),
        Unit::Cpu,
        share(h.server, h),
    );
    both("server CPU, steady".into(), Unit::Cpu, share(sd.server, sd));
    both(
        "server CPU, fan-out".into(),
        Unit::Cpu,
        share(fo.server, fo),
    );
    both(
        "core threads' CPU, fan-out".into(),
        Unit::Cpu,
        share(fo.cores, fo),
    );
    both(
        "admin thread CPU, serial".into(),
        Unit::Cpu,
        share(s.admin, s),
    );
    both(
        "admin thread CPU time, storm + 1 s".into(),
        Unit::CpuMs,
        st.admin,
    );
    both(
        format!("admin thread CPU, {} shims held", p.fleet + p.storm_n),
        Unit::Cpu,
        share(h.admin, h),
    );
    both(
        "admin thread CPU, steady".into(),
        Unit::Cpu,
        share(sd.admin, sd),
    );
    both(
        "admin thread CPU, fan-out".into(),
        Unit::Cpu,
        share(fo.admin, fo),
    );
    both(
        format!("server RSS after serial ({} + churn shims)", p.fleet),
        Unit::Bytes,
        s.rss as f64,
    );
    both(
        format!(
            "server RSS after the storm ({} + {} shims)",
            p.fleet, p.storm_n
        ),
        Unit::Bytes,
        st.rss as f64,
    );
    both(
        format!(
            "server RSS {} s later (storm's shims held)",
            p.steady.as_secs()
        ),
        Unit::Bytes,
        h.rss as f64,
    );
    both(
        format!("server RSS before the fan-out ({} receivers)", p.receivers),
        Unit::Bytes,
        sd.rss as f64,
    );
    both(
        "server RSS after the fan-out".into(),
        Unit::Bytes,
        fo.rss as f64,
    );
    both(
        "bench process CPU, fan-out (generator and page readers)".into(),
        Unit::Cpu,
        share(fo.bench, fo),
    );
    for (what, w) in [("serial", s), ("storm + 1 s", st), ("fan-out", fo)] {
        both(
            format!("other processes' CPU, {what} (the machine's noise)"),
            Unit::Cpu,
            share(w.others, w),
        );
    }
    both(
        "background: ticker Sets/s, steady".into(),
        Unit::PerSec,
        share(sd.sets as f64, sd),
    );
    both(
        "background: churn shims/s, serial".into(),
        Unit::PerSec,
        share(s.churn as f64, s),
    );
    both(
        "background: churn shims/s, fan-out".into(),
        Unit::PerSec,
        share(fo.churn as f64, fo),
    );
    let mut open = |label: String, unit: Unit, v: f64| f.push((label, unit, v, false));
    let sum = |w: &Window, i: usize| w.pages.iter().map(|x| x[i]).sum::<u64>() as f64;
    let pages = (r.serial.pages.len().max(1)) as f64;
    for (what, w) in [
        ("serial".to_string(), s),
        ("storm + 1 s".to_string(), st),
        (format!("{} shims held", p.fleet + p.storm_n), h),
        ("steady".to_string(), sd),
        ("fan-out".to_string(), fo),
    ] {
        open(
            format!("per page: bytes/s, {what}"),
            Unit::BytesPerSec,
            w.per_page_per_sec(BYTES),
        );
    }
    open(
        "per page: fleet events/s, steady".into(),
        Unit::PerSec,
        sd.per_page_per_sec(FLEET),
    );
    open(
        "per page: rows upserted/s, steady".into(),
        Unit::PerSec,
        sd.per_page_per_sec(UPSERTS),
    );
    open(
        "per page: rows upserted / (ticker Sets + churn shims), steady".into(),
        Unit::Share,
        sum(sd, UPSERTS) / pages / (sd.sets + sd.churn).max(1) as f64,
    );
    open(
        "per page: ids removed / churn shims, steady".into(),
        Unit::Share,
        sum(sd, REMOVED) / pages / sd.churn.max(1) as f64,
    );
    open(
        "per page: rows with an hp value / rows upserted, fan-out".into(),
        Unit::Share,
        sum(fo, WITH_HP) / sum(fo, UPSERTS).max(1.0),
    );
    open(
        "slowest page: rows upserted / new shims, storm + 1 s".into(),
        Unit::Share,
        st.min_page(UPSERTS) as f64 / p.storm_n as f64,
    );
    open(
        "per page: journal entries/s, serial".into(),
        Unit::PerSec,
        s.per_page_per_sec(JOURNAL),
    );
    open(
        "per page: journal entries skipped (seq gaps) / entries, serial".into(),
        Unit::Share,
        sum(s, SKIPPED) / (sum(s, JOURNAL) + sum(s, SKIPPED)).max(1.0),
    );
    for (what, w) in [("steady", sd), ("fan-out", fo), ("storm + 1 s", st)] {
        open(
            format!("page update interval p50, {what}"),
            Unit::Ms,
            w.gaps.us(0.5) / 1e3,
        );
        open(
            format!("page update interval max, {what}"),
            Unit::Ms,
            w.gaps.max_us() / 1e3,
        );
    }
    open(
        "page readers' CPU, serial (all pages)".into(),
        Unit::Cpu,
        share(s.readers, s),
    );
    f
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Which latency of a run.
type HistOf = fn(&Run) -> &Hist;

fn report(runs: &[Run], p: &Params) {
    let closed: Vec<&Run> = runs.iter().filter(|r| !r.open).collect();
    let open: Vec<&Run> = runs.iter().filter(|r| r.open).collect();
    let template = figures(runs.first().expect("a run"), p);
    let column = |rs: &[&Run], i: usize| median(rs.iter().map(|r| figures(r, p)[i].2).collect());
    println!(
        "## Pages closed vs open (median over {} rounds of each)",
        closed.len()
    );
    println!();
    println!(
        "| figure | pages closed | pages open ({}) | open / closed |",
        p.pages
    );
    println!("|---|---:|---:|---:|");
    for (i, (label, unit, _, both)) in template.iter().enumerate() {
        let o = column(&open, i);
        if *both {
            let c = column(&closed, i);
            println!(
                "| {label} | {} | {} | {} |",
                fmt(*unit, c),
                fmt(*unit, o),
                ratio(o, c)
            );
        } else {
            println!("| {label} | - | {} | - |", fmt(*unit, o));
        }
    }
    println!();
    println!(
        "Latency and CPU: open / closed > 1 = worse with pages open; rates: < 1 = fewer with \
         pages open. CPU: share of one core over the window (the server's threads' run time \
         from /proc/PID/task/*/schedstat)."
    );
    println!();
    println!("### Latencies merged over the rounds of each kind");
    println!();
    println!("| latency | pages closed | pages open | open / closed |");
    println!("|---|---:|---:|---:|");
    let merged = |rs: &[&Run], h: HistOf| {
        let mut m = Hist::default();
        for r in rs {
            m.merge(h(r));
        }
        m
    };
    let kinds: [(&str, HistOf); 3] = [
        ("serial TCP handshake", |r| &r.serial_tcp),
        ("serial UDP bind confirmed", |r| &r.serial_udp),
        ("storm TCP handshake", |r| &r.storm_tcp),
    ];
    for (what, h) in kinds {
        let (c, o) = (merged(&closed, h), merged(&open, h));
        for (q, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")] {
            println!(
                "| {what} {name} ({} / {} samples) | {} | {} | {} |",
                c.len(),
                o.len(),
                fmt(Unit::Us, c.us(q)),
                fmt(Unit::Us, o.us(q)),
                ratio(o.us(q), c.us(q))
            );
        }
    }
    println!();
    println!("### Every round");
    println!();
    let heads: Vec<String> = runs
        .iter()
        .enumerate()
        .map(|(k, r)| format!("{} {}", k / 2 + 1, if r.open { "open" } else { "closed" }))
        .collect();
    println!("| figure | {} |", heads.join(" | "));
    println!("|---|{}", "---:|".repeat(runs.len()));
    let all: Vec<Vec<(String, Unit, f64, bool)>> = runs.iter().map(|r| figures(r, p)).collect();
    for (i, (label, unit, _, both)) in template.iter().enumerate() {
        let cells: Vec<String> = all
            .iter()
            .zip(runs)
            .map(|(f, r)| {
                if *both || r.open {
                    fmt(*unit, f[i].2)
                } else {
                    "-".into()
                }
            })
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    println!();
    for (k, r) in runs.iter().enumerate() {
        for n in &r.notes {
            println!("- round {} {}: {n}", k / 2 + 1, condition(r.open));
        }
    }
    let windows = |r: &Run| {
        format!(
            "serial {:.2} s, storm + 1 s {:.2} s, held {:.2} s, steady {:.2} s, fan-out {:.2} s",
            r.serial.secs, r.storm.secs, r.held.secs, r.steady.secs, r.fan.secs
        )
    };
    if let Some(r) = runs.first() {
        println!("- windows of the first run: {}", windows(r));
    }
    println!();
}

fn main() {
    floor::maybe_run();
    banner("dashboard");
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(2);
    let rounds = setting("rounds", 3).max(1);
    let receivers = cap_connections("fan-out receivers", setting("receivers", 1000).max(1), 300);
    // The fan-out's state-holding shims are its first receivers.
    let fleet = setting("fleet", 500).min(receivers);
    let pages = setting("pages", 4).max(1);
    let storm_c = setting("c", 100).max(1);
    let params = Params {
        pages,
        cores,
        serial: setting("serial", 5000).max(1),
        warmup: setting("warmup", 300),
        storm_n: cap_connections(
            "storm (with the background shims)",
            setting("n", 5000).max(1),
            fleet + storm_c + pages + 300,
        ),
        storm_c,
        receivers,
        messages: setting("messages", 20_000).max(1) as u64,
        payload: setting("payload", 64).max(1),
        window: setting("window", 1024).max(1) as u64,
        fleet,
        sets: setting("sets", 200),
        churn: setting("churn", 40),
        steady: Duration::from_secs(setting("steady", 3).max(1) as u64),
    };
    let p = &params;
    println!(
        "- velium-server: --io uring --cores {}, --admin 127.0.0.1:0 --admin-token-file F; \
         {} rounds of pages closed then pages open, fresh servers each",
        p.cores, rounds
    );
    println!(
        "- pages open: {} SSE readers (one thread each) on GET /api/stream?keys={PAGE_KEYS}&stale=30, \
         Bearer and cookie (from POST /login) auth alternating",
        p.pages
    );
    println!(
        "- background in both kinds of round: {} state-holding shims (hp, mana, target Set \
         once), {} Sets/s changing hp (every 8th also target), {} churn shims/s each \
         connected for {} s; in the fan-out, the state-holding shims are the first {} \
         receivers",
        p.fleet,
        p.sets,
        p.churn,
        CHURN_LIFE.as_secs(),
        p.fleet
    );
    println!(
        "- handshakes: serial {} (after {} warm-up), raw TCP handshake then UDP bind \
         confirmed; storm {} @ {} (full shim handshake, raw), held open",
        p.serial, p.warmup, p.storm_n, p.storm_c
    );
    println!(
        "- fan-out: 1 -> {} raw receivers, Echo of {} bytes to {FAN_TARGET}, {} messages after \
         {} warm-up, window {}; steady window {} s before it",
        p.receivers,
        p.payload,
        p.messages,
        p.window,
        p.window,
        p.steady.as_secs()
    );
    println!();
    let dir = TempDir::new("dashboard");
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let token_file = dir.0.join("admin-token");
    std::fs::write(&token_file, &token).expect("write the token file");
    let rt = runtime();
    let mut runs = Vec::new();
    let t0 = Instant::now();
    for round in 0..rounds {
        for open in [false, true] {
            let r = run(&rt, p, (&token_file, &token), open);
            eprintln!(
                "> round {} {}: storm {}/s, serial p50 {:.1} µs p99 {:.1} µs, fan-out {}/s, \
                 admin CPU steady {:.1}%, fan-out {:.1}%, page bytes/s {} ({:.0} s in)",
                round + 1,
                condition(open),
                fmt_rate(r.storm_rate),
                r.serial_tcp.us(0.5),
                r.serial_tcp.us(0.99),
                fmt_rate(r.fan_rate),
                r.steady.admin / r.steady.secs * 100.0,
                r.fan.admin / r.fan.secs * 100.0,
                fmt_bytes(r.fan.per_page_per_sec(0)),
                t0.elapsed().as_secs_f64()
            );
            runs.push(r);
        }
    }
    report(&runs, p);
}
