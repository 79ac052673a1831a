//! Settings: defaults, the TOML file (`--config`), and command-line flags over both.
//!
//! Every setting is documented, with its default, in `deploy/velium-server.toml`.

use crate::proto::pattern::Pattern;
use crate::tls::TlsSettings;
use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use thiserror::Error;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event: time, level, message, then `key=value` fields.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields` with `message`), for a
    /// log collector.
    Json,
}

/// Which I/O driver serves the sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring, one tokio-uring runtime per core.
    Uring,
    /// epoll, one plain tokio runtime per core.
    Epoll,
    /// io_uring when the kernel allows it, else epoll (with one warning).
    Auto,
}

impl IoMode {
    /// The driver's name as logs and the banner write it.
    pub fn label(self) -> &'static str {
        match self {
            IoMode::Uring => "io_uring",
            IoMode::Epoll => "epoll",
            IoMode::Auto => "auto",
        }
    }
}

/// What happens when a shim asks for an identity another live shim holds (compared
/// ignoring ASCII case): two shims never hold the same identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DuplicateIdentity {
    /// The newcomer wins: the older connection is sent Quit and closed (a client that
    /// reconnected before the hub noticed its old connection died).
    Replace,
    /// The newcomer is answered `Error "identity in use"`.
    Refuse,
    /// Replace when the newcomer holds the same credential as the holder (the same
    /// `[[user]]`, or both the shared secret or none on a hub without users); refuse
    /// otherwise. The default.
    SameCredential,
}

/// `outbound_limit` unless configured.
pub const DEFAULT_OUTBOUND_LIMIT: usize = 1024 * 1024;

/// The server's effective settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// TCP and UDP address to serve on.
    pub listen: SocketAddr,
    /// Runtimes (threads, each pinned to a core).
    pub cores: usize,
    /// I/O driver.
    pub io: IoMode,
    /// tracing filter, e.g. `info` or `velium_server=debug`.
    pub log_level: String,
    /// How log lines are written (fixed at start).
    pub log_format: LogFormat,
    /// Admin HTTP listener (metrics, health, shim listing); off when `None`.
    pub admin: Option<SocketAddr>,
    /// How long a graceful shutdown may take to flush Quit to every shim.
    pub shutdown_timeout: Duration,
    /// Longest frame accepted, opcode and 0x0A included.
    pub max_frame: usize,
    /// Time from accept within which the first Identify must arrive.
    pub identify_timeout: Duration,
    /// Silence after which a shim is sent Quit and closed.
    pub idle_timeout: Duration,
    /// Pending outbound bytes past which a shim is closed as a slow consumer.
    pub outbound_limit: usize,
    /// Queued output that makes no progress for this long marks a slow consumer.
    pub write_deadline: Duration,
    /// Command, Echo and Who frames one shim may route per second (and
    /// burst); 0: no limit.
    pub routed_per_sec: u32,
    /// Shims reached plus Who entries listed per second for one shim's requests; 0: no
    /// limit.
    pub deliveries_per_sec: u32,
    /// Who requests per second from one shim; 0: no limit.
    pub who_per_sec: u32,
    /// Datagrams waiting to be sent, per core, when the UDP socket is full.
    pub udp_queue: usize,
    /// Datagrams waiting for one destination address.
    pub udp_queue_per_dest: usize,
    /// Quit answers per second (and burst) to one unbound UDP source.
    pub udp_quit_per_sec: u32,
    /// Open TCP connections in all (0: no limit but the open-file limit).
    pub max_connections: usize,
    /// Open TCP connections from one source IP (0: no limit).
    pub max_connections_per_source: usize,
    /// Connection attempts per second (and burst) from one source IP (0: no limit).
    pub connect_rate_per_source: u32,
    /// Networks connections and datagrams are accepted from; empty: everywhere.
    pub allow_networks: Vec<IpNet>,
    /// The shared secret a client presents in an Auth frame before Identify (only on a
    /// hub without users).
    pub secret: Option<Secret>,
    /// The users, by name: each with its secret and what it may do. Empty: the hub has
    /// no users, and every client may take any identity and address anyone.
    pub users: BTreeMap<Arc<str>, Arc<User>>,
    /// What a second claim on a held identity does.
    pub duplicate_identity: DuplicateIdentity,
    /// Commands each shim may still answer: a CommandResponse is forwarded only when its
    /// id is one of the last `answer_window` Commands the responder was sent.
    pub answer_window: usize,
    /// TLS on the TCP port (`tls_cert`, `tls_key`, `tls_client_ca`, `tls_optional`); off
    /// when `None`. Re-read from the files on a reload.
    pub tls: Option<Arc<TlsSettings>>,
    /// Time from accept within which a TLS handshake must finish.
    pub tls_handshake_timeout: Duration,
    /// Whether plain (unsealed) UDP is served at all. A TLS session always uses sealed UDP.
    pub udp_plain: bool,
    /// The bearer token the admin listener requires on everything but `/healthz`.
    pub admin_token: Option<Secret>,
    /// Admin connections open at once; at the limit a newcomer takes the place of the
    /// connection idle longest.
    pub admin_connections: usize,
    /// Longest value of one state key, in bytes.
    pub state_value_bytes: usize,
    /// Keys one shim may hold.
    pub state_keys: usize,
    /// Bytes of state (keys and values) one shim may hold.
    pub state_bytes: usize,
    /// Set frames per second (and burst) from one shim; 0: no limit.
    pub state_sets_per_sec: u32,
    /// Subscriptions one connection may hold.
    pub state_subscriptions: usize,
    /// The state keys indexed for target filters (lowercase): a filter on one of them
    /// finds its shims without looking at the others. Fixed at startup.
    pub state_index: Vec<Box<str>>,
    /// The cluster this hub is a node of (`cluster_url`); `None`: a hub on its own.
    pub cluster: Option<Arc<ClusterSettings>>,
}

/// How a node joins its cluster: the NATS server that carries it, the cluster's name and
/// this node's, and the credentials NATS asks for.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `nats://HOST:PORT` (several, separated by commas, for a NATS cluster).
    pub url: String,
    /// Nodes see each other only within one cluster name (the subjects' prefix).
    pub name: String,
    /// This node's name; `None`: `HOSTNAME:PORT`, once the port is known.
    pub node: Option<String>,
    /// What NATS is shown.
    pub auth: ClusterAuth,
}

impl fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSettings")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The credentials a node presents to NATS.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum ClusterAuth {
    /// None.
    #[default]
    None,
    /// `cluster_user` and `cluster_password` (or `cluster_password_file`).
    UserPassword(String, String),
    /// `cluster_token` (or `cluster_token_file`).
    Token(String),
    /// The nkey seed in `cluster_nkey_file`.
    Nkey(String),
}

