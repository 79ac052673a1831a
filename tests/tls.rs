//! TLS on the TCP port and sealed UDP, end to end, on both drivers: the client library
//! against a real server with certificates made at test time, and raw sockets for what
//! no honest client sends (plaintext on a TLS-only port, a stalled handshake, forged,
//! replayed, reordered, truncated and altered datagrams).
//!
//! Every wait is on an event (a frame, a datagram, a closed socket, a counter) with the
//! harness's generous deadline; nothing sleeps.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use velium_server::client::{Client, ClientError, ClientOptions, Event, TlsOptions, Transport};
use velium_server::proto::sealed::{Keys, ReplayWindow, header};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(tls: TlsOptions) -> ClientOptions {
    ClientOptions {
        tls: Some(tls),
        keepalive: None,
        ..ClientOptions::default()
    }
}

/// A client over TLS that trusts `pki`'s CA.
async fn tls_client(srv: &Server, pki: &Pki, name: &str) -> Client {
    Client::connect_with(srv.addr, name, options(pki.client_tls()))
        .await
        .unwrap_or_else(|e| panic!("{name} over TLS: {e}"))
}

/// A plaintext client.
async fn plain_client(srv: &Server, name: &str) -> Client {
    let opts = ClientOptions {
        keepalive: None,
        ..ClientOptions::default()
    };
    Client::connect_with(srv.addr, name, opts).await.unwrap()
}

async fn event(c: &Client) -> Event {
    tokio::time::timeout(DEADLINE, c.next_event())
        .await
        .expect("an event in time")
        .expect("the client is open")
}

/// Waits for a Command on `c` and answers it with `answer`; returns how it came.
async fn answer(c: &Client, from: &str, text: &str, answer: &str) -> Transport {
    match event(c).await {
        Event::Command {
            from: f,
            id,
            text: t,
            via,
        } => {
            assert_eq!((&*f, t.as_str()), (from, text));
            match via {
                Transport::Udp => c.respond_udp(id, answer).await.unwrap(),
                Transport::Tcp => c.respond(id, answer).await.unwrap(),
            }
            via
        }
        e => panic!("expected a Command, got {e:?}"),
    }
}

async fn names(c: &Client, pattern: &str) -> Vec<(String, bool)> {
    let mut v: Vec<(String, bool)> = c
        .who(Some(pattern))
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.identity, e.udp))
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// TLS on TCP

/// A whole session over TLS: identify, a Command to another TLS client and its response,
/// a frame larger than a TLS record, Who, Quit.
fn session_over_tls(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &["--max-frame", "100000"]);
    rt().block_on(async {
        let alice = tls_client(&srv, &pki, "tls.a.alice").await;
        let bob = tls_client(&srv, &pki, "tls.a.bob").await;
        assert!(alice.is_tls() && bob.is_tls());
        let sent = alice.command("tls.a.bob", "/sit").await.unwrap();
        assert_eq!(sent.reached, 1);
        assert_eq!(
            answer(&bob, "tls.a.alice", "/sit", "sitting").await,
            Transport::Tcp
        );
        let r = alice.next_response(sent.id, DEADLINE).await.unwrap();
        assert_eq!((&*r.from, r.text.as_str()), ("tls.a.bob", "sitting"));
        // Four records' worth in one frame, each way.
        let big = "x".repeat(60_000);
        assert_eq!(alice.echo("tls.a.bob", &big).await.unwrap(), 1);
        match event(&bob).await {
            Event::Echo { text, .. } => assert!(text == big, "the long Echo arrives whole"),
            e => panic!("expected the Echo, got {e:?}"),
        }
        assert_eq!(
            names(&bob, "tls.a.*").await,
            [("tls.a.alice".into(), false), ("tls.a.bob".into(), false)]
        );
        alice.close().await.unwrap();
        bob.ping(b"after").await.unwrap();
    });
}

