//! Targets by state (docs/protocol.md §6, "Filters"), over real sockets, on both drivers:
//!
//! - `KEY=VALUE` and `KEY~WORD` filters select the shims whose published state passes
//!   them, ignoring ASCII case; every filter must hold; a shim without the key passes no
//!   filter on it; the sender is left out unless the target starts with `+`;
//! - in Command (the Ack counts the shims selected, only they are sent it and only their
//!   answers come back), Echo (over TCP and UDP), Who, Get and Subscribe, where the
//!   subscription follows the selection: a join then the whole state when a shim comes
//!   to pass, a leave `not selected` when it stops passing;
//! - on a hub with users, filters only narrow: permission is decided on the pattern;
//! - malformed targets, each answered by one Error with the documented text;
//! - a key outside `state_index`, and a hub without an index, select the same shims;
//! - the `velium` tool's filter words, and the admin listener's `pattern` parameter.
//!
//! "Nothing else arrived" is proved with a barrier, never with a wait: frames from one
//! sender reach one receiver in order, and what a frame delivers is queued before the
//! sender's answer to it, so once the sender has its Ack, a Ping on a receiver is answered
//! after anything that frame sent it.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use velium_server::proto::state as st;

const IDENTIFY: u8 = 0x01;
const COMMAND: u8 = 0x04;
const RESPONSE: u8 = 0x05;
const PING: u8 = 0x06;
const PONG: u8 = 0x07;
const ECHO: u8 = 0x08;
const ERROR: u8 = 0x09;
const ACK: u8 = 0x0C;
const WHO: u8 = 0x0D;
const SET: u8 = 0x10;
const SUBSCRIBE: u8 = 0x11;
const UNSUBSCRIBE: u8 = 0x12;
const GET: u8 = 0x13;

/// Rates lifted: a test sends many requests within a second.
const NO_RATES: [&str; 4] = ["--who-per-sec", "0", "--routed-per-sec", "0"];

// ---------------------------------------------------------------------------------------
// Shims with state
// ---------------------------------------------------------------------------------------

/// Sets `items` (`KEY=VALUE`, or a bare `KEY` to delete it) in one Set frame, and waits
/// until the hub has handled it.
fn set(c: &mut Tcp, items: &[&str]) {
    c.send(SET, items.join("\x1f").as_bytes());
    c.sync(b"set");
}

/// A shim identified as `name` that has set `items` (none: it holds no keys).
fn publisher(srv: &Server, name: &str, items: &[&str]) -> Tcp {
    let mut c = shim(srv, name);
    if !items.is_empty() {
        set(&mut c, items);
    }
    c
}

/// A connection authenticated as `user` and identified as `name`, that has set `items`.
fn login(srv: &Server, user: &str, secret: &str, name: &str, items: &[&str]) -> Tcp {
    let mut c = srv.tcp();
    c.login(user, secret, name);
    if !items.is_empty() {
        set(&mut c, items);
    }
    c
}

/// Every shim connected to a hub, by the identity it holds, so that what a routed frame
/// reached can be read off all of them.
#[derive(Default)]
struct Fleet {
    shims: Vec<(String, Tcp)>,
    tags: u64,
}

impl Fleet {
    /// Adds a shim identified as `name` that has set `items`.
    fn add(&mut self, srv: &Server, name: &str, items: &[&str]) {
        self.push(name, publisher(srv, name, items));
    }

    /// Adds a connection already identified as `name`.
    fn push(&mut self, name: &str, c: Tcp) {
        self.shims.push((name.to_string(), c));
    }

    /// The connection of `name`.
    fn c(&mut self, name: &str) -> &mut Tcp {
        self.shims
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no shim {name} in the fleet"))
    }

    /// Takes `name` out of the fleet.
    fn remove(&mut self, name: &str) -> Tcp {
        let i = self.shims.iter().position(|(n, _)| n == name).unwrap();
        self.shims.remove(i).1
    }

    /// Renames `old` to `new` and waits until the hub has handled it.
    fn rename(&mut self, old: &str, new: &str) {
        let c = self.c(old);
        c.send(IDENTIFY, new.as_bytes());
        c.sync(b"renamed");
        let i = self.shims.iter().position(|(n, _)| n == old).unwrap();
        self.shims[i].0 = new.to_string();
    }

    /// Sends a Command (`op` COMMAND) or an Echo (`op` ECHO) to `target` from `from`, and
    /// returns the shims it reached, sorted; or the text of the Error that refused it, after
    /// checking that it reached nobody. The sender's answer must count exactly the shims
    /// that were sent the frame (itself included when it was), and each is sent it once.
    fn try_route(&mut self, op: u8, from: &str, target: &str) -> Result<Vec<String>, String> {
        self.tags += 1;
        let tag = format!("/tag{}", self.tags);
        let me = (self.shims.iter().position(|(n, _)| n == from))
            .unwrap_or_else(|| panic!("no shim {from} in the fleet"));
        let sender = self.shims[me].0.clone();
        let mut reached = Vec::new();
        let mut ids = Vec::new();
        // The sender's own copy (for a '+' target) is queued before its answer.
        let c = &mut self.shims[me].1;
        c.send(op, format!("{target} {tag}").as_bytes());
        let answer = loop {
            match c.recv() {
                (o, d) if o == op => {
                    ids.push(delivered(op, &d, &sender, &tag));
                    reached.push(sender.clone());
                }
                (ACK, d) => break Ok(ack_of(&d)),
                (ERROR, d) => break Err(text(&d)),
                (o, d) => panic!("answer to {target}: 0x{o:02X} {:?}", text(&d)),
            }
        };
        for (i, (name, c)) in self.shims.iter_mut().enumerate() {
            if i == me {
                continue;
            }
            c.send(PING, tag.as_bytes());
            loop {
                match c.recv() {
                    (o, d) if o == op => {
                        ids.push(delivered(op, &d, &sender, &tag));
                        reached.push(name.clone());
                    }
                    (PONG, d) => {
                        assert_eq!(text(&d), tag, "{name}: the Pong to its Ping");
                        break;
                    }
                    (o, d) => panic!("{name}, after {target}: 0x{o:02X} {:?}", text(&d)),
                }
            }
        }
        let mut once = reached.clone();
        once.sort();
        once.dedup();
        assert_eq!(
            once.len(),
            reached.len(),
            "{target} sent twice: {reached:?}"
        );
        match answer {
            Ok((id, n)) => {
                assert_eq!(
                    n,
                    reached.len() as u64,
                    "{target}: the Ack counts {reached:?}"
                );
                assert!(
                    ids.iter().all(|i| *i == id),
                    "{target}: ids {ids:?}, Ack {id}"
                );
                if op == ECHO {
                    assert_eq!(id, "0");
                }
                Ok(once)
            }
            Err(e) => {
                assert!(
                    reached.is_empty(),
                    "{target} refused ({e}) yet sent {reached:?}"
                );
                Err(e)
            }
        }
    }

    /// Like [`Fleet::try_route`]; a target that reaches nobody (`no shim matches TARGET`)
    /// reached the empty list, and any other Error fails.
    fn route(&mut self, op: u8, from: &str, target: &str) -> Vec<String> {
        match self.try_route(op, from, target) {
            Ok(v) => v,
            Err(e) if e == format!("no shim matches {target}") => Vec::new(),
            Err(e) => panic!("{target}: {e}"),
        }
    }

    /// The identities a Who `target` from `from` lists, sorted.
    fn who(&mut self, from: &str, target: &str) -> Vec<String> {
        who(self.c(from), target).keys().cloned().collect()
    }
}