/// The characters a node name may hold: it is one token of a NATS subject.
pub fn check_node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "node_name must be 1 to 64 bytes long, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')))
    {
        return Err(format!(
            "node_name {name:?} holds {c:?}: use letters, digits, '_', '-' and ':'"
        ));
    }
    Ok(())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:12345".parse().unwrap(),
            cores: usable_cores(),
            io: IoMode::Auto,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            admin: None,
            shutdown_timeout: Duration::from_secs(5),
            max_frame: 16 * 1024,
            identify_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            outbound_limit: DEFAULT_OUTBOUND_LIMIT,
            write_deadline: Duration::from_secs(10),
            routed_per_sec: 200,
            deliveries_per_sec: 20_000,
            who_per_sec: 20,
            udp_queue: 4096,
            udp_queue_per_dest: 64,
            udp_quit_per_sec: 4,
            max_connections: 100_000,
            max_connections_per_source: 1024,
            connect_rate_per_source: 100,
            allow_networks: Vec::new(),
            secret: None,
            users: BTreeMap::new(),
            duplicate_identity: DuplicateIdentity::SameCredential,
            answer_window: 256,
            tls: None,
            tls_handshake_timeout: Duration::from_secs(5),
            udp_plain: true,
            admin_token: None,
            admin_connections: 16,
            state_value_bytes: 1024,
            state_keys: 64,
            state_bytes: 16 * 1024,
            state_sets_per_sec: 100,
            state_subscriptions: 16,
            state_index: DEFAULT_STATE_INDEX.iter().map(|&k| Box::from(k)).collect(),
            cluster: None,
        }
    }
}

/// A shared secret, kept only as its SHA-256 digest so that comparing a presented secret
/// takes the same time whatever its length and contents.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// The secret `bytes`.
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(Sha256::digest(bytes).into())
    }

    /// Whether `presented` is the secret, compared in constant time.
    pub fn verify(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        d.ct_eq(&self.0).into()
    }

    /// A value derived from the secret for `context` (HMAC-SHA-256 keyed by its digest):
    /// what a credential made from the secret carries instead of the secret itself, and
    /// what stops holding when the secret changes.
    pub fn derive(&self, context: &[u8]) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&key, context);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `presented` is [`Secret::derive`] of `context`, compared in constant time.
    pub fn verify_derived(&self, context: &[u8], presented: &[u8]) -> bool {
        presented.ct_eq(&self.derive(context)).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A user: a credential, and what a client holding it may be and do.
///
/// Every check is decided by the user the connection authenticated as, never by the
/// identity it picked: the identity itself must be one the user may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The name the client presents in Auth (`NAME SP SECRET`).
    pub name: Arc<str>,
    /// The user's own secret.
    pub secret: Secret,
    /// Identities it may Identify and rename as.
    pub identities: Vec<Pattern>,
    /// Targets it may send Commands to (a target must be covered by one of them).
    pub commands: Vec<Pattern>,
    /// Targets it may send Echoes to; by default its `commands`.
    pub echoes: Vec<Pattern>,
    /// Identities Who lists to it; by default its `commands` and `identities`.
    pub who: Vec<Pattern>,
    /// Identities whose state it may read (Subscribe, Get); by default its `who`.
    pub state: Vec<Pattern>,
}

impl User {
    /// Whether the user may take `identity`.
    pub fn may_be(&self, identity: &str) -> bool {
        self.identities.iter().any(|p| p.matches(identity))
    }

    /// Whether the user may send a Command to `target`: some pattern of `commands` covers
    /// every identity the target could name, so the decision never depends on which shims
    /// happen to be connected.
    pub fn may_command(&self, target: &Pattern) -> bool {
        self.commands.iter().any(|p| p.covers(target))
    }

    /// Whether the user may send an Echo to `target` (as [`User::may_command`]).
    pub fn may_echo(&self, target: &Pattern) -> bool {
        self.echoes.iter().any(|p| p.covers(target))
    }

    /// Whether Who lists `identity` to the user.
    pub fn sees(&self, identity: &str) -> bool {
        self.who.iter().any(|p| p.matches(identity))
    }

    /// Whether Who lists everything to the user (no filter to apply).
    pub fn sees_all(&self) -> bool {
        self.who
            .iter()
            .any(|p| p.segs == [crate::proto::pattern::Seg::Rest])
    }

    /// Whether the user may read `identity`'s state.
    pub fn reads(&self, identity: &str) -> bool {
        self.state.iter().any(|p| p.matches(identity))
    }
}

impl Config {
    /// A digest of what every node of a cluster must agree on: the users (names, secrets
    /// and permissions), the rule for a held identity, and the per-shim limits. Nodes
    /// compare it and warn when theirs differ.
    pub fn cluster_fingerprint(&self) -> u64 {
        let mut h = Sha256::new();
        for u in self.users.values() {
            h.update(format!(
                "{}|{:?}|{:?}|{:?}|{:?}|{:?}\n",
                u.name, u.identities, u.commands, u.echoes, u.who, u.state
            ));
            h.update(u.secret.0);
        }
        if let Some(s) = &self.secret {
            h.update(s.0);
        }
        h.update(format!(
            "{:?}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.duplicate_identity,
            self.answer_window,
            self.max_frame,
            self.routed_per_sec,
            self.deliveries_per_sec,
            self.who_per_sec,
            self.state_value_bytes,
            self.state_keys,
            self.state_bytes,
            self.state_sets_per_sec,
            self.state_subscriptions
        ));
        let d: [u8; 32] = h.finalize().into();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }

    /// Whether a client must authenticate (Auth) before its first Identify.
    pub fn requires_auth(&self) -> bool {
        self.secret.is_some() || !self.users.is_empty()
    }

    /// Whether connections and datagrams from `ip` are accepted.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow_networks.is_empty() || self.allow_networks.iter().any(|n| n.contains(&ip))
    }

    /// The settings that differ between `self` and `new`, by key, split into those a
    /// reload applies and those that need a restart.
    pub fn diff(&self, new: &Config) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut live = Vec::new();
        let mut restart = Vec::new();
        macro_rules! cmp {
            ($list:ident, $($f:ident),*) => {$(
                if self.$f != new.$f { $list.push(stringify!($f)); }
            )*};
        }
        cmp!(
            restart,
            listen,
            cores,
            io,
            log_format,
            admin,
            admin_connections,
            state_index,
            cluster
        );
        cmp!(
            live,
            log_level,
            shutdown_timeout,
            max_frame,
            identify_timeout,
            idle_timeout,
            outbound_limit,
            write_deadline,
            routed_per_sec,
            deliveries_per_sec,
            who_per_sec,
            udp_queue,
            udp_queue_per_dest,
            udp_quit_per_sec,
            max_connections,
            max_connections_per_source,
            connect_rate_per_source,
            allow_networks,
            secret,
            users,
            duplicate_identity,
            answer_window,
            tls,
            tls_handshake_timeout,
            udp_plain,
            admin_token,
            state_value_bytes,
            state_keys,
            state_bytes,
            state_sets_per_sec,
            state_subscriptions
        );
        (live, restart)
    }

    /// `new` with the settings that need a restart kept as they are in `self`.
    pub fn reloaded(&self, new: Config) -> Config {
        Config {
            listen: self.listen,
            cores: self.cores,
            io: self.io,
            admin: self.admin,
            admin_connections: self.admin_connections,
            state_index: self.state_index.clone(),
            cluster: self.cluster.clone(),
            ..new
        }
    }
}

