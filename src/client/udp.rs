//! The UDP side: the channel's socket, its bind to the session, the stop-and-wait
//! exchange with its re-synchronisation (see "How replies find their request" in the
//! [client documentation](super)), and the UDP reader.

use super::error::ClientError;
use super::events::{EventQueue, SenderCache, delivery_event};
use super::pending::{PongWaiter, Reply, resolve_pong};
use super::socket::udp_local;
use super::tcp::Shared;
use super::text::wire_text;
use super::{Event, MAX_FRAME, Transport};
use crate::proto::reject::answers_no_request;
use crate::proto::{Opcode, Token, codec, encode};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, oneshot};
use tokio::task::AbortHandle;

/// How long each UDP bind attempt waits for its Pong before sending again (doubling is
/// cheaper than a fixed wait on a quiet LAN and still patient over a slow link).
const BIND_WAITS_MS: [u64; 5] = [100, 200, 400, 800, 1600];

/// The UDP channel of one client.
pub(super) struct UdpShared {
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
    pub(super) bound: AtomicBool,
    reader: parking_lot::Mutex<Option<AbortHandle>>,
}

impl UdpShared {
    /// Encodes one frame and sends it as one datagram.
    pub(super) async fn send(&self, build: impl FnOnce(&mut Vec<u8>)) -> Result<(), ClientError> {
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
    pub(super) async fn bind(&self, shared: &Shared, token: &Token) -> Result<(), ClientError> {
        let mut out_of_step = self.exchange.lock().await;
        let mut bind = Vec::with_capacity(18);
        encode(Opcode::Session, &token.0, &mut bind);
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
            let _ = self.send_raw(&bind).await;
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

/// Creates the UDP socket (same address family as the server, ephemeral port, connected
/// to the server) and starts its reader.
pub(super) async fn open(shared: &Arc<Shared>) -> Result<Arc<UdpShared>, ClientError> {
    if shared.is_closed() {
        return Err(ClientError::Closed);
    }
    let sock = UdpSocket::bind(udp_local(shared.addr, shared.options.bind_ip)).await?;
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
    let task = tokio::spawn(reader(udp.clone(), shared.events.clone()));
    *udp.reader.lock() = Some(task.abort_handle());
    Ok(udp)
}

/// The UDP reader task.
async fn reader(udp: Arc<UdpShared>, events: Arc<EventQueue>) {
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
                let reply = Reply::ack(f.data, Vec::new);
                // No exchange waiting: a late reply to an abandoned one; drop it.
                if let Some(w) = udp.slot.lock().take() {
                    let _ = w.send(reply);
                }
            }
            // An Error refusing a CommandResponse answers no request.
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
            Opcode::Ping => {
                let _ = udp.send(|b| encode(Opcode::Pong, f.data, b)).await;
            }
            _ => {}
        }
    }
}
