//! End to end: the `velium` command-line tool and the client library against a real server.
//!
//! Every wait is on an event (a line a `velium shim` prints, a process exit, a frame the
//! client receives, a server log line) with the harness's generous deadline; nothing sleeps.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};
use velium_server::client::{Client, ClientError, ClientOptions, Event, Response, Transport};
use velium_server::proto::Token;

// ---------------------------------------------------------------------------------------
// Process helpers.

/// What a `velium shim` wrote on stderr so far, and a signal for each line.
type Stderr = Arc<(Mutex<String>, std::sync::Condvar)>;

/// The text of `stderr` so far.
fn text_of(stderr: &Stderr) -> String {
    stderr.0.lock().unwrap().clone()
}

/// A running `velium shim`, killed on drop.
struct ShimProc {
    /// Taken by `terminate`.
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Stderr,
    /// Reads stderr to its end; joined once the process has exited, so that the text is
    /// whole.
    err_reader: Option<std::thread::JoinHandle<()>>,
}

impl ShimProc {
    /// Starts `velium shim --name NAME EXTRA...` and waits for its `connected as` line.
    fn start(addr: SocketAddr, name: &str, extra: &[&str]) -> ShimProc {
        let mut shim = ShimProc::spawn(addr, name, extra);
        let first = shim.wait_line("connected as");
        assert_eq!(first, format!("connected as {name}"));
        shim
    }

    /// Starts `velium shim --name NAME EXTRA...`.
    fn spawn(addr: SocketAddr, name: &str, extra: &[&str]) -> ShimProc {
        let mut child = Command::new(VELIUM)
            .args(["--server", &addr.to_string(), "shim", "--name", name])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn velium shim");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr: Stderr = Arc::default();
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let (text, cv) = &*sink;
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
                cv.notify_all();
            }
        });
        ShimProc {
            child: Some(child),
            lines,
            seen: Vec::new(),
            stderr,
            err_reader: Some(err_reader),
        }
    }

    /// Waits for a stdout line containing `needle` (one not returned before).
    fn wait_line(&mut self, needle: &str) -> String {
        if let Some(i) = self.seen.iter().position(|l| l.contains(needle)) {
            return self.seen.remove(i);
        }
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "no line with {needle:?}; stdout so far: {:?}; stderr: {:?}",
                    self.seen,
                    text_of(&self.stderr)
                ),
            }
        }
    }

    /// Waits for its stderr to hold `needle`.
    fn wait_stderr(&self, needle: &str) {
        let (text, cv) = &*self.stderr;
        let (text, timeout) = cv
            .wait_timeout_while(text.lock().unwrap(), DEADLINE, |t| !t.contains(needle))
            .unwrap();
        assert!(!timeout.timed_out(), "no {needle:?} on stderr: {text:?}");
    }

    /// Sends SIGTERM and returns the exit code.
    fn terminate(self) -> i32 {
        let child = self.child.as_ref().expect("running");
        let pid = child.id() as i32;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit()
    }

    /// Waits for it to exit on its own; returns the exit code.
    fn wait_exit(mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let code = match rx.recv_timeout(DEADLINE) {
            Ok(status) => status.unwrap().code().expect("exit code"),
            Err(_) => {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("velium shim did not exit (or ignored SIGTERM)");
            }
        };
        // The process is gone, so its stderr ends.
        if let Some(reader) = self.err_reader.take() {
            reader.join().unwrap();
        }
        code
    }
}

impl Drop for ShimProc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A local port with nothing listening: bound, then released.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn sorted_lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().collect();
    v.sort_unstable();
    v
}

// ---------------------------------------------------------------------------------------
// The CLI.

