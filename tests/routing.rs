//! Routing between shims over real sockets: Command, CommandResponse, Echo, Ack, Who;
//! target patterns; UDP routing; ordering; slow consumers; fairness under a flood.
//!
//! "Nothing else was delivered" is proved with barriers, never with a wait: frames from one
//! sender reach one receiver in order, so when a later frame (a marker Echo, or the Pong to
//! the receiver's own Ping after the sender's frames were handled) arrives next, nothing
//! else was queued before it.

mod common;
use common::*;
use std::collections::HashSet;
use std::sync::mpsc;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

/// Parses a UDP datagram as one frame.
fn datagram(d: &[u8]) -> (u8, Vec<u8>) {
    assert_eq!(*d.last().unwrap(), 0x0A, "a datagram ends with 0x0A: {d:?}");
    (d[0], d[1..d.len() - 1].to_vec())
}

fn udp_expect(u: &Udp, op: u8) -> Vec<u8> {
    let (got, data) = datagram(&u.recv());
    assert_eq!(
        got,
        op,
        "expected 0x{op:02X} over UDP, got 0x{got:02X} {:?}",
        String::from_utf8_lossy(&data)
    );
    data
}

/// The core a connection landed on, from its connect log line (None if not logged).
fn core_of(srv: &Server, c: &Tcp) -> Option<String> {
    let peer = c.s.local_addr().unwrap();
    let line = srv.wait_log(&["connect", &format!("peer={peer}")]);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("core="))
        .map(str::to_string)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// Command, CommandResponse, Echo
// ---------------------------------------------------------------------------------------

fn command_reaches_its_target_and_responses_return(io: &str) {
    let srv = Server::start(io, &[]);
    let mut alice = shim(&srv, "peq.ecommons.alice");
    let mut bob = shim(&srv, "peq.ecommons.bob");
    // The command text runs to the end of the frame, spaces and 0x0B included.
    alice.send(0x04, b"peq.ecommons.bob /say hello there\x0bsecond line");
    let (from, id, cmd) = expect_command(&mut bob);
    assert_eq!(from, "peq.ecommons.alice");
    assert_eq!(cmd, b"/say hello there\x0bsecond line");
    assert_eq!(expect_ack(&mut alice), (id.clone(), 1));
    // Any number of answers, each forwarded with the responder's identity.
    bob.send(0x05, format!("{id} done: ok\x0bmore").as_bytes());
    alice.expect_frame(
        0x05,
        format!("{id} peq.ecommons.bob done: ok\x0bmore").as_bytes(),
    );
    bob.send(0x05, format!("{id} again").as_bytes());
    alice.expect_frame(0x05, format!("{id} peq.ecommons.bob again").as_bytes());
    // An empty response.
    bob.send(0x05, id.as_bytes());
    alice.expect_frame(0x05, format!("{id} peq.ecommons.bob ").as_bytes());
    // The ID must be written as the hub wrote it: a padded one is refused and not
    // forwarded.
    bob.send(0x05, format!("00{id} padded").as_bytes());
    assert_eq!(text(&bob.expect(0x09)), NON_CANONICAL_ID);
    // A forwarded CommandResponse gets no Ack: the responder's next frame is its Pong.
    bob.sync(b"no ack for a response");
    // Each Command gets a new id. Its Ack is alice's next frame: the padded response,
    // handled before bob's Pong and so before this Command, reached her nothing.
    alice.send(0x04, b"peq.ecommons.bob /second");
    let (_, id2, _) = expect_command(&mut bob);
    assert_ne!(id, id2);
    assert_eq!(expect_ack(&mut alice), (id2, 1));
    // Echo: one way, Ack with id 0.
    alice.send(0x08, b"peq.ecommons.bob inc\x0bassist  me ");
    alice.expect_frame(0x0C, b"0 1");
    bob.expect_frame(0x08, b"peq.ecommons.alice inc\x0bassist  me ");
    // An empty text is passed on as empty.
    alice.send(0x08, b"peq.ecommons.bob ");
    alice.expect_frame(0x0C, b"0 1");
    bob.expect_frame(0x08, b"peq.ecommons.alice ");
    alice.sync(b"a");
    bob.sync(b"b");
}

