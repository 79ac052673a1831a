//! The protocol core run against a reference model, with the invariants checked after
//! every step.
//!
//! Shared, as source, by the property tests (`tests/state_machine.rs`, proptest) and the
//! fuzz targets (`fuzz/fuzz_targets/`, libFuzzer): both generate the same [`Scenario`]s
//! and [`check_decode`] inputs, so a failure found by one can be replayed by the other.
//!
//! [`run`] drives one real [`Hub`] with several [`Connection`]s, UDP datagrams through
//! [`udp::on_datagram`], timer sweeps, reloads and a graceful shutdown, exactly as the
//! drivers call them (a `Flow::Close` is followed at once by `finish`; timers are only
//! checked for connections whose outbox is open). Next to it runs a model written from
//! `docs/protocol.md`: it predicts every byte each shim's TCP outbox receives and every
//! datagram sent, the session table, the router and the UDP bindings. Anything the two
//! disagree on, and any broken invariant (a frame cut in two, a client-to-server opcode
//! sent to a client, a dead shim still routable, an amplified UDP answer), panics with
//! the step number and what differed.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use velium_server::codec::{self, CodecError};
use velium_server::config::{CommandRule, Config, Secret};
use velium_server::frame::{NEWLINE, Opcode, encoded};
use velium_server::hub::{Hub, Outgoing, check_identity};
use velium_server::metrics::Refusal;
use velium_server::router::{Pattern, Seg};
use velium_server::session::{Connection, Flow, QUIT};
use velium_server::shim::{CloseReason, OutState, Shim};
use velium_server::udp::{self, QuitLimiter};

// ---------------------------------------------------------------------------------------
// The decoder
// ---------------------------------------------------------------------------------------

/// Checks both decoders on `bytes` with a maximum frame length of `max`.
///
/// `splits` cuts the stream into reads, as a socket would; the frames found must not
/// depend on where the cuts fall.
pub fn check_decode(bytes: &[u8], max: usize, splits: &[usize]) {
    // The whole buffer at once, frame by frame.
    let mut whole = Vec::new();
    let mut rest = bytes;
    let whole_end = loop {
        match codec::decode(rest, max) {
            Ok(Some((f, n))) => {
                check_decoded_frame(rest, max, f.op, f.data, n);
                whole.push((f.op, f.data.to_vec()));
                rest = &rest[n..];
            }
            Ok(None) => {
                assert!(
                    !rest.contains(&NEWLINE),
                    "decode asked for more bytes though a 0x0A is there"
                );
                assert!(
                    rest.len() < max,
                    "an unfinished frame of {} bytes, max {max}, was not refused",
                    rest.len()
                );
                break Ok(rest.to_vec());
            }
            Err(e) => {
                assert_eq!(
                    e,
                    CodecError::TooLong { max },
                    "decode only refuses long frames"
                );
                assert!(
                    rest.len() >= max,
                    "refused {} bytes as longer than {max}",
                    rest.len()
                );
                assert!(
                    !rest[..max].contains(&NEWLINE),
                    "refused a frame that ends within {max} bytes"
                );
                break Err(());
            }
        }
    };

    // The same bytes in reads cut at `splits`, keeping the unfinished tail between reads
    // as a connection does.
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut pending = Vec::new();
    let mut chunked = Vec::new();
    let mut from = 0;
    let mut chunked_end = None;
    for cut in cuts {
        pending.extend_from_slice(&bytes[from..cut]);
        from = cut;
        let mut used = 0;
        loop {
            match codec::decode(&pending[used..], max) {
                Ok(Some((f, n))) => {
                    chunked.push((f.op, f.data.to_vec()));
                    used += n;
                }
                Ok(None) => break,
                Err(_) => {
                    chunked_end = Some(Err(()));
                    break;
                }
            }
        }
        pending.drain(..used);
        if chunked_end.is_some() {
            break;
        }
    }
    let chunked_end = chunked_end.unwrap_or(Ok(pending));
    assert_eq!(
        whole, chunked,
        "frames depend on how the stream was cut into reads"
    );
    assert_eq!(
        whole_end, chunked_end,
        "the end of the stream depends on the reads"
    );

    check_datagram(bytes, max);
}

/// Checks one frame `decode` returned from the front of `buf`, `n` bytes long.
fn check_decoded_frame(buf: &[u8], max: usize, op: u8, data: &[u8], n: usize) {
    assert!(n >= 1 && n <= max, "frame of {n} bytes with max {max}");
    assert!(n <= buf.len(), "consumed {n} of {} bytes", buf.len());
    assert_eq!(buf[n - 1], NEWLINE, "consumed bytes do not end at a 0x0A");
    assert!(!buf[..n - 1].contains(&NEWLINE), "a frame ran past a 0x0A");
    assert!(!data.contains(&NEWLINE), "frame data holds a 0x0A");
    if n == 1 {
        // A lone 0x0A is the empty None frame.
        assert_eq!(
            (op, data),
            (0, &[][..]),
            "a lone 0x0A is not the empty None frame"
        );
    } else {
        assert_eq!(op, buf[0], "opcode is not the first byte");
        assert_eq!(
            data,
            &buf[1..n - 1],
            "data is not the bytes between opcode and 0x0A"
        );
        assert!(
            std::ptr::eq(data.as_ptr(), buf[1..].as_ptr()),
            "data is not borrowed from the buffer"
        );
        let mut again = vec![op];
        again.extend_from_slice(data);
        again.push(NEWLINE);
        assert_eq!(
            again,
            &buf[..n],
            "re-encoding does not give the consumed bytes"
        );
        if let Some(known) = Opcode::from_byte(op) {
            assert_eq!(encoded(known, data), &buf[..n], "the encoder disagrees");
        }
    }
    // The answer depends only on the frame's own bytes, and `n` is the least maximum
    // that lets it through.
    let same = |r: Result<Option<(velium_server::frame::Frame<'_>, usize)>, CodecError>| {
        r.map(|o| o.map(|(f, k)| (f.op, f.data.to_vec(), k)))
    };
    let expect = Ok(Some((op, data.to_vec(), n)));
    assert_eq!(
        same(codec::decode(&buf[..n], max)),
        expect,
        "frame changes with what follows it"
    );
    assert_eq!(
        same(codec::decode(buf, n)),
        expect,
        "frame refused at max = its length"
    );
    assert_eq!(
        codec::decode(buf, n - 1).map(|o| o.map(|(_, k)| k)),
        Err(CodecError::TooLong { max: n - 1 }),
        "frame of {n} bytes accepted with max {}",
        n - 1
    );
}

