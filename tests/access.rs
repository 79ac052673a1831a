//! Who may be whom: every way around the access rules that the hub refuses, over real
//! sockets, on both drivers.
//!
//! - a rename out of the identities the user may take, and Commands, Echoes and Who
//!   decided by the user, never by the name it picked;
//! - a second holder of an identity, under each duplicate-identity policy, in any letter
//!   case, on Identify and on rename;
//! - identity bytes outside the grammar: pattern characters, empty segments, white space,
//!   invisible and look-alike characters;
//! - CommandResponses from shims that were not sent the Command, the answer window, and
//!   ids not written as the hub writes them;
//! - credentials a reload revokes;
//! - Auth with a user's name and secret, and the configuration that replaced command
//!   rules.
//!
//! "Nothing arrived" is proved with a barrier: a Ping on the receiver's connection whose
//! Pong comes next was answered after everything sent to it before.

mod common;
use common::*;
use std::process::Command;

const OPS: &str = "ops-s3cret";
const BOXER: &str = "boxer-s3cret";
const GUEST: &str = "guest-s3cret";

/// The users of the issue: `ops` (the operator tools) may command anyone; `boxer` may be
/// any character and command one; `guest` may be any character on peq, command nobody,
/// echo to one zone, and list two shims.
fn users() -> [User<'static>; 3] {
    [
        User::new("ops", OPS, &["velium.cli.>", "ops.>"], &[">"]),
        User::new("boxer", BOXER, &["peq.*.*"], &["peq.ecommons.mallory"]),
        User {
            echoes: Some(&["peq.ecommons.*"][..]),
            who: Some(&["peq.ecommons.victim", "peq.ecommons.mallory"][..]),
            ..User::new("guest", GUEST, &["peq.>"], &[])
        },
    ]
}

/// A hub with [`users`] (after the settings `toml`) and `flags`, with its admin listener;
/// and its config file.
fn hub(io: &str, toml: &str, flags: &[&str]) -> (Server, TempFile) {
    let cfg = users_config(toml, &users());
    let mut args = vec!["--config", cfg.arg()];
    args.extend_from_slice(flags);
    let srv = Server::with_admin(io, &args);
    (srv, cfg)
}

/// A connection authenticated as `user` and identified as `name`.
fn login(srv: &Server, user: &str, secret: &str, name: &str) -> Tcp {
    let mut c = srv.tcp();
    c.login(user, secret, name);
    c
}

fn refused(reason: &str) -> String {
    format!("velium_refused_total{{reason=\"{reason}\"}}")
}

/// The connection was told why, sent Quit, then closed.
fn assert_replaced(old: &mut Tcp) {
    let got = old.expect_closed();
    assert_eq!(got.len(), 2, "{got:?}");
    let why = String::from_utf8_lossy(&got[0].1);
    assert!(
        got[0].0 == 0x09 && why.starts_with("closing: replaced: a newer connection identified as "),
        "{why}"
    );
    assert_eq!(got[1..], [(0x03, Vec::new())], "Quit, then EOF");
}

/// The connection was sent the Error `text`, then closed.
fn assert_closed_with(c: &mut Tcp, text: &str) {
    let got = c.expect_closed();
    assert_eq!(
        got,
        vec![(0x09, text.as_bytes().to_vec())],
        "{:?}",
        got.iter()
            .map(|(op, d)| (op, String::from_utf8_lossy(d)))
            .collect::<Vec<_>>()
    );
}

/// A Command from `tx` to `name` reaches exactly one shim, `to`.
fn reaches_only(tx: &mut Tcp, name: &str, to: &mut Tcp) {
    tx.send(0x04, format!("{name} /where").as_bytes());
    let (id, n) = expect_ack(tx);
    assert_eq!(n, 1, "{name} reaches one shim");
    let (_, got, cmd) = expect_command(to);
    assert_eq!((got, cmd), (id, b"/where".to_vec()));
}

// ---------------------------------------------------------------------------------------
// The user decides: identities, Commands, Echoes, Who
// ---------------------------------------------------------------------------------------

