//! The admin HTTP listener: `GET /healthz`, `GET /metrics` (Prometheus text),
//! `GET /shims?pattern=P` and `GET /state?pattern=P` (JSON), `POST /reload`, and the live
//! dashboard (`dashboard.rs`: `GET /`, `POST /login`, `POST /logout`, `/assets/*`,
//! `GET /api/stream`, `POST /api/send`).
//!
//! It runs on a thread of its own with a single-threaded runtime, outside the pinned cores
//! and five nice levels below them,
//! so a scrape never takes a turn from the shim path: what it reads (atomic counters, the
//! per-core histograms, the router under a read lock) is shared state the cores only
//! publish. It lists every shim and can reload the settings, so it is off unless
//! configured, and the examples bind it to 127.0.0.1.
//!
//! With `admin_token` set, every route but `/healthz`, the login form and the page's
//! assets needs `Authorization: Bearer TOKEN` or the dashboard's login cookie; without
//! it the answer is 401 with `WWW-Authenticate: Bearer`. The token is read from the
//! settings on each request, so a reload that changes it applies to the next request.
//!
//! No admin client can delay the others, keep `/healthz` out or take descriptors the
//! shims need. The limits, and why:
//!
//! - **Connections**: at most `admin_connections` (read at start; the hub keeps that many
//!   descriptors out of the shims' budget). Another connection is still accepted, and the
//!   one waiting longest for a request (never sent a complete head, or idle since its last
//!   response) is closed for it, or the oldest when none waits: holding connections open
//!   keeps nobody out, and `/healthz` always gets in.
//! - **Turns**: every connection is a task on the one thread, and each answers at most one
//!   request before the others (and the accept) get their turn, so a client pipelining
//!   requests delays the rest by one answer at most.
//! - **Sizes**: a request head (request line and headers) of at most 8 KiB and 32 headers,
//!   else 431 and the connection is closed having read no more than that; a body of at
//!   most 1 KiB (4 KiB for a dashboard send), else 413. A connection's socket send buffer is fixed
//!   at 64 KiB. So memory per connection stays small whatever a client sends, and a client
//!   that asks again and again without reading gets a few answers made, then none.
//! - **Time**: a request head must be complete within 5 s of its first byte, and its body
//!   within 5 s more (408); a connection with no request begun is closed after 10 s (from
//!   the accept or the last response); a write that makes no progress for 5 s fails and
//!   closes the connection. A slow or silent client holds its connection for seconds.
//! - **Reloads**: `POST /reload` at most 2 a second (a burst of 2), else 429: a reload
//!   re-reads files and logs a line.
//! - **Dashboard**: at most half of `admin_connections` streams open at once (503 beyond),
//!   so open pages always leave room for scrapes and `/healthz`; a stream is made only as
//!   fast as its page reads it, and one that stops reading meets the write timeout; at
//!   most 4 sends running at once, each for at most 60 s; logins at most 5 a second
//!   from one source (a /64 for IPv6) and 50 a second in all.
//!
//! `POST /reload` re-reads the settings as SIGHUP does and answers in plain text: 200 with
//! `reloaded; applied: KEYS; need a restart: KEYS`; 500 with the reason when the settings
//! fail to load (nothing changes; a TOML error keeps the parser's lines, with the line,
//! the column and a caret under the spot); 409 `nothing to reload: the hub was started
//! without --config` on a hub that has nothing to read again (no config file, and no flag
//! naming a secret, token or TLS file); 429 past its rate.
//!
//! Refusals are counted in `velium_admin_refused_total{reason}` and logged at most once a
//! minute per reason; connections closed by the listener are counted in
//! `velium_admin_closed_total{reason}`.

mod dashboard;
pub mod history;

use crate::hub::Hub;
use crate::metrics::{Dir, Latency, Transport};
use crate::proto::Opcode;
use crate::proto::sealed::SealError;
use crate::proto::target::Target;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{
    AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, LocalSet};
use tokio::time::{Instant, Sleep};
use tracing::{debug, trace, warn};

/// Re-reads the settings; returns what was applied, or why nothing was.
pub type Reload = Arc<dyn Fn() -> Result<String, ReloadRefused> + Send + Sync>;

/// Why a reload applied nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadRefused {
    /// The settings failed to load; the old ones stay (`POST /reload`: 500).
    Failed(String),
    /// There is nothing to read again: the hub was started without a config file, and
    /// no flag names a file (`POST /reload`: 409).
    Nothing(String),
}

/// The largest request head (request line and headers) read; a larger one is answered 431.
const MAX_HEAD: usize = 8 * 1024;
/// The most headers a request may carry (431 beyond).
const MAX_HEADERS: usize = 32;
/// The largest request body read; a larger one is answered 413.
const MAX_BODY: usize = 1024;
/// Time from a request head's first byte to its end, and then to the end of its body.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may wait for a request (after the accept or the last response).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a write may make no progress before the connection is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// `POST /reload`s a second, and the burst allowed.
const RELOADS_PER_SEC: f64 = 2.0;
/// At most one log line per refusal reason in this time.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// The accept queue: connections the kernel completes before the listener takes them.
const BACKLOG: i32 = 1024;
/// Each connection's socket send buffer (fixed, not grown by the kernel): bounds what a
/// client that does not read makes the listener render before its writes stop.
const SEND_BUFFER: usize = 64 * 1024;
/// Sources whose login rate is kept apart; beyond, new sources share one bucket (a flood
/// of sources buys neither memory nor attempts).
const LOGIN_SOURCES: usize = 1024;
/// Login attempts a second from every source together.
const ALL_LOGINS_PER_SEC: f64 = 50.0;
/// A peer that stops acknowledging (a laptop asleep with a page open) is given up after
/// this, so that it does not hold a dashboard stream for the minutes TCP would retry.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Nice levels the admin thread runs below the serving cores.
const ADMIN_NICE: i32 = 5;
/// The pause after an accept failed for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const TEXT: &str = "text/plain; charset=utf-8";

