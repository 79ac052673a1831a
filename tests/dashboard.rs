//! The live web dashboard of the admin listener (the contract: routes `/`, `/login`,
//! `/logout`, `/assets/*`, `/api/stream` (Server-Sent Events) and `/api/send`, and the
//! DOM ids and attributes of the page).
//!
//! - plain HTTP: the assets and their content types, the security headers of the page, the
//!   login form and its cookie, the send API's header rule, the first events of a stream;
//! - in a headless Chromium (tests/common/browser.rs): logging in, the fleet table and its
//!   counts, live joins, leaves and state changes, stale rows, the filter (a bad pattern
//!   too), sorting, the theme, and the send box reaching real shims.
//!
//! Each test runs a real server with the admin listener on an ephemeral port of 127.0.0.1
//! and real shims (the crate's client library), and waits on what the page shows (polled
//! every 50 ms up to 15 s), never for a fixed time. Screenshots of the main steps go to
//! target/dashboard-screenshots/.

#[path = "common/browser.rs"]
mod browser;
mod common;

use browser::Browser;
use common::*;
use serde_json::{Value as Json, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use velium_server::client::{Client, Event};

/// The admin token of every test's server.
const TOKEN: &str = "dash-s3cret-token";

// ---------------------------------------------------------------------------------------
// Helpers

/// A tokio runtime for one test: the browser client and the shims run on it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `text` percent-encoded for a `data:` URL.
fn data_url(html: &str) -> String {
    let mut s = String::from("data:text/html;charset=utf-8,");
    for b in html.bytes() {
        if b.is_ascii_alphanumeric() {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// A one-page HTTP server on 127.0.0.1 that answers every request with an HTML page
/// showing the request's `Cookie` and `X-Test` headers in `#cookie` and `#header`.
fn echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let (mut cookie, mut header) = (String::new(), String::new());
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap_or((&line, ""));
                match k.to_ascii_lowercase().as_str() {
                    "cookie" => cookie = v.trim().to_string(),
                    "x-test" => header = v.trim().to_string(),
                    _ => {}
                }
            }
            let body = format!("<!doctype html><p id=cookie>{cookie}</p><p id=header>{header}</p>");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/")
}

/// The admin listener's base URL.
fn base(srv: &Server) -> String {
    format!("http://{}", srv.admin.expect("started with --admin"))
}

/// A server with the admin listener and the admin token [`TOKEN`] (from a file, kept with
/// it).
fn dashboard_server(io: &str) -> (Server, TempFile) {
    let token = TempFile::new("admin.token", &format!("{TOKEN}\n"));
    let srv = Server::with_admin(io, &["--admin-token-file", token.arg()]);
    (srv, token)
}

/// The `Authorization` header of a request with the token.
fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

// --- plain HTTP -----------------------------------------------------------------------

/// Reads an HTTP/1.1 body in the chunked transfer coding as a plain stream.
struct Chunked<R> {
    r: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            // The CRLF that ends the previous chunk's data, then the size line.
            while line.trim().is_empty() {
                line.clear();
                if self.r.read_line(&mut line)? == 0 {
                    self.done = true;
                    return Ok(0);
                }
            }
            let size = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("chunk {line:?}"))
            })?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let n = buf.len().min(self.left);
        let got = self.r.read(&mut buf[..n])?;
        self.left -= got;
        Ok(got)
    }
}

/// A response whose body is still to be read.
struct Response {
    status: u16,
    head: Vec<(String, String)>,
    body: Box<dyn BufRead + Send>,
}

impl Response {
    /// The values of every header `name` (any case).
    fn headers(&self, name: &str) -> Vec<&str> {
        self.head
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of header `name`, which must be there once.
    fn header(&self, name: &str) -> &str {
        let v = self.headers(name);
        assert_eq!(v.len(), 1, "header {name} once in {:?}", self.head);
        v[0]
    }

    /// The whole body, as text.
    fn text(mut self) -> (u16, Vec<(String, String)>, String) {
        let mut body = String::new();
        self.body.read_to_string(&mut body).expect("the body");
        (self.status, self.head, body)
    }
}

/// Sends one request (with `Connection: close`) to the admin listener and reads its head.
fn request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    let s = TcpStream::connect(admin).expect("connect to the admin listener");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    (&s).write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("a status line");
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "closed within the head"
        );
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').expect("a header line");
        head.push((k.to_string(), v.trim().to_string()));
    }
    let mut resp = Response {
        status,
        head,
        body: Box::new(std::io::empty()),
    };
    let chunked = resp
        .headers("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"));
    let len = resp
        .headers("content-length")
        .first()
        .map(|v| v.parse::<u64>().expect("Content-Length"));
    resp.body = if chunked {
        Box::new(BufReader::new(Chunked {
            r,
            left: 0,
            done: false,
        }))
    } else if let Some(len) = len {
        Box::new(r.take(len))
    } else {
        Box::new(r)
    };
    resp
}

/// `GET path` with these headers: (status, head, body).
fn get(srv: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, String) {
    request(srv.admin.unwrap(), "GET", path, headers, "").text()
}

/// The values of header `name` in `head`.
fn header<'a>(head: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    head.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// A Server-Sent Events stream being read.
struct Sse {
    body: Box<dyn BufRead + Send>,
}

impl Sse {
    /// Opens `/api/stream?QUERY` with the token.
    fn open(srv: &Server, query: &str) -> Sse {
        let (k, v) = bearer();
        let r = request(
            srv.admin.unwrap(),
            "GET",
            &format!("/api/stream{query}"),
            &[(k, &v)],
            "",
        );
        assert_eq!(r.status, 200, "{:?}", r.head);
        let ctype = r.header("content-type");
        assert!(ctype.starts_with("text/event-stream"), "{ctype}");
        Sse { body: r.body }
    }

    /// The next event, as (name, data); `None` at the end of the stream. Comments (`: ping`)
    /// are skipped.
    fn next(&mut self) -> Option<(String, Json)> {
        let (mut name, mut data) = (None::<String>, None::<String>);
        loop {
            let mut line = String::new();
            let n = self.body.read_line(&mut line).expect("an SSE line in time");
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if name.is_none() && data.is_none() {
                    continue;
                }
                let data = data.unwrap_or_default();
                let json = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data:?}"));
                return Some((name.unwrap_or_else(|| "message".into()), json));
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => name = Some(value.to_string()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                _ => {}
            }
        }
    }

    /// Reads events until one named `name` that `ok` accepts; returns its data.
    fn until(&mut self, name: &str, what: &str, ok: impl Fn(&Json) -> bool) -> Json {
        let end = Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        while Instant::now() < end {
            let Some((n, data)) = self.next() else {
                panic!("the stream ended before {what}; events: {seen:#?}");
            };
            if n == name && ok(&data) {
                return data;
            }
            seen.push((n, data));
        }
        panic!("no {what} within {DEADLINE:?}; events: {seen:#?}");
    }
}

