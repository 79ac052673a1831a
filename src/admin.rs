//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz`, `/shims` (JSON) and
//! `POST /reload`.
//!
//! It runs on a thread of its own, outside the pinned cores, so a scrape never takes a turn
//! from the shim path: what it reads (atomic counters, the per-core histograms, the router
//! under a read lock) is shared state the cores only publish. It is off unless configured,
//! and the examples bind it to 127.0.0.1: it lists every shim and can reload the settings.

use crate::hub::Hub;
use crate::metrics::{Dir, Latency, Transport};
use crate::proto::Opcode;
use crate::proto::pattern::Pattern;
use serde::Serialize;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tiny_http::{Header, Method, Request, Response, Server};
use tracing::{debug, warn};

/// Re-reads the settings; returns what was applied, or why nothing was.
pub type Reload = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Binds the admin listener on `addr` and serves it from a new thread; returns the bound
/// address (the real port when port 0 was asked for).
pub fn start(addr: SocketAddr, hub: Arc<Hub>, reload: Reload) -> io::Result<SocketAddr> {
    let server = Server::http(addr).map_err(io::Error::other)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("admin listener has no IP address"))?;
    std::thread::Builder::new()
        .name("velium-admin".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                handle(&hub, &reload, req);
            }
        })?;
    Ok(bound)
}

fn handle(hub: &Hub, reload: &Reload, req: Request) {
    let url = req.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    debug!(method = %req.method(), %path, "admin request");
    let (status, ctype, body) = match (req.method(), path) {
        (Method::Get, "/healthz") => (200, "text/plain; charset=utf-8", "ok\n".to_owned()),
        (Method::Get, "/metrics") => (200, "text/plain; version=0.0.4", render(hub)),
        (Method::Get, "/shims") => match shims(hub, query) {
            Ok(json) => (200, "application/json", json),
            Err(e) => (400, "text/plain; charset=utf-8", format!("{e}\n")),
        },
        (Method::Post, "/reload") => match reload() {
            Ok(msg) => (200, "text/plain; charset=utf-8", format!("{msg}\n")),
            Err(e) => (500, "text/plain; charset=utf-8", format!("{e}\n")),
        },
        (_, "/healthz" | "/metrics" | "/shims" | "/reload") => (
            405,
            "text/plain; charset=utf-8",
            "method not allowed\n".to_owned(),
        ),
        _ => (
            404,
            "text/plain; charset=utf-8",
            "not found: try /metrics, /healthz, /shims?pattern=P, POST /reload\n".to_owned(),
        ),
    };
    let header = Header::from_bytes("Content-Type", ctype).expect("valid header");
    let resp = Response::from_string(body)
        .with_status_code(status)
        .with_header(header);
    if let Err(e) = req.respond(resp) {
        warn!(error = %e, "admin response failed");
    }
}

/// One shim in the `/shims` listing.
#[derive(Serialize)]
struct ShimInfo {
    identity: String,
    /// The `[[user]]` it authenticated as (null on a hub without users).
    user: Option<String>,
    peer: String,
    core: u16,
    connected_unix_ms: u64,
    udp: Option<String>,
    frames_in: u64,
    frames_out: u64,
}

/// The identified shims matching the `pattern` query parameter (every shim without one).
fn shims(hub: &Hub, query: &str) -> Result<String, String> {
    let pattern = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "pattern")
        .map(|(_, v)| v.into_owned());
    let pattern = match pattern.as_deref() {
        None | Some("") => Pattern::all(),
        Some(p) => Pattern::parse(p.as_bytes()).map_err(|e| format!("bad pattern {p:?}: {e}"))?,
    };
    let mut list = Vec::new();
    hub.router.for_each_match(&pattern, |s| {
        if !s.is_identified() {
            return;
        }
        list.push(ShimInfo {
            identity: s.identity().to_string(),
            user: s.user().map(|u| u.name.to_string()),
            peer: s.peer.to_string(),
            core: s.core,
            connected_unix_ms: s.connected_unix_ms,
            udp: s.udp_addr().map(|a| a.to_string()),
            frames_in: s.frames_in.load(Ordering::Relaxed),
            frames_out: s.frames_out.load(Ordering::Relaxed),
        })
    });
    list.sort_by(|a, b| a.identity.cmp(&b.identity));
    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())
}

/// The opcodes reported per frame counter, with the slot of "any other byte" last.
const OPCODES: [(u8, &str); 17] = [
    (0x00, "None"),
    (0x01, "Identify"),
    (0x02, "Session"),
    (0x03, "Quit"),
    (0x04, "Command"),
    (0x05, "CommandResponse"),
    (0x06, "Ping"),
    (0x07, "Pong"),
    (0x08, "Echo"),
    (0x09, "Error"),
    (0x0A, "invalid_0A"),
    (0x0B, "invalid_0B"),
    (0x0C, "Ack"),
    (0x0D, "Who"),
    (0x0E, "WhoEntry"),
    (0x0F, "Auth"),
    (0x10, "unknown"),
];