/// Binds the admin listener on `addr` and serves it from a new thread; returns the bound
/// address (the real port when port 0 was asked for).
/// `hub_addr` is the hub's own TCP address, where the dashboard's send box connects.
pub fn start(
    addr: SocketAddr,
    hub: Arc<Hub>,
    reload: Reload,
    hub_addr: SocketAddr,
) -> io::Result<SocketAddr> {
    let listener = bind(addr)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let limit = hub.config().admin_connections;
    std::thread::Builder::new()
        .name("velium-admin".into())
        .spawn(move || {
            crate::driver::sys::lower_thread_priority(ADMIN_NICE);
            LocalSet::new().block_on(&runtime, async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, Rc::new(Admin::new(hub, reload, limit, hub_addr))).await,
                    Err(e) => warn!(error = %e, "admin listener failed"),
                }
            })
        })?;
    Ok(bound)
}

/// A non-blocking listening socket on `addr` with a deep accept queue.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Accepts connections for ever.
async fn serve(listener: TcpListener, admin: Rc<Admin>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => admin.open(stream, peer),
            Err(e) => {
                admin.accept_failed(&e);
                if out_of_resources(&e) {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
        // The connections (and the one just evicted, whose socket closes when its task is
        // dropped) run before the next accept.
        tokio::task::yield_now().await;
    }
}

/// Whether an accept failed for lack of descriptors or memory (trying again at once would
/// only spin).
fn out_of_resources(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The listener's state, all on its own thread.
struct Admin {
    hub: Arc<Hub>,
    reload: Reload,
    conns: RefCell<Conns>,
    reloads: RefCell<Bucket>,
    counts: Counts,
    /// Login attempts still allowed this second, per source (so that nobody can lock the
    /// others out); forgotten once [`LOGIN_SOURCES`] sources are held.
    logins: RefCell<std::collections::HashMap<std::net::IpAddr, Bucket>>,
    /// Login attempts still allowed this second from every source together.
    all_logins: RefCell<Bucket>,
    /// The last 15 minutes, sampled each second, and the channel of new samples.
    history: Rc<RefCell<history::History>>,
    samples: tokio::sync::broadcast::Sender<history::Sample>,
    /// Dashboard streams open, and sends running.
    streams: Cell<usize>,
    sends: Cell<usize>,
    /// The hub's own TCP address (the send box connects there).
    hub_addr: SocketAddr,
}

/// What `/metrics` reports about the listener itself, and when each refusal was logged.
#[derive(Default)]
struct Counts {
    accepted: Cell<u64>,
    evicted: Cell<u64>,
    timed_out: Cell<u64>,
    refused: [Cell<u64>; Refusal::ALL.len()],
    logged: [Cell<Option<Instant>>; Refusal::ALL.len()],
    accept_failure_logged: Cell<Option<Instant>>,
}

/// The open connections, by id (ids grow with the accept, so the first is the oldest).
struct Conns {
    limit: usize,
    next_id: u64,
    open: BTreeMap<u64, Slot>,
}

/// One open connection: where it is in its request cycle, and its task.
struct Slot {
    phase: Rc<Cell<Phase>>,
    task: AbortHandle,
}

/// Where a connection is in its request cycle.
#[derive(Clone, Copy)]
enum Phase {
    /// Waiting for a request head since the accept or the last response; `head` is when
    /// the head's first byte came.
    Waiting {
        since: Instant,
        head: Option<Instant>,
    },
    /// A complete head is being answered (its body read, its response made).
    Answering,
    /// A dashboard stream is being sent: no request is expected meanwhile, and the write
    /// timeout still ends it should the page stop reading.
    Streaming,
    /// A read or write passed its deadline: the connection is closing.
    Expired,
}

/// Why a request was refused: its status, metric label and log line.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// No bearer token, or a wrong one (401).
    Token,
    /// `POST /reload` beyond its rate (429).
    ReloadRate,
    /// A head or body over its limit (431, 413).
    TooLarge,
    /// A body not sent within its time (408).
    Timeout,
    /// A head or body that is not HTTP/1 (400).
    BadRequest,
    /// A dashboard stream beyond the limit of streams open at once (503).
    Streams,
    /// `POST /login` beyond its rate (429).
    LoginRate,
    /// A request another site's page made: a foreign `Origin` on a change, or, with no
    /// token set, a `Host` that is not this listener's address (403).
    Origin,
}

impl Refusal {
    const ALL: [Refusal; 8] = [
        Refusal::Token,
        Refusal::ReloadRate,
        Refusal::TooLarge,
        Refusal::Timeout,
        Refusal::BadRequest,
        Refusal::Streams,
        Refusal::LoginRate,
        Refusal::Origin,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Token => "token",
            Refusal::ReloadRate => "reload_rate",
            Refusal::TooLarge => "too_large",
            Refusal::Timeout => "timeout",
            Refusal::BadRequest => "bad_request",
            Refusal::Streams => "streams",
            Refusal::LoginRate => "login_rate",
            Refusal::Origin => "origin",
        }
    }

    /// The answer to a refused request.
    fn reply(self) -> Reply {
        match self {
            Refusal::Token => {
                let mut r = text(
                    StatusCode::UNAUTHORIZED,
                    "admin token required: send Authorization: Bearer TOKEN\n",
                );
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            Refusal::ReloadRate => {
                let mut r = text(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many reloads: at most {RELOADS_PER_SEC} a second\n"),
                );
                r.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            // The rest of the body is left unread: the connection cannot carry another
            // request, and says so (hyper then closes it once the answer is written).
            Refusal::TooLarge => closing(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_BODY} bytes\n"),
            )),
            Refusal::Timeout => closing(text(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {HEAD_TIMEOUT:?}\n"),
            )),
            Refusal::BadRequest => closing(text(StatusCode::BAD_REQUEST, "bad request body\n")),
            Refusal::Streams => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many dashboard pages open: close one, or raise admin_connections\n",
            ),
            Refusal::Origin => text(
                StatusCode::FORBIDDEN,
                "refused: a request made for another site, or naming this listener by a host \
                 name while it has no admin_token (name it by address, or set a token)\n",
            ),
            Refusal::LoginRate => {
                let mut r = text(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "too many logins: at most {} a second\n",
                        dashboard::LOGINS_PER_SEC
                    ),
                );
                r.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
        }
    }
}