fn target_pattern_forms(io: &str) {
    let srv = Server::start(io, &[]);
    let names = [
        "peq.ecommons.bob",
        "peq.ecommons.Alice",
        "peq.nektulos.bob",
        "live.ecommons.bob",
        "peq",
        "peq.ecommons.bob.pet",
        "He_ros-2.zone.x",
    ];
    let mut rx: Vec<Tcp> = names.iter().map(|n| shim(&srv, n)).collect();
    let mut tx = shim(&srv, "ctl");
    let cases: &[(&str, &[usize])] = &[
        ("peq.ecommons.bob", &[0]),
        ("PEQ.ECommons.BOB", &[0]),
        ("peq.ecommons.alice", &[1]),
        ("peq.ecommons.*", &[0, 1]),
        ("*.*.bob", &[0, 2, 3]),
        ("*.ecommons.*", &[0, 1, 3]),
        ("*.*.*", &[0, 1, 2, 3, 6]),
        ("peq.>", &[0, 1, 2, 5]),
        ("PEQ.ECOMMONS.>", &[0, 1, 5]),
        ("peq.ecommons.bob.>", &[5]),
        ("*.ecommons.>", &[0, 1, 3, 5]),
        ("*", &[4]),
        (">", &[0, 1, 2, 3, 4, 5, 6]),
        ("he_ros-2.ZONE.X", &[6]),
        ("HE_ROS-2.*.x", &[6]),
    ];
    let no_match = [
        "peq.ecommons",
        "ecommons.bob",
        "peq.ecommons.bob.pet.>",
        "peq.*",
        "*.*.*.*.*",
        // Identities are ASCII: a target with other letters names none, and '_' is not '-'.
        "héros.zone.x",
        "he-ros-2.zone.x",
        "ctl",
        "peq.ecommons.bo",
    ];
    // What each receiver must get, in order: (opcode, data).
    let mut want: Vec<Vec<(u8, String)>> = vec![Vec::new(); names.len()];
    for (i, (target, who)) in cases.iter().enumerate() {
        tx.send(0x08, format!("{target} echo{i}").as_bytes());
        assert_eq!(
            expect_ack(&mut tx),
            ("0".into(), who.len() as u64),
            "{target}"
        );
        tx.send(0x04, format!("{target} cmd{i}").as_bytes());
        let (id, n) = expect_ack(&mut tx);
        assert_eq!(n, who.len() as u64, "{target}");
        for &r in *who {
            want[r].push((0x08, format!("ctl echo{i}")));
            want[r].push((0x04, format!("ctl {id} cmd{i}")));
        }
    }
    for target in no_match {
        for op in [0x08, 0x04] {
            tx.send(op, format!("{target} nobody").as_bytes());
            assert_eq!(
                tx.expect_error("no shim"),
                format!("no shim matches {target}")
            );
        }
    }
    tx.send(0x08, b"> marker");
    tx.expect_frame(0x0C, b"0 7");
    for (r, c) in rx.iter_mut().enumerate() {
        for (op, data) in &want[r] {
            c.expect_frame(*op, data.as_bytes());
        }
        // The marker comes next: nothing else reached this receiver.
        c.expect_frame(0x08, b"ctl marker");
    }
    tx.sync(b"done");
}

fn rename_takes_effect_for_routing_at_once(io: &str) {
    let srv = Server::start(io, &[]);
    let mut tx = shim(&srv, "ctl.tx");
    let mut rx = shim(&srv, "peq.a.bob");
    rx.send(0x01, b"peq.b.robert");
    rx.sync(b"renamed");
    tx.send(0x08, b"peq.a.bob old name");
    assert_eq!(tx.expect_error("no shim"), "no shim matches peq.a.bob");
    tx.send(0x08, b"peq.a.* old zone");
    assert_eq!(tx.expect_error("no shim"), "no shim matches peq.a.*");
    tx.send(0x08, b"peq.b.robert new name");
    tx.expect_frame(0x0C, b"0 1");
    tx.send(0x08, b"PEQ.B.* new zone");
    tx.expect_frame(0x0C, b"0 1");
    rx.expect_frame(0x08, b"ctl.tx new name");
    rx.expect_frame(0x08, b"ctl.tx new zone");
    // A renamed sender is named by its new identity in what it sends from then on.
    tx.send(0x01, b"ctl.renamed");
    tx.send(0x08, b"peq.b.robert from new");
    tx.expect_frame(0x0C, b"0 1");
    rx.expect_frame(0x08, b"ctl.renamed from new");
    tx.send(0x04, b"peq.b.robert /cmd");
    let (from, _, _) = expect_command(&mut rx);
    assert_eq!(from, "ctl.renamed");
    expect_ack(&mut tx);
    // The old name is free: another shim may take it and is reached by it.
    let mut other = shim(&srv, "peq.a.bob");
    tx.send(0x08, b"peq.a.bob hello newcomer");
    tx.expect_frame(0x0C, b"0 1");
    other.expect_frame(0x08, b"ctl.renamed hello newcomer");
    rx.sync(b"nothing for robert");
}

