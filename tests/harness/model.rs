//! The reference model: what `docs/protocol.md` says the hub does, step by step, kept
//! beside the real hub by [`World`](super::World).
//!
//! Apart from the driving code (`mod.rs`) and the comparisons (`check.rs`) because it is
//! the part that must not be written from `src/`: it predicts every byte each shim's TCP
//! outbox receives (but for relay state deliveries, whose bytes it learns: `state.rs`,
//! which models relay state), every datagram sent (with its queue class), each
//! connection's flow and slice, the session table, the router, the UDP bindings, the
//! timers (with the two-sweeps rule), and the counters that follow from them. It decides *which* refusal a frame gets
//! on its own; only the bytes of an Error frame come from the core's
//! [`Reject::frame`], whose texts `check.rs` checks against §10 of the protocol.
//!
//! Who may be whom (§3 "Step 1b", "Step 2", "Renaming", "One shim per identity"; §7
//! "Users", "Command and CommandResponse"): the Auth forms, the identity grammar (the
//! model's own, `pattern.rs`), the identities a user may take, one live shim per identity
//! ignoring case under each `duplicate_identity` policy (the holder that is replaced sent
//! Quit and closed; one already closing losing its name without a word), what a user may
//! address and list, the answer window, and the credentials a reload revokes.
//!
//! Targets (§6): the model's own reading of a target (`target.rs`), refused by its first
//! fault; a Command, Echo or Who names the shims its pattern matches whose state passes
//! its filters as the model holds it when the frame is handled, and a user's permission
//! to send a Command or Echo is decided on the pattern alone.
//!
//! The per-shim rates are the token buckets of §8 ("Rate limits per shim"), with rates
//! kept as first set. Where one [`Connection::on_bytes`] call stops (a slice, §8) is the
//! hub's choice within the bounds §8 gives, which the model checks rather than predicts
//! ([`World::model_slice`]), so that tuning the slices does not break the harness.
//!
//! [`Connection::on_bytes`]: velium_server::hub::connection::Connection::on_bytes

use super::World;
use super::pattern::{MPat, check_label};
use super::scenario::{SECRET, Settings, shared_secret, users};
use super::target::MTarget;
use std::net::SocketAddr;
use std::time::Duration;
use velium_server::config::DuplicateIdentity;
use velium_server::hub::connection::Flow;
use velium_server::hub::outbox::OutState;
use velium_server::hub::send::Class;
use velium_server::hub::shim::CloseReason;
use velium_server::hub::timers::CLOSE_LINGER;
use velium_server::proto::reject::{self, Rate, Reject, Revoked, Shape};
use velium_server::proto::reply::Terms;
use velium_server::proto::{CR, NEWLINE, Opcode, QUIT, encoded};

/// The Terms frame a plaintext connection is sent under `s` (§3 "Step 3b").
pub(super) fn terms_frame(s: &Settings) -> Vec<u8> {
    let terms = Terms {
        idle_timeout_ms: s.idle_ms,
        ping_ms: s.idle_ms / 3,
        max_frame: s.max_frame as u64,
        outbound_limit: s.outbound_limit as u64,
        answer_window: s.answer_window as u64,
        features: ["state", "filters", "udp"].map(String::from).to_vec(),
    };
    let mut t = Vec::new();
    velium_server::proto::reply::terms(&terms, &mut t);
    t
}

/// Frames one `on_bytes` call handles at most (§8: "at most 1024 frames at a time").
pub(super) const SLICE_FRAMES: usize = 1024;

/// One expected entry on a TCP outbox.
#[derive(Clone, Debug)]
pub(super) enum Exp {
    /// One frame.
    Frame(Vec<u8>),
    /// A Who listing: WhoEntry frames in any order, then the Ack.
    Listing(Vec<Vec<u8>>, Vec<u8>),
    /// The answer to a Subscribe (`sid` not 0, asking for `keys`) or a Get: State `F`
    /// frames in any order, then the Ack.
    States {
        sid: u32,
        keys: Vec<String>,
        entries: Vec<Vec<u8>>,
        ack: Vec<u8>,
    },
    /// The Ack of an Unsubscribe of this SID.
    Unsubscribed(u32, Vec<u8>),
    /// A Presence frame, one of a group (by number) the hub queues in any order.
    Any(u64, Vec<u8>),
    /// Relay state deliveries: this many bytes of State and Presence frames, learned from
    /// the hub (`state.rs`).
    Async(usize),
}

impl Exp {
    pub(super) fn len(&self) -> usize {
        match self {
            Exp::Frame(f) | Exp::Unsubscribed(_, f) | Exp::Any(_, f) => f.len(),
            Exp::Listing(e, a)
            | Exp::States {
                entries: e, ack: a, ..
            } => e.iter().map(Vec::len).sum::<usize>() + a.len(),
            Exp::Async(n) => *n,
        }
    }
}

/// The model of one outbox and of the client socket behind it.
#[derive(Debug)]
pub(super) struct MOutbox {
    pub(super) state: OutState,
    /// Written straight to the socket by a flush, not yet read by the client.
    pub(super) sent: Vec<Exp>,
    /// Queued, not yet taken by the writer.
    pub(super) queued: Vec<Exp>,
    /// Bytes of `queued`.
    pub(super) bytes: usize,
    pub(super) reason: Option<CloseReason>,
    /// When output last made progress, or last went from idle to busy.
    pub(super) since_ms: u64,
    /// The socket was shut down by a cut-off.
    pub(super) shut: bool,
}

impl MOutbox {
    pub(super) fn new() -> MOutbox {
        MOutbox {
            state: OutState::Open,
            sent: Vec::new(),
            queued: Vec::new(),
            bytes: 0,
            reason: None,
            since_ms: 0,
            shut: false,
        }
    }

