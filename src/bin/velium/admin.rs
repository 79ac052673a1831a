//! `stats` and `who --admin`: the hub's admin listener over HTTP.

use super::*;

/// The admin listener and the bearer token it is given.
pub(crate) struct Admin {
    pub(crate) addr: SocketAddr,
    pub(crate) token: Option<Vec<u8>>,
    /// For the whole exchange.
    pub(crate) timeout: Duration,
}

/// `GET path` on the admin listener, with `Authorization: Bearer TOKEN` when there is a
/// token; a non-200 answer is an error.
pub(crate) fn admin_get(admin: &Admin, path: &str) -> Result<String, Fatal> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(admin.timeout))
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
pub(crate) fn who_admin(
    admin: &Admin,
    pattern: Option<&str>,
    json: bool,
) -> Result<ExitCode, Fatal> {
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
pub(crate) struct Samples<'a>(Vec<(&'a str, &'a str, f64)>);

impl<'a> Samples<'a> {
    pub(crate) fn parse(text: &'a str) -> Samples<'a> {
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
    pub(crate) fn get(&self, name: &str, labels: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, l, _)| *n == name && *l == labels)
            .map_or(0.0, |s| s.2)
    }

    /// The sum of the samples of `name` whose labels hold every one of `has`.
    pub(crate) fn sum(&self, name: &str, has: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| *n == name && has.iter().all(|h| l.contains(h)))
            .fold(0.0, |sum, s| sum + s.2)
    }

    /// The samples of `name` above 0, by the value of their one label `label`.
    pub(crate) fn nonzero(&self, name: &str, label: &str) -> BTreeMap<String, serde_json::Value> {
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
    pub(crate) fn latency(&self, name: &str) -> serde_json::Value {
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
pub(crate) fn n(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && (0.0..9.0e15).contains(&v) {
        serde_json::json!(v as u64)
    } else {
        serde_json::json!(v)
    }
}

/// `stats`: a digest of GET /metrics, as lines or (`--json`) one object holding the same
/// figures.
pub(crate) fn stats(admin: &Admin, json: bool) -> Result<ExitCode, Fatal> {
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
