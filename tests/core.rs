//! The core protocol over real sockets: handshake, framing rules, timers, UDP.
//!
//! Every test starts its own server and waits on events (frames, closed sockets, log
//! lines). "Nothing else arrived" is proved with a barrier wherever one exists: a Ping on
//! the same TCP connection or UDP source is answered only after everything sent before it
//! was handled, so the Pong arriving next proves no other reply was queued.

mod common;
use common::*;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A connection that has identified as `name`, and its token.
fn identified(srv: &Server, name: &str) -> (Tcp, [u8; 16]) {
    let mut c = srv.tcp();
    let token = c.identify(name);
    (c, token)
}

/// The identified shim `name` with a UDP channel bound to it.
fn bound(srv: &Server, name: &str) -> (Tcp, [u8; 16], Udp) {
    let (c, token) = identified(srv, name);
    let u = srv.udp();
    u.bind_confirmed(&token);
    (c, token, u)
}

/// Waits for `name`'s close line with `reason`, then checks that its session is gone at
/// once: its bound UDP source gets Quit to a Ping, and a bind with its token gets Quit.
fn assert_session_gone(srv: &Server, name: &str, reason: &str, token: &[u8; 16], u: &Udp) {
    srv.wait_log(&["close", &format!("identity={name} reason={reason}")]);
    u.send(0x06, b"still there?");
    assert_eq!(u.recv(), QUIT, "the old UDP source is unbound");
    let fresh = srv.udp();
    fresh.bind(token);
    assert_eq!(fresh.recv(), QUIT, "the old token binds nothing");
}

/// A Ping frame of exactly `len` bytes on the wire (opcode and 0x0A included).
fn ping_of_len(len: usize) -> Vec<u8> {
    frame(0x06, &vec![b'p'; len - 2])
}

// ---------------------------------------------------------------------------------------
// Handshake and framing
// ---------------------------------------------------------------------------------------

fn handshake_tcp_then_udp(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    let token = c.identify("peq.ecommons.bob");
    assert!(!token.contains(&0x0A) && !token.contains(&0x0B));
    let u = srv.udp();
    u.bind_confirmed(&token);
    srv.wait_log(&["bind", "peq.ecommons.bob"]);
}

fn none_is_ignored_and_data_bytes_pass_through(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    // None frames (with and without data, and a lone 0x0A) are ignored before Identify...
    c.send(0x00, b"");
    c.send(0x00, b"keepalive");
    c.send_raw(b"\n\n");
    c.sync(b"before");
    c.identify("bytes.test");
    // ...and after it.
    c.send(0x00, b"keepalive");
    c.send_raw(b"\n");
    c.sync(b"after");
    // 0x0B inside data is a newline stand-in: it comes back untouched.
    c.sync(b"line one\x0bline two\x0b");
    c.sync(b"\x0b");
    // So does every byte value but 0x0A, and an empty Ping.
    let every: Vec<u8> = (0..=255u8).filter(|&b| b != 0x0A).collect();
    c.sync(&every);
    c.sync(b"");
    // Frames split across writes, and several frames in one write, are both handled.
    c.send_raw(b"\x06spl");
    c.send_raw(b"it\n\x06two\n\x06three\n");
    c.expect_frame(0x07, b"split");
    c.expect_frame(0x07, b"two");
    c.expect_frame(0x07, b"three");
}

fn max_frame_default_boundary(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut other, _) = identified(&srv, "bystander");
    let mut c = srv.tcp();
    // 16 KiB exactly, opcode and 0x0A included: accepted, and the Pong is as long.
    let max = ping_of_len(16 * 1024);
    c.send_raw(&max);
    assert_eq!(frame(0x07, &c.expect(0x07)).len(), 16 * 1024);
    c.sync(b"still open");
    // One byte more: an Error naming the limit, then the connection is closed.
    c.send_raw(&ping_of_len(16 * 1024 + 1));
    c.expect_error("frame longer than 16384 bytes");
    c.expect_closed_quietly();
    srv.wait_log(&["close", "reason=oversized frame"]);
    // The other shim is unaffected.
    other.sync(b"unaffected");
}

fn max_frame_flag_boundary_and_others_unaffected(io: &str) {
    let srv = Server::start(io, &["--max-frame", "64"]);
    let (mut rx, _) = identified(&srv, "limit.rx");
    let (mut c, token) = identified(&srv, "limit.big");
    let u = srv.udp();
    u.bind_confirmed(&token);
    c.send_raw(&ping_of_len(64));
    c.expect_frame(0x07, &[b'p'; 62]);
    // An Echo of exactly 64 bytes is routed.
    let text = vec![b't'; 64 - 2 - "limit.rx ".len()];
    let mut data = b"limit.rx ".to_vec();
    data.extend_from_slice(&text);
    c.send(0x08, &data);
    c.expect_frame(0x0C, b"0 1");
    let mut want = b"limit.big ".to_vec();
    want.extend_from_slice(&text);
    // What the server sends may exceed the limit (the sender's name replaces the target).
    assert!(frame(0x08, &want).len() > 64);
    rx.expect_frame(0x08, &want);
    // 65 bytes: Error, close, and the session with its UDP binding is gone.
    c.send_raw(&ping_of_len(65));
    c.expect_error("frame longer than 64 bytes");
    c.expect_closed_quietly();
    assert_session_gone(&srv, "limit.big", "oversized frame", &token, &u);
    // Other shims still get pongs and deliveries.
    rx.sync(b"pong after");
    let (mut tx, _) = identified(&srv, "limit.tx");
    tx.send(0x08, b"limit.rx after");
    tx.expect_frame(0x0C, b"0 1");
    rx.expect_frame(0x08, b"limit.tx after");
}

