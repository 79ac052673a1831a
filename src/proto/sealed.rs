//! Sealed UDP: the datagram format of a TLS session's UDP channel.
//!
//! A TLS session gives both ends the same secret through the TLS 1.3 exporter (RFC 8446
//! section 7.5, RFC 5705): [`EXPORTER_LEN`] bytes exported with the label
//! [`EXPORTER_LABEL`] and no context. They split into a session id and one
//! ChaCha20-Poly1305 key (RFC 8439) per direction ([`Keys::from_exporter`]). Every datagram
//! of the session is then
//!
//! ```text
//! 0xA5 | session id (8) | counter (8, big endian) | ciphertext of the frame | tag (16)
//! ```
//!
//! sealed with the sender's key under the nonce `00 00 00 00 || counter`, the 17 header
//! bytes as associated data. The frame inside is exactly what a plain datagram carries.
//! Each sender counts from 0 and never reuses a counter; the receiver drops a datagram
//! whose counter it has seen or that is too far behind the highest it has seen
//! ([`ReplayWindow`], RFC 6479, as WireGuard does). A sealed datagram is found by its
//! session id, never by its source address: the address it came from is only where the
//! answers go, so NAT rebinding needs no new bind, and a forged source gains nothing.
//!
//! The checks run cheapest first: length and marker, the session id, the counter against
//! the window, and only then the decryption.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use thiserror::Error;

/// The exporter label both ends use.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-velium-udp-v1";
/// Exported bytes: session id (8), client-to-hub key (32), hub-to-client key (32).
pub const EXPORTER_LEN: usize = 72;
/// The first byte of a sealed datagram (no opcode has it).
pub const MARKER: u8 = 0xA5;
/// Bytes before the ciphertext: marker, session id, counter.
pub const HEADER_LEN: usize = 17;
/// The authentication tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// The smallest sealed datagram: a header and a tag around an empty frame.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Counters behind the highest one seen that are still accepted (once each).
pub const WINDOW: u64 = 2048 - 64;

/// Why a sealed datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum SealError {
    /// Shorter than [`OVERHEAD`], or not starting with [`MARKER`].
    #[error("truncated")]
    Truncated,
    /// No live session has this id.
    #[error("unknown session")]
    UnknownSession,
    /// The counter was seen already or is behind the window.
    #[error("replayed")]
    Replayed,
    /// The tag does not match: altered, or sealed with another key.
    #[error("altered")]
    Altered,
}

impl SealError {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [SealError; 4] = [
        SealError::Truncated,
        SealError::UnknownSession,
        SealError::Replayed,
        SealError::Altered,
    ];

    /// The `reason` label of `velium_sealed_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            SealError::Truncated => "truncated",
            SealError::UnknownSession => "unknown_session",
            SealError::Replayed => "replayed",
            SealError::Altered => "altered",
        }
    }
}

/// A sealed datagram's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The session.
    pub session: u64,
    /// The sender's counter.
    pub counter: u64,
}

/// Reads the header of a sealed datagram: the first, cheapest check.
pub fn header(dgram: &[u8]) -> Result<Header, SealError> {
    if dgram.len() < OVERHEAD || dgram[0] != MARKER {
        return Err(SealError::Truncated);
    }
    Ok(Header {
        session: u64::from_be_bytes(dgram[1..9].try_into().unwrap()),
        counter: u64::from_be_bytes(dgram[9..17].try_into().unwrap()),
    })
}

/// One direction's key.
pub struct Key(LessSafeKey);

impl Key {
    /// The key made of 32 `bytes`.
    pub fn new(bytes: &[u8; 32]) -> Key {
        Key(LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("32 bytes is the key length"),
        ))
    }

    /// Appends to `out` the sealed datagram carrying `frame` as number `counter` of
    /// `session`.
    pub fn seal(&self, session: u64, counter: u64, frame: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(OVERHEAD + frame.len());
        out.push(MARKER);
        out.extend_from_slice(&session.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(frame);
        let (head, body) = out[start..].split_at_mut(HEADER_LEN);
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&*head), body)
            .expect("a datagram is far below the AEAD's limit");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a sealed datagram in place (its header read by [`header`]); returns the
    /// frame inside.
    pub fn open<'a>(&self, dgram: &'a mut [u8]) -> Result<&'a [u8], SealError> {
        let h = header(dgram)?;
        let (head, body) = dgram.split_at_mut(HEADER_LEN);
        let plain = self
            .0
            .open_in_place(nonce(h.counter), Aad::from(&*head), body)
            .map_err(|_| SealError::Altered)?;
        Ok(plain)
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A session's two keys and its id, derived from the TLS exporter.
pub struct Keys {
    /// The session id every datagram carries.
    pub session: u64,
    /// Seals what the client sends (the hub opens with it).
    pub client: Key,
    /// Seals what the hub sends (the client opens with it).
    pub hub: Key,
}

