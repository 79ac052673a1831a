//! The command line: what each command takes, its help, and how its words become a
//! target and a text.

use super::*;

pub(crate) const TARGET_HELP: &str = "\
Which shims to address. Identities are dot-separated segments (server.zone.character, \
e.g. peq.ecommons.bob). In a target, a `*` segment matches any one segment \
(peq.*.bob: bob in any zone) and a last `>` segment matches one or more segments \
(peq.>: everybody on peq); case is ignored. The sender is left out of its own targets \
unless the target starts with `+` (+peq.>). Quote targets holding `*` or `>` in the shell.

Filters narrow a target by the state the shims publish: the words right after the target of the form KEY=VALUE (the key's value equals VALUE) or KEY~WORD (WORD is one of the key's space-separated words) are filters, all of which must hold; case is ignored, and a shim without the key passes no filter on it. They need no quoting: `velium send 'peq.>' class=CLR group=Bob /cast 1`. They can also follow the pattern after commas, in one word: 'peq.>,class=CLR'. Filters never widen what the pattern names.";

pub(crate) const SEND_EXAMPLES: &str = "\
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

pub(crate) const TELL_EXAMPLES: &str = "\
Examples:
  velium tell 'peq.>' server restart in 5 minutes
  velium tell peq.ecommons.bob hello bob
  velium tell 'peq.>' raid=Alice pull in 10

Prints `reached N shims`. Exit status: 0 when at least one shim was reached, 2 if no shim \
matches or the hub cannot be reached.";

pub(crate) const WHO_EXAMPLES: &str = "\
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

pub(crate) const WHO_ADMIN: &str = "\
With --admin ADDR (or VELIUM_ADMIN) the listing comes from the hub's admin listener \
(GET /shims) and adds each shim's peer address, core and frames in/out; no shim \
connection is made.";

pub(crate) const STATS_EXAMPLES: &str = "\
Examples:
  velium stats --admin 127.0.0.1:9100

Reads GET /metrics from the hub's admin listener (velium-server --admin ADDR) and prints \
connections, shims, traffic, handshake latency, errors and refusals. A hub with an admin \
token needs --admin-token-file FILE (or VELIUM_ADMIN_TOKEN_FILE). Exit status 2 if the \
admin listener cannot be reached or refuses the token.";

pub(crate) const SHIM_EXAMPLES: &str = "\
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
hub as its Terms say, to stay connected; Ctrl-C or SIGTERM says goodbye and exits 0. A hub \
that cannot be reached (not up yet, restarting, full) or a lost connection is tried again \
after 0.5 s, then twice as long each time up to 30 s, each wait drawn between half and all \
of that, the hub's name resolved again each time. A shim replaced by a newer connection of \
its identity exits 1 (two would take turns), as does any loss with --no-reconnect; a hub \
that refuses the credentials or the identity exits 2.";

pub(crate) const STATE_EXAMPLES: &str = "\
Examples:
  velium state 'peq.ecommons.*'          every key of the shims in one zone
  velium state 'peq.>' hp target         only these keys
  velium state group=Bob hp mana         Bob's group's hp and mana

Prints one line per matching shim, sorted: `IDENTITY KEY=VALUE KEY=VALUE ...`, the keys in \
the order the shim holds them. A value that is empty or holds a space, a double quote or \
a backslash is written in double quotes, with `\\\"` and `\\\\` inside; a line break \
is shown as `\\n`. Exit status: 0 when some shim matched, 2 (and `no shim matches \
PATTERN` on stderr) when none did or the hub cannot be reached.";

pub(crate) const WATCH_EXAMPLES: &str = "\
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
pub(crate) const DURATION_HELP: &str = "seconds (1.5) or with a unit (500ms, 2s, 1m)";

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
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) hub: HubArgs,
    #[command(flatten)]
    pub(crate) admin: AdminArgs,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

