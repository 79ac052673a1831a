//! Relay state on the wire: Set, State, Subscribe, Unsubscribe, Get and Presence.
//!
//! A shim owns a set of keys with values and sends them with Set, several per frame (one
//! datagram can carry a whole tick). Items are separated by `0x1F` (the ASCII unit
//! separator), because a value may hold spaces: keys keep to the identity-segment grammar
//! and values are bytes without `0x0A` and `0x1F`. The hub answers subscribers with State
//! frames, full (`F`: everything the shim holds) or deltas (`D`: what changed), each item
//! carrying its age so that a consumer can show staleness; and with Presence frames when a
//! watched shim joins or leaves.
//!
//! Both sides use this file: the hub parses requests with [`parse_set`],
//! [`Subscribe::parse`], [`parse_get`] and writes with [`StateFrame`] and [`presence`]; the
//! client library writes with [`encode_set`], [`encode_subscribe`], [`encode_get`] and
//! reads with [`parse_state`] and [`parse_presence`].

use super::identity::is_segment_byte;
use super::reply::push_u64;
use super::request::parse_canonical_id;
use super::target::{Target, TargetError};
use super::{NEWLINE, Opcode, SP};
use thiserror::Error;

/// The separator between items.
pub const US: u8 = 0x1F;
/// Longest key, in bytes.
pub const MAX_KEY: usize = 64;
/// Longest subscription interval, in milliseconds (an hour).
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// The largest State datagram the hub sends (well under a 1,200-byte path MTU once UDP, IP
/// and a sealed header are added).
pub const MAX_STATE_DATAGRAM: usize = 1100;

/// Why a key is refused; the Display text follows `bad key K: ` in the Error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum KeyError {
    /// No bytes.
    #[error("key is empty")]
    Empty,
    /// Longer than [`MAX_KEY`].
    #[error("key longer than 64 bytes")]
    TooLong,
    /// A byte outside the grammar.
    #[error("key byte 0x{byte:02X} at {at}: only ASCII letters, digits, '_' and '-' are allowed")]
    Byte {
        /// The byte.
        byte: u8,
        /// Its offset.
        at: usize,
    },
}

/// Checks a key: a segment of the identity grammar.
pub fn check_key(key: &[u8]) -> Result<&str, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY {
        return Err(KeyError::TooLong);
    }
    if let Some(at) = key.iter().position(|&b| !is_segment_byte(b)) {
        return Err(KeyError::Byte { byte: key[at], at });
    }
    // Segment bytes are ASCII.
    Ok(std::str::from_utf8(key).expect("ASCII"))
}

/// What a Set's data is refused for, before any limit is looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetError {
    /// Empty data, or an empty item.
    Shape,
    /// A key outside the grammar (the key, lossy).
    Key(String, KeyError),
}

/// One item of a Set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetItem<'a> {
    /// The key.
    pub key: &'a str,
    /// The new value, or `None` to delete the key.
    pub value: Option<&'a [u8]>,
}

/// Parses a Set's data into its items (in frame order; a key written twice is there twice,
/// and the last wins when they are applied).
pub fn parse_set(data: &[u8]) -> Result<Vec<SetItem<'_>>, SetError> {
    if data.is_empty() {
        return Err(SetError::Shape);
    }
    data.split(|&b| b == US)
        .map(|item| {
            if item.is_empty() {
                return Err(SetError::Shape);
            }
            let (key, value) = match memchr::memchr(b'=', item) {
                Some(i) => (&item[..i], Some(&item[i + 1..])),
                None => (item, None),
            };
            let key = check_key(key).map_err(|e| SetError::Key(lossy(key), e))?;
            Ok(SetItem { key, value })
        })
        .collect()
}

/// A Subscribe request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe<'a> {
    /// The client's id for the subscription.
    pub sid: u32,
    /// The shortest time between two deliveries, in milliseconds.
    pub interval_ms: u64,
    /// Whose state.
    pub target: Target,
    /// The target as written, for messages.
    pub target_text: &'a [u8],
    /// The keys wanted (empty: every key).
    pub keys: Vec<&'a str>,
}