/// Checks `decode_datagram` against its definition: exactly one frame, at most `max` bytes.
fn check_datagram(d: &[u8], max: usize) {
    let one_frame =
        d.len() >= 2 && d[d.len() - 1] == NEWLINE && !d[..d.len() - 1].contains(&NEWLINE);
    match codec::decode_datagram(d, max) {
        Ok(f) => {
            assert!(
                d.len() <= max && one_frame,
                "accepted a datagram that is not one frame within max"
            );
            assert_eq!((f.op, f.data), (d[0], &d[1..d.len() - 1]));
            let mut again = vec![f.op];
            again.extend_from_slice(f.data);
            again.push(NEWLINE);
            assert_eq!(again, d, "re-encoding does not give the datagram");
            let streamed =
                codec::decode(d, max).map(|o| o.map(|(g, n)| (g.op, g.data.to_vec(), n)));
            assert_eq!(
                streamed,
                Ok(Some((f.op, f.data.to_vec(), d.len()))),
                "stream decoder disagrees"
            );
        }
        Err(CodecError::TooLong { max: m }) => {
            assert_eq!(m, max);
            assert!(
                d.len() > max,
                "refused a datagram of {} bytes as longer than {max}",
                d.len()
            );
        }
        Err(CodecError::NotOneFrame) => {
            assert!(
                d.len() <= max && !one_frame,
                "refused a datagram that is one frame"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// Segments identities, targets and permission patterns are built from: few, so that
/// targets often match, with mixed case, the wildcards and an empty segment.
pub const SEGMENTS: [&str; 8] = ["a", "b", "B", "peq", "*", ">", "", "\u{FFFD}"];

/// Joins `SEGMENTS[i % len]` for each index with dots; a leading `+` when `plus`.
pub fn name(parts: &[u8], plus: bool) -> Vec<u8> {
    let mut v = Vec::new();
    if plus {
        v.push(b'+');
    }
    for (k, i) in parts.iter().enumerate() {
        if k > 0 {
            v.push(b'.');
        }
        v.extend_from_slice(SEGMENTS[*i as usize % SEGMENTS.len()].as_bytes());
    }
    v
}

/// The secret a scenario's server uses when it has one.
pub const SECRET: &[u8] = b"s3cret";

/// The settings a hub starts with, or is reloaded with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `max_frame`, at least 20 as the configuration demands.
    pub max_frame: usize,
    /// `identify_timeout`, ms.
    pub identify_ms: u64,
    /// `idle_timeout`, ms.
    pub idle_ms: u64,
    /// `outbound_limit`, at least 1024.
    pub outbound_limit: usize,
    /// `udp_quit_per_sec` (kept as first set across reloads).
    pub udp_quit_per_sec: u32,
    /// `max_connections` (0: no limit).
    pub max_connections: usize,
    /// `max_connections_per_source` (0: no limit).
    pub per_source: usize,
    /// `connect_rate_per_source` (0: no limit; kept as first set across reloads).
    pub connect_rate: u32,
    /// Whether [`SECRET`] is required.
    pub secret: bool,
    /// Command rules as (from, [to]) pattern bytes; rules that do not parse are left out.
    pub rules: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
}

/// What a frame's data holds.
#[derive(Clone, Debug)]
pub enum Body {
    /// Any bytes (0x0A left out).
    Bytes(Vec<u8>),
    /// A name from [`SEGMENTS`].
    Name(Vec<u8>),
    /// `target SP text`.
    Routed {
        /// Target, from [`SEGMENTS`].
        target: Vec<u8>,
        /// Text (0x0A left out).
        text: Vec<u8>,
    },
    /// `id SP text` with the id of a Command sent earlier (the `pick`-th), if any.
    Response {
        /// Which id.
        pick: u8,
        /// Text (0x0A left out).
        text: Vec<u8>,
    },
    /// The 16 raw token bytes of connection `n % count`.
    Token(u8),
    /// The secret (true) or a wrong one.
    Secret(bool),
}

/// Bytes sent on a TCP connection or in a datagram.
#[derive(Clone, Debug)]
pub enum Piece {
    /// One whole frame.
    Frame {
        /// Opcode byte (any).
        op: u8,
        /// Data.
        body: Body,
    },
    /// Raw bytes: parts of frames, several frames, stray 0x0A.
    Raw(Vec<u8>),
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Step {
    /// A client connects from source IP `source % 3`; `reads` when it reads everything
    /// the server sends at once (otherwise only at [`Step::Read`]).
    Connect {
        /// Source IP index.
        source: u8,
        /// Reads at once.
        reads: bool,
    },
    /// A read on connection `conn % open`: the pieces concatenated, delivered in two reads
    /// cut at `split`.
    Tcp {
        /// Which open connection.
        conn: u8,
        /// What arrives.
        pieces: Vec<Piece>,
        /// Where the read is cut.
        split: u16,
    },
    /// A datagram from UDP source `source % 3`.
    Udp {
        /// Source address index.
        source: u8,
        /// The datagram (the pieces concatenated).
        pieces: Vec<Piece>,
    },
    /// Client `conn % all` reads what is queued for it.
    Read {
        /// Which connection (open or ended).
        conn: u8,
    },
    /// The reader of connection `conn % open` sees end of stream.
    Eof {
        /// Which open connection.
        conn: u8,
    },
    /// The clock moves on by `ms`; with `sweep`, the timers of open connections are checked.
    Advance {
        /// Milliseconds.
        ms: u16,
        /// Whether a timer sweep runs.
        sweep: bool,
    },
    /// The settings are reloaded.
    Reload(Settings),
    /// A graceful shutdown begins: no more connections; every open one is sent Quit.
    Shutdown,
}

/// A hub's settings and what happens to it.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Initial settings.
    pub settings: Settings,
    /// Steps in order.
    pub steps: Vec<Step>,
}

/// At most this many connections are ever accepted in one scenario.
pub const MAX_CONNS: usize = 8;

fn tcp_ip(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, 1 + i % 3])
}

fn udp_src(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, 1 + i % 3], 4000))
}

