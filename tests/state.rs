//! Relay state over real sockets, on both drivers: Set, Subscribe, Unsubscribe, Get and
//! Presence (issue 12).
//!
//! - a snapshot lists one `F` frame per matching shim, then `Ack SID COUNT`; the
//!   subscriber is left out unless its pattern has `+`; a key filter;
//! - only changes are delivered, as `D` frames with the changed keys (a deleted key as a
//!   bare `KEY`), each value with its age;
//! - a subscriber that stops reading is not cut off: its changes wait and coalesce, and it
//!   ends with the latest value; an interval turns several changes into one delivery; a
//!   subscriber that missed more deletions than the shim remembers is resent it in full;
//! - joins and leaves with their reasons (eof, quit, idle timeout, replaced, renamed),
//!   renames into and out of a pattern;
//! - deltas over UDP when the subscriber has bound it (split at 1100 bytes), over TCP
//!   otherwise; Set over UDP;
//! - the limits, with their exact Error texts, and nothing of a refused Set applied; the
//!   Subscribe, Unsubscribe and Get errors; a listing past its cap; limits reloaded;
//! - a shim's state goes with its connection (`/state`, `velium_state_keys`);
//! - on a hub with users, a user reads only the state it may, and a reload narrows or
//!   widens that for the subscriptions already open.
//!
//! Frames are written with the encoders of `velium_server::proto::state` and read with its
//! parsers. "Nothing else was delivered" is proved with a barrier, never with a wait: a
//! change whose delivery must come next, or a Ping on the subscriber whose Pong must be the
//! next frame after the setter's own Pong came back (deliveries are queued at the end of
//! the setter's slice of input, before its Pong is written).

mod common;
use common::*;
use std::collections::BTreeMap;
use velium_server::proto::state::{self as st, Mode};

const IDENTIFY: u8 = 0x01;
const PING: u8 = 0x06;
const WHO: u8 = 0x0D;
const WHO_ENTRY: u8 = 0x0E;
const SET: u8 = 0x10;
const SUBSCRIBE: u8 = 0x11;
const UNSUBSCRIBE: u8 = 0x12;
const GET: u8 = 0x13;

/// The segment-grammar message of a bad key byte.
fn key_byte(byte: u8, at: usize) -> String {
    format!("key byte 0x{byte:02X} at {at}: only ASCII letters, digits, '_' and '-' are allowed")
}

// ---------------------------------------------------------------------------------------
// Writing requests
// ---------------------------------------------------------------------------------------

/// A Set frame; a `None` value deletes the key.
fn set_frame(items: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut v = Vec::new();
    st::encode_set(items.iter().copied(), &mut v);
    v
}

fn set(c: &mut Tcp, items: &[(&str, Option<&str>)]) {
    c.send_raw(&set_frame(items));
}

fn subscribe(c: &mut Tcp, sid: u32, interval_ms: u64, pattern: &str, keys: &[&str]) {
    let mut v = Vec::new();
    st::encode_subscribe(sid, interval_ms, pattern, keys, &mut v);
    c.send_raw(&v);
}

fn unsubscribe(c: &mut Tcp, sid: u32) {
    let mut v = Vec::new();
    st::encode_unsubscribe(sid, &mut v);
    c.send_raw(&v);
}

fn get(c: &mut Tcp, pattern: &str, keys: &[&str]) {
    let mut v = Vec::new();
    st::encode_get(pattern, keys, &mut v);
    c.send_raw(&v);
}

// ---------------------------------------------------------------------------------------
// Reading what the hub sends
// ---------------------------------------------------------------------------------------

/// The next datagram on `u` (one frame, from the hub's port), described.
fn next_udp(u: &Udp) -> String {
    let d = u.recv();
    assert_eq!(d.last(), Some(&0x0A), "a datagram ends with 0x0A: {d:?}");
    describe(d[0], &d[1..d.len() - 1])
}

fn expect_listing(c: &mut Tcp, frames: &[&str], ack: &str) {
    let mut want: Vec<String> = frames.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(listing(c), (want, ack.to_string()));
}

/// A barrier on `c`: its Pong is the next frame, so nothing was queued for it before.
fn quiet(c: &mut Tcp, tag: &str) {
    c.send(PING, tag.as_bytes());
    assert_eq!(next(c), format!("pong {tag}"), "nothing before the Pong");
}

/// A connection authenticated as `user` and identified as `name`.
fn login(srv: &Server, user: &str, secret: &str, name: &str) -> Tcp {
    let mut c = srv.tcp();
    c.login(user, secret, name);
    c
}

// ---------------------------------------------------------------------------------------
// Snapshot, Get, key filters
// ---------------------------------------------------------------------------------------

fn snapshot_lists_each_matching_shim_then_acks(io: &str) {
    let srv = Server::start(io, &["--who-per-sec", "0"]);
    let mut bob = shim(&srv, "peq.z.bob");
    set(
        &mut bob,
        &[("hp", Some("4500/5000")), ("note", Some("afk back soon"))],
    );
    bob.sync(b"bob set");
    let mut alice = shim(&srv, "peq.z.Alice");
    alice.sync(b"alice holds no keys");
    let mut carol = shim(&srv, "peq.y.carol");
    set(&mut carol, &[("hp", Some("1/2")), ("mana", Some("3"))]);
    carol.sync(b"carol set");
    let mut live = shim(&srv, "live.z.bob");
    set(&mut live, &[("hp", Some("9"))]);
    live.sync(b"live set");
    let mut me = shim(&srv, "peq.z.me");
    set(&mut me, &[("own", Some("1"))]);

    // One F frame per matching shim (a shim with no keys: no items), then the Ack; the
    // subscriber is left out without '+'.
    subscribe(&mut me, 1, 0, "peq.z.*", &[]);
    expect_listing(
        &mut me,
        &[
            "1 F peq.z.bob|hp=4500/5000|note=afk back soon",
            "1 F peq.z.Alice",
        ],
        "ack 1 2",
    );
    subscribe(&mut me, 2, 0, "+peq.z.*", &[]);
    expect_listing(
        &mut me,
        &[
            "2 F peq.z.bob|hp=4500/5000|note=afk back soon",
            "2 F peq.z.Alice",
            "2 F peq.z.me|own=1",
        ],
        "ack 2 3",
    );
    // A key filter, compared ignoring case (the spelling first written is shown); a shim
    // holding none of the keys is listed with no items.
    subscribe(&mut me, 3, 0, "peq.>", &["HP", "absent"]);
    expect_listing(
        &mut me,
        &[
            "3 F peq.z.bob|hp=4500/5000",
            "3 F peq.z.Alice",
            "3 F peq.y.carol|hp=1/2",
        ],
        "ack 3 3",
    );
    subscribe(&mut me, 4, 0, "PEQ.Z.BOB", &["note"]);
    expect_listing(&mut me, &["4 F peq.z.bob|note=afk back soon"], "ack 4 1");
    subscribe(&mut me, 5, 0, "nobody.*", &[]);
    expect_listing(&mut me, &[], "ack 5 0");

    // Get: SID 0, the requester included.
    get(&mut me, "peq.z.*", &[]);
    expect_listing(
        &mut me,
        &[
            "0 F peq.z.bob|hp=4500/5000|note=afk back soon",
            "0 F peq.z.Alice",
            "0 F peq.z.me|own=1",
        ],
        "ack 0 3",
    );
    get(&mut me, "peq.>", &["MANA", "own"]);
    expect_listing(
        &mut me,
        &[
            "0 F peq.z.bob",
            "0 F peq.z.Alice",
            "0 F peq.y.carol|mana=3",
            "0 F peq.z.me|own=1",
        ],
        "ack 0 4",
    );
    get(&mut me, "nobody", &[]);
    expect_listing(&mut me, &[], "ack 0 0");
    // Empty data: every shim.
    me.send(GET, b"");
    let (frames, ack) = listing(&mut me);
    assert_eq!(ack, "ack 0 5");
    assert!(
        frames.contains(&"0 F live.z.bob|hp=9".to_string()),
        "{frames:?}"
    );

    // Deltas follow each subscription's pattern and keys: mana is watched by none of the
    // subscriptions that watch carol (3 wants hp), so the hp change is the next frame.
    set(&mut carol, &[("mana", Some("4"))]);
    carol.sync(b"mana");
    set(&mut carol, &[("hp", Some("2/2"))]);
    assert_eq!(next(&mut me), "3 D peq.y.carol|hp=2/2");
    // The subscriber's own change reaches only the '+' subscription.
    set(&mut me, &[("own", Some("2"))]);
    assert_eq!(next(&mut me), "2 D peq.z.me|own=2");
    quiet(&mut me, "end");
}

