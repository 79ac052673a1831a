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
//! waiter. Pongs are paired by their data instead, since ping data is the caller's. Two
//! exceptions: an Error refusing a CommandResponse (its text starts `response refused:`)
//! answers no request and arrives as an [`Event::Error`]; and a rename, which the server
//! answers only to refuse it, is followed by a Ping, so that its Pong settles the rename
//! when no Error came first.
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
//! # TLS
//!
//! With [`ClientOptions::tls`] the control connection is TLS 1.3 (rustls), the hub's
//! certificate checked against a CA file or the system roots ([`TlsOptions`]); the frames
//! inside are unchanged. The UDP channel of such a session is sealed: both ends derive a
//! session id and one key per direction from the TLS exporter (`proto/sealed.rs`), every
//! datagram is encrypted and authenticated with a counter that is never reused, and what
//! comes back passes a replay window before it is opened. There is no bind: a sealed Ping
//! tells the hub where to send, and the hub finds the session by its id, not by the source
//! address, so a changed address (NAT rebinding, [`Client::rebind_udp`]) needs nothing
//! more than the next datagram. Anything the channel cannot authenticate, plain datagrams
//! included, is dropped unseen and counted ([`Client::sealed_dropped`]).
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

mod error;
mod events;
mod pending;
mod socket;
mod tcp;
mod text;
mod tls;
mod udp;

pub use error::ClientError;
pub use tls::TlsOptions;

use crate::proto::identity::check_identity;
use crate::proto::request::{encode_response, encode_routed};
use crate::proto::sealed::EXPORTER_LEN;
use crate::proto::{NEWLINE, Opcode, Token, encode};
use pending::{Pending, PongWaiter, Reply};
use std::fmt;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use tcp::Shared;
use text::{check_data, check_pattern};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};

