//! The UDP side: the channel's socket, its bind to the session, the stop-and-wait
//! exchange with its re-synchronisation (see "How replies find their request" in the
//! [client documentation](super)), the sealing of a TLS session's datagrams (see "TLS"
//! there), and the UDP reader.

use super::error::ClientError;
use super::events::{EventQueue, SenderCache, delivery_event};
use super::pending::{PongWaiter, Reply, resolve_pong};
use super::socket::udp_local;
use super::state::{Subscriptions, state_event};
use super::tcp::Shared;
use super::text::wire_text;
use super::{Event, MAX_FRAME, Transport};
use crate::proto::reject::answers_no_request;
use crate::proto::sealed::{self, Keys, ReplayWindow};
use crate::proto::{Opcode, Token, codec, encode};
use arc_swap::ArcSwap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

/// How long each UDP bind attempt waits for its Pong before sending again (doubling is
/// cheaper than a fixed wait on a quiet LAN and still patient over a slow link).
const BIND_WAITS_MS: [u64; 5] = [100, 200, 400, 800, 1600];

/// A TLS session's UDP channel: its keys, the counter of what it sends, and the window
/// of what it received.
struct Sealed {
    keys: Keys,
    /// The counter of the next datagram: from 0 up, never reused (it survives a new
    /// socket, since the hub's window for the session does too).
    next: AtomicU64,
    window: parking_lot::Mutex<ReplayWindow>,
}

impl Sealed {
    /// Opens a datagram from the hub in place: the frame inside, or `None` to drop it.
    /// The cheap checks come first (length and marker, session, window); the window
    /// records the counter only once the datagram is authenticated, so a forgery cannot
    /// use up a counter the hub will send.
    fn open<'a>(&self, dgram: &'a mut [u8]) -> Option<&'a [u8]> {
        let h = sealed::header(dgram).ok()?;
        if h.session != self.keys.session {
            return None;
        }
        let mut window = self.window.lock();
        if !window.check(h.counter) {
            return None;
        }
        let frame = self.keys.hub.open(dgram).ok()?;
        window.accept(h.counter);
        Some(frame)
    }
}

/// The encoding buffers of datagrams.
#[derive(Default)]
struct Scratch {
    frame: Vec<u8>,
    /// The sealed datagram (TLS sessions only).
    sealed: Vec<u8>,
}

/// The UDP channel of one client.
pub(super) struct UdpShared {
    /// Replaced by [`UdpShared::replace_socket`].
    sock: ArcSwap<UdpSocket>,
    /// Encoding buffers for datagrams; sends try a non-blocking send under this lock
    /// first, so the common case allocates nothing.
    scratch: parking_lot::Mutex<Scratch>,
    /// `Some` for a TLS session: every datagram is sealed, and only sealed ones are read.
    sealed: Option<Sealed>,
    /// Datagrams dropped because they could not be opened.
    dropped: AtomicU64,
    /// Turn-taking for UDP exchanges (stop and wait); holds "out of step": a reply may
    /// still be owed to an abandoned exchange, so resynchronise before the next one.
    exchange: tokio::sync::Mutex<bool>,
    /// The exchange waiting for its Ack or Error.
    slot: parking_lot::Mutex<Option<oneshot::Sender<Reply>>>,
    pongs: parking_lot::Mutex<Vec<PongWaiter>>,
    /// Signalled when a Quit arrives (for the bind loop).
    quit: Notify,
    pub(super) bound: AtomicBool,
    reader: parking_lot::Mutex<Option<AbortHandle>>,
}

