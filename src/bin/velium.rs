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

const TARGET_HELP: &str = "\
Which shims to address. Identities are dot-separated segments (server.zone.character, \
e.g. peq.ecommons.bob). In a target, a `*` segment matches any one segment \
(peq.*.bob: bob in any zone) and a last `>` segment matches one or more segments \
(peq.>: everybody on peq); case is ignored. The sender is left out of its own targets \
unless the target starts with `+` (+peq.>). Quote targets holding `*` or `>` in the shell.

Filters narrow a target by the state the shims publish: the words right after the target of the form KEY=VALUE (the key's value equals VALUE) or KEY~WORD (WORD is one of the key's space-separated words) are filters, all of which must hold; case is ignored, and a shim without the key passes no filter on it. They need no quoting: `velium send 'peq.>' class=CLR group=Bob /cast 1`. They can also follow the pattern after commas, in one word: 'peq.>,class=CLR'. Filters never widen what the pattern names.";

const SEND_EXAMPLES: &str = "\
Examples:
  velium send peq.ecommons.bob /sit              one shim
  velium send 'peq.*.bob' /loc                   bob, whichever zone he is in
  velium send --timeout 10 'peq.>' /who          every shim on peq, wait up to 10 s
  velium send 'peq.>' class=CLR '/cast 1'        every cleric on peq
  velium send 'peq.>' group=Bob /follow          everybody in Bob's group

Waits until every shim reached has answered (or --timeout), then prints one line per shim \
that answered, sorted: `IDENTITY: RESPONSE`, several answers of one shim joined by ` | `, \
line breaks shown as `\\n`. Exit status: 0 when every shim reached has answered, 1 if some \
did not answer within --timeout (how many, and who, is printed on stderr: the shims the \
target lists now that did not answer), 2 if no shim matches or the hub cannot be reached.";

const TELL_EXAMPLES: &str = "\
Examples:
  velium tell 'peq.>' server restart in 5 minutes
  velium tell peq.ecommons.bob hello bob
  velium tell 'peq.>' raid=Alice pull in 10

Prints `reached N shims`. Exit status: 0 when at least one shim was reached, 2 if no shim \
matches or the hub cannot be reached.";

const WHO_EXAMPLES: &str = "\
Examples:
  velium who                      every connected shim
  velium who 'peq.ecommons.*'     the shims in one zone
  velium who class=CLR            every shim whose class is CLR
  velium who 'peq.>' zone=pok     the shims on peq in the Plane of Knowledge

Prints one line per shim: identity, connected since (UTC, RFC 3339), then `udp` if it has \
a bound UDP channel or `-` if not, then, on a hub that is a node of a cluster, the node \
serving the shim. This tool's own connection is not listed. Exit status: 0 when some \
shim is listed, 2 (and `no shim matches PATTERN` on stderr) if none, or if the hub cannot \
be reached.";

const WHO_ADMIN: &str = "\
With --admin ADDR (or VELIUM_ADMIN) the listing comes from the hub's admin listener \
(GET /shims) and adds each shim's peer address, core and frames in/out; no shim \
connection is made.";

const STATS_EXAMPLES: &str = "\
Examples:
  velium stats --admin 127.0.0.1:9100

Reads GET /metrics from the hub's admin listener (velium-server --admin ADDR) and prints \
connections, shims, traffic, handshake latency, errors and refusals. A hub with an admin \
token needs --admin-token-file FILE (or VELIUM_ADMIN_TOKEN_FILE). Exit status 2 if the \
admin listener cannot be reached or refuses the token.";

const SHIM_EXAMPLES: &str = "\
Examples:
  velium shim --name peq.ecommons.bob
  velium shim --name test.one --no-udp
  velium shim --name peq.ecommons.bob --set hp=4500/5000 --set 'note=back in 5'
  velium shim --name peq.ecommons.bob --set hp=100 --set-every 1s

Prints `connected as IDENTITY` once identified (and its --set keys applied, and its UDP \
channel bound; sealed with --tls), then one line per message received:
  echo from SENDER: TEXT
  command from SENDER (id ID): TEXT
Every command is answered with its own text, over the transport it came in on. --set \
keys are sent in one Set frame; --set-every sends the same keys again at that interval \
(over UDP when the channel is bound), as a game client's shim does every tick. Pings the \
hub as its Terms say, to stay connected; Ctrl-C or SIGTERM says goodbye and exits 0. A lost \
connection (the hub restarting) is made again after 0.5 s, then twice as long each time up \
to 30 s, each wait drawn between half and all of that; a shim replaced by a newer \
connection of its identity exits 1 (two would take turns), as does any loss with \
--no-reconnect.";

const STATE_EXAMPLES: &str = "\
Examples:
  velium state 'peq.ecommons.*'          every key of the shims in one zone
  velium state 'peq.>' hp target         only these keys
  velium state group=Bob hp mana         Bob's group's hp and mana

Prints one line per matching shim, sorted: `IDENTITY KEY=VALUE KEY=VALUE ...`, the keys in \
the order the shim holds them. A value that is empty or holds a space, a double quote or \
a backslash is written in double quotes, with `\\\"` and `\\\\` inside; a line break \
is shown as `\\n`. Exit status: 0 when some shim matched, 2 (and `no shim matches \
PATTERN` on stderr) when none did or the hub cannot be reached.";

const WATCH_EXAMPLES: &str = "\
Examples:
  velium watch 'peq.ecommons.*'
  velium watch --interval 500ms 'peq.>' hp
  velium watch 'peq.>' group=Bob hp      Bob's group, as members come and go

Prints the matching shims' state as `velium state` does, then one line per change until \
interrupted: `IDENTITY KEY=VALUE ...` with only what changed (a deleted key as `-KEY`), \
`+IDENTITY` when a matching shim appears and `-IDENTITY REASON` when it goes (REASON as \
the hub's close line gives it: eof, quit, idle timeout, renamed, ...; `not selected` when \
its state no longer passes the filters). --interval is the \
shortest time between two deliveries (the latest values are sent; 0, the default: as \
soon as possible). Ctrl-C or SIGTERM exits 0; losing the connection exits 1.";

/// The form of a duration argument.
const DURATION_HELP: &str = "seconds (1.5) or with a unit (500ms, 2s, 1m)";

