//! The admin listener: the bearer token, the limits on size, time, connections and
//! reloads, and that no admin client can delay `/healthz` or keep shims out.
//!
//! Each test runs a real server process on 127.0.0.1 with the admin listener on an
//! ephemeral port. The listener is the same for both I/O drivers, so the pure HTTP tests
//! run on one; the test that also connects shims runs on both.

mod common;
use common::*;

use socket2::{Domain, Protocol, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use velium_server::admin::{fetch, fetch_with, sample};
use velium_server::client::Client;

/// The listener's time from a head's first byte to its end (and then to its body's end).
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The listener's time for a connection with no request begun.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Timer rounding the lower bounds allow for.
const SLACK: Duration = Duration::from_millis(20);

const UNAUTHORIZED: &str = "admin token required: send Authorization: Bearer TOKEN\n";

// ---------------------------------------------------------------------------------------
// Helpers

/// Asserts `/healthz` answers `ok` within 100 ms, connection included.
fn healthz_within_100ms(srv: &Server) {
    let started = Instant::now();
    let got = srv.get("/healthz");
    let took = started.elapsed();
    assert_eq!(got, (200, "ok\n".into()));
    assert!(took < Duration::from_millis(100), "/healthz took {took:?}");
}

/// A connection to `addr` with small socket buffers, so that a client that does not read
/// (or a server that does not) fills them quickly.
fn small_buffers(addr: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.set_send_buffer_size(64 * 1024).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// A connection to `addr` with the test deadline on reads and writes.
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Everything the server sends on `s` until it closes (a reset after the answer counts as
/// a close).
fn read_to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no close within {DEADLINE:?}: {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `request` on a new connection and returns all the server sends before closing.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = connect(addr);
    s.write_all(request).unwrap();
    read_to_close(&mut s)
}

/// Reads one response (head and `Content-Length` body) from a kept-alive connection.
fn response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "closed within a response head"
        );
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")?
                .parse()
                .ok()
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// Asserts the server closes `s` without sending anything; returns how long that took.
fn closed_quietly(s: &mut TcpStream, since: Instant) -> Duration {
    let rest = read_to_close(s);
    assert!(rest.is_empty(), "sent before closing: {rest:?}");
    since.elapsed()
}

/// The value of `name` in the `/metrics` of a listener that wants `token`.
fn metric_with(srv: &Server, token: &str, name: &str) -> f64 {
    let (status, body) = fetch_with(srv.admin.unwrap(), "GET", "/metrics", Some(token)).unwrap();
    assert_eq!(status, 200, "{body}");
    sample(&body, name).unwrap_or(0.0)
}

/// Waits until `ok` holds (it is about the server's state, read again every 5 ms).
fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The threads of process `pid`.
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn refused(reason: &str) -> String {
    format!("velium_admin_refused_total{{reason=\"{reason}\"}}")
}

fn closed(reason: &str) -> String {
    format!("velium_admin_closed_total{{reason=\"{reason}\"}}")
}

// ---------------------------------------------------------------------------------------
// The token

#[test]
fn the_token_is_required_everywhere_but_healthz() {
    let token = TempFile::new("admin.token", "s3cret\n");
    let srv = Server::with_admin("epoll", &["--admin-token-file", token.arg()]);
    let admin = srv.admin.unwrap();
    assert_eq!(srv.get("/healthz"), (200, "ok\n".into()));

    // Without the token, or with a wrong one, every other route (and no route) is 401.
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/shims"),
        ("GET", "/nothing"),
        ("POST", "/reload"),
    ] {
        let got = fetch(admin, method, path).unwrap();
        assert_eq!(got, (401, UNAUTHORIZED.into()), "{method} {path}");
    }
    for wrong in ["s3cret!", "s3cre", "", "S3CRET"] {
        let got = fetch_with(admin, "GET", "/metrics", Some(wrong)).unwrap();
        assert_eq!(got.0, 401, "token {wrong:?}");
    }
    let answer = exchange(
        admin,
        b"GET /shims HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic czNjcmV0\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nwww-authenticate: bearer\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with(UNAUTHORIZED), "{answer}");

    // With it, everything is served; the scheme is case-insensitive.
    assert_eq!(
        fetch_with(admin, "GET", "/shims", Some("s3cret"))
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        fetch_with(admin, "GET", "/nothing", Some("s3cret"))
            .unwrap()
            .0,
        404
    );
    let answer = exchange(
        admin,
        b"GET /shims HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer s3cret\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(metric_with(&srv, "s3cret", &refused("token")), 9.0);
    srv.wait_log(&["admin request refused", "token"]);
    assert_eq!(
        srv.count_log(&["admin request refused"]),
        1,
        "one line a minute"
    );

    // POST /reload with the token applies a new one.
    token.write("n3w\n");
    let (status, body) = fetch_with(admin, "POST", "/reload", Some("s3cret")).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("applied: admin_token"), "{body}");
    assert_eq!(
        fetch_with(admin, "GET", "/shims", Some("s3cret"))
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        fetch_with(admin, "GET", "/shims", Some("n3w")).unwrap().0,
        200
    );

    // So does SIGHUP.
    token.write("th1rd\n");
    srv.signal(libc::SIGHUP);
    wait_until("the SIGHUP's token applies", || {
        fetch_with(admin, "GET", "/shims", Some("th1rd")).unwrap().0 == 200
    });
    assert_eq!(
        fetch_with(admin, "GET", "/shims", Some("n3w")).unwrap().0,
        401
    );
    assert_eq!(srv.get("/healthz"), (200, "ok\n".into()));
}

// ---------------------------------------------------------------------------------------
// Clients that do not read

#[test]
fn a_huge_url_from_a_client_that_never_reads_is_cut_short() {
    let srv = Server::with_admin("epoll", &[]);
    let mut bad = small_buffers(srv.admin.unwrap());
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut request = b"GET /".to_vec();
        request.resize(4 << 20, b'a');
        let sent = bad.write_all(&request);
        (sent, started.elapsed())
    });
    srv.wait_metric(&refused("too_large"), |v| v == 1.0);
    healthz_within_100ms(&srv);

    // The listener read a head's worth, answered 431 and closed: the rest of the 4 MB
    // never left the client.
    let (sent, took) = writer.join().unwrap();
    let e = sent.expect_err("the listener took the whole URL");
    assert!(
        matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        "{e}"
    );
    assert!(took < HEAD_TIMEOUT, "closed after {took:?}, not at once");
    healthz_within_100ms(&srv);
}

