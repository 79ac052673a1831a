//! The client library: what a shim, the `velium` CLI, a test or a load generator uses to
//! talk to a hub.
//!
//! # Model
//!
//! A [`Client`] is one identified session: a TCP control connection, plus an optional UDP
//! channel bound to the same session with [`Client::bind_udp`]. Every method takes `&self`
//! (bar [`Client::close`]), so one client can be shared behind an `Arc` by many tasks: some
//! sending requests, one consuming [`Event`]s.
//!
//! ```no_run
//! # async fn demo() -> Result<(), velium_server::client::ClientError> {
//! use velium_server::client::{Client, Event};
//! use std::time::Duration;
//!
//! let client = Client::connect("127.0.0.1:12345".parse().unwrap(), "peq.ecommons.bob").await?;
//! client.bind_udp().await?;
//! let sent = client.command("peq.*.cleric", "/cast 1").await?;
//! for r in client.collect_responses(sent.id, sent.reached, Duration::from_secs(5)).await {
//!     println!("{}: {}", r.from, r.text);
//! }
//! while let Some(event) = client.next_event().await {
//!     if let Event::Command { id, text, .. } = event {
//!         client.respond(id, &text).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # How replies find their request
//!
//! The server answers every Command, Echo and Who with exactly one Ack or Error, in request
//! order per transport, and those replies carry nothing that names the request (an Echo's
//! Ack and every Error look alike). So the client pairs them by order: a sender queues a
//! waiter and writes its frame while holding the writer lock, which makes the waiter queue
//! and the byte stream agree; the background reader hands each Ack or Error to the oldest
//! waiter. Pongs are paired by their data instead, since ping data is the caller's.
//!
//! UDP can lose a request or its reply, which would put a queue out of step for good. So
//! over UDP a client has at most one request in flight (stop and wait), and after a reply
//! failed to come it first re-synchronises with a Ping: the server answers one source's
//! datagrams in order, so once the Pong is back no late reply to an abandoned request can
//! still arrive and be taken for the next one's. Use several clients for parallel UDP load.
//!
//! # Deliveries
//!
//! Commands, Echoes and Responses addressed to this client, unsolicited Errors, Quit and
//! the end of the connection arrive as [`Event`]s, from both transports, in one queue that
//! [`Client::next_event`] reads. The queue is unbounded: a reader that stopped to wait for
//! an application that does not read events would also stop handing out Acks, and a
//! request awaiting its Ack would then wait for ever. An application must therefore keep
//! reading events (or drop the client) — the server cuts off a slow consumer anyway.
//!
//! Receiving is meant to be cheap enough for a load generator: an event costs one
//! allocation for its text, the sender's identity is shared (an `Arc<str>` reused while
//! deliveries keep coming from the same sender, as in a fan-out), and the queue is a plain
//! locked deque, so taking an event that is already there neither awaits a lock nor
//! registers a waker.
//!
//! # Source address
//!
//! By default the kernel picks the local address. [`ClientOptions::bind_ip`] picks it
//! instead, for both sockets: what a load generator or a multi-homed host needs to hold
//! more connections to one server than one address's ephemeral ports allow (see there).
//!
//! # Text
//!
//! Frames end at 0x0A, so text on the wire carries 0x0B for a line break. This library
//! converts both ways: pass text with `\n` and receive text with `\n`; no caller ever sees
//! 0x0B. Targets, identities and ping data cannot hold line breaks and are checked before
//! anything is sent, so a bad argument is an [`ClientError::Invalid`] rather than an
//! out-of-step reply queue.
//!
//! # Runtime
//!
//! The client spawns its reader, UDP reader and keep-alive tasks on the current tokio
//! runtime (any flavour); they end when the connection ends or the client is dropped.

use crate::proto::codec;
use crate::proto::identity::check_identity;
use crate::proto::{ALT_NEWLINE, NEWLINE, Opcode, SP, Token, encode};
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Notify, OnceCell, oneshot};
use tokio::task::{AbortHandle, JoinHandle};

/// How much the TCP reader asks the kernel for per read.
const READ_CHUNK: usize = 16 * 1024;
/// The longest frame the client accepts: the largest `max_frame` a server can be given.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long each UDP bind attempt waits for its Pong before sending again (doubling is
/// cheaper than a fixed wait on a quiet LAN and still patient over a slow link).
const BIND_WAITS_MS: [u64; 5] = [100, 200, 400, 800, 1600];
/// Queued events past which the TCP reader yields to other tasks after a read.
const YIELD_BACKLOG: usize = 64;
/// Ping data the keep-alive uses.
const KEEPALIVE_DATA: &[u8] = b"velium-keepalive";

/// The transport a frame travelled over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The TCP control connection.
    Tcp,
    /// The bound UDP channel.
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

/// What the server said about a Command it accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The command's id: the targets answer with it, and every [`Response`] carries it.
    pub id: u64,
    /// How many shims it was delivered to, so how many responses to expect at most.
    pub reached: usize,
}

/// One connected shim, as listed by [`Client::who`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhoEntry {
    /// Its identity.
    pub identity: String,
    /// When its TCP connection was accepted (the server's clock).
    pub since: SystemTime,
    /// Whether it has a bound UDP channel.
    pub udp: bool,
}

/// A target's answer to a Command this client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The id of the command answered (see [`Sent::id`]).
    pub id: u64,
    /// The responder's identity (shared with other events from the same sender).
    pub from: Arc<str>,
    /// The response text, line breaks as `\n`.
    pub text: String,
    /// The transport it arrived on.
    pub via: Transport,
}

/// Something the server sent that is not a reply to one of this client's requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A Command for this client; answer it with [`Client::respond`] (or
    /// [`Client::respond_udp`]) and the same `id`.
    Command {
        /// The sender's identity (shared with other events from the same sender).
        from: Arc<str>,
        /// The command id to answer with.
        id: u64,
        /// The command text, line breaks as `\n`.
        text: String,
        /// The transport it arrived on.
        via: Transport,
    },
    /// An Echo for this client.
    Echo {
        /// The sender's identity (shared with other events from the same sender).
        from: Arc<str>,
        /// The text, line breaks as `\n`.
        text: String,
        /// The transport it arrived on.
        via: Transport,
    },
    /// A response to one of this client's Commands.
    Response(Response),
    /// An Error no request of this client was waiting for.
    Error {
        /// The server's reason.
        message: String,
        /// The transport it arrived on.
        via: Transport,
    },
    /// The server sent Quit. Over TCP it precedes the end of the connection (typically
    /// after the idle timeout); over UDP it means the server no longer knows this UDP
    /// channel, and [`Client::bind_udp`] binds it again.
    Quit {
        /// The transport it arrived on.
        via: Transport,
    },
    /// The TCP connection ended; this is the last event, after which
    /// [`Client::next_event`] returns `None`.
    Closed {
        /// Why, for a log line.
        reason: String,
    },
}

