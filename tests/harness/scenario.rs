//! What a scenario is: the settings a hub starts with and the steps that happen to it.
//!
//! Kept apart from the model and the checks because it is the one part the generators
//! see: `tests/state_machine.rs` builds these types with proptest strategies and
//! `fuzz/fuzz_targets/connection.rs` decodes them from raw bytes, and neither needs to know
//! how a scenario is run. [`config`] turns [`Settings`] into the hub's [`Config`].

use super::pattern::MPat;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use velium_server::config::{Config, DuplicateIdentity, Secret, User};
use velium_server::proto::pattern::Pattern;

/// Segments most names are built from: few, so that targets often match, with mixed
/// case and the two wildcards.
pub const COMMON: [&str; 6] = ["a", "b", "B", "peq", "*", ">"];

/// Segments that break the identity grammar or stretch it: the empty segment, a
/// non-ASCII character, a byte that is not UTF-8, a space, `+`, the other bytes a
/// segment may hold, and a 31-byte segment (two make a 63-byte identity, one more
/// segment passes 64).
pub const ODD: [&[u8]; 8] = [
    b"",
    "\u{FFFD}".as_bytes(),
    b"\xE3",
    b"a b",
    b"+",
    b"x_-9",
    b"lllllllllllllllllllllllllllllll",
    b"A",
];

/// Segments every identity built by [`label`] is made of: all valid, with letter cases
/// that collide (`b`/`B`, `peq`/`Peq`), so that claims on one name in two cases are common.
pub const LABEL: [&str; 6] = ["a", "b", "B", "peq", "Peq", "x_-9"];

/// Joins segments with dots, one per index: seven in eight from [`COMMON`], the others
/// from [`ODD`]; a leading `+` when `plus`.
pub fn name(parts: &[u8], plus: bool) -> Vec<u8> {
    let mut v = Vec::new();
    if plus {
        v.push(b'+');
    }
    for (k, &i) in parts.iter().enumerate() {
        if k > 0 {
            v.push(b'.');
        }
        let i = usize::from(i);
        if i % 8 == 7 {
            v.extend_from_slice(ODD[i / 8 % ODD.len()]);
        } else {
            v.extend_from_slice(COMMON[i / 8 % COMMON.len()].as_bytes());
        }
    }
    v
}

/// A valid identity: [`LABEL`] segments joined with dots.
pub fn label(parts: &[u8]) -> Vec<u8> {
    let segs: Vec<&str> = parts
        .iter()
        .map(|&i| LABEL[usize::from(i) % LABEL.len()])
        .collect();
    segs.join(".").into_bytes()
}

/// The secret a scenario's server uses when it has a shared one.
pub const SECRET: &[u8] = b"s3cret";

/// The names a scenario's users may have.
pub const USERS: [&str; 3] = ["ops", "boxer", "guest"];

/// The secrets a scenario's users may have (one with a space, one starting with one:
/// only the first space of an Auth separates the name).
pub const SECRETS: [&[u8]; 4] = [b"s3cret", b"two words", b"x", b" lead"];

/// One `[[user]]` of a scenario's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct UserSpec {
    /// `USERS[name % len]`.
    pub name: u8,
    /// `SECRETS[secret % len]`.
    pub secret: u8,
    /// `identities` patterns (those that do not parse, or have a `+`, are left out, as the
    /// configuration would refuse them; a user left with none is left out).
    pub identities: Vec<Vec<u8>>,
    /// `commands` patterns.
    pub commands: Vec<Vec<u8>>,
    /// `echoes` patterns (`None`: the default, the commands).
    pub echoes: Option<Vec<Vec<u8>>>,
    /// `who` patterns (`None`: the default, the commands and the identities).
    pub who: Option<Vec<Vec<u8>>>,
    /// `state` patterns: whose relay state it may read (`None`: the default, its `who`).
    pub state: Option<Vec<Vec<u8>>>,
}