fn oversized_without_newline(io: &str) {
    let srv = Server::start(io, &["--max-frame", "100"]);
    let (mut other, _) = identified(&srv, "nl.other");
    // 99 bytes of a Ping, then a 100th byte that is not 0x0A: the frame can no longer fit
    // in 100 bytes, so it is refused before its end arrives. (The same 99 bytes followed
    // by 0x0A are a valid frame: see the end of this test.)
    let mut c = srv.tcp();
    c.send_raw(&ping_of_len(100)[..99]);
    c.send_raw(b"p");
    c.expect_error("frame longer than 100 bytes");
    c.expect_closed_quietly();
    // A large run of bytes without any 0x0A at all, on a fresh connection.
    let mut d = srv.tcp();
    d.send_raw(&[0x06; 5000]);
    d.expect_error("frame longer than 100 bytes");
    d.expect_closed();
    other.sync(b"unaffected");
    // A 100-byte frame split across writes (99 bytes, then the 0x0A) is accepted.
    let mut e = srv.tcp();
    e.send_raw(&ping_of_len(100)[..50]);
    e.send_raw(&ping_of_len(100)[50..99]);
    e.send_raw(b"\n");
    e.expect_frame(0x07, &[b'p'; 98]);
}

// ---------------------------------------------------------------------------------------
// Identify
// ---------------------------------------------------------------------------------------

fn session_token_is_a_frame_safe_uuid_v4(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    c.send(0x01, b"uuid.check");
    let (op, data) = c.recv();
    assert_eq!(op, 0x02);
    // The frame is exactly | 0x02 | 16 bytes | 0x0A |.
    assert_eq!(data.len(), 16);
    assert!(!data.contains(&0x0A) && !data.contains(&0x0B));
    assert_eq!(data[6] >> 4, 4, "UUID version 4: {data:02x?}");
    assert_eq!(data[8] & 0xC0, 0x80, "RFC 4122 variant: {data:02x?}");
    // Then the Terms: the hub's settings, from which a shim derives its Ping interval.
    let (op, raw) = c.recv();
    assert_eq!(op, 0x15);
    assert_eq!(
        String::from_utf8(raw).unwrap(),
        "idle_timeout_ms=30000\x1fping_ms=10000\x1fmax_frame=16384\x1f\
         outbound_limit=1048576\x1fanswer_window=256\x1ffeatures=state,filters,udp"
    );
    c.sync(b"nothing else");
    // The log shows only a prefix of the token.
    let line = srv.wait_log(&["identify", "identity=uuid.check"]);
    let prefix: String = data[..4].iter().map(|b| format!("{b:02x}")).collect();
    assert!(line.contains(&format!("token={prefix}..")), "{line}");
    let whole: String = data.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!line.contains(&whole), "the whole token is never logged");
}

fn tokens_differ_across_200_shims(io: &str) {
    let srv = Server::start(io, &[]);
    let mut conns: Vec<Tcp> = (0..200).map(|_| srv.tcp()).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(0x01, format!("fleet.shim{i}").as_bytes());
    }
    let mut seen = HashSet::new();
    for c in &mut conns {
        let t = c.expect(0x02);
        c.expect_terms();
        assert_eq!(t.len(), 16);
        assert!(!t.contains(&0x0A) && !t.contains(&0x0B), "{t:02x?}");
        assert_eq!(t[6] >> 4, 4);
        assert_eq!(t[8] & 0xC0, 0x80);
        assert!(seen.insert(t.clone()), "token {t:02x?} given twice");
    }
    assert_eq!(seen.len(), 200);
}

fn rename_keeps_token_and_gets_no_reply(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, token) = identified(&srv, "peq.ecommons.bob");
    c.send(0x01, b"peq.nektulos.bob");
    // The next frame is the Pong: the rename got no reply (no second Session).
    c.sync(b"after rename");
    srv.wait_log(&["rename", "old=peq.ecommons.bob", "new=peq.nektulos.bob"]);
    // The token from the first Identify still binds, now for the new name.
    let u = srv.udp();
    u.bind_confirmed(&token);
    srv.wait_log(&["INFO bind ", "identity=peq.nektulos.bob"]);
    c.send(0x01, b"peq.nektulos.robert");
    c.sync(b"second rename");
    srv.wait_log(&["rename", "old=peq.nektulos.bob", "new=peq.nektulos.robert"]);
    u.sync(b"binding kept");
    c.send(0x03, b"");
    c.expect_closed_quietly();
    assert_session_gone(&srv, "peq.nektulos.robert", "quit", &token, &u);
}

fn invalid_labels_get_an_error_and_the_connection_stays(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    let long = [b'a'; 65];
    let (empty, too_long) = ("identity is empty", "identity longer than 64 bytes");
    let byte = |s: &[u8], at: usize| identity_byte_error(s[at], at);
    // Segments of ASCII letters, digits, '_' and '-', joined by single dots: the first
    // byte outside that is named with its offset (every non-ASCII byte, so every invisible
    // or look-alike character, is one).
    let bad: Vec<(&[u8], String)> = vec![
        (b"", empty.into()),
        (&long, too_long.into()),
        (b"two words", byte(b"two words", 3)),
        (b" lead", byte(b" lead", 0)),
        (b"trail ", byte(b"trail ", 5)),
        (b"tab\there", byte(b"tab\there", 3)),
        (b"cr\rhere", byte(b"cr\rhere", 2)),
        (b"ctl\x01x", byte(b"ctl\x01x", 3)),
        (b"nul\x00x", byte(b"nul\x00x", 3)),
        (b"esc\x1bx", byte(b"esc\x1bx", 3)),
        (b"del\x7f", byte(b"del\x7f", 3)),
        (b"vt\x0bx", byte(b"vt\x0bx", 2)),
        (b"\xff\xfe", byte(b"\xff\xfe", 0)),
        (b"cut\xc3", byte(b"cut\xc3", 3)),
        (b"\xc0\xaf", byte(b"\xc0\xaf", 0)),
        ("nb\u{a0}sp".as_bytes(), byte("nb\u{a0}sp".as_bytes(), 2)),
        (
            "ideographic\u{3000}space".as_bytes(),
            byte("ideographic\u{3000}space".as_bytes(), 11),
        ),
        ("c1\u{85}ctl".as_bytes(), byte("c1\u{85}ctl".as_bytes(), 2)),
        (
            "zero\u{200B}width".as_bytes(),
            byte("zero\u{200B}width".as_bytes(), 4),
        ),
        ("bom\u{FEFF}".as_bytes(), byte("bom\u{FEFF}".as_bytes(), 3)),
        ("héros".as_bytes(), identity_byte_error(0xC3, 1)),
        (b"peq.*.bob", identity_byte_error(b'*', 4)),
        (b"a..b", empty_segment_error(2)),
    ];
    for (label, why) in &bad {
        c.send(0x01, label);
        assert_eq!(&c.expect_error("identity"), why, "label {label:?}");
    }
    // Still open and still unidentified: a routed frame is refused...
    c.send(0x08, b"> hi");
    c.expect_error("identify first");
    // ...and a valid Identify works: 64 bytes is the longest label.
    let max: String = "m".repeat(64);
    c.identify(&max);
    // A bad label in a rename is refused the same way, and the identity is kept.
    c.send(0x01, b"bad name");
    assert_eq!(c.expect_error("identity"), identity_byte_error(b' ', 3));
    c.send(0x01, &long);
    assert_eq!(c.expect_error("identity"), too_long);
    c.send(0x01, b"");
    assert_eq!(c.expect_error("identity"), empty);
    c.send(0x01, "héros.ünïcode".as_bytes());
    assert_eq!(c.expect_error("identity"), identity_byte_error(0xC3, 1));
    c.send(0x08, format!("+{max} still me").as_bytes());
    c.expect_frame(0x08, format!("{max} still me").as_bytes());
    c.expect_frame(0x0C, b"0 1");
    c.send(0x01, b"Her_os-2.u.nicode");
    c.sync(b"renamed");
    srv.wait_log(&["rename", &format!("old={max}"), "new=Her_os-2.u.nicode"]);
    assert_eq!(srv.count_log(&["rename"]), 1);
}