fn the_user_decides_names_commands_echoes_and_who(io: &str) {
    let (srv, _cfg) = hub(io, "", &[]);
    let mut victim = login(&srv, "guest", GUEST, "peq.ecommons.victim");
    let mut mallory = login(&srv, "guest", GUEST, "peq.ecommons.mallory");
    let mut boxer = login(&srv, "boxer", BOXER, "peq.ecommons.boxer");
    // The rename from the issue: into the operator tool's identities. Refused; the old
    // name is kept.
    boxer.send(0x01, b"velium.cli.1");
    assert_eq!(
        boxer.expect_error("identity"),
        "identity not permitted: velium.cli.1"
    );
    // Then its Command to the victim, which only an operator may send.
    boxer.send(0x04, b"peq.ecommons.victim /give all");
    assert_eq!(
        boxer.expect_error("permitted"),
        "command not permitted: peq.ecommons.victim"
    );
    // A target that could name more than the user may command is refused, whoever is
    // connected.
    boxer.send(0x04, b"peq.ecommons.* /give all");
    assert_eq!(
        boxer.expect_error("permitted"),
        "command not permitted: peq.ecommons.*"
    );
    // What it may command, in any letter case; it is still named by its own identity.
    boxer.send(0x04, b"PEQ.ECOMMONS.MALLORY /dance");
    let (id, n) = expect_ack(&mut boxer);
    assert_eq!(n, 1);
    assert_eq!(
        expect_command(&mut mallory),
        ("peq.ecommons.boxer".into(), id, b"/dance".to_vec())
    );
    // Echoes: boxer's are its commands by default.
    boxer.send(0x08, b"peq.ecommons.victim psst");
    assert_eq!(
        boxer.expect_error("permitted"),
        "echo not permitted: peq.ecommons.victim"
    );
    boxer.send(0x08, b"peq.ecommons.mallory psst");
    boxer.expect_frame(0x0C, b"0 1");
    mallory.expect_frame(0x08, b"peq.ecommons.boxer psst");
    victim.sync(b"nothing reached the victim");
    // guest echoes to its zone and commands nobody; permission comes before matching.
    victim.send(0x08, b"peq.ecommons.* hello");
    victim.expect_frame(0x0C, b"0 2");
    mallory.expect_frame(0x08, b"peq.ecommons.victim hello");
    boxer.expect_frame(0x08, b"peq.ecommons.victim hello");
    victim.send(0x04, b"peq.ecommons.mallory /sit");
    assert_eq!(
        victim.expect_error("permitted"),
        "command not permitted: peq.ecommons.mallory"
    );
    victim.send(0x08, b"peq.nobody.here hi");
    assert_eq!(
        victim.expect_error("permitted"),
        "echo not permitted: peq.nobody.here"
    );
    // The operator may: its user decides, not the name boxer tried.
    let mut ops = login(&srv, "ops", OPS, "velium.cli.1");
    ops.send(0x04, b"peq.ecommons.victim /give all");
    let (id, n) = expect_ack(&mut ops);
    assert_eq!(n, 1);
    assert_eq!(
        expect_command(&mut victim),
        ("velium.cli.1".into(), id.clone(), b"/give all".to_vec())
    );
    victim.send(0x05, format!("{id} given").as_bytes());
    ops.expect_frame(0x05, format!("{id} peq.ecommons.victim given").as_bytes());
    // A first Identify out of the user's identities: refused, and the connection stays,
    // unidentified, free to take a name it may.
    let mut late = srv.tcp();
    late.send(0x0F, format!("boxer {BOXER}").as_bytes());
    late.send(0x01, b"ops.one");
    assert_eq!(
        late.expect_error("identity"),
        "identity not permitted: ops.one"
    );
    late.send(0x08, b"peq.ecommons.mallory hi");
    late.expect_error("identify first");
    late.identify("peq.z.late");
    // Who lists what the user may see: ops everything, boxer its commands and identities
    // (by default), guest its own two.
    let all = [
        "peq.ecommons.boxer",
        "peq.ecommons.mallory",
        "peq.ecommons.victim",
        "peq.z.late",
        "velium.cli.1",
    ];
    assert_eq!(who(&mut ops, "").keys().collect::<Vec<_>>(), all);
    assert_eq!(who(&mut boxer, "").keys().collect::<Vec<_>>(), all[..4]);
    assert_eq!(who(&mut boxer, "velium.>").len(), 0);
    let two = ["peq.ecommons.mallory", "peq.ecommons.victim"];
    assert_eq!(who(&mut victim, "").keys().collect::<Vec<_>>(), two);
    assert_eq!(
        who(&mut victim, "PEQ.ECOMMONS.*")
            .keys()
            .collect::<Vec<_>>(),
        two
    );
    assert_eq!(who(&mut victim, "peq.z.late").len(), 0);
    srv.wait_metric(&refused("identity"), |v| v == 2.0);
    srv.wait_metric(&refused("permission"), |v| v == 5.0);
    for c in [&mut mallory, &mut boxer, &mut late, &mut ops] {
        c.sync(b"nothing else");
    }
}

