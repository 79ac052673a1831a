//! Events: the queue a client's readers fill and
//! [`Client::next_event`](super::Client::next_event) empties, the sender cache that lets
//! deliveries from one sender share its identity, and the [`Event`] a delivered frame
//! becomes.

use super::error::ClientError;
use super::text::wire_text;
use super::{Event, Response, Transport};
use crate::proto::Opcode;
use crate::proto::reply::{Delivered, parse_delivery};
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

/// The events of one client: filled by its readers, emptied by
/// [`Client::next_event`](super::Client::next_event) and
/// [`Client::next_response`](super::Client::next_response).
///
/// A deque under a short synchronous lock rather than a channel behind an async mutex:
/// taking an event that is already queued costs one uncontended lock, no await and no
/// waker, and `next_response` can take a matching event out of the middle without moving
/// the others to a side queue. Every taker that found nothing registers its waker; a push
/// wakes them all (there is normally one), and each looks again.
#[derive(Default)]
pub(super) struct EventQueue {
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
    pub(super) fn push(&self, event: Event) {
        self.push_with(|q| q.add(event));
    }

    /// Queues every event of `batch` (left empty, its allocation kept), in order.
    pub(super) fn push_all(&self, batch: &mut Vec<Event>) {
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
    pub(super) fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    /// The next event; `None` once `Closed` was taken.
    pub(super) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
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
    pub(super) fn poll_take(
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
pub(super) struct SenderCache(Option<Arc<str>>);

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

/// A delivered Command (`FROM SP ID SP TEXT`), Echo (`FROM SP TEXT`) or CommandResponse
/// (`ID SP FROM SP TEXT`) as an event; the sender's identity comes from (and updates)
/// `senders`. `None` for any other opcode, or data not in its form.
pub(super) fn delivery_event(
    op: Opcode,
    data: &[u8],
    via: Transport,
    senders: &mut SenderCache,
) -> Option<Event> {
    Some(match parse_delivery(op, data)? {
        Delivered::Command { from, id, text } => Event::Command {
            from: senders.get(from),
            id,
            text: wire_text(text),
            via,
        },
        Delivered::Echo { from, text } => Event::Echo {
            from: senders.get(from),
            text: wire_text(text),
            via,
        },
        Delivered::Response { id, from, text } => Event::Response(Response {
            id,
            from: senders.get(from),
            text: wire_text(text),
            via,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    #[test]
    fn deliveries_parse() {
        assert_eq!(
            delivery_event(
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
            delivery_event(
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
            delivery_event(
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
            delivery_event(
                Opcode::Command,
                b"a notanid x",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            None
        );
        assert_eq!(
            delivery_event(
                Opcode::Echo,
                b"nospace",
                Transport::Tcp,
                &mut SenderCache::default()
            ),
            None
        );
        assert_eq!(
            delivery_event(
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
        let a1 = from(delivery_event(
            Opcode::Echo,
            b"a x",
            Transport::Tcp,
            &mut cache,
        ));
        let a2 = from(delivery_event(
            Opcode::Command,
            b"a 1 y",
            Transport::Tcp,
            &mut cache,
        ));
        assert!(Arc::ptr_eq(&a1, &a2));
        let b = from(delivery_event(
            Opcode::CommandResponse,
            b"1 b z",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(&*b, "b");
        let a3 = from(delivery_event(
            Opcode::Echo,
            b"a x",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(&*a3, "a");
        assert!(!Arc::ptr_eq(&a1, &a3), "only the last sender is kept");
        // Invalid UTF-8 is replaced, and never taken for a cached identity.
        let bad = from(delivery_event(
            Opcode::Echo,
            b"\xff x",
            Transport::Tcp,
            &mut cache,
        ));
        assert_eq!(&*bad, "\u{FFFD}");
        let bad2 = from(delivery_event(
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
}