/// Checks a delivered Command or Echo (from `sender`, text `tag`); returns its id (`0` for
/// an Echo).
fn delivered(op: u8, d: &[u8], sender: &str, tag: &str) -> String {
    if op == ECHO {
        assert_eq!(text(d), format!("{sender} {tag}"), "a delivered Echo");
        return "0".into();
    }
    let (from, id, cmd) = command_of(d);
    assert_eq!((from.as_str(), text(&cmd).as_str()), (sender, tag));
    id
}

/// `names` as owned strings.
fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------
// Reading state listings and subscriptions
// ---------------------------------------------------------------------------------------

/// The next `n` frames on `c`, described, grouped by subscription (the first word) in the
/// order each subscription's frames came: frames of two subscriptions keep no order
/// between them, those of one do.
fn next_by_sid(c: &mut Tcp, n: usize) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..n {
        let line = next(c);
        let sid = line.split(' ').next().unwrap().to_string();
        out.entry(sid).or_default().push(line);
    }
    out
}

/// `(sid, lines)` pairs as [`next_by_sid`] returns them.
fn by_sid(groups: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    (groups.iter())
        .map(|(sid, lines)| (sid.to_string(), names(lines)))
        .collect()
}

fn expect_listing(c: &mut Tcp, frames: &[&str], ack: &str) {
    let mut want = names(frames);
    want.sort();
    assert_eq!(listing(c), (want, ack.to_string()));
}

/// A barrier on `c`: its Pong is the next frame, so nothing was queued for it before.
fn quiet(c: &mut Tcp, tag: &str) {
    c.send(PING, tag.as_bytes());
    assert_eq!(next(c), format!("pong {tag}"), "nothing before the Pong");
}

fn subscribe(c: &mut Tcp, sid: u32, target: &str, keys: &[&str]) {
    let mut v = Vec::new();
    st::encode_subscribe(sid, 0, target, keys, &mut v);
    c.send_raw(&v);
}

fn get(c: &mut Tcp, target: &str, keys: &[&str]) {
    let mut v = Vec::new();
    st::encode_get(target, keys, &mut v);
    c.send_raw(&v);
}

// ---------------------------------------------------------------------------------------
// Command
// ---------------------------------------------------------------------------------------

fn a_command_reaches_only_the_shims_that_pass(io: &str) {
    let srv = Server::start(io, &[]);
    let mut boss = publisher(&srv, "peq.z.boss", &["class=CLR"]);
    let mut cleric = publisher(&srv, "peq.z.cleric", &["class=CLR", "hp=100"]);
    let mut cleric2 = publisher(&srv, "peq.y.Cleric2", &["CLASS=clr"]);
    let mut war = publisher(&srv, "peq.z.war", &["class=WAR"]);
    let mut bare = shim(&srv, "peq.z.bare");
    let mut live = publisher(&srv, "live.z.cleric", &["class=CLR"]);

    // `class=clr` selects CLR and clr alike; the sender, a cleric too, is left out, and
    // so is the cleric outside the pattern.
    boss.send(COMMAND, b"peq.>,class=clr /cast 1");
    let (id, n) = expect_ack(&mut boss);
    assert_eq!(n, 2, "the Ack counts the two clerics on peq");
    for c in [&mut cleric, &mut cleric2] {
        assert_eq!(
            expect_command(c),
            ("peq.z.boss".into(), id.clone(), b"/cast 1".to_vec())
        );
        c.send(RESPONSE, format!("{id} casting").as_bytes());
        c.sync(b"answered");
    }
    let mut answers = vec![text(&boss.expect(RESPONSE)), text(&boss.expect(RESPONSE))];
    answers.sort();
    assert_eq!(
        answers,
        [
            format!("{id} peq.y.Cleric2 casting"),
            format!("{id} peq.z.cleric casting")
        ]
    );
    // A shim that was not selected was not sent it: it may not answer it either.
    war.send(RESPONSE, format!("{id} me too").as_bytes());
    assert_eq!(text(&war.expect(ERROR)), not_answerable(&id, 256));
    // An unfiltered marker from the same sender is the next frame every other shim gets:
    // the Command reached none of them.
    boss.send(ECHO, b"> marker");
    boss.expect_frame(ACK, b"0 5");
    for c in [&mut cleric, &mut cleric2, &mut war, &mut bare, &mut live] {
        c.expect_frame(ECHO, b"peq.z.boss marker");
    }
    boss.sync(b"no other answer");

    // The key and the pattern in another case; the other test value.
    boss.send(COMMAND, b"PEQ.>,CLASS=CLR /cast 2");
    let (id2, n) = expect_ack(&mut boss);
    assert_eq!(n, 2);
    assert_ne!(id2, id);
    for c in [&mut cleric, &mut cleric2] {
        assert_eq!(expect_command(c).1, id2);
    }
    boss.send(COMMAND, b"peq.>,class=war /taunt");
    let (id3, n) = expect_ack(&mut boss);
    assert_eq!(n, 1);
    assert_eq!(
        expect_command(&mut war),
        ("peq.z.boss".into(), id3, b"/taunt".to_vec())
    );
    // A filter nobody passes: the Error names the target as written.
    boss.send(COMMAND, b"peq.>,class=Nobody /sit");
    assert_eq!(
        text(&boss.expect(ERROR)),
        "no shim matches peq.>,class=Nobody"
    );
    boss.send(ECHO, b"> marker2");
    boss.expect_frame(ACK, b"0 5");
    for c in [&mut cleric, &mut cleric2, &mut war, &mut bare, &mut live] {
        c.expect_frame(ECHO, b"peq.z.boss marker2");
    }

    // The selection is read when the Command is handled: a shim that changes its class is
    // selected, or no longer, from its next Set on.
    set(&mut war, &["class=clr"]);
    set(&mut cleric, &["class=WAR"]);
    boss.send(COMMAND, b"peq.>,class=clr /cast 3");
    let (id4, n) = expect_ack(&mut boss);
    assert_eq!(n, 2);
    for c in [&mut war, &mut cleric2] {
        assert_eq!(expect_command(c).1, id4);
    }
    boss.send(ECHO, b"> marker3");
    boss.expect_frame(ACK, b"0 5");
    for c in [&mut cleric, &mut cleric2, &mut war, &mut bare, &mut live] {
        c.expect_frame(ECHO, b"peq.z.boss marker3");
    }
}

// ---------------------------------------------------------------------------------------
// `~`, several filters, missing keys, `+`
// ---------------------------------------------------------------------------------------

fn a_word_filter_matches_whole_words(io: &str) {
    let srv = Server::start(io, &NO_RATES);
    let mut f = Fleet::default();
    f.add(&srv, "peq.z.boss", &[]);
    f.add(&srv, "peq.z.a", &["channels=tanks heals"]);
    f.add(&srv, "peq.z.b", &["channels=heals"]);
    f.add(&srv, "peq.z.c", &["channels=healers"]);
    f.add(&srv, "peq.z.d", &["channels=  Tanks   PULLERS "]);
    f.add(&srv, "peq.z.e", &["roles=heals"]);
    f.add(&srv, "peq.z.none", &[]);

    let (a, b, d) = ("peq.z.a", "peq.z.b", "peq.z.d");
    assert_eq!(
        f.route(COMMAND, "peq.z.boss", "peq.>,channels~heals"),
        [a, b]
    );
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels~HEALS"), [a, b]);
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,CHANNELS~Heals"), [a, b]);
    // A word matches whole: neither a part of one nor a longer one.
    assert_eq!(
        f.route(COMMAND, "peq.z.boss", "peq.>,channels~heal"),
        [""; 0]
    );
    assert_eq!(
        f.route(ECHO, "peq.z.boss", "peq.>,channels~healer"),
        [""; 0]
    );
    assert_eq!(
        f.route(ECHO, "peq.z.boss", "peq.>,channels~healers"),
        ["peq.z.c"]
    );
    // Words are separated by one or more spaces, leading and trailing ones included.
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels~tanks"), [a, d]);
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels~pullers"), [d]);
    // `=` compares the whole value: `heals` is b's, not a's.
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels=heals"), [b]);
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels=tanks"), [""; 0]);
    // Both tests on one key, and a word on another key.
    assert_eq!(
        f.route(ECHO, "peq.z.boss", "peq.>,channels~heals,channels~tanks"),
        [a]
    );
    assert_eq!(
        f.route(ECHO, "peq.z.boss", "peq.>,roles~heals"),
        ["peq.z.e"]
    );
    // A shim changes its channels: the word follows the value.
    set(f.c(b), &["channels=tanks"]);
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels~heals"), [a]);
    assert_eq!(
        f.route(ECHO, "peq.z.boss", "peq.>,channels~tanks"),
        [a, b, d]
    );
    set(f.c(a), &["channels"]);
    assert_eq!(f.route(ECHO, "peq.z.boss", "peq.>,channels~tanks"), [b, d]);
}