/// The number of cores this process may run on.
pub fn usable_cores() -> usize {
    core_affinity::get_core_ids()
        .map(|v| v.len())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A configuration problem, worded as the server prints it before exiting: one line, but
/// for a file the TOML parser refused, where a first line naming the file is followed by
/// the parser's own lines (the line and column, the line itself with a caret under the
/// spot, and what is wrong there). [`ConfigError::one_line`] is the form for a log field.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {}:\n{msg}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message as it formats it, several lines (without the last line
        /// break).
        msg: String,
        /// The same in one line: `line L, column C: WHAT` (or `WHAT` alone when the
        /// parser names no place).
        brief: String,
    },
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// The error in one line, for a log field or an event list: a TOML error as
    /// `config file F: line L, column C: WHAT`, everything else as displayed.
    pub fn one_line(&self) -> String {
        match self {
            ConfigError::Parse { path, brief, .. } => {
                format!("config file {}: {brief}", path.display())
            }
            e => e.to_string(),
        }
    }

    /// `e`, which the TOML parser returned for `text` read from `path`.
    fn parse(path: &std::path::Path, text: &str, e: &toml::de::Error) -> ConfigError {
        let what = e.message().trim_end();
        let brief = match e.span() {
            Some(span) => {
                let mut at = span.start.min(text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let before = &text[..at];
                let line = before.matches('\n').count() + 1;
                let start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before[start..].chars().count() + 1;
                format!("line {line}, column {column}: {}", what.replace('\n', "; "))
            }
            None => what.replace('\n', "; "),
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string().trim_end().to_string(),
            brief,
        }
    }
}

/// velium-server: a hub for fleets of game-client shims (TCP control + UDP channel).
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "velium-server",
    version,
    about,
    args_override_self = true,
    after_help = "Example:\n  velium-server --listen 127.0.0.1:12345 --cores 2 --admin 127.0.0.1:9100\n\n\
                  Flags override the config file; see deploy/velium-server.toml for every setting.\n\
                  SIGHUP re-reads the config file; SIGTERM or SIGINT stops gracefully."
)]
pub struct Args {
    /// Validate this config file (with the flags given) and exit: 0 if valid, 2 if not
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub check_config: Option<PathBuf>,
    /// TOML config file (every key is optional); re-read on SIGHUP
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TCP and UDP address to serve on [default: 0.0.0.0:12345]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Runtimes, one pinned thread per core [default: all usable cores]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// Log filter: error, warn, info, debug, trace [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log lines as text or as one JSON object per line [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// I/O driver [default: auto]
    #[arg(long, value_enum)]
    pub io: Option<IoMode>,
    /// Admin HTTP listener for /metrics, /healthz, /shims, e.g. 127.0.0.1:9100 [default: off]
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Time a graceful shutdown may take to flush Quit to every shim [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// Longest frame in bytes, opcode and 0x0A included [default: 16384]
    #[arg(long, value_name = "BYTES")]
    pub max_frame: Option<usize>,
    /// Time allowed from accept to the first Identify, e.g. 5s [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub identify_timeout: Option<String>,
    /// Silence after which a shim is sent Quit and closed, e.g. 30s [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Pending outbound bytes that make a shim a slow consumer [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub outbound_limit: Option<usize>,
    /// Queued output that makes no progress for this long marks a slow consumer, e.g.
    /// 10s [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub write_deadline: Option<String>,
    /// Command, Echo and Who frames one shim may route per second, 0 for
    /// no limit [default: 200]
    #[arg(long, value_name = "N")]
    pub routed_per_sec: Option<u32>,
    /// Shims reached (and Who entries listed) per second for one shim, 0 for no limit
    /// [default: 20000]
    #[arg(long, value_name = "N")]
    pub deliveries_per_sec: Option<u32>,
    /// Who requests per second from one shim, 0 for no limit [default: 20]
    #[arg(long, value_name = "N")]
    pub who_per_sec: Option<u32>,
    /// Datagrams queued per core while the UDP socket is full [default: 4096]
    #[arg(long, value_name = "N")]
    pub udp_queue: Option<usize>,
    /// Datagrams queued for one destination address [default: 64]
    #[arg(long, value_name = "N")]
    pub udp_queue_per_dest: Option<usize>,
    /// Quit answers per second to one unbound UDP source [default: 4]
    #[arg(long, value_name = "N")]
    pub udp_quit_per_sec: Option<u32>,
    /// Open TCP connections in all, 0 for no limit [default: 100000]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Open TCP connections from one source IP, 0 for no limit [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_connections_per_source: Option<usize>,
    /// Connection attempts per second from one source IP, 0 for no limit [default: 100]
    #[arg(long, value_name = "N")]
    pub connect_rate_per_source: Option<u32>,
    /// Accept connections and datagrams only from this network (CIDR); repeatable
    /// [default: everywhere]
    #[arg(long, value_name = "CIDR")]
    pub allow_network: Vec<String>,
    /// File holding the shared secret clients must present (Auth frame) [default: none;
    /// the VELIUM_SECRET environment variable also sets it]
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// What a claim on an identity another shim holds does [default: same-credential]
    #[arg(long, value_name = "POLICY")]
    pub duplicate_identity: Option<DuplicateIdentity>,
    /// Recent Commands per shim that it may still answer [default: 256]
    #[arg(long, value_name = "N")]
    pub answer_window: Option<usize>,
    /// PEM certificate chain: with --tls-key, the TCP port speaks TLS [default: off]
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates client certificates must chain to (mutual TLS) [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// With TLS on, also accept plaintext clients on the same port [default: false]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub tls_optional: Option<bool>,
    /// Time a TLS handshake may take from accept, e.g. 5s [default: 5s]
    #[arg(long, value_name = "DURATION")]
    pub tls_handshake_timeout: Option<String>,
    /// Serve plain (unsealed) UDP; false leaves UDP to TLS sessions [default: true]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub udp_plain: Option<bool>,
    /// File holding the bearer token the admin listener requires [default: none, open]
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Admin connections served at once [default: 16]
    #[arg(long, value_name = "N")]
    pub admin_connections: Option<usize>,
    /// Longest value of one state key, in bytes [default: 1024]
    #[arg(long, value_name = "BYTES")]
    pub state_value_bytes: Option<usize>,
    /// State keys one shim may hold [default: 64]
    #[arg(long, value_name = "N")]
    pub state_keys: Option<usize>,
    /// Bytes of state (keys and values) one shim may hold [default: 16384]
    #[arg(long, value_name = "BYTES")]
    pub state_bytes: Option<usize>,
    /// Set frames per second from one shim, 0 for no limit [default: 100]
    #[arg(long, value_name = "N")]
    pub state_sets_per_sec: Option<u32>,
    /// State subscriptions one connection may hold [default: 16]
    #[arg(long, value_name = "N")]
    pub state_subscriptions: Option<usize>,
    /// State keys indexed for target filters, comma-separated, or "none"
    /// [default: group,raid,class,level,zone,channels]
    #[arg(long, value_name = "KEYS")]
    pub state_index: Option<String>,
    /// Join a cluster of hubs through this NATS server, e.g. nats://127.0.0.1:4222
    /// [default: off, a hub on its own]
    #[arg(long = "cluster", value_name = "URL")]
    pub cluster_url: Option<String>,
    /// The cluster's name: nodes see each other only within one name [default: velium]
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// This node's name in the cluster [default: HOSTNAME:PORT]
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
}

impl Args {
    /// Whether a reload has anything to read again: the config file (`--config`), or a
    /// file a flag names (the shared secret, the admin token, the TLS certificate, key and
    /// client CA). A hub started with neither has only settings from its command line and
    /// its environment, which cannot change while it runs: a reload there is refused
    /// rather than answered "applied: none".
    pub fn reload_rereads(&self) -> bool {
        self.config.is_some()
            || self.secret_file.is_some()
            || self.admin_token_file.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_client_ca.is_some()
    }
}

/// What a reload on a hub with nothing to read again answers (see
/// [`Args::reload_rereads`]).
pub const NOTHING_TO_RELOAD: &str = "nothing to reload: the hub was started without --config";

/// The config file: every key optional, unknown keys rejected.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    cores: Option<usize>,
    io: Option<IoMode>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    admin: Option<String>,
    #[serde(default, deserialize_with = "duration_key::shutdown_timeout")]
    shutdown_timeout: Option<String>,
    max_frame: Option<usize>,
    #[serde(default, deserialize_with = "duration_key::identify_timeout")]
    identify_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration_key::idle_timeout")]
    idle_timeout: Option<String>,
    outbound_limit: Option<usize>,
    #[serde(default, deserialize_with = "duration_key::write_deadline")]
    write_deadline: Option<String>,
    routed_per_sec: Option<u32>,
    deliveries_per_sec: Option<u32>,
    who_per_sec: Option<u32>,
    udp_queue: Option<usize>,
    udp_queue_per_dest: Option<usize>,
    udp_quit_per_sec: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    connect_rate_per_source: Option<u32>,
    allow_networks: Option<Vec<String>>,
    secret_file: Option<PathBuf>,
    duplicate_identity: Option<DuplicateIdentity>,
    answer_window: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    tls_optional: Option<bool>,
    #[serde(default, deserialize_with = "duration_key::tls_handshake_timeout")]
    tls_handshake_timeout: Option<String>,
    udp_plain: Option<bool>,
    admin_token_file: Option<PathBuf>,
    admin_connections: Option<usize>,
    state_value_bytes: Option<usize>,
    state_keys: Option<usize>,
    state_bytes: Option<usize>,
    state_sets_per_sec: Option<u32>,
    state_subscriptions: Option<usize>,
    state_index: Option<Vec<String>>,
    cluster_url: Option<String>,
    cluster_name: Option<String>,
    node_name: Option<String>,
    cluster_user: Option<String>,
    cluster_password: Option<String>,
    cluster_password_file: Option<PathBuf>,
    cluster_token: Option<String>,
    cluster_token_file: Option<PathBuf>,
    cluster_nkey_file: Option<PathBuf>,
    #[serde(default)]
    user: Vec<FileUser>,
    /// No longer accepted: it keyed permissions on a name the client chooses.
    command_rule: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUser {
    name: String,
    secret_file: PathBuf,
    identities: Vec<String>,
    #[serde(default)]
    commands: Vec<String>,
    echoes: Option<Vec<String>>,
    who: Option<Vec<String>>,
    state: Option<Vec<String>>,
}

/// Reads the value of the duration setting `key`: a string, such as `"5s"` (parsed with
/// the flags, by [`parse_duration`]). A number is refused with what to write instead: the
/// file has one way to write a duration, and a bare `5` could as well mean milliseconds.
fn duration_value<'de, D: serde::Deserializer<'de>>(
    key: &'static str,
    d: D,
) -> Result<Option<String>, D::Error> {
    use serde::de::{Error, Visitor};
    struct Text(&'static str);
    impl Visitor<'_> for Text {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration string with a unit, such as \"5s\" or \"500ms\"")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(E::custom(number_hint(self.0, &v.to_string(), v as f64)))
        }
        fn visit_u64<E: Error>(self, v: u64) -> Result<Self::Value, E> {
            Err(E::custom(number_hint(self.0, &v.to_string(), v as f64)))
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(number_hint(self.0, &format!("{v:?}"), v)))
        }
    }
    d.deserialize_any(Text(key))
}

