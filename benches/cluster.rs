//! Cluster benchmarks: velium-server nodes joined through one nats-server
//! (`--cluster nats://... --cluster-name NAME --node-name a|b|c`), each node with one core
//! (`--cores 1`), measured against the same work on one node and against NATS itself, all
//! in one run on the same machine (ratios, not absolutes).
//!
//! Placement: with `--cores 1` a node pins its one core thread to the first CPU it may
//! use, so nodes a and b (and the hub without `--cluster`) all serve from CPU 0. Node c,
//! a third node of the same cluster, is started under `taskset -c 1`: its core thread (and
//! its other threads) on CPU 1. The bench prints where each node's core thread may run.
//!
//! (1) SAME-NODE ROUND TRIP: shim A sends a Command to shim B on the same node (node a of
//!     the cluster), B answers with a CommandResponse, A receives it; closed loop (one at a
//!     time), N round trips in all (default 2,000) after a warm-up. Raw protocol bytes on
//!     both ends. A reference row does the same on a hub started without `--cluster`.
//! (2) CROSS-NODE ROUND TRIP: the same with A on node a and B on node b (and, as a
//!     diagnostic row, B on node c).
//! (3) NATS REQUEST-REPLY through the same nats-server: an async-nats client's `request`
//!     to a responder subscribed with another async-nats client (the NATS client velium
//!     itself uses), and, as a reference, the same in raw NATS protocol bytes.
//!     Every round trip is checked: the Ack reached exactly 1 shim, the CommandResponse
//!     carries the Ack's id, the responder's identity and the text sent. The rows run in
//!     interleaved rounds (default 5), so a noisy neighbour weighs on all; each row's note
//!     gives the NATS messages the nodes published and the context switches of node a's
//!     cluster thread, per round trip.
//! (4) FAN-OUT: one raw sender on node a Echoes P-byte texts (default 64) to
//!     `fan.TAG.*`, matched by R raw receivers (default 50), windowed so that no receiver
//!     is more than W messages (default 1,024) behind; deliveries/s = M messages (default
//!     10,000) x R / time from the first send until every receiver has every message.
//!     Receivers on node b and on node c (cross node) and, for the ratio, on node a (one
//!     node); interleaved rounds, a fresh set of receivers each, median round. Every Echo's
//!     Ack must count R shims, and the receivers must get exactly what was sent.
//! (5) MEMORY PER REMOTE SHIM: a fresh pair of nodes a and b (another cluster name on the
//!     same nats-server): node a's VmRSS (`/proc/PID/status`) 2 s after both nodes see each
//!     other, then S raw shims (default 2,000, no UDP) connect to node b; once node a's
//!     `/metrics` show them all (`velium_cluster_remote_shims`) and 2 s more, node a's RSS
//!     again: bytes per remote shim = difference / S (node b's per local shim beside it).
//!     Then a Who on node a must list the S shims with node b, and once they disconnect,
//!     node a's gauge must fall back to 0.
//!
//! Target: cross-node (a -> b) p50 <= same-node p50 + 1.5 x NATS request-reply p50
//! (async-nats), reported as a ratio with PASS/FAIL, not asserted; the same is printed
//! against raw-protocol NATS and for node c.
//!
//! Settings (flag or environment): `--rtt` (2000), `--rounds` (5), `--warmup` (200),
//! `--receivers` (50), `--messages` (10000), `--payload` (64), `--window` (1024),
//! `--shims` (2000), each also as `VELIUM_BENCH_<NAME>`;
//! `VELIUM_BENCH_PARTS=rtt,fanout,memory`; `VELIUM_BENCH_SERVER_ARGS` adds velium-server
//! flags to every node.

mod common;

use bytes::Bytes;
use common::check_delivered;
use common::{
    Hist, LatRow, Progress, System, Via, banner, cap_connections, connect_from, cpu_secs,
    current_velium, find_binary, fmt_bytes, fmt_cpu, fmt_rate, part, print_latency_table, ratio,
    rss_of, runtime, send_window, setting, shim_limit_args, source_ip, storm, velium_extra_args,
    velium_identify,
};
use futures_util::StreamExt;
use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long a node may settle before and after the remote shims arrive.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest wait for one round trip's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

type Log = Arc<Mutex<Vec<String>>>;

