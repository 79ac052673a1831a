//! Operations: the admin listener, connection limits, access control (allowed networks,
//! shared secret), graceful shutdown, reload and `--check-config`.
//!
//! Each test runs a real server process on 127.0.0.1; counters are read from its
//! `/metrics` and waited on until they settle, never after a sleep.

mod common;
use common::*;

use std::process::Command;
use velium_server::client::{Client, ClientError, ClientOptions};

// ---------------------------------------------------------------------------------------
// Admin listener

fn metrics_count_connections_frames_and_latency(io: &str) {
    let srv = Server::with_admin(io, &[]);
    assert_eq!(srv.get("/healthz"), (200, "ok\n".into()));
    let mut a = srv.tcp();
    let token = a.identify("peq.ecommons.alice");
    let mut b = srv.tcp();
    b.identify("peq.ecommons.bob");
    let _pending = srv.tcp();
    let udp = srv.udp();
    udp.bind_confirmed(&token);
    a.send(0x04, b"peq.ecommons.bob sit");
    assert!(b.expect(0x04).ends_with(b" sit"));
    a.expect(0x0C);

    srv.wait_metric("velium_connections", |v| v == 3.0);
    assert_eq!(srv.metric("velium_shims"), 2.0);
    assert_eq!(srv.metric("velium_udp_bound"), 1.0);
    let (_, m) = srv.get("/metrics");
    let sample = |name: &str| velium_server::admin::sample(&m, name);
    assert_eq!(
        sample(r#"velium_frames_total{direction="in",transport="tcp",opcode="Command"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(r#"velium_bytes_total{direction="in",transport="tcp",opcode="Command"}"#),
        Some(22.0),
        "opcode + 20 bytes + 0x0A"
    );
    assert_eq!(
        sample(r#"velium_frames_total{direction="out",transport="tcp",opcode="Session"}"#),
        Some(2.0)
    );
    assert!(
        sample(r#"velium_frames_total{direction="in",transport="udp",opcode="Session"}"#)
            .is_some_and(|n| n >= 1.0)
    );
    assert_eq!(sample("velium_handshake_seconds_count"), Some(2.0));
    assert!(sample(r#"velium_handshake_seconds{quantile="0.99"}"#).is_some_and(|v| v > 0.0));
    assert!(sample("velium_udp_bind_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(m.contains("# TYPE velium_frames_total counter"));

    // A bad request is counted by kind.
    a.send(0x04, b"nobody.here x");
    a.expect_error("no shim matches");
    srv.wait_metric(r#"velium_errors_total{kind="no_match"}"#, |v| v == 1.0);

    drop(b);
    srv.wait_metric("velium_connections", |v| v == 2.0);
    assert_eq!(srv.metric("velium_shims"), 1.0);
}

fn shims_lists_identity_peer_core_and_udp(io: &str) {
    let srv = Server::with_admin(io, &[]);
    let mut a = srv.tcp();
    let token = a.identify("peq.ecommons.alice");
    let mut b = srv.tcp();
    b.identify("live.ecommons.bob");
    let udp = srv.udp();
    udp.bind_confirmed(&token);
    a.sync(b"x");

    let (status, body) = srv.get("/shims?pattern=peq.%3E");
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    let alice = &list[0];
    assert_eq!(alice["identity"], "peq.ecommons.alice");
    assert_eq!(alice["peer"], a.s.local_addr().unwrap().to_string());
    assert_eq!(alice["udp"], udp.s.local_addr().unwrap().to_string());
    assert!(alice["core"].as_u64().unwrap() < 2);
    assert!(alice["frames_in"].as_u64().unwrap() >= 2, "{body}");
    assert!(alice["frames_out"].as_u64().unwrap() >= 2, "{body}");
    assert!(alice["connected_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);

    let (_, all) = srv.get("/shims");
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all[0]["identity"], "live.ecommons.bob");
    assert_eq!(all[0]["udp"], serde_json::Value::Null);

    let (status, body) = srv.get("/shims?pattern=a.%3E.b");
    assert_eq!(status, 400);
    assert!(body.contains("bad pattern"), "{body}");
    assert_eq!(srv.get("/nothing").0, 404);
    assert_eq!(srv.post("/metrics").0, 405);
}

// ---------------------------------------------------------------------------------------
// Limits

fn total_connection_limit_refuses_with_an_error(io: &str) {
    let srv = Server::with_admin(io, &["--max-connections", "2"]);
    let mut a = srv.tcp();
    a.identify("a");
    let mut b = srv.tcp();
    b.identify("b");
    let mut c = srv.tcp();
    assert_eq!(c.expect_error("too many"), "too many connections");
    c.expect_closed();
    srv.wait_metric(r#"velium_refused_total{reason="max_connections"}"#, |v| {
        v == 1.0
    });
    // The others are untouched, and a freed slot is usable again.
    a.sync(b"a");
    b.sync(b"b");
    drop(b);
    srv.wait_metric("velium_connections", |v| v == 1.0);
    srv.tcp().identify("c");
}

fn per_source_limits_refuse_with_an_error(io: &str) {
    let srv = Server::with_admin(
        io,
        &[
            "--max-connections-per-source",
            "2",
            "--connect-rate-per-source",
            "1000",
        ],
    );
    let mut a = srv.tcp();
    a.identify("a");
    // Admitted (answered) before the next connect: two cores accept in any order.
    let mut b = srv.tcp();
    b.sync(b"b");
    let mut c = srv.tcp();
    assert_eq!(
        c.expect_error("too many"),
        "too many connections from this address"
    );
    srv.wait_metric(r#"velium_refused_total{reason="per_source"}"#, |v| v == 1.0);
    a.sync(b"fine");

    // Attempts beyond the burst within the second are refused. (Connecting is fast, but
    // a loaded machine may let the bucket refill a little: keep trying past the burst.)
    let srv = Server::with_admin(io, &["--connect-rate-per-source", "2"]);
    let mut admitted = Vec::new();
    let refusal = (0..20).find_map(|_| {
        let mut c = srv.tcp();
        c.send(0x06, b"p");
        match c.recv() {
            (0x07, _) => {
                admitted.push(c);
                None
            }
            (op, data) => Some((op, String::from_utf8(data).unwrap())),
        }
    });
    assert_eq!(refusal, Some((0x09, "connecting too fast".into())));
    assert!(admitted.len() >= 2, "the burst is admitted");
    srv.wait_metric(r#"velium_refused_total{reason="rate"}"#, |v| v >= 1.0);
    for c in &mut admitted {
        c.sync(b"fine");
    }
}

fn sources_outside_the_allowed_networks_are_dropped(io: &str) {
    let srv = Server::with_admin(io, &["--allow-network", "10.0.0.0/8"]);
    let mut c = srv.tcp();
    assert!(c.expect_closed().is_empty(), "closed without a byte");
    let udp = srv.udp();
    udp.send(0x06, b"ping");
    srv.wait_metric("velium_datagrams_refused_total", |v| v == 1.0);
    srv.wait_metric(r#"velium_refused_total{reason="allow_list"}"#, |v| v == 2.0);
    srv.wait_log(&["refused", "127.0.0.1", "allow_list"]);
    // Logged once a minute per source, not once per attempt.
    srv.tcp().expect_closed();
    srv.wait_metric(r#"velium_refused_total{reason="allow_list"}"#, |v| v == 3.0);
    assert_eq!(srv.count_log(&["refused", "allow_list"]), 1);

    let srv = Server::with_admin(
        io,
        &[
            "--allow-network",
            "10.0.0.0/8",
            "--allow-network",
            "127.0.0.0/8",
        ],
    );
    srv.tcp().identify("inside");
}

// ---------------------------------------------------------------------------------------
// Shared secret

fn the_secret_is_required_before_identify(io: &str) {
    let secret = TempFile::new("secret", "open sesame\n");
    let srv = Server::with_admin(io, &["--secret-file", secret.arg()]);
    let mut good = srv.tcp();
    good.send(0x0F, b"open sesame");
    good.identify("good");

    let mut none = srv.tcp();
    none.send(0x01, b"none");
    assert_eq!(
        none.expect_error("authentication"),
        "authentication required"
    );
    none.expect_closed();

    let mut wrong = srv.tcp();
    wrong.send(0x0F, b"open sesame!");
    wrong.send(0x01, b"wrong");
    assert_eq!(
        wrong.expect_error("authentication"),
        "authentication failed"
    );
    wrong.expect_closed();
    srv.wait_metric(r#"velium_refused_total{reason="auth"}"#, |v| v == 2.0);
    good.sync(b"unaffected");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = |secret: &[u8]| ClientOptions {
            secret: Some(secret.to_vec()),
            keepalive: None,
            ..ClientOptions::default()
        };
        let c = Client::connect_with(srv.addr, "lib.client", opts(b"open sesame"))
            .await
            .unwrap();
        c.ping(b"p").await.unwrap();
        let e = Client::connect_with(srv.addr, "lib.bad", opts(b"nope"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&e, ClientError::Server(m) if m == "authentication failed"),
            "{e:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Shutdown and reload

fn sigterm_sends_quit_to_every_connection_and_exits_zero(io: &str) {
    let mut srv = Server::with_admin(io, &["--shutdown-timeout", "5s"]);
    let mut a = srv.tcp();
    a.identify("a");
    let mut pending = srv.tcp();
    pending.sync(b"accepted");
    srv.signal(libc::SIGTERM);
    let closing = vec![
        (0x09, b"closing: server shutting down".to_vec()),
        (0x03, vec![]),
    ];
    assert_eq!(a.expect_closed(), closing);
    assert_eq!(pending.expect_closed(), closing);
    let status = srv.wait_exit();
    assert!(status.success(), "{status}");
    // The last line: each counter a field of its own, durations in one unit.
    let last = srv.wait_log(&["shut down", "handshake"]);
    for field in ["accepted=2 ", "identified=1 ", "took_ms="] {
        assert!(last.contains(field), "{field} missing: {last}");
    }
    assert!(!last.contains("Counters {"), "debug output in {last}");
    // The driver as the banner names it, and the admin listener's start.
    let want = if io == "epoll" {
        "io=epoll"
    } else {
        "io=io_uring"
    };
    srv.wait_log(&["listening", want]);
    srv.wait_log(&["admin listener", "addr=127.0.0.1:"]);
}

fn sighup_and_post_reload_apply_live_settings(io: &str) {
    let base = format!("listen = \"127.0.0.1:0\"\ncores = 2\nio = \"{io}\"\n");
    let cfg = TempFile::new("live.toml", &base);
    let srv = Server::spawn(&[
        "--config",
        cfg.arg(),
        "--admin",
        "127.0.0.1:0",
        "--log-level",
        "debug",
    ]);
    let mut a = srv.tcp();
    a.identify("a");
    cfg.write(&format!(
        "{}max_connections = 1\n",
        base.replace("cores = 2", "cores = 1")
    ));
    srv.signal(libc::SIGHUP);
    srv.wait_log(&["reloaded", "max_connections", "restart_needed=cores"]);
    let mut b = srv.tcp();
    assert_eq!(b.expect_error("too many"), "too many connections");
    a.sync(b"kept");

    cfg.write("max_frame = 5\n");
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("max_frame"), "{body}");
    cfg.write(&base);
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        "reloaded; applied: max_connections; need a restart: none\n"
    );
    srv.tcp().identify("b");
}

/// A reload that changes what the Terms say sends every identified shim new ones at once:
/// a raw connection reads them as its next frame, the client library takes them; a
/// connection that identifies afterwards gets the new ones with its Session; a reload
/// that changes nothing they say sends none.
fn a_reload_sends_new_terms_to_every_shim(io: &str) {
    let base = format!(
        "listen = \"127.0.0.1:0\"\ncores = 2\nio = \"{io}\"\nconnect_rate_per_source = 0\n"
    );
    let cfg = TempFile::new("terms.toml", &format!("{base}idle_timeout = \"30s\"\n"));
    let srv = Server::spawn(&["--config", cfg.arg(), "--admin", "127.0.0.1:0"]);
    let mut a = srv.tcp();
    a.send(0x01, b"ops.terms.a");
    assert_eq!(a.expect(0x02).len(), 16);
    let t = a.expect_terms();
    assert_eq!((t.idle_timeout_ms, t.ping_ms), (30_000, 10_000));
    let mut later = srv.tcp();
    later.sync(b"not identified yet");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt
        .block_on(Client::connect(srv.addr, "ops.terms.lib"))
        .unwrap();
    assert_eq!(c.terms().map(|t| t.ping_ms), Some(10_000));

    cfg.write(&format!("{base}idle_timeout = \"12s\"\n"));
    srv.signal(libc::SIGHUP);
    let t = a.expect_terms();
    assert_eq!((t.idle_timeout_ms, t.ping_ms), (12_000, 4_000));
    assert_eq!(
        (t.max_frame, t.outbound_limit, t.answer_window),
        (16_384, 1_048_576, 256)
    );
    assert_eq!(t.features, ["state", "filters", "udp"]);
    srv.wait_log(&["reloaded", "applied=idle_timeout"]);
    // The Terms were queued before the reload was logged: a Pong asked for now comes
    // after them, so the client has read them when its ping returns.
    rt.block_on(c.ping(b"after the reload")).unwrap();
    let t = c.terms().expect("Terms");
    assert_eq!((t.idle_timeout_ms, t.ping_ms), (12_000, 4_000));
    later.send(0x01, b"ops.terms.later");
    later.expect(0x02);
    assert_eq!(later.expect_terms().idle_timeout_ms, 12_000);

    // A setting the Terms do not carry: no Terms, the next frame is the Pong.
    cfg.write(&format!(
        "{base}idle_timeout = \"12s\"\nmax_connections = 100\n"
    ));
    let (status, body) = srv.post("/reload");
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            "reloaded; applied: max_connections; need a restart: none\n"
        )
    );
    a.sync(b"no Terms");
    later.sync(b"no Terms");
    // One they carry, by POST /reload: everyone hears of it.
    cfg.write(&format!(
        "{base}idle_timeout = \"12s\"\nmax_connections = 100\nmax_frame = 8192\n"
    ));
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 200, "{body}");
    for s in [&mut a, &mut later] {
        let t = s.expect_terms();
        assert_eq!((t.max_frame, t.idle_timeout_ms), (8192, 12_000));
        s.sync(b"after");
    }
    rt.block_on(c.ping(b"again")).unwrap();
    assert_eq!(c.terms().map(|t| t.max_frame), Some(8192));
    assert!(!c.is_closed());
}

/// A hub started without --config, and no flag naming a file, has nothing to re-read:
/// SIGHUP and POST /reload say so (409), and change nothing.
#[test]
fn a_reload_without_a_config_file_says_there_is_nothing_to_reload() {
    let srv = Server::with_admin("epoll", &["--idle-timeout", "20s"]);
    let mut a = srv.tcp();
    a.identify("ops.nothing.a");
    let (status, body) = srv.post("/reload");
    assert_eq!(
        (status, body.as_str()),
        (
            409,
            "nothing to reload: the hub was started without --config\n"
        )
    );
    srv.signal(libc::SIGHUP);
    let line = srv.wait_log(&["nothing to reload: the hub was started without --config"]);
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(srv.count_log(&["reloaded"]), 0);
    a.sync(b"still served");
    srv.tcp().identify("ops.nothing.b");
}

/// A file that fails to load on a reload: POST /reload answers the parser's lines (the
/// line, the column, a caret under the spot), the log takes them in one line, and the
/// settings stay.
fn a_reload_answers_a_toml_error_in_its_lines(io: &str) {
    let base = format!("listen = \"127.0.0.1:0\"\ncores = 2\nio = \"{io}\"\n");
    let cfg = TempFile::new("typo.toml", &base);
    let srv = Server::spawn(&["--config", cfg.arg(), "--admin", "127.0.0.1:0"]);
    let mut a = srv.tcp();
    a.identify("ops.typo.a");
    cfg.write(&format!("{base}idle_timeout = 5\n"));
    let (status, body) = srv.post("/reload");
    assert_eq!(status, 500, "{body}");
    let want = format!(
        "reload failed, settings unchanged: config file {}:\n\
         TOML parse error at line 4, column 16\n  |\n4 | idle_timeout = 5\n  |                ^\n\
         idle_timeout = 5: a duration is a string with a unit, such as \"5s\" or \"500ms\"\n",
        cfg.arg()
    );
    assert_eq!(body, want);
    let line = srv.wait_log(&["reload failed; settings unchanged"]);
    assert!(
        line.contains(&format!(
            "config file {}: line 4, column 16: idle_timeout = 5: a duration is a string",
            cfg.arg()
        )),
        "{line}"
    );
    a.sync(b"kept");
    assert_eq!(srv.count_log(&["reloaded"]), 0);
}

fn check_config_validates_only(io: &str) {
    let _ = io;
    let good = TempFile::new(
        "good.toml",
        "admin = \"127.0.0.1:9100\"\nmax_connections = 10\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_velium-server"))
        .args(["--check-config", good.arg()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", good.arg())
    );
    // `--check-config` on the file holding `text`: status 2, and what it wrote on stderr.
    let refused = |text: &str| {
        good.write(text);
        let out = Command::new(env!("CARGO_BIN_EXE_velium-server"))
            .args(["--check-config", good.arg()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A value out of its range: one line.
    for bad in [
        "allow_networks = [\"10.0.0.0/40\"]\n",
        "[[command_rule]]\nfrom = \"x\"\nto = [\">\"]\n",
        "shutdown_timeout = \"later\"\n",
    ] {
        let err = refused(bad);
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // What the TOML parser refuses: a line naming the file, then the parser's lines.
    for (bad, place, what) in [
        (
            "max_conections = 10\n",
            "line 1, column 1",
            "unknown field `max_conections`",
        ),
        (
            "admin = \"127.0.0.1:9100\"\nidle_timeout = 30\n",
            "line 2, column 16",
            "idle_timeout = 30: a duration is a string with a unit, such as \"30s\" or \"500ms\"",
        ),
        ("cores = [1,\n", "line 1, column 12", "unclosed array"),
    ] {
        let err = refused(bad);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(
            lines[0],
            format!("velium-server: config file {}:", good.arg()),
            "{err}"
        );
        assert_eq!(lines[1], format!("TOML parse error at {place}"), "{err}");
        assert!(lines[3].contains(" | "), "{err}");
        assert!(lines[4].trim_end().ends_with('^'), "{err}");
        assert!(lines[5].starts_with(what), "{err}");
        assert_eq!(lines.len(), 6, "{err}");
    }
}

/// `--log-format json` writes one JSON object per line, its fields as fields; and each
/// kind of refusal from one source is logged (once a minute per source and reason), not
/// only the first kind.
fn json_logs_name_every_kind_of_refusal(io: &str) {
    let srv = Server::with_admin(
        io,
        &[
            "--log-format",
            "json",
            "--max-connections-per-source",
            "1",
            "--connect-rate-per-source",
            "3",
        ],
    );
    let mut held = srv.tcp();
    held.sync(b"held");
    // Past the one connection allowed, then past the rate: both refusals are seen.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let mut c = srv.tcp();
        if let Some((0x09, why)) = c.try_recv() {
            seen.insert(String::from_utf8(why).unwrap());
        }
        if seen.len() == 2 {
            break;
        }
    }
    let want = [
        "connecting too fast",
        "too many connections from this address",
    ];
    assert_eq!(seen.iter().map(String::as_str).collect::<Vec<_>>(), want);
    for reason in ["per_source", "rate"] {
        let line = srv.wait_log(&["refused", &format!("\"reason\":\"{reason}\"")]);
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(v["level"], "WARN", "{line}");
        assert_eq!(v["fields"]["source"], "127.0.0.1", "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
    }
    let listening = srv.wait_log(&["listening"]);
    let v: serde_json::Value = serde_json::from_str(&listening).expect("a JSON line");
    assert_eq!(v["fields"]["message"], "listening");
    assert_eq!(
        v["fields"]["io"],
        if io == "uring" { "io_uring" } else { "epoll" }
    );
    held.sync(b"still served");
}

drivers!(
    metrics_count_connections_frames_and_latency,
    json_logs_name_every_kind_of_refusal,
    shims_lists_identity_peer_core_and_udp,
    total_connection_limit_refuses_with_an_error,
    per_source_limits_refuse_with_an_error,
    sources_outside_the_allowed_networks_are_dropped,
    the_secret_is_required_before_identify,
    sigterm_sends_quit_to_every_connection_and_exits_zero,
    sighup_and_post_reload_apply_live_settings,
    a_reload_sends_new_terms_to_every_shim,
    a_reload_answers_a_toml_error_in_its_lines,
);

#[test]
fn check_config() {
    check_config_validates_only("");
}
