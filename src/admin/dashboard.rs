//! The live dashboard: the page at `/`, its login, its event stream and its send box.
//!
//! - **Assets** are compiled in (`assets/`): a hub with no internet serves the whole page.
//!   The page's HTML is sent with a strict Content-Security-Policy (no inline script or
//!   style, nothing from elsewhere), so an identity or a state value that looks like markup
//!   can never run.
//! - **Login**: `POST /login` with the token sets it as an `HttpOnly; SameSite=Strict`
//!   cookie, which every other route accepts like the bearer header. Attempts are rate
//!   limited; a wrong one is a counted, throttled `token` refusal.
//! - **The stream** (`GET /api/stream`) is Server-Sent Events, made by the page's own
//!   task when hyper asks for more: every [`TICK`] it compares the shims the page's
//!   pattern matches with what the page was last sent and sends only rows that changed
//!   (a row's digest covers its identity, UDP, user, state sequence and staleness), new
//!   journal entries, the seconds sampled since, and the state key names now and then.
//!   What a page does not read is never made: the next tick waits for the socket, whose
//!   send buffer is fixed, and a page that stops reading is closed by the write timeout.
//!   The router's lock is held only to copy out the matched shims' pointers.
//! - **The send box** (`POST /api/send`) connects to the hub's own port over loopback as
//!   an ordinary client, with the credentials typed into the page, so the same rules as
//!   for any client apply; its answers stream back as NDJSON lines as they arrive.

