//! The comparisons between the real hub and the model, and the invariants that hold
//! whatever the model says.
//!
//! Apart from the model so that what is checked can be read in one place: after every
//! step [`World::check`] compares each outbox (state, pending bytes, close reason, the
//! socket's shutdown), what each reading client received, identities and users, the
//! session table, the router, the UDP bindings, the connection count and the counters
//! (refusals by reason and replaced identities among them), and checks what holds on any
//! hub ([`World::check_access`]); the per-call checks ([`World::check_flush`],
//! [`World::check_datagrams`]) run inside a step, and every CommandResponse a client is
//! sent is checked to come from a shim that was sent the Command.
//! [`check_reject_texts`] pins the core's refusal texts to `docs/protocol.md` §10, since
//! the model encodes its refusals with them.

use super::model::Exp;
use super::pattern::check_label;
use super::scenario::udp_src;
use super::{SOCKETS, World, fd_of};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use velium_server::config::Secret;
use velium_server::hub::Hub;
use velium_server::hub::send::{Class, Datagram};
use velium_server::hub::shim::{CloseReason, Shim};
use velium_server::metrics::{Dir, Latency, Refusal, Transport};
use velium_server::proto::identity::IdentityError;
use velium_server::proto::pattern::{Pattern, PatternError, Seg};
use velium_server::proto::reject::{ErrorKind, Rate, Reject, Revoked, Shape, answers_no_request};
use velium_server::proto::state::KeyError;
use velium_server::proto::{NEWLINE, Opcode, QUIT};

/// Opcodes the server may send to a client.
const SERVER_TO_CLIENT: [u8; 13] = [
    0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0C, 0x0E, 0x10, 0x14, 0x15,
];

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

/// Refusals the hub counted for `why`.
fn refused(hub: &Hub, why: Refusal) -> u64 {
    hub.metrics
        .refusals()
        .find(|(r, _)| *r == why)
        .map_or(0, |(_, n)| n)
}

/// Bytes the hub counted as sent on `t`, every opcode slot summed (0x00 to 0x14, and
/// one for any other byte).
fn counted_out(hub: &Hub, t: Transport) -> u64 {
    (0..=0x15u8)
        .map(|op| hub.metrics.traffic(Dir::Out, t, op).1)
        .sum()
}