fn sender_is_left_out_unless_plus(io: &str) {
    let srv = Server::start(io, &[]);
    let mut a = shim(&srv, "grp.a");
    let mut b = shim(&srv, "grp.b");
    a.send(0x08, b"grp.* x1");
    a.expect_frame(0x0C, b"0 1");
    b.expect_frame(0x08, b"grp.a x1");
    // With '+', the sender gets its own frame (queued before its Ack).
    a.send(0x08, b"+grp.* x2");
    a.expect_frame(0x08, b"grp.a x2");
    a.expect_frame(0x0C, b"0 2");
    b.expect_frame(0x08, b"grp.a x2");
    // A target that matches only the sender reaches nobody without '+'.
    a.send(0x08, b"grp.a x3");
    assert_eq!(a.expect_error("no shim"), "no shim matches grp.a");
    a.send(0x08, b"+grp.a x4");
    a.expect_frame(0x08, b"grp.a x4");
    a.expect_frame(0x0C, b"0 1");
    // A Command to oneself, answered by oneself.
    a.send(0x04, b"+GRP.A /self");
    let (from, id, cmd) = expect_command(&mut a);
    assert_eq!((from.as_str(), cmd.as_slice()), ("grp.a", &b"/self"[..]));
    assert_eq!(expect_ack(&mut a), (id.clone(), 1));
    a.send(0x05, format!("{id} self-answer").as_bytes());
    a.expect_frame(0x05, format!("{id} grp.a self-answer").as_bytes());
    // b got x1 and x2 only: the marker is next.
    a.send(0x08, b"grp.b marker");
    a.expect_frame(0x0C, b"0 1");
    b.expect_frame(0x08, b"grp.a marker");
    // No identity holds a '+', so a target's leading '+' is never part of a name: "++plus"
    // names the identity "+plus", which nobody can take.
    let mut p = srv.tcp();
    p.send(0x01, b"+plus");
    assert_eq!(p.expect_error("identity"), identity_byte_error(b'+', 0));
    p.identify("plus");
    b.send(0x08, b"++plus hi");
    assert_eq!(b.expect_error("no shim"), "no shim matches ++plus");
    b.send(0x08, b"+plus hi");
    b.expect_frame(0x0C, b"0 1");
    p.expect_frame(0x08, b"grp.b hi");
    p.sync(b"nothing else");
}

fn responses_reach_their_own_sender(io: &str) {
    const N: usize = 40;
    let srv = Server::start(io, &[]);
    let workers: Vec<Tcp> = ["work.one", "work.two"]
        .iter()
        .map(|n| shim(&srv, n))
        .collect();
    let senders: Vec<Tcp> = (0..3).map(|s| shim(&srv, &format!("boss.{s}"))).collect();
    let worker_threads: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            thread::spawn(move || {
                for _ in 0..3 * N {
                    let (from, id, cmd) = expect_command(&mut w);
                    let cmd = text(&cmd);
                    w.send(0x05, format!("{id} re {from} {cmd}").as_bytes());
                }
                w.sync(b"worker done");
            })
        })
        .collect();
    let sender_threads: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(s, mut c)| {
            thread::spawn(move || {
                let mut wire = Vec::new();
                for i in 0..N {
                    wire.extend(frame(0x04, format!("work.* job-{s}-{i}").as_bytes()));
                }
                c.send_raw(&wire);
                let (mut ids, mut responses) = (Vec::new(), Vec::new());
                while ids.len() < N || responses.len() < 2 * N {
                    match c.recv() {
                        (0x0C, d) => {
                            let (id, n) = ack_of(&d);
                            assert_eq!(n, 2);
                            ids.push(id);
                        }
                        (0x05, d) => responses.push(text(&d)),
                        (op, d) => panic!("boss.{s}: 0x{op:02X} {:?}", text(&d)),
                    }
                }
                let mut seen = HashSet::new();
                for r in &responses {
                    let f: Vec<&str> = r.split(' ').collect();
                    assert_eq!(f.len(), 5, "{r}");
                    let (id, responder, from, job) = (f[0], f[1], f[3], f[4]);
                    assert_eq!(
                        from,
                        format!("boss.{s}"),
                        "a response for another sender: {r}"
                    );
                    let i: usize = job
                        .strip_prefix(&format!("job-{s}-"))
                        .unwrap_or_else(|| panic!("{r}"))
                        .parse()
                        .unwrap();
                    assert_eq!(ids[i], id, "the id acked for job {i}: {r}");
                    assert!(["work.one", "work.two"].contains(&responder), "{r}");
                    assert!(seen.insert((i, responder.to_string())), "twice: {r}");
                }
                c.sync(b"sender done");
            })
        })
        .collect();
    for t in sender_threads.into_iter().chain(worker_threads) {
        t.join().unwrap();
    }
}