use super::history::Sample;
use super::{Admin, Refusal, Reply, closing, local, reply, text};
use crate::client::{Client, ClientError, ClientOptions, TlsOptions};
use crate::config::Secret;
use crate::hub::Hub;
use crate::hub::journal::{Entry, Happened};
use crate::hub::shim::Shim;
use crate::proto::target::Target;
use bytes::Bytes;
use futures_util::stream;
use http_body_util::StreamBody;
use hyper::StatusCode;
use hyper::body::Frame;
use hyper::header::{
    CACHE_CONTROL, CONTENT_TYPE, COOKIE, HeaderMap, HeaderValue, LOCATION, SET_COOKIE,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::cell::Cell;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::sync::broadcast;

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const FAVICON: &str = include_str!("assets/favicon.svg");

/// The cookie that carries the token.
pub const COOKIE_NAME: &str = "velium_admin";
/// The header a send must carry: a cross-site form cannot set it, and a cross-site
/// `fetch` that sets it needs a CORS preflight this listener never grants.
pub const SEND_HEADER: &str = "x-velium-dashboard";
/// Time between a page's updates: a few a second, however busy the fleet.
pub const TICK: Duration = Duration::from_millis(250);
/// A comment line keeps a quiet stream from looking dead to proxies.
const PING_EVERY: Duration = Duration::from_secs(15);
/// How often a page is sent the key names its shims hold.
const KEYS_EVERY: Duration = Duration::from_secs(5);
/// Shims a page's tick looks at between two turns of the listener's other tasks.
const YIELD_EVERY: usize = 256;
/// Rows per `fleet` event: a large fleet's first picture goes in parts.
const ROWS_PER_EVENT: usize = 1000;
/// Journal entries a page gets when it opens.
const EVENTS_AT_OPEN: usize = 200;
/// The most state keys a page may pick, and key names it is offered.
const MAX_KEYS: usize = 16;
const MAX_KEY_NAMES: usize = 64;
/// The longest a send waits for answers.
const MAX_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest `POST /api/send` body.
pub const MAX_SEND_BODY: usize = 4096;
/// Sends running at once.
pub const MAX_SENDS: usize = 4;
/// Login attempts a second (and the burst).
pub const LOGINS_PER_SEC: f64 = 5.0;

/// The security headers of the page (and of the login form).
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                   form-action 'self'; base-uri 'none'";

/// An HTML page with the security headers.
fn page(status: StatusCode, html: String) -> Reply {
    let mut r = reply(status, "text/html; charset=utf-8", html);
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The dashboard page.
pub fn index() -> Reply {
    page(StatusCode::OK, INDEX.to_string())
}

/// The login form, with `error` shown above it (status 401: the page is not served).
pub fn login_page(error: Option<&str>) -> Reply {
    let error = error.map_or(String::new(), |e| {
        format!("<p id=\"login-error\" role=\"alert\">{}</p>", escape(e))
    });
    page(
        StatusCode::UNAUTHORIZED,
        LOGIN.replace("<!--ERROR-->", &error),
    )
}

/// Minimal HTML escaping for the one server-made text in the login page.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A compiled-in asset, or `None` for a path that names none.
pub fn asset(path: &str) -> Option<Reply> {
    let (body, ctype) = match path {
        "/assets/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/assets/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "/assets/favicon.svg" | "/favicon.ico" => (FAVICON, "image/svg+xml"),
        _ => return None,
    };
    let mut r = reply(StatusCode::OK, ctype, body.to_string());
    let h = r.headers_mut();
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}

/// What the cookie is derived for: it carries this value's HMAC under the token, never
/// the token itself (a browser sends a host's cookies to its every port), and it stops
/// opening the page when the token changes.
const COOKIE_CONTEXT: &[u8] = b"velium admin dashboard cookie v1";

/// The cookie's value for `token` (hex).
fn cookie_value(token: &Secret) -> String {
    token
        .derive(COOKIE_CONTEXT)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether any `velium_admin` cookie of the request is the one `token` makes (every one
/// is tried: another port of the same host may have set one of that name too).
pub fn cookie_valid(headers: &HeaderMap, token: &Secret) -> bool {
    let want = cookie_value(token);
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(k, _)| *k == COOKIE_NAME)
        .fold(false, |ok, (_, v)| {
            let same: bool = v.as_bytes().ct_eq(want.as_bytes()).into();
            ok | same
        })
}

/// The answer to a right login: the cookie, and back to the page. Without a token (an
/// open listener) the cookie holds nothing of value.
pub fn logged_in(token: Option<&Secret>) -> Reply {
    let value = token.map_or_else(|| "open".to_string(), cookie_value);
    let cookie = format!("{COOKIE_NAME}={value}; Path=/; HttpOnly; SameSite=Strict");
    see_other(Some(cookie))
}

/// The answer to a logout: the cookie cleared, back to the page (now the login form).
pub fn logged_out() -> Reply {
    let cookie = format!("{COOKIE_NAME}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    see_other(Some(cookie))
}

fn see_other(cookie: Option<String>) -> Reply {
    let mut r = text(StatusCode::SEE_OTHER, "see /\n");
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static("/"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(SET_COOKIE, c);
    }
    r
}

/// The `token` field of a login form body.
pub fn form_token(body: &[u8]) -> Vec<u8> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().as_bytes().to_vec())
        .unwrap_or_default()
}

/// What a page asked for: the shims, the keys, the stale time.
struct View {
    /// A target: a pattern, perhaps with filters (`peq.>,class=CLR`).
    pattern: Target,
    pattern_text: String,
    keys: Vec<String>,
    stale: Duration,
}

impl View {
    fn parse(query: &str) -> Result<View, String> {
        let mut view = View {
            pattern: Target::all(),
            pattern_text: String::new(),
            keys: Vec::new(),
            stale: Duration::from_secs(30),
        };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "pattern" if !v.trim().is_empty() => {
                    let p = v.trim();
                    view.pattern = Target::parse(p.as_bytes())
                        .map_err(|e| format!("bad pattern {p:?}: {e}"))?;
                    view.pattern_text = p.to_string();
                }
                "keys" => {
                    for key in v.split([',', ' ']).map(str::trim).filter(|k| !k.is_empty()) {
                        if view.keys.len() >= MAX_KEYS {
                            return Err(format!("at most {MAX_KEYS} keys"));
                        }
                        if !view.keys.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                            view.keys.push(key.to_string());
                        }
                    }
                }
                "stale" if !v.trim().is_empty() => {
                    let s: f64 = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
                        .ok_or_else(|| format!("bad stale time {v:?}: seconds, 0 to 86400"))?;
                    view.stale = Duration::from_secs_f64(s);
                }
                _ => {}
            }
        }
        Ok(view)
    }
}