// ---------------------------------------------------------------------------------------
// Change-only delivery
// ---------------------------------------------------------------------------------------

fn only_changes_are_delivered(io: &str) {
    let srv = Server::start(io, &["--who-per-sec", "0"]);
    let mut bob = shim(&srv, "peq.z.bob");
    let full = |mana: &'static str| {
        [
            ("hp", Some("100")),
            ("mana", Some(mana)),
            ("loc", Some("1 2")),
        ]
    };
    set(&mut bob, &full("50"));
    bob.sync(b"set");
    let mut sub = shim(&srv, "tool.watch");
    subscribe(&mut sub, 7, 0, "peq.z.bob", &[]);
    expect_listing(
        &mut sub,
        &["7 F peq.z.bob|hp=100|mana=50|loc=1 2"],
        "ack 7 1",
    );

    // The whole set again with one key changed: a delta with that key alone.
    set(&mut bob, &full("49"));
    assert_eq!(next(&mut sub), "7 D peq.z.bob|mana=49");
    // The same set again changes nothing: the next change (a key written in another
    // case is the same key) is the next thing delivered.
    set(&mut bob, &full("49"));
    set(&mut bob, &[("HP", Some("99"))]);
    assert_eq!(next(&mut sub), "7 D peq.z.bob|hp=99");
    // A deletion: the bare key.
    set(&mut bob, &[("loc", None)]);
    assert_eq!(next(&mut sub), "7 D peq.z.bob|loc");
    // Deleting an absent key and writing a value again are no change either. In one
    // frame the last item of a key wins (even after a deletion); an empty value is a
    // value; a newline travels as 0x0B.
    set(
        &mut bob,
        &[("loc", None), ("nothing", None), ("mana", Some("49"))],
    );
    set(
        &mut bob,
        &[
            ("mana", Some("1")),
            ("mana", None),
            ("MANA", Some("48")),
            ("note", Some("")),
            ("text", Some("two\nlines")),
        ],
    );
    assert_eq!(
        next(&mut sub),
        "7 D peq.z.bob|mana=48|note=|text=two\x0blines"
    );
    // A deleted key set again; a delta of a value and a deletion.
    set(&mut bob, &[("loc", Some("3 4")), ("note", None)]);
    assert_eq!(next(&mut sub), "7 D peq.z.bob|loc=3 4|note");
    bob.sync(b"changes done");
    quiet(&mut sub, "nothing more");

    // Ages: milliseconds since each value was set, so a key set later is never older.
    get(&mut sub, "peq.z.bob", &[]);
    let d = sub.expect(SET);
    let s = st::parse_state(&d).unwrap();
    let ages: BTreeMap<String, u64> = s
        .items
        .iter()
        .map(|i| (text(i.key), i.value.expect("a value").0))
        .collect();
    assert_eq!(
        ages.keys().collect::<Vec<_>>(),
        ["hp", "loc", "mana", "text"],
        "{:?}",
        text(&d)
    );
    assert!(ages["hp"] >= ages["mana"], "{ages:?}");
    assert!(ages["mana"] >= ages["loc"], "{ages:?}");
    assert!(ages["text"] >= ages["loc"], "{ages:?}");
    assert!(
        ages.values().all(|&a| a < DEADLINE.as_millis() as u64),
        "{ages:?}"
    );
    assert_eq!(next(&mut sub), "ack 0 1");
    // The keys in the order first set.
    let order: Vec<String> = s.items.iter().map(|i| text(i.key)).collect();
    assert_eq!(order, ["hp", "mana", "text", "loc"]);
    // Over TCP a CRLF ends a frame: the CR is not part of the value.
    bob.send_raw(b"\x10crlf=1\r\n");
    assert_eq!(next(&mut sub), "7 D peq.z.bob|crlf=1");
}

// ---------------------------------------------------------------------------------------
// Coalescing: a slow subscriber, an interval
// ---------------------------------------------------------------------------------------

/// The sequence number at the head of a value `NNNNNN xxx...`.
fn seq_of(line: &str) -> u64 {
    let v = line
        .strip_prefix("1 D peq.z.pub|hp=")
        .unwrap_or_else(|| panic!("not a delta of hp: {line:.80}"));
    v[..6].parse().unwrap()
}