impl Event {
    /// The transport the event arrived on (`None` for [`Event::Closed`]).
    pub fn via(&self) -> Option<Transport> {
        match self {
            Event::Command { via, .. }
            | Event::Echo { via, .. }
            | Event::Error { via, .. }
            | Event::Quit { via } => Some(*via),
            Event::Response(r) => Some(r.via),
            Event::Closed { .. } => None,
        }
    }
}

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("server unreachable at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// What the connect returned.
        source: io::Error,
    },
    /// The server found no shim for a Command or Echo target.
    #[error("no shim matches {target}")]
    NoMatch {
        /// The target as the server quoted it.
        target: String,
    },
    /// The server refused a request with this reason (for example a bad target).
    #[error("{0}")]
    Server(String),
    /// A reply did not arrive in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The connection is over.
    #[error("server closed the connection")]
    Closed,
    /// An argument was refused before anything was sent.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A UDP method was called before [`Client::bind_udp`] succeeded.
    #[error("the UDP channel is not bound (call bind_udp first)")]
    NotBound,
    /// [`Client::bind_udp`] gave up.
    #[error("UDP bind failed: {0}")]
    Bind(String),
    /// The server answered a UDP request with Quit: it no longer knows this channel.
    #[error("the server no longer knows this UDP channel; bind it again")]
    UdpUnbound,
    /// The server sent something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A socket operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Tuning for [`Client::connect_with`]; [`Default`] suits a shim.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Limit for the TCP connect and for the Session reply to Identify. Default 5 s.
    pub connect_timeout: Duration,
    /// Limit for an Ack, Who listing or Pong over TCP. TCP loses nothing, so this only
    /// guards against a hung server. Default 10 s.
    pub request_timeout: Duration,
    /// Limit for a reply over UDP, where a lost datagram means no reply ever. Default 1 s.
    pub udp_timeout: Duration,
    /// Ping the server this often so the idle timeout (30 s by default) never closes a
    /// quiet client; a keep-alive Ping left unanswered for `request_timeout` (or the
    /// interval, if longer) closes the connection, so a dead hub is noticed. `None` turns
    /// it off (short-lived tools). Default 10 s.
    pub keepalive: Option<Duration>,
    /// The local address both sockets bind to before connecting (the port is still the
    /// kernel's choice); `None` lets the kernel pick, which is what a shim wants. It must be
    /// of the server address's family.
    ///
    /// Why: a TCP connection is named by its source and destination address and port, so
    /// one source address can hold only as many connections to one server as it has
    /// ephemeral ports (about 28,000 with Linux's default `ip_local_port_range`), and the
    /// kernel's search for a free port slows down well before that. A load generator, or a
    /// host with several addresses, spreads its clients over addresses (127.0.0.1,
    /// 127.0.0.2, ... on loopback) to go past that. The TCP socket sets
    /// `IP_BIND_ADDRESS_NO_PORT`, so that bind(2) does not reserve a port for every
    /// destination at once: connect(2) picks one free for this server only. Default `None`.
    pub bind_ip: Option<IpAddr>,
    /// The hub's shared secret, sent in an Auth frame before Identify (a hub without a
    /// secret ignores it). It may not hold the byte 0x0A. Default `None`.
    pub secret: Option<Vec<u8>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            udp_timeout: Duration::from_secs(1),
            keepalive: Some(Duration::from_secs(10)),
            bind_ip: None,
            secret: None,
        }
    }
}

/// One session with a hub. See the [module documentation](self).
pub struct Client {
    shared: Arc<Shared>,
    token: Token,
    reader: Option<JoinHandle<()>>,
    keepalive: Option<AbortHandle>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.shared.addr)
            .field("identity", &self.identity())
            .field("token", &self.token)
            .field("udp", &self.is_udp_bound())
            .finish()
    }
}

impl Client {
    /// Connects to `addr`, identifies as `identity` and waits for the session token, with
    /// the [default options](ClientOptions::default).
    pub async fn connect(addr: SocketAddr, identity: &str) -> Result<Client, ClientError> {
        Client::connect_with(addr, identity, ClientOptions::default()).await
    }