/// A response: whole (most routes) or streamed (the dashboard's events and sends).
/// The body is a local trait object: a stream's state lives on the listener's thread.
type Reply = Response<LocalBody>;
type LocalBody = Pin<Box<dyn Body<Data = Bytes, Error = Infallible>>>;

/// `body` as a [`LocalBody`].
fn local(body: impl Body<Data = Bytes, Error = Infallible> + 'static) -> LocalBody {
    Box::pin(body)
}

/// A response with `body` of type `ctype`.
fn reply(status: StatusCode, ctype: &'static str, body: String) -> Reply {
    let mut r = Response::new(local(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// `r` with `Connection: close`.
fn closing(mut r: Reply) -> Reply {
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    reply(status, TEXT, body.into())
}

impl Admin {
    /// Made on the listener's thread, inside its `LocalSet` (the sampler is a task there).
    fn new(hub: Arc<Hub>, reload: Reload, limit: usize, hub_addr: SocketAddr) -> Admin {
        let (history, samples) = history::start(hub.clone());
        Admin {
            logins: RefCell::new(std::collections::HashMap::new()),
            all_logins: RefCell::new(Bucket::full(ALL_LOGINS_PER_SEC)),
            history,
            samples,
            streams: Cell::new(0),
            sends: Cell::new(0),
            hub_addr,
            hub,
            reload,
            conns: RefCell::new(Conns {
                limit: limit.max(1),
                next_id: 0,
                open: BTreeMap::new(),
            }),
            reloads: RefCell::new(Bucket::full(RELOADS_PER_SEC)),
            counts: Counts::default(),
        }
    }

    /// Serves an accepted connection on a task of its own, making room for it first.
    fn open(self: &Rc<Self>, stream: TcpStream, peer: SocketAddr) {
        bump(&self.counts.accepted);
        self.make_room();
        let _ = stream.set_nodelay(true);
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_send_buffer_size(SEND_BUFFER);
        let _ = sock.set_tcp_user_timeout(Some(PEER_TIMEOUT));
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(PEER_TIMEOUT / 2)
            .with_interval(PEER_TIMEOUT / 6)
            .with_retries(3);
        let _ = sock.set_tcp_keepalive(&keepalive);
        let phase = Rc::new(Cell::new(Phase::waiting(Instant::now())));
        let id = self.conns.borrow_mut().next();
        let registered = Registered {
            admin: self.clone(),
            id,
        };
        let task = tokio::task::spawn_local(self.clone().connection(
            stream,
            peer,
            phase.clone(),
            registered,
        ));
        let slot = Slot {
            phase,
            task: task.abort_handle(),
        };
        self.conns.borrow_mut().open.insert(id, slot);
    }

    /// At the connection limit, closes the connection [`Conns::victim`] names.
    fn make_room(&self) {
        let evicted = {
            let mut conns = self.conns.borrow_mut();
            if conns.open.len() < conns.limit {
                return;
            }
            conns.victim().and_then(|id| conns.open.remove(&id))
        };
        if let Some(slot) = evicted {
            slot.task.abort();
            bump(&self.counts.evicted);
        }
    }

    /// Serves HTTP/1 on one connection until it closes, fails or passes a deadline.
    async fn connection(
        self: Rc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        phase: Rc<Cell<Phase>>,
        _registered: Registered,
    ) {
        let io = TokioIo::new(Timed::new(stream, phase.clone()));
        let admin = self.clone();
        let answering = phase.clone();
        let service = service_fn(move |req| admin.clone().answer(req, peer, answering.clone()));
        let served = http1::Builder::new()
            .max_headers(MAX_HEADERS)
            .max_header_size(MAX_HEAD)
            .header_read_timeout(None::<Duration>)
            .serve_connection(io, service)
            .await;
        if let Phase::Expired = phase.get() {
            bump(&self.counts.timed_out);
        } else if let Err(e) = served {
            self.failed(&e, peer);
        }
    }

    /// Counts a request head hyper refused (it answered 431 or 400 and closed).
    fn failed(&self, e: &hyper::Error, peer: SocketAddr) {
        if e.is_parse_too_large() {
            self.refused(Refusal::TooLarge, peer);
        } else if e.is_parse() {
            self.refused(Refusal::BadRequest, peer);
        } else {
            trace!(%peer, error = %e, "admin connection failed");
        }
    }

    /// Answers one request; the connection counts as busy meanwhile.
    async fn answer(
        self: Rc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        phase: Rc<Cell<Phase>>,
    ) -> Result<Reply, Infallible> {
        phase.set(Phase::Answering);
        let _waiting_again = Answering(phase.clone());
        // One request per connection per turn of the runtime (this yield wakes the task
        // only after the others ran and the sockets were polled): a client pipelining
        // requests cannot keep the other connections, or the accept, waiting.
        tokio::task::yield_now().await;
        Ok(self.respond(req, peer, &phase).await)
    }

    /// The response to one request: the token, then the body, then the route. What needs
    /// no token: `/healthz`, the page's assets, the login form and its answer.
    async fn respond(
        self: &Rc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        phase: &Rc<Cell<Phase>>,
    ) -> Reply {
        let (head, body) = req.into_parts();
        let path = head.uri.path();
        let method = &head.method;
        if method == Method::GET
            && let Some(asset) = dashboard::asset(path)
        {
            return asset;
        }
        if let Err(why) = self.same_origin(method, path, &head.headers) {
            return self.refuse(why, peer);
        }
        let by = self.authorized(&head.headers);
        // A cookie goes with any request the browser makes to this host, whoever asked
        // for it: it authorises what changes nothing, and a send (whose header no other
        // site can set without a preflight this listener never grants), nothing else.
        let authorized = match by {
            Some(By::Cookie) => method == Method::GET || path == "/api/send",
            Some(_) => true,
            None => false,
        };
        let limit = match (method, path) {
            (&Method::POST, "/api/send") => dashboard::MAX_SEND_BODY,
            _ => MAX_BODY,
        };
        let public = matches!(path, "/healthz" | "/login" | "/logout")
            || (path == "/" && method == Method::GET);
        if !public && !authorized {
            return self.refuse(Refusal::Token, peer);
        }
        let body = match read_body(body, limit).await {
            Ok(b) => b,
            Err(refusal) => return self.refuse(refusal, peer),
        };
        debug!(%method, %path, "admin request");
        let query = head.uri.query().unwrap_or("");
        match (method, path) {
            (&Method::GET, "/") if authorized => dashboard::index(),
            (&Method::GET, "/") => dashboard::login_page(None),
            (&Method::POST, "/login") => self.login(&body, peer),
            (&Method::POST, "/logout") => dashboard::logged_out(),
            (&Method::GET, "/api/stream") => dashboard::stream(self, query, &head.headers, phase)
                .unwrap_or_else(|refusal| self.refuse(refusal, peer)),
            (&Method::POST, "/api/send") => dashboard::send(self, &head.headers, &body, phase),
            (_, "/" | "/login" | "/logout" | "/api/stream" | "/api/send") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => self.route(method, path, query, peer),
        }
    }

    /// `POST /login`: the token from the form, within the login rate of its source.
    fn login(&self, body: &[u8], peer: SocketAddr) -> Reply {
        let now = Instant::now();
        let allowed = self.all_logins.borrow_mut().take(now) && {
            let mut logins = self.logins.borrow_mut();
            // One source is an IPv4 address or an IPv6 /64 (what one host can hold);
            // past the table's size every new source shares one bucket.
            let source = match peer.ip().to_canonical() {
                std::net::IpAddr::V6(a) => {
                    let s = a.segments();
                    std::net::IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    ))
                }
                v4 => v4,
            };
            let key = if logins.len() < LOGIN_SOURCES || logins.contains_key(&source) {
                source
            } else {
                std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            };
            (logins.entry(key))
                .or_insert_with(|| Bucket::full(dashboard::LOGINS_PER_SEC))
                .take(now)
        };
        if !allowed {
            return self.refuse(Refusal::LoginRate, peer);
        }
        let presented = dashboard::form_token(body);
        let config = self.hub.config();
        match &config.admin_token {
            None => dashboard::logged_in(None),
            Some(token) if token.verify(&presented) => dashboard::logged_in(Some(token)),
            Some(_) => {
                drop(config);
                self.refused(Refusal::Token, peer);
                dashboard::login_page(Some("wrong token"))
            }
        }
    }

    /// How many dashboard streams may be open at once: half the admin connections, so
    /// that open pages always leave room for scrapes and `/healthz`.
    fn stream_limit(&self) -> usize {
        (self.conns.borrow().limit / 2).max(1)
    }

    /// How the request is authorised, if it is: no token set, the bearer header, or the
    /// dashboard's cookie.
    fn authorized(&self, headers: &HeaderMap) -> Option<By> {
        let config = self.hub.config();
        let Some(token) = &config.admin_token else {
            return Some(By::Open);
        };
        let header = headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .is_some_and(|presented| token.verify(presented));
        if header {
            return Some(By::Bearer);
        }
        dashboard::cookie_valid(headers, token).then_some(By::Cookie)
    }

    /// Refuses what a browser sends on another site's behalf.
    ///
    /// - Without a token, only requests naming this listener by IP address or as
    ///   `localhost` are served (`/healthz` excepted): a page that rebinds its own name
    ///   to 127.0.0.1 names itself in `Host`, and plain-HTTP pages get no `Sec-Fetch-*`
    ///   headers to tell them by. A listener reached by a host name needs `admin_token`.
    /// - A request that changes something, or opens the dashboard's stream or send, is
    ///   refused when the browser says another site asked for it (`Sec-Fetch-Site`
    ///   `cross-site` or `same-site`), or, from a browser that does not say, when its
    ///   `Origin` names another host than `Host`.
    fn same_origin(&self, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let open = self.hub.config().admin_token.is_none();
        if open && path != "/healthz" && !literal_host(host) {
            return Err(Refusal::Origin);
        }
        let guarded =
            (method != Method::GET && method != Method::HEAD) || path.starts_with("/api/");
        if !guarded {
            return Ok(());
        }
        let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        match site {
            Some(s) if s.eq_ignore_ascii_case("same-origin") || s.eq_ignore_ascii_case("none") => {
                Ok(())
            }
            Some(_) => Err(Refusal::Origin),
            None => {
                let origin = headers
                    .get(hyper::header::ORIGIN)
                    .and_then(|o| o.to_str().ok());
                match origin {
                    None => Ok(()),
                    Some(o) => {
                        let named = o
                            .strip_prefix("http://")
                            .or_else(|| o.strip_prefix("https://"));
                        if named.is_some_and(|n| n.eq_ignore_ascii_case(host)) {
                            Ok(())
                        } else {
                            Err(Refusal::Origin)
                        }
                    }
                }
            }
        }
    }

    /// The response of a route.
    fn route(&self, method: &Method, path: &str, query: &str, peer: SocketAddr) -> Reply {
        match (method, path) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/metrics") => {
                reply(StatusCode::OK, "text/plain; version=0.0.4", self.metrics())
            }
            (&Method::GET, "/shims") => match shims(&self.hub, query) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            (&Method::GET, "/state") => match state(&self.hub, query) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            (&Method::POST, "/reload") => self.reload(peer),
            (_, "/healthz" | "/metrics" | "/shims" | "/state" | "/reload") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try / (the dashboard), /metrics, /healthz, /shims?pattern=P, /state?pattern=P, POST /reload\n",
            ),
        }
    }

    /// `POST /reload`, within its rate.
    fn reload(&self, peer: SocketAddr) -> Reply {
        if !self.reloads.borrow_mut().take(Instant::now()) {
            return self.refuse(Refusal::ReloadRate, peer);
        }
        match (self.reload)() {
            Ok(msg) => text(StatusCode::OK, format!("{msg}\n")),
            Err(ReloadRefused::Failed(e)) => {
                text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
            }
            Err(ReloadRefused::Nothing(e)) => text(StatusCode::CONFLICT, format!("{e}\n")),
        }
    }

    /// Counts and logs a refusal; returns its answer.
    fn refuse(&self, refusal: Refusal, peer: SocketAddr) -> Reply {
        self.refused(refusal, peer);
        refusal.reply()
    }

    /// Counts a refusal, and logs it unless its reason was logged within [`LOG_EVERY`].
    fn refused(&self, refusal: Refusal, peer: SocketAddr) {
        let i = refusal as usize;
        let total = bump(&self.counts.refused[i]);
        if due(&self.counts.logged[i]) {
            warn!(
                reason = refusal.label(),
                %peer,
                total,
                "admin request refused (logged at most once a minute per reason; \
                 velium_admin_refused_total counts them all)"
            );
        }
    }

    /// Logs a failed accept, at most once a minute.
    fn accept_failed(&self, e: &io::Error) {
        if due(&self.counts.accept_failure_logged) {
            warn!(error = %e, "admin accept failed (logged at most once a minute)");
        }
    }

    /// The `/metrics` text: the hub's, then the listener's own.
    fn metrics(&self) -> String {
        let mut o = render(&self.hub);
        let c = &self.counts;
        let one = |v: u64| [(String::new(), v)];
        let conns = self.conns.borrow();
        family(
            &mut o,
            "velium_admin_connections",
            "gauge",
            "Admin connections open.",
            &one(conns.open.len() as u64),
        );
        family(
            &mut o,
            "velium_admin_connections_limit",
            "gauge",
            "Admin connections served at once (admin_connections); another one closes the one idle longest.",
            &one(conns.limit as u64),
        );
        family(
            &mut o,
            "velium_admin_connections_accepted_total",
            "counter",
            "Admin connections accepted.",
            &one(c.accepted.get()),
        );
        family(
            &mut o,
            "velium_admin_closed_total",
            "counter",
            "Admin connections closed by the listener: evicted to make room, or past a read or write timeout.",
            &[
                ("{reason=\"evicted\"}".into(), c.evicted.get()),
                ("{reason=\"timeout\"}".into(), c.timed_out.get()),
            ],
        );
        let refused = Refusal::ALL.map(|r| {
            let labels = format!("{{reason=\"{}\"}}", r.label());
            (labels, c.refused[r as usize].get())
        });
        family(
            &mut o,
            "velium_admin_refused_total",
            "counter",
            "Admin requests refused: no or wrong token, reload rate, too large, too slow, malformed.",
            &refused,
        );
        o
    }
}