fn a_slow_subscriber_is_coalesced_not_cut_off(io: &str) {
    // A small outbound limit: were each change queued for the subscriber, it would be cut
    // off as a slow consumer within a few hundred changes.
    let srv = Server::with_admin(
        io,
        &[
            "--state-sets-per-sec",
            "0",
            "--outbound-limit",
            "262144",
            "--state-value-bytes",
            "64000",
            "--state-bytes",
            "65536",
            "--max-frame",
            "65536",
        ],
    );
    let mut publ = shim(&srv, "peq.z.pub");
    set(&mut publ, &[("hp", Some("start"))]);
    publ.sync(b"start");
    let mut sub = shim(&srv, "tool.slow");
    subscribe(&mut sub, 1, 0, "peq.z.pub", &[]);
    expect_listing(&mut sub, &["1 F peq.z.pub|hp=start"], "ack 1 1");
    let delivered = || srv.metric("velium_state_delivered_total");

    // The subscriber reads nothing more. First, 64 KB changes one at a time until they
    // no longer go out: the subscriber's socket is full (its own buffer and the hub's).
    // Checked every five changes (each answered by a Pong): four checks in a row with
    // nothing delivered, twenty changes held back.
    let big = "x".repeat(63_990);
    let mut n = 0u64;
    let (mut out, mut still) = (-1.0, 0);
    while still < 4 {
        for _ in 0..5 {
            n += 1;
            set(&mut publ, &[("hp", Some(&format!("{n:06} {big}")))]);
            publ.sync(b"one");
        }
        let now = delivered();
        if now == out {
            still += 1;
        } else {
            (out, still) = (now, 0);
        }
        assert!(n < 2_000, "the subscriber's socket never filled");
    }
    // Then thousands more, ~1 KB each, in batches each followed by a Ping: every Pong
    // comes back while the subscriber is stuck.
    let pad = "x".repeat(1000);
    for batch in 0..30 {
        let mut wire = Vec::with_capacity(100 * 1024);
        for _ in 0..100 {
            n += 1;
            wire.extend(set_frame(&[("hp", Some(&format!("{n:06} {pad}")))]));
        }
        let tag = format!("batch {batch}");
        wire.extend(frame(PING, tag.as_bytes()));
        publ.send_raw(&wire);
        assert_eq!(next(&mut publ), format!("pong {tag}"));
    }
    let last = n;
    assert_eq!(delivered(), out, "delivered while the subscriber was stuck");
    assert_eq!(srv.metric("velium_slow_consumers_total"), 0.0);
    assert_eq!(srv.metric("velium_connections"), 2.0);

    // Reading again, it gets what was in the sockets, then what changed since in one
    // delivery or a few, and ends with the latest value.
    let mut got = 0u64;
    let mut prev = 0u64;
    loop {
        let d = sub.expect(SET);
        let line = describe(SET, &d);
        let seq = seq_of(&line);
        assert!(seq > prev, "{seq} after {prev}");
        // The frame's sequence number is the shim's: one per change, after "start".
        assert_eq!(st::parse_state(&d).unwrap().seq, seq + 1, "{line:.60}");
        prev = seq;
        got += 1;
        if seq == last {
            assert!(line.ends_with(&pad));
            break;
        }
    }
    quiet(&mut sub, "caught up");
    assert!(got < last - 2000, "{got} deliveries for {last} changes");
    // Every change the subscriber did not get on its own was coalesced away.
    srv.wait_metric("velium_state_delivered_total", |v| v == got as f64);
    srv.wait_metric("velium_state_coalesced_total", |v| v == (last - got) as f64);
    assert_eq!(srv.metric("velium_state_changes_total"), (last + 1) as f64);
    assert_eq!(srv.metric("velium_slow_consumers_total"), 0.0);
    // It is served at once again.
    set(
        &mut publ,
        &[("hp", Some(&format!("{:06} {pad}", last + 1)))],
    );
    assert_eq!(seq_of(&next(&mut sub)), last + 1);
}

fn an_interval_turns_several_changes_into_one(io: &str) {
    let srv = Server::with_admin(io, &["--state-sets-per-sec", "0"]);
    let mut publ = shim(&srv, "peq.z.pub");
    let mut other = shim(&srv, "peq.z.other");
    let mut sub = shim(&srv, "tool.sub");
    subscribe(&mut sub, 1, 500, "peq.z.*", &[]);
    expect_listing(&mut sub, &["1 F peq.z.pub", "1 F peq.z.other"], "ack 1 2");
    // The first delivery goes at once.
    set(&mut publ, &[("hp", Some("1")), ("seen", Some("1"))]);
    assert_eq!(next(&mut sub), "1 D peq.z.pub|hp=1|seen=1");
    // Four more changes of both keys within the interval: one delivery, of the latest
    // values.
    let mut wire = Vec::new();
    for v in ["2", "3", "4", "5"] {
        wire.extend(set_frame(&[("hp", Some(v)), ("seen", Some(v))]));
    }
    publ.send_raw(&wire);
    publ.sync(b"sets");
    assert_eq!(next(&mut sub), "1 D peq.z.pub|hp=5|seen=5");
    srv.wait_metric("velium_state_delivered_total", |v| v == 4.0);
    // 8 changes marked for the second delivery, 2 items sent.
    srv.wait_metric("velium_state_coalesced_total", |v| v == 6.0);
    assert_eq!(srv.metric("velium_state_changes_total"), 10.0);
    assert_eq!(srv.metric("velium_state_sets_total"), 5.0);
    quiet(&mut sub, "one delivery");

    // A change waiting for the interval when its shim leaves is never delivered: the
    // leave comes at once, and the delivery due at the end of the interval carries the
    // other shim's change alone.
    set(&mut publ, &[("hp", Some("6"))]);
    publ.sync(b"waiting");
    drop(publ);
    assert_eq!(next(&mut sub), "1 -peq.z.pub eof");
    set(&mut other, &[("x", Some("1"))]);
    assert_eq!(next(&mut sub), "1 D peq.z.other|x=1");
    quiet(&mut sub, "nothing of the one that left");
}

fn lost_deletions_resync_in_full(io: &str) {
    // A shim remembers as many deletions as it may hold keys; a subscriber that missed
    // more than that (its interval held them back) is sent the whole state instead.
    let srv = Server::start(io, &["--state-keys", "2", "--state-sets-per-sec", "0"]);
    let mut publ = shim(&srv, "peq.z.pub");
    let mut slow = shim(&srv, "tool.slow");
    let mut fast = shim(&srv, "tool.fast");
    subscribe(&mut slow, 1, 500, "peq.z.pub", &[]);
    expect_listing(&mut slow, &["1 F peq.z.pub"], "ack 1 1");
    subscribe(&mut fast, 2, 0, "peq.z.pub", &[]);
    expect_listing(&mut fast, &["2 F peq.z.pub"], "ack 2 1");
    set(&mut publ, &[("a", Some("1")), ("b", Some("1"))]);
    assert_eq!(next(&mut slow), "1 D peq.z.pub|a=1|b=1");
    assert_eq!(next(&mut fast), "2 D peq.z.pub|a=1|b=1");
    // Within the slow one's interval: three deletions, each delivered to the fast one.
    set(&mut publ, &[("a", None)]);
    assert_eq!(next(&mut fast), "2 D peq.z.pub|a");
    set(&mut publ, &[("b", None)]);
    assert_eq!(next(&mut fast), "2 D peq.z.pub|b");
    set(&mut publ, &[("c", Some("1"))]);
    assert_eq!(next(&mut fast), "2 D peq.z.pub|c=1");
    set(&mut publ, &[("c", None)]);
    assert_eq!(next(&mut fast), "2 D peq.z.pub|c");
    // The slow one cannot be told "a, b and c went" in a delta any more: an F frame,
    // with no keys.
    assert_eq!(next(&mut slow), "1 F peq.z.pub");
    // And deltas again after it.
    set(&mut publ, &[("d", Some("1"))]);
    assert_eq!(next(&mut fast), "2 D peq.z.pub|d=1");
    assert_eq!(next(&mut slow), "1 D peq.z.pub|d=1");
    quiet(&mut slow, "end");
    quiet(&mut fast, "end");
}

// ---------------------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------------------