/// Everything `/metrics` reports, in the Prometheus text exposition format.
pub fn render(hub: &Hub) -> String {
    debug_assert_eq!(Opcode::Auth as u8, 0x0F);
    let m = &hub.metrics;
    let c = &m.counters;
    let mut o = String::with_capacity(16 * 1024);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    metric(
        "velium_connections",
        "gauge",
        "Open TCP connections.",
        &one(hub.connections() as u64),
    );
    metric(
        "velium_shims",
        "gauge",
        "Identified shims.",
        &one(hub.table.len() as u64),
    );
    metric(
        "velium_udp_bound",
        "gauge",
        "Shims with a bound UDP channel.",
        &one(hub.table.udp_bound() as u64),
    );
    metric(
        "velium_connections_limit",
        "gauge",
        "Connections admitted at most (max_connections, capped by the open-file limit).",
        &one(hub.max_connections() as u64),
    );
    metric(
        "velium_connections_accepted_total",
        "counter",
        "TCP connections admitted.",
        &one(get(&c.accepted)),
    );
    metric(
        "velium_identified_total",
        "counter",
        "Shims that completed Identify.",
        &one(get(&c.identified)),
    );
    let mut frames = Vec::new();
    let mut bytes = Vec::new();
    for (dir, d) in [(Dir::In, "in"), (Dir::Out, "out")] {
        for (t, tn) in [(Transport::Tcp, "tcp"), (Transport::Udp, "udp")] {
            for (op, name) in OPCODES {
                let (f, b) = m.traffic(dir, t, op);
                if f == 0 {
                    continue;
                }
                let labels = format!("{{direction=\"{d}\",transport=\"{tn}\",opcode=\"{name}\"}}");
                frames.push((labels.clone(), f));
                bytes.push((labels, b));
            }
        }
    }
    metric(
        "velium_frames_total",
        "counter",
        "Frames received (in) and sent or queued (out), by transport and opcode.",
        &frames,
    );
    metric(
        "velium_bytes_total",
        "counter",
        "Frame bytes (opcode and 0x0A included), by direction, transport and opcode.",
        &bytes,
    );
    let errors: Vec<_> = m
        .errors()
        .map(|(k, v)| (format!("{{kind=\"{}\"}}", k.label()), v))
        .collect();
    metric(
        "velium_errors_total",
        "counter",
        "Error frames sent and datagrams dropped, by kind.",
        &errors,
    );
    let refused: Vec<_> = m
        .refusals()
        .map(|(k, v)| (format!("{{reason=\"{}\"}}", k.label()), v))
        .collect();
    metric(
        "velium_refused_total",
        "counter",
        "Connections, datagrams and requests refused by a limit or an access rule.",
        &refused,
    );
    metric(
        "velium_datagrams_refused_total",
        "counter",
        "Datagrams dropped because the source is outside allow_networks.",
        &one(get(&c.datagrams_refused)),
    );
    metric(
        "velium_udp_dropped_total",
        "counter",
        "Datagrams dropped because a core's UDP send queue, or one destination's, was full.",
        &one(get(&c.udp_dropped)),
    );
    metric(
        "velium_identities_replaced_total",
        "counter",
        "Connections closed because a newer connection took their identity (duplicate_identity).",
        &one(get(&c.replaced)),
    );
    metric(
        "velium_slow_consumers_total",
        "counter",
        "Shims cut off for passing outbound_limit.",
        &one(get(&c.slow_consumers)),
    );
    metric(
        "velium_udp_quit_total",
        "counter",
        "Quit answers to unbound UDP sources, sent or withheld by the rate limit.",
        &[
            ("{result=\"sent\"}".into(), get(&c.udp_quit_sent)),
            (
                "{result=\"rate_limited\"}".into(),
                get(&c.udp_quit_suppressed),
            ),
        ],
    );
    metric(
        "velium_deliveries_total",
        "counter",
        "Routed frames delivered to a shim.",
        &one(get(&c.deliveries)),
    );
    metric(
        "velium_responses_dropped_total",
        "counter",
        "CommandResponses whose command sender had gone.",
        &one(get(&c.responses_dropped)),
    );
    for (which, name, help) in [
        (
            Latency::Handshake,
            "velium_handshake_seconds",
            "TCP accept to Session reply written, across all cores.",
        ),
        (
            Latency::UdpBind,
            "velium_udp_bind_seconds",
            "UDP bind datagram received to binding in place, across all cores.",
        ),
    ] {
        let h = m.merged(which);
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} summary");
        for q in [0.5, 0.9, 0.99, 0.999] {
            let v = if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1e6
            };
            let _ = writeln!(o, "{name}{{quantile=\"{q}\"}} {v}");
        }
        let _ = writeln!(o, "{name}_sum {}", h.mean() * h.len() as f64 / 1e6);
        let _ = writeln!(o, "{name}_count {}", h.len());
    }
    o
}

/// Sends one request to an admin listener (`method` GET or POST) and returns the status
/// and body; used by `velium stats` / `velium who --admin` and by the tests.
pub fn fetch(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let res = match method {
        "POST" => agent.post(&url).send_empty(),
        _ => agent.get(&url).call(),
    };
    let mut resp = res.map_err(|e| format!("admin listener at {addr}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("admin listener at {addr}: {e}"))?;
    Ok((status, body))
}

/// The value of the sample `name` (with its labels, exactly as printed, e.g.
/// `velium_refused_total{reason="rate"}`) in a `/metrics` text; `None` if absent.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