/// A client that does not trust the hub's certificate, or expects another name, fails
/// the handshake with a clear TLS error; the hub keeps serving the others.
fn untrusted_certificate_is_refused(io: &str) {
    let pki = Pki::new();
    let other = Pki::new();
    let srv = Server::tls(io, &pki, &[]);
    rt().block_on(async {
        let bob = tls_client(&srv, &pki, "tls.b.bob").await;
        let err = Client::connect_with(srv.addr, "tls.b.eve", options(other.client_tls()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("invalid peer certificate") && m.contains("UnknownIssuer")),
            "{err}"
        );
        let elsewhere = TlsOptions {
            server_name: Some("elsewhere.example".into()),
            ..pki.client_tls()
        };
        let err = Client::connect_with(srv.addr, "tls.b.eve", options(elsewhere))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("not valid for name \"elsewhere.example\"")),
            "{err}"
        );
        // The certificate names localhost too.
        let localhost = TlsOptions {
            server_name: Some("localhost".into()),
            ..pki.client_tls()
        };
        let _carol = Client::connect_with(srv.addr, "tls.b.carol", options(localhost))
            .await
            .unwrap();
        bob.ping(b"still here").await.unwrap();
        assert_eq!(bob.echo("tls.b.carol", "hi").await.unwrap(), 1);
    });
}

/// A plaintext client on a TLS-only port is told so in one plaintext Error and closed.
fn plaintext_on_a_tls_only_port(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &[]);
    let mut c = srv.tcp();
    c.send(0x01, b"tls.c.plain");
    c.expect_frame(0x09, b"this port requires TLS");
    c.expect_closed_quietly();
    rt().block_on(async {
        let opts = ClientOptions {
            keepalive: None,
            ..ClientOptions::default()
        };
        let err = Client::connect_with(srv.addr, "tls.c.lib", opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(m) if m == "this port requires TLS"),
            "{err}"
        );
        tls_client(&srv, &pki, "tls.c.fine")
            .await
            .ping(b"ok")
            .await
            .unwrap();
    });
}

/// With `--tls-optional`, a TLS client and a plaintext client on the same port talk to
/// each other.
fn optional_tls_serves_both(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &["--tls-optional"]);
    rt().block_on(async {
        let sealed = tls_client(&srv, &pki, "tls.d.tls").await;
        let plain = plain_client(&srv, "tls.d.plain").await;
        assert!(!plain.is_tls());
        let sent = sealed.command("tls.d.plain", "/hello").await.unwrap();
        answer(&plain, "tls.d.tls", "/hello", "from plain").await;
        let r = sealed.next_response(sent.id, DEADLINE).await.unwrap();
        assert_eq!(r.text, "from plain");
        let sent = plain.command("tls.d.tls", "/hello").await.unwrap();
        answer(&sealed, "tls.d.plain", "/hello", "from tls").await;
        let r = plain.next_response(sent.id, DEADLINE).await.unwrap();
        assert_eq!(r.text, "from tls");
        assert_eq!(names(&plain, "tls.d.*").await.len(), 2);
    });
}

/// The first bytes of a real ClientHello.
fn client_hello() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(velium_server::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// Reads until the server closes `s` (it may send an alert first); returns when.
fn wait_closed(s: &mut TcpStream) -> Instant {
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Instant::now(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Instant::now(),
            Err(e) => panic!("not closed within {DEADLINE:?}: {e}"),
        }
    }
}

/// A handshake that stalls (nothing after the record type byte, or half a ClientHello) is
/// closed at `--tls-handshake-timeout`; a client that connects meanwhile is unaffected.
fn stalled_handshake_is_closed(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &["--tls-handshake-timeout", "300ms"]);
    let start = Instant::now();
    let mut one_byte = TcpStream::connect(srv.addr).unwrap();
    one_byte.write_all(&[0x16]).unwrap();
    let hello = client_hello();
    let mut half = TcpStream::connect(srv.addr).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    rt().block_on(async {
        let c = tls_client(&srv, &pki, "tls.e.patient").await;
        c.ping(b"unaffected").await.unwrap();
        for s in [&mut one_byte, &mut half] {
            let took = wait_closed(s) - start;
            assert!(
                took >= Duration::from_millis(250) && took < Duration::from_secs(3),
                "closed after {took:?}, not at the 300 ms deadline"
            );
        }
        c.ping(b"still unaffected").await.unwrap();
    });
}