/// What to write instead of the number `given` (`v`) for the duration setting `key`:
/// `idle_timeout = 5: a duration is a string with a unit, such as "5s" or "500ms"`.
fn number_hint(key: &str, given: &str, v: f64) -> String {
    // The same time with a unit: whole seconds as "Ns", else whole milliseconds as "Nms"
    // (0.1 is 100 ms, whatever its last binary digits say).
    let ms = v * 1000.0;
    let like = if !(v.is_finite() && (0.0..1e12).contains(&v)) {
        None
    } else if v.fract() == 0.0 {
        Some(format!("{}s", v as u64))
    } else if (ms - ms.round()).abs() < 1e-6 {
        Some(format!("{}ms", ms.round() as u64))
    } else {
        None
    };
    let (a, b) = match like {
        Some(s) if s == "500ms" => (s, "5s".to_string()),
        Some(s) => (s, "500ms".to_string()),
        None => ("5s".to_string(), "500ms".to_string()),
    };
    format!("{key} = {given}: a duration is a string with a unit, such as \"{a}\" or \"{b}\"")
}

/// One deserializer per duration setting of [`FileConfig`], each naming its key.
mod duration_key {
    macro_rules! keys {
        ($($key:ident),* $(,)?) => {$(
            pub(super) fn $key<'de, D: serde::Deserializer<'de>>(
                d: D,
            ) -> Result<Option<String>, D::Error> {
                super::duration_value(stringify!($key), d)
            }
        )*};
    }
    keys!(
        shutdown_timeout,
        identify_timeout,
        idle_timeout,
        write_deadline,
        tls_handshake_timeout,
    );
}

/// The state keys indexed when `state_index` is not set: those docs/protocol.md suggests
/// for targets.
pub const DEFAULT_STATE_INDEX: [&str; 6] = ["group", "raid", "class", "level", "zone", "channels"];
/// The most keys `state_index` may list.
pub const MAX_STATE_INDEX: usize = 16;

/// Checks `state_index`: keys of the key grammar, at most [`MAX_STATE_INDEX`], each once.
fn parse_state_index(keys: &[String]) -> Result<Vec<Box<str>>, ConfigError> {
    if keys.len() > MAX_STATE_INDEX {
        return Err(ConfigError::Invalid(format!(
            "state_index lists {} keys; at most {MAX_STATE_INDEX}",
            keys.len()
        )));
    }
    let mut out: Vec<Box<str>> = Vec::with_capacity(keys.len());
    for k in keys {
        crate::proto::state::check_key(k.as_bytes())
            .map_err(|e| ConfigError::Invalid(format!("bad state_index key {k:?}: {e}")))?;
        let k = k.to_ascii_lowercase();
        if out.iter().any(|o| **o == *k) {
            return Err(ConfigError::Invalid(format!(
                "state_index lists {k:?} twice"
            )));
        }
        out.push(k.into_boxed_str());
    }
    Ok(out)
}