/// The exit status of every command, in `velium --help` and the man page.
pub(crate) const EXIT_STATUS: &str = "\
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
pub(crate) struct HubArgs {
    /// The hub's address, HOST:PORT [default: 127.0.0.1:12345] [env: VELIUM_SERVER]
    #[arg(long, value_name = "ADDR")]
    pub(crate) server: Option<String>,
    /// File holding the hub's shared secret, or with --user that user's secret
    /// (VELIUM_SECRET may hold the secret itself instead) [env: VELIUM_SECRET_FILE]
    #[arg(long, value_name = "FILE")]
    pub(crate) secret_file: Option<std::path::PathBuf>,
    /// The hub user to authenticate as (a [[user]] of the hub's config); needs its secret
    /// [env: VELIUM_USER]
    #[arg(long, value_name = "NAME")]
    pub(crate) user: Option<String>,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
}

impl HubArgs {
    /// The options the environment gives (VELIUM_SERVER, ...). Read here rather than by
    /// clap, which would read them for each level, so that a variable beat an option
    /// given before the command.
    pub(crate) fn env() -> HubArgs {
        HubArgs {
            server: env("VELIUM_SERVER"),
            secret_file: env("VELIUM_SECRET_FILE").map(Into::into),
            user: env("VELIUM_USER"),
            tls: TlsArgs::env(),
        }
    }

    /// These options, each taken from `top` (given before the command, or the
    /// environment) when not given here.
    pub(crate) fn or(self, top: &HubArgs) -> HubArgs {
        HubArgs {
            server: self.server.or_else(|| top.server.clone()),
            secret_file: self.secret_file.or_else(|| top.secret_file.clone()),
            user: self.user.or_else(|| top.user.clone()),
            tls: self.tls.or(&top.tls),
        }
    }

    /// The hub's address as given.
    pub(crate) fn server(&self) -> &str {
        self.server.as_deref().unwrap_or("127.0.0.1:12345")
    }
}

/// How to reach the hub's admin listener.
#[derive(Args, Clone, Default)]
#[command(next_help_heading = "The admin listener")]
pub(crate) struct AdminArgs {
    /// The hub's admin listener, HOST:PORT (for `stats` and `who --admin`)
    /// [env: VELIUM_ADMIN]
    #[arg(long, value_name = "ADDR")]
    pub(crate) admin: Option<String>,
    /// File holding the admin listener's bearer token [env: VELIUM_ADMIN_TOKEN_FILE]
    #[arg(long, value_name = "FILE")]
    pub(crate) admin_token_file: Option<std::path::PathBuf>,
}

impl AdminArgs {
    /// As [`HubArgs::env`].
    pub(crate) fn env() -> AdminArgs {
        AdminArgs {
            admin: env("VELIUM_ADMIN"),
            admin_token_file: env("VELIUM_ADMIN_TOKEN_FILE").map(Into::into),
        }
    }