// --- shims ----------------------------------------------------------------------------

/// A shim that answers every Command with `ok from NAME`, and reports what it got
/// (`command TEXT`, `echo TEXT`).
struct Shim {
    got: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Shim {
    async fn start(srv: &Server, name: &str) -> Shim {
        let client = Arc::new(
            Client::connect(srv.addr, name)
                .await
                .unwrap_or_else(|e| panic!("shim {name}: {e}")),
        );
        let (tx, got) = mpsc::unbounded_channel();
        let c = client.clone();
        let answer = format!("ok from {name}");
        let task = tokio::spawn(async move {
            while let Some(e) = c.next_event().await {
                match e {
                    Event::Command { id, text, .. } => {
                        let _ = tx.send(format!("command {text}"));
                        let _ = c.respond(id, &answer).await;
                    }
                    Event::Echo { text, .. } => {
                        let _ = tx.send(format!("echo {text}"));
                    }
                    _ => {}
                }
            }
        });
        Shim { got, task }
    }

    /// The next thing it got, within the deadline.
    async fn next(&mut self) -> String {
        tokio::time::timeout(browser::WAIT, self.got.recv())
            .await
            .expect("the shim got nothing in time")
            .expect("the shim's connection ended")
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects a shim that only holds its connection.
async fn plain_shim(srv: &Server, name: &str) -> Client {
    Client::connect(srv.addr, name)
        .await
        .unwrap_or_else(|e| panic!("shim {name}: {e}"))
}

// --- the page -------------------------------------------------------------------------

/// The fleet table's row for `identity`.
fn row(identity: &str) -> String {
    format!("#fleet tr[data-identity=\"{identity}\"]")
}

/// The cell of column `col` in `identity`'s row.
fn cell(identity: &str, col: &str) -> String {
    format!("{} td[data-col=\"{col}\"]", row(identity))
}

/// The identities of the fleet table's rows, in their order.
const ROWS: &str = "return [...document.querySelectorAll('#fleet tbody tr[data-identity]')]
    .map(r => r.dataset.identity)";

/// Waits until the table holds exactly `want` (any order).
async fn wait_rows(b: &Browser, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    b.wait_value(&format!("the rows {want:?}"), ROWS, vec![], |v| {
        let mut got: Vec<String> = serde_json::from_value(v.clone()).unwrap_or_default();
        got.sort();
        got == want
    })
    .await;
}

/// Waits until the page's stream is open: `#live[data-state=live]` reading "live".
async fn wait_live(b: &Browser) {
    b.wait_present("#live[data-state=\"live\"]").await;
    b.wait_text_is("#live", "live").await;
}

/// Waits until the event log has an entry of `kind` whose text holds every one of
/// `needles`.
async fn wait_event(b: &Browser, kind: &str, needles: &[&str]) {
    b.wait_js(
        &format!("a {kind} event with {needles:?}"),
        "return [...document.querySelectorAll(arguments[0])]
            .some(li => arguments[1].every(n => li.innerText.includes(n)))",
        vec![
            json!(format!("#events li[data-kind=\"{kind}\"]")),
            json!(needles),
        ],
    )
    .await;
}

/// The page's theme, `document.documentElement.dataset.theme` (null when unset).
async fn theme(b: &Browser) -> Json {
    b.js(
        "return document.documentElement.dataset.theme ?? null",
        vec![],
    )
    .await
}

/// Clicks `#theme` and waits until the theme is another one of `light` and `dark`.
async fn toggle_theme(b: &Browser) -> String {
    let before = theme(b).await;
    b.click("button#theme").await;
    let now = b
        .wait_value(
            &format!("a theme other than {before}"),
            "return document.documentElement.dataset.theme ?? null",
            vec![],
            |t| *t != before && (t == "light" || t == "dark"),
        )
        .await;
    now.as_str().unwrap().to_string()
}

/// Asserts the page reported no script error (nor a CSP violation).
async fn no_script_errors(b: &Browser) {
    let errors = b.script_errors().await;
    assert!(errors.is_empty(), "the page's script errors: {errors:#?}");
}

/// The value of the login cookie the hub sets for the right token.
fn login_cookie(srv: &Server) -> String {
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, head, body) = request(
        srv.admin.unwrap(),
        "POST",
        "/login",
        &form,
        &format!("token={TOKEN}"),
    )
    .text();
    assert_eq!(status, 303, "{body}");
    let set = header(&head, "set-cookie");
    let pair = set[0].split(';').next().expect("a cookie");
    pair.strip_prefix("velium_admin=")
        .expect("the login cookie")
        .to_string()
}

/// Opens the dashboard with the login cookie set, and waits until it is live.
async fn open_with_cookie(b: &Browser, srv: &Server) {
    b.goto(&base(srv)).await;
    b.wait_present("form#login").await;
    b.set_cookie("velium_admin", &login_cookie(srv)).await;
    b.goto(&base(srv)).await;
    wait_live(b).await;
}

// ---------------------------------------------------------------------------------------
// Plain HTTP
// ---------------------------------------------------------------------------------------

/// The assets need no token and come with their types; the page and the login form carry
/// a Content-Security-Policy that allows scripts from the listener only, and the page's
/// scripts and styles are those assets (no inline script, nothing from elsewhere).
#[test]
fn assets_have_their_types_and_the_page_a_csp() {
    let (srv, _token) = dashboard_server("epoll");
    for (path, types) in [
        (
            "/assets/app.js",
            &["text/javascript", "application/javascript"][..],
        ),
        ("/assets/app.css", &["text/css"][..]),
        ("/assets/favicon.svg", &["image/svg+xml"][..]),
    ] {
        let (status, head, body) = get(&srv, path, &[]);
        assert_eq!(status, 200, "{path}: {body}");
        let ctype = header(&head, "content-type");
        assert!(
            ctype.len() == 1 && types.iter().any(|t| ctype[0].starts_with(t)),
            "{path}: Content-Type {ctype:?}, want one of {types:?}"
        );
        assert!(body.len() > 100, "{path} is {} bytes", body.len());
    }

    let csp_ok = |what: &str, head: &[(String, String)]| {
        let csp = header(head, "content-security-policy");
        assert_eq!(csp.len(), 1, "{what}: one CSP header in {head:?}");
        let directives: Vec<&str> = csp[0].split(';').map(str::trim).collect();
        let script = directives
            .iter()
            .find(|d| d.starts_with("script-src "))
            .or_else(|| directives.iter().find(|d| d.starts_with("default-src ")))
            .unwrap_or_else(|| panic!("{what}: no script-src nor default-src in {csp:?}"));
        assert!(script.contains("'self'"), "{what}: {script}");
        for bad in [
            "'unsafe-inline'",
            "'unsafe-eval'",
            "*",
            "http:",
            "https:",
            "data:",
        ] {
            assert!(
                !script.split_whitespace().any(|s| s == bad),
                "{what}: {script} allows {bad}"
            );
        }
    };
    let (k, v) = bearer();
    let (status, head, page) = get(&srv, "/", &[(k, &v)]);
    assert_eq!(status, 200, "{page}");
    assert!(
        header(&head, "content-type")[0].starts_with("text/html"),
        "{head:?}"
    );
    csp_ok("the page", &head);
    for asset in ["/assets/app.js", "/assets/app.css"] {
        assert!(page.contains(asset), "the page does not load {asset}");
    }
    // Every script tag loads a file of the listener.
    for tag in page.split("<script").skip(1) {
        let open = tag.split('>').next().unwrap();
        assert!(
            open.contains("src=\"/assets/"),
            "a script that is not an asset: <script{open}>"
        );
    }
    for outside in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
        assert!(
            !page.contains(outside),
            "the page loads from elsewhere: {outside}"
        );
    }

    let (status, head, login) = get(&srv, "/", &[]);
    assert_eq!(status, 401);
    assert!(
        header(&head, "content-type")[0].starts_with("text/html"),
        "{head:?}"
    );
    csp_ok("the login page", &head);
    assert!(login.contains("id=\"login\""), "{login}");
}

/// POST /login with the right token answers 303 to `/` and sets the cookie HttpOnly and
/// SameSite=Strict; the cookie then opens the page and the stream; a wrong token gets
/// the login form with "wrong token"; without a token the stream is refused; logout
/// clears the cookie.
#[test]
fn login_sets_an_http_only_strict_cookie() {
    let (srv, _token) = dashboard_server("epoll");
    let admin = srv.admin.unwrap();
    let form = [("Content-Type", "application/x-www-form-urlencoded")];

    let (status, head, body) =
        request(admin, "POST", "/login", &form, &format!("token={TOKEN}")).text();
    assert_eq!(status, 303, "{body}");
    assert_eq!(header(&head, "location"), ["/"]);
    let cookies = header(&head, "set-cookie");
    assert_eq!(cookies.len(), 1, "{head:?}");
    let parts: Vec<&str> = cookies[0].split(';').map(str::trim).collect();
    // The cookie carries a value derived from the token (an HMAC), never the token.
    let value = parts[0]
        .strip_prefix("velium_admin=")
        .expect("the cookie's name");
    assert!(!value.contains(TOKEN), "{cookies:?}");
    assert!(
        value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()),
        "{cookies:?}"
    );
    for want in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(
            parts.iter().any(|p| p.eq_ignore_ascii_case(want)),
            "{want} missing from {cookies:?}"
        );
    }

    // The cookie opens the page and the stream; no cookie, a wrong one: the login form.
    let good = format!("velium_admin={value}");
    let (status, _, page) = get(&srv, "/", &[("Cookie", &good)]);
    assert_eq!(status, 200);
    assert!(page.contains("id=\"fleet\""), "not the dashboard: {page}");
    let r = request(admin, "GET", "/api/stream", &[("Cookie", &good)], "");
    assert_eq!(r.status, 200, "{:?}", r.head);
    drop(r);
    for cookie in ["", "velium_admin=wrong"] {
        let h: &[(&str, &str)] = if cookie.is_empty() {
            &[]
        } else {
            &[("Cookie", cookie)]
        };
        let (status, _, page) = get(&srv, "/", h);
        assert_eq!(status, 401, "cookie {cookie:?}");
        assert!(page.contains("id=\"login\""), "{page}");
        assert!(
            !page.contains("login-error"),
            "an error before any try: {page}"
        );
        assert!(
            !page.contains("<!--ERROR-->"),
            "the placeholder left in: {page}"
        );
        let (status, _, _) = get(&srv, "/api/stream", h);
        assert_eq!(status, 401, "the stream with cookie {cookie:?}");
    }

    let (status, head, page) = request(admin, "POST", "/login", &form, "token=wrong").text();
    assert_eq!(status, 401);
    assert!(header(&head, "set-cookie").is_empty(), "{head:?}");
    assert!(
        page.contains(r#"<p id="login-error" role="alert">wrong token</p>"#),
        "{page}"
    );
    assert!(page.contains("id=\"login\""), "{page}");

    let (status, head, _) = request(admin, "POST", "/logout", &[("Cookie", &good)], "").text();
    assert_eq!(status, 303);
    assert_eq!(header(&head, "location"), ["/"]);
    let cleared = header(&head, "set-cookie");
    assert!(
        cleared.len() == 1
            && cleared[0].starts_with("velium_admin=;")
            && (cleared[0].contains("Max-Age=0") || cleared[0].contains("Expires=")),
        "not a cleared cookie: {cleared:?}"
    );
}