fn config(s: &Settings, first: &Settings) -> Config {
    Config {
        cores: 1,
        max_frame: s.max_frame,
        identify_timeout: Duration::from_millis(s.identify_ms),
        idle_timeout: Duration::from_millis(s.idle_ms),
        outbound_limit: s.outbound_limit,
        udp_quit_per_sec: first.udp_quit_per_sec,
        max_connections: s.max_connections,
        max_connections_per_source: s.per_source,
        connect_rate_per_source: first.connect_rate,
        secret: s.secret.then(|| Secret::new(SECRET)),
        command_rules: rules(s)
            .into_iter()
            .map(|(from, to)| CommandRule {
                from: Pattern::parse(&from).expect("rules() keeps parsable patterns"),
                to: to
                    .iter()
                    .map(|t| Pattern::parse(t).expect("parsable"))
                    .collect(),
            })
            .collect(),
        ..Config::default()
    }
}

/// The rules of `s` whose patterns all parse (and have at least one target).
fn rules(s: &Settings) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    s.rules
        .iter()
        .filter(|(from, to)| {
            MPat::parse(from).is_ok() && !to.is_empty() && to.iter().all(|t| MPat::parse(t).is_ok())
        })
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------
// The model's target patterns (written from docs/protocol.md §6, not from src/router.rs)
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum MSeg {
    Lit(String),
    One,
    Rest,
}

#[derive(Clone, Debug)]
struct MPat {
    segs: Vec<MSeg>,
    include_self: bool,
}

fn lower(seg: &[u8]) -> String {
    String::from_utf8_lossy(seg).to_ascii_lowercase()
}

impl MPat {
    fn parse(t: &[u8]) -> Result<MPat, &'static str> {
        let (include_self, body) = match t.first() {
            Some(b'+') => (true, &t[1..]),
            _ => (false, t),
        };
        if body.is_empty() {
            return Err("empty target");
        }
        if body.len() > 255 {
            return Err("target longer than 255 bytes");
        }
        if std::str::from_utf8(body).is_err() {
            return Err("target is not UTF-8");
        }
        let parts: Vec<&[u8]> = body.split(|&b| b == b'.').collect();
        let mut segs = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            segs.push(match *p {
                b"*" => MSeg::One,
                b">" if i + 1 == parts.len() => MSeg::Rest,
                b">" => return Err("'>' must be the last segment"),
                lit => MSeg::Lit(lower(lit)),
            });
        }
        Ok(MPat { segs, include_self })
    }

    fn all() -> MPat {
        MPat {
            segs: vec![MSeg::Rest],
            include_self: true,
        }
    }

    fn matches(&self, identity: &str) -> bool {
        let parts: Vec<String> = identity.split('.').map(|p| lower(p.as_bytes())).collect();
        fn go(segs: &[MSeg], parts: &[String]) -> bool {
            match (segs.first(), parts.first()) {
                (None, None) => true,
                (Some(MSeg::Rest), Some(_)) => true,
                (Some(MSeg::One), Some(_)) => go(&segs[1..], &parts[1..]),
                (Some(MSeg::Lit(l)), Some(p)) if l == p => go(&segs[1..], &parts[1..]),
                _ => false,
            }
        }
        go(&self.segs, &parts)
    }

    /// Whether every identity `q` matches is matched by `self`.
    fn covers(&self, q: &MPat) -> bool {
        fn go(p: &[MSeg], q: &[MSeg]) -> bool {
            match (p.first(), q.first()) {
                (Some(MSeg::Rest), Some(_)) => true,
                (None, None) => true,
                (_, Some(MSeg::Rest)) | (None, Some(_)) | (Some(_), None) => false,
                (Some(MSeg::One), Some(_)) => go(&p[1..], &q[1..]),
                (Some(MSeg::Lit(a)), Some(MSeg::Lit(b))) if a == b => go(&p[1..], &q[1..]),
                (Some(MSeg::Lit(_)), Some(_)) => false,
            }
        }
        go(&self.segs, &q.segs)
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// One expected entry on a TCP outbox.
#[derive(Clone, Debug)]
enum Exp {
    /// One frame.
    Frame(Vec<u8>),
    /// A Who listing: WhoEntry frames in any order, then the Ack.
    Listing(Vec<Vec<u8>>, Vec<u8>),
}

impl Exp {
    fn len(&self) -> usize {
        match self {
            Exp::Frame(f) => f.len(),
            Exp::Listing(e, a) => e.iter().map(Vec::len).sum::<usize>() + a.len(),
        }
    }
}

/// The model of one outbox.
#[derive(Debug)]
struct MOutbox {
    state: OutState,
    queued: Vec<Exp>,
    bytes: usize,
    reason: Option<CloseReason>,
}

impl MOutbox {
    fn new() -> MOutbox {
        MOutbox {
            state: OutState::Open,
            queued: Vec::new(),
            bytes: 0,
            reason: None,
        }
    }

    /// Queues `e`; true when queued, false when closed or when this cut the shim off.
    fn push(&mut self, limit: usize, e: Exp) -> bool {
        if self.state != OutState::Open {
            return false;
        }
        self.bytes += e.len();
        self.queued.push(e);
        if self.bytes > limit {
            self.queued.clear();
            self.bytes = 0;
            self.state = OutState::Kicked;
            self.reason.get_or_insert(CloseReason::SlowConsumer);
            return false;
        }
        true
    }

    fn close(&mut self, reason: CloseReason, last: &[u8]) {
        if self.state != OutState::Open {
            return;
        }
        if !last.is_empty() {
            self.bytes += last.len();
            self.queued.push(Exp::Frame(last.to_vec()));
        }
        self.state = OutState::Closing;
        self.reason.get_or_insert(reason);
    }

    fn take(&mut self) -> (Vec<Exp>, OutState) {
        let q = std::mem::take(&mut self.queued);
        self.bytes = 0;
        let s = self.state;
        if s == OutState::Closing {
            self.state = OutState::Kicked;
        }
        (q, s)
    }
}

/// A connection: the real one and its model.
struct Conn {
    real: Connection,
    shim: Arc<Shim>,
    ip: IpAddr,
    reads: bool,
    finished: bool,
    rx: Vec<u8>,
    authed: bool,
    identified: bool,
    identity: String,
    /// `Hub::close` has run for it (by a timer or `finish`).
    closed: bool,
    seq: u64,
    accepted_ms: u64,
    last_seen_ms: u64,
    udp: Option<SocketAddr>,
    out: MOutbox,
    session_queued: bool,
}

impl Conn {
    /// In the session table and the router.
    fn registered(&self) -> bool {
        self.identified && !self.closed
    }
}

/// The transport a request came in on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MVia {
    Tcp,
    Udp(SocketAddr),
}