impl Conns {
    /// A new connection's id.
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The connection to close to make room: the one waiting longest for a request, else
    /// the oldest one not streaming to a dashboard page or a send, else the oldest.
    fn victim(&self) -> Option<u64> {
        let waiting = self
            .open
            .iter()
            .filter_map(|(&id, slot)| Some((slot.phase.get().waiting_since()?, id)))
            .min();
        let busy = || {
            (self.open.iter())
                .find(|(_, slot)| !matches!(slot.phase.get(), Phase::Streaming))
                .map(|(&id, _)| id)
        };
        waiting
            .map(|(_, id)| id)
            .or_else(busy)
            .or_else(|| self.open.keys().next().copied())
    }
}

/// Takes a connection out of [`Conns`] when its task ends or is dropped.
struct Registered {
    admin: Rc<Admin>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.admin.conns.borrow_mut().open.remove(&self.id);
    }
}

/// Marks a connection waiting again once its response is made (or its request dropped),
/// unless it expired meanwhile.
struct Answering(Rc<Cell<Phase>>);

impl Drop for Answering {
    fn drop(&mut self) {
        if let Phase::Answering = self.0.get() {
            self.0.set(Phase::waiting(Instant::now()));
        }
    }
}

impl Phase {
    fn waiting(now: Instant) -> Phase {
        Phase::Waiting {
            since: now,
            head: None,
        }
    }