impl Config {
    /// Builds the settings: defaults, then the file named by `--config` (or
    /// `--check-config`), then the flags.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let (file, cluster) = Config::read_file(args)?;
        let mut c = Config::from_file(args, file)?;
        c.cluster = cluster.map(Arc::new);
        Ok(c)
    }

    fn read_file(args: &Args) -> Result<(FileConfig, Option<ClusterSettings>), ConfigError> {
        let file = match args.config.as_ref().or(args.check_config.as_ref()) {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::parse(path, &text, &e))?
            }
            None => FileConfig::default(),
        };
        let cluster = load_cluster(args, &file)?;
        Ok((file, cluster))
    }

    fn from_file(args: &Args, file: FileConfig) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(v) = args.listen.as_ref().or(file.listen.as_ref()) {
            c.listen = parse_addr("listen", v)?;
        }
        if let Some(v) = args.cores.or(file.cores) {
            let max = usable_cores();
            if v == 0 || v > max {
                return Err(ConfigError::Invalid(format!(
                    "cores must be between 1 and {max} (the usable cores), got {v}"
                )));
            }
            c.cores = v;
        }
        if let Some(v) = args.io.or(file.io) {
            c.io = v;
        }
        if let Some(v) = args.log_level.as_ref().or(file.log_level.as_ref()) {
            tracing_subscriber::EnvFilter::try_new(v)
                .map_err(|e| ConfigError::Invalid(format!("bad log_level {v:?}: {e}")))?;
            c.log_level = v.clone();
        }
        if let Some(v) = args.log_format.or(file.log_format) {
            c.log_format = v;
        }
        if let Some(v) = args.admin.as_ref().or(file.admin.as_ref()) {
            c.admin = Some(parse_addr("admin", v)?);
        }
        if let Some(v) = args
            .shutdown_timeout
            .as_ref()
            .or(file.shutdown_timeout.as_ref())
        {
            c.shutdown_timeout = parse_duration("shutdown_timeout", v)?;
        }
        if let Some(v) = args.max_frame.or(file.max_frame) {
            if !(20..=16 * 1024 * 1024).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "max_frame must be between 20 and 16777216 bytes, got {v}"
                )));
            }
            c.max_frame = v;
        }
        if let Some(v) = args
            .identify_timeout
            .as_ref()
            .or(file.identify_timeout.as_ref())
        {
            c.identify_timeout = parse_duration("identify_timeout", v)?;
        }
        if let Some(v) = args.idle_timeout.as_ref().or(file.idle_timeout.as_ref()) {
            c.idle_timeout = parse_duration("idle_timeout", v)?;
        }
        if let Some(v) = args.outbound_limit.or(file.outbound_limit) {
            if v < 1024 {
                return Err(ConfigError::Invalid(format!(
                    "outbound_limit must be at least 1024 bytes, got {v}"
                )));
            }
            c.outbound_limit = v;
        }
        if let Some(v) = args
            .write_deadline
            .as_ref()
            .or(file.write_deadline.as_ref())
        {
            c.write_deadline = parse_duration("write_deadline", v)?;
        }
        if let Some(v) = args.routed_per_sec.or(file.routed_per_sec) {
            c.routed_per_sec = v;
        }
        if let Some(v) = args.deliveries_per_sec.or(file.deliveries_per_sec) {
            c.deliveries_per_sec = v;
        }
        if let Some(v) = args.who_per_sec.or(file.who_per_sec) {
            c.who_per_sec = v;
        }
        if let Some(v) = args.state_sets_per_sec.or(file.state_sets_per_sec) {
            c.state_sets_per_sec = v;
        }
        for (key, v, dst, max) in [
            (
                "state_value_bytes",
                args.state_value_bytes.or(file.state_value_bytes),
                &mut c.state_value_bytes,
                1 << 20,
            ),
            (
                "state_keys",
                args.state_keys.or(file.state_keys),
                &mut c.state_keys,
                4096,
            ),
            (
                "state_bytes",
                args.state_bytes.or(file.state_bytes),
                &mut c.state_bytes,
                16 << 20,
            ),
            (
                "state_subscriptions",
                args.state_subscriptions.or(file.state_subscriptions),
                &mut c.state_subscriptions,
                4096,
            ),
        ] {
            if let Some(v) = v {
                if v == 0 || v > max {
                    return Err(ConfigError::Invalid(format!(
                        "{key} must be between 1 and {max}, got {v}"
                    )));
                }
                *dst = v;
            }
        }
        for (key, v, dst) in [
            (
                "udp_queue",
                args.udp_queue.or(file.udp_queue),
                &mut c.udp_queue,
            ),
            (
                "udp_queue_per_dest",
                args.udp_queue_per_dest.or(file.udp_queue_per_dest),
                &mut c.udp_queue_per_dest,
            ),
        ] {
            if let Some(v) = v {
                if v == 0 {
                    return Err(ConfigError::Invalid(format!("{key} must be at least 1")));
                }
                *dst = v;
            }
        }
        if let Some(v) = args.udp_quit_per_sec.or(file.udp_quit_per_sec) {
            c.udp_quit_per_sec = v;
        }
        if let Some(v) = args.max_connections.or(file.max_connections) {
            c.max_connections = v;
        }
        if let Some(v) = args
            .max_connections_per_source
            .or(file.max_connections_per_source)
        {
            c.max_connections_per_source = v;
        }
        if let Some(v) = args
            .connect_rate_per_source
            .or(file.connect_rate_per_source)
        {
            c.connect_rate_per_source = v;
        }
        let index = match (&args.state_index, file.state_index) {
            (Some(v), _) if v == "none" => Some(Vec::new()),
            (Some(v), _) => Some(v.split(',').map(|k| k.trim().to_string()).collect()),
            (None, v) => v,
        };
        if let Some(keys) = index {
            c.state_index = parse_state_index(&keys)?;
        }
        let nets = if args.allow_network.is_empty() {
            file.allow_networks.unwrap_or_default()
        } else {
            args.allow_network.clone()
        };
        c.allow_networks = nets
            .iter()
            .map(|n| parse_net(n))
            .collect::<Result<_, _>>()?;
        if let Some(path) = args.secret_file.as_ref().or(file.secret_file.as_ref()) {
            let text = std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            c.secret = Some(secret_from(
                &text,
                &format!("secret file {}", path.display()),
            )?);
        } else if let Some(v) = std::env::var_os("VELIUM_SECRET") {
            c.secret = Some(secret_from(v.as_encoded_bytes(), "VELIUM_SECRET")?);
        }
        if file.command_rule.is_some() {
            return Err(ConfigError::Invalid(
                "[[command_rule]] is no longer supported (it trusted the name a client picks): \
                 give each client a [[user]] with a secret_file, the identities it may take and \
                 the commands it may send (the old `to` patterns), and set the client's secret \
                 to \"NAME SECRET\"; see deploy/velium-server.toml"
                    .into(),
            ));
        }
        if let Some(v) = args.duplicate_identity.or(file.duplicate_identity) {
            c.duplicate_identity = v;
        }
        if let Some(v) = args.answer_window.or(file.answer_window) {
            if !(1..=4096).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "answer_window must be between 1 and 4096, got {v}"
                )));
            }
            c.answer_window = v;
        }
        let cert = args.tls_cert.as_ref().or(file.tls_cert.as_ref());
        let key = args.tls_key.as_ref().or(file.tls_key.as_ref());
        let ca = args.tls_client_ca.as_ref().or(file.tls_client_ca.as_ref());
        let optional = args.tls_optional.or(file.tls_optional);
        match (cert, key) {
            (Some(cert), Some(key)) => {
                let t =
                    TlsSettings::load(cert, key, ca.map(|p| p.as_path()), optional == Some(true))
                        .map_err(ConfigError::Invalid)?;
                c.tls = Some(Arc::new(t));
            }
            (None, None) => {
                if ca.is_some() || optional.is_some() {
                    return Err(ConfigError::Invalid(
                        "tls_client_ca and tls_optional need tls_cert and tls_key".into(),
                    ));
                }
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "tls_cert and tls_key go together: set both, or neither".into(),
                ));
            }
        }
        if let Some(v) = args
            .tls_handshake_timeout
            .as_ref()
            .or(file.tls_handshake_timeout.as_ref())
        {
            c.tls_handshake_timeout = parse_duration("tls_handshake_timeout", v)?;
        }
        if let Some(v) = args.udp_plain.or(file.udp_plain) {
            c.udp_plain = v;
        }
        if let Some(path) = args
            .admin_token_file
            .as_ref()
            .or(file.admin_token_file.as_ref())
        {
            let text = std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            // HTTP trims the white space around a header value: so does the token file.
            c.admin_token = Some(secret_from(
                text.trim_ascii(),
                &format!("admin token file {}", path.display()),
            )?);
        }
        if let Some(v) = args.admin_connections.or(file.admin_connections) {
            if !(1..=1024).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "admin_connections must be between 1 and 1024, got {v}"
                )));
            }
            c.admin_connections = v;
        }
        for u in &file.user {
            let user = load_user(u)?;
            if c.users.insert(user.name.clone(), Arc::new(user)).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "two [[user]] entries are named {:?}",
                    u.name
                )));
            }
        }
        if let Some(t) = &c.tls
            && t.optional
            && t.client_ca
            && !c.requires_auth()
        {
            return Err(ConfigError::Invalid(
                "tls_client_ca with tls_optional would let plaintext clients in with no \
                 credential while TLS clients need a certificate: give the hub a secret_file \
                 or [[user]]s, or turn tls_optional off"
                    .into(),
            ));
        }
        if !c.users.is_empty() && c.secret.is_some() {
            return Err(ConfigError::Invalid(
                "a shared secret (secret_file or VELIUM_SECRET) cannot be combined with [[user]]: \
                 give the clients that use it a [[user]] of their own and set their secret to \
                 \"NAME SECRET\""
                    .into(),
            ));
        }
        Ok(c)
    }
}