/// One row of the fleet table, as the page gets it.
#[derive(Serialize)]
struct Row<'a> {
    id: u64,
    identity: &'a str,
    server: &'a str,
    zone: &'a str,
    character: &'a str,
    node: Option<&'a str>,
    since_ms: u64,
    udp: bool,
    tls: bool,
    rtt: Option<String>,
    user: Option<String>,
    set_ms: Option<u64>,
    stale: bool,
    keys: serde_json::Map<String, serde_json::Value>,
}

/// An identity's segments as the page shows them: server, zone, character.
fn segments(identity: &str) -> (&str, &str, &str) {
    let first = identity.find('.');
    let last = identity.rfind('.');
    match (first, last) {
        (Some(f), Some(l)) if f < l => (&identity[..f], &identity[f + 1..l], &identity[l + 1..]),
        (Some(f), _) => (&identity[..f], "", &identity[f + 1..]),
        _ => ("", "", identity),
    }
}

/// The identified shims `pattern` names, copied out of the router (its lock is held
/// for the copy only).
fn matched(hub: &Hub, pattern: &Target) -> Vec<Arc<Shim>> {
    let mut v = Vec::new();
    hub.for_each_selected(pattern, false, |s| {
        if s.is_identified() {
            v.push(s.clone())
        }
    });
    v
}

/// Journal entries as the page's `events`.
fn events_json(entries: &[Entry]) -> Vec<serde_json::Value> {
    entries
        .iter()
        .map(|e| {
            let (kind, identity, text): (&str, Option<&str>, String) = match &e.what {
                Happened::Join { identity, user } => (
                    "join",
                    Some(identity),
                    user.as_deref().unwrap_or("").to_string(),
                ),
                Happened::Rename { from, to } => ("rename", Some(to), from.to_string()),
                Happened::Leave { identity, reason } => {
                    let kind = match reason {
                        crate::hub::shim::CloseReason::SlowConsumer => "slow",
                        _ => "leave",
                    };
                    (kind, Some(identity), reason.to_string())
                }
                Happened::Refused { source, reason } => {
                    ("refused", None, format!("{source}: {reason}"))
                }
                Happened::Rate { identity, reason } => ("rate", Some(identity), reason.clone()),
                Happened::Reload { text, .. } => ("reload", None, text.clone()),
            };
            json!({"seq": e.seq, "at_ms": e.unix_ms, "kind": kind, "identity": identity, "text": text})
        })
        .collect()
}

/// One open page's stream: what it asked for and what it was last sent.
struct Page {
    admin: Rc<Admin>,
    view: View,
    /// Each row sent, by connection serial: its digest.
    sent: HashMap<u64, u64>,
    /// The newest journal entry sent.
    journal: u64,
    samples: broadcast::Receiver<Sample>,
    /// The key names last sent (none before the first).
    key_names: Option<Vec<String>>,
    keys_at: Instant,
    spoke_at: Instant,
    opened: bool,
    /// Parts of the first picture still to send, the next last.
    queued: Vec<String>,
    /// The request's credentials, checked again every tick: a reload that changes the
    /// token ends the streams it opened.
    credentials: HeaderMap,
    /// What the last tick's work took: the next waits at least four times as long, so a
    /// page of a large fleet takes a bounded share of the admin thread.
    work: Duration,
    _slot: StreamSlot,
}

/// Counts a page's stream as open while it lives (when `counted`), and puts its
/// connection back to waiting for a request when the streamed body ends.
struct StreamSlot {
    admin: Rc<Admin>,
    phase: Rc<Cell<super::Phase>>,
    counted: bool,
}

