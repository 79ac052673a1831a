//! One connected shim: its identity, token, UDP binding, timers and rate buckets.
//!
//! A [`Shim`] is shared (`Arc`) between the connection that owns its socket, the session
//! table, the router and every core that delivers to it. Everything it is sent goes
//! through its [`Outbox`].

use super::outbox::Outbox;
use super::send::Buckets;
use super::state::Store;
use crate::config::User;
use crate::proto::Token;
use crate::proto::reject::Revoked;
use crate::proto::sealed::{Key, Keys, ReplayWindow};
use arc_swap::ArcSwapOption;
use parking_lot::{Mutex, RwLock};
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Why a connection ended; logged on the close line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its end.
    Eof,
    /// The client sent Quit.
    Quit,
    /// No Identify within the identify deadline.
    IdentifyTimeout,
    /// Nothing received for the idle timeout.
    Idle,
    /// A frame longer than the maximum.
    Oversized,
    /// Outbound bytes passed the limit, or made no progress for the write deadline.
    SlowConsumer,
    /// A read or write failed.
    IoError,
    /// The server is shutting down.
    Shutdown,
    /// The client did not present the shared secret, or a wrong one.
    AuthFailed,
    /// A newer connection took the identity (`duplicate_identity`).
    Replaced,
    /// A reload removed or changed the connection's credentials.
    Revoked(Revoked),
    /// A plaintext client on a port that requires TLS.
    TlsRequired,
    /// The TLS handshake failed, or a record did not decrypt.
    TlsFailed,
    /// The TLS handshake did not finish within `tls_handshake_timeout`.
    TlsHandshakeTimeout,
    /// A client certificate whose Common Name names no user.
    CertificateUser,
    /// Another node's shim claimed the identity earlier (the race rule of a cluster).
    IdentityElsewhere,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Eof => "eof",
            CloseReason::Quit => "quit",
            CloseReason::IdentifyTimeout => "identify timeout",
            CloseReason::Idle => "idle timeout",
            CloseReason::Oversized => "oversized frame",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::IoError => "io error",
            CloseReason::Shutdown => "server shutdown",
            CloseReason::AuthFailed => "authentication failed",
            CloseReason::Replaced => "replaced by a newer connection with the same identity",
            CloseReason::Revoked(why) => return write!(f, "credentials revoked: {}", why.text()),
            CloseReason::TlsRequired => "plaintext on a TLS port",
            CloseReason::TlsFailed => "tls failed",
            CloseReason::TlsHandshakeTimeout => "tls handshake timeout",
            CloseReason::CertificateUser => "certificate names no user",
            CloseReason::IdentityElsewhere => "identity taken on another node",
        })
    }
}

/// The peer address of a shim of another node.
const REMOTE_PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

/// The UDP side of a shim.
#[derive(Default)]
pub(crate) struct UdpBinding {
    pub(crate) addr: Option<SocketAddr>,
    /// Set when the TCP connection ended; a bind racing the close then fails.
    pub(crate) dead: bool,
}

/// The sealed UDP channel of a TLS session (`proto/sealed.rs`): found by its session id,
/// its address only where answers go.
pub(crate) struct SealedUdp {
    /// The session id every datagram carries.
    pub(crate) session: u64,
    /// Opens what the client sends.
    pub(crate) open: Key,
    /// Seals what the hub sends.
    pub(crate) seal: Key,
    /// The hub's next counter.
    pub(crate) sent: AtomicU64,
    /// The client's counters accepted so far.
    pub(crate) window: Mutex<ReplayWindow>,
}

impl SealedUdp {
    pub(crate) fn new(keys: Keys) -> SealedUdp {
        SealedUdp {
            session: keys.session,
            open: keys.client,
            seal: keys.hub,
            sent: AtomicU64::new(0),
            window: Mutex::new(ReplayWindow::default()),
        }
    }

