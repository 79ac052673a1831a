//! `velium`: the command-line tool for a velium-server hub.
//!
//! Operator commands (`send`, `tell`, `who`) connect, do one thing and leave; `shim` is a
//! stand-in shim that stays connected and answers commands, for trying a hub out and for
//! tests. `stats`, and `who --admin`, read the hub's admin listener instead. Exit status: 0
//! on success, 1 when fewer shims answered a `send` than it reached (or a `shim` lost its
//! connection), 2 when nothing could be done (no shim matches, hub unreachable, bad
//! arguments). Errors are one line on stderr, prefixed `velium:`.
//!
//! `--tls` (implied by `--ca`, `--cert`, `--insecure` and `--server-name`) speaks TLS to
//! the hub, and `velium shim` then seals its UDP channel; `--admin-token-file` presents the
//! admin listener's bearer token.

use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use velium_server::client::{Client, ClientError, ClientOptions, Event, TlsOptions, Transport};

const TARGET_HELP: &str = "\
Which shims to address. Identities are dot-separated segments (server.zone.character, \
e.g. peq.ecommons.bob). In a target, a `*` segment matches any one segment \
(peq.*.bob: bob in any zone) and a last `>` segment matches one or more segments \
(peq.>: everybody on peq); case is ignored. The sender is left out of its own targets \
unless the target starts with `+` (+peq.>). Quote targets holding `*` or `>` in the shell.";

const SEND_EXAMPLES: &str = "\
Examples:
  velium send peq.ecommons.bob /sit              one shim
  velium send 'peq.*.bob' /loc                   bob, whichever zone he is in
  velium send --timeout 10 'peq.>' /who          every shim on peq, wait up to 10 s

Waits until every shim reached has answered (or --timeout), then prints one line per shim \
that answered, sorted: `IDENTITY: RESPONSE`, several answers of one shim joined by ` | `, \
line breaks shown as `\\n`. Exit status: 0 when every shim reached has answered, 1 if some \
did not answer within --timeout (how many, and who, is printed on stderr: the shims the \
target lists now that did not answer), 2 if no shim matches or the hub cannot be reached.";

const TELL_EXAMPLES: &str = "\
Examples:
  velium tell 'peq.>' server restart in 5 minutes
  velium tell peq.ecommons.bob hello bob

Prints `reached N shims`. Exit status: 0 when at least one shim was reached, 2 if no shim \
matches or the hub cannot be reached.";

const WHO_EXAMPLES: &str = "\
Examples:
  velium who                      every connected shim
  velium who 'peq.ecommons.*'     the shims in one zone

Prints one line per shim: identity, connected since (UTC, RFC 3339), then `udp` if it has \
a bound UDP channel or `-` if not. This tool's own connection is not listed.";

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

Prints `connected as IDENTITY` once identified (and its UDP channel bound; sealed with \
--tls), then one line per message received:
  echo from SENDER: TEXT
  command from SENDER (id ID): TEXT
Every command is answered with its own text, over the transport it came in on. Pings the \
hub to stay connected; Ctrl-C or SIGTERM says goodbye and exits 0.";

/// Command-line tool for a velium-server hub: send commands to shims, tell them things,
/// list them, or run a stand-in shim.
#[derive(Parser)]
#[command(name = "velium", version, propagate_version = true)]
struct Cli {
    /// The hub's address, HOST:PORT
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:12345"
    )]
    server: String,
    /// File holding the hub's shared secret, or with --user that user's secret
    /// (VELIUM_SECRET may hold the secret itself instead)
    #[arg(long, global = true, value_name = "FILE", env = "VELIUM_SECRET_FILE")]
    secret_file: Option<std::path::PathBuf>,
    /// The hub user to authenticate as (a [[user]] of the hub's config); needs its secret
    #[arg(long, global = true, value_name = "NAME", env = "VELIUM_USER")]
    user: Option<String>,
    /// The hub's admin listener, HOST:PORT (for `stats` and `who --admin`)
    #[arg(long, global = true, value_name = "ADDR", env = "VELIUM_ADMIN")]
    admin: Option<String>,
    /// File holding the admin listener's bearer token (for `stats` and `who --admin`)
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "VELIUM_ADMIN_TOKEN_FILE"
    )]
    admin_token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to speak TLS to the hub.