// ---------------------------------------------------------------------------------------
// A second holder of an identity
// ---------------------------------------------------------------------------------------

/// The default, same-credential: the same user replaces the holder, another is refused.
fn a_second_holder_under_same_credential(io: &str) {
    let (srv, _cfg) = hub(io, "", &[]);
    let mut ops = login(&srv, "ops", OPS, "ops.tx");
    let mut bob = login(&srv, "boxer", BOXER, "peq.z.bob");
    // Another user: refused on Identify (the connection stays, unidentified)...
    let mut gus = srv.tcp();
    gus.send(0x0F, format!("guest {GUEST}").as_bytes());
    gus.send(0x01, b"PEQ.Z.BOB");
    assert_eq!(gus.expect_error("in use"), "identity in use");
    gus.send(0x08, b"peq.z.bob hi");
    gus.expect_error("identify first");
    gus.identify("peq.z.gus");
    // ...and on rename (the old name is kept); the holder is untouched.
    gus.send(0x01, b"peq.z.Bob");
    assert_eq!(gus.expect_error("in use"), "identity in use");
    reaches_only(&mut ops, "peq.z.gus", &mut gus);
    reaches_only(&mut ops, "peq.z.bob", &mut bob);
    // The same user replaces the holder on Identify, in any letter case...
    let mut bob2 = login(&srv, "boxer", BOXER, "Peq.Z.Bob");
    assert_replaced(&mut bob);
    reaches_only(&mut ops, "peq.z.bob", &mut bob2);
    // ...and on rename.
    let mut bob3 = login(&srv, "boxer", BOXER, "peq.z.robert");
    bob3.send(0x01, b"PEQ.z.bob");
    bob3.sync(b"renamed");
    assert_replaced(&mut bob2);
    reaches_only(&mut ops, "peq.z.bob", &mut bob3);
    // Renaming to one's own identity in another case takes nothing from anybody.
    bob3.send(0x01, b"peq.Z.BOB");
    bob3.sync(b"renamed again");
    assert_eq!(
        who(&mut ops, "peq.z.*").keys().collect::<Vec<_>>(),
        ["peq.Z.BOB", "peq.z.gus"]
    );
    srv.wait_metric("velium_identities_replaced_total", |v| v == 2.0);
    srv.wait_metric(&refused("identity_in_use"), |v| v == 2.0);
    srv.wait_log(&[
        "close",
        "identity=peq.z.bob reason=replaced by a newer connection with the same identity",
    ]);
    gus.sync(b"gus");
    bob3.sync(b"bob");
}