#[test]
fn a_client_asking_for_metrics_again_and_again_without_reading_is_closed() {
    let srv = Server::with_admin("epoll", &[]);
    let mut bad = small_buffers(srv.admin.unwrap());
    let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let requests = request.repeat(1024);

    // Pipelines requests until the listener stops taking them: its answers fill the
    // socket buffers, its write is stuck.
    bad.set_nonblocking(true).unwrap();
    let mut at = 0;
    loop {
        match bad.write(&requests[at..]) {
            Ok(n) => at = (at + n) % requests.len(),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    for _ in 0..3 {
        healthz_within_100ms(&srv);
    }

    // The stuck write passes its deadline and the connection is closed.
    bad.set_nonblocking(false).unwrap();
    let e = loop {
        if let Err(e) = bad.write_all(&requests[at..]) {
            break e;
        }
        at = 0;
    };
    assert!(
        matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        "{e}"
    );
    srv.wait_metric(&closed("timeout"), |v| v == 1.0);
    healthz_within_100ms(&srv);
}

// ---------------------------------------------------------------------------------------
// Connections

fn idle_admin_connections_leave_healthz_and_shims_served(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let admin = srv.admin.unwrap();
    healthz_within_100ms(&srv);
    let (fds, threads_before) = (open_fds(srv.pid()), threads(srv.pid()));

    let idle: Vec<TcpStream> = (0..3000).map(|_| connect(admin)).collect();
    srv.wait_metric("velium_admin_connections_accepted_total", |v| v > 3000.0);
    healthz_within_100ms(&srv);

    // At most admin_connections (16) are held; the longest idle were closed for the new.
    assert!(srv.metric("velium_admin_connections") <= 16.0);
    assert!(srv.metric(&closed("evicted")) >= 3000.0 - 16.0);
    let (fds_now, threads_now) = (open_fds(srv.pid()), threads(srv.pid()));
    assert!(fds_now <= fds + 16 + 2, "{fds} descriptors, now {fds_now}");
    assert_eq!(threads_now, threads_before, "no thread per connection");
    let mut first = &idle[0];
    assert_eq!(
        first.read(&mut [0u8; 1]).unwrap(),
        0,
        "the oldest idle is closed"
    );

    // Shims connect and identify, raw and through the client library.
    srv.tcp().identify("peq.after.idle");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(srv.addr, "lib.after.idle").await.unwrap();
        c.ping(b"p").await.unwrap();
    });
    healthz_within_100ms(&srv);
    drop(idle);
}

drivers!(idle_admin_connections_leave_healthz_and_shims_served);

#[test]
fn the_connection_idle_longest_makes_room() {
    let srv = Server::with_admin("epoll", &["--admin-connections", "2"]);
    let admin = srv.admin.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    // a never sends; b is answered (idle since); c arrives and a, idle longest, goes.
    let mut a = connect(admin);
    let mut b = connect(admin);
    b.write_all(request).unwrap();
    assert!(response(&mut b).ends_with("\r\n\r\nok\n"));
    let mut c = connect(admin);
    closed_quietly(&mut a, Instant::now());

    // d arrives: b has waited longer than c.
    let _d = connect(admin);
    closed_quietly(&mut b, Instant::now());
    c.write_all(request).unwrap();
    assert!(response(&mut c).ends_with("\r\n\r\nok\n"));
    assert!(srv.metric(&closed("evicted")) >= 2.0);
}

