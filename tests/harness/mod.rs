//! The protocol core run against a reference model, with the invariants checked after
//! every step.
//!
//! Shared, as source, by the property tests (`tests/state_machine.rs`, proptest) and the
//! fuzz targets (`fuzz/fuzz_targets/`, libFuzzer): both generate the same [`Scenario`]s
//! and [`check_decode`] inputs, so a failure found by one can be replayed by the other.
//!
//! [`run`] drives one real [`Hub`] with several [`Connection`]s, UDP datagrams through
//! [`datagram::on_datagram`], timer sweeps, reloads and a graceful shutdown, calling
//! exactly what the drivers call (`src/driver/tasks.rs`): a read is handed to
//! `on_bytes` one slice at a time, and after each slice every outbox listed is flushed
//! and `Hub::finish` ends it; a datagram is admitted, handled, its outboxes flushed, its
//! datagrams sent and its slice finished; the sweeper calls `Hub::sweep` with each
//! connection's two-sweeps flag; a shutdown calls `Hub::quit_all`; an ended reader calls
//! `Connection::finish`, then detaches the socket and releases the source; the core's
//! relay state loop (`state_loop`) runs `Hub::state_tick` after every step and between
//! two sweeps, flushing what it lists and sending its datagrams. Each outbox is
//! attached to a fake socket ([`FakeSocket`]) that takes everything when its client
//! reads at once and is full when it does not; the client's reading is the writer task
//! (take, write, `wrote`).
//!
//! Next to it runs a model written from `docs/protocol.md` (`model.rs`). Anything the two
//! disagree on, and any broken invariant (`check.rs`: a frame cut in two, a
//! client-to-server opcode sent to a client, a dead shim still routable, an amplified UDP
//! answer, a counter off, two live shims under one identity, an identity outside the
//! grammar or its user's patterns, an answer from a shim that was not sent the Command, a
//! subscriber's copy of what it watches out of order or, once settled, not the model's
//! state), panics with the step number and what differed.
//!
//! The parts, each in its own file so that one can be read without the others:
//!
//! - `scenario.rs`: what a scenario is (the types the generators build) and the hub's
//!   settings for it;
//! - `decode.rs`: the decoders against their definitions (all the `decode` fuzz target
//!   needs);
//! - `pattern.rs`: the model's own identity grammar and target patterns;
//! - `target.rs`: the model's own targets: a pattern and filters on relay state;
//! - `model.rs`: the model;
//! - `state.rs`: relay state in the model (Set, Subscribe, Unsubscribe, Get, Presence),
//!   and the subscribers' copies of what they watch;
//! - `check.rs`: the comparisons and invariants;
//! - this file: the real hub and the model side by side, and the driving of both.
// Each user (the property tests, two fuzz targets) needs a different part of it.
#![allow(dead_code, unused_imports)]

mod check;
mod decode;
mod model;
mod pattern;
mod scenario;
mod state;
mod target;

pub use check::check_reject_texts;
pub use decode::check_decode;
pub use scenario::{
    BAD_PATTERNS, Body, COMMON, FILTERS, INTERVALS, Item, KEYS, LABEL, MAX_CONNS, ODD, Piece,
    SECRET, SECRETS, SHORT_FILTER, SIDS, Scenario, Settings, Step, TAG_KEYS, USERS, UserSpec,
    VALID_FILTERS, WORDS, label, name,
};
pub use velium_server::config::DuplicateIdentity;
pub use velium_server::hub::shim::CloseReason;

use model::{MBucket, MCounts, MOutbox, MRates, MSlice, MUser, model_users};
use scenario::{UserDef, config, shared_secret, tcp_ip, udp_src, users};
use state::{MKey, MSub, Subscriber};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use velium_server::hub::connection::{Connection, Flow, Input};
use velium_server::hub::datagram::{self, QuitLimiter};
use velium_server::hub::outbox::{OutState, SocketOps};
use velium_server::hub::send::{Class, Datagram};
use velium_server::hub::shim::Shim;
use velium_server::hub::{Effects, Hub};
use velium_server::metrics::Refusal;
use velium_server::proto::{CR, NEWLINE, Opcode};

// ---------------------------------------------------------------------------------------
// The client sockets
// ---------------------------------------------------------------------------------------