fn before_identify_only_identify_ping_quit(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    c.sync(b"ping is fine");
    for op in [0x02u8, 0x04, 0x05, 0x07, 0x08, 0x09, 0x0C, 0x0D, 0x0E] {
        c.send(op, b"peq.> hello");
        let e = c.expect_error("identify first");
        assert_eq!(e, "identify first", "opcode 0x{op:02X}");
    }
    c.send(0x0D, b"");
    c.expect_error("identify first");
    c.sync(b"still open");
    c.identify("late.identify");
    c.send(0x0D, b"late.identify");
    c.expect(0x0E);
    c.expect_frame(0x0C, b"0 1");
    // Quit before Identify closes at once, with nothing sent.
    let mut q = srv.tcp();
    q.sync(b"hello");
    q.send(0x03, b"");
    q.expect_closed_quietly();
    srv.wait_log(&["close", "reason=quit"]);
}

fn server_only_opcodes_are_refused_after_identify(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, _) = identified(&srv, "sender.of.nonsense");
    for (op, name) in [
        (0x02u8, "Session"),
        (0x09, "Error"),
        (0x0C, "Ack"),
        (0x0E, "WhoEntry"),
    ] {
        c.send(op, b"x");
        assert_eq!(
            c.expect_error(&format!("0x{op:02X}")),
            format!("opcode 0x{op:02X} ({name}) is sent by the server only")
        );
    }
    // A Pong from a shim (an answer to a server Ping) is accepted silently.
    c.send(0x07, b"pong");
    c.sync(b"open");
}

fn unknown_opcodes_are_named(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    c.send(0x42, b"zz");
    assert_eq!(c.expect_error("unknown opcode"), "unknown opcode 0x42");
    c.send(0x0B, b"");
    assert_eq!(c.expect_error("unknown opcode"), "unknown opcode 0x0B");
    c.sync(b"usable");
    c.identify("unknown.ops");
    c.send(0x15, b"data");
    c.expect_error("opcode 0x15 (Terms) is sent by the server only");
    for op in [0x16u8, 0x42, 0x80, 0xFF, 0x0B] {
        c.send(op, b"data");
        assert_eq!(
            c.expect_error("unknown opcode"),
            format!("unknown opcode 0x{op:02X}")
        );
    }
    c.sync(b"still usable");
}

// ---------------------------------------------------------------------------------------
// Timers
// ---------------------------------------------------------------------------------------

fn identify_timeout_closes_a_silent_client(io: &str) {
    let srv = Server::start(io, &["--identify-timeout", "300ms"]);
    let t0 = Instant::now();
    let mut c = srv.tcp();
    assert_eq!(c.expect_error("identify timeout"), "identify timeout");
    c.expect_closed_quietly();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "fired early: {waited:?}"
    );
    srv.wait_log(&["close", "reason=identify timeout"]);
}

fn identify_timeout_closes_a_client_that_only_pings(io: &str) {
    let srv = Server::start(io, &["--identify-timeout", "300ms"]);
    let t0 = Instant::now();
    let mut c = srv.tcp();
    let mut pongs = 0;
    loop {
        assert!(t0.elapsed() < DEADLINE, "still open after {pongs} pongs");
        c.send(0x06, b"alive");
        match c.recv() {
            (0x07, d) => {
                assert_eq!(d, b"alive");
                pongs += 1;
            }
            (0x09, d) => {
                assert_eq!(d, b"identify timeout");
                break;
            }
            (op, d) => panic!("unexpected 0x{op:02X} {d:?}"),
        }
    }
    c.expect_closed_quietly();
    assert!(pongs > 0, "pings were answered until the deadline");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    srv.wait_log(&["close", "reason=identify timeout"]);
}

fn idle_shim_gets_quit_then_close(io: &str) {
    let srv = Server::start(io, &["--idle-timeout", "500ms"]);
    let (mut c, token, u) = bound(&srv, "idle.sleeper");
    let t0 = Instant::now();
    // The reason, then Quit, then the close.
    c.expect_frame(0x09, b"closing: idle timeout: nothing received for 500ms");
    c.expect_frame(0x03, b"");
    c.expect_closed_quietly();
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_session_gone(&srv, "idle.sleeper", "idle timeout", &token, &u);
}

