//! `velium`: the command-line tool for a velium-server hub.
//!
//! Operator commands (`send`, `tell`, `who`, `state`) connect, do one thing and leave;
//! `watch` stays connected and prints the relay state of shims as it changes; `shim` is a
//! stand-in shim that stays connected, answers commands and can publish state keys, for
//! trying a hub out and for tests. `stats`, and `who --admin`, read the hub's admin
//! listener instead. Every command exits with the codes of [`EXIT_STATUS`] (0 done, 1 done
//! in part, 2 nothing done); errors are one line on stderr, prefixed `velium:`. Targets are
//! checked as the hub checks them before anything is sent, and `--json` gives scripts one
//! JSON document in place of the lines.
//!
//! `--tls` (implied by `--ca`, `--cert`, `--insecure` and `--server-name`) speaks TLS to
//! the hub, and `velium shim` then seals its UDP channel; `--admin-token-file` presents the
//! admin listener's bearer token.
//!
//! `velium --generate DIR` writes its man pages and shell completions (see
//! `velium_server::manual`) and exits.

use clap::{Args, CommandFactory, Parser, Subcommand};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use velium_server::client::{
    Client, ClientError, ClientOptions, Event, ShimState, TlsOptions, Transport,
};
use velium_server::proto::reject::CLOSING;
use velium_server::proto::state::{MAX_INTERVAL_MS, check_key};

mod admin;
mod args;
mod ops;
mod shim;
mod state;

use admin::*;
use args::*;
use ops::*;
use shim::*;
use state::*;

/// A failure that ends the program with status 2.
struct Fatal(String);

impl From<ClientError> for Fatal {
    fn from(e: ClientError) -> Fatal {
        let msg = e.to_string();
        if msg.contains("authentication required") || msg.contains("authentication failed") {
            return Fatal(format!(
                "{msg} (give the hub's secret with --secret-file FILE or VELIUM_SECRET, \
                 and --user NAME on a hub with users)"
            ));
        }
        Fatal(msg)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    if let Some(dir) = velium_server::manual::requested() {
        return generate(&dir);
    }
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(Fatal(msg)) => {
            eprintln!("velium: {msg}");
            ExitCode::from(2)
        }
    }
}

/// The man page's sections beyond the options and subcommands.
const MAN_SECTIONS: &[velium_server::manual::Section] = &[
    (
        "EXIT STATUS",
        "0: done: every shim reached answered (send), some shim was reached or listed, a \
shim or watch was stopped by Ctrl-C or SIGTERM. 1: done in part: some shims reached did not \
answer a send within --timeout, or a watch or shim lost its connection (a shim: with \
--no-reconnect, or replaced by a newer connection of its identity). 2: nothing done: no \
shim matches, the hub cannot be reached or refused the request, or the arguments are wrong. \
Errors are one line on stderr, prefixed velium:.",
    ),
    (
        "ENVIRONMENT",
        "VELIUM_SECRET holds the shared secret (or the user's secret) itself, in place of \
--secret-file. VELIUM_SERVER, VELIUM_SECRET_FILE, VELIUM_USER, VELIUM_ADMIN, VELIUM_ADMIN_TOKEN_FILE, \
VELIUM_TLS, VELIUM_CA, VELIUM_CERT, VELIUM_KEY and VELIUM_SERVER_NAME stand for the options \
of those names.",
    ),
];