/// POST /api/send needs the token and the `X-Velium-Dashboard` header (403 without it,
/// so that a form of another site cannot send); with both, a Command's answers stream
/// back as NDJSON lines: sent, each answer, done.
#[test]
fn the_send_api_needs_the_dashboard_header() {
    let (srv, _token) = dashboard_server("epoll");
    let admin = srv.admin.unwrap();
    let rt = runtime();
    let _bob = rt.block_on(Shim::start(&srv, "peq.ecommons.bob"));
    let body = json!({"kind": "command", "target": "peq.ecommons.bob", "text": "/sit",
                      "timeout_ms": 5000, "identity": null, "user": null, "secret": null})
    .to_string();
    let (k, v) = bearer();
    let json_type = ("Content-Type", "application/json");

    let (status, _, text) =
        request(admin, "POST", "/api/send", &[(k, &v), json_type], &body).text();
    assert_eq!(status, 403, "without X-Velium-Dashboard: {text}");
    let (status, _, text) = request(
        admin,
        "POST",
        "/api/send",
        &[("X-Velium-Dashboard", "1"), json_type],
        &body,
    )
    .text();
    assert_eq!(status, 401, "without the token: {text}");

    let r = request(
        admin,
        "POST",
        "/api/send",
        &[(k, &v), ("X-Velium-Dashboard", "1"), json_type],
        &body,
    );
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").starts_with("application/x-ndjson"));
    let (_, _, text) = r.text();
    let lines: Vec<Json> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], json!({"type": "sent", "reached": 1}), "{text}");
    assert_eq!(lines[1]["type"], "answer", "{text}");
    assert_eq!(lines[1]["from"], "peq.ecommons.bob", "{text}");
    assert_eq!(lines[1]["text"], "ok from peq.ecommons.bob", "{text}");
    assert!(lines[1]["ms"].is_u64(), "{text}");
    assert_eq!(
        lines[2],
        json!({"type": "done", "reached": 1, "answered": 1, "missing": []}),
        "{text}"
    );
}