/// Why a Subscribe or a Get is refused by its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryError {
    /// Not `SID SP INTERVAL_MS SP PATTERN [SP KEY...]`.
    Shape,
    /// A subscription id that is not a canonical decimal from 1 to 2^32-1 (as written).
    Sid(String),
    /// An interval that is not milliseconds from 0 to [`MAX_INTERVAL_MS`] (as written).
    Interval(String),
    /// A target that is not a target (as written).
    Pattern(String, TargetError),
    /// A key outside the grammar (as written).
    Key(String, KeyError),
}

impl<'a> Subscribe<'a> {
    /// Parses a Subscribe's data.
    pub fn parse(data: &'a [u8]) -> Result<Subscribe<'a>, QueryError> {
        let mut fields = data.split(|&b| b == SP);
        let (Some(sid), Some(interval), Some(target_text)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(QueryError::Shape);
        };
        let sid = parse_sid(sid).ok_or_else(|| QueryError::Sid(lossy(sid)))?;
        let interval_ms = super::reply::parse_u64(interval)
            .filter(|&ms| ms <= MAX_INTERVAL_MS)
            .ok_or_else(|| QueryError::Interval(lossy(interval)))?;
        let target =
            Target::parse(target_text).map_err(|e| QueryError::Pattern(lossy(target_text), e))?;
        let keys = parse_keys(fields)?;
        Ok(Subscribe {
            sid,
            interval_ms,
            target,
            target_text,
            keys,
        })
    }
}

/// A subscription id: a canonical decimal from 1 to 2^32-1.
pub fn parse_sid(text: &[u8]) -> Option<u32> {
    parse_canonical_id(text)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v != 0)
}

/// Parses a Get's data: `TARGET [SP KEY...]`.
pub fn parse_get(data: &[u8]) -> Result<(Target, &[u8], Vec<&str>), QueryError> {
    let mut fields = data.split(|&b| b == SP);
    let target_text = fields.next().unwrap_or_default();
    let target = if target_text.is_empty() && data.is_empty() {
        Target::all()
    } else {
        Target::parse(target_text).map_err(|e| QueryError::Pattern(lossy(target_text), e))?
    };
    Ok((target, target_text, parse_keys(fields)?))
}

fn parse_keys<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Result<Vec<&'a str>, QueryError> {
    fields
        .map(|k| check_key(k).map_err(|e| QueryError::Key(lossy(k), e)))
        .collect()
}

/// Whether a State frame is a shim's whole state or what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `F`: everything the shim holds (for the subscribed keys): replaces what the
    /// consumer held for it.
    Full,
    /// `D`: what changed since the last frame for the shim on this subscription.
    Delta,
}

impl Mode {
    fn byte(self) -> u8 {
        match self {
            Mode::Full => b'F',
            Mode::Delta => b'D',
        }
    }
}

/// A State frame being written: `SID SP MODE SP SEQ SP IDENTITY (US ITEM)*`.
pub struct StateFrame {
    buf: Vec<u8>,
    head: usize,
    items: usize,
}

impl StateFrame {
    /// Starts a frame about `identity`, whose state is at sequence number `seq`.
    pub fn new(sid: u32, mode: Mode, identity: &str, seq: u64) -> StateFrame {
        StateFrame::with_capacity(sid, mode, identity, seq, 64)
    }

    /// Starts a frame with room for `items_len` bytes of items.
    pub fn with_capacity(
        sid: u32,
        mode: Mode,
        identity: &str,
        seq: u64,
        items_len: usize,
    ) -> StateFrame {
        let mut buf = Vec::with_capacity(32 + identity.len() + items_len);
        buf.push(Opcode::Set as u8);
        push_u64(&mut buf, u64::from(sid));
        buf.push(SP);
        buf.push(mode.byte());
        buf.push(SP);
        push_u64(&mut buf, seq);
        buf.push(SP);
        buf.extend_from_slice(identity.as_bytes());
        let head = buf.len();
        StateFrame {
            buf,
            head,
            items: 0,
        }
    }