/// The real hub and the model side by side.
pub struct World {
    hub: Arc<Hub>,
    lim: QuitLimiter,
    t0: Instant,
    elapsed_ms: u64,
    first: Settings,
    settings: Settings,
    conns: Vec<Conn>,
    bindings: HashMap<SocketAddr, usize>,
    open: usize,
    shutting_down: bool,
    command_ids: Vec<u64>,
    /// Per source IP: (first attempt ms, attempts that passed the rate check).
    attempts: HashMap<IpAddr, (u64, u64)>,
    /// Per UDP source: (first Quit ms, Quits sent).
    quits: HashMap<SocketAddr, (u64, u64)>,
    /// Datagrams the model expects from the current step.
    dgrams: Vec<(SocketAddr, Vec<u8>)>,
    step: usize,
}

/// Runs `s` and checks every invariant after every step; panics on the first violation.
pub fn run(s: &Scenario) {
    let mut w = World::new(&s.settings);
    for (i, step) in s.steps.iter().enumerate() {
        w.step = i;
        w.apply(step);
        w.check();
    }
    w.end();
}

fn ack(id: u64, n: u64) -> Vec<u8> {
    encoded(Opcode::Ack, format!("{id} {n}").as_bytes())
}

fn error(msg: &str) -> Vec<u8> {
    encoded(Opcode::Error, msg.as_bytes())
}

/// Opcodes the server may send to a client.
const SERVER_TO_CLIENT: [u8; 10] = [0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0C, 0x0E];