    /// Queues `e` at `now_ms`: `Some(first)` when queued (`first`: into an empty queue),
    /// `None` when closed or when this push passed `limit` and cut the shim off.
    pub(super) fn push(&mut self, limit: usize, e: Exp, now_ms: u64) -> Option<bool> {
        if self.state != OutState::Open {
            return None;
        }
        // The writer never holds bytes between steps, so an empty queue is an idle one.
        let first = self.bytes == 0;
        if first {
            self.since_ms = now_ms;
        }
        if self.bytes + e.len() > limit {
            self.cut(CloseReason::SlowConsumer);
            return None;
        }
        self.bytes += e.len();
        self.queued.push(e);
        Some(first)
    }

    /// Queues a last frame and closes; false (and nothing queued) when not open.
    fn close(&mut self, reason: CloseReason, last: &[u8]) -> bool {
        if self.state != OutState::Open {
            return false;
        }
        if !last.is_empty() {
            self.bytes += last.len();
            // The last frames may be more than one (a `closing:` Error, then Quit).
            for f in last.split_inclusive(|&b| b == NEWLINE) {
                self.queued.push(Exp::Frame(f.to_vec()));
            }
        }
        self.state = OutState::Closing;
        self.reason.get_or_insert(reason);
        true
    }

    /// Cuts the shim off: what was queued is dropped and the socket shut down at once
    /// (even after the writer took a closing connection's last frame).
    pub(super) fn cut(&mut self, reason: CloseReason) {
        self.reason.get_or_insert(reason);
        self.state = OutState::Kicked;
        self.queued.clear();
        self.bytes = 0;
        self.shut = true;
    }

    /// A flush at `now_ms` into a socket with room for everything.
    fn flush(&mut self, now_ms: u64) {
        if self.state == OutState::Open && self.bytes > 0 {
            self.sent.append(&mut self.queued);
            self.bytes = 0;
            self.since_ms = now_ms;
        }
    }

    /// The client reads everything at `now_ms`: what a flush sent, then what the writer
    /// takes and writes; with the state the writer's take saw.
    pub(super) fn take(&mut self, now_ms: u64) -> (Vec<Exp>, OutState) {
        let mut q = std::mem::take(&mut self.sent);
        q.append(&mut self.queued);
        self.bytes = 0;
        self.since_ms = now_ms;
        let s = self.state;
        if s == OutState::Closing {
            self.state = OutState::Kicked;
        }
        (q, s)
    }

    /// Output waiting, with no progress, for `deadline_ms`, on a socket not shut down.
    fn stalled(&self, now_ms: u64, deadline_ms: u64) -> bool {
        !self.shut && self.bytes > 0 && now_ms.saturating_sub(self.since_ms) >= deadline_ms
    }
}

/// One per-shim rate (§8 "Rate limits per shim"): a token bucket in thousandths of a
/// token, `rate` tokens a second, up to one second's worth, starting full. The rate is
/// fixed for a scenario, so the level depends only on what was taken and when.
#[derive(Clone, Copy, Debug)]
pub(super) struct MBucket {
    milli: i64,
    at_ms: u64,
}

impl MBucket {
    pub(super) fn full(rate: u32, now_ms: u64) -> MBucket {
        MBucket {
            milli: i64::from(rate) * 1000,
            at_ms: now_ms,
        }
    }

    /// Takes one token at `now_ms`; false (and nothing taken) when there is none.
    pub(super) fn take(&mut self, rate: u32, now_ms: u64) -> bool {
        if self.level(rate, now_ms) < 1000 {
            return false;
        }
        self.milli -= 1000;
        true
    }

    /// The level at `now_ms`.
    fn level(&mut self, rate: u32, now_ms: u64) -> i64 {
        let gained = (now_ms - self.at_ms) as i64 * i64::from(rate);
        self.milli = (self.milli + gained).min(i64::from(rate) * 1000);
        self.at_ms = now_ms;
        self.milli
    }
}

/// A shim's three buckets.
#[derive(Clone, Copy, Debug)]
pub(super) struct MRates {
    routed: MBucket,
    who: MBucket,
    deliveries: MBucket,
}

/// What a routed request counts as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Work {
    FanOut,
    Response,
    Who,
}

/// What the current slice did to its recipients' queues.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct MSlice {
    /// A queue pushed to in this slice is at a quarter of the outbound limit or more: the
    /// slice may end.
    pub(super) reached: bool,
    /// The same: the slice must end at this frame's end.
    pub(super) passed: bool,
}

/// The transport a request came in on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum MVia {
    Tcp,
    Udp(SocketAddr),
}

/// What the model counts that the hub's counters and histograms must agree with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct MCounts {
    /// Shims registered (first Identify), each a handshake latency sample.
    pub(super) identified: u64,
    /// Successful UDP binds (rebinds and repeats included), each a bind latency sample.
    pub(super) binds: u64,
    /// Routed frames handed to a shim.
    pub(super) deliveries: u64,
    /// CommandResponses whose Command's sender had gone or would not take it.
    pub(super) responses_dropped: u64,
    /// Shims closed as slow consumers.
    pub(super) slow_consumers: u64,
    /// Bytes of frames queued on TCP outboxes (last frames included).
    pub(super) tcp_out: u64,
    /// Bytes of datagrams sent, Quit answers to unbound sources left out.
    pub(super) udp_out: u64,
    /// Holders of an identity closed because a newer connection took it.
    pub(super) replaced: u64,
    /// Refusals counted by reason: `auth` (a wrong credential, or none where one is
    /// needed), `permission`, `identity`, `identity_in_use`, `answer`, `revoked`.
    pub(super) auth: u64,
    pub(super) permission: u64,
    pub(super) identity: u64,
    pub(super) in_use: u64,
    pub(super) answer: u64,
    pub(super) revoked: u64,
    /// TLS ClientHellos on these hubs without TLS.
    pub(super) tls_not_served: u64,
    /// Refusals of Sets past the state limits, and past the Set rate; of Subscribes past
    /// the subscriptions (or keys) a connection may have.
    pub(super) state_limit: u64,
    pub(super) state_rate: u64,
    pub(super) subscriptions: u64,
    /// Set frames applied, and the key changes they made.
    pub(super) state_sets: u64,
    pub(super) state_changes: u64,
}

