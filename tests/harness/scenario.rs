//! What a scenario is: the settings a hub starts with and the steps that happen to it.
//!
//! Kept apart from the model and the checks because it is the one part the generators
//! see: `tests/state_machine.rs` builds these types with proptest strategies and
//! `fuzz/fuzz_targets/connection.rs` decodes them from raw bytes, and neither needs to know
//! how a scenario is run. [`config`] turns [`Settings`] into the hub's [`Config`].

use super::pattern::MPat;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use velium_server::config::{CommandRule, Config, Secret};
use velium_server::proto::pattern::Pattern;

/// Segments identities, targets and permission patterns are built from: few, so that
/// targets often match, with mixed case, the wildcards and an empty segment.
pub const SEGMENTS: [&str; 8] = ["a", "b", "B", "peq", "*", ">", "", "\u{FFFD}"];

/// Joins `SEGMENTS[i % len]` for each index with dots; a leading `+` when `plus`.
pub fn name(parts: &[u8], plus: bool) -> Vec<u8> {
    let mut v = Vec::new();
    if plus {
        v.push(b'+');
    }
    for (k, i) in parts.iter().enumerate() {
        if k > 0 {
            v.push(b'.');
        }
        v.extend_from_slice(SEGMENTS[*i as usize % SEGMENTS.len()].as_bytes());
    }
    v
}

/// The secret a scenario's server uses when it has one.
pub const SECRET: &[u8] = b"s3cret";

/// The settings a hub starts with, or is reloaded with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `max_frame`, at least 20 as the configuration demands.
    pub max_frame: usize,
    /// `identify_timeout`, ms.
    pub identify_ms: u64,
    /// `idle_timeout`, ms.
    pub idle_ms: u64,
    /// `outbound_limit`, at least 1024.
    pub outbound_limit: usize,
    /// `write_deadline`, ms: queued output that makes no progress this long is cut off.
    pub write_deadline_ms: u64,
    /// `udp_quit_per_sec` (kept as first set across reloads).
    pub udp_quit_per_sec: u32,
    /// `max_connections` (0: no limit).
    pub max_connections: usize,
    /// `max_connections_per_source` (0: no limit).
    pub per_source: usize,
    /// `connect_rate_per_source` (0: no limit; kept as first set across reloads).
    pub connect_rate: u32,
    /// `routed_per_sec`: Command, Echo and Who frames per shim and second (0: no limit;
    /// kept as first set across reloads, as are the two below).
    pub routed_per_sec: u32,
    /// `deliveries_per_sec`: shims reached, Who entries listed and responses forwarded
    /// per shim and second (0: no limit).
    pub deliveries_per_sec: u32,
    /// `who_per_sec`: Who requests per shim and second (0: no limit).
    pub who_per_sec: u32,
    /// Whether [`SECRET`] is required.
    pub secret: bool,
    /// Command rules as (from, [to]) pattern bytes; rules that do not parse are left out.
    pub rules: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
}

/// What a frame's data holds.
#[derive(Clone, Debug)]
pub enum Body {
    /// Any bytes (0x0A left out).
    Bytes(Vec<u8>),
    /// A name from [`SEGMENTS`].
    Name(Vec<u8>),
    /// `target SP text`.
    Routed {
        /// Target, from [`SEGMENTS`].
        target: Vec<u8>,
        /// Text (0x0A left out).
        text: Vec<u8>,
    },
    /// `id SP text` with the id of a Command sent earlier (the `pick`-th), if any.
    Response {
        /// Which id.
        pick: u8,
        /// Text (0x0A left out).
        text: Vec<u8>,
    },
    /// The 16 raw token bytes of registered connection `n % registered` (of connection
    /// `n % count` when none is registered), so that most binds name a live session.
    Token(u8),
    /// The secret (true) or a wrong one.
    Secret(bool),
}