    /// As [`HubArgs::or`].
    pub(crate) fn or(self, top: &AdminArgs) -> AdminArgs {
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
pub(crate) struct TlsArgs {
    /// Speak TLS 1.3 to the hub, checking its certificate against the system's roots (or
    /// --ca); a shim's UDP channel is then sealed [env: VELIUM_TLS]
    #[arg(long)]
    pub(crate) tls: bool,
    /// PEM file of the CA certificates to trust instead of the system's (implies --tls)
    /// [env: VELIUM_CA]
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Do not verify the hub's certificate (implies --tls): anybody on the path can pose
    /// as the hub, so for tests only; warns on every run
    #[arg(long)]
    pub(crate) insecure: bool,
    /// PEM client certificate chain to present, for a hub that requires one (implies
    /// --tls; needs --key) [env: VELIUM_CERT]
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert [env: VELIUM_KEY]
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<std::path::PathBuf>,
    /// The name the hub's certificate must carry [default: the host of --server]
    /// (implies --tls) [env: VELIUM_SERVER_NAME]
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,
}

impl TlsArgs {
    /// As [`HubArgs::env`]; `--insecure` has no variable, so that it is never on without
    /// being seen on the command line.
    pub(crate) fn env() -> TlsArgs {
        TlsArgs {
            tls: env("VELIUM_TLS").is_some_and(|v| {
                !matches!(
                    v.to_ascii_lowercase().as_str(),
                    "0" | "false" | "no" | "off" | "n" | "f"
                )
            }),
            ca: env("VELIUM_CA").map(Into::into),
            insecure: false,
            cert: env("VELIUM_CERT").map(Into::into),
            key: env("VELIUM_KEY").map(Into::into),
            server_name: env("VELIUM_SERVER_NAME"),
        }
    }

    /// As [`HubArgs::or`]; a certificate and its key go together.
    pub(crate) fn or(self, top: &TlsArgs) -> TlsArgs {
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
    pub(crate) fn options(&self, host: &str) -> Option<TlsOptions> {
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

/// A variable of the environment, unless unset or empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The identity an operator command connects as, and how long it waits.
#[derive(Args)]
pub(crate) struct Operator {
    /// Identity to connect as [default: velium.cli.<pid>]
    #[arg(long, value_name = "IDENTITY")]
    pub(crate) name: Option<String>,
    /// How long to wait for the hub: to connect, and for its answers (a send's: for the
    /// shims' responses). Seconds, or a duration such as 500ms or 1m
    #[arg(long, value_name = "DURATION", default_value = "5", value_parser = parse_secs)]
    pub(crate) timeout: Duration,
    #[command(flatten)]
    pub(crate) hub: HubArgs,
}

impl Operator {
    pub(crate) fn identity(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("velium.cli.{}", std::process::id()))
    }
}

/// `--json`, for the commands that print a listing.
#[derive(Args)]
pub(crate) struct Output {
    /// Print one JSON document on stdout instead of lines (errors stay on stderr, and the
    /// exit status is the same)
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
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
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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
pub(crate) fn parse_every(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s} must be more than 0"));
    }
    Ok(d)
}

/// `--interval`: 0 to an hour, as the hub takes it.
pub(crate) fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_millis(MAX_INTERVAL_MS) {
        return Err(format!("{s} must be at most an hour"));
    }
    Ok(d)
}

/// `--set KEY=VALUE`: the key in the hub's grammar, the value anything (even empty).
/// Whether `word` has the form of a target filter: `KEY=VALUE` or `KEY~WORD`, KEY of the
/// key grammar.
pub(crate) fn is_filter(word: &str) -> bool {
    word.find(['=', '~'])
        .is_some_and(|at| check_key(&word.as_bytes()[..at]).is_ok())
}

/// `target` with `filters` after it, each after a comma.
pub(crate) fn with_filters<'a>(
    target: &str,
    filters: impl IntoIterator<Item = &'a String>,
) -> String {
    let mut t = target.to_string();
    for f in filters {
        t.push(',');
        t.push_str(f);
    }
    t
}

/// `send` and `tell`: the target with the filter words that follow it, and the text (the
/// rest, joined with spaces).
pub(crate) fn routed(
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
pub(crate) fn listing_target(
    pattern: Option<&str>,
    filters: &[String],
) -> Result<Option<String>, Fatal> {
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

/// `state` and `watch`: the target (the pattern, checked as the hub would, or every shim
/// when it is a filter, with the filter words) and the keys (the other words).
pub(crate) fn state_target(
    pattern: &str,
    words: &[String],
) -> Result<(String, Vec<String>), Fatal> {
    let (filters, keys): (Vec<String>, Vec<String>) =
        words.iter().cloned().partition(|w| is_filter(w));
    let target = if is_filter(pattern) {
        with_filters(">", std::iter::once(&pattern.to_string()).chain(&filters))
    } else {
        check_target("pattern", pattern)?;
        with_filters(pattern, &filters)
    };
    Ok((target, keys))
}

pub(crate) fn parse_item(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    check_key(key.as_bytes()).map_err(|e| format!("bad key {key:?}: {e}"))?;
    Ok((key.to_string(), value.to_string()))
}

/// `--timeout`: a duration as the server takes it (seconds, or `500ms`, `1m`), more than 0
/// and at most a day.
pub(crate) fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!("{s} must be more than 0 and at most a day"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

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