// ---------------------------------------------------------------------------------------
// Limits on size and time

#[test]
fn heads_and_bodies_over_their_limits_are_refused() {
    let srv = Server::with_admin("epoll", &[]);
    let admin = srv.admin.unwrap();

    let mut big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".to_vec();
    big.resize(9 * 1024, b'b');
    big.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(admin, &big);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431 "),
        "{answer}"
    );

    let mut many = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let answer = exchange(admin, &many);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    srv.wait_metric(&refused("too_large"), |v| v == 2.0);

    // A declared body over 1 KiB is refused unread; a chunked one once it passes 1 KiB.
    let answer = exchange(
        admin,
        b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048576\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        answer.ends_with("request body over 1024 bytes\n"),
        "{answer}"
    );
    let mut chunked =
        b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n500\r\n"
            .to_vec();
    chunked.resize(chunked.len() + 0x500, b'c');
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = exchange(admin, &chunked);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    srv.wait_metric(&refused("too_large"), |v| v == 4.0);

    // A small body is read and ignored; the connection stays usable.
    let mut s = connect(admin);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    assert!(response(&mut s).ends_with("\r\n\r\nok\n"));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    assert!(response(&mut s).ends_with("\r\n\r\nok\n"));

    let answer = exchange(admin, b"NOT HTTP AT ALL\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    srv.wait_metric(&refused("bad_request"), |v| v == 1.0);
    healthz_within_100ms(&srv);
}

#[test]
fn stalled_heads_bodies_and_idle_connections_are_closed() {
    let srv = Server::with_admin("epoll", &[]);
    let admin = srv.admin.unwrap();

    let started = Instant::now();
    let mut never = connect(admin);
    let mut partial = connect(admin);
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    let mut no_body = connect(admin);
    no_body
        .write_all(b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n")
        .unwrap();
    let mut kept = connect(admin);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    assert!(response(&mut kept).ends_with("\r\n\r\nok\n"));
    let answered = Instant::now();
    healthz_within_100ms(&srv);

    // A head not complete within 5 s of its first byte: closed without an answer.
    let took = closed_quietly(&mut partial, started);
    assert!(took >= HEAD_TIMEOUT - SLACK, "closed after {took:?}");
    // A body not sent within 5 s of its head: 408.
    let answer = read_to_close(&mut no_body);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(started.elapsed() >= HEAD_TIMEOUT - SLACK);
    healthz_within_100ms(&srv);
    // No request begun within 10 s of the accept, or of the last response: closed.
    let took = closed_quietly(&mut never, started);
    assert!(took >= IDLE_TIMEOUT - SLACK, "closed after {took:?}");
    let took = closed_quietly(&mut kept, answered);
    assert!(took >= IDLE_TIMEOUT - SLACK, "closed after {took:?}");

    srv.wait_metric(&closed("timeout"), |v| v == 3.0);
    assert_eq!(srv.metric(&refused("timeout")), 1.0);
}

// ---------------------------------------------------------------------------------------
// Reloads

#[test]
fn post_reload_is_rate_limited_without_a_line_each() {
    // (With a file to re-read: without one, a reload has nothing to do.)
    let cfg = TempFile::new("admin.toml", "");
    let srv = Server::with_admin("epoll", &["--config", cfg.arg()]);
    let started = Instant::now();
    let answers: Vec<(u16, String)> = (0..10).map(|_| srv.post("/reload")).collect();
    let took = started.elapsed();

    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let limited: Vec<_> = answers.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(ok + limited.len(), 10, "{answers:?}");
    assert_eq!((answers[0].0, answers[1].0), (200, 200), "a burst of 2");
    assert!(!limited.is_empty(), "10 reloads in {took:?} all applied");
    assert!(
        ok as f64 <= 2.0 + 2.0 * took.as_secs_f64(),
        "{ok} reloads in {took:?}"
    );
    assert_eq!(limited[0].1, "too many reloads: at most 2 a second\n");
    srv.wait_metric(&refused("reload_rate"), |v| v == limited.len() as f64);

    // One refusal line; one "reloaded" line per reload applied (the SIGHUP's, logged
    // last, shows the ones before it are all in).
    srv.signal(libc::SIGHUP);
    wait_until("the SIGHUP's reload is logged", || {
        srv.count_log(&["reloaded"]) > ok
    });
    assert_eq!(srv.count_log(&["reloaded"]), ok + 1);
    assert_eq!(srv.count_log(&["admin request refused"]), 1);
    assert_eq!(srv.count_log(&["admin request refused", "reload_rate"]), 1);
}