fn responses_follow_a_renamed_sender(io: &str) {
    let srv = Server::start(io, &[]);
    let mut w = shim(&srv, "work.w");
    let mut s = shim(&srv, "ctl.one");
    s.send(0x04, b"work.w /job");
    let (from, id, _) = expect_command(&mut w);
    assert_eq!(from, "ctl.one");
    assert_eq!(expect_ack(&mut s).0, id);
    s.send(0x01, b"ctl.uno");
    s.sync(b"renamed");
    // Another shim takes the sender's old name: the answer still goes to the sender.
    let mut imposter = shim(&srv, "ctl.one");
    w.send(0x05, format!("{id} answer").as_bytes());
    w.sync(b"answered");
    s.expect_frame(0x05, format!("{id} work.w answer").as_bytes());
    imposter.sync(b"nothing for me");
}

fn responses_to_a_departed_sender_are_dropped(io: &str) {
    let srv = Server::start(io, &[]);
    let mut w = shim(&srv, "work.w");
    let mut s = shim(&srv, "boss.gone");
    s.send(0x04, b"work.w /job");
    let (_, id, _) = expect_command(&mut w);
    assert_eq!(expect_ack(&mut s).0, id);
    s.send(0x03, b"");
    s.expect_closed_quietly();
    srv.wait_log(&["close", "identity=boss.gone reason=quit"]);
    // The answer is dropped; the responder is not told.
    w.send(0x05, format!("{id} too late").as_bytes());
    w.sync(b"no error");
    // A newcomer with the same name does not get it either.
    let mut s2 = shim(&srv, "boss.gone");
    w.send(0x05, format!("{id} later still").as_bytes());
    w.sync(b"still no error");
    s2.sync(b"nothing for me");
    // The server keeps working: a later command and its answer go through.
    s2.send(0x04, b"work.w /job2");
    let (_, id2, cmd) = expect_command(&mut w);
    assert_eq!(cmd, b"/job2");
    assert_eq!(expect_ack(&mut s2).0, id2);
    w.send(0x05, format!("{id2} done").as_bytes());
    s2.expect_frame(0x05, format!("{id2} work.w done").as_bytes());
}

fn malformed_requests_get_one_error_each_in_order(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = shim(&srv, "ctl.errors");
    let mut t = shim(&srv, "t.x");
    let long = "a".repeat(256);
    let max = "a".repeat(255);
    let cases: Vec<(u8, Vec<u8>, String)> = vec![
        (
            0x08,
            b"nobody.here hi".to_vec(),
            "no shim matches nobody.here".into(),
        ),
        (
            0x04,
            b"nobody.* /cmd".to_vec(),
            "no shim matches nobody.*".into(),
        ),
        (
            0x08,
            b"a.>.b hi".to_vec(),
            "bad target a.>.b: '>' must be the last segment".into(),
        ),
        (
            0x04,
            b">.x /cmd".to_vec(),
            "bad target >.x: '>' must be the last segment".into(),
        ),
        (
            0x04,
            b"+peq..bob /cmd".to_vec(),
            "bad target +peq..bob: empty segment at byte 5: segments are joined by single dots"
                .into(),
        ),
        (
            0x08,
            b"peq. hi".to_vec(),
            "bad target peq.: empty segment at byte 4: segments are joined by single dots".into(),
        ),
        (
            0x08,
            b"justatarget".to_vec(),
            "expected: TARGET SP TEXT".into(),
        ),
        (0x04, b"".to_vec(), "expected: TARGET SP TEXT".into()),
        (0x08, b" hi".to_vec(), "bad target : empty target".into()),
        (0x04, b"+ hi".to_vec(), "bad target +: empty target".into()),
        (
            0x08,
            format!("{long} hi").into_bytes(),
            format!("bad target {long}: target longer than 255 bytes"),
        ),
        (
            0x08,
            format!("{max} hi").into_bytes(),
            format!("no shim matches {max}"),
        ),
        (
            0x08,
            format!("+{max} hi").into_bytes(),
            format!("no shim matches +{max}"),
        ),
        (
            0x08,
            b"\xff.x hi".to_vec(),
            "bad target \u{FFFD}.x: target is not UTF-8".into(),
        ),
        (0x05, b"abc x".to_vec(), NON_CANONICAL_ID.into()),
        (0x05, b"".to_vec(), NON_CANONICAL_ID.into()),
        (0x05, b"-1 x".to_vec(), NON_CANONICAL_ID.into()),
        (0x05, b" x".to_vec(), NON_CANONICAL_ID.into()),
        (0x05, b"+1 x".to_vec(), NON_CANONICAL_ID.into()),
        (0x05, b"01 x".to_vec(), NON_CANONICAL_ID.into()),
        (
            0x05,
            b"18446744073709551616 x".to_vec(),
            NON_CANONICAL_ID.into(),
        ),
        // Canonical, but never sent to this shim (0 is never an id at all).
        (0x05, b"0 x".to_vec(), not_answerable("0", 256)),
        (
            0x05,
            b"18446744073709551615 x".to_vec(),
            not_answerable("18446744073709551615", 256),
        ),
        (
            0x0D,
            b"a.>.b".to_vec(),
            "bad pattern a.>.b: '>' must be the last segment".into(),
        ),
        (0x0D, b"+".to_vec(), "bad pattern +: empty target".into()),
    ];
    // All in one write, with valid requests between them: one answer each, in order.
    let mut wire = Vec::new();
    for (op, data, _) in &cases {
        wire.extend(frame(*op, data));
        wire.extend(frame(0x08, b"t.x ok"));
    }
    c.send_raw(&wire);
    for (_, data, err) in &cases {
        let got = text(&c.expect(0x09));
        assert_eq!(&got, err, "for {:?}", String::from_utf8_lossy(data));
        c.expect_frame(0x0C, b"0 1");
    }
    // A response to an id this shim was never sent is refused, and nobody gets it.
    c.send(0x05, b"999999999999 nobody asked");
    assert_eq!(text(&c.expect(0x09)), not_answerable("999999999999", 256));
    c.sync(b"still usable");
    for _ in &cases {
        t.expect_frame(0x08, b"ctl.errors ok");
    }
    t.sync(b"nothing reached t.x but the Echoes");
}