fn capture<R: std::io::Read + Send + 'static>(
    r: R,
    log: Log,
    first: Option<(&'static str, std::sync::mpsc::Sender<String>)>,
) {
    std::thread::spawn(move || {
        let mut first = first;
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let Some((needle, tx)) = &first
                && let Some(rest) = line.split(needle).nth(1)
            {
                let _ = tx.send(rest.trim().to_string());
                first = None;
            }
            log.lock().unwrap().push(line);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// nats-server on a port of its choosing (`-p -1`), read from its stderr.
struct Nats {
    child: Child,
    url: String,
    version: String,
}

impl Nats {
    fn start() -> Option<Nats> {
        let Some(bin) = find_binary("nats-server") else {
            println!("> nats-server: not installed, the cluster bench cannot run");
            return None;
        };
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let (tx, rx) = std::sync::mpsc::channel();
        let log: Log = Arc::default();
        capture(
            child.stderr.take().unwrap(),
            log.clone(),
            Some(("Listening for client connections on ", tx)),
        );
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                panic!(
                    "nats-server: no listening line; log: {:?}",
                    log.lock().unwrap()
                )
            });
        Some(Nats {
            child,
            url: format!("nats://{addr}"),
            version,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A velium-server node (or a hub on its own) with an admin listener, killed when dropped.
struct Node {
    name: String,
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    banner: String,
    log: Log,
}

impl Node {
    /// `cluster`: (NATS url, cluster name); `None`: a hub on its own.
    /// `cpus`: started under `taskset -c CPUS`, so that its one core thread is pinned to
    /// the first of them (velium pins core N to the N-th CPU it may use) and its other
    /// threads stay on them; `None`: no mask, core thread on CPU 0.
    fn start(name: &str, cluster: Option<(&str, &str)>, cpus: Option<&str>) -> Node {
        let bin = current_velium();
        let mut cmd = match cpus {
            Some(c) => {
                let mut t = Command::new("taskset");
                t.args(["-c", c]).arg(&bin);
                t
            }
            None => Command::new(&bin),
        };
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--cores",
            "1",
        ])
        .args(["--log-level", "warn", "--idle-timeout", "10m"])
        .args(["--identify-timeout", "60s"])
        .args(["--connect-rate-per-source", "0"])
        .args(["--max-connections-per-source", "0"])
        .args(shim_limit_args(&bin));
        if let Some((url, cname)) = cluster {
            cmd.args([
                "--cluster",
                url,
                "--node-name",
                name,
                "--cluster-name",
                cname,
            ]);
        }
        cmd.args(velium_extra_args());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn velium-server");
        let log: Log = Arc::default();
        capture(child.stderr.take().unwrap(), log.clone(), None);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (mut first, mut second) = (String::new(), String::new());
        out.read_line(&mut first).expect("the listening line");
        out.read_line(&mut second).expect("the admin line");
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let addr = first
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("node {name}: no address in {first:?}: {:?}", log.lock()));
        let admin = second
            .trim()
            .strip_prefix("velium-server admin on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("node {name}: no admin in {second:?}: {:?}", log.lock()));
        Node {
            name: name.to_string(),
            child,
            addr,
            admin,
            banner: first.trim().to_string(),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CPUs its core thread (`velium-core-0`) may run on, from /proc.
    fn core_cpus(&self) -> String {
        let dir = format!("/proc/{}/task", self.pid());
        std::fs::read_dir(&dir)
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok).find_map(|t| {
                    let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                    if comm.trim() != "velium-core-0" {
                        return None;
                    }
                    let st = std::fs::read_to_string(t.path().join("status")).ok()?;
                    st.lines()
                        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                        .map(|v| v.trim().to_string())
                })
            })
            .unwrap_or_else(|| "?".into())
    }

    /// Context switches (voluntary + involuntary) so far of its threads named `comm`: how
    /// often they slept and were woken.
    fn switches(&self, comm: &str) -> f64 {
        let dir = format!("/proc/{}/task", self.pid());
        let Ok(d) = std::fs::read_dir(&dir) else {
            return 0.0;
        };
        d.filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm)
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
            .map(|st| {
                st.lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .sum()
    }

    /// NATS messages it has published (`velium_cluster_messages_total{dir="out"}`).
    fn published(&self) -> f64 {
        self.metric("velium_cluster_messages_total{dir=\"out\"}")
            .unwrap_or(0.0)
    }

    fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// A sample of its `/metrics` (a name with labels: `name{dir="out"}`).
    fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = velium_server::admin::fetch(self.admin, "GET", "/metrics").ok()?;
        if status != 200 {
            return None;
        }
        velium_server::admin::sample(&body, name)
    }

    /// Waits (polling `/metrics` every 5 ms, the runtime's tasks running between) until
    /// `name` equals `want`; the time it took.
    async fn wait_metric(
        &self,
        name: &str,
        want: f64,
        limit: Duration,
    ) -> Result<Duration, String> {
        let t0 = Instant::now();
        loop {
            let v = self.metric(name);
            if v == Some(want) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                return Err(format!(
                    "node {}: {name} is {v:?} after {limit:?}, {want} expected",
                    self.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = self.log.lock().unwrap();
            let tail: Vec<&String> = log.iter().rev().take(20).collect();
            panic!(
                "node {} exited ({status}); last log lines: {tail:?}",
                self.name
            );
        }
    }

    /// Its WARN and ERROR log lines so far.
    fn warnings(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nodes a and b of cluster `cname` and waits until each sees the other.
fn start_pair(rt: &tokio::runtime::Runtime, nats: &Nats, cname: &str) -> (Node, Node) {
    let a = Node::start("a", Some((&nats.url, cname)), None);
    let b = Node::start("b", Some((&nats.url, cname)), None);
    rt.block_on(async {
        for n in [&a, &b] {
            n.wait_metric("velium_cluster_connected", 1.0, Duration::from_secs(15))
                .await
                .expect("node connected to NATS");
            n.wait_metric("velium_cluster_nodes", 1.0, Duration::from_secs(15))
                .await
                .expect("node sees the other");
        }
    });
    (a, b)
}

// ---------------------------------------------------------------------------------------
// Raw velium ends
// ---------------------------------------------------------------------------------------

/// A raw velium connection read a frame at a time.
struct Frames {
    rd: FrameReader,
    wr: OwnedWriteHalf,
}

/// The read half of a raw velium connection, read a frame at a time.
struct FrameReader {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
    chunk: Vec<u8>,
}

impl FrameReader {
    fn new(rd: OwnedReadHalf) -> FrameReader {
        FrameReader {
            rd,
            buf: Vec::new(),
            chunk: vec![0u8; 64 * 1024],
        }
    }

    /// The next frame, without its 0A.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Result<Vec<u8>, String> {
        loop {
            if let Some(e) = memchr::memchr(b'\n', &self.buf) {
                let mut f: Vec<u8> = self.buf.drain(..=e).collect();
                f.pop();
                return Ok(f);
            }
            match tokio::time::timeout_at(deadline, self.rd.read(&mut self.chunk)).await {
                Err(_) => return Err("timed out".into()),
                Ok(Ok(0)) => return Err("connection closed by the server".into()),
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Ok(Ok(n)) => self.buf.extend_from_slice(&self.chunk[..n]),
            }
        }
    }
}

impl Frames {
    async fn connect(addr: SocketAddr, name: &str, i: usize) -> Result<Frames, String> {
        let mut s = connect_from(source_ip(i), addr)
            .await
            .map_err(|e| format!("{name}: connect: {e}"))?;
        velium_identify(&mut s, name)
            .await
            .map_err(|e| format!("{name}: identify: {e}"))?;
        let (rd, wr) = s.into_split();
        Ok(Frames {
            rd: FrameReader::new(rd),
            wr,
        })
    }

    async fn next(&mut self, deadline: tokio::time::Instant) -> Result<Vec<u8>, String> {
        self.rd.next(deadline).await
    }

    /// One Command -> CommandResponse round trip to `target` (text `seq`): the time from
    /// before the write until the response is read, every frame of it checked.
    async fn round_trip(&mut self, target: &str, seq: u64) -> Result<Duration, String> {
        let text = seq.to_string();
        let mut f = Vec::with_capacity(64);
        f.push(0x04);
        f.extend_from_slice(target.as_bytes());
        f.push(b' ');
        f.extend_from_slice(text.as_bytes());
        f.push(0x0A);
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        let t0 = Instant::now();
        self.wr
            .write_all(&f)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut ack: Option<String> = None;
        let mut took: Option<Duration> = None;
        let mut resp_id: Option<String> = None;
        while ack.is_none() || took.is_none() {
            let fr = self.next(deadline).await.map_err(|e| {
                format!(
                    "round trip {seq} to {target}: {e} (Ack {}, response {})",
                    if ack.is_some() { "received" } else { "missing" },
                    if took.is_some() {
                        "received"
                    } else {
                        "missing"
                    }
                )
            })?;
            let data = String::from_utf8_lossy(&fr[1..]).into_owned();
            match fr[0] {
                0x0C => {
                    // Ack: ID SP COUNT
                    let (id, count) = data.split_once(' ').unwrap_or((&data, ""));
                    if count != "1" {
                        return Err(format!(
                            "round trip {seq} to {target}: Ack {data:?} (reached {count}, 1 expected)"
                        ));
                    }
                    ack = Some(id.to_string());
                }
                0x05 => {
                    // CommandResponse: ID SP RESPONDER SP TEXT
                    let mut p = data.splitn(3, ' ');
                    let (id, who, t) = (p.next(), p.next(), p.next());
                    if who != Some(target) || t != Some(text.as_str()) {
                        return Err(format!(
                            "round trip {seq} to {target}: unexpected CommandResponse {data:?}"
                        ));
                    }
                    took = Some(t0.elapsed());
                    resp_id = id.map(String::from);
                }
                0x09 => {
                    return Err(format!("round trip {seq} to {target}: Error {data:?}"));
                }
                _ => {}
            }
        }
        if ack != resp_id {
            return Err(format!(
                "round trip {seq} to {target}: Ack id {ack:?}, CommandResponse id {resp_id:?}"
            ));
        }
        Ok(took.unwrap())
    }
}

/// Answers each raw Command `0x04 SENDER SP ID SP TEXT` with `0x05 ID SP TEXT`.
async fn responder(mut f: Frames) {
    let mut out = Vec::new();
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let Ok(fr) = f.next(far).await else { return };
        if fr.first() != Some(&0x04) {
            continue;
        }
        let mut parts = fr[1..].splitn(3, |&b| b == b' ');
        let (_sender, id, text) = (parts.next(), parts.next(), parts.next());
        if let (Some(id), Some(text)) = (id, text) {
            out.clear();
            out.push(0x05);
            out.extend_from_slice(id);
            out.push(b' ');
            out.extend_from_slice(text);
            out.push(0x0A);
            if f.wr.write_all(&out).await.is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// NATS ends
// ---------------------------------------------------------------------------------------

const NATS_SUBJECT: &str = "bench.cluster.rr";

/// async-nats: a requester, and a responder (another client) answering on `NATS_SUBJECT`.
async fn nats_client_ends(url: &str) -> Result<async_nats::Client, String> {
    let resp = async_nats::connect(url)
        .await
        .map_err(|e| format!("nats responder: {e}"))?;
    let mut sub = resp
        .subscribe(NATS_SUBJECT)
        .await
        .map_err(|e| format!("nats subscribe: {e}"))?;
    resp.flush().await.map_err(|e| format!("nats flush: {e}"))?;
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = resp.publish(reply, m.payload).await;
            }
        }
    });
    async_nats::connect(url)
        .await
        .map_err(|e| format!("nats requester: {e}"))
}

async fn nats_client_round_trip(c: &async_nats::Client, seq: u64) -> Result<Duration, String> {
    let body = seq.to_string();
    let t0 = Instant::now();
    let m = tokio::time::timeout(
        ANSWER_WAIT,
        c.request(NATS_SUBJECT, Bytes::from(body.clone())),
    )
    .await
    .map_err(|_| format!("nats request {seq}: timed out"))?
    .map_err(|e| format!("nats request {seq}: {e}"))?;
    let took = t0.elapsed();
    if m.payload != body.as_bytes() {
        return Err(format!("nats request {seq}: reply {:?}", m.payload));
    }
    Ok(took)
}

/// A raw NATS connection: INFO, CONNECT, PING -> PONG, then `sub` confirmed by PONG.
async fn nats_raw_conn(url: &str, sub: &str) -> Result<TcpStream, String> {
    let addr: SocketAddr = url
        .trim_start_matches("nats://")
        .parse()
        .map_err(|e| format!("nats url {url}: {e}"))?;
    let mut s = connect_from(Ipv4Addr::LOCALHOST, addr)
        .await
        .map_err(|e| format!("nats connect: {e}"))?;
    common::nats_handshake(&mut s)
        .await
        .map_err(|e| format!("nats handshake: {e}"))?;
    s.write_all(format!("{sub}\r\nPING\r\n").as_bytes())
        .await
        .map_err(|e| format!("nats sub: {e}"))?;
    let mut buf = Vec::new();
    common::read_until(&mut s, &mut buf, b"PONG\r\n")
        .await
        .map_err(|e| format!("nats sub: {e}"))?;
    Ok(s)
}

/// Reads NATS protocol items: `(reply subject, payload)` of the next MSG, answering PINGs.
struct NatsReader {
    s: TcpStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
}

impl NatsReader {
    async fn next_msg(&mut self) -> Result<(Option<String>, Vec<u8>), String> {
        loop {
            if let Some(eol) = memchr::memmem::find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..eol]).into_owned();
                if let Some(args) = line.strip_prefix("MSG ") {
                    let w: Vec<&str> = args.split_whitespace().collect();
                    let size: usize = w.last().and_then(|s| s.parse().ok()).ok_or("bad MSG")?;
                    let total = eol + 2 + size + 2;
                    if self.buf.len() >= total {
                        let reply = (w.len() == 4).then(|| w[2].to_string());
                        let payload = self.buf[eol + 2..eol + 2 + size].to_vec();
                        self.buf.drain(..total);
                        return Ok((reply, payload));
                    }
                } else {
                    self.buf.drain(..eol + 2);
                    if line == "PING" {
                        self.s
                            .write_all(b"PONG\r\n")
                            .await
                            .map_err(|e| format!("nats: {e}"))?;
                    }
                    continue;
                }
            }
            match self.s.read(&mut self.chunk).await {
                Ok(0) => return Err("nats closed".into()),
                Err(e) => return Err(format!("nats read: {e}")),
                Ok(n) => self.buf.extend_from_slice(&self.chunk[..n]),
            }
        }
    }
}