    /// Adds `KEY:AGE=VALUE`.
    pub fn value(&mut self, key: impl AsRef<[u8]>, age_ms: u64, value: &[u8]) {
        self.buf.push(US);
        self.buf.extend_from_slice(key.as_ref());
        self.buf.push(b':');
        push_u64(&mut self.buf, age_ms);
        self.buf.push(b'=');
        self.buf.extend_from_slice(value);
        self.items += 1;
    }

    /// Adds `KEY`: the key was deleted (deltas only).
    pub fn deleted(&mut self, key: impl AsRef<[u8]>) {
        self.buf.push(US);
        self.buf.extend_from_slice(key.as_ref());
        self.items += 1;
    }

    /// Bytes the frame would have with its `0A`.
    pub fn len(&self) -> usize {
        self.buf.len() + 1
    }

    /// Whether no item was added.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// Items added.
    pub fn items(&self) -> usize {
        self.items
    }

    /// Bytes of the header (opcode, SID, mode, identity).
    pub fn head_len(&self) -> usize {
        self.head
    }

    /// The finished frame.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(NEWLINE);
        self.buf
    }
}

/// Bytes an item adds to a State frame.
pub fn item_len(key: impl AsRef<[u8]>, age_ms: u64, value: Option<&[u8]>) -> usize {
    let key = key.as_ref();
    match value {
        Some(v) => 1 + key.len() + 1 + digits(age_ms) + 1 + v.len(),
        None => 1 + key.len(),
    }
}

fn digits(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 10 {
        v /= 10;
        n += 1;
    }
    n
}

/// A join (`SID SP +IDENTITY`) or a leave (`SID SP -IDENTITY SP REASON`).
pub fn presence(sid: u32, identity: &str, leave: Option<&str>, out: &mut Vec<u8>) {
    out.push(Opcode::Presence as u8);
    push_u64(out, u64::from(sid));
    out.push(SP);
    match leave {
        None => {
            out.push(b'+');
            out.extend_from_slice(identity.as_bytes());
        }
        Some(reason) => {
            out.push(b'-');
            out.extend_from_slice(identity.as_bytes());
            out.push(SP);
            out.extend_from_slice(reason.as_bytes());
        }
    }
    out.push(NEWLINE);
}

/// `Set ITEM (US ITEM)*`; a `None` value deletes the key. A value's newlines are written
/// as 0x0B; the caller keeps 0x1F out of values (see [`value_ok`]).
pub fn encode_set<'a>(
    items: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    out: &mut Vec<u8>,
) {
    out.push(Opcode::Set as u8);
    for (i, (key, value)) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(US);
        }
        out.extend_from_slice(key.as_bytes());
        if let Some(v) = value {
            out.push(b'=');
            super::request::push_text(out, v);
        }
    }
    out.push(NEWLINE);
}

/// Whether `value` can be sent as a value (it holds no 0x1F; a newline is escaped).
pub fn value_ok(value: &str) -> bool {
    !value.as_bytes().contains(&US)
}

/// `Subscribe SID SP INTERVAL_MS SP PATTERN (SP KEY)*`.
pub fn encode_subscribe(
    sid: u32,
    interval_ms: u64,
    pattern: &str,
    keys: &[&str],
    out: &mut Vec<u8>,
) {
    out.push(Opcode::Subscribe as u8);
    push_u64(out, u64::from(sid));
    out.push(SP);
    push_u64(out, interval_ms);
    out.push(SP);
    out.extend_from_slice(pattern.as_bytes());
    for k in keys {
        out.push(SP);
        out.extend_from_slice(k.as_bytes());
    }
    out.push(NEWLINE);
}

/// `Unsubscribe SID`.
pub fn encode_unsubscribe(sid: u32, out: &mut Vec<u8>) {
    out.push(Opcode::Unsubscribe as u8);
    push_u64(out, u64::from(sid));
    out.push(NEWLINE);
}