/// The longest frame the client accepts: the largest `max_frame` a server can be given.
const MAX_FRAME: usize = 16 * 1024 * 1024;

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
    /// The hub's shared secret, or with [`ClientOptions::user`] that user's secret, sent in
    /// an Auth frame before Identify (a hub without credentials ignores it). It may not
    /// hold the byte 0x0A. Default `None`.
    pub secret: Option<Vec<u8>>,
    /// The hub user to authenticate as: Auth then carries `USER SP SECRET`. Needs a
    /// secret; may not hold a space or 0x0A. Default `None`.
    pub user: Option<String>,
    /// Speak TLS to the hub (see "TLS" in the [module documentation](self)); the UDP
    /// channel is then sealed. Default `None`: plaintext, for a hub on a trusted LAN.
    pub tls: Option<TlsOptions>,
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
            user: None,
            tls: None,
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
        if let Some(user) = &options.user {
            let why = if user.is_empty() || user.bytes().any(|b| b == b' ' || b == NEWLINE) {
                Some("it is empty or holds a space or 0x0A")
            } else if options.secret.is_none() {
                Some("a user needs its secret")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ClientError::Invalid {
                    what: "user",
                    why: why.into(),
                });
            }
        }
        let opened = tcp::open(addr, identity, &options).await?;
        let shared = Arc::new(Shared::new(
            addr,
            identity,
            opened.writer,
            opened.exporter,
            options,
        ));
        let reader = tokio::spawn(tcp::reader(shared.clone(), opened.reader, opened.rest));
        let keepalive = shared
            .options
            .keepalive
            .map(|every| tokio::spawn(tcp::keepalive(shared.clone(), every)).abort_handle());
        Ok(Client {
            shared,
            token: opened.token,
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

    /// Whether the control connection is TLS (and the UDP channel sealed).
    pub fn is_tls(&self) -> bool {
        self.shared.exporter.is_some()
    }

    /// The TLS session's exporter output (`proto/sealed.rs`), from which the sealed UDP
    /// keys come: for tests that craft sealed datagrams themselves. `None` without TLS.
    #[doc(hidden)]
    pub fn sealed_keys_for_tests(&self) -> Option<[u8; EXPORTER_LEN]> {
        self.shared.exporter
    }

    /// Datagrams the sealed UDP channel received and dropped unopened: plain, truncated,
    /// of another session, replayed, or failing authentication. Always 0 without TLS.
    pub fn sealed_dropped(&self) -> u64 {
        self.shared.udp.get().map_or(0, |u| u.dropped())
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
        self.shared.is_closed()
    }

    /// Changes identity (a later Identify) and waits until the hub has done it: the
    /// server answers a rename only to refuse it (`identity not permitted: NAME`,
    /// `identity in use`), so a Ping follows it, and its Pong with no Error before it
    /// means the rename was carried out. Every request sent after this call returns is
    /// routed under the new name.
    pub async fn rename(&self, identity: &str) -> Result<(), ClientError> {
        check_identity(identity.as_bytes()).map_err(|why| ClientError::Invalid {
            what: "identity",
            why: why.to_string(),
        })?;
        let (tx, rx) = oneshot::channel();
        let (ptx, _unused) = oneshot::channel();
        let data = self.shared.nonce(b"velium-rename");
        let ticket = self.shared.ticket();
        let pong = PongWaiter {
            data: data.clone(),
            tx: ptx,
            ticket,
        };
        self.shared
            .send_tcp_pending(Some(Pending::quiet(tx, ticket)), Some(pong), |b| {
                encode(Opcode::Identify, identity.as_bytes(), b);
                encode(Opcode::Ping, &data, b);
            })
            .await?;
        match self.shared.await_reply(rx).await? {
            Reply::Quiet => {
                *self.shared.identity.write() = Arc::from(identity);
                Ok(())
            }
            other => Err(other.into_error()),
        }
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
    ///
    /// Over TLS there is no bind: the channel is sealed, and the first sealed Ping, once
    /// its Pong is back, has told the hub where to send (the same retries apply).
    pub async fn bind_udp(&self) -> Result<(), ClientError> {
        let udp = self
            .shared
            .udp
            .get_or_try_init(|| udp::open(&self.shared))
            .await?;
        udp.bind(&self.shared, &self.token).await
    }

    /// Moves the UDP channel to a new socket, on a new local port, then binds it as
    /// [`Client::bind_udp`] does. What a NAT does to a shim's address when its mapping
    /// expires, done on purpose: a sealed channel follows with no bind at all (its Ping
    /// from the new port is enough), a plain one binds the new address. Datagrams on their
    /// way to the old port are lost.
    pub async fn rebind_udp(&self) -> Result<(), ClientError> {
        let udp = self.shared.udp.get().ok_or(ClientError::NotBound)?;
        udp.replace_socket(&self.shared).await?;
        udp.bind(&self.shared, &self.token).await
    }

    /// [`Client::command`] over the UDP channel: the targets with a UDP channel receive it
    /// over UDP, and the Ack comes back over UDP. Waits at most
    /// [`ClientOptions::udp_timeout`]; one UDP request is in flight at a time (see the
    /// module documentation).
    pub async fn command_udp(&self, target: &str, text: &str) -> Result<Sent, ClientError> {
        check_pattern("target", target)?;
        let (id, reached) = self
            .shared
            .bound_udp()?
            .request(&self.shared, |b| {
                encode_routed(Opcode::Command, target, text, b)
            })
            .await?;
        Ok(Sent { id, reached })
    }

    /// [`Client::echo`] over the UDP channel.
    pub async fn echo_udp(&self, target: &str, text: &str) -> Result<usize, ClientError> {
        check_pattern("target", target)?;
        Ok(self
            .shared
            .bound_udp()?
            .request(&self.shared, |b| {
                encode_routed(Opcode::Echo, target, text, b)
            })
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
        udp.ping(data, self.shared.options.udp_timeout).await
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