async fn nats_raw_ends(url: &str) -> Result<NatsReader, String> {
    let resp = nats_raw_conn(url, "SUB bench.cluster.rawrr 1").await?;
    tokio::spawn(async move {
        let mut r = NatsReader {
            s: resp,
            buf: Vec::new(),
            chunk: vec![0u8; 64 * 1024],
        };
        let mut out = Vec::new();
        while let Ok((Some(reply), payload)) = r.next_msg().await {
            out.clear();
            out.extend_from_slice(format!("PUB {reply} {}\r\n", payload.len()).as_bytes());
            out.extend_from_slice(&payload);
            out.extend_from_slice(b"\r\n");
            if r.s.write_all(&out).await.is_err() {
                return;
            }
        }
    });
    let req = nats_raw_conn(url, "SUB _INBOX.bench.* 1").await?;
    Ok(NatsReader {
        s: req,
        buf: Vec::new(),
        chunk: vec![0u8; 64 * 1024],
    })
}

async fn nats_raw_round_trip(r: &mut NatsReader, seq: u64) -> Result<Duration, String> {
    let body = seq.to_string();
    let f = format!(
        "PUB bench.cluster.rawrr _INBOX.bench.{seq} {}\r\n{body}\r\n",
        body.len()
    );
    let t0 = Instant::now();
    r.s.write_all(f.as_bytes())
        .await
        .map_err(|e| format!("nats write: {e}"))?;
    let (_, payload) = tokio::time::timeout(ANSWER_WAIT, r.next_msg())
        .await
        .map_err(|_| format!("raw nats request {seq}: timed out"))??;
    let took = t0.elapsed();
    if payload != body.as_bytes() {
        return Err(format!("raw nats request {seq}: reply {payload:?}"));
    }
    Ok(took)
}

