//! The TCP side and the state a client shares with its tasks: the connection and its
//! handshake, the writer that keeps the waiter queue and the byte stream in step, the
//! reader that hands replies to their waiters and deliveries to the events, and the
//! keep-alive.

use super::error::{ClientError, io_error, server_error};
use super::events::{EventQueue, SenderCache, delivery_event};
use super::pending::{Pending, PongWaiter, Reply, StateRequest, resolve_pong};
use super::socket::{Connect, connect_from};
use super::state::{self, Subscriptions};
use super::text::{check_data, lossy, wire_text};
use super::tls;
use super::udp::UdpShared;
use super::{ClientOptions, Event, MAX_FRAME, ShimState, Transport, WhoEntry};
use crate::proto::reject::{self, answers_no_request};
use crate::proto::reply::{self, Terms, parse_who_entry, push_u64};
use crate::proto::sealed::EXPORTER_LEN;
use crate::proto::{Opcode, Token, codec, encode};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OnceCell, oneshot};

/// How much the TCP reader asks the kernel for per read.
const READ_CHUNK: usize = 16 * 1024;
/// Queued events past which the TCP reader yields to other tasks after a read.
const YIELD_BACKLOG: usize = 64;
/// Ping data the keep-alive uses.
const KEEPALIVE_DATA: &[u8] = b"velium-keepalive";

/// The connection's read half: the socket's, or the TLS stream's. Everything above the
/// byte stream is the same for both.
pub(super) type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The connection's write half.
pub(super) type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

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
    half: WriteHalf,
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
        // TLS takes the bytes into records first: the flush writes them out.
        self.half.flush().await?;
        self.buf.clear();
        self.done = 0;
        if self.buf.capacity() > 64 * 1024 {
            self.buf.shrink_to(4096);
        }
        Ok(())
    }
}

/// What a client shares with its reader, keep-alive and UDP tasks.
pub(super) struct Shared {
    pub(super) addr: SocketAddr,
    pub(super) identity: parking_lot::RwLock<Arc<str>>,
    writer: tokio::sync::Mutex<Writer>,
    waiting: parking_lot::Mutex<Waiting>,
    pub(super) udp: OnceCell<Arc<UdpShared>>,
    pub(super) events: Arc<EventQueue>,
    /// This client's subscription ids, shared with the UDP reader (see `client/state.rs`).
    pub(super) subs: Arc<Subscriptions>,
    /// Wakes the reader to end the connection (keep-alive failure, write error).
    shutdown: Notify,
    shutdown_reason: parking_lot::Mutex<Option<String>>,
    closed: AtomicBool,
    nonce: AtomicU64,
    pub(super) options: ClientOptions,
    /// The TLS session's exporter output, which keys the sealed UDP channel (`None`
    /// without TLS: UDP is then plain).
    pub(super) exporter: Option<[u8; EXPORTER_LEN]>,
    /// The hub's latest Terms frame (none from a hub that sends none).
    pub(super) terms: parking_lot::Mutex<Option<Terms>>,
    /// Wakes the keep-alive when new Terms arrive.
    terms_changed: Notify,
}

impl Shared {
    /// The state of a session whose handshake is done.
    pub(super) fn new(
        addr: SocketAddr,
        identity: &str,
        writer: WriteHalf,
        exporter: Option<[u8; EXPORTER_LEN]>,
        terms: Option<Terms>,
        options: ClientOptions,
    ) -> Shared {
        Shared {
            addr,
            identity: parking_lot::RwLock::new(Arc::from(identity)),
            writer: tokio::sync::Mutex::new(Writer {
                half: writer,
                buf: Vec::with_capacity(256),
                done: 0,
            }),
            waiting: parking_lot::Mutex::new(Waiting::default()),
            udp: OnceCell::new(),
            events: Arc::new(EventQueue::default()),
            subs: Arc::new(Subscriptions::default()),
            shutdown: Notify::new(),
            shutdown_reason: parking_lot::Mutex::new(None),
            closed: AtomicBool::new(false),
            nonce: AtomicU64::new(0),
            options,
            exporter,
            terms: parking_lot::Mutex::new(terms),
            terms_changed: Notify::new(),
        }
    }