// ---------------------------------------------------------------------------------------
// UDP routing
// ---------------------------------------------------------------------------------------

fn udp_routing(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut a, ua) = bound_shim(&srv, "net.a");
    let (mut b, ub) = bound_shim(&srv, "net.b");
    let mut c = shim(&srv, "net.c");
    // An Echo sent over UDP: to B over its UDP channel, to C (not bound) over TCP, and
    // the Ack back over UDP.
    ua.send(0x08, b"net.> over udp\x0bline two");
    assert_eq!(udp_expect(&ua, 0x0C), b"0 2");
    assert_eq!(udp_expect(&ub, 0x08), b"net.a over udp\x0bline two");
    c.expect_frame(0x08, b"net.a over udp\x0bline two");
    // A Command over UDP to B; B answers over UDP; A is bound, so the answer comes over UDP.
    ua.send(0x04, b"net.b /one");
    let (id1, n) = ack_of(&udp_expect(&ua, 0x0C));
    assert_eq!(n, 1);
    let (from, id, cmd) = command_of(&udp_expect(&ub, 0x04));
    assert_eq!(
        (from.as_str(), id.as_str(), &cmd[..]),
        ("net.a", &*id1, &b"/one"[..])
    );
    ub.send(0x05, format!("{id1} done over udp").as_bytes());
    assert_eq!(
        text(&udp_expect(&ua, 0x05)),
        format!("{id1} net.b done over udp")
    );
    // A Command over UDP to C (TCP only): delivered over TCP; C answers over TCP, so the
    // answer reaches A over TCP.
    ua.send(0x04, b"net.c /two");
    let (id2, _) = ack_of(&udp_expect(&ua, 0x0C));
    let (from, id, _) = expect_command(&mut c);
    assert_eq!((from.as_str(), id.as_str()), ("net.a", id2.as_str()));
    c.send(0x05, format!("{id2} done over tcp").as_bytes());
    a.expect_frame(0x05, format!("{id2} net.c done over tcp").as_bytes());
    // A Command over TCP reaches bound B over TCP; B answers over UDP, and bound A gets
    // that answer over UDP.
    a.send(0x04, b"net.b /three");
    let (id3, _) = expect_ack(&mut a);
    let (_, id, cmd) = expect_command(&mut b);
    assert_eq!((id.as_str(), &cmd[..]), (id3.as_str(), &b"/three"[..]));
    ub.send(0x05, format!("{id3} answered over udp").as_bytes());
    assert_eq!(
        text(&udp_expect(&ua, 0x05)),
        format!("{id3} net.b answered over udp")
    );
    // With '+' over UDP, the sender's own copy comes over UDP too (datagrams: any order).
    ua.send(0x08, b"+net.a self");
    let mut got = vec![datagram(&ua.recv()), datagram(&ua.recv())];
    got.sort();
    assert_eq!(
        got,
        vec![(0x08, b"net.a self".to_vec()), (0x0C, b"0 1".to_vec())]
    );
    // Errors for requests over UDP come back over UDP.
    ua.send(0x08, b"nobody hi");
    assert_eq!(udp_expect(&ua, 0x09), b"no shim matches nobody");
    ua.send(0x04, b"a.>.b hi");
    assert_eq!(
        udp_expect(&ua, 0x09),
        b"bad target a.>.b: '>' must be the last segment"
    );
    ua.send(0x08, b"notarget");
    assert_eq!(udp_expect(&ua, 0x09), b"expected: TARGET SP TEXT");
    ua.send(0x05, b"xyz");
    assert_eq!(udp_expect(&ua, 0x09), NON_CANONICAL_ID.as_bytes());
    ua.send(0x0D, b"");
    assert_eq!(udp_expect(&ua, 0x09), b"Who is answered over TCP only");
    // Nothing leaked anywhere else.
    for (t, u) in [(&mut a, &ua), (&mut b, &ub)] {
        t.sync(b"tcp quiet");
        u.sync(b"udp quiet");
    }
    c.sync(b"tcp quiet");
}