// ---------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------

const ROW_SAME: &str = "same node (a -> a)";
const ROW_CROSS: &str = "cross node (a -> b)";
const ROW_CROSS_C: &str = "cross node (a -> c, c's core on CPU 1)";
const ROW_NATS: &str = "nats request-reply (async-nats)";
const ROW_NATS_RAW: &str = "nats request-reply (raw protocol)";
const ROW_SOLO: &str = "hub without --cluster (same node)";

enum Rtt {
    Velium(Frames, String),
    NatsClient(async_nats::Client),
    NatsRaw(NatsReader),
}

impl Rtt {
    async fn once(&mut self, seq: u64) -> Result<Duration, String> {
        match self {
            Rtt::Velium(f, target) => f.round_trip(target, seq).await,
            Rtt::NatsClient(c) => nats_client_round_trip(c, seq).await,
            Rtt::NatsRaw(r) => nats_raw_round_trip(r, seq).await,
        }
    }
}

struct RttParams {
    total: usize,
    rounds: usize,
    warmup: usize,
}

async fn round_trips(
    a: &Node,
    b: &Node,
    c: &Node,
    solo: &Node,
    nats: &Nats,
    p: &RttParams,
) -> Result<Vec<LatRow>, String> {
    // Responders first, then wait until node a knows b's.
    let resp_a = Frames::connect(a.addr, "bench.rt.ba", 0).await?;
    let resp_b = Frames::connect(b.addr, "bench.rt.bb", 1).await?;
    let resp_c = Frames::connect(c.addr, "bench.rt.bc", 3).await?;
    let resp_s = Frames::connect(solo.addr, "bench.rt.bs", 2).await?;
    for r in [resp_a, resp_b, resp_c, resp_s] {
        tokio::spawn(responder(r));
    }
    let seen = a
        .wait_metric("velium_cluster_remote_shims", 2.0, Duration::from_secs(10))
        .await?;
    println!(
        "- node a saw the responders of nodes b and c {:.1} ms after their Sessions (polled \
         every 5 ms)",
        seen.as_secs_f64() * 1e3
    );
    println!();
    let mut ends: Vec<(&str, Rtt)> = vec![
        (
            ROW_SAME,
            Rtt::Velium(
                Frames::connect(a.addr, "bench.rt.a1", 0).await?,
                "bench.rt.ba".into(),
            ),
        ),
        (
            ROW_CROSS,
            Rtt::Velium(
                Frames::connect(a.addr, "bench.rt.a2", 1).await?,
                "bench.rt.bb".into(),
            ),
        ),
        (
            ROW_CROSS_C,
            Rtt::Velium(
                Frames::connect(a.addr, "bench.rt.a4", 3).await?,
                "bench.rt.bc".into(),
            ),
        ),
        (
            ROW_NATS,
            Rtt::NatsClient(nats_client_ends(&nats.url).await?),
        ),
        (ROW_NATS_RAW, Rtt::NatsRaw(nats_raw_ends(&nats.url).await?)),
        (
            ROW_SOLO,
            Rtt::Velium(
                Frames::connect(solo.addr, "bench.rt.a3", 2).await?,
                "bench.rt.bs".into(),
            ),
        ),
    ];
    let mut rows: Vec<LatRow> = ends
        .iter()
        .map(|(name, _)| LatRow {
            name: name.to_string(),
            hist: Hist::default(),
            rate: None,
            note: String::new(),
        })
        .collect();
    let mut seq = 0u64;
    for (_, e) in ends.iter_mut() {
        for _ in 0..p.warmup {
            e.once(seq).await?;
            seq += 1;
        }
    }
    let per_round = p.total.div_ceil(p.rounds);
    // NATS messages the three nodes published while each row ran (outside its clock).
    let published = || a.published() + b.published() + c.published();
    let mut msgs = vec![0.0; rows.len()];
    let mut wakes = vec![0.0; rows.len()];
    for _ in 0..p.rounds {
        for (k, ((_, e), row)) in ends.iter_mut().zip(rows.iter_mut()).enumerate() {
            let m0 = published();
            let w0 = a.switches("velium-cluster");
            for _ in 0..per_round {
                let d = e.once(seq).await?;
                seq += 1;
                row.hist.record(d);
            }
            msgs[k] += published() - m0;
            wakes[k] += a.switches("velium-cluster") - w0;
        }
    }
    for ((row, m), w) in rows.iter_mut().zip(msgs).zip(wakes) {
        let n = row.hist.len() as f64;
        row.note = format!(
            "per round trip: {:.3} NATS messages published by nodes a, b and c together \
             (heartbeats included), {:.2} context switches of node a's cluster thread",
            m / n,
            w / n
        );
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// Fan-out
// ---------------------------------------------------------------------------------------

struct FanParams {
    receivers: usize,
    messages: u64,
    payload: usize,
    window: u64,
}

#[derive(Clone, Copy)]
struct FanStats {
    rate: f64,
    /// CPU shares of one core during the measured phase: node a, the receivers' node,
    /// nats-server, this bench.
    cpu: [f64; 4],
    /// NATS messages and bytes node a published per Echo (cross node).
    msgs_per_echo: f64,
    bytes_per_echo: f64,
    /// Time until node a no longer counted the receivers, after they closed (cross node).
    leave: Option<Duration>,
}

/// One fan-out round: a sender on `a`, the receivers on `recv` (`a` itself or `b`).
async fn fan_round(
    a: &Node,
    to: Option<&Node>,
    nats: &Nats,
    tag: &str,
    p: &FanParams,
) -> Result<FanStats, String> {
    let cross = to.is_some();
    let recv = to.unwrap_or(a);
    let remote0 = a.metric("velium_cluster_remote_shims").unwrap_or(0.0);
    let progress = Progress::new(p.receivers);
    let mut tasks = Vec::new();
    for i in 0..p.receivers {
        let f = Frames::connect(recv.addr, &format!("fan.{tag}.r{i}"), i).await?;
        let pr = progress.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let Frames { rd, wr } = f;
            let FrameReader {
                mut rd, mut chunk, ..
            } = rd;
            let buf = &mut chunk;
            loop {
                match rd.read(buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => pr.add(i, memchr::memchr_iter(b'\n', &buf[..n]).count() as u64),
                }
            }
            drop(wr);
        }));
    }
    if cross {
        a.wait_metric(
            "velium_cluster_remote_shims",
            remote0 + p.receivers as f64,
            Duration::from_secs(10),
        )
        .await?;
    }
    // The sender; its Acks are read (and checked) by a task.
    let s = Frames::connect(a.addr, &format!("fansrc.{tag}"), 0).await?;
    let Frames { rd, mut wr } = s;
    let acks = Rc::new(Cell::new(0u64));
    let bad_ack: Rc<RefCell<String>> = Rc::default();
    {
        let (acks, bad, want) = (acks.clone(), bad_ack.clone(), p.receivers.to_string());
        tasks.push(tokio::task::spawn_local(async move {
            let mut f = rd;
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            while let Ok(fr) = f.next(far).await {
                let data = String::from_utf8_lossy(&fr[1..]).into_owned();
                let ok = fr.first() == Some(&0x0C)
                    && data.split_once(' ').is_some_and(|(_, c)| c == want);
                if ok {
                    acks.set(acks.get() + 1);
                } else if bad.borrow().is_empty() {
                    *bad.borrow_mut() = format!("{:#04x} {data:?}", fr[0]);
                }
            }
        }));
    }
    let target = format!("fan.{tag}.*");
    let mut frame = vec![0x08];
    frame.extend_from_slice(target.as_bytes());
    frame.push(b' ');
    frame.extend_from_slice("x".repeat(p.payload).as_bytes());
    frame.push(0x0A);
    let warm = p.window;
    send_window(&mut wr, &progress, &frame, p.window, 0, warm).await?;
    progress.wait_min(warm, Duration::from_secs(30)).await?;
    let pids = [a.pid(), recv.pid(), nats.pid(), std::process::id()];
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let out0 = (
        a.metric("velium_cluster_messages_total{dir=\"out\"}")
            .unwrap_or(0.0),
        a.metric("velium_cluster_bytes_total{dir=\"out\"}")
            .unwrap_or(0.0),
    );
    let t0 = Instant::now();
    send_window(&mut wr, &progress, &frame, p.window, warm, p.messages).await?;
    progress
        .wait_min(warm + p.messages, Duration::from_secs(60))
        .await
        .map_err(|e| {
            format!(
                "{e}; node a velium_cluster_dropped_total {:?}",
                a.metric("velium_cluster_dropped_total")
            )
        })?;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(&p, c0)| (cpu_secs(p) - c0) / elapsed)
        .collect();
    let out1 = (
        a.metric("velium_cluster_messages_total{dir=\"out\"}")
            .unwrap_or(0.0),
        a.metric("velium_cluster_bytes_total{dir=\"out\"}")
            .unwrap_or(0.0),
    );
    // Every Echo acknowledged as reaching every receiver; nothing more delivered.
    check_delivered(&progress, &acks, &bad_ack, warm + p.messages, p.receivers).await?;
    drop(wr);
    for t in tasks {
        t.abort();
    }
    let leave = if cross {
        Some(
            a.wait_metric(
                "velium_cluster_remote_shims",
                remote0,
                Duration::from_secs(10),
            )
            .await?,
        )
    } else {
        None
    };
    // Let the closes settle before the next round.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = p.messages as f64;
    Ok(FanStats {
        rate: m * p.receivers as f64 / elapsed,
        cpu: [cpu[0], cpu[1], cpu[2], cpu[3]],
        msgs_per_echo: (out1.0 - out0.0) / m,
        bytes_per_echo: (out1.1 - out0.1) / m,
        leave,
    })
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

