//! A small headless-Chromium driver for the dashboard tests: Debian's `chromedriver`
//! started per test on a free port of 127.0.0.1, a fresh Chromium profile, and the
//! WebDriver client `fantoccini` spoken to over plain HTTP.
//!
//! Every wait polls the page every 50 ms up to [`WAIT`], and a wait that fails says what
//! the page showed then (its URL, text, a DOM excerpt, any script errors) and saves a
//! screenshot beside the others. Chromium and chromedriver are required: without them a
//! test fails naming the packages to install, it is never skipped.
#![allow(dead_code)]

use fantoccini::cookies::Cookie;
use fantoccini::elements::Element;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value as Json, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Debian's Chromium (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long any page condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);
/// How often a wait looks at the page again.
const POLL: Duration = Duration::from_millis(50);
/// What to install when either binary is missing.
const INSTALL: &str = "install Debian's packages: apt-get install chromium chromium-driver \
                       (scripts/test-deps.sh does it)";

/// Records the page's script errors (uncaught errors, rejected promises, console.error)
/// in `window.__testErrors`, before any script of the page runs.
const ERROR_HOOK: &str = r#"
(() => {
  const errors = [];
  Object.defineProperty(window, '__testErrors', { value: errors });
  const push = (what) => { if (errors.length < 50) errors.push(String(what).slice(0, 500)); };
  window.addEventListener('error', (e) => push('error: ' + (e.message || e.type) +
      (e.filename ? ' at ' + e.filename + ':' + e.lineno : '')), true);
  window.addEventListener('unhandledrejection', (e) => push('rejection: ' +
      (e.reason && e.reason.stack ? e.reason.stack : e.reason)));
  window.addEventListener('securitypolicyviolation', (e) => push('csp: ' +
      e.violatedDirective + ' blocked ' + e.blockedURI));
  const ce = console.error.bind(console);
  console.error = (...a) => { push('console.error: ' + a.join(' ')); ce(...a); };
})();
"#;

/// Fails (never skips) when Chromium or chromedriver is not installed.
pub fn require_chromium() {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: the dashboard tests need a headless Chromium; {INSTALL}"
        );
    }
}

/// The folder screenshots go to: `target/dashboard-screenshots` under the crate.
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots")
}

/// Whitespace runs as single spaces, trimmed: text as a person reads it.
pub fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// True when a script's result counts as "yes": not null, false, 0, "" or an empty list.
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Bool(b) => *b,
        Json::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        Json::Object(_) => true,
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// One HTTP GET on loopback: (status, body); `None` when nothing answers yet.
/// chromedriver keeps the connection open, so the body is read by its Content-Length.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        &s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).ok()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let mut len = 0;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The pids of live processes one of whose arguments is exactly `arg`.
fn pids_with_arg(arg: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
        })
        .collect()
}

/// Why chromedriver did not start: it exited at once (its port was taken: try another),
/// or something else.
enum Start {
    Exited(String),
    Failed(String),
}

/// A chromedriver process on its own port and in its own process group (so that the
/// Chromium it starts goes with it), killed on drop.
struct Driver {
    child: Child,
    port: u16,
    output: Arc<Mutex<Vec<String>>>,
}

impl Driver {
    /// Starts chromedriver on a free port and waits until its `/status` says ready. A port
    /// taken between choosing and binding makes chromedriver exit: then another is tried.
    fn start() -> Driver {
        let mut tries = Vec::new();
        for _ in 0..5 {
            match Driver::try_start(free_port()) {
                Ok(d) => return d,
                Err(Start::Exited(why)) => tries.push(why),
                Err(Start::Failed(why)) => panic!("chromedriver did not start: {why}"),
            }
        }
        panic!("chromedriver did not start:\n{}", tries.join("\n---\n"));
    }