/// A stream starts with `hello`, then a `fleet` reset listing the matched shims with
/// their cells and keys; `events`, `stats` and `keys` follow; a join and a leave come as
/// fleet upserts and removals. A bad pattern gets `problem` and the end of the stream.
#[test]
fn the_stream_starts_with_hello_and_a_fleet_reset() {
    let (srv, _token) = dashboard_server("uring");
    let rt = runtime();
    let (bob, _dave) = rt.block_on(async {
        let bob = plain_shim(&srv, "peq.ecommons.bob").await;
        bob.set_state(&[("hp", Some("4500/5000")), ("mana", Some("10/20"))])
            .await
            .unwrap();
        let dave = plain_shim(&srv, "test.gfaydark.dave").await;
        (bob, dave)
    });
    let started = unix_ms();
    let mut sse = Sse::open(&srv, "?keys=hp,level");
    let (name, hello) = sse.next().expect("a first event");
    assert_eq!(name, "hello", "{hello}");
    assert_eq!(hello["node"], Json::Null, "{hello}");
    assert_eq!(hello["version"], env!("CARGO_PKG_VERSION"), "{hello}");
    assert!(hello["tick_ms"].as_u64().is_some_and(|t| t > 0), "{hello}");
    // A number of seconds (JSON does not tell 30 from 30.0).
    assert_eq!(hello["stale_s"].as_f64(), Some(30.0), "{hello}");
    assert_eq!(hello["keys"], json!(["hp", "level"]), "{hello}");
    assert!(hello["pattern"].is_string(), "{hello}");

    let fleet = sse.until("fleet", "the first fleet event", |_| true);
    assert_eq!(fleet["reset"], true, "{fleet}");
    assert_eq!(fleet["matched"], 2, "{fleet}");
    let rows = fleet["upsert"].as_array().expect("upsert rows");
    assert_eq!(rows.len(), 2, "{fleet}");
    let bob_row = rows
        .iter()
        .find(|r| r["identity"] == "peq.ecommons.bob")
        .unwrap_or_else(|| panic!("no bob in {fleet}"));
    for (k, want) in [
        ("server", json!("peq")),
        ("zone", json!("ecommons")),
        ("character", json!("bob")),
        ("node", Json::Null),
        ("udp", json!(false)),
        ("tls", json!(false)),
        ("stale", json!(false)),
        ("keys", json!({"hp": "4500/5000", "level": null})),
    ] {
        assert_eq!(bob_row[k], want, "{k} of {bob_row}");
    }
    let since = bob_row["since_ms"].as_u64().expect("since_ms");
    assert!(
        since <= started + 1000 && since + 60_000 > started,
        "{bob_row}"
    );
    assert!(
        bob_row["set_ms"].as_u64().is_some_and(|s| s >= since),
        "{bob_row}"
    );
    let bob_id = bob_row["id"].as_u64().expect("a numeric id");
    let dave_row = rows
        .iter()
        .find(|r| r["identity"] == "test.gfaydark.dave")
        .unwrap_or_else(|| panic!("no dave in {fleet}"));
    assert_eq!(dave_row["set_ms"], Json::Null, "{dave_row}");
    assert_ne!(dave_row["id"], bob_row["id"]);

    // The rest of the first batch, in any order.
    let mut first = std::collections::BTreeMap::new();
    let end = Instant::now() + DEADLINE;
    while first.len() < 3 && Instant::now() < end {
        let (name, data) = sse.next().expect("the stream goes on");
        if ["events", "stats", "keys"].contains(&name.as_str()) {
            first.entry(name).or_insert(data);
        }
    }
    let events = first.get("events").expect("an events event");
    assert!(
        events
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["kind"] == "join"
                && e["identity"] == "peq.ecommons.bob"
                && e["seq"].is_u64()
                && e["at_ms"].is_u64())),
        "no join of bob in {events}"
    );
    let stats = first.get("stats").expect("a stats event");
    assert!(stats["history"].is_array(), "the first stats: {stats}");
    let keys = first.get("keys").expect("a keys event");
    assert_eq!(keys, &json!(["hp", "mana"]), "the key names");

    // A join, then a leave.
    let erin = rt.block_on(plain_shim(&srv, "peq.ecommons.erin"));
    let up = sse.until("fleet", "erin's upsert", |f| {
        f["upsert"]
            .as_array()
            .is_some_and(|u| u.iter().any(|r| r["identity"] == "peq.ecommons.erin"))
    });
    assert_eq!(up["reset"], false, "{up}");
    assert_eq!(up["matched"], 3, "{up}");
    rt.block_on(bob.close()).unwrap();
    let gone = sse.until("fleet", "bob's removal", |f| {
        f["remove"]
            .as_array()
            .is_some_and(|r| r.contains(&json!(bob_id)))
    });
    assert_eq!(gone["matched"], 2, "{gone}");
    sse.until("events", "bob's leave", |e| {
        e.as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["kind"] == "leave" && e["identity"] == "peq.ecommons.bob" && e["text"] == "quit"
            })
        })
    });
    drop(erin);

    // A bad pattern: the problem, then the end.
    let mut bad = Sse::open(&srv, "?pattern=peq.%3E.x");
    let (mut name, mut data) = bad.next().expect("an event");
    if name == "hello" {
        (name, data) = bad.next().expect("an event after hello");
    }
    assert_eq!(name, "problem", "{data}");
    let message = data["message"].as_str().expect("a message");
    assert!(message.starts_with("bad pattern \"peq.>.x\""), "{message}");
    assert!(bad.next().is_none(), "the stream goes on after the problem");
}

/// Unix time in ms.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// In the browser
// ---------------------------------------------------------------------------------------

