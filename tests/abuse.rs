//! Abuse: no single shim can hurt the fleet.
//!
//! Each test runs a real server process and one misbehaving shim (a flooder, a shim that
//! never reads, a shim that asks for listings as fast as it can), and asserts what the
//! bystanders see: none of them is cut off, their ping round trips stay well under a second,
//! and the server's memory (VmRSS) stays bounded and comes back afterwards. The abuser
//! itself is answered exactly once per request, in order, and stays connected.
//!
//! What protects the fleet, and is tested here: per-shim rate limits (`routed_per_sec`,
//! `deliveries_per_sec`, `who_per_sec`; a refused request gets exactly one Error, counted
//! in `velium_refused_total`, and its sender stays connected), a read batch handled in
//! slices with flushes between them while the producer is slowed for its recipients to
//! drain, `write_deadline` and `outbound_limit` for shims that stop reading, bounded UDP
//! send queues, and buffers that shrink back after a burst. Some tests lift the routing
//! limits (`--routed-per-sec 0 --deliveries-per-sec 0`) to test the other protections
//! alone. The frame ends old clients send (UDP datagrams without `0A`, CRLF over TCP) are
//! tested here too.
//!
//! Every wait is on an event (a frame, a counter, a log line, RSS going down) with the
//! harness's deadline; only the floods and the pings run on a clock, since a rate in time
//! is what they measure.
//!
//! The floods take one lock ([`heavy`]), so that two of them never share the machine:
//! with two at once on two cores, a bystander's round trip would measure the other test's
//! load, not this server.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The longest ping round trip a bystander may see while another shim abuses the server.
const MAX_RTT: Duration = Duration::from_millis(500);
/// How often the pinging bystanders ping.
const PING_EVERY: Duration = Duration::from_millis(20);
/// Round trips a pinger completes at least, however soon it is stopped.
const MIN_PINGS: usize = 3;
/// The default routing limits.
const ROUTED_PER_SEC: u64 = 200;
const DELIVERIES_PER_SEC: u64 = 20_000;
/// The Who limit the Who flood runs with (`--who-per-sec`).
const WHO_PER_SEC: u64 = 5;
/// The flags that lift the routing rate limits.
const LIFTED: [&str; 4] = ["--routed-per-sec", "0", "--deliveries-per-sec", "0"];

fn routed_error(n: u64) -> String {
    format!("rate limit: more than {n} routed frames per second")
}

fn deliveries_error(n: u64) -> String {
    format!("rate limit: more than {n} deliveries per second")
}

fn who_error(n: u64) -> String {
    format!("rate limit: more than {n} Who per second")
}

fn text(d: &[u8]) -> String {
    String::from_utf8_lossy(d).into_owned()
}

/// Held by each flood test for its whole run (see the module comment).
fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server at log level info (a flood must not be slowed by debug lines), with its admin
/// listener, plus `extra` flags.
fn server(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start_level(io, "info", &args)
}

/// `n` copies of one frame, as one buffer for one write.
fn repeated(f: &[u8], n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(f.len() * n);
    for _ in 0..n {
        v.extend_from_slice(f);
    }
    v
}

// ---------------------------------------------------------------------------------------
// Server memory and CPU
// ---------------------------------------------------------------------------------------

/// The server's user + system CPU time so far, in clock ticks (1/100 s).
fn cpu_ticks(srv: &Server) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", srv.pid())).unwrap();
    // Fields after the command name (which is in parentheses): state is field 3, utime
    // field 14 and stime field 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Samples the server's RSS every few milliseconds until finished; returns the peak.
struct RssPeak {
    stop: Arc<AtomicBool>,
    h: JoinHandle<u64>,
}

impl RssPeak {
    fn start(srv: &Server) -> RssPeak {
        let pid = srv.pid();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib_of(pid) {
                    peak = peak.max(kib);
                }
                thread::sleep(Duration::from_millis(3));
            }
            peak
        });
        RssPeak { stop, h }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.h.join().unwrap()
    }
}