    /// How often the keep-alive pings: the client's setting, or the hub's Ping interval
    /// from its Terms if that is shorter (a hub with a short idle timeout).
    pub(super) fn keepalive_every(&self) -> Option<Duration> {
        let mine = self.options.keepalive?;
        let hub = (*self.terms.lock())
            .as_ref()
            .map(|t| t.ping_ms)
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis);
        Some(hub.map_or(mine, |h| h.min(mine)))
    }

    /// Queues the waiters, then encodes and writes one frame with one write call, all
    /// under the writer lock so that the waiter queue and the byte stream agree.
    pub(super) async fn send_tcp(
        &self,
        reply: Option<oneshot::Sender<Reply>>,
        pong: Option<PongWaiter>,
        build: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), ClientError> {
        self.send_tcp_pending(reply.map(Pending::new), pong, build)
            .await
    }

    /// [`Shared::send_tcp`] with the reply waiter made by the caller.
    pub(super) async fn send_tcp_pending(
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

    pub(super) async fn await_reply(
        &self,
        rx: oneshot::Receiver<Reply>,
    ) -> Result<Reply, ClientError> {
        match tokio::time::timeout(self.options.request_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ClientError::Closed),
            // The waiter stays queued with its receiver gone: the reply, when it comes, is
            // dropped and the queue stays in step (TCP loses nothing).
            Err(_) => Err(ClientError::Timeout("the server's reply")),
        }
    }

    pub(super) async fn await_ack(
        &self,
        rx: oneshot::Receiver<Reply>,
    ) -> Result<(u64, usize), ClientError> {
        match self.await_reply(rx).await? {
            Reply::Ack { id, count, .. } => Ok((id, count)),
            other => Err(other.into_error()),
        }
    }

    pub(super) async fn ping_tcp(&self, data: &[u8]) -> Result<Duration, ClientError> {
        check_data(data)?;
        let (tx, rx) = oneshot::channel();
        let start = Instant::now();
        self.send_tcp(None, Some(PongWaiter::new(data.to_vec(), tx)), |b| {
            encode(Opcode::Ping, data, b)
        })
        .await?;
        match tokio::time::timeout(self.options.request_timeout, rx).await {
            Ok(Ok(at)) => Ok(at.saturating_duration_since(start)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("a Pong")),
        }
    }

    pub(super) fn bound_udp(&self) -> Result<&UdpShared, ClientError> {
        match self.udp.get() {
            Some(u) if u.bound.load(Ordering::Relaxed) => Ok(u),
            _ => Err(ClientError::NotBound),
        }
    }

    /// True once the TCP connection has ended.
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A ticket for a rename: never 0, unique for the session.
    pub(super) fn ticket(&self) -> u64 {
        self.nonce.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Unique ping data, so that concurrent pings never take each other's Pong.
    pub(super) fn nonce(&self, prefix: &[u8]) -> Vec<u8> {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        let mut v = prefix.to_vec();
        v.push(b'-');
        push_u64(&mut v, n);
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
                let mut reply = Reply::ack(data, || std::mem::take(&mut rs.who));
                let listing = std::mem::take(&mut rs.listing);
                let Some(w) = self.waiting.lock().replies.pop_front() else {
                    return;
                };
                if let Reply::Ack { states, .. } = &mut reply {
                    *states = listing;
                }
                self.answer(w, reply, rs);
            }
            // An Error refusing a CommandResponse or a Set answers no request, and neither
            // does the reason the hub gives for closing, which the close then reports.
            Opcode::Error if answers_no_request(data) => {
                let message = wire_text(data);
                if let Some(why) = message.strip_prefix(reject::CLOSING) {
                    rs.closing = Some(why.trim_start().to_owned());
                }
                rs.batch.push(Event::Error {
                    message,
                    via: Transport::Tcp,
                })
            }
            Opcode::Terms => match reply::parse_terms(data) {
                Some(t) => {
                    *self.terms.lock() = Some(t);
                    self.terms_changed.notify_one();
                }
                None => rs.batch.push(malformed(op)),
            },
            Opcode::Error => {
                rs.who.clear();
                rs.listing.clear();
                let message = wire_text(data);
                let waiter = self.waiting.lock().replies.pop_front();
                match waiter {
                    Some(w) => self.answer(w, Reply::Error(message), rs),
                    None => rs.batch.push(Event::Error {
                        message,
                        via: Transport::Tcp,
                    }),
                }
            }
            // Server to client, 0x10 is a State frame: part of the listing that answers
            // the oldest request if that is the Subscribe (or Get) it is a full frame for;
            // otherwise an event. The hub queues a listing with its Ack in one go, so
            // nothing else comes between them on this connection.
            Opcode::Set => {
                let Some((sid, full, st)) = state::parse(data) else {
                    rs.batch.push(malformed(op));
                    return;
                };
                let listed = full
                    && self
                        .waiting
                        .lock()
                        .replies
                        .front()
                        .is_some_and(|w| w.state.lists(sid));
                if listed {
                    rs.listing.push(st);
                } else {
                    rs.batch.push(Event::State {
                        sid,
                        full,
                        state: st,
                        via: Transport::Tcp,
                    });
                }
            }
            Opcode::Presence => match state::presence_event(data) {
                Some((_, ev)) => rs.batch.push(ev),
                None => rs.batch.push(malformed(op)),
            },
            Opcode::WhoEntry => {
                if let Some(e) = who_entry(data) {
                    rs.who.push(e);
                }
            }
            Opcode::Pong => {
                let mut q = self.waiting.lock();
                // The Ping after a rename: with no Error before it, the rename was done.
                if let Some(t) = resolve_pong(&mut q.pongs, data, Instant::now())
                    && t != 0
                    && q.replies.front().is_some_and(|p| p.ticket == t)
                    && let Some(w) = q.replies.pop_front()
                {
                    w.send(Reply::Quiet);
                }
            }
            Opcode::Command | Opcode::Echo | Opcode::CommandResponse => {
                match delivery_event(op, data, Transport::Tcp, &mut rs.senders) {
                    Some(ev) => rs.batch.push(ev),
                    None => rs.batch.push(malformed(op)),
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
            Opcode::None
            | Opcode::Identify
            | Opcode::Session
            | Opcode::Who
            | Opcode::Auth
            | Opcode::Subscribe
            | Opcode::Unsubscribe
            | Opcode::Get => {}
        }
    }

    /// Hands the oldest waiting request its reply. The end of a Subscribe or Unsubscribe
    /// also settles its id in the book of subscriptions; a Subscribe's reply goes out
    /// under that book's lock, together with the events before it and then the deltas
    /// that came over UDP meanwhile (see `client/state.rs`).
    fn answer(&self, w: Pending, reply: Reply, rs: &mut ReaderState) {
        match w.state {
            StateRequest::Subscribe(sid) => {
                let ok = matches!(reply, Reply::Ack { .. });
                self.subs.answered(sid, ok, &self.events, || {
                    w.send(reply);
                    self.events.push_all(&mut rs.batch);
                });
            }
            StateRequest::Unsubscribe(sid) => {
                self.subs.ended(sid);
                w.send(reply);
            }
            StateRequest::None | StateRequest::Get => w.send(reply),
        }
    }
}