/// A user as the configuration would load it: name, secret, and parsable patterns with
/// the defaults filled in.
#[derive(Clone, Debug)]
pub(super) struct UserDef {
    pub(super) name: &'static str,
    pub(super) secret: &'static [u8],
    pub(super) identities: Vec<Vec<u8>>,
    pub(super) commands: Vec<Vec<u8>>,
    pub(super) echoes: Vec<Vec<u8>>,
    pub(super) who: Vec<Vec<u8>>,
    pub(super) state: Vec<Vec<u8>>,
}

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
    /// Whether [`SECRET`] is required (only on a hub without users: the configuration
    /// refuses both, so `users` wins).
    pub secret: bool,
    /// The `[[user]]` entries (a second entry with a name already used is left out, as
    /// the configuration would refuse it).
    pub users: Vec<UserSpec>,
    /// `duplicate_identity`.
    pub duplicate: DuplicateIdentity,
    /// `answer_window`, 1 to 4096.
    pub answer_window: usize,
    /// `state_value_bytes`: the longest value of a state key.
    pub state_value_bytes: usize,
    /// `state_keys`: keys one shim may hold (and keys one subscription may name).
    pub state_keys: usize,
    /// `state_bytes`: bytes of keys and values one shim may hold.
    pub state_bytes: usize,
    /// `state_sets_per_sec` (0: no limit; kept as first set across reloads, like the
    /// other rates).
    pub state_sets_per_sec: u32,
    /// `state_subscriptions`: subscriptions one connection may hold.
    pub state_subscriptions: usize,
}

/// What a frame's data holds.
#[derive(Clone, Debug)]
pub enum Body {
    /// Any bytes (0x0A left out).
    Bytes(Vec<u8>),
    /// A name (from [`name`] or [`label`]).
    Name(Vec<u8>),
    /// An identity user `user` may take: its `pick`-th `identities` pattern with each
    /// wildcard filled from [`LABEL`] (by the bits of `pick`); a [`label`] when the hub
    /// has no users. The user is `USERS[user % 3]` when the hub has it, else the hub's
    /// `user % n`-th (as for [`Body::Auth`], so that the two agree).
    As {
        /// Which user.
        user: u8,
        /// Which pattern, and how its wildcards are filled.
        pick: u8,
    },
    /// `TARGET SP text` (or, without a text, `TARGET` alone, for a Who) with a target
    /// made from the identity of the `pick`-th connection that holds one (the
    /// [`label`] of `pick` when none does), by `how % 8`: 0 and 1 as it is, 2 in upper
    /// case, 3 its last segment `*`, 4 its first segment then `>`, 5 `>`, 6 with a `+`,
    /// 7 its first segment `*`.
    At {
        /// Whose identity.
        pick: u8,
        /// How it is made a target.
        how: u8,
        /// The text (0x0A left out), if any.
        text: Option<Vec<u8>>,
    },
    /// `target SP text`.
    Routed {
        /// Target, from [`name`].
        target: Vec<u8>,
        /// Text (0x0A left out).
        text: Vec<u8>,
    },
    /// `id SP text` with the id of a Command sent earlier (the `pick`-th), if any: when
    /// `form / 8` is even, one of those sent to the responding connection (when it was
    /// sent any); written by `form % 8`: 0 to 3 as the hub wrote it, 4 with a leading
    /// zero, 5 `0`, 6 with a `+`, 7 past `u64::MAX`.
    Response {
        /// Which id.
        pick: u8,
        /// Whose ids, and how the id is written.
        form: u8,
        /// Text (0x0A left out).
        text: Vec<u8>,
    },
    /// The 16 raw token bytes of registered connection `n % registered` (of connection
    /// `n % count` when none is registered), so that most binds name a live session.
    Token(u8),
    /// An Auth's data, by `key % 8`: 0 to 3, the credential the hub wants (the shared
    /// secret; or user `user`'s name and secret, see [`Body::As`]; on a hub without
    /// credentials, a user's name and secret anyway); 4, `USERS[user % 3]` with
    /// `SECRETS[key / 8 % 4]`; 5, `SECRETS[key / 8 % 4]` or [`SECRET`] alone (by `user`'s
    /// parity); 6, a name no hub has with the shared secret; 7, a right name with a wrong
    /// secret.
    Auth {
        /// Whose name.
        user: u8,
        /// Which form.
        key: u8,
    },
    /// A Set's data: the items joined by 0x1F (none: empty data).
    Set(Vec<Item>),
    /// `SID SP INTERVAL_MS SP PATTERN (SP KEY)*`: the SID `SIDS[sid % len]`, the interval
    /// `INTERVALS[interval % len]`, the pattern made from a held identity as for
    /// [`Body::At`] (by `how % 8`; from 248 up one of [`BAD_PATTERNS`] instead), the keys
    /// from [`KEYS`]. A `how` of 240 to 247 leaves the pattern (and the keys) out, so
    /// that the request has too few fields.
    Subscribe {
        /// Which SID.
        sid: u8,
        /// Which interval.
        interval: u8,
        /// Whose identity the pattern is made from.
        pick: u8,
        /// How.
        how: u8,
        /// The keys filtered on.
        keys: Vec<u8>,
    },
    /// An Unsubscribe's SID: `SIDS[sid % len]`.
    Unsubscribe(u8),
    /// `PATTERN (SP KEY)*`, the pattern as for [`Body::Subscribe`] (240 to 247: no
    /// pattern, and with no keys the Get has no data at all: every shim).
    Get {
        /// Whose identity the pattern is made from.
        pick: u8,
        /// How.
        how: u8,
        /// The keys filtered on.
        keys: Vec<u8>,
    },
    /// `body` (a [`Body::At`], [`Body::Routed`], [`Body::Name`], [`Body::Subscribe`] or
    /// [`Body::Get`]) with its target followed by filters (§6): each `,FILTERS[i % len]`
    /// (an empty entry makes two commas in a row, or a trailing one). Any other body is
    /// sent as it is.
    Filtered {
        /// The request whose target is filtered.
        body: Box<Body>,
        /// Which filters, in order.
        filters: Vec<u8>,
    },
}