/// `--duplicate-identity refuse`: even the same user is refused.
fn a_second_holder_under_refuse(io: &str) {
    let (srv, _cfg) = hub(io, "", &["--duplicate-identity", "refuse"]);
    let mut ops = login(&srv, "ops", OPS, "ops.tx");
    let mut bob = login(&srv, "boxer", BOXER, "peq.z.bob");
    let mut bob2 = srv.tcp();
    bob2.send(0x0F, format!("boxer {BOXER}").as_bytes());
    bob2.send(0x01, b"PEQ.Z.BOB");
    assert_eq!(bob2.expect_error("in use"), "identity in use");
    bob2.identify("peq.z.bob2");
    bob2.send(0x01, b"peq.z.BOB");
    assert_eq!(bob2.expect_error("in use"), "identity in use");
    reaches_only(&mut ops, "peq.z.bob", &mut bob);
    reaches_only(&mut ops, "peq.z.bob2", &mut bob2);
    // The holder itself may change its letter case.
    bob.send(0x01, b"PEQ.Z.BOB");
    bob.sync(b"renamed");
    assert_eq!(
        who(&mut ops, "peq.z.*").keys().collect::<Vec<_>>(),
        ["PEQ.Z.BOB", "peq.z.bob2"]
    );
    srv.wait_metric(&refused("identity_in_use"), |v| v == 2.0);
    assert_eq!(srv.metric("velium_identities_replaced_total"), 0.0);
    bob.sync(b"bob");
    bob2.sync(b"bob2");
}

/// `duplicate_identity = "replace"` (the TOML key): even another user replaces the
/// holder.
fn a_second_holder_under_replace(io: &str) {
    let (srv, _cfg) = hub(io, "duplicate_identity = \"replace\"\n", &[]);
    let mut ops = login(&srv, "ops", OPS, "ops.tx");
    let mut bob = login(&srv, "boxer", BOXER, "peq.z.bob");
    let mut gus = login(&srv, "guest", GUEST, "PEQ.Z.BOB");
    assert_replaced(&mut bob);
    reaches_only(&mut ops, "peq.z.bob", &mut gus);
    let mut carol = login(&srv, "boxer", BOXER, "peq.z.carol");
    carol.send(0x01, b"peq.z.bob");
    carol.sync(b"renamed");
    assert_replaced(&mut gus);
    reaches_only(&mut ops, "peq.z.bob", &mut carol);
    assert_eq!(
        who(&mut ops, "peq.>").keys().collect::<Vec<_>>(),
        ["peq.z.bob"]
    );
    srv.wait_metric("velium_identities_replaced_total", |v| v == 2.0);
    assert_eq!(srv.metric(&refused("identity_in_use")), 0.0);
    carol.sync(b"carol");
}

// ---------------------------------------------------------------------------------------
// The identity grammar
// ---------------------------------------------------------------------------------------

fn forbidden_identity_bytes_and_look_alikes(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let mut tx = shim(&srv, "peq.z.tx");
    let mut bob = shim(&srv, "peq.z.bob");
    let only = "only ASCII letters, digits, '_', '-' and '.' are allowed";
    let byte =
        |b: &str, at: usize, shown: &str| format!("identity byte 0x{b}{shown} at {at}: {only}");
    let cases: Vec<(&str, String)> = vec![
        ("*", byte("2A", 0, " '*'")),
        ("peq.z.>", byte("3E", 6, " '>'")),
        ("+bob", byte("2B", 0, " '+'")),
        ("peq.*.bob", byte("2A", 4, " '*'")),
        ("a..b", empty_segment_error(2)),
        (".a", empty_segment_error(0)),
        ("a.", empty_segment_error(2)),
        ("peq.z.bob ", byte("20", 9, "")),
        ("peq z", byte("20", 3, "")),
        // Hangul filler, Hangul choseong filler, halfwidth Hangul filler, Arabic letter
        // mark, Braille blank: invisible; Cyrillic о: "bob" to the eye.
        ("peq.z.bob\u{3164}", byte("E3", 9, "")),
        ("\u{115F}peq.z.bob", byte("E1", 0, "")),
        ("peq.z.\u{FFA0}", byte("EF", 6, "")),
        ("peq.z.bob\u{061C}", byte("D8", 9, "")),
        ("peq.\u{2800}.bob", byte("E2", 4, "")),
        ("peq.z.b\u{043E}b", byte("D0", 7, "")),
    ];
    assert_eq!(cases[0].1, identity_byte_error(b'*', 0));
    // On the first Identify: each refused, the connection stays, unidentified.
    let mut c = srv.tcp();
    for (label, why) in &cases {
        c.send(0x01, label.as_bytes());
        assert_eq!(&c.expect_error("identity"), why, "{label:?}");
    }
    c.send(0x08, b"peq.z.bob hi");
    c.expect_error("identify first");
    c.identify("peq.z.eve");
    // On rename: each refused, the name kept.
    for (label, why) in &cases {
        c.send(0x01, label.as_bytes());
        assert_eq!(&c.expect_error("identity"), why, "rename to {label:?}");
    }
    reaches_only(&mut tx, "peq.z.eve", &mut c);
    assert_eq!(
        who(&mut tx, "peq.z.*").keys().collect::<Vec<_>>(),
        ["peq.z.bob", "peq.z.eve", "peq.z.tx"]
    );
    srv.wait_metric(r#"velium_errors_total{kind="bad_identity"}"#, |v| {
        v == 2.0 * cases.len() as f64
    });
    bob.sync(b"nothing reached bob");
}