fn joins_and_leaves_with_reasons(io: &str) {
    let srv = Server::start(io, &[]);
    let mut sub = shim(&srv, "tool.watch");
    subscribe(&mut sub, 9, 0, "peq.z.*", &[]);
    expect_listing(&mut sub, &[], "ack 9 0");

    // Identify: a join (no state follows: it holds none). Closing its socket: eof.
    let a = shim(&srv, "peq.z.a");
    assert_eq!(next(&mut sub), "9 +peq.z.a");
    drop(a);
    assert_eq!(next(&mut sub), "9 -peq.z.a eof");

    // Quit.
    let mut b = shim(&srv, "peq.z.b");
    assert_eq!(next(&mut sub), "9 +peq.z.b");
    set(&mut b, &[("hp", Some("1"))]);
    assert_eq!(next(&mut sub), "9 D peq.z.b|hp=1");
    b.send_raw(&QUIT);
    b.expect_closed();
    assert_eq!(next(&mut sub), "9 -peq.z.b quit");

    // A shim outside the pattern is not watched.
    let mut c = shim(&srv, "live.z.c");
    set(&mut c, &[("hp", Some("7")), ("mana", Some("3"))]);
    c.sync(b"outside");
    // Renamed into the pattern: a join, then its whole state.
    c.send(IDENTIFY, b"peq.z.c");
    assert_eq!(next(&mut sub), "9 +peq.z.c");
    assert_eq!(next(&mut sub), "9 F peq.z.c|hp=7|mana=3");
    set(&mut c, &[("hp", Some("6"))]);
    assert_eq!(next(&mut sub), "9 D peq.z.c|hp=6");
    // Renamed within the pattern: a leave under the old name, a join under the new.
    c.send(IDENTIFY, b"peq.z.c2");
    assert_eq!(next(&mut sub), "9 -peq.z.c renamed");
    assert_eq!(next(&mut sub), "9 +peq.z.c2");
    assert_eq!(next(&mut sub), "9 F peq.z.c2|hp=6|mana=3");
    // Renamed out of it: a leave, and its changes are no longer delivered.
    c.send(IDENTIFY, b"live.z.c");
    assert_eq!(next(&mut sub), "9 -peq.z.c2 renamed");
    set(&mut c, &[("hp", Some("5"))]);
    c.sync(b"out again");
    // A shim with no keys renamed into the pattern: a join alone; the next thing is the
    // next change.
    let mut e = shim(&srv, "live.z.e");
    e.send(IDENTIFY, b"peq.z.e");
    assert_eq!(next(&mut sub), "9 +peq.z.e");
    set(&mut e, &[("x", Some("1"))]);
    assert_eq!(next(&mut sub), "9 D peq.z.e|x=1");
    // The shim that left is not watched after it left: closing it says nothing.
    drop(c);
    srv.wait_log(&["close", "identity=live.z.c reason=eof"]);
    drop(e);
    assert_eq!(next(&mut sub), "9 -peq.z.e eof");
    quiet(&mut sub, "end");
}

fn a_replaced_holder_leaves_before_the_newcomer_joins(io: &str) {
    let srv = Server::start(io, &[]);
    let mut sub = shim(&srv, "tool.watch");
    subscribe(&mut sub, 1, 0, "dup.*", &[]);
    expect_listing(&mut sub, &[], "ack 1 0");
    let mut d1 = shim(&srv, "dup.x");
    assert_eq!(next(&mut sub), "1 +dup.x");
    set(&mut d1, &[("hp", Some("1"))]);
    assert_eq!(next(&mut sub), "1 D dup.x|hp=1");
    let mut d2 = shim(&srv, "DUP.X");
    assert_eq!(
        d1.expect_closed(),
        vec![
            (
                0x09,
                b"closing: replaced: a newer connection identified as DUP.X".to_vec()
            ),
            (0x03, Vec::new())
        ],
        "why, Quit, then EOF"
    );
    // A consumer keyed by identity must see the old holder go before the new one comes.
    assert_eq!(
        [next(&mut sub), next(&mut sub)],
        [
            "1 -dup.x replaced by a newer connection with the same identity".to_string(),
            "1 +DUP.X".to_string()
        ]
    );
    set(&mut d2, &[("hp", Some("2"))]);
    assert_eq!(next(&mut sub), "1 D DUP.X|hp=2");
    quiet(&mut sub, "end");
}