/// The driver itself, on a `data:` page and a page of a tiny local server: typing,
/// clicking, waiting on text and on a script, reading attributes, cookies, headers,
/// script errors and screenshots.
#[test]
fn the_browser_harness_drives_a_page() {
    runtime().block_on(async {
        let b = Browser::start().await;
        let page = r#"<!doctype html><title>harness</title>
            <label for=a>a</label><input id=a>
            <button id=b onclick="document.getElementById('out').textContent = 'clicked ' +
                document.getElementById('a').value">go</button>
            <p id=out></p><p id=late data-x=1></p>
            <script>setTimeout(() => {
                const p = document.getElementById('late');
                p.textContent = 'late  text'; p.dataset.x = '2';
            }, 300);</script>"#;
        b.goto(&data_url(page)).await;
        b.wait_text_is("#late", "late text").await;
        assert_eq!(b.attr("#late", "data-x").await.as_deref(), Some("2"));
        b.type_into("#a", "hello").await;
        b.click("#b").await;
        b.wait_text_is("#out", "clicked hello").await;
        b.type_into("#a", "again").await;
        b.click("#b").await;
        b.wait_text_is("#out", "clicked again").await;
        assert_eq!(b.count("p").await, 2);
        let v = b
            .wait_js(
                "a script's answer",
                "return arguments[0] + 1",
                vec![json!(41)],
            )
            .await;
        assert_eq!(v, json!(42));
        assert_eq!(b.script_errors().await, Vec::<String>::new());
        b.js(
            "const s = document.createElement('script');
             s.textContent = 'setTimeout(() => { throw new Error(\"boom\") }, 0)';
             document.body.append(s)",
            vec![],
        )
        .await;
        b.wait_js(
            "the script error recorded",
            "return (window.__testErrors || []).some(e => e.includes('boom'))",
            vec![],
        )
        .await;
        let shot = b.screenshot("harness").await;
        let png = std::fs::read(&shot).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{shot:?} is a PNG");

        let url = echo_server();
        b.goto(&url).await;
        b.wait_text_is("#cookie", "").await;
        b.set_cookie("k", "v1").await;
        b.set_header("X-Test", "yes").await;
        b.goto(&url).await;
        b.wait_text_is("#cookie", "k=v1").await;
        b.wait_text_is("#header", "yes").await;
        assert_eq!(
            b.cookie("k").await.map(|c| c.value().to_string()),
            Some("v1".into())
        );
        b.close().await;
    });
}

/// The columns of the table with the default keys.
const COLUMNS: [&str; 11] = [
    "server",
    "zone",
    "character",
    "node",
    "since",
    "udp",
    "key:hp",
    "key:mana",
    "key:target",
    "key:level",
    "key:zone",
];

/// The login, the fleet and its live updates, the theme: without the token the login
/// form (and the stream refused), a wrong token "wrong token", the right one the live
/// dashboard; three shims listed with their cells and counts; a join, a leave with its
/// reason and state changes shown as they happen; the theme toggled and kept.
fn login_and_the_live_fleet(io: &str) {
    let (srv, _token) = dashboard_server(io);
    let shot = |step: &str| {
        if io == "uring" {
            step.to_string()
        } else {
            format!("{step}-{io}")
        }
    };
    runtime().block_on(async {
        let bob = plain_shim(&srv, "peq.ecommons.bob").await;
        let carol = plain_shim(&srv, "peq.ecommons.carol").await;
        let _dave = plain_shim(&srv, "test.gfaydark.dave").await;
        let b = Browser::start().await;

        // Without the token: the login form; the stream is refused.
        b.goto(&base(&srv)).await;
        b.wait_present("form#login").await;
        assert_eq!(b.attr("input#token", "type").await.as_deref(), Some("password"));
        assert_eq!(b.attr("input#token", "name").await.as_deref(), Some("token"));
        assert_eq!(b.attr("form#login", "action").await.as_deref(), Some("/login"));
        assert_eq!(b.count("#login-error").await, 0, "an error before any try");
        let status = b
            .js_async(
                "const done = arguments[arguments.length - 1];
                 fetch('/api/stream').then(r => done(r.status), e => done(String(e)))",
                vec![],
            )
            .await;
        assert_eq!(status, json!(401), "/api/stream without the token");
        b.screenshot(&shot("login")).await;

        // A wrong token, then the right one.
        b.type_into("input#token", "not-the-token").await;
        b.click("#login-submit").await;
        b.wait_text_is("#login-error", "wrong token").await;
        b.screenshot(&shot("login-wrong")).await;
        b.type_into("input#token", TOKEN).await;
        b.click("#login-submit").await;
        wait_live(&b).await;
        let cookie = b.cookie("velium_admin").await.expect("the login cookie");
        assert_eq!(cookie.http_only(), Some(true), "{cookie}");
        b.wait_text_is("#title", "velium").await;
        b.wait_text_is("#node", "single node").await;

        // The three shims, with their cells, and the counts.
        let cols = b
            .js(
                "return [...document.querySelectorAll('#fleet thead th[data-col]')]
                    .map(th => th.dataset.col)",
                vec![],
            )
            .await;
        assert_eq!(cols, json!(COLUMNS), "the columns");
        wait_rows(&b, &["peq.ecommons.bob", "peq.ecommons.carol", "test.gfaydark.dave"]).await;
        for (id, server, zone, character) in [
            ("peq.ecommons.bob", "peq", "ecommons", "bob"),
            ("peq.ecommons.carol", "peq", "ecommons", "carol"),
            ("test.gfaydark.dave", "test", "gfaydark", "dave"),
        ] {
            b.wait_text_is(&cell(id, "server"), server).await;
            b.wait_text_is(&cell(id, "zone"), zone).await;
            b.wait_text_is(&cell(id, "character"), character).await;
            b.wait_text_is(&cell(id, "udp"), "no").await;
            let tds = b
                .js(
                    "return [...document.querySelector(arguments[0]).querySelectorAll('td[data-col]')]
                        .map(td => td.dataset.col)",
                    vec![json!(row(id))],
                )
                .await;
            assert_eq!(tds, json!(COLUMNS), "the cells of {id}");
        }
        b.wait_text_is("#counts-server li[data-name=\"peq\"]", "peq 2").await;
        b.wait_text_is("#counts-server li[data-name=\"test\"]", "test 1").await;
        assert_eq!(
            b.texts("#counts-server li").await,
            ["peq 2", "test 1"],
            "sorted by count"
        );
        b.wait_text_is("#counts-zone li[data-name=\"ecommons\"]", "ecommons 2").await;
        b.wait_text_is("#counts-zone li[data-name=\"gfaydark\"]", "gfaydark 1").await;
        b.wait_text_is("#matched", "3 shims").await;
        assert_eq!(b.count("#counts-node li").await, 0, "node counts without nodes");
        b.wait_present("#fleet-scroll").await;
        for chart in ["connections", "handshakes", "frames", "latency"] {
            b.wait_present(&format!("svg#chart-{chart} > *")).await;
        }
        let first = b.text("#events li[data-kind=\"join\"]").await;
        let clock = first.split(' ').next().unwrap_or("");
        assert!(
            clock.len() == 8
                && clock.bytes().enumerate().all(|(i, c)| if i % 3 == 2 {
                    c == b':'
                } else {
                    c.is_ascii_digit()
                }),
            "an event's time is HH:MM:SS: {first:?}"
        );
        b.screenshot(&shot("fleet")).await;

        // A bound UDP channel shows.
        bob.bind_udp().await.unwrap();
        b.wait_text(&cell("peq.ecommons.bob", "udp"), "says yes", |t| {
            t == "yes" || t.starts_with("yes · ") && t.ends_with(" ms")
        })
        .await;

        // A fourth shim joins: its row, a join event.
        let erin = plain_shim(&srv, "peq.ecommons.erin").await;
        b.wait_text_is(&cell("peq.ecommons.erin", "character"), "erin").await;
        wait_event(&b, "join", &["peq.ecommons.erin"]).await;
        b.wait_text_is("#counts-server li[data-name=\"peq\"]", "peq 3").await;
        b.wait_text_is("#matched", "4 shims").await;

        // One leaves: its row goes, a leave event with the reason.
        carol.close().await.unwrap();
        b.wait_gone(&row("peq.ecommons.carol")).await;
        wait_event(&b, "leave", &["peq.ecommons.carol", "quit"]).await;
        assert_eq!(
            b.attr("#events li", "data-kind").await.as_deref(),
            Some("leave"),
            "the newest event first"
        );
        b.wait_text_is("#counts-server li[data-name=\"peq\"]", "peq 2").await;
        wait_rows(&b, &["peq.ecommons.bob", "peq.ecommons.erin", "test.gfaydark.dave"]).await;

        // State: shown, then changed.
        bob.set_state(&[("hp", Some("4500/5000"))]).await.unwrap();
        b.wait_text_is(&cell("peq.ecommons.bob", "key:hp"), "4500/5000")
            .await;
        bob.set_state(&[("hp", Some("100/5000"))]).await.unwrap();
        b.wait_text_is(&cell("peq.ecommons.bob", "key:hp"), "100/5000")
            .await;
        // Values are text, never markup.
        let markup = "<img src=x onerror=\"window.__xss = 1\">";
        bob.set_state(&[("target", Some(markup))]).await.unwrap();
        b.wait_text_is(&cell("peq.ecommons.bob", "key:target"), markup)
            .await;
        assert_eq!(b.count(&format!("{} img", row("peq.ecommons.bob"))).await, 0);
        assert_eq!(b.js("return window.__xss ?? null", vec![]).await, Json::Null);
        b.screenshot(&shot("fleet-live")).await;

        // The theme: toggled to dark, kept over a reload, toggled back.
        let mut now = toggle_theme(&b).await;
        if now == "light" {
            now = toggle_theme(&b).await;
        }
        assert_eq!(now, "dark");
        b.screenshot(&shot("dark")).await;
        b.client.refresh().await.unwrap();
        wait_live(&b).await;
        assert_eq!(theme(&b).await, "dark", "the theme is kept over a reload");
        assert_eq!(toggle_theme(&b).await, "light");

        // The hub gone: the page says so.
        srv.signal(libc::SIGKILL);
        b.wait_present("#live[data-state=\"down\"]").await;
        b.wait_text_is("#live", "reconnecting…").await;

        no_script_errors(&b).await;
        b.close().await;
        drop(erin);
    });
}