#[derive(Args)]
struct TlsArgs {
    /// Speak TLS 1.3 to the hub, checking its certificate against the system's roots (or
    /// --ca); a shim's UDP channel is then sealed
    #[arg(long, global = true, env = "VELIUM_TLS")]
    tls: bool,
    /// PEM file of the CA certificates to trust instead of the system's (implies --tls)
    #[arg(long, global = true, value_name = "FILE", env = "VELIUM_CA")]
    ca: Option<std::path::PathBuf>,
    /// Do not verify the hub's certificate (implies --tls): anybody on the path can pose
    /// as the hub, so for tests only; warns on every run
    // No variable sets it, so that it is never on without being seen on the command line.
    #[arg(long, global = true)]
    insecure: bool,
    /// PEM client certificate chain to present, for a hub that requires one (implies
    /// --tls; needs --key)
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "VELIUM_CERT",
        requires = "key"
    )]
    cert: Option<std::path::PathBuf>,
    /// PEM private key of --cert
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "VELIUM_KEY",
        requires = "cert"
    )]
    key: Option<std::path::PathBuf>,
    /// The name the hub's certificate must carry [default: the host of --server]
    /// (implies --tls)
    #[arg(long, global = true, value_name = "NAME", env = "VELIUM_SERVER_NAME")]
    server_name: Option<String>,
}