fn pings_keep_a_shim_alive(io: &str) {
    let srv = Server::start(io, &["--idle-timeout", "500ms"]);
    let (mut silent, _) = identified(&srv, "idle.silent");
    let (mut c, _) = identified(&srv, "idle.pinger");
    let t0 = Instant::now();
    // Six pings 150 ms apart: 900 ms in all, well past the 500 ms timeout, but never
    // 500 ms without a frame. (The one place a wait between frames is the point.)
    for i in 0..6u8 {
        std::thread::sleep(Duration::from_millis(150));
        c.sync(&[b'0' + i]);
    }
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // The silent shim on the same server was timed out meanwhile; the pinger was not.
    silent.expect_frame(0x09, b"closing: idle timeout: nothing received for 500ms");
    silent.expect_frame(0x03, b"");
    silent.expect_closed_quietly();
    srv.wait_log(&["close", "identity=idle.silent reason=idle timeout"]);
    assert_eq!(srv.count_log(&["close", "identity=idle.pinger"]), 0);
    c.sync(b"alive");
}

fn partial_frames_count_as_activity(io: &str) {
    let srv = Server::start(io, &["--idle-timeout", "500ms"]);
    let (mut c, _) = identified(&srv, "idle.trickle");
    let t0 = Instant::now();
    // One Ping trickled in a byte every 150 ms: no whole frame for 750 ms, longer than the
    // idle timeout, yet the bytes keep the shim alive.
    for b in b"\x06abc" {
        c.send_raw(&[*b]);
        std::thread::sleep(Duration::from_millis(150));
    }
    c.send_raw(b"\n");
    c.expect_frame(0x07, b"abc");
    assert!(t0.elapsed() >= Duration::from_millis(600));
    assert_eq!(srv.count_log(&["close"]), 0);
}

// ---------------------------------------------------------------------------------------
// Closing, for every reason, removes the session at once
// ---------------------------------------------------------------------------------------

fn quit_closes_cleanly_and_removes_the_session(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, token, u) = bound(&srv, "bye.quitter");
    c.send(0x03, b"");
    // A clean close: end of file (not a reset) with no frame before it.
    let mut b = [0u8; 64];
    assert_eq!(c.s.read(&mut b).expect("a clean end of file"), 0);
    assert_session_gone(&srv, "bye.quitter", "quit", &token, &u);
}

fn quit_writes_out_what_was_queued_first(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, _) = identified(&srv, "bye.flusher");
    // Pings and a Quit in one write, and a Ping after the Quit: the Pongs queued before
    // the Quit are written out, then the connection ends; nothing after Quit is handled.
    c.send_raw(b"\x06one\n\x06two\n\x03\n\x06three\n");
    c.expect_frame(0x07, b"one");
    c.expect_frame(0x07, b"two");
    c.expect_closed_quietly();
    srv.wait_log(&["close", "identity=bye.flusher reason=quit"]);
}

fn eof_removes_the_session(io: &str) {
    let srv = Server::start(io, &[]);
    let (c, token, u) = bound(&srv, "bye.eof");
    drop(c);
    assert_session_gone(&srv, "bye.eof", "eof", &token, &u);
}

fn oversized_close_removes_the_session(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, token, u) = bound(&srv, "bye.oversized");
    c.send_raw(&ping_of_len(16 * 1024 + 1));
    c.expect_error("frame longer than");
    c.expect_closed_quietly();
    assert_session_gone(&srv, "bye.oversized", "oversized frame", &token, &u);
}

// ---------------------------------------------------------------------------------------
// UDP
// ---------------------------------------------------------------------------------------

fn udp_bind_gets_no_reply_and_ping_pongs(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, token) = identified(&srv, "udp.binder");
    let u = srv.udp();
    u.bind(&token);
    // Binding again from the same source changes nothing and is not answered either.
    u.bind(&token);
    // The first datagram back is the Pong: the binds got no reply.
    u.sync(b"first");
    u.sync(b"\x0bsecond\x0b");
    u.sync(b"");
    let src = u.s.local_addr().unwrap();
    srv.wait_log(&["INFO bind ", "identity=udp.binder", &format!("src={src}")]);
    assert_eq!(srv.count_log(&["INFO bind ", "identity=udp.binder"]), 1);
    // Nothing reached the TCP side either.
    c.sync(b"tcp");
}

/// A plain bind from an address another live session holds moves the address (a client
/// reusing a port on a LAN), and says so: a warning, and a count.
fn udp_address_taken_from_a_live_session_is_a_warning(io: &str) {
    let srv = Server::start(io, &["--admin", "127.0.0.1:0"]);
    let (_a, _, u) = bound(&srv, "udp.holder");
    let (_b, token) = identified(&srv, "udp.taker");
    u.bind(&token);
    u.sync(b"taken");
    let src = u.s.local_addr().unwrap();
    srv.wait_log(&[
        "WARN",
        "took an address from another live session",
        "identity=udp.taker",
        &format!("src={src}"),
    ]);
    srv.wait_metric("velium_udp_address_taken_total", |v| v == 1.0);
}

fn udp_rebind_moves_the_binding(io: &str) {
    let srv = Server::start(io, &[]);
    let (_c, token, old) = bound(&srv, "udp.mover");
    let new = srv.udp();
    new.bind(&token);
    new.sync(b"new source");
    let (from, to) = (old.s.local_addr().unwrap(), new.s.local_addr().unwrap());
    srv.wait_log(&[
        "rebind",
        "identity=udp.mover",
        &format!("from={from}"),
        &format!("to={to}"),
    ]);
    old.send(0x06, b"old source");
    assert_eq!(old.recv(), QUIT);
    new.sync(b"still new");
    // Moving back works the same way.
    old.bind(&token);
    old.sync(b"back");
    new.send(0x06, b"left behind");
    assert_eq!(new.recv(), QUIT);
}