/// The event a frame that is not in its form makes.
fn malformed(op: Opcode) -> Event {
    Event::Error {
        message: format!("malformed {} frame from the server", op.name()),
        via: Transport::Tcp,
    }
}

/// A connection whose handshake is done.
pub(super) struct Opened {
    /// The session token.
    pub(super) token: Token,
    pub(super) reader: ReadHalf,
    pub(super) writer: WriteHalf,
    /// Bytes read past the Session frame, for the reader to start with.
    pub(super) rest: Vec<u8>,
    /// See [`Shared::exporter`].
    pub(super) exporter: Option<[u8; EXPORTER_LEN]>,
    /// The Terms frame, when it came in the read that brought the Session.
    pub(super) terms: Option<Terms>,
}

/// Connects to `addr` (from [`ClientOptions::bind_ip`] if set, with `TCP_NODELAY`), runs
/// the TLS handshake if [`ClientOptions::tls`] asks for it (within the same
/// `connect_timeout`), sends Auth if there is a secret and Identify, and waits for the
/// Session frame.
pub(super) async fn open(
    addr: SocketAddr,
    identity: &str,
    options: &ClientOptions,
) -> Result<Opened, ClientError> {
    let connect = async {
        match options.bind_ip {
            Some(ip) => connect_from(ip, addr).await,
            None => Ok(TcpStream::connect(addr).await?),
        }
    };
    let deadline = tokio::time::Instant::now() + options.connect_timeout;
    let stream = match tokio::time::timeout_at(deadline, connect).await {
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
    let (mut rd, mut wr, exporter): (ReadHalf, WriteHalf, _) = match &options.tls {
        Some(t) => {
            let (tls, exporter) =
                tokio::time::timeout_at(deadline, tls::handshake(stream, addr, t))
                    .await
                    .map_err(|_| ClientError::Timeout("the TLS handshake"))??;
            let (rd, wr) = tokio::io::split(tls);
            (Box::new(rd), Box::new(wr), Some(exporter))
        }
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr), None)
        }
    };
    let mut hello = Vec::with_capacity(identity.len() + 2);
    match (&options.user, &options.secret) {
        (Some(user), Some(secret)) => {
            let mut data = Vec::with_capacity(user.len() + 1 + secret.len());
            data.extend_from_slice(user.as_bytes());
            data.push(b' ');
            data.extend_from_slice(secret);
            encode(Opcode::Auth, &data, &mut hello);
        }
        (None, Some(secret)) => encode(Opcode::Auth, secret, &mut hello),
        _ => {}
    }
    encode(Opcode::Identify, identity.as_bytes(), &mut hello);
    wr.write_all(&hello).await.map_err(io_error)?;
    wr.flush().await.map_err(io_error)?;
    let (token, mut rest) = tokio::time::timeout(options.connect_timeout, read_session(&mut rd))
        .await
        .map_err(|_| ClientError::Timeout("the Session reply to Identify"))??;
    // The hub sends its Terms in the same write as the Session: take them now if they
    // are here, so that the keep-alive starts at the right interval.
    let terms = match codec::decode_exact(&rest, MAX_FRAME) {
        Ok(Some((f, n))) if f.op == Opcode::Terms as u8 => {
            let t = reply::parse_terms(f.data);
            rest.drain(..n);
            t
        }
        _ => None,
    };
    Ok(Opened {
        token,
        reader: rd,
        writer: wr,
        rest,
        exporter,
        terms,
    })
}