/// Command-line tool for a velium-server hub: send commands to shims, tell them things,
/// list them, read or watch the state they publish, or run a stand-in shim.
///
/// The options of connecting to the hub and to its admin listener may come before the
/// command (`velium --server ADDR who`) or after it (`velium who --server ADDR`); each
/// command's help lists the ones it uses.
#[derive(Parser)]
#[command(
    name = "velium",
    version,
    propagate_version = true,
    after_help = EXIT_STATUS
)]
struct Cli {
    #[command(flatten)]
    hub: HubArgs,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The exit status of every command, in `velium --help` and the man page.
const EXIT_STATUS: &str = "\
Exit status, for every command:
  0  done: every shim reached answered (send), some shim was reached or listed, a shim or
     watch was stopped by Ctrl-C or SIGTERM
  1  done in part: some shims reached did not answer a send within --timeout, or a watch
     or shim lost its connection (a shim: with --no-reconnect, or replaced by a newer
     connection of its identity)
  2  nothing done: no shim matches, the hub cannot be reached or refused the request, or
     the arguments are wrong (the message says which)
Errors are one line on stderr, prefixed `velium:`.";

/// How to reach the hub over its shim protocol.
#[derive(Args, Clone, Default)]
#[command(next_help_heading = "Connecting to the hub")]
struct HubArgs {
    /// The hub's address, HOST:PORT [default: 127.0.0.1:12345]
    #[arg(long, value_name = "ADDR", env = "VELIUM_SERVER")]
    server: Option<String>,
    /// File holding the hub's shared secret, or with --user that user's secret
    /// (VELIUM_SECRET may hold the secret itself instead)
    #[arg(long, value_name = "FILE", env = "VELIUM_SECRET_FILE")]
    secret_file: Option<std::path::PathBuf>,
    /// The hub user to authenticate as (a [[user]] of the hub's config); needs its secret
    #[arg(long, value_name = "NAME", env = "VELIUM_USER")]
    user: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl HubArgs {
    /// These options, each taken from `top` (given before the command) when not given
    /// after it.
    fn or(self, top: &HubArgs) -> HubArgs {
        HubArgs {
            server: self.server.or_else(|| top.server.clone()),
            secret_file: self.secret_file.or_else(|| top.secret_file.clone()),
            user: self.user.or_else(|| top.user.clone()),
            tls: self.tls.or(&top.tls),
        }
    }

    /// The hub's address as given.
    fn server(&self) -> &str {
        self.server.as_deref().unwrap_or("127.0.0.1:12345")
    }
}

/// How to reach the hub's admin listener.
#[derive(Args, Clone, Default)]
#[command(next_help_heading = "The admin listener")]
struct AdminArgs {
    /// The hub's admin listener, HOST:PORT (for `stats` and `who --admin`)
    #[arg(long, value_name = "ADDR", env = "VELIUM_ADMIN")]
    admin: Option<String>,
    /// File holding the admin listener's bearer token
    #[arg(long, value_name = "FILE", env = "VELIUM_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<std::path::PathBuf>,
}

impl AdminArgs {
    /// As [`HubArgs::or`].
    fn or(self, top: &AdminArgs) -> AdminArgs {
        AdminArgs {
            admin: self.admin.or_else(|| top.admin.clone()),
            admin_token_file: self
                .admin_token_file
                .or_else(|| top.admin_token_file.clone()),
        }
    }
}

/// How to speak TLS to the hub.
#[derive(Args, Clone, Default)]
struct TlsArgs {
    /// Speak TLS 1.3 to the hub, checking its certificate against the system's roots (or
    /// --ca); a shim's UDP channel is then sealed
    #[arg(long, env = "VELIUM_TLS")]
    tls: bool,
    /// PEM file of the CA certificates to trust instead of the system's (implies --tls)
    #[arg(long, value_name = "FILE", env = "VELIUM_CA")]
    ca: Option<std::path::PathBuf>,
    /// Do not verify the hub's certificate (implies --tls): anybody on the path can pose
    /// as the hub, so for tests only; warns on every run
    // No variable sets it, so that it is never on without being seen on the command line.
    #[arg(long)]
    insecure: bool,
    /// PEM client certificate chain to present, for a hub that requires one (implies
    /// --tls; needs --key)
    #[arg(long, value_name = "FILE", env = "VELIUM_CERT", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert
    #[arg(long, value_name = "FILE", env = "VELIUM_KEY", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// The name the hub's certificate must carry [default: the host of --server]
    /// (implies --tls)
    #[arg(long, value_name = "NAME", env = "VELIUM_SERVER_NAME")]
    server_name: Option<String>,
}

impl TlsArgs {
    /// As [`HubArgs::or`]; a certificate and its key go together.
    fn or(self, top: &TlsArgs) -> TlsArgs {
        let (cert, key) = match self.cert {
            Some(cert) => (Some(cert), self.key),
            None => (top.cert.clone(), top.key.clone()),
        };
        TlsArgs {
            tls: self.tls || top.tls,
            ca: self.ca.or_else(|| top.ca.clone()),
            insecure: self.insecure || top.insecure,
            cert,
            key,
            server_name: self.server_name.or_else(|| top.server_name.clone()),
        }
    }

    /// The TLS options these flags ask for, if any; `host` is the host part of --server,
    /// the default server name when it is a name.
    fn options(&self, host: &str) -> Option<TlsOptions> {
        let wanted = self.tls
            || self.ca.is_some()
            || self.insecure
            || self.cert.is_some()
            || self.server_name.is_some();
        wanted.then(|| TlsOptions {
            server_name: self.server_name.clone().or_else(|| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.parse::<std::net::IpAddr>()
                    .is_err()
                    .then(|| host.to_string())
            }),
            ca: self.ca.clone(),
            insecure: self.insecure,
            cert: self.cert.clone(),
            key: self.key.clone(),
        })
    }
}

/// The identity an operator command connects as, and how long it waits.
#[derive(Args)]
struct Operator {
    /// Identity to connect as [default: velium.cli.<pid>]
    #[arg(long, value_name = "IDENTITY")]
    name: Option<String>,
    /// How long to wait for the hub: to connect, and for its answers (a send's: for the
    /// shims' responses). Seconds, or a duration such as 500ms or 1m
    #[arg(long, value_name = "DURATION", default_value = "5", value_parser = parse_secs)]
    timeout: Duration,
    #[command(flatten)]
    hub: HubArgs,
}

impl Operator {
    fn identity(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("velium.cli.{}", std::process::id()))
    }
}