/// The refusal texts the model's Error frames are made of, against `docs/protocol.md`
/// §10 (and §3 for the identity texts), word for word.
pub fn check_reject_texts() {
    let texts: &[(Reject, &str)] = &[
        (Reject::IdentifyFirst, "identify first"),
        (Reject::IdentifyTimeout, "identify timeout"),
        (Reject::AuthRequired, "authentication required"),
        (Reject::AuthFailed, "authentication failed"),
        (
            Reject::Connection(Refusal::MaxConnections),
            "too many connections",
        ),
        (
            Reject::Connection(Refusal::PerSource),
            "too many connections from this address",
        ),
        (Reject::Connection(Refusal::Rate), "connecting too fast"),
        (
            Reject::NotPermitted("live.>".into()),
            "command not permitted: live.>",
        ),
        (Reject::TooLong(16384), "frame longer than 16384 bytes"),
        (Reject::UnknownOpcode(0x42), "unknown opcode 0x42"),
        (Reject::UnknownOpcode(0xAB), "unknown opcode 0xAB"),
        (
            Reject::BadIdentity(IdentityError::Empty),
            "identity is empty",
        ),
        (
            Reject::BadIdentity(IdentityError::TooLong),
            "identity longer than 64 bytes",
        ),
        (
            Reject::BadIdentity(IdentityError::EmptySegment { at: 2 }),
            "identity has an empty segment at byte 2: segments are joined by single dots",
        ),
        (
            Reject::BadIdentity(IdentityError::Byte { byte: b' ', at: 3 }),
            "identity byte 0x20 at 3: only ASCII letters, digits, '_', '-' and '.' are allowed",
        ),
        (
            Reject::BadIdentity(IdentityError::Byte { byte: b'*', at: 4 }),
            "identity byte 0x2A '*' at 4: only ASCII letters, digits, '_', '-' and '.' are allowed",
        ),
        (
            Reject::BadIdentity(IdentityError::Byte { byte: 0xE3, at: 9 }),
            "identity byte 0xE3 at 9: only ASCII letters, digits, '_', '-' and '.' are allowed",
        ),
        (
            Reject::BadIdentity(IdentityError::Byte { byte: 0x7F, at: 0 }),
            "identity byte 0x7F at 0: only ASCII letters, digits, '_', '-' and '.' are allowed",
        ),
        (
            Reject::BadIdentity(IdentityError::Byte { byte: b'~', at: 1 }),
            "identity byte 0x7E '~' at 1: only ASCII letters, digits, '_', '-' and '.' are allowed",
        ),
        (
            Reject::IdentityNotPermitted("velium.cli.1".into()),
            "identity not permitted: velium.cli.1",
        ),
        (Reject::IdentityInUse, "identity in use"),
        (
            Reject::EchoNotPermitted("peq.>".into()),
            "echo not permitted: peq.>",
        ),
        (
            Reject::NotAnswerable(1048576, 256),
            "response refused: 1048576 is not among the last 256 Commands sent to this shim",
        ),
        (
            Reject::Revoked(Revoked::UserRemoved),
            "credentials revoked: user removed",
        ),
        (
            Reject::Revoked(Revoked::SecretChanged),
            "credentials revoked: secret changed",
        ),
        (
            Reject::Revoked(Revoked::IdentityNotPermitted),
            "credentials revoked: identity no longer permitted",
        ),
        (
            Reject::Revoked(Revoked::CredentialsRequired),
            "credentials revoked: credentials now required",
        ),
        (
            Reject::ServerOnly(Opcode::Session),
            "opcode 0x02 (Session) is sent by the server only",
        ),
        (
            Reject::ServerOnly(Opcode::Ack),
            "opcode 0x0C (Ack) is sent by the server only",
        ),
        (
            Reject::NotOverUdp(Opcode::Identify),
            "opcode 0x01 (Identify) is not accepted over UDP",
        ),
        (
            Reject::NotOverUdp(Opcode::WhoEntry),
            "opcode 0x0E (WhoEntry) is not accepted over UDP",
        ),
        (
            Reject::Malformed(Shape::TargetText),
            "expected: TARGET SP TEXT",
        ),
        (
            Reject::Malformed(Shape::IdResponse),
            "response refused: ID must be a decimal number with no sign or leading zero",
        ),
        (
            Reject::BadTarget("+".into(), PatternError::Empty.into()),
            "bad target +: empty target",
        ),
        (
            Reject::BadTarget("a.>.b".into(), PatternError::RestNotLast.into()),
            "bad target a.>.b: '>' must be the last segment",
        ),
        (
            Reject::BadTarget(
                "peq..bob".into(),
                PatternError::EmptySegment { at: 4 }.into(),
            ),
            "bad target peq..bob: empty segment at byte 4: segments are joined by single dots",
        ),
        (
            Reject::BadTarget("x".into(), PatternError::TooLong.into()),
            "bad target x: target longer than 255 bytes",
        ),
        (
            Reject::BadTarget("\u{FFFD}".into(), PatternError::NotUtf8.into()),
            "bad target \u{FFFD}: target is not UTF-8",
        ),
        (
            Reject::NoMatch("peq.nektulos.*".into()),
            "no shim matches peq.nektulos.*",
        ),
        (Reject::WhoOverUdp, "Who is answered over TCP only"),
        (
            Reject::RateLimited(Rate::Routed, 200),
            "rate limit: more than 200 routed frames per second",
        ),
        (
            Reject::RateLimited(Rate::Deliveries, 20000),
            "rate limit: more than 20000 deliveries per second",
        ),
        (
            Reject::RateLimited(Rate::Who, 20),
            "rate limit: more than 20 Who per second",
        ),
        (
            Reject::BadPattern("a.>.b".into(), PatternError::RestNotLast.into()),
            "bad pattern a.>.b: '>' must be the last segment",
        ),
        (
            Reject::ServerOnly(Opcode::Presence),
            "opcode 0x14 (Presence) is sent by the server only",
        ),
        (
            Reject::NotOverUdp(Opcode::Subscribe),
            "opcode 0x11 (Subscribe) is not accepted over UDP",
        ),
        (
            Reject::SetMalformed,
            "state refused: expected KEY=VALUE items separated by 0x1F",
        ),
        (
            Reject::SetBadKey("h p".into(), KeyError::Byte { byte: b' ', at: 1 }),
            "state refused: bad key h p: key byte 0x20 at 1: only ASCII letters, digits, '_' and '-' are allowed",
        ),
        (
            Reject::SetBadKey(String::new(), KeyError::Empty),
            "state refused: bad key : key is empty",
        ),
        (
            Reject::SetBadKey("k".into(), KeyError::TooLong),
            "state refused: bad key k: key longer than 64 bytes",
        ),
        (
            Reject::StateValue("hp".into(), 8),
            "state refused: value of hp is longer than 8 bytes",
        ),
        (Reject::StateKeys(4), "state refused: more than 4 keys"),
        (
            Reject::StateBytes(40),
            "state refused: more than 40 bytes of state",
        ),
        (
            Reject::RateLimited(Rate::Sets, 100),
            "state refused: rate limit: more than 100 sets per second",
        ),
        (
            Reject::Malformed(Shape::Subscribe),
            "expected: SID SP INTERVAL_MS SP PATTERN [SP KEY...]",
        ),
        (
            Reject::BadSid("01".into()),
            "bad subscription id 01: must be a decimal number from 1 to 4294967295 with no leading zero",
        ),
        (
            Reject::BadInterval("3600001".into()),
            "bad interval 3600001: must be milliseconds from 0 to 3600000",
        ),
        (
            Reject::BadKey("a.b".into(), KeyError::Byte { byte: b'.', at: 1 }),
            "bad key a.b: key byte 0x2E at 1: only ASCII letters, digits, '_' and '-' are allowed",
        ),
        (
            Reject::SubscriptionExists(7),
            "subscription 7 already exists",
        ),
        (
            Reject::TooManySubscriptions(16),
            "more than 16 subscriptions",
        ),
        (Reject::NoSubscription("01".into()), "no subscription 01"),
    ];
    for (r, text) in texts {
        assert_eq!(
            answers_no_request(text.as_bytes()),
            text.starts_with("response refused:") || text.starts_with("state refused:"),
            "{text}"
        );
        let mut f = vec![Opcode::Error as u8];
        f.extend_from_slice(text.as_bytes());
        f.push(NEWLINE);
        assert_eq!(
            String::from_utf8_lossy(&r.frame()),
            String::from_utf8_lossy(&f),
            "the Error frame of {r:?}"
        );
    }
    assert!(
        Reject::Connection(Refusal::AllowList).frame().is_empty(),
        "a source outside the allowed networks is closed without a byte"
    );
}