    /// `frame` sealed as the hub's next datagram.
    pub(crate) fn seal(&self, frame: &[u8]) -> Vec<u8> {
        let n = self.sent.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        self.seal.seal(self.session, n, frame, &mut out);
        out
    }
}

/// A connected shim.
pub struct Shim {
    /// A number unique to this connection for the life of the process.
    pub serial: u64,
    /// The session token, sent in the Session reply and used to bind UDP.
    pub token: Token,
    /// The TCP peer address.
    pub peer: SocketAddr,
    /// The core whose runtime serves the connection.
    pub core: u16,
    /// Frames received from the shim, on TCP and UDP.
    pub frames_in: AtomicU64,
    /// Frames queued or sent to the shim, on TCP and UDP.
    pub frames_out: AtomicU64,
    /// When the connection was accepted, in milliseconds since the Unix epoch.
    pub connected_unix_ms: u64,
    identity: RwLock<Arc<str>>,
    pub(crate) udp: Mutex<UdpBinding>,
    accepted_ms: u64,
    last_seen_ms: AtomicU64,
    identified: AtomicBool,
    closed: AtomicBool,
    next_seq: AtomicU32,
    /// What this shim may still route this second (see `hub/send.rs`).
    pub(crate) buckets: Mutex<Buckets>,
    /// When this shim's rate refusals were last logged (hub milliseconds + 1; 0: never).
    pub(crate) rate_logged_ms: AtomicU64,
    /// The user the connection authenticated as (none on a hub without users).
    user: ArcSwapOption<User>,
    /// The ids of the last Commands this shim was sent: the ones it may answer
    /// (`answer_window` of them at most).
    answerable: Mutex<VecDeque<u64>>,
    /// The sealed UDP channel, set when a TLS handshake finishes. Boxed: its keys and
    /// window are larger than everything else in a plaintext shim put together.
    pub(crate) sealed: OnceLock<Box<SealedUdp>>,
    /// The connection speaks TLS.
    tls: AtomicBool,
    /// The shim's relay state, its watchers and its own subscriptions (`hub/state.rs`);
    /// none until it sets a key, subscribes or is watched, so an idle shim pays one
    /// pointer.
    pub(crate) state: Mutex<Option<Box<Store>>>,
    /// Everything sent to this shim over TCP.
    pub outbox: Outbox,
}

impl Shim {
    pub(crate) fn new(
        serial: u64,
        core: usize,
        peer: SocketAddr,
        now_ms: u64,
        unix_ms: u64,
    ) -> Shim {
        Shim {
            serial,
            token: Token::generate(),
            peer,
            core: core as u16,
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            connected_unix_ms: unix_ms,
            identity: RwLock::new(Arc::from("")),
            udp: Mutex::new(UdpBinding::default()),
            accepted_ms: now_ms,
            last_seen_ms: AtomicU64::new(now_ms),
            identified: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            next_seq: AtomicU32::new(0),
            buckets: Mutex::new(Buckets::new(now_ms)),
            rate_logged_ms: AtomicU64::new(0),
            user: ArcSwapOption::empty(),
            answerable: Mutex::new(VecDeque::new()),
            sealed: OnceLock::new(),
            tls: AtomicBool::new(false),
            state: Mutex::new(None),
            outbox: Outbox::default(),
        }
    }

    /// A shim of another node of the cluster: held in the router so that patterns find
    /// it, with no connection; where it lives is kept by the cluster (`hub/cluster.rs`
    /// `Remote`), so that a local shim pays nothing for it. Its peer address is
    /// `0.0.0.0:0`, which no TCP peer has.
    pub(crate) fn remote(serial: u64, core: usize, since_unix_ms: u64, now_ms: u64) -> Shim {
        Shim::new(serial, core, REMOTE_PEER, now_ms, since_unix_ms)
    }

    /// Whether this is a shim of another node of the cluster.
    pub fn is_remote(&self) -> bool {
        self.peer == REMOTE_PEER
    }

