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
//! exceptions: an Error refusing a CommandResponse or a Set (its text starts `response
//! refused:` or `state refused:`) answers no request and arrives as an [`Event::Error`],
//! over either transport; and a rename, which the server
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
//! # Relay state
//!
//! A shim publishes keys about itself with [`Client::set_state`] (or
//! [`Client::set_state_udp`] every tick); nothing answers an applied Set. A watcher reads
//! them once with [`Client::get_state`], or with [`Client::subscribe`] gets a snapshot and
//! then [`Event::State`] deltas, [`Event::Join`] and [`Event::Leave`]. A Subscribe's
//! answer is a listing like Who's: the full State frames with its id before its Ack are
//! its snapshot, and every other State frame is an event. Deltas travel over UDP when the
//! watcher has a bound channel, and such a delta can arrive before the snapshot it
//! follows has been read from TCP; it is held until the snapshot is handed over, so the
//! snapshot then the events, in order, is always the current state.
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
mod state;
mod tcp;
mod text;
mod tls;
mod udp;

pub use error::ClientError;
pub use tls::TlsOptions;

use crate::proto::identity::check_identity;
pub use crate::proto::reply::Terms;
use crate::proto::request::{encode_response, encode_routed};
use crate::proto::sealed::EXPORTER_LEN;
use crate::proto::state::{
    MAX_INTERVAL_MS, encode_get, encode_set, encode_subscribe, encode_unsubscribe,
};
use crate::proto::{NEWLINE, Opcode, Token, encode};
use pending::{Pending, PongWaiter, Reply, StateRequest};
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
    /// The node of the cluster that serves it (none from a hub on its own).
    pub node: Option<String>,
}

/// One shim's relay state, as a Subscribe's snapshot, a [`Client::get_state`] answer or an
/// [`Event::State`] carries it: the keys a shim publishes about itself (hit points, zone,
/// target...) so that watchers need not poll it with Commands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimState {
    /// Whose state.
    pub identity: String,
    /// The shim's sequence number when the hub built the frame. Of two frames about one
    /// identity on one subscription, the lower number is the older: a consumer drops a
    /// frame (a delta over UDP, which can arrive late) whose number is below the highest
    /// it applied, and starts again from zero after the identity's join or leave.
    pub seq: u64,
    /// Its keys, in the order the hub sent them (the order the shim holds them): in a full
    /// frame every key (of those asked for), in a delta only what changed.
    pub items: Vec<StateItem>,
}

/// One key of a [`ShimState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateItem {
    /// The key, spelled as the shim first wrote it (keys compare ignoring ASCII case).
    pub key: String,
    /// The value, line breaks as `\n`; `None`: the key was deleted (deltas only), so a
    /// consumer drops what it held for it.
    pub value: Option<String>,
    /// How long before the hub built the frame the value was set, so that a consumer can
    /// show how stale it is (zero for a deleted key).
    pub age: Duration,
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
    /// A State frame for one of this client's subscriptions ([`Client::subscribe`]) that
    /// is not part of the Subscribe's answer: what changed in a watched shim (`full` false:
    /// apply the items, a `None` value deleting its key), or its whole state (`full` true:
    /// replace everything held for the identity; sent after a rename brought it into the
    /// pattern, or to resynchronise).
    State {
        /// The subscription.
        sid: u32,
        /// Whole state (`F`) rather than what changed (`D`).
        full: bool,
        /// Whose state, and the items.
        state: ShimState,
        /// The transport it arrived on (deltas come over UDP when this client has a bound
        /// channel).
        via: Transport,
    },
    /// A shim matching subscription `sid`'s pattern appeared (identified, or renamed into
    /// the pattern), so a watcher can list it before it holds any key. Always over TCP.
    Join {
        /// The subscription.
        sid: u32,
        /// Who.
        identity: String,
    },
    /// A watched shim went: a watcher forgets its state (no State frame for it follows
    /// until it joins again). Always over TCP.
    Leave {
        /// The subscription.
        sid: u32,
        /// Who.
        identity: String,
        /// Why, as the hub's close line gives it (`eof`, `quit`, `idle timeout`, ...), or
        /// `renamed`.
        reason: String,
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
            | Event::Quit { via }
            | Event::State { via, .. } => Some(*via),
            Event::Join { .. } | Event::Leave { .. } => Some(Transport::Tcp),
            Event::Response(r) => Some(r.via),
            Event::Closed { .. } => None,
        }
    }
}