drivers!(login_and_the_live_fleet);

/// Stale rows, the filter and sorting: with the stale time at 1 s a shim that set its
/// state once turns `stale` while one that keeps setting does not (and 0 turns staleness
/// off); a filter shows the matching rows only, a bad one its problem, Escape clears it;
/// a header sorts by its column, a second click reverses.
#[test]
fn stale_rows_the_filter_and_sorting() {
    let (srv, _token) = dashboard_server("uring");
    runtime().block_on(async {
        let once = plain_shim(&srv, "peq.ecommons.once").await;
        once.set_state(&[("hp", Some("1/5000"))]).await.unwrap();
        let keeper = Arc::new(plain_shim(&srv, "peq.ecommons.keeper").await);
        let k = keeper.clone();
        // A game client's shim sets its state every tick; this one every 200 ms.
        let ticking = tokio::spawn(async move {
            for i in 0u64.. {
                let hp = format!("{}/5000", 5000 - i % 100);
                if k.set_state(&[("hp", Some(&hp))]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let alice = plain_shim(&srv, "peq.qeynos.alice").await;
        alice.set_state(&[("hp", Some("900/5000"))]).await.unwrap();
        let _bert = plain_shim(&srv, "peq.qeynos.Bert").await;
        let _zed = plain_shim(&srv, "test.gfaydark.zed").await;
        let all = [
            "peq.ecommons.keeper",
            "peq.ecommons.once",
            "peq.qeynos.alice",
            "peq.qeynos.Bert",
            "test.gfaydark.zed",
        ];

        let b = Browser::start().await;
        open_with_cookie(&b, &srv).await;
        wait_rows(&b, &all).await;
        assert_eq!(b.attr("input#stale", "value").await.as_deref(), Some("30"));
        assert_eq!(
            b.attr("input#keys", "value").await.as_deref(),
            Some("hp,mana,target,level,zone")
        );

        // Stale after 1 s without a Set: the shim that set once is, the one that keeps
        // setting is not (looked at together, so that a late tick of a loaded machine
        // cannot be mistaken for the page's error).
        b.type_into("input#stale", "1").await;
        b.press_enter("input#stale").await;
        b.wait_js(
            "once stale while keeper is not",
            "const [once, keeper] = [...arguments].map(r => document.querySelector(r));
             return once !== null && keeper !== null && once.classList.contains('stale')
                 && !keeper.classList.contains('stale')",
            vec![
                json!(row("peq.ecommons.once")),
                json!(row("peq.ecommons.keeper")),
            ],
        )
        .await;
        b.screenshot("stale").await;
        b.type_into("input#stale", "0").await;
        b.press_enter("input#stale").await;
        b.wait_gone(&format!("{}.stale", row("peq.ecommons.once")))
            .await;

        // "/" focuses the filter; the filter: the peq rows only; a bad pattern; Escape
        // clears it.
        b.js(
            "document.activeElement && document.activeElement.blur()",
            vec![],
        )
        .await;
        b.press_key('/').await;
        b.wait_js(
            "the filter focused by /",
            "return document.activeElement && document.activeElement.id === 'filter'",
            vec![],
        )
        .await;
        b.type_into("input#filter", "peq.*.>").await;
        b.press_enter("input#filter").await;
        wait_rows(&b, &all[..4]).await;
        b.wait_text_is("#matched", "4 shims").await;
        assert_eq!(b.text("#filter-error").await, "");
        b.type_into("input#filter", "peq.>.x").await;
        b.press_enter("input#filter").await;
        let problem = b
            .wait_text("#filter-error", "shows the problem", |t| !t.is_empty())
            .await;
        assert!(problem.contains("bad pattern"), "{problem}");
        b.screenshot("filter-error").await;
        b.press_escape("input#filter").await;
        b.wait_js(
            "the filter cleared",
            "return document.querySelector('input#filter').value === ''",
            vec![],
        )
        .await;
        wait_rows(&b, &all).await;
        b.wait_text_is("#filter-error", "").await;
        b.wait_text_is("#matched", "5 shims").await;

        // Sorting by character (ignoring case), then reversed.
        let column = "return [...document.querySelectorAll('#fleet tbody tr[data-identity]')]
            .map(r => [r.dataset.identity,
                       r.querySelector('td[data-col=\"' + arguments[0] + '\"]').innerText.trim()])";
        let characters = |v: &Json| -> Vec<String> {
            let rows: Vec<(String, String)> = serde_json::from_value(v.clone()).unwrap_or_default();
            rows.into_iter().map(|(_, c)| c).collect()
        };
        let th = "#fleet th[data-col=\"character\"]";
        b.click(&format!("{th} button")).await;
        let up = ["alice", "Bert", "keeper", "once", "zed"];
        b.wait_value("rows by character", column, vec![json!("character")], |v| {
            characters(v) == up
        })
        .await;
        assert_eq!(b.attr(th, "aria-sort").await.as_deref(), Some("ascending"));
        b.click(&format!("{th} button")).await;
        let down = ["zed", "once", "keeper", "Bert", "alice"];
        b.wait_value(
            "rows by character, reversed",
            column,
            vec![json!("character")],
            |v| characters(v) == down,
        )
        .await;
        assert_eq!(b.attr(th, "aria-sort").await.as_deref(), Some("descending"));
        b.screenshot("sorted").await;

        // By hit points, by the leading number (900 before 4,9xx; as text it would
        // come after): shims without the key are left out of the comparison.
        let hp = "#fleet th[data-col=\"key:hp\"]";
        b.click(&format!("{hp} button")).await;
        let ids = |v: &Json| -> Vec<String> {
            let rows: Vec<(String, String)> = serde_json::from_value(v.clone()).unwrap_or_default();
            rows.into_iter()
                .filter(|(_, hp)| !hp.is_empty() && hp != "—")
                .map(|(id, _)| id)
                .collect()
        };
        b.wait_value("rows by hp", column, vec![json!("key:hp")], |v| {
            ids(v)
                == [
                    "peq.ecommons.once",
                    "peq.qeynos.alice",
                    "peq.ecommons.keeper",
                ]
        })
        .await;
        assert_eq!(b.attr(hp, "aria-sort").await.as_deref(), Some("ascending"));

        // Other keys: the columns follow.
        b.type_into("input#keys", "level,hp").await;
        b.press_enter("input#keys").await;
        b.wait_value(
            "the columns of the keys level,hp",
            "return [...document.querySelectorAll('#fleet thead th[data-col]')]
                .map(th => th.dataset.col)",
            vec![],
            |v| {
                *v == json!([
                    "server",
                    "zone",
                    "character",
                    "node",
                    "since",
                    "udp",
                    "key:level",
                    "key:hp"
                ])
            },
        )
        .await;
        b.wait_text_is(&cell("peq.qeynos.alice", "key:hp"), "900/5000")
            .await;

        // Logging out: the login form again, the cookie gone.
        b.click("form#logout button").await;
        b.wait_present("form#login").await;
        assert!(
            b.cookie("velium_admin").await.is_none(),
            "the cookie is kept"
        );

        no_script_errors(&b).await;
        b.close().await;
        ticking.abort();
    });
}

/// The send box (the page logged in with `Authorization: Bearer`, not the cookie): a
/// Command to one shim shows its answer and "reached 1"; to a zone, both answers; an
/// Echo reaches its shim.
#[test]
fn the_send_box_reaches_shims() {
    let (srv, _token) = dashboard_server("uring");
    runtime().block_on(async {
        let mut bob = Shim::start(&srv, "peq.ecommons.bob").await;
        let mut carol = Shim::start(&srv, "peq.ecommons.carol").await;
        let mut dave = Shim::start(&srv, "test.gfaydark.dave").await;
        let b = Browser::start().await;
        let (k, v) = bearer();
        b.set_header(k, &v).await;
        b.goto(&base(&srv)).await;
        wait_live(&b).await;
        b.wait_present(&row("test.gfaydark.dave")).await;
        assert_eq!(
            b.attr("input#send-timeout", "value").await.as_deref(),
            Some("5000")
        );

        // Every control has its label.
        let unlabelled = b
            .js(
                "return [...document.querySelectorAll('input, select, textarea')]
                    .filter(e => e.type !== 'hidden'
                        && !(e.id && document.querySelector('label[for=\"' + e.id + '\"]'))
                        && !e.closest('label') && !e.getAttribute('aria-label'))
                    .map(e => e.id || e.outerHTML)",
                vec![],
            )
            .await;
        assert_eq!(unlabelled, json!([]), "controls without a label");

        // A Command to bob.
        b.select("select#send-kind", "command").await;
        b.type_into("input#send-target", "peq.ecommons.bob").await;
        b.type_into("input#send-text", "/sit").await;
        b.click("button#send-submit").await;
        assert_eq!(bob.next().await, "command /sit");
        let answer = "#answers li[data-from=\"peq.ecommons.bob\"]";
        let text = b
            .wait_text(answer, "shows bob's answer", |t| {
                t.starts_with("peq.ecommons.bob: ok from peq.ecommons.bob (") && t.ends_with(" ms)")
            })
            .await;
        assert!(!text.is_empty());
        b.wait_text_has("#send-status", "reached 1").await;
        b.wait_text_has("#send-status", "answered 1 of 1").await;
        b.screenshot("send").await;

        // A Command to the zone: both answer.
        b.type_into("input#send-target", "peq.ecommons.*").await;
        b.type_into("input#send-text", "/stand").await;
        b.click("button#send-submit").await;
        assert_eq!(bob.next().await, "command /stand");
        assert_eq!(carol.next().await, "command /stand");
        b.wait_text_has("#send-status", "reached 2").await;
        b.wait_text_has("#send-status", "answered 2 of 2").await;
        b.wait_text_has(
            "#answers li[data-from=\"peq.ecommons.carol\"]",
            "peq.ecommons.carol: ok from peq.ecommons.carol",
        )
        .await;

        // An Echo to dave.
        b.select("select#send-kind", "echo").await;
        b.type_into("input#send-target", "test.gfaydark.dave").await;
        b.type_into("input#send-text", "hello dave").await;
        b.click("button#send-submit").await;
        assert_eq!(dave.next().await, "echo hello dave");
        b.wait_text_has("#send-status", "reached 1").await;

        no_script_errors(&b).await;
        b.close().await;
    });
}

/// What a page of another site can make a browser send is refused: the login cookie
/// authorises reads and sends only (not `POST /reload`), a change from a foreign `Origin`
/// is refused, and on a listener without a token a browser request naming another host
/// (DNS rebinding) is refused while a scraper's request by name is served.
#[test]
fn requests_of_other_sites_are_refused() {
    let (srv, _token) = dashboard_server("uring");
    let admin = srv.admin.unwrap();
    let cookie = format!("velium_admin={}", login_cookie(&srv));
    let r = request(admin, "POST", "/reload", &[("Cookie", &cookie)], "");
    assert_eq!(r.status, 401, "a cookie must not reload: {:?}", r.head);
    let (b, value) = bearer();
    let own = format!("http://{admin}");
    let r = request(
        admin,
        "POST",
        "/reload",
        &[(b, &value), ("Origin", &own)],
        "",
    );
    assert_eq!(r.status, 200, "the listener's own origin: {:?}", r.head);
    let behind_proxy = format!("https://{admin}");
    let proxied = [(b, value.as_str()), ("Origin", behind_proxy.as_str())];
    let r = request(admin, "POST", "/reload", &proxied, "");
    assert_eq!(r.status, 200, "an https origin of this host: {:?}", r.head);
    let same = [(b, value.as_str()), ("Sec-Fetch-Site", "same-origin")];
    let r = request(admin, "POST", "/logout", &same, "");
    assert_eq!(r.status, 303, "{:?}", r.head);
    let cross = [
        ("Cookie", cookie.as_str()),
        ("Sec-Fetch-Site", "cross-site"),
    ];
    let r = request(admin, "GET", "/api/stream", &cross, "");
    assert_eq!(
        r.status, 403,
        "a stream opened for another site: {:?}",
        r.head
    );
    let foreign = [(b, value.as_str()), ("Origin", "http://attacker.example")];
    let (status, _, body) = request(admin, "POST", "/reload", &foreign, "").text();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("another site"), "{body}");
    let (_, _, metrics) = request(admin, "GET", "/metrics", &[(b, &value)], "").text();
    assert!(
        metrics.contains("velium_admin_refused_total{reason=\"origin\"} 2"),
        "{metrics}"
    );

    let open = Server::with_admin("uring", &[]);
    let admin = open.admin.unwrap();
    let raw = |req: &str| {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let rebound = raw(
        "GET /api/stream HTTP/1.1\r\nHost: attacker.example:9100\r\nSec-Fetch-Site: same-origin\r\nConnection: close\r\n\r\n",
    );
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    // A plain-HTTP page sends no Sec-Fetch headers: the Host alone tells it, so an open
    // listener answers only requests naming it by address (`/healthz` answers anyone).
    let rebound =
        raw("GET /shims HTTP/1.1\r\nHost: attacker.example:9100\r\nConnection: close\r\n\r\n");
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let scrape = raw(&format!(
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    ));
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let health = raw("GET /healthz HTTP/1.1\r\nHost: hub.internal\r\nConnection: close\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let local = raw(&format!(
        "GET / HTTP/1.1\r\nHost: localhost:{}\r\nSec-Fetch-Site: none\r\nConnection: close\r\n\r\n",
        admin.port()
    ));
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
}

/// A reload that changes the admin token ends the streams opened with the old one, and
/// the old login cookie no longer opens the page.
#[test]
fn a_new_token_ends_the_streams_of_the_old_one() {
    let (srv, token) = dashboard_server("uring");
    let admin = srv.admin.unwrap();
    let cookie = format!("velium_admin={}", login_cookie(&srv));
    let r = request(admin, "GET", "/api/stream", &[("Cookie", &cookie)], "");
    assert_eq!(r.status, 200);
    let mut body = r.body;
    let mut line = String::new();
    body.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "event: hello");
    std::fs::write(token.arg(), "a-new-token\n").unwrap();
    let (b, v) = bearer();
    let r = request(admin, "POST", "/reload", &[(b, &v)], "");
    assert_eq!(r.status, 200, "{:?}", r.head);
    let r = request(admin, "GET", "/metrics", &[(b, &v)], "");
    assert_eq!(r.status, 401, "the old token still opens /metrics");
    // The stream ends (EOF) within a few ticks.
    let end = Instant::now() + DEADLINE;
    let mut rest = Vec::new();
    let _ = body.read_to_end(&mut rest);
    assert!(Instant::now() < end, "the stream did not end");
    let (status, _, _) = get(&srv, "/", &[("Cookie", &cookie)]);
    assert_eq!(status, 401, "the old cookie still opens the page");
}

/// Open pages are bounded (half of `admin_connections`; another page is told why), and a
/// connection made while the listener is full closes an idle one, never a page's stream.
#[test]
fn pages_are_bounded_and_evicted_last() {
    let token = TempFile::new("admin.token", &format!("{TOKEN}\n"));
    let srv = Server::with_admin(
        "uring",
        &[
            "--admin-token-file",
            token.arg(),
            "--admin-connections",
            "4",
        ],
    );
    let admin = srv.admin.unwrap();
    let (b, v) = bearer();
    let mut pages: Vec<_> = (0..2)
        .map(|_| {
            let r = request(admin, "GET", "/api/stream", &[(b, &v)], "");
            assert_eq!(r.status, 200, "{:?}", r.head);
            let mut body = r.body;
            let mut line = String::new();
            body.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "event: hello");
            body
        })
        .collect();
    let (status, _, text) = request(admin, "GET", "/api/stream", &[(b, &v)], "").text();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("too many dashboard pages"), "{text}");
    // Fill the listener with two connections that send nothing, then one more: an idle
    // one makes room for it, and both pages keep streaming.
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(admin).unwrap()).collect();
    let (status, _, body) = request(admin, "GET", "/healthz", &[], "").text();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    for page in &mut pages {
        // A stats sample comes every second: the stream is still open.
        let mut seen = String::new();
        while !seen.contains("\"sample\"") {
            let mut line = String::new();
            let n = page.read_line(&mut line).expect("the page's stream");
            assert!(n > 0, "a page's stream was closed to make room");
            seen.push_str(&line);
        }
    }
    drop(idle);
}