fn every_filter_must_hold_and_plus_includes_the_sender(io: &str) {
    let srv = Server::start(io, &NO_RATES);
    let mut f = Fleet::default();
    let boss = "peq.z.boss";
    f.add(&srv, boss, &["class=CLR", "zone=pok", "group=Bob"]);
    f.add(
        &srv,
        "peq.z.a",
        &["class=CLR", "zone=pok", "group=Bob", "note=a=b"],
    );
    f.add(&srv, "peq.z.b", &["class=clr", "zone=guk", "group=bob"]);
    f.add(&srv, "peq.y.c", &["class=WAR", "zone=pok"]);
    f.add(&srv, "peq.y.d", &["zone=pok"]);
    f.add(&srv, "peq.y.e", &["zone=\u{c6}r\u{f8}", "level=65"]);
    f.add(&srv, "live.z.f", &["class=WAR", "zone=pok"]);
    let (a, b, c) = ("peq.z.a", "peq.z.b", "peq.y.c");

    // Both filters hold, and only then; the sender passes too but is left out.
    assert_eq!(f.route(COMMAND, boss, "peq.>,class=clr,zone=pok"), [a]);
    assert_eq!(f.route(ECHO, boss, "peq.>,zone=pok,class=clr"), [a]);
    assert_eq!(f.route(ECHO, boss, "peq.>,class=clr,class=war"), [""; 0]);
    assert_eq!(
        f.route(ECHO, boss, "*.*.*,zone=pok,class=WAR"),
        ["live.z.f", c]
    );
    assert_eq!(
        f.route(ECHO, boss, "peq.>,zone=POK,class=CLR,group=BOB"),
        [a]
    );
    // With '+' the sender is included when it passes, and only then.
    assert_eq!(
        f.route(COMMAND, boss, "+peq.>,class=clr,zone=pok"),
        [a, boss]
    );
    assert_eq!(f.route(ECHO, boss, "+peq.>,class=clr,zone=pok"), [a, boss]);
    assert_eq!(f.route(ECHO, boss, "+peq.>,class=war"), [c]);
    assert_eq!(f.route(ECHO, boss, "+peq.z.boss,group=bob"), [boss]);
    assert_eq!(f.route(ECHO, boss, "peq.z.boss,group=bob"), [""; 0]);
    assert_eq!(f.route(ECHO, boss, "+peq.z.boss,group=alice"), [""; 0]);
    // A shim that does not hold the key passes no filter on it, `=` or `~`.
    assert_eq!(f.route(ECHO, boss, "peq.>,group=bob"), [a, b]);
    assert_eq!(f.route(ECHO, boss, "peq.>,group~bob"), [a, b]);
    assert_eq!(f.route(ECHO, boss, "peq.>,zone=pok"), [c, "peq.y.d", a]);
    assert_eq!(f.route(ECHO, boss, "peq.>,level=65"), ["peq.y.e"]);
    // A value may hold '=' (compared whole); non-ASCII letters compare as they are.
    assert_eq!(f.route(ECHO, boss, "peq.>,note=a=b"), [a]);
    assert_eq!(f.route(ECHO, boss, "peq.>,note=a"), [""; 0]);
    assert_eq!(f.route(ECHO, boss, "peq.>,zone=\u{c6}R\u{f8}"), ["peq.y.e"]);
    assert_eq!(f.route(ECHO, boss, "peq.>,zone=\u{e6}r\u{f8}"), [""; 0]);
    // A deleted key, and a key set later.
    set(f.c(a), &["group"]);
    assert_eq!(f.route(ECHO, boss, "peq.>,group=bob"), [b]);
    set(f.c("peq.y.d"), &["group=Bob", "class=CLR"]);
    assert_eq!(
        f.route(ECHO, boss, "+peq.>,group=bob,class=clr"),
        ["peq.y.d", b, boss]
    );
}

// ---------------------------------------------------------------------------------------
// Echo
// ---------------------------------------------------------------------------------------

fn an_echo_with_filters_over_tcp_and_udp(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut boss, boss_udp) = bound_shim(&srv, "peq.z.boss");
    let (mut a, a_udp) = bound_shim(&srv, "peq.z.a");
    set(&mut a, &["class=CLR"]);
    let mut b = publisher(&srv, "peq.z.b", &["class=clr"]);
    let mut c = publisher(&srv, "peq.z.c", &["class=WAR"]);

    // The text passes through unchanged, spaces and 0x0B included.
    boss.send(ECHO, b"peq.>,class=clr inc  two\x0bassist me");
    boss.expect_frame(ACK, b"0 2");
    for r in [&mut a, &mut b] {
        r.expect_frame(ECHO, b"peq.z.boss inc  two\x0bassist me");
    }
    c.sync(b"not a cleric");
    boss.send(ECHO, b"+peq.>,class=war hi");
    boss.expect_frame(ACK, b"0 1");
    c.expect_frame(ECHO, b"peq.z.boss hi");
    boss.send(ECHO, b"+peq.>,class=pal hi");
    assert_eq!(
        text(&boss.expect(ERROR)),
        "no shim matches +peq.>,class=pal"
    );

    // Over UDP: the answer over UDP; the Echo over UDP to a bound recipient, over TCP to
    // one without.
    boss_udp.send(ECHO, b"peq.>,class=clr by udp");
    boss_udp.expect_frame(ACK, b"0 2");
    a_udp.expect_frame(ECHO, b"peq.z.boss by udp");
    b.expect_frame(ECHO, b"peq.z.boss by udp");
    boss_udp.send(ECHO, b"peq.>,class=pal by udp");
    boss_udp.expect_frame(ERROR, b"no shim matches peq.>,class=pal");
    boss_udp.send(ECHO, b"peq.>,class by udp");
    boss_udp.expect_frame(
        ERROR,
        b"bad target peq.>,class: filter 1 (class): expected KEY=VALUE or KEY~WORD",
    );
    // Nothing else reached anyone.
    for r in [&mut a, &mut b, &mut c, &mut boss] {
        r.sync(b"end");
    }
    a_udp.sync(b"end");
}

// ---------------------------------------------------------------------------------------
// Who, Get
// ---------------------------------------------------------------------------------------

