//! Every frame the server sends: its encoder (used by the hub) and its parser (used by
//! the client library), side by side so that the two cannot drift apart.

use super::{NEWLINE, Opcode, SP, Token, encode, encode_parts};

/// `Session TOKEN`: the answer to the first Identify.
pub fn session(token: &Token, out: &mut Vec<u8>) {
    encode(Opcode::Session, &token.0, out);
}

/// The settings a shim must follow, as the Terms frame (`15`) carries them right after
/// Session: `KEY=VALUE` items separated by `1F`, like a Set's. A client ignores keys it does
/// not know, so that later hubs can say more.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Terms {
    /// The idle timeout: the server closes a connection it has received nothing from for
    /// this long.
    pub idle_timeout_ms: u64,
    /// How often a quiet shim should send something (a Ping): a third of the idle timeout.
    pub ping_ms: u64,
    /// The longest frame the server takes, opcode and `0A` included.
    pub max_frame: u64,
    /// The bytes the server queues for the shim before it cuts it off as a slow consumer.
    pub outbound_limit: u64,
    /// How many of the last Commands delivered to the shim it may still answer.
    pub answer_window: u64,
    /// What this hub serves this connection (see docs/protocol.md, "The Terms frame").
    pub features: Vec<String>,
}

/// The keys of a Terms frame, in the order the server sends them.
const TERMS_KEYS: [&str; 6] = [
    "idle_timeout_ms",
    "ping_ms",
    "max_frame",
    "outbound_limit",
    "answer_window",
    "features",
];

/// `Terms KEY=VALUE (1F KEY=VALUE)*`.
pub fn terms(t: &Terms, out: &mut Vec<u8>) {
    out.push(Opcode::Terms as u8);
    let numbers = [
        t.idle_timeout_ms,
        t.ping_ms,
        t.max_frame,
        t.outbound_limit,
        t.answer_window,
    ];
    for (key, v) in TERMS_KEYS.iter().zip(numbers) {
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        push_u64(out, v);
        out.push(super::state::US);
    }
    out.extend_from_slice(TERMS_KEYS[5].as_bytes());
    out.push(b'=');
    out.extend_from_slice(t.features.join(",").as_bytes());
    out.push(NEWLINE);
}

/// Parses a Terms frame's data; `None` if a known key's value is not in its form. Unknown
/// keys are skipped; a key left out keeps its zero (or empty) value.
pub fn parse_terms(data: &[u8]) -> Option<Terms> {
    let mut t = Terms::default();
    for item in data.split(|&b| b == super::state::US) {
        let eq = item.iter().position(|&b| b == b'=')?;
        let (key, value) = (&item[..eq], &item[eq + 1..]);
        let n = || parse_u64(value);
        match key {
            b"idle_timeout_ms" => t.idle_timeout_ms = n()?,
            b"ping_ms" => t.ping_ms = n()?,
            b"max_frame" => t.max_frame = n()?,
            b"outbound_limit" => t.outbound_limit = n()?,
            b"answer_window" => t.answer_window = n()?,
            b"features" => {
                let v = std::str::from_utf8(value).ok()?;
                t.features = v
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            _ => {}
        }
    }
    Some(t)
}

/// `Ack ID SP COUNT`: a Command (its id) or an Echo or Who (id 0) reached COUNT shims.
pub fn ack(id: u64, count: u64, out: &mut Vec<u8>) {
    out.push(Opcode::Ack as u8);
    push_u64(out, id);
    out.push(SP);
    push_u64(out, count);
    out.push(NEWLINE);
}

/// `Pong DATA`.
pub fn pong(data: &[u8], out: &mut Vec<u8>) {
    encode(Opcode::Pong, data, out);
}

/// `WhoEntry IDENTITY SP SINCE-UNIX-MS SP udp|-`, then `SP NODE` on a node of a cluster.
pub fn who_entry(
    identity: &str,
    since_unix_ms: u64,
    udp: bool,
    node: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.push(Opcode::WhoEntry as u8);
    out.extend_from_slice(identity.as_bytes());
    out.push(SP);
    push_u64(out, since_unix_ms);
    out.push(SP);
    out.extend_from_slice(if udp { b"udp" } else { b"-" });
    if let Some(node) = node {
        out.push(SP);
        out.extend_from_slice(node.as_bytes());
    }
    out.push(NEWLINE);
}

/// A delivered Command (`FROM SP ID SP TEXT`) or Echo (`FROM SP TEXT`).
pub fn delivery(op: Opcode, from: &str, id: Option<u64>, text: &[u8], out: &mut Vec<u8>) {
    out.reserve(from.len() + text.len() + 24);
    out.push(op as u8);
    out.extend_from_slice(from.as_bytes());
    out.push(SP);
    if let Some(id) = id {
        push_u64(out, id);
        out.push(SP);
    }
    out.extend_from_slice(text);
    out.push(NEWLINE);
}

/// A forwarded CommandResponse: `ID SP RESPONDER SP TEXT`, the id as the responder wrote it.
pub fn response(id_text: &[u8], from: &str, text: &[u8], out: &mut Vec<u8>) {
    encode_parts(
        Opcode::CommandResponse,
        &[id_text, b" ", from.as_bytes(), b" ", text],
        out,
    );
}

/// Appends `v` in decimal, without a temporary string.
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Splits at the first space.
pub fn split_sp(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = memchr::memchr(SP, data)?;
    Some((&data[..i], &data[i + 1..]))
}

/// A decimal number of ASCII digits only.
pub fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |acc, &c| {
        if !c.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// Ack data: `(ID, COUNT)`.
pub fn parse_ack(data: &[u8]) -> Option<(u64, u64)> {
    let (id, count) = split_sp(data)?;
    Some((parse_u64(id)?, parse_u64(count)?))
}

/// WhoEntry data: `(IDENTITY, SINCE-UNIX-MS, UDP, NODE)` (identities hold no space; NODE
/// only from a node of a cluster).
pub fn parse_who_entry(data: &[u8]) -> Option<WhoFields<'_>> {
    let (identity, rest) = split_sp(data)?;
    let (since, rest) = split_sp(rest)?;
    let (udp, node) = match split_sp(rest) {
        Some((udp, node)) if !node.is_empty() && !node.contains(&SP) => (udp, Some(node)),
        Some(_) => return None,
        None => (rest, None),
    };
    let udp = match udp {
        b"udp" => true,
        b"-" => false,
        _ => return None,
    };
    Some((identity, parse_u64(since)?, udp, node))
}

/// A WhoEntry's fields: identity, since (Unix ms), UDP bound, and the node on a cluster.
pub type WhoFields<'a> = (&'a [u8], u64, bool, Option<&'a [u8]>);

/// A routed frame as it reaches a shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered<'a> {
    /// A Command: answer with its id.
    Command {
        /// The sender.
        from: &'a [u8],
        /// The correlation id.
        id: u64,
        /// The text.
        text: &'a [u8],
    },
    /// An Echo.
    Echo {
        /// The sender.
        from: &'a [u8],
        /// The text.
        text: &'a [u8],
    },
    /// An answer to a Command this shim sent.
    Response {
        /// The id of the Command answered.
        id: u64,
        /// The responder.
        from: &'a [u8],
        /// The text.
        text: &'a [u8],
    },
}