    fn waiting_since(self) -> Option<Instant> {
        match self {
            Phase::Waiting { since, .. } => Some(since),
            Phase::Answering | Phase::Streaming | Phase::Expired => None,
        }
    }

    /// The phase after bytes arrived at `now`: a head has begun, if none had.
    fn heard(self, now: Instant) -> Phase {
        match self {
            Phase::Waiting { since, head: None } => Phase::Waiting {
                since,
                head: Some(now),
            },
            other => other,
        }
    }

    /// When a read still waiting must fail, and why; `None` unless waiting.
    fn read_deadline(self) -> Option<(Instant, &'static str)> {
        match self {
            Phase::Waiting { since, head: None } => {
                Some((since + IDLE_TIMEOUT, "no request within the idle timeout"))
            }
            Phase::Waiting {
                head: Some(head), ..
            } => Some((head + HEAD_TIMEOUT, "request head not complete in time")),
            Phase::Answering | Phase::Streaming | Phase::Expired => None,
        }
    }
}

/// A token bucket: `rate` a second, bursts of `rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64) -> Bucket {
        Bucket {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Takes one token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// Adds one to a count; returns the new value.
fn bump(count: &Cell<u64>) -> u64 {
    count.set(count.get() + 1);
    count.get()
}

/// Whether a line throttled to one per [`LOG_EVERY`] may be logged now (and notes it).
fn due(last: &Cell<Option<Instant>>) -> bool {
    let now = Instant::now();
    if last
        .get()
        .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
    {
        return false;
    }
    last.set(Some(now));
    true
}

/// How a request was authorised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum By {
    /// No admin token is set.
    Open,
    /// `Authorization: Bearer TOKEN`.
    Bearer,
    /// The dashboard's login cookie.
    Cookie,
}