/// Reads frames until the Session reply; returns the token and any bytes read past it.
async fn read_session(rd: &mut ReadHalf) -> Result<(Token, Vec<u8>), ClientError> {
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
        if rd.read_buf(&mut buf).await.map_err(io_error)? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// What the TCP reader carries from one frame to the next.
#[derive(Default)]
struct ReaderState {
    /// WhoEntry frames waiting for the Ack that ends the listing.
    who: Vec<WhoEntry>,
    /// The State frames of the Subscribe's or Get's listing, waiting for its Ack.
    listing: Vec<ShimState>,
    /// The server sent Quit.
    quit: bool,
    /// The reason the server gave for closing (its `closing:` Error), if it gave one.
    closing: Option<String>,
    senders: SenderCache,
    /// Events from the frames of one read, queued together (one lock, one wake-up).
    batch: Vec<Event>,
}

/// The TCP reader task: demultiplexes replies to waiters and deliveries to events.
pub(super) async fn reader(shared: Arc<Shared>, mut rd: ReadHalf, mut buf: Vec<u8>) {
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
        // it: see "Deliveries" in the client documentation), so the queue stays short and
        // in cache instead of growing by a whole task budget of reads at a time.
        if shared.events.len() >= YIELD_BACKLOG {
            tokio::task::yield_now().await;
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) if rs.quit => break match rs.closing.take() {
                    Some(why) => format!("the server closed the connection: {why}"),
                    None => "the server sent Quit and closed the connection".into(),
                },
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
pub(super) async fn keepalive(shared: Arc<Shared>, mut every: Duration) {
    use tokio::sync::oneshot::error::TryRecvError;
    let mut limit = shared.options.request_timeout.max(every);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut oldest: Option<(Instant, oneshot::Receiver<Instant>)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // The hub's Terms arrived or changed: follow its Ping interval from now.
            _ = shared.terms_changed.notified() => {
                let now = shared.keepalive_every().unwrap_or(every);
                if now != every {
                    every = now;
                    limit = shared.options.request_timeout.max(every);
                    tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
                continue;
            }
        }
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
            Some(PongWaiter::new(data.clone(), tx))
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

/// WhoEntry data as a [`WhoEntry`] (the identity lossy, the time on the server's clock).
fn who_entry(data: &[u8]) -> Option<WhoEntry> {
    let (identity, since, udp, node) = parse_who_entry(data)?;
    Some(WhoEntry {
        identity: lossy(identity),
        since: UNIX_EPOCH + Duration::from_millis(since),
        udp,
        node: node.map(lossy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_entries_parse() {
        let e = who_entry(b"peq.a.bob 1700000000123 udp").unwrap();
        assert_eq!(e.identity, "peq.a.bob");
        assert_eq!(
            e.since,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
        );
        assert!(e.udp);
        assert!(!who_entry(b"x 5 -").unwrap().udp);
        assert_eq!(who_entry(b"x 5 tcp"), None);
        assert_eq!(who_entry(b"x five -"), None);
        assert_eq!(who_entry(b"x 5"), None);
    }
}