impl UdpShared {
    /// Encodes one frame and sends it as one datagram (sealed for a TLS session).
    pub(super) async fn send(&self, build: impl FnOnce(&mut Vec<u8>)) -> Result<(), ClientError> {
        let spill = {
            let mut s = self.scratch.lock();
            let s = &mut *s;
            s.frame.clear();
            build(&mut s.frame);
            let dgram = match &self.sealed {
                Some(k) => {
                    s.sealed.clear();
                    let counter = k.next.fetch_add(1, Ordering::Relaxed);
                    k.keys
                        .client
                        .seal(k.keys.session, counter, &s.frame, &mut s.sealed);
                    &s.sealed
                }
                None => &s.frame,
            };
            match self.sock.load().try_send(dgram) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dgram.clone(),
                Err(e) => return Err(e.into()),
            }
        };
        self.send_raw(&spill).await
    }

    async fn send_raw(&self, dgram: &[u8]) -> Result<(), ClientError> {
        self.sock.load_full().send(dgram).await?;
        Ok(())
    }

    /// Datagrams dropped because they could not be opened (see
    /// [`Client::sealed_dropped`](super::Client::sealed_dropped)).
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Moves the channel to a new socket (a new local port) and reads from that one
    /// instead; the caller binds it (see [`Client::rebind_udp`](super::Client::rebind_udp)).
    pub(super) async fn replace_socket(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
    ) -> Result<(), ClientError> {
        let sock = Arc::new(socket(shared).await?);
        if shared.is_closed() {
            return Err(ClientError::Closed);
        }
        self.sock.store(sock.clone());
        start_reader(self, sock, shared);
        Ok(())
    }

    pub(super) fn stop(&self) {
        self.bound.store(false, Ordering::Relaxed);
        if let Some(r) = self.reader.lock().take() {
            r.abort();
        }
        self.slot.lock().take();
        self.pongs.lock().clear();
    }

    /// Binds the channel to the session with `token` and confirms it with a Ping, sending
    /// both again with growing waits (see [`Client::bind_udp`](super::Client::bind_udp)).
    /// A sealed channel sends only the Ping: its Pong is the bind.
    pub(super) async fn bind(&self, shared: &Shared, token: &Token) -> Result<(), ClientError> {
        let mut out_of_step = self.exchange.lock().await;
        let mut bind = Vec::with_capacity(18);
        if self.sealed.is_none() {
            encode(Opcode::Session, &token.0, &mut bind);
        }
        let nonce = shared.nonce(b"bind");
        let (tx, mut rx) = oneshot::channel();
        self.pongs.lock().push(PongWaiter::new(nonce.clone(), tx));
        let mut saw_quit = false;
        for wait in BIND_WAITS_MS {
            if shared.is_closed() {
                return Err(ClientError::Closed);
            }
            let quit = self.quit.notified();
            tokio::pin!(quit);
            quit.as_mut().enable();
            // A send can fail with ECONNREFUSED left by an earlier ICMP error; the retry
            // loop is the answer to that as to a lost datagram.
            if !bind.is_empty() {
                let _ = self.send_raw(&bind).await;
            }
            let _ = self.send(|b| encode(Opcode::Ping, &nonce, b)).await;
            tokio::select! {
                r = &mut rx => {
                    if r.is_err() {
                        return Err(ClientError::Closed);
                    }
                    self.bound.store(true, Ordering::Relaxed);
                    // Any reply still owed to an abandoned request came before this Pong.
                    self.slot.lock().take();
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
                shared.addr,
                BIND_WAITS_MS.len()
            )
        }))
    }

    /// One exchange: waits for its turn, re-synchronises if an earlier exchange was
    /// abandoned, sends, and waits for the Ack or Error.
    pub(super) async fn request(
        &self,
        shared: &Shared,
        build: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(u64, usize), ClientError> {
        let mut out_of_step = self.exchange.lock().await;
        if shared.is_closed() {
            return Err(ClientError::Closed);
        }
        if *out_of_step {
            self.resync(shared).await?;
        }
        // Stays set if this future is dropped or times out: the next exchange resyncs.
        *out_of_step = true;
        let (tx, rx) = oneshot::channel();
        *self.slot.lock() = Some(tx);
        self.send(build).await?;
        let reply = match tokio::time::timeout(shared.options.udp_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(ClientError::Closed),
            Err(_) => {
                self.slot.lock().take();
                return Err(ClientError::Timeout("an Ack over UDP"));
            }
        };
        *out_of_step = false;
        match reply {
            Reply::Ack { id, count, .. } => Ok((id, count)),
            other => Err(other.into_error()),
        }
    }

    /// Pings until a Pong comes back: afterwards no reply to an earlier request can still
    /// be on its way.
    async fn resync(&self, shared: &Shared) -> Result<(), ClientError> {
        self.slot.lock().take();
        let nonce = shared.nonce(b"sync");
        let (tx, mut rx) = oneshot::channel();
        self.pongs.lock().push(PongWaiter::new(nonce.clone(), tx));
        for _ in 0..3 {
            self.send(|b| encode(Opcode::Ping, &nonce, b)).await?;
            tokio::select! {
                r = &mut rx => return r.map(|_| ()).map_err(|_| ClientError::Closed),
                _ = tokio::time::sleep(shared.options.udp_timeout) => {}
            }
        }
        Err(ClientError::Timeout("a Pong over UDP"))
    }

    /// One Ping; the round-trip time, or `Timeout` after `timeout`.
    pub(super) async fn ping(
        &self,
        data: &[u8],
        timeout: Duration,
    ) -> Result<Duration, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.pongs.lock().push(PongWaiter::new(data.to_vec(), tx));
        let start = Instant::now();
        self.send(|b| encode(Opcode::Ping, data, b)).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(at)) => Ok(at.saturating_duration_since(start)),
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Timeout("a Pong over UDP")),
        }
    }
}