fn main() {
    banner("cluster");
    let rt = runtime();
    let Some(nats) = Nats::start() else { return };
    println!("- nats-server: {} at {}", nats.version, nats.url);
    let pid = std::process::id();
    let cname = format!("bench-{pid}");
    let (mut a, mut b) = start_pair(&rt, &nats, &cname);
    // A third node whose core thread runs on the other CPU: with `--cores 1`, a and b both
    // pin theirs to CPU 0.
    let mut c = Node::start("c", Some((&nats.url, &cname)), Some("1"));
    rt.block_on(async {
        for n in [&a, &b, &c] {
            n.wait_metric("velium_cluster_nodes", 2.0, Duration::from_secs(15))
                .await
                .expect("every node sees the two others");
        }
    });
    let solo = Node::start("solo", None, None);
    for (what, n, how) in [
        ("node a", &a, "--cores 1"),
        ("node b", &b, "--cores 1"),
        ("node c", &c, "--cores 1, under taskset -c 1"),
        ("hub without --cluster", &solo, "--cores 1"),
    ] {
        println!(
            "- {what} ({how}): {}; core thread on CPU {}",
            n.banner,
            n.core_cpus()
        );
    }
    println!();
    let local = tokio::task::LocalSet::new();

    // ----- (1)-(3) round trips -----
    let rtt = RttParams {
        total: setting("rtt", 2000).max(1),
        rounds: setting("rounds", 5).max(1),
        warmup: setting("warmup", 200),
    };
    let mut rtt_rows: Vec<LatRow> = Vec::new();
    if part("rtt") {
        println!(
            "## Command round trip, closed loop: {} per row ({} interleaved rounds, after {} \
             warm-up each); raw velium bytes",
            rtt.total.div_ceil(rtt.rounds) * rtt.rounds,
            rtt.rounds,
            rtt.warmup
        );
        println!();
        match rt.block_on(local.run_until(round_trips(&a, &b, &c, &solo, &nats, &rtt))) {
            Ok(rows) => rtt_rows = rows,
            Err(e) => println!("> round trips FAILED: {e}"),
        }
        a.assert_running();
        b.assert_running();
        c.assert_running();
        print_latency_table(
            "Round trip (Command sent -> CommandResponse received)",
            "-",
            &rtt_rows,
        );
    }
    drop(solo);

    // ----- (4) fan-out -----
    let fan = FanParams {
        receivers: setting("receivers", 50).max(1),
        messages: setting("messages", 10_000).max(1) as u64,
        payload: setting("payload", 64).max(1),
        window: setting("window", 1024).max(1) as u64,
    };
    let mut fan_res: [(Vec<FanStats>, Vec<String>); 3] = Default::default();
    if part("fanout") {
        println!(
            "## Fan-out 1 -> {}: Echo of {} bytes to a pattern, {} messages per round after {} \
             warm-up, window {}, {} interleaved rounds (median round)",
            fan.receivers, fan.payload, fan.messages, fan.window, fan.window, rtt.rounds
        );
        println!();
        for round in 0..rtt.rounds {
            for k in 0..3 {
                let tag = format!("{}{round}", ["l", "b", "c"][k]);
                let to = [None, Some(&b), Some(&c)][k];
                let r = rt.block_on(local.run_until(fan_round(&a, to, &nats, &tag, &fan)));
                a.assert_running();
                b.assert_running();
                c.assert_running();
                match r {
                    Ok(s) => fan_res[k].0.push(s),
                    Err(e) => fan_res[k].1.push(e),
                }
            }
        }
        println!(
            "| receivers on | deliveries/s (median round) | every round | node a CPU | receivers' \
             node CPU | nats-server CPU | bench CPU | ratio |"
        );
        println!("|---|---:|---|---:|---:|---:|---:|---:|");
        let mut medians: Vec<Option<FanStats>> = Vec::new();
        for (rounds, _) in fan_res.iter_mut() {
            rounds.sort_by(|x, y| x.rate.total_cmp(&y.rate));
            medians.push(rounds.get(rounds.len() / 2).copied());
        }
        for (k, name) in [
            "node a (one node)",
            "node b (cross node)",
            "node c (cross node, c's core on CPU 1)",
        ]
        .iter()
        .enumerate()
        {
            let (rounds, errors) = &fan_res[k];
            let m = medians[k];
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} |",
                m.map_or("-".into(), |m| fmt_rate(m.rate)),
                rounds
                    .iter()
                    .map(|r| fmt_rate(r.rate))
                    .collect::<Vec<_>>()
                    .join(" / "),
                m.map_or("-".into(), |m| fmt_cpu(m.cpu[0])),
                m.map_or("-".into(), |m| {
                    if k == 0 {
                        "(node a)".into()
                    } else {
                        fmt_cpu(m.cpu[1])
                    }
                }),
                m.map_or("-".into(), |m| fmt_cpu(m.cpu[2])),
                m.map_or("-".into(), |m| fmt_cpu(m.cpu[3])),
                match (m, medians[0]) {
                    (Some(m), Some(base)) => ratio(m.rate, base.rate),
                    _ => "-".into(),
                }
            );
            for e in errors {
                println!("- {name}: FAILED: {e}");
            }
        }
        println!();
        for (k, node) in [(1, "b"), (2, "c")] {
            if let Some(m) = medians[k] {
                println!(
                    "- to node {node}, median round: node a published {:.3} NATS messages and {} \
                     per Echo (`velium_cluster_messages_total` / `_bytes_total{{dir=\"out\"}}`); \
                     node a stopped counting the {} receivers {} after they closed.",
                    m.msgs_per_echo,
                    fmt_bytes(m.bytes_per_echo),
                    fan.receivers,
                    m.leave
                        .map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                );
            }
        }
        println!();
        println!(
            "Ratio: deliveries/s over the one-node row's. CPU: share of one core during the \
             measured phase of the median round."
        );
        println!();
    }
    let warn_a = a.warnings();
    let warn_b = b.warnings();
    let warn_c = c.warnings();
    drop(a);
    drop(b);
    drop(c);

    // ----- (5) memory per remote shim -----
    let shims = cap_connections("remote shims", setting("shims", 2000), 500);
    let mut mem: Option<(u64, u64, u64, u64)> = None;
    if part("memory") {
        println!(
            "## Memory per remote shim: {shims} raw shims (no UDP) on node b, node a's RSS \
             (fresh pair of nodes)"
        );
        println!();
        let (mut ma, mut mb) = start_pair(&rt, &nats, &format!("bench-mem-{pid}"));
        std::thread::sleep(SETTLE);
        let (a0, b0) = (ma.rss(), mb.rss());
        let r = rt.block_on(local.run_until(async {
            let t0 = Instant::now();
            let st = storm(System::VeliumUring, mb.addr, shims, 100, false, Via::Raw).await;
            let connected = t0.elapsed();
            if st.errors > 0 {
                return Err(format!("{} shims failed: {}", st.errors, st.first_error));
            }
            let seen = ma
                .wait_metric(
                    "velium_cluster_remote_shims",
                    shims as f64,
                    Duration::from_secs(30),
                )
                .await?;
            tokio::time::sleep(SETTLE).await;
            let (a1, b1) = (ma.rss(), mb.rss());
            // Who on node a lists them, with node b.
            let c = velium_server::client::Client::connect(ma.addr, "bench.mem.who")
                .await
                .map_err(|e| format!("who client: {e}"))?;
            let who = c
                .who(Some("bench.storm.*"))
                .await
                .map_err(|e| format!("who: {e}"))?;
            let on_b = who
                .iter()
                .filter(|e| e.node.as_deref() == Some("b"))
                .count();
            drop(c);
            let held = st.conns.iter().filter(|c| c.is_open()).count();
            drop(st.conns);
            let gone = ma
                .wait_metric("velium_cluster_remote_shims", 0.0, Duration::from_secs(30))
                .await;
            Ok::<_, String>((connected, seen, a1, b1, who.len(), on_b, held, gone))
        }));
        ma.assert_running();
        mb.assert_running();
        match r {
            Ok((connected, seen, a1, b1, listed, on_b, held, gone)) => {
                mem = Some((a0, a1, b0, b1));
                let per = |x: u64, y: u64| (y as f64 - x as f64) / shims as f64;
                println!("| node | RSS before | RSS after | per shim |");
                println!("|---|---:|---:|---:|");
                println!(
                    "| node a ({shims} remote shims) | {} | {} | {} |",
                    fmt_bytes(a0 as f64),
                    fmt_bytes(a1 as f64),
                    fmt_bytes(per(a0, a1))
                );
                println!(
                    "| node b ({shims} local shims, for reference) | {} | {} | {} |",
                    fmt_bytes(b0 as f64),
                    fmt_bytes(b1 as f64),
                    fmt_bytes(per(b0, b1))
                );
                println!();
                println!(
                    "- {shims} shims connected to node b in {:.0} ms; node a counted all of them \
                     {:.0} ms later; {held} of {shims} held open at the end",
                    connected.as_secs_f64() * 1e3,
                    seen.as_secs_f64() * 1e3
                );
                println!(
                    "- Who on node a: {listed} entries for bench.storm.*, {on_b} of them on node b \
                     ({shims} expected)"
                );
                match gone {
                    Ok(d) => println!(
                        "- after they closed, node a's velium_cluster_remote_shims fell to 0 in \
                         {:.0} ms",
                        d.as_secs_f64() * 1e3
                    ),
                    Err(e) => println!("- after they closed: {e}"),
                }
                println!();
            }
            Err(e) => {
                println!("> memory FAILED: {e}");
                println!();
            }
        }
        for (n, w) in [("a (memory)", ma.warnings()), ("b (memory)", mb.warnings())] {
            for l in w.iter().take(5) {
                println!("- node {n} logged: {l}");
            }
        }
    }
    for (n, w) in [("a", &warn_a), ("b", &warn_b), ("c", &warn_c)] {
        for l in w.iter().take(5) {
            println!("- node {n} logged: {l}");
        }
        if w.len() > 5 {
            println!("- node {n}: {} more WARN/ERROR lines", w.len() - 5);
        }
    }

    // ----- summary and target -----
    println!("## Summary");
    println!();
    let q = |name: &str, qq: f64| {
        rtt_rows
            .iter()
            .find(|r| r.name == name && !r.hist.is_empty())
            .map(|r| r.hist.us(qq))
    };
    println!("| figure | value |");
    println!("|---|---:|");
    for name in [
        ROW_SAME,
        ROW_CROSS,
        ROW_CROSS_C,
        ROW_NATS,
        ROW_NATS_RAW,
        ROW_SOLO,
    ] {
        if let (Some(p50), Some(p99)) = (q(name, 0.5), q(name, 0.99)) {
            println!("| {name} round trip p50 / p99 | {p50:.1} / {p99:.1} µs |");
        }
    }
    let med = |k: usize| {
        let r = &fan_res[k].0;
        r.get(r.len() / 2).map(|s| s.rate)
    };
    if let Some(v) = med(0) {
        println!("| fan-out deliveries/s, one node | {} |", fmt_rate(v));
    }
    for (k, what) in [
        (1, "cross node (a -> b)"),
        (2, "cross node (a -> c, CPU 1)"),
    ] {
        if let Some(v) = med(k) {
            println!(
                "| fan-out deliveries/s, {what} | {} ({} of one node) |",
                fmt_rate(v),
                med(0).map_or("-".into(), |l| ratio(v, l))
            );
        }
    }
    if let Some((a0, a1, b0, b1)) = mem {
        println!(
            "| node a RSS per remote shim | {} (node b per local shim: {}) |",
            fmt_bytes((a1 as f64 - a0 as f64) / shims as f64),
            fmt_bytes((b1 as f64 - b0 as f64) / shims as f64)
        );
    }
    println!();
    if let (Some(same), Some(cross), Some(n)) =
        (q(ROW_SAME, 0.5), q(ROW_CROSS, 0.5), q(ROW_NATS, 0.5))
    {
        let bound = same + 1.5 * n;
        let r = cross / bound;
        println!(
            "- target {}: cross-node p50 <= same-node p50 + 1.5 x NATS request-reply p50: \
             {cross:.1} µs against {same:.1} + 1.5 x {n:.1} = {bound:.1} µs: ratio {r:.2} \
             (<= 1 passes); the cross-node hop adds {:.1} µs = {:.2}x the NATS p50",
            if r <= 1.0 { "PASS" } else { "FAIL" },
            cross - same,
            (cross - same) / n
        );
        if let Some(nr) = q(ROW_NATS_RAW, 0.5) {
            let bound = same + 1.5 * nr;
            println!(
                "- the same against raw-protocol NATS ({nr:.1} µs): bound {bound:.1} µs, ratio \
                 {:.2} ({}); the hop is {:.2}x the raw NATS p50",
                cross / bound,
                if cross <= bound { "PASS" } else { "FAIL" },
                (cross - same) / nr
            );
        }
        if let Some(cc) = q(ROW_CROSS_C, 0.5) {
            let bound = same + 1.5 * n;
            println!(
                "- diagnostic, node c (core thread on CPU 1, not CPU 0 beside a's): {cc:.1} µs \
                 against {bound:.1} µs: ratio {:.2} ({}); its hop adds {:.1} µs = {:.2}x the \
                 NATS p50",
                cc / bound,
                if cc <= bound { "PASS" } else { "FAIL" },
                cc - same,
                (cc - same) / n
            );
        }
    } else {
        println!("- target: not judged (a round-trip row is missing)");
    }
    println!();
}