impl World {
    /// Every shim whose open outbox went from empty to not empty must be listed for a
    /// flush (a closing one's last frame is its writer's, which the close wakes), and the
    /// list must be the model's.
    pub(super) fn check_flush(&self, before: &[usize], flushed: &[Arc<Shim>]) {
        for (i, b) in before.iter().enumerate() {
            let k = &self.conns[i];
            // (Presence queued outside the subscriber's slice is flushed by the next tick.)
            if *b == 0
                && k.shim.outbox.pending() > 0
                && k.shim.outbox.is_open()
                && !flushed.iter().any(|s| Arc::ptr_eq(s, &k.shim))
                && !self.tick_flush.contains(&i)
            {
                self.fail(format!(
                    "conn {i} was queued frames but not listed for a flush"
                ));
            }
        }
        let mut real: Vec<usize> = flushed.iter().map(|s| self.conn_of(s)).collect();
        real.sort_unstable();
        let mut model = self.listed.clone();
        model.sort_unstable();
        if real != model {
            self.fail(format!(
                "conns {real:?} listed for a flush, expected {model:?}"
            ));
        }
    }

    /// The datagrams one datagram from `src` made the hub send, against the model's, and
    /// the rules for answering an unbound source. `quits` is how many Quit answers the
    /// hub counted (sent or withheld).
    pub(super) fn check_datagrams(
        &mut self,
        src: SocketAddr,
        d: &[u8],
        was_bound: bool,
        quit_due: bool,
        quits: u64,
        sent: Vec<Datagram>,
    ) {
        let mut got: Vec<(SocketAddr, Vec<u8>, Class)> = sent
            .iter()
            .map(|g| (g.to, g.frame.to_vec(), g.class))
            .collect();
        for (a, b, _) in &got {
            check_frames(b, true).unwrap_or_else(|e| self.fail(format!("datagram to {a}: {e}")));
        }
        if !was_bound {
            // Never more bytes than arrived, never to anyone else.
            let total: usize = got.iter().map(|(_, b, _)| b.len()).sum();
            if got.iter().any(|(a, _, _)| *a != src) || total > d.len() {
                self.fail(format!("unbound source sent {} bytes got {got:?}", d.len()));
            }
        }
        if quits != u64::from(quit_due) {
            self.fail(format!("Quit due: {quit_due}, counted {quits}"));
        }
        if quit_due {
            let answered = got
                .iter()
                .filter(|(a, b, class)| *a == src && b[..] == QUIT && *class == Class::Reply)
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
        // Datagrams to different addresses may leave in any order.
        let key = |(a, b, class): &(SocketAddr, Vec<u8>, Class)| {
            (*a, b.clone(), *class == Class::Delivery)
        };
        got.sort_by_key(key);
        for (_, b, _) in &got {
            self.check_answer(b);
        }
        let mut expect = std::mem::take(&mut self.dgrams);
        expect.sort_by_key(key);
        if got != expect {
            self.fail(format!("datagrams {got:?}, expected {expect:?}"));
        }
    }

    /// The client of `c` reads everything: what straight sends left in its socket, then
    /// what the writer takes (and reports written); compared with the model.
    pub(super) fn drain(&mut self, c: usize) {
        let mut got = SOCKETS.with(|s| {
            s.borrow_mut()
                .get_mut(&fd_of(c))
                .map(|k| std::mem::take(&mut k.got))
                .unwrap_or_default()
        });
        let mut taken = Vec::new();
        let state = self.conns[c].shim.outbox.take(&mut taken);
        let now_ms = self.now_ms();
        self.conns[c].shim.outbox.wrote(now_ms);
        got.extend_from_slice(&taken);
        let (expect, mstate) = self.conns[c].out.take(now_ms);
        if state != mstate {
            self.fail(format!(
                "conn {c}: take() gave {state:?}, expected {mstate:?}"
            ));
        }
        let frames =
            check_frames(&got, false).unwrap_or_else(|e| self.fail(format!("conn {c}: {e}")));
        // What each frame is to the client: an answer (checked against the model here),
        // the answer to a Subscribe or a Get, the Ack of an Unsubscribe, or relay state and
        // presence for its copy of what it watches.
        enum Role {
            Answer,
            Listing(u32, Vec<String>, usize),
            Unsubscribed(u32),
            State,
        }
        let mut roles: Vec<Role> = Vec::with_capacity(frames.len());
        let mut i = 0;
        let mut e = 0;
        let all = |frames: &[Vec<u8>]| -> Vec<String> {
            frames
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect()
        };
        while e < expect.len() {
            match &expect[e] {
                Exp::Frame(f) | Exp::Unsubscribed(_, f) => {
                    if frames.get(i) != Some(f) {
                        self.fail(format!(
                            "conn {c}: frame {i} is {:?}, expected {:?}\n  got all:      {:?}\n  expected all: {expect:?}",
                            frames.get(i).map(|f| String::from_utf8_lossy(f)),
                            String::from_utf8_lossy(f),
                            all(&frames)
                        ));
                    }
                    roles.push(match &expect[e] {
                        Exp::Unsubscribed(sid, _) => Role::Unsubscribed(*sid),
                        _ => Role::Answer,
                    });
                    i += 1;
                }
                Exp::Listing(entries, a)
                | Exp::States {
                    entries, ack: a, ..
                } => {
                    let n = entries.len();
                    let mut have: Vec<Vec<u8>> =
                        frames.get(i..i + n).map(<[_]>::to_vec).unwrap_or_default();
                    have.sort();
                    let mut want = entries.clone();
                    want.sort();
                    if have != want || frames.get(i + n) != Some(a) {
                        self.fail(format!(
                            "conn {c}: listing {:?}, expected {:?} then {:?}",
                            frames.get(i..).map(all),
                            all(&want),
                            String::from_utf8_lossy(a)
                        ));
                    }
                    match &expect[e] {
                        Exp::States { sid, keys, .. } => {
                            roles.extend((0..n).map(|_| Role::Answer));
                            roles.push(Role::Listing(*sid, keys.clone(), n));
                        }
                        _ => roles.extend((0..=n).map(|_| Role::Answer)),
                    }
                    i += n + 1;
                }
                Exp::Any(g, _) => {
                    // A group the hub queues in any order.
                    let mut want = Vec::new();
                    while let Some(Exp::Any(h, f)) = expect.get(e)
                        && h == g
                    {
                        want.push(f.clone());
                        e += 1;
                    }
                    e -= 1;
                    let n = want.len();
                    let mut have: Vec<Vec<u8>> =
                        frames.get(i..i + n).map(<[_]>::to_vec).unwrap_or_default();
                    have.sort();
                    want.sort();
                    if have != want {
                        self.fail(format!(
                            "conn {c}: presence {:?}, expected {:?} in any order",
                            all(&have),
                            all(&want)
                        ));
                    }
                    roles.extend((0..n).map(|_| Role::State));
                    i += n;
                }
                Exp::Async(n) => {
                    // Deliveries: State and Presence frames, exactly this many bytes.
                    let mut got = 0;
                    while got < *n {
                        match frames.get(i) {
                            Some(f) if f[0] == 0x10 || f[0] == 0x14 => {
                                got += f.len();
                                roles.push(Role::State);
                                i += 1;
                            }
                            other => self.fail(format!(
                                "conn {c}: {:?} where relay state deliveries were queued",
                                other.map(|f| String::from_utf8_lossy(f))
                            )),
                        }
                    }
                    if got != *n {
                        self.fail(format!(
                            "conn {c}: deliveries of {got} bytes read where {n} were queued"
                        ));
                    }
                }
            }
            e += 1;
        }
        if i != frames.len() {
            self.fail(format!(
                "conn {c}: unexpected frames {:?}",
                all(&frames[i..])
            ));
        }
        for f in &frames {
            self.check_answer(f);
        }
        // The client's copy of what it watches, from the frames in the order the hub sent
        // them, datagrams included.
        let mut at = self.conns[c].client.read;
        let mut j = 0;
        while j < frames.len() {
            self.read_datagrams(c, at);
            match &roles[j] {
                Role::Answer => {}
                Role::Unsubscribed(sid) => self.view_unsubscribed(c, *sid),
                Role::State => self.view_frame(c, &frames[j], false),
                // At its Ack, after its F frames.
                Role::Listing(sid, keys, n) => {
                    let (sid, keys, n) = (*sid, keys.clone(), *n);
                    self.view_listing(c, sid, &keys, &frames[j - n..j]);
                }
            }
            at += frames[j].len();
            j += 1;
        }
        self.conns[c].client.read = at;
        self.read_datagrams(c, at);
        self.conns[c].received.extend(frames);
    }

    pub(super) fn check(&mut self) {
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
            let shut = SOCKETS.with(|s| s.borrow().get(&fd_of(i)).is_some_and(|k| k.shut));
            if shut != k.out.shut {
                self.fail(format!(
                    "conn {i}: socket shut down {shut}, expected {}",
                    k.out.shut
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
            if k.shim.user().map(|u| u.name.to_string()) != k.user.map(|(n, _)| n.to_string()) {
                self.fail(format!(
                    "conn {i} user {:?}, expected {:?}",
                    k.shim.user().map(|u| u.name.clone()),
                    k.user.map(|(n, _)| n)
                ));
            }
            if k.routed {
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
        let mut holding: Vec<u64> = self
            .conns
            .iter()
            .filter(|k| k.routed)
            .map(|k| k.shim.serial)
            .collect();
        holding.sort_unstable();
        let registered = self.conns.iter().filter(|k| k.registered()).count();
        if routed != holding || hub.table.len() != registered {
            self.fail(format!(
                "router holds serials {routed:?}, table {} shims; expected {holding:?} and {registered}",
                hub.table.len()
            ));
        }
        self.check_access();
        self.reconcile_tcp();
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
        self.check_counters();
    }

    /// What holds on any hub whatever the model says: no two live identified shims hold
    /// one identity (ignoring ASCII case); every identified shim's identity keeps to the
    /// grammar (the model's, `pattern.rs`); on a hub with users, every shim in the table
    /// has a user of the settings in force, and that user may take its identity.
    fn check_access(&self) {
        let hub = &self.hub;
        let users_hub = !hub.config().users.is_empty();
        let mut live: Vec<(usize, Arc<str>)> = Vec::new();
        for (i, k) in self.conns.iter().enumerate() {
            let s = &k.shim;
            if !s.is_identified() {
                continue;
            }
            let id = s.identity();
            if let Err(e) = check_label(id.as_bytes()) {
                self.fail(format!("conn {i} holds the identity {id:?}: {e}"));
            }
            if s.is_closed() {
                continue;
            }
            if s.outbox.is_open() {
                if let Some((j, _)) = live.iter().find(|(_, o)| o.eq_ignore_ascii_case(&id)) {
                    self.fail(format!("conns {j} and {i} both hold {id:?}"));
                }
                live.push((i, id.clone()));
            }
            if users_hub {
                let Some(u) = s.user() else {
                    self.fail(format!("conn {i} is identified as {id:?} with no user"));
                };
                let Some(m) = self.user(&u.name) else {
                    self.fail(format!(
                        "conn {i} holds {id:?} as user {}, not one of the hub's",
                        u.name
                    ));
                };
                if u.secret != Secret::new(m.secret) || !m.may_be(&id) {
                    self.fail(format!(
                        "conn {i} holds {id:?} as user {}, whose secret changed or who may not be it",
                        u.name
                    ));
                }
            }
        }
    }

    /// A CommandResponse a client was sent (`05 ID SP RESPONDER SP TEXT`) comes from a
    /// connection that held the identity RESPONDER and was sent the Command ID.
    fn check_answer(&self, f: &[u8]) {
        if f.first() != Some(&(Opcode::CommandResponse as u8)) {
            return;
        }
        let mut fields = f[1..].splitn(3, |&b| b == b' ');
        let (id, who) = (fields.next().unwrap_or(&[]), fields.next().unwrap_or(&[]));
        let id: Option<u64> = std::str::from_utf8(id).ok().and_then(|t| t.parse().ok());
        let sent = id.is_some_and(|id| {
            self.conns
                .iter()
                .any(|k| k.delivered.contains(&id) && k.names.iter().any(|n| n.as_bytes() == who))
        });
        if !sent {
            self.fail(format!(
                "an answer {:?} forwarded from a shim that was not sent its Command",
                String::from_utf8_lossy(f)
            ));
        }
    }

    /// The counters the hub keeps, against what the model saw happen: every frame sent
    /// counted once (so every slice was finished), every delivery and dropped response
    /// counted.
    fn check_counters(&self) {
        let hub = &self.hub;
        let c = hub.counters();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let m = &self.counts;
        let pairs = [
            ("identified", load(&c.identified), m.identified),
            ("deliveries", load(&c.deliveries), m.deliveries),
            (
                "responses_dropped",
                load(&c.responses_dropped),
                m.responses_dropped,
            ),
            ("slow_consumers", load(&c.slow_consumers), m.slow_consumers),
            ("TCP bytes out", counted_out(hub, Transport::Tcp), m.tcp_out),
            ("UDP bytes out", counted_out(hub, Transport::Udp), m.udp_out),
            ("identities replaced", load(&c.replaced), m.replaced),
            ("refused auth", refused(hub, Refusal::Auth), m.auth),
            (
                "refused permission",
                refused(hub, Refusal::Permission),
                m.permission,
            ),
            (
                "refused identity",
                refused(hub, Refusal::Identity),
                m.identity,
            ),
            (
                "refused identity_in_use",
                refused(hub, Refusal::IdentityInUse),
                m.in_use,
            ),
            ("refused answer", refused(hub, Refusal::Answer), m.answer),
            ("refused revoked", refused(hub, Refusal::Revoked), m.revoked),
            (
                "refused state_limit",
                refused(hub, Refusal::StateLimit),
                m.state_limit,
            ),
            (
                "refused state_rate",
                refused(hub, Refusal::StateRate),
                m.state_rate,
            ),
            (
                "refused subscriptions",
                refused(hub, Refusal::Subscriptions),
                m.subscriptions,
            ),
            ("state sets applied", load(&c.state_sets), m.state_sets),
            ("state changes", load(&c.state_changes), m.state_changes),
            ("state keys held", load(&c.state_keys), self.state_keys()),
            (
                "subscriptions open",
                hub.states.subscriptions() as u64,
                self.subscriptions() as u64,
            ),
            (
                "TLS ClientHellos not served",
                hub.metrics
                    .errors()
                    .find(|(k, _)| *k == ErrorKind::TlsNotServed)
                    .map_or(0, |(_, n)| n),
                m.tls_not_served,
            ),
        ];
        for (what, got, want) in pairs {
            if got != want {
                self.fail(format!("{what}: counted {got}, expected {want}"));
            }
        }
    }

    /// Bytes the model could not know were counted (queued just before a cut-off, in an
    /// order the hub chose): the hub's count stands when it is within them.
    fn reconcile_tcp(&mut self) {
        if self.tcp_slack == 0 {
            return;
        }
        let got = counted_out(&self.hub, Transport::Tcp);
        let m = self.counts.tcp_out;
        if got + self.tcp_slack < m || got > m + self.tcp_slack {
            self.fail(format!(
                "TCP bytes out: counted {got}, expected {m} give or take {}",
                self.tcp_slack
            ));
        }
        self.counts.tcp_out = got;
        self.tcp_slack = 0;
    }

    /// Every handshake and every bind timed once, when its slice was finished (checked
    /// at the end only: merging the histograms is dear).
    fn check_latencies(&self) {
        let m = &self.hub.metrics;
        let got = (
            m.merged(Latency::Handshake).len(),
            m.merged(Latency::UdpBind).len(),
        );
        let want = (self.counts.identified, self.counts.binds);
        if got != want {
            self.fail(format!(
                "(handshake, bind) latency samples {got:?}, expected {want:?}"
            ));
        }
    }

    /// Every client hangs up and reads what is left; nothing of them may remain.
    pub(super) fn end(&mut self) {
        self.step = usize::MAX;
        self.settle();
        for c in self.open_conns() {
            self.finish(c, CloseReason::Eof);
        }
        for c in 0..self.conns.len() {
            self.drain(c);
        }
        self.check();
        self.check_latencies();
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
