//! End to end: relay state through the `velium` tool (`shim --set`, `state`, `watch`) and
//! the client library, against a real server.
//!
//! Every wait is on an event (a line a `velium` process prints, a process exit, a frame,
//! a metric reaching a value) with the harness's generous deadline; nothing sleeps. That
//! nothing is printed for a Set that changes nothing is shown with a barrier: once the
//! hub has counted the unchanged Sets, a change made afterwards must be the very next line.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use velium_server::client::{Client, ClientError, ClientOptions, Event, ShimState, Transport};

/// A running `velium` (a `shim` or a `watch`), killed on drop.
struct Proc {
    /// Taken when it is stopped.
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    what: String,
}

impl Proc {
    /// Starts `velium --server ADDR ARGS...`.
    fn start(addr: SocketAddr, args: &[&str]) -> Proc {
        let mut child = Command::new(VELIUM)
            .args(["--server", &addr.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn velium");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            child: Some(child),
            lines,
            stderr,
            what: format!("velium {}", args.join(" ")),
        }
    }

    /// `velium shim --name NAME EXTRA...`, once it printed `connected as NAME` (its --set
    /// keys are applied by then).
    fn shim(addr: SocketAddr, name: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["shim", "--name", name];
        args.extend_from_slice(extra);
        let mut p = Proc::start(addr, &args);
        assert_eq!(p.line(), format!("connected as {name}"));
        p
    }

    /// The next stdout line.
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(DEADLINE) {
            Ok(l) => l,
            Err(_) => panic!(
                "{}: no line within {DEADLINE:?}; stderr: {:?}",
                self.what,
                self.stderr.lock().unwrap()
            ),
        }
    }

    /// The next `n` stdout lines, sorted.
    fn sorted_lines(&mut self, n: usize) -> Vec<String> {
        let mut v: Vec<String> = (0..n).map(|_| self.line()).collect();
        v.sort();
        v
    }

