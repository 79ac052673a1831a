//! Relay state on the client side: State and Presence frames as events or as the listing
//! of a Subscribe or a Get, the checks that keep a bad Set from reaching the wire, and
//! the book of this client's subscriptions that keeps UDP deltas in order.
//!
//! # Why a book of subscriptions
//!
//! Over TCP the order is the hub's: a Subscribe's `F` frames and its Ack are queued as one
//! listing, and every delta of the subscription comes after them. Over UDP a delta can
//! overtake the listing still on its way over TCP: the hub takes the snapshot, a watched
//! shim changes, the delta goes out as a datagram and arrives before the TCP bytes are read.
//! Handed out at once, such a delta would reach a consumer before the snapshot it
//! changes, and the snapshot applied afterwards would undo it. So a delta that arrives
//! over UDP while its subscription is still being answered is held, and queued right after
//! the answer; and one for a subscription the client no longer has (a datagram late after
//! an Unsubscribe) is dropped.

use super::error::ClientError;
use super::events::EventQueue;
use super::text::{lossy, wire_text};
use super::{Event, ShimState, StateItem, Transport};
use crate::proto::CR;
use crate::proto::state::{Mode, Presence, check_key, parse_presence, parse_state, value_ok};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A State frame's data as (its subscription id, whether it is full, the state); `None`
/// for data not in its form.
pub(super) fn parse(data: &[u8]) -> Option<(u32, bool, ShimState)> {
    let s = parse_state(data)?;
    let items = s
        .items
        .iter()
        .map(|item| {
            let (age, value) = match item.value {
                Some((age, v)) => (age, Some(wire_text(v))),
                None => (0, None),
            };
            StateItem {
                key: lossy(item.key),
                value,
                age: Duration::from_millis(age),
            }
        })
        .collect();
    Some((
        s.sid,
        s.mode == Mode::Full,
        ShimState {
            identity: lossy(s.identity),
            seq: s.seq,
            items,
        },
    ))
}

/// A State frame as an event (with its subscription id).
pub(super) fn state_event(data: &[u8], via: Transport) -> Option<(u32, Event)> {
    let (sid, full, state) = parse(data)?;
    Some((
        sid,
        Event::State {
            sid,
            full,
            state,
            via,
        },
    ))
}

/// A Presence frame as an event (with its subscription id).
pub(super) fn presence_event(data: &[u8]) -> Option<(u32, Event)> {
    Some(match parse_presence(data)? {
        Presence::Join { sid, identity } => (
            sid,
            Event::Join {
                sid,
                identity: lossy(identity),
            },
        ),
        Presence::Leave {
            sid,
            identity,
            reason,
        } => (
            sid,
            Event::Leave {
                sid,
                identity: lossy(identity),
                reason: lossy(reason),
            },
        ),
    })
}

/// Checks the items of a Set before anything is sent: at least one, every key in the
/// grammar, no value holding 0x1F (the item separator) and a last value not ending with
/// `\r` (the hub takes a CR before a frame's end for a CRLF line end, so it would be cut
/// off).
pub(super) fn check_set(items: &[(&str, Option<&str>)]) -> Result<(), ClientError> {
    let invalid = |what, why: String| Err(ClientError::Invalid { what, why });
    if items.is_empty() {
        return invalid("state", "a Set needs at least one item".into());
    }
    for (i, (key, value)) in items.iter().enumerate() {
        if let Err(e) = check_key(key.as_bytes()) {
            return invalid("key", format!("{key:?}: {e}"));
        }
        let Some(value) = value else { continue };
        if !value_ok(value) {
            return invalid("value", format!("of {key}: it holds the byte 0x1F"));
        }
        if i + 1 == items.len() && value.as_bytes().last() == Some(&CR) {
            return invalid(
                "value",
                format!("of {key}: the last value of a Set cannot end with a carriage return"),
            );
        }
    }
    Ok(())
}

/// Checks the keys of a Subscribe or a Get.
pub(super) fn check_keys(keys: &[&str]) -> Result<(), ClientError> {
    for key in keys {
        check_key(key.as_bytes()).map_err(|e| ClientError::Invalid {
            what: "key",
            why: format!("{key:?}: {e}"),
        })?;
    }
    Ok(())
}

