//! The wire, with no state: what the server, the client library and the tests share.
//!
//! Every frame on the wire is `| 1 byte opcode | data | 0x0A |`. Data never contains
//! 0x0A; text that needs a line break carries 0x0B instead (see [`request::push_text`]).
//! The server passes data bytes through unchanged.
//!
//! This file holds the opcodes, the frame, the session token and the frame encoder;
//! [`codec`] splits bytes into frames, [`identity`] and [`pattern`] are the grammar of
//! names and targets, [`request`] parses a client frame once into a typed request,
//! [`reply`] encodes and parses every server frame, and [`reject`] is every refusal with
//! its wire text and metric.

pub mod cluster;
pub mod codec;
pub mod identity;
pub mod pattern;
pub mod reject;
pub mod reply;
pub mod request;
pub mod sealed;
pub mod state;
pub mod target;

use std::fmt;

/// The frame terminator.
pub const NEWLINE: u8 = 0x0A;
/// The byte that stands for a newline inside text data.
pub const ALT_NEWLINE: u8 = 0x0B;
/// The separator between fields inside routed frames.
pub const SP: u8 = b' ';
/// A carriage return: dropped when it stands right before the 0x0A that ends a frame.
pub const CR: u8 = 0x0D;
/// The Quit frame.
pub const QUIT: [u8; 2] = [Opcode::Quit as u8, NEWLINE];

/// Every opcode the protocol defines. 0x0A and 0x0B are never opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Ignored by the server; usable as a keep-alive.
    None = 0x00,
    /// Client -> server (TCP): register or rename with an identity label.
    Identify = 0x01,
    /// Server -> client (TCP): the session token; client -> server (UDP): bind.
    Session = 0x02,
    /// Either direction: the session is over.
    Quit = 0x03,
    /// Client -> server: `target SP command`; server -> target: `sender SP id SP command`.
    Command = 0x04,
    /// Target -> server: `id SP response`; server -> sender: `id SP responder SP response`.
    CommandResponse = 0x05,
    /// Either direction: answered with Pong carrying the same data.
    Ping = 0x06,
    /// The answer to Ping.
    Pong = 0x07,
    /// Client -> server: `target SP text`; server -> target: `sender SP text`.
    Echo = 0x08,
    /// Server -> client: a short human-readable reason.
    Error = 0x09,
    /// Server -> client: `id SP count`, how many shims a Command, Echo or Who reached.
    Ack = 0x0C,
    /// Client -> server (TCP): list connected shims, optionally filtered by a pattern.
    Who = 0x0D,
    /// Server -> client: one connected shim, `identity SP since-ms SP udp|-`.
    WhoEntry = 0x0E,
    /// Client -> server (TCP): the shared secret, before Identify, when the server has one.
    Auth = 0x0F,
    /// Client -> server: set or delete keys of the shim's own state (`proto/state.rs`);
    /// server -> client: a State frame, a watched shim's state or what changed in it.
    Set = 0x10,
    /// Client -> server (TCP): watch the state of the shims a pattern names.
    Subscribe = 0x11,
    /// Client -> server (TCP): end a subscription.
    Unsubscribe = 0x12,
    /// Client -> server (TCP): read the state of the shims a pattern names, once.
    Get = 0x13,
    /// Server -> client (TCP): a watched shim joined or left.
    Presence = 0x14,
    /// Server -> client (TCP): the settings a shim must follow, right after Session.
    Terms = 0x15,
}

impl Opcode {
    /// Maps a wire byte to an opcode; `None` for bytes the protocol does not define.
    pub fn from_byte(b: u8) -> Option<Opcode> {
        Some(match b {
            0x00 => Opcode::None,
            0x01 => Opcode::Identify,
            0x02 => Opcode::Session,
            0x03 => Opcode::Quit,
            0x04 => Opcode::Command,
            0x05 => Opcode::CommandResponse,
            0x06 => Opcode::Ping,
            0x07 => Opcode::Pong,
            0x08 => Opcode::Echo,
            0x09 => Opcode::Error,
            0x0C => Opcode::Ack,
            0x0D => Opcode::Who,
            0x0E => Opcode::WhoEntry,
            0x0F => Opcode::Auth,
            0x10 => Opcode::Set,
            0x11 => Opcode::Subscribe,
            0x12 => Opcode::Unsubscribe,
            0x13 => Opcode::Get,
            0x14 => Opcode::Presence,
            0x15 => Opcode::Terms,
            _ => return None,
        })
    }