/// A user as the model reads the settings: its secret and its patterns.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct MUser {
    pub(super) name: &'static str,
    pub(super) secret: &'static [u8],
    pub(super) identities: Vec<MPat>,
    pub(super) commands: Vec<MPat>,
    pub(super) echoes: Vec<MPat>,
    pub(super) who: Vec<MPat>,
    pub(super) state: Vec<MPat>,
}

impl MUser {
    /// Whether the user may take `identity` (§3).
    pub(super) fn may_be(&self, identity: &str) -> bool {
        self.identities.iter().any(|p| p.matches(identity))
    }
}

/// The users of `s`, by name (the order the hub compares them in on a reload).
pub(super) fn model_users(s: &Settings) -> Vec<MUser> {
    let parse = |v: &[Vec<u8>]| -> Vec<MPat> {
        v.iter()
            .map(|t| MPat::parse(t).expect("users() keeps parsable patterns"))
            .collect()
    };
    let mut v: Vec<MUser> = users(s)
        .into_iter()
        .map(|u| MUser {
            name: u.name,
            secret: u.secret,
            identities: parse(&u.identities),
            commands: parse(&u.commands),
            echoes: parse(&u.echoes),
            who: parse(&u.who),
            state: parse(&u.state),
        })
        .collect();
    v.sort_by_key(|u| u.name);
    v
}

/// What an Auth frame proves (§3 "Step 1b").
enum MAuth {
    /// The hub has no credentials.
    Ignored,
    /// The shared secret (`None`) or a user's name and secret.
    Granted(Option<(&'static str, &'static [u8])>),
    Failed,
}

pub(super) fn ack(id: u64, n: u64) -> Vec<u8> {
    encoded(Opcode::Ack, format!("{id} {n}").as_bytes())
}

pub(super) fn refusal(r: Reject) -> Vec<u8> {
    r.frame()
}

pub(super) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Splits a TCP frame (without its 0x0A) into opcode and data; a lone 0x0A is the empty
/// None frame, and a 0x0D ending the data is the CR of a CRLF line end.
fn split_frame(f: &[u8]) -> (u8, &[u8]) {
    match f.split_first() {
        None => (0, &[]),
        Some((&op, data)) => (op, data.strip_suffix(&[CR]).unwrap_or(data)),
    }
}

impl World {
    // --- TCP input ------------------------------------------------------------------

    /// The model of one `on_bytes` call: the flow and how many bytes of `data` it took.
    ///
    /// Where a slice ends is the hub's to choose (`stop`: the bytes the real call took,
    /// when it stopped before the end of `data` to let the driver carry out what it
    /// produced), within what §8 promises, which the model checks: a slice ends at the
    /// end of a frame, after at least one frame and at most [`SLICE_FRAMES`]; before that
    /// only once a recipient's queue reached a quarter of the outbound limit in it, and
    /// no later than the frame that took one past it. What the frames produce is compared
    /// in full either way.
    /// The model of `Connection::receive` on a hub without TLS: a connection whose first
    /// byte is 0x16 (a TLS ClientHello) is told so and closed; returns that close.
    pub(super) fn model_receive(&mut self, c: usize, data: &[u8]) -> Option<CloseReason> {
        let conn = &mut self.conns[c];
        if conn.spoke || data.is_empty() {
            return None;
        }
        conn.spoke = true;
        if data[0] != 0x16 || conn.closed || conn.out.state != OutState::Open {
            return None;
        }
        self.counts.tls_not_served += 1;
        self.close_out(c, CloseReason::TlsFailed, &refusal(Reject::TlsNotServed));
        Some(CloseReason::TlsFailed)
    }

    pub(super) fn model_slice(
        &mut self,
        c: usize,
        data: &[u8],
        stop: Option<usize>,
    ) -> (Flow, usize) {
        let now_ms = self.now_ms();
        let max = self.settings.max_frame;
        let conn = &mut self.conns[c];
        if conn.closed || conn.out.state != OutState::Open {
            // A timer, a cut-off or the shutdown closed the connection while these bytes
            // were on their way: they are dropped, and the reader ends with the reason
            // that stands.
            let r = *conn.out.reason.get_or_insert(CloseReason::Eof);
            return (Flow::Close(r), data.len());
        }
        conn.last_seen_ms = now_ms;
        // The slice starts the hub's clock there (`Effects::begin`).
        self.clock_ms = self.clock_ms.max(now_ms);
        self.slice = MSlice::default();
        // The unfinished frame kept from earlier reads, then this read.
        let held = conn.rx.len();
        let mut rx = std::mem::take(&mut conn.rx);
        rx.extend_from_slice(data);
        let stop = stop.map(|n| held + n);
        let mut at = 0;
        let mut last = 0;
        let mut frames = 0;
        loop {
            if let Some(stop) = stop {
                if at > stop {
                    self.fail(format!(
                        "a slice of conn {c} ended at byte {stop}, inside the frame at {last}..{at}"
                    ));
                }
                if at == stop {
                    if frames == 0 {
                        self.fail(format!("a slice of conn {c} ended before any frame"));
                    }
                    if frames < SLICE_FRAMES && !self.slice.reached {
                        self.fail(format!(
                            "a slice of conn {c} ended after {frames} frames, no queue at a quarter of the limit"
                        ));
                    }
                    // The driver carries the slice out and hands in the rest.
                    return (Flow::Continue, at - held);
                }
            }
            if stop.is_none() && self.slice.passed && at < rx.len() {
                self.fail(format!(
                    "a slice of conn {c} went on after a queue passed a quarter of the limit"
                ));
            }
            if self.conns[c].out.state != OutState::Open {
                // This connection's own replies cut it off.
                let r = *self.conns[c].out.reason.get_or_insert(CloseReason::Eof);
                return (Flow::Close(r), data.len());
            }
            match rx[at..].iter().position(|&b| b == NEWLINE) {
                Some(p) if p < max => {
                    if frames == SLICE_FRAMES {
                        self.fail(format!(
                            "a slice of conn {c} went on past {SLICE_FRAMES} frames"
                        ));
                    }
                    let (op, body) = split_frame(&rx[at..at + p]);
                    let body = body.to_vec();
                    last = at;
                    at += p + 1;
                    frames += 1;
                    if let Flow::Close(r) = self.model_frame(c, op, &body) {
                        return (Flow::Close(r), data.len());
                    }
                }
                _ if rx.len() - at >= max => {
                    self.close_out(c, CloseReason::Oversized, &refusal(Reject::TooLong(max)));
                    return (Flow::Close(CloseReason::Oversized), data.len());
                }
                _ => {
                    self.conns[c].rx = rx[at..].to_vec();
                    return (Flow::Continue, data.len());
                }
            }
        }
    }