impl StreamSlot {
    /// Marks the connection streaming (no request is read meanwhile, and it is evicted
    /// last) until the slot is dropped with the body.
    fn new(admin: &Rc<Admin>, phase: &Rc<Cell<super::Phase>>, counted: bool) -> StreamSlot {
        if counted {
            admin.streams.set(admin.streams.get() + 1);
        }
        phase.set(super::Phase::Streaming);
        StreamSlot {
            admin: admin.clone(),
            phase: phase.clone(),
            counted,
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.counted {
            let open = &self.admin.streams;
            open.set(open.get().saturating_sub(1));
        }
        if let super::Phase::Streaming = self.phase.get() {
            self.phase
                .set(super::Phase::waiting(tokio::time::Instant::now()));
        }
    }
}

/// An SSE event.
fn event(name: &str, data: &impl Serialize) -> String {
    let json = serde_json::to_string(data).unwrap_or_else(|_| "null".into());
    format!("event: {name}\ndata: {json}\n\n")
}

/// `fleet` events carrying `rows` (each a row's JSON, made once) and `removed`, in
/// parts of [`ROWS_PER_EVENT`] rows.
fn fleet_events(reset: bool, rows: &[String], removed: &[u64], matched: usize) -> Vec<String> {
    let one = |reset: bool, part: &[String], remove: &[u64]| {
        let remove = serde_json::to_string(remove).unwrap_or_else(|_| "[]".into());
        format!(
            "event: fleet\ndata: {{\"reset\":{reset},\"upsert\":[{}],\"remove\":{remove},\"matched\":{matched}}}\n\n",
            part.join(",")
        )
    };
    let mut parts: Vec<String> = rows
        .chunks(ROWS_PER_EVENT)
        .enumerate()
        .map(|(i, part)| match i {
            0 => one(reset, part, removed),
            _ => one(false, part, &[]),
        })
        .collect();
    if parts.is_empty() && (reset || !removed.is_empty()) {
        parts.push(one(reset, &[], removed));
    }
    parts
}

impl Page {
    /// The next bytes of the stream: the first picture, then changes every tick; `None`
    /// ends it (the credentials it was opened with no longer hold).
    async fn next(&mut self) -> Option<Bytes> {
        if !self.opened {
            self.opened = true;
            return Some(Bytes::from(self.open().await));
        }
        if let Some(part) = self.queued.pop() {
            return Some(Bytes::from(part));
        }
        loop {
            tokio::time::sleep(TICK.max(self.work * 4)).await;
            self.admin.authorized(&self.credentials)?;
            let started = Instant::now();
            let out = self.tick().await;
            self.work = started.elapsed();
            if !out.is_empty() {
                self.spoke_at = Instant::now();
                return Some(Bytes::from(out));
            }
            if self.spoke_at.elapsed() >= PING_EVERY {
                self.spoke_at = Instant::now();
                return Some(Bytes::from_static(b": ping\n\n"));
            }
        }
    }

    /// The first picture: hello, every row (in parts), recent events, the history.
    async fn open(&mut self) -> String {
        let hub = self.admin.hub.clone();
        let mut o = event(
            "hello",
            &json!({
                "node": hub.cluster().map(|c| &*c.node),
                "version": env!("CARGO_PKG_VERSION"),
                "tick_ms": TICK.as_millis() as u64,
                "stale_s": self.view.stale.as_secs_f64(),
                "pattern": self.view.pattern_text,
                "keys": self.view.keys,
            }),
        );
        let (rows, removed, matched) = self.diff().await;
        let mut parts = fleet_events(true, &rows, &removed, matched);
        o.push_str(&parts.remove(0));
        parts.reverse();
        self.queued = parts;
        let entries = hub.journal.since(0, EVENTS_AT_OPEN);
        self.journal = entries.last().map_or(0, |e| e.seq);
        o.push_str(&event("events", &events_json(&entries)));
        let history: Vec<Sample> = self
            .admin
            .history
            .borrow()
            .samples
            .iter()
            .cloned()
            .collect();
        o.push_str(&event("stats", &json!({ "history": history })));
        o.push_str(&self.key_names_event().await.unwrap_or_default());
        o
    }