/// `--generate DIR`: the man pages and completions.
fn generate(dir: &std::path::Path) -> ExitCode {
    match velium_server::manual::generate(Cli::command(), MAN_SECTIONS, &["velium-server(1)"], dir)
    {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("velium: --generate {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Fatal> {
    // The command line after the command, then before it, then the environment.
    let top = cli.hub.or(&HubArgs::env());
    let top_admin = cli.admin.or(&AdminArgs::env());
    match cli.cmd {
        Cmd::Stats { admin, out } => {
            let Some(admin) = admin_of(admin.or(&top_admin), ADMIN_TIMEOUT).await? else {
                return Err(Fatal(
                    "stats reads the hub's admin listener: give --admin ADDR".into(),
                ));
            };
            stats(&admin, out.json)
        }
        Cmd::Send {
            op,
            settle,
            literal,
            out,
            target,
            command,
        } => {
            check_target("target", &target)?;
            let (target, text) = routed(&target, &command, literal, "command")?;
            let hub = Hub::of(op.hub.clone().or(&top), op.timeout).await?;
            let wait = Wait {
                timeout: op.timeout,
                settle,
            };
            send(&hub, &op.identity(), &target, &text, wait, out.json).await
        }
        Cmd::Tell {
            op,
            literal,
            target,
            text,
        } => {
            check_target("target", &target)?;
            let (target, text) = routed(&target, &text, literal, "text")?;
            let hub = Hub::of(op.hub.clone().or(&top), op.timeout).await?;
            tell(&hub, &op.identity(), &target, &text).await
        }
        Cmd::Who {
            op,
            admin,
            out,
            pattern,
            filters,
        } => {
            if let Some(p) = pattern.as_deref().filter(|p| !is_filter(p)) {
                if let Some(rest) = p.strip_prefix('+') {
                    return Err(Fatal(format!(
                        "bad pattern {p}: who lists shims, and a `+` (the sender included) \
                         is for send and tell targets: write {rest}"
                    )));
                }
                check_target("pattern", p)?;
            }
            let target = listing_target(pattern.as_deref(), &filters)?;
            if let Some(admin) = admin_of(admin.or(&top_admin), op.timeout).await? {
                return who_admin(&admin, target.as_deref(), out.json);
            }
            let hub = Hub::of(op.hub.clone().or(&top), op.timeout).await?;
            who(&hub, &op.identity(), target.as_deref(), out.json).await
        }
        Cmd::State {
            op,
            out,
            pattern,
            keys,
        } => {
            let (target, keys) = state_target(&pattern, &keys)?;
            let hub = Hub::of(op.hub.clone().or(&top), op.timeout).await?;
            state(&hub, &op.identity(), &target, &keys, out.json).await
        }
        Cmd::Watch {
            op,
            interval,
            pattern,
            keys,
        } => {
            let (target, keys) = state_target(&pattern, &keys)?;
            let hub = Hub::of(op.hub.clone().or(&top), op.timeout).await?;
            watch(&hub, &op.identity(), &target, &keys, interval).await
        }
        Cmd::Shim {
            name,
            no_udp,
            set,
            set_every,
            no_reconnect,
            hub,
        } => {
            let set = Publish {
                items: set,
                every: set_every,
            };
            let hub = Hub::of(hub.or(&top), Duration::from_secs(5)).await?;
            let how = ShimRun {
                udp: !no_udp,
                reconnect: !no_reconnect,
            };
            shim(&hub, &name, &set, how).await
        }
    }
}

/// The hub to connect to: its address and the options of connecting.
struct Hub {
    /// As given (HOST:PORT), resolved again when a shim connects again.
    server: String,
    /// As resolved first.
    addr: SocketAddr,
    options: ClientOptions,
}

impl Hub {
    /// Reads the secret, resolves the address and checks the options; `timeout` bounds the
    /// connect and every request.
    async fn of(args: HubArgs, timeout: Duration) -> Result<Hub, Fatal> {
        if args.tls.insecure {
            eprintln!("warning: --insecure: the hub's certificate is not verified");
        }
        let server = args.server();
        let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
        let options = ClientOptions {
            secret: secret(args.secret_file.as_deref())?,
            user: args.user.clone(),
            tls: args.tls.options(host),
            connect_timeout: timeout,
            request_timeout: timeout,
            ..ClientOptions::default()
        };
        if args.tls.cert.is_some() != args.tls.key.is_some() {
            return Err(Fatal(
                "a client certificate needs its key: give --cert FILE and --key FILE (or \
                 VELIUM_CERT and VELIUM_KEY)"
                    .into(),
            ));
        }
        if options.user.is_some() && options.secret.is_none() {
            return Err(Fatal(
                "--user needs the user's secret: give --secret-file FILE (or VELIUM_SECRET)".into(),
            ));
        }
        Ok(Hub {
            server: server.to_string(),
            addr: resolve(server).await?,
            options,
        })
    }
}

impl Hub {
    /// Connects as `identity`; a timeout says how long it waited (--timeout).
    async fn connect(&self, identity: &str, options: ClientOptions) -> Result<Client, Fatal> {
        let waited = options.connect_timeout;
        Client::connect_with(self.addr, identity, options)
            .await
            .map_err(|e| match e {
                ClientError::Timeout(what) => Fatal(format!(
                    "timed out after {} waiting for {what}",
                    humantime::format_duration(waited)
                )),
                e => e.into(),
            })
    }
}

/// The admin listener the options name, if any.
async fn admin_of(args: AdminArgs, timeout: Duration) -> Result<Option<Admin>, Fatal> {
    let Some(addr) = &args.admin else {
        return Ok(None);
    };
    Ok(Some(Admin {
        addr: resolve(addr).await?,
        token: read_secret(args.admin_token_file.as_deref(), "admin token file")?,
        timeout,
    }))
}

/// How long `stats` waits for the admin listener.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a target or pattern as the hub would, before connecting. A target ending in a
/// dot is most often `peq.>` typed unquoted, the shell having taken `>` for a redirection.
fn check_target(what: &'static str, target: &str) -> Result<(), Fatal> {
    velium_server::client::check_target(what, target).map_err(|e| {
        let mut msg = e.to_string();
        let with_rest = format!("{target}>");
        if target.ends_with('.') && velium_server::client::check_target(what, &with_rest).is_ok() {
            msg.push_str(&format!(
                " (an unquoted > is a redirection to the shell: quote the {what}, as in \
                 '{target}>')"
            ));
        }
        Fatal(msg)
    })
}

/// The shared secret: from `--secret-file`, else from VELIUM_SECRET, else none.
fn secret(file: Option<&std::path::Path>) -> Result<Option<Vec<u8>>, Fatal> {
    if file.is_some() {
        return read_secret(file, "secret file");
    }
    Ok(std::env::var_os("VELIUM_SECRET").map(|v| without_newline(v.into_encoded_bytes())))
}

/// The contents of a secret's file (`what` names it in messages), less a final line end.
fn read_secret(file: Option<&std::path::Path>, what: &str) -> Result<Option<Vec<u8>>, Fatal> {
    let Some(path) = file else { return Ok(None) };
    let raw = std::fs::read(path)
        .map_err(|e| Fatal(format!("cannot read {what} {}: {e}", path.display())))?;
    Ok(Some(without_newline(raw)))
}

fn without_newline(raw: Vec<u8>) -> Vec<u8> {
    let s = raw.strip_suffix(b"\n").unwrap_or(&raw);
    let s = s.strip_suffix(b"\r").unwrap_or(s);
    s.to_vec()
}

async fn resolve(server: &str) -> Result<SocketAddr, Fatal> {
    if let Ok(a) = server.parse() {
        return Ok(a);
    }
    match tokio::net::lookup_host(server).await {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| Fatal(format!("server address {server} resolves to nothing"))),
        Err(e) => Err(Fatal(format!("bad server address {server:?}: {e}"))),
    }
}

/// Prints a JSON document and a line end on stdout.
fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

/// Shows a text on one line: line breaks as `\n`.
fn one_line(text: &str) -> String {
    text.replace('\n', "\\n")
}

/// SIGTERM and SIGINT, installed before connecting: a supervisor may signal as soon as it
/// reads the first line.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, Fatal> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(|e| Fatal(format!("SIGTERM: {e}")))?,
            int: signal(SignalKind::interrupt()).map_err(|e| Fatal(format!("SIGINT: {e}")))?,
        })
    }

    /// Returns when either arrives.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Prints one line and flushes it, so that a pipe reader sees each change as it happens;
/// false when stdout is gone.
fn print(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}
