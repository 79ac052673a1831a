//! A client frame, parsed once into a typed request; and the encoders a client writes
//! requests with.
//!
//! The server parses each frame exactly once ([`Request::parse`]) and every later step
//! works on the typed value; the client library encodes with [`encode_routed`] and
//! [`encode_response`], so both sides agree on one grammar.

use super::identity::check_identity;
use super::reject::{Reject, Shape};
use super::state::{QueryError, SetError, SetItem, Subscribe, parse_get, parse_set, parse_sid};
use super::target::Target;
use super::{ALT_NEWLINE, NEWLINE, Opcode, SP, Token};

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// 0x00: nothing (a keep-alive).
    Nothing,
    /// 0x01: register, or rename, as this identity.
    Identify(&'a str),
    /// 0x02 over UDP: bind this UDP source to the session with this token (`None`: the
    /// data is not 16 bytes, so no session has it).
    Bind(Option<Token>),
    /// 0x03: the session is over.
    Quit,
    /// 0x04 or 0x08: deliver `text` to every shim `target` names.
    Route(Routed<'a>),
    /// 0x05: an answer to the Command with this id.
    Respond {
        /// The correlation id.
        id: u64,
        /// The id as written (echoed back unchanged).
        id_text: &'a [u8],
        /// The answer, passed through.
        text: &'a [u8],
    },
    /// 0x06: answer with a Pong carrying the same data.
    Ping(&'a [u8]),
    /// 0x07: a shim's answer to a server Ping; nothing to do.
    Pong,
    /// 0x0D: list the shims a target names.
    Who(Target),
    /// 0x0F: the shared secret.
    Auth(&'a [u8]),
    /// 0x10: set or delete keys of the sender's own state.
    Set(Vec<SetItem<'a>>),
    /// 0x11: watch the state of the shims a pattern names.
    Subscribe(Subscribe<'a>),
    /// 0x12: end the subscription with this id.
    Unsubscribe(u32),
    /// 0x13: read the state of the shims a target names (these keys; none: all).
    Get {
        /// Whose state.
        target: Target,
        /// The keys wanted.
        keys: Vec<&'a str>,
    },
}

/// A Command or an Echo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed<'a> {
    /// Command (answered, with an id) or Echo.
    pub op: Opcode,
    /// Who it is for.
    pub target: Target,
    /// The raw target, for messages.
    pub target_text: &'a [u8],
    /// The text, passed through.
    pub text: &'a [u8],
}

/// Whether a frame with this opcode may come before the first Identify.
pub fn allowed_before_identify(op: Opcode) -> bool {
    matches!(
        op,
        Opcode::None | Opcode::Identify | Opcode::Quit | Opcode::Ping | Opcode::Auth
    )
}

impl<'a> Request<'a> {
    /// Parses the data of a frame with opcode `op`. Over TCP a Session frame is not a
    /// request (the server sends it); over UDP it is a bind.
    pub fn parse(op: Opcode, data: &'a [u8]) -> Result<Request<'a>, Reject> {
        Ok(match op {
            Opcode::None => Request::Nothing,
            Opcode::Identify => {
                Request::Identify(check_identity(data).map_err(Reject::BadIdentity)?)
            }
            Opcode::Session => Request::Bind(Token::from_slice(data)),
            Opcode::Quit => Request::Quit,
            Opcode::Command | Opcode::Echo => {
                let sp = memchr::memchr(SP, data).ok_or(Reject::Malformed(Shape::TargetText))?;
                let (target_text, text) = (&data[..sp], &data[sp + 1..]);
                let target = Target::parse(target_text)
                    .map_err(|e| Reject::BadTarget(lossy(target_text), e))?;
                Request::Route(Routed {
                    op,
                    target,
                    target_text,
                    text,
                })
            }
            Opcode::CommandResponse => {
                let (id_text, text) = match memchr::memchr(SP, data) {
                    Some(sp) => (&data[..sp], &data[sp + 1..]),
                    None => (data, &b""[..]),
                };
                // A canonical decimal only: ASCII digits, no sign, no space, no leading zero
                // (so one Command has exactly one spelling, the one the hub wrote).
                let id = parse_canonical_id(id_text).ok_or(Reject::Malformed(Shape::IdResponse))?;
                Request::Respond { id, id_text, text }
            }
            Opcode::Ping => Request::Ping(data),
            Opcode::Pong => Request::Pong,
            Opcode::Who if data.is_empty() => Request::Who(Target::all()),
            Opcode::Who => {
                Request::Who(Target::parse(data).map_err(|e| Reject::BadPattern(lossy(data), e))?)
            }
            Opcode::Auth => Request::Auth(data),
            Opcode::Set => Request::Set(parse_set(data).map_err(|e| match e {
                SetError::Shape => Reject::SetMalformed,
                SetError::Key(k, e) => Reject::SetBadKey(k, e),
            })?),
            Opcode::Subscribe => Request::Subscribe(Subscribe::parse(data).map_err(query)?),
            Opcode::Unsubscribe => Request::Unsubscribe(
                parse_sid(data).ok_or_else(|| Reject::NoSubscription(lossy(data)))?,
            ),
            Opcode::Get => {
                let (target, _, keys) = parse_get(data).map_err(query)?;
                Request::Get { target, keys }
            }
            Opcode::Error | Opcode::Ack | Opcode::WhoEntry | Opcode::Presence | Opcode::Terms => {
                return Err(Reject::ServerOnly(op));
            }
        })
    }
}

/// The refusal of a Subscribe or Get by its shape.
fn query(e: QueryError) -> Reject {
    match e {
        QueryError::Shape => Reject::Malformed(Shape::Subscribe),
        QueryError::Sid(s) => Reject::BadSid(s),
        QueryError::Interval(s) => Reject::BadInterval(s),
        QueryError::Pattern(p, e) => Reject::BadPattern(p, e),
        QueryError::Key(k, e) => Reject::BadKey(k, e),
    }
}

/// A correlation id as the hub writes it: decimal digits with no leading zero, in range.
pub fn parse_canonical_id(text: &[u8]) -> Option<u64> {
    if text.len() > 1 && text[0] == b'0' {
        return None;
    }
    super::reply::parse_u64(text)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Appends `text` with each `\n` written as 0x0B (no allocation: fixed up in place).
pub fn push_text(out: &mut Vec<u8>, text: &str) {
    let start = out.len();
    out.extend_from_slice(text.as_bytes());
    let mut i = start;
    while let Some(p) = memchr::memchr(NEWLINE, &out[i..]) {
        out[i + p] = ALT_NEWLINE;
        i += p + 1;
    }
}

/// `op TARGET SP TEXT`: a Command or an Echo.
pub fn encode_routed(op: Opcode, target: &str, text: &str, out: &mut Vec<u8>) {
    out.reserve(target.len() + text.len() + 3);
    out.push(op as u8);
    out.extend_from_slice(target.as_bytes());
    out.push(SP);
    push_text(out, text);
    out.push(NEWLINE);
}

/// `CommandResponse ID SP TEXT`.
pub fn encode_response(id: u64, text: &str, out: &mut Vec<u8>) {
    out.reserve(text.len() + 23);
    out.push(Opcode::CommandResponse as u8);
    super::reply::push_u64(out, id);
    out.push(SP);
    push_text(out, text);
    out.push(NEWLINE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_request_once() {
        let r = Request::parse(Opcode::Command, b"peq.* /sit down").unwrap();
        let Request::Route(Routed { target, text, .. }) = r else {
            panic!("{r:?}")
        };
        assert_eq!((target.pattern.segs.len(), text), (2, &b"/sit down"[..]));
        assert_eq!(
            Request::parse(Opcode::Echo, b"nospace"),
            Err(Reject::Malformed(Shape::TargetText))
        );
        let r = Request::parse(Opcode::CommandResponse, b"1048576 ok").unwrap();
        assert!(matches!(r, Request::Respond { id: 1048576, .. }));
        assert!(Request::parse(Opcode::CommandResponse, b"x ok").is_err());
        assert!(Request::parse(Opcode::CommandResponse, b"+1048576 ok").is_err());
        assert!(Request::parse(Opcode::CommandResponse, b"0001048576 ok").is_err());
        assert!(Request::parse(Opcode::CommandResponse, b"18446744073709551616 ok").is_err());
        assert!(Request::parse(Opcode::CommandResponse, b" 1 ok").is_err());
        assert!(Request::parse(Opcode::CommandResponse, b"0 ok").is_ok());
        assert_eq!(
            Request::parse(Opcode::Who, b"").unwrap(),
            Request::Who(Target::all())
        );
        assert_eq!(
            Request::parse(Opcode::Ack, b"0 1"),
            Err(Reject::ServerOnly(Opcode::Ack))
        );
        assert!(matches!(
            Request::parse(Opcode::Identify, b"a b"),
            Err(Reject::BadIdentity(_))
        ));
    }

    #[test]
    fn routed_frames_escape_newlines() {
        let mut v = Vec::new();
        encode_routed(Opcode::Echo, "a.b", "one\ntwo", &mut v);
        assert_eq!(v, b"\x08a.b one\x0btwo\n");
        v.clear();
        encode_response(42, "x\ny", &mut v);
        assert_eq!(v, b"\x0542 x\x0by\n");
    }
}