/// Bytes sent on a TCP connection or in a datagram.
#[derive(Clone, Debug)]
pub enum Piece {
    /// One whole frame.
    Frame {
        /// Opcode byte (any).
        op: u8,
        /// Data.
        body: Body,
        /// Ended by `0D 0A` (a CRLF line end) instead of `0A`.
        crlf: bool,
    },
    /// Raw bytes: parts of frames, several frames, stray 0x0A and 0x0D.
    Raw(Vec<u8>),
}

/// One step of a scenario.
#[derive(Clone, Debug)]
pub enum Step {
    /// A client connects from source IP `source % 3`; `reads` when it reads everything
    /// the server sends at once (otherwise only at [`Step::Read`]).
    Connect {
        /// Source IP index.
        source: u8,
        /// Reads at once.
        reads: bool,
    },
    /// A read on connection `conn % open`: the pieces concatenated, delivered in two reads
    /// cut at `split`.
    Tcp {
        /// Which open connection.
        conn: u8,
        /// What arrives.
        pieces: Vec<Piece>,
        /// Where the read is cut.
        split: u16,
    },
    /// A datagram from UDP source `source % 3`.
    Udp {
        /// Source address index.
        source: u8,
        /// The datagram (the pieces concatenated).
        pieces: Vec<Piece>,
        /// Whether a final 0x0A is kept; without it the datagram ends bare (a datagram is
        /// its own frame, so the 0x0A is optional).
        newline: bool,
    },
    /// Client `conn % all` reads what is queued for it.
    Read {
        /// Which connection (open or ended).
        conn: u8,
    },
    /// The reader of connection `conn % open` sees end of stream.
    Eof {
        /// Which open connection.
        conn: u8,
    },
    /// The clock moves on by `ms`; then the sweeper runs `sweeps` times (a timer fires
    /// when two sweeps in a row find it run out).
    Advance {
        /// Milliseconds.
        ms: u16,
        /// Sweeps of every connection at the new time, 0 to 2.
        sweeps: u8,
    },
    /// The settings are reloaded.
    Reload(Settings),
    /// A graceful shutdown begins: no more connections; every open one is sent Quit.
    Shutdown,
}

/// A hub's settings and what happens to it.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Initial settings.
    pub settings: Settings,
    /// Steps in order.
    pub steps: Vec<Step>,
}

/// At most this many connections are ever accepted in one scenario.
pub const MAX_CONNS: usize = 8;

pub(super) fn tcp_ip(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, 1 + i % 3])
}

pub(super) fn udp_src(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 1, 1 + i % 3], 4000))
}

/// The hub's settings for `s`; `first` holds those kept as first set across reloads (the
/// rates: a token bucket whose rate never changes refills the same whenever it is looked
/// at, so the model need not know when the hub looks).
pub(super) fn config(s: &Settings, first: &Settings) -> Config {
    Config {
        cores: 1,
        max_frame: s.max_frame,
        identify_timeout: Duration::from_millis(s.identify_ms),
        idle_timeout: Duration::from_millis(s.idle_ms),
        outbound_limit: s.outbound_limit,
        write_deadline: Duration::from_millis(s.write_deadline_ms),
        routed_per_sec: first.routed_per_sec,
        deliveries_per_sec: first.deliveries_per_sec,
        who_per_sec: first.who_per_sec,
        udp_quit_per_sec: first.udp_quit_per_sec,
        max_connections: s.max_connections,
        max_connections_per_source: s.per_source,
        connect_rate_per_source: first.connect_rate,
        secret: s.secret.then(|| Secret::new(SECRET)),
        command_rules: rules(s)
            .into_iter()
            .map(|(from, to)| CommandRule {
                from: Pattern::parse(&from).expect("rules() keeps parsable patterns"),
                to: to
                    .iter()
                    .map(|t| Pattern::parse(t).expect("parsable"))
                    .collect(),
            })
            .collect(),
        ..Config::default()
    }
}

/// The rules of `s` whose patterns all parse (and have at least one target).
pub(super) fn rules(s: &Settings) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    s.rules
        .iter()
        .filter(|(from, to)| {
            MPat::parse(from).is_ok() && !to.is_empty() && to.iter().all(|t| MPat::parse(t).is_ok())
        })
        .cloned()
        .collect()
}