    /// Whether the connection speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_tls(&self, tls: bool) {
        self.tls.store(tls, Ordering::Relaxed);
    }

    /// Whether the UDP channel is sealed (a TLS session whose handshake finished).
    pub fn is_sealed(&self) -> bool {
        self.sealed.get().is_some()
    }

    /// The current identity label (empty before the first Identify).
    pub fn identity(&self) -> Arc<str> {
        self.identity.read().clone()
    }

    /// Sets the identity; only the router calls this, under its lock, so the label and
    /// the router's index never disagree.
    pub(crate) fn set_identity(&self, label: Arc<str>) -> Arc<str> {
        std::mem::replace(&mut *self.identity.write(), label)
    }

    /// The user the connection authenticated as.
    pub fn user(&self) -> Option<Arc<User>> {
        self.user.load_full()
    }

    pub(crate) fn set_user(&self, user: Option<Arc<User>>) {
        self.user.store(user);
    }

    /// Records that this shim was sent the Command `id`: it may answer it until
    /// `window` newer Commands have been sent to it.
    pub(crate) fn expect_answer(&self, id: u64, window: usize) {
        let mut q = self.answerable.lock();
        while q.len() >= window {
            q.pop_front();
        }
        q.push_back(id);
    }

    /// Whether this shim may answer the Command `id`: one of the last `window` it was
    /// sent (the window in force, should a reload have narrowed it).
    pub(crate) fn may_answer(&self, id: u64, window: usize) -> bool {
        self.answerable
            .lock()
            .iter()
            .rev()
            .take(window)
            .any(|&i| i == id)
    }

    /// True once the first Identify was accepted.
    pub fn is_identified(&self) -> bool {
        self.identified.load(Ordering::Acquire)
    }

    pub(crate) fn mark_identified(&self) {
        self.identified.store(true, Ordering::Release);
    }

    /// True once the shim was removed (its connection ended or a timer expired it).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the shim closed; true for the first caller only.
    pub(crate) fn mark_closed(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// The UDP address bound to this shim, if any.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.lock().addr
    }

    /// Milliseconds (on the hub's clock) when the connection was accepted.
    pub fn accepted_ms(&self) -> u64 {
        self.accepted_ms
    }

    /// Milliseconds (on the hub's clock) when this shim last sent anything.
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// Records activity at `now_ms` (on the hub's clock).
    pub fn touch(&self, now_ms: u64) {
        // Skip the store when the value would not change: many frames arrive per ms.
        if self.last_seen_ms.load(Ordering::Relaxed) != now_ms {
            self.last_seen_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// A fresh correlation id for a Command sent by this shim: the serial in the high bits
    /// (so a response finds its way back without a lookup table), a sequence in the low.
    pub(crate) fn next_command_id(&self) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) & 0xFFFFF;
        (self.serial << 20) | u64::from(seq)
    }
}

impl fmt::Debug for Shim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shim")
            .field("serial", &self.serial)
            .field("identity", &self.identity())
            .field("peer", &self.peer)
            .finish()
    }
}

/// The serial encoded in a correlation id.
pub fn serial_of_command_id(id: u64) -> u64 {
    id >> 20
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_carry_the_serial() {
        let s = Shim::new(77, 0, "127.0.0.1:1".parse().unwrap(), 0, 0);
        let a = s.next_command_id();
        let b = s.next_command_id();
        assert_ne!(a, b);
        assert_eq!(serial_of_command_id(a), 77);
        assert_eq!(serial_of_command_id(b), 77);
    }
}

#[cfg(test)]
mod size_tests {
    /// An idle shim's memory is the fleet's: what only TLS sessions use stays out of line.
    #[test]
    fn a_shim_stays_small() {
        let size = std::mem::size_of::<super::Shim>();
        assert!(size <= 448, "Shim is {size} bytes");
    }
}