/// Waits until the server's RSS is at most `limit_kib`; fails with what it stayed at.
fn wait_rss_below(srv: &Server, limit_kib: u64, what: &str) -> u64 {
    let end = Instant::now() + DEADLINE;
    loop {
        let rss = srv.rss_kib();
        if rss <= limit_kib {
            return rss;
        }
        assert!(
            Instant::now() < end,
            "{what}: server RSS stayed at {rss} KiB, above {limit_kib} KiB"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// Readers
// ---------------------------------------------------------------------------------------

/// What one read did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Data,
    Closed,
    Idle,
}

/// A frame reader over one socket: a fixed buffer, walked rather than shifted per frame
/// (a flood brings hundreds of thousands of small frames).
struct Reader {
    s: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Reader {
    fn new(s: TcpStream) -> Reader {
        Reader {
            s,
            buf: vec![0; 512 * 1024],
            start: 0,
            end: 0,
        }
    }

    /// Hands every whole frame buffered to `f` until it returns false (then false).
    fn frames(&mut self, mut f: impl FnMut(u8, &[u8]) -> bool) -> bool {
        while let Some(i) = memchr::memchr(0x0A, &self.buf[self.start..self.end]) {
            let fr = &self.buf[self.start..self.start + i];
            self.start += i + 1;
            let (op, data) = match fr.split_first() {
                Some((&op, d)) => (op, d),
                None => (0x00, &[][..]),
            };
            if !f(op, data) {
                return false;
            }
        }
        true
    }

    /// One read.
    fn fill(&mut self) -> Fill {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        match self.s.read(&mut self.buf[self.end..]) {
            Ok(0) => Fill::Closed,
            Ok(n) => {
                self.end += n;
                Fill::Data
            }
            Err(e) => match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => Fill::Idle,
                ErrorKind::Interrupted => Fill::Data,
                _ => Fill::Closed,
            },
        }
    }

    /// Feeds frames to `f` until it returns false (true) or the connection ends (false);
    /// fails after `DEADLINE` without a byte.
    fn until(&mut self, mut f: impl FnMut(u8, &[u8]) -> bool) -> bool {
        let mut last = Instant::now();
        loop {
            if !self.frames(&mut f) {
                return true;
            }
            match self.fill() {
                Fill::Data => last = Instant::now(),
                Fill::Closed => return false,
                Fill::Idle => assert!(last.elapsed() < DEADLINE, "no frame within {DEADLINE:?}"),
            }
        }
    }
}

/// Everything a shim was answered, one entry per Command, Echo or Who.
#[derive(Debug, Default)]
struct Answers {
    /// The data of each Ack, in order.
    acks: Vec<Vec<u8>>,
    /// For each Who answered with a listing: (WhoEntry frames, the Ack's data).
    listings: Vec<(u64, Vec<u8>)>,
    /// Each answer in order: true for an Ack, false for an Error.
    order: Vec<bool>,
    /// Error texts and how many of each.
    errors: BTreeMap<String, u64>,
    /// Frames that are no answer (the first few), and how many there were.
    others: Vec<(u8, String)>,
    other_count: u64,
    /// The connection ended before the closing Pong.
    closed: bool,
}

impl Answers {
    fn total(&self) -> usize {
        self.order.len()
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn other(&mut self, op: u8, d: &[u8]) {
        self.other_count += 1;
        if self.others.len() < 8 {
            self.others.push((op, text(d)));
        }
    }

    /// Index of the first Error, if any.
    fn first_error(&self) -> Option<usize> {
        self.order.iter().position(|&ack| !ack)
    }

    /// Asserts that every Error is one of `allowed`.
    fn assert_errors_in(&self, allowed: &[String]) {
        for t in self.errors.keys() {
            assert!(
                allowed.contains(t),
                "unexpected Error {t:?}; errors: {:?}",
                self.errors
            );
        }
    }

    fn assert_no_others(&self) {
        assert_eq!(
            self.other_count, 0,
            "frames that answer nothing: {:?}",
            self.others
        );
    }
}

/// Collects a shim's answers (with Who listings when `who`) until the Pong `tag`, which
/// the caller sends after its requests, or the end of the connection.
fn collect_answers(s: TcpStream, tag: &'static [u8], who: bool) -> JoinHandle<Answers> {
    thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut r = Reader::new(s);
        let mut a = Answers::default();
        let mut entries = 0u64;
        let done = r.until(|op, d| {
            match op {
                0x0E if who => entries += 1,
                0x0C => {
                    if who {
                        a.listings.push((entries, d.to_vec()));
                        entries = 0;
                    }
                    a.acks.push(d.to_vec());
                    a.order.push(true);
                }
                0x09 => {
                    if entries != 0 {
                        a.other(0x0E, b"WhoEntry frames not followed by their Ack");
                        entries = 0;
                    }
                    *a.errors.entry(text(d)).or_default() += 1;
                    a.order.push(false);
                }
                0x07 if d == tag => return false,
                _ => a.other(op, d),
            }
            true
        });
        a.closed = !done;
        a
    })
}

/// The data of an Ack for COUNT, or `None`: `ID SP COUNT`.
fn ack_count(d: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(d).ok()?;
    let (id, n) = s.split_once(' ')?;
    Some((id.parse().ok()?, n.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// Bystanders
// ---------------------------------------------------------------------------------------

/// What a pinging bystander saw.
#[derive(Debug, Default)]
struct Seen {
    /// Frames that equal the flood frame it was told to expect.
    floods: u64,
    /// Other frames (the first few), and how many.
    others: Vec<(u8, String)>,
    other_count: u64,
    /// Ping round trips.
    rtts: Vec<Duration>,
    /// Cut off (end of stream or reset) before the end.
    closed: bool,
    /// A Pong that never came (the bystander gave up after the deadline).
    stuck: bool,
}

impl Seen {
    fn max_rtt(&self) -> Duration {
        self.rtts.iter().copied().max().unwrap_or_default()
    }

    fn assert_fine(&self, who: &str) {
        assert!(!self.closed, "{who} was cut off");
        assert!(!self.stuck, "{who}: a Pong never came");
        assert!(
            self.rtts.len() >= MIN_PINGS,
            "{who} got only {} ping round trips in",
            self.rtts.len()
        );
        assert!(
            self.max_rtt() < MAX_RTT,
            "{who}: ping round trip {:?} (of {} pings), limit {MAX_RTT:?}",
            self.max_rtt(),
            self.rtts.len()
        );
    }
}

/// A bystander on a thread of its own: reads as fast as it can, counting frames equal to
/// `flood` (op and data), and pings every `PING_EVERY`, one Ping at a time, timing each
/// round trip. When `end` is set it sends the Ping "end" and returns once its Pong is in:
/// it has then received everything queued for it before.
struct Bystander {
    end: Arc<AtomicBool>,
    h: JoinHandle<Seen>,
}

impl Bystander {
    fn spawn(tcp: Tcp, flood: Option<(u8, Vec<u8>)>) -> Bystander {
        let end = Arc::new(AtomicBool::new(false));
        let e = end.clone();
        let h = thread::spawn(move || {
            let mut w = tcp.s.try_clone().unwrap();
            tcp.s
                .set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let mut r = Reader::new(tcp.s.try_clone().unwrap());
            let mut seen = Seen::default();
            let mut seq = 0u64;
            let mut in_flight: Option<(Vec<u8>, Instant)> = None;
            let mut next_ping = Instant::now();
            let mut end_sent: Option<Instant> = None;
            loop {
                let now = Instant::now();
                if end_sent.is_none() && e.load(Ordering::Acquire) {
                    if w.write_all(&frame(0x06, b"end")).is_err() {
                        seen.closed = true;
                        return seen;
                    }
                    end_sent = Some(now);
                } else if end_sent.is_none() && in_flight.is_none() && now >= next_ping {
                    seq += 1;
                    let tag = format!("rtt{seq}").into_bytes();
                    if w.write_all(&frame(0x06, &tag)).is_err() {
                        seen.closed = true;
                        return seen;
                    }
                    in_flight = Some((tag, now));
                }
                let mut finished = false;
                r.frames(|op, d| {
                    if let Some((fop, fd)) = &flood
                        && op == *fop
                        && d == &fd[..]
                    {
                        seen.floods += 1;
                    } else if op == 0x07 && d == b"end" {
                        finished = true;
                        return false;
                    } else if op == 0x07
                        && let Some((tag, t)) = &in_flight
                        && d == &tag[..]
                    {
                        seen.rtts.push(t.elapsed());
                        in_flight = None;
                        next_ping = Instant::now() + PING_EVERY;
                    } else {
                        seen.other_count += 1;
                        if seen.others.len() < 8 {
                            seen.others.push((op, text(d)));
                        }
                    }
                    true
                });
                if finished {
                    return seen;
                }
                let waiting = in_flight.as_ref().map(|(_, t)| *t).or(end_sent);
                if waiting.is_some_and(|t| t.elapsed() > DEADLINE) {
                    seen.stuck = true;
                    return seen;
                }
                if r.fill() == Fill::Closed {
                    seen.closed = true;
                    return seen;
                }
            }
        });
        Bystander { end, h }
    }

    /// Asks for the end (see [`Bystander`]).
    fn end(&self) {
        self.end.store(true, Ordering::Release);
    }

    fn join(self) -> Seen {
        self.end();
        self.h.join().unwrap()
    }
}

/// Per-shim state a [`Fleet`]'s reader keeps.
#[derive(Clone, Debug, Default)]
struct Member {
    /// Frames by opcode (0x0F and above share the last slot).
    ops: [u64; 16],
    /// Bytes received.
    bytes: u64,
    /// The first frames received other than Pongs.
    kept: Vec<(u8, Vec<u8>)>,
    /// The last Pong's data.
    last_pong: Vec<u8>,
    /// End of stream or reset.
    closed: bool,
}

const KEEP: usize = 4096;

struct FleetState {
    members: Mutex<Vec<Member>>,
    cv: Condvar,
    stop: AtomicBool,
}

/// Many identified shims, all read by one thread with poll(2), as fast as it can.
struct Fleet {
    pub names: Vec<String>,
    pub streams: Vec<TcpStream>,
    state: Arc<FleetState>,
    h: Option<JoinHandle<()>>,
}

impl Fleet {
    /// Connects and identifies `n` shims named `PREFIX.sI`.
    fn connect(srv: &Server, prefix: &str, n: usize) -> Fleet {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}.s{i}")).collect();
        let mut tcps: Vec<Tcp> = Vec::with_capacity(n);
        // In batches, so that the listen backlog is never the limit.
        for chunk in names.chunks(100) {
            let mut batch: Vec<Tcp> = chunk.iter().map(|_| srv.tcp()).collect();
            for (t, name) in batch.iter_mut().zip(chunk) {
                t.send(0x01, name.as_bytes());
            }
            for t in &mut batch {
                assert_eq!(t.expect(0x02).len(), 16);
                t.expect_terms();
            }
            tcps.extend(batch);
        }
        let streams: Vec<TcpStream> = tcps.into_iter().map(|t| t.s).collect();
        let state = Arc::new(FleetState {
            members: Mutex::new(vec![Member::default(); n]),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let fds: Vec<i32> = streams.iter().map(|s| s.as_raw_fd()).collect();
        let st = state.clone();
        let h = thread::spawn(move || fleet_reader(fds, st));
        Fleet {
            names,
            streams,
            state,
            h: Some(h),
        }
    }

    fn len(&self) -> usize {
        self.streams.len()
    }

    /// A copy of every member's state.
    fn members(&self) -> Vec<Member> {
        self.state.members.lock().unwrap().clone()
    }

    /// Indices of the members whose connection ended.
    fn closed(&self) -> Vec<usize> {
        let m = self.state.members.lock().unwrap();
        (0..m.len()).filter(|&i| m[i].closed).collect()
    }

    fn assert_none_closed(&self, when: &str) {
        let c = self.closed();
        assert!(
            c.is_empty(),
            "{when}: {} of {} bystanders were cut off (e.g. {:?})",
            c.len(),
            self.len(),
            c.iter()
                .take(5)
                .map(|&i| &self.names[i])
                .collect::<Vec<_>>()
        );
    }

    /// Waits until `ok` holds for every member (or it closed: checked separately).
    fn wait_all(&self, what: &str, ok: impl Fn(&Member) -> bool) {
        let end = Instant::now() + DEADLINE;
        let mut m = self.state.members.lock().unwrap();
        loop {
            let missing = m.iter().filter(|x| !x.closed && !ok(x)).count();
            if missing == 0 {
                return;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: {missing} of {} still waiting",
                m.len()
            );
            m = self.state.cv.wait_timeout(m, left).unwrap().0;
        }
    }

    /// Pings every member with `tag` and waits for each Pong: every member has then
    /// received everything queued for it before. Members cut off are not waited for.
    fn sync(&mut self, tag: &str) {
        let f = frame(0x06, tag.as_bytes());
        for s in &mut self.streams {
            let _ = s.write_all(&f);
        }
        self.wait_all(&format!("Pong {tag:?}"), |m| m.last_pong == tag.as_bytes());
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.h.take() {
            let _ = h.join();
        }
    }
}

fn fleet_reader(fds: Vec<i32>, st: Arc<FleetState>) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); fds.len()];
    let mut chunk = vec![0u8; 256 * 1024];
    while !st.stop.load(Ordering::Relaxed) {
        // SAFETY: poll(2) on descriptors the Fleet keeps open while this thread runs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
        if r <= 0 {
            continue;
        }
        let mut members = st.members.lock().unwrap();
        for (i, p) in pfds.iter_mut().enumerate() {
            if p.revents == 0 || p.fd < 0 {
                continue;
            }
            p.revents = 0;
            let m = &mut members[i];
            // SAFETY: recv(2) into our buffer, at most its length.
            let n = unsafe {
                libc::recv(
                    p.fd,
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                m.closed = true;
                p.fd = -1;
                continue;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                    m.closed = true;
                    p.fd = -1;
                }
                continue;
            }
            let n = n as usize;
            m.bytes += n as u64;
            let b = &mut bufs[i];
            b.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            while let Some(j) = memchr::memchr(0x0A, &b[start..]) {
                let f = &b[start..start + j];
                start += j + 1;
                let (op, data) = match f.split_first() {
                    Some((&op, d)) => (op, d),
                    None => (0x00, &[][..]),
                };
                m.ops[(op as usize).min(15)] += 1;
                if op == 0x07 {
                    m.last_pong.clear();
                    m.last_pong.extend_from_slice(data);
                } else if m.kept.len() < KEEP {
                    m.kept.push((op, data.to_vec()));
                }
            }
            b.drain(..start);
            if b.capacity() > 1024 * 1024 && b.len() < 1024 {
                b.shrink_to_fit();
            }
        }
        drop(members);
        st.cv.notify_all();
    }
}

/// A TCP pinger on a thread of its own (an identified shim that only pings and reads).
struct Pinger {
    stop: Arc<AtomicBool>,
    h: JoinHandle<Seen>,
}

impl Pinger {
    fn spawn(srv: &Server, name: &str) -> Pinger {
        let tcp = shim(srv, name);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = thread::spawn(move || {
            let mut w = tcp.s.try_clone().unwrap();
            tcp.s
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut r = Reader::new(tcp.s.try_clone().unwrap());
            let mut seen = Seen::default();
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) || seen.rtts.len() < MIN_PINGS {
                seq += 1;
                let tag = format!("ping{seq}").into_bytes();
                let t = Instant::now();
                if w.write_all(&frame(0x06, &tag)).is_err() {
                    seen.closed = true;
                    return seen;
                }
                let got = r.until(|op, d| {
                    if op == 0x07 && d == &tag[..] {
                        return false;
                    }
                    seen.other_count += 1;
                    true
                });
                if !got {
                    seen.closed = true;
                    return seen;
                }
                seen.rtts.push(t.elapsed());
                thread::sleep(PING_EVERY);
            }
            seen
        });
        Pinger { stop, h }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.h.join().unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// UDP helpers
// ---------------------------------------------------------------------------------------

/// A UDP pinger on a thread of its own. UDP is lossy (and a full send queue drops), so a
/// round resends its Ping every 50 ms until a Pong of that round comes back; the round
/// trip timed is from the round's first Ping to its first Pong.
struct UdpPinger {
    stop: Arc<AtomicBool>,
    h: JoinHandle<Seen>,
}

impl UdpPinger {
    fn spawn(u: Udp) -> UdpPinger {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = thread::spawn(move || {
            u.s.set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            let mut seen = Seen::default();
            let mut b = vec![0u8; 65536];
            let mut round = 0u64;
            while !s.load(Ordering::Relaxed) || seen.rtts.len() < MIN_PINGS {
                round += 1;
                let prefix = format!("r{round}.");
                let t0 = Instant::now();
                let mut tries = 0u64;
                'round: loop {
                    tries += 1;
                    u.send(0x06, format!("{prefix}{tries}").as_bytes());
                    let sent = Instant::now();
                    while sent.elapsed() < Duration::from_millis(50) {
                        if let Ok((n, _)) = u.s.recv_from(&mut b) {
                            let d = &b[..n];
                            if d.len() > prefix.len() + 1
                                && d[0] == 0x07
                                && d[1..].starts_with(prefix.as_bytes())
                            {
                                seen.rtts.push(t0.elapsed());
                                break 'round;
                            }
                            seen.other_count += 1;
                        }
                    }
                    if t0.elapsed() > DEADLINE {
                        seen.stuck = true;
                        return seen;
                    }
                }
                seen.floods += tries - 1; // resends
                thread::sleep(PING_EVERY);
            }
            seen
        });
        UdpPinger { stop, h }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.h.join().unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// 1. One write disconnects everyone
// ---------------------------------------------------------------------------------------

/// A 64-byte identity: each delivered `08 3E 20 0A` becomes 67 bytes, so the 16,384
/// frames of one 64 KiB read make 1.07 MiB for each bystander, past the default
/// `outbound_limit` if the whole read is queued before anything is flushed.
const FLOOD_ID: &str = "abuse.flood.xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
const ECHO_ALL: [u8; 4] = [0x08, b'>', b' ', 0x0A];
const ONE_WRITE_FRAMES: usize = 65_536;
const ONE_WRITE_BYSTANDERS: usize = 20;

struct OneWrite {
    answers: Answers,
    seen: Vec<Seen>,
    elapsed: Duration,
    rss_start: u64,
    rss_peak: u64,
}

/// 20 bystanders each reading on a thread of its own; the flooder writes 256 KiB of
/// `08 3E 20 0A` in one write, then a Ping "done"; returns what everyone saw.
fn one_write(srv: &Server) -> OneWrite {
    assert_eq!(FLOOD_ID.len(), 64);
    let mut flooder = shim(srv, FLOOD_ID);
    let mut delivered = FLOOD_ID.as_bytes().to_vec();
    delivered.push(b' ');
    let bystanders: Vec<Bystander> = (0..ONE_WRITE_BYSTANDERS)
        .map(|i| {
            let t = shim(srv, &format!("abuse.one.b{i}"));
            Bystander::spawn(t, Some((0x08, delivered.clone())))
        })
        .collect();
    flooder.sync(b"ready");
    let rss_start = srv.rss_kib();
    let peak = RssPeak::start(srv);
    let answers = collect_answers(flooder.s.try_clone().unwrap(), b"done", false);
    let flood = repeated(&ECHO_ALL, ONE_WRITE_FRAMES);
    assert_eq!(flood.len(), 256 * 1024);
    let t = Instant::now();
    flooder.s.write_all(&flood).unwrap();
    flooder.send(0x06, b"done");
    let answers = answers.join().unwrap();
    let elapsed = t.elapsed();
    let seen: Vec<Seen> = bystanders.into_iter().map(Bystander::join).collect();
    let rss_peak = peak.finish();
    eprintln!(
        "one write: {} answers in {elapsed:?} ({} Acks, errors {:?}); RSS {rss_start} KiB -> \
         peak {rss_peak} KiB; bystanders cut: {}; max bystander RTT {:?}",
        answers.total(),
        answers.acks.len(),
        answers.errors,
        seen.iter().filter(|s| s.closed).count(),
        seen.iter().map(Seen::max_rtt).max().unwrap_or_default(),
    );
    // The flooder is still connected and its connection usable.
    assert!(!answers.closed, "the flooder was cut off");
    flooder.sync(b"still here");
    OneWrite {
        answers,
        seen,
        elapsed,
        rss_start,
        rss_peak,
    }
}

fn assert_bystanders_not_cut(seen: &[Seen]) {
    let cut = seen.iter().filter(|s| s.closed || s.stuck).count();
    assert_eq!(
        cut,
        0,
        "{cut} of {} bystanders were cut off (or never answered)",
        seen.len()
    );
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.other_count, 0, "bystander {i} got {:?}", s.others);
    }
}

/// With the default limits: the flooder is answered once per frame, in order: the first
/// 200 (the routed bucket) with Acks, then rate-limit Errors (with Acks where the bucket
/// refilled meanwhile); every bystander gets exactly the Echoes acknowledged, and none is
/// cut.
fn one_write_with_default_limits(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &[]);
    let ow = one_write(&srv);
    assert_bystanders_not_cut(&ow.seen);
    for (i, s) in ow.seen.iter().enumerate() {
        assert!(
            s.max_rtt() < MAX_RTT,
            "bystander {i}: ping round trip {:?}",
            s.max_rtt()
        );
    }
    let a = &ow.answers;
    a.assert_no_others();
    assert_eq!(a.total(), ONE_WRITE_FRAMES, "one answer per Echo");
    let expect_ack = format!("0 {ONE_WRITE_BYSTANDERS}").into_bytes();
    for (i, ack) in a.acks.iter().enumerate() {
        assert_eq!(text(ack), text(&expect_ack), "Ack {i}");
    }
    let first_error = a.first_error().expect("no rate-limit Error at all");
    assert!(
        first_error >= ROUTED_PER_SEC as usize,
        "Error at answer {first_error}, within the first {ROUTED_PER_SEC} (the bucket)"
    );
    a.assert_errors_in(&[routed_error(ROUTED_PER_SEC)]);
    let acks = a.acks.len() as f64;
    let most = ROUTED_PER_SEC as f64 * (1.0 + ow.elapsed.as_secs_f64()) + 1.0;
    assert!(
        acks <= most,
        "{acks} Echoes allowed in {:?}: more than {most}",
        ow.elapsed
    );
    for (i, s) in ow.seen.iter().enumerate() {
        assert_eq!(
            s.floods,
            a.acks.len() as u64,
            "bystander {i} got another number of Echoes than were acknowledged"
        );
    }
    srv.wait_metric(r#"velium_refused_total{reason="rate_routed"}"#, |v| {
        v == a.error_count() as f64
    });
}