/// One `[[user]]` entry, checked, with its secret read.
fn load_user(u: &FileUser) -> Result<User, ConfigError> {
    let what = format!("[[user]] {:?}", u.name);
    crate::proto::identity::check_identity(u.name.as_bytes())
        .map_err(|e| ConfigError::Invalid(format!("bad {what} name: {e}")))?;
    let text = std::fs::read(&u.secret_file).map_err(|source| ConfigError::Read {
        path: u.secret_file.clone(),
        source,
    })?;
    let secret = secret_from(
        &text,
        &format!("{what} secret file {}", u.secret_file.display()),
    )?;
    let patterns = |key: &str, list: &[String]| -> Result<Vec<Pattern>, ConfigError> {
        list.iter()
            .map(|v| {
                let p = parse_pattern(&format!("{what} {key}"), v)?;
                if p.include_self {
                    return Err(ConfigError::Invalid(format!(
                        "bad {what} {key} pattern {v:?}: a leading '+' means nothing here"
                    )));
                }
                Ok(p)
            })
            .collect()
    };
    let identities = patterns("identities", &u.identities)?;
    if identities.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{what} has no identities: it could never identify"
        )));
    }
    let commands = patterns("commands", &u.commands)?;
    let echoes = match &u.echoes {
        Some(list) => patterns("echoes", list)?,
        None => commands.clone(),
    };
    let who = match &u.who {
        Some(list) => patterns("who", list)?,
        None => commands.iter().chain(&identities).cloned().collect(),
    };
    let state = match &u.state {
        Some(list) => patterns("state", list)?,
        None => who.clone(),
    };
    Ok(User {
        name: Arc::from(u.name.as_str()),
        secret,
        identities,
        commands,
        echoes,
        who,
        state,
    })
}

/// The secret in `raw` (a file or variable), without its trailing line break.
/// The cluster settings, when `cluster_url` is given.
fn load_cluster(args: &Args, file: &FileConfig) -> Result<Option<ClusterSettings>, ConfigError> {
    let Some(url) = args.cluster_url.as_ref().or(file.cluster_url.as_ref()) else {
        return Ok(None);
    };
    for u in url.split(',') {
        let rest = u.trim().strip_prefix("nats://").unwrap_or(u.trim());
        if rest.is_empty() || rest.contains('/') {
            return Err(ConfigError::Invalid(format!(
                "bad cluster_url {url:?}: expected nats://HOST:PORT"
            )));
        }
    }
    let name = args
        .cluster_name
        .clone()
        .or(file.cluster_name.clone())
        .unwrap_or_else(|| "velium".into());
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        return Err(ConfigError::Invalid(format!(
            "cluster_name {name:?}: use 1 to 64 letters, digits, '_' and '-'"
        )));
    }
    let node = args.node_name.clone().or(file.node_name.clone());
    if let Some(n) = &node {
        check_node_name(n).map_err(ConfigError::Invalid)?;
    }
    let read = |path: &PathBuf, what: &str| -> Result<String, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let t = text.trim().to_string();
        if t.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{what} {} is empty",
                path.display()
            )));
        }
        Ok(t)
    };
    // A secret given inline or in a file (not both).
    let either = |inline: &Option<String>, path: &Option<PathBuf>, key: &str| match (inline, path) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "give {key} or {key}_file, not both"
        ))),
        (Some(v), None) => Ok(Some(v.clone())),
        (None, Some(f)) => read(f, &format!("{key}_file")).map(Some),
        (None, None) => Ok(None),
    };
    let password = either(
        &file.cluster_password,
        &file.cluster_password_file,
        "cluster_password",
    )?;
    let token = either(
        &file.cluster_token,
        &file.cluster_token_file,
        "cluster_token",
    )?;
    let nkey = match &file.cluster_nkey_file {
        Some(f) => Some(read(f, "cluster_nkey_file")?),
        None => None,
    };
    let auth = match (file.cluster_user.clone(), password, token, nkey) {
        (None, None, None, None) => ClusterAuth::None,
        (Some(u), Some(p), None, None) => ClusterAuth::UserPassword(u, p),
        (None, None, Some(t), None) => ClusterAuth::Token(t),
        (None, None, None, Some(k)) => ClusterAuth::Nkey(k),
        (Some(_), None, None, None) | (None, Some(_), None, None) => {
            return Err(ConfigError::Invalid(
                "cluster_user and cluster_password go together".into(),
            ));
        }
        _ => {
            return Err(ConfigError::Invalid(
                "give one kind of NATS credential: cluster_user and cluster_password, \
                 cluster_token, or cluster_nkey_file"
                    .into(),
            ));
        }
    };
    Ok(Some(ClusterSettings {
        url: url.clone(),
        name,
        node,
        auth,
    }))
}

