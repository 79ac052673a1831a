//! Relay state in the model (`docs/protocol.md` §13), and the subscribers' side of it.
//!
//! Apart from `model.rs` because it is a world of its own: each shim's keys, the
//! subscriptions and the shims each one watches, and what every subscriber makes of the
//! State and Presence frames it is sent. Written from §13 and not from `src/hub/state.rs`
//! or `src/proto/state.rs`: the key grammar, the parsing of Set, Subscribe, Unsubscribe
//! and Get, and the reading of State and Presence frames are the model's own.
//!
//! What the model predicts byte for byte: the one answer each request gets (a Set that is
//! applied gets none; a refused one its `state refused:` Error; a Subscribe its listing of
//! `F` frames, SEQ and ages included, then `Ack SID COUNT`; a Get the same with SID 0; an
//! Unsubscribe `Ack SID 1` or `no subscription SID`; the limits on subscriptions, keys
//! listed and listings), each shim's state and SEQ (all or nothing, the last item of a
//! key winning, keys compared ignoring case and kept as first spelled, the limits and the
//! Set rate), which shims each subscription watches (with filters, §6, those whose state
//! passes them), and every Presence frame (a join when a shim identifies, renames into a
//! pattern, becomes readable after a reload, or comes to pass the filters; a leave
//! `renamed`, `not permitted`, `not selected`, or with the close reason when a watched
//! shim goes, none when a newcomer's join stands for it), with what renames cost in the
//! rates.
//!
//! What it does not predict: when the deltas go, and how they are cut into frames. The hub
//! may send them at the end of the slice of the Set, or later from the core's tick when
//! the interval has not passed or the subscriber is busy, coalesced, over UDP or TCP.
//! The model learns their bytes from the real outboxes after every call that may send
//! them ([`World::learn`]: the end of a slice, of a datagram, a tick), so that every queue
//! length, flush and slow-consumer cut-off keeps being checked; and the subscribers check
//! what those frames say: each client keeps, per subscription, the copy of the shims it
//! watches that the frames it read describe (in the order the hub sent them, datagrams
//! included) and checks every frame against it as it reads it ([`World::view_frame`]:
//! no frame for a subscription it does not hold or has unsubscribed, no State frame for
//! an identity that has not joined or has left or with a SEQ below the last one applied,
//! only the keys it asked for, an `F` frame only over TCP). Once the harness settles
//! ([`World::check_views`]), every copy must be the model's state of the shims the
//! subscriber was told of.

use super::World;
use super::model::{Exp, MBucket, MVia, Work, ack, lossy, refusal};
use super::scenario::{BAD_PATTERNS, INTERVALS, Item, KEYS, SIDS};
use super::target::MTarget;
use std::collections::{BTreeMap, BTreeSet};
use velium_server::hub::outbox::OutState;
use velium_server::hub::shim::CloseReason;
use velium_server::proto::reject::{Rate, Reject, Revoked, Shape};
use velium_server::proto::state::KeyError;
use velium_server::proto::{Opcode, encoded};

/// The item separator.
pub(super) const US: u8 = 0x1F;

/// The longest interval whose deliveries the harness waits for when it settles: a
/// subscription with a longer one is checked for its shims, not for their values.
pub(super) const SETTLE_MS: u64 = 100;

/// One key a shim holds.
#[derive(Clone, Debug)]
pub(super) struct MKey {
    /// As first spelled.
    pub(super) key: String,
    pub(super) value: Vec<u8>,
    /// When the value was set (hub milliseconds), for the ages of a listing.
    pub(super) at_ms: u64,
}

/// A subscription as the model keeps it.
#[derive(Clone, Debug)]
pub(super) struct MSub {
    pub(super) sid: u32,
    /// Its target: the pattern, and the filters the shims it watches pass (§6).
    pub(super) target: MTarget,
    /// The keys it asked for (none: every key).
    pub(super) keys: Vec<String>,
    pub(super) interval: u64,
    /// The shims it watches, each with the identity it was watched under (its leave's),
    /// in the order they arrived (listed by its Subscribe, joined since), until they
    /// leave (with filters, only those that pass them: the others the subscriber is not
    /// told of): a holder that was closing when a newcomer took its identity is dropped at
    /// the newcomer's join, which stands for its leave (§13 "Presence").
    pub(super) watched: Vec<(usize, String)>,
    /// What the subscriber was told: per identity (ignoring case), the shim it shows.
    pub(super) shown: BTreeMap<String, usize>,
}

/// What a subscriber holds for one of its subscriptions, from the frames it read.
#[derive(Clone, Debug, Default)]
pub(super) struct View {
    /// The keys it asked for.
    keys: Vec<String>,
    /// Per identity watched (ignoring case): the highest SEQ applied, and per key
    /// (ignoring case) its spelling and value.
    shims: BTreeMap<String, (u64, Keys)>,
}

/// Keys and values by key ignoring case: each key as spelled, and its value.
type Keys = BTreeMap<String, (String, Vec<u8>)>;

/// The client end of a connection, for relay state.
#[derive(Clone, Debug, Default)]
pub(super) struct Subscriber {
    /// Bytes read over TCP so far.
    pub(super) read: usize,
    /// State datagrams sent to the client, with the TCP bytes the hub had queued for it
    /// before them: the client reads them in the order the hub sent them.
    pub(super) datagrams: Vec<(usize, Vec<u8>)>,
    /// Its copy of each subscription it holds, by SID.
    pub(super) views: BTreeMap<u32, View>,
    /// SIDs it unsubscribed (the Ack read) and has not subscribed again.
    pub(super) gone: BTreeSet<u32>,
}