/// With the routing limits lifted: every bystander, reading promptly, receives all
/// 65,536 Echoes and none is cut (the read batch is processed in slices, and the flooder
/// is slowed while they drain); the server's RSS stays bounded and comes back.
fn one_write_with_limits_lifted(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &LIFTED);
    let ow = one_write(&srv);
    assert_bystanders_not_cut(&ow.seen);
    let a = &ow.answers;
    a.assert_no_others();
    assert_eq!(a.errors, BTreeMap::new(), "no limit, no Error");
    assert_eq!(a.total(), ONE_WRITE_FRAMES, "one Ack per Echo");
    let expect_ack = format!("0 {ONE_WRITE_BYSTANDERS}");
    assert!(a.acks.iter().all(|x| text(x) == expect_ack));
    for (i, s) in ow.seen.iter().enumerate() {
        assert_eq!(s.floods, ONE_WRITE_FRAMES as u64, "Echoes at bystander {i}");
    }
    // 21 outbound queues held to the 1 MiB outbound limit at most, whatever the slicing.
    let growth = ow.rss_peak.saturating_sub(ow.rss_start);
    assert!(
        growth < 32 * 1024,
        "server RSS grew by {growth} KiB during the flood"
    );
    wait_rss_below(&srv, ow.rss_start + 8 * 1024, "after the flood");
}