fn who_lists_only_the_shims_that_pass(io: &str) {
    let srv = Server::start(io, &NO_RATES);
    let mut f = Fleet::default();
    let me = "peq.z.me";
    f.add(&srv, me, &["class=CLR", "zone=pok"]);
    f.add(
        &srv,
        "peq.z.a",
        &["class=clr", "zone=pok", "channels=tanks heals"],
    );
    f.add(&srv, "peq.y.B", &["class=CLR", "zone=guk"]);
    f.add(
        &srv,
        "peq.y.c",
        &["class=WAR", "zone=pok", "channels=tanks"],
    );
    f.add(&srv, "live.z.d", &["class=CLR"]);
    f.add(&srv, "peq.z.none", &[]);

    // The requester is listed when it passes, with or without '+'.
    let clerics = ["peq.y.B", "peq.z.a", me];
    assert_eq!(f.who(me, "peq.>,class=clr"), clerics);
    assert_eq!(f.who(me, "+peq.>,class=clr"), clerics);
    assert_eq!(f.who(me, "PEQ.>,Class=Clr"), clerics);
    assert_eq!(
        f.who(me, ">,class=clr"),
        ["live.z.d", "peq.y.B", "peq.z.a", me]
    );
    assert_eq!(f.who(me, "peq.z.*,class=clr,zone=pok"), ["peq.z.a", me]);
    assert_eq!(f.who(me, "peq.>,channels~tanks"), ["peq.y.c", "peq.z.a"]);
    assert_eq!(f.who(me, "peq.>,channels~heals,class=war"), [""; 0]);
    assert_eq!(f.who(me, "peq.>,group=bob"), [""; 0]);
    assert_eq!(f.who(me, "*.*.*,role=healer"), [""; 0]);
    // It follows the state.
    set(f.c("peq.z.none"), &["class=CLR"]);
    set(f.c(me), &["class=WAR"]);
    assert_eq!(
        f.who(me, "peq.>,class=clr"),
        ["peq.y.B", "peq.z.a", "peq.z.none"]
    );
    assert_eq!(f.who(me, "peq.>,class=war"), ["peq.y.c", me]);
    // An unfiltered Who still lists everyone.
    assert_eq!(f.who(me, "").len(), 6);
}

fn get_reads_only_the_shims_that_pass(io: &str) {
    let srv = Server::start(io, &NO_RATES);
    let mut a = publisher(&srv, "peq.z.a", &["class=CLR", "hp=1", "mana=2"]);
    let _b = publisher(&srv, "peq.z.b", &["class=WAR", "hp=3"]);
    let _c = shim(&srv, "peq.z.c");
    let _d = publisher(&srv, "live.z.d", &["class=CLR", "hp=4"]);
    let mut me = publisher(&srv, "peq.z.me", &["class=clr", "hp=9"]);

    // The requester is read too when it passes.
    get(&mut me, "peq.>,class=clr", &[]);
    expect_listing(
        &mut me,
        &[
            "0 F peq.z.a|class=CLR|hp=1|mana=2",
            "0 F peq.z.me|class=clr|hp=9",
        ],
        "ack 0 2",
    );
    // Keys narrow what is read, not who: a filter on a key that is not read.
    get(&mut me, "+peq.>,class=CLR", &["hp"]);
    expect_listing(
        &mut me,
        &["0 F peq.z.a|hp=1", "0 F peq.z.me|hp=9"],
        "ack 0 2",
    );
    get(&mut me, ">,class=clr", &["mana"]);
    expect_listing(
        &mut me,
        &["0 F peq.z.a|mana=2", "0 F live.z.d", "0 F peq.z.me"],
        "ack 0 3",
    );
    get(&mut me, "peq.>,class=clr,mana=2", &[]);
    expect_listing(&mut me, &["0 F peq.z.a|class=CLR|hp=1|mana=2"], "ack 0 1");
    get(&mut me, ">,hp=3", &["class"]);
    expect_listing(&mut me, &["0 F peq.z.b|class=WAR"], "ack 0 1");
    get(&mut me, "peq.>,group=bob", &[]);
    expect_listing(&mut me, &[], "ack 0 0");
    get(&mut me, "peq.y.*,class=clr", &[]);
    expect_listing(&mut me, &[], "ack 0 0");
    // It follows the state.
    set(&mut a, &["class=PAL"]);
    get(&mut me, "peq.>,class=clr", &["class"]);
    expect_listing(&mut me, &["0 F peq.z.me|class=clr"], "ack 0 1");
    get(&mut me, "peq.>,class=pal", &["class"]);
    expect_listing(&mut me, &["0 F peq.z.a|class=PAL"], "ack 0 1");
    quiet(&mut me, "end");
}

// ---------------------------------------------------------------------------------------
// Subscribe: the subscription follows the selection
// ---------------------------------------------------------------------------------------

fn a_subscription_follows_the_selection(io: &str) {
    let srv = Server::start(io, &NO_RATES);
    let a = publisher(&srv, "peq.z.a", &["class=CLR", "hp=100"]);
    let mut b = publisher(&srv, "peq.z.b", &["class=WAR", "hp=200"]);
    let mut c = shim(&srv, "peq.z.c");
    let mut d = publisher(&srv, "live.z.d", &["class=WAR"]);
    let mut sub = shim(&srv, "tool.watch");

    // The listing: only the shims that pass. Subscription 2 reads hp alone.
    subscribe(&mut sub, 1, "peq.>,class=clr", &[]);
    expect_listing(&mut sub, &["1 F peq.z.a|class=CLR|hp=100"], "ack 1 1");
    subscribe(&mut sub, 2, "peq.>,class=clr", &["hp"]);
    expect_listing(&mut sub, &["2 F peq.z.a|hp=100"], "ack 2 1");

    // A shim comes to pass: its join, then its whole state (of the keys read).
    set(&mut b, &["class=Clr"]);
    assert_eq!(
        next_by_sid(&mut sub, 4),
        by_sid(&[
            ("1", &["1 +peq.z.b", "1 F peq.z.b|class=Clr|hp=200"]),
            ("2", &["2 +peq.z.b", "2 F peq.z.b|hp=200"]),
        ])
    );
    // Its changes, as for any watched shim.
    set(&mut b, &["hp=201"]);
    assert_eq!(
        next_by_sid(&mut sub, 2),
        by_sid(&[
            ("1", &["1 D peq.z.b|hp=201"]),
            ("2", &["2 D peq.z.b|hp=201"])
        ])
    );
    // A change of the filtered key that still passes is a change like another: only the
    // subscription that reads the key is sent it.
    set(&mut b, &["class=CLR"]);
    assert_eq!(next(&mut sub), "1 D peq.z.b|class=CLR");
    quiet(&mut sub, "still selected");

    // It stops passing, in a Set that changes another key too: its leave alone.
    set(&mut b, &["class=WAR", "hp=202"]);
    assert_eq!(
        next_by_sid(&mut sub, 2),
        by_sid(&[
            ("1", &["1 -peq.z.b not selected"]),
            ("2", &["2 -peq.z.b not selected"]),
        ])
    );
    quiet(&mut sub, "left");
    // Its later changes are not sent.
    set(&mut b, &["hp=203"]);
    quiet(&mut sub, "unselected changes");
    // It passes again: a join, and its whole state as it is now.
    set(&mut b, &["class=clr"]);
    assert_eq!(
        next_by_sid(&mut sub, 4),
        by_sid(&[
            ("1", &["1 +peq.z.b", "1 F peq.z.b|class=clr|hp=203"]),
            ("2", &["2 +peq.z.b", "2 F peq.z.b|hp=203"]),
        ])
    );
    // Deleting the key: a leave.
    set(&mut b, &["class"]);
    assert_eq!(
        next_by_sid(&mut sub, 2),
        by_sid(&[
            ("1", &["1 -peq.z.b not selected"]),
            ("2", &["2 -peq.z.b not selected"]),
        ])
    );
    // A shim that held no keys comes to pass.
    set(&mut c, &["class=CLR"]);
    assert_eq!(
        next_by_sid(&mut sub, 4),
        by_sid(&[
            ("1", &["1 +peq.z.c", "1 F peq.z.c|class=CLR"]),
            ("2", &["2 +peq.z.c", "2 F peq.z.c"]),
        ])
    );
    // Outside the pattern, passing changes nothing.
    set(&mut d, &["class=CLR"]);
    quiet(&mut sub, "outside the pattern");

    // A new shim in the pattern holds no keys: no join until it passes.
    let mut e = shim(&srv, "peq.z.e");
    set(&mut e, &["hp=1"]);
    quiet(&mut sub, "a new shim that does not pass");
    set(&mut e, &["class=clr", "hp=2"]);
    assert_eq!(
        next_by_sid(&mut sub, 4),
        by_sid(&[
            ("1", &["1 +peq.z.e", "1 F peq.z.e|hp=2|class=clr"]),
            ("2", &["2 +peq.z.e", "2 F peq.z.e|hp=2"]),
        ])
    );

    // Renames: an unselected shim's says nothing; a selected one's is a leave under the
    // old name, then a join under the new one with its state.
    b.send(IDENTIFY, b"peq.z.b2");
    b.sync(b"renamed");
    quiet(&mut sub, "an unselected rename");
    c.send(IDENTIFY, b"peq.y.c2");
    assert_eq!(
        next_by_sid(&mut sub, 6),
        by_sid(&[
            (
                "1",
                &[
                    "1 -peq.z.c renamed",
                    "1 +peq.y.c2",
                    "1 F peq.y.c2|class=CLR"
                ]
            ),
            ("2", &["2 -peq.z.c renamed", "2 +peq.y.c2", "2 F peq.y.c2"]),
        ])
    );

    // An unselected shim that goes: no leave. A selected one: its leave.
    drop(b);
    srv.wait_log(&["close", "identity=peq.z.b2 reason=eof"]);
    quiet(&mut sub, "an unselected shim closed");
    drop(a);
    assert_eq!(
        next_by_sid(&mut sub, 2),
        by_sid(&[("1", &["1 -peq.z.a eof"]), ("2", &["2 -peq.z.a eof"])])
    );

    // After an Unsubscribe, only the other subscription follows.
    sub.send(UNSUBSCRIBE, b"1");
    assert_eq!(next(&mut sub), "ack 1 1");
    set(&mut e, &["class=WAR"]);
    assert_eq!(next(&mut sub), "2 -peq.z.e not selected");
    set(&mut e, &["class=CLR"]);
    assert_eq!(next(&mut sub), "2 +peq.z.e");
    assert_eq!(next(&mut sub), "2 F peq.z.e|hp=2");
    quiet(&mut sub, "end");
}