/// Whether a `Host` header names the listener by an IP address or as `localhost` (with or
/// without a port): never a name a page elsewhere could have pointed here.
fn literal_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// The token of an `Authorization: Bearer TOKEN` value (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

/// Reads a request body: at most `limit` bytes, within [`HEAD_TIMEOUT`].
async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Refusal> {
    if body.size_hint().lower() > limit as u64 {
        return Err(Refusal::TooLarge);
    }
    let limited = Limited::new(body, limit).collect();
    match tokio::time::timeout(HEAD_TIMEOUT, limited).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(Refusal::TooLarge),
        Ok(Err(_)) => Err(Refusal::BadRequest),
        Err(_) => Err(Refusal::Timeout),
    }
}

/// A connection's socket whose reads and writes fail once they wait past their deadline:
/// a read waiting for a request head by the idle or head timeout of its [`Phase`], a write
/// after [`WRITE_TIMEOUT`] without progress.
struct Timed {
    stream: TcpStream,
    phase: Rc<Cell<Phase>>,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    /// When the write waiting since its last progress fails.
    write_deadline: Option<Instant>,
}

impl Timed {
    fn new(stream: TcpStream, phase: Rc<Cell<Phase>>) -> Timed {
        let now = Instant::now();
        Timed {
            stream,
            phase,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            write_deadline: None,
        }
    }