// ---------------------------------------------------------------------------------------
// 2. Many shims, one write of Commands to everyone
// ---------------------------------------------------------------------------------------

const MANY: usize = 400;
const COMMAND_ALL: [u8; 5] = [0x04, b'>', b' ', b'x', 0x0A];

/// 400 shims; one writes 64 KiB of Commands to `>` at once (13,107 Commands, 399
/// recipients each). With the default limits the deliveries bucket (20,000) lets about
/// 50 through (a Command is allowed while the bucket is not in debt and then charged its
/// 399 deliveries); every other Command gets one rate-limit Error. Nobody is cut; every
/// bystander receives exactly the Commands acknowledged, in order; RSS stays bounded and
/// returns.
fn many_shims_one_write_of_commands(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &[]);
    let mut fleet = Fleet::connect(&srv, "abuse.many", MANY - 2);
    let pinger = Pinger::spawn(&srv, "abuse.many.pinger");
    let mut flooder = shim(&srv, "abuse.many.flooder");
    let recipients = (MANY - 1) as u64;
    fleet.sync("ready");
    let rss_start = srv.rss_kib();
    let peak = RssPeak::start(&srv);
    let n = 64 * 1024 / COMMAND_ALL.len();
    let answers = collect_answers(flooder.s.try_clone().unwrap(), b"done", false);
    let t = Instant::now();
    flooder.s.write_all(&repeated(&COMMAND_ALL, n)).unwrap();
    flooder.send(0x06, b"done");
    let a = answers.join().unwrap();
    let elapsed = t.elapsed();
    fleet.sync("end");
    let rss_peak = peak.finish();
    let pings = pinger.finish();
    eprintln!(
        "many: {} answers in {elapsed:?} ({} Acks, errors {:?}); RSS {rss_start} KiB -> \
         peak {rss_peak} KiB; cut {}; pinger max RTT {:?}",
        a.total(),
        a.acks.len(),
        a.errors,
        fleet.closed().len(),
        pings.max_rtt()
    );
    fleet.assert_none_closed("after the Commands");
    pings.assert_fine("the pinger");
    assert!(!a.closed, "the flooder was cut off");
    flooder.sync(b"still here");
    a.assert_no_others();
    assert_eq!(a.total(), n, "one answer per Command");
    let ids: Vec<u64> = a
        .acks
        .iter()
        .map(|d| {
            let (id, count) = ack_count(d).unwrap_or_else(|| panic!("Ack {:?}", text(d)));
            assert_eq!(count, recipients, "Ack {:?}", text(d));
            id
        })
        .collect();
    let bucket = (DELIVERIES_PER_SEC / recipients) as usize;
    assert!(
        a.first_error().expect("no rate-limit Error at all") >= bucket,
        "refused within the first {bucket} Commands"
    );
    a.assert_errors_in(&[
        deliveries_error(DELIVERIES_PER_SEC),
        routed_error(ROUTED_PER_SEC),
    ]);
    let most = (DELIVERIES_PER_SEC as f64 * (elapsed.as_secs_f64() + 0.05) / recipients as f64)
        as usize
        + bucket
        + 2;
    assert!(
        ids.len() <= most,
        "{} Commands allowed in {elapsed:?}, more than {most}",
        ids.len()
    );
    for (i, m) in fleet.members().iter().enumerate() {
        let got: Vec<u64> = m
            .kept
            .iter()
            .filter(|(op, _)| *op == 0x04)
            .map(|(_, d)| {
                let s = text(d);
                let mut f = s.splitn(3, ' ');
                assert_eq!(f.next(), Some("abuse.many.flooder"));
                f.next().unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(got, ids, "Commands at bystander {i}, in order");
    }
    srv.wait_metric(r#"velium_refused_total{reason="rate_deliveries"}"#, |v| {
        v + srv.metric(r#"velium_refused_total{reason="rate_routed"}"#) == a.error_count() as f64
    });
    let growth = rss_peak.saturating_sub(rss_start);
    assert!(
        growth < 16 * 1024,
        "server RSS grew by {growth} KiB for one write of Commands"
    );
    wait_rss_below(&srv, rss_start + 4 * 1024, "after the Commands");
}

// ---------------------------------------------------------------------------------------
// 3. UDP flood
// ---------------------------------------------------------------------------------------

const UDP_FLEET: usize = 300;
const UDP_PINGERS: usize = 6;
const UDP_FLOOD_FOR: Duration = Duration::from_millis(1500);
/// UDP Commands the flooder sends at once, and how often.
const UDP_BURST: usize = 10;
const UDP_BURST_EVERY: Duration = Duration::from_millis(50);

/// 300 UDP-bound shims; one bound shim sends UDP Commands to `>` in bursts of 10 every
/// 50 ms for 1.5 s (each Command 306 datagrams out: about 61,000 a second), with the
/// routing limits lifted, so that what holds the server is how it sends datagrams (its
/// bounded UDP queue): unrelated shims' UDP Ping->Pong round trips stay well under a
/// second, nobody's TCP connection is cut, the server's RSS stays bounded and comes back,
/// and `velium_udp_dropped_total` is exported (it counts the datagrams dropped when the
/// queue was full; on loopback a send never has to wait, so whether any is dropped here
/// depends on the server, and the count is only reported). The rate is one a debug build
/// on one core sustains: past that, datagrams wait in the kernel ahead of anyone's Ping,
/// which no send queue can help.
fn udp_flood_is_bounded(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &LIFTED);
    let mut shims: Vec<(Tcp, Udp)> = Vec::with_capacity(UDP_FLEET);
    for i in 0..UDP_FLEET {
        let mut t = srv.tcp();
        let token = t.identify(&format!("abuse.udp.s{i}"));
        let u = srv.udp();
        udp_bind(&u, &token);
        shims.push((t, u));
    }
    let mut pingers = Vec::new();
    let mut pinger_tcp = Vec::new();
    for i in 0..UDP_PINGERS {
        let mut t = srv.tcp();
        let token = t.identify(&format!("abuse.udp.pinger{i}"));
        let u = srv.udp();
        udp_bind(&u, &token);
        pinger_tcp.push(t);
        pingers.push(u);
    }
    let mut flooder = srv.tcp();
    let token = flooder.identify("abuse.udp.flooder");
    let fu = srv.udp();
    udp_bind(&fu, &token);
    let rss_start = srv.rss_kib();
    let dropped_before = srv.metric("velium_udp_dropped_total");
    let peak = RssPeak::start(&srv);
    let pingers: Vec<UdpPinger> = pingers.into_iter().map(UdpPinger::spawn).collect();
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < UDP_FLOOD_FOR {
        let burst = Instant::now();
        for _ in 0..UDP_BURST {
            fu.send_raw(&COMMAND_ALL);
        }
        sent += UDP_BURST as u64;
        thread::sleep(UDP_BURST_EVERY.saturating_sub(burst.elapsed()));
    }
    let seen: Vec<Seen> = pingers.into_iter().map(UdpPinger::finish).collect();
    let rss_peak = peak.finish();
    let dropped = srv.metric("velium_udp_dropped_total") - dropped_before;
    eprintln!(
        "udp flood: {sent} Commands in {:?}; dropped {dropped}; RSS {rss_start} KiB -> peak \
         {rss_peak} KiB; pinger rounds {:?}, max round trips {:?}",
        t.elapsed(),
        seen.iter().map(|s| s.rtts.len()).collect::<Vec<_>>(),
        seen.iter().map(Seen::max_rtt).collect::<Vec<_>>(),
    );
    for (i, s) in seen.iter().enumerate() {
        s.assert_fine(&format!("UDP pinger {i}"));
    }
    let (_, metrics) = srv.get("/metrics");
    assert!(
        metrics.contains("\nvelium_udp_dropped_total "),
        "velium_udp_dropped_total is not exported"
    );
    let growth = rss_peak.saturating_sub(rss_start);
    assert!(
        growth < 16 * 1024,
        "server RSS grew by {growth} KiB during the UDP flood"
    );
    // Nobody's TCP connection suffered, and the flooder's UDP channel still works.
    for (i, (t, _)) in shims.iter_mut().enumerate() {
        t.sync(format!("tcp{i}").as_bytes());
    }
    for t in &mut pinger_tcp {
        t.sync(b"tcp");
    }
    flooder.sync(b"tcp");
    udp_until(
        &fu,
        &[&frame(0x06, b"after")],
        |d| d == frame(0x07, b"after"),
        "flooder",
    );
    wait_rss_below(&srv, rss_start + 4 * 1024, "after the UDP flood");
}