    fn try_start(port: u16) -> Result<Driver, Start> {
        let mut child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| Start::Failed(format!("spawn {CHROMEDRIVER}: {e}; {INSTALL}")))?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<Option<String>>();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
            let (tx, output) = (tx.clone(), output.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line.clone());
                    let _ = tx.send(Some(line));
                }
                let _ = tx.send(None);
            });
        }
        drop(tx);
        let mut driver = Driver {
            child,
            port,
            output,
        };
        // The line chromedriver prints once it listens; two ends of file: it exited.
        let end = Instant::now() + WAIT;
        let mut closed = 0;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Some(l)) if l.contains("started successfully") => break,
                Ok(Some(_)) => {}
                Ok(None) => {
                    closed += 1;
                    if closed == 2 {
                        return Err(Start::Exited(format!(
                            "chromedriver --port={port} exited:\n{}",
                            driver.output()
                        )));
                    }
                }
                Err(_) => {
                    return Err(Start::Failed(format!(
                        "chromedriver --port={port} not started within {WAIT:?}:\n{}",
                        driver.output()
                    )));
                }
            }
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some((200, body)) = http_get(addr, "/status") {
                let v: Json = serde_json::from_str(&body).unwrap_or(Json::Null);
                if v["value"]["ready"] == json!(true) {
                    return Ok(driver);
                }
            }
            if let Ok(Some(status)) = driver.child.try_wait() {
                return Err(Start::Failed(format!(
                    "chromedriver exited ({status}):\n{}",
                    driver.output()
                )));
            }
            if Instant::now() > end {
                return Err(Start::Failed(format!(
                    "chromedriver /status never ready:\n{}",
                    driver.output()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started.
        // SAFETY: kill(2) on the process group of our own child (its pid, by process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A Chrome DevTools command, through chromedriver's `goog/cdp/execute`.
#[derive(Debug)]
struct Cdp {
    cmd: &'static str,
    params: Json,
}

impl WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!(
            "session/{}/goog/cdp/execute",
            session.unwrap_or("")
        ))
    }

    fn method_and_body(&self, _url: &url::Url) -> (http::Method, Option<String>) {
        let body = json!({ "cmd": self.cmd, "params": self.params });
        (http::Method::POST, Some(body.to_string()))
    }
}

/// One headless Chromium session. Its methods panic with a description of the page when
/// something fails; drop kills chromedriver and the browser, and removes the profile.
pub struct Browser {
    pub client: Client,
    // Dropped in this order: chromedriver and its process group, then the profile.
    driver: Driver,
    profile: Profile,
}

/// A Chromium profile folder; on drop, kills any Chromium process still using it (one that
/// left chromedriver's process group) and removes it.
struct Profile(PathBuf);

impl Drop for Profile {
    fn drop(&mut self) {
        let arg = format!("--user-data-dir={}", self.0.display());
        for pid in pids_with_arg(&arg) {
            // SAFETY: kill(2) on a process started for this profile by this test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile. Must be called on
    /// a tokio runtime.
    pub async fn start() -> Browser {
        require_chromium();
        let driver = Driver::start();
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let profile = std::env::temp_dir().join(format!(
            "velium-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let profile = Profile(profile);
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1400,1000".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            format!("--user-data-dir={}", profile.0.display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let client = match ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url())
            .await
        {
            Ok(c) => c,
            Err(e) => panic!(
                "no Chromium session from chromedriver: {e}\nchromedriver said:\n{}",
                driver.output()
            ),
        };
        let b = Browser {
            client,
            driver,
            profile,
        };
        b.cdp(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": ERROR_HOOK }),
        )
        .await;
        b
    }

    /// Runs a Chrome DevTools command.
    pub async fn cdp(&self, cmd: &'static str, params: Json) -> Json {
        match self.client.issue_cmd(Cdp { cmd, params }).await {
            Ok(v) => v,
            Err(e) => panic!("CDP {cmd}: {e}"),
        }
    }

    /// Opens `url` and waits for its load.
    pub async fn goto(&self, url: &str) {
        if let Err(e) = self.client.goto(url).await {
            panic!("{}", self.failure(&format!("open {url}: {e}")).await);
        }
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// Runs `script` (a function body: `return ...`; the values of `args` as
    /// `arguments[i]`) and returns its result.
    pub async fn js(&self, script: &str, args: Vec<Json>) -> Json {
        match self.client.execute(script, args).await {
            Ok(v) => v,
            Err(e) => panic!(
                "{}",
                self.failure(&format!("script failed: {e}\n{script}")).await
            ),
        }
    }

    /// Runs an asynchronous `script`: it ends by calling `done(value)`, where `done` is
    /// its last argument (`arguments[arguments.length - 1]`).
    pub async fn js_async(&self, script: &str, args: Vec<Json>) -> Json {
        match self.client.execute_async(script, args).await {
            Ok(v) => v,
            Err(e) => panic!(
                "{}",
                self.failure(&format!("async script failed: {e}\n{script}"))
                    .await
            ),
        }
    }

    /// Waits until `script` (as for [`Browser::js`]) returns something truthy; returns it.
    /// Fails after [`WAIT`] with `what`, the last result and the page.
    pub async fn wait_js(&self, what: &str, script: &str, args: Vec<Json>) -> Json {
        self.wait_value(what, script, args, truthy).await
    }

    /// Waits until what `script` returns is accepted by `ok`; returns it. Fails after
    /// [`WAIT`] with `what`, the last result and the page.
    pub async fn wait_value(
        &self,
        what: &str,
        script: &str,
        args: Vec<Json>,
        ok: impl Fn(&Json) -> bool,
    ) -> Json {
        let end = Instant::now() + WAIT;
        loop {
            let last = match self.client.execute(script, args.clone()).await {
                Ok(v) if ok(&v) => return v,
                Ok(v) => format!("last result {v}"),
                Err(e) => format!("last error {e}"),
            };
            if Instant::now() > end {
                let why = format!("never {what} within {WAIT:?} ({last})");
                panic!("{}", self.failure(&why).await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first element matching `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> Element {
        self.wait_present(css).await;
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e,
            Err(e) => panic!("{}", self.failure(&format!("find {css}: {e}")).await),
        }
    }

    /// Every element matching `css` now (maybe none).
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        match self.client.find_all(Locator::Css(css)).await {
            Ok(v) => v,
            Err(e) => panic!("{}", self.failure(&format!("find all {css}: {e}")).await),
        }
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        let v = self
            .js(
                "return document.querySelectorAll(arguments[0]).length",
                vec![json!(css)],
            )
            .await;
        v.as_u64().unwrap_or(0) as usize
    }

    /// Waits until some element matches `css`.
    pub async fn wait_present(&self, css: &str) {
        self.wait_js(
            &format!("an element {css}"),
            "return document.querySelector(arguments[0]) !== null",
            vec![json!(css)],
        )
        .await;
    }

    /// Waits until no element matches `css`.
    pub async fn wait_gone(&self, css: &str) {
        self.wait_js(
            &format!("no element {css}"),
            "return document.querySelector(arguments[0]) === null",
            vec![json!(css)],
        )
        .await;
    }

    /// The text of the first element matching `css` as a person reads it (`innerText`,
    /// whitespace squashed), or `None` when nothing matches.
    pub async fn try_text(&self, css: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]);
                 return e === null ? null : (e.innerText ?? e.textContent)",
                vec![json!(css)],
            )
            .await;
        v.as_str().map(squash)
    }

    /// The text of the first element matching `css` (which must exist).
    pub async fn text(&self, css: &str) -> String {
        match self.try_text(css).await {
            Some(t) => t,
            None => panic!("{}", self.failure(&format!("no element {css}")).await),
        }
    }

    /// The texts of every element matching `css`, in document order.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let v = self
            .js(
                "return [...document.querySelectorAll(arguments[0])]
                    .map(e => e.innerText ?? e.textContent)",
                vec![json!(css)],
            )
            .await;
        v.as_array()
            .map(|a| a.iter().map(|t| squash(t.as_str().unwrap_or(""))).collect())
            .unwrap_or_default()
    }

    /// An attribute of the first element matching `css` (`None`: no element or no such
    /// attribute).
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let v = self
            .js(
                "const e = document.querySelector(arguments[0]);
                 return e === null ? null : e.getAttribute(arguments[1])",
                vec![json!(css), json!(name)],
            )
            .await;
        v.as_str().map(str::to_string)
    }

    /// Waits until the first element matching `css` has a text that `ok` accepts;
    /// returns that text. `what` says what was expected, for the failure.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + WAIT;
        loop {
            let got = self.try_text(css).await;
            if let Some(t) = &got
                && ok(t)
            {
                return t.clone();
            }
            if Instant::now() > end {
                let why = format!("{css} never {what} within {WAIT:?}; its text: {got:?}");
                panic!("{}", self.failure(&why).await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the first element matching `css` has exactly the text `want`.
    pub async fn wait_text_is(&self, css: &str, want: &str) -> String {
        self.wait_text(css, &format!("reads {want:?}"), |t| t == want)
            .await
    }

    /// Waits until the first element matching `css` has a text holding `needle`.
    pub async fn wait_text_has(&self, css: &str, needle: &str) -> String {
        self.wait_text(css, &format!("holds {needle:?}"), |t| t.contains(needle))
            .await
    }

    /// Clears the input matching `css` and types `text` into it (key by key, so the page
    /// sees its input events).
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        if let Err(err) = e.clear().await {
            panic!("{}", self.failure(&format!("clear {css}: {err}")).await);
        }
        if !text.is_empty()
            && let Err(err) = e.send_keys(text).await
        {
            panic!("{}", self.failure(&format!("type into {css}: {err}")).await);
        }
    }

    /// Presses keys (text, or `fantoccini::key::Key` characters such as Enter) in the
    /// element matching `css`.
    pub async fn keys(&self, css: &str, keys: &str) {
        let e = self.find(css).await;
        if let Err(err) = e.send_keys(keys).await {
            panic!("{}", self.failure(&format!("keys into {css}: {err}")).await);
        }
    }

    /// Presses Enter in the element matching `css`.
    pub async fn press_enter(&self, css: &str) {
        self.keys(css, &char::from(fantoccini::key::Key::Enter).to_string())
            .await;
    }

    /// Presses Escape in the element matching `css`.
    pub async fn press_escape(&self, css: &str) {
        self.keys(css, &char::from(fantoccini::key::Key::Escape).to_string())
            .await;
    }

    /// Presses and releases one key on whatever has the focus (the page itself when
    /// nothing does), as a person typing would.
    pub async fn press_key(&self, key: char) {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let actions = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: key })
            .then(KeyAction::Up { value: key });
        if let Err(e) = self.client.perform_actions(actions).await {
            panic!("{}", self.failure(&format!("press {key:?}: {e}")).await);
        }
        let _ = self.client.release_actions().await;
    }

    /// Picks the option with `value` in the `select` matching `css`.
    pub async fn select(&self, css: &str, value: &str) {
        let e = self.find(css).await;
        if let Err(err) = e.select_by_value(value).await {
            panic!(
                "{}",
                self.failure(&format!("select {value:?} in {css}: {err}"))
                    .await
            );
        }
    }

    /// Clicks the first element matching `css` (waiting for it to appear).
    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        if let Err(err) = e.click().await {
            panic!("{}", self.failure(&format!("click {css}: {err}")).await);
        }
    }

    /// Sets a cookie for the current page's origin (open a page of it first).
    pub async fn set_cookie(&self, name: &str, value: &str) {
        // With no SameSite, fantoccini sends SameSite=None, which Chromium refuses for a
        // cookie that is not Secure.
        // And with no domain, a null one, which chromedriver refuses: name the page's.
        let url = self.client.current_url().await.unwrap();
        let host = url.host_str().unwrap_or("127.0.0.1");
        let c = Cookie::parse(format!(
            "{name}={value}; Path=/; Domain={host}; SameSite=Lax"
        ))
        .unwrap_or_else(|e| panic!("cookie {name}={value}: {e}"));
        if let Err(e) = self.client.add_cookie(c).await {
            panic!("{}", self.failure(&format!("set cookie {name}: {e}")).await);
        }
    }

    /// The value of a cookie the page's origin holds (HttpOnly ones too), if any.
    pub async fn cookie(&self, name: &str) -> Option<Cookie<'static>> {
        self.client.get_named_cookie(name).await.ok()
    }

    /// Sends the header `name: value` with every later request of this browser.
    pub async fn set_header(&self, name: &str, value: &str) {
        self.cdp("Network.enable", json!({})).await;
        self.cdp(
            "Network.setExtraHTTPHeaders",
            json!({ "headers": { name: value } }),
        )
        .await;
    }

    /// Waits until no CSS transition runs (a theme change fades its colours), so that a
    /// screenshot shows where the page settles.
    pub async fn settle(&self) {
        self.wait_js(
            "CSS transitions finished",
            "return document.getAnimations()
                .every(a => !(a instanceof CSSTransition) || a.playState !== 'running')",
            vec![],
        )
        .await;
    }

    /// Saves a screenshot of the window as `target/dashboard-screenshots/NAME.png`, once
    /// transitions have finished; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        self.settle().await;
        let png = match self.client.screenshot().await {
            Ok(p) => p,
            Err(e) => panic!("{}", self.failure(&format!("screenshot {name}: {e}")).await),
        };
        save_png(name, &png)
    }

    /// What the page shows now, for a failure message: URL, script errors, text and a DOM
    /// excerpt.
    pub async fn describe(&self) -> String {
        let url = match self.client.current_url().await {
            Ok(u) => u.to_string(),
            Err(e) => format!("(no URL: {e})"),
        };
        let v = self
            .client
            .execute(
                "return {
                    errors: window.__testErrors || [],
                    text: document.body ? document.body.innerText : '',
                    html: document.documentElement ? document.documentElement.outerHTML : ''
                 }",
                vec![],
            )
            .await
            .unwrap_or(Json::Null);
        let cut = |s: &str, n: usize| -> String {
            if s.chars().count() > n {
                format!("{}…", s.chars().take(n).collect::<String>())
            } else {
                s.to_string()
            }
        };
        format!(
            "page {url}\nscript errors: {}\ntext:\n{}\nDOM:\n{}",
            v["errors"],
            cut(v["text"].as_str().unwrap_or(""), 3000),
            cut(v["html"].as_str().unwrap_or(""), 6000)
        )
    }

    /// The page's script errors so far (uncaught errors, rejections, console.error, CSP
    /// violations).
    pub async fn script_errors(&self) -> Vec<String> {
        let v = self.js("return window.__testErrors || []", vec![]).await;
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e.as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The message a failed test panics with: `why`, and what the page shows, after saving
    /// a screenshot named after the test.
    pub async fn failure(&self, why: &str) -> String {
        let page = self.describe().await;
        let name = format!(
            "failed-{}",
            std::thread::current()
                .name()
                .unwrap_or("test")
                .replace("::", "-")
        );
        let shot = match self.client.screenshot().await {
            Ok(png) => format!("screenshot {}", save_png(&name, &png).display()),
            Err(e) => format!("no screenshot: {e}"),
        };
        format!("browser: {why}\n{shot}\n{page}")
    }

    /// Ends the session (closing Chromium), then chromedriver.
    pub async fn close(self) {
        let Browser {
            client,
            driver,
            profile,
        } = self;
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        drop(driver);
        drop(profile);
    }
}

/// Writes `png` to `target/dashboard-screenshots/NAME.png`; returns the path.
pub fn save_png(name: &str, png: &[u8]) -> PathBuf {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    path
}