/// One item of a Set: `KEYS[key % len]`, then `=VALUE` (or nothing: a deletion).
#[derive(Clone, Debug)]
pub struct Item {
    /// Which key.
    pub key: u8,
    /// The value (0x0A left out; a 0x1F in it splits the item), if any.
    pub value: Option<Vec<u8>>,
}

/// The keys Sets, Subscribes and Gets name: a few valid ones, three of them the same key
/// in another case, three of them keys the hub indexes for filters (§6 `state_index`),
/// then keys outside the grammar (a space, empty, 65 bytes, a dot) and the longest valid
/// one.
pub const KEYS: [&[u8]; 16] = [
    b"hp",
    b"mana",
    b"HP",
    b"x",
    b"loc",
    b"Mana",
    b"t_-9",
    b"class",
    b"group",
    b"channels",
    b"Class",
    b"h p",
    b"",
    b"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",
    b"a.b",
    b"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",
];

/// Subscription ids as written: most often a few small ones (so that ids repeat), then
/// the largest, and ids that are none (zero, a leading zero, past 2^32-1, a letter, empty).
pub const SIDS: [&str; 12] = [
    "1",
    "2",
    "3",
    "1",
    "2",
    "7",
    "4294967295",
    "0",
    "01",
    "4294967296",
    "x",
    "",
];

/// Intervals as written: most often none, a few short ones (the harness waits past them
/// when it settles), a leading zero, the longest, and intervals that are none.
pub const INTERVALS: [&str; 11] = [
    "0", "0", "0", "0", "3", "20", "007", "3600000", "3600001", "-1", "",
];

/// Patterns that are none: an empty one, `+` alone, `>` not last, not UTF-8.
pub const BAD_PATTERNS: [&[u8]; 4] = [b"", b"+", b"a.>.b", b"\xE3"];

/// The keys of [`KEYS`] filters test most: those the hub indexes, one in another case.
pub const TAG_KEYS: std::ops::Range<u8> = 7..11;

/// Words Sets give values of, and filters compare with: letter cases that differ, a
/// value of several words (separated by one space or more, leading and trailing ones
/// included) and one word twice.
pub const WORDS: [&[u8]; 8] = [
    b"CLR", b"clr", b"war", b"ab cd", b"cd", b" ab  Cd", b"ab ab", b"Bob",
];