fn a_timed_out_shim_leaves_with_its_reason(io: &str) {
    let srv = Server::start(io, &["--idle-timeout", "500ms"]);
    let mut sub = shim(&srv, "tool.watch");
    subscribe(&mut sub, 1, 0, "peq.z.*", &[]);
    expect_listing(&mut sub, &[], "ack 1 0");
    let mut idle = shim(&srv, "peq.z.idle");
    assert_eq!(next(&mut sub), "1 +peq.z.idle");
    // The subscriber keeps itself alive (a Ping every 100 ms: the one place a wait
    // between frames is the point) until the silent shim is timed out by its timer.
    let mut pings = 0;
    loop {
        sub.send(PING, b"alive");
        match next(&mut sub).as_str() {
            "pong alive" => {
                pings += 1;
                assert!(pings < 100, "peq.z.idle never timed out");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            leave => {
                assert_eq!(leave, "1 -peq.z.idle idle timeout");
                assert_eq!(next(&mut sub), "pong alive");
                break;
            }
        }
    }
    idle.expect_error("closing: idle timeout: nothing received for");
    idle.expect_frame(0x03, b"");
    quiet(&mut sub, "end");
}

// ---------------------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------------------

fn deltas_go_over_udp_when_the_subscriber_has_it(io: &str) {
    let srv = Server::start(
        io,
        &["--state-sets-per-sec", "0", "--state-value-bytes", "2000"],
    );
    let mut publ = shim(&srv, "peq.z.pub");
    set(&mut publ, &[("hp", Some("1"))]);
    publ.sync(b"set");
    let (mut sub, su) = bound_shim(&srv, "tool.udp");
    let mut tsub = shim(&srv, "tool.tcp");
    // The snapshot comes over TCP.
    subscribe(&mut sub, 1, 0, "peq.z.*", &[]);
    expect_listing(&mut sub, &["1 F peq.z.pub|hp=1"], "ack 1 1");
    subscribe(&mut tsub, 2, 0, "peq.z.pub", &[]);
    expect_listing(&mut tsub, &["2 F peq.z.pub|hp=1"], "ack 2 1");

    // A delta: over UDP to the bound subscriber, over TCP to the other; and not over TCP
    // to the bound one as well.
    set(&mut publ, &[("hp", Some("2"))]);
    assert_eq!(next_udp(&su), "1 D peq.z.pub|hp=2");
    assert_eq!(next(&mut tsub), "2 D peq.z.pub|hp=2");
    publ.sync(b"hp 2");
    quiet(&mut sub, "nothing over tcp");

    // Presence goes over TCP.
    let q = shim(&srv, "peq.z.q");
    assert_eq!(next(&mut sub), "1 +peq.z.q");

    // A delta larger than a datagram: several D datagrams of at most 1100 bytes, which
    // together hold every key once; over TCP one frame.
    let keys: Vec<(String, String)> = (0..30)
        .map(|i| (format!("k{i:02}"), format!("{i:02}{}", "v".repeat(98))))
        .collect();
    let items: Vec<(&str, Option<&str>)> = keys
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
        .collect();
    set(&mut publ, &items);
    let mut got = BTreeMap::new();
    let mut datagrams = 0;
    let mut seqs = std::collections::BTreeSet::new();
    while got.len() < keys.len() {
        let d = su.recv();
        assert!(
            d.len() <= st::MAX_STATE_DATAGRAM,
            "a datagram of {} bytes",
            d.len()
        );
        assert_eq!((d[0], d.last()), (SET, Some(&0x0A)));
        let s = st::parse_state(&d[1..d.len() - 1]).unwrap();
        assert_eq!(
            (s.sid, s.mode, s.identity),
            (1, Mode::Delta, &b"peq.z.pub"[..])
        );
        assert!(!s.items.is_empty());
        seqs.insert(s.seq);
        for it in s.items {
            let (_, v) = it.value.expect("a value");
            assert!(
                got.insert(text(it.key), text(v)).is_none(),
                "a key sent twice"
            );
        }
        datagrams += 1;
    }
    assert!(datagrams >= 3, "{datagrams} datagrams for 30 x 100 bytes");
    assert_eq!(got, keys.iter().cloned().collect::<BTreeMap<_, _>>());
    let mut whole = "2 D peq.z.pub".to_string();
    for (k, v) in &keys {
        whole.push_str(&format!("|{k}={v}"));
    }
    // The pieces of one delta share its sequence number, which the TCP frame has too.
    assert_eq!(seqs.len(), 1, "{seqs:?}");
    let d = tsub.expect(SET);
    assert_eq!(describe(SET, &d), whole);
    assert_eq!(Some(&st::parse_state(&d).unwrap().seq), seqs.first());

    // An item that alone passes 1100 bytes goes over TCP; the next delta over UDP again.
    let big = "b".repeat(1100);
    set(&mut publ, &[("big", Some(&big))]);
    assert_eq!(next(&mut sub), format!("1 D peq.z.pub|big={big}"));
    set(&mut publ, &[("hp", Some("3"))]);
    assert_eq!(next_udp(&su), "1 D peq.z.pub|hp=3");
    assert_eq!(next(&mut tsub), format!("2 D peq.z.pub|big={big}"));
    assert_eq!(next(&mut tsub), "2 D peq.z.pub|hp=3");

    // Set over UDP from a bound shim.
    let (_up, uu) = bound_shim(&srv, "peq.z.udp");
    assert_eq!(next(&mut sub), "1 +peq.z.udp");
    uu.send_raw(&set_frame(&[("hp", Some("9")), ("note", Some("via udp"))]));
    assert_eq!(next_udp(&su), "1 D peq.z.udp|hp=9|note=via udp");
    // A refused one: the Error goes back over UDP to its source.
    uu.send_raw(&set_frame(&[("ok", Some("1")), ("h p", Some("1"))]));
    assert_eq!(
        next_udp(&uu),
        format!("error state refused: bad key h p: {}", key_byte(b' ', 1))
    );
    uu.sync(b"after the error");
    get(&mut sub, "peq.z.udp", &[]);
    expect_listing(&mut sub, &["0 F peq.z.udp|hp=9|note=via udp"], "ack 0 1");
    drop(q);
    assert_eq!(next(&mut sub), "1 -peq.z.q eof");
    quiet(&mut sub, "end");
    quiet(&mut tsub, "end");
}

// ---------------------------------------------------------------------------------------
// Limits and errors
// ---------------------------------------------------------------------------------------

fn refused_sets_change_nothing(io: &str) {
    let srv = Server::with_admin(
        io,
        &[
            "--state-value-bytes",
            "16",
            "--state-keys",
            "4",
            "--state-bytes",
            "40",
            "--who-per-sec",
            "0",
        ],
    );
    // Before Identify.
    let mut anon = srv.tcp();
    set(&mut anon, &[("hp", Some("1"))]);
    assert_eq!(next(&mut anon), "error identify first");

    let mut c = shim(&srv, "peq.z.lim");
    set(&mut c, &[("a", Some("1"))]);
    let sixteen = "x".repeat(16);
    let seventeen = "x".repeat(17);
    let long_key = "k".repeat(65);
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            set_frame(&[("b", Some("1")), ("c", Some(&seventeen))]),
            "state refused: value of c is longer than 16 bytes".into(),
        ),
        (
            set_frame(&[
                ("b", Some("1")),
                ("c", Some("1")),
                ("d", Some("1")),
                ("e", Some("1")),
            ]),
            "state refused: more than 4 keys".into(),
        ),
        (
            set_frame(&[
                ("b", Some(&sixteen)),
                ("c", Some(&sixteen)),
                ("d", Some("1234")),
            ]),
            "state refused: more than 40 bytes of state".into(),
        ),
        (
            set_frame(&[("b", Some("1")), ("h p", Some("1"))]),
            format!("state refused: bad key h p: {}", key_byte(b' ', 1)),
        ),
        (
            set_frame(&[("b", Some("1")), ("h.p", Some("1"))]),
            format!("state refused: bad key h.p: {}", key_byte(b'.', 1)),
        ),
        (
            set_frame(&[("b", Some("1")), ("", Some("1"))]),
            "state refused: bad key : key is empty".into(),
        ),
        (
            set_frame(&[("b", Some("1")), (&long_key, Some("1"))]),
            format!("state refused: bad key {long_key}: key longer than 64 bytes"),
        ),
        (
            frame(SET, b"b=1\x1f"),
            "state refused: expected KEY=VALUE items separated by 0x1F".into(),
        ),
        (
            frame(SET, b"b=1\x1f\x1fc=2"),
            "state refused: expected KEY=VALUE items separated by 0x1F".into(),
        ),
        (
            frame(SET, b""),
            "state refused: expected KEY=VALUE items separated by 0x1F".into(),
        ),
    ];
    for (wire, error) in &cases {
        // The Error answers no request: the Get's own answer follows it, and shows nothing
        // of the frame applied.
        c.send_raw(wire);
        get(&mut c, "peq.z.lim", &[]);
        assert_eq!(next(&mut c), format!("error {error}"));
        expect_listing(&mut c, &["0 F peq.z.lim|a=1"], "ack 0 1");
    }
    // And a Who after a refused Set is answered.
    c.send_raw(&cases[0].0);
    c.send(WHO, b"peq.z.lim");
    assert_eq!(next(&mut c), format!("error {}", cases[0].1));
    assert_eq!(
        c.expect(WHO_ENTRY).split(|&b| b == b' ').next(),
        Some(&b"peq.z.lim"[..])
    );
    assert_eq!(next(&mut c), "ack 0 1");

    // At the limits exactly: applied. A deletion in the same frame makes room for a key.
    set(
        &mut c,
        &[
            ("a", None),
            ("b", Some("1")),
            ("c", Some("1")),
            ("d", Some("1")),
            ("e", Some("1")),
        ],
    );
    get(&mut c, "peq.z.lim", &[]);
    expect_listing(&mut c, &["0 F peq.z.lim|b=1|c=1|d=1|e=1"], "ack 0 1");
    // 16-byte values; 1+16 + 1+16 + 1+3 + 1+1 = 40 bytes.
    set(
        &mut c,
        &[
            ("b", Some(&sixteen)),
            ("c", Some(&sixteen)),
            ("d", Some("123")),
        ],
    );
    get(&mut c, "peq.z.lim", &[]);
    expect_listing(
        &mut c,
        &[&format!("0 F peq.z.lim|b={sixteen}|c={sixteen}|d=123|e=1")],
        "ack 0 1",
    );
    set(&mut c, &[("e", Some("12"))]);
    assert_eq!(
        next(&mut c),
        "error state refused: more than 40 bytes of state"
    );
    c.sync(b"limits");
    // By limit: the value, the keys, the bytes, the value again (before the Who) and the
    // bytes at the end; the key and shape errors count as malformed.
    srv.wait_metric(r#"velium_refused_total{reason="state_limit"}"#, |v| {
        v == 5.0
    });
    srv.wait_metric(r#"velium_errors_total{kind="malformed"}"#, |v| v == 7.0);
    assert_eq!(srv.metric("velium_state_keys"), 4.0);
}