// ---------------------------------------------------------------------------------------
// 4. Routing rate limit
// ---------------------------------------------------------------------------------------

const RATE_FLEET: usize = 20;
/// Commands the flooder writes, as fast as it can, 100 a write.
const RATE_COMMANDS: usize = 200_000;

/// A shim sends 200,000 Commands to `>` as fast as it can (reading its answers on another
/// thread). With the default limits it is answered once per Command: Acks for
/// about 200 a second (plus the first bucket), rate-limit Errors for the rest, all of
/// them counted in `velium_refused_total`; it stays connected; the bystanders receive
/// exactly the Commands acknowledged, and their ping round trips stay short. The refusals
/// are logged at most once (per reason) for the shim.
fn routing_rate_limit(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &[]);
    let mut fleet = Fleet::connect(&srv, "abuse.lim", RATE_FLEET);
    let pinger = Pinger::spawn(&srv, "abuse.lim.pinger");
    let mut flooder = shim(&srv, "abuse.lim.flooder");
    let recipients = RATE_FLEET as u64 + 1;
    fleet.sync("ready");
    let log_start = srv.log_lines().len();
    let answers = collect_answers(flooder.s.try_clone().unwrap(), b"done", false);
    let batch = repeated(&COMMAND_ALL, 100);
    let t = Instant::now();
    let mut sent = 0usize;
    while sent < RATE_COMMANDS {
        flooder.s.write_all(&batch).unwrap();
        sent += 100;
    }
    flooder.send(0x06, b"done");
    let a = answers.join().unwrap();
    // From the first Command to the last answer: the time the server took them in.
    let elapsed = t.elapsed();
    fleet.sync("end");
    let pings = pinger.finish();
    eprintln!(
        "rate: {sent} Commands in {elapsed:?}: {} Acks, errors {:?}; pinger max RTT {:?}",
        a.acks.len(),
        a.errors,
        pings.max_rtt()
    );
    fleet.assert_none_closed("after the flood");
    pings.assert_fine("the pinger");
    assert!(!a.closed, "the flooder was cut off");
    flooder.sync(b"still here");
    a.assert_no_others();
    assert_eq!(a.total(), sent, "one answer per Command");
    assert!(a.error_count() > 0, "no rate-limit Error at all");
    a.assert_errors_in(&[
        routed_error(ROUTED_PER_SEC),
        deliveries_error(DELIVERIES_PER_SEC),
    ]);
    let first_error = a.first_error().unwrap();
    assert!(
        first_error >= ROUTED_PER_SEC as usize,
        "refused at Command {first_error}, within the first bucket"
    );
    let most = ROUTED_PER_SEC as f64 * (1.0 + elapsed.as_secs_f64() + 0.1) + 1.0;
    assert!(
        (a.acks.len() as f64) <= most,
        "{} Commands allowed in {elapsed:?}, more than {most}",
        a.acks.len()
    );
    for d in &a.acks {
        assert_eq!(ack_count(d).map(|x| x.1), Some(recipients), "{:?}", text(d));
    }
    for (i, m) in fleet.members().iter().enumerate() {
        assert_eq!(
            m.ops[0x04],
            a.acks.len() as u64,
            "Commands at bystander {i}"
        );
    }
    srv.wait_metric(r#"velium_refused_total{reason="rate_routed"}"#, |v| {
        v + srv.metric(r#"velium_refused_total{reason="rate_deliveries"}"#)
            == a.error_count() as f64
    });
    let rate_lines: Vec<String> = srv.log_lines()[log_start..]
        .iter()
        .filter(|l| l.to_ascii_lowercase().contains("rate"))
        .cloned()
        .collect();
    assert!(
        rate_lines.len() <= 2,
        "{} log lines about rate limits for one shim in {elapsed:?}: {:?}",
        rate_lines.len(),
        &rate_lines[..rate_lines.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------
// 5. Who flood
// ---------------------------------------------------------------------------------------

const WHO_FLEET: usize = 300;

/// 300 shims connected, `--who-per-sec 5`; one shim that reads writes 64 KiB of Who
/// (32,768) in one write, another that does not read writes the same followed by an
/// Echo. The reader is answered once per Who: a listing of every shim and its Ack for the
/// first five (the Who bucket), rate-limit Errors for the others. The server's CPU work
/// for the non-reader stops at once (it is answered the same way, or cut as a slow
/// consumer, and then none of its remaining input is processed: its Echo reaches
/// nobody). Bystanders are never cut and their pings stay fast throughout.
fn who_flood(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &["--who-per-sec", &WHO_PER_SEC.to_string()]);
    let mut fleet = Fleet::connect(&srv, "abuse.whofleet", WHO_FLEET);
    let pinger = Pinger::spawn(&srv, "abuse.who.pinger");
    let mut reader = shim(&srv, "abuse.who.reader");
    let mut mute = shim(&srv, "abuse.who.mute");
    let shims = WHO_FLEET as u64 + 3;
    fleet.sync("ready");
    reader.sync(b"ready");
    let n = 64 * 1024 / 2;
    let whos = repeated(&[0x0D, 0x0A], n);

    // The reader.
    let answers = collect_answers(reader.s.try_clone().unwrap(), b"done", true);
    let t = Instant::now();
    reader.s.write_all(&whos).unwrap();
    reader.send(0x06, b"done");
    let a = answers.join().unwrap();
    let reader_took = t.elapsed();
    eprintln!(
        "who: reader answered in {reader_took:?} ({}cut): {} answers, {} listings, errors {:?}",
        if a.closed { "" } else { "not " },
        a.total(),
        a.listings.len(),
        a.errors,
    );

    // The shim that does not read: the same Whos, then an Echo to everyone, in one write.
    let cpu_before = cpu_ticks(&srv);
    let mut burst = whos.clone();
    burst.extend_from_slice(&frame(0x08, b"abuse.whofleet.* after the whos"));
    let t = Instant::now();
    mute.s.write_all(&burst).unwrap();
    // The server's CPU work stops: a 300 ms window in which it uses at most 50 ms of CPU
    // begins within a second (looked for during 3 s).
    let mut quiet_at = None;
    while quiet_at.is_none() && t.elapsed() < Duration::from_secs(3) {
        let (c0, t0) = (cpu_ticks(&srv), Instant::now());
        thread::sleep(Duration::from_millis(300));
        if cpu_ticks(&srv) - c0 <= 5 {
            quiet_at = Some(t0 - t);
        }
    }
    let cpu_used = cpu_ticks(&srv) - cpu_before;
    let pings = pinger.finish();
    eprintln!(
        "who: mute shim: quiet after {quiet_at:?}, {cpu_used} ticks of CPU in {:?}; pinger max \
         RTT {:?}; bystanders cut {}",
        t.elapsed(),
        pings.max_rtt(),
        fleet.closed().len()
    );
    fleet.assert_none_closed("after the Whos");
    pings.assert_fine("the pinger");
    assert!(
        quiet_at.is_some_and(|q| q < Duration::from_secs(1)),
        "the server kept working ({cpu_used} ticks of CPU, no quiet 300 ms within a second) \
         for 64 KiB of Who from a shim that does not read"
    );

    assert!(!a.closed, "the reading Who sender was cut off");
    reader.sync(b"still here");
    a.assert_no_others();
    assert_eq!(a.total(), n, "one answer per Who");
    assert!(
        a.order[..WHO_PER_SEC as usize].iter().all(|&x| x),
        "the first {WHO_PER_SEC} Whos (the bucket) are answered with listings"
    );
    for (entries, ack) in &a.listings {
        assert_eq!(*entries, shims, "WhoEntry frames in a listing");
        assert_eq!(text(ack), format!("0 {shims}"));
    }
    let most = WHO_PER_SEC as f64 * (1.0 + reader_took.as_secs_f64()) + 1.0;
    assert!(
        (a.listings.len() as f64) <= most,
        "{} listings in {reader_took:?}, more than {most}",
        a.listings.len()
    );
    a.assert_errors_in(&[who_error(WHO_PER_SEC), routed_error(ROUTED_PER_SEC)]);

    // Now the mute shim reads what it was sent: either every answer, in order, and its
    // Echo was routed; or it was cut as a slow consumer, and its Echo reached nobody.
    mute.s
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let m = collect_answers(mute.s.try_clone().unwrap(), b"mute done", true);
    let _ = mute.s.write_all(&frame(0x06, b"mute done"));
    let m = m.join().unwrap();
    fleet.sync("end");
    let echoed = fleet
        .members()
        .iter()
        .filter(|x| {
            x.kept
                .iter()
                .any(|(op, d)| *op == 0x08 && d.ends_with(b"after the whos"))
        })
        .count();
    if m.closed {
        srv.wait_log(&["close", "identity=abuse.who.mute", "slow consumer"]);
        assert_eq!(echoed, 0, "input after the cut was processed");
    } else {
        assert_eq!(m.total(), n + 1, "one answer per Who, and the Echo's");
        // The Echo may itself be refused (the Whos count as routed frames).
        let expect = if m.order[n] { WHO_FLEET } else { 0 };
        assert_eq!(
            echoed, expect,
            "the Echo after the Whos (answered {:?})",
            m.order[n]
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Buffers keep their peak
// ---------------------------------------------------------------------------------------

const BUF_FLEET: usize = 200;
const BUF_BURST: usize = 150_000;

/// 200 shims each send 150 KB of Pings in one write and leave one byte of a frame
/// unfinished, reading their Pongs. Afterwards the server's RSS must be back within 8 KiB
/// per shim of what it was with the same shims idle: no 64 KiB read buffer, partial-frame
/// buffer or outbound queue is kept per shim.
fn buffers_shrink_after_a_burst(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &[]);
    let mut fleet = Fleet::connect(&srv, "abuse.buf", BUF_FLEET);
    fleet.sync("idle");
    let rss_idle = srv.rss_kib();
    let ping = frame(0x06, b"0123456789abcd");
    assert_eq!(BUF_BURST % ping.len(), 0);
    let per = BUF_BURST / ping.len();
    let mut burst = repeated(&ping, per);
    burst.push(0x06); // the unfinished frame
    let t = Instant::now();
    for s in &mut fleet.streams {
        s.write_all(&burst).unwrap();
    }
    fleet.wait_all("every Pong of the burst", |m| m.ops[0x07] == 1 + per as u64);
    let took = t.elapsed();
    fleet.assert_none_closed("after the bursts");
    let limit = rss_idle + 8 * BUF_FLEET as u64;
    let end = Instant::now() + DEADLINE;
    let rss = loop {
        let rss = srv.rss_kib();
        if rss <= limit || Instant::now() > end {
            break rss;
        }
        thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "buffers: bursts answered in {took:?}; RSS idle {rss_idle} KiB, after {rss} KiB \
         ({} KiB per shim)",
        (rss as i64 - rss_idle as i64) / BUF_FLEET as i64
    );
    assert!(
        rss <= limit,
        "server RSS {rss} KiB after the bursts, {} KiB per shim more than idle ({rss_idle} KiB)",
        (rss - rss_idle) / BUF_FLEET as u64
    );
    // The unfinished frames are still waiting, and complete normally.
    for s in &mut fleet.streams {
        s.write_all(b"end\n").unwrap();
    }
    fleet.wait_all("the Pongs of the completed frames", |m| {
        m.last_pong == b"end"
    });
    fleet.assert_none_closed("at the end");
}

// ---------------------------------------------------------------------------------------
// 7. Frame ends: UDP without 0A, CRLF over TCP
// ---------------------------------------------------------------------------------------

/// Over UDP a datagram is its own frame: the 17-byte bind (`02` and the token, no `0A`,
/// as the original Go server took it) binds, and a Ping without its `0A` is answered.
fn udp_datagram_needs_no_newline(io: &str) {
    let srv = server(io, &[]);
    let mut a = srv.tcp();
    let token = a.identify("abuse.ends.a");
    let u = srv.udp();
    let mut bind = vec![0x02];
    bind.extend_from_slice(&token);
    assert_eq!(bind.len(), 17);
    udp_until(
        &u,
        &[&bind, &frame(0x06, b"bound")],
        |d| d == frame(0x07, b"bound"),
        "Pong after a 17-byte bind",
    );
    udp_until(
        &u,
        &[b"\x06bare"],
        |d| d == frame(0x07, b"bare"),
        "Pong to `06 bare`",
    );

    a.sync(b"tcp");
}

/// The CR dropped before a trailing `0A` must never be a token's last byte: either no
/// token holds `0D`, or a token ending in `0D` binds with the 18-byte bind (`02`, the
/// token, `0A`). Looked for in up to 2,048 sessions (about one token in 256 would end in
/// `0D` if tokens could hold it).
fn udp_bind_of_a_token_ending_in_0d(io: &str) {
    let _heavy = heavy();
    let srv = server(io, &[]);
    let mut holding_0d = 0;
    for i in 0..2048 {
        let mut t = srv.tcp();
        let token = t.identify(&format!("abuse.cr.s{i}"));
        holding_0d += token.contains(&0x0D) as usize;
        if token[15] == 0x0D {
            let u = srv.udp();
            udp_bind(&u, &token);
            t.sync(b"tcp");
            return;
        }
    }
    assert_eq!(
        holding_0d, 0,
        "tokens hold 0D, yet none of 2048 ended in it"
    );
}

/// Over TCP `0D 0A` ends a frame like `0A`, the CR dropped: a Windows shim's Identify
/// `peq.z.bob` CR LF gets a Session and is listed as `peq.z.bob`, its Ping `hi` CR LF gets
/// the Pong `hi`, and its Echo arrives without the CR. Who, whose opcode is `0D`, still
/// works as `0D 0A` (that CR is the opcode) and as `0D 0D 0A`.
fn crlf_ends_a_tcp_frame(io: &str) {
    let srv = server(io, &[]);
    let mut a = shim(&srv, "abuse.ends.a");
    let mut bob = srv.tcp();
    bob.send_raw(b"\x01peq.z.bob\r\n");
    assert_eq!(bob.expect(0x02).len(), 16, "Session after a CRLF Identify");
    bob.expect_terms();
    bob.send_raw(b"\x06hi\r\n");
    bob.expect_frame(0x07, b"hi");
    for who in [&b"\x0D\n"[..], b"\x0D\r\n"] {
        bob.send_raw(who);
        let mut entries = Vec::new();
        loop {
            let (op, d) = bob.recv();
            if op == 0x0C {
                assert_eq!(text(&d), "0 2", "Who {who:?}");
                break;
            }
            assert_eq!(op, 0x0E, "{:?}", text(&d));
            entries.push(text(&d));
        }
        let names: Vec<&str> = entries
            .iter()
            .map(|e| e.split(' ').next().unwrap())
            .collect();
        assert!(
            names.contains(&"peq.z.bob"),
            "Who {who:?} lists {entries:?}"
        );
        assert!(
            names.contains(&"abuse.ends.a"),
            "Who {who:?} lists {entries:?}"
        );
    }
    // Routed frames lose their CR too.
    bob.send_raw(b"\x08abuse.ends.a hello\r\n");
    bob.expect_frame(0x0C, b"0 1");
    a.expect_frame(0x08, b"peq.z.bob hello");
}

// ---------------------------------------------------------------------------------------
// Write deadline
// ---------------------------------------------------------------------------------------

/// A shim that stops reading while megabytes are queued for it is cut as a slow consumer
/// once its output has made no progress for `write_deadline`, although its queue is far
/// below `outbound_limit`; a shim that reads slowly but keeps reading is not.
fn write_deadline_cuts_a_stalled_reader(io: &str) {
    let _heavy = heavy();
    let srv = server(
        io,
        &["--write-deadline", "500ms", "--outbound-limit", "67108864"],
    );
    let ping = frame(0x06, &[b'p'; 16000]);
    // 6.4 MB of Pongs: more than loopback's socket buffers hold (about 4 MB).
    let burst = repeated(&ping, 400);
    let stalled = shim(&srv, "abuse.deadline.stalled");
    let mut slow = shim(&srv, "abuse.deadline.slow");
    let mut w = stalled.s.try_clone().unwrap();
    let b = burst.clone();
    let writer = thread::spawn(move || {
        let _ = w.write_all(&b);
    });
    // The slow reader reads everything there is every 150 ms.
    let mut ws = slow.s.try_clone().unwrap();
    let b = burst.clone();
    let slow_writer = thread::spawn(move || ws.write_all(&b).is_ok());
    slow.s
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut r = Reader::new(slow.s.try_clone().unwrap());
    let (mut pongs, mut closed) = (0usize, false);
    let t = Instant::now();
    while pongs < 400 && !closed && t.elapsed() < DEADLINE {
        thread::sleep(Duration::from_millis(150));
        loop {
            r.frames(|op, _| {
                if op == 0x07 {
                    pongs += 1;
                }
                true
            });
            match r.fill() {
                Fill::Data => {}
                Fill::Closed => {
                    closed = true;
                    break;
                }
                Fill::Idle => break,
            }
        }
    }
    r.frames(|op, _| {
        pongs += (op == 0x07) as usize;
        true
    });
    srv.wait_log(&["close", "identity=abuse.deadline.stalled", "slow consumer"]);
    let _ = writer.join();
    assert!(
        slow_writer.join().unwrap(),
        "the slow reader's writes failed"
    );
    assert!(!closed, "the slow but steady reader was cut off");
    assert_eq!(pongs, 400, "Pongs at the slow reader");
    slow.sync(b"still here");
    assert!(srv.metric("velium_slow_consumers_total") >= 1.0);
    drop(stalled);
}

// ---------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------

/// The limits are TOML keys, and a reload applies them: the routed bucket, the
/// deliveries bucket (a frame is allowed while the bucket is not in debt, then charged
/// its real count, so one Echo to more shims than the limit still goes) and the Who
/// bucket, each refusing with its own text.
fn limits_are_reloadable(io: &str) {
    let dir = std::env::temp_dir().join(format!("velium-abuse-{}-{io}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("limits.toml");
    let base = format!("listen = \"127.0.0.1:0\"\ncores = 2\nio = \"{io}\"\n");
    std::fs::write(&cfg, format!("{base}routed_per_sec = 3\n")).unwrap();
    let srv = Server::spawn(&[
        "--config",
        cfg.to_str().unwrap(),
        "--admin",
        "127.0.0.1:0",
        "--connect-rate-per-source",
        "0",
    ]);
    let mut s = shim(&srv, "abuse.reload.sender");
    let mut others: Vec<Tcp> = (0..3)
        .map(|i| shim(&srv, &format!("abuse.reload.o{i}")))
        .collect();

    // routed_per_sec = 3: of 6 Echoes in one write, 3 go.
    s.send_raw(&repeated(&frame(0x08, b"abuse.reload.o0 hi"), 6));
    for _ in 0..3 {
        s.expect_frame(0x0C, b"0 1");
    }
    for _ in 0..3 {
        assert_eq!(s.expect_error("rate limit"), routed_error(3));
    }
    for _ in 0..3 {
        others[0].expect_frame(0x08, b"abuse.reload.sender hi");
    }
    others[0].sync(b"o0");
    srv.wait_metric(r#"velium_refused_total{reason="rate_routed"}"#, |v| {
        v == 3.0
    });

    // deliveries_per_sec = 2: an Echo to three shims goes (the bucket was not in debt),
    // the next does not.
    std::fs::write(
        &cfg,
        format!("{base}routed_per_sec = 0\ndeliveries_per_sec = 2\n"),
    )
    .unwrap();
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("deliveries_per_sec"), "{body}");
    s.send_raw(&repeated(&frame(0x08, b"abuse.reload.* hi"), 2));
    s.expect_frame(0x0C, b"0 3");
    assert_eq!(s.expect_error("rate limit"), deliveries_error(2));
    for o in &mut others {
        o.expect_frame(0x08, b"abuse.reload.sender hi");
        o.sync(b"one Echo only");
    }
    srv.wait_metric(r#"velium_refused_total{reason="rate_deliveries"}"#, |v| {
        v == 1.0
    });

    // who_per_sec = 2: of 3 Whos, 2 are listed.
    std::fs::write(
        &cfg,
        format!("{base}routed_per_sec = 0\ndeliveries_per_sec = 0\nwho_per_sec = 2\n"),
    )
    .unwrap();
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    s.send_raw(&repeated(&[0x0D, 0x0A], 3));
    for _ in 0..2 {
        for _ in 0..4 {
            s.expect(0x0E);
        }
        s.expect_frame(0x0C, b"0 4");
    }
    assert_eq!(s.expect_error("rate limit"), who_error(2));
    srv.wait_metric(r#"velium_refused_total{reason="rate_who"}"#, |v| v == 1.0);
    s.sync(b"still here");
    let _ = std::fs::remove_dir_all(&dir);
}

drivers!(
    one_write_with_default_limits,
    one_write_with_limits_lifted,
    many_shims_one_write_of_commands,
    udp_flood_is_bounded,
    routing_rate_limit,
    who_flood,
    buffers_shrink_after_a_burst,
    udp_datagram_needs_no_newline,
    udp_bind_of_a_token_ending_in_0d,
    crlf_ends_a_tcp_frame,
    write_deadline_cuts_a_stalled_reader,
    limits_are_reloadable,
);