    /// Connects with explicit options: TCP connect (from [`ClientOptions::bind_ip`] if
    /// set, with `TCP_NODELAY`, since every frame is small and latency-bound), Identify,
    /// then waits for the Session frame.
    pub async fn connect_with(
        addr: SocketAddr,
        identity: &str,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        check_identity(identity.as_bytes()).map_err(|why| ClientError::Invalid {
            what: "identity",
            why: why.to_string(),
        })?;
        if options
            .secret
            .as_ref()
            .is_some_and(|s| s.contains(&NEWLINE))
        {
            return Err(ClientError::Invalid {
                what: "secret",
                why: "it holds the byte 0x0A".into(),
            });
        }
        let connect = async {
            match options.bind_ip {
                Some(ip) => connect_from(ip, addr).await,
                None => Ok(TcpStream::connect(addr).await?),
            }
        };
        let stream = match tokio::time::timeout(options.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(Connect::Bind(e))) => return Err(e),
            Ok(Err(Connect::Io(source))) => {
                return Err(ClientError::Unreachable { addr, source });
            }
            Err(_) => {
                return Err(ClientError::Unreachable {
                    addr,
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {:?}", options.connect_timeout),
                    ),
                });
            }
        };
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let mut hello = Vec::with_capacity(identity.len() + 2);
        if let Some(secret) = &options.secret {
            encode(Opcode::Auth, secret, &mut hello);
        }
        encode(Opcode::Identify, identity.as_bytes(), &mut hello);
        wr.write_all(&hello).await?;
        let (token, rest) = tokio::time::timeout(options.connect_timeout, read_session(&mut rd))
            .await
            .map_err(|_| ClientError::Timeout("the Session reply to Identify"))??;

        let shared = Arc::new(Shared {
            addr,
            identity: parking_lot::RwLock::new(Arc::from(identity)),
            writer: tokio::sync::Mutex::new(Writer {
                half: wr,
                buf: Vec::with_capacity(256),
                done: 0,
            }),
            waiting: parking_lot::Mutex::new(Waiting::default()),
            udp: OnceCell::new(),
            events: Arc::new(EventQueue::default()),
            shutdown: Notify::new(),
            shutdown_reason: parking_lot::Mutex::new(None),
            closed: AtomicBool::new(false),
            nonce: AtomicU64::new(0),
            options,
        });
        let reader = tokio::spawn(tcp_reader(shared.clone(), rd, rest));
        let keepalive = shared
            .options
            .keepalive
            .map(|every| tokio::spawn(keepalive(shared.clone(), every)).abort_handle());
        Ok(Client {
            shared,
            token,
            reader: Some(reader),
            keepalive,
        })
    }

    /// The session token the server issued (what a UDP bind presents).
    pub fn token(&self) -> Token {
        self.token
    }

    /// The identity this client currently goes by.
    pub fn identity(&self) -> Arc<str> {
        self.shared.identity.read().clone()
    }

    /// The server address.
    pub fn server(&self) -> SocketAddr {
        self.shared.addr
    }

    /// True from a successful [`Client::bind_udp`] until the server answers Quit over UDP
    /// (it no longer knows the channel: see [`Event::Quit`]) or the connection ends. While
    /// false, the UDP methods fail with [`ClientError::NotBound`].
    pub fn is_udp_bound(&self) -> bool {
        self.shared
            .udp
            .get()
            .is_some_and(|u| u.bound.load(Ordering::Relaxed))
    }

    /// True once the TCP connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Changes identity (a later Identify). The server does not answer a rename, but it
    /// handles this connection's frames in order, so every request sent after this call
    /// returns is routed under the new name.
    pub async fn rename(&self, identity: &str) -> Result<(), ClientError> {
        check_identity(identity.as_bytes()).map_err(|why| ClientError::Invalid {
            what: "identity",
            why: why.to_string(),
        })?;
        self.shared
            .send_tcp(None, None, |b| {
                encode(Opcode::Identify, identity.as_bytes(), b)
            })
            .await?;
        *self.shared.identity.write() = Arc::from(identity);
        Ok(())
    }

    /// Sends a Command to every shim `target` matches (not this client, unless the target
    /// starts with `+`) and waits for the server's Ack.
    ///
    /// Responses arrive later as [`Event::Response`]s; [`Client::collect_responses`] and
    /// [`Client::next_response`] wait for them. Fails with [`ClientError::NoMatch`] when
    /// nobody matched.
    pub async fn command(&self, target: &str, text: &str) -> Result<Sent, ClientError> {
        check_pattern("target", target)?;
        let (tx, rx) = oneshot::channel();
        self.shared
            .send_tcp(Some(tx), None, |b| {
                encode_routed(Opcode::Command, target, text, b)
            })
            .await?;
        let (id, reached) = self.shared.await_ack(rx).await?;
        Ok(Sent { id, reached })
    }

    /// Sends an Echo (text without an answer) to every shim `target` matches; returns how
    /// many it reached.
    pub async fn echo(&self, target: &str, text: &str) -> Result<usize, ClientError> {
        check_pattern("target", target)?;
        let (tx, rx) = oneshot::channel();
        self.shared
            .send_tcp(Some(tx), None, |b| {
                encode_routed(Opcode::Echo, target, text, b)
            })
            .await?;
        Ok(self.shared.await_ack(rx).await?.1)
    }

    /// Answers the Command `id` (from an [`Event::Command`]). The server sends no reply
    /// to a response: it forwards it to the command's sender if still connected.
    pub async fn respond(&self, id: u64, text: &str) -> Result<(), ClientError> {
        self.shared
            .send_tcp(None, None, |b| encode_response(id, text, b))
            .await
    }

    /// Lists connected shims (this client included) whose identity matches `pattern`, or
    /// all of them.
    pub async fn who(&self, pattern: Option<&str>) -> Result<Vec<WhoEntry>, ClientError> {
        if let Some(p) = pattern {
            check_pattern("pattern", p)?;
        }
        let (tx, rx) = oneshot::channel();
        self.shared
            .send_tcp(Some(tx), None, |b| {
                encode(Opcode::Who, pattern.unwrap_or("").as_bytes(), b)
            })
            .await?;
        match self.shared.await_reply(rx).await? {
            Reply::Ack { entries, .. } => Ok(entries),
            other => Err(other.into_error()),
        }
    }

    /// Pings over TCP and returns the round-trip time. Since the server handles one
    /// connection's frames in order, a returned ping also proves every frame sent before
    /// it was handled.
    pub async fn ping(&self, data: &[u8]) -> Result<Duration, ClientError> {
        self.shared.ping_tcp(data).await
    }

    /// Creates the UDP channel (a socket connected to the server address, so the kernel
    /// drops datagrams from anybody else), binds it to this session and confirms the bind
    /// with a Ping. Bind and Ping are re-sent a few times with growing waits, since either
    /// datagram or the Pong can be lost; gives up with [`ClientError::Bind`] after about
    /// three seconds.
    ///
    /// Calling it again re-binds the same socket: what to do after an [`Event::Quit`] over
    /// UDP.
    pub async fn bind_udp(&self) -> Result<(), ClientError> {
        let udp = self
            .shared
            .udp
            .get_or_try_init(|| open_udp(&self.shared))
            .await?;
        let mut out_of_step = udp.exchange.lock().await;
        let mut bind = Vec::with_capacity(18);
        encode(Opcode::Session, &self.token.0, &mut bind);
        let nonce = self.shared.nonce(b"bind");
        let (tx, mut rx) = oneshot::channel();
        udp.pongs.lock().push(PongWaiter {
            data: nonce.clone(),
            tx,
        });
        let mut saw_quit = false;
        for wait in BIND_WAITS_MS {
            if self.is_closed() {
                return Err(ClientError::Closed);
            }
            let quit = udp.quit.notified();
            tokio::pin!(quit);
            quit.as_mut().enable();
            // A send can fail with ECONNREFUSED left by an earlier ICMP error; the retry
            // loop is the answer to that as to a lost datagram.
            let _ = udp.send_raw(&bind).await;
            let _ = udp.send(|b| encode(Opcode::Ping, &nonce, b)).await;
            tokio::select! {
                r = &mut rx => {
                    if r.is_err() {
                        return Err(ClientError::Closed);
                    }
                    udp.bound.store(true, Ordering::Relaxed);
                    // Any reply still owed to an abandoned request came before this Pong.
                    udp.slot.lock().take();
                    *out_of_step = false;
                    return Ok(());
                }
                // A Quit answers the bind (unknown token) or a Ping that overtook a lost
                // bind: send both again at once.
                _ = &mut quit => saw_quit = true,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
        Err(ClientError::Bind(if saw_quit {
            "the server answered Quit: it does not know this session (closed?)".into()
        } else {
            format!(
                "no answer over UDP from {} after {} attempts",
                self.shared.addr,
                BIND_WAITS_MS.len()
            )
        }))
    }

    /// [`Client::command`] over the UDP channel: the targets with a UDP channel receive it
    /// over UDP, and the Ack comes back over UDP. Waits at most
    /// [`ClientOptions::udp_timeout`]; one UDP request is in flight at a time (see the
    /// module documentation).
    pub async fn command_udp(&self, target: &str, text: &str) -> Result<Sent, ClientError> {
        check_pattern("target", target)?;
        let (id, reached) = self
            .udp_request(|b| encode_routed(Opcode::Command, target, text, b))
            .await?;
        Ok(Sent { id, reached })
    }

    /// [`Client::echo`] over the UDP channel.
    pub async fn echo_udp(&self, target: &str, text: &str) -> Result<usize, ClientError> {
        check_pattern("target", target)?;
        Ok(self
            .udp_request(|b| encode_routed(Opcode::Echo, target, text, b))
            .await?
            .1)
    }

    /// [`Client::respond`] over the UDP channel (the response reaches the sender over UDP
    /// if it has a channel). No reply comes, so nothing tells whether the datagram arrived.
    pub async fn respond_udp(&self, id: u64, text: &str) -> Result<(), ClientError> {
        let udp = self.shared.bound_udp()?;
        udp.send(|b| encode_response(id, text, b)).await
    }

    /// Pings over the UDP channel; returns the round-trip time, or
    /// [`ClientError::Timeout`] after [`ClientOptions::udp_timeout`] (one attempt: a loss
    /// is an answer a caller measuring the channel wants to see).
    pub async fn ping_udp(&self, data: &[u8]) -> Result<Duration, ClientError> {
        check_data(data)?;
        let udp = self.shared.bound_udp()?;
        let (tx, rx) = oneshot::channel();
        udp.pongs.lock().push(PongWaiter {
            data: data.to_vec(),
            tx,
        });
        let start = Instant::now();
        udp.send(|b| encode(Opcode::Ping, data, b)).await?;
        match tokio::time::timeout(self.shared.options.udp_timeout, rx).await {
            Ok(Ok(at)) => Ok(at.saturating_duration_since(start)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("a Pong over UDP")),
        }
    }

    /// The next event, or `None` after [`Event::Closed`] was returned. Events are returned
    /// in arrival order; those [`Client::next_response`] passed over keep their place.
    ///
    /// Cancel-safe: no event is lost if the future is dropped (so it can sit in a
    /// `select!`). Concurrent callers each get different events.
    ///
    /// An event already queued is taken without awaiting anything (one short lock);
    /// only an empty queue parks the caller until a reader delivers.
    pub async fn next_event(&self) -> Option<Event> {
        poll_fn(|cx| self.shared.events.poll_next(cx)).await
    }

    /// The next response to command `id`, waiting at most `timeout`. Other events that
    /// arrive meanwhile are kept, in order, for [`Client::next_event`].
    ///
    /// Fails with [`ClientError::Timeout`], or [`ClientError::Closed`] once the connection
    /// is over (the [`Event::Closed`] is still delivered by `next_event`).
    pub async fn next_response(&self, id: u64, timeout: Duration) -> Result<Response, ClientError> {
        let mut scanned = 0;
        let fut = poll_fn(|cx| {
            self.shared.events.poll_take(
                cx,
                &mut scanned,
                |e| matches!(e, Event::Response(r) if r.id == id),
            )
        });
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(Event::Response(r))) => Ok(r),
            Ok(Ok(_)) => unreachable!("poll_take returns a matching event"),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::Timeout("a response")),
        }
    }

    /// Waits until `expected` responses to command `id` arrived (pass [`Sent::reached`])
    /// or `timeout` passed, and returns those that came, in arrival order. Fewer than
    /// `expected` means some targets did not answer in time (or the connection ended).
    pub async fn collect_responses(
        &self,
        id: u64,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Response> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(expected);
        while got.len() < expected {
            match self
                .next_response(id, deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Ok(r) => got.push(r),
                Err(_) => break,
            }
        }
        got
    }

    /// Says goodbye: sends Quit and waits (at most [`ClientOptions::request_timeout`]) for
    /// the server to close the connection, so the server logs a clean `quit` close and every
    /// frame sent before was handled.
    pub async fn close(mut self) -> Result<(), ClientError> {
        let sent = self
            .shared
            .send_tcp(None, None, |b| encode(Opcode::Quit, b"", b))
            .await;
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(self.shared.options.request_timeout, reader).await;
        }
        match sent {
            Err(ClientError::Closed) => Ok(()),
            other => other,
        }
    }

    /// One exchange over UDP: waits for its turn, re-synchronises if an earlier exchange
    /// was abandoned, sends, and waits for the Ack or Error.
    async fn udp_request(
        &self,
        build: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(u64, usize), ClientError> {
        let udp = self.shared.bound_udp()?;
        let mut out_of_step = udp.exchange.lock().await;
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        if *out_of_step {
            self.udp_resync(udp).await?;
        }
        // Stays set if this future is dropped or times out: the next exchange resyncs.
        *out_of_step = true;
        let (tx, rx) = oneshot::channel();
        *udp.slot.lock() = Some(tx);
        udp.send(build).await?;
        let reply = match tokio::time::timeout(self.shared.options.udp_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(ClientError::Closed),
            Err(_) => {
                udp.slot.lock().take();
                return Err(ClientError::Timeout("an Ack over UDP"));
            }
        };
        *out_of_step = false;
        match reply {
            Reply::Ack { id, count, .. } => Ok((id, count)),
            other => Err(other.into_error()),
        }
    }

    /// Pings over UDP until a Pong comes back: afterwards no reply to an earlier request
    /// can still be on its way.
    async fn udp_resync(&self, udp: &UdpShared) -> Result<(), ClientError> {
        udp.slot.lock().take();
        let nonce = self.shared.nonce(b"sync");
        let (tx, mut rx) = oneshot::channel();
        udp.pongs.lock().push(PongWaiter {
            data: nonce.clone(),
            tx,
        });
        for _ in 0..3 {
            udp.send(|b| encode(Opcode::Ping, &nonce, b)).await?;
            tokio::select! {
                r = &mut rx => return r.map(|_| ()).map_err(|_| ClientError::Closed),
                _ = tokio::time::sleep(self.shared.options.udp_timeout) => {}
            }
        }
        Err(ClientError::Timeout("a Pong over UDP"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The tasks hold the sockets; ending them closes the connection (the server sees
        // end of file).
        if let Some(r) = &self.reader {
            r.abort();
        }
        if let Some(k) = &self.keepalive {
            k.abort();
        }
        if let Some(udp) = self.shared.udp.get() {
            udp.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared state and the TCP side.

/// A request waiting for its Ack or Error (queued in request order).
type Pending = oneshot::Sender<Reply>;

/// What the reader hands a waiting request.
#[derive(Debug)]
enum Reply {
    /// `id SP count`; `entries` holds the WhoEntry frames that preceded it (empty unless
    /// the request was a Who).
    Ack {
        id: u64,
        count: usize,
        entries: Vec<WhoEntry>,
    },
    /// The server's Error text.
    Error(String),
    /// An Ack that could not be parsed.
    Malformed(String),
    /// Quit over UDP: the channel is unknown to the server.
    Quit,
}

impl Reply {
    fn into_error(self) -> ClientError {
        match self {
            Reply::Error(msg) => server_error(msg),
            Reply::Malformed(what) => ClientError::Protocol(what),
            Reply::Quit => ClientError::UdpUnbound,
            Reply::Ack { .. } => ClientError::Protocol("unexpected Ack".into()),
        }
    }
}

/// Maps an Error text to the error a caller can act on.
fn server_error(msg: String) -> ClientError {
    match msg.strip_prefix("no shim matches ") {
        Some(target) => ClientError::NoMatch {
            target: target.to_string(),
        },
        None => ClientError::Server(msg),
    }
}

/// A ping waiting for the Pong that carries its data; the reader sends when it arrived.
struct PongWaiter {
    data: Vec<u8>,
    tx: oneshot::Sender<Instant>,
}

/// Resolves the oldest live waiter whose data matches; forgets abandoned ones.
fn resolve_pong(waiters: &mut Vec<PongWaiter>, data: &[u8], at: Instant) -> bool {
    waiters.retain(|w| !w.tx.is_closed());
    match waiters.iter().position(|w| w.data == data) {
        Some(i) => {
            let w = waiters.remove(i);
            let _ = w.tx.send(at);
            true
        }
        None => false,
    }
}

#[derive(Default)]
struct Waiting {
    /// Set by the reader when the connection ends, under this lock, so no request can
    /// queue a waiter that nobody will ever answer.
    closed: bool,
    replies: VecDeque<Pending>,
    pongs: Vec<PongWaiter>,
}

/// The TCP write half and the buffer frames are encoded into.
struct Writer {
    half: OwnedWriteHalf,
    buf: Vec<u8>,
    /// How much of `buf` is written. Progress is recorded after each write call, so a send
    /// whose future is dropped mid-write leaves its remaining bytes for the next send to
    /// write first, and the stream never holds half a frame followed by another frame.
    done: usize,
}

impl Writer {
    async fn flush(&mut self) -> io::Result<()> {
        while self.done < self.buf.len() {
            let n = self.half.write(&self.buf[self.done..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.done += n;
        }
        self.buf.clear();
        self.done = 0;
        if self.buf.capacity() > 64 * 1024 {
            self.buf.shrink_to(4096);
        }
        Ok(())
    }
}

struct Shared {
    addr: SocketAddr,
    identity: parking_lot::RwLock<Arc<str>>,
    writer: tokio::sync::Mutex<Writer>,
    waiting: parking_lot::Mutex<Waiting>,
    udp: OnceCell<Arc<UdpShared>>,
    events: Arc<EventQueue>,
    /// Wakes the reader to end the connection (keep-alive failure, write error).
    shutdown: Notify,
    shutdown_reason: parking_lot::Mutex<Option<String>>,
    closed: AtomicBool,
    nonce: AtomicU64,
    options: ClientOptions,
}

impl Shared {
    /// Queues the waiters, then encodes and writes one frame with one write call, all
    /// under the writer lock so that the waiter queue and the byte stream agree.
    async fn send_tcp(
        &self,
        reply: Option<Pending>,
        pong: Option<PongWaiter>,
        build: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), ClientError> {
        let mut w = self.writer.lock().await;
        {
            let mut q = self.waiting.lock();
            if q.closed {
                return Err(ClientError::Closed);
            }
            if let Some(r) = reply {
                q.replies.push_back(r);
            }
            if let Some(p) = pong {
                q.pongs.push(p);
            }
        }
        build(&mut w.buf);
        w.flush().await.map_err(|e| {
            self.shut_down(format!("write failed: {e}"));
            ClientError::Io(e)
        })
    }

    async fn await_reply(&self, rx: oneshot::Receiver<Reply>) -> Result<Reply, ClientError> {
        match tokio::time::timeout(self.options.request_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ClientError::Closed),
            // The waiter stays queued with its receiver gone: the reply, when it comes, is
            // dropped and the queue stays in step (TCP loses nothing).
            Err(_) => Err(ClientError::Timeout("the server's reply")),
        }
    }

    async fn await_ack(&self, rx: oneshot::Receiver<Reply>) -> Result<(u64, usize), ClientError> {
        match self.await_reply(rx).await? {
            Reply::Ack { id, count, .. } => Ok((id, count)),
            other => Err(other.into_error()),
        }
    }

    async fn ping_tcp(&self, data: &[u8]) -> Result<Duration, ClientError> {
        check_data(data)?;
        let (tx, rx) = oneshot::channel();
        let start = Instant::now();
        self.send_tcp(
            None,
            Some(PongWaiter {
                data: data.to_vec(),
                tx,
            }),
            |b| encode(Opcode::Ping, data, b),
        )
        .await?;
        match tokio::time::timeout(self.options.request_timeout, rx).await {
            Ok(Ok(at)) => Ok(at.saturating_duration_since(start)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("a Pong")),
        }
    }

    fn bound_udp(&self) -> Result<&UdpShared, ClientError> {
        match self.udp.get() {
            Some(u) if u.bound.load(Ordering::Relaxed) => Ok(u),
            _ => Err(ClientError::NotBound),
        }
    }

    /// Unique ping data, so that concurrent pings never take each other's Pong.
    fn nonce(&self, prefix: &[u8]) -> Vec<u8> {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        let mut v = prefix.to_vec();
        v.push(b'-');
        v.extend_from_slice(n.to_string().as_bytes());
        v
    }

    fn shut_down(&self, reason: String) {
        self.shutdown_reason.lock().get_or_insert(reason);
        self.shutdown.notify_one();
    }

    fn emit(&self, event: Event) {
        self.events.push(event);
    }

    /// Ends the session: fails every waiting request with `Closed`, stops the UDP reader
    /// and emits the last event.
    fn finish(&self, reason: String) {
        {
            let mut q = self.waiting.lock();
            q.closed = true;
            q.replies.clear();
            q.pongs.clear();
        }
        self.closed.store(true, Ordering::Release);
        if let Some(udp) = self.udp.get() {
            udp.stop();
        }
        self.emit(Event::Closed { reason });
    }

    /// Handles one frame from the TCP connection; events go to `rs.batch`.
    async fn on_tcp_frame(&self, op: u8, data: &[u8], rs: &mut ReaderState) {
        let Some(op) = Opcode::from_byte(op) else {
            return;
        };
        match op {
            Opcode::Ack => {
                let reply = match parse_ack(data) {
                    Some((id, count)) => Reply::Ack {
                        id,
                        count,
                        entries: std::mem::take(&mut rs.who),
                    },
                    None => Reply::Malformed(format!("bad Ack {:?}", lossy(data))),
                };
                if let Some(w) = self.waiting.lock().replies.pop_front() {
                    let _ = w.send(reply);
                }
            }
            Opcode::Error => {
                rs.who.clear();
                let message = wire_text(data);
                match self.waiting.lock().replies.pop_front() {
                    Some(w) => {
                        let _ = w.send(Reply::Error(message));
                    }
                    None => rs.batch.push(Event::Error {
                        message,
                        via: Transport::Tcp,
                    }),
                }
            }
            Opcode::WhoEntry => {
                if let Some(e) = parse_who_entry(data) {
                    rs.who.push(e);
                }
            }
            Opcode::Pong => {
                resolve_pong(&mut self.waiting.lock().pongs, data, Instant::now());
            }
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse => {
                match parse_delivery(op, data, Transport::Tcp, &mut rs.senders) {
                    Some(ev) => rs.batch.push(ev),
                    None => rs.batch.push(Event::Error {
                        message: format!("malformed {} frame from the server", op.name()),
                        via: Transport::Tcp,
                    }),
                }
            }
            Opcode::Quit => {
                rs.quit = true;
                rs.batch.push(Event::Quit {
                    via: Transport::Tcp,
                });
            }
            Opcode::Ping => {
                // The Pong may wait for the writer: deliver what came before first.
                self.events.push_all(&mut rs.batch);
                let _ = self
                    .send_tcp(None, None, |b| encode(Opcode::Pong, data, b))
                    .await;
            }
            Opcode::None | Opcode::Identify | Opcode::Session | Opcode::Who | Opcode::Auth => {}
        }
    }
}

/// Why a connect from a chosen address failed.
enum Connect {
    /// The address is unusable (wrong family, not local): the caller's mistake.
    Bind(ClientError),
    /// The connect itself failed.
    Io(io::Error),
}

impl From<io::Error> for Connect {
    fn from(e: io::Error) -> Connect {
        Connect::Io(e)
    }
}

/// Connects to `addr` from `ip` (see [`ClientOptions::bind_ip`]).
async fn connect_from(ip: IpAddr, addr: SocketAddr) -> Result<TcpStream, Connect> {
    let invalid = |why: String| {
        Connect::Bind(ClientError::Invalid {
            what: "bind_ip",
            why,
        })
    };
    if ip.is_ipv4() != addr.is_ipv4() {
        return Err(invalid(format!(
            "{ip} is not of the same address family as the server {addr}"
        )));
    }
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Without it, bind(2) reserves a port that is free towards every destination, and an
    // address runs out of ports for all servers together. A kernel without the option
    // (before 4.2) still works, with that limit.
    let _ = set_bind_address_no_port(&sock);
    sock.bind(SocketAddr::new(ip, 0))
        .map_err(|e| invalid(format!("cannot bind to {ip}: {e}")))?;
    Ok(sock.connect(addr).await?)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux; it applies to IPv6 sockets too).
fn set_bind_address_no_port(sock: &TcpSocket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) on a socket this function borrows, with a pointer to an int
    // that outlives the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads frames until the Session reply; returns the token and any bytes read past it.
async fn read_session(rd: &mut OwnedReadHalf) -> Result<(Token, Vec<u8>), ClientError> {
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        let mut start = 0;
        while let Some((f, n)) = codec::decode_exact(&buf[start..], MAX_FRAME)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
        {
            start += n;
            match f.opcode() {
                Some(Opcode::Session) => {
                    let token = Token::from_slice(f.data).ok_or_else(|| {
                        ClientError::Protocol(format!(
                            "session token is {} bytes, not 16",
                            f.data.len()
                        ))
                    })?;
                    buf.drain(..start);
                    return Ok((token, buf));
                }
                Some(Opcode::Error) => return Err(server_error(wire_text(f.data))),
                Some(Opcode::Quit) => return Err(ClientError::Closed),
                _ => {}
            }
        }
        buf.drain(..start);
        buf.reserve(READ_CHUNK);
        if rd.read_buf(&mut buf).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// The TCP reader task: demultiplexes replies to waiters and deliveries to events.
async fn tcp_reader(shared: Arc<Shared>, mut rd: OwnedReadHalf, mut buf: Vec<u8>) {
    let mut rs = ReaderState::default();
    let reason = 'conn: loop {
        let mut start = 0;
        loop {
            match codec::decode_exact(&buf[start..], MAX_FRAME) {
                Ok(Some((f, n))) => {
                    shared.on_tcp_frame(f.op, f.data, &mut rs).await;
                    start += n;
                }
                Ok(None) => break,
                Err(e) => break 'conn format!("protocol error: {e}"),
            }
        }
        buf.drain(..start);
        shared.events.push_all(&mut rs.batch);
        // Events piling up: let the consumer run before reading more (never waiting for
        // it, see the module documentation), so the queue stays short and in cache
        // instead of growing by a whole task budget of reads at a time.
        if shared.events.len() >= YIELD_BACKLOG {
            tokio::task::yield_now().await;
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) if rs.quit => break "the server sent Quit and closed the connection".into(),
                Ok(0) => break ClientError::Closed.to_string(),
                Ok(_) => {}
                Err(e) => break format!("read failed: {e}"),
            },
            _ = shared.shutdown.notified() => {
                break shared
                    .shutdown_reason
                    .lock()
                    .take()
                    .unwrap_or_else(|| "closed by the client".into());
            }
        }
    };
    shared.events.push_all(&mut rs.batch);
    shared.finish(reason);
}

/// The keep-alive task: a Ping every `every`, whatever happened to the previous ones (the
/// server's idle clock counts bytes received, not Pongs sent, so a late Pong must not
/// delay the next Ping). Liveness is judged on the oldest unanswered Ping: no Pong for it
/// within `request_timeout` (or `every`, if longer) ends the connection. Each Ping carries
/// its own data so that a late Pong is never taken for a newer Ping's.
async fn keepalive(shared: Arc<Shared>, every: Duration) {
    use tokio::sync::oneshot::error::TryRecvError;
    let limit = shared.options.request_timeout.max(every);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut oldest: Option<(Instant, oneshot::Receiver<Instant>)> = None;
    loop {
        tick.tick().await;
        if let Some((sent, rx)) = &mut oldest {
            match rx.try_recv() {
                Ok(_) => oldest = None,
                Err(TryRecvError::Empty) if sent.elapsed() >= limit => {
                    shared.shut_down(format!(
                        "no Pong within {limit:?}: the server is not answering"
                    ));
                    return;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Closed) => return,
            }
        }
        let data = shared.nonce(KEEPALIVE_DATA);
        let waiter = if oldest.is_none() {
            let (tx, rx) = oneshot::channel();
            oldest = Some((Instant::now(), rx));
            Some(PongWaiter {
                data: data.clone(),
                tx,
            })
        } else {
            None
        };
        if shared
            .send_tcp(None, waiter, |b| encode(Opcode::Ping, &data, b))
            .await
            .is_err()
        {
            return;
        }
        // Keeps any NAT mapping of the UDP channel open; the Pong is not awaited.
        if let Some(udp) = shared.udp.get()
            && udp.bound.load(Ordering::Relaxed)
        {
            let _ = udp.send(|b| encode(Opcode::Ping, &data, b)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The UDP side.

struct UdpShared {
    sock: UdpSocket,
    /// Encoding buffer for datagrams; sends try a non-blocking send under this lock first,
    /// so the common case allocates nothing.
    scratch: parking_lot::Mutex<Vec<u8>>,
    /// Turn-taking for UDP exchanges (stop and wait); holds "out of step": a reply may
    /// still be owed to an abandoned exchange, so resynchronise before the next one.
    exchange: tokio::sync::Mutex<bool>,
    /// The exchange waiting for its Ack or Error.
    slot: parking_lot::Mutex<Option<oneshot::Sender<Reply>>>,
    pongs: parking_lot::Mutex<Vec<PongWaiter>>,
    /// Signalled when a Quit arrives (for the bind loop).
    quit: Notify,
    bound: AtomicBool,
    reader: parking_lot::Mutex<Option<AbortHandle>>,
}

impl UdpShared {
    /// Encodes one frame and sends it as one datagram.
    async fn send(&self, build: impl FnOnce(&mut Vec<u8>)) -> Result<(), ClientError> {
        let spill = {
            let mut s = self.scratch.lock();
            s.clear();
            build(&mut s);
            match self.sock.try_send(&s) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => s.clone(),
                Err(e) => return Err(e.into()),
            }
        };
        self.send_raw(&spill).await
    }

    async fn send_raw(&self, dgram: &[u8]) -> Result<(), ClientError> {
        self.sock.send(dgram).await?;
        Ok(())
    }

    fn stop(&self) {
        self.bound.store(false, Ordering::Relaxed);
        if let Some(r) = self.reader.lock().take() {
            r.abort();
        }
        self.slot.lock().take();
        self.pongs.lock().clear();
    }
}

/// Creates the UDP socket (same address family as the server, ephemeral port, connected
/// to the server) and starts its reader.
async fn open_udp(shared: &Arc<Shared>) -> Result<Arc<UdpShared>, ClientError> {
    if shared.closed.load(Ordering::Acquire) {
        return Err(ClientError::Closed);
    }
    let local: SocketAddr = if shared.addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let local = match shared.options.bind_ip {
        Some(ip) => SocketAddr::new(ip, 0),
        None => local,
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(shared.addr).await?;
    let udp = Arc::new(UdpShared {
        sock,
        scratch: parking_lot::Mutex::new(Vec::with_capacity(256)),
        exchange: tokio::sync::Mutex::new(false),
        slot: parking_lot::Mutex::new(None),
        pongs: parking_lot::Mutex::new(Vec::new()),
        quit: Notify::new(),
        bound: AtomicBool::new(false),
        reader: parking_lot::Mutex::new(None),
    });
    let task = tokio::spawn(udp_reader(udp.clone(), shared.events.clone()));
    *udp.reader.lock() = Some(task.abort_handle());
    Ok(udp)
}

/// The UDP reader task.
async fn udp_reader(udp: Arc<UdpShared>, events: Arc<EventQueue>) {
    let mut buf = vec![0u8; 65_536];
    let mut senders = SenderCache::default();
    loop {
        let n = match udp.sock.recv(&mut buf).await {
            Ok(n) => n,
            // An ICMP "port unreachable" for an earlier datagram: the server was down or
            // restarting. Replies simply do not come; the waits time out.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                events.push(Event::Error {
                    message: format!("UDP receive failed: {e}"),
                    via: Transport::Udp,
                });
                return;
            }
        };
        let Ok(f) = codec::decode_datagram(&buf[..n], MAX_FRAME) else {
            continue;
        };
        let Some(op) = f.opcode() else { continue };
        match op {
            Opcode::Ack => {
                let reply = match parse_ack(f.data) {
                    Some((id, count)) => Reply::Ack {
                        id,
                        count,
                        entries: Vec::new(),
                    },
                    None => Reply::Malformed(format!("bad Ack {:?}", lossy(f.data))),
                };
                // No exchange waiting: a late reply to an abandoned one; drop it.
                if let Some(w) = udp.slot.lock().take() {
                    let _ = w.send(reply);
                }
            }
            Opcode::Error => {
                let message = wire_text(f.data);
                let waiter = udp.slot.lock().take();
                match waiter {
                    Some(w) => {
                        let _ = w.send(Reply::Error(message));
                    }
                    None => events.push(Event::Error {
                        message,
                        via: Transport::Udp,
                    }),
                }
            }
            Opcode::Pong => {
                resolve_pong(&mut udp.pongs.lock(), f.data, Instant::now());
            }
            Opcode::Quit => {
                udp.quit.notify_waiters();
                let waiter = udp.slot.lock().take();
                if let Some(w) = waiter {
                    let _ = w.send(Reply::Quit);
                }
                // The server no longer knows this channel: report that once, and let UDP
                // methods say NotBound until bind_udp succeeds again.
                if udp.bound.swap(false, Ordering::Relaxed) {
                    events.push(Event::Quit {
                        via: Transport::Udp,
                    });
                }
            }
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse => {
                if let Some(ev) = parse_delivery(op, f.data, Transport::Udp, &mut senders) {
                    events.push(ev);
                }
            }
            Opcode::Ping => {
                let _ = udp.send(|b| encode(Opcode::Pong, f.data, b)).await;
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Events.

/// The events of one client: filled by its readers, emptied by [`Client::next_event`] and
/// [`Client::next_response`].
///
/// A deque under a short synchronous lock rather than a channel behind an async mutex:
/// taking an event that is already queued costs one uncontended lock, no await and no
/// waker, and `next_response` can take a matching event out of the middle without moving
/// the others to a side queue. Every taker that found nothing registers its waker; a push
/// wakes them all (there is normally one), and each looks again.
#[derive(Default)]
struct EventQueue {
    inner: parking_lot::Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Events not taken yet, in arrival order, each with its arrival number (ascending,
    /// so a taker can resume a scan where it stopped).
    items: VecDeque<(u64, Event)>,
    /// The arrival number of the next event.
    next_seq: u64,
    /// `Closed` was queued: it stays last, anything later is dropped.
    closed: bool,
    /// `Closed` was taken: nothing follows.
    done: bool,
    /// Takers waiting for the next push. A taker that gave up (a dropped future) leaves its
    /// waker until then: it is woken once for nothing.
    wakers: Vec<Waker>,
}

impl EventQueue {
    /// Queues an event and wakes the takers. Nobody reading any more (the client was
    /// dropped) is not an error: the events go when the readers end.
    fn push(&self, event: Event) {
        self.push_with(|q| q.add(event));
    }

    /// Queues every event of `batch` (left empty, its allocation kept), in order.
    fn push_all(&self, batch: &mut Vec<Event>) {
        if !batch.is_empty() {
            self.push_with(|q| batch.drain(..).for_each(|e| q.add(e)));
        }
    }

    fn push_with(&self, add: impl FnOnce(&mut Queue)) {
        let mut q = self.inner.lock();
        add(&mut q);
        match q.wakers.len() {
            0 => {}
            // The usual case: keep the vector's allocation, wake outside the lock.
            1 => {
                let w = q.wakers.pop().expect("one waker");
                drop(q);
                w.wake();
            }
            _ => {
                let ws = std::mem::take(&mut q.wakers);
                drop(q);
                ws.into_iter().for_each(Waker::wake);
            }
        }
    }

    /// How many events wait to be taken.
    fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    /// The next event; `None` once `Closed` was taken.
    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        // Count against the task's budget, as a tokio channel would, so that a consumer
        // fed by another thread still yields now and then.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let mut q = self.inner.lock();
        if let Some((_, event)) = q.items.pop_front() {
            if matches!(event, Event::Closed { .. }) {
                q.done = true;
            }
            coop.made_progress();
            return Poll::Ready(Some(event));
        }
        if q.done {
            return Poll::Ready(None);
        }
        q.register(cx.waker());
        Poll::Pending
    }

    /// The first queued event `want` accepts, leaving the others in place; fails with
    /// `Closed` once the connection's end is queued and nothing before it matched.
    /// `scanned` (start at 0) carries over between polls the arrival number up to which
    /// the queue was searched, so each event is looked at once per call.
    fn poll_take(
        &self,
        cx: &mut Context<'_>,
        scanned: &mut u64,
        want: impl Fn(&Event) -> bool,
    ) -> Poll<Result<Event, ClientError>> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let mut q = self.inner.lock();
        let from = q.items.partition_point(|(seq, _)| *seq < *scanned);
        if let Some(i) = q.items.range(from..).position(|(_, e)| want(e)) {
            let (_, event) = q.items.remove(from + i).expect("index from position");
            coop.made_progress();
            return Poll::Ready(Ok(event));
        }
        if q.closed {
            return Poll::Ready(Err(ClientError::Closed));
        }
        *scanned = q.next_seq;
        q.register(cx.waker());
        Poll::Pending
    }
}

impl Queue {
    fn add(&mut self, event: Event) {
        if self.closed {
            return;
        }
        self.closed = matches!(event, Event::Closed { .. });
        let seq = self.next_seq;
        self.next_seq += 1;
        self.items.push_back((seq, event));
    }

    fn register(&mut self, waker: &Waker) {
        if !self.wakers.iter().any(|w| w.will_wake(waker)) {
            self.wakers.push(waker.clone());
        }
    }
}

/// The identity of the last sender a reader saw, so that deliveries from one sender in a
/// row (a fan-out, a busy peer, a stream of responses) share one `Arc<str>` instead of
/// allocating a string each.
#[derive(Default)]
struct SenderCache(Option<Arc<str>>);

impl SenderCache {
    fn get(&mut self, raw: &[u8]) -> Arc<str> {
        match &self.0 {
            // Equal bytes are valid UTF-8 and so convert to the same text.
            Some(s) if s.as_bytes() == raw => s.clone(),
            _ => {
                let s: Arc<str> = Arc::from(String::from_utf8_lossy(raw));
                self.0 = Some(s.clone());
                s
            }
        }
    }
}

/// What the TCP reader carries from one frame to the next.
#[derive(Default)]
struct ReaderState {
    /// WhoEntry frames waiting for the Ack that ends the listing.
    who: Vec<WhoEntry>,
    /// The server sent Quit.
    quit: bool,
    senders: SenderCache,
    /// Events from the frames of one read, queued together (one lock, one wake-up).
    batch: Vec<Event>,
}

// ---------------------------------------------------------------------------------------
// Encoding, parsing and argument checks: pure functions.

/// Appends `text` with each `\n` written as 0x0B (no allocation: fixed up in place).
fn push_text(out: &mut Vec<u8>, text: &str) {
    let start = out.len();
    out.extend_from_slice(text.as_bytes());
    let mut i = start;
    while let Some(p) = memchr::memchr(NEWLINE, &out[i..]) {
        out[i + p] = ALT_NEWLINE;
        i += p + 1;
    }
}

/// `op TARGET SP TEXT`.
fn encode_routed(op: Opcode, target: &str, text: &str, out: &mut Vec<u8>) {
    out.reserve(target.len() + text.len() + 3);
    out.push(op as u8);
    out.extend_from_slice(target.as_bytes());
    out.push(SP);
    push_text(out, text);
    out.push(NEWLINE);
}

/// `CommandResponse ID SP TEXT`.
fn encode_response(id: u64, text: &str, out: &mut Vec<u8>) {
    out.reserve(text.len() + 23);
    out.push(Opcode::CommandResponse as u8);
    push_u64(out, id);
    out.push(SP);
    push_text(out, text);
    out.push(NEWLINE);
}

/// Appends `v` in decimal, without a temporary string.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Text from the wire: 0x0B becomes `\n`, invalid UTF-8 is replaced (one allocation and
/// one copy when the text is valid, which is the norm).
fn wire_text(data: &[u8]) -> String {
    let mut v = data.to_vec();
    for i in memchr::memchr_iter(ALT_NEWLINE, data) {
        v[i] = NEWLINE;
    }
    // 0x0A and 0x0B are both ASCII, so the swap cannot break a UTF-8 sequence.
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn lossy(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

fn split_sp(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = memchr::memchr(SP, data)?;
    Some((&data[..i], &data[i + 1..]))
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |acc, &c| {
        if !c.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// Ack data: `ID SP COUNT`.
fn parse_ack(data: &[u8]) -> Option<(u64, usize)> {
    let (id, count) = split_sp(data)?;
    Some((parse_u64(id)?, usize::try_from(parse_u64(count)?).ok()?))
}

/// WhoEntry data: `IDENTITY SP SINCE-UNIX-MS SP udp|-` (identities hold no space).
fn parse_who_entry(data: &[u8]) -> Option<WhoEntry> {
    let (identity, rest) = split_sp(data)?;
    let (since, udp) = split_sp(rest)?;
    let udp = match udp {
        b"udp" => true,
        b"-" => false,
        _ => return None,
    };
    Some(WhoEntry {
        identity: lossy(identity),
        since: UNIX_EPOCH + Duration::from_millis(parse_u64(since)?),
        udp,
    })
}

/// A delivered Command (`FROM SP ID SP TEXT`), Echo (`FROM SP TEXT`) or CommandResponse
/// (`ID SP FROM SP TEXT`); the sender's identity comes from (and updates) `senders`.
fn parse_delivery(
    op: Opcode,
    data: &[u8],
    via: Transport,
    senders: &mut SenderCache,
) -> Option<Event> {
    match op {
        Opcode::Command => {
            let (from, rest) = split_sp(data)?;
            let (id, text) = split_sp(rest)?;
            Some(Event::Command {
                id: parse_u64(id)?,
                from: senders.get(from),
                text: wire_text(text),
                via,
            })
        }
        Opcode::Echo => {
            let (from, text) = split_sp(data)?;
            Some(Event::Echo {
                from: senders.get(from),
                text: wire_text(text),
                via,
            })
        }
        Opcode::CommandResponse => {
            let (id, rest) = split_sp(data)?;
            let (from, text) = split_sp(rest)?;
            Some(Event::Response(Response {
                id: parse_u64(id)?,
                from: senders.get(from),
                text: wire_text(text),
                via,
            }))
        }
        _ => None,
    }
}

/// A target or Who pattern must be one non-empty word: the server reads a target up to
/// the first space, so a space would silently move words into the text.
fn check_pattern(what: &'static str, p: &str) -> Result<(), ClientError> {
    let why = if p.is_empty() {
        "it is empty"
    } else if p.bytes().any(|b| b == SP || b.is_ascii_control()) {
        "it holds a space or control character"
    } else {
        return Ok(());
    };
    Err(ClientError::Invalid {
        what,
        why: format!("{p:?}: {why}"),
    })
}

/// Ping data travels raw, so it cannot hold the frame terminator.
fn check_data(data: &[u8]) -> Result<(), ClientError> {
    if data.contains(&NEWLINE) {
        return Err(ClientError::Invalid {
            what: "ping data",
            why: "it holds a 0x0A byte".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_frames_escape_newlines() {
        let mut b = Vec::new();
        encode_routed(Opcode::Command, "peq.*", "a\nb c", &mut b);
        assert_eq!(b, b"\x04peq.* a\x0bb c\n");
        b.clear();
        encode_response(42, "x\ny\n", &mut b);
        assert_eq!(b, b"\x0542 x\x0by\x0b\n");
        for v in [0, 7, 10, 1 << 20, u64::MAX] {
            b.clear();
            push_u64(&mut b, v);
            assert_eq!(b, v.to_string().as_bytes());
        }
    }

    #[test]
    fn wire_text_unescapes_and_tolerates_bad_utf8() {
        assert_eq!(wire_text(b"one\x0btwo"), "one\ntwo");
        assert_eq!(wire_text("héros".as_bytes()), "héros");
        assert_eq!(wire_text(b"a\xffb"), "a\u{FFFD}b");
    }

    #[test]
    fn acks_parse() {
        assert_eq!(parse_ack(b"0 3"), Some((0, 3)));
        assert_eq!(parse_ack(b"18446744073709551615 1"), Some((u64::MAX, 1)));
        assert_eq!(parse_ack(b"18446744073709551616 1"), None);
        assert_eq!(parse_ack(b"1"), None);
        assert_eq!(parse_ack(b"x 1"), None);
        assert_eq!(parse_ack(b"1 "), None);
        assert_eq!(parse_ack(b"1 -2"), None);
    }

    #[test]
    fn who_entries_parse() {
        let e = parse_who_entry(b"peq.a.bob 1700000000123 udp").unwrap();
        assert_eq!(e.identity, "peq.a.bob");
        assert_eq!(
            e.since,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
        );
        assert!(e.udp);
        assert!(!parse_who_entry(b"x 5 -").unwrap().udp);
        assert_eq!(parse_who_entry(b"x 5 tcp"), None);
        assert_eq!(parse_who_entry(b"x five -"), None);
        assert_eq!(parse_who_entry(b"x 5"), None);
    }

    #[test]
    fn deliveries_parse() {
        assert_eq!(
            parse_delivery(
                Opcode::Command,
                b"peq.a.bob 77 /sit now\x0bplease",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            Some(Event::Command {
                from: "peq.a.bob".into(),
                id: 77,
                text: "/sit now\nplease".into(),
                via: Transport::Tcp
            })
        );
        assert_eq!(
            parse_delivery(
                Opcode::Echo,
                b"a hello world",
                Transport::Udp,
                &mut SenderCache::default()
            ),
            Some(Event::Echo {
                from: "a".into(),
                text: "hello world".into(),
                via: Transport::Udp
            })
        );
        assert_eq!(
            parse_delivery(
                Opcode::CommandResponse,
                b"9 b ",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            Some(Event::Response(Response {
                id: 9,
                from: "b".into(),
                text: String::new(),
                via: Transport::Tcp
            }))
        );
        assert_eq!(
            parse_delivery(
                Opcode::Command,
                b"a notanid x",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            None
        );
        assert_eq!(
            parse_delivery(
                Opcode::Echo,
                b"nospace",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            None
        );
        assert_eq!(
            parse_delivery(
                Opcode::Ping,
                b"a b",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            None
        );
    }

    #[test]
    fn senders_in_a_row_share_one_identity() {
        let mut cache = SenderCache::default();
        let from = |e: Option<Event>| match e {
            Some(Event::Echo { from, .. } | Event::Command { from, .. }) => from,
            Some(Event::Response(r)) => r.from,
            other => panic!("not a delivery: {other:?}"),
        };
        let a1 = from(parse_delivery(
            Opcode::Echo,
            b"a x",
            Transport::Tcp,
            &mut cache,
        ));
        let a2 = from(parse_delivery(
            Opcode::Command,
            b"a 1 y",
            Transport::Tcp,
            &mut cache,
        ));
        assert!(Arc::ptr_eq(&a1, &a2));
        let b = from(parse_delivery(
            Opcode::CommandResponse,
            b"1 b z",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(&*b, "b");
        let a3 = from(parse_delivery(
            Opcode::Echo,
            b"a x",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(&*a3, "a");
        assert!(!Arc::ptr_eq(&a1, &a3), "only the last sender is kept");
        // Invalid UTF-8 is replaced, and never taken for a cached identity.
        let bad = from(parse_delivery(
            Opcode::Echo,
            b"\xff x",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(&*bad, "\u{FFFD}");
        let bad2 = from(parse_delivery(
            Opcode::Echo,
            b"\xff x",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(bad, bad2);
    }

    fn echo(text: &str) -> Event {
        Event::Echo {
            from: "s".into(),
            text: text.into(),
            via: Transport::Tcp,
        }
    }

    fn response(id: u64) -> Event {
        Event::Response(Response {
            id,
            from: "r".into(),
            text: String::new(),
            via: Transport::Tcp,
        })
    }

    #[tokio::test]
    async fn event_queue_takes_in_order_and_by_match() {
        let q = EventQueue::default();
        let next = || poll_fn(|cx| q.poll_next(cx));
        let take = |id: u64| {
            let mut scanned = 0;
            let q = &q;
            async move {
                poll_fn(|cx| {
                    q.poll_take(
                        cx,
                        &mut scanned,
                        |e| matches!(e, Event::Response(r) if r.id == id),
                    )
                })
                .await
            }
        };
        q.push(echo("1"));
        q.push(response(7));
        q.push(echo("2"));
        // A match is taken out of the middle; the others keep their order.
        assert_eq!(take(7).await.unwrap(), response(7));
        assert_eq!(next().await, Some(echo("1")));
        // Nothing matches yet: waits, then takes the match pushed later.
        let waiting = tokio::time::timeout(Duration::from_millis(20), take(8)).await;
        assert!(waiting.is_err());
        q.push(response(8));
        assert_eq!(take(8).await.unwrap(), response(8));
        assert_eq!(next().await, Some(echo("2")));
        // Closed ends both: a taker fails, and next_event sees Closed then None.
        q.push(Event::Closed {
            reason: "bye".into(),
        });
        q.push(echo("after the end"));
        assert!(matches!(take(9).await, Err(ClientError::Closed)));
        assert!(matches!(next().await, Some(Event::Closed { .. })));
        assert_eq!(next().await, None);
        assert_eq!(next().await, None);
    }

    #[tokio::test]
    async fn event_queue_wakes_every_waiting_taker() {
        let q = Arc::new(EventQueue::default());
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let q = q.clone();
            tasks.push(tokio::spawn(
                async move { poll_fn(|cx| q.poll_next(cx)).await },
            ));
        }
        tokio::task::yield_now().await;
        for i in 0..3 {
            q.push(echo(&i.to_string()));
            tokio::task::yield_now().await;
        }
        let mut got = Vec::new();
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(5), t).await {
                Ok(Ok(Some(Event::Echo { text, .. }))) => got.push(text),
                other => panic!("a taker got {other:?}"),
            }
        }
        got.sort();
        assert_eq!(got, ["0", "1", "2"]);
    }

    #[test]
    fn errors_map_to_no_match() {
        assert!(matches!(
            server_error("no shim matches peq.x".into()),
            ClientError::NoMatch { target } if target == "peq.x"
        ));
        assert!(matches!(
            server_error("bad target >.a: x".into()),
            ClientError::Server(_)
        ));
        assert_eq!(
            ClientError::NoMatch {
                target: "a.b".into()
            }
            .to_string(),
            "no shim matches a.b"
        );
    }

    #[test]
    fn patterns_are_one_word() {
        assert!(check_pattern("target", "+peq.*.>").is_ok());
        assert!(check_pattern("target", "").is_err());
        assert!(check_pattern("target", "a b").is_err());
        assert!(check_pattern("target", "a\nb").is_err());
        assert!(check_data(b"ok").is_ok());
        assert!(check_data(b"o\nk").is_err());
    }

    #[test]
    fn pongs_resolve_oldest_live_match() {
        let mut ws = Vec::new();
        let (t1, r1) = oneshot::channel();
        let (t2, mut r2) = oneshot::channel();
        let (t3, r3) = oneshot::channel();
        ws.push(PongWaiter {
            data: b"a".to_vec(),
            tx: t1,
        });
        ws.push(PongWaiter {
            data: b"b".to_vec(),
            tx: t2,
        });
        ws.push(PongWaiter {
            data: b"b".to_vec(),
            tx: t3,
        });
        drop(r1);
        let now = Instant::now();
        assert!(
            !resolve_pong(&mut ws, b"a", now),
            "abandoned waiter is skipped"
        );
        assert!(resolve_pong(&mut ws, b"b", now));
        assert_eq!(r2.try_recv().unwrap(), now);
        assert_eq!(ws.len(), 1);
        drop(r3);
        assert!(!resolve_pong(&mut ws, b"b", now));
        assert!(ws.is_empty());
    }
}