/// Parses a delivered Command, Echo or CommandResponse.
pub fn parse_delivery(op: Opcode, data: &[u8]) -> Option<Delivered<'_>> {
    match op {
        Opcode::Command => {
            let (from, rest) = split_sp(data)?;
            let (id, text) = split_sp(rest)?;
            Some(Delivered::Command {
                from,
                id: parse_u64(id)?,
                text,
            })
        }
        Opcode::Echo => {
            let (from, text) = split_sp(data)?;
            Some(Delivered::Echo { from, text })
        }
        Opcode::CommandResponse => {
            let (id, rest) = split_sp(data)?;
            let (from, text) = split_sp(rest)?;
            Some(Delivered::Response {
                id: parse_u64(id)?,
                from,
                text,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoders_and_parsers_agree() {
        let mut v = Vec::new();
        ack(1048576, 3, &mut v);
        assert_eq!(v, b"\x0c1048576 3\n");
        assert_eq!(parse_ack(&v[1..v.len() - 1]), Some((1048576, 3)));
        v.clear();
        who_entry("peq.a.bob", 1700000000000, true, None, &mut v);
        assert_eq!(
            parse_who_entry(&v[1..v.len() - 1]),
            Some((&b"peq.a.bob"[..], 1700000000000, true, None))
        );
        v.clear();
        who_entry("peq.a.bob", 1700000000000, false, Some("eu-1"), &mut v);
        assert_eq!(v, b"\x0epeq.a.bob 1700000000000 - eu-1\n");
        assert_eq!(
            parse_who_entry(&v[1..v.len() - 1]),
            Some((&b"peq.a.bob"[..], 1700000000000, false, Some(&b"eu-1"[..])))
        );
        v.clear();
        delivery(Opcode::Command, "peq.a.bob", Some(7), b"/sit", &mut v);
        assert_eq!(v, b"\x04peq.a.bob 7 /sit\n");
        assert_eq!(
            parse_delivery(Opcode::Command, &v[1..v.len() - 1]),
            Some(Delivered::Command {
                from: b"peq.a.bob",
                id: 7,
                text: b"/sit"
            })
        );
        v.clear();
        response(b"7", "peq.a.al", b"ok", &mut v);
        assert_eq!(v, b"\x057 peq.a.al ok\n");
        assert_eq!(parse_u64(b"+1"), None);
    }
}

#[cfg(test)]
mod terms_tests {
    use super::*;

    #[test]
    fn terms_round_trip_and_unknown_keys_are_skipped() {
        let t = Terms {
            idle_timeout_ms: 30_000,
            ping_ms: 10_000,
            max_frame: 16_384,
            outbound_limit: 4 << 20,
            answer_window: 1024,
            features: vec!["state".into(), "filters".into(), "udp".into()],
        };
        let mut f = Vec::new();
        terms(&t, &mut f);
        assert_eq!(
            f,
            b"\x15idle_timeout_ms=30000\x1fping_ms=10000\x1fmax_frame=16384\x1f\
              outbound_limit=4194304\x1fanswer_window=1024\x1ffeatures=state,filters,udp\n"
        );
        assert_eq!(parse_terms(&f[1..f.len() - 1]), Some(t.clone()));
        let later = b"idle_timeout_ms=5000\x1fnew_key=x y\x1fping_ms=1666";
        let p = parse_terms(later).unwrap();
        assert_eq!((p.idle_timeout_ms, p.ping_ms, p.max_frame), (5000, 1666, 0));
        assert_eq!(parse_terms(b"ping_ms=soon"), None);
    }
}
