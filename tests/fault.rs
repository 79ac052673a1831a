//! Faults, all at once: while eight well-behaved shims exchange numbered Commands and
//! Echoes, other threads churn hundreds of shims (Quit, plain close, never identifying),
//! kill shims mid-frame, starve one shim until it is cut off as a slow consumer, flood
//! the server with Echoes and Commands, and throw garbage at it over TCP and UDP.
//!
//! At the end every well-behaved shim must have received every message addressed to it,
//! in order, every Command it sent must have its Ack and every response, the server must
//! still run, and its `velium_connections` gauge must be back to exactly the eight.
//!
//! Determinism: nothing here depends on timing except how many rounds the well-behaved
//! shims get through, and every check holds for any number of rounds. The shims that must
//! not be cut off as slow consumers bound what they have in flight (a window of unread
//! frames far below `--outbound-limit`), so however the threads are scheduled their
//! queues cannot reach it; only the shim that never reads can. Likewise each bounds the
//! responses it is owed, so no target ever has more unanswered Commands queued than the
//! hub's answer window, and every answer is one the hub accepts. Garbage comes from seeded
//! generators, so every run sends the same bytes. UDP is lossy even on loopback (a full
//! socket buffer drops datagrams), so every UDP exchange a check relies on is retried.

mod common;
use common::*;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The well-behaved shims.
const GOOD: usize = 8;
/// Rounds each well-behaved shim runs at least, faults or not.
const MIN_ROUNDS: u64 = 100;
/// Requests a well-behaved shim may have awaiting their Ack.
const WINDOW: usize = 16;
/// Responses a well-behaved shim may be owed for its Commands. A shim may answer only one
/// of the last `answer_window` (256) Commands the hub sent it, and a target answers in
/// the order it reads, so each target must never have more unanswered Commands than that
/// queued for it: at most this many from each of the other seven, plus the churning
/// shims' (two per thread per target), 7 * 32 + 8 = 232.
const OWED: u64 = 32;
/// The server's `--outbound-limit` for the test: low, so the shim that never reads is cut
/// off after a few hundred kilobytes.
const OUTBOUND_LIMIT: &str = "65536";
/// The server's `--max-frame` (its default), which the oversized frames exceed.
const MAX_FRAME: usize = 16384;
/// Frames the flooder may have sent that its sink has not read yet, or that it has not
/// read the Ack of. Delivered flood frames are under 40 bytes, so this keeps the sink's
/// and the flooder's queues below 40 KiB, under the outbound limit.
const FLOOD_WINDOW: u64 = 1024;
/// Frames the flooder writes at once.
const FLOOD_BATCH: u64 = 128;
/// Frames the flooder sends at least.
const MIN_FLOOD: u64 = 20_000;
/// Churning shims per thread, and churn threads.
const CHURN: usize = 80;
const CHURN_THREADS: usize = 4;
/// Shims killed in the middle of a frame.
const HALF: usize = 60;

fn good_name(i: usize) -> String {
    format!("fault.good.g{i}")
}

fn text(d: &[u8]) -> String {
    String::from_utf8_lossy(d).into_owned()
}

/// Splits `data` at its first space.
fn split_sp(d: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = d.iter().position(|&b| b == b' ')?;
    Some((&d[..i], &d[i + 1..]))
}

// ---------------------------------------------------------------------------------------
// Helpers: a frame reader for floods, counters to wait on, UDP with retries
// ---------------------------------------------------------------------------------------

/// Reads frames from a socket. The harness's `Tcp` moves its buffer down by every frame
/// it takes, which costs a flood's thousands of small frames per read dearly; this one
/// walks the buffer and moves it once per read.
struct Frames {
    s: TcpStream,
    buf: Vec<u8>,
    start: usize,
}

impl Frames {
    fn new(s: TcpStream) -> Frames {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Frames {
            s,
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
        }
    }

    /// Hands every frame to `on_frame` until it returns false (then true is returned) or
    /// the connection ends (false). `before_read` runs each time the frames read so far
    /// are used up, before waiting for more: where progress is published.
    fn each(
        &mut self,
        mut on_frame: impl FnMut(u8, &[u8]) -> bool,
        mut before_read: impl FnMut(),
    ) -> bool {
        loop {
            while let Some(i) = self.buf[self.start..].iter().position(|&b| b == 0x0A) {
                let f = &self.buf[self.start..self.start + i];
                self.start += i + 1;
                let (op, data) = match f.split_first() {
                    Some((&op, data)) => (op, data),
                    None => (0x00, &[][..]),
                };
                if !on_frame(op, data) {
                    return true;
                }
            }
            before_read();
            self.buf.drain(..self.start);
            self.start = 0;
            let len = self.buf.len();
            self.buf.resize(len + 64 * 1024, 0);
            match self.s.read(&mut self.buf[len..]) {
                Ok(0) => return false,
                Ok(n) => self.buf.truncate(len + n),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return false,
                Err(e) => panic!("no frame within {DEADLINE:?}: {e}"),
            }
        }
    }

