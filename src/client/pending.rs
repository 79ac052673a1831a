//! What waits for the server: the reply a reader hands the oldest waiting request, and
//! the pings waiting for the Pong that carries their data (see "How replies find their
//! request" in the [client documentation](super)).

use super::error::{ClientError, server_error};
use super::text::lossy;
use super::{ShimState, WhoEntry};
use crate::proto::reply::parse_ack;
use std::time::Instant;
use tokio::sync::oneshot;

/// A request waiting for its Ack or Error (queued in request order).
pub(super) struct Pending {
    tx: oneshot::Sender<Reply>,
    /// Non-zero for a rename: the server answers a rename only when it refuses it, so the
    /// Ping sent right after it, with the same ticket, tells when it was carried out.
    pub(super) ticket: u64,
    /// What a state request needs the reader to do with its answer.
    pub(super) state: StateRequest,
}

/// The relay-state requests, whose answers the reader treats specially: the State frames
/// before a Subscribe's or Get's Ack are its listing, and the end of a Subscribe or an
/// Unsubscribe changes which subscriptions the client has (see `client/state.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StateRequest {
    /// Not a state request.
    None,
    /// Subscribe with this id: answered by its `F` frames, then `Ack SID COUNT`.
    Subscribe(u32),
    /// Unsubscribe this id.
    Unsubscribe(u32),
    /// Get: answered by `F` frames with SID 0, then `Ack 0 COUNT`.
    Get,
}

impl StateRequest {
    /// Whether a full State frame for subscription `sid` is part of this request's answer.
    pub(super) fn lists(self, sid: u32) -> bool {
        match self {
            StateRequest::Subscribe(s) => s == sid,
            StateRequest::Get => sid == 0,
            StateRequest::None | StateRequest::Unsubscribe(_) => false,
        }
    }
}

impl Pending {
    /// A request answered by an Ack or an Error.
    pub(super) fn new(tx: oneshot::Sender<Reply>) -> Pending {
        Pending {
            tx,
            ticket: 0,
            state: StateRequest::None,
        }
    }

    /// A rename, settled by the Pong with `ticket` when no Error came first.
    pub(super) fn quiet(tx: oneshot::Sender<Reply>, ticket: u64) -> Pending {
        Pending {
            tx,
            ticket,
            state: StateRequest::None,
        }
    }

    /// A state request (Subscribe, Unsubscribe, Get), answered by an Ack or an Error.
    pub(super) fn state(tx: oneshot::Sender<Reply>, state: StateRequest) -> Pending {
        Pending {
            tx,
            ticket: 0,
            state,
        }
    }

    /// Hands the request its reply (dropped if the request was abandoned).
    pub(super) fn send(self, reply: Reply) {
        let _ = self.tx.send(reply);
    }
}

/// What the reader hands a waiting request.
#[derive(Debug)]
pub(super) enum Reply {
    /// `id SP count`; `entries` holds the WhoEntry frames that preceded it (empty unless
    /// the request was a Who), `states` the State frames of a Subscribe's or Get's listing
    /// (empty for any other request).
    Ack {
        id: u64,
        count: usize,
        entries: Vec<WhoEntry>,
        states: Vec<ShimState>,
    },
    /// The server's Error text.
    Error(String),
    /// An Ack that could not be parsed.
    Malformed(String),
    /// Quit over UDP: the channel is unknown to the server.
    Quit,
    /// No answer came where none means success (a rename).
    Quiet,
}

impl Reply {
    /// The reply an Ack frame's data makes: its id and count, with the listing
    /// `entries` gives (called only for an Ack that parses), or `Malformed`.
    pub(super) fn ack(data: &[u8], entries: impl FnOnce() -> Vec<WhoEntry>) -> Reply {
        match parse_ack(data).and_then(|(id, count)| Some((id, usize::try_from(count).ok()?))) {
            Some((id, count)) => Reply::Ack {
                id,
                count,
                entries: entries(),
                states: Vec::new(),
            },
            None => Reply::Malformed(format!("bad Ack {:?}", lossy(data))),
        }
    }

    /// The error a request reports for any reply but the Ack it waited for.
    pub(super) fn into_error(self) -> ClientError {
        match self {
            Reply::Error(msg) => server_error(msg),
            Reply::Malformed(what) => ClientError::Protocol(what),
            Reply::Quit => ClientError::UdpUnbound,
            Reply::Ack { .. } => ClientError::Protocol("unexpected Ack".into()),
            Reply::Quiet => ClientError::Protocol("no answer".into()),
        }
    }
}

/// A ping waiting for the Pong that carries its data; the reader sends when it arrived.
pub(super) struct PongWaiter {
    pub(super) data: Vec<u8>,
    pub(super) tx: oneshot::Sender<Instant>,
    /// The ticket of the rename this Ping follows (0: none); kept even when nobody waits
    /// for the Pong, since it settles the rename's place in the reply queue.
    pub(super) ticket: u64,
}

impl PongWaiter {
    /// A waiter for a plain Ping.
    pub(super) fn new(data: Vec<u8>, tx: oneshot::Sender<Instant>) -> PongWaiter {
        PongWaiter {
            data,
            tx,
            ticket: 0,
        }
    }
}

/// Resolves the oldest live waiter whose data matches; forgets abandoned ones. Returns
/// whether one matched, and its ticket.
pub(super) fn resolve_pong(waiters: &mut Vec<PongWaiter>, data: &[u8], at: Instant) -> Option<u64> {
    waiters.retain(|w| w.ticket != 0 || !w.tx.is_closed());
    let i = waiters.iter().position(|w| w.data == data)?;
    let w = waiters.remove(i);
    let _ = w.tx.send(at);
    Some(w.ticket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(data: &[u8]) -> Option<(u64, usize)> {
        match Reply::ack(data, Vec::new) {
            Reply::Ack { id, count, .. } => Some((id, count)),
            _ => None,
        }
    }

    #[test]
    fn acks_parse() {
        assert_eq!(ack(b"0 3"), Some((0, 3)));
        assert_eq!(ack(b"18446744073709551615 1"), Some((u64::MAX, 1)));
        assert_eq!(ack(b"18446744073709551616 1"), None);
        assert_eq!(ack(b"1"), None);
        assert_eq!(ack(b"x 1"), None);
        assert_eq!(ack(b"1 "), None);
        assert_eq!(ack(b"1 -2"), None);
        assert!(matches!(Reply::ack(b"x", Vec::new), Reply::Malformed(m) if m == "bad Ack \"x\""));
    }

    #[test]
    fn pongs_resolve_oldest_live_match() {
        let mut ws = Vec::new();
        let (t1, r1) = oneshot::channel();
        let (t2, mut r2) = oneshot::channel();
        let (t3, r3) = oneshot::channel();
        ws.push(PongWaiter::new(b"a".to_vec(), t1));
        ws.push(PongWaiter::new(b"b".to_vec(), t2));
        ws.push(PongWaiter::new(b"b".to_vec(), t3));
        drop(r1);
        let now = Instant::now();
        assert!(
            resolve_pong(&mut ws, b"a", now).is_none(),
            "abandoned waiter is skipped"
        );
        assert_eq!(resolve_pong(&mut ws, b"b", now), Some(0));
        assert_eq!(r2.try_recv().unwrap(), now);
        assert_eq!(ws.len(), 1);
        drop(r3);
        assert!(resolve_pong(&mut ws, b"b", now).is_none());
        assert!(ws.is_empty());
    }
}