    /// A write's result: progress clears its deadline; waiting starts it, or fails past it.
    fn written<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.write_deadline = None;
            return r;
        }
        let at = *self
            .write_deadline
            .get_or_insert_with(|| Instant::now() + WRITE_TIMEOUT);
        ready!(wait_until(&mut self.write_timer, at, cx));
        self.expired("response not read within the write timeout")
    }

    /// Marks the connection expired; the error that closes it.
    fn expired<T>(&self, what: &'static str) -> Poll<io::Result<T>> {
        self.phase.set(Phase::Expired);
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
    }
}

/// Pending until `at` (the task is woken then), then ready.
fn wait_until(timer: &mut Pin<Box<Sleep>>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    if timer.deadline() != at {
        timer.as_mut().reset(at);
    }
    timer.as_mut().poll(cx)
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => match this.phase.get().read_deadline() {
                Some((at, what)) => {
                    ready!(wait_until(&mut this.read_timer, at, cx));
                    this.expired(what)
                }
                None => Poll::Pending,
            },
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.phase.set(this.phase.get().heard(Instant::now()));
                Poll::Ready(Ok(()))
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.written(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.written(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
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
    /// The connection speaks TLS (its UDP, if any, is sealed).
    tls: bool,
    frames_in: u64,
    frames_out: u64,
}

/// The `pattern` query parameter, a target that may carry filters (every shim without
/// one).
fn pattern_of(query: &str) -> Result<Target, String> {
    let pattern = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "pattern")
        .map(|(_, v)| v.into_owned());
    match pattern.as_deref() {
        None | Some("") => Ok(Target::all()),
        Some(p) => Target::parse(p.as_bytes()).map_err(|e| format!("bad pattern {p:?}: {e}")),
    }
}

/// One key in the `/state` listing.
#[derive(Serialize)]
struct KeyInfo {
    /// The value as text (bytes that are not UTF-8 shown as U+FFFD; 0x0B stands for a
    /// newline, as on the wire).
    value: String,
    /// Milliseconds since the value was set.
    age_ms: u64,
}

/// One shim in the `/state` listing.
#[derive(Serialize)]
struct StateInfo {
    identity: String,
    /// Its keys, in alphabetical order (a JSON object).
    keys: serde_json::Map<String, serde_json::Value>,
}

/// The relay state of the identified shims matching the `pattern` query parameter.
fn state(hub: &Hub, query: &str) -> Result<String, String> {
    let pattern = pattern_of(query)?;
    let now_ms = hub.ms(std::time::Instant::now());
    let mut list = Vec::new();
    hub.for_each_selected(&pattern, false, |s| {
        if !s.is_identified() {
            return;
        }
        let mut keys = serde_json::Map::new();
        hub.state_items(s, |key, value, at_ms| {
            let info = KeyInfo {
                value: String::from_utf8_lossy(value).into_owned(),
                age_ms: now_ms.saturating_sub(at_ms),
            };
            if let Ok(v) = serde_json::to_value(info) {
                keys.insert(key.to_string(), v);
            }
        });
        list.push(StateInfo {
            identity: s.identity().to_string(),
            keys,
        });
    });
    list.sort_by(|a, b| a.identity.cmp(&b.identity));
    #[derive(Serialize)]
    struct Listing {
        shims: Vec<StateInfo>,
    }
    serde_json::to_string_pretty(&Listing { shims: list }).map_err(|e| e.to_string())
}

/// The identified shims matching the `pattern` query parameter (every shim without one).
fn shims(hub: &Hub, query: &str) -> Result<String, String> {
    let pattern = pattern_of(query)?;
    let mut list = Vec::new();
    hub.for_each_selected(&pattern, false, |s| {
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
            tls: s.is_tls(),
            frames_in: s.frames_in.load(Ordering::Relaxed),
            frames_out: s.frames_out.load(Ordering::Relaxed),
        })
    });
    list.sort_by(|a, b| a.identity.cmp(&b.identity));
    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())
}

/// The opcodes reported per frame counter, with the slot of "any other byte" last.
const OPCODES: [(u8, &str); 22] = [
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
    (0x10, "Set"),
    (0x11, "Subscribe"),
    (0x12, "Unsubscribe"),
    (0x13, "Get"),
    (0x14, "Presence"),
    (0x15, "unknown"),
];