/// Filters (§6) a target may carry: first valid ones over the keys of [`KEYS`] and the
/// values of [`WORDS`] (the first four the likeliest to pass; the key and the value in
/// another case, `~` on a word, `=` on a value that is one word of another, a value
/// holding `=` and `~`, a key no shim holds), the `x=1` that makes long lists; then every
/// fault: no test, a key outside the grammar (a dot, empty, 65 bytes), nothing after the
/// test, a control byte, DEL, a byte that is not UTF-8, a space (in a Who's target;
/// elsewhere it ends the target), and the empty filter.
pub const FILTERS: [&[u8]; 24] = [
    b"class=clr",
    b"channels~ab",
    b"CLASS=War",
    b"Channels~CD",
    b"channels=cd",
    b"group=bob",
    b"class~clr",
    b"x~ab",
    b"hp=1",
    b"mana=a=b~c",
    b"raid=x",
    b"x=1",
    b"class",
    b"cl.ass=clr",
    b"=clr",
    b"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk=x",
    b"class=",
    b"channels~",
    b"class=c\x01",
    b"class=\x7F",
    b"class=\xE9",
    b"channels~ab cd",
    b"",
    b"group~",
];

/// How many of [`FILTERS`] are valid (the first ones).
pub const VALID_FILTERS: u8 = 12;

/// The short valid filter of [`FILTERS`] long lists are made of.
pub const SHORT_FILTER: u8 = 11;

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
    /// As [`Step::Connect`], then, when the connection was accepted, one read on it of
    /// `pieces` concatenated (a client that says Auth and Identify at once).
    Join {
        /// Source IP index.
        source: u8,
        /// Reads at once.
        reads: bool,
        /// What it sends first.
        pieces: Vec<Piece>,
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
    /// Every client reads everything and the clock moves on until no relay state waits
    /// (past the short intervals); then every subscriber's copy of the shims it watches
    /// must be the model's state of them.
    Settle,
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
    let parse = |v: &[Vec<u8>]| -> Vec<Pattern> {
        v.iter()
            .map(|t| Pattern::parse(t).expect("users() keeps parsable patterns"))
            .collect()
    };
    let users: BTreeMap<Arc<str>, Arc<User>> = users(s)
        .into_iter()
        .map(|u| {
            let user = User {
                name: Arc::from(u.name),
                secret: Secret::new(u.secret),
                identities: parse(&u.identities),
                commands: parse(&u.commands),
                echoes: parse(&u.echoes),
                who: parse(&u.who),
                state: parse(&u.state),
            };
            (user.name.clone(), Arc::new(user))
        })
        .collect();
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
        secret: shared_secret(s).then(|| Secret::new(SECRET)),
        users,
        duplicate_identity: s.duplicate,
        answer_window: s.answer_window,
        state_value_bytes: s.state_value_bytes,
        state_keys: s.state_keys,
        state_bytes: s.state_bytes,
        state_sets_per_sec: first.state_sets_per_sec,
        state_subscriptions: s.state_subscriptions,
        ..Config::default()
    }
}

/// Whether the hub of `s` has the shared secret (the configuration refuses it together
/// with users).
pub(super) fn shared_secret(s: &Settings) -> bool {
    s.secret && users(s).is_empty()
}

/// The users of `s` as the configuration loads them: the first entry of each name,
/// patterns that parse and have no leading `+`, at least one identity, and the
/// documented defaults (`echoes`: the commands; `who`: the commands and the identities;
/// `state`: the `who`).
pub(super) fn users(s: &Settings) -> Vec<UserDef> {
    let keep = |v: &[Vec<u8>]| -> Vec<Vec<u8>> {
        v.iter()
            .filter(|t| t.first() != Some(&b'+') && MPat::parse(t).is_ok())
            .cloned()
            .collect()
    };
    let mut out: Vec<UserDef> = Vec::new();
    for u in &s.users {
        let name = USERS[usize::from(u.name) % USERS.len()];
        let identities = keep(&u.identities);
        if out.iter().any(|d| d.name == name) || identities.is_empty() {
            continue;
        }
        let commands = keep(&u.commands);
        let echoes = u.echoes.as_deref().map_or_else(|| commands.clone(), keep);
        let who = u.who.as_deref().map_or_else(
            || commands.iter().chain(&identities).cloned().collect(),
            keep,
        );
        let state = u.state.as_deref().map_or_else(|| who.clone(), keep);
        out.push(UserDef {
            name,
            secret: SECRETS[usize::from(u.secret) % SECRETS.len()],
            identities,
            commands,
            echoes,
            who,
            state,
        });
    }
    out
}