/// The model's key grammar (§13 "KEY": one identity segment): 1 to 64 bytes of ASCII
/// letters, digits, `_` and `-`; an empty or too long key is named as such, else the
/// first byte outside it.
pub(super) fn check_key(k: &[u8]) -> Result<&str, KeyError> {
    if k.is_empty() {
        return Err(KeyError::Empty);
    }
    if k.len() > 64 {
        return Err(KeyError::TooLong);
    }
    if let Some(at) = k
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
    {
        return Err(KeyError::Byte { byte: k[at], at });
    }
    Ok(std::str::from_utf8(k).expect("ASCII"))
}

fn wanted(keys: &[String], key: &str) -> bool {
    keys.is_empty() || keys.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// A canonical decimal: digits, no leading zero (but `0` itself).
fn canonical(t: &[u8]) -> Option<u64> {
    if t.is_empty() || !t.iter().all(u8::is_ascii_digit) || (t.len() > 1 && t[0] == b'0') {
        return None;
    }
    std::str::from_utf8(t).ok()?.parse().ok()
}

/// §13 "SID": a canonical decimal from 1 to 4294967295.
fn parse_sid(t: &[u8]) -> Option<u32> {
    canonical(t)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v != 0)
}

/// §13: INTERVAL_MS is decimal digits, 0 to 3600000.
fn parse_interval(t: &[u8]) -> Option<u64> {
    if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter()
        .try_fold(0u64, |a, &d| {
            a.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .filter(|&v| v <= 3_600_000)
}

/// The keys of a Subscribe or a Get.
fn parse_keys(fields: &[&[u8]]) -> Result<Vec<String>, Reject> {
    fields
        .iter()
        .map(|k| match check_key(k) {
            Ok(k) => Ok(k.to_string()),
            Err(e) => Err(Reject::BadKey(lossy(k), e)),
        })
        .collect()
}

/// One item of a Set: the key, and the value (`None`: a deletion).
type SetItem<'a> = (&'a str, Option<&'a [u8]>);

/// A Set's items (§13 "Set"): split at 0x1F, each at its first `=`; the first fault in
/// frame order refuses the frame.
fn parse_set(data: &[u8]) -> Result<Vec<SetItem<'_>>, Reject> {
    if data.is_empty() {
        return Err(Reject::SetMalformed);
    }
    let mut items = Vec::new();
    for item in data.split(|&b| b == US) {
        if item.is_empty() {
            return Err(Reject::SetMalformed);
        }
        let (key, value) = match item.iter().position(|&b| b == b'=') {
            Some(i) => (&item[..i], Some(&item[i + 1..])),
            None => (item, None),
        };
        match check_key(key) {
            Ok(k) => items.push((k, value)),
            Err(e) => return Err(Reject::SetBadKey(lossy(key), e)),
        }
    }
    Ok(items)
}

/// The close reasons as a leave gives them (§13 "Presence"), with the two that are not.
fn leave_reasons() -> Vec<String> {
    let mut v: Vec<String> = [
        CloseReason::Eof,
        CloseReason::Quit,
        CloseReason::IdentifyTimeout,
        CloseReason::Idle,
        CloseReason::Oversized,
        CloseReason::SlowConsumer,
        CloseReason::IoError,
        CloseReason::Shutdown,
        CloseReason::AuthFailed,
        CloseReason::Replaced,
        CloseReason::Revoked(Revoked::UserRemoved),
        CloseReason::Revoked(Revoked::SecretChanged),
        CloseReason::Revoked(Revoked::IdentityNotPermitted),
        CloseReason::Revoked(Revoked::CredentialsRequired),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    v.push("renamed".into());
    v.push("not permitted".into());
    v.push("not selected".into());
    v
}

fn presence(sid: u32, identity: &str, leave: Option<&str>) -> Vec<u8> {
    let d = match leave {
        None => format!("{sid} +{identity}"),
        Some(why) => format!("{sid} -{identity} {why}"),
    };
    encoded(Opcode::Presence, d.as_bytes())
}

impl World {
    // --- Requests -------------------------------------------------------------------

    /// A Set from `c` (§13 "Set"): refused with one `state refused:` Error (its shape,
    /// the rate, then the limits on what the state would be), or applied whole with no
    /// answer. The items are applied in order, the last of a key winning; a value equal
    /// to the one held, or the deletion of a key not held, is no change.
    pub(super) fn model_set(&mut self, c: usize, data: &[u8], via: MVia) {
        let items = match parse_set(data) {
            Ok(v) => v,
            Err(r) => return self.reply(c, via, refusal(r)),
        };
        let now_ms = self.now_ms();
        let rate = self.first.state_sets_per_sec;
        if rate > 0 {
            let b = (self.conns[c].sets).get_or_insert_with(|| MBucket::full(rate, now_ms));
            if !b.take(rate, now_ms) {
                self.counts.state_rate += 1;
                return self.reply(c, via, refusal(Reject::RateLimited(Rate::Sets, rate)));
            }
        }
        // The last item of each key, in frame order.
        let keep: Vec<usize> = (0..items.len())
            .filter(|&i| {
                !items[i + 1..]
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case(items[i].0))
            })
            .collect();
        let s = &self.settings;
        let (max_value, max_keys, max_bytes) = (s.state_value_bytes, s.state_keys, s.state_bytes);
        let limit = |w: &mut World, r: Reject| {
            w.counts.state_limit += 1;
            w.reply(c, via, refusal(r));
        };
        for &i in &keep {
            if let (k, Some(v)) = items[i]
                && v.len() > max_value
            {
                return limit(self, Reject::StateValue(k.to_string(), max_value));
            }
        }
        let held = &self.conns[c].state;
        let find = |k: &str| held.iter().position(|e| e.key.eq_ignore_ascii_case(k));
        let mut keys = held.len() as i64;
        let mut bytes: i64 = held
            .iter()
            .map(|e| (e.key.len() + e.value.len()) as i64)
            .sum();
        for &i in &keep {
            match (find(items[i].0), items[i].1) {
                (Some(j), Some(v)) => bytes += v.len() as i64 - held[j].value.len() as i64,
                (None, Some(v)) => {
                    keys += 1;
                    bytes += (items[i].0.len() + v.len()) as i64;
                }
                (Some(j), None) => {
                    keys -= 1;
                    bytes -= (held[j].key.len() + held[j].value.len()) as i64;
                }
                (None, None) => {}
            }
        }
        if keys > max_keys as i64 {
            return limit(self, Reject::StateKeys(max_keys));
        }
        if bytes > max_bytes as i64 {
            return limit(self, Reject::StateBytes(max_bytes));
        }
        let mut changed = 0;
        let conn = &mut self.conns[c];
        let (state, tombs) = (&mut conn.state, &mut conn.tombs);
        for &i in &keep {
            let (key, value) = items[i];
            match (
                state.iter().position(|e| e.key.eq_ignore_ascii_case(key)),
                value,
            ) {
                (Some(j), Some(v)) if state[j].value != v => {
                    state[j].value = v.to_vec();
                    state[j].at_ms = now_ms;
                    changed += 1;
                }
                (Some(_), Some(_)) | (None, None) => {}
                (None, Some(v)) => {
                    tombs.retain(|k| !k.eq_ignore_ascii_case(key));
                    // A key keeps the spelling the frame first gave it: its first item,
                    // a deletion included (the hub's reading of "applied in order").
                    let first = items.iter().find(|(k, _)| k.eq_ignore_ascii_case(key));
                    state.push(MKey {
                        key: first.map_or(key, |(k, _)| k).to_string(),
                        value: v.to_vec(),
                        at_ms: now_ms,
                    });
                    changed += 1;
                }
                (Some(j), None) => {
                    let gone = state.remove(j);
                    tombs.push(gone.key);
                    if tombs.len() > max_keys {
                        tombs.remove(0);
                    }
                    changed += 1;
                }
            }
        }
        self.counts.state_sets += 1;
        self.counts.state_changes += changed;
        if changed > 0 {
            // §13 "SEQ": one more for each applied Set that changes something.
            self.conns[c].state_seq += 1;
            self.reselect(c);
        }
    }

    /// After a Set of `c` changed its state (§13 "Presence", §6): each subscription with
    /// filters that names `c` and did not select it, and whose filters it passes now, is
    /// sent its join (its whole state follows in an `F` frame: a delivery, learned); each
    /// one that selected it, and whose filters it no longer passes, its leave `not
    /// selected`. Queued in the Set's slice; the deltas of the Set go to the others.
    fn reselect(&mut self, c: usize) {
        let g = self.group();
        for (o, i) in self.all_subs() {
            let sub = &self.conns[o].subs[i];
            if !sub.target.is_filtered() || !self.watches(o, sub, c) {
                continue;
            }
            let now = sub.target.passes(&self.conns[c].state);
            match (sub.watched.iter().position(|w| w.0 == c), now) {
                (None, true) => self.join(o, i, c, g, true),
                (Some(j), false) => self.leave(o, i, j, "not selected", g, true),
                _ => {}
            }
        }
    }

    /// Subscription `i` of `o` stops watching the `j`-th shim it watches: a leave `why`.
    fn leave(&mut self, o: usize, i: usize, j: usize, why: &str, g: u64, in_slice: bool) {
        let sub = &mut self.conns[o].subs[i];
        let (_, identity) = sub.watched.remove(j);
        sub.shown.remove(&identity.to_ascii_lowercase());
        let f = presence(sub.sid, &identity, Some(why));
        self.push_state(o, f, g, in_slice);
    }

    /// A Subscribe from `c` (§13 "Subscribe and Unsubscribe"): its shape, then the rates
    /// (as a Who), then the connection's subscriptions; then the listing: one `F` frame
    /// per shim it watches, then `Ack SID COUNT`.
    pub(super) fn model_subscribe(&mut self, c: usize, data: &[u8]) {
        let fields: Vec<&[u8]> = data.split(|&b| b == b' ').collect();
        let parsed = (|| {
            if fields.len() < 3 {
                return Err(Reject::Malformed(Shape::Subscribe));
            }
            let sid = parse_sid(fields[0]).ok_or_else(|| Reject::BadSid(lossy(fields[0])))?;
            let interval =
                parse_interval(fields[1]).ok_or_else(|| Reject::BadInterval(lossy(fields[1])))?;
            let target =
                MTarget::parse(fields[2]).map_err(|e| Reject::BadPattern(lossy(fields[2]), e))?;
            Ok((sid, interval, target, parse_keys(&fields[3..])?))
        })();
        let (sid, interval, target, keys) = match parsed {
            Ok(p) => p,
            Err(r) => return self.push_self(c, refusal(r)),
        };
        if let Err(r) = self.allow(c, Work::Who) {
            return self.push_self(c, refusal(r));
        }
        let s = &self.settings;
        let (max_subs, max_keys) = (s.state_subscriptions, s.state_keys);
        let subs = &self.conns[c].subs;
        let refused = if subs.iter().any(|x| x.sid == sid) {
            Some(Reject::SubscriptionExists(sid))
        } else if subs.len() >= max_subs {
            self.counts.subscriptions += 1;
            Some(Reject::TooManySubscriptions(max_subs))
        } else if keys.len() > max_keys {
            self.counts.subscriptions += 1;
            Some(Reject::KeysListed(max_keys))
        } else {
            None
        };
        if let Some(r) = refused {
            return self.push_self(c, refusal(r));
        }
        let mut sub = MSub {
            sid,
            target,
            keys,
            interval,
            watched: Vec::new(),
            shown: BTreeMap::new(),
        };
        sub.watched = (0..self.conns.len())
            .filter(|&k| self.conns[k].routed && !self.conns[k].closed && self.selects(c, &sub, k))
            .map(|k| (k, self.conns[k].identity.clone()))
            .collect();
        let entries: Vec<Vec<u8>> = (sub.watched.iter())
            .map(|&(k, _)| self.full_frame(sid, k, &sub.keys))
            .collect();
        if let Some(r) = self.listing_cap(&entries) {
            // No subscription is made.
            return self.push_self(c, refusal(r));
        }
        for (k, id) in &sub.watched {
            sub.shown.insert(id.to_ascii_lowercase(), *k);
        }
        let n = entries.len() as u64;
        let view_keys = sub.keys.clone();
        self.conns[c].subs.push(sub);
        self.charge(c, n);
        self.push_listing(
            c,
            Exp::States {
                sid,
                keys: view_keys,
                entries,
                ack: ack(u64::from(sid), n),
            },
        );
    }

    /// An Unsubscribe: `Ack SID 1`, or `no subscription SID` (SID as written).
    pub(super) fn model_unsubscribe(&mut self, c: usize, data: &[u8]) {
        let Some(sid) = parse_sid(data) else {
            return self.push_self(c, refusal(Reject::NoSubscription(lossy(data))));
        };
        let subs = &mut self.conns[c].subs;
        let Some(i) = subs.iter().position(|s| s.sid == sid) else {
            return self.push_self(c, refusal(Reject::NoSubscription(sid.to_string())));
        };
        subs.remove(i);
        let limit = self.settings.outbound_limit;
        self.push(c, limit, Exp::Unsubscribed(sid, ack(u64::from(sid), 1)));
    }

    /// A Get (§13 "Get"): as a Subscribe's listing with SID 0, of every identified shim
    /// the pattern matches that the user may read, the requester's own included.
    pub(super) fn model_get(&mut self, c: usize, data: &[u8]) {
        let fields: Vec<&[u8]> = data.split(|&b| b == b' ').collect();
        let parsed = (|| {
            let target = if data.is_empty() {
                MTarget::all()
            } else {
                MTarget::parse(fields[0]).map_err(|e| Reject::BadPattern(lossy(fields[0]), e))?
            };
            Ok((target, parse_keys(&fields[1..])?))
        })();
        let (target, keys) = match parsed {
            Ok(p) => p,
            Err(r) => return self.push_self(c, refusal(r)),
        };
        if let Err(r) = self.allow(c, Work::Who) {
            return self.push_self(c, refusal(r));
        }
        let max_keys = self.settings.state_keys;
        if keys.len() > max_keys {
            self.counts.subscriptions += 1;
            return self.push_self(c, refusal(Reject::KeysListed(max_keys)));
        }
        let entries: Vec<Vec<u8>> = (0..self.conns.len())
            .filter(|&k| {
                let k_ = &self.conns[k];
                let id = &k_.identity;
                // §6: what the user may read, then filtered.
                k_.routed
                    && target.pattern.matches(id)
                    && self.reads(c, id)
                    && target.passes(&k_.state)
            })
            .map(|k| self.full_frame(0, k, &keys))
            .collect();
        if let Some(r) = self.listing_cap(&entries) {
            return self.push_self(c, refusal(r));
        }
        let n = entries.len() as u64;
        self.charge(c, n);
        self.push_listing(
            c,
            Exp::States {
                sid: 0,
                keys,
                entries,
                ack: ack(0, n),
            },
        );
    }

    /// §13: the `F` frames of a listing may come to at most 8 × `outbound_limit` bytes.
    fn listing_cap(&mut self, entries: &[Vec<u8>]) -> Option<Reject> {
        let cap = 8 * self.settings.outbound_limit;
        (entries.iter().map(Vec::len).sum::<usize>() > cap).then(|| {
            self.counts.subscriptions += 1;
            Reject::ListingTooLarge(cap)
        })
    }

    /// A listing: alone in the queue it may pass the outbound limit (§8).
    fn push_listing(&mut self, c: usize, e: Exp) {
        let limit = self.settings.outbound_limit.max(e.len());
        self.push(c, limit, e);
    }

    /// The `F` frame of shim `k` for subscription `sid` (0: a Get), the keys `keys` lets
    /// through, with their ages now.
    fn full_frame(&self, sid: u32, k: usize, keys: &[String]) -> Vec<u8> {
        let now_ms = self.now_ms();
        let k_ = &self.conns[k];
        let mut d = format!("{sid} F {} {}", k_.state_seq, k_.identity).into_bytes();
        for e in self.conns[k].state.iter().filter(|e| wanted(keys, &e.key)) {
            d.push(US);
            d.extend_from_slice(e.key.as_bytes());
            d.extend_from_slice(format!(":{}=", now_ms.saturating_sub(e.at_ms)).as_bytes());
            d.extend_from_slice(&e.value);
        }
        encoded(Opcode::Set, &d)
    }

    /// §13 "Users": whether `c` may read `identity` (everyone on a hub without users).
    fn reads(&self, c: usize, identity: &str) -> bool {
        self.users.is_empty()
            || self
                .user_of(c)
                .is_some_and(|u| u.state.iter().any(|p| p.matches(identity)))
    }

    /// Whether `c`'s subscription `sub` names shim `k` under its identity now, its
    /// filters aside.
    fn watches(&self, c: usize, sub: &MSub, k: usize) -> bool {
        let id = &self.conns[k].identity;
        let p = &sub.target.pattern;
        (p.include_self || k != c) && p.matches(id) && self.reads(c, id)
    }

    /// Whether `c`'s subscription `sub` watches shim `k` now: it names it, and `k`'s state
    /// passes its filters.
    fn selects(&self, c: usize, sub: &MSub, k: usize) -> bool {
        self.watches(c, sub, k) && sub.target.passes(&self.conns[k].state)
    }

    // --- Presence -------------------------------------------------------------------

    /// A new group of frames the hub may queue in any order (it walks its sets).
    fn group(&mut self) -> u64 {
        self.groups += 1;
        self.groups
    }

    /// Queues a State or Presence frame for subscriber `to`: in a slice (listed for its
    /// flush), or outside one (flushed by the core's next tick, timed by the hub's
    /// latest time).
    fn push_state(&mut self, to: usize, f: Vec<u8>, group: u64, in_slice: bool) {
        let now_ms = if in_slice {
            self.now_ms()
        } else {
            self.clock_ms
        };
        // §8: relay state may take a subscriber's queue to 9 × `outbound_limit`.
        let limit = 9 * self.settings.outbound_limit;
        let len = f.len() as u64;
        let was = self.conns[to].out.state;
        match self.conns[to].out.push(limit, Exp::Any(group, f), now_ms) {
            Some(first) => {
                self.counts.tcp_out += len;
                if first {
                    if in_slice {
                        self.listed.push(to);
                    } else {
                        self.tick_flush.push(to);
                    }
                }
            }
            // Cut off within a group the hub may queue in another order: what it counted
            // before the cut is not known here.
            None if was == OutState::Open => self.tcp_slack += limit as u64,
            None => {}
        }
    }

    /// Every live subscription: (its connection, its index there).
    fn all_subs(&self) -> Vec<(usize, usize)> {
        (0..self.conns.len())
            .flat_map(|o| (0..self.conns[o].subs.len()).map(move |i| (o, i)))
            .collect()
    }

    /// After `c` identified (`old` empty) or renamed from `old` (§13 "Presence"): a leave
    /// `renamed` to the subscriptions that watched it, then a join to those that match it
    /// now and whose filters its state passes (its state follows a join in an `F` frame: a
    /// delivery, learned). Returns the Presence frames sent.
    pub(super) fn state_identity(&mut self, c: usize, old: &str) -> u64 {
        if self.conns[c].closed {
            return 0;
        }
        let mut told = 0;
        let g = self.group();
        for (o, i) in self.all_subs() {
            let sub = &mut self.conns[o].subs[i];
            if let Some(j) = sub.watched.iter().position(|w| w.0 == c) {
                let (_, was) = sub.watched.remove(j);
                debug_assert_eq!(was, old);
                sub.shown.remove(&was.to_ascii_lowercase());
                let f = presence(sub.sid, &was, Some("renamed"));
                self.push_state(o, f, g, true);
                told += 1;
            }
        }
        let g = self.group();
        for (o, i) in self.all_subs() {
            let sub = &self.conns[o].subs[i];
            if !self.watches(o, sub, c) {
                continue;
            }
            if sub.target.passes(&self.conns[c].state) {
                self.join(o, i, c, g, true);
                told += 1;
                continue;
            }
            // Named but not selected: no join. A holder of the name that was closing is
            // dropped all the same, with a leave `not selected` (no join stands for it).
            let identity = &self.conns[c].identity;
            let held =
                (sub.watched.iter()).position(|w| w.0 != c && w.1.eq_ignore_ascii_case(identity));
            if let Some(j) = held {
                self.leave(o, i, j, "not selected", g, true);
                told += 1;
            }
        }
        told
    }

    /// Subscription `i` of `o` starts watching `k`: a join.
    fn join(&mut self, o: usize, i: usize, k: usize, g: u64, in_slice: bool) {
        let identity = self.conns[k].identity.clone();
        let sub = &mut self.conns[o].subs[i];
        sub.watched
            .retain(|w| w.0 == k || !w.1.eq_ignore_ascii_case(&identity));
        sub.watched.push((k, identity.clone()));
        sub.shown.insert(identity.to_ascii_lowercase(), k);
        let f = presence(sub.sid, &identity, None);
        self.push_state(o, f, g, in_slice);
    }

    /// `c` is gone (§13): its subscriptions end, its state is dropped, and each
    /// subscription that watched it is sent a leave with the close reason (outside any
    /// slice of the subscriber's), unless a newcomer that took the identity while `c` was
    /// closing joined first (its join dropped `c`, and stood for the leave).
    pub(super) fn state_closed(&mut self, c: usize, reason: CloseReason) {
        self.conns[c].subs.clear();
        self.conns[c].state.clear();
        self.conns[c].tombs.clear();
        let why = reason.to_string();
        let g = self.group();
        for (o, i) in self.all_subs() {
            let sub = &mut self.conns[o].subs[i];
            let Some(j) = sub.watched.iter().position(|w| w.0 == c) else {
                continue;
            };
            let (_, identity) = sub.watched.remove(j);
            sub.shown.remove(&identity.to_ascii_lowercase());
            let f = presence(sub.sid, &identity, Some(&why));
            self.push_state(o, f, g, false);
        }
    }

    /// After a reload that changed the users (§13 "Users"): each subscription stops
    /// watching the shims its user may no longer read (a leave `not permitted`), and
    /// starts watching those its pattern matches that it may read now (a join, then
    /// their state in an `F` frame: learned).
    pub(super) fn state_recheck(&mut self) {
        if self.users.is_empty() {
            return;
        }
        let g = self.group();
        for (o, i) in self.all_subs() {
            for k in 0..self.conns.len() {
                let (routed, closed) = (self.conns[k].routed, self.conns[k].closed);
                let sub = &self.conns[o].subs[i];
                let id = &self.conns[k].identity;
                if !routed || closed || !sub.target.pattern.matches(id) {
                    continue;
                }
                let may = self.watches(o, sub, k);
                match (sub.watched.iter().position(|w| w.0 == k), may) {
                    (Some(j), false) => self.leave(o, i, j, "not permitted", g, false),
                    // §6: a shim it may read now joins when it passes the filters.
                    (None, true) if self.selects(o, sub, k) => self.join(o, i, k, g, false),
                    _ => {}
                }
            }
        }
    }

    /// The bytes of the leaves `c` may be sent when the others of `revoked` (connections
    /// a reload revokes together) are closed before it.
    pub(super) fn leaves_between(&self, c: usize, revoked: &[(usize, CloseReason)]) -> usize {
        let mut n = 0;
        for sub in &self.conns[c].subs {
            for &(x, why) in revoked {
                if let Some((_, id)) = sub.watched.iter().find(|w| x != c && w.0 == x) {
                    n += presence(sub.sid, id, Some(&why.to_string())).len();
                }
            }
        }
        n
    }

    /// After a reload that revoked several connections: what reached each before its own
    /// close (the leaves of those the hub closed first), queued before its last frame.
    pub(super) fn learn_revoked(&mut self) {
        for (c, before, could) in std::mem::take(&mut self.revoking) {
            let pending = self.conns[c].shim.outbox.pending();
            let m = &mut self.conns[c].out;
            if m.state != OutState::Closing {
                continue;
            }
            let d = pending.checked_sub(m.bytes).filter(|&d| d <= could);
            let Some(d) = d else {
                let bytes = m.bytes;
                self.fail(format!(
                    "conn {c}, revoked: {pending} bytes queued, expected {bytes} and up to {could} of leaves"
                ));
            };
            if d == 0 {
                continue;
            }
            let last = m.queued.len().saturating_sub(1);
            m.queued.insert(last, Exp::Async(d));
            m.bytes += d;
            self.counts.tcp_out += d as u64;
            if before == 0 {
                m.since_ms = self.clock_ms;
                self.tick_flush.push(c);
            }
        }
    }

    // --- Deliveries, learned --------------------------------------------------------

    /// After a call that may have delivered relay state (the end of a slice or of a
    /// datagram, a tick): what the hub queued on each open outbox beyond what the model
    /// predicted is deliveries (checked by the subscriber as it reads them); an outbox the
    /// model has open and the hub cut off was cut by one. Outboxes that went from empty to
    /// not empty are added to `listed`.
    pub(super) fn learn(&mut self, listed: &mut Vec<usize>) {
        let now_ms = self.now_ms();
        let limit = self.settings.outbound_limit;
        for k in 0..self.conns.len() {
            let ob = &self.conns[k].shim.outbox;
            let (state, pending, reason) = (ob.state(), ob.pending(), ob.reason());
            let expected = self.conns[k].out.bytes;
            if self.conns[k].out.state != OutState::Open {
                continue;
            }
            if state == OutState::Open && pending < expected {
                self.fail(format!(
                    "conn {k}: {pending} bytes queued, the model expected at least {expected}"
                ));
            }
            let m = &mut self.conns[k].out;
            match state {
                OutState::Open if pending > m.bytes => {
                    let d = pending - m.bytes;
                    if m.bytes == 0 {
                        m.since_ms = now_ms;
                        listed.push(k);
                    }
                    m.bytes += d;
                    m.queued.push(Exp::Async(d));
                    self.counts.tcp_out += d as u64;
                }
                OutState::Kicked if reason == Some(CloseReason::SlowConsumer) => {
                    m.cut(CloseReason::SlowConsumer);
                    self.tcp_slack += limit as u64;
                }
                _ => {}
            }
        }
    }

    /// State datagrams the hub sent (`D` frames to subscribers with a UDP channel): each
    /// to the address of a connection with a subscription; kept for its client to read
    /// after the TCP bytes queued for it before them.
    pub(super) fn state_datagrams(&mut self, sent: Vec<(std::net::SocketAddr, Vec<u8>)>) {
        for (to, f) in sent {
            let Some(k) =
                (0..self.conns.len()).find(|&k| self.conns[k].shim.udp_addr() == Some(to))
            else {
                self.fail(format!("a State datagram to {to}, no connection's address"));
            };
            if f.first() != Some(&(Opcode::Set as u8)) {
                self.fail(format!("datagram {:?} to conn {k}", lossy(&f)));
            }
            let socket = super::SOCKETS
                .with(|s| s.borrow().get(&super::fd_of(k)).map_or(0, |x| x.got.len()));
            let at = self.conns[k].client.read + socket + self.conns[k].shim.outbox.pending();
            self.counts.udp_out += f.len() as u64;
            self.conns[k].client.datagrams.push((at, f));
        }
    }

    // --- The subscriber's side ------------------------------------------------------

    /// Client `c` reads the datagrams sent before TCP byte `upto`.
    pub(super) fn read_datagrams(&mut self, c: usize, upto: usize) {
        let dgrams = std::mem::take(&mut self.conns[c].client.datagrams);
        let (now, later): (Vec<_>, Vec<_>) = dgrams.into_iter().partition(|(at, _)| *at <= upto);
        self.conns[c].client.datagrams = later;
        for (_, f) in now {
            self.view_frame(c, &f, true);
        }
    }

    /// Client `c` read the answer to its Subscribe `sid` (`keys`: what it asked for).
    pub(super) fn view_listing(
        &mut self,
        c: usize,
        sid: u32,
        keys: &[String],
        entries: &[Vec<u8>],
    ) {
        if sid == 0 {
            return;
        }
        let sub = &mut self.conns[c].client;
        sub.gone.remove(&sid);
        if sub.views.contains_key(&sid) {
            self.fail(format!("conn {c}: a second listing for subscription {sid}"));
        }
        let mut view = View {
            keys: keys.to_vec(),
            shims: BTreeMap::new(),
        };
        for f in entries {
            let Some(st) = parse_state(f).filter(|st| st.sid == sid && st.full) else {
                self.fail(format!("conn {c}: listing frame {:?}", lossy(f)));
            };
            let held = (st.items.into_iter())
                .map(|(k, v)| (k.to_ascii_lowercase(), (k, v.unwrap_or_default())));
            let lower = st.identity.to_ascii_lowercase();
            if view.shims.insert(lower, (st.seq, held.collect())).is_some() {
                self.fail(format!("conn {c}: listing frame {:?} twice", lossy(f)));
            }
        }
        self.conns[c].client.views.insert(sid, view);
    }

    /// Client `c` read the Ack of its Unsubscribe `sid`.
    pub(super) fn view_unsubscribed(&mut self, c: usize, sid: u32) {
        let sub = &mut self.conns[c].client;
        sub.views.remove(&sid);
        sub.gone.insert(sid);
    }

    /// Client `c` reads a State or Presence frame outside a listing (over UDP when
    /// `udp`), and checks it against its copy (§13 "Order over TCP", "Reading State
    /// frames"; the datagrams are read in the order the hub sent them, so the same holds
    /// for them): no frame for a subscription it does not hold or has unsubscribed; no
    /// State frame for an identity that has not joined or has left, or with a SEQ below
    /// the last one applied for it; only the keys it asked for; `F` frames over TCP only.
    /// A join replaces what it held for the identity; a leave for one it does not hold is
    /// ignored (the holder a newcomer replaced).
    pub(super) fn view_frame(&mut self, c: usize, f: &[u8], udp: bool) {
        let text = || lossy(f);
        let data = &f[1..f.len() - 1];
        let sid = match f[0] {
            0x10 => parse_state(f).map(|s| s.sid),
            0x14 => data
                .iter()
                .position(|&b| b == b' ')
                .and_then(|i| parse_sid(&data[..i])),
            _ => None,
        };
        let Some(sid) = sid.filter(|&s| s != 0) else {
            self.fail(format!(
                "conn {c}: malformed State or Presence frame {:?}",
                text()
            ));
        };
        let sub = &self.conns[c].client;
        let Some(view) = sub.views.get(&sid) else {
            let after = if sub.gone.contains(&sid) {
                "after the Ack of its Unsubscribe"
            } else {
                "which it does not hold"
            };
            self.fail(format!(
                "conn {c}: {} for subscription {sid}, {after}",
                text()
            ));
        };
        let mut view = view.clone();
        if f[0] == 0x14 {
            let rest = &data[data.iter().position(|&b| b == b' ').unwrap_or(0) + 1..];
            match rest.split_first() {
                Some((b'+', id)) => {
                    view.shims
                        .insert(lossy(id).to_ascii_lowercase(), (0, BTreeMap::new()));
                }
                Some((b'-', rest)) => {
                    let sp = rest.iter().position(|&b| b == b' ');
                    let (id, why) = match sp {
                        Some(i) => (lossy(&rest[..i]), lossy(&rest[i + 1..])),
                        None => (lossy(rest), String::new()),
                    };
                    if !leave_reasons().contains(&why) {
                        self.fail(format!("conn {c}: {:?}: no such reason", text()));
                    }
                    view.shims.remove(&id.to_ascii_lowercase());
                }
                _ => self.fail(format!("conn {c}: malformed Presence frame {:?}", text())),
            }
        } else {
            let Some(st) = parse_state(f) else {
                unreachable!("parsed above");
            };
            if udp && st.full {
                self.fail(format!("conn {c}: an F frame over UDP: {:?}", text()));
            }
            let Some((seq, held)) = view.shims.get_mut(&st.identity.to_ascii_lowercase()) else {
                self.fail(format!(
                    "conn {c}: {:?}: {} has not joined, or has left",
                    text(),
                    st.identity
                ));
            };
            if st.seq < *seq {
                self.fail(format!(
                    "conn {c}: {:?}: SEQ {} after SEQ {seq}",
                    text(),
                    st.seq
                ));
            }
            *seq = st.seq;
            if st.full {
                held.clear();
            }
            for (key, value) in st.items {
                if !wanted(&view.keys, &key) {
                    self.fail(format!("conn {c}: {:?}: {key} was not asked for", text()));
                }
                match value {
                    Some(v) => {
                        held.insert(key.to_ascii_lowercase(), (key, v));
                    }
                    None if st.full => {
                        self.fail(format!("conn {c}: {:?}: a deletion in an F frame", text()))
                    }
                    None => {
                        held.remove(&key.to_ascii_lowercase());
                    }
                }
            }
        }
        self.conns[c].client.views.insert(sid, view);
    }

    /// Once settled: every open subscriber holds exactly its subscriptions, and its copy
    /// of each is the model's state of the shims it was told of (the keys it asked for;
    /// the values only for an interval the harness waited past).
    pub(super) fn check_views(&self) {
        for (c, k) in self.conns.iter().enumerate() {
            if k.finished || k.closed || k.out.state != OutState::Open {
                continue;
            }
            let held: Vec<u32> = k.client.views.keys().copied().collect();
            let mut subs: Vec<u32> = k.subs.iter().map(|s| s.sid).collect();
            subs.sort_unstable();
            if held != subs {
                self.fail(format!(
                    "conn {c} holds subscriptions {held:?}, the model {subs:?}"
                ));
            }
            type Copy = BTreeMap<String, Keys>;
            for s in &k.subs {
                let view: Copy = (k.client.views[&s.sid].shims.iter())
                    .map(|(id, (_, kv))| (id.clone(), kv.clone()))
                    .collect();
                let mut want: Copy = BTreeMap::new();
                for (id, &w) in &s.shown {
                    if self.conns[w].closed {
                        self.fail(format!(
                            "conn {c} subscription {} still shows {id}, whose shim is gone",
                            s.sid
                        ));
                    }
                    let keys = self.conns[w]
                        .state
                        .iter()
                        .filter(|e| wanted(&s.keys, &e.key))
                        .map(|e| (e.key.to_ascii_lowercase(), (e.key.clone(), e.value.clone())))
                        .collect();
                    want.insert(id.clone(), keys);
                }
                let names = |m: &Copy| -> Vec<String> { m.keys().cloned().collect() };
                if names(&view) != names(&want) {
                    self.fail(format!(
                        "conn {c} subscription {} watches {:?}, the model {:?}",
                        s.sid,
                        names(&view),
                        names(&want)
                    ));
                }
                if s.interval <= SETTLE_MS && view != want {
                    let show = |m: &Copy| {
                        m.iter()
                            .map(|(id, kv)| {
                                let kv: Vec<String> = (kv.values())
                                    .map(|(k, v)| format!("{k}={}", lossy(v)))
                                    .collect();
                                format!("{id} {}", kv.join(" "))
                            })
                            .collect::<Vec<_>>()
                    };
                    self.fail(format!(
                        "conn {c} subscription {} holds {:?}, the model {:?}",
                        s.sid,
                        show(&view),
                        show(&want)
                    ));
                }
            }
        }
    }

    /// Keys shims hold, for the `state_keys` gauge.
    pub(super) fn state_keys(&self) -> u64 {
        self.conns.iter().map(|k| k.state.len() as u64).sum()
    }

    /// Subscriptions open, for `States::subscriptions`.
    pub(super) fn subscriptions(&self) -> usize {
        self.conns.iter().map(|k| k.subs.len()).sum()
    }

    // --- Rendering the generated requests -------------------------------------------

    /// A Set's data.
    pub(super) fn set_bytes(items: &[Item], out: &mut Vec<u8>) {
        for (i, it) in items.iter().enumerate() {
            if i > 0 {
                out.push(US);
            }
            out.extend_from_slice(KEYS[usize::from(it.key) % KEYS.len()]);
            if let Some(v) = &it.value {
                out.push(b'=');
                out.extend(v.iter().filter(|&&b| b != b'\n'));
            }
        }
    }

    /// A Subscribe's or a Get's target and keys (`how` 240 to 247: neither target nor
    /// keys for a Subscribe, no pattern for a Get; 248 up: a bad pattern), `filters`
    /// after the pattern.
    pub(super) fn query_bytes(
        &self,
        get: bool,
        pick: u8,
        how: u8,
        keys: &[u8],
        filters: &[u8],
        out: &mut Vec<u8>,
    ) {
        let key = |k: &u8| KEYS[usize::from(*k) % KEYS.len()];
        match how {
            240..=247 if !get => return,
            240..=247 => {}
            248.. => out.extend_from_slice(BAD_PATTERNS[usize::from(how) % BAD_PATTERNS.len()]),
            _ => out.extend_from_slice(self.target_of(pick, how).as_bytes()),
        }
        out.extend_from_slice(filters);
        for k in keys {
            out.push(b' ');
            out.extend_from_slice(key(k));
        }
    }

    /// A Subscribe's data up to its target: `SID SP INTERVAL_MS`, then a space when a
    /// target follows (`how` not 240 to 247, see [`World::query_bytes`]).
    pub(super) fn subscribe_head(sid: u8, interval: u8, how: u8, out: &mut Vec<u8>) {
        out.extend_from_slice(SIDS[usize::from(sid) % SIDS.len()].as_bytes());
        out.push(b' ');
        out.extend_from_slice(INTERVALS[usize::from(interval) % INTERVALS.len()].as_bytes());
        if !(240..248).contains(&how) {
            out.push(b' ');
        }
    }
}

/// A State frame as the model reads it.
pub(super) struct MState {
    pub(super) sid: u32,
    pub(super) full: bool,
    pub(super) seq: u64,
    pub(super) identity: String,
    /// Each key with its value, or `None`: deleted.
    pub(super) items: Vec<(String, Option<Vec<u8>>)>,
}

/// The model's reading of a State frame (§13 "The State frame"): `SID SP MODE SP SEQ SP
/// IDENTITY`, then items, split at each 0x1F, an item at its first `:` and the first `=`
/// after it; the SEQ and the ages must be decimal.
pub(super) fn parse_state(f: &[u8]) -> Option<MState> {
    let data = f.strip_prefix(&[Opcode::Set as u8])?.strip_suffix(b"\n")?;
    let mut parts = data.split(|&b| b == US);
    let head: Vec<&[u8]> = parts.next()?.splitn(4, |&b| b == b' ').collect();
    let [sid, mode, seq, identity] = head[..] else {
        return None;
    };
    let sid = if sid == b"0" { 0 } else { parse_sid(sid)? };
    let full = match mode {
        b"F" => true,
        b"D" => false,
        _ => return None,
    };
    let seq = canonical(seq)?;
    let mut items = Vec::new();
    for item in parts {
        match item.iter().position(|&b| b == b':') {
            None => items.push((check_key(item).ok()?.to_string(), None)),
            Some(colon) => {
                let eq = colon + item[colon..].iter().position(|&b| b == b'=')?;
                canonical(&item[colon + 1..eq])?;
                let key = check_key(&item[..colon]).ok()?;
                items.push((key.to_string(), Some(item[eq + 1..].to_vec())));
            }
        }
    }
    Some(MState {
        sid,
        full,
        seq,
        identity: lossy(identity),
        items,
    })
}