// ---------------------------------------------------------------------------------------
// Answers only from targets
// ---------------------------------------------------------------------------------------

fn forged_responses_are_refused(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let (mut ctl, uctl) = bound_shim(&srv, "peq.z.ctl");
    let mut bob = shim(&srv, "peq.z.bob");
    let (mut eve, ueve) = bound_shim(&srv, "peq.z.eve");
    ctl.send(0x04, b"peq.z.bob /loc");
    let (id, n) = expect_ack(&mut ctl);
    assert_eq!(n, 1);
    assert_eq!(expect_command(&mut bob).1, id);
    // A shim that was never sent the Command answers it over TCP...
    eve.send(0x05, format!("{id} forged").as_bytes());
    assert_eq!(eve.expect_error("refused"), not_answerable(&id, 256));
    ctl.sync(b"nothing forwarded over tcp");
    // ...and over UDP: refused over UDP.
    ueve.send(0x05, format!("{id} forged over udp").as_bytes());
    ueve.expect_frame(0x09, not_answerable(&id, 256).as_bytes());
    uctl.sync(b"nothing forwarded over udp");
    ctl.sync(b"nor over tcp");
    // The target's own answer is forwarded.
    bob.send(0x05, format!("{id} here").as_bytes());
    ctl.expect_frame(0x05, format!("{id} peq.z.bob here").as_bytes());
    // Taking the target's name (here it replaces the target) does not take its Commands.
    ctl.send(0x04, b"peq.z.bob /loc again");
    let (id2, _) = expect_ack(&mut ctl);
    assert_eq!(expect_command(&mut bob).1, id2);
    eve.send(0x01, b"peq.z.bob");
    eve.sync(b"renamed");
    assert_replaced(&mut bob);
    eve.send(0x05, format!("{id2} it is me").as_bytes());
    assert_eq!(eve.expect_error("refused"), not_answerable(&id2, 256));
    ctl.sync(b"still nothing");
    srv.wait_metric(&refused("answer"), |v| v == 3.0);
    // A refused answer is not a refused request: the forger's requests still get theirs.
    eve.send(0x08, b"peq.z.ctl hi");
    eve.expect_frame(0x0C, b"0 1");
    ctl.expect_frame(0x08, b"peq.z.bob hi");
}

/// `--answer-window 2`: of three Commands to a target, it may answer the last two.
fn the_answer_window_holds_the_last_commands(io: &str) {
    let srv = Server::with_admin(io, &["--answer-window", "2"]);
    let mut ctl = shim(&srv, "peq.z.ctl");
    let mut bob = shim(&srv, "peq.z.bob");
    let mut ids = Vec::new();
    for k in 0..3 {
        ctl.send(0x04, format!("peq.z.bob /c{k}").as_bytes());
        let (id, _) = expect_ack(&mut ctl);
        assert_eq!(
            expect_command(&mut bob),
            (
                "peq.z.ctl".into(),
                id.clone(),
                format!("/c{k}").into_bytes()
            )
        );
        ids.push(id);
    }
    let answers: Vec<u8> = ids
        .iter()
        .flat_map(|id| frame(0x05, format!("{id} done").as_bytes()))
        .collect();
    bob.send_raw(&answers);
    assert_eq!(bob.expect_error("refused"), not_answerable(&ids[0], 2));
    bob.sync(b"answered");
    for id in &ids[1..] {
        ctl.expect_frame(0x05, format!("{id} peq.z.bob done").as_bytes());
    }
    // Several answers to one Command are all forwarded.
    bob.send(0x05, format!("{} more", ids[2]).as_bytes());
    ctl.expect_frame(0x05, format!("{} peq.z.bob more", ids[2]).as_bytes());
    ctl.sync(b"nothing else");
    srv.wait_metric(&refused("answer"), |v| v == 1.0);
}