    /// Queues `e` for `c` under `limit`; records the flush listing and the slice's bytes.
    pub(super) fn push(&mut self, c: usize, limit: usize, e: Exp) -> bool {
        let now_ms = self.now_ms();
        let len = e.len();
        match self.conns[c].out.push(limit, e, now_ms) {
            Some(first) => {
                if first {
                    self.listed.push(c);
                }
                let (after, high) = (self.conns[c].out.bytes, self.settings.outbound_limit / 4);
                // §8: the slice ends once a recipient's queue is past a quarter of the
                // limit, whether this push took it there or it was there already, while
                // that recipient is still draining (its output moved within 100 ms).
                let _ = len;
                let out = &self.conns[c].out;
                let draining =
                    out.state == OutState::Open && now_ms.saturating_sub(out.since_ms) < 100;
                self.slice.reached |= after >= high && draining;
                self.slice.passed |= after >= high && draining;
                self.counts.tcp_out += len as u64;
                true
            }
            None => false,
        }
    }

    pub(super) fn push_self(&mut self, c: usize, f: Vec<u8>) {
        let limit = self.settings.outbound_limit;
        self.push(c, limit, Exp::Frame(f));
    }

    /// Closes `c`'s outbox with a last frame (the hub's `send_last`).
    pub(super) fn close_out(&mut self, c: usize, reason: CloseReason, last: &[u8]) {
        if self.conns[c].out.close(reason, last) {
            self.counts.tcp_out += last.len() as u64;
        }
    }

    /// Refuses the connection for its credential: the Error, then the close. A credential
    /// a reload revoked between Auth and Identify counts as revoked.
    fn refuse_auth(&mut self, c: usize, r: Reject) -> Flow {
        let reason = match r {
            Reject::Revoked(why) => {
                self.counts.revoked += 1;
                CloseReason::Revoked(why)
            }
            _ => {
                self.counts.auth += 1;
                CloseReason::AuthFailed
            }
        };
        self.close_out(c, reason, &refusal(r));
        Flow::Close(reason)
    }

    pub(super) fn user(&self, name: &str) -> Option<&MUser> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The user a connection authenticated as, as the settings in force have it.
    pub(super) fn user_of(&self, c: usize) -> Option<&MUser> {
        self.conns[c].user.and_then(|(n, _)| self.user(n))
    }

    /// §3 "Step 1b": on a hub with a shared secret, the data is the secret; on a hub with
    /// users, `NAME SP SECRET` (a bare secret names no user).
    fn authenticate(&self, data: &[u8]) -> MAuth {
        if shared_secret(&self.settings) {
            return if data == SECRET {
                MAuth::Granted(None)
            } else {
                MAuth::Failed
            };
        }
        if self.users.is_empty() {
            return MAuth::Ignored;
        }
        let (name, secret) = match data.iter().position(|&b| b == b' ') {
            Some(sp) => (&data[..sp], &data[sp + 1..]),
            None => (data, &[][..]),
        };
        match self.users.iter().find(|u| u.name.as_bytes() == name) {
            Some(u) if u.secret == secret => MAuth::Granted(Some((u.name, u.secret))),
            _ => MAuth::Failed,
        }
    }