fn udp_unknown_token_gets_quit(io: &str) {
    let srv = Server::start(io, &[]);
    let (_c, token) = identified(&srv, "udp.real");
    let mut fake = token;
    fake[0] ^= 0x01;
    fake[15] ^= 0x80;
    let u = srv.udp();
    u.bind(&fake);
    assert_eq!(u.recv(), QUIT);
    // Tokens of the wrong length.
    let v = srv.udp();
    v.send(0x02, &token[..15]);
    assert_eq!(v.recv(), QUIT);
    let w = srv.udp();
    let mut long = token.to_vec();
    long.push(b'x');
    w.send(0x02, &long);
    assert_eq!(w.recv(), QUIT);
    // None of them bound: the unknown-token source still gets Quit to a Ping, and the
    // real token still binds.
    u.send(0x06, b"bound?");
    assert_eq!(u.recv(), QUIT);
    let ok = srv.udp();
    ok.bind_confirmed(&token);
}

fn udp_unbound_source_gets_only_quit(io: &str) {
    let srv = Server::start(io, &["--udp-quit-per-sec", "1000"]);
    let (_c, token) = identified(&srv, "udp.someone");
    let u = srv.udp();
    let datagrams: &[&[u8]] = &[
        b"\x06ping\n",
        b"\x06\n",
        b"\x07pong\n",
        b"\x03\n",
        b"\x00\n",
        b"\x01udp.someone\n",
        b"\x04udp.someone /say hi\n",
        b"\x05123 done\n",
        b"\x08udp.someone hi\n",
        b"\x09error\n",
        b"\x0C0 1\n",
        b"\x0D\n",
        b"\x0Eudp.x 0 -\n",
        b"\x42zz\n",
    ];
    for d in datagrams {
        u.send_raw(d);
        assert_eq!(u.recv(), QUIT, "reply to {d:?}");
    }
    // Only Quit, never anything else: once bound, the next datagram is the Pong.
    u.bind(&token);
    u.sync(b"now bound");
}

fn udp_short_datagrams_get_no_reply(io: &str) {
    let srv = Server::start(io, &["--udp-quit-per-sec", "1000"]);
    let (_c, token) = identified(&srv, "udp.short");
    let u = srv.udp();
    // A Quit is 2 bytes: never sent in answer to fewer.
    for d in [&b""[..], b"\x06", b"\n", b"\x03", b"\x00", b"\x02"] {
        u.send_raw(d);
    }
    // Had any of them been answered, that Quit would arrive before this Pong.
    u.bind(&token);
    u.sync(b"no quit before me");
    // From a bound source, one byte is a whole frame (a datagram needs no 0x0A): a Ping.
    u.send_raw(b"\x06");
    u.expect_frame(0x07, b"");
    u.send_raw(b"\n");
    u.sync(b"bound");
}

fn udp_quits_are_rate_limited_per_source(io: &str) {
    let srv = Server::start(io, &["--udp-quit-per-sec", "3"]);
    let (_c, token) = identified(&srv, "udp.limited");
    let u = srv.udp();
    for i in 0..20u8 {
        u.send(0x06, &[b'a' + i]);
    }
    // Count the Quits that arrive before the Pong that follows a bind (no timeout needed).
    u.bind(&token);
    u.send(0x06, b"done");
    let mut quits = 0;
    loop {
        let d = u.recv();
        if d == frame(0x07, b"done") {
            break;
        }
        assert_eq!(d, QUIT);
        quits += 1;
    }
    assert!(
        (3..=4).contains(&quits),
        "{quits} Quits for 20 bad datagrams"
    );
    // The bucket is per source: another source still gets its Quit.
    let v = srv.udp();
    v.send(0x06, b"other");
    assert_eq!(v.recv(), QUIT);
}

fn udp_malformed_datagrams(io: &str) {
    let srv = Server::start(io, &["--udp-quit-per-sec", "1000"]);
    let (_c, token) = identified(&srv, "udp.malformed");
    let unbound = srv.udp();
    let oversized = ping_of_len(16 * 1024 + 1);
    let malformed: Vec<Vec<u8>> = vec![
        b"\x06a\n\x06b\n".to_vec(),
        b"\x06a\nb".to_vec(),
        b"\n\n".to_vec(),
        b"\n\x06x\n".to_vec(),
        oversized.clone(),
        [&b"\x02"[..], &token, b"\n\x06x\n"].concat(),
    ];
    for d in &malformed {
        unbound.send_raw(d);
        assert_eq!(unbound.recv(), QUIT, "reply to {:?}", &d[..d.len().min(20)]);
    }
    // The bind hidden in a two-frame datagram did not bind.
    unbound.send(0x06, b"bound?");
    assert_eq!(unbound.recv(), QUIT);
    // From a bound source, malformed datagrams are dropped and the binding stays.
    let u = srv.udp();
    u.bind_confirmed(&token);
    for d in &malformed {
        u.send_raw(d);
    }
    u.sync(b"binding kept");
    // A datagram is its own frame: the trailing 0x0A may be left out.
    u.send_raw(b"\x06no newline");
    u.expect_frame(0x07, b"no newline");
    // The frame length limit holds for datagrams: max is answered, max+1 is dropped.
    let max = ping_of_len(16 * 1024);
    u.send_raw(&max);
    let pong = u.recv();
    assert_eq!((pong.len(), pong[0]), (16 * 1024, 0x07));
    u.send_raw(&oversized);
    u.sync(b"after oversized");
}

fn udp_from_a_bound_address_per_opcode(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, token, u) = bound(&srv, "udp.table");
    // None, Pong and Quit are ignored; Quit over UDP does not end the session.
    u.send(0x00, b"");
    u.send(0x07, b"pong");
    u.send(0x03, b"");
    u.sync(b"ignored");
    c.sync(b"tcp still up");
    // Identify, Error, Ack and WhoEntry are refused over UDP, with the reason over UDP.
    for (op, name) in [
        (0x01u8, "Identify"),
        (0x09, "Error"),
        (0x0C, "Ack"),
        (0x0E, "WhoEntry"),
    ] {
        u.send(op, b"x");
        u.expect_frame(
            0x09,
            format!("opcode 0x{op:02X} ({name}) is not accepted over UDP").as_bytes(),
        );
    }
    u.send(0x0D, b"");
    u.expect_frame(0x09, b"Who is answered over TCP only");
    u.send(0x42, b"zz");
    u.expect_frame(0x09, b"unknown opcode 0x42");
    u.send(0x0B, b"");
    u.expect_frame(0x09, b"unknown opcode 0x0B");
    // The Identify over UDP did not rename the shim.
    assert_eq!(srv.count_log(&["rename"]), 0);
    // A repeated bind from the same address is harmless and silent.
    u.bind(&token);
    u.sync(b"rebound in place");
    // None of this reached the TCP side.
    c.sync(b"tcp quiet");
    assert_eq!(srv.count_log(&["close"]), 0);
}