    /// The next frame, or `None` when the connection ended.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut got = None;
        self.each(
            |op, d| {
                got = Some((op, d.to_vec()));
                false
            },
            || {},
        );
        got
    }
}

/// A count one thread raises and another waits on.
#[derive(Default)]
struct Counter {
    n: Mutex<u64>,
    cv: Condvar,
}

impl Counter {
    fn set(&self, v: u64) {
        *self.n.lock().unwrap() = v;
        self.cv.notify_all();
    }

    /// Waits until the count is at least `v`.
    fn wait_for(&self, v: u64, what: &str) {
        let end = Instant::now() + DEADLINE;
        let mut n = self.n.lock().unwrap();
        while *n < v {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what} stuck at {} of {v}", *n);
            n = self.cv.wait_timeout(n, left).unwrap().0;
        }
    }
}

/// The opcodes a server sends over TCP.
fn from_server(op: u8) -> bool {
    matches!(
        op,
        0x02 | 0x03 | 0x04 | 0x05 | 0x07 | 0x08 | 0x09 | 0x0C | 0x0E
    )
}

// ---------------------------------------------------------------------------------------
// The well-behaved shims
// ---------------------------------------------------------------------------------------

/// A request a well-behaved shim awaits the Ack of.
enum Req {
    Echo { reach: u64 },
    Command { m: u64, targets: Vec<usize> },
}

/// A well-behaved shim's state shared by its writer and reader threads.
struct Good {
    i: usize,
    /// The writing half, shared: the reader answers Commands through it.
    w: Mutex<TcpStream>,
    /// Requests in the order they were written, awaiting their Ack.
    pending: Mutex<VecDeque<Req>>,
    acked: Condvar,
    /// Responses still owed to this shim's Commands (see [`OWED`]).
    owed: Mutex<u64>,
    answered: Condvar,
    /// Set before the writer's last frame, so the reader sees it by that frame's Ack.
    writer_done: AtomicBool,
}

impl Good {
    /// Waits until `n` more responses may be owed to this shim, and counts them.
    fn owe(&self, n: u64) {
        let mut owed = self.owed.lock().unwrap();
        let end = Instant::now() + DEADLINE;
        while *owed + n > OWED {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "g{}: no responses within {DEADLINE:?}",
                self.i
            );
            owed = self.answered.wait_timeout(owed, left).unwrap().0;
        }
        *owed += n;
    }

    /// One response to this shim's Commands arrived.
    fn paid(&self) {
        let mut owed = self.owed.lock().unwrap();
        *owed = owed.checked_sub(1).expect("a response nobody owed");
        self.answered.notify_all();
    }

    fn write(&self, op: u8, data: &[u8]) {
        self.w.lock().unwrap().write_all(&frame(op, data)).unwrap();
    }

    /// Queues `req` and writes its frame, once fewer than [`WINDOW`] requests are
    /// unanswered.
    fn request(&self, req: Req, op: u8, data: &[u8], last: bool) {
        let mut p = self.pending.lock().unwrap();
        let end = Instant::now() + DEADLINE;
        while p.len() >= WINDOW {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "g{}: no Ack within {DEADLINE:?}", self.i);
            p = self.acked.wait_timeout(p, left).unwrap().0;
        }
        p.push_back(req);
        drop(p);
        if last {
            self.writer_done.store(true, Ordering::SeqCst);
        }
        self.write(op, data);
    }
}

/// What a well-behaved shim's writer sent: per receiver, (opcode, message number) in
/// order.
type Sent = Vec<Vec<(u8, u64)>>;

/// Sends rounds of numbered Echoes and Commands to the other well-behaved shims, one at a
/// time and to all of them, until `stop` (and at least [`MIN_ROUNDS`]); then an `end`
/// Echo to all. Every message carries `m`, the sender's running message number.
fn good_writer(g: &Good, stop: &AtomicBool) -> Sent {
    let i = g.i;
    let mut sent: Sent = vec![Vec::new(); GOOD];
    let others: Vec<usize> = (0..GOOD).filter(|&j| j != i).collect();
    let all = "fault.good.*";
    let mut m = 0u64;
    let mut k = 0u64;
    while k < MIN_ROUNDS || !stop.load(Ordering::SeqCst) {
        let p = (i + 1 + (k as usize) % (GOOD - 1)) % GOOD;
        let q = (i + 1 + (k as usize + 3) % (GOOD - 1)) % GOOD;
        let mut send = |op: u8, target: &str, to: Vec<usize>| {
            for &j in &to {
                sent[j].push((op, m));
            }
            let data = format!("{target} m{m}");
            let req = if op == 0x08 {
                Req::Echo {
                    reach: to.len() as u64,
                }
            } else {
                g.owe(to.len() as u64);
                Req::Command { m, targets: to }
            };
            g.request(req, op, data.as_bytes(), false);
            m += 1;
        };
        send(0x08, &good_name(p), vec![p]);
        send(0x04, &good_name(q), vec![q]);
        if k.is_multiple_of(8) {
            send(0x08, all, others.clone());
        }
        if k % 8 == 4 {
            send(0x04, all, others.clone());
        }
        k += 1;
    }
    g.request(
        Req::Echo {
            reach: others.len() as u64,
        },
        0x08,
        format!("{all} end").as_bytes(),
        true,
    );
    sent
}