    /// An Identify (first or rename) of `label`, which keeps to the grammar: the user's
    /// identities (§3), then one live shim per identity (§3 "One shim per identity").
    fn claim(&mut self, c: usize, label: &str) -> Flow {
        let users_hub = !self.users.is_empty();
        let mine = if users_hub {
            let Some((name, secret)) = self.conns[c].user else {
                return self.refuse_auth(c, Reject::AuthRequired);
            };
            let Some(u) = self.user(name) else {
                return self.refuse_auth(c, Reject::Revoked(Revoked::UserRemoved));
            };
            if u.secret != secret {
                return self.refuse_auth(c, Reject::Revoked(Revoked::SecretChanged));
            }
            if !u.may_be(label) {
                self.counts.identity += 1;
                self.push_self(c, refusal(Reject::IdentityNotPermitted(label.into())));
                return Flow::Continue;
            }
            Some(name)
        } else {
            // A user presented before a reload took the users away no longer counts.
            self.conns[c].user = None;
            None
        };
        let renaming = self.conns[c].identified;
        if renaming && self.conns[c].identity == label {
            // §3: the identity it holds, byte for byte: nothing at all.
            return Flow::Continue;
        }
        if renaming && let Err(r) = self.allow(c, Work::FanOut) {
            // §3: a rename is paid for like a routed frame; refused, the old name stays.
            self.push_self(c, refusal(r));
            return Flow::Continue;
        }
        let holder = (0..self.conns.len()).find(|&h| {
            h != c && self.conns[h].routed && self.conns[h].identity.eq_ignore_ascii_case(label)
        });
        let mut displaced = None;
        let old = if self.conns[c].identified {
            self.conns[c].identity.clone()
        } else {
            String::new()
        };
        if let Some(h) = holder {
            let k = &self.conns[h];
            let live = k.out.state == OutState::Open && !k.closed;
            // Same credential: the same user; on a hub without users, always.
            let replaces = match self.settings.duplicate {
                DuplicateIdentity::Replace => true,
                DuplicateIdentity::Refuse => false,
                DuplicateIdentity::SameCredential if !users_hub => true,
                DuplicateIdentity::SameCredential => k.user.map(|(n, _)| n) == mine,
            };
            if live && !replaces {
                self.counts.in_use += 1;
                self.push_self(c, refusal(Reject::IdentityInUse));
                return Flow::Continue;
            }
            // A holder already closing loses the name without a word.
            self.conns[h].routed = false;
            displaced = live.then_some(h);
        }
        let conn = &mut self.conns[c];
        conn.identity = label.to_string();
        conn.routed = true;
        if !conn.names.iter().any(|n| n == label) {
            conn.names.push(label.to_string());
        }
        if !conn.identified {
            conn.identified = true;
            self.counts.identified += 1;
            // §3 "Step 3": the Session, and the Terms in the same write.
            let f = encoded(Opcode::Session, &conn.shim.token.0);
            let t = terms_frame(&self.settings);
            conn.terms = t.clone();
            self.push(c, usize::MAX, Exp::Frame(f));
            self.push(c, usize::MAX, Exp::Frame(t));
        }
        if let Some(h) = displaced {
            self.counts.replaced += 1;
            let why = format!("replaced: a newer connection identified as {label}");
            self.close_out(h, CloseReason::Replaced, &reject::closing(&why));
            self.hub_remove(h, CloseReason::Replaced);
        }
        // §13 "Presence": after the holder it displaced has left, the subscriptions see
        // this shim leave its old name and join under the new one; a rename's Presence
        // frames are its deliveries (§3).
        let told = self.state_identity(c, &old);
        if renaming {
            self.charge(c, told);
        }
        Flow::Continue
    }

    /// A reload to `s`: when the users changed, every shim in the table whose credentials
    /// no longer hold is sent `credentials revoked: REASON` and closed (§3 "Step 1b").
    /// Then (§3 "Step 3b") every shim in the table whose last Terms differ from those of
    /// `s` is sent the new ones, outside any slice (flushed by the next tick), before the
    /// relay state the new users make it watch or stop watching.
    pub(super) fn model_reload(&mut self, s: &Settings) {
        self.settings = s.clone();
        let users = model_users(s);
        if users == self.users {
            self.resend_terms();
            return;
        }
        self.users = users;
        let mut revoked = Vec::new();
        for c in 0..self.conns.len() {
            if !self.conns[c].registered() {
                continue;
            }
            let why = match (self.users.is_empty(), self.conns[c].user) {
                (true, None) => None,
                (true, Some(_)) => Some(Revoked::UserRemoved),
                (false, None) => Some(Revoked::CredentialsRequired),
                (false, Some((name, secret))) => match self.user(name) {
                    None => Some(Revoked::UserRemoved),
                    Some(u) if u.secret != secret => Some(Revoked::SecretChanged),
                    Some(u) if !u.may_be(&self.conns[c].identity) => {
                        Some(Revoked::IdentityNotPermitted)
                    }
                    Some(_) => None,
                },
            };
            if let Some(why) = why {
                revoked.push((c, CloseReason::Revoked(why)));
            }
        }
        // The hub closes them one after the other, in an order of its own: the leave of
        // one (§13) may reach another before that one is closed in turn. The model closes
        // them all, then removes them, and learns what reached each (`learn_revoked`).
        self.revoking = revoked
            .iter()
            .map(|&(c, _)| (c, self.conns[c].out.bytes, self.leaves_between(c, &revoked)))
            .collect();
        for &(c, reason) in &revoked {
            self.counts.revoked += 1;
            let CloseReason::Revoked(why) = reason else {
                unreachable!("revocations only")
            };
            self.close_out(c, reason, &refusal(Reject::Revoked(why)));
        }
        for &(c, reason) in &revoked {
            self.hub_remove(c, reason);
        }
        self.resend_terms();
        self.state_recheck();
    }

    /// The Terms of the settings in force to every shim in the table that was last sent
    /// others, under the outbound limit (a full queue is cut off as a slow consumer).
    fn resend_terms(&mut self) {
        let t = terms_frame(&self.settings);
        let (now_ms, limit) = (self.clock_ms, self.settings.outbound_limit);
        for c in 0..self.conns.len() {
            if !self.conns[c].registered() || self.conns[c].terms == t {
                continue;
            }
            self.conns[c].terms = t.clone();
            if let Some(first) = self.conns[c].out.push(limit, Exp::Frame(t.clone()), now_ms) {
                self.counts.tcp_out += t.len() as u64;
                if first {
                    self.tick_flush.push(c);
                }
            }
        }
    }