/// Mutual TLS on a hub with users: a certificate whose Common Name is a user
/// authenticates the connection as that user with no Auth frame (and only for what the
/// user may be); a certificate naming no user, or none at all, is refused.
fn mutual_tls_names_the_user(io: &str) {
    let pki = Pki::new();
    let cfg = users_config(
        "",
        &[
            User::new("ops", "ops-s3cret", &["tls.ops.>"], &[">"]),
            User::new("boxer", "boxer-s3cret", &["peq.*.*"], &[]),
        ],
    );
    let srv = Server::tls(
        io,
        &pki,
        &["--config", cfg.arg(), "--tls-client-ca", &pki.ca],
    );
    let as_user = |cn: &str| {
        let (cert, key) = pki.client(cn);
        options(TlsOptions {
            cert: Some(cert.into()),
            key: Some(key.into()),
            ..pki.client_tls()
        })
    };
    rt().block_on(async {
        let brennan = Client::connect_with(srv.addr, "peq.z.brennan", as_user("boxer"))
            .await
            .unwrap();
        let ops = Client::connect_with(srv.addr, "tls.ops.desk", as_user("ops"))
            .await
            .unwrap();
        let sent = ops.command("peq.z.brennan", "/sit").await.unwrap();
        answer(&brennan, "tls.ops.desk", "/sit", "ok").await;
        assert_eq!(
            ops.next_response(sent.id, DEADLINE).await.unwrap().text,
            "ok"
        );
        // The certificate's user decides: boxer may not be an ops identity, nor command.
        let err = Client::connect_with(srv.addr, "tls.ops.boxer", as_user("boxer"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(m) if m.contains("not permitted")),
            "{err}"
        );
        assert!(brennan.command("tls.ops.desk", "/x").await.is_err());
        // A certificate of the right CA that names no user; no certificate.
        let err = Client::connect_with(srv.addr, "peq.z.nobody", as_user("nobody"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(m) if m == "authentication failed: certificate names no user: nobody"),
            "{err}"
        );
        let err = Client::connect_with(srv.addr, "peq.z.anon", options(pki.client_tls()))
            .await
            .unwrap_err();
        assert!(matches!(&err, ClientError::Tls(_)), "{err}");
        brennan.ping(b"still in").await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// Sealed UDP

/// Pings and a Command over sealed UDP, with the response back over it.
fn sealed_udp_carries_pings_and_commands(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &[]);
    rt().block_on(async {
        let alice = tls_client(&srv, &pki, "tls.f.alice").await;
        let bob = tls_client(&srv, &pki, "tls.f.bob").await;
        alice.bind_udp().await.unwrap();
        bob.bind_udp().await.unwrap();
        assert!(alice.is_udp_bound());
        alice.ping_udp(b"sealed ping").await.unwrap();
        let sent = alice.command_udp("tls.f.bob", "/udp").await.unwrap();
        assert_eq!(sent.reached, 1);
        assert_eq!(
            answer(&bob, "tls.f.alice", "/udp", "over udp").await,
            Transport::Udp
        );
        let r = alice.next_response(sent.id, DEADLINE).await.unwrap();
        assert_eq!((r.text.as_str(), r.via), ("over udp", Transport::Udp));
        assert_eq!(alice.echo_udp("tls.f.bob", "hi").await.unwrap(), 1);
        assert!(matches!(
            event(&bob).await,
            Event::Echo {
                via: Transport::Udp,
                ..
            }
        ));
        assert_eq!(
            names(&alice, "tls.f.*").await,
            [("tls.f.alice".into(), true), ("tls.f.bob".into(), true)]
        );
        assert_eq!(alice.sealed_dropped() + bob.sealed_dropped(), 0);
    });
}

/// A TLS session's sealed UDP channel, spoken by hand from raw sockets with the keys
/// the session exported.
struct Raw {
    keys: Keys,
    /// What the hub sent: its counters never repeat.
    window: ReplayWindow,
}

impl Raw {
    fn new(c: &Client) -> Raw {
        Raw {
            keys: Keys::from_exporter(&c.sealed_keys_for_tests().expect("a TLS client")),
            window: ReplayWindow::default(),
        }
    }

    /// The datagram carrying the frame `op data` as number `counter`.
    fn seal(&self, counter: u64, op: u8, data: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        self.keys
            .client
            .seal(self.keys.session, counter, &frame(op, data), &mut d);
        d
    }

    /// Opens the next datagram `u` receives: (opcode, data).
    fn recv(&mut self, u: &Udp) -> (u8, Vec<u8>) {
        let mut d = u.recv();
        let h = header(&d).expect("a sealed datagram");
        assert_eq!(h.session, self.keys.session);
        assert!(self.window.check(h.counter), "the hub reused {}", h.counter);
        self.window.accept(h.counter);
        let f = self.keys.hub.open(&mut d).expect("authentic").to_vec();
        let body = f.strip_suffix(b"\n").unwrap_or(&f);
        (body[0], body[1..].to_vec())
    }

    /// Sends a sealed Ping as number `counter` from `u` and expects its Pong there.
    fn ping(&mut self, u: &Udp, counter: u64, data: &[u8]) {
        u.send_raw(&self.seal(counter, 0x06, data));
        assert_eq!(
            self.recv(u),
            (0x07, data.to_vec()),
            "Pong of ping {counter}"
        );
    }
}

fn dropped(srv: &Server, reason: &str, n: f64) {
    srv.wait_metric(
        &format!("velium_sealed_dropped_total{{reason=\"{reason}\"}}"),
        |v| v == n,
    );
}

/// Forged-source, replayed, truncated, altered and unknown-session datagrams are dropped
/// and counted; one reordered within the window is accepted once; an altered datagram
/// does not use up its counter; the newest authentic datagram moves the hub's address
/// for the session (rebinding, with no bind), a forged one never does.
fn sealed_udp_drops_what_it_cannot_trust(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &["--admin", "127.0.0.1:0"]);
    rt().block_on(async {
        let sender = tls_client(&srv, &pki, "tls.g.sender").await;
        sender.bind_udp().await.unwrap();
        // M's UDP channel is spoken by hand: the library never sends on it.
        let m = tls_client(&srv, &pki, "tls.g.m").await;
        let mut raw = Raw::new(&m);
        let (r, forger) = (srv.udp(), srv.udp());
        raw.ping(&r, 0, b"zero");
        // Replayed: no answer (the Pong of the next Ping is the next datagram).
        r.send_raw(&raw.seal(0, 0x06, b"zero"));
        raw.ping(&r, 1, b"one");
        dropped(&srv, "replayed", 1.0);
        // Reordered within the window: accepted, once.
        raw.ping(&r, 5, b"five");
        raw.ping(&r, 3, b"three");
        r.send_raw(&raw.seal(3, 0x06, b"three"));
        raw.ping(&r, 6, b"six");
        dropped(&srv, "replayed", 2.0);
        // From a forged source: a replay, and garbage under the session's id.
        forger.send_raw(&raw.seal(5, 0x06, b"five"));
        let mut garbage = raw.seal(7, 0x06, b"seven");
        for b in &mut garbage[17..] {
            *b = 0;
        }
        forger.send_raw(&garbage);
        dropped(&srv, "replayed", 3.0);
        dropped(&srv, "altered", 1.0);
        // Altered in transit: dropped, and counter 7 is still unused.
        let mut altered = raw.seal(7, 0x06, b"seven");
        altered[20] ^= 1;
        r.send_raw(&altered);
        dropped(&srv, "altered", 2.0);
        raw.ping(&r, 7, b"seven");
        // Truncated, and another session's id.
        r.send_raw(&[0xA5, 1, 2, 3]);
        dropped(&srv, "truncated", 1.0);
        let mut stranger = Vec::new();
        raw.keys
            .client
            .seal(raw.keys.session ^ 1, 8, &frame(0x06, b"x"), &mut stranger);
        r.send_raw(&stranger);
        dropped(&srv, "unknown_session", 1.0);

        // Deliveries still go to r, not to the forger.
        let sent = sender.command_udp("tls.g.m", "/where").await.unwrap();
        assert_eq!(sent.reached, 1);
        let (op, data) = raw.recv(&r);
        assert_eq!(op, 0x04);
        let (from, _, text) = command_of(&data);
        assert_eq!(
            (from.as_str(), text.as_slice()),
            ("tls.g.sender", &b"/where"[..])
        );
        // Rebinding: the newest authentic datagram, from a new port, moves the channel.
        let moved = srv.udp();
        raw.ping(&moved, 9, b"nine");
        sender.command_udp("tls.g.m", "/here").await.unwrap();
        let (op, data) = raw.recv(&moved);
        assert_eq!((op, command_of(&data).2), (0x04, b"/here".to_vec()));
        assert_eq!(sender.sealed_dropped(), 0);
    });
}

/// The client moves its UDP channel to a new local port and keeps receiving: the hub
/// follows its sealed Ping, with no bind. (A plain channel binds the new port.)
fn udp_follows_a_new_port(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &["--tls-optional"]);
    rt().block_on(async {
        let alice = tls_client(&srv, &pki, "tls.h.alice").await;
        let bob = tls_client(&srv, &pki, "tls.h.bob").await;
        let plain = plain_client(&srv, "tls.h.plain").await;
        for c in [&alice, &bob, &plain] {
            c.bind_udp().await.unwrap();
        }
        for c in [&bob, &plain] {
            c.rebind_udp().await.unwrap();
            let me = c.identity();
            let sent = alice.command_udp(&me, "/moved").await.unwrap();
            assert_eq!(sent.reached, 1);
            assert_eq!(
                answer(c, "tls.h.alice", "/moved", "here").await,
                Transport::Udp
            );
            let r = alice.next_response(sent.id, DEADLINE).await.unwrap();
            assert_eq!((&*r.from, r.via), (&*me, Transport::Udp));
        }
    });
}