/// The client end of one connection's socket, as the outbox's [`SocketOps`] see it.
#[derive(Debug, Default)]
struct FakeSocket {
    /// Whether the client reads at once (the socket always has room) or not (it is full).
    reads: bool,
    /// What straight sends from a flush wrote, not yet read by the client.
    got: Vec<u8>,
    /// Shut down by a cut-off.
    shut: bool,
}

thread_local! {
    /// The sockets of the scenario running on this thread, by (made-up) descriptor.
    static SOCKETS: RefCell<HashMap<RawFd, FakeSocket>> = RefCell::new(HashMap::new());
}

fn fake_send(fd: RawFd, b: &[u8]) -> io::Result<usize> {
    SOCKETS.with(|s| {
        let mut s = s.borrow_mut();
        let k = s
            .get_mut(&fd)
            .unwrap_or_else(|| panic!("send on descriptor {fd}, which is not attached"));
        assert!(!k.shut, "send on descriptor {fd} after it was shut down");
        if k.reads {
            k.got.extend_from_slice(b);
            Ok(b.len())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    })
}

fn fake_shutdown(fd: RawFd) {
    SOCKETS.with(|s| {
        if let Some(k) = s.borrow_mut().get_mut(&fd) {
            k.shut = true;
        }
    });
}

static SOCKET_OPS: SocketOps = SocketOps {
    send: fake_send,
    shutdown: fake_shutdown,
};

/// The descriptor connection `c` is given (never a real one: only the fakes see it).
fn fd_of(c: usize) -> RawFd {
    1000 + c as RawFd
}

// ---------------------------------------------------------------------------------------
// The world: the real hub and the model side by side
// ---------------------------------------------------------------------------------------

/// A connection: the real one and its model.
struct Conn {
    real: Connection,
    shim: Arc<Shim>,
    /// The sweeper's two-sweeps flag for the real connection.
    flag: Cell<bool>,
    ip: IpAddr,
    reads: bool,
    finished: bool,
    // The model:
    /// An unfinished frame kept between reads.
    rx: Vec<u8>,
    /// Bytes have arrived (the first byte decides the transport).
    spoke: bool,
    /// A valid Auth came before the first Identify.
    authed: bool,
    /// The user it authenticated as (name and the secret it presented): the last valid
    /// Auth before the first Identify.
    user: Option<(&'static str, &'static [u8])>,
    identified: bool,
    identity: String,
    /// Holds its identity in the router (it loses it when closed, or when another shim
    /// takes it while it is closing).
    routed: bool,
    /// Every identity it held, for the check of forwarded answers.
    names: Vec<String>,
    /// The ids of the Commands it may answer: the last `answer_window` sent to it.
    answerable: VecDeque<u64>,
    /// The ids of every Command it was sent.
    delivered: Vec<u64>,
    /// `Hub::remove` has run for it (by a timer or `finish`).
    closed: bool,
    seq: u64,
    accepted_ms: u64,
    last_seen_ms: u64,
    udp: Option<SocketAddr>,
    out: MOutbox,
    /// The model's two-sweeps flag.
    flagged: bool,
    /// The model's per-shim rate buckets.
    rates: MRates,
    /// Every frame the client read, for the [`Report`].
    received: Vec<Vec<u8>>,
    /// The last Terms frame queued for it (empty before its Session).
    terms: Vec<u8>,
    /// The shim's relay state: its keys in the order first set, and its SEQ.
    state: Vec<MKey>,
    state_seq: u64,
    /// The keys it deleted, the last `state_keys` of them (as the hub keeps them for
    /// deltas).
    tombs: Vec<String>,
    /// The subscriptions the connection holds, in the order made.
    subs: Vec<MSub>,
    /// Its Set rate bucket, made at its first Set.
    sets: Option<MBucket>,
    /// The client's side of relay state: its copy of what it watches.
    client: Subscriber,
}

impl Conn {
    /// In the session table and the router.
    fn registered(&self) -> bool {
        self.identified && !self.closed
    }
}

/// The real hub and the model side by side.
pub struct World {
    hub: Arc<Hub>,
    lim: QuitLimiter,
    /// The UDP loop's `Effects`, kept across datagrams as the driver keeps it.
    udp_out: Effects,
    t0: Instant,
    elapsed_ms: u64,
    first: Settings,
    settings: Settings,
    /// The users of `settings`, as the model reads them.
    users: Vec<MUser>,
    conns: Vec<Conn>,
    bindings: HashMap<SocketAddr, usize>,
    open: usize,
    shutting_down: bool,
    command_ids: Vec<u64>,
    /// Per source IP: (first attempt ms, attempts that passed the rate check).
    attempts: HashMap<IpAddr, (u64, u64)>,
    /// Per UDP source: (first Quit ms, Quits sent).
    quits: HashMap<SocketAddr, (u64, u64)>,
    /// Datagrams the model expects from the current datagram.
    dgrams: Vec<(SocketAddr, Vec<u8>, Class)>,
    /// Connections the model expects listed for a flush by the current slice.
    listed: Vec<usize>,
    /// What the current slice did to the queues.
    slice: MSlice,
    counts: MCounts,
    /// Every datagram sent, for the [`Report`].
    sent: Vec<(SocketAddr, Vec<u8>)>,
    step: usize,
    /// The `Effects` of the core's relay state tick, kept across ticks as the driver's
    /// `state_loop` keeps its own.
    tick_out: Effects,
    /// The latest time the hub was handed (by a slice, a datagram or a tick): what it
    /// times frames queued outside any of them with.
    clock_ms: u64,
    /// Connections whose outboxes were queued frames outside any slice since the last
    /// tick, which flushes them.
    tick_flush: Vec<usize>,
    /// TCP bytes the hub may have counted that the model cannot know (queued just before
    /// a cut-off in an order the model does not see), reconciled at the next check.
    tcp_slack: u64,
    /// Groups of frames queued in an order the hub chooses, numbered.
    groups: u64,
    /// Connections a reload is revoking: each with its queued bytes before and the bytes
    /// of the leaves that may reach it first.
    revoking: Vec<(usize, usize, usize)>,
}

/// What the clients of a scenario saw, for tests that pin an outcome.
#[derive(Debug)]
pub struct Report {
    /// Per connection, in the order accepted: every frame its client read but the Terms
    /// (after each Session, and again after a reload that changed them: checked against
    /// the model at every step, and left out here so that tests pin outcomes by their
    /// place among the others), and why the connection ended.
    pub conns: Vec<(Vec<Vec<u8>>, Option<CloseReason>)>,
    /// Every datagram the hub sent, with its destination.
    pub datagrams: Vec<(SocketAddr, Vec<u8>)>,
}

/// Runs `s` and checks every invariant after every step; panics on the first violation.
pub fn run(s: &Scenario) -> Report {
    let mut w = World::new(&s.settings);
    for (i, step) in s.steps.iter().enumerate() {
        w.step = i;
        w.apply(step);
        // The core's relay state loop, woken by whatever the step queued for it.
        w.tick();
        w.check();
    }
    w.end();
    Report {
        conns: w
            .conns
            .iter_mut()
            .map(|k| {
                let mut got = std::mem::take(&mut k.received);
                got.retain(|f| f.first() != Some(&(Opcode::Terms as u8)));
                (got, k.shim.outbox.reason())
            })
            .collect(),
        datagrams: std::mem::take(&mut w.sent),
    }
}

impl World {
    fn new(s: &Settings) -> World {
        SOCKETS.with(|k| k.borrow_mut().clear());
        let hub = Hub::new(config(s, s));
        World {
            lim: QuitLimiter::new(s.udp_quit_per_sec),
            udp_out: Effects::default(),
            hub,
            t0: Instant::now(),
            elapsed_ms: 0,
            first: s.clone(),
            settings: s.clone(),
            users: model_users(s),
            conns: Vec::new(),
            bindings: HashMap::new(),
            open: 0,
            shutting_down: false,
            command_ids: Vec::new(),
            attempts: HashMap::new(),
            quits: HashMap::new(),
            dgrams: Vec::new(),
            listed: Vec::new(),
            slice: MSlice::default(),
            counts: MCounts::default(),
            sent: Vec::new(),
            step: 0,
            tick_out: Effects::default(),
            clock_ms: 0,
            tick_flush: Vec::new(),
            tcp_slack: 0,
            groups: 0,
            revoking: Vec::new(),
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

    /// The connection serving `shim`.
    fn conn_of(&self, shim: &Arc<Shim>) -> usize {
        self.conns
            .iter()
            .position(|k| Arc::ptr_eq(&k.shim, shim))
            .unwrap_or_else(|| self.fail(format!("{shim:?} is no connection of this hub")))
    }

    /// The user a [`Body::Auth`] or [`Body::As`] with `user` stands for: `USERS[user % 3]`
    /// when the hub has it, else the hub's `user % n`-th; none on a hub without users.
    fn pick_user(&self, user: u8) -> Option<UserDef> {
        let all = users(&self.settings);
        let want = USERS[usize::from(user) % USERS.len()];
        all.iter()
            .find(|d| d.name == want)
            .or_else(|| all.get(usize::from(user) % all.len().max(1)))
            .cloned()
    }

    /// A target made from the identity of the `pick`-th connection that holds one (the
    /// [`label`] of `pick` when none does), by `how % 8` (see [`Body::At`]).
    fn target_of(&self, pick: u8, how: u8) -> String {
        let held: Vec<&str> = self
            .conns
            .iter()
            .filter(|k| k.routed)
            .map(|k| k.identity.as_str())
            .collect();
        let id = match held.len() {
            0 => String::from_utf8(label(&[pick])).expect("ASCII"),
            n => held[usize::from(pick) % n].to_string(),
        };
        let (first, rest) = id.split_once('.').unwrap_or((&id, ""));
        let head = id.rsplit_once('.').map_or("", |(head, _)| head);
        match how % 8 {
            0 | 1 => id.clone(),
            2 => id.to_ascii_uppercase(),
            3 if head.is_empty() => "*".into(),
            3 => format!("{head}.*"),
            4 => format!("{first}.>"),
            5 => ">".into(),
            6 => format!("+{id}"),
            _ if rest.is_empty() => "*".into(),
            _ => format!("*.{rest}"),
        }
    }

    /// The bytes of `p`, sent by connection `from` (when known: a TCP read, or a datagram
    /// from a bound address).
    fn piece_bytes(&self, p: &Piece, from: Option<usize>, out: &mut Vec<u8>) {
        match p {
            Piece::Raw(b) => out.extend_from_slice(b),
            Piece::Frame { op, body, crlf } => {
                out.push(*op);
                self.body_bytes(body, from, &[], out);
                if *crlf {
                    out.push(CR);
                }
                out.push(NEWLINE);
            }
        }
    }

    /// The data of a frame with `body`, sent by connection `from`; `filters` (`,FILTER`
    /// each) follows the target of a body that has one.
    fn body_bytes(&self, body: &Body, from: Option<usize>, filters: &[u8], out: &mut Vec<u8>) {
        let strip = |b: &[u8]| {
            b.iter()
                .copied()
                .filter(|&x| x != NEWLINE)
                .collect::<Vec<u8>>()
        };
        match body {
            Body::Bytes(b) => out.extend(strip(b)),
            Body::Name(b) => {
                out.extend(strip(b));
                out.extend_from_slice(filters);
            }
            Body::Filtered { body, filters } => {
                let mut more = Vec::new();
                for &f in filters {
                    more.push(b',');
                    more.extend_from_slice(FILTERS[usize::from(f) % FILTERS.len()]);
                }
                self.body_bytes(body, from, &more, out);
            }
            Body::As { user, pick } => {
                let mut k = usize::from(*pick);
                let mut seg = |two: &mut bool| {
                    k = k * 5 + 1;
                    *two = k % 2 == 0;
                    LABEL[k / 3 % LABEL.len()].as_bytes()
                };
                let mut two = false;
                let id = match self.pick_user(*user) {
                    None => label(&[*pick, *pick / 3, *pick / 9][..1 + *pick as usize % 3]),
                    Some(d) => {
                        let p = &d.identities[usize::from(*pick) % d.identities.len()];
                        let mut v = Vec::new();
                        for (i, part) in p.split(|&b| b == b'.').enumerate() {
                            if i > 0 {
                                v.push(b'.');
                            }
                            match part {
                                b"*" => v.extend_from_slice(seg(&mut two)),
                                b">" => {
                                    v.extend_from_slice(seg(&mut two));
                                    if two {
                                        v.push(b'.');
                                        v.extend_from_slice(seg(&mut two));
                                    }
                                }
                                lit => v.extend_from_slice(lit),
                            }
                        }
                        v
                    }
                };
                out.extend(strip(&id));
            }
            Body::At { pick, how, text } => {
                out.extend_from_slice(self.target_of(*pick, *how).as_bytes());
                out.extend_from_slice(filters);
                if let Some(text) = text {
                    out.push(b' ');
                    out.extend(strip(text));
                }
            }
            Body::Routed { target, text } => {
                out.extend(strip(target));
                out.extend_from_slice(filters);
                out.push(b' ');
                out.extend(strip(text));
            }
            Body::Response { pick, form, text } => {
                let mine = from
                    .map(|c| &self.conns[c].delivered)
                    .filter(|d| !d.is_empty() && (*form / 8).is_multiple_of(2));
                let ids = mine.unwrap_or(&self.command_ids);
                // The latest first, so that small windows are hit and missed.
                let id = match ids.len() {
                    0 => u64::from(*pick),
                    n => ids[n - 1 - usize::from(*pick) % n],
                };
                let written = match form % 8 {
                    0..=3 => id.to_string(),
                    4 => format!("0{id}"),
                    5 => "0".to_string(),
                    6 => format!("+{id}"),
                    _ => format!("{}{}", u64::MAX, id % 10),
                };
                out.extend_from_slice(written.as_bytes());
                out.push(b' ');
                out.extend(strip(text));
            }
            Body::Token(n) => {
                let live: Vec<&Conn> = self.conns.iter().filter(|k| k.registered()).collect();
                let n = *n as usize;
                match (live.len(), self.conns.len()) {
                    (0, 0) => out.extend_from_slice(&[b'x'; 16]),
                    (0, all) => out.extend_from_slice(&self.conns[n % all].shim.token.0),
                    (live_n, _) => out.extend_from_slice(&live[n % live_n].shim.token.0),
                }
            }
            Body::Auth { user, key } => {
                let named = |name: &str, secret: &[u8]| {
                    let mut v = name.as_bytes().to_vec();
                    v.push(b' ');
                    v.extend_from_slice(secret);
                    v
                };
                let u = usize::from(*user);
                let other = SECRETS[usize::from(*key) / 8 % SECRETS.len()];
                let data = match key % 8 {
                    0..=3 if shared_secret(&self.settings) => SECRET.to_vec(),
                    0..=3 => match self.pick_user(*user) {
                        Some(d) => named(d.name, d.secret),
                        None => named(USERS[u % USERS.len()], SECRETS[u % SECRETS.len()]),
                    },
                    4 => named(USERS[u % USERS.len()], other),
                    5 if u % 2 == 0 => other.to_vec(),
                    5 => SECRET.to_vec(),
                    6 => named("nobody", SECRET),
                    _ => named(USERS[u % USERS.len()], b"wrong"),
                };
                out.extend(strip(&data));
            }
            Body::Set(items) => World::set_bytes(items, out),
            Body::Subscribe {
                sid,
                interval,
                pick,
                how,
                keys,
            } => {
                World::subscribe_head(*sid, *interval, *how, out);
                self.query_bytes(false, *pick, *how, keys, filters, out);
            }
            Body::Unsubscribe(sid) => {
                out.extend_from_slice(SIDS[usize::from(*sid) % SIDS.len()].as_bytes())
            }
            Body::Get { pick, how, keys } => {
                self.query_bytes(true, *pick, *how, keys, filters, out)
            }
        }
    }

    fn apply(&mut self, step: &Step) {
        match step {
            Step::Connect { source, reads } => self.connect(tcp_ip(*source), *reads),
            Step::Join {
                source,
                reads,
                pieces,
            } => {
                let n = self.conns.len();
                self.connect(tcp_ip(*source), *reads);
                if self.conns.len() > n {
                    let mut bytes = Vec::new();
                    for p in pieces {
                        self.piece_bytes(p, Some(n), &mut bytes);
                    }
                    if !bytes.is_empty()
                        && let Flow::Close(r) = self.read(n, &bytes)
                    {
                        self.finish(n, r);
                    }
                }
            }
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
                    self.piece_bytes(p, Some(c), &mut bytes);
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
            Step::Udp {
                source,
                pieces,
                newline,
            } => {
                let src = udp_src(*source);
                let from = self.bindings.get(&src).copied();
                let mut bytes = Vec::new();
                for p in pieces {
                    self.piece_bytes(p, from, &mut bytes);
                }
                if !newline && bytes.last() == Some(&NEWLINE) {
                    bytes.pop();
                }
                self.datagram(src, &bytes);
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
            Step::Advance { ms, sweeps } => {
                self.elapsed_ms += u64::from(*ms);
                for _ in 0..*sweeps {
                    self.sweep();
                    // The relay state loop runs between two runs of the sweeper.
                    self.tick();
                }
            }
            Step::Settle => self.settle(),
            Step::Reload(s) => {
                self.hub.reload(config(s, &self.first));
                self.model_reload(s);
                self.learn_revoked();
            }
            Step::Shutdown => {
                if !self.shutting_down {
                    // Each core's shutdown task: Quit to every connection it serves.
                    self.hub.begin_shutdown();
                    self.shutting_down = true;
                    let shims: Vec<Arc<Shim>> = self
                        .open_conns()
                        .into_iter()
                        .map(|c| self.conns[c].shim.clone())
                        .collect();
                    self.hub.quit_all(shims.iter());
                    self.model_shutdown();
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
        let c = self.conns.len();
        let peer = SocketAddr::new(ip, 5000 + c as u16);
        // What `serve` does: accept, attach the socket, start the writer.
        let real = Connection::accept(&self.hub, 0, peer, now);
        let shim = real.shim().clone();
        SOCKETS.with(|s| {
            s.borrow_mut().insert(
                fd_of(c),
                FakeSocket {
                    reads,
                    ..FakeSocket::default()
                },
            )
        });
        shim.outbox.attach(fd_of(c), &SOCKET_OPS);
        self.conns.push(Conn {
            real,
            shim,
            flag: Cell::new(false),
            ip,
            reads,
            finished: false,
            rx: Vec::new(),
            spoke: false,
            authed: false,
            user: None,
            identified: false,
            identity: String::new(),
            routed: false,
            names: Vec::new(),
            answerable: VecDeque::new(),
            delivered: Vec::new(),
            closed: false,
            seq: 0,
            accepted_ms: now_ms,
            last_seen_ms: now_ms,
            udp: None,
            out: MOutbox::new(),
            flagged: false,
            rates: self.new_rates(now_ms),
            received: Vec::new(),
            terms: Vec::new(),
            state: Vec::new(),
            state_seq: 0,
            tombs: Vec::new(),
            subs: Vec::new(),
            sets: None,
            client: Subscriber::default(),
        });
    }

    /// The reader of `c` ended for `reason`: what `serve` does after its loop.
    fn finish(&mut self, c: usize, reason: CloseReason) {
        let got = self.conns[c].real.finish(&self.hub, reason);
        // (The writer flushes the last frame: the client reads it at its next drain.)
        self.conns[c].shim.outbox.detach();
        self.hub.release(self.conns[c].ip);
        self.open -= 1;
        let stands = self.model_finish(c, reason);
        if got != stands {
            self.fail(format!(
                "finish({reason:?}) of conn {c} gave {got:?}, expected {stands:?}"
            ));
        }
    }

    /// One run of the sweeper over every connection the core still serves (a finished
    /// one has left the driver's list).
    fn sweep(&mut self) {
        let now = self.now();
        let now_ms = self.now_ms();
        for c in 0..self.conns.len() {
            let k = &self.conns[c];
            if k.finished {
                continue;
            }
            if k.out.state == OutState::Open {
                let expired = self.hub.expired(&k.shim, now);
                let due = self.due(c, now_ms);
                if expired != due {
                    self.fail(format!(
                        "conn {c}: expired() gave {expired:?}, expected {due:?}"
                    ));
                }
            }
            self.hub.sweep(&k.shim, &k.flag, now);
            self.model_sweep(c);
            let k = &self.conns[c];
            if k.flag.get() != k.flagged {
                self.fail(format!(
                    "conn {c}: the two-sweeps flag is {}, expected {}",
                    k.flag.get(),
                    k.flagged
                ));
            }
        }
    }

    // --- TCP input ------------------------------------------------------------------

    /// One read of `data` on `c`: slice after slice, each carried out, as `serve` does.
    fn read(&mut self, c: usize, data: &[u8]) -> Flow {
        let now = self.now();
        // `handle`: the transport first (`Connection::receive`); these hubs have no TLS, so
        // only a first byte 0x16 (a TLS ClientHello) changes anything.
        let input = self.conns[c].real.receive(&self.hub, data, now);
        let expect = self.model_receive(c, data);
        match (input, expect) {
            (Input::Plain, None) => {}
            (Input::Close(r), Some(e)) if r == e => {
                let hub = self.hub.clone();
                let out = self.conns[c].real.effects();
                hub.finish(0, out, now);
                return Flow::Close(r);
            }
            (got, want) => self.fail(format!(
                "receive on conn {c} gave {got:?}, expected {want:?}"
            )),
        }
        let mut off = 0;
        loop {
            let before = self.pending();
            self.listed.clear();
            let got = self.conns[c].real.on_bytes(&self.hub, &data[off..], now);
            let stop = (got.0 == Flow::Continue && got.1 < data.len() - off).then_some(got.1);
            let expect = self.model_slice(c, &data[off..], stop);
            if got != expect {
                self.fail(format!(
                    "on_bytes on conn {c} with {} bytes (of {}) gave {got:?}, expected {expect:?}",
                    data.len() - off,
                    data.len()
                ));
            }
            // What the slice delivered at its end (relay state), learned.
            let mut listed = std::mem::take(&mut self.listed);
            self.learn(&mut listed);
            self.listed = listed;
            let out = self.conns[c].real.effects();
            // TCP input is answered over TCP, but the relay state it changed may go to
            // subscribers over UDP.
            let sent = std::mem::take(&mut out.datagrams);
            let flushed = out.flush.clone();
            self.sent_state(sent);
            self.check_flush(&before, &flushed);
            // `carry_out`: flush each listed outbox once, end the slice, and (as no time
            // passes here) stop waiting for congested recipients at once.
            let hub = self.hub.clone();
            let now_ms = hub.ms(now);
            let out = self.conns[c].real.effects();
            for shim in out.flush.drain(..) {
                shim.outbox.flush(now_ms);
            }
            hub.finish(0, out, now);
            if hub.congested(out, now_ms) {
                out.release_congested();
            }
            for i in std::mem::take(&mut self.listed) {
                self.model_flush(i);
            }
            let (flow, used) = got;
            off += used;
            if flow != Flow::Continue || off >= data.len() {
                return flow;
            }
            if used == 0 {
                self.fail(format!("on_bytes on conn {c} took nothing and went on"));
            }
        }
    }

    /// Pending bytes of every outbox.
    fn pending(&self) -> Vec<usize> {
        self.conns.iter().map(|k| k.shim.outbox.pending()).collect()
    }

    // --- UDP ------------------------------------------------------------------------

    /// One datagram from `src`, as the UDP loop handles it.
    fn datagram(&mut self, src: SocketAddr, d: &[u8]) {
        let before = self.pending();
        let counters = self.hub.counters();
        let quits_before = counters.udp_quit_sent.load(Ordering::Relaxed)
            + counters.udp_quit_suppressed.load(Ordering::Relaxed);
        let was_bound = self.hub.table.by_udp(&src).is_some();
        let now = self.now();
        if !self.hub.admit_datagram(src, now) {
            self.fail(format!("datagram from {src} not admitted"));
        }
        datagram::on_datagram(&self.hub, &mut self.lim, src, d, now, &mut self.udp_out);
        self.dgrams.clear();
        self.listed.clear();
        let quit_due = self.model_datagram(src, d);
        let mut listed = std::mem::take(&mut self.listed);
        self.learn(&mut listed);
        self.listed = listed;
        let counters = self.hub.counters();
        let quits = counters.udp_quit_sent.load(Ordering::Relaxed)
            + counters.udp_quit_suppressed.load(Ordering::Relaxed)
            - quits_before;
        // What the loop sends (`send_datagrams`), then its flushes and the end of the slice.
        // Relay state deliveries (State frames to subscribers) are checked by the
        // subscribers, the rest against the model.
        let (state, sent): (Vec<Datagram>, Vec<Datagram>) =
            std::mem::take(&mut self.udp_out.datagrams)
                .into_iter()
                .partition(|g| g.frame.first() == Some(&0x10) && g.class == Class::Delivery);
        self.sent_state(state);
        (self.sent).extend(sent.iter().map(|g| (g.to, g.frame.to_vec())));
        let flushed = self.udp_out.flush.clone();
        self.check_datagrams(src, d, was_bound, quit_due, quits, sent);
        self.check_flush(&before, &flushed);
        let now_ms = self.hub.ms(now);
        for shim in self.udp_out.flush.drain(..) {
            shim.outbox.flush(now_ms);
        }
        self.hub.finish(0, &mut self.udp_out, now);
        self.udp_out.release_congested();
        for i in std::mem::take(&mut self.listed) {
            self.model_flush(i);
        }
    }

    // --- Relay state ----------------------------------------------------------------

    /// Datagrams a slice or a tick sent: relay state deliveries only, to subscribers.
    fn sent_state(&mut self, sent: Vec<Datagram>) {
        let mut state = Vec::new();
        for g in sent {
            if g.class != Class::Delivery || g.frame.first() != Some(&0x10) {
                self.fail(format!("a datagram that is no State delivery: {g:?}"));
            }
            self.sent.push((g.to, g.frame.to_vec()));
            state.push((g.to, g.frame.to_vec()));
        }
        self.state_datagrams(state);
    }

    /// One run of the core's relay state loop at the current time (`state_loop` in
    /// `src/driver/tasks.rs`): the tick, its flushes and datagrams, the end of its slice.
    fn tick(&mut self) {
        let now = self.now();
        let now_ms = self.now_ms();
        // `Effects::begin` is the crate's: an empty datagram, which the hub drops at once
        // (counting a bad datagram, which the harness does not check), begins one at `now`.
        datagram::on_datagram(
            &self.hub,
            &mut self.lim,
            TICK_DOOR,
            &[],
            now,
            &mut self.tick_out,
        );
        self.clock_ms = self.clock_ms.max(now_ms);
        let before = self.pending();
        self.hub.state_tick(0, &mut self.tick_out);
        let mut listed = std::mem::take(&mut self.tick_flush);
        self.learn(&mut listed);
        let sent = std::mem::take(&mut self.tick_out.datagrams);
        self.sent_state(sent);
        // The tick flushes the outboxes queued outside a slice since the last one, and
        // those it queued first.
        let mut real: Vec<usize> = self
            .tick_out
            .flush
            .iter()
            .map(|s| self.conn_of(s))
            .collect();
        real.sort_unstable();
        real.dedup();
        let mut model = listed.clone();
        model.sort_unstable();
        model.dedup();
        if real != model {
            self.fail(format!(
                "conns {real:?} listed for a flush by the tick, expected {model:?}"
            ));
        }
        for (i, b) in before.iter().enumerate() {
            let k = &self.conns[i];
            if *b == 0
                && k.shim.outbox.pending() > 0
                && k.shim.outbox.is_open()
                && !model.contains(&i)
            {
                self.fail(format!(
                    "conn {i} was queued frames by the tick but not listed for a flush"
                ));
            }
        }
        for shim in self.tick_out.flush.drain(..) {
            shim.outbox.flush(now_ms);
        }
        self.hub.finish(0, &mut self.tick_out, now);
        self.tick_out.release_congested();
        for i in model {
            self.model_flush(i);
        }
    }

    /// Every client reads everything and the relay state loop runs, the clock moving on
    /// while a subscription waits no longer than [`state::SETTLE_MS`]; then every copy the
    /// subscribers hold must be the model's.
    fn settle(&mut self) {
        for _ in 0..64 {
            for c in 0..self.conns.len() {
                self.drain(c);
            }
            self.tick();
            match self.hub.state_next(0, self.now_ms()) {
                Some(ms) if ms <= state::SETTLE_MS => self.elapsed_ms += ms,
                _ => break,
            }
        }
        for c in 0..self.conns.len() {
            self.drain(c);
        }
        self.check_views();
    }
}

/// The source of the empty datagram that begins a tick's `Effects` (no client's).
const TICK_DOOR: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 9, 9)), 9);