    /// What changed since the last tick.
    async fn tick(&mut self) -> String {
        let (rows, removed, matched) = self.diff().await;
        let mut o = fleet_events(false, &rows, &removed, matched).concat();
        let journal = &self.admin.hub.journal;
        if journal.last() > self.journal {
            let entries = journal.since(self.journal, crate::hub::journal::CAPACITY);
            if let Some(e) = entries.last() {
                self.journal = e.seq;
                o.push_str(&event("events", &events_json(&entries)));
            }
        }
        loop {
            match self.samples.try_recv() {
                Ok(s) => o.push_str(&event("stats", &json!({ "sample": s }))),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
        if self.keys_at.elapsed() >= KEYS_EVERY {
            o.push_str(&self.key_names_event().await.unwrap_or_default());
        }
        o
    }

    /// The rows that changed since the last call, the ids gone, and how many match. It
    /// yields to the listener's other tasks every [`YIELD_EVERY`] shims, so that a page of
    /// a large fleet never keeps `/healthz` or a scrape waiting for more than a moment.
    async fn diff(&mut self) -> (Vec<String>, Vec<u64>, usize) {
        let hub = self.admin.hub.clone();
        let now_ms = hub.ms(Instant::now());
        let stale_ms = self.view.stale.as_millis() as u64;
        let shims = matched(&hub, &self.view.pattern);
        let mut next = HashMap::with_capacity(shims.len());
        let mut rows = Vec::new();
        for (i, s) in shims.iter().enumerate() {
            if i > 0 && i % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            let identity = s.identity();
            let mark = hub.state_mark(s);
            let remote = hub.remote_of(s);
            let (node, udp, user) = match &remote {
                Some(r) => (
                    Some(r.node.clone()),
                    r.udp.load(Ordering::Relaxed),
                    r.user.as_deref().map(str::to_string),
                ),
                None => (
                    hub.cluster().map(|c| c.node.clone()),
                    s.udp_addr().is_some(),
                    s.user().map(|u| u.name.to_string()),
                ),
            };
            let stale =
                stale_ms > 0 && mark.is_some_and(|(_, set)| now_ms.saturating_sub(set) > stale_ms);
            let mut h = DefaultHasher::new();
            (
                &*identity,
                udp,
                s.is_tls(),
                &user,
                mark.map(|m| m.0),
                stale,
                &node,
            )
                .hash(&mut h);
            let digest = h.finish();
            next.insert(s.serial, digest);
            if self.sent.get(&s.serial) == Some(&digest) {
                continue;
            }
            let mut keys = serde_json::Map::new();
            for k in &self.view.keys {
                keys.insert(k.clone(), serde_json::Value::Null);
            }
            let mut rtt = None;
            hub.state_items(s, |key, value, _| {
                let value = || String::from_utf8_lossy(value).into_owned();
                if key.eq_ignore_ascii_case("rtt") {
                    rtt = Some(value());
                }
                if let Some(k) = self.view.keys.iter().find(|k| k.eq_ignore_ascii_case(key)) {
                    keys.insert(k.clone(), serde_json::Value::String(value()));
                }
            });
            let (server, zone, character) = segments(&identity);
            let row = Row {
                id: s.serial,
                identity: &identity,
                server,
                zone,
                character,
                node: node.as_deref(),
                since_ms: s.connected_unix_ms,
                udp,
                tls: s.is_tls(),
                rtt,
                user,
                set_ms: mark.map(|(_, set)| hub.unix_us(set) / 1000),
                stale,
                keys,
            };
            if let Ok(json) = serde_json::to_string(&row) {
                rows.push(json);
            }
        }
        let removed = (self.sent.keys())
            .filter(|id| !next.contains_key(id))
            .copied()
            .collect();
        self.sent = next;
        (rows, removed, shims.len())
    }

    /// The state key names the matched shims hold: at open, then when they changed.
    async fn key_names_event(&mut self) -> Option<String> {
        self.keys_at = Instant::now();
        let hub = self.admin.hub.clone();
        let mut names = BTreeSet::new();
        for (i, s) in matched(&hub, &self.view.pattern).iter().enumerate() {
            if i > 0 && i % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            hub.state_items(s, |k, _, _| {
                if names.len() < MAX_KEY_NAMES {
                    names.insert(k.to_ascii_lowercase());
                }
            });
            if names.len() >= MAX_KEY_NAMES {
                break;
            }
        }
        let names: Vec<String> = names.into_iter().collect();
        if self.key_names.as_ref() == Some(&names) {
            return None;
        }
        let e = event("keys", &names);
        self.key_names = Some(names);
        Some(e)
    }
}

/// `GET /api/stream`: the page's Server-Sent Events, or why not.
pub fn stream(
    admin: &Rc<Admin>,
    query: &str,
    headers: &HeaderMap,
    phase: &Rc<Cell<super::Phase>>,
) -> Result<Reply, Refusal> {
    let limit = admin.stream_limit();
    if admin.streams.get() >= limit {
        return Err(Refusal::Streams);
    }
    let body = match View::parse(query) {
        Ok(view) => {
            let mut credentials = HeaderMap::new();
            for name in [hyper::header::AUTHORIZATION, COOKIE] {
                for v in headers.get_all(&name) {
                    credentials.append(name.clone(), v.clone());
                }
            }
            let page = Page {
                credentials,
                work: Duration::ZERO,
                admin: admin.clone(),
                view,
                sent: HashMap::new(),
                journal: 0,
                samples: admin.samples.subscribe(),
                key_names: None,
                keys_at: Instant::now(),
                spoke_at: Instant::now(),
                opened: false,
                queued: Vec::new(),
                _slot: StreamSlot::new(admin, phase, true),
            };
            let frames = stream::unfold(page, |mut page| async move {
                let bytes = page.next().await?;
                Some((Ok::<_, Infallible>(Frame::data(bytes)), page))
            });
            local(StreamBody::new(frames))
        }
        // The page shows the problem and waits for a new filter: an EventSource that is
        // answered with an error status would only retry.
        Err(message) => {
            let once = event("problem", &json!({ "message": message }));
            local(http_body_util::Full::new(Bytes::from(once)))
        }
    };
    let mut r = hyper::Response::new(body);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// A send from the page.
#[derive(Deserialize)]
struct SendRequest {
    kind: String,
    target: String,
    text: String,
    timeout_ms: Option<u64>,
    identity: Option<String>,
    user: Option<String>,
    secret: Option<String>,
}

/// Where the send box connects: the hub's own port, on loopback when it listens on every
/// address.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// `POST /api/send`: the answers as NDJSON lines, streamed as they arrive.
pub fn send(
    admin: &Rc<Admin>,
    headers: &HeaderMap,
    body: &[u8],
    phase: &Rc<Cell<super::Phase>>,
) -> Reply {
    if headers.get(SEND_HEADER).is_none() {
        return text(
            StatusCode::FORBIDDEN,
            format!("a send needs the header {SEND_HEADER}: 1 (the dashboard sets it)\n"),
        );
    }
    let req: SendRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad send request: {e}\n")),
    };
    let command = match req.kind.as_str() {
        "command" => true,
        "echo" => false,
        k => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("bad kind {k:?}: command or echo\n"),
            );
        }
    };
    if admin.sends.get() >= MAX_SENDS {
        return closing(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_SENDS} sends already running; try again when one is done\n"),
        ));
    }
    admin.sends.set(admin.sends.get() + 1);
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let hub = admin.hub.clone();
    let addr = loopback(admin.hub_addr);
    let running = Running(admin.clone());
    tokio::task::spawn_local(async move {
        let _running = running;
        let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(5000)).min(MAX_SEND_TIMEOUT);
        let line = |v: serde_json::Value| format!("{v}\n");
        // A page that goes away ends the send at once (its slot is free again).
        let run = run_send(&hub, addr, &req, command, timeout, &tx);
        let outcome = tokio::select! {
            r = run => r,
            _ = tx.closed() => return,
        };
        let done = match outcome {
            Ok(done) => done,
            Err(e) => {
                let _ = tx
                    .send(line(json!({"type": "error", "message": e.to_string()})))
                    .await;
                json!({"type": "done", "reached": 0, "answered": 0, "missing": []})
            }
        };
        let _ = tx.send(line(done)).await;
    });
    // The answers come for as long as the send's timeout: the connection is streaming
    // meanwhile, like a page's.
    let slot = StreamSlot::new(admin, phase, false);
    let lines = stream::unfold((rx, slot), |(mut rx, slot)| async move {
        let l = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(l))), (rx, slot)))
    });
    let mut r = hyper::Response::new(local(StreamBody::new(lines)));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Counts a running send.