/// What a well-behaved shim's reader saw.
struct Got {
    /// Per sender, (opcode, message number) in arrival order.
    got: Vec<Vec<(u8, u64)>>,
    /// Commands this shim sent, with their Acks and responses checked.
    commands: usize,
    frames: Frames,
}

/// Reads everything a well-behaved shim is sent: checks each Ack against the request it
/// answers, checks that deliveries from each other well-behaved shim come in order,
/// answers every Command, and collects the responses to its own Commands. Returns once
/// its writer is done and acknowledged, every other shim's `end` arrived, and every
/// Command it sent has all its responses.
fn good_reader(g: &Good, mut frames: Frames) -> Got {
    let i = g.i;
    let mut got: Vec<Vec<(u8, u64)>> = vec![Vec::new(); GOOD];
    let mut ended = [false; GOOD];
    ended[i] = true;
    // Acknowledged Commands: (id, message number, targets).
    let mut commands: Vec<(u64, u64, Vec<usize>)> = Vec::new();
    // Responses from well-behaved shims by command id: (responder, text).
    let mut responses: HashMap<u64, Vec<(usize, String)>> = HashMap::new();
    let good_index = |who: &[u8]| -> Option<usize> {
        text(who)
            .strip_prefix("fault.good.g")
            .and_then(|n| n.parse().ok())
    };
    let done = |commands: &[(u64, u64, Vec<usize>)],
                responses: &HashMap<u64, Vec<(usize, String)>>,
                ended: &[bool; GOOD]| {
        g.writer_done.load(Ordering::SeqCst)
            && g.pending.lock().unwrap().is_empty()
            && ended.iter().all(|&e| e)
            && commands
                .iter()
                .all(|(id, _, targets)| responses.get(id).map_or(0, |r| r.len()) >= targets.len())
    };
    let finished = frames.each(
        |op, data| {
            match op {
                0x0C => {
                    let (id, count) = split_sp(data).expect("Ack: ID SP COUNT");
                    let id: u64 = text(id).parse().expect("an Ack id");
                    let count: u64 = text(count).parse().expect("an Ack count");
                    let req = g
                        .pending
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or_else(|| panic!("g{i}: an Ack with no request"));
                    g.acked.notify_all();
                    match req {
                        Req::Echo { reach } => assert_eq!((id, count), (0, reach), "g{i}"),
                        Req::Command { m, targets } => {
                            assert!(id != 0, "g{i}: a Command's id is never 0");
                            assert_eq!(count, targets.len() as u64, "g{i}: command m{m}");
                            commands.push((id, m, targets));
                        }
                    }
                }
                0x04 | 0x08 => {
                    let (from, rest) = split_sp(data).expect("a delivery: FROM SP ...");
                    assert!(
                        !from.starts_with(b"fault.half."),
                        "g{i} got a frame a shim died in the middle of: {:?}",
                        text(data)
                    );
                    let (id, body) = if op == 0x04 {
                        let (id, body) = split_sp(rest).expect("a Command: FROM SP ID SP TEXT");
                        (Some(text(id)), body)
                    } else {
                        (None, rest)
                    };
                    match good_index(from) {
                        Some(s) if body == b"end" => {
                            assert_eq!(op, 0x08, "g{i}: end comes as an Echo");
                            assert!(!ended[s], "g{i}: two ends from g{s}");
                            ended[s] = true;
                        }
                        Some(s) => {
                            assert!(!ended[s], "g{i}: g{s} sent {:?} after its end", text(body));
                            let m: u64 = text(body)
                                .strip_prefix('m')
                                .and_then(|m| m.parse().ok())
                                .unwrap_or_else(|| panic!("g{i}: bad text {:?}", text(body)));
                            if let Some(&(_, last)) = got[s].last() {
                                assert!(m > last, "g{i}: m{m} from g{s} after m{last}");
                            }
                            got[s].push((op, m));
                            if let Some(id) = id {
                                g.write(0x05, format!("{id} r{m}").as_bytes());
                            }
                        }
                        // A churning shim's Command: answered too, though its sender
                        // is usually gone by then (the server drops the answer).
                        None => {
                            if let Some(id) = id {
                                g.write(0x05, format!("{id} hello").as_bytes());
                            }
                        }
                    }
                }
                0x05 => {
                    let (id, rest) = split_sp(data).expect("a response: ID SP FROM SP TEXT");
                    let (from, body) = split_sp(rest).expect("a response: ID SP FROM SP TEXT");
                    let id: u64 = text(id).parse().expect("a response id");
                    if let Some(s) = good_index(from) {
                        responses.entry(id).or_default().push((s, text(body)));
                        g.paid();
                    }
                }
                _ => panic!("g{i} got 0x{op:02X} {:?}", text(data)),
            }
            !done(&commands, &responses, &ended)
        },
        || {},
    );
    assert!(finished, "g{i}: the server closed the connection");
    // Every Command was answered once by each of its targets, with its own number.
    for (id, m, targets) in &commands {
        let mut r = responses.remove(id).unwrap_or_default();
        r.sort();
        let want: Vec<(usize, String)> = targets.iter().map(|&t| (t, format!("r{m}"))).collect();
        assert_eq!(r, want, "g{i}: responses to command {id} (m{m})");
    }
    assert!(
        responses.is_empty(),
        "g{i}: responses to no command of its own: {responses:?}"
    );
    Got {
        got,
        commands: commands.len(),
        frames,
    }
}