fn udp_traffic_keeps_a_shim_alive(io: &str) {
    let srv = Server::start(io, &["--idle-timeout", "500ms"]);
    let (mut c, _, u) = bound(&srv, "idle.udp");
    // Only UDP Pings, 150 ms apart, for 900 ms: the TCP side stays up.
    for i in 0..6u8 {
        std::thread::sleep(Duration::from_millis(150));
        u.sync(&[b'0' + i]);
    }
    assert_eq!(srv.count_log(&["close"]), 0);
    c.sync(b"alive");
}

fn udp_address_bound_by_another_session_moves(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut a, _, u) = bound(&srv, "udp.first");
    let (_b, tb) = identified(&srv, "udp.second");
    // The second session binds from the first one's address: the address is now its.
    u.bind(&tb);
    u.sync(b"taken");
    a.send(0x0D, b"udp.*");
    let mut entries: Vec<String> = (0..2)
        .map(|_| String::from_utf8(a.expect(0x0E)).unwrap())
        .collect();
    a.expect_frame(0x0C, b"0 2");
    entries.sort();
    assert!(entries[0].starts_with("udp.first ") && entries[0].ends_with(" -"));
    assert!(entries[1].starts_with("udp.second ") && entries[1].ends_with(" udp"));
    // Closing the first session leaves the second one's binding alone.
    drop(a);
    srv.wait_log(&["close", "identity=udp.first reason=eof"]);
    u.sync(b"still the second's");
}

fn udp_and_tcp_of_50_shims_across_cores(io: &str) {
    let srv = Server::start(io, &[]);
    let mut shims: Vec<(Tcp, Udp)> = (0..50).map(|_| (srv.tcp(), srv.udp())).collect();
    for (i, (c, _)) in shims.iter_mut().enumerate() {
        c.send(0x01, format!("cores.shim{i}").as_bytes());
    }
    let tokens: Vec<[u8; 16]> = shims
        .iter_mut()
        .map(|(c, _)| {
            let t = c.expect(0x02).try_into().unwrap();
            c.expect_terms();
            t
        })
        .collect();
    for ((_, u), t) in shims.iter().zip(&tokens) {
        u.bind(t);
    }
    for (i, (c, u)) in shims.iter_mut().enumerate() {
        u.sync(format!("udp{i}").as_bytes());
        c.sync(format!("tcp{i}").as_bytes());
    }
    for i in 0..50 {
        srv.wait_log(&["INFO bind ", &format!("identity=cores.shim{i} ")]);
    }
    // Who sees every one of them with its UDP channel.
    let c = &mut shims[0].0;
    c.send(0x0D, b"cores.*");
    for _ in 0..50 {
        let e = String::from_utf8(c.expect(0x0E)).unwrap();
        assert!(e.ends_with(" udp"), "{e}");
    }
    c.expect_frame(0x0C, b"0 50");
}

// ---------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so the garbage is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A mix of pure noise, frame-shaped noise, routed frames with odd targets, Identify
    /// frames and (rarely) runs too long to be a frame.
    fn garbage(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..200 {
            match self.below(6) {
                0 => {
                    let n = self.below(300) as usize;
                    out.extend(self.bytes(n));
                }
                1 | 2 => {
                    let op = self.below(16) as u8;
                    let n = self.below(80) as usize;
                    let mut d = self.bytes(n);
                    d.retain(|&b| b != 0x0A);
                    out.extend(frame(op, &d));
                }
                3 => {
                    let target = [&b">"[..], b"*", b"+>", b"a.>.b", b"", b"+"];
                    let t = target[self.below(target.len() as u64) as usize];
                    let op = [0x04u8, 0x05, 0x08, 0x0D][self.below(4) as usize];
                    out.extend(frame(op, &[t, b" ", b"noise"].concat()));
                }
                4 => out.extend(frame(0x01, format!("g.{}", self.below(5)).as_bytes())),
                _ => {
                    if self.below(200) == 0 {
                        out.extend(vec![b'z'; 17_000]);
                    }
                }
            }
        }
        // No Quit (0x03): a connection that quits early would skip the rest of its garbage.
        for b in &mut out {
            if *b == 0x03 {
                *b = 0x83;
            }
        }
        out
    }
}

/// Pings and reads until the Pong, skipping routed frames (Echo, Command) on the way.
fn sync_skipping_deliveries(c: &mut Tcp, data: &[u8]) {
    c.send(0x06, data);
    loop {
        match c.recv() {
            (0x07, d) if d == data => return,
            (0x04 | 0x05 | 0x08, _) => {}
            (op, d) => panic!("unexpected 0x{op:02X} {:?}", String::from_utf8_lossy(&d)),
        }
    }
}