/// Checks a target (`what` is `"target"`: Command, Echo) or pattern (`"pattern"`: Who,
/// Get, Subscribe) as the hub would, without sending anything: the methods taking one
/// check it so, and a tool can check its arguments before connecting. The error is
/// [`ClientError::BadTarget`], reading as the hub's Error would, or
/// [`ClientError::Invalid`] for a space or control character.
pub fn check_target(what: &'static str, target: &str) -> Result<(), ClientError> {
    check_pattern(what, target)
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
            opened.terms,
            options,
        ));
        let reader = tokio::spawn(tcp::reader(shared.clone(), opened.reader, opened.rest));
        let keepalive = shared
            .keepalive_every()
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

    /// The settings the hub said this session must follow (its Terms frame: idle timeout,
    /// Ping interval, limits, features); `None` from a hub that sends none. The keep-alive
    /// already follows them.
    pub fn terms(&self) -> Option<Terms> {
        self.shared.terms.lock().clone()
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

    /// Sets (`Some(value)`) or deletes (`None`) keys of this shim's relay state, all in one
    /// Set frame over TCP, applied by the hub all or nothing; a key written twice takes the
    /// last value. Values may hold spaces and line breaks (`\n`).
    ///
    /// Nothing answers a Set that is applied (a shim sends its state every tick and wants
    /// nothing back), so this returns once the frame is written; a refusal (a limit, the
    /// rate) arrives later as an [`Event::Error`] starting `state refused:` and never
    /// answers another request. [`Client::ping`] afterwards proves the Set was handled.
    /// Refused here, with [`ClientError::Invalid`], before anything is sent: no items, a
    /// key outside the identity-segment grammar, a value holding the byte 0x1F, and a last
    /// value ending with `\r`.
    pub async fn set_state(&self, items: &[(&str, Option<&str>)]) -> Result<(), ClientError> {
        state::check_set(items)?;
        self.shared
            .send_tcp(None, None, |b| encode_set(items.iter().copied(), b))
            .await
    }

    /// [`Client::set_state`] as one datagram over the UDP channel: what a shim sends every
    /// tick, where a lost update is soon replaced by the next. A refusal comes back over
    /// UDP as an [`Event::Error`]. Fails with [`ClientError::NotBound`] without a bound
    /// channel.
    pub async fn set_state_udp(&self, items: &[(&str, Option<&str>)]) -> Result<(), ClientError> {
        state::check_set(items)?;
        let udp = self.shared.bound_udp()?;
        udp.send(|b| encode_set(items.iter().copied(), b)).await
    }

    /// Watches the relay state of the shims `pattern` names (this client left out unless
    /// it starts with `+`; only `keys`, or every key when empty), and returns the
    /// snapshot: one [`ShimState`] per matching shim. Then [`Event::State`] deltas (at most
    /// one delivery per `interval`, the latest values; zero: as soon as possible),
    /// [`Event::Join`] and [`Event::Leave`] follow, all carrying `sid`, until
    /// [`Client::unsubscribe`] or the end of the connection.
    ///
    /// `sid` is this client's name for the subscription (1 or more), so that events of
    /// several subscriptions can be told apart; one in use is refused here. Deltas that come
    /// over UDP before the snapshot was read are queued after it, so applying the snapshot
    /// and then the events in order is always right. A server refusal (a bad pattern, too
    /// many subscriptions, a rate limit) is [`ClientError::Server`]; `interval` is at most
    /// an hour and is counted in whole milliseconds.
    pub async fn subscribe(
        &self,
        sid: u32,
        pattern: &str,
        keys: &[&str],
        interval: Duration,
    ) -> Result<Vec<ShimState>, ClientError> {
        if sid == 0 {
            return Err(ClientError::Invalid {
                what: "subscription id",
                why: "it must be 1 or more (0 names a Get's answer)".into(),
            });
        }
        check_pattern("pattern", pattern)?;
        state::check_keys(keys)?;
        let interval_ms = u64::try_from(interval.as_millis())
            .ok()
            .filter(|&ms| ms <= MAX_INTERVAL_MS)
            .ok_or_else(|| ClientError::Invalid {
                what: "interval",
                why: format!("{interval:?}: it must be at most an hour"),
            })?;
        let claim = self.shared.subs.claim(sid)?;
        let (tx, rx) = oneshot::channel();
        self.shared
            .send_tcp_pending(
                Some(Pending::state(tx, StateRequest::Subscribe(sid))),
                None,
                |b| {
                    claim.sent();
                    encode_subscribe(sid, interval_ms, pattern, keys, b)
                },
            )
            .await?;
        drop(claim);
        match self.shared.await_reply(rx).await? {
            Reply::Ack { states, .. } => Ok(states),
            other => Err(other.into_error()),
        }
    }

    /// Ends subscription `sid` and waits for the hub's Ack: no event of it comes after
    /// this returns (a delta still on its way over UDP is dropped). An id the hub does not
    /// know is [`ClientError::Server`] (`no subscription SID`).
    ///
    /// The id is free again once this returns. Over UDP, a delta of the old subscription
    /// delayed past a new Subscribe with the same id would be taken for the new one's (the
    /// wire cannot tell them apart): a watcher with a UDP channel that resubscribes at once
    /// should pick a fresh id.
    pub async fn unsubscribe(&self, sid: u32) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.shared.subs.ending(sid);
        self.shared
            .send_tcp_pending(
                Some(Pending::state(tx, StateRequest::Unsubscribe(sid))),
                None,
                |b| encode_unsubscribe(sid, b),
            )
            .await?;
        self.shared.await_ack(rx).await.map(|_| ())
    }

    /// Reads the relay state of the shims `pattern` names, once: one [`ShimState`] per
    /// matching shim with every key, or only `keys` when given. No match is an empty list,
    /// not an error. As in a [`Client::who`] listing, this client itself is listed when it
    /// matches (with whatever state it set).
    pub async fn get_state(
        &self,
        pattern: &str,
        keys: &[&str],
    ) -> Result<Vec<ShimState>, ClientError> {
        check_pattern("pattern", pattern)?;
        state::check_keys(keys)?;
        let (tx, rx) = oneshot::channel();
        self.shared
            .send_tcp_pending(Some(Pending::state(tx, StateRequest::Get)), None, |b| {
                encode_get(pattern, keys, b)
            })
            .await?;
        match self.shared.await_reply(rx).await? {
            Reply::Ack { states, .. } => Ok(states),
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
