//! What waits for the server: the reply a reader hands the oldest waiting request, and
//! the pings waiting for the Pong that carries their data (see "How replies find their
//! request" in the [client documentation](super)).

use super::WhoEntry;
use super::error::{ClientError, server_error};
use super::text::lossy;
use crate::proto::reply::parse_ack;
use std::time::Instant;
use tokio::sync::oneshot;

/// A request waiting for its Ack or Error (queued in request order).
pub(super) type Pending = oneshot::Sender<Reply>;

/// What the reader hands a waiting request.
#[derive(Debug)]
pub(super) enum Reply {
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
    /// The reply an Ack frame's data makes: its id and count, with the listing
    /// `entries` gives (called only for an Ack that parses), or `Malformed`.
    pub(super) fn ack(data: &[u8], entries: impl FnOnce() -> Vec<WhoEntry>) -> Reply {
        match parse_ack(data).and_then(|(id, count)| Some((id, usize::try_from(count).ok()?))) {
            Some((id, count)) => Reply::Ack {
                id,
                count,
                entries: entries(),
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
        }
    }
}

/// A ping waiting for the Pong that carries its data; the reader sends when it arrived.
pub(super) struct PongWaiter {
    pub(super) data: Vec<u8>,
    pub(super) tx: oneshot::Sender<Instant>,
}

/// Resolves the oldest live waiter whose data matches; forgets abandoned ones.
pub(super) fn resolve_pong(waiters: &mut Vec<PongWaiter>, data: &[u8], at: Instant) -> bool {
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