/// `Get PATTERN (SP KEY)*`.
pub fn encode_get(pattern: &str, keys: &[&str], out: &mut Vec<u8>) {
    out.push(Opcode::Get as u8);
    out.extend_from_slice(pattern.as_bytes());
    for k in keys {
        out.push(SP);
        out.extend_from_slice(k.as_bytes());
    }
    out.push(NEWLINE);
}

/// One item of a State frame as a client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value and its age in milliseconds, or `None`: the key was deleted.
    pub value: Option<(u64, &'a [u8])>,
}

/// A State frame as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State<'a> {
    /// The subscription (0: the answer to a Get).
    pub sid: u32,
    /// Full or delta.
    pub mode: Mode,
    /// The shim's sequence number when the frame was built: of two frames about one
    /// identity, the one with the lower number is older (a datagram can arrive after a
    /// newer frame sent over TCP). Frames split from one delta share it.
    pub seq: u64,
    /// Whose state.
    pub identity: &'a [u8],
    /// The items, in frame order.
    pub items: Vec<Item<'a>>,
}

/// Parses a State frame's data.
pub fn parse_state(data: &[u8]) -> Option<State<'_>> {
    let mut parts = data.split(|&b| b == US);
    let head = parts.next()?;
    let mut fields = head.splitn(4, |&b| b == SP);
    let sid = fields.next()?;
    let sid = if sid == b"0" { 0 } else { parse_sid(sid)? };
    let mode = match fields.next()? {
        b"F" => Mode::Full,
        b"D" => Mode::Delta,
        _ => return None,
    };
    let seq = super::reply::parse_u64(fields.next()?)?;
    let identity = fields.next()?;
    let items = parts
        .map(|item| {
            let Some(colon) = memchr::memchr(b':', item) else {
                return Some(Item {
                    key: item,
                    value: None,
                });
            };
            let eq = colon + memchr::memchr(b'=', &item[colon..])?;
            let age = super::reply::parse_u64(&item[colon + 1..eq])?;
            Some(Item {
                key: &item[..colon],
                value: Some((age, &item[eq + 1..])),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(State {
        sid,
        mode,
        seq,
        identity,
        items,
    })
}

/// A Presence frame as a client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence<'a> {
    /// A watched shim appeared.
    Join {
        /// The subscription.
        sid: u32,
        /// Who.
        identity: &'a [u8],
    },
    /// A watched shim went, and why.
    Leave {
        /// The subscription.
        sid: u32,
        /// Who.
        identity: &'a [u8],
        /// Why (the close reason, or `renamed`).
        reason: &'a [u8],
    },
}

/// Parses a Presence frame's data.
pub fn parse_presence(data: &[u8]) -> Option<Presence<'_>> {
    let (sid, rest) = super::reply::split_sp(data)?;
    let sid = parse_sid(sid)?;
    match rest.split_first()? {
        (b'+', identity) => Some(Presence::Join { sid, identity }),
        (b'-', rest) => {
            let (identity, reason) = super::reply::split_sp(rest)?;
            Some(Presence::Leave {
                sid,
                identity,
                reason,
            })
        }
        _ => None,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_items_parse_in_order() {
        let items = parse_set(b"hp=4500/5000\x1fnote=afk back soon\x1ftarget").unwrap();
        assert_eq!(
            items,
            vec![
                SetItem {
                    key: "hp",
                    value: Some(b"4500/5000")
                },
                SetItem {
                    key: "note",
                    value: Some(b"afk back soon")
                },
                SetItem {
                    key: "target",
                    value: None
                },
            ]
        );
        assert_eq!(
            parse_set(b"a=").unwrap()[0].value,
            Some(&b""[..]),
            "an empty value is a value"
        );
        assert_eq!(parse_set(b""), Err(SetError::Shape));
        assert_eq!(parse_set(b"a=1\x1f"), Err(SetError::Shape));
        assert!(matches!(
            parse_set(b"h p=1"),
            Err(SetError::Key(_, KeyError::Byte { byte: b' ', at: 1 }))
        ));
        assert!(matches!(
            parse_set(b"=1"),
            Err(SetError::Key(_, KeyError::Empty))
        ));
    }

    #[test]
    fn encoders_and_parsers_agree() {
        let mut v = Vec::new();
        encode_set(
            [("hp", Some("1/2")), ("note", Some("a\nb")), ("x", None)],
            &mut v,
        );
        assert_eq!(v, b"\x10hp=1/2\x1fnote=a\x0bb\x1fx\n");
        let items = parse_set(&v[1..v.len() - 1]).unwrap();
        assert_eq!(items.len(), 3);

        let mut f = StateFrame::new(7, Mode::Delta, "peq.z.bob", 42);
        f.value("hp", 12, b"1/2");
        f.deleted("x");
        let len = f.len();
        let v = f.finish();
        assert_eq!(len, v.len());
        assert_eq!(v, b"\x107 D 42 peq.z.bob\x1fhp:12=1/2\x1fx\n");
        assert_eq!(item_len("hp", 12, Some(b"1/2")), "\x1fhp:12=1/2".len());
        let s = parse_state(&v[1..v.len() - 1]).unwrap();
        assert_eq!(
            (s.sid, s.mode, s.seq, s.identity),
            (7, Mode::Delta, 42, &b"peq.z.bob"[..])
        );
        assert_eq!(
            s.items,
            vec![
                Item {
                    key: b"hp",
                    value: Some((12, b"1/2"))
                },
                Item {
                    key: b"x",
                    value: None
                }
            ]
        );
        // A value may hold ':' and '='.
        let mut f = StateFrame::new(1, Mode::Full, "a", 0);
        f.value("loc", 0, b"1:2=3");
        let v = f.finish();
        let s = parse_state(&v[1..v.len() - 1]).unwrap();
        assert_eq!(s.items[0].value, Some((0, &b"1:2=3"[..])));

        let mut p = Vec::new();
        presence(3, "peq.z.bob", None, &mut p);
        presence(3, "peq.z.bob", Some("idle timeout"), &mut p);
        assert_eq!(p, b"\x143 +peq.z.bob\n\x143 -peq.z.bob idle timeout\n");
        assert_eq!(
            parse_presence(b"3 -peq.z.bob idle timeout"),
            Some(Presence::Leave {
                sid: 3,
                identity: b"peq.z.bob",
                reason: b"idle timeout"
            })
        );

        let mut s = Vec::new();
        encode_subscribe(9, 250, "peq.>", &["hp", "mana"], &mut s);
        assert_eq!(s, b"\x119 250 peq.> hp mana\n");
        let sub = Subscribe::parse(&s[1..s.len() - 1]).unwrap();
        assert_eq!(
            (sub.sid, sub.interval_ms, sub.keys),
            (9, 250, vec!["hp", "mana"])
        );
        assert_eq!(Subscribe::parse(b"0 1 >"), Err(QueryError::Sid("0".into())));
        assert_eq!(
            Subscribe::parse(b"01 1 >"),
            Err(QueryError::Sid("01".into()))
        );
        assert_eq!(
            Subscribe::parse(b"4294967296 1 >"),
            Err(QueryError::Sid("4294967296".into()))
        );
        assert_eq!(
            Subscribe::parse(b"1 3600001 >"),
            Err(QueryError::Interval("3600001".into()))
        );
        assert_eq!(Subscribe::parse(b"1 10"), Err(QueryError::Shape));
        assert!(matches!(
            Subscribe::parse(b"1 0 > h.p"),
            Err(QueryError::Key(..))
        ));
        let (p, _, keys) = parse_get(b"").unwrap();
        assert_eq!((p, keys), (Target::all(), vec![]));
        let (_, t, keys) = parse_get(b"peq.* hp").unwrap();
        assert_eq!((t, keys), (&b"peq.*"[..], vec!["hp"]));
    }
}