// ---------------------------------------------------------------------------------------
// Ordering and slow consumers
// ---------------------------------------------------------------------------------------

fn echo_order_under_load(io: &str) {
    const N: usize = 5000;
    // Thousands of frames a second from one shim: past the default per-shim rates, which
    // this test is not about (tests/abuse.rs is).
    let srv = Server::start(io, &["--routed-per-sec", "0", "--deliveries-per-sec", "0"]);
    let mut tx = shim(&srv, "load.tx");
    let tx_core = core_of(&srv, &tx);
    // Two receivers, one per core where the connect log line says which core serves a
    // connection (so one is on another core than the sender). Unwanted connections are
    // dropped before they identify, so they are never routed to.
    let mut receivers: Vec<Tcp> = Vec::new();
    let mut cores = Vec::new();
    for _ in 0..64 {
        let c = srv.tcp();
        let k = core_of(&srv, &c);
        if k.is_none() || !cores.contains(&k) {
            cores.push(k);
            receivers.push(c);
        }
        if receivers.len() == 2 {
            break;
        }
    }
    assert_eq!(receivers.len(), 2, "connections all land on one core");
    assert!(
        cores.iter().any(|k| *k != tx_core) || tx_core.is_none(),
        "no receiver on another core than the sender"
    );
    let readers: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(k, mut rx)| {
            rx.identify(&format!("load.rx.r{k}"));
            thread::spawn(move || {
                for i in 0..N {
                    rx.expect_frame(0x08, format!("load.tx {i:05}").as_bytes());
                }
                // Exactly once: the next frame is the Pong.
                rx.sync(b"done");
            })
        })
        .collect();
    let mut acks = tx.try_clone();
    let acker = thread::spawn(move || {
        for _ in 0..N {
            acks.expect_frame(0x0C, b"0 2");
        }
        acks
    });
    let mut wire = Vec::with_capacity(N * 20);
    for i in 0..N {
        wire.extend(frame(0x08, format!("load.rx.* {i:05}").as_bytes()));
    }
    tx.send_raw(&wire);
    for r in readers {
        r.join().unwrap();
    }
    let mut acks = acker.join().unwrap();
    acks.sync(b"all acked");
}

fn slow_consumer_is_cut_off_and_others_keep_receiving(io: &str) {
    let srv = Server::start(
        io,
        &[
            "--outbound-limit",
            "65536",
            "--routed-per-sec",
            "0",
            "--deliveries-per-sec",
            "0",
        ],
    );
    let mut slow = shim(&srv, "sub.slow");
    let mut fast = shim(&srv, "sub.fast");
    let mut tx = shim(&srv, "pub.tx");
    let payload = "x".repeat(10_000);
    let (seen_tx, seen_rx) = mpsc::channel::<u64>();
    let fast_reader = thread::spawn(move || {
        let mut n = 0u64;
        loop {
            let d = fast.expect(0x08);
            if d == b"pub.tx end" {
                return (n, fast);
            }
            let prefix = format!("pub.tx {n:06} ");
            assert!(d.starts_with(prefix.as_bytes()), "frame {n} out of order");
            n += 1;
            let _ = seen_tx.send(n);
        }
    });
    let mut acks = tx.try_clone();
    let ack_reader = thread::spawn(move || {
        let mut counts = Vec::new();
        loop {
            match acks.recv() {
                (0x0C, d) => counts.push(ack_of(&d).1),
                (0x07, d) if d == b"end" => return counts,
                (op, d) => panic!("pub.tx got 0x{op:02X} {:?}", text(&d)),
            }
        }
    });
    // Publish to both until the slow one is cut off. The fast one is kept within 40 KB of
    // the sender, so its own queue never nears the limit however the threads are scheduled.
    let (mut sent, mut seen) = (0u64, 0u64);
    while srv.count_log(&["slow consumer"]) == 0 {
        assert!(sent < 5_000, "sub.slow was never cut off");
        while sent - seen >= 4 {
            seen = seen_rx
                .recv_timeout(DEADLINE)
                .expect("the fast reader stalled");
        }
        tx.send(0x08, format!("sub.* {sent:06} {payload}").as_bytes());
        sent += 1;
    }
    srv.wait_log(&["slow consumer", "identity=sub.slow"]);
    srv.wait_log(&["close", "identity=sub.slow reason=slow consumer"]);
    tx.send(0x08, b"sub.* end");
    tx.send(0x06, b"end");
    // The fast receiver got everything, in order.
    let (n, mut fast) = fast_reader.join().unwrap();
    assert_eq!(n, sent);
    // Every publish was acked; they reached both until the cut, then only the fast one.
    let counts = ack_reader.join().unwrap();
    assert_eq!(counts.len() as u64, sent + 1);
    assert_eq!(counts[0], 2);
    assert_eq!(*counts.last().unwrap(), 1);
    let cut = counts.iter().position(|&n| n == 1).unwrap();
    assert!(counts[cut..].iter().all(|&n| n == 1), "{counts:?}");
    assert!(counts[..cut].iter().all(|&n| n == 2), "{counts:?}");
    // The slow one was closed without an Error or Quit: what it can still read is an
    // in-order prefix of the Echo stream, then the end of the connection.
    let got = slow.expect_closed();
    for (i, (op, d)) in got.iter().enumerate() {
        assert_eq!(*op, 0x08, "the slow consumer got 0x{op:02X}");
        assert!(d.starts_with(format!("pub.tx {i:06} ").as_bytes()));
    }
    assert!((got.len() as u64) < sent);
    // The sender was never cut off, and the server goes on.
    tx.send(0x08, b"sub.* after");
    tx.expect_frame(0x0C, b"0 1");
    fast.expect_frame(0x08, b"pub.tx after");
}