/// `--json`, for the commands that print a listing.
#[derive(Args)]
struct Output {
    /// Print one JSON document on stdout instead of lines (errors stay on stderr, and the
    /// exit status is the same)
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send a command to shims and print their responses
    #[command(after_help = SEND_EXAMPLES)]
    Send {
        /// Once every shim reached has answered, go on collecting answers until none has
        /// come for this long, for shims that answer several times (never past
        /// --timeout); 0 stops at once
        #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration)]
        settle: Duration,
        /// Every word after the target is the command: filters go in the target, after
        /// commas ('peq.>,class=CLR'), and a command may start with a KEY=VALUE word
        #[arg(long)]
        literal: bool,
        #[command(flatten)]
        out: Output,
        #[arg(help = "Which shims to address (see --help for the pattern and filter syntax)", long_help = TARGET_HELP)]
        target: String,
        /// Filters (KEY=VALUE, KEY~WORD), then the command; its words are joined with
        /// single spaces
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "[FILTER]... COMMAND"
        )]
        command: Vec<String>,
        #[command(flatten)]
        op: Operator,
    },
    /// Send a text (an Echo, which is not answered) to shims
    #[command(after_help = TELL_EXAMPLES)]
    Tell {
        /// Every word after the target is the text: filters go in the target, after
        /// commas ('peq.>,class=CLR'), and a text may start with a KEY=VALUE word
        #[arg(long)]
        literal: bool,
        #[arg(help = "Which shims to address (see --help for the pattern and filter syntax)", long_help = TARGET_HELP)]
        target: String,
        /// Filters (KEY=VALUE, KEY~WORD), then the text; its words are joined with single
        /// spaces
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "[FILTER]... TEXT"
        )]
        text: Vec<String>,
        #[command(flatten)]
        op: Operator,
    },
    /// List connected shims
    #[command(after_help = format!("{WHO_EXAMPLES}\n\n{WHO_ADMIN}"))]
    Who {
        #[command(flatten)]
        out: Output,
        /// Only shims matching this pattern (same syntax as a send target, without `+`),
        /// or a first filter (then every shim)
        pattern: Option<String>,
        /// Only shims whose state passes these filters (KEY=VALUE, KEY~WORD)
        #[arg(value_name = "FILTER")]
        filters: Vec<String>,
        #[command(flatten)]
        op: Operator,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the hub's counters and latency (from its admin listener)
    #[command(after_help = STATS_EXAMPLES)]
    Stats {
        #[command(flatten)]
        out: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the relay state (the keys shims publish) of the shims a pattern names
    #[command(after_help = STATE_EXAMPLES)]
    State {
        #[command(flatten)]
        out: Output,
        /// Whose state (same syntax as a send target), or a first filter (then every shim)
        pattern: String,
        /// Filters (KEY=VALUE, KEY~WORD), and the keys to print [default: every key]
        #[arg(value_name = "FILTER|KEY")]
        keys: Vec<String>,
        #[command(flatten)]
        op: Operator,
    },
    /// Print the relay state of the shims a pattern names, then every change to it
    #[command(after_help = WATCH_EXAMPLES)]
    Watch {
        /// Shortest time between two deliveries: seconds (1.5) or with a unit (500ms)
        #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_interval)]
        interval: Duration,
        /// Whose state (same syntax as a send target), or a first filter (then every shim)
        pattern: String,
        /// Filters (KEY=VALUE, KEY~WORD), and the keys to print [default: every key]
        #[arg(value_name = "FILTER|KEY")]
        keys: Vec<String>,
        #[command(flatten)]
        op: Operator,
    },
    /// Run a stand-in shim that prints what it receives and answers every command
    #[command(after_help = SHIM_EXAMPLES)]
    Shim {
        /// The identity to connect as, e.g. peq.ecommons.bob
        #[arg(long, value_name = "IDENTITY")]
        name: String,
        /// Do not bind a UDP channel (TCP only)
        #[arg(long)]
        no_udp: bool,
        /// A state key to publish once connected (repeatable; all are sent in one Set)
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_item)]
        set: Vec<(String, String)>,
        /// Send the same --set keys again at this interval: seconds (1.5) or with a unit
        /// (500ms)
        #[arg(long, value_name = "DURATION", requires = "set", value_parser = parse_every)]
        set_every: Option<Duration>,
        /// Exit (status 1) when the connection is lost, instead of connecting again
        #[arg(long)]
        no_reconnect: bool,
        #[command(flatten)]
        hub: HubArgs,
    },
}

/// A duration: a number of seconds (as --timeout takes), or a number with a unit as
/// humantime reads it (`500ms`, `2s`, `1m 30s`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(v) = s.parse::<f64>() {
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{s} is not a duration: {DURATION_HELP}"));
        }
        return Duration::try_from_secs_f64(v).map_err(|e| format!("{s}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}): {DURATION_HELP}"))
}

/// `--set-every`: more than 0.
fn parse_every(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s} must be more than 0"));
    }
    Ok(d)
}

/// `--interval`: 0 to an hour, as the hub takes it.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_millis(MAX_INTERVAL_MS) {
        return Err(format!("{s} must be at most an hour"));
    }
    Ok(d)
}

/// `--set KEY=VALUE`: the key in the hub's grammar, the value anything (even empty).
/// Whether `word` has the form of a target filter: `KEY=VALUE` or `KEY~WORD`, KEY of the
/// key grammar.
fn is_filter(word: &str) -> bool {
    word.find(['=', '~'])
        .is_some_and(|at| check_key(&word.as_bytes()[..at]).is_ok())
}

/// `target` with `filters` after it, each after a comma.
fn with_filters<'a>(target: &str, filters: impl IntoIterator<Item = &'a String>) -> String {
    let mut t = target.to_string();
    for f in filters {
        t.push(',');
        t.push_str(f);
    }
    t
}

/// `send` and `tell`: the target with the filter words that follow it, and the text (the
/// rest, joined with spaces).
fn routed(
    target: &str,
    words: &[String],
    literal: bool,
    what: &str,
) -> Result<(String, String), Fatal> {
    if words.is_empty() {
        return Err(Fatal(format!("no {what} after the target")));
    }
    let n = if literal {
        0
    } else {
        words.iter().take_while(|w| is_filter(w)).count()
    };
    // A `--` after the filters ends them, as it ends the options before them.
    let body = match words.get(n) {
        Some(w) if w == "--" && n > 0 => n + 1,
        _ => n,
    };
    if body == words.len() {
        return Err(Fatal(format!(
            "no {what} after the filters (every word after the target has the form \
             KEY=VALUE or KEY~WORD; give --literal to send such words as the {what})"
        )));
    }
    Ok((with_filters(target, &words[..n]), words[body..].join(" ")))
}

/// `who`: the pattern (or, when it is a filter, every shim) with the filters.
fn listing_target(pattern: Option<&str>, filters: &[String]) -> Result<Option<String>, Fatal> {
    if let Some(bad) = filters.iter().find(|f| !is_filter(f)) {
        return Err(Fatal(format!(
            "{bad:?} is not a filter: expected KEY=VALUE or KEY~WORD"
        )));
    }
    Ok(match pattern {
        Some(p) if is_filter(p) => Some(with_filters(
            ">",
            std::iter::once(&p.to_string()).chain(filters),
        )),
        Some(p) => Some(with_filters(p, filters)),
        None if filters.is_empty() => None,
        None => Some(with_filters(">", filters)),
    })
}