// ---------------------------------------------------------------------------------------
// Users: filters only narrow
// ---------------------------------------------------------------------------------------

const OPS: &str = "ops-s3cret";
const BOXER: &str = "boxer-s3cret";
const GUEST: &str = "guest-s3cret";

fn filters_never_widen_what_a_user_may_reach(io: &str) {
    let users = [
        User::new("ops", OPS, &["ops.>"], &[">"]),
        User::new(
            "boxer",
            BOXER,
            &["peq.*.*"],
            &["peq.ecommons.mallory", "peq.guk.*"],
        ),
        User {
            echoes: Some(&["peq.ecommons.*"][..]),
            who: Some(&["peq.ecommons.victim", "peq.ecommons.mallory"][..]),
            ..User::new("guest", GUEST, &["peq.>"], &[])
        },
    ];
    let cfg = users_config("", &users);
    let mut args = vec!["--config", cfg.arg()];
    args.extend_from_slice(&NO_RATES);
    let srv = Server::start(io, &args);
    let mut f = Fleet::default();
    let (victim, mallory) = ("peq.ecommons.victim", "peq.ecommons.mallory");
    let (cleric, war) = ("peq.guk.cleric", "peq.guk.war");
    for (name, items) in [
        (victim, &["class=CLR"][..]),
        (mallory, &["class=CLR"]),
        (cleric, &["class=CLR"]),
        (war, &["class=WAR"]),
    ] {
        f.push(name, login(&srv, "guest", GUEST, name, items));
    }
    let boxer = "peq.ecommons.boxer";
    f.push(boxer, login(&srv, "boxer", BOXER, boxer, &[]));
    f.push("ops.tool", login(&srv, "ops", OPS, "ops.tool", &[]));
    let refused = |what: &str, t: &str| Err(format!("{what} not permitted: {t}"));

    // What boxer may not command without filters, it may not command with them, even
    // when the only shims that pass are ones it may command.
    for t in [
        "peq.>,class=clr",
        "peq.ecommons.*,class=clr",
        "peq.ecommons.victim",
        "peq.ecommons.victim,class=clr",
        "+peq.ecommons.victim,class=clr",
        "peq.>,class=nobody",
        ">,class=war",
    ] {
        assert_eq!(f.try_route(COMMAND, boxer, t), refused("command", t), "{t}");
        // Its echoes are its commands.
        assert_eq!(f.try_route(ECHO, boxer, t), refused("echo", t), "{t}");
    }
    // What it may command, narrowed by the filters.
    assert_eq!(
        f.route(COMMAND, boxer, "peq.ecommons.mallory,class=clr"),
        [mallory]
    );
    assert_eq!(f.route(COMMAND, boxer, "peq.guk.*,class=clr"), [cleric]);
    assert_eq!(f.route(ECHO, boxer, "peq.guk.*,class=war"), [war]);
    assert_eq!(
        f.try_route(COMMAND, boxer, "peq.guk.*,class=pal"),
        Err("no shim matches peq.guk.*,class=pal".to_string())
    );
    set(f.c(mallory), &["class=WAR"]);
    assert_eq!(
        f.route(COMMAND, boxer, "peq.ecommons.mallory,class=clr"),
        [""; 0]
    );
    set(f.c(mallory), &["class=CLR"]);

    // guest: commands nobody, echoes to its zone only, whatever the filters.
    assert_eq!(
        f.try_route(COMMAND, victim, "peq.ecommons.mallory,class=clr"),
        refused("command", "peq.ecommons.mallory,class=clr")
    );
    assert_eq!(f.route(ECHO, victim, "peq.ecommons.*,class=clr"), [mallory]);
    assert_eq!(
        f.try_route(ECHO, victim, "peq.>,class=clr"),
        refused("echo", "peq.>,class=clr")
    );
    // ops reaches every cleric.
    assert_eq!(
        f.route(COMMAND, "ops.tool", "peq.>,class=clr"),
        [mallory, victim, cleric]
    );

    // Who, Get and Subscribe list what the user may read, then filter.
    assert_eq!(f.who(victim, "peq.>,class=clr"), [mallory, victim]);
    assert_eq!(f.who(victim, ">,class=war"), [""; 0]);
    assert_eq!(f.who(boxer, "peq.>,class=clr"), [mallory, victim, cleric]);
    assert_eq!(f.who("ops.tool", ">,class=war"), [war]);
    let c = f.c(victim);
    get(c, ">,class=clr", &[]);
    expect_listing(
        c,
        &[
            "0 F peq.ecommons.victim|class=CLR",
            "0 F peq.ecommons.mallory|class=CLR",
        ],
        "ack 0 2",
    );
    subscribe(c, 1, ">,class=clr", &[]);
    expect_listing(c, &["1 F peq.ecommons.mallory|class=CLR"], "ack 1 1");
    // A shim it may not read comes to pass: nothing; one it may read stops passing: its
    // leave.
    set(f.c(war), &["class=CLR"]);
    set(f.c(mallory), &["class=WAR"]);
    assert_eq!(next(f.c(victim)), "1 -peq.ecommons.mallory not selected");
    quiet(f.c(victim), "end");
}