/// A UDP socket of the server's address family on an ephemeral port, connected to the
/// server (so the kernel drops datagrams from anybody else).
async fn socket(shared: &Shared) -> Result<UdpSocket, ClientError> {
    let sock = UdpSocket::bind(udp_local(shared.addr, shared.options.bind_ip)).await?;
    sock.connect(shared.addr).await?;
    Ok(sock)
}

/// Creates the UDP channel, sealed if the session is TLS, and starts its reader.
pub(super) async fn open(shared: &Arc<Shared>) -> Result<Arc<UdpShared>, ClientError> {
    if shared.is_closed() {
        return Err(ClientError::Closed);
    }
    let sock = Arc::new(socket(shared).await?);
    let udp = Arc::new(UdpShared {
        sock: ArcSwap::new(sock.clone()),
        scratch: parking_lot::Mutex::new(Scratch::default()),
        sealed: shared.exporter.as_ref().map(|x| Sealed {
            keys: Keys::from_exporter(x),
            next: AtomicU64::new(0),
            window: parking_lot::Mutex::new(ReplayWindow::default()),
        }),
        dropped: AtomicU64::new(0),
        exchange: tokio::sync::Mutex::new(false),
        slot: parking_lot::Mutex::new(None),
        pongs: parking_lot::Mutex::new(Vec::new()),
        quit: Notify::new(),
        bound: AtomicBool::new(false),
        reader: parking_lot::Mutex::new(None),
    });
    start_reader(&udp, sock, shared);
    Ok(udp)
}

/// Starts the reader of `sock`, ending the reader of the socket before it.
fn start_reader(udp: &Arc<UdpShared>, sock: Arc<UdpSocket>, shared: &Shared) {
    let task = tokio::spawn(reader(
        udp.clone(),
        sock,
        shared.events.clone(),
        shared.subs.clone(),
    ));
    if let Some(old) = udp.reader.lock().replace(task.abort_handle()) {
        old.abort();
    }
}

/// The UDP reader task.
async fn reader(
    udp: Arc<UdpShared>,
    sock: Arc<UdpSocket>,
    events: Arc<EventQueue>,
    subs: Arc<Subscriptions>,
) {
    let mut buf = vec![0u8; 65_536];
    let mut senders = SenderCache::default();
    loop {
        let n = match sock.recv(&mut buf).await {
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
        let dgram = match &udp.sealed {
            None => &buf[..n],
            Some(s) => match s.open(&mut buf[..n]) {
                Some(frame) => frame,
                None => {
                    udp.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        let Ok(f) = codec::decode_datagram(dgram, MAX_FRAME) else {
            continue;
        };
        let Some(op) = f.opcode() else { continue };
        match op {
            Opcode::Ack => {
                let reply = Reply::ack(f.data, Vec::new);
                // No exchange waiting: a late reply to an abandoned one; drop it.
                if let Some(w) = udp.slot.lock().take() {
                    let _ = w.send(reply);
                }
            }
            // An Error refusing a CommandResponse or a Set answers no request: a Set sent
            // over UDP while a Command's exchange waits must not take its place.
            Opcode::Error if answers_no_request(f.data) => events.push(Event::Error {
                message: wire_text(f.data),
                via: Transport::Udp,
            }),
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
                if let Some(ev) = delivery_event(op, f.data, Transport::Udp, &mut senders) {
                    events.push(ev);
                }
            }
            // A delta of one of the client's subscriptions (never part of a listing, which
            // comes over TCP): held, queued or dropped by the book of subscriptions.
            Opcode::Set => match state_event(f.data, Transport::Udp) {
                Some((sid, ev)) => subs.deliver_udp(sid, ev, &events),
                None => events.push(Event::Error {
                    message: "malformed Set frame from the server".into(),
                    via: Transport::Udp,
                }),
            },
            Opcode::Ping => {
                let _ = udp.send(|b| encode(Opcode::Pong, f.data, b)).await;
            }
            _ => {}
        }
    }
}