fn response_ids_must_be_canonical(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let mut ctl = shim(&srv, "peq.z.ctl");
    let mut bob = shim(&srv, "peq.z.bob");
    ctl.send(0x04, b"peq.z.bob /loc");
    let (id, _) = expect_ack(&mut ctl);
    assert_eq!(expect_command(&mut bob).1, id);
    let bad: Vec<String> = vec![
        "+1048576 x".into(),
        "0001048576 x".into(),
        " 1".into(),
        "18446744073709551616 x".into(),
        "abc".into(),
        // The Command's own id, spelled otherwise.
        format!("+{id} x"),
        format!("0{id} x"),
        format!(" {id} x"),
    ];
    // In one write: one Error per frame, in order; then the canonical answer goes through.
    let mut wire: Vec<u8> = bad.iter().flat_map(|d| frame(0x05, d.as_bytes())).collect();
    wire.extend(frame(0x05, format!("{id} ok").as_bytes()));
    bob.send_raw(&wire);
    for d in &bad {
        assert_eq!(text(&bob.expect(0x09)), NON_CANONICAL_ID, "{d:?}");
    }
    bob.sync(b"after");
    ctl.expect_frame(0x05, format!("{id} peq.z.bob ok").as_bytes());
    ctl.sync(b"only the canonical answer");
    srv.wait_metric(r#"velium_errors_total{kind="malformed"}"#, |v| {
        v == bad.len() as f64
    });
}

// ---------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------

fn a_reload_revokes_what_no_longer_holds(io: &str) {
    let (srv, cfg) = hub(io, "", &[]);
    let [ops, _boxer, guest] = users();
    let mut bob = login(&srv, "boxer", BOXER, "peq.z.bob");
    let mut gus = login(&srv, "guest", GUEST, "peq.z.gus");
    let mut ops1 = login(&srv, "ops", OPS, "ops.one");
    let mut ops2 = login(&srv, "ops", OPS, "velium.cli.7");
    // The user removed (POST /reload): its shim is told why, then closed.
    cfg.write(&users_toml(&cfg, "", &[ops, guest]));
    let (status, body) = srv.post("/reload");
    assert_eq!(
        (status, body.as_str()),
        (200, "reloaded; applied: users; need a restart: none\n")
    );
    assert_closed_with(&mut bob, "credentials revoked: user removed");
    srv.wait_log(&[
        "close",
        "identity=peq.z.bob reason=credentials revoked: user removed",
    ]);
    // The others stay, and are served.
    reaches_only(&mut ops1, "peq.z.gus", &mut gus);
    // The removed user can no longer authenticate.
    let mut again = srv.tcp();
    again.send(0x0F, format!("boxer {BOXER}").as_bytes());
    assert_closed_with(&mut again, "authentication failed");
    // A secret changed (SIGHUP).
    let changed = User {
        secret: "guest-n3w",
        ..guest
    };
    cfg.write(&users_toml(&cfg, "", &[ops, changed]));
    srv.signal(libc::SIGHUP);
    assert_closed_with(&mut gus, "credentials revoked: secret changed");
    // Identities narrowed: the shim no longer permitted its name goes, the other stays.
    let narrowed = User::new("ops", OPS, &["velium.cli.>"], &[">"]);
    cfg.write(&users_toml(&cfg, "", &[narrowed, changed]));
    assert_eq!(srv.post("/reload").0, 200);
    assert_closed_with(
        &mut ops1,
        "credentials revoked: identity no longer permitted",
    );
    let mut gus2 = login(&srv, "guest", "guest-n3w", "peq.z.gus");
    reaches_only(&mut ops2, "peq.z.gus", &mut gus2);
    srv.wait_metric(&refused("revoked"), |v| v == 3.0);
    // Users added to an open hub: a shim without credentials goes.
    let open = TempFile::new("open.toml", "");
    let srv = Server::with_admin(io, &["--config", open.arg()]);
    let mut plain = shim(&srv, "peq.z.plain");
    open.write(&users_toml(&open, "", &users()));
    assert_eq!(srv.post("/reload").0, 200);
    assert_closed_with(&mut plain, "credentials revoked: credentials now required");
    srv.wait_metric(&refused("revoked"), |v| v == 1.0);
    login(&srv, "boxer", BOXER, "peq.z.plain").sync(b"with credentials");
}