/// A TLS session never binds plain UDP: a plain bind with its token is refused (counted,
/// and answered only with the Quit an unknown source gets), and its channel stays unbound.
fn plain_bind_from_a_tls_session_is_refused(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &["--admin", "127.0.0.1:0"]);
    rt().block_on(async {
        let m = tls_client(&srv, &pki, "tls.i.m").await;
        let u = srv.udp();
        u.bind(&m.token().0);
        u.send(0x06, b"bound?");
        // Answered as from a source the hub does not know, and so is the Ping.
        assert_eq!(u.recv(), QUIT);
        assert_eq!(u.recv(), QUIT);
        srv.wait_metric("velium_refused_total{reason=\"plain_udp\"}", |v| v == 1.0);
        assert_eq!(names(&m, "tls.i.m").await, [("tls.i.m".into(), false)]);
    });
}

/// A reload re-reads the certificate and key: new sessions get the new certificate, the
/// open ones go on with theirs.
fn certificate_is_reloaded(io: &str) {
    let (a, b) = (Pki::new(), Pki::new());
    let cert = a
        .dir
        .sibling("live-cert.pem", &std::fs::read_to_string(&a.cert).unwrap());
    let key = a
        .dir
        .sibling("live-key.pem", &std::fs::read_to_string(&a.key).unwrap());
    let srv = Server::start(io, &["--tls-cert", &cert, "--tls-key", &key]);
    rt().block_on(async {
        let old = tls_client(&srv, &a, "tls.r.old").await;
        std::fs::write(&cert, std::fs::read(&b.cert).unwrap()).unwrap();
        std::fs::write(&key, std::fs::read(&b.key).unwrap()).unwrap();
        srv.signal(libc::SIGHUP);
        srv.wait_log(&["reloaded", "tls"]);
        let new = tls_client(&srv, &b, "tls.r.new").await;
        let refused = Client::connect_with(srv.addr, "tls.r.a", options(a.client_tls())).await;
        assert!(
            matches!(refused, Err(ClientError::Tls(_))),
            "the old CA no longer fits: {:?}",
            refused.err()
        );
        old.ping(b"still")
            .await
            .expect("the open session keeps its certificate");
        new.ping(b"new").await.unwrap();
    });
}