fn the_set_rate_is_limited(io: &str) {
    let srv = Server::with_admin(io, &["--state-sets-per-sec", "5"]);
    let mut c = shim(&srv, "peq.z.rate");
    // 20 Sets at once, each with a key of its own: the first second's 5 go, most of the
    // rest are refused; each refused one is an Error and changes nothing.
    let mut wire = Vec::new();
    for i in 1..=20 {
        let (n, k) = (i.to_string(), format!("k{i:02}"));
        wire.extend(set_frame(&[("n", Some(&n)), (&k, Some("1"))]));
    }
    wire.extend(frame(PING, b"sets"));
    c.send_raw(&wire);
    let mut refused = 0;
    loop {
        match next(&mut c).as_str() {
            "pong sets" => break,
            "error state refused: rate limit: more than 5 sets per second" => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(refused >= 1, "none of 20 Sets refused");
    get(&mut c, "peq.z.rate", &["n"]);
    let (frames, ack) = listing(&mut c);
    assert_eq!(ack, "ack 0 1");
    let n: u32 = frames[0]
        .strip_prefix("0 F peq.z.rate|n=")
        .unwrap()
        .parse()
        .unwrap();
    get(&mut c, "peq.z.rate", &[]);
    let d = c.expect(SET);
    let s = st::parse_state(&d).unwrap();
    let applied: Vec<String> = s
        .items
        .iter()
        .map(|i| text(i.key))
        .filter(|k| k != "n")
        .collect();
    assert_eq!(next(&mut c), "ack 0 1");
    // The first five were applied; every Set was either applied or refused, never half.
    assert_eq!(&applied[..5], ["k01", "k02", "k03", "k04", "k05"]);
    assert_eq!(applied.len() + refused, 20, "{applied:?}");
    assert_eq!(applied.last().unwrap(), &format!("k{n:02}"));
    srv.wait_metric(r#"velium_refused_total{reason="state_rate"}"#, |v| {
        v == refused as f64
    });
    assert_eq!(srv.metric("velium_state_sets_total"), applied.len() as f64);
}

fn subscribe_unsubscribe_and_get_errors(io: &str) {
    let srv = Server::with_admin(
        io,
        &[
            "--state-subscriptions",
            "2",
            "--state-keys",
            "2",
            "--who-per-sec",
            "0",
        ],
    );
    let mut bob = shim(&srv, "peq.z.bob");
    set(&mut bob, &[("hp", Some("1"))]);
    bob.sync(b"set");
    let (mut c, u) = bound_shim(&srv, "tool.c");
    let sid_error = |s: &str| {
        format!(
            "error bad subscription id {s}: must be a decimal number from 1 to 4294967295 with no leading zero"
        )
    };
    let cases: Vec<(&[u8], String)> = vec![
        (b"0 0 >", sid_error("0")),
        (b"01 0 >", sid_error("01")),
        (b"4294967296 0 >", sid_error("4294967296")),
        (b"x 0 >", sid_error("x")),
        (
            b"1 3600001 >",
            "error bad interval 3600001: must be milliseconds from 0 to 3600000".into(),
        ),
        (
            b"1 -1 >",
            "error bad interval -1: must be milliseconds from 0 to 3600000".into(),
        ),
        (
            b"1 0",
            "error expected: SID SP INTERVAL_MS SP PATTERN [SP KEY...]".into(),
        ),
        (
            b"",
            "error expected: SID SP INTERVAL_MS SP PATTERN [SP KEY...]".into(),
        ),
        (
            b"1 0 > h.p",
            format!("error bad key h.p: {}", key_byte(b'.', 1)),
        ),
    ];
    for (data, error) in &cases {
        c.send(SUBSCRIBE, data);
        assert_eq!(&next(&mut c), error, "Subscribe {:?}", text(data));
    }
    c.send(SUBSCRIBE, b"1 0 a.>.b");
    assert_eq!(
        next(&mut c),
        "error bad pattern a.>.b: '>' must be the last segment"
    );
    subscribe(&mut c, 1, 0, ">", &["a", "b", "c"]);
    assert_eq!(next(&mut c), "error more than 2 keys listed");
    // None of them made a subscription.
    assert_eq!(srv.metric("velium_state_subscriptions"), 0.0);

    subscribe(&mut c, 1, 0, "peq.>", &[]);
    expect_listing(&mut c, &["1 F peq.z.bob|hp=1"], "ack 1 1");
    subscribe(&mut c, 1, 0, "other.>", &[]);
    assert_eq!(next(&mut c), "error subscription 1 already exists");
    subscribe(&mut c, 4294967295, 10, "peq.z.bob", &["hp"]);
    expect_listing(&mut c, &["4294967295 F peq.z.bob|hp=1"], "ack 4294967295 1");
    subscribe(&mut c, 3, 0, ">", &[]);
    assert_eq!(next(&mut c), "error more than 2 subscriptions");
    srv.wait_metric("velium_state_subscriptions", |v| v == 2.0);

    // Unsubscribe: an Ack, or an Error for no such subscription.
    unsubscribe(&mut c, 7);
    assert_eq!(next(&mut c), "error no subscription 7");
    c.send(UNSUBSCRIBE, b"x");
    assert_eq!(next(&mut c), "error no subscription x");
    unsubscribe(&mut c, 1);
    assert_eq!(next(&mut c), "ack 1 1");
    unsubscribe(&mut c, 1);
    assert_eq!(next(&mut c), "error no subscription 1");
    // Room for another; the ended one is delivered nothing.
    subscribe(&mut c, 3, 0, "peq.z.*", &["mana"]);
    expect_listing(&mut c, &["3 F peq.z.bob"], "ack 3 1");
    set(&mut bob, &[("hp", Some("2"))]);
    assert_eq!(next_udp(&u), "4294967295 D peq.z.bob|hp=2");
    set(&mut bob, &[("mana", Some("2"))]);
    assert_eq!(next_udp(&u), "3 D peq.z.bob|mana=2");
    bob.sync(b"changes");
    quiet(&mut c, "tcp");

    // Get errors.
    c.send(GET, b"a.>.b");
    assert_eq!(
        next(&mut c),
        "error bad pattern a.>.b: '>' must be the last segment"
    );
    get(&mut c, "peq.>", &["h.p"]);
    assert_eq!(
        next(&mut c),
        format!("error bad key h.p: {}", key_byte(b'.', 1))
    );

    // Over UDP: Subscribe, Unsubscribe and Get are refused, over UDP.
    for (op, name, data) in [
        (SUBSCRIBE, "Subscribe", &b"5 0 >"[..]),
        (UNSUBSCRIBE, "Unsubscribe", &b"3"[..]),
        (GET, "Get", &b">"[..]),
    ] {
        u.send(op, data);
        assert_eq!(
            next_udp(&u),
            format!("error opcode 0x{op:02X} ({name}) is not accepted over UDP")
        );
    }
    u.sync(b"udp");
    // Subscription 3 is still there.
    unsubscribe(&mut c, 3);
    assert_eq!(next(&mut c), "ack 3 1");
    srv.wait_metric("velium_state_subscriptions", |v| v == 1.0);
    // Too many subscriptions, too many keys in one.
    srv.wait_metric(r#"velium_refused_total{reason="subscriptions"}"#, |v| {
        v == 2.0
    });
    // A closed connection's subscriptions end with it.
    drop(c);
    srv.wait_metric("velium_state_subscriptions", |v| v == 0.0);
}