    /// What it wrote on stderr so far.
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `sig` and returns the exit code (`None`: killed by the signal).
    fn stop(&mut self, sig: i32) -> Option<i32> {
        let child = self.child.take().expect("running");
        let pid = child.id() as i32;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid, sig) };
        self.wait_child(child)
    }

    /// Waits for it to exit by itself; returns the exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let child = self.child.take().expect("running");
        self.wait_child(child)
    }

    fn wait_child(&self, mut child: Child) -> Option<i32> {
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(status) => status.unwrap().code(),
            Err(_) => {
                // SAFETY: as above (the waiting thread has not reaped it).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("{} did not exit", self.what);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sets keys from a raw connection and waits until the hub has handled the Set.
fn set(c: &mut Tcp, items: &[&str]) {
    c.send(0x10, items.join("\x1f").as_bytes());
    c.sync(b"set");
}

// ---------------------------------------------------------------------------------------
// `velium state`

#[test]
fn cli_shim_set_then_state_prints_exactly() {
    let srv = Server::start("uring", &[]);
    let _one = Proc::shim(
        srv.addr,
        "st.a.one",
        &[
            "--set",
            "hp=4500/5000",
            "--set",
            "note=back in 5",
            "--set",
            "empty=",
            "--set",
            r#"say=he said "hi""#,
            "--set",
            r"path=C:\games",
            "--set",
            "multi=one\ntwo",
        ],
    );
    let _two = Proc::shim(srv.addr, "st.a.two", &["--no-udp", "--set", "hp=1"]);
    let _bare = Proc::shim(srv.addr, "st.b.bare", &[]);

    let run = velium(srv.addr, &["state", "st.a.*"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        concat!(
            r#"st.a.one hp=4500/5000 note="back in 5" empty="" say="he said \"hi\"" path="C:\\games" multi=one\ntwo"#,
            "\n",
            "st.a.two hp=1\n"
        )
    );
    assert_eq!(run.stderr, "");

    // Only the keys asked for, in the order the shim holds them.
    let run = velium(srv.addr, &["state", "st.a.*", "multi", "hp"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        "st.a.one hp=4500/5000 multi=one\\ntwo\nst.a.two hp=1\n"
    );

    // A shim that holds no key is listed alone.
    let run = velium(srv.addr, &["state", "st.b.*"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "st.b.bare\n"),
        "{run:?}"
    );

    // The tool's own connection is never listed, even for a `+` pattern.
    let run = velium(srv.addr, &["state", "+st.b.>"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "st.b.bare\n"),
        "{run:?}"
    );
}

#[test]
fn cli_state_without_a_match_exits_2() {
    let srv = Server::start("uring", &[]);
    let _one = Proc::shim(srv.addr, "st.n.one", &["--set", "hp=1"]);
    let run = velium(srv.addr, &["state", "nobody.*"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, "velium: no shim matches nobody.*\n");

    let run = velium(srv.addr, &["state", "a.>.b"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        "velium: bad pattern a.>.b: '>' must be the last segment\n"
    );

    let run = velium(srv.addr, &["state", "st.>", "h p"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.starts_with("velium: invalid key"), "{run:?}");
}

#[test]
fn cli_shim_refuses_bad_set_arguments() {
    let addr = "127.0.0.1:9".parse().unwrap();
    for args in [
        &["shim", "--name", "a.b", "--set", "hp"][..],
        &["shim", "--name", "a.b", "--set", "h p=1"][..],
        &["shim", "--name", "a.b", "--set-every", "1s"][..],
        &["shim", "--name", "a.b", "--set", "a=1", "--set-every", "0"][..],
        &["watch", "a.>", "--interval", "2h"][..],
    ] {
        let run = velium(addr, args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert_eq!(run.stdout, "", "{args:?}");
    }
}

// ---------------------------------------------------------------------------------------
// `velium watch`

/// A watch of `st.w.>`: the snapshot, a change of one key of several printed alone,
/// nothing for a shim that keeps sending the same set, a delete, presence.
fn cli_watch_prints_snapshot_changes_and_presence(io: &str) {
    let srv = Server::with_admin(io, &[]);
    // Sends its set again every 20 ms (over UDP): nothing changes, nothing is printed.
    let mut a = Proc::shim(
        srv.addr,
        "st.w.a",
        &["--set", "hp=10", "--set", "mp=5", "--set-every", "20ms"],
    );
    let mut b = shim(&srv, "st.w.b");
    set(&mut b, &["hp=1", "mp=2", "note=a b"]);

    let mut w = Proc::start(srv.addr, &["watch", "st.w.>"]);
    assert_eq!(
        w.sorted_lines(2),
        ["st.w.a hp=10 mp=5", r#"st.w.b hp=1 mp=2 note="a b""#]
    );
    // The snapshot is printed, so the subscription exists: let a's unchanged set be
    // applied a few more times, then change one key of b's. That change must be the next
    // line: nothing was printed for a.
    let sets = srv.metric("velium_state_sets_total");
    srv.wait_metric("velium_state_sets_total", |v| v >= sets + 3.0);
    set(&mut b, &["hp=1", "mp=3", "note=a b"]);
    assert_eq!(w.line(), "st.w.b mp=3");
    // Several changes in one Set: one line, in the Set's order; a delete as -KEY.
    set(&mut b, &["note=", "hp"]);
    assert_eq!(w.line(), r#"st.w.b note="" -hp"#);

    // A new shim: its join, then what it set.
    let mut c = Proc::shim(srv.addr, "st.w.c", &["--no-udp", "--set", "lvl=5"]);
    assert_eq!(w.line(), "+st.w.c");
    assert_eq!(w.line(), "st.w.c lvl=5");
    // It says goodbye (quit); a killed one just goes (eof).
    assert_eq!(c.stop(libc::SIGTERM), Some(0));
    assert_eq!(w.line(), "-st.w.c quit");
    a.stop(libc::SIGKILL);
    assert_eq!(w.line(), "-st.w.a eof");
    drop(b);
    assert_eq!(w.line(), "-st.w.b eof");

    assert_eq!(w.stop(libc::SIGTERM), Some(0), "stderr: {}", w.stderr());
    assert_eq!(w.stderr(), "");
}

drivers!(cli_watch_prints_snapshot_changes_and_presence);

#[test]
fn cli_watch_keys_and_an_empty_snapshot() {
    let srv = Server::start("uring", &[]);
    let mut w = Proc::start(srv.addr, &["watch", "--interval", "0.01", "st.k.>", "hp"]);
    // Nothing matches yet: the watch goes on (and says so on stderr).
    srv.wait_log(&["subscribe", "sid=1", "watching=0"]);
    let mut s = shim(&srv, "st.k.one");
    assert_eq!(w.line(), "+st.k.one");
    // Only hp is watched: the change to mp prints nothing, so hp's is the next line.
    set(&mut s, &["mp=1"]);
    set(&mut s, &["hp=2", "mp=3"]);
    assert_eq!(w.line(), "st.k.one hp=2");
    // A rename out of the pattern is a leave.
    s.send(0x01, b"st.x.one");
    s.sync(b"renamed");
    assert_eq!(w.line(), "-st.k.one renamed");
    assert_eq!(w.stop(libc::SIGINT), Some(0));
    assert_eq!(w.stderr(), "velium: no shim matches st.k.> yet; watching\n");
}

#[test]
fn cli_watch_exits_1_when_the_hub_goes() {
    let mut srv = Server::start("uring", &[]);
    let _s = Proc::shim(srv.addr, "st.g.one", &["--no-udp", "--set", "hp=1"]);
    let mut w = Proc::start(srv.addr, &["watch", "st.g.>"]);
    assert_eq!(w.line(), "st.g.one hp=1");
    srv.signal(libc::SIGKILL);
    srv.wait_exit();
    assert_eq!(w.wait_exit(), Some(1), "stderr: {}", w.stderr());
    assert!(w.stderr().starts_with("velium: "), "{}", w.stderr());
}

// ---------------------------------------------------------------------------------------
// The client library

/// A client without keep-alive (tests must not depend on background traffic).
async fn quiet_client(addr: SocketAddr, name: &str) -> Client {
    let opts = ClientOptions {
        keepalive: None,
        ..ClientOptions::default()
    };
    Client::connect_with(addr, name, opts)
        .await
        .unwrap_or_else(|e| panic!("connect {name}: {e}"))
}

async fn event(c: &Client) -> Event {
    tokio::time::timeout(DEADLINE, c.next_event())
        .await
        .expect("an event within the deadline")
        .expect("the connection is open")
}

fn values(s: &ShimState) -> Vec<(&str, Option<&str>)> {
    s.items
        .iter()
        .map(|i| (i.key.as_str(), i.value.as_deref()))
        .collect()
}

#[tokio::test]
async fn client_get_subscribe_and_unsubscribe() {
    let srv = Server::start("uring", &[]);
    let s = quiet_client(srv.addr, "lib.st.s").await;
    let w = quiet_client(srv.addr, "lib.st.w").await;
    s.set_state(&[("hp", Some("1/2")), ("note", Some("two\nlines"))])
        .await
        .unwrap();
    s.ping(b"applied").await.unwrap();

    let got = w.get_state("lib.st.s", &[]).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].identity, "lib.st.s");
    assert_eq!(
        values(&got[0]),
        [("hp", Some("1/2")), ("note", Some("two\nlines"))]
    );
    assert!(got[0].items[0].age < DEADLINE);
    assert!(w.get_state("nobody.*", &[]).await.unwrap().is_empty());

    let snap = w
        .subscribe(7, "lib.st.>", &["hp"], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(snap.len(), 1, "the subscriber is left out: {snap:?}");
    assert_eq!(values(&snap[0]), [("hp", Some("1/2"))]);
    // An id in use and a bad pattern are refused before anything is sent.
    assert!(matches!(
        w.subscribe(7, "lib.>", &[], Duration::ZERO).await,
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        w.subscribe(8, "a.>.b", &[], Duration::ZERO).await,
        Err(ClientError::BadTarget { what: "pattern", text, .. }) if text == "a.>.b"
    ));
    // A change is a delta of the subscription (over TCP: no UDP channel); a Get after
    // it is answered on its own.
    s.set_state(&[("hp", Some("2/2")), ("note", None)])
        .await
        .unwrap();
    match event(&w).await {
        Event::State {
            sid: 7,
            full: false,
            state,
            via: Transport::Tcp,
        } => {
            assert_eq!(state.identity, "lib.st.s");
            assert_eq!(values(&state), [("hp", Some("2/2"))]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    let got = w.get_state("lib.st.s", &[]).await.unwrap();
    assert_eq!(values(&got[0]), [("hp", Some("2/2"))]);

    w.unsubscribe(7).await.unwrap();
    assert!(matches!(
        w.unsubscribe(7).await,
        Err(ClientError::Server(m)) if m == "no subscription 7"
    ));
    // The id is free again.
    w.subscribe(7, "lib.st.s", &[], Duration::ZERO)
        .await
        .unwrap();
    s.close().await.unwrap();
    assert_eq!(
        event(&w).await,
        Event::Leave {
            sid: 7,
            identity: "lib.st.s".into(),
            reason: "quit".into()
        }
    );
}

#[tokio::test]
async fn client_refuses_bad_state_locally() {
    let srv = Server::start("uring", &[]);
    let c = quiet_client(srv.addr, "lib.bad").await;
    for items in [
        &[][..],
        &[("h p", Some("1"))][..],
        &[("hp", Some("1\x1f2"))][..],
        &[("hp", Some("1\r"))][..],
    ] {
        assert!(
            matches!(c.set_state(items).await, Err(ClientError::Invalid { .. })),
            "{items:?}"
        );
    }
    assert!(matches!(
        c.set_state_udp(&[("hp", Some("1"))]).await,
        Err(ClientError::NotBound)
    ));
    assert!(matches!(
        c.subscribe(0, "a.>", &[], Duration::ZERO).await,
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        c.subscribe(1, "a.>", &[], Duration::from_secs(3601)).await,
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        c.get_state("a.>", &["x y"]).await,
        Err(ClientError::Invalid { .. })
    ));
    // Nothing was sent: the connection is in step.
    c.ping(b"fine").await.unwrap();
}

/// A refused Set over UDP is an event, not the reply of the UDP exchange that follows it.
#[tokio::test]
async fn client_state_refused_over_udp_answers_no_request() {
    let srv = Server::start("uring", &[]);
    let c = quiet_client(srv.addr, "lib.udp.me").await;
    c.bind_udp().await.unwrap();
    let big = "x".repeat(1100);
    c.set_state_udp(&[("big", Some(&big))]).await.unwrap();
    assert_eq!(c.echo_udp("+lib.udp.me", "after").await.unwrap(), 1);
    let mut refused = false;
    let mut echoed = false;
    while !(refused && echoed) {
        match event(&c).await {
            Event::Error { message, via } => {
                assert_eq!(via, Transport::Udp);
                assert_eq!(
                    message,
                    "state refused: value of big is longer than 1024 bytes"
                );
                refused = true;
            }
            Event::Echo { text, .. } => {
                assert_eq!(text, "after");
                echoed = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Deltas over UDP, subscribed while the watched shim keeps changing: the snapshot, then
/// the events in order, never go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_udp_deltas_follow_their_snapshot() {
    // The setter goes as fast as its pings come back: past the default rate of Sets.
    let srv = Server::start("uring", &["--state-sets-per-sec", "0"]);
    let s = Arc::new(quiet_client(srv.addr, "lib.ud.s").await);
    let w = quiet_client(srv.addr, "lib.ud.w").await;
    w.bind_udp().await.unwrap();
    s.set_state(&[("n", Some("0"))]).await.unwrap();
    s.ping(b"0").await.unwrap();
    const LAST: u64 = 300;
    let setter = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 1..=LAST {
                s.set_state(&[("n", Some(&i.to_string()))]).await.unwrap();
                s.ping(b"paced").await.unwrap();
            }
        })
    };
    let snap = w
        .subscribe(1, "lib.ud.s", &[], Duration::ZERO)
        .await
        .unwrap();
    let mut n: u64 = snap[0].items[0].value.as_deref().unwrap().parse().unwrap();
    let mut over_udp = 0;
    while n < LAST {
        let ev = tokio::time::timeout(DEADLINE, w.next_event()).await;
        let ev = ev.unwrap_or_else(|_| {
            panic!(
                "no event after {n} ({over_udp} over UDP); dropped {}",
                w.sealed_dropped()
            )
        });
        match ev.unwrap() {
            Event::State {
                sid: 1,
                full,
                state,
                via,
            } => {
                over_udp += usize::from(via == Transport::Udp);
                let v: u64 = state.items[0].value.as_deref().unwrap().parse().unwrap();
                assert!(full || v > n, "{v} after {n}");
                n = v;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    setter.await.unwrap();
    assert!(over_udp > 0, "no delta came over UDP");
}

/// A scripted hub for [`client_holds_a_udp_delta_that_overtakes_its_snapshot`]: it
/// answers the handshake, the UDP bind's Ping, and a Subscribe in the order a real hub
/// can only produce by chance (the delta over UDP before the listing over TCP).
fn fake_hub() -> (
    SocketAddr,
    std::thread::JoinHandle<()>,
    mpsc::Sender<()>,
    mpsc::Receiver<()>,
) {
    use std::io::Write;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let udp = std::net::UdpSocket::bind(addr).unwrap();
    udp.set_read_timeout(Some(DEADLINE)).unwrap();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let hub = std::thread::spawn(move || {
        let (s, _) = tcp.accept().unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut rd = BufReader::new(s.try_clone().unwrap());
        let mut wr = s;
        let mut frame = Vec::new();
        let mut next = |frame: &mut Vec<u8>| {
            frame.clear();
            rd.read_until(b'\n', frame).unwrap();
            assert!(!frame.is_empty(), "the client closed");
            frame.pop();
        };
        next(&mut frame);
        assert_eq!(frame[0], 0x01, "Identify");
        wr.write_all(b"\x02ABCDEFGHIJKLMNOP\n").unwrap();
        // The bind: a Session datagram and a Ping, answered with its Pong.
        let mut b = [0u8; 2048];
        let client = loop {
            let (n, from) = udp.recv_from(&mut b).unwrap();
            if b[0] == 0x06 {
                let mut pong = b[..n].to_vec();
                pong[0] = 0x07;
                udp.send_to(&pong, from).unwrap();
                break from;
            }
        };
        next(&mut frame);
        assert_eq!(frame, b"\x111 0 lib.>", "Subscribe");
        // The delta first, over UDP; the Pong of a Ping after it proves the client read it.
        udp.send_to(b"\x101 D 2 lib.x\x1fhp:0=2\n", client).unwrap();
        udp.send_to(b"\x06barrier\n", client).unwrap();
        loop {
            let (n, _) = udp.recv_from(&mut b).unwrap();
            if &b[..n] == b"\x07barrier\n" {
                break;
            }
        }
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // Then the listing and its Ack.
        wr.write_all(b"\x101 F 1 lib.x\x1fhp:5=1\n\x0c1 1\n")
            .unwrap();
        // Until the client goes.
        let _ = rd.read_until(b'\n', &mut frame);
    });
    (addr, hub, go_tx, ready_rx)
}

/// A delta that arrives over UDP before the snapshot it changes is neither lost nor
/// handed out before the snapshot: it waits, and comes as the first event after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_holds_a_udp_delta_that_overtakes_its_snapshot() {
    let (addr, hub, go, ready) = fake_hub();
    let c = Arc::new(quiet_client(addr, "lib.w").await);
    c.bind_udp().await.unwrap();
    let sub = {
        let c = c.clone();
        tokio::spawn(async move { c.subscribe(1, "lib.>", &[], Duration::ZERO).await })
    };
    tokio::task::spawn_blocking(move || ready.recv_timeout(DEADLINE).unwrap())
        .await
        .unwrap();
    // The client has read the delta: it is not an event yet.
    assert!(
        tokio::time::timeout(Duration::ZERO, c.next_event())
            .await
            .is_err(),
        "a delta was handed out before its snapshot"
    );
    go.send(()).unwrap();
    let snap = tokio::time::timeout(DEADLINE, sub)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(snap.len(), 1);
    assert_eq!(values(&snap[0]), [("hp", Some("1"))]);
    assert_eq!(snap[0].items[0].age, Duration::from_millis(5));
    match event(&c).await {
        Event::State {
            sid: 1,
            full: false,
            state,
            via: Transport::Udp,
        } => assert_eq!(values(&state), [("hp", Some("2"))]),
        other => panic!("expected the held delta, got {other:?}"),
    }
    drop(c);
    hub.join().unwrap();
}
