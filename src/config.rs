//! Settings: defaults, the TOML file (`--config`), and command-line flags over both.
//!
//! Every setting is documented, with its default, in `deploy/velium-server.toml`.

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

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
    /// Longest frame accepted, opcode and 0x0A included.
    pub max_frame: usize,
    /// Time from accept within which the first Identify must arrive.
    pub identify_timeout: Duration,
    /// Silence after which a shim is sent Quit and closed.
    pub idle_timeout: Duration,
    /// Pending outbound bytes past which a shim is closed as a slow consumer.
    pub outbound_limit: usize,
    /// Quit answers per second (and burst) to one unbound UDP source.
    pub udp_quit_per_sec: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:12345".parse().unwrap(),
            cores: usable_cores(),
            io: IoMode::Auto,
            log_level: "info".into(),
            max_frame: 16 * 1024,
            identify_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            outbound_limit: 1024 * 1024,
            udp_quit_per_sec: 4,
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

/// A configuration problem, worded as the one line the server prints before exiting.
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
    #[error("config file {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, folded to one line.
        msg: String,
    },
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
}

/// velium-server: a hub for fleets of game-client shims (TCP control + UDP channel).
#[derive(Parser, Debug, Default)]
#[command(
    name = "velium-server",
    version,
    about,
    after_help = "Example:\n  velium-server --listen 127.0.0.1:12345 --cores 2\n\n\
                  Flags override the config file; see deploy/velium-server.toml for every setting."
)]
pub struct Args {
    /// TCP and UDP address to serve on [default: 0.0.0.0:12345]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Runtimes, one pinned thread per core [default: all usable cores]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// TOML config file (every key is optional)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// I/O driver [default: auto]
    #[arg(long, value_enum)]
    pub io: Option<IoMode>,
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
    /// Quit answers per second to one unbound UDP source [default: 4]
    #[arg(long, value_name = "N")]
    pub udp_quit_per_sec: Option<u32>,
}

/// The config file: every key optional, unknown keys rejected.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    cores: Option<usize>,
    io: Option<IoMode>,
    log_level: Option<String>,
    max_frame: Option<usize>,
    identify_timeout: Option<String>,
    idle_timeout: Option<String>,
    outbound_limit: Option<usize>,
    udp_quit_per_sec: Option<u32>,
}

impl Config {
    /// Builds the settings: defaults, then the file named by `--config`, then the flags.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    msg: one_line(&e.to_string()),
                })?
            }
            None => FileConfig::default(),
        };
        let mut c = Config::default();
        if let Some(v) = args.listen.as_ref().or(file.listen.as_ref()) {
            c.listen = parse_addr(v)?;
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
        if let Some(v) = args.udp_quit_per_sec.or(file.udp_quit_per_sec) {
            c.udp_quit_per_sec = v;
        }
        Ok(c)
    }
}

fn parse_addr(v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| ConfigError::Invalid(format!("bad listen address {v:?}: expected IP:PORT")))
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

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(toml: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("velium-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", toml.len()));
        std::fs::write(&path, toml).unwrap();
        Config::load(&Args {
            config: Some(path),
            ..Args::default()
        })
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
        let e = with_file("listn = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("listn"), "{e}");
        assert!(!e.contains('\n'));
        assert!(with_file("listen = \"nowhere\"\n").is_err());
        assert!(with_file("cores = 0\n").is_err());
        assert!(with_file("identify_timeout = \"soon\"\n").is_err());
    }
}