fn a_listing_past_its_cap_is_refused(io: &str) {
    // A listing may pass the outbound limit, up to eight times it: 8192 bytes here.
    let srv = Server::with_admin(io, &["--outbound-limit", "1024", "--who-per-sec", "0"]);
    let v = "v".repeat(1000);
    let mut shims = Vec::new();
    for name in ["peq.z.a", "peq.z.b", "peq.z.c"] {
        let mut c = shim(&srv, name);
        set(
            &mut c,
            &[
                ("k0", Some("0")),
                ("k1", Some(&v)),
                ("k2", Some(&v)),
                ("k3", Some(&v)),
            ],
        );
        c.sync(b"set");
        shims.push(c);
    }
    let too_large = "error state listing larger than 8192 bytes: narrow the pattern or the keys";
    let mut sub = shim(&srv, "tool.sub");
    subscribe(&mut sub, 1, 0, "peq.z.*", &[]);
    assert_eq!(next(&mut sub), too_large);
    get(&mut sub, "peq.z.*", &[]);
    assert_eq!(next(&mut sub), too_large);
    // The refused Subscribe made no subscription.
    unsubscribe(&mut sub, 1);
    assert_eq!(next(&mut sub), "error no subscription 1");
    assert_eq!(srv.metric("velium_state_subscriptions"), 0.0);
    // Narrowed by pattern or by keys, they go.
    subscribe(&mut sub, 1, 0, "peq.z.a", &[]);
    expect_listing(
        &mut sub,
        &[&format!("1 F peq.z.a|k0=0|k1={v}|k2={v}|k3={v}")],
        "ack 1 1",
    );
    subscribe(&mut sub, 2, 0, "peq.z.*", &["k0"]);
    expect_listing(
        &mut sub,
        &["2 F peq.z.a|k0=0", "2 F peq.z.b|k0=0", "2 F peq.z.c|k0=0"],
        "ack 2 3",
    );
    get(&mut sub, "peq.z.*", &["k0", "k1"]);
    let (frames, ack) = listing(&mut sub);
    assert_eq!((frames.len(), ack.as_str()), (3, "ack 0 3"));
    set(&mut shims[1], &[("k0", Some("1"))]);
    assert_eq!(next(&mut sub), "2 D peq.z.b|k0=1");
    quiet(&mut sub, "end");
}

// ---------------------------------------------------------------------------------------
// State removed on close; admin
// ---------------------------------------------------------------------------------------

/// `GET /state?pattern=P`: identity -> key -> (value, age).
fn admin_state(srv: &Server, pattern: &str) -> BTreeMap<String, BTreeMap<String, (String, u64)>> {
    let (status, body) = srv.get(&format!("/state?pattern={pattern}"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["shims"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|s| {
            let keys = s["keys"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, e)| {
                    let age = e["age_ms"].as_u64().unwrap();
                    assert!(age < DEADLINE.as_millis() as u64);
                    (k.clone(), (e["value"].as_str().unwrap().to_string(), age))
                })
                .collect();
            (s["identity"].as_str().unwrap().to_string(), keys)
        })
        .collect()
}

/// Keys without their ages.
fn values(m: &BTreeMap<String, (String, u64)>) -> Vec<(&str, &str)> {
    m.iter()
        .map(|(k, (v, _))| (k.as_str(), v.as_str()))
        .collect()
}

fn state_goes_with_its_shim(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let mut bob = shim(&srv, "peq.z.bob");
    set(
        &mut bob,
        &[("hp", Some("4500/5000")), ("note", Some("afk back soon"))],
    );
    bob.sync(b"set");
    let mut carol = shim(&srv, "peq.z.carol");
    set(&mut carol, &[("x", Some("1"))]);
    carol.sync(b"set");
    let all = admin_state(&srv, "peq.z.*");
    assert_eq!(all.keys().collect::<Vec<_>>(), ["peq.z.bob", "peq.z.carol"]);
    assert_eq!(
        values(&all["peq.z.bob"]),
        [("hp", "4500/5000"), ("note", "afk back soon")]
    );
    assert_eq!(values(&all["peq.z.carol"]), [("x", "1")]);
    assert_eq!(admin_state(&srv, "").len(), 2, "no pattern: every shim");
    assert_eq!(srv.metric("velium_state_keys"), 3.0);
    assert_eq!(srv.metric("velium_state_sets_total"), 2.0);
    assert_eq!(srv.metric("velium_state_changes_total"), 3.0);
    let (status, _) = srv.get("/state?pattern=a.%3E.b");
    assert_eq!(status, 400);

    let mut sub = shim(&srv, "tool.watch");
    subscribe(&mut sub, 1, 0, "peq.z.bob", &[]);
    expect_listing(
        &mut sub,
        &["1 F peq.z.bob|hp=4500/5000|note=afk back soon"],
        "ack 1 1",
    );
    assert_eq!(srv.metric("velium_state_subscriptions"), 1.0);

    // Closed: watchers are told, the keys are gone.
    drop(bob);
    assert_eq!(next(&mut sub), "1 -peq.z.bob eof");
    srv.wait_metric("velium_state_keys", |v| v == 1.0);
    assert!(admin_state(&srv, "peq.z.bob").is_empty());
    // Back under the same identity: a join, and no keys.
    let mut bob = shim(&srv, "peq.z.bob");
    assert_eq!(next(&mut sub), "1 +peq.z.bob");
    get(&mut sub, "peq.z.bob", &[]);
    expect_listing(&mut sub, &["0 F peq.z.bob"], "ack 0 1");
    assert_eq!(admin_state(&srv, "peq.z.bob")["peq.z.bob"], BTreeMap::new());
    set(&mut bob, &[("hp", Some("1"))]);
    assert_eq!(next(&mut sub), "1 D peq.z.bob|hp=1");
    // Unsubscribed: nothing more.
    unsubscribe(&mut sub, 1);
    assert_eq!(next(&mut sub), "ack 1 1");
    assert_eq!(srv.metric("velium_state_subscriptions"), 0.0);
    set(&mut bob, &[("hp", Some("2"))]);
    bob.sync(b"after unsubscribe");
    quiet(&mut sub, "unsubscribed");
    assert_eq!(
        values(&admin_state(&srv, "peq.z.bob")["peq.z.bob"]),
        [("hp", "2")]
    );
    srv.wait_metric("velium_state_keys", |v| v == 2.0);
    drop(carol);
    bob.send_raw(&QUIT);
    bob.expect_closed();
    srv.wait_metric("velium_state_keys", |v| v == 0.0);
    // Only the subscriber is left, holding nothing.
    let left = admin_state(&srv, "%3E");
    assert_eq!(left.keys().collect::<Vec<_>>(), ["tool.watch"]);
    assert!(left["tool.watch"].is_empty());
}

// ---------------------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------------------

const GAME: &str = "game-s3cret";
const TOOL: &str = "tool-s3cret";

fn a_user_reads_only_the_state_it_may(io: &str) {
    let cfg = TempFile::new("users.toml", "");
    let users = [
        User::new("game", GAME, &["peq.>"], &[]),
        User::new("tool", TOOL, &["tool.>"], &[]),
    ];
    let mut toml = users_toml(&cfg, "who_per_sec = 0\n", &users);
    // The last [[user]] table, tool's.
    toml.push_str("state = [\"peq.z.*\"]\n");
    cfg.write(&toml);
    let srv = Server::start(io, &["--config", cfg.arg()]);

    let mut bob = login(&srv, "game", GAME, "peq.z.bob");
    set(&mut bob, &[("hp", Some("1"))]);
    bob.sync(b"set");
    let mut carol = login(&srv, "game", GAME, "peq.y.carol");
    set(&mut carol, &[("hp", Some("2"))]);
    carol.sync(b"set");
    let mut tool = login(&srv, "tool", TOOL, "tool.w");
    set(&mut tool, &[("t", Some("1"))]);

    subscribe(&mut tool, 1, 0, ">", &[]);
    expect_listing(&mut tool, &["1 F peq.z.bob|hp=1"], "ack 1 1");
    // Changes and joins of shims it may not read reach it not.
    set(&mut carol, &[("hp", Some("3"))]);
    carol.sync(b"unseen");
    set(&mut bob, &[("hp", Some("4"))]);
    assert_eq!(next(&mut tool), "1 D peq.z.bob|hp=4");
    let eve = login(&srv, "game", GAME, "peq.y.eve");
    let dave = login(&srv, "game", GAME, "peq.z.dave");
    assert_eq!(next(&mut tool), "1 +peq.z.dave");
    drop(eve);
    srv.wait_log(&["close", "identity=peq.y.eve reason=eof"]);
    drop(dave);
    assert_eq!(next(&mut tool), "1 -peq.z.dave eof");

    // Get likewise.
    get(&mut tool, ">", &[]);
    expect_listing(&mut tool, &["0 F peq.z.bob|hp=4"], "ack 0 1");
    get(&mut tool, "peq.y.carol", &[]);
    expect_listing(&mut tool, &[], "ack 0 0");
    quiet(&mut tool, "end");

    // A user's state patterns are by default its who: game reads peq.>, not tool.w.
    get(&mut bob, ">", &[]);
    expect_listing(
        &mut bob,
        &["0 F peq.z.bob|hp=4", "0 F peq.y.carol|hp=3"],
        "ack 0 2",
    );
    subscribe(&mut bob, 1, 0, "+>", &[]);
    expect_listing(
        &mut bob,
        &["1 F peq.z.bob|hp=4", "1 F peq.y.carol|hp=3"],
        "ack 1 2",
    );
    set(&mut tool, &[("t", Some("2"))]);
    tool.sync(b"unseen by game");
    set(&mut carol, &[("hp", Some("5"))]);
    assert_eq!(next(&mut bob), "1 D peq.y.carol|hp=5");
    quiet(&mut bob, "end");
}

fn limits_follow_a_reload(io: &str) {
    let cfg = TempFile::new("velium.toml", "state_keys = 2\nstate_value_bytes = 4\n");
    let srv = Server::with_admin(io, &["--config", cfg.arg()]);
    let mut c = shim(&srv, "peq.z.c");
    let three = [("a", Some("1")), ("b", Some("1")), ("c", Some("12345"))];
    set(&mut c, &three);
    assert_eq!(
        next(&mut c),
        "error state refused: value of c is longer than 4 bytes"
    );
    set(&mut c, &three[..2]);
    set(&mut c, &[("c", Some("1234"))]);
    assert_eq!(next(&mut c), "error state refused: more than 2 keys");
    cfg.write("state_keys = 3\nstate_value_bytes = 5\n");
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("state_keys"), "{body}");
    assert!(body.contains("state_value_bytes"), "{body}");
    set(&mut c, &three);
    get(&mut c, "peq.z.c", &[]);
    expect_listing(&mut c, &["0 F peq.z.c|a=1|b=1|c=12345"], "ack 0 1");
}