impl Keys {
    /// Splits the exporter output: bytes 0..8 the session id (big endian), 8..40 the
    /// client-to-hub key, 40..72 the hub-to-client key.
    pub fn from_exporter(x: &[u8; EXPORTER_LEN]) -> Keys {
        Keys {
            session: u64::from_be_bytes(x[..8].try_into().unwrap()),
            client: Key::new(x[8..40].try_into().unwrap()),
            hub: Key::new(x[40..72].try_into().unwrap()),
        }
    }
}

/// The counters a receiver has accepted: a datagram passes once, and only when it is
/// ahead of the highest counter seen or at most [`WINDOW`] behind it (RFC 6479's bitmap,
/// in 64-bit blocks).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Bit `c % BITS` is set when counter `c` (within the window) was accepted.
    bits: [u64; BLOCKS],
    /// The highest counter accepted, plus one (0: none yet).
    next: u64,
}

const BLOCKS: usize = 32;
const BITS: u64 = BLOCKS as u64 * 64;

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            bits: [0; BLOCKS],
            next: 0,
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` may be accepted (checked before decrypting; nothing changes).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return counter != u64::MAX;
        }
        if self.next - 1 - counter > WINDOW {
            return false;
        }
        let bit = counter % BITS;
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) == 0
    }

    /// Records `counter` as accepted (after the datagram was authenticated); returns
    /// whether it is the highest seen (the datagram's source is then the newest address).
    pub fn accept(&mut self, counter: u64) -> bool {
        debug_assert!(self.check(counter));
        let newest = counter >= self.next;
        if newest {
            // Clear the blocks the window slides onto (they held counters now out of reach).
            if self.next > 0 {
                let from_block = (self.next - 1) / 64;
                let span = (counter / 64 - from_block).min(BLOCKS as u64);
                for i in 1..=span {
                    self.bits[((from_block + i) % BLOCKS as u64) as usize] = 0;
                }
            }
            self.next = counter + 1;
        }
        let bit = counter % BITS;
        self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn keys() -> Keys {
        let mut x = [0u8; EXPORTER_LEN];
        for (i, b) in x.iter_mut().enumerate() {
            *b = i as u8;
        }
        Keys::from_exporter(&x)
    }

    /// The test vector docs/protocol.md gives shim authors.
    #[test]
    fn test_vector() {
        let k = keys();
        assert_eq!(k.session, 0x0001020304050607);
        let mut d = Vec::new();
        k.client.seal(k.session, 1, b"\x06hi\n", &mut d);
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "a5000102030405060700000000000000016d6da17722ca0998568a04faed50e1e163e34e66"
        );
        let plain = k.client.open(&mut d).unwrap().to_vec();
        assert_eq!(plain, b"\x06hi\n");
        let mut d = Vec::new();
        k.hub.seal(k.session, 0, b"\x07hi\n", &mut d);
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "a5000102030405060700000000000000003da49e60cb48526f2cd44bf9ecedbf870c0e37ff"
        );
    }

    #[test]
    fn altered_truncated_and_wrong_key_fail() {
        let k = keys();
        let mut d = Vec::new();
        k.hub.seal(k.session, 7, b"\x07pong\n", &mut d);
        assert_eq!(header(&d[..OVERHEAD - 1]), Err(SealError::Truncated));
        let mut wrong = d.clone();
        assert_eq!(k.client.open(&mut wrong), Err(SealError::Altered));
        for i in 0..d.len() {
            let mut x = d.clone();
            x[i] ^= 0x40;
            assert!(k.hub.open(&mut x).is_err(), "byte {i} altered");
        }
        let mut short = d[..d.len() - 1].to_vec();
        assert_eq!(k.hub.open(&mut short), Err(SealError::Altered));
        assert_eq!(k.hub.open(&mut d).unwrap(), b"\x07pong\n");
    }

    #[test]
    fn window_accepts_once_and_within_reach() {
        let mut w = ReplayWindow::default();
        assert!(w.check(0));
        assert!(w.accept(0));
        assert!(!w.check(0));
        assert!(w.accept(5));
        assert!(w.check(3));
        assert!(!w.accept(3), "behind the highest");
        assert!(!w.check(3));
        assert!(w.accept(10_000));
        assert!(!w.check(5), "far behind");
        assert!(w.check(10_000 - WINDOW));
        assert!(!w.check(10_000 - WINDOW - 1));
        assert!(!w.check(u64::MAX));
    }

    proptest! {
        /// The window against a model: a set of accepted counters and the highest one.
        #[test]
        fn window_matches_model(steps in proptest::collection::vec((0u64..6000, any::<bool>()), 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = BTreeSet::new();
            let mut base = 0u64;
            for (delta, jump) in steps {
                let c = if jump { base + delta } else { base.saturating_sub(delta % 2100) };
                let max = seen.iter().next_back().copied();
                let expect = match max {
                    None => true,
                    Some(m) => !seen.contains(&c) && (c > m || m - c <= WINDOW),
                };
                prop_assert_eq!(w.check(c), expect, "counter {} max {:?}", c, max);
                if expect {
                    let newest = w.accept(c);
                    prop_assert_eq!(newest, max.is_none_or(|m| c > m));
                    seen.insert(c);
                    base = base.max(c);
                }
            }
        }
    }
}