    fn model_frame(&mut self, c: usize, op: u8, data: &[u8]) -> Flow {
        let Some(known) = Opcode::from_byte(op) else {
            self.push_self(c, refusal(Reject::UnknownOpcode(op)));
            return Flow::Continue;
        };
        let before_identify = matches!(
            known,
            Opcode::None | Opcode::Identify | Opcode::Ping | Opcode::Quit | Opcode::Auth
        );
        if !self.conns[c].identified && !before_identify {
            self.push_self(c, refusal(Reject::IdentifyFirst));
            return Flow::Continue;
        }
        match known {
            Opcode::None | Opcode::Pong => {}
            Opcode::Quit => {
                self.close_out(c, CloseReason::Quit, &[]);
                return Flow::Close(CloseReason::Quit);
            }
            Opcode::Ping => self.push_self(c, encoded(Opcode::Pong, data)),
            // The credential guards the first Identify; before it the last valid Auth
            // counts, after it a valid one changes nothing and a wrong one closes.
            Opcode::Auth => match self.authenticate(data) {
                MAuth::Ignored => {}
                MAuth::Failed => return self.refuse_auth(c, Reject::AuthFailed),
                MAuth::Granted(user) => {
                    let conn = &mut self.conns[c];
                    if !conn.identified {
                        conn.authed = true;
                        conn.user = user;
                    }
                }
            },
            Opcode::Identify
                if !self.conns[c].authed
                    && !self.conns[c].identified
                    && (shared_secret(&self.settings) || !self.users.is_empty()) =>
            {
                return self.refuse_auth(c, Reject::AuthRequired);
            }
            Opcode::Identify => match check_label(data) {
                Ok(label) => return self.claim(c, label),
                Err(why) => self.push_self(c, refusal(Reject::BadIdentity(why))),
            },
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse | Opcode::Who => {
                self.route(c, known, data, MVia::Tcp);
            }
            Opcode::Set => self.model_set(c, data, MVia::Tcp),
            Opcode::Subscribe => self.model_subscribe(c, data),
            Opcode::Unsubscribe => self.model_unsubscribe(c, data),
            Opcode::Get => self.model_get(c, data),
            Opcode::Session
            | Opcode::Error
            | Opcode::Ack
            | Opcode::WhoEntry
            | Opcode::Presence
            | Opcode::Terms => {
                self.push_self(c, refusal(Reject::ServerOnly(known)));
            }
        }
        Flow::Continue
    }

    // --- Rates ----------------------------------------------------------------------

    /// Full buckets for a connection accepted at `now_ms`.
    pub(super) fn new_rates(&self, now_ms: u64) -> MRates {
        let f = &self.first;
        MRates {
            routed: MBucket::full(f.routed_per_sec, now_ms),
            who: MBucket::full(f.who_per_sec, now_ms),
            deliveries: MBucket::full(f.deliveries_per_sec, now_ms),
        }
    }

    /// Whether `c`'s buckets allow a request of kind `work` now (taking its routed and
    /// Who tokens), or the refusal: a Command, Echo or Who needs a routed token, a Who a
    /// Who token, and any of them, a CommandResponse too, deliveries not in debt.
    pub(super) fn allow(&mut self, c: usize, work: Work) -> Result<(), Reject> {
        let (r, d, w) = (
            self.first.routed_per_sec,
            self.first.deliveries_per_sec,
            self.first.who_per_sec,
        );
        let now_ms = self.now_ms();
        let b = &mut self.conns[c].rates;
        let routed = work != Work::Response && r > 0;
        let who = work == Work::Who && w > 0;
        if routed && b.routed.level(r, now_ms) < 1000 {
            return Err(Reject::RateLimited(Rate::Routed, r));
        }
        if who && b.who.level(w, now_ms) < 1000 {
            return Err(Reject::RateLimited(Rate::Who, w));
        }
        if d > 0 && b.deliveries.level(d, now_ms) <= 0 {
            return Err(Reject::RateLimited(Rate::Deliveries, d));
        }
        if routed {
            b.routed.milli -= 1000;
        }
        if who {
            b.who.milli -= 1000;
        }
        Ok(())
    }

    /// Charges `n` deliveries to `c` (a bucket may go into debt).
    pub(super) fn charge(&mut self, c: usize, n: u64) {
        if self.first.deliveries_per_sec > 0 {
            self.conns[c].rates.deliveries.milli -= n as i64 * 1000;
        }
    }

    // --- Routing --------------------------------------------------------------------

    pub(super) fn reply(&mut self, c: usize, via: MVia, f: Vec<u8>) {
        match via {
            MVia::Tcp => self.push_self(c, f),
            MVia::Udp(a) => {
                self.counts.udp_out += f.len() as u64;
                self.dgrams.push((a, f, Class::Reply));
            }
        }
    }

    fn deliver(&mut self, to: usize, via: MVia, f: &[u8]) -> bool {
        if let MVia::Udp(_) = via
            && let Some(a) = self.conns[to].udp
        {
            if self.conns[to].out.state != OutState::Open {
                return false;
            }
            self.counts.udp_out += f.len() as u64;
            self.dgrams.push((a, f.to_vec(), Class::Delivery));
            return true;
        }
        let limit = self.settings.outbound_limit;
        self.push(to, limit, Exp::Frame(f.to_vec()))
    }