struct Running(Rc<Admin>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.sends.set(self.0.sends.get().saturating_sub(1));
    }
}

/// Connects, sends, and passes on each answer; returns the `done` line.
async fn run_send(
    hub: &Hub,
    addr: SocketAddr,
    req: &SendRequest,
    command: bool,
    timeout: Duration,
    tx: &tokio::sync::mpsc::Sender<String>,
) -> Result<serde_json::Value, ClientError> {
    let identity = match req.identity.as_deref().map(str::trim) {
        Some(i) if !i.is_empty() => i.to_string(),
        _ => format!("velium.dashboard.{:06x}", rand::random::<u32>() & 0xFF_FFFF),
    };
    let nonempty = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let config = hub.config();
    // A port that serves only TLS is reached over TLS too. The connection goes to this
    // hub's own listening socket over loopback, so its certificate is not checked (it
    // may name a host name only).
    let tls = config
        .tls
        .as_ref()
        .filter(|t| !t.optional)
        .map(|_| TlsOptions {
            insecure: true,
            ..TlsOptions::default()
        });
    drop(config);
    let options = ClientOptions {
        keepalive: None,
        user: nonempty(&req.user),
        secret: nonempty(&req.secret).map(String::into_bytes),
        tls,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(addr, &identity, options).await?;
    let line = |v: serde_json::Value| format!("{v}\n");
    let started = Instant::now();
    if !command {
        let reached = client.echo(&req.target, &req.text).await;
        let _ = client.close().await;
        let reached = reached?;
        let _ = tx
            .send(line(json!({"type": "sent", "reached": reached})))
            .await;
        return Ok(json!({"type": "done", "reached": reached, "answered": 0, "missing": []}));
    }
    let sent = client.command(&req.target, &req.text).await?;
    let _ = tx
        .send(line(json!({"type": "sent", "reached": sent.reached})))
        .await;
    let deadline = started + timeout;
    let mut answered: BTreeSet<String> = BTreeSet::new();
    let mut closed = false;
    while answered.len() < sent.reached {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_response(sent.id, left).await {
            Ok(r) => {
                answered.insert(r.from.to_ascii_lowercase());
                let ms = started.elapsed().as_millis() as u64;
                let answer = json!({"type": "answer", "from": &*r.from, "text": r.text, "ms": ms});
                if tx.send(line(answer)).await.is_err() {
                    break;
                }
            }
            Err(ClientError::Closed) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let mut missing = Vec::new();
    if answered.len() < sent.reached && !closed {
        let me = client.identity().to_ascii_lowercase();
        if let Ok(entries) = client.who(Some(&req.target)).await {
            missing = entries
                .iter()
                .map(|e| e.identity.to_string())
                .filter(|i| {
                    let key = i.to_ascii_lowercase();
                    key != me && !answered.contains(&key)
                })
                .collect();
            missing.sort();
        }
    }
    if !closed {
        let _ = client.close().await;
    }
    Ok(
        json!({"type": "done", "reached": sent.reached, "answered": answered.len(), "missing": missing}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_split_into_server_zone_character() {
        assert_eq!(segments("peq.ecommons.bob"), ("peq", "ecommons", "bob"));
        assert_eq!(segments("peq.a.b.bob"), ("peq", "a.b", "bob"));
        assert_eq!(segments("peq.bob"), ("peq", "", "bob"));
        assert_eq!(segments("bob"), ("", "", "bob"));
    }

    #[test]
    fn a_view_reads_pattern_keys_and_stale_time() {
        let v = View::parse("pattern=peq.*.%3E&keys=hp,mana,HP&stale=2.5").unwrap();
        assert_eq!(v.pattern_text, "peq.*.>");
        assert_eq!(v.keys, ["hp", "mana"]);
        assert_eq!(v.stale, Duration::from_millis(2500));
        assert!(View::parse("pattern=a.%3E.b").is_err());
        assert!(View::parse("stale=-1").is_err());
        let many: Vec<String> = (0..17).map(|i| format!("k{i}")).collect();
        assert!(View::parse(&format!("keys={}", many.join(","))).is_err());
    }

    #[test]
    fn the_cookie_opens_for_its_token_only_and_never_holds_it() {
        let token = Secret::new(b"a b;c=d");
        let r = logged_in(Some(&token));
        let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(!set.contains("a b;c=d") && !set.contains("a+b"));
        let pair = set.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        // A cookie of the same name set by another port comes first: still valid.
        let value = format!("{COOKIE_NAME}=tossed; x=1; {pair}");
        h.insert(COOKIE, HeaderValue::from_str(&value).unwrap());
        assert!(cookie_valid(&h, &token));
        assert!(!cookie_valid(&h, &Secret::new(b"another token")));
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("velium_admin=open"));
        assert!(!cookie_valid(&h, &token));
    }
}