impl World {
    fn new(s: &Settings) -> World {
        let hub = Hub::new(config(s, s));
        World {
            lim: QuitLimiter::new(s.udp_quit_per_sec),
            hub,
            t0: Instant::now(),
            elapsed_ms: 0,
            first: s.clone(),
            settings: s.clone(),
            conns: Vec::new(),
            bindings: HashMap::new(),
            open: 0,
            shutting_down: false,
            command_ids: Vec::new(),
            attempts: HashMap::new(),
            quits: HashMap::new(),
            dgrams: Vec::new(),
            step: 0,
        }
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.elapsed_ms)
    }

    fn now_ms(&self) -> u64 {
        self.hub.ms(self.now())
    }

    fn fail(&self, what: String) -> ! {
        panic!("step {}: {what}", self.step)
    }

    fn open_conns(&self) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| !self.conns[i].finished)
            .collect()
    }

    fn piece_bytes(&self, p: &Piece, out: &mut Vec<u8>) {
        match p {
            Piece::Raw(b) => out.extend_from_slice(b),
            Piece::Frame { op, body } => {
                out.push(*op);
                let strip = |b: &[u8]| {
                    b.iter()
                        .copied()
                        .filter(|&x| x != NEWLINE)
                        .collect::<Vec<u8>>()
                };
                match body {
                    Body::Bytes(b) | Body::Name(b) => out.extend(strip(b)),
                    Body::Routed { target, text } => {
                        out.extend(strip(target));
                        out.push(b' ');
                        out.extend(strip(text));
                    }
                    Body::Response { pick, text } => {
                        let id = if self.command_ids.is_empty() {
                            u64::from(*pick)
                        } else {
                            self.command_ids[*pick as usize % self.command_ids.len()]
                        };
                        out.extend_from_slice(id.to_string().as_bytes());
                        out.push(b' ');
                        out.extend(strip(text));
                    }
                    Body::Token(n) => match self.conns.len() {
                        0 => out.extend_from_slice(&[b'x'; 16]),
                        len => out.extend_from_slice(&self.conns[*n as usize % len].shim.token.0),
                    },
                    Body::Secret(right) => {
                        out.extend_from_slice(if *right { SECRET } else { b"wrong" })
                    }
                }
                out.push(NEWLINE);
            }
        }
    }

    fn apply(&mut self, step: &Step) {
        match step {
            Step::Connect { source, reads } => self.connect(tcp_ip(*source), *reads),
            Step::Tcp {
                conn,
                pieces,
                split,
            } => {
                let open = self.open_conns();
                if open.is_empty() {
                    return;
                }
                let c = open[*conn as usize % open.len()];
                let mut bytes = Vec::new();
                for p in pieces {
                    self.piece_bytes(p, &mut bytes);
                }
                let at = *split as usize % (bytes.len() + 1);
                for chunk in [&bytes[..at], &bytes[at..]] {
                    if chunk.is_empty() {
                        continue;
                    }
                    if let Flow::Close(r) = self.read(c, chunk) {
                        self.finish(c, r);
                        break;
                    }
                }
            }
            Step::Udp { source, pieces } => {
                let mut bytes = Vec::new();
                for p in pieces {
                    self.piece_bytes(p, &mut bytes);
                }
                self.datagram(udp_src(*source), &bytes);
            }
            Step::Read { conn } => {
                if !self.conns.is_empty() {
                    let c = *conn as usize % self.conns.len();
                    self.drain(c);
                }
            }
            Step::Eof { conn } => {
                let open = self.open_conns();
                if !open.is_empty() {
                    self.finish(open[*conn as usize % open.len()], CloseReason::Eof);
                }
            }
            Step::Advance { ms, sweep } => {
                self.elapsed_ms += u64::from(*ms);
                if *sweep {
                    self.sweep();
                }
            }
            Step::Reload(s) => {
                self.hub.reload(config(s, &self.first));
                self.settings = s.clone();
            }
            Step::Shutdown => {
                self.hub.begin_shutdown();
                self.shutting_down = true;
                // What each core does on shutdown: Quit to every connection still open.
                for c in self.open_conns() {
                    let conn = &mut self.conns[c];
                    if conn.shim.outbox.state() == OutState::Open {
                        conn.shim.outbox.close(CloseReason::Shutdown, &QUIT);
                    }
                    conn.out.close(CloseReason::Shutdown, &QUIT);
                }
            }
        }
    }

    // --- Connections ----------------------------------------------------------------

    fn connect(&mut self, ip: IpAddr, reads: bool) {
        if self.conns.len() >= MAX_CONNS {
            return;
        }
        let now = self.now();
        let now_ms = self.now_ms();
        let got = self.hub.admit(ip, now);
        let max = match self.settings.max_connections {
            0 => usize::MAX,
            n => n,
        };
        let from_ip = self
            .open_conns()
            .iter()
            .filter(|&&i| self.conns[i].ip == ip)
            .count();
        let per = self.settings.per_source;
        if self.shutting_down || self.open >= max {
            if got != Err(Refusal::MaxConnections) {
                self.fail(format!(
                    "admit gave {got:?} with {} open of {max} (shutdown {})",
                    self.open, self.shutting_down
                ));
            }
            return;
        }
        let rate = u64::from(self.first.connect_rate);
        match got {
            Err(Refusal::Rate) => {
                let (_, passed) = self.attempts.get(&ip).copied().unwrap_or((now_ms, 0));
                if rate == 0 || passed == 0 {
                    self.fail(format!(
                        "refused for rate with rate {rate} after {passed} attempts"
                    ));
                }
                return;
            }
            Err(Refusal::PerSource) if per > 0 && from_ip >= per => {}
            Ok(()) if per == 0 || from_ip < per => {}
            other => self.fail(format!(
                "admit gave {other:?}: {from_ip} open from {ip}, limit {per}"
            )),
        }
        // Attempts that passed the rate check stay within the bucket's refill.
        let e = self.attempts.entry(ip).or_insert((now_ms, 0));
        e.1 += 1;
        if rate > 0 && e.1 > rate + (now_ms - e.0) * rate / 1000 {
            let (first, passed) = *e;
            self.fail(format!(
                "{passed} attempts from {ip} let through in {} ms at {rate}/s",
                now_ms - first
            ));
        }
        if got.is_err() {
            return;
        }
        self.open += 1;
        let peer = SocketAddr::new(ip, 5000 + self.conns.len() as u16);
        let real = Connection::accept(&self.hub, 0, peer, now);
        let shim = real.shim().clone();
        self.conns.push(Conn {
            real,
            shim,
            ip,
            reads,
            finished: false,
            rx: Vec::new(),
            authed: false,
            identified: false,
            identity: String::new(),
            closed: false,
            seq: 0,
            accepted_ms: now_ms,
            last_seen_ms: now_ms,
            udp: None,
            out: MOutbox::new(),
            session_queued: false,
        });
    }

    /// The hub forgets `c` (the first close only).
    fn hub_close(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.closed {
            return;
        }
        conn.closed = true;
        if conn.identified
            && let Some(a) = conn.udp.take()
            && self.bindings.get(&a) == Some(&c)
        {
            self.bindings.remove(&a);
        }
    }

    fn finish(&mut self, c: usize, reason: CloseReason) {
        let got = self.conns[c].real.finish(&self.hub, reason);
        self.hub.release(self.conns[c].ip);
        self.open -= 1;
        let conn = &mut self.conns[c];
        let stands = *conn.out.reason.get_or_insert(reason);
        conn.out.close(stands, &[]);
        conn.finished = true;
        if got != stands {
            self.fail(format!(
                "finish({reason:?}) of conn {c} gave {got:?}, expected {stands:?}"
            ));
        }
        self.hub_close(c);
    }

    fn sweep(&mut self) {
        let now = self.now();
        let now_ms = self.now_ms();
        for c in self.open_conns() {
            let conn = &self.conns[c];
            if conn.shim.outbox.state() != OutState::Open {
                continue;
            }
            let expect =
                if !conn.identified && now_ms - conn.accepted_ms >= self.settings.identify_ms {
                    Some(CloseReason::IdentifyTimeout)
                } else if now_ms - conn.last_seen_ms >= self.settings.idle_ms {
                    Some(CloseReason::Idle)
                } else {
                    None
                };
            let got = self.hub.check_timers(&conn.shim, now);
            if got != expect.is_some() {
                self.fail(format!(
                    "timers of conn {c} fired: {got}, expected {expect:?}"
                ));
            }
            if let Some(r) = expect {
                let last = match r {
                    CloseReason::IdentifyTimeout => error("identify timeout"),
                    _ => QUIT.to_vec(),
                };
                self.conns[c].out.close(r, &last);
                self.hub_close(c);
            }
        }
    }

    // --- TCP input ------------------------------------------------------------------

    fn read(&mut self, c: usize, data: &[u8]) -> Flow {
        let pending_before: Vec<usize> =
            self.conns.iter().map(|k| k.shim.outbox.pending()).collect();
        let now = self.now();
        let got = self.conns[c].real.on_bytes(&self.hub, data, now);
        let expect = self.model_bytes(c, data);
        if got != expect {
            self.fail(format!(
                "on_bytes on conn {c} gave {got:?}, expected {expect:?}"
            ));
        }
        let session = self.conns[c].real.take_session_queued();
        if session != std::mem::take(&mut self.conns[c].session_queued) {
            self.fail(format!("conn {c}: take_session_queued() gave {session}"));
        }
        let out = std::mem::take(self.conns[c].real.outgoing());
        if !out.datagrams.is_empty() {
            self.fail(format!("TCP input produced datagrams: {:?}", out.datagrams));
        }
        self.check_flush(&pending_before, &out);
        got
    }

    fn model_bytes(&mut self, c: usize, data: &[u8]) -> Flow {
        let max = self.settings.max_frame;
        let now_ms = self.now_ms();
        let conn = &mut self.conns[c];
        if conn.closed {
            // A timer closed the connection while these bytes were on their way: they
            // are dropped, and the reader ends with the reason that stands.
            return Flow::Close(*conn.out.reason.get_or_insert(CloseReason::Eof));
        }
        conn.last_seen_ms = now_ms;
        conn.rx.extend_from_slice(data);
        loop {
            let rx = &self.conns[c].rx;
            match rx.iter().position(|&b| b == NEWLINE) {
                Some(p) if p < max => {
                    let frame: Vec<u8> = rx[..p].to_vec();
                    self.conns[c].rx.drain(..=p);
                    let (op, body) = match frame.split_first() {
                        None => (0, &[][..]),
                        Some((op, body)) => (*op, body),
                    };
                    if let Flow::Close(r) = self.model_frame(c, op, body) {
                        return Flow::Close(r);
                    }
                }
                _ if rx.len() >= max => {
                    let f = error(&format!("frame longer than {max} bytes"));
                    self.conns[c].out.close(CloseReason::Oversized, &f);
                    return Flow::Close(CloseReason::Oversized);
                }
                _ => return Flow::Continue,
            }
        }
    }

    fn push_self(&mut self, c: usize, f: Vec<u8>) {
        let limit = self.settings.outbound_limit;
        self.conns[c].out.push(limit, Exp::Frame(f));
    }

    fn refuse_auth(&mut self, c: usize, msg: &str) -> Flow {
        self.conns[c]
            .out
            .close(CloseReason::AuthFailed, &error(msg));
        Flow::Close(CloseReason::AuthFailed)
    }

    fn model_frame(&mut self, c: usize, op: u8, data: &[u8]) -> Flow {
        let Some(known) = Opcode::from_byte(op) else {
            self.push_self(c, error(&format!("unknown opcode 0x{op:02X}")));
            return Flow::Continue;
        };
        match known {
            Opcode::None => {}
            Opcode::Quit => {
                self.conns[c].out.close(CloseReason::Quit, &[]);
                return Flow::Close(CloseReason::Quit);
            }
            Opcode::Ping => self.push_self(c, encoded(Opcode::Pong, data)),
            // Auth counts only against a secret; the secret guards the first Identify,
            // not a rename.
            Opcode::Auth => {
                if self.settings.secret {
                    if data != SECRET {
                        return self.refuse_auth(c, "authentication failed");
                    }
                    self.conns[c].authed = true;
                }
            }
            Opcode::Identify
                if !self.conns[c].authed && !self.conns[c].identified && self.settings.secret =>
            {
                return self.refuse_auth(c, "authentication required");
            }
            Opcode::Identify => match check_identity(data) {
                Ok(label) => {
                    let conn = &mut self.conns[c];
                    conn.identity = label.to_string();
                    if !conn.identified {
                        conn.identified = true;
                        conn.session_queued = true;
                        let f = encoded(Opcode::Session, &conn.shim.token.0);
                        conn.out.push(usize::MAX, Exp::Frame(f));
                    }
                }
                Err(why) => self.push_self(c, error(why)),
            },
            _ if !self.conns[c].identified => self.push_self(c, error("identify first")),
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse | Opcode::Who => {
                self.route(c, known, data, MVia::Tcp);
            }
            Opcode::Pong => {}
            Opcode::Session | Opcode::Error | Opcode::Ack | Opcode::WhoEntry => {
                let msg = format!(
                    "opcode 0x{op:02X} ({}) is sent by the server only",
                    known.name()
                );
                self.push_self(c, error(&msg));
            }
        }
        Flow::Continue
    }

    // --- Routing --------------------------------------------------------------------

    fn reply(&mut self, c: usize, via: MVia, f: Vec<u8>) {
        match via {
            MVia::Tcp => self.push_self(c, f),
            MVia::Udp(a) => self.dgrams.push((a, f)),
        }
    }

    fn deliver(&mut self, to: usize, via: MVia, f: &[u8]) -> bool {
        if let MVia::Udp(_) = via
            && let Some(a) = self.conns[to].udp
        {
            self.dgrams.push((a, f.to_vec()));
            return true;
        }
        let limit = self.settings.outbound_limit;
        self.conns[to].out.push(limit, Exp::Frame(f.to_vec()))
    }

    fn matching(&self, p: &MPat) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| self.conns[i].registered() && p.matches(&self.conns[i].identity))
            .collect()
    }

    fn route(&mut self, c: usize, op: Opcode, data: &[u8], via: MVia) {
        match op {
            Opcode::Command | Opcode::Echo => self.fan_out(c, op, data, via),
            Opcode::CommandResponse => self.respond(c, data, via),
            _ => self.who(c, data, via),
        }
    }

    fn fan_out(&mut self, c: usize, op: Opcode, data: &[u8], via: MVia) {
        let Some(sp) = data.iter().position(|&b| b == b' ') else {
            return self.reply(c, via, error("expected: TARGET SP TEXT"));
        };
        let (target, text) = (&data[..sp], &data[sp + 1..]);
        let shown = String::from_utf8_lossy(target).into_owned();
        let p = match MPat::parse(target) {
            Ok(p) => p,
            Err(e) => return self.reply(c, via, error(&format!("bad target {shown}: {e}"))),
        };
        let identity = self.conns[c].identity.clone();
        if op == Opcode::Command {
            let rules = rules(&self.settings);
            let allowed = rules.is_empty()
                || rules.iter().any(|(from, to)| {
                    MPat::parse(from).unwrap().matches(&identity)
                        && to.iter().any(|t| MPat::parse(t).unwrap().covers(&p))
                });
            if !allowed {
                return self.reply(c, via, error(&format!("command not permitted: {shown}")));
            }
        }
        let id = if op == Opcode::Command {
            let conn = &mut self.conns[c];
            let id = (conn.shim.serial << 20) | (conn.seq & 0xFFFFF);
            conn.seq += 1;
            self.command_ids.push(id);
            id
        } else {
            0
        };
        let mut d = identity.into_bytes();
        d.push(b' ');
        if op == Opcode::Command {
            d.extend_from_slice(format!("{id} ").as_bytes());
        }
        d.extend_from_slice(text);
        let f = encoded(op, &d);
        let mut reached = 0;
        for to in self.matching(&p) {
            if (p.include_self || to != c) && self.deliver(to, via, &f) {
                reached += 1;
            }
        }
        if reached == 0 {
            return self.reply(c, via, error(&format!("no shim matches {shown}")));
        }
        self.reply(c, via, ack(id, reached));
    }

    fn respond(&mut self, c: usize, data: &[u8], via: MVia) {
        let (id_txt, text) = match data.iter().position(|&b| b == b' ') {
            Some(sp) => (&data[..sp], &data[sp + 1..]),
            None => (data, &[][..]),
        };
        let Some(id) = std::str::from_utf8(id_txt)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return self.reply(c, via, error("expected: ID SP RESPONSE"));
        };
        let serial = id >> 20;
        let Some(to) = (0..self.conns.len())
            .find(|&i| self.conns[i].registered() && self.conns[i].shim.serial == serial)
        else {
            return;
        };
        let mut d = id_txt.to_vec();
        d.push(b' ');
        d.extend_from_slice(self.conns[c].identity.as_bytes());
        d.push(b' ');
        d.extend_from_slice(text);
        let f = encoded(Opcode::CommandResponse, &d);
        self.deliver(to, via, &f);
    }

    fn who(&mut self, c: usize, data: &[u8], via: MVia) {
        if via != MVia::Tcp {
            return self.reply(c, via, error("Who is answered over TCP only"));
        }
        let p = if data.is_empty() {
            MPat::all()
        } else {
            match MPat::parse(data) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("bad pattern {}: {e}", String::from_utf8_lossy(data));
                    return self.reply(c, via, error(&msg));
                }
            }
        };
        let entries: Vec<Vec<u8>> = self
            .matching(&p)
            .into_iter()
            .map(|i| {
                let k = &self.conns[i];
                let udp = if k.udp.is_some() { "udp" } else { "-" };
                let d = format!("{} {} {udp}", k.identity, k.shim.connected_unix_ms);
                encoded(Opcode::WhoEntry, d.as_bytes())
            })
            .collect();
        let a = ack(0, entries.len() as u64);
        let e = Exp::Listing(entries, a);
        let limit = self.settings.outbound_limit.max(e.len());
        self.conns[c].out.push(limit, e);
    }

    // --- UDP ------------------------------------------------------------------------

    fn datagram(&mut self, src: SocketAddr, d: &[u8]) {
        let pending_before: Vec<usize> =
            self.conns.iter().map(|k| k.shim.outbox.pending()).collect();
        let counters = self.hub.counters();
        let quits_before = counters.udp_quit_sent.load(Ordering::Relaxed)
            + counters.udp_quit_suppressed.load(Ordering::Relaxed);
        let was_bound = self.hub.table.by_udp(&src).is_some();
        let mut out = Outgoing::default();
        let now = self.now();
        udp::on_datagram(&self.hub, 0, &mut self.lim, src, d, now, &mut out);
        self.dgrams.clear();
        let quit_due = self.model_datagram(src, d);
        let counters = self.hub.counters();
        let quits_after = counters.udp_quit_sent.load(Ordering::Relaxed)
            + counters.udp_quit_suppressed.load(Ordering::Relaxed);

        let mut got: Vec<(SocketAddr, Vec<u8>)> = out
            .datagrams
            .iter()
            .map(|(a, b)| (*a, b.to_vec()))
            .collect();
        for (a, b) in &got {
            check_frames(b, true).unwrap_or_else(|e| self.fail(format!("datagram to {a}: {e}")));
        }
        if !was_bound {
            // Never more bytes than arrived, never to anyone else.
            let total: usize = got.iter().map(|(_, b)| b.len()).sum();
            if got.iter().any(|(a, _)| *a != src) || total > d.len() {
                self.fail(format!("unbound source sent {} bytes got {got:?}", d.len()));
            }
        }
        if quits_after - quits_before != u64::from(quit_due) {
            self.fail(format!(
                "Quit due: {quit_due}, counted {}",
                quits_after - quits_before
            ));
        }
        if quit_due {
            let answered = got
                .iter()
                .filter(|(a, b)| *a == src && b[..] == QUIT)
                .count();
            if answered > 1 || got.len() != answered {
                self.fail(format!("expected at most one Quit, got {got:?}"));
            }
            let rate = u64::from(self.first.udp_quit_per_sec);
            let now_ms = self.now_ms();
            if answered == 1 {
                let e = self.quits.entry(src).or_insert((now_ms, 0));
                e.1 += 1;
                if e.1 > rate + (now_ms - e.0) * rate / 1000 {
                    let (first, n) = *e;
                    self.fail(format!(
                        "{n} Quits to {src} in {} ms at {rate}/s",
                        now_ms - first
                    ));
                }
            } else if rate > 0 && !self.quits.contains_key(&src) {
                self.fail(format!("first Quit to {src} withheld at {rate}/s"));
            }
            got.clear();
        }
        got.sort();
        let mut expect = std::mem::take(&mut self.dgrams);
        expect.sort();
        if got != expect {
            self.fail(format!("datagrams {got:?}, expected {expect:?}"));
        }
        self.check_flush(&pending_before, &out);
    }

    /// The model of `on_datagram`; returns whether a rate-limited Quit answer is due.
    fn model_datagram(&mut self, src: SocketAddr, d: &[u8]) -> bool {
        let bound = self.bindings.get(&src).copied();
        let one_frame =
            d.len() >= 2 && d[d.len() - 1] == NEWLINE && !d[..d.len() - 1].contains(&NEWLINE);
        let quit_due = d.len() >= QUIT.len();
        if d.len() > self.settings.max_frame || !one_frame {
            return bound.is_none() && quit_due;
        }
        let (op, data) = (d[0], &d[1..d.len() - 1]);
        let now_ms = self.now_ms();
        if op == Opcode::Session as u8 {
            let Some(c) = (0..self.conns.len())
                .find(|&i| self.conns[i].registered() && self.conns[i].shim.token.0[..] == *data)
            else {
                return quit_due;
            };
            self.bind(c, src);
            self.conns[c].last_seen_ms = now_ms;
            return false;
        }
        let Some(c) = bound else {
            return quit_due;
        };
        self.conns[c].last_seen_ms = now_ms;
        let via = MVia::Udp(src);
        let Some(known) = Opcode::from_byte(op) else {
            self.reply(c, via, error(&format!("unknown opcode 0x{op:02X}")));
            return false;
        };
        match known {
            Opcode::None | Opcode::Pong | Opcode::Quit => {}
            Opcode::Ping => self.reply(c, via, encoded(Opcode::Pong, data)),
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse | Opcode::Who => {
                self.route(c, known, data, via)
            }
            _ => {
                let msg = format!(
                    "opcode 0x{op:02X} ({}) is not accepted over UDP",
                    known.name()
                );
                self.reply(c, via, error(&msg));
            }
        }
        false
    }

    fn bind(&mut self, c: usize, src: SocketAddr) {
        if self.conns[c].udp == Some(src) {
            return;
        }
        if let Some(from) = self.conns[c].udp
            && self.bindings.get(&from) == Some(&c)
        {
            self.bindings.remove(&from);
        }
        self.conns[c].udp = Some(src);
        if let Some(other) = self.bindings.insert(src, c)
            && other != c
            && self.conns[other].udp == Some(src)
        {
            self.conns[other].udp = None;
        }
    }

    // --- Checks ---------------------------------------------------------------------

    /// Every shim whose outbox went from empty to not empty must be listed for a flush.
    fn check_flush(&self, before: &[usize], out: &Outgoing) {
        for (i, b) in before.iter().enumerate() {
            let k = &self.conns[i];
            if *b == 0
                && k.shim.outbox.pending() > 0
                && !out.flush.iter().any(|s| Arc::ptr_eq(s, &k.shim))
            {
                self.fail(format!(
                    "conn {i} was queued frames but not listed for a flush"
                ));
            }
        }
    }

    /// Takes what is queued for `c`, as its writer would, and compares it with the model.
    fn drain(&mut self, c: usize) {
        let mut got = Vec::new();
        let state = self.conns[c].shim.outbox.take(&mut got);
        let (expect, mstate) = self.conns[c].out.take();
        if state != mstate {
            self.fail(format!(
                "conn {c}: take() gave {state:?}, expected {mstate:?}"
            ));
        }
        let frames =
            check_frames(&got, false).unwrap_or_else(|e| self.fail(format!("conn {c}: {e}")));
        let mut i = 0;
        for e in &expect {
            match e {
                Exp::Frame(f) => {
                    if frames.get(i) != Some(f) {
                        self.fail(format!(
                            "conn {c}: frame {i} is {:?}, expected {:?}\n  got all:      {frames:?}\n  expected all: {expect:?}",
                            frames.get(i).map(|f| String::from_utf8_lossy(f)),
                            String::from_utf8_lossy(f)
                        ));
                    }
                    i += 1;
                }
                Exp::Listing(entries, a) => {
                    let n = entries.len();
                    let mut have: Vec<Vec<u8>> =
                        frames.get(i..i + n).map(<[_]>::to_vec).unwrap_or_default();
                    have.sort();
                    let mut want = entries.clone();
                    want.sort();
                    if have != want || frames.get(i + n) != Some(a) {
                        self.fail(format!(
                            "conn {c}: Who listing {:?}, expected {want:?} then {a:?}",
                            frames.get(i..)
                        ));
                    }
                    i += n + 1;
                }
            }
        }
        if i != frames.len() {
            self.fail(format!("conn {c}: unexpected frames {:?}", &frames[i..]));
        }
    }

    fn check(&mut self) {
        for c in 0..self.conns.len() {
            if self.conns[c].reads {
                self.drain(c);
            }
        }
        let hub = self.hub.clone();
        for (i, k) in self.conns.iter().enumerate() {
            let ob = &k.shim.outbox;
            let real = (ob.state(), ob.pending(), ob.reason());
            let model = (k.out.state, k.out.bytes, k.out.reason);
            if real != model {
                self.fail(format!(
                    "conn {i} outbox (state, bytes, reason) {real:?}, expected {model:?}"
                ));
            }
            if k.shim.is_identified() != k.identified
                || (k.identified && *k.shim.identity() != *k.identity)
            {
                self.fail(format!(
                    "conn {i} identity {:?}, expected {:?}",
                    k.shim.identity(),
                    k.identity
                ));
            }
            let by_token = hub.table.by_token(&k.shim.token);
            let by_serial = hub.table.by_serial(k.shim.serial);
            let found = |s: &Option<Arc<Shim>>| s.as_ref().is_some_and(|s| Arc::ptr_eq(s, &k.shim));
            if found(&by_token) != k.registered() || found(&by_serial) != k.registered() {
                self.fail(format!(
                    "conn {i} (registered {}, finished {}, closed {}) is in the table: by token {}, by serial {}",
                    k.registered(), k.finished, k.closed, found(&by_token), found(&by_serial)
                ));
            }
            if k.shim.udp_addr() != k.udp {
                self.fail(format!(
                    "conn {i} UDP address {:?}, expected {:?}",
                    k.shim.udp_addr(),
                    k.udp
                ));
            }
            if k.registered() {
                // Found under its own identity, segment by segment.
                let lit = Pattern {
                    segs: k
                        .identity
                        .split('.')
                        .map(|s| Seg::Lit(s.to_ascii_lowercase().into()))
                        .collect(),
                    include_self: true,
                };
                let mut hit = false;
                hub.router
                    .for_each_match(&lit, |s| hit |= Arc::ptr_eq(s, &k.shim));
                if !hit {
                    self.fail(format!("conn {i} not routable as {:?}", k.identity));
                }
            }
        }
        let mut routed = Vec::new();
        hub.router
            .for_each_match(&Pattern::all(), |s| routed.push(s.serial));
        routed.sort_unstable();
        let mut registered: Vec<u64> = self
            .conns
            .iter()
            .filter(|k| k.registered())
            .map(|k| k.shim.serial)
            .collect();
        registered.sort_unstable();
        if routed != registered || hub.table.len() != registered.len() {
            self.fail(format!(
                "router holds serials {routed:?}, table {} shims; registered: {registered:?}",
                hub.table.len()
            ));
        }
        if hub.table.udp_bound() != self.bindings.len() {
            self.fail(format!(
                "{} UDP bindings, expected {}",
                hub.table.udp_bound(),
                self.bindings.len()
            ));
        }
        for i in 0..3 {
            let a = udp_src(i);
            let real = hub.table.by_udp(&a).map(|s| s.serial);
            let model = self.bindings.get(&a).map(|&c| self.conns[c].shim.serial);
            if real != model {
                self.fail(format!("{a} bound to serial {real:?}, expected {model:?}"));
            }
        }
        if hub.connections() != self.open {
            self.fail(format!(
                "{} connections counted, {} open",
                hub.connections(),
                self.open
            ));
        }
    }

    /// Every client hangs up and reads what is left; nothing of them may remain.
    fn end(&mut self) {
        self.step = usize::MAX;
        for c in self.open_conns() {
            self.finish(c, CloseReason::Eof);
        }
        for c in 0..self.conns.len() {
            self.drain(c);
        }
        self.check();
        let mut routed = 0;
        self.hub
            .router
            .for_each_match(&Pattern::all(), |_| routed += 1);
        assert_eq!(
            (
                self.hub.table.len(),
                routed,
                self.hub.table.udp_bound(),
                self.hub.connections()
            ),
            (0, 0, 0, 0),
            "shims, routed shims, UDP bindings, connections left after every connection ended"
        );
    }
}

/// Splits bytes sent to a client into frames; they must be whole frames with
/// server-to-client opcodes (`one`: exactly one frame, as in a datagram).
fn check_frames(b: &[u8], one: bool) -> Result<Vec<Vec<u8>>, String> {
    if b.is_empty() {
        return if one {
            Err("empty datagram".into())
        } else {
            Ok(Vec::new())
        };
    }
    if b[b.len() - 1] != NEWLINE {
        return Err(format!(
            "bytes end inside a frame: {:?}",
            String::from_utf8_lossy(b)
        ));
    }
    let frames: Vec<Vec<u8>> = b
        .split_inclusive(|&x| x == NEWLINE)
        .map(<[u8]>::to_vec)
        .collect();
    if one && frames.len() != 1 {
        return Err(format!("a datagram holds {} frames", frames.len()));
    }
    for f in &frames {
        if f.len() < 2 || !SERVER_TO_CLIENT.contains(&f[0]) {
            return Err(format!(
                "frame {:?} is not one a server sends",
                String::from_utf8_lossy(f)
            ));
        }
    }
    Ok(frames)
}