/// Where one of this client's subscriptions stands.
enum Sub {
    /// Subscribe sent, its answer not read yet: deltas that come over UDP meanwhile wait
    /// here for the answer (see the module documentation).
    Answering(Vec<Event>),
    /// Answered; its frames are events.
    Active,
    /// Unsubscribe sent, not answered yet; its frames are still events.
    Ending,
}

/// The subscription ids this client uses (see the module documentation). One short lock,
/// taken by requests, by the TCP reader when a Subscribe or Unsubscribe is answered, and by
/// the UDP reader for each State datagram.
#[derive(Default)]
pub(super) struct Subscriptions {
    inner: parking_lot::Mutex<HashMap<u32, Sub>>,
}

impl Subscriptions {
    /// Takes `sid` for a new subscription, refusing one in use (subscribed, or being
    /// subscribed or unsubscribed): the hub would refuse it too, but not before frames of
    /// the live subscription could be taken for the new one's listing.
    pub(super) fn claim(&self, sid: u32) -> Result<Claim<'_>, ClientError> {
        let mut m = self.inner.lock();
        if m.contains_key(&sid) {
            return Err(ClientError::Invalid {
                what: "subscription id",
                why: format!("{sid} is in use: unsubscribe it first"),
            });
        }
        m.insert(sid, Sub::Answering(Vec::new()));
        Ok(Claim {
            subs: self,
            sid,
            sent: AtomicBool::new(false),
        })
    }

    /// An Unsubscribe for `sid` is being sent.
    pub(super) fn ending(&self, sid: u32) {
        if let Some(s @ Sub::Active) = self.inner.lock().get_mut(&sid) {
            *s = Sub::Ending;
        }
    }

    /// The Subscribe for `sid` was answered (`ok`: with its Ack): `deliver` hands the
    /// answer over and queues what came before it over TCP; then the deltas held for it
    /// are queued, all under the lock, so that no later datagram overtakes them.
    pub(super) fn answered(&self, sid: u32, ok: bool, events: &EventQueue, deliver: impl FnOnce()) {
        let mut m = self.inner.lock();
        let held = if ok {
            match m.insert(sid, Sub::Active) {
                Some(Sub::Answering(held)) => held,
                _ => Vec::new(),
            }
        } else {
            m.remove(&sid);
            Vec::new()
        };
        deliver();
        for e in held {
            events.push(e);
        }
    }

    /// The Unsubscribe for `sid` was answered (or refused: either way the hub has no such
    /// subscription now). An id still being answered is left alone: it was claimed by a
    /// Subscribe sent after this Unsubscribe (which the hub then refused, since a
    /// Subscribe sent before it would have been answered first, and a claim is refused
    /// while the id is subscribed).
    pub(super) fn ended(&self, sid: u32) {
        let mut m = self.inner.lock();
        if !matches!(m.get(&sid), Some(Sub::Answering(_))) {
            m.remove(&sid);
        }
    }

    /// A State frame that came over UDP: queued, held until its subscription's answer, or
    /// dropped if the client has no such subscription.
    pub(super) fn deliver_udp(&self, sid: u32, event: Event, events: &EventQueue) {
        match self.inner.lock().get_mut(&sid) {
            Some(Sub::Answering(held)) => held.push(event),
            Some(Sub::Active | Sub::Ending) => events.push(event),
            None => {}
        }
    }
}

/// A subscription id taken by [`Subscriptions::claim`]; given back on drop unless the
/// Subscribe was queued ([`Claim::sent`]), after which the reader settles it.
pub(super) struct Claim<'a> {
    subs: &'a Subscriptions,
    sid: u32,
    /// Atomic only so that a future borrowing it stays `Send`.
    sent: AtomicBool,
}