// ---------------------------------------------------------------------------------------
// Who and a second holder of an identity
// ---------------------------------------------------------------------------------------

fn who_lists_identified_shims(io: &str) {
    let srv = Server::start(io, &[]);
    let t0 = unix_ms();
    let mut bob = shim(&srv, "peq.a.bob");
    let mut alice = shim(&srv, "peq.a.Alice");
    let carol = shim(&srv, "live.x.carol");
    let mut unidentified = srv.tcp();
    unidentified.sync(b"connected");
    let t1 = unix_ms();
    let all = who(&mut bob, "");
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        ["live.x.carol", "peq.a.Alice", "peq.a.bob"],
        "identified shims only, the requester included"
    );
    for entries in all.values() {
        assert_eq!(entries.len(), 1);
        let (since, udp) = &entries[0];
        assert!((t0..=t1).contains(since), "{since} not in {t0}..={t1}");
        assert_eq!(udp, "-");
    }
    // A shim with a bound UDP channel is flagged "udp".
    let (mut dan, du) = bound_shim(&srv, "peq.a.dan");
    let zone = who(&mut alice, "peq.a.*");
    assert_eq!(
        zone.keys().collect::<Vec<_>>(),
        ["peq.a.Alice", "peq.a.bob", "peq.a.dan"]
    );
    assert_eq!(zone["peq.a.dan"][0].1, "udp");
    assert_eq!(zone["peq.a.bob"][0].1, "-");
    // Patterns: case-insensitive, '+' makes no difference, no match is just "0 0".
    assert_eq!(who(&mut alice, "PEQ.>").len(), 3);
    assert_eq!(who(&mut alice, "+peq.a.*").len(), 3);
    assert_eq!(who(&mut alice, "*.x.carol").len(), 1);
    assert!(who(&mut alice, "nobody.*").is_empty());
    // A rename shows at once; a closed shim is gone at once.
    dan.send(0x01, b"peq.b.dan");
    dan.sync(b"renamed");
    assert_eq!(
        who(&mut alice, "peq.b.>").keys().collect::<Vec<_>>(),
        ["peq.b.dan"]
    );
    drop(carol);
    srv.wait_log(&["close", "identity=live.x.carol reason=eof"]);
    assert!(who(&mut alice, "live.>").is_empty());
    // Who over UDP is refused.
    du.send(0x0D, b"");
    assert_eq!(udp_expect(&du, 0x09), b"Who is answered over TCP only");
    // Who requests are answered in order with other requests.
    alice.send_raw(&[frame(0x0D, b"peq.a.bob"), frame(0x06, b"after")].concat());
    alice.expect(0x0E);
    alice.expect_frame(0x0C, b"0 1");
    alice.expect_frame(0x07, b"after");
}