fn hostile_input_never_stops_service(io: &str) {
    // The garbage renames its connections among a few names: refused when held, so that
    // which connections survive depends on their garbage alone, not on which of them
    // claimed a name last (replacing a holder is tested in routing.rs and access.rs).
    let mut srv = Server::start(io, &["--duplicate-identity", "refuse"]);
    let (mut watcher, _, wu) = bound(&srv, "hostile.watcher");
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut conns: Vec<Tcp> = (0..8).map(|_| srv.tcp()).collect();
    for round in 0..4 {
        for (i, c) in conns.iter_mut().enumerate() {
            if round == 0 && i % 2 == 0 {
                // Half of them identified first, so their garbage reaches the router.
                c.identify(&format!("hostile.g{i}"));
            }
            let g = rng.garbage();
            // The server may close a connection mid-way (e.g. an oversized frame).
            let _ = c.s.write_all(&g);
        }
        for _ in 0..50 {
            let u = srv.udp();
            let n = rng.below(64) as usize;
            let mut d = rng.bytes(n);
            if rng.below(3) == 0 {
                d = [&b"\x02"[..], &rng.bytes(16), b"\n"].concat();
            }
            u.send_raw(&d);
        }
    }
    // Every connection still open has handled all its garbage: end any unfinished frame,
    // then read (whatever the garbage provoked) up to the Pong, or to the close.
    let mut open = 0;
    for c in &mut conns {
        if c.s.write_all(b"\n\x06end of garbage\n").is_err() {
            continue;
        }
        while let Some((op, d)) = c.try_recv() {
            if op == 0x07 && d == b"end of garbage" {
                open += 1;
                break;
            }
        }
    }
    assert!(open > 0, "some connections survive their garbage");
    // Abrupt closes, mid-frame.
    for c in conns.iter_mut().take(4) {
        let _ = c.s.write_all(b"\x08> half a fra");
    }
    drop(conns);
    // A fresh client completes the whole handshake, and the old one still works.
    let (mut fresh, token) = identified(&srv, "hostile.fresh");
    let u = srv.udp();
    u.bind_confirmed(&token);
    // Garbage still in flight may deliver routed frames to them: skip those.
    sync_skipping_deliveries(&mut fresh, b"fresh");
    sync_skipping_deliveries(&mut watcher, b"watcher");
    wu.sync(b"watcher udp");
    assert!(srv.is_running(), "the server process is still running");
    let lines = srv.log_lines();
    assert!(
        !lines.iter().any(|l| l.contains("panicked")),
        "a panic was logged:\n{}",
        lines.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Configuration and command line
// ---------------------------------------------------------------------------------------

/// Runs the binary with `args` until it exits; returns its status, stdout and stderr.
fn run_cli(args: &[&str]) -> (ExitStatus, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_velium-server"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn velium-server");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(DEADLINE) else {
        // SAFETY: kill(2) on our own child, which has not been reaped (it has not exited).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("velium-server {args:?} did not exit");
    };
    let output = output.expect("wait for velium-server");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts `args` make the server exit non-zero with one stderr line containing `needle`.
fn assert_cli_error(args: &[&str], needle: &str) -> String {
    let (status, out, err) = run_cli(args);
    assert!(!status.success(), "{args:?} exited with {status}");
    assert!(status.code().is_some(), "{args:?} was killed: {status}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line for {args:?}: {err:?}"
    );
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(!out.contains("listening"), "{out:?}");
    lines[0].to_string()
}

/// A TOML file in the temporary directory, removed on drop.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(tag: &str, io: &str, text: &str) -> TempConfig {
        let path = std::env::temp_dir().join(format!(
            "velium-test-{}-{tag}-{io}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Asserts `args` make the server exit with status 2 and the TOML parser's refusal of
/// `path` on stderr: a line naming the file, the parser's place, the line itself with a
/// caret under the spot, then `what`. Returns stderr.
fn assert_cli_toml_error(args: &[&str], path: &str, what: &str) -> String {
    let (status, out, err) = run_cli(args);
    assert_eq!(status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 6, "{err}");
    assert_eq!(lines[0], format!("velium-server: config file {path}:"));
    assert!(lines[1].starts_with("TOML parse error at line "), "{err}");
    assert!(lines[3].contains(" | "), "{err}");
    assert!(lines[4].trim_end().ends_with('^'), "{err}");
    assert!(lines[5].starts_with(what), "{what:?} not in {err}");
    assert!(!out.contains("listening"), "{out:?}");
    err
}

fn cli_rejects_unknown_config_keys(io: &str) {
    let f = TempConfig::new(
        "unknown",
        io,
        "idle_timeout = \"5s\"\nlisten_adress = \"x\"\n",
    );
    let err = assert_cli_toml_error(
        &["--listen", "127.0.0.1:0", "--io", io, "--config", f.path()],
        f.path(),
        "unknown field `listen_adress`",
    );
    assert!(err.contains("\n2 | listen_adress = \"x\"\n"), "{err}");
    let g = TempConfig::new("badtype", io, "cores = \"two\"\n");
    let err = assert_cli_toml_error(
        &["--listen", "127.0.0.1:0", "--io", io, "--config", g.path()],
        g.path(),
        "invalid type: string \"two\"",
    );
    assert!(err.contains("at line 1, column 9\n"), "{err}");
    let h = TempConfig::new("badtoml", io, "max_frame = [1,\n");
    assert_cli_toml_error(
        &["--listen", "127.0.0.1:0", "--io", io, "--config", h.path()],
        h.path(),
        "unclosed array",
    );
    assert_cli_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--io",
            io,
            "--config",
            "/nonexistent/velium.toml",
        ],
        "/nonexistent/velium.toml",
    );
}

fn cli_rejects_bad_listen_addresses(io: &str) {
    for bad in ["nowhere", "127.0.0.1", "127.0.0.1:99999", "300.1.1.1:80"] {
        let line = assert_cli_error(&["--listen", bad, "--io", io], "listen address");
        assert!(line.contains(bad), "{line}");
    }
}

fn cli_rejects_a_port_in_use(io: &str) {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let line = assert_cli_error(&["--listen", &addr, "--io", io], &addr);
    assert!(line.contains("cannot listen"), "{line}");
    drop(tcp);
    // Only the UDP side taken counts as well.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = udp.local_addr().unwrap().to_string();
    assert_cli_error(&["--listen", &addr, "--io", io], &addr);
}

fn cli_rejects_cores_out_of_range(io: &str) {
    for n in ["0", "999"] {
        let line = assert_cli_error(
            &["--listen", "127.0.0.1:0", "--io", io, "--cores", n],
            "cores",
        );
        assert!(line.contains(&format!("got {n}")), "{line}");
    }
}

fn config_file_values_take_effect(io: &str) {
    let f = TempConfig::new(
        "effect",
        io,
        "identify_timeout = \"300ms\"\nmax_frame = 100\n",
    );
    let srv = Server::start(io, &["--config", f.path()]);
    let mut c = srv.tcp();
    c.send_raw(&ping_of_len(100));
    c.expect(0x07);
    c.send_raw(&ping_of_len(101));
    c.expect_error("frame longer than 100 bytes");
    c.expect_closed_quietly();
    // The 300 ms deadline from the file, not the 5 s default.
    let t0 = Instant::now();
    let mut d = srv.tcp();
    d.expect_error("identify timeout");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

fn flags_override_the_config_file(io: &str) {
    let f = TempConfig::new(
        "override",
        io,
        "identify_timeout = \"60s\"\nmax_frame = 100\n",
    );
    let srv = Server::start(
        io,
        &[
            "--config",
            f.path(),
            "--identify-timeout",
            "300ms",
            "--max-frame",
            "200",
        ],
    );
    let mut c = srv.tcp();
    c.send_raw(&ping_of_len(200));
    c.expect(0x07);
    c.send_raw(&ping_of_len(201));
    c.expect_error("frame longer than 200 bytes");
    let t0 = Instant::now();
    let mut d = srv.tcp();
    d.expect_error("identify timeout");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------

fn logs_name_every_session_event(io: &str) {
    let srv = Server::start(io, &[]);
    let (mut c, token) = identified(&srv, "log.first");
    let peer = c.s.local_addr().unwrap();
    srv.wait_log(&["connect", &format!("peer={peer}")]);
    srv.wait_log(&["identify", "identity=log.first"]);
    c.send(0x01, b"log.second");
    c.sync(b"x");
    srv.wait_log(&["rename", "old=log.first", "new=log.second"]);
    let u = srv.udp();
    u.bind_confirmed(&token);
    let a = u.s.local_addr().unwrap();
    srv.wait_log(&["INFO bind ", "identity=log.second", &format!("src={a}")]);
    let v = srv.udp();
    v.bind_confirmed(&token);
    let b = v.s.local_addr().unwrap();
    srv.wait_log(&[
        "rebind",
        "identity=log.second",
        &format!("from={a}"),
        &format!("to={b}"),
    ]);
    c.send(0x03, b"");
    c.expect_closed_quietly();
    srv.wait_log(&["close", "identity=log.second", "reason=quit"]);
    // An unidentified connection's close names the reason too.
    let d = srv.tcp();
    let dpeer = d.s.local_addr().unwrap();
    let connect = srv.wait_log(&["connect", &format!("peer={dpeer}")]);
    let conn = connect
        .split_whitespace()
        .find(|w| w.starts_with("conn="))
        .unwrap()
        .to_string();
    drop(d);
    srv.wait_log(&["close", &format!("{conn} "), "reason=eof"]);
    // Each event was logged once.
    assert_eq!(srv.count_log(&["close", "identity=log.second"]), 1);
    assert_eq!(srv.count_log(&["rename", "new=log.second"]), 1);
}

fn no_line_per_frame_at_info(io: &str) {
    let srv = Server::start_level(io, "info", &[]);
    let (mut c, token) = identified(&srv, "quiet.one");
    let u = srv.udp();
    u.bind_confirmed(&token);
    srv.wait_log(&["INFO bind ", "identity=quiet.one"]);
    let before = srv.log_lines().len();
    for i in 0..100 {
        c.sync(format!("tcp{i}").as_bytes());
        u.sync(format!("udp{i}").as_bytes());
        c.send(0x08, b"+quiet.one hi");
        c.expect_frame(0x08, b"quiet.one hi");
        c.expect_frame(0x0C, b"0 1");
    }
    // Frames that are refused are not logged one by one either.
    for _ in 0..100 {
        c.send(0x42, b"");
        c.expect_error("unknown opcode");
    }
    // A rename is logged after all of them: once its line is in, any line the frames
    // logged would be in too (one log writer, in order).
    c.send(0x01, b"quiet.two");
    c.sync(b"renamed");
    srv.wait_log(&["rename", "new=quiet.two"]);
    let lines = srv.log_lines();
    assert_eq!(
        lines.len(),
        before + 1,
        "only the rename line was added:\n{}",
        lines[before..].join("\n")
    );
    assert!(lines.iter().all(|l| !l.contains("DEBUG")));
}

drivers!(
    handshake_tcp_then_udp,
    none_is_ignored_and_data_bytes_pass_through,
    max_frame_default_boundary,
    max_frame_flag_boundary_and_others_unaffected,
    oversized_without_newline,
    session_token_is_a_frame_safe_uuid_v4,
    tokens_differ_across_200_shims,
    rename_keeps_token_and_gets_no_reply,
    invalid_labels_get_an_error_and_the_connection_stays,
    before_identify_only_identify_ping_quit,
    server_only_opcodes_are_refused_after_identify,
    unknown_opcodes_are_named,
    identify_timeout_closes_a_silent_client,
    identify_timeout_closes_a_client_that_only_pings,
    idle_shim_gets_quit_then_close,
    pings_keep_a_shim_alive,
    partial_frames_count_as_activity,
    quit_closes_cleanly_and_removes_the_session,
    quit_writes_out_what_was_queued_first,
    eof_removes_the_session,
    oversized_close_removes_the_session,
    udp_bind_gets_no_reply_and_ping_pongs,
    udp_rebind_moves_the_binding,
    udp_address_taken_from_a_live_session_is_a_warning,
    udp_unknown_token_gets_quit,
    udp_unbound_source_gets_only_quit,
    udp_short_datagrams_get_no_reply,
    udp_quits_are_rate_limited_per_source,
    udp_malformed_datagrams,
    udp_from_a_bound_address_per_opcode,
    udp_traffic_keeps_a_shim_alive,
    udp_address_bound_by_another_session_moves,
    udp_and_tcp_of_50_shims_across_cores,
    hostile_input_never_stops_service,
    cli_rejects_unknown_config_keys,
    cli_rejects_bad_listen_addresses,
    cli_rejects_a_port_in_use,
    cli_rejects_cores_out_of_range,
    config_file_values_take_effect,
    flags_override_the_config_file,
    logs_name_every_session_event,
    no_line_per_frame_at_info,
);