/// `state` and `watch`: the target (the pattern, or every shim when it is a filter, with
/// the filter words) and the keys (the other words).
fn state_target(pattern: &str, words: &[String]) -> (String, Vec<String>) {
    let (filters, keys): (Vec<String>, Vec<String>) =
        words.iter().cloned().partition(|w| is_filter(w));
    let target = if is_filter(pattern) {
        with_filters(">", std::iter::once(&pattern.to_string()).chain(&filters))
    } else {
        with_filters(pattern, &filters)
    };
    (target, keys)
}

fn parse_item(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    check_key(key.as_bytes()).map_err(|e| format!("bad key {key:?}: {e}"))?;
    Ok((key.to_string(), value.to_string()))
}

/// `--timeout`: a duration as the server takes it (seconds, or `500ms`, `1m`), more than 0
/// and at most a day.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!("{s} must be more than 0 and at most a day"));
    }
    Ok(d)
}

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
    let top = cli.hub;
    match cli.cmd {
        Cmd::Stats { admin, out } => {
            let Some(admin) = admin_of(admin.or(&cli.admin)).await? else {
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
            if let Some(admin) = admin_of(admin.or(&cli.admin)).await? {
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
            if !is_filter(&pattern) {
                check_target("pattern", &pattern)?;
            }
            let (target, keys) = state_target(&pattern, &keys);
            let hub = Hub::of(op.hub.clone().or(&top), op.timeout).await?;
            state(&hub, &op.identity(), &target, &keys, out.json).await
        }
        Cmd::Watch {
            op,
            interval,
            pattern,
            keys,
        } => {
            if !is_filter(&pattern) {
                check_target("pattern", &pattern)?;
            }
            let (target, keys) = state_target(&pattern, &keys);
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
        if options.user.is_some() && options.secret.is_none() {
            return Err(Fatal(
                "--user needs the user's secret: give --secret-file FILE (or VELIUM_SECRET)".into(),
            ));
        }
        Ok(Hub {
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
async fn admin_of(args: AdminArgs) -> Result<Option<Admin>, Fatal> {
    let Some(addr) = &args.admin else {
        return Ok(None);
    };
    Ok(Some(Admin {
        addr: resolve(addr).await?,
        token: read_secret(args.admin_token_file.as_deref(), "admin token file")?,
    }))
}

/// Checks a target or pattern as the hub would, before connecting. A target ending in a
/// dot is most often `peq.>` typed unquoted, the shell having taken `>` for a redirection.
fn check_target(what: &'static str, target: &str) -> Result<(), Fatal> {
    velium_server::client::check_target(what, target).map_err(|e| {
        let mut msg = e.to_string();
        if target.ends_with('.') {
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

/// Operator commands are short-lived: no keep-alive.
async fn operator(hub: &Hub, identity: &str) -> Result<Client, Fatal> {
    let options = ClientOptions {
        keepalive: None,
        ..hub.options.clone()
    };
    hub.connect(identity, options).await
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// How long a `send` waits for answers.
#[derive(Clone, Copy)]
struct Wait {
    /// For all of them.
    timeout: Duration,
    /// For one more, once every shim reached has answered.
    settle: Duration,
}

async fn send(
    hub: &Hub,
    identity: &str,
    target: &str,
    text: &str,
    wait: Wait,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let sent = client.command(target, text).await?;
    let deadline = Instant::now() + wait.timeout;
    // Every answer of each responder, by identity (ignoring case, as the hub compares).
    let mut answers: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut closed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Until every shim reached has answered: the deadline; then a shim that answers
        // several times has `settle` for each further answer.
        let limit = if answers.len() < sent.reached {
            left
        } else {
            left.min(wait.settle)
        };
        match client.next_response(sent.id, limit).await {
            Ok(r) => {
                let entry = answers
                    .entry(r.from.to_ascii_lowercase())
                    .or_insert_with(|| (r.from.to_string(), Vec::new()));
                entry.1.push(r.text);
            }
            Err(ClientError::Timeout(_)) => break,
            Err(ClientError::Closed) => {
                closed = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Who did not answer: the shims the same pattern lists now, less those that did.
    let mut silent = Vec::new();
    if answers.len() < sent.reached && !closed {
        let me = client.identity().to_ascii_lowercase();
        if let Ok(entries) = client.who(Some(target)).await {
            silent = entries
                .iter()
                .map(|e| e.identity.to_string())
                .filter(|i| {
                    let key = i.to_ascii_lowercase();
                    key != me && !answers.contains_key(&key)
                })
                .collect();
            silent.sort();
        }
    }
    if !closed {
        let _ = client.close().await;
    }
    let missing = sent.reached.saturating_sub(answers.len());
    let gone = missing.saturating_sub(silent.len());
    if json {
        let answered: Vec<_> = answers
            .values()
            .map(|(identity, texts)| serde_json::json!({"identity": identity, "answers": texts}))
            .collect();
        emit(&serde_json::json!({
            "id": sent.id,
            "reached": sent.reached,
            "answered": answered,
            "silent": silent,
            "gone": gone,
        }));
    } else {
        for (identity, texts) in answers.values() {
            let texts: Vec<String> = texts.iter().map(|t| one_line(t)).collect();
            println!("{identity}: {}", texts.join(" | "));
        }
    }
    if missing > 0 {
        let why = if closed {
            "before the server closed the connection".to_string()
        } else {
            format!("within {}", humantime::format_duration(wait.timeout))
        };
        let mut names = silent.join(", ");
        if gone > 0 {
            if !names.is_empty() {
                names.push_str(", and ");
            }
            names.push_str(&format!("{gone} no longer connected"));
        }
        eprintln!(
            "velium: {missing} of {} shim{} did not answer {why}: {names}",
            sent.reached,
            plural(sent.reached)
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a JSON document and a line end on stdout.
fn emit(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

async fn tell(hub: &Hub, identity: &str, target: &str, text: &str) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let reached = client.echo(target, text).await?;
    let _ = client.close().await;
    println!("reached {reached} shim{}", plural(reached));
    Ok(ExitCode::SUCCESS)
}

/// Says that nothing matched: on stderr, and for `--json` an empty list on stdout.
fn none_matched(pattern: Option<&str>, json: bool) -> ExitCode {
    if json {
        emit(&serde_json::json!([]));
    }
    match pattern {
        Some(p) => eprintln!("velium: no shim matches {p}"),
        None => eprintln!("velium: no shims connected"),
    }
    // As `send` and `tell` do: nothing matched is status 2.
    ExitCode::from(2)
}

async fn who(
    hub: &Hub,
    identity: &str,
    pattern: Option<&str>,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let mut entries = client.who(pattern).await?;
    let me = client.identity();
    let _ = client.close().await;
    // The listing includes this tool's own connection; it is not a shim.
    if let Some(i) = entries.iter().position(|e| *e.identity == *me) {
        entries.remove(i);
    }
    if entries.is_empty() {
        return Ok(none_matched(pattern, json));
    }
    entries.sort_by(|a, b| a.identity.cmp(&b.identity).then(a.since.cmp(&b.since)));
    if json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| {
                let mut v = serde_json::json!({
                    "identity": &*e.identity,
                    "since": humantime::format_rfc3339_seconds(e.since).to_string(),
                    "udp": e.udp,
                });
                if let Some(node) = &e.node {
                    v["node"] = serde_json::json!(&**node);
                }
                v
            })
            .collect();
        emit(&serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    let width = entries
        .iter()
        .map(|e| e.identity.chars().count())
        .max()
        .unwrap_or(0);
    for e in &entries {
        let udp = if e.udp { "udp" } else { "-" };
        let since = humantime::format_rfc3339_seconds(e.since);
        match &e.node {
            // On a node of a cluster: the node serving the shim, last.
            Some(node) => println!("{:<width$}  {since}  {udp:<3}  {node}", e.identity),
            None => println!("{:<width$}  {since}  {udp}", e.identity),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows a text on one line: line breaks as `\n`.
fn one_line(text: &str) -> String {
    text.replace('\n', "\\n")
}

/// What a `velium shim` publishes: `--set` and `--set-every`.
struct Publish {
    items: Vec<(String, String)>,
    every: Option<Duration>,
}

impl Publish {
    fn items(&self) -> Vec<(&str, Option<&str>)> {
        self.items
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect()
    }
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

/// Waits for the next tick of `every`, or for ever without one.
async fn tick(every: &mut Option<tokio::time::Interval>) {
    match every {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How a `velium shim` runs.
#[derive(Clone, Copy)]
struct ShimRun {
    /// Bind a UDP channel.
    udp: bool,
    /// Connect again when the connection is lost.
    reconnect: bool,
}

/// How one connection of a `velium shim` ended.
enum Ended {
    /// SIGTERM or SIGINT: it said goodbye.
    Signal,
    /// Lost, for this reason; `again` when connecting again may help (not when a newer
    /// connection of the same identity replaced it: the two would take turns).
    Lost { reason: String, again: bool },
}

/// The waits between reconnections: doubling from [`Backoff::FIRST`] up to
/// [`Backoff::MAX`], each drawn between half and all of that, so that a fleet whose hub
/// restarts does not come back in one burst.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);
    /// A connection that lasted this long starts the waits over.
    const STEADY: Duration = Duration::from_secs(10);

    fn next(&mut self) -> Duration {
        let ceiling = Self::FIRST
            .saturating_mul(1 << self.attempt.min(16))
            .min(Self::MAX);
        self.attempt += 1;
        ceiling.mul_f64(rand::random_range(0.5..=1.0))
    }
}

async fn shim(
    hub: &Hub,
    identity: &str,
    publish: &Publish,
    how: ShimRun,
) -> Result<ExitCode, Fatal> {
    let mut signals = Signals::new()?;
    let mut backoff = Backoff { attempt: 0 };
    let mut connected_once = false;
    loop {
        let connecting = Client::connect_with(hub.addr, identity, hub.options.clone());
        let attempt = tokio::select! {
            c = connecting => c,
            _ = signals.recv() => return Ok(ExitCode::SUCCESS),
        };
        let ended = match attempt {
            Ok(client) => {
                connected_once = true;
                let since = Instant::now();
                let ended = serve(&client, publish, how.udp, &mut signals).await?;
                if since.elapsed() >= Backoff::STEADY {
                    backoff.attempt = 0;
                }
                if matches!(ended, Ended::Signal) {
                    let _ = client.close().await;
                }
                ended
            }
            // The first connection is the arguments' test: a failure is reported as any
            // command's; later a hub restarting is waited for, but a refusal that another
            // try would meet again ends the shim.
            Err(e) if !connected_once || !worth_retrying(&e) => return Err(e.into()),
            Err(e) => Ended::Lost {
                reason: Fatal::from(e).0,
                again: true,
            },
        };
        match ended {
            Ended::Signal => return Ok(ExitCode::SUCCESS),
            Ended::Lost { reason, again } if !again || !how.reconnect => {
                eprintln!("velium: {reason}");
                return Ok(ExitCode::from(1));
            }
            Ended::Lost { reason, .. } => {
                let wait = backoff.next();
                eprintln!(
                    "velium: {reason}; connecting again in {:.1}s",
                    wait.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = signals.recv() => return Ok(ExitCode::SUCCESS),
                }
            }
        }
    }
}

/// Whether a failed reconnection may succeed later: not when the hub refused the
/// credentials or the identity, nor when TLS failed (a certificate does not mend itself).
fn worth_retrying(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. }
        | ClientError::Timeout(_)
        | ClientError::Closed
        | ClientError::Io(_) => true,
        // Refusals of a full or busy hub pass; refusals of who we are do not.
        ClientError::Server(msg) => {
            !(msg.contains("authentication") || msg.contains("identity") || msg.contains("user"))
        }
        _ => false,
    }
}

/// One connection of a `velium shim`: prints what arrives and answers commands until the
/// connection ends or a signal comes.
async fn serve(
    client: &Client,
    publish: &Publish,
    udp: bool,
    signals: &mut Signals,
) -> Result<Ended, Fatal> {
    let items = publish.items();
    if !items.is_empty() {
        client.set_state(&items).await?;
        // Handled once the Pong is back (a refusal is an event printed below), so that
        // whoever reads the `connected` line finds the keys set.
        client.ping(b"velium-set").await?;
    }
    if udp && let Err(e) = client.bind_udp().await {
        eprintln!("velium: {e}; continuing over TCP only");
    }
    println!("connected as {}", client.identity());
    let mut resend = publish.every.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let event = tokio::select! {
            ev = client.next_event() => ev,
            _ = tick(&mut resend) => {
                let sent = match client.set_state_udp(&items).await {
                    Err(ClientError::NotBound) => client.set_state(&items).await,
                    other => other,
                };
                if let Err(e) = sent {
                    eprintln!("velium: could not send the state again: {e}");
                }
                continue;
            }
            _ = signals.recv() => return Ok(Ended::Signal),
        };
        match event {
            Some(Event::Command {
                from,
                id,
                text,
                via,
            }) => {
                println!("command from {from} (id {id}): {}", one_line(&text));
                let answered = match via {
                    Transport::Udp => client.respond_udp(id, &text).await,
                    Transport::Tcp => client.respond(id, &text).await,
                };
                if let Err(e) = answered {
                    eprintln!("velium: could not answer command {id}: {e}");
                }
            }
            Some(Event::Echo { from, text, .. }) => {
                println!("echo from {from}: {}", one_line(&text));
            }
            Some(Event::Response(r)) => {
                println!(
                    "response from {} (id {}): {}",
                    r.from,
                    r.id,
                    one_line(&r.text)
                );
            }
            // The reason the hub closes for comes again with the close.
            Some(Event::Error { message, .. }) if message.starts_with(CLOSING) => {}
            Some(Event::Error { message, .. }) => eprintln!("velium: server error: {message}"),
            Some(Event::Quit {
                via: Transport::Udp,
            }) => {
                eprintln!("velium: the hub dropped the UDP channel; binding again");
                if let Err(e) = client.bind_udp().await {
                    eprintln!("velium: {e}; continuing over TCP only");
                }
            }
            Some(Event::Quit {
                via: Transport::Tcp,
            }) => {}
            // A shim subscribes to nothing.
            Some(Event::State { .. } | Event::Join { .. } | Event::Leave { .. }) => {}
            Some(Event::Closed { reason }) => {
                let again = !reason.contains("closed the connection: replaced");
                return Ok(Ended::Lost { reason, again });
            }
            None => {
                return Ok(Ended::Lost {
                    reason: "the connection to the hub closed".into(),
                    again: true,
                });
            }
        }
    }
}

/// `state`: one Get.
async fn state(
    hub: &Hub,
    identity: &str,
    pattern: &str,
    keys: &[String],
    json: bool,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let shims = client.get_state(pattern, &keys).await?;
    let me = client.identity();
    let _ = client.close().await;
    let shims = listed(shims, &me);
    if shims.is_empty() {
        return Ok(none_matched(Some(pattern), json));
    }
    if json {
        // The keys as the shim spells them (a JSON object: sorted by key).
        let list: Vec<_> = shims
            .iter()
            .map(|s| {
                let state: serde_json::Map<String, serde_json::Value> = s
                    .items
                    .iter()
                    .map(|i| (i.key.to_string(), serde_json::json!(i.value.as_deref())))
                    .collect();
                serde_json::json!({"identity": &*s.identity, "state": state})
            })
            .collect();
        emit(&serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    for s in &shims {
        let items = s.items.iter().map(|i| (&*i.key, i.value.as_deref()));
        let _ = writeln!(out, "{}", state_line(&s.identity, items));
    }
    Ok(ExitCode::SUCCESS)
}

/// A listing as printed: sorted by identity, without this tool's own connection (listed
/// only for a `+` pattern, and holding no state).
fn listed(mut shims: Vec<ShimState>, me: &str) -> Vec<ShimState> {
    shims.retain(|s| !s.identity.eq_ignore_ascii_case(me));
    shims.sort_by(|a, b| a.identity.cmp(&b.identity));
    shims
}

/// `watch`: one subscription, printed until interrupted.
async fn watch(
    hub: &Hub,
    identity: &str,
    pattern: &str,
    keys: &[String],
    interval: Duration,
) -> Result<ExitCode, Fatal> {
    /// The only subscription.
    const SID: u32 = 1;
    let mut signals = Signals::new()?;
    // Long-lived, unlike the other operator commands: the keep-alive stays on. No UDP
    // channel: everything comes over TCP, in order.
    let client = hub.connect(identity, hub.options.clone()).await?;
    let me = client.identity();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let snapshot = listed(client.subscribe(SID, pattern, &keys, interval).await?, &me);
    if snapshot.is_empty() {
        eprintln!("velium: no shim matches {pattern} yet; watching");
    }
    let mut view = View::default();
    for s in &snapshot {
        view.apply(&s.identity, true, &s.items);
        let items = s.items.iter().map(|i| (&*i.key, i.value.as_deref()));
        if !print(&state_line(&s.identity, items)) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    loop {
        let event = tokio::select! {
            ev = client.next_event() => ev,
            _ = signals.recv() => break,
        };
        let line = match event {
            Some(Event::State {
                sid: SID,
                full,
                state,
                ..
            }) if !state.identity.eq_ignore_ascii_case(&me) => {
                let changed = view.apply(&state.identity, full, &state.items);
                if changed.is_empty() {
                    continue;
                }
                let items = changed.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
                state_line(&state.identity, items)
            }
            Some(Event::Join { sid: SID, identity }) if !identity.eq_ignore_ascii_case(&me) => {
                view.join(&identity);
                format!("+{identity}")
            }
            Some(Event::Leave {
                sid: SID,
                identity,
                reason,
            }) if !identity.eq_ignore_ascii_case(&me) => {
                view.leave(&identity);
                format!("-{identity} {reason}")
            }
            Some(Event::Error { message, .. }) if message.starts_with(CLOSING) => continue,
            Some(Event::Error { message, .. }) => {
                eprintln!("velium: server error: {message}");
                continue;
            }
            Some(Event::Closed { reason }) => {
                eprintln!("velium: {reason}");
                return Ok(ExitCode::from(1));
            }
            None => {
                eprintln!("velium: the connection to the hub closed");
                return Ok(ExitCode::from(1));
            }
            // Commands and echoes sent to this tool, our own shim, Quit before Closed.
            Some(_) => continue,
        };
        if !print(&line) {
            // Whoever read the output went away (a closed pipe): nothing left to do.
            return Ok(ExitCode::SUCCESS);
        }
    }
    let _ = client.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Prints one line and flushes it, so that a pipe reader sees each change as it happens;
/// false when stdout is gone.
fn print(line: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

/// What `watch` holds of each watched shim, to print only what really changed (a full
/// frame after a rename or a resync repeats what is known; a delta may carry a value that
/// changed and changed back). Identities and keys compare ignoring ASCII case, as the hub
/// compares them.
#[derive(Default)]
struct View {
    /// By identity in lower case: the keys (as spelled) and values, in order.
    shims: HashMap<String, Vec<(String, String)>>,
}

impl View {
    /// Applies a State frame; returns the changes: `(key, Some(value))` set, `(key,
    /// None)` deleted, in frame order (deletions a full frame implies last).
    fn apply(
        &mut self,
        identity: &str,
        full: bool,
        items: &[velium_server::client::StateItem],
    ) -> Vec<(String, Option<String>)> {
        let held = self.shims.entry(identity.to_ascii_lowercase()).or_default();
        let mut changes = Vec::new();
        let pos = |held: &[(String, String)], key: &str| {
            held.iter().position(|(k, _)| k.eq_ignore_ascii_case(key))
        };
        if full {
            let mut old = std::mem::take(held);
            for item in items {
                let Some(v) = &item.value else { continue };
                if pos(held, &item.key).is_some() {
                    continue;
                }
                match pos(&old, &item.key) {
                    Some(i) if old[i].1 == *v => {}
                    _ => changes.push((item.key.clone(), Some(v.clone()))),
                }
                if let Some(i) = pos(&old, &item.key) {
                    old.remove(i);
                }
                held.push((item.key.clone(), v.clone()));
            }
            changes.extend(old.into_iter().map(|(k, _)| (k, None)));
        } else {
            for item in items {
                match (&item.value, pos(held, &item.key)) {
                    (Some(v), Some(i)) if held[i].1 == *v => {}
                    (Some(v), Some(i)) => {
                        held[i].1 = v.clone();
                        changes.push((item.key.clone(), Some(v.clone())));
                    }
                    (Some(v), None) => {
                        held.push((item.key.clone(), v.clone()));
                        changes.push((item.key.clone(), Some(v.clone())));
                    }
                    (None, Some(i)) => {
                        let (k, _) = held.remove(i);
                        changes.push((k, None));
                    }
                    (None, None) => {}
                }
            }
        }
        changes
    }

    /// A shim appeared: it holds nothing yet.
    fn join(&mut self, identity: &str) {
        self.shims.insert(identity.to_ascii_lowercase(), Vec::new());
    }

    /// A shim went: forget it.
    fn leave(&mut self, identity: &str) {
        self.shims.remove(&identity.to_ascii_lowercase());
    }
}

/// `IDENTITY KEY=VALUE ...`, a deleted key as `-KEY`, values quoted as [`quote`] does.
fn state_line<'a>(
    identity: &str,
    items: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> String {
    let mut line = identity.to_string();
    for (key, value) in items {
        line.push(' ');
        match value {
            Some(v) => {
                line.push_str(key);
                line.push('=');
                line.push_str(&quote(v));
            }
            None => {
                line.push('-');
                line.push_str(key);
            }
        }
    }
    line
}

/// A value as `state` and `watch` print it, so that a line splits at its spaces: as it is,
/// unless it is empty or holds a space (or other white space), a double quote or a
/// backslash: then in double quotes, `"` and `\` escaped with a backslash. Line breaks
/// (and carriage returns and tabs) are shown as `\n` (`\r`, `\t`) either way, so every
/// value stays on its line.
fn quote(v: &str) -> Cow<'_, str> {
    let quoted = v.is_empty()
        || v.chars()
            .any(|c| c == '"' || c == '\\' || (c.is_whitespace() && c != '\n'));
    let escaped = v.contains(['\n', '\r', '\t']);
    if !quoted && !escaped {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 2);
    if quoted {
        out.push('"');
    }
    for c in v.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    if quoted {
        out.push('"');
    }
    Cow::Owned(out)
}

/// The admin listener and the bearer token it is given.
struct Admin {
    addr: SocketAddr,
    token: Option<Vec<u8>>,
}

/// `GET path` on the admin listener, with `Authorization: Bearer TOKEN` when there is a
/// token; a non-200 answer is an error.
fn admin_get(admin: &Admin, path: &str) -> Result<String, Fatal> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let addr = admin.addr;
    let mut req = agent.get(format!("http://{addr}{path}"));
    if let Some(token) = &admin.token {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(token);
        req = req.header_raw("Authorization", &value);
    }
    let failed = |e: ureq::Error| Fatal(format!("admin listener at {addr}: {e}"));
    let mut resp = req.call().map_err(failed)?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().map_err(failed)?;
    match status {
        200 => Ok(body),
        401 if admin.token.is_none() => Err(Fatal(format!(
            "admin listener at {addr} requires a token: give --admin-token-file FILE"
        ))),
        401 => Err(Fatal(format!(
            "admin listener at {addr} refused the token (401): check --admin-token-file"
        ))),
        _ => Err(Fatal(format!(
            "admin listener answered {status}: {}",
            body.trim()
        ))),
    }
}

/// `who --admin`: the listing from GET /shims.
fn who_admin(admin: &Admin, pattern: Option<&str>, json: bool) -> Result<ExitCode, Fatal> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("pattern", pattern.unwrap_or(">"))
        .finish();
    let body = admin_get(admin, &format!("/shims?{query}"))?;
    let mut list: Vec<serde_json::Value> =
        serde_json::from_str(&body).map_err(|e| Fatal(format!("bad /shims answer: {e}")))?;
    if list.is_empty() {
        return Ok(none_matched(pattern, json));
    }
    let since = |s: &serde_json::Value| {
        let at = std::time::UNIX_EPOCH
            + Duration::from_millis(s["connected_unix_ms"].as_u64().unwrap_or(0));
        humantime::format_rfc3339_seconds(at).to_string()
    };
    if json {
        // The admin listener's objects, with `since` as `who --json` gives it.
        for s in &mut list {
            s["since"] = serde_json::json!(since(s));
        }
        emit(&serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let width = list
        .iter()
        .map(|s| text(&s["identity"]).chars().count())
        .max()
        .unwrap_or(0);
    for s in &list {
        println!(
            "{:<width$}  {}  {}  udp {}  core {}  in {}  out {}",
            text(&s["identity"]),
            since(s),
            text(&s["peer"]),
            text(&s["udp"]),
            s["core"],
            s["frames_in"],
            s["frames_out"],
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The samples of a Prometheus text exposition: `(name, labels, value)`.
struct Samples<'a>(Vec<(&'a str, &'a str, f64)>);

impl<'a> Samples<'a> {
    fn parse(text: &'a str) -> Samples<'a> {
        Samples(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (key, value) = l.rsplit_once(' ')?;
                    let (name, labels) = match key.split_once('{') {
                        Some((n, rest)) => (n, rest.trim_end_matches('}')),
                        None => (key, ""),
                    };
                    Some((name, labels, value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The sample of `name` with exactly these labels (0 if none).
    fn get(&self, name: &str, labels: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, l, _)| *n == name && *l == labels)
            .map_or(0.0, |s| s.2)
    }

    /// The sum of the samples of `name` whose labels hold every one of `has`.
    fn sum(&self, name: &str, has: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| *n == name && has.iter().all(|h| l.contains(h)))
            .fold(0.0, |sum, s| sum + s.2)
    }

    /// The samples of `name` above 0, by the value of their one label `label`.
    fn nonzero(&self, name: &str, label: &str) -> BTreeMap<String, serde_json::Value> {
        self.0
            .iter()
            .filter(|(n, _, v)| *n == name && *v > 0.0)
            .map(|(_, l, v)| {
                let key = l
                    .strip_prefix(&format!("{label}=\""))
                    .map_or(*l, |k| k.trim_end_matches('"'));
                (key.to_string(), n(*v))
            })
            .collect()
    }

    /// A latency summary in microseconds.
    fn latency(&self, name: &str) -> serde_json::Value {
        let us = |q: &str| n((self.get(name, &format!("quantile=\"{q}\"")) * 1e6).round());
        serde_json::json!({
            "p50_us": us("0.5"),
            "p99_us": us("0.99"),
            "p999_us": us("0.999"),
            "count": n(self.get(&format!("{name}_count"), "")),
        })
    }
}

/// A sample's value in JSON: a whole number as an integer (counters and gauges are), else
/// as it is.
fn n(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && (0.0..9.0e15).contains(&v) {
        serde_json::json!(v as u64)
    } else {
        serde_json::json!(v)
    }
}

/// `stats`: a digest of GET /metrics, as lines or (`--json`) one object holding the same
/// figures.
fn stats(admin: &Admin, json: bool) -> Result<ExitCode, Fatal> {
    let text = admin_get(admin, "/metrics")?;
    let m = Samples::parse(&text);
    let traffic = |dir: &str| {
        let d = format!("direction=\"{dir}\"");
        let of = |name: &str, t: &str| m.sum(name, &[&d, &format!("transport=\"{t}\"")]);
        serde_json::json!({
            "tcp_frames": n(of("velium_frames_total", "tcp")),
            "tcp_bytes": n(of("velium_bytes_total", "tcp")),
            "udp_frames": n(of("velium_frames_total", "udp")),
            "udp_bytes": n(of("velium_bytes_total", "udp")),
        })
    };
    let digest = serde_json::json!({
        "connections": n(m.get("velium_connections", "")),
        "connections_limit": n(m.get("velium_connections_limit", "")),
        "shims": n(m.get("velium_shims", "")),
        "udp_bound": n(m.get("velium_udp_bound", "")),
        "accepted": n(m.get("velium_connections_accepted_total", "")),
        "identified": n(m.get("velium_identified_total", "")),
        "frames_in": traffic("in"),
        "frames_out": traffic("out"),
        "handshake": m.latency("velium_handshake_seconds"),
        "udp_bind": m.latency("velium_udp_bind_seconds"),
        "errors": m.nonzero("velium_errors_total", "kind"),
        "refused": m.nonzero("velium_refused_total", "reason"),
        "slow_consumers": n(m.get("velium_slow_consumers_total", "")),
        "udp_quit_sent": n(m.get("velium_udp_quit_total", "result=\"sent\"")),
        "udp_quit_rate_limited": n(m.get("velium_udp_quit_total", "result=\"rate_limited\"")),
    });
    if json {
        emit(&digest);
        return Ok(ExitCode::SUCCESS);
    }
    let d = &digest;
    let counts = |v: &serde_json::Value| -> String {
        let map = v.as_object().filter(|m| !m.is_empty());
        map.map_or("none".into(), |m| {
            let kv: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            kv.join("  ")
        })
    };
    println!(
        "connections      {} (limit {})",
        d["connections"], d["connections_limit"]
    );
    println!(
        "shims            {} identified, {} with UDP bound",
        d["shims"], d["udp_bound"]
    );
    println!(
        "accepted         {} connections, {} identified",
        d["accepted"], d["identified"]
    );
    for (key, label) in [("frames_in", "frames in "), ("frames_out", "frames out")] {
        let t = &d[key];
        println!(
            "{label}       tcp {} ({} bytes)  udp {} ({} bytes)",
            t["tcp_frames"], t["tcp_bytes"], t["udp_frames"], t["udp_bytes"],
        );
    }
    for (key, label) in [("handshake", "handshake "), ("udp_bind", "udp bind  ")] {
        let l = &d[key];
        let us = |q: &str| &l[q];
        println!(
            "{label}       p50 {} us  p99 {} us  p99.9 {} us  (n={})",
            us("p50_us"),
            us("p99_us"),
            us("p999_us"),
            l["count"]
        );
    }
    println!("errors           {}", counts(&d["errors"]));
    println!("refused          {}", counts(&d["refused"]));
    println!("slow consumers   {}", d["slow_consumers"]);
    println!(
        "udp quit         {} sent, {} rate-limited",
        d["udp_quit_sent"], d["udp_quit_rate_limited"]
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use velium_server::client::StateItem;

    #[test]
    fn values_are_quoted_only_when_they_must_be() {
        assert_eq!(quote("4500/5000"), "4500/5000");
        assert_eq!(quote("a=b:c"), "a=b:c");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("back in 5"), "\"back in 5\"");
        assert_eq!(quote("say \"hi\""), r#""say \"hi\"""#);
        assert_eq!(quote(r"C:\games"), r#""C:\\games""#);
        assert_eq!(quote("one\ntwo"), r"one\ntwo");
        assert_eq!(quote("one\ntwo three"), r#""one\ntwo three""#);
        assert_eq!(quote("tab\there"), r#""tab\there""#);
        assert_eq!(quote("héros"), "héros");
        assert!(matches!(quote("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn state_lines_join_items() {
        let items = [("hp", Some("1/2")), ("note", Some("a b")), ("zone", None)];
        assert_eq!(
            state_line("peq.a.bob", items.into_iter()),
            r#"peq.a.bob hp=1/2 note="a b" -zone"#
        );
        assert_eq!(state_line("peq.a.bob", std::iter::empty()), "peq.a.bob");
    }

    fn item(key: &str, value: Option<&str>) -> StateItem {
        StateItem {
            key: key.into(),
            value: value.map(Into::into),
            age: Duration::ZERO,
        }
    }

    fn changes(v: &[(String, Option<String>)]) -> Vec<(&str, Option<&str>)> {
        v.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect()
    }

    #[test]
    fn the_view_reports_only_changes() {
        let mut view = View::default();
        let snap = [item("hp", Some("1")), item("mp", Some("2"))];
        assert_eq!(
            changes(&view.apply("A.b", true, &snap)),
            [("hp", Some("1")), ("mp", Some("2"))]
        );
        // A delta repeating a value, a delete of an absent key: nothing.
        let same = [item("HP", Some("1")), item("gone", None)];
        assert!(view.apply("a.B", false, &same).is_empty());
        let d = [item("mp", Some("3")), item("hp", None), item("x", Some(""))];
        assert_eq!(
            changes(&view.apply("a.b", false, &d)),
            [("mp", Some("3")), ("hp", None), ("x", Some(""))]
        );
        // A full frame: what differs, then what it no longer holds.
        let full = [item("x", Some("")), item("y", Some("9"))];
        assert_eq!(
            changes(&view.apply("a.b", true, &full)),
            [("y", Some("9")), ("mp", None)]
        );
        assert!(view.apply("a.b", true, &full).is_empty());
        view.leave("A.B");
        view.join("a.b");
        assert_eq!(
            changes(&view.apply("a.b", true, &full)),
            [("x", Some("")), ("y", Some("9"))]
        );
    }

    #[test]
    fn durations_take_seconds_or_units() {
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_every("0").is_err());
        // --timeout takes durations as the server does.
        assert_eq!(parse_secs("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("10"), Ok(Duration::from_secs(10)));
        assert!(parse_secs("0").is_err() && parse_secs("2d").is_err());
        assert!(parse_interval("2h").is_err());
        assert_eq!(parse_interval("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_item("note=a=b c"),
            Ok(("note".into(), "a=b c".into()))
        );
        assert_eq!(parse_item("e="), Ok(("e".into(), String::new())));
        assert!(parse_item("hp").is_err());
        assert!(parse_item("h p=1").is_err());
    }
}