/// One metric family in the Prometheus text format: its help, type and samples.
fn family(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

/// Everything the hub reports in `/metrics`, in the Prometheus text exposition format
/// (the admin listener appends its own).
pub fn render(hub: &Hub) -> String {
    debug_assert_eq!(Opcode::Auth as u8, 0x0F);
    let m = &hub.metrics;
    let c = &m.counters;
    let mut o = String::with_capacity(16 * 1024);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        family(&mut o, name, kind, help, samples)
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
        "velium_handoffs_total",
        "counter",
        "Lists of outboxes one core handed to the core that owns them, to flush (at most one per destination core per slice of input).",
        &one(hub.handoff.handoffs.load(Ordering::Relaxed)),
    );
    metric(
        "velium_handoff_flushes_total",
        "counter",
        "Outboxes flushed by their own core after a hand-off.",
        &one(hub.handoff.handed.load(Ordering::Relaxed)),
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
        "velium_tls_handshakes_total",
        "counter",
        "TLS handshakes finished (each TLS session has sealed UDP from then on).",
        &one(get(&c.tls_established)),
    );
    let sealed: Vec<(String, u64)> = SealError::ALL
        .iter()
        .zip(&c.sealed_dropped)
        .map(|(e, n)| (format!("{{reason=\"{}\"}}", e.label()), get(n)))
        .collect();
    metric(
        "velium_sealed_dropped_total",
        "counter",
        "Sealed datagrams dropped: too short, an unknown session id, a counter seen before or behind the window, a tag that does not verify.",
        &sealed,
    );
    metric(
        "velium_udp_address_taken_total",
        "counter",
        "Plain UDP binds that moved an address away from another live session.",
        &one(get(&c.udp_address_taken)),
    );
    metric(
        "velium_state_keys",
        "gauge",
        "Relay state keys held by connected shims.",
        &one(get(&c.state_keys)),
    );
    metric(
        "velium_state_subscriptions",
        "gauge",
        "Relay state subscriptions open.",
        &one(hub.states.subscriptions() as u64),
    );
    metric(
        "velium_state_sets_total",
        "counter",
        "Set frames applied.",
        &one(get(&c.state_sets)),
    );
    metric(
        "velium_state_changes_total",
        "counter",
        "State keys changed by Set (a new value, or a deletion).",
        &one(get(&c.state_changes)),
    );
    metric(
        "velium_state_delivered_total",
        "counter",
        "State items delivered to subscribers.",
        &one(get(&c.state_delivered)),
    );
    metric(
        "velium_state_coalesced_total",
        "counter",
        "State changes replaced by a later value before their delivery (coalesced away).",
        &one(get(&c.state_coalesced)),
    );
    metric(
        "velium_state_reselected_total",
        "counter",
        "Shims that entered or left a filtered subscription's selection.",
        &one(get(&c.state_reselected)),
    );
    metric(
        "velium_filtered_targets_total",
        "counter",
        "Filtered targets resolved: Command, Echo, Who and Get frames and admin queries (a Subscribe's selection is kept per shim instead).",
        &one(get(&c.filtered_targets)),
    );
    metric(
        "velium_filter_candidates_total",
        "counter",
        "Shims looked at to resolve filtered targets (index candidates or pattern matches).",
        &one(get(&c.filter_candidates)),
    );
    metric(
        "velium_slow_consumers_total",
        "counter",
        "Shims cut off for passing outbound_limit.",
        &one(get(&c.slow_consumers)),
    );
    if let Some(cl) = hub.cluster() {
        let s = &cl.stats;
        let dirs = |o: &std::sync::atomic::AtomicU64, i: &std::sync::atomic::AtomicU64| {
            vec![
                ("{dir=\"out\"}".to_string(), get(o)),
                ("{dir=\"in\"}".to_string(), get(i)),
            ]
        };
        metric(
            "velium_cluster_connected",
            "gauge",
            "1 while the node is connected to the cluster's NATS server.",
            &one(u64::from(cl.is_reachable())),
        );
        metric(
            "velium_cluster_nodes",
            "gauge",
            "Other nodes of the cluster in sight.",
            &one(get(&s.nodes)),
        );
        metric(
            "velium_cluster_remote_shims",
            "gauge",
            "Shims of other nodes known here.",
            &one(get(&s.remote_shims)),
        );
        metric(
            "velium_cluster_messages_total",
            "counter",
            "NATS messages published (out) and received (in).",
            &dirs(&s.messages_out, &s.messages_in),
        );
        metric(
            "velium_cluster_bytes_total",
            "counter",
            "NATS message payload bytes published (out) and received (in).",
            &dirs(&s.bytes_out, &s.bytes_in),
        );
        metric(
            "velium_cluster_dropped_total",
            "counter",
            "Items to or from other nodes dropped because a queue between NATS and the cores was full.",
            &one(get(&s.dropped)),
        );
        metric(
            "velium_cluster_disconnects_total",
            "counter",
            "Times the connection to NATS was lost.",
            &one(get(&s.disconnects)),
        );
        metric(
            "velium_cluster_resyncs_total",
            "counter",
            "Snapshots asked of other nodes after a gap in their presence.",
            &one(get(&s.resyncs)),
        );
    }
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
    fetch_with(addr, method, path, None)
}

/// Like [`fetch`], sending `Authorization: Bearer TOKEN` when `token` is given.
pub fn fetch_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("http://{addr}{path}");
    let res = match method {
        "POST" => with_token(agent.post(&url), token).send_empty(),
        _ => with_token(agent.get(&url), token).call(),
    };
    let mut resp = res.map_err(|e| format!("admin listener at {addr}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("admin listener at {addr}: {e}"))?;
    Ok((status, body))
}

/// `req` with `Authorization: Bearer TOKEN` when `token` is given.
fn with_token<B>(req: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
    match token {
        Some(t) => req.header(AUTHORIZATION, format!("Bearer {t}")),
        None => req,
    }
}

/// The value of the sample `name` (with its labels, exactly as printed, e.g.
/// `velium_refused_total{reason="rate"}`) in a `/metrics` text; `None` if absent.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