impl Claim<'_> {
    /// The Subscribe's waiter is queued: its answer, or the end of the connection, will
    /// settle the id.
    pub(super) fn sent(&self) {
        self.sent.store(true, Ordering::Relaxed);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.sent.load(Ordering::Relaxed) {
            let mut m = self.subs.inner.lock();
            if matches!(m.get(&self.sid), Some(Sub::Answering(_))) {
                m.remove(&self.sid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;

    #[test]
    fn state_frames_parse_with_newlines_and_deletions() {
        let (sid, full, s) =
            parse(b"7 D 3 peq.a.bob\x1fhp:12=4500/5000\x1fnote:0=afk\x0bback\x1ftarget").unwrap();
        assert_eq!((sid, full, s.seq), (7, false, 3));
        assert_eq!(s.identity, "peq.a.bob");
        assert_eq!(
            s.items,
            vec![
                StateItem {
                    key: "hp".into(),
                    value: Some("4500/5000".into()),
                    age: Duration::from_millis(12)
                },
                StateItem {
                    key: "note".into(),
                    value: Some("afk\nback".into()),
                    age: Duration::ZERO
                },
                StateItem {
                    key: "target".into(),
                    value: None,
                    age: Duration::ZERO
                },
            ]
        );
        let (sid, full, s) = parse(b"0 F 0 x").unwrap();
        assert_eq!((sid, full, s.items.len()), (0, true, 0));
        assert!(parse(b"1 X 0 x").is_none());
        assert!(parse(b"01 F 0 x").is_none());
        assert!(parse(b"1 F x").is_none(), "the sequence number is required");
    }

    #[test]
    fn presence_frames_parse() {
        assert_eq!(
            presence_event(b"3 +peq.a.bob").unwrap(),
            (
                3,
                Event::Join {
                    sid: 3,
                    identity: "peq.a.bob".into()
                }
            )
        );
        assert_eq!(
            presence_event(b"3 -peq.a.bob idle timeout").unwrap(),
            (
                3,
                Event::Leave {
                    sid: 3,
                    identity: "peq.a.bob".into(),
                    reason: "idle timeout".into()
                }
            )
        );
        assert!(presence_event(b"3 peq.a.bob").is_none());
    }

    #[test]
    fn sets_are_checked() {
        assert!(check_set(&[("hp", Some("1 / 2")), ("note", Some("a\nb")), ("x", None)]).is_ok());
        assert!(check_set(&[]).is_err());
        assert!(check_set(&[("h p", Some("1"))]).is_err());
        assert!(check_set(&[("hp", Some("1\x1f2"))]).is_err());
        assert!(check_set(&[("hp", Some("1\r"))]).is_err());
        assert!(check_set(&[("hp", Some("1\r")), ("mp", Some("2"))]).is_ok());
        assert!(check_keys(&["hp", "mp"]).is_ok());
        assert!(check_keys(&[""]).is_err());
    }

    fn delta(sid: u32, v: &str) -> Event {
        Event::State {
            sid,
            full: false,
            state: ShimState {
                identity: "s".into(),
                seq: 1,
                items: vec![StateItem {
                    key: "k".into(),
                    value: Some(v.into()),
                    age: Duration::ZERO,
                }],
            },
            via: Transport::Udp,
        }
    }

    #[tokio::test]
    async fn udp_deltas_wait_for_their_answer() {
        let subs = Subscriptions::default();
        let events = EventQueue::default();
        let next = || poll_fn(|cx| events.poll_next(cx));
        let claim = subs.claim(1).unwrap();
        claim.sent();
        assert!(subs.claim(1).is_err(), "an id in use is refused");
        drop(claim);
        subs.deliver_udp(1, delta(1, "early"), &events);
        subs.deliver_udp(9, delta(9, "unknown"), &events);
        assert_eq!(events.len(), 0);
        let tcp = Event::Echo {
            from: "t".into(),
            text: "before the Ack".into(),
            via: Transport::Tcp,
        };
        subs.answered(1, true, &events, || events.push(tcp.clone()));
        subs.deliver_udp(1, delta(1, "late"), &events);
        assert_eq!(next().await, Some(tcp));
        assert_eq!(next().await, Some(delta(1, "early")));
        assert_eq!(next().await, Some(delta(1, "late")));
        subs.ending(1);
        subs.deliver_udp(1, delta(1, "ending"), &events);
        assert_eq!(next().await, Some(delta(1, "ending")));
        subs.ended(1);
        subs.deliver_udp(1, delta(1, "after"), &events);
        assert_eq!(events.len(), 0);
        // A claim given back before anything was sent frees the id.
        drop(subs.claim(2).unwrap());
        let claim = subs.claim(2).unwrap();
        claim.sent();
        // The refusal of an Unsubscribe sent before this Subscribe leaves it be.
        subs.ended(2);
        subs.deliver_udp(2, delta(2, "held"), &events);
        subs.answered(2, true, &events, || {});
        assert_eq!(next().await, Some(delta(2, "held")));
    }
}