#[test]
fn cli_send_to_two_shims_prints_both_responses() {
    let srv = Server::start("uring", &[]);
    let mut one = ShimProc::start(srv.addr, "cli.zone.one", &[]);
    let mut two = ShimProc::start(srv.addr, "cli.zone.two", &[]);
    let run = velium(srv.addr, &["send", "cli.zone.*", "/say", "hello", "there"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        sorted_lines(&run.stdout),
        [
            "cli.zone.one: /say hello there",
            "cli.zone.two: /say hello there"
        ]
    );
    assert_eq!(run.stderr, "");
    for shim in [&mut one, &mut two] {
        let line = shim.wait_line("/say hello there");
        assert!(
            line.starts_with("command from velium.cli.") && line.contains("(id "),
            "{line}"
        );
    }
}

#[test]
fn cli_send_keeps_multiline_responses_and_hyphen_words() {
    let srv = Server::start("uring", &[]);
    let mut shim = ShimProc::start(srv.addr, "cli.multi", &[]);
    let run = velium(
        srv.addr,
        &[
            "send",
            "--name",
            "op.one",
            "cli.multi",
            "first\nsecond",
            "-x",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    // One line per responder: the line break is shown as the two characters `\n`.
    assert_eq!(run.stdout, "cli.multi: first\\nsecond -x\n");
    // The shim shows it on one line, and names the operator identity given.
    let line = shim.wait_line("command from");
    assert!(line.starts_with("command from op.one (id "), "{line}");
    assert!(line.ends_with("): first\\nsecond -x"), "{line}");
}

#[test]
fn cli_send_no_match_exits_2_with_one_line() {
    let srv = Server::start("uring", &[]);
    let run = velium(srv.addr, &["send", "nobody.home", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, "velium: no shim matches nobody.home\n");
}

#[test]
fn cli_bad_target_exits_2() {
    let srv = Server::start("uring", &[]);
    let run = velium(srv.addr, &["send", "a.>.b", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        "velium: bad target a.>.b: '>' must be the last segment\n"
    );
}

#[test]
fn cli_unreachable_server_exits_2() {
    let addr = dead_addr();
    for args in [
        &["send", "a.b", "/sit"][..],
        &["tell", "a.b", "hi"][..],
        &["who"][..],
    ] {
        let run = velium(addr, args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert_eq!(run.stdout, "");
        assert!(
            run.stderr
                .starts_with(&format!("velium: server unreachable at {addr}: ")),
            "{run:?}"
        );
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    }
}

#[test]
fn cli_send_reports_shims_that_did_not_answer() {
    let srv = Server::start("uring", &[]);
    let _talker = ShimProc::start(srv.addr, "cli.t.talker", &[]);
    // A shim that reads nothing and never answers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _silent = rt.block_on(quiet_client(srv.addr, "cli.t.silent"));
    let run = velium(srv.addr, &["send", "--timeout", "0.3", "cli.t.*", "/loc"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "cli.t.talker: /loc\n");
    // Who did not answer is named.
    assert_eq!(
        run.stderr,
        "velium: 1 of 2 shims did not answer within 300ms: cli.t.silent\n"
    );
}

#[test]
fn cli_tell_reports_how_many_shims_it_reached() {
    let srv = Server::start("uring", &[]);
    let mut a = ShimProc::start(srv.addr, "cli.tell.a", &[]);
    let mut b = ShimProc::start(srv.addr, "cli.tell.b", &["--no-udp"]);
    let run = velium(
        srv.addr,
        &[
            "tell",
            "--name",
            "op.teller",
            "cli.tell.>",
            "restart",
            "soon",
        ],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "reached 2 shims\n");
    assert_eq!(
        a.wait_line("echo from"),
        "echo from op.teller: restart soon"
    );
    assert_eq!(
        b.wait_line("echo from"),
        "echo from op.teller: restart soon"
    );

    let run = velium(srv.addr, &["tell", "CLI.TELL.A", "just", "you"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "reached 1 shim\n"));
    assert!(a.wait_line("echo from").ends_with(": just you"));
}

#[test]
fn cli_tell_no_match_exits_2() {
    let srv = Server::start("uring", &[]);
    let run = velium(srv.addr, &["tell", "nobody.*", "hello"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr, "velium: no shim matches nobody.*\n");
}

#[test]
fn cli_who_lists_shims_with_since_and_udp() {
    let srv = Server::start("uring", &[]);
    let before = SystemTime::now() - Duration::from_secs(2);
    let _a = ShimProc::start(srv.addr, "cli.who.alpha", &[]);
    let _b = ShimProc::start(srv.addr, "cli.who.b", &["--no-udp"]);
    let after = SystemTime::now() + Duration::from_secs(2);

    let run = velium(srv.addr, &["who"]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "its own connection is not listed: {run:?}");
    let rows: Vec<Vec<&str>> = lines
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][0], "cli.who.alpha");
    assert_eq!(rows[0][2], "udp");
    assert_eq!(rows[1][0], "cli.who.b");
    assert_eq!(rows[1][2], "-");
    for r in &rows {
        let since = humantime::parse_rfc3339(r[1]).expect("RFC 3339 time");
        assert!(before <= since && since <= after, "{r:?}");
    }
    // Columns line up.
    assert_eq!(lines[0].find("  2"), lines[1].find("  2"), "{lines:?}");

    let run = velium(srv.addr, &["who", "CLI.WHO.B"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout.lines().count(), 1);
    assert!(run.stdout.starts_with("cli.who.b  "), "{run:?}");
}

#[test]
fn cli_stats_and_who_read_the_admin_listener() {
    let srv = Server::start("uring", &["--admin", "127.0.0.1:0"]);
    let admin = srv.admin.unwrap().to_string();
    let _a = ShimProc::start(srv.addr, "cli.adm.alpha", &[]);
    let _b = ShimProc::start(srv.addr, "cli.adm.b", &["--no-udp"]);
    let run = velium(srv.addr, &["send", "cli.adm.*", "/sit"]);
    assert_eq!(run.code, 0, "{run:?}");
    srv.wait_metric("velium_connections", |v| v == 2.0);

    let run = velium(srv.addr, &["--admin", &admin, "who"]);
    assert_eq!(run.code, 0, "{run:?}");
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{run:?}");
    assert_eq!((rows[0][0], rows[0][3]), ("cli.adm.alpha", "udp"));
    assert!(rows[0][4].starts_with("127.0.0.1:"), "{run:?}");
    assert_eq!((rows[1][0], rows[1][4]), ("cli.adm.b", "-"));
    assert!(
        rows[1][2].starts_with("127.0.0.1:"),
        "peer address: {run:?}"
    );

    let run = velium(srv.addr, &["stats", "--admin", &admin]);
    assert_eq!(run.code, 0, "{run:?}");
    let line = |key: &str| {
        run.stdout
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line: {run:?}"))
            .to_string()
    };
    assert!(line("connections").contains(" 2 (limit "), "{run:?}");
    assert!(
        line("shims").contains("2 identified, 1 with UDP bound"),
        "{run:?}"
    );
    assert!(line("handshake").contains("(n=3)"), "{run:?}");
    assert_eq!(line("errors"), "errors           none");

    let run = velium(srv.addr, &["stats"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--admin"), "{run:?}");
    let run = velium(srv.addr, &["stats", "--admin", &dead_addr().to_string()]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
}

#[test]
fn cli_presents_the_shared_secret() {
    let secret = TempFile::new("secret", "s3cret\n");
    let file = secret.arg();
    let srv = Server::start("epoll", &["--secret-file", file]);
    let mut shim = ShimProc::start(srv.addr, "cli.sec.one", &["--secret-file", file]);
    let run = velium(
        srv.addr,
        &["--secret-file", file, "send", "cli.sec.one", "/sit"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    shim.wait_line("/sit");
    let run = velium(srv.addr, &["send", "cli.sec.one", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        "velium: authentication required (give the hub's secret with --secret-file FILE or \
         VELIUM_SECRET, and --user NAME on a hub with users)\n"
    );
}

#[test]
fn cli_who_without_matches_prints_nothing() {
    let srv = Server::start("uring", &[]);
    let run = velium(srv.addr, &["who", "none.*"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, "velium: no shim matches none.*\n");
}

#[test]
fn cli_help_explains_targets_with_examples() {
    let addr = dead_addr();
    let run = velium(addr, &["send", "--help"]);
    assert_eq!(run.code, 0, "{run:?}");
    for needle in [
        "`*` segment",
        "`>` segment",
        "+peq.>",
        "Examples:",
        "--timeout",
    ] {
        assert!(run.stdout.contains(needle), "send --help lacks {needle:?}");
    }
    for sub in ["tell", "who", "shim"] {
        let run = velium(addr, &[sub, "--help"]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains("Examples:"), "{sub} --help: {run:?}");
    }
    let run = velium(addr, &["tell", "--help"]);
    assert!(run.stdout.contains("starts with `+`"), "{run:?}");
    let run = velium(addr, &["send", "--timeout", "0", "a", "b"]);
    assert_eq!(run.code, 2, "{run:?}");
}

#[test]
fn cli_shim_says_goodbye_on_sigterm() {
    let srv = Server::start("uring", &[]);
    let shim = ShimProc::start(srv.addr, "cli.term", &[]);
    assert_eq!(shim.terminate(), 0);
    srv.wait_log(&["close", "identity=cli.term", "reason=quit"]);
}

#[test]
fn cli_shim_answers_a_udp_command_over_udp() {
    let srv = Server::start("uring", &[]);
    let mut shim = ShimProc::start(srv.addr, "cli.udp.shim", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = quiet_client(srv.addr, "lib.udp.sender").await;
        c.bind_udp().await.unwrap();
        let sent = c.command_udp("cli.udp.shim", "by datagram").await.unwrap();
        assert_eq!(sent.reached, 1);
        let r = c.next_response(sent.id, DEADLINE).await.unwrap();
        assert_eq!(
            r,
            Response {
                id: sent.id,
                from: "cli.udp.shim".into(),
                text: "by datagram".into(),
                via: Transport::Udp
            }
        );
    });
    assert!(
        shim.wait_line("by datagram")
            .starts_with("command from lib.udp.sender (id ")
    );
}

/// A hub with users: `ops` may command anyone, `boxer` may be any character and command
/// nobody. Returns the server and its config (the secret files are beside it).
fn users_hub(io: &str) -> (Server, TempFile) {
    let cfg = users_config(
        "",
        &[
            User::new("ops", "ops-s3cret", &["velium.cli.>"], &[">"]),
            User::new("boxer", "boxer-s3cret", &["peq.*.*"], &[]),
        ],
    );
    let srv = Server::start(io, &["--config", cfg.arg()]);
    (srv, cfg)
}

/// `velium send` counts the shims that answered, not the answers: a shim answering twice
/// gets one line with both, and a silent one is named.
fn cli_send_with_a_user_counts_responders(io: &str) {
    let (srv, cfg) = users_hub(io);
    let (ops, boxer) = (secret_file(&cfg, "ops"), secret_file(&cfg, "boxer"));
    let as_ops = ["--user", "ops", "--secret-file", ops.as_str()];
    let mut once = ShimProc::start(
        srv.addr,
        "peq.z.once",
        &["--user", "boxer", "--secret-file", &boxer],
    );
    // A shim that answers twice, in one write (so both answers arrive together).
    let mut twice = srv.tcp();
    twice.login("boxer", "boxer-s3cret", "peq.z.twice");
    let answerer = std::thread::spawn(move || {
        let (from, id, cmd) = expect_command(&mut twice);
        assert!(from.starts_with("velium.cli."), "{from}");
        assert_eq!(cmd, b"/loc");
        twice.send_raw(
            &[
                frame(0x05, format!("{id} first").as_bytes()),
                frame(0x05, format!("{id} second\x0bline").as_bytes()),
            ]
            .concat(),
        );
        twice
    });
    let run = velium(
        srv.addr,
        &[&as_ops[..], &["send", "peq.z.*", "/loc"]].concat(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        "peq.z.once: /loc\npeq.z.twice: first | second\\nline\n"
    );
    assert_eq!(run.stderr, "");
    assert!(
        once.wait_line("/loc")
            .starts_with("command from velium.cli.")
    );
    answerer.join().unwrap().sync(b"answered");
    // A shim that never answers: exit 1, and it is named.
    let mut silent = srv.tcp();
    silent.login("boxer", "boxer-s3cret", "peq.y.silent");
    let _talker = ShimProc::start(
        srv.addr,
        "peq.y.talker",
        &["--user", "boxer", "--secret-file", &boxer],
    );
    let run = velium(
        srv.addr,
        &[&as_ops[..], &["send", "--timeout", "2", "peq.y.*", "/loc"]].concat(),
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "peq.y.talker: /loc\n");
    assert_eq!(
        run.stderr,
        "velium: 1 of 2 shims did not answer within 2s: peq.y.silent\n"
    );
    assert!(expect_command(&mut silent).0.starts_with("velium.cli."));
}

/// Without the user, or as a user that may not: exit 2 and the hub's reason.
fn cli_needs_a_user_that_may(io: &str) {
    let (srv, cfg) = users_hub(io);
    let boxer = secret_file(&cfg, "boxer");
    let mut target = srv.tcp();
    target.login("boxer", "boxer-s3cret", "peq.z.target");
    let run = velium(srv.addr, &["send", "peq.z.target", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .starts_with("velium: authentication required (give the hub's secret"),
        "{run:?}"
    );
    let run = velium(srv.addr, &["--user", "ops", "send", "peq.z.target", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--secret-file"), "{run:?}");
    // boxer may not be an operator tool...
    let run = velium(
        srv.addr,
        &[
            "--user",
            "boxer",
            "--secret-file",
            &boxer,
            "send",
            "peq.z.target",
            "/sit",
        ],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .starts_with("velium: identity not permitted: velium.cli."),
        "{run:?}"
    );
    // ...and as a character, may command nobody.
    let run = velium(
        srv.addr,
        &[
            "--user",
            "boxer",
            "--secret-file",
            &boxer,
            "send",
            "--name",
            "peq.z.cli",
            "peq.z.target",
            "/sit",
        ],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr, "velium: command not permitted: peq.z.target\n");
    target.sync(b"nothing reached the target");
}

drivers!(
    cli_send_with_a_user_counts_responders,
    cli_needs_a_user_that_may
);

// ---------------------------------------------------------------------------------------
// TLS and the admin token.

/// `velium --tls --ca` talks to a TLS hub, and `velium shim --tls` seals its UDP channel;
/// `--insecure` works and warns on every run; plaintext, or a CA that does not know the
/// hub, fails in one line.
fn cli_over_tls(io: &str) {
    let pki = Pki::new();
    let srv = Server::tls(io, &pki, &[]);
    let tls = ["--tls", "--ca", pki.ca.as_str()];
    let mut shim = ShimProc::start(srv.addr, "cli.tls.one", &tls);
    let run = velium(
        srv.addr,
        &[&tls[..], &["send", "cli.tls.one", "/sit"]].concat(),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "cli.tls.one: /sit\n", "{run:?}");
    assert_eq!(run.stderr, "", "{run:?}");
    shim.wait_line("/sit");

    let run = velium(srv.addr, &["--insecure", "who"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stderr,
        "warning: --insecure: the hub's certificate is not verified\n"
    );
    assert!(run.stdout.starts_with("cli.tls.one  "), "{run:?}");
    assert!(
        run.stdout.trim_end().ends_with("udp"),
        "sealed UDP bound: {run:?}"
    );

    // A command over sealed UDP is answered over it.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let opts = ClientOptions {
            keepalive: None,
            tls: Some(pki.client_tls()),
            ..ClientOptions::default()
        };
        let c = Client::connect_with(srv.addr, "lib.tls.sender", opts)
            .await
            .unwrap();
        c.bind_udp().await.unwrap();
        let sent = c.command_udp("cli.tls.one", "sealed").await.unwrap();
        let r = c.next_response(sent.id, DEADLINE).await.unwrap();
        assert_eq!((r.text.as_str(), r.via), ("sealed", Transport::Udp));
    });
    shim.wait_line("sealed");

    let run = velium(srv.addr, &["send", "cli.tls.one", "/sit"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr, "velium: this port requires TLS\n");
    let other = Pki::new();
    let run = velium(
        srv.addr,
        &["--ca", &other.ca, "send", "cli.tls.one", "/sit"],
    );
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("UnknownIssuer"), "{run:?}");
}

/// `--admin-token-file` presents the admin listener's bearer token; without it, or with a
/// wrong one, `stats` and `who --admin` say so in one line and exit 2.
fn cli_admin_token(io: &str) {
    let token = TempFile::new("admin.token", "t0ken-for-tests\n");
    let wrong = token.sibling("wrong.token", "not-it\n");
    let srv = Server::start(
        io,
        &["--admin", "127.0.0.1:0", "--admin-token-file", token.arg()],
    );
    let admin = srv.admin.unwrap().to_string();
    let _shim = ShimProc::start(srv.addr, "cli.tok.one", &[]);
    for cmd in ["stats", "who"] {
        let run = velium(srv.addr, &["--admin", &admin, cmd]);
        assert_eq!(run.code, 2, "{run:?}");
        assert_eq!(
            run.stderr,
            format!(
                "velium: admin listener at {admin} requires a token: give --admin-token-file FILE\n"
            )
        );
        let run = velium(
            srv.addr,
            &["--admin", &admin, "--admin-token-file", &wrong, cmd],
        );
        assert_eq!(run.code, 2, "{run:?}");
        assert_eq!(
            run.stderr,
            format!(
                "velium: admin listener at {admin} refused the token (401): check --admin-token-file\n"
            )
        );
        let run = velium(
            srv.addr,
            &["--admin", &admin, "--admin-token-file", token.arg(), cmd],
        );
        assert_eq!(run.code, 0, "{run:?}");
    }
    let run = velium(
        srv.addr,
        &["--admin", &admin, "--admin-token-file", token.arg(), "who"],
    );
    assert!(run.stdout.starts_with("cli.tok.one  "), "{run:?}");
}

/// `--cert` and `--key` present a client certificate: on a hub with users and a client
/// CA, its Common Name is the user, with no secret given.
#[test]
fn cli_presents_a_client_certificate() {
    let pki = Pki::new();
    let cfg = users_config(
        "",
        &[User::new("ops", "ops-s3cret", &["cli.ops.>"], &[">"])],
    );
    let srv = Server::tls(
        "epoll",
        &pki,
        &["--config", cfg.arg(), "--tls-client-ca", &pki.ca],
    );
    let (cert, key) = pki.client("ops");
    let args = ["--ca", &pki.ca, "--cert", &cert, "--key", &key];
    let run = velium(
        srv.addr,
        &[&args[..], &["who", "--name", "cli.ops.one"]].concat(),
    );
    // Connected and authenticated (nothing else is): no shim listed is status 2.
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr, "velium: no shims connected\n", "{run:?}");
    let run = velium(srv.addr, &["--ca", &pki.ca, "who", "--name", "cli.ops.two"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
}

drivers!(cli_over_tls, cli_admin_token);

// ---------------------------------------------------------------------------------------
// The client library.

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

#[tokio::test]
async fn client_connects_with_a_token_and_lists_itself() {
    let srv = Server::start("uring", &[]);
    let c = quiet_client(srv.addr, "lib.me").await;
    assert!(Token::is_frame_safe(&c.token().0));
    assert_eq!(&*c.identity(), "lib.me");
    assert_eq!(c.server(), srv.addr);
    assert!(!c.is_udp_bound());

    let before = SystemTime::now() - Duration::from_secs(2);
    let who = c.who(Some("lib.me")).await.unwrap();
    assert_eq!(who.len(), 1);
    assert_eq!(who[0].identity, "lib.me");
    assert!(!who[0].udp);
    assert!(who[0].since >= before && who[0].since <= SystemTime::now() + Duration::from_secs(2));

    c.bind_udp().await.unwrap();
    assert!(c.is_udp_bound());
    let who = c.who(None).await.unwrap();
    assert_eq!(who.len(), 1);
    assert!(who[0].udp);
    srv.wait_log(&["bind", "lib.me"]);
}

#[tokio::test]
async fn client_command_reaches_targets_and_collects_responses() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.cmd.a").await;
    let b = quiet_client(srv.addr, "lib.grp.b").await;
    let c = quiet_client(srv.addr, "lib.grp.c").await;

    let sent = a.command("lib.grp.*", "do\nit").await.unwrap();
    assert_eq!(sent.reached, 2);
    for (t, answer) in [(&b, "b did it"), (&c, "c did\nit")] {
        match event(t).await {
            Event::Command {
                from,
                id,
                text,
                via,
            } => {
                assert_eq!(
                    (&*from, id, text.as_str(), via),
                    ("lib.cmd.a", sent.id, "do\nit", Transport::Tcp)
                );
                // An Echo to the sender first: collect_responses must keep it for later.
                t.echo("lib.cmd.a", "working on it").await.unwrap();
                t.respond(id, answer).await.unwrap();
            }
            other => panic!("expected a command, got {other:?}"),
        }
    }
    let rs = a.collect_responses(sent.id, 2, DEADLINE).await;
    let got: BTreeSet<(String, String)> = rs
        .iter()
        .map(|r| (r.from.to_string(), r.text.clone()))
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("lib.grp.b".to_string(), "b did it".to_string()),
        ("lib.grp.c".to_string(), "c did\nit".to_string()),
    ]
    .into();
    assert_eq!(got, want);
    assert!(
        rs.iter()
            .all(|r| r.id == sent.id && r.via == Transport::Tcp)
    );
    // The two Echoes that arrived meanwhile are still there, in order of arrival.
    for _ in 0..2 {
        match event(&a).await {
            Event::Echo { text, via, .. } => {
                assert_eq!((text.as_str(), via), ("working on it", Transport::Tcp))
            }
            other => panic!("expected the stashed echo, got {other:?}"),
        }
    }
    // A second command gets a new id; nothing answers, so collecting stops at the timeout.
    let again = a.command("lib.grp.b", "again").await.unwrap();
    assert_ne!(again.id, sent.id);
    assert!(
        a.collect_responses(again.id, 1, Duration::from_millis(50))
            .await
            .is_empty()
    );
    assert!(matches!(
        a.next_response(again.id, Duration::from_millis(10)).await,
        Err(ClientError::Timeout(_))
    ));
}

#[tokio::test]
async fn client_echo_leaves_the_sender_out_unless_plus() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.e.a").await;
    let b = quiet_client(srv.addr, "lib.e.b").await;
    assert_eq!(a.echo("lib.e.*", "to others").await.unwrap(), 1);
    assert_eq!(a.echo("+lib.e.*", "to all").await.unwrap(), 2);
    // `a` never saw the first echo: its first event is its own second one.
    assert_eq!(
        event(&a).await,
        Event::Echo {
            from: "lib.e.a".into(),
            text: "to all".into(),
            via: Transport::Tcp
        }
    );
    for text in ["to others", "to all"] {
        match event(&b).await {
            Event::Echo { from, text: t, .. } => {
                assert_eq!((&*from, t.as_str()), ("lib.e.a", text))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        a.echo("lib.e.a", "only me").await,
        Err(ClientError::NoMatch { target }) if target == "lib.e.a"
    ));
}

#[tokio::test]
async fn client_reports_refusals_clearly() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.err.a").await;
    let e = a.command("lib.nobody", "x").await.unwrap_err();
    assert!(matches!(&e, ClientError::NoMatch { target } if target == "lib.nobody"));
    assert_eq!(e.to_string(), "no shim matches lib.nobody");
    let e = a.command("a.>.b", "x").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "bad target a.>.b: '>' must be the last segment"
    );
    // Refused locally, as the hub would, before anything is sent.
    let e = a.who(Some(">.x")).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::BadTarget {
                what: "pattern",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "bad pattern >.x: '>' must be the last segment"
    );
    let e = a.command("", "x").await.unwrap_err();
    assert_eq!(e.to_string(), "bad target \"\": empty target");
    let e = a.echo("peq..bob", "x").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "bad target peq..bob: empty segment at byte 4: segments are joined by single dots"
    );
    // A space would shift words into the text.
    for bad in ["two words", "line\nbreak"] {
        assert!(matches!(
            a.command(bad, "x").await,
            Err(ClientError::Invalid { what: "target", .. })
        ));
    }
    assert!(matches!(
        a.ping(b"a\nb").await,
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        a.rename("has space").await,
        Err(ClientError::Invalid { .. })
    ));
    // The reply queue is still in step after all that.
    a.ping(b"still fine").await.unwrap();
    assert!(matches!(
        a.command_udp("x", "y").await,
        Err(ClientError::NotBound)
    ));
    let e = Client::connect(srv.addr, "bad name").await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Invalid {
                what: "identity",
                ..
            }
        ),
        "{e}"
    );

    let dead = dead_addr();
    let e = Client::connect(dead, "lib.x").await.unwrap_err();
    assert!(matches!(e, ClientError::Unreachable { addr, .. } if addr == dead));
    assert!(
        e.to_string()
            .starts_with(&format!("server unreachable at {dead}: ")),
        "{e}"
    );
}

#[tokio::test]
async fn client_udp_channel_carries_commands_responses_and_echoes() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.u.a").await;
    let b = quiet_client(srv.addr, "lib.u.b").await;
    let tcp_only = quiet_client(srv.addr, "lib.u.c").await;
    a.bind_udp().await.unwrap();
    b.bind_udp().await.unwrap();
    a.ping_udp(b"udp ping").await.unwrap();

    let sent = a.command_udp("lib.u.*", "over udp").await.unwrap();
    assert_eq!(sent.reached, 2);
    let Event::Command { id, via, .. } = event(&b).await else {
        panic!("expected a command")
    };
    assert_eq!((id, via), (sent.id, Transport::Udp));
    b.respond_udp(id, "b over udp").await.unwrap();
    // A target without a UDP channel gets it over TCP; its TCP response reaches the
    // sender over TCP.
    let Event::Command { id, via, .. } = event(&tcp_only).await else {
        panic!("expected a command")
    };
    assert_eq!((id, via), (sent.id, Transport::Tcp));
    tcp_only.respond(id, "c over tcp").await.unwrap();
    let mut rs = a.collect_responses(sent.id, 2, DEADLINE).await;
    rs.sort_by(|x, y| x.from.cmp(&y.from));
    assert_eq!(
        rs.iter()
            .map(|r| (&*r.from, r.text.as_str(), r.via))
            .collect::<Vec<_>>(),
        [
            ("lib.u.b", "b over udp", Transport::Udp),
            ("lib.u.c", "c over tcp", Transport::Tcp)
        ]
    );

    assert_eq!(a.echo_udp("lib.u.b", "echo by udp").await.unwrap(), 1);
    assert_eq!(
        event(&b).await,
        Event::Echo {
            from: "lib.u.a".into(),
            text: "echo by udp".into(),
            via: Transport::Udp
        }
    );
    assert!(matches!(
        a.command_udp("lib.none", "x").await,
        Err(ClientError::NoMatch { .. })
    ));
    // Binding again is harmless.
    a.bind_udp().await.unwrap();
    a.ping_udp(b"after rebind").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_concurrent_requests_get_their_own_replies() {
    // Thirty Who at once are more than one shim may send in a second by default.
    let srv = Server::start("uring", &["--who-per-sec", "0"]);
    let a = Arc::new(quiet_client(srv.addr, "lib.conc.a").await);
    let b = quiet_client(srv.addr, "lib.conc.b").await;
    let tasks: Vec<_> = (0..90)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                match i % 3 {
                    0 => {
                        let e = a.command("lib.conc.nobody", "x").await.unwrap_err();
                        assert!(matches!(e, ClientError::NoMatch { .. }), "{e}");
                        None
                    }
                    1 => {
                        assert_eq!(a.who(Some("lib.conc.*")).await.unwrap().len(), 2);
                        None
                    }
                    _ => {
                        let s = a.command("lib.conc.b", &format!("n{i}")).await.unwrap();
                        assert_eq!(s.reached, 1);
                        Some((s.id, format!("n{i}")))
                    }
                }
            })
        })
        .collect();
    let mut sent = BTreeSet::new();
    for t in tasks {
        if let Some(x) = t.await.unwrap() {
            sent.insert(x);
        }
    }
    assert_eq!(sent.len(), 30, "every command got a distinct id");
    let mut got = BTreeSet::new();
    while got.len() < 30 {
        match event(&b).await {
            Event::Command { id, text, .. } => got.insert((id, text)),
            other => panic!("{other:?}"),
        };
    }
    assert_eq!(got, sent, "each Ack paired with its own command");
}

#[tokio::test]
async fn client_rename_moves_routing() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.r.a").await;
    let b = quiet_client(srv.addr, "lib.r.old").await;
    b.rename("lib.r.new").await.unwrap();
    assert_eq!(&*b.identity(), "lib.r.new");
    // Renames are not answered; the ping proves the server applied it.
    b.ping(b"sync").await.unwrap();
    assert!(matches!(
        a.echo("lib.r.old", "x").await,
        Err(ClientError::NoMatch { .. })
    ));
    assert_eq!(a.echo("lib.r.new", "hi").await.unwrap(), 1);
    assert!(matches!(event(&b).await, Event::Echo { text, .. } if text == "hi"));
}

// Multi-threaded so that the keep-alive task keeps running while the test thread blocks
// on the server log; 20 pings per idle period leave a wide margin on a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keepalive_outlives_the_idle_timeout() {
    let srv = Server::start("uring", &["--idle-timeout", "1s"]);
    let kept = Client::connect_with(
        srv.addr,
        "lib.ka.kept",
        ClientOptions {
            keepalive: Some(Duration::from_millis(50)),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    kept.bind_udp().await.unwrap();
    let idle = quiet_client(srv.addr, "lib.ka.idle").await;
    // The idle client is told why, then Quit, then the connection ends: the timeout has
    // passed.
    let why = "closing: idle timeout: nothing received for 1s";
    assert_eq!(
        event(&idle).await,
        Event::Error {
            message: why.into(),
            via: Transport::Tcp
        }
    );
    assert_eq!(
        event(&idle).await,
        Event::Quit {
            via: Transport::Tcp
        }
    );
    match event(&idle).await {
        Event::Closed { reason } => assert_eq!(
            reason,
            "the server closed the connection: idle timeout: nothing received for 1s"
        ),
        other => panic!("{other:?}"),
    }
    assert!(idle.next_event().await.is_none());
    assert!(idle.is_closed());
    assert!(matches!(
        idle.echo("x", "y").await,
        Err(ClientError::Closed)
    ));
    // The server shuts the socket before it forgets the shim; its close line comes after.
    srv.wait_log(&["close", "lib.ka.idle", "reason=idle"]);
    // Connected before it, the pinging client is still there.
    let who = kept.who(Some("lib.ka.*")).await.unwrap();
    assert_eq!(who.len(), 1, "{who:?}");
    assert_eq!(
        (who[0].identity.as_str(), who[0].udp),
        ("lib.ka.kept", true)
    );
}

/// A hub whose idle timeout is shorter than the client's own keep-alive interval (10 s):
/// the client follows the hub's Terms and pings at its interval, so it outlives the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_the_hubs_terms() {
    let srv = Server::with_admin("uring", &["--idle-timeout", "900ms"]);
    let c = Client::connect(srv.addr, "lib.terms.c").await.unwrap();
    let t = c.terms().expect("the hub sent its Terms");
    assert_eq!((t.idle_timeout_ms, t.ping_ms), (900, 300));
    assert_eq!((t.max_frame, t.answer_window), (16384, 256));
    assert_eq!(t.features, ["state", "filters", "udp"]);
    // Four Pings at the hub's interval span more than the idle timeout.
    let pings = r#"velium_frames_total{direction="in",transport="tcp",opcode="Ping"}"#;
    srv.wait_metric(pings, |v| v >= 4.0);
    assert!(!c.is_closed());
    let who = c.who(Some("lib.terms.*")).await.unwrap();
    assert_eq!(who.len(), 1, "{who:?}");
}

/// A reload that shortens the idle timeout below the client's keep-alive interval (10 s):
/// the hub sends new Terms, and the client pings at their interval from then on, so it
/// outlives the new timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_follows_new_terms_after_a_reload() {
    let cfg = TempFile::new("terms.toml", "idle_timeout = \"30s\"\n");
    let srv = Server::with_admin("uring", &["--config", cfg.arg()]);
    let c = Client::connect(srv.addr, "lib.reterms.c").await.unwrap();
    assert_eq!(c.terms().map(|t| t.ping_ms), Some(10_000));
    cfg.write("idle_timeout = \"900ms\"\n");
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    c.ping(b"after the reload").await.unwrap();
    let t = c.terms().expect("Terms");
    assert_eq!((t.idle_timeout_ms, t.ping_ms), (900, 300));
    // Four Pings at the new interval (and none at the old one, 10 s) span more than the
    // idle timeout.
    let pings = r#"velium_frames_total{direction="in",transport="tcp",opcode="Ping"}"#;
    srv.wait_metric(pings, |v| v >= 5.0);
    assert!(!c.is_closed());
    let who = c.who(Some("lib.reterms.*")).await.unwrap();
    assert_eq!(who.len(), 1, "{who:?}");
}

#[tokio::test]
async fn client_notices_the_server_going_away() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.gone").await;
    a.bind_udp().await.unwrap();
    drop(srv);
    assert!(matches!(event(&a).await, Event::Closed { .. }));
    assert!(a.next_event().await.is_none());
    assert!(matches!(
        a.command("x", "y").await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(a.who(None).await, Err(ClientError::Closed)));
    assert!(matches!(
        a.respond_udp(1, "x").await,
        Err(ClientError::NotBound)
    ));
}

#[tokio::test]
async fn client_close_says_quit() {
    let srv = Server::start("uring", &[]);
    let a = quiet_client(srv.addr, "lib.bye").await;
    let rtt = a.ping(b"hello").await.unwrap();
    assert!(rtt < DEADLINE);
    a.close().await.unwrap();
    srv.wait_log(&["close", "identity=lib.bye", "reason=quit"]);
}

#[tokio::test]
async fn client_keepalive_gives_up_on_a_hung_server() {
    let srv = Server::start("uring", &[]);
    let opts = ClientOptions {
        keepalive: Some(Duration::from_millis(50)),
        request_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let c = Client::connect_with(srv.addr, "lib.hung", opts)
        .await
        .unwrap();
    c.ping(b"alive").await.unwrap();
    srv.freeze();
    match event(&c).await {
        Event::Closed { reason } => assert!(reason.starts_with("no Pong within"), "{reason}"),
        other => panic!("expected the connection to end, got {other:?}"),
    }
    assert!(c.is_closed());
    assert!(matches!(c.ping(b"x").await, Err(ClientError::Closed)));
}

#[tokio::test]
async fn client_udp_exchange_recovers_after_a_missing_reply() {
    let srv = Server::start("uring", &[]);
    let opts = ClientOptions {
        keepalive: None,
        udp_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let a = Client::connect_with(srv.addr, "lib.sync.a", opts)
        .await
        .unwrap();
    let b = quiet_client(srv.addr, "lib.sync.b").await;
    a.bind_udp().await.unwrap();
    // Frozen, the server answers nothing: the first exchange times out, and its Ack is
    // still owed when the server resumes.
    srv.freeze();
    assert!(matches!(
        a.command_udp("lib.sync.b", "first").await,
        Err(ClientError::Timeout(_))
    ));
    srv.thaw();
    let second = a.command_udp("lib.sync.b", "second").await.unwrap();
    let mut ids = std::collections::HashMap::new();
    for _ in 0..2 {
        match event(&b).await {
            Event::Command { id, text, .. } => ids.insert(text, id),
            other => panic!("{other:?}"),
        };
    }
    assert_ne!(ids["first"], ids["second"]);
    assert_eq!(
        second.id, ids["second"],
        "the late Ack for `first` was not taken for the Ack of `second`"
    );
}

#[tokio::test]
async fn client_binds_the_source_address_it_is_given() {
    for io in ["uring", "epoll"] {
        let srv = Server::start(io, &[]);
        let opts = ClientOptions {
            keepalive: None,
            bind_ip: Some("127.0.0.2".parse().unwrap()),
            ..ClientOptions::default()
        };
        let c = Client::connect_with(srv.addr, "lib.src.two", opts.clone())
            .await
            .unwrap_or_else(|e| panic!("{io}: connect from 127.0.0.2: {e}"));
        // The server saw both sockets come from the chosen address.
        srv.wait_log(&["connect", "peer=127.0.0.2:"]);
        c.bind_udp().await.unwrap();
        srv.wait_log(&["bind", "identity=lib.src.two", "src=127.0.0.2:"]);
        assert_eq!(c.who(Some("lib.src.two")).await.unwrap().len(), 1);
        // Another address, another peer; the default still lets the kernel choose.
        let three = ClientOptions {
            bind_ip: Some("127.0.0.3".parse().unwrap()),
            ..opts.clone()
        };
        let d = Client::connect_with(srv.addr, "lib.src.three", three)
            .await
            .unwrap();
        srv.wait_log(&["connect", "peer=127.0.0.3:"]);
        assert_eq!(d.echo("lib.src.two", "hi").await.unwrap(), 1);
        match event(&c).await {
            Event::Echo { from, text, .. } => assert_eq!((&*from, &*text), ("lib.src.three", "hi")),
            other => panic!("{io}: expected the echo, got {other:?}"),
        }
        let plain = quiet_client(srv.addr, "lib.src.any").await;
        plain.ping(b"x").await.unwrap();
        srv.wait_log(&["connect", "peer=127.0.0.1:"]);
    }

    // An address of the wrong family, or one this host does not have, is refused before
    // anything is sent.
    let srv = Server::start("uring", &[]);
    for (ip, why) in [
        ("::1", "address family"),
        ("192.0.2.1", "cannot bind to 192.0.2.1"),
    ] {
        let opts = ClientOptions {
            bind_ip: Some(ip.parse().unwrap()),
            ..ClientOptions::default()
        };
        let e = Client::connect_with(srv.addr, "lib.src.bad", opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Invalid { what: "bind_ip", why: w } if w.contains(why)),
            "{ip}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// One voice: arguments checked before connecting, exit codes, --json, reconnecting.

#[test]
fn cli_targets_are_checked_as_the_hub_would_before_connecting() {
    // Nothing listens: every refusal here is made before any connection.
    let addr = dead_addr();
    let cases: &[(&[&str], &str)] = &[
        (
            &["send", "", "/sit"],
            "velium: bad target \"\": empty target",
        ),
        (&["send", "+", "/sit"], "velium: bad target +: empty target"),
        (
            &["send", "peq..x", "/sit"],
            "velium: bad target peq..x: empty segment at byte 4: segments are joined by \
             single dots",
        ),
        (
            &["tell", "a.>.b", "hi"],
            "velium: bad target a.>.b: '>' must be the last segment",
        ),
        // `velium send peq.> /sit` unquoted: the shell leaves `peq.` and no command.
        (
            &["send", "peq."],
            "velium: bad target peq.: empty segment at byte 4: segments are joined by \
             single dots (an unquoted > is a redirection to the shell: quote the target, \
             as in 'peq.>')",
        ),
        (&["send", "peq.>"], "velium: no command after the target"),
        (&["tell", "peq.>"], "velium: no text after the target"),
        (
            &["who", "+peq.>"],
            "velium: bad pattern +peq.>: who lists shims, and a `+` (the sender included) \
             is for send and tell targets: write peq.>",
        ),
        (
            &["who", "peq..x"],
            "velium: bad pattern peq..x: empty segment at byte 4: segments are joined by \
             single dots",
        ),
        (
            &["state", ".peq"],
            "velium: bad pattern .peq: empty segment at byte 0: segments are joined by \
             single dots",
        ),
        (
            &["watch", "a.>.b"],
            "velium: bad pattern a.>.b: '>' must be the last segment",
        ),
    ];
    for (args, want) in cases {
        let run = velium(addr, args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert_eq!(run.stdout, "", "{args:?}");
        assert_eq!(run.stderr, format!("{want}\n"), "{args:?}");
    }
}

#[test]
fn cli_timeout_bounds_the_connection_too() {
    // A listener that never answers: the kernel completes the handshake, nobody reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    for args in [
        &["who", "--timeout", "200ms"][..],
        &["send", "--timeout", "200ms", "a.b", "/sit"][..],
        &["state", "--timeout", "0.2", "a.b"][..],
    ] {
        let run = velium(addr, args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(run.stderr.contains("200ms"), "{args:?}: {run:?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    }
}

#[test]
fn cli_help_shows_each_command_only_its_options_and_the_exit_codes() {
    let addr = dead_addr();
    let run = velium(addr, &["stats", "--help"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("--admin"), "{run:?}");
    for absent in ["--server", "--tls", "--secret-file", "--timeout"] {
        assert!(!run.stdout.contains(absent), "stats --help lists {absent}");
    }
    let run = velium(addr, &["shim", "--help"]);
    assert!(run.stdout.contains("--server"), "{run:?}");
    assert!(!run.stdout.contains("--admin"), "shim --help lists --admin");
    let run = velium(addr, &["--help"]);
    for needle in ["Exit status", "  0  ", "  1  ", "  2  "] {
        assert!(
            run.stdout.contains(needle),
            "velium --help lacks {needle:?}"
        );
    }
    // The hub's options work after the command as well as before it.
    let run = Command::new(VELIUM)
        .args(["who", "--server", &addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8(run.stderr).unwrap();
    assert!(
        stderr.starts_with(&format!("velium: server unreachable at {addr}: ")),
        "{stderr}"
    );
}

/// A shim (of the client library) that answers every command `n` times, `TEXT #i`.
async fn chatty_shim(addr: SocketAddr, name: &str, n: usize) -> tokio::task::JoinHandle<()> {
    let c = quiet_client(addr, name).await;
    tokio::spawn(async move {
        while let Some(ev) = c.next_event().await {
            if let Event::Command { id, text, .. } = ev {
                for i in 1..=n {
                    c.respond(id, &format!("{text} #{i}")).await.unwrap();
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_send_keeps_every_answer_of_a_shim_that_answers_several_times() {
    let srv = Server::start("uring", &[]);
    let _a = chatty_shim(srv.addr, "many.a", 3).await;
    let _b = chatty_shim(srv.addr, "many.b", 1).await;
    let addr = srv.addr;
    let run = tokio::task::spawn_blocking(move || velium(addr, &["send", "many.*", "/loc"]))
        .await
        .unwrap();
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.stdout,
        "many.a: /loc #1 | /loc #2 | /loc #3\nmany.b: /loc #1\n"
    );
    let run = tokio::task::spawn_blocking(move || {
        velium(addr, &["send", "--json", "many.a", "two\nlines"])
    })
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["reached"], 1);
    assert_eq!(v["answered"][0]["identity"], "many.a");
    // The answers as sent: line breaks are line breaks in JSON.
    assert_eq!(
        v["answered"][0]["answers"],
        serde_json::json!(["two\nlines #1", "two\nlines #2", "two\nlines #3"])
    );
    assert_eq!(v["silent"], serde_json::json!([]));
}

#[test]
fn cli_json_listings_for_scripts() {
    let srv = Server::start("uring", &["--admin", "127.0.0.1:0"]);
    let _bob = ShimProc::start(
        srv.addr,
        "js.z.bob",
        &["--set", "class=CLR", "--set", "note=a b"],
    );
    let _al = ShimProc::start(srv.addr, "js.z.al", &["--no-udp"]);
    let json = |args: &[&str]| -> (i32, serde_json::Value) {
        let run = velium(srv.addr, args);
        let v =
            serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:?}"));
        (run.code, v)
    };
    let (code, who) = json(&["who", "--json", "js.>"]);
    assert_eq!(code, 0);
    let who = who.as_array().unwrap();
    assert_eq!(who.len(), 2);
    assert_eq!(who[0]["identity"], "js.z.al");
    assert_eq!(who[0]["udp"], false);
    assert_eq!(who[1]["identity"], "js.z.bob");
    assert_eq!(who[1]["udp"], true);
    let since = who[0]["since"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(since).is_ok(), "{since}");

    let (code, none) = json(&["who", "--json", "nobody.*"]);
    assert_eq!((code, none), (2, serde_json::json!([])));

    let (code, state) = json(&["state", "--json", "js.>", "class=CLR"]);
    assert_eq!(code, 0);
    assert_eq!(
        state,
        serde_json::json!([{"identity": "js.z.bob", "state": {"class": "CLR", "note": "a b"}}])
    );

    let admin = srv.admin.unwrap().to_string();
    let (code, stats) = json(&["stats", "--json", "--admin", &admin]);
    assert_eq!(code, 0);
    assert_eq!(stats["shims"], srv.metric("velium_shims") as u64);
    assert!(
        stats["handshake"]["count"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(
        stats["frames_in"]["tcp_frames"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["refused"].is_object(), "{stats}");

    let (code, listed) = json(&["who", "--json", "--admin", &admin, "js.z.bob"]);
    assert_eq!(code, 0);
    assert_eq!(listed[0]["identity"], "js.z.bob");
    assert_eq!(listed[0]["since"], who[1]["since"]);
    assert!(
        listed[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

#[test]
fn cli_shim_connects_again_when_the_hub_restarts() {
    let mut srv = Server::start("uring", &[]);
    let listen = srv.addr.to_string();
    let mut shim = ShimProc::start(srv.addr, "again.bob", &["--set", "hp=1"]);
    srv.signal(libc::SIGTERM);
    srv.wait_exit();
    // The same address again: the shim comes back on its own, its keys set again.
    let srv = Server::spawn(&["--listen", &listen, "--cores", "1"]);
    assert_eq!(shim.wait_line("connected as"), "connected as again.bob");
    let run = velium(srv.addr, &["state", "again.bob"]);
    assert_eq!(run.stdout, "again.bob hp=1\n", "{run:?}");
    let run = velium(srv.addr, &["send", "again.bob", "/sit"]);
    assert_eq!(run.stdout, "again.bob: /sit\n", "{run:?}");
    let stderr = shim.stderr.clone();
    assert_eq!(shim.terminate(), 0);
    let stderr = text_of(&stderr);
    // Why, once (the hub's closing Error is not printed again), and when it tries again.
    assert!(
        stderr.starts_with(
            "velium: the server closed the connection: server shutting down; connecting \
             again in "
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("server error"), "{stderr}");
}

#[test]
fn cli_shim_replaced_by_a_newer_one_exits_instead_of_taking_turns() {
    let srv = Server::start("uring", &[]);
    let old = ShimProc::start(srv.addr, "twice.bob", &[]);
    let new = ShimProc::start(srv.addr, "twice.bob", &[]);
    let stderr = old.stderr.clone();
    assert_eq!(old.wait_exit(), 1);
    let stderr = text_of(&stderr);
    assert!(
        stderr.starts_with("velium: the server closed the connection: replaced: "),
        "{stderr}"
    );
    assert!(!stderr.contains("connecting again"), "{stderr}");
    // The newer one stays.
    let run = velium(srv.addr, &["who", "twice.bob"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(new.terminate(), 0);

    // --no-reconnect: a lost connection ends the shim, status 1.
    let mut srv = srv;
    let lone = ShimProc::start(srv.addr, "lone.bob", &["--no-reconnect"]);
    srv.signal(libc::SIGTERM);
    srv.wait_exit();
    assert_eq!(lone.wait_exit(), 1);
}

#[test]
fn cli_shim_waits_for_a_hub_not_up_yet() {
    let addr = dead_addr();
    let mut shim = ShimProc::spawn(addr, "early.bob", &["--no-udp"]);
    // Started once the shim has found nothing there: the shim finds it once it listens.
    shim.wait_stderr("; connecting again in ");
    let _srv = Server::spawn(&["--listen", &addr.to_string(), "--cores", "1"]);
    assert_eq!(shim.wait_line("connected as"), "connected as early.bob");
    let stderr = shim.stderr.clone();
    assert_eq!(shim.terminate(), 0);
    let stderr = text_of(&stderr);
    assert!(
        stderr.starts_with(&format!("velium: server unreachable at {addr}: ")),
        "{stderr}"
    );
    assert!(stderr.contains("; connecting again in "), "{stderr}");

    // With --no-reconnect, a hub that cannot be reached is nothing done: status 2.
    let addr = dead_addr();
    let lone = ShimProc::spawn(addr, "early.al", &["--no-reconnect"]);
    assert_eq!(lone.wait_exit(), 2);
}

#[test]
fn cli_options_on_the_command_line_beat_the_environment() {
    let srv = Server::start("uring", &["--admin", "127.0.0.1:0"]);
    let _bob = ShimProc::start(srv.addr, "env.bob", &[]);
    let dead = dead_addr().to_string();
    let admin = srv.admin.unwrap().to_string();
    let live = srv.addr.to_string();
    // (VELIUM_ADMIN would make `who` read the admin listener: one variable at a time.)
    for (var, args) in [
        ("VELIUM_SERVER", &["--server", &live, "who", "env.bob"][..]),
        ("VELIUM_SERVER", &["who", "--server", &live, "env.bob"][..]),
        ("VELIUM_ADMIN", &["--admin", &admin, "stats"][..]),
        ("VELIUM_ADMIN", &["stats", "--admin", &admin][..]),
    ] {
        let run = Command::new(VELIUM)
            .args(args)
            .env(var, &dead)
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(0), "{args:?}: {run:?}");
    }
    // The environment, when the command line says nothing; after the command beats before.
    let run = Command::new(VELIUM)
        .args(["who", "env.bob"])
        .env("VELIUM_SERVER", &live)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let run = Command::new(VELIUM)
        .args(["--server", &dead, "who", "--server", &live, "env.bob"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{run:?}");
}