// ---------------------------------------------------------------------------------------
// The faults
// ---------------------------------------------------------------------------------------

/// Shims connecting and leaving in every way a client can: a clean Quit, a rename then a
/// Quit, a plain close with replies unread and a UDP binding, a Command left for a
/// well-behaved shim to answer after its sender is gone, a connection that never
/// identifies.
fn churn(srv: &Server, t: usize) {
    for k in 0..CHURN {
        let name = format!("fault.churn.t{t}k{k}");
        let mut c = srv.tcp();
        match k % 5 {
            0 => {
                c.identify(&name);
                c.send(0x03, b"");
                assert!(c.expect_closed().is_empty(), "{name}: frames after a Quit");
            }
            1 => {
                // An Echo to itself: its delivery and Ack are left unread.
                let token = c.identify(&name);
                let u = srv.udp();
                udp_bind(&u, &token);
                c.send(0x08, format!("+{name} leaving").as_bytes());
            }
            2 => {}
            3 => {
                // Once the Ack is back the Command is queued for the well-behaved shim,
                // ahead of anything sent after this thread ends.
                c.identify(&name);
                c.send(
                    0x04,
                    format!("{} /who-am-i", good_name(k % GOOD)).as_bytes(),
                );
                c.expect(0x0C);
            }
            _ => {
                c.identify(&name);
                c.send(0x01, format!("{name}.renamed").as_bytes());
                c.sync(b"renamed");
                c.send(0x03, b"");
                assert!(c.expect_closed().is_empty(), "{name}: frames after a Quit");
            }
        }
    }
}