/// A reload that changes what a user may read: a filtered subscription starts watching the
/// shims it now may read, and a join comes only for those that pass; it stops watching
/// those it may not, and a leave comes only for those that passed.
fn a_reload_changes_what_a_filtered_subscription_reads(io: &str) {
    let cfg = TempFile::new("users.toml", "");
    let users = [
        User::new("game", GUEST, &["peq.>"], &[]),
        User::new("tool", OPS, &["tool.>"], &[]),
    ];
    let toml = |state: &str| {
        // The last [[user]] table is tool's.
        let mut t = users_toml(&cfg, "who_per_sec = 0\n", &users);
        t.push_str(&format!("state = {state}\n"));
        t
    };
    cfg.write(&toml(r#"["peq.z.bob"]"#));
    let srv = Server::with_admin(io, &["--config", cfg.arg()]);
    let mut bob = login(&srv, "game", GUEST, "peq.z.bob", &["class=CLR"]);
    let mut dave = login(&srv, "game", GUEST, "peq.z.dave", &["class=WAR"]);
    let mut eve = login(&srv, "game", GUEST, "peq.z.eve", &["class=clr", "hp=5"]);
    let mut tool = login(&srv, "tool", OPS, "tool.w", &[]);
    subscribe(&mut tool, 1, "peq.>,class=clr", &[]);
    expect_listing(&mut tool, &["1 F peq.z.bob|class=CLR"], "ack 1 1");
    set(&mut eve, &["hp=6"]);
    quiet(&mut tool, "eve may not be read");

    // Widened: eve passes (a join, then her state); dave does not (nothing).
    cfg.write(&toml(r#"["peq.z.*"]"#));
    assert_eq!(srv.post("/reload").0, 200);
    assert_eq!(next(&mut tool), "1 +peq.z.eve");
    assert_eq!(next(&mut tool), "1 F peq.z.eve|class=clr|hp=6");
    quiet(&mut tool, "dave does not pass");
    // Readable now, dave is watched: he joins when he comes to pass.
    set(&mut dave, &["class=CLR"]);
    assert_eq!(next(&mut tool), "1 +peq.z.dave");
    assert_eq!(next(&mut tool), "1 F peq.z.dave|class=CLR");
    set(&mut dave, &["class=WAR"]);
    assert_eq!(next(&mut tool), "1 -peq.z.dave not selected");

    // Narrowed: eve, who passed, leaves (not permitted); dave, who did not, says nothing,
    // and is no longer watched.
    cfg.write(&toml(r#"["peq.z.bob"]"#));
    assert_eq!(srv.post("/reload").0, 200);
    assert_eq!(next(&mut tool), "1 -peq.z.eve not permitted");
    quiet(&mut tool, "narrowed");
    set(&mut dave, &["class=CLR"]);
    set(&mut eve, &["hp=7"]);
    quiet(&mut tool, "unreadable changes");
    set(&mut bob, &["class=WAR"]);
    assert_eq!(next(&mut tool), "1 -peq.z.bob not selected");
    quiet(&mut tool, "end");
}

// ---------------------------------------------------------------------------------------
// Malformed targets
// ---------------------------------------------------------------------------------------

/// Targets that are refused, each with its reason (what follows `bad target T: `).
fn bad_targets() -> Vec<(Vec<u8>, String)> {
    let key_byte = |byte: u8, at: usize| {
        format!(
            "key byte 0x{byte:02X} at {at}: only ASCII letters, digits, '_' and '-' are allowed"
        )
    };
    let long_key = "k".repeat(65);
    let nine = format!("peq.>{}", ",a=1".repeat(9));
    let too_long = format!("peq.>,k={}", "v".repeat(256 - 8));
    assert_eq!(too_long.len(), 256);
    let plus_too_long = format!("+{too_long}");
    let v = |t: &str, why: &str| (t.as_bytes().to_vec(), why.to_string());
    vec![
        v(
            "peq.>,class",
            "filter 1 (class): expected KEY=VALUE or KEY~WORD",
        ),
        v(
            "peq.>,class=CLR,zone",
            "filter 2 (zone): expected KEY=VALUE or KEY~WORD",
        ),
        v(
            "peq.>,class=CLR,cl.ass=x",
            &format!("filter 2 (cl.ass=x): {}", key_byte(b'.', 2)),
        ),
        v(
            "peq.>,cl*ss~x",
            &format!("filter 1 (cl*ss~x): {}", key_byte(b'*', 2)),
        ),
        v("peq.>,=CLR", "filter 1 (=CLR): key is empty"),
        v(
            &format!("peq.>,{long_key}=1"),
            &format!("filter 1 ({long_key}=1): key longer than 64 bytes"),
        ),
        v("peq.>,class=", "filter 1 (class=): nothing after '='"),
        v(
            "+peq.>,channels~",
            "filter 1 (channels~): nothing after '~'",
        ),
        v(
            "peq.>,class=C\x01R",
            "filter 1 (class=C\x01R): byte 0x01 in the value: a control byte",
        ),
        v(
            "peq.>,class=CLR\x7f",
            "filter 1 (class=CLR\x7f): byte 0x7F in the value: a control byte",
        ),
        v("peq.>,,class=CLR", "empty filter after ','"),
        v("peq.>,class=CLR,", "empty filter after ','"),
        v("+peq.>,", "empty filter after ','"),
        v(&nine, "more than 8 filters"),
        v(&too_long, "target longer than 255 bytes"),
        v(&plus_too_long, "target longer than 255 bytes"),
        v(",class=CLR", "empty target"),
        v("peq.>.x,class=CLR", "'>' must be the last segment"),
        (b"peq.>,zone=\xE9".to_vec(), "target is not UTF-8".into()),
    ]
}

fn malformed_targets_get_one_error_each(io: &str) {
    let srv = Server::start(io, &NO_RATES);
    // Holds what the longest targets and the most filters accepted test.
    let eight: Vec<String> = "abcdefgh".chars().map(|k| format!("{k}=1")).collect();
    let long_value = "v".repeat(255 - 8);
    let mut items: Vec<String> = eight.clone();
    items.push(format!("k={long_value}"));
    let items: Vec<&str> = items.iter().map(String::as_str).collect();
    let mut target = publisher(&srv, "peq.z.target", &items);
    let mut c = shim(&srv, "peq.z.me");
    let bad = bad_targets();
    let shown = |t: &[u8]| String::from_utf8_lossy(t).into_owned();

    // Command and Echo: `bad target`, in order, one each, pipelined.
    for (op, text_after) in [(COMMAND, &b" /sit"[..]), (ECHO, b" hi")] {
        let mut wire = Vec::new();
        for (t, _) in &bad {
            let mut data = t.clone();
            data.extend_from_slice(text_after);
            wire.extend(frame(op, &data));
        }
        c.send_raw(&wire);
        for (t, why) in &bad {
            let got = text(&c.expect(ERROR));
            assert_eq!(got, format!("bad target {}: {why}", shown(t)));
        }
        quiet(&mut c, "one error each");
    }
    // Who, Get and Subscribe: `bad pattern`; no subscription is made.
    let mut wire = Vec::new();
    for (i, (t, _)) in bad.iter().enumerate() {
        wire.extend(frame(WHO, t));
        wire.extend(frame(GET, t));
        let mut sub = format!("{} 0 ", i + 1).into_bytes();
        sub.extend_from_slice(t);
        wire.extend(frame(SUBSCRIBE, &sub));
    }
    c.send_raw(&wire);
    for (t, why) in &bad {
        for _ in 0..3 {
            let got = text(&c.expect(ERROR));
            assert_eq!(got, format!("bad pattern {}: {why}", shown(t)));
        }
    }
    quiet(&mut c, "one error each");
    subscribe(&mut c, 1, "peq.z.*,a=1", &["a"]);
    expect_listing(&mut c, &["1 F peq.z.target|a=1"], "ack 1 1");

    // At the limits: 8 filters, and 255 bytes (after a '+').
    let limit8 = format!("peq.>,{}", eight.join(","));
    let limit255 = format!("+peq.>,k={long_value}");
    assert_eq!(limit255.len(), 256);
    for t in [&limit8, &limit255] {
        c.send(ECHO, format!("{t} hi").as_bytes());
        assert_eq!(next(&mut c), "ack 0 1", "{t}");
        target.expect_frame(ECHO, b"peq.z.me hi");
        assert_eq!(who(&mut c, t).len(), 1, "{t}");
    }
    quiet(&mut target, "end");
}

/// A Who's data is one field: a space inside a filter is refused as such.
fn a_space_in_a_who_filter_is_refused(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = shim(&srv, "peq.z.me");
    c.send(WHO, b"peq.>,channels~a b");
    assert_eq!(
        text(&c.expect(ERROR)),
        "bad pattern peq.>,channels~a b: filter 1 (channels~a b): a filter holds no space"
    );
    quiet(&mut c, "one error");
}

// ---------------------------------------------------------------------------------------
// The state index: indexed or not, the same selections
// ---------------------------------------------------------------------------------------

/// Runs the same selections on `srv` with filters on the default `state_index` keys
/// (`class`, `channels`, `zone`) and with filters on keys that mirror them (`role`,
/// `roles`, `place`, which no hub indexes by default), and checks that both select the
/// expected shims, in Echo and in Who, as the state changes. `looked` is how many shims
/// the hub looks at for `>,class=clr` and for `>,role=healer` at the start (the index's
/// candidates, or every shim).
fn selections_agree(srv: &Server, looked: (f64, f64)) {
    let mut f = Fleet::default();
    let boss = "peq.z.boss";
    f.add(srv, boss, &[]);
    let a = &[
        "class=CLR",
        "role=healer",
        "channels=tanks heals",
        "roles=tanks heals",
        "zone=pok",
        "place=pok",
    ];
    f.add(srv, "peq.z.a", a);
    let b = &[
        "class=clr",
        "role=HEALER",
        "channels=heals",
        "roles=heals",
        "zone=guk",
        "place=guk",
    ];
    f.add(srv, "peq.z.b", b);
    let c = &[
        "class=WAR",
        "role=tank",
        "channels=tanks",
        "roles=tanks",
        "zone=pok",
        "place=pok",
    ];
    f.add(srv, "peq.y.c", c);
    f.add(srv, "live.z.d", &["class=CLR", "role=healer"]);
    f.add(srv, "peq.z.e", &[]);

    let candidates = "velium_filter_candidates_total";
    for (t, n) in [(">,class=clr", looked.0), (">,role=healer", looked.1)] {
        let before = srv.metric(candidates);
        assert_eq!(f.who(boss, t), ["live.z.d", "peq.z.a", "peq.z.b"]);
        srv.wait_metric(candidates, |v| v == before + n);
    }

    let same = |f: &mut Fleet, pairs: &[(&str, &str)], want: &[&str]| {
        for &(indexed, other) in pairs {
            for t in [indexed, other] {
                assert_eq!(f.route(ECHO, boss, t), want, "Echo {t}");
                assert_eq!(f.who(boss, t), want, "Who {t}");
            }
        }
    };
    let (pa, pb, pc) = ("peq.z.a", "peq.z.b", "peq.y.c");
    same(
        &mut f,
        &[
            ("peq.>,class=clr", "peq.>,role=healer"),
            ("peq.z.*,CLASS=Clr", "peq.z.*,ROLE=Healer"),
            ("peq.>,channels~heals", "peq.>,roles~heals"),
        ],
        &[pa, pb],
    );
    same(
        &mut f,
        &[(">,class=CLR", ">,role=healer")],
        &["live.z.d", pa, pb],
    );
    same(
        &mut f,
        &[(
            "peq.>,channels~tanks,zone=pok",
            "peq.>,roles~tanks,place=pok",
        )],
        &[pc, pa],
    );
    same(
        &mut f,
        &[
            ("peq.>,class=clr,zone=pok", "peq.>,role=healer,place=pok"),
            ("peq.>,class=clr,place=pok", "peq.>,role=healer,zone=pok"),
        ],
        &[pa],
    );
    same(
        &mut f,
        &[("peq.>,channels=heals", "peq.>,roles=heals")],
        &[pb],
    );
    same(
        &mut f,
        &[
            ("peq.y.*,class=clr", "peq.y.*,role=healer"),
            ("peq.>,channels~heal", "peq.>,roles~heal"),
            (
                "peq.>,class=clr,zone=nowhere",
                "peq.>,role=healer,place=nowhere",
            ),
        ],
        &[],
    );

    // Values change, keys go, a shim renames, one leaves, one arrives.
    set(f.c(pb), &["class=WAR", "role=tank"]);
    same(&mut f, &[("peq.>,class=clr", "peq.>,role=healer")], &[pa]);
    same(&mut f, &[("peq.>,class=war", "peq.>,role=tank")], &[pc, pb]);
    set(f.c("live.z.d"), &["class", "role"]);
    same(&mut f, &[(">,class=clr", ">,role=healer")], &[pa]);
    f.rename(pa, "live.z.a");
    same(&mut f, &[("peq.>,class=clr", "peq.>,role=healer")], &[]);
    same(&mut f, &[(">,class=clr", ">,role=healer")], &["live.z.a"]);
    drop(f.remove(pc));
    srv.wait_log(&["close", "identity=peq.y.c reason=eof"]);
    same(
        &mut f,
        &[("peq.>,channels~tanks", "peq.>,roles~tanks")],
        &[],
    );
    same(
        &mut f,
        &[(">,channels~tanks", ">,roles~tanks")],
        &["live.z.a"],
    );
    f.add(srv, "peq.y.c", &["class=CLR", "role=healer"]);
    same(&mut f, &[("peq.>,class=clr", "peq.>,role=healer")], &[pc]);
    set(f.c("live.z.a"), &["class=Clr", "role=hEaLeR"]);
    same(
        &mut f,
        &[(">,class=clr", ">,role=healer")],
        &["live.z.a", pc],
    );
    set(f.c("peq.z.e"), &["channels=HEALS", "roles=heals"]);
    same(
        &mut f,
        &[("peq.>,channels~heals", "peq.>,roles~heals")],
        &[pb, "peq.z.e"],
    );
}

fn an_unindexed_key_selects_as_an_indexed_one(io: &str) {
    // Default index: class is indexed (3 candidates), role is not (every shim, 6).
    let srv = Server::with_admin(io, &NO_RATES);
    selections_agree(&srv, (3.0, 6.0));
}

fn a_hub_without_an_index_selects_the_same(io: &str) {
    let mut args = vec!["--state-index", "none"];
    args.extend_from_slice(&NO_RATES);
    let srv = Server::with_admin(io, &args);
    selections_agree(&srv, (6.0, 6.0));
}

fn a_hub_indexing_other_keys_selects_the_same(io: &str) {
    let mut args = vec!["--state-index", "Role,place"];
    args.extend_from_slice(&NO_RATES);
    let srv = Server::with_admin(io, &args);
    selections_agree(&srv, (6.0, 3.0));
}

// ---------------------------------------------------------------------------------------
// The `velium` tool
// ---------------------------------------------------------------------------------------

/// The identities in the first column of `velium who` output.
fn first_column(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect()
}

/// Runs `velium --server ADDR ARGS...` on a thread of its own, so that the test can
/// answer the Commands it sends.
fn velium_bg(addr: SocketAddr, args: &[&str]) -> std::thread::JoinHandle<Run> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        velium(addr, &args)
    })
}

fn the_cli_takes_filter_words(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let mut a = publisher(&srv, "peq.z.a", &["class=CLR", "hp=10"]);
    let mut b = publisher(&srv, "peq.z.b", &["class=WAR", "channels=tanks heals"]);
    let mut c = publisher(&srv, "peq.y.c", &["class=clr"]);
    let mut d = publisher(&srv, "live.z.d", &["class=CLR"]);

    // who: filter words after the pattern, in the pattern after commas, or in its place.
    for args in [
        &["who", "peq.>", "class=CLR"][..],
        &["who", "peq.>,class=CLR"],
        &["who", "peq.>", "class=clr", "class~CLR"],
    ] {
        let run = velium(srv.addr, args);
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(
            first_column(&run.stdout),
            ["peq.y.c", "peq.z.a"],
            "{args:?}"
        );
    }
    let run = velium(srv.addr, &["who", "class=CLR"]);
    assert_eq!(
        first_column(&run.stdout),
        ["live.z.d", "peq.y.c", "peq.z.a"],
        "{run:?}"
    );
    let run = velium(srv.addr, &["who", "peq.>", "channels~heals"]);
    assert_eq!(first_column(&run.stdout), ["peq.z.b"], "{run:?}");
    let run = velium(srv.addr, &["who", "peq.>", "class=PAL"]);
    assert_eq!((run.code, run.stdout.as_str()), (2, ""), "{run:?}");
    assert_eq!(run.stderr, "velium: no shim matches peq.>,class=PAL\n");
    let run = velium(srv.addr, &["who", "peq.>", "hp"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("\"hp\" is not a filter"), "{run:?}");
    // From the admin listener.
    let admin = srv.admin.unwrap().to_string();
    let run = velium(srv.addr, &["--admin", &admin, "who", "peq.>", "class=CLR"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(first_column(&run.stdout), ["peq.y.c", "peq.z.a"], "{run:?}");

    // send: the filter words, then the command; only the clerics are sent it, and both
    // answers are printed.
    for args in [
        &["send", "peq.>", "class=CLR", "/cast", "1"][..],
        &["send", "peq.>,class=CLR", "/cast", "1"],
        &["send", "peq.>", "class=CLR", "--", "/cast", "1"],
    ] {
        let run = velium_bg(srv.addr, args);
        for (r, name) in [(&mut a, "peq.z.a"), (&mut c, "peq.y.c")] {
            let (from, id, cmd) = expect_command(r);
            assert!(from.starts_with("velium.cli."), "{from}");
            assert_eq!(cmd, b"/cast 1", "{args:?}");
            r.send(RESPONSE, format!("{id} {name} casts").as_bytes());
        }
        let run = run.join().unwrap();
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(
            run.stdout, "peq.y.c: peq.y.c casts\npeq.z.a: peq.z.a casts\n",
            "{args:?}"
        );
        for r in [&mut a, &mut b, &mut c, &mut d] {
            r.sync(b"nothing else");
        }
    }
    // A command that starts with a KEY=VALUE word needs --literal.
    let run = velium(srv.addr, &["send", "peq.z.a", "key=value"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("no command after the filters"),
        "{run:?}"
    );
    let run = velium_bg(srv.addr, &["send", "--literal", "peq.z.a", "key=value"]);
    let (_, id, cmd) = expect_command(&mut a);
    assert_eq!(cmd, b"key=value");
    a.send(RESPONSE, format!("{id} ok").as_bytes());
    let run = run.join().unwrap();
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "peq.z.a: ok\n"),
        "{run:?}"
    );
    // Nothing passes: exit 2, nothing sent.
    let run = velium(srv.addr, &["send", "peq.>", "class=PAL", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("no shim matches peq.>,class=PAL"),
        "{run:?}"
    );

    // tell.
    let run = velium(
        srv.addr,
        &["tell", "peq.>", "channels~heals", "pull", "in", "10"],
    );
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "reached 1 shim\n"),
        "{run:?}"
    );
    let (from, said) = split2(&b.expect(ECHO));
    assert!(from.starts_with("velium.cli."), "{from}");
    assert_eq!(said, b"pull in 10");

    // state: filters among the keys, or in place of the pattern.
    let run = velium(srv.addr, &["state", "class=CLR"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        "live.z.d class=CLR\npeq.y.c class=clr\npeq.z.a class=CLR hp=10\n"
    );
    let run = velium(srv.addr, &["state", "peq.>", "hp", "class=clr"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "peq.y.c\npeq.z.a hp=10\n");
    let run = velium(srv.addr, &["state", "peq.>", "class=PAL"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr, "velium: no shim matches peq.>,class=PAL\n");
    for r in [&mut a, &mut b, &mut c, &mut d] {
        r.sync(b"end");
    }
}

// ---------------------------------------------------------------------------------------
// The admin listener
// ---------------------------------------------------------------------------------------

/// The identities a `/shims` listing names, in its order.
fn listed(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (v.as_array().unwrap().iter())
        .map(|s| s["identity"].as_str().unwrap().to_string())
        .collect()
}

fn admin_shims_and_state_take_a_filtered_pattern(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let _a = publisher(&srv, "peq.z.a", &["class=CLR", "hp=10"]);
    let _b = publisher(&srv, "peq.z.b", &["class=WAR", "channels=tanks heals"]);
    let _c = publisher(&srv, "peq.y.c", &["class=clr"]);
    let _d = publisher(&srv, "live.z.d", &["class=CLR"]);
    let _e = shim(&srv, "peq.z.e");

    for (query, want) in [
        ("peq.%3E%2Cclass%3Dclr", &["peq.y.c", "peq.z.a"][..]),
        ("peq.%3E,class=CLR", &["peq.y.c", "peq.z.a"]),
        ("%3E%2Cclass%3DCLR", &["live.z.d", "peq.y.c", "peq.z.a"]),
        ("peq.%3E%2Cchannels~heals", &["peq.z.b"]),
        ("peq.%3E%2Cchannels%7Etanks%2Cclass%3Dwar", &["peq.z.b"]),
        ("peq.%3E%2Cgroup%3Dbob", &[]),
        ("peq.%3E", &["peq.y.c", "peq.z.a", "peq.z.b", "peq.z.e"]),
    ] {
        let (status, body) = srv.get(&format!("/shims?pattern={query}"));
        assert_eq!(status, 200, "{query}: {body}");
        let mut got = listed(&body);
        got.sort();
        assert_eq!(got, want, "{query}");
    }
    // /state too.
    let (status, body) = srv.get("/state?pattern=peq.%3E%2Cclass%3Dclr");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shims = v["shims"].as_array().unwrap();
    let got: Vec<(&str, &str)> = shims
        .iter()
        .map(|s| {
            (
                s["identity"].as_str().unwrap(),
                s["keys"]["class"]["value"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [("peq.y.c", "clr"), ("peq.z.a", "CLR")], "{body}");
    // A bad filter is refused, naming it.
    for (query, why) in [
        (
            "peq.%3E%2Cclass",
            "bad pattern \"peq.>,class\": filter 1 (class): expected KEY=VALUE or KEY~WORD",
        ),
        (
            "peq.%3E%2C%2Cclass%3Dclr",
            "bad pattern \"peq.>,,class=clr\": empty filter after ','",
        ),
    ] {
        for path in ["/shims", "/state"] {
            let (status, body) = srv.get(&format!("{path}?pattern={query}"));
            assert_eq!(status, 400, "{path} {query}: {body}");
            assert!(body.contains(why), "{path} {query}: {body}");
        }
    }
}

drivers!(
    a_command_reaches_only_the_shims_that_pass,
    a_word_filter_matches_whole_words,
    every_filter_must_hold_and_plus_includes_the_sender,
    an_echo_with_filters_over_tcp_and_udp,
    who_lists_only_the_shims_that_pass,
    get_reads_only_the_shims_that_pass,
    a_subscription_follows_the_selection,
    filters_never_widen_what_a_user_may_reach,
    a_reload_changes_what_a_filtered_subscription_reads,
    malformed_targets_get_one_error_each,
    a_space_in_a_who_filter_is_refused,
    an_unindexed_key_selects_as_an_indexed_one,
    a_hub_without_an_index_selects_the_same,
    a_hub_indexing_other_keys_selects_the_same,
    the_cli_takes_filter_words,
    admin_shims_and_state_take_a_filtered_pattern,
);