fn a_reload_narrows_what_a_user_reads(io: &str) {
    let cfg = TempFile::new("users.toml", "");
    let users = [
        User::new("game", GAME, &["peq.>"], &[]),
        User::new("tool", TOOL, &["tool.>"], &[]),
    ];
    let toml = |state: &str| {
        // The last [[user]] table is tool's.
        let mut t = users_toml(&cfg, "who_per_sec = 0\n", &users);
        t.push_str(&format!("state = {state}\n"));
        t
    };
    cfg.write(&toml(r#"["peq.z.*"]"#));
    let srv = Server::with_admin(io, &["--config", cfg.arg()]);
    let mut bob = login(&srv, "game", GAME, "peq.z.bob");
    set(&mut bob, &[("hp", Some("1"))]);
    bob.sync(b"set");
    let mut dave = login(&srv, "game", GAME, "peq.z.dave");
    set(&mut dave, &[("hp", Some("2"))]);
    dave.sync(b"set");
    let mut tool = login(&srv, "tool", TOOL, "tool.w");
    subscribe(&mut tool, 1, 0, ">", &[]);
    expect_listing(
        &mut tool,
        &["1 F peq.z.bob|hp=1", "1 F peq.z.dave|hp=2"],
        "ack 1 2",
    );

    // Narrowed: the shim it may no longer read leaves, and its changes stop.
    cfg.write(&toml(r#"["peq.z.bob"]"#));
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(next(&mut tool), "1 -peq.z.dave not permitted");
    set(&mut dave, &[("hp", Some("3"))]);
    dave.sync(b"unseen");
    set(&mut bob, &[("hp", Some("4"))]);
    assert_eq!(next(&mut tool), "1 D peq.z.bob|hp=4");
    get(&mut tool, ">", &[]);
    expect_listing(&mut tool, &["0 F peq.z.bob|hp=4"], "ack 0 1");
    // Widened again: it joins the subscription, its state follows; a new Subscribe
    // sees it too.
    cfg.write(&toml(r#"["peq.z.*"]"#));
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    assert_eq!(next(&mut tool), "1 +peq.z.dave");
    assert_eq!(next(&mut tool), "1 F peq.z.dave|hp=3");
    subscribe(&mut tool, 2, 0, ">", &[]);
    expect_listing(
        &mut tool,
        &["2 F peq.z.bob|hp=4", "2 F peq.z.dave|hp=3"],
        "ack 2 2",
    );
    set(&mut dave, &[("hp", Some("5"))]);
    let mut both = [next(&mut tool), next(&mut tool)];
    both.sort();
    assert_eq!(both, ["1 D peq.z.dave|hp=5", "2 D peq.z.dave|hp=5"]);
    quiet(&mut tool, "end");
}

drivers!(
    snapshot_lists_each_matching_shim_then_acks,
    only_changes_are_delivered,
    a_slow_subscriber_is_coalesced_not_cut_off,
    an_interval_turns_several_changes_into_one,
    joins_and_leaves_with_reasons,
    a_replaced_holder_leaves_before_the_newcomer_joins,
    a_timed_out_shim_leaves_with_its_reason,
    lost_deletions_resync_in_full,
    limits_follow_a_reload,
    a_reload_narrows_what_a_user_reads,
    deltas_go_over_udp_when_the_subscriber_has_it,
    refused_sets_change_nothing,
    the_set_rate_is_limited,
    subscribe_unsubscribe_and_get_errors,
    a_listing_past_its_cap_is_refused,
    state_goes_with_its_shim,
    a_user_reads_only_the_state_it_may,
);