fn secret_from(raw: &[u8], what: &str) -> Result<Secret, ConfigError> {
    let s = raw.strip_suffix(b"\n").unwrap_or(raw);
    let s = s.strip_suffix(b"\r").unwrap_or(s);
    if s.is_empty() {
        return Err(ConfigError::Invalid(format!("{what} is empty")));
    }
    if s.contains(&b'\n') {
        return Err(ConfigError::Invalid(format!(
            "{what} holds a line break (0x0A cannot travel in a frame)"
        )));
    }
    Ok(Secret::new(s))
}

fn parse_net(v: &str) -> Result<IpNet, ConfigError> {
    v.parse::<IpNet>()
        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            ConfigError::Invalid(format!(
                "bad allow_networks entry {v:?}: expected CIDR like 10.0.0.0/8 or an IP"
            ))
        })
}

fn parse_pattern(key: &str, v: &str) -> Result<Pattern, ConfigError> {
    Pattern::parse(v.as_bytes())
        .map_err(|e| ConfigError::Invalid(format!("bad {key} pattern {v:?}: {e}")))
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| ConfigError::Invalid(format!("bad {key} address {v:?}: expected IP:PORT")))
}

fn parse_duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v)
        .map_err(|e| ConfigError::Invalid(format!("bad {key} {v:?}: {e} (e.g. 5s, 500ms)")))?;
    if d < Duration::from_millis(10) {
        return Err(ConfigError::Invalid(format!(
            "{key} must be at least 10ms, got {v}"
        )));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(toml: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("velium-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.toml"));
        std::fs::write(&path, toml).unwrap();
        Config::load(&Args {
            config: Some(path),
            ..Args::default()
        })
    }

    #[test]
    fn state_index_is_checked_and_lowercased() {
        let c = Config::load(&Args::default()).unwrap();
        assert_eq!(c.state_index.len(), DEFAULT_STATE_INDEX.len());
        let c = with_file("state_index = [\"Role\", \"class\"]\n").unwrap();
        assert_eq!(c.state_index, vec![Box::from("role"), Box::from("class")]);
        assert!(
            with_file("state_index = []\n")
                .unwrap()
                .state_index
                .is_empty()
        );
        let e = with_file("state_index = [\"a.b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad state_index key \"a.b\""), "{e}");
        let e = with_file("state_index = [\"x\", \"X\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let args = Args {
            state_index: Some("none".into()),
            ..Args::default()
        };
        assert!(Config::load(&args).unwrap().state_index.is_empty());
        let args = Args {
            state_index: Some("zone, level".into()),
            ..Args::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.state_index, vec![Box::from("zone"), Box::from("level")]);
    }

    #[test]
    fn defaults_match_the_seed() {
        let c = Config::load(&Args::default()).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:12345");
        assert_eq!(c.max_frame, 16384);
        assert_eq!(c.identify_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
    }

    #[test]
    fn file_is_read_and_flags_win() {
        let c = with_file("listen = \"127.0.0.1:9\"\nidle_timeout = \"2s\"\n").unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9");
        assert_eq!(c.idle_timeout, Duration::from_secs(2));
        let c = Config::load(&Args {
            listen: Some("127.0.0.1:7".into()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.listen.port(), 7);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let e = with_file("listn = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        assert!(
            e.one_line()
                .contains("line 1, column 1: unknown field `listn`")
        );
        assert!(!e.one_line().contains('\n'), "{}", e.one_line());
        assert!(with_file("listen = \"nowhere\"\n").is_err());
        assert!(with_file("cores = 0\n").is_err());
        assert!(with_file("identify_timeout = \"soon\"\n").is_err());
        let e = with_file("allow_networks = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/33"), "{e}");
    }

    /// The path a test file of [`with_file`] was given, from its error's first line.
    fn first_line(e: &ConfigError) -> String {
        e.to_string().lines().next().unwrap_or("").to_string()
    }

    #[test]
    fn toml_errors_keep_the_parsers_lines() {
        // A syntax error: the file on a line of its own, then the parser's lines as it
        // writes them (place, the line with a caret under the spot, what is wrong).
        let e = with_file("listen = \"127.0.0.1:1\"\nmax_frame = [1,\n").unwrap_err();
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("config file ") && lines[0].ends_with(".toml:"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("TOML parse error at line 2, column "),
            "{text}"
        );
        assert!(lines.contains(&"2 | max_frame = [1,"), "{text}");
        assert!(lines.iter().any(|l| l.trim_end().ends_with('^')), "{text}");
        assert!(!text.ends_with('\n'), "{text:?}");
        let brief = e.one_line();
        assert!(
            brief.starts_with(&lines[0][..lines[0].len() - 1]),
            "{brief}"
        );
        assert!(brief.contains(": line 2, column "), "{brief}");
        assert!(!brief.contains('\n'), "{brief}");
        // A value of the wrong type: its line and column, the caret under the value.
        let e = with_file("cores = \"two\"\n").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("TOML parse error at line 1, column 9\n"),
            "{text}"
        );
        assert!(text.contains("\n1 | cores = \"two\"\n"), "{text}");
        assert!(text.contains("|         ^^^^^\n"), "{text}");
        assert!(first_line(&e).ends_with(':'), "{text}");
        assert!(e.one_line().contains("line 1, column 9: invalid type"));
        // Errors of a value in range stay one line.
        let e = with_file("max_frame = 5\n").unwrap_err();
        assert_eq!(e.to_string(), e.one_line());
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn a_number_for_a_duration_says_what_to_write() {
        for key in [
            "shutdown_timeout",
            "identify_timeout",
            "idle_timeout",
            "write_deadline",
            "tls_handshake_timeout",
        ] {
            let e = with_file(&format!("{key} = 5\n")).unwrap_err();
            let want = format!(
                "{key} = 5: a duration is a string with a unit, such as \"5s\" or \"500ms\""
            );
            assert!(e.to_string().ends_with(&format!("\n{want}")), "{e}");
            assert!(
                e.one_line()
                    .ends_with(&format!("column {}: {want}", key.len() + 4))
            );
        }
        for (given, like) in [
            ("30", "\"30s\" or \"500ms\""),
            ("0.5", "\"500ms\" or \"5s\""),
            ("2.5", "\"2500ms\" or \"500ms\""),
            ("0.1", "\"100ms\" or \"500ms\""),
            ("5.0", "\"5s\" or \"500ms\""),
            ("-3", "\"5s\" or \"500ms\""),
            ("0.0001", "\"5s\" or \"500ms\""),
        ] {
            let e = with_file(&format!("idle_timeout = {given}\n")).unwrap_err();
            let want = format!(
                "idle_timeout = {given}: a duration is a string with a unit, such as {like}"
            );
            assert!(e.to_string().ends_with(&want), "{given}: {e}");
        }
        // Another type is refused with the same words; the string form is unchanged.
        let e = with_file("idle_timeout = true\n").unwrap_err().to_string();
        assert!(e.contains("expected a duration string with a unit"), "{e}");
        let c = with_file("idle_timeout = \"12s\"\nwrite_deadline = \"1m\"\n").unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(12));
        assert_eq!(c.write_deadline, Duration::from_secs(60));
        let e = with_file("idle_timeout = \"5\"\n").unwrap_err().to_string();
        assert!(e.contains("bad idle_timeout \"5\""), "{e}");
    }

    #[test]
    fn access_rules() {
        let dir = std::env::temp_dir().join(format!("velium-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("ops.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let c = with_file(&format!(
            "allow_networks = [\"10.0.0.0/8\", \"127.0.0.1\"]\n\
             [[user]]\nname = \"ops\"\nsecret_file = {secret:?}\n\
             identities = [\"ops.>\"]\ncommands = [\"peq.>\"]\n",
        ))
        .unwrap();
        assert!(c.allows("10.1.2.3".parse().unwrap()));
        assert!(c.allows("127.0.0.1".parse().unwrap()));
        assert!(c.allows("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!c.allows("127.0.0.2".parse().unwrap()));
        assert!(c.requires_auth());
        let p = |s: &str| Pattern::parse(s.as_bytes()).unwrap();
        let ops = &c.users["ops"];
        assert!(ops.secret.verify(b"s3cret"));
        assert!(ops.may_be("ops.alice") && ops.may_be("OPS.x.y") && !ops.may_be("peq.z.bob"));
        assert!(ops.may_command(&p("peq.*.bob")) && ops.may_command(&p("+peq.>")));
        assert!(!ops.may_command(&p(">")));
        assert!(ops.may_echo(&p("peq.z.*")), "echoes default to commands");
        assert!(ops.sees("ops.alice") && ops.sees("peq.z.bob") && !ops.sees("live.z.bob"));
        // The shared secret cannot be combined with users; command rules say how to move.
        let both = format!(
            "secret_file = {secret:?}\n[[user]]\nname = \"ops\"\nsecret_file = {secret:?}\nidentities = [\">\"]\n"
        );
        assert!(
            with_file(&both)
                .unwrap_err()
                .to_string()
                .contains("[[user]]")
        );
        let e = with_file("[[command_rule]]\nfrom = \"ops.>\"\nto = [\">\"]\n").unwrap_err();
        let e = e.to_string();
        assert!(e.contains("[[user]]") && !e.contains('\n'), "{e}");
        let bad = |extra: &str| {
            with_file(&format!(
                "[[user]]\nname = \"ops\"\nsecret_file = {secret:?}\n{extra}"
            ))
        };
        assert!(bad("identities = []\n").is_err());
        assert!(bad("identities = [\"+a\"]\n").is_err());
        assert!(bad("identities = [\"a.>.b\"]\n").is_err());
        assert!(bad("identities = [\">\"]\nsecret = \"inline\"\n").is_err());
        assert!(with_file("answer_window = 0\n").is_err());
        assert_eq!(
            with_file("duplicate_identity = \"refuse\"\n")
                .unwrap()
                .duplicate_identity,
            DuplicateIdentity::Refuse
        );
    }

    #[test]
    fn secret_is_compared_by_digest() {
        let s = secret_from(b"hunter2\n", "test").unwrap();
        assert!(s.verify(b"hunter2"));
        assert!(!s.verify(b"hunter2\n"));
        assert!(!s.verify(b""));
        assert!(secret_from(b"\n", "test").is_err());
    }

    #[test]
    fn reload_keeps_restart_settings() {
        let old = Config::default();
        let new = Config {
            cores: old.cores + 1,
            idle_timeout: Duration::from_secs(9),
            ..Config::default()
        };
        let (live, restart) = old.diff(&new);
        assert_eq!((live, restart), (vec!["idle_timeout"], vec!["cores"]));
        let applied = old.reloaded(new);
        assert_eq!(applied.cores, old.cores);
        assert_eq!(applied.idle_timeout, Duration::from_secs(9));
    }

    #[test]
    fn a_reload_rereads_the_file_or_the_files_flags_name() {
        assert!(!Args::default().reload_rereads());
        let flags = Args {
            listen: Some("127.0.0.1:0".into()),
            idle_timeout: Some("5s".into()),
            ..Args::default()
        };
        assert!(!flags.reload_rereads(), "flags alone cannot change");
        let file = |f: fn(&mut Args)| {
            let mut a = Args::default();
            f(&mut a);
            a.reload_rereads()
        };
        assert!(file(
            |a| a.config = Some("/etc/velium/velium-server.toml".into())
        ));
        assert!(file(|a| a.secret_file = Some("/s".into())));
        assert!(file(|a| a.admin_token_file = Some("/t".into())));
        assert!(file(|a| a.tls_cert = Some("/c".into())));
        assert!(file(|a| a.tls_key = Some("/k".into())));
        assert!(file(|a| a.tls_client_ca = Some("/ca".into())));
    }

    #[test]
    fn cluster_settings() {
        assert!(with_file("").unwrap().cluster.is_none());
        let c = with_file(
            "cluster_url = \"nats://127.0.0.1:4222\"\nnode_name = \"eu-1\"\n\
             cluster_user = \"v\"\ncluster_password = \"s3cr3t\"\n",
        )
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(
            (cl.url.as_str(), cl.name.as_str()),
            ("nats://127.0.0.1:4222", "velium")
        );
        assert_eq!(cl.node.as_deref(), Some("eu-1"));
        assert!(cl.auth == ClusterAuth::UserPassword("v".into(), "s3cr3t".into()));
        assert!(
            !format!("{cl:?}").contains("s3cr3t"),
            "the debug form hides credentials"
        );
        for (toml, needle) in [
            (
                "cluster_url = \"nats://h:1\"\nnode_name = \"a.b\"\n",
                "node_name",
            ),
            (
                "cluster_url = \"nats://h:1\"\ncluster_name = \"a b\"\n",
                "cluster_name",
            ),
            ("cluster_url = \"nats://h:1/x\"\n", "cluster_url"),
            (
                "cluster_url = \"nats://h:1\"\ncluster_user = \"v\"\n",
                "go together",
            ),
            (
                "cluster_url = \"nats://h:1\"\ncluster_token = \"t\"\ncluster_token_file = \"/x\"\n",
                "cluster_token or cluster_token_file, not both",
            ),
            (
                "cluster_url = \"nats://h:1\"\ncluster_token = \"t\"\ncluster_user = \"v\"\n\
                 cluster_password = \"p\"\n",
                "one kind",
            ),
        ] {
            let e = with_file(toml).unwrap_err().to_string();
            assert!(e.contains(needle), "{toml}: {e}");
        }
        // A restart setting: a reload keeps the running one.
        let old = Config::default();
        let new = with_file("cluster_url = \"nats://h:1\"\n").unwrap();
        assert_eq!(old.diff(&new).1, vec!["cluster"]);
        assert!(old.reloaded(new).cluster.is_none());
    }
}