    /// The shims `t` names: routed, matched by its pattern, and passing its filters on
    /// the state they hold now (§6).
    fn selected(&self, t: &MTarget) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|&i| {
                let k = &self.conns[i];
                k.routed && t.pattern.matches(&k.identity) && t.passes(&k.state)
            })
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
            return self.reply(c, via, refusal(Reject::Malformed(Shape::TargetText)));
        };
        let (target, text) = (&data[..sp], &data[sp + 1..]);
        let t = match MTarget::parse(target) {
            Ok(t) => t,
            Err(e) => return self.reply(c, via, refusal(Reject::BadTarget(lossy(target), e))),
        };
        let p = &t.pattern;
        // The rates first: a Command the user may not send still counts as routed.
        if let Err(r) = self.allow(c, Work::FanOut) {
            return self.reply(c, via, refusal(r));
        }
        let identity = self.conns[c].identity.clone();
        if !self.users.is_empty() {
            // §7 "Users": some pattern of the user's commands (echoes) covers the target.
            let allowed = self.user_of(c).is_some_and(|u| {
                let list = if op == Opcode::Command {
                    &u.commands
                } else {
                    &u.echoes
                };
                // §6: decided on the pattern alone, as if there were no filters.
                list.iter().any(|q| q.covers(p))
            });
            if !allowed {
                self.counts.permission += 1;
                let r = if op == Opcode::Command {
                    Reject::NotPermitted(lossy(target))
                } else {
                    Reject::EchoNotPermitted(lossy(target))
                };
                return self.reply(c, via, refusal(r));
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
        let window = self.settings.answer_window;
        for to in self.selected(&t) {
            if (t.pattern.include_self || to != c) && self.deliver(to, via, &f) {
                reached += 1;
                if op == Opcode::Command {
                    // §7: the target may answer it while it is among the last
                    // `answer_window` Commands sent to it.
                    let k = &mut self.conns[to];
                    while k.answerable.len() >= window {
                        k.answerable.pop_front();
                    }
                    k.answerable.push_back(id);
                    k.delivered.push(id);
                }
            }
        }
        if reached == 0 {
            return self.reply(c, via, refusal(Reject::NoMatch(lossy(target))));
        }
        self.charge(c, reached);
        self.counts.deliveries += reached;
        self.reply(c, via, ack(id, reached));
    }

    fn respond(&mut self, c: usize, data: &[u8], via: MVia) {
        let (id_txt, text) = match data.iter().position(|&b| b == b' ') {
            Some(sp) => (&data[..sp], &data[sp + 1..]),
            None => (data, &[][..]),
        };
        // §7: an id is a canonical decimal: ASCII digits, no sign, no leading zero, at
        // most a u64.
        let canonical = !id_txt.is_empty()
            && id_txt.iter().all(u8::is_ascii_digit)
            && !(id_txt.len() > 1 && id_txt[0] == b'0');
        let Some(id) = std::str::from_utf8(id_txt)
            .ok()
            .filter(|_| canonical)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return self.reply(c, via, refusal(Reject::Malformed(Shape::IdResponse)));
        };
        if self.allow(c, Work::Response).is_err() {
            // Dropped and counted, not answered (§8).
            self.counts.responses_dropped += 1;
            return;
        }
        // §7: answers come only from targets, among the last `answer_window` Commands
        // sent to them (the window in force).
        let window = self.settings.answer_window;
        if !self.conns[c]
            .answerable
            .iter()
            .rev()
            .take(window)
            .any(|&i| i == id)
        {
            self.counts.answer += 1;
            return self.reply(c, via, refusal(Reject::NotAnswerable(id, window)));
        }
        let serial = id >> 20;
        let Some(to) = (0..self.conns.len())
            .find(|&i| self.conns[i].registered() && self.conns[i].shim.serial == serial)
        else {
            self.counts.responses_dropped += 1;
            return;
        };
        let mut d = id_txt.to_vec();
        d.push(b' ');
        d.extend_from_slice(self.conns[c].identity.as_bytes());
        d.push(b' ');
        d.extend_from_slice(text);
        let f = encoded(Opcode::CommandResponse, &d);
        if self.deliver(to, via, &f) {
            self.charge(c, 1);
            self.counts.deliveries += 1;
        } else {
            self.counts.responses_dropped += 1;
        }
    }

    fn who(&mut self, c: usize, data: &[u8], via: MVia) {
        // §4: any Who over UDP, whatever its pattern.
        if via != MVia::Tcp {
            return self.reply(c, via, refusal(Reject::WhoOverUdp));
        }
        // The whole data is the target: a space in a filter's value is the filter's fault.
        let t = if data.is_empty() {
            MTarget::all()
        } else {
            match MTarget::parse(data) {
                Ok(t) => t,
                Err(e) => return self.reply(c, via, refusal(Reject::BadPattern(lossy(data), e))),
            }
        };
        if let Err(r) = self.allow(c, Work::Who) {
            return self.reply(c, via, refusal(r));
        }
        // §7 "Users": on a hub with users, only what the user's `who` patterns match (§6:
        // then filtered).
        let users_hub = !self.users.is_empty();
        let user = self.user_of(c);
        let entries: Vec<Vec<u8>> = self
            .selected(&t)
            .into_iter()
            .filter(|&i| {
                !users_hub
                    || user
                        .is_some_and(|u| u.who.iter().any(|q| q.matches(&self.conns[i].identity)))
            })
            .map(|i| {
                let k = &self.conns[i];
                let udp = if k.udp.is_some() { "udp" } else { "-" };
                let d = format!("{} {} {udp}", k.identity, k.shim.connected_unix_ms);
                encoded(Opcode::WhoEntry, d.as_bytes())
            })
            .collect();
        // Each entry listed is a delivery, whether or not the listing is queued.
        self.charge(c, entries.len() as u64);
        let a = ack(0, entries.len() as u64);
        let e = Exp::Listing(entries, a);
        // One listing may pass the outbound limit when it is alone in the queue.
        let limit = self.settings.outbound_limit.max(e.len());
        self.push(c, limit, e);
    }

    // --- UDP ------------------------------------------------------------------------

    /// The model of `on_datagram`; returns whether a rate-limited Quit answer is due.
    pub(super) fn model_datagram(&mut self, src: SocketAddr, d: &[u8]) -> bool {
        // Every datagram starts the hub's clock at its time (`Effects::begin`).
        self.clock_ms = self.clock_ms.max(self.now_ms());
        // A sealed datagram: no session of the model has keys, so it is dropped (and
        // counted), never answered, whatever its source.
        if d.first() == Some(&velium_server::proto::sealed::MARKER) {
            return false;
        }
        let bound = self.bindings.get(&src).copied();
        // A datagram is one frame: an opcode, then data, then an optional 0x0A.
        let lf = d.last() == Some(&NEWLINE);
        let body = if lf { &d[..d.len() - 1] } else { d };
        // Never an answer larger than the datagram.
        let quit_due = d.len() >= QUIT.len();
        if d.len() > self.settings.max_frame || body.is_empty() || body.contains(&NEWLINE) {
            return bound.is_none() && quit_due;
        }
        let op = body[0];
        let data = match &body[1..] {
            // A CR before the 0x0A ends the line with it.
            [rest @ .., CR] if lf => rest,
            all => all,
        };
        let now_ms = self.now_ms();
        if op == Opcode::Session as u8 {
            let Some(c) = (0..self.conns.len())
                .find(|&i| self.conns[i].registered() && self.conns[i].shim.token.0[..] == *data)
            else {
                return quit_due;
            };
            self.bind(c, src);
            self.conns[c].last_seen_ms = now_ms;
            self.counts.binds += 1;
            return false;
        }
        let Some(c) = bound else {
            return quit_due;
        };
        if self.conns[c].out.state != OutState::Open {
            // Cut off or closing: none of its input is handled.
            return false;
        }
        self.conns[c].last_seen_ms = now_ms;
        let via = MVia::Udp(src);
        let Some(known) = Opcode::from_byte(op) else {
            self.reply(c, via, refusal(Reject::UnknownOpcode(op)));
            return false;
        };
        match known {
            Opcode::None | Opcode::Pong | Opcode::Quit => {}
            Opcode::Ping => self.reply(c, via, encoded(Opcode::Pong, data)),
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse | Opcode::Who => {
                self.route(c, known, data, via)
            }
            Opcode::Set => self.model_set(c, data, via),
            _ => self.reply(c, via, refusal(Reject::NotOverUdp(known))),
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

    // --- Outboxes, timers, closing --------------------------------------------------

    /// A flush of `c` after a slice or a datagram: a client that reads takes everything at
    /// once; one that does not has a full socket, and its bytes wait for the writer.
    pub(super) fn model_flush(&mut self, c: usize) {
        let now_ms = self.now_ms();
        let conn = &mut self.conns[c];
        if conn.reads && !conn.finished {
            conn.out.flush(now_ms);
        }
    }

    /// Which timer of `c` has run out at `now_ms`, if any: the identify deadline, then
    /// the write deadline (output queued with no progress), then the idle timeout.
    pub(super) fn due(&self, c: usize, now_ms: u64) -> Option<CloseReason> {
        let k = &self.conns[c];
        let s = &self.settings;
        if !k.identified && now_ms - k.accepted_ms >= s.identify_ms {
            Some(CloseReason::IdentifyTimeout)
        } else if k.out.stalled(now_ms, s.write_deadline_ms) {
            Some(CloseReason::SlowConsumer)
        } else if now_ms - k.last_seen_ms >= s.idle_ms {
            Some(CloseReason::Idle)
        } else {
            None
        }
    }

    /// One sweep of `c`: a timer fires when it is found run out on two sweeps in a row.
    pub(super) fn model_sweep(&mut self, c: usize) {
        let now_ms = self.now_ms();
        if self.conns[c].out.state != OutState::Open {
            // A closing connection whose last frames made no progress for the linger time
            // is cut.
            let out = &mut self.conns[c].out;
            if out.stalled(now_ms, CLOSE_LINGER.as_millis() as u64) {
                let r = *out.reason.get_or_insert(CloseReason::IoError);
                out.cut(r);
            }
            return;
        }
        match self.due(c, now_ms) {
            Some(r) if self.conns[c].flagged => self.model_expire(c, r),
            Some(_) => self.conns[c].flagged = true,
            None => self.conns[c].flagged = false,
        }
    }

    fn model_expire(&mut self, c: usize, r: CloseReason) {
        match r {
            CloseReason::IdentifyTimeout => {
                self.close_out(c, r, &refusal(Reject::IdentifyTimeout));
            }
            CloseReason::SlowConsumer => self.conns[c].out.cut(r),
            _ => {
                let idle = Duration::from_millis(self.settings.idle_ms);
                let why = format!(
                    "idle timeout: nothing received for {}",
                    humantime::format_duration(idle)
                );
                self.close_out(c, r, &reject::closing(&why));
            }
        }
        self.hub_remove(c, r);
    }

    /// The shutdown: Quit to every connection still open.
    pub(super) fn model_shutdown(&mut self) {
        for c in self.open_conns() {
            self.close_out(
                c,
                CloseReason::Shutdown,
                &reject::closing("server shutting down"),
            );
        }
    }

    /// The end of a connection's reader: the reason that stands.
    pub(super) fn model_finish(&mut self, c: usize, reason: CloseReason) -> CloseReason {
        let conn = &mut self.conns[c];
        let stands = *conn.out.reason.get_or_insert(reason);
        conn.out.close(stands, &[]);
        conn.finished = true;
        self.hub_remove(c, stands);
        stands
    }

    /// The hub forgets `c` (the first close only).
    pub(super) fn hub_remove(&mut self, c: usize, reason: CloseReason) {
        let conn = &mut self.conns[c];
        if conn.closed {
            return;
        }
        conn.closed = true;
        conn.routed = false;
        if reason == CloseReason::SlowConsumer {
            self.counts.slow_consumers += 1;
        }
        if conn.identified
            && let Some(a) = conn.udp.take()
            && self.bindings.get(&a) == Some(&c)
        {
            self.bindings.remove(&a);
        }
        self.state_closed(c, reason);
    }
}