// ---------------------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------------------

fn auth_names_a_user_and_its_secret(io: &str) {
    let (srv, _cfg) = hub(io, "", &[]);
    // `0F "ops ops-s3cret" 0A`, then Identify.
    let mut good = srv.tcp();
    good.send_raw(b"\x0fops ops-s3cret\n");
    good.identify("ops.good");
    for auth in [
        format!("ops {BOXER}"),
        format!("nobody {OPS}"),
        OPS.to_string(),
        "ops".to_string(),
        format!("ops {OPS} "),
    ] {
        let mut c = srv.tcp();
        c.send(0x0F, auth.as_bytes());
        assert_closed_with(&mut c, "authentication failed");
    }
    let mut none = srv.tcp();
    none.send(0x01, b"ops.none");
    assert_closed_with(&mut none, "authentication required");
    srv.wait_metric(&refused("auth"), |v| v == 6.0);
    // After the first Identify, a valid Auth changes nothing: the session keeps its user.
    let mut b = login(&srv, "boxer", BOXER, "peq.z.b");
    b.send(0x0F, format!("ops {OPS}").as_bytes());
    b.send(0x01, b"ops.b");
    assert_eq!(b.expect_error("identity"), "identity not permitted: ops.b");
    b.send(0x04, b"ops.good /x");
    assert_eq!(
        b.expect_error("permitted"),
        "command not permitted: ops.good"
    );
    // A wrong one closes it.
    b.send(0x0F, b"boxer wrong");
    assert_closed_with(&mut b, "authentication failed");
    good.sync(b"unaffected");
}

#[test]
fn check_config_refuses_command_rules_and_a_shared_secret_with_users() {
    let check = |cfg: &TempFile| {
        let out = Command::new(env!("CARGO_BIN_EXE_velium-server"))
            .args(["--check-config", cfg.arg()])
            .env_remove("VELIUM_SECRET")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let cfg = TempFile::new(
        "rules.toml",
        "[[command_rule]]\nfrom = \"ops.>\"\nto = [\">\"]\n",
    );
    let (code, out, err) = check(&cfg);
    assert_eq!(code, Some(2), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("[[command_rule]]") && err.contains("[[user]]"),
        "{err}"
    );
    let shared = cfg.sibling("shared.secret", "hunter2\n");
    let [ops, ..] = users();
    cfg.write(&format!(
        "secret_file = {shared:?}\n{}",
        users_toml(&cfg, "", &[ops])
    ));
    let (code, _, err) = check(&cfg);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("[[user]]"), "{err}");
    cfg.write(&users_toml(&cfg, "answer_window = 4096\n", &users()));
    let (code, out, err) = check(&cfg);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, format!("{}: ok\n", cfg.arg()));
}

drivers!(
    the_user_decides_names_commands_echoes_and_who,
    a_second_holder_under_same_credential,
    a_second_holder_under_refuse,
    a_second_holder_under_replace,
    forbidden_identity_bytes_and_look_alikes,
    forged_responses_are_refused,
    the_answer_window_holds_the_last_commands,
    response_ids_must_be_canonical,
    a_reload_revokes_what_no_longer_holds,
    auth_names_a_user_and_its_secret,
);
