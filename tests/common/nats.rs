//! A real `nats-server` per test, on 127.0.0.1: on a port it picks (`-p -1`, read back
//! from its log) or on a given one (to restart it where the nodes look for it).
//!
//! And the cluster tests' helpers: nodes of one cluster, Who with the NODE field, a
//! subscription's view of the state it watches.
//!
//! The cluster tests need the binary: `/usr/sbin/nats-server` (the Debian package
//! `nats-server`), or the path in `NATS_SERVER`. Without it they fail, saying so.
#![allow(dead_code)]

use crate::common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use velium_server::proto::state::{self as st, Mode};

pub const IDENTIFY: u8 = 0x01;
pub const COMMAND: u8 = 0x04;
pub const RESPONSE: u8 = 0x05;
pub const ECHO: u8 = 0x08;
pub const ERROR: u8 = 0x09;
pub const ACK: u8 = 0x0C;
pub const WHO: u8 = 0x0D;
pub const WHO_ENTRY: u8 = 0x0E;
pub const STATE: u8 = 0x10;
pub const PRESENCE: u8 = 0x14;

/// Where the Debian package installs the server.
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// How long nats-server may take to listen.
const START: Duration = Duration::from_secs(10);

/// A running nats-server, killed on drop.
pub struct Nats {
    child: Child,
    /// The port it listens on for clients.
    pub port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Nats {
    /// Starts one on a port of its choosing.
    pub fn start() -> Nats {
        Nats::start_with(&[])
    }

    /// Starts one on a port of its choosing, with more flags (`--user U --pass P`, ...).
    pub fn start_with(extra: &[&str]) -> Nats {
        Nats::try_start("-1", extra)
            .unwrap_or_else(|log| panic!("nats-server did not start:\n{log}"))
    }

    /// Starts one on `port` (the port of one that was stopped), retrying while the port is
    /// still taken.
    pub fn start_on(port: u16) -> Nats {
        let end = Instant::now() + START;
        loop {
            match Nats::try_start(&port.to_string(), &[]) {
                Ok(n) => return n,
                Err(log) if Instant::now() < end && log.contains("address already in use") => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(log) => panic!("nats-server did not start on port {port}:\n{log}"),
            }
        }
    }

    /// The URL the nodes are given (`--cluster`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Kills it (SIGKILL) and waits until it is gone; returns its port.
    pub fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }

    fn try_start(port: &str, extra: &[&str]) -> Result<Nats, String> {
        let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| NATS_SERVER.to_string());
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", port])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server at {bin}: {e}. The cluster tests need it: install \
                     the Debian package nats-server, or set NATS_SERVER to its path"
                )
            });
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let port = line
                    .split("Listening for client connections on ")
                    .nth(1)
                    .and_then(|rest| rest.trim().rsplit(':').next()?.parse::<u16>().ok());
                if let Some(p) = port {
                    let _ = tx.send(p);
                }
                l.lock().unwrap().push(line);
            }
            // Dropping tx says it exited before listening.
        });
        match rx.recv_timeout(START) {
            Ok(port) => Ok(Nats { child, port, log }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                // Its stderr is closed now: the reader ends once it has every line.
                let _ = reader.join();
                Err(log.lock().unwrap().join("\n"))
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------

/// A cluster name no other test (or run) uses.
pub fn cluster_name(tag: &str) -> String {
    format!("t{}-{tag}", std::process::id())
}

/// Starts node `name` of `cluster` on the NATS server at `url` (with the admin listener,
/// and the Who and routing rates lifted), and waits until it is connected.
pub fn node(url: &str, cluster: &str, name: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--cluster",
        url,
        "--node-name",
        name,
        "--cluster-name",
        cluster,
    ];
    args.extend_from_slice(&["--who-per-sec", "0", "--routed-per-sec", "0"]);
    args.extend_from_slice(extra);
    let srv = Server::with_admin("uring", &args);
    srv.wait_log(&["cluster connected", &format!("node={name}")]);
    srv
}

/// Waits until `srv` has seen node `other`.
pub fn sees(srv: &Server, other: &str) {
    srv.wait_log(&["node joined", &format!("node={other}")]);
}

/// A NATS server and two nodes, `a` and `b`, that have seen each other.
pub fn pair(tag: &str, extra: &[&str]) -> (Nats, Server, Server) {
    let nats = Nats::start();
    let cluster = cluster_name(tag);
    let a = node(&nats.url(), &cluster, "a", extra);
    let b = node(&nats.url(), &cluster, "b", extra);
    sees(&a, "b");
    sees(&b, "a");
    (nats, a, b)
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// Who with the node
// ---------------------------------------------------------------------------------------

/// One WhoEntry: SINCE (Unix ms), `udp` or `-`, NODE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub since: u64,
    pub udp: String,
    pub node: String,
}

/// Who PATTERN: one entry per identity (four fields each, none listed twice), the Ack
/// checked to count them.
pub fn who_nodes(c: &mut Tcp, pattern: &str) -> BTreeMap<String, Entry> {
    c.send(WHO, pattern.as_bytes());
    let mut out = BTreeMap::new();
    loop {
        match c.recv() {
            (WHO_ENTRY, d) => {
                let e = text(&d);
                let f: Vec<&str> = e.split(' ').collect();
                assert_eq!(f.len(), 4, "WhoEntry {e:?}: IDENTITY SINCE udp|- NODE");
                let since: u64 = f[1].parse().unwrap_or_else(|_| panic!("SINCE in {e:?}"));
                assert!(
                    since > 1_600_000_000_000 && since <= unix_ms() + 1000,
                    "SINCE in {e:?}"
                );
                assert!(f[2] == "udp" || f[2] == "-", "{e:?}");
                let entry = Entry {
                    since,
                    udp: f[2].into(),
                    node: f[3].into(),
                };
                assert!(out.insert(f[0].to_string(), entry).is_none(), "{e:?} twice");
            }
            (ACK, d) => {
                assert_eq!(
                    text(&d),
                    format!("0 {}", out.len()),
                    "the Ack counts the entries"
                );
                return out;
            }
            (op, d) => panic!("in a Who listing: 0x{op:02X} {:?}", text(&d)),
        }
    }
}

/// The identities a listing should hold, as `IDENTITY@NODE`, or `IDENTITY@NODE/udp`
/// for a shim with a bound UDP channel, separated by spaces: identity -> (node, udp).
pub fn parse_want(want: &str) -> BTreeMap<String, (String, String)> {
    let one = |w: &str| {
        let (id, rest) = w.split_once('@').expect("IDENTITY@NODE");
        let (node, udp) = rest.split_once('/').unwrap_or((rest, "-"));
        (id.to_string(), (node.to_string(), udp.to_string()))
    };
    want.split_whitespace().map(one).collect()
}

/// Asks Who PATTERN on `c` until it lists exactly `want` ([`parse_want`]): a node learns
/// of the other nodes' shims asynchronously. Returns the listing.
pub fn wait_who(c: &mut Tcp, pattern: &str, want: &str) -> BTreeMap<String, Entry> {
    let want = parse_want(want);
    let end = Instant::now() + DEADLINE;
    loop {
        let got = who_nodes(c, pattern);
        let seen: BTreeMap<String, (String, String)> = got
            .iter()
            .map(|(i, e)| (i.clone(), (e.node.clone(), e.udp.clone())))
            .collect();
        if seen == want {
            return got;
        }
        assert!(
            Instant::now() < end,
            "Who {pattern:?} never listed {want:?}; last {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A barrier on each connection: its Pong is its next frame, so nothing else was queued.
pub fn quiet(cs: &mut [&mut Tcp]) {
    for (i, c) in cs.iter_mut().enumerate() {
        c.sync(format!("quiet {i}").as_bytes());
    }
}

/// Asserts the next frame is the `cluster unreachable:` notice.
pub fn notice(c: &mut Tcp) {
    let t = text(&c.expect(ERROR));
    assert!(
        t.starts_with("cluster unreachable:"),
        "not the notice: {t:?}"
    );
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

pub fn set(c: &mut Tcp, items: &[(&str, Option<&str>)]) {
    let mut v = Vec::new();
    st::encode_set(items.iter().copied(), &mut v);
    c.send_raw(&v);
}

/// A subscription (SID 1, every key, no interval) and what its subscriber holds: the
/// values per identity (F replaces, D updates, a join empties, a leave forgets) and every
/// Presence frame (`+ID`, `-ID REASON`). Remote state may come in F or D frames a few ms
/// after the join or the listing, so a test waits for a held value, not for a frame.
pub struct Watch {
    pub c: Tcp,
    pub held: BTreeMap<String, BTreeMap<String, String>>,
    pub presence: Vec<String>,
}

impl Watch {
    /// Subscribes `c` to `pattern`; returns the watch and its Ack's COUNT.
    pub fn new(c: Tcp, pattern: &str) -> (Watch, u64) {
        Watch::keys(c, pattern, &[])
    }

    /// Subscribes `c` to `pattern` for these keys only.
    pub fn keys(c: Tcp, pattern: &str, keys: &[&str]) -> (Watch, u64) {
        let mut w = Watch {
            c,
            held: BTreeMap::new(),
            presence: Vec::new(),
        };
        let mut v = Vec::new();
        st::encode_subscribe(1, 0, pattern, keys, &mut v);
        w.c.send_raw(&v);
        loop {
            let (op, d) = w.c.recv();
            if op == ACK {
                let (sid, n) = ack_of(&d);
                assert_eq!(sid, "1");
                assert_eq!(n as usize, w.held.len(), "one F frame per shim counted");
                return (w, n);
            }
            assert_eq!(op, STATE, "in a listing: 0x{op:02X} {:?}", text(&d));
            w.apply(op, &d);
        }
    }

    pub fn apply(&mut self, op: u8, d: &[u8]) {
        match op {
            STATE => {
                let s = st::parse_state(d)
                    .unwrap_or_else(|| panic!("not a State frame: {:?}", text(d)));
                assert_eq!(s.sid, 1, "{:?}", text(d));
                let m = self.held.entry(text(s.identity)).or_default();
                if s.mode == Mode::Full {
                    m.clear();
                }
                for it in &s.items {
                    match it.value {
                        Some((_, v)) => m.insert(text(it.key), text(v)),
                        None => m.remove(&text(it.key)),
                    };
                }
            }
            PRESENCE => {
                let t = text(d);
                let rest = t
                    .strip_prefix("1 ")
                    .unwrap_or_else(|| panic!("Presence {t:?}"));
                if let Some(id) = rest.strip_prefix('+') {
                    self.held.insert(id.to_string(), BTreeMap::new());
                } else if let Some(leave) = rest.strip_prefix('-') {
                    let id = leave.split(' ').next().unwrap();
                    self.held.remove(id);
                } else {
                    panic!("Presence {t:?}");
                }
                self.presence.push(rest.to_string());
            }
            _ => panic!("to a watcher: 0x{op:02X} {:?}", String::from_utf8_lossy(d)),
        }
    }

    /// Reads frames, applying each, until `ok` holds (failing at the deadline).
    pub fn until(&mut self, what: &str, ok: impl Fn(&Watch) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !ok(self) {
            let left = end.saturating_duration_since(Instant::now());
            let got = if left.is_zero() {
                None
            } else {
                self.c.s.set_read_timeout(Some(left)).unwrap();
                catch_unwind(AssertUnwindSafe(|| self.c.recv())).ok()
            };
            let Some((op, d)) = got else {
                panic!(
                    "watch: never {what}; holds {:?}; presence {:?}",
                    self.held, self.presence
                );
            };
            self.apply(op, &d);
        }
        self.c.s.set_read_timeout(Some(DEADLINE)).unwrap();
    }

    /// True when `id` is held with exactly these values (`KEY=VALUE` separated by spaces).
    pub fn holds(&self, id: &str, kv: &str) -> bool {
        let want: BTreeMap<String, String> = kv
            .split_whitespace()
            .map(|i| i.split_once('=').unwrap())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.held.get(id) == Some(&want)
    }

    /// True when this Presence (`+ID` or `-ID REASON`) arrived.
    pub fn saw(&self, p: &str) -> bool {
        self.presence.iter().any(|x| x == p)
    }
}