/// With `udp_plain = false` only TLS sessions have UDP: a plaintext session's bind is
/// refused, a TLS session's sealed Ping is answered.
fn plain_udp_off_leaves_udp_to_tls(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(
        io,
        &pki,
        &[
            "--tls-optional",
            "--udp-plain",
            "false",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let mut plain = srv.tcp();
    let token = plain.identify("tls.u.plain");
    let u = srv.udp();
    u.bind(&token);
    u.send(0x06, b"bound?");
    assert_eq!(u.recv(), QUIT);
    srv.wait_metric("velium_refused_total{reason=\"plain_udp\"}", |v| v == 1.0);
    rt().block_on(async {
        let t = tls_client(&srv, &pki, "tls.u.sealed").await;
        t.bind_udp().await.expect("sealed UDP is served");
        t.ping_udp(b"sealed").await.unwrap();
    });
}

/// A TLS shim that stops reading is cut off as a slow consumer at `outbound_limit`, its
/// records and plaintext counted alike; the sender and the others go on.
fn a_tls_shim_that_stops_reading_is_cut_off(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(
        io,
        &pki,
        &[
            "--outbound-limit",
            "65536",
            "--admin",
            "127.0.0.1:0",
            "--routed-per-sec",
            "0",
            "--deliveries-per-sec",
            "0",
        ],
    );
    // A TLS client of its own, which identifies and then never reads again.
    let mut roots = rustls::RootCertStore::empty();
    for c in
        velium_server::tls::certificates(&std::fs::read(&pki.ca).unwrap(), pki.ca.as_ref()).unwrap()
    {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(velium_server::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut stalled = rustls::StreamOwned::new(conn, TcpStream::connect(srv.addr).unwrap());
    stalled.write_all(b"\x01tls.s.stalled\n").unwrap();
    let mut session = [0u8; 18];
    stalled.read_exact(&mut session).unwrap();
    assert_eq!(session[0], 0x02);
    rt().block_on(async {
        let sender = tls_client(&srv, &pki, "tls.s.sender").await;
        let other = tls_client(&srv, &pki, "tls.s.other").await;
        let text = "y".repeat(8_000);
        // Until the hub gives up on it: the sender is answered every time.
        while srv.metric("velium_slow_consumers_total") < 1.0 {
            match sender.echo("tls.s.stalled", &text).await {
                Ok(_) => {}
                Err(ClientError::NoMatch { .. }) => break,
                Err(e) => panic!("the sender was refused: {e}"),
            }
        }
        srv.wait_metric("velium_slow_consumers_total", |v| v >= 1.0);
        sender.ping(b"fine").await.unwrap();
        assert_eq!(sender.echo("tls.s.other", "still here").await.unwrap(), 1);
        match event(&other).await {
            Event::Echo { text, .. } => assert_eq!(text, "still here"),
            e => panic!("expected the Echo, got {e:?}"),
        }
    });
    srv.wait_log(&["close", "identity=tls.s.stalled", "reason=slow consumer"]);
}

/// A TLS client on a hub without TLS: its ClientHello is answered, in clear, with the
/// Error that says so, and the library reports a hub without TLS.
fn tls_on_a_plaintext_port(io: &str) {
    let pki = Pki::new();
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    c.send_raw(&client_hello());
    c.expect_frame(0x09, b"this port does not speak TLS");
    c.expect_closed_quietly();
    rt().block_on(async {
        let err = Client::connect_with(srv.addr, "tls.p.lib", options(pki.client_tls()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("answered in plaintext")),
            "{err}"
        );
        plain_client(&srv, "tls.p.fine")
            .await
            .ping(b"ok")
            .await
            .unwrap();
    });
}

drivers!(
    tls_on_a_plaintext_port,
    a_tls_shim_that_stops_reading_is_cut_off,
    certificate_is_reloaded,
    plain_udp_off_leaves_udp_to_tls,
    session_over_tls,
    untrusted_certificate_is_refused,
    plaintext_on_a_tls_only_port,
    optional_tls_serves_both,
    stalled_handshake_is_closed,
    mutual_tls_names_the_user,
    sealed_udp_carries_pings_and_commands,
    sealed_udp_drops_what_it_cannot_trust,
    udp_follows_a_new_port,
    plain_bind_from_a_tls_session_is_refused,
);