/// On an open hub (the default policy, same-credential: every client holds the same,
/// none) a second holder of an identity replaces the first, in any letter case, on
/// Identify and on rename: the older connection is sent Quit and closed, and from then on
/// the name reaches the newcomer alone.
fn a_second_holder_of_an_identity_replaces_the_first(io: &str) {
    let srv = Server::start(io, &[]);
    let mut d1 = shim(&srv, "dup.x");
    let mut tx = shim(&srv, "dup.tx");
    tx.send(0x04, b"dup.x /first");
    let (id1, n) = expect_ack(&mut tx);
    assert_eq!(n, 1);
    assert_eq!(expect_command(&mut d1).1, id1);
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
    srv.wait_log(&[
        "close",
        "identity=dup.x reason=replaced by a newer connection with the same identity",
    ]);
    tx.send(0x08, b"dup.x hi");
    tx.expect_frame(0x0C, b"0 1");
    d2.expect_frame(0x08, b"dup.tx hi");
    // One entry, in the newcomer's letter case.
    let listed = who(&mut tx, "dup.x");
    assert_eq!(listed.keys().collect::<Vec<_>>(), ["DUP.X"]);
    assert_eq!(listed["DUP.X"].len(), 1);
    // A Command reaches the newcomer alone; its answer names it.
    tx.send(0x04, b"dup.x /go");
    let (id, n) = expect_ack(&mut tx);
    assert_eq!(n, 1);
    let (from, got, _) = expect_command(&mut d2);
    assert_eq!((from.as_str(), got.as_str()), ("dup.tx", id.as_str()));
    d2.send(0x05, format!("{id} two").as_bytes());
    tx.expect_frame(0x05, format!("{id} DUP.X two").as_bytes());
    // The name did not bring the old holder's Commands with it.
    d2.send(0x05, format!("{id1} stolen").as_bytes());
    assert_eq!(text(&d2.expect(0x09)), not_answerable(&id1, 256));
    // A rename onto a held name replaces its holder the same way.
    let mut d3 = shim(&srv, "dup.y");
    d3.send(0x01, b"Dup.X");
    d3.sync(b"renamed");
    assert_eq!(
        d2.expect_closed(),
        vec![
            (
                0x09,
                b"closing: replaced: a newer connection identified as Dup.X".to_vec()
            ),
            (0x03, Vec::new())
        ]
    );
    tx.send(0x08, b"dup.x bye");
    tx.expect_frame(0x0C, b"0 1");
    d3.expect_frame(0x08, b"dup.tx bye");
    d3.sync(b"d3");
    tx.sync(b"tx: the refused answer reached nobody");
}

/// A socket reader that throws everything away until the connection ends.
fn drain(mut s: std::net::TcpStream) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        use std::io::Read;
        let mut b = vec![0u8; 65536];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    })
}

fn a_flooding_shim_does_not_starve_its_core(io: &str) {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let srv = Server::start(io, &[]);
    let sink = shim(&srv, "flood.sink");
    let flooder = shim(&srv, "flood.src");
    let core = core_of(&srv, &flooder);
    // A victim served by the same core as the flooder.
    let mut victim = (0..64)
        .map(|_| srv.tcp())
        .find(|c| core_of(&srv, c) == core)
        .expect("a connection on the flooder's core");
    victim.identify("flood.victim");
    // The sink reads its deliveries and the flooder its Acks, so neither is cut off.
    let sink_reader = drain(sink.s.try_clone().unwrap());
    let ack_reader = drain(flooder.s.try_clone().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started) = mpsc::channel();
    let flood = {
        let stop = stop.clone();
        let mut w = flooder.s.try_clone().unwrap();
        thread::spawn(move || {
            let chunk: Vec<u8> = (0..1000)
                .flat_map(|_| frame(0x08, b"flood.sink 0123456789abcdef"))
                .collect();
            let mut chunks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w.write_all(&chunk).expect("flood");
                chunks += 1;
                if chunks == 1 {
                    started_tx.send(()).unwrap();
                }
            }
            chunks
        })
    };
    started.recv().unwrap();
    // Served while the flood goes on: every Ping answered, in order.
    for i in 0..200 {
        victim.sync(format!("victim {i}").as_bytes());
    }
    stop.store(true, Ordering::Relaxed);
    let chunks = flood.join().unwrap();
    assert!(chunks >= 1, "the flood ran while the victim was served");
    for s in [&sink.s, &flooder.s] {
        s.shutdown(std::net::Shutdown::Both).unwrap();
    }
    sink_reader.join().unwrap();
    ack_reader.join().unwrap();
}

drivers!(
    a_flooding_shim_does_not_starve_its_core,
    command_reaches_its_target_and_responses_return,
    target_pattern_forms,
    rename_takes_effect_for_routing_at_once,
    sender_is_left_out_unless_plus,
    responses_reach_their_own_sender,
    responses_follow_a_renamed_sender,
    responses_to_a_departed_sender_are_dropped,
    malformed_requests_get_one_error_each_in_order,
    udp_routing,
    echo_order_under_load,
    slow_consumer_is_cut_off_and_others_keep_receiving,
    who_lists_identified_shims,
    a_second_holder_of_an_identity_replaces_the_first,
);