    /// The name used in documentation and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Opcode::None => "None",
            Opcode::Identify => "Identify",
            Opcode::Session => "Session",
            Opcode::Quit => "Quit",
            Opcode::Command => "Command",
            Opcode::CommandResponse => "CommandResponse",
            Opcode::Ping => "Ping",
            Opcode::Pong => "Pong",
            Opcode::Echo => "Echo",
            Opcode::Error => "Error",
            Opcode::Ack => "Ack",
            Opcode::Who => "Who",
            Opcode::WhoEntry => "WhoEntry",
            Opcode::Auth => "Auth",
            Opcode::Set => "Set",
            Opcode::Subscribe => "Subscribe",
            Opcode::Unsubscribe => "Unsubscribe",
            Opcode::Get => "Get",
            Opcode::Presence => "Presence",
            Opcode::Terms => "Terms",
        }
    }
}

/// One decoded frame, borrowing its data from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The raw opcode byte (kept raw so that unknown opcodes can be reported).
    pub op: u8,
    /// The bytes between the opcode and the terminating 0x0A.
    pub data: &'a [u8],
}

impl Frame<'_> {
    /// The frame's opcode, if the protocol defines it.
    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_byte(self.op)
    }
}

/// Appends one frame to `out`.
///
/// The caller guarantees `data` holds no 0x0A (every producer in this crate either passes
/// through data that arrived inside a frame, or writes ASCII it built itself).
#[inline]
pub fn encode(op: Opcode, data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(!data.contains(&NEWLINE), "frame data must not contain 0x0A");
    out.reserve(data.len() + 2);
    out.push(op as u8);
    out.extend_from_slice(data);
    out.push(NEWLINE);
}

/// Appends one frame whose data is the concatenation of `parts`.
#[inline]
pub fn encode_parts(op: Opcode, parts: &[&[u8]], out: &mut Vec<u8>) {
    out.push(op as u8);
    for p in parts {
        debug_assert!(!p.contains(&NEWLINE), "frame data must not contain 0x0A");
        out.extend_from_slice(p);
    }
    out.push(NEWLINE);
}

/// Returns one encoded frame as a fresh vector.
pub fn encoded(op: Opcode, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 2);
    encode(op, data, &mut v);
    v
}

/// A session token: 16 random bytes (a UUID v4), none of which is 0x0A or 0x0B.
///
/// The token is sent raw inside a newline-terminated frame, so a byte equal to 0x0A would
/// end the frame early and a 0x0B would be read as an escaped newline; about one random
/// UUID in ten holds such a byte, so the generator draws again until none does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; 16]);

impl Token {
    /// Draws a fresh token: a UUID v4 from the thread's CSPRNG (ChaCha, seeded and
    /// periodically reseeded from the operating system), which costs no system call per
    /// handshake.
    pub fn generate() -> Token {
        use rand::RngCore;
        let mut rng = rand::rng();
        loop {
            let mut random = [0u8; 16];
            rng.fill_bytes(&mut random);
            let bytes = *uuid::Builder::from_random_bytes(random)
                .into_uuid()
                .as_bytes();
            if Token::is_frame_safe(&bytes) {
                return Token(bytes);
            }
        }
    }

    /// True when no byte of `bytes` is 0x0A, 0x0B or 0x0D: a token survives any framing a
    /// client may read it with, a line reader that strips CRLF included.
    pub fn is_frame_safe(bytes: &[u8]) -> bool {
        !bytes
            .iter()
            .any(|&b| b == NEWLINE || b == ALT_NEWLINE || b == CR)
    }

    /// Reads a token from exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Token> {
        <[u8; 16]>::try_from(bytes).ok().map(Token)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a prefix: enough to correlate log lines, not enough to replay a bind.
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip_and_skip_newline_bytes() {
        for b in 0..=255u8 {
            if let Some(op) = Opcode::from_byte(b) {
                assert_eq!(op as u8, b);
            }
        }
        assert!(Opcode::from_byte(0x0A).is_none());
        assert!(Opcode::from_byte(0x0B).is_none());
    }

    #[test]
    fn tokens_never_hold_framing_bytes() {
        for _ in 0..10_000 {
            let t = Token::generate();
            assert!(Token::is_frame_safe(&t.0));
            assert_eq!(t.0[6] >> 4, 4, "UUID version 4");
        }
    }

    #[test]
    fn encode_writes_opcode_data_newline() {
        assert_eq!(encoded(Opcode::Ping, b"hi"), vec![0x06, b'h', b'i', 0x0A]);
        assert_eq!(encoded(Opcode::Quit, b""), vec![0x03, 0x0A]);
    }
}