impl TlsArgs {
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

/// The identity an operator command connects as.
#[derive(Args)]
struct Operator {
    /// Identity to connect as [default: velium.cli.<pid>]
    #[arg(long, value_name = "IDENTITY")]
    name: Option<String>,
}

impl Operator {
    fn identity(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("velium.cli.{}", std::process::id()))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Send a command to shims and print their responses
    #[command(after_help = SEND_EXAMPLES)]
    Send {
        #[command(flatten)]
        op: Operator,
        /// Seconds to wait for the responses
        #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
        timeout: Duration,
        #[arg(help = "Which shims to address (see --help for the pattern syntax)", long_help = TARGET_HELP)]
        target: String,
        /// The command; its words are joined with single spaces
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Send a text (an Echo, which is not answered) to shims
    #[command(after_help = TELL_EXAMPLES)]
    Tell {
        #[command(flatten)]
        op: Operator,
        #[arg(help = "Which shims to address (see --help for the pattern syntax)", long_help = TARGET_HELP)]
        target: String,
        /// The text; its words are joined with single spaces
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// List connected shims
    #[command(after_help = format!("{WHO_EXAMPLES}\n\n{WHO_ADMIN}"))]
    Who {
        #[command(flatten)]
        op: Operator,
        /// Only shims matching this pattern (same syntax as a send target, without `+`)
        pattern: Option<String>,
    },
    /// Show the hub's counters and latency (from its admin listener)
    #[command(after_help = STATS_EXAMPLES)]
    Stats,
    /// Run a stand-in shim that prints what it receives and answers every command
    #[command(after_help = SHIM_EXAMPLES)]
    Shim {
        /// The identity to connect as, e.g. peq.ecommons.bob
        #[arg(long, value_name = "IDENTITY")]
        name: String,
        /// Do not bind a UDP channel (TCP only)
        #[arg(long)]
        no_udp: bool,
    },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        return Err(format!("{s} must be more than 0 and at most 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A failure that ends the program with status 2.
struct Fatal(String);

impl From<ClientError> for Fatal {
    fn from(e: ClientError) -> Fatal {
        Fatal(e.to_string())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(Fatal(msg)) => {
            eprintln!("velium: {msg}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, Fatal> {
    if cli.tls.insecure {
        eprintln!("warning: --insecure: the hub's certificate is not verified");
    }
    let admin = match &cli.admin {
        Some(a) => Some(Admin {
            addr: resolve(a).await?,
            token: read_secret(cli.admin_token_file.as_deref(), "admin token file")?,
        }),
        None => None,
    };
    match (&cli.cmd, &admin) {
        (Cmd::Stats, Some(admin)) => return stats(admin),
        (Cmd::Stats, None) => {
            return Err(Fatal(
                "stats reads the hub's admin listener: give --admin ADDR".into(),
            ));
        }
        (Cmd::Who { pattern, .. }, Some(admin)) => return who_admin(admin, pattern.as_deref()),
        _ => {}
    }
    let addr = resolve(&cli.server).await?;
    let host = cli.server.rsplit_once(':').map_or(&*cli.server, |(h, _)| h);
    let options = ClientOptions {
        secret: secret(cli.secret_file.as_deref())?,
        user: cli.user.clone(),
        tls: cli.tls.options(host),
        ..ClientOptions::default()
    };
    if options.user.is_some() && options.secret.is_none() {
        return Err(Fatal(
            "--user needs the user's secret: give --secret-file FILE (or VELIUM_SECRET)".into(),
        ));
    }
    match cli.cmd {
        Cmd::Send {
            op,
            timeout,
            target,
            command,
        } => {
            let text = command.join(" ");
            send(addr, &op.identity(), options, &target, &text, timeout).await
        }
        Cmd::Tell { op, target, text } => {
            tell(addr, &op.identity(), options, &target, &text.join(" ")).await
        }
        Cmd::Who { op, pattern } => who(addr, &op.identity(), options, pattern.as_deref()).await,
        Cmd::Shim { name, no_udp } => shim(addr, &name, options, !no_udp).await,
        Cmd::Stats => unreachable!("handled above"),
    }
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
async fn operator(
    addr: SocketAddr,
    identity: &str,
    options: ClientOptions,
) -> Result<Client, Fatal> {
    let options = ClientOptions {
        keepalive: None,
        ..options
    };
    Ok(Client::connect_with(addr, identity, options).await?)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

async fn send(
    addr: SocketAddr,
    identity: &str,
    options: ClientOptions,
    target: &str,
    text: &str,
    timeout: Duration,
) -> Result<ExitCode, Fatal> {
    let client = operator(addr, identity, options).await?;
    let sent = client.command(target, text).await?;
    let deadline = Instant::now() + timeout;
    // Every answer of each responder, by identity (ignoring case, as the hub compares).
    let mut answers: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let note = |answers: &mut BTreeMap<String, (String, Vec<String>)>,
                r: velium_server::client::Response| {
        let entry = answers
            .entry(r.from.to_ascii_lowercase())
            .or_insert_with(|| (r.from.to_string(), Vec::new()));
        entry.1.push(r.text);
    };
    let mut closed = false;
    let mut responders = 0;
    while responders < sent.reached {
        match client
            .next_response(sent.id, deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Ok(r) => {
                note(&mut answers, r);
                responders = answers.len();
            }
            Err(ClientError::Timeout(_)) => break,
            Err(ClientError::Closed) => {
                closed = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Further answers already here, from shims that answered more than once.
    while let Ok(r) = client.next_response(sent.id, Duration::ZERO).await {
        note(&mut answers, r);
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
    for (identity, texts) in answers.values() {
        let texts: Vec<String> = texts.iter().map(|t| one_line(t)).collect();
        println!("{identity}: {}", texts.join(" | "));
    }
    if answers.len() < sent.reached {
        let missing = sent.reached - answers.len();
        let why = if closed {
            "before the server closed the connection".to_string()
        } else {
            format!("within {}", humantime::format_duration(timeout))
        };
        let mut names = silent.join(", ");
        if silent.len() < missing {
            let gone = missing - silent.len();
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

async fn tell(
    addr: SocketAddr,
    identity: &str,
    options: ClientOptions,
    target: &str,
    text: &str,
) -> Result<ExitCode, Fatal> {
    let client = operator(addr, identity, options).await?;
    let reached = client.echo(target, text).await?;
    let _ = client.close().await;
    println!("reached {reached} shim{}", plural(reached));
    Ok(ExitCode::SUCCESS)
}

async fn who(
    addr: SocketAddr,
    identity: &str,
    options: ClientOptions,
    pattern: Option<&str>,
) -> Result<ExitCode, Fatal> {
    let client = operator(addr, identity, options).await?;
    let mut entries = client.who(pattern).await?;
    let me = client.identity();
    let _ = client.close().await;
    // The listing includes this tool's own connection; it is not a shim.
    if let Some(i) = entries.iter().position(|e| *e.identity == *me) {
        entries.remove(i);
    }
    if entries.is_empty() {
        match pattern {
            Some(p) => eprintln!("velium: no shim matches {p}"),
            None => eprintln!("velium: no shims connected"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    entries.sort_by(|a, b| a.identity.cmp(&b.identity).then(a.since.cmp(&b.since)));
    let width = entries
        .iter()
        .map(|e| e.identity.chars().count())
        .max()
        .unwrap_or(0);
    for e in &entries {
        println!(
            "{:<width$}  {}  {}",
            e.identity,
            humantime::format_rfc3339_seconds(e.since),
            if e.udp { "udp" } else { "-" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows a text on one line: line breaks as `\n`.
fn one_line(text: &str) -> String {
    text.replace('\n', "\\n")
}

async fn shim(
    addr: SocketAddr,
    identity: &str,
    options: ClientOptions,
    udp: bool,
) -> Result<ExitCode, Fatal> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a supervisor may signal as soon as it reads the `connected` line.
    let mut term = signal(SignalKind::terminate()).map_err(|e| Fatal(format!("SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Fatal(format!("SIGINT: {e}")))?;
    let client = Client::connect_with(addr, identity, options).await?;
    if udp && let Err(e) = client.bind_udp().await {
        eprintln!("velium: {e}; continuing over TCP only");
    }
    println!("connected as {}", client.identity());
    loop {
        let event = tokio::select! {
            ev = client.next_event() => ev,
            _ = term.recv() => break,
            _ = int.recv() => break,
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
            Some(Event::Closed { reason }) => {
                eprintln!("velium: {reason}");
                return Ok(ExitCode::from(1));
            }
            None => return Ok(ExitCode::from(1)),
        }
    }
    let _ = client.close().await;
    Ok(ExitCode::SUCCESS)
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
fn who_admin(admin: &Admin, pattern: Option<&str>) -> Result<ExitCode, Fatal> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("pattern", pattern.unwrap_or(">"))
        .finish();
    let body = admin_get(admin, &format!("/shims?{query}"))?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&body).map_err(|e| Fatal(format!("bad /shims answer: {e}")))?;
    if list.is_empty() {
        match pattern {
            Some(p) => eprintln!("velium: no shim matches {p}"),
            None => eprintln!("velium: no shims connected"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let width = list
        .iter()
        .map(|s| text(&s["identity"]).chars().count())
        .max()
        .unwrap_or(0);
    for s in &list {
        let since = std::time::UNIX_EPOCH
            + Duration::from_millis(s["connected_unix_ms"].as_u64().unwrap_or(0));
        println!(
            "{:<width$}  {}  {}  udp {}  core {}  in {}  out {}",
            text(&s["identity"]),
            humantime::format_rfc3339_seconds(since),
            text(&s["peer"]),
            text(&s["udp"]),
            s["core"],
            s["frames_in"],
            s["frames_out"],
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `stats`: a readable digest of GET /metrics.
fn stats(admin: &Admin) -> Result<ExitCode, Fatal> {
    let text = admin_get(admin, "/metrics")?;
    // (name, labels, value) for every sample.
    let samples: Vec<(&str, &str, f64)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (name, labels) = match key.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (key, ""),
            };
            Some((name, labels, value.parse().ok()?))
        })
        .collect();
    let get = |name: &str, labels: &str| {
        samples
            .iter()
            .find(|(n, l, _)| *n == name && *l == labels)
            .map_or(0.0, |s| s.2)
    };
    let sum = |name: &str, has: &[&str]| -> f64 {
        samples
            .iter()
            .filter(|(n, l, _)| *n == name && has.iter().all(|h| l.contains(h)))
            .fold(0.0, |sum, s| sum + s.2)
    };
    let nonzero = |name: &str, label: &str| -> String {
        let v: Vec<String> = samples
            .iter()
            .filter(|(n, _, v)| *n == name && *v > 0.0)
            .map(|(_, l, v)| {
                let key = l
                    .strip_prefix(&format!("{label}=\""))
                    .map_or(*l, |k| k.trim_end_matches('"'));
                format!("{key}={v}")
            })
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join("  ")
        }
    };
    let us = |name: &str, q: &str| get(name, &format!("quantile=\"{q}\"")) * 1e6;
    println!(
        "connections      {} (limit {})",
        get("velium_connections", ""),
        get("velium_connections_limit", "")
    );
    println!(
        "shims            {} identified, {} with UDP bound",
        get("velium_shims", ""),
        get("velium_udp_bound", "")
    );
    println!(
        "accepted         {} connections, {} identified",
        get("velium_connections_accepted_total", ""),
        get("velium_identified_total", "")
    );
    for (dir, label) in [("in", "frames in "), ("out", "frames out")] {
        let d = format!("direction=\"{dir}\"");
        println!(
            "{label}       tcp {} ({} bytes)  udp {} ({} bytes)",
            sum("velium_frames_total", &[&d, "transport=\"tcp\""]),
            sum("velium_bytes_total", &[&d, "transport=\"tcp\""]),
            sum("velium_frames_total", &[&d, "transport=\"udp\""]),
            sum("velium_bytes_total", &[&d, "transport=\"udp\""]),
        );
    }
    for (name, label) in [
        ("velium_handshake_seconds", "handshake "),
        ("velium_udp_bind_seconds", "udp bind  "),
    ] {
        println!(
            "{label}       p50 {:.0} us  p99 {:.0} us  p99.9 {:.0} us  (n={})",
            us(name, "0.5"),
            us(name, "0.99"),
            us(name, "0.999"),
            get(&format!("{name}_count"), "")
        );
    }
    println!(
        "errors           {}",
        nonzero("velium_errors_total", "kind")
    );
    println!(
        "refused          {}",
        nonzero("velium_refused_total", "reason")
    );
    println!(
        "slow consumers   {}",
        get("velium_slow_consumers_total", "")
    );
    println!(
        "udp quit         {} sent, {} rate-limited",
        get("velium_udp_quit_total", "result=\"sent\""),
        get("velium_udp_quit_total", "result=\"rate_limited\"")
    );
    Ok(ExitCode::SUCCESS)
}
