//! `velium-server`: serves the velium protocol on one TCP and UDP address.
//!
//! Signals: SIGTERM or SIGINT stop gracefully (stop accepting, Quit to every shim, wait
//! for the connections to close up to `shutdown_timeout`, exit 0; a second signal exits at
//! once). SIGHUP re-reads the config file and applies what can change at run time; a hub
//! started without `--config`, with no flag naming a file, has nothing to re-read, and
//! says so (a warning, and 409 to `POST /reload`) instead.
//!
//! A config error is printed on stderr as [`ConfigError`](velium_server::config::ConfigError)
//! words it: one line, or a TOML error in the parser's own lines (the line, the column and
//! a caret under the spot); a reload that fails logs it in one line
//! ([`ConfigError::one_line`](velium_server::config::ConfigError::one_line)), and answers
//! `POST /reload` with the lines.
//!
//! `velium-server --generate DIR` writes its man page and shell completions (see
//! `velium_server::manual`) and exits.

use clap::{CommandFactory, Parser};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt, reload};
use velium_server::admin::{self, ReloadRefused};
use velium_server::config::{Args, Config, LogFormat, NOTHING_TO_RELOAD};
use velium_server::driver;
use velium_server::hub::Hub;
use velium_server::metrics::Latency;

fn main() -> ExitCode {
    if let Some(dir) = velium_server::manual::requested() {
        return generate(&dir);
    }
    let args = Args::parse();
    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("velium-server: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.check_config {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    // Log lines are written by a background thread, so a connect or close line never
    // costs the serving core a write(2) of its own. The filter sits behind a reload
    // handle so that SIGHUP can change the level.
    let (writer, _flush_guard) = tracing_appender::non_blocking(std::io::stderr());
    let (filter, filter_handle) = reload::Layer::new(EnvFilter::new(&config.log_level));
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_writer(writer)
                    .with_target(false)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_writer(writer)
                    .with_target(false)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .init(),
    }

    let admin_addr = config.admin;
    let running = match driver::start(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("velium-server: {e}");
            return ExitCode::from(1);
        }
    };
    let hub = running.hub.clone();
    let reload: admin::Reload = {
        let hub = hub.clone();
        Arc::new(move || {
            if !args.reload_rereads() {
                // Only the command line and the environment: nothing could have changed.
                warn!("{NOTHING_TO_RELOAD}");
                journal(&hub, false, NOTHING_TO_RELOAD);
                return Err(ReloadRefused::Nothing(NOTHING_TO_RELOAD.into()));
            }
            let new = Config::load(&args).map_err(|e| {
                // The log line and the journal take the one-line form; the answer to
                // POST /reload keeps a TOML error's lines.
                let brief = e.one_line();
                warn!(error = %brief, "reload failed; settings unchanged");
                journal(
                    &hub,
                    false,
                    &format!("reload failed, settings unchanged: {brief}"),
                );
                ReloadRefused::Failed(format!("reload failed, settings unchanged: {e}"))
            })?;
            let level = new.log_level.clone();
            let (live, restart) = hub.reload(new);
            if live.contains(&"log_level") {
                let _ = filter_handle.modify(|f| *f = EnvFilter::new(&level));
            }
            let msg = format!(
                "reloaded; applied: {}; need a restart: {}",
                list(&live),
                list(&restart)
            );
            info!(applied = %list(&live), restart_needed = %list(&restart), "reloaded");
            journal(&hub, true, &msg);
            Ok(msg)
        })
    };
    // Signal handlers go in before the banner: whoever reads it may signal at once (and
    // SIGHUP's default action would end the process).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    let signals_in = {
        let _guard = rt.enter();
        Signals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
            hup: signal(SignalKind::hangup()).expect("SIGHUP handler"),
        }
    };
    let io = running.io.label();
    // Scripts and tests read the real addresses (port 0 picks one) from these lines. A
    // reader may close the pipe after them, so write errors are ignored.
    let mut banner = format!(
        "velium-server listening on {} ({} cores, {io})\n",
        running.addr,
        hub.config().cores
    );
    if let Some(addr) = admin_addr {
        match admin::start(addr, hub.clone(), reload.clone(), running.addr) {
            Ok(bound) => {
                info!(addr = %bound, "admin listener (the dashboard at /)");
                banner.push_str(&format!("velium-server admin on http://{bound}\n"))
            }
            Err(e) => {
                eprintln!("velium-server: cannot serve admin on {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(banner.as_bytes());
    let _ = stdout.flush();
    rt.block_on(signals(signals_in, hub, reload))
}

/// The man page's DESCRIPTION.
const MAN_DESCRIPTION: &str = "velium-server is a hub for fleets of game-client shims: the \
mqvelium plugin inside an EverQuest client running MacroQuest, or any program that speaks the \
protocol. Each shim keeps one TCP control connection and one UDP channel to the hub; through \
it, shims name themselves (peq.ecommons.bob: server, zone, character), send commands and text \
to one shim, a zone, a server or everyone, collect the answers, list who is connected, and \
share their state with watchers that get only what changed. The velium(1) tool is a client \
of it.

It serves one TCP and UDP address with one pinned thread per core, on io_uring or epoll \
(--io). Settings come from the config file (--config) and the flags, which override it. On \
start it prints \"velium-server listening on ADDR (N cores, DRIVER)\" on stdout (and \
\"velium-server admin on http://ADDR\" with --admin) and logs to stderr.";

/// The man page's sections beyond the options.
const MAN_SECTIONS: &[velium_server::manual::Section] = &[
    (
        "SIGNALS",
        "SIGTERM or SIGINT stop gracefully: the server stops accepting, sends Quit to every \
shim, waits up to shutdown_timeout for the connections to close, logs a summary and exits 0. \
A second SIGTERM or SIGINT exits at once with status 1.

SIGHUP re-reads the config file (flags given at start still win) and applies everything but \
listen, cores, io, admin and admin_connections, which need a restart; a file that fails to \
load leaves the settings as they were. A new idle_timeout, max_frame, outbound_limit, \
answer_window or udp_plain is sent to every connected shim in a new Terms frame. A hub \
started without --config, and with no flag naming a secret, token or TLS file, has nothing to \
re-read: SIGHUP then logs \"nothing to reload\" and changes nothing.",
    ),
    (
        "EXIT STATUS",
        "0 after a graceful stop, or when --check-config found the file valid. 1 when the server \
could not start (address in use, io = \"uring\" without io_uring) or was stopped by a second \
signal. 2 for a configuration error (a bad flag, an unknown key or bad value in the file), \
reported on stderr: in one line, or, for what the TOML parser refuses, in a line naming the \
file followed by the parser's lines (the line and column, the line with a caret under the \
spot, what is wrong there).",
    ),
    (
        "FILES",
        "  /etc/velium/velium-server.toml\n\
  The config file: every setting, commented out at its default.

  /lib/systemd/system/velium-server.service\n\
  The systemd unit (the Debian package's; deploy/velium-server.service in the sources).

  /usr/lib/sysctl.d/90-velium.conf\n\
  Kernel settings for large fleets: open files, socket backlogs and buffers.",
    ),
];

/// `--generate DIR`: the man page and completions.
fn generate(dir: &std::path::Path) -> ExitCode {
    let cmd = Args::command().long_about(MAN_DESCRIPTION);
    match velium_server::manual::generate(cmd, MAN_SECTIONS, &["velium(1)"], dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("velium-server: --generate {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

/// Notes a reload in the hub's journal (the dashboard's event log).
fn journal(hub: &Hub, ok: bool, text: &str) {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let text = text.to_string();
    (hub.journal).push(
        unix_ms,
        velium_server::hub::journal::Happened::Reload { ok, text },
    );
}

/// The signals the server handles.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// Waits for signals: SIGHUP reloads, SIGTERM or SIGINT shut down.
async fn signals(sigs: Signals, hub: Arc<Hub>, reload: admin::Reload) -> ExitCode {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = sigs;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = reload();
            }
        }
    }
    let timeout = hub.config().shutdown_timeout;
    info!(
        connections = hub.connections(),
        ?timeout,
        "shutting down: no new connections, Quit to every shim"
    );
    hub.begin_shutdown();
    let started = Instant::now();
    let deadline = started + timeout;
    let drained = async {
        while hub.connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        _ = drained => {}
        _ = term.recv() => return second_signal(),
        _ = int.recv() => return second_signal(),
    }
    if let Some(c) = hub.cluster() {
        // The other nodes hear of every leave now rather than of this node's silence
        // later: once nothing waits for the cluster thread, one more turn flushes to NATS.
        let until = Instant::now() + Duration::from_secs(1);
        while c.has_outbound() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let turn = c.flushed.load(std::sync::atomic::Ordering::Acquire);
        c.wake.notify_one();
        while c.flushed.load(std::sync::atomic::Ordering::Acquire) <= turn && Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let left = hub.connections();
    if left > 0 {
        hub.metrics
            .counters
            .shutdown_cut
            .fetch_add(left as u64, std::sync::atomic::Ordering::Relaxed);
        warn!(
            connections = left,
            "shutdown deadline passed with connections still open"
        );
    }
    let m = &hub.metrics;
    let errors = nonzero(m.errors().map(|(k, n)| (k.label(), n)));
    let refused = nonzero(m.refusals().map(|(k, n)| (k.label(), n)));
    let c = &hub.metrics.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    info!(
        took_ms = started.elapsed().as_millis() as u64,
        handshake = %hub.metrics.summary(Latency::Handshake),
        udp_bind = %hub.metrics.summary(Latency::UdpBind),
        accepted = n(&c.accepted),
        identified = n(&c.identified),
        replaced = n(&c.replaced),
        slow_consumers = n(&c.slow_consumers),
        shutdown_cut = n(&c.shutdown_cut),
        deliveries = n(&c.deliveries),
        responses_dropped = n(&c.responses_dropped),
        udp_dropped = n(&c.udp_dropped),
        tls_established = n(&c.tls_established),
        state_sets = n(&c.state_sets),
        state_changes = n(&c.state_changes),
        errors = %errors,
        refused = %refused,
        "shut down"
    );
    ExitCode::SUCCESS
}

/// `label=n` for every count above zero, or `none`.
fn nonzero<'a>(counts: impl Iterator<Item = (&'a str, u64)>) -> String {
    let v: Vec<String> = counts
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

fn second_signal() -> ExitCode {
    warn!("second signal: exiting without waiting for connections to close");
    ExitCode::from(1)
}

fn list(keys: &[&str]) -> String {
    if keys.is_empty() {
        "none".into()
    } else {
        keys.join(", ")
    }
}