/// Shims that write half a frame and vanish: half a Command to a well-behaved shim, half
/// an Echo to all of them, half an Identify; every other one resets the connection
/// (SO_LINGER 0, like a killed process with unread data) instead of closing it.
fn half_frames(srv: &Server) {
    for k in 0..HALF {
        let mut c = srv.tcp();
        let name = format!("fault.half.h{k}");
        match k % 3 {
            0 => {
                c.identify(&name);
                c.send_raw(format!("\x04{} /never-finish", good_name(k % GOOD)).as_bytes());
            }
            1 => {
                c.identify(&name);
                c.send_raw(b"\x08fault.good.* half an ec");
            }
            _ => c.send_raw(b"\x01fault.half.unfini"),
        }
        if k % 2 == 1 {
            socket2::SockRef::from(&c.s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
    }
}

/// One shim never reads while Echoes are routed to it and to a sibling that does: the
/// reader gets all of them in order, the other is cut off as a slow consumer, and the
/// sender is never held up.
fn slow_consumer(srv: &Server) {
    let mut slow = srv.tcp();
    slow.identify("fault.sub.slow");
    let mut fast = srv.tcp();
    fast.identify("fault.sub.fast");
    let mut tx = srv.tcp();
    tx.identify("fault.feeder");
    let payload = "x".repeat(8000);
    let seen = Counter::default();
    let mut acks = Frames::new(tx.s.try_clone().unwrap());
    let (sent, counts) = thread::scope(|s| {
        let fast_reader = s.spawn(|| {
            let mut n = 0u64;
            loop {
                let d = fast.expect(0x08);
                if d == b"fault.feeder end" {
                    return n;
                }
                let prefix = format!("fault.feeder {n:06} ");
                assert!(d.starts_with(prefix.as_bytes()), "frame {n} out of order");
                n += 1;
                seen.set(n);
            }
        });
        let ack_reader = s.spawn(move || {
            let mut counts = Vec::new();
            let ended = acks.each(
                |op, d| match op {
                    0x0C => {
                        let (_, n) = split_sp(d).expect("an Ack");
                        counts.push(text(n).parse::<u64>().unwrap());
                        true
                    }
                    0x07 if d == b"end" => false,
                    _ => panic!("the feeder got 0x{op:02X} {:?}", text(d)),
                },
                || {},
            );
            assert!(ended, "the feeder was closed");
            counts
        });
        // The reader is kept within four frames of the sender, so its queue stays far
        // below the limit however the threads are scheduled.
        let mut sent = 0u64;
        while srv.count_log(&["slow consumer cut off", "identity=fault.sub.slow"]) == 0 {
            assert!(sent < 5_000, "fault.sub.slow was never cut off");
            seen.wait_for(sent.saturating_sub(4), "the fast reader");
            tx.send(0x08, format!("fault.sub.* {sent:06} {payload}").as_bytes());
            sent += 1;
        }
        srv.wait_log(&["close", "identity=fault.sub.slow reason=slow consumer"]);
        tx.send(0x08, b"fault.sub.* end");
        tx.send(0x06, b"end");
        assert_eq!(fast_reader.join().unwrap(), sent);
        (sent, ack_reader.join().unwrap())
    });
    // Every Echo was acknowledged: to both until the cut, then to the reader alone.
    assert_eq!(counts.len() as u64, sent + 1);
    let cut = counts
        .iter()
        .position(|&n| n == 1)
        .expect("an Ack after the cut");
    assert!(counts[..cut].iter().all(|&n| n == 2), "{counts:?}");
    assert!(counts[cut..].iter().all(|&n| n == 1), "{counts:?}");
    // The slow one was closed without an Error or Quit: it can read an in-order prefix of
    // the Echoes, then the end of the connection.
    let rest = slow.expect_closed();
    for (n, (op, d)) in rest.iter().enumerate() {
        assert_eq!(*op, 0x08, "the slow consumer got 0x{op:02X}");
        assert!(d.starts_with(format!("fault.feeder {n:06} ").as_bytes()));
    }
    assert!((rest.len() as u64) < sent);
    tx.send(0x03, b"");
    fast.send(0x03, b"");
}

/// One shim sends Echoes and Commands to another in a tight loop, batches of
/// [`FLOOD_BATCH`] frames per write, until `stop` (and at least [`MIN_FLOOD`]). Both
/// read everything; the flood stays within [`FLOOD_WINDOW`] frames of what both have
/// read, so neither can become a slow consumer. Every frame must arrive and be
/// acknowledged.
fn flood(srv: &Server, stop: &AtomicBool) {
    let mut src = srv.tcp();
    src.identify("fault.flood.src");
    let mut sink = srv.tcp();
    sink.identify("fault.flood.sink");
    let sunk = Counter::default();
    let acked = Counter::default();
    let batch: Vec<u8> = (0..FLOOD_BATCH)
        .flat_map(|n| {
            if n % 2 == 0 {
                frame(0x08, b"fault.flood.sink x")
            } else {
                frame(0x04, b"fault.flood.sink /x")
            }
        })
        .collect();
    let (sunk, acked) = (&sunk, &acked);
    thread::scope(|s| {
        let mut sink_frames = Frames::new(sink.s.try_clone().unwrap());
        let sink_reader = s.spawn(move || {
            let n = Cell::new(0u64);
            let ended = sink_frames.each(
                |op, d| {
                    if d == b"fault.flood.src end" {
                        return false;
                    }
                    match op {
                        0x08 => assert_eq!(d, b"fault.flood.src x"),
                        0x04 => assert!(d.starts_with(b"fault.flood.src ") && d.ends_with(b" /x")),
                        _ => panic!("the sink got 0x{op:02X} {:?}", text(d)),
                    }
                    n.set(n.get() + 1);
                    true
                },
                || sunk.set(n.get()),
            );
            assert!(ended, "the sink was closed");
            n.get()
        });
        let mut src_frames = Frames::new(src.s.try_clone().unwrap());
        let ack_reader = s.spawn(move || {
            let n = Cell::new(0u64);
            let ended = src_frames.each(
                |op, d| match op {
                    0x0C if d.ends_with(b" 1") => {
                        n.set(n.get() + 1);
                        true
                    }
                    0x07 if d == b"end" => false,
                    _ => panic!("the flooder got 0x{op:02X} {:?}", text(d)),
                },
                || acked.set(n.get()),
            );
            assert!(ended, "the flooder was closed");
            n.get()
        });
        let mut sent = 0u64;
        while sent < MIN_FLOOD || !stop.load(Ordering::SeqCst) {
            let floor = (sent + FLOOD_BATCH).saturating_sub(FLOOD_WINDOW);
            sunk.wait_for(floor, "the flood sink");
            acked.wait_for(floor, "the flooder's Acks");
            src.send_raw(&batch);
            sent += FLOOD_BATCH;
        }
        src.send(0x08, b"fault.flood.sink end");
        src.send(0x06, b"end");
        assert_eq!(sink_reader.join().unwrap(), sent, "flood frames delivered");
        // The Acks: one per flood frame, and one for the end Echo.
        assert_eq!(
            ack_reader.join().unwrap(),
            sent + 1,
            "flood frames acknowledged"
        );
    });
}

/// Garbage over TCP: random bytes (identified or not), frames over `max_frame` (ended or
/// not, identified or not, and a megabyte of them), every undefined opcode, the opcodes
/// only the server sends, and malformed requests of every kind. Each connection that
/// survives its garbage proves it with a Ping; the server's answers are checked where
/// they are fixed.
fn tcp_garbage(srv: &Server) {
    let mut rng = StdRng::seed_from_u64(0x5eed_fa17);
    // Random bytes. They may spell any frame, a Quit included, so the connection may end
    // early; whatever comes back must be frames a server sends.
    for k in 0..12 {
        let mut c = srv.tcp();
        if k % 2 == 0 {
            c.identify(&format!("fault.junk.r{k}"));
        }
        let mut bytes = vec![0u8; 16 * 1024];
        rng.fill(&mut bytes[..]);
        bytes.push(0x0A);
        if c.s.write_all(&bytes).is_err() {
            continue;
        }
        let _ = c.s.write_all(&frame(0x06, b"junk end"));
        while let Some((op, d)) = c.try_recv() {
            if op == 0x07 && d == b"junk end" {
                break;
            }
            assert!(from_server(op), "0x{op:02X} from the server");
        }
    }
    // Over `max_frame` without a 0A, exactly `max_frame` bytes (so that the server reads
    // all of them before it closes, and the close is not a reset that could eat the
    // Error): the Error, then the close.
    for identified in [false, true] {
        let mut c = srv.tcp();
        if identified {
            c.identify("fault.junk.big");
        }
        let mut big = vec![b'x'; MAX_FRAME];
        big[0] = 0x08;
        c.send_raw(&big);
        c.expect_error(&format!("frame longer than {MAX_FRAME} bytes"));
        assert!(c.expect_closed().is_empty());
    }
    // A megabyte of frames over the limit: the server closes after the first, so the
    // writes may fail and the Error may be lost to the reset.
    {
        let mut c = srv.tcp();
        c.identify("fault.junk.firehose");
        let mut big = vec![b'y'; MAX_FRAME * 2];
        big[0] = 0x04;
        *big.last_mut().unwrap() = 0x0A;
        for _ in 0..32 {
            if c.s.write_all(&big).is_err() {
                break;
            }
        }
        for (op, _) in c.expect_closed() {
            assert_eq!(op, 0x09);
        }
    }
    // Every undefined opcode, before and after Identify: each gets its Error, and the
    // connection stays usable.
    // (Not 0x16 first: as the first byte of a connection it is a TLS ClientHello.)
    let unknown: Vec<u8> = (0x17..=0xFF).chain([0x16, 0x0B]).collect();
    for identified in [false, true] {
        let mut c = srv.tcp();
        if identified {
            c.identify("fault.junk.ops");
        }
        let wire: Vec<u8> = unknown.iter().flat_map(|&op| frame(op, b"zz")).collect();
        c.send_raw(&wire);
        for &op in &unknown {
            c.expect_frame(0x09, format!("unknown opcode 0x{op:02X}").as_bytes());
        }
        c.sync(b"still here");
    }
    // Requests before Identify, then bad Identifies, then the opcodes only the server
    // sends, and malformed requests: one Error each, in order, and the connection lives.
    let mut c = srv.tcp();
    let mut wire = Vec::new();
    let mut want: Vec<String> = Vec::new();
    for op in [0x04, 0x05, 0x08, 0x0D] {
        wire.extend(frame(op, b"fault.good.* early"));
        want.push("identify first".into());
    }
    for (name, why) in [
        (&b""[..], "identity is empty"),
        (&[b'n'; 65][..], "identity longer than 64 bytes"),
        (
            &b"fault.junk.a b"[..],
            "identity byte 0x20 at 12: only ASCII",
        ),
        (
            &b"fault.junk.\xff"[..],
            "identity byte 0xFF at 11: only ASCII",
        ),
    ] {
        wire.extend(frame(0x01, name));
        want.push(why.into());
    }
    c.send_raw(&wire);
    for w in &want {
        c.expect_error(w);
    }
    c.identify("fault.junk.bad");
    let mut wire = Vec::new();
    let mut want: Vec<String> = Vec::new();
    for (op, name) in [
        (0x02, "Session"),
        (0x09, "Error"),
        (0x0C, "Ack"),
        (0x0E, "WhoEntry"),
        (0x15, "Terms"),
    ] {
        wire.extend(frame(op, b"1 2"));
        want.push(format!(
            "opcode 0x{op:02X} ({name}) is sent by the server only"
        ));
    }
    for (op, data, why) in [
        (0x04, &b"fault.good.*"[..], "expected: TARGET SP TEXT"),
        (0x08, b"fault.>.x hi", "'>' must be the last segment"),
        (0x04, b"+ hi", "empty target"),
        (0x05, b"abc nope", NON_CANONICAL_ID),
        (
            0x05,
            b"1048576 forged",
            "response refused: 1048576 is not among the last",
        ),
        (0x08, b"fault.nobody.here hi", "no shim matches"),
        (0x0D, b"a.>.b", "bad pattern"),
    ] {
        wire.extend(frame(op, data));
        want.push(why.into());
    }
    c.send_raw(&wire);
    for w in &want {
        c.expect_error(w);
    }
    c.sync(b"still here");
}

/// Garbage over UDP: random datagrams from addresses that are not bound, binds with bad
/// tokens, and random and refused datagrams from a bound address. The bound one keeps
/// its channel; its TCP connection ending takes the binding with it.
fn udp_garbage(srv: &Server) {
    let mut rng = StdRng::seed_from_u64(0xda7a_6a4b);
    // Random datagrams from four unbound sockets; their Quits (if any) go unread.
    for _ in 0..4 {
        let u = srv.udp();
        for _ in 0..400 {
            let mut d = vec![0u8; rng.random_range(1..=600)];
            rng.fill(&mut d[..]);
            u.send_raw(&d);
        }
    }
    // Binds with tokens that are not live (random, short, long): "I do not know you".
    for k in 0..6 {
        let u = srv.udp();
        let mut token = vec![0u8; [16, 15, 17][k % 3]];
        rng.fill(&mut token[..]);
        token.iter_mut().for_each(|b| {
            if *b == 0x0A {
                *b = 0x0B;
            }
        });
        udp_until(
            &u,
            &[&frame(0x02, &token)],
            |d| d == QUIT,
            "a bad token's Quit",
        );
    }
    // A bound address: random datagrams, then the refusals that are fixed.
    let mut c = srv.tcp();
    let token = c.identify("fault.junk.udp");
    let u = srv.udp();
    udp_bind(&u, &token);
    for _ in 0..400 {
        let mut d = vec![0u8; rng.random_range(1..=300)];
        rng.fill(&mut d[..]);
        u.send_raw(&d);
    }
    for (req, reply) in [
        (frame(0x0D, b""), "Who is answered over TCP only"),
        (
            frame(0x01, b"x"),
            "opcode 0x01 (Identify) is not accepted over UDP",
        ),
        (frame(0x42, b"zz"), "unknown opcode 0x42"),
    ] {
        let want = frame(0x09, reply.as_bytes());
        udp_until(&u, &[&req], |d| d == want, reply);
    }
    udp_until(
        &u,
        &[&frame(0x06, b"still bound")],
        |d| d == frame(0x07, b"still bound"),
        "a Pong after the garbage",
    );
    c.send(0x03, b"");
    assert!(c.expect_closed().is_empty());
    udp_until(
        &u,
        &[&frame(0x06, b"gone")],
        |d| d == QUIT,
        "a Quit once the session is gone",
    );
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

fn faults_leave_well_behaved_shims_whole(io: &str) {
    let t0 = Instant::now();
    // `info`, not the harness's `debug`: a line per connection is what the checks read,
    // and a line per garbage frame would only slow the server down. Hundreds of
    // connections come from 127.0.0.1 within a second, so the per-source limits are off;
    // so are the per-shim rates: this test shows the isolation the hub gives without them
    // (tests/abuse.rs covers the rates). The flood's sink and the slow consumer's sibling
    // only read, and on a loaded machine the faults can take longer than the default
    // 30 s idle timeout, which would close them (tests/core.rs covers the idle timeout).
    let mut srv = Server::start_level(
        io,
        "info",
        &[
            "--admin",
            "127.0.0.1:0",
            "--outbound-limit",
            OUTBOUND_LIMIT,
            "--connect-rate-per-source",
            "0",
            "--max-connections-per-source",
            "0",
            "--routed-per-sec",
            "0",
            "--deliveries-per-sec",
            "0",
            "--who-per-sec",
            "0",
            "--idle-timeout",
            "10m",
        ],
    );
    // Every well-behaved shim is identified before anyone sends, so that `fault.good.*`
    // reaches all the others from the first round.
    let mut conns: Vec<Tcp> = (0..GOOD)
        .map(|i| {
            let mut c = srv.tcp();
            c.identify(&good_name(i));
            c
        })
        .collect();
    let goods: Vec<Good> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| Good {
            i,
            w: Mutex::new(c.s.try_clone().unwrap()),
            pending: Mutex::new(VecDeque::new()),
            acked: Condvar::new(),
            owed: Mutex::new(0),
            answered: Condvar::new(),
            writer_done: AtomicBool::new(false),
        })
        .collect();
    let stop = AtomicBool::new(false);
    let srv_ref = &srv;
    let (sent, got) = thread::scope(|s| {
        let readers: Vec<_> = goods
            .iter()
            .zip(&conns)
            .map(|(g, c)| {
                let frames = Frames::new(c.s.try_clone().unwrap());
                s.spawn(move || good_reader(g, frames))
            })
            .collect();
        let writers: Vec<_> = goods
            .iter()
            .map(|g| {
                let stop = &stop;
                s.spawn(move || good_writer(g, stop))
            })
            .collect();
        let flooder = s.spawn(|| flood(srv_ref, &stop));
        let mut faults: Vec<thread::ScopedJoinHandle<()>> = (0..CHURN_THREADS)
            .map(|t| s.spawn(move || churn(srv_ref, t)))
            .collect();
        faults.push(s.spawn(|| half_frames(srv_ref)));
        faults.push(s.spawn(|| slow_consumer(srv_ref)));
        faults.push(s.spawn(|| tcp_garbage(srv_ref)));
        faults.push(s.spawn(|| udp_garbage(srv_ref)));
        // Whatever happened to the faults, the steady traffic is told to stop, so that a
        // failure is reported at once rather than after every reader's deadline.
        let outcomes: Vec<_> = faults.into_iter().map(|f| f.join()).collect();
        stop.store(true, Ordering::SeqCst);
        let flooded = flooder.join();
        for o in outcomes.into_iter().chain([flooded]) {
            if let Err(panic) = o {
                std::panic::resume_unwind(panic);
            }
        }
        let sent: Vec<Sent> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        let got: Vec<Got> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        (sent, got)
    });

    // Every message each well-behaved shim sent reached its receiver, once, in order.
    for (from, sent) in sent.iter().enumerate() {
        for (to, list) in sent.iter().enumerate() {
            assert_eq!(&got[to].got[from], list, "g{to}'s deliveries from g{from}");
        }
    }
    let messages: usize = sent.iter().flatten().map(Vec::len).sum();
    let commands: usize = got.iter().map(|g| g.commands).sum();
    assert!(srv.is_running(), "the server died");
    // Every other connection is gone, and only the well-behaved shims are counted.
    srv.wait_metric("velium_connections", |v| v == GOOD as f64);
    assert_eq!(srv.metric("velium_shims"), GOOD as f64);
    srv.wait_metric("velium_udp_bound", |v| v == 0.0);
    assert!(srv.metric("velium_slow_consumers_total") >= 1.0);
    for line in srv.log_lines() {
        if line.contains("slow consumer cut off") {
            for keep in [
                "fault.good.",
                "fault.flood.",
                "fault.feeder",
                "fault.sub.fast",
            ] {
                assert!(!line.contains(keep), "cut off: {line}");
            }
        }
    }
    // And they are still served.
    for (i, (c, g)) in conns.iter_mut().zip(got).enumerate() {
        let mut frames = g.frames;
        c.send(0x06, format!("g{i} after").as_bytes());
        assert_eq!(
            frames.next(),
            Some((0x07, format!("g{i} after").into_bytes()))
        );
    }
    eprintln!(
        "{io}: {messages} messages and {commands} commands among {GOOD} shims under faults in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

mod faults_leave_well_behaved_shims_whole {
    #[test]
    fn uring() {
        super::faults_leave_well_behaved_shims_whole("uring")
    }

    /// Ignored while a known failure is open: on the epoll driver, one frame of the
    /// slow-consumer fault sometimes never reaches the reader that keeps up ("the fast
    /// reader stuck at N-1 of N"), with both cores idle. It reproduces on builds from before
    /// relay state, more often with a large `net.core.wmem_max`. Run it with
    /// `cargo test --test fault -- --ignored`.
    #[test]
    #[ignore = "known failure on epoll: a frame of the slow-consumer fault is not delivered"]
    fn epoll() {
        super::faults_leave_well_behaved_shims_whole("epoll")
    }
}
