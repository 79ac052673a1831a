//! Fuzzes the connection state machine with the hub, UDP datagrams, timers, reloads and
//! shutdown, users and their Auth frames, renames and exclusive identities, and relay
//! state (Set over TCP and UDP, Subscribe, Unsubscribe, Get, the server's Presence from a
//! client), against the reference model in `tests/harness`.
//!
//! The input is read as a [`Scenario`] by [`Input`], one byte per choice (a byte past the
//! end reads as 0), so that every input is valid and small changes to it make small
//! changes to the scenario. The choices and their weights are those of the proptest
//! generators in `tests/state_machine.rs`. After every step the harness also checks what
//! holds whatever the model says: no two live identified shims hold one identity ignoring
//! ASCII case; every identified shim's identity keeps to the grammar; on a hub with
//! users, every identified shim's user may take its identity; every CommandResponse a
//! client is sent comes from a shim that was sent that Command; and each subscriber's copy
//! of the shims it watches, built from the State and Presence frames it reads, keeps to
//! the order rules and, once the harness settles, is the model's state of them.
#![no_main]

#[path = "../../tests/harness/mod.rs"]
mod harness;

use harness::{
    Body, DuplicateIdentity, Item, Piece, Scenario, Settings, Step, UserSpec, label, name,
};
use libfuzzer_sys::fuzz_target;

/// Steps in one scenario at most.
const MAX_STEPS: usize = 64;

/// A cursor over the fuzzer's bytes.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// A length byte (modulo `max + 1`) and that many bytes.
    fn bytes(&mut self, max: u8) -> Vec<u8> {
        let n = usize::from(self.byte() % (max + 1)).min(self.0.len());
        let (v, rest) = self.0.split_at(n);
        self.0 = rest;
        v.to_vec()
    }

    fn parts(&mut self) -> Vec<u8> {
        let n = 1 + self.byte() % 3;
        (0..n).map(|_| self.byte()).collect()
    }

    fn target(&mut self) -> Vec<u8> {
        let plus = self.byte().is_multiple_of(5);
        name(&self.parts(), plus)
    }

    /// A valid identity.
    fn label(&mut self) -> Vec<u8> {
        label(&self.parts())
    }

    /// What an Identify asks for: any name, a valid one, one of a user's identities, or
    /// any bytes (up to 70: past the 64 an identity may have).
    fn identity(&mut self) -> Body {
        match self.byte() % 4 {
            0 => Body::Name(self.target()),
            1 => Body::Name(self.label()),
            2 => Body::As {
                user: self.byte(),
                pick: self.byte(),
            },
            _ => Body::Name(self.bytes(70)),
        }
    }

    /// A target made from a held identity (`Body::At`), with a text or not.
    fn at(&mut self, text: bool) -> Body {
        Body::At {
            pick: self.byte(),
            how: self.byte(),
            text: text.then(|| self.text()),
        }
    }

    /// A pattern of a user's settings: most often of valid segments.
    fn pattern(&mut self) -> Vec<u8> {
        let with = |mut v: Vec<u8>, tail: &[u8]| {
            v.extend_from_slice(tail);
            v
        };
        match self.byte() % 6 {
            0 => self.target(),
            1 => b">".to_vec(),
            2 => with(self.label(), b".>"),
            3 => with(self.label(), b".*"),
            4 => self.label(),
            _ => with(b"*.".to_vec(), &self.label()),
        }
    }

    fn patterns(&mut self, n: u8) -> Vec<Vec<u8>> {
        (0..n).map(|_| self.pattern()).collect()
    }

    /// A list the configuration may leave out (`None`: its default).
    fn optional(&mut self) -> Option<Vec<Vec<u8>>> {
        let b = self.byte();
        b.is_multiple_of(3).then(|| self.patterns(b / 3 % 3))
    }

    fn user(&mut self) -> UserSpec {
        // Read in this order (a struct literal's fields are read as written).
        let name = self.byte();
        let secret = self.byte();
        let n = 1 + self.byte() % 2;
        let identities = self.patterns(n);
        let n = self.byte() % 3;
        let commands = self.patterns(n);
        let echoes = self.optional();
        let who = self.optional();
        UserSpec {
            name,
            secret,
            identities,
            commands,
            echoes,
            who,
            state: self.optional(),
        }
    }

    /// Keys of `harness::KEYS` (an index byte; most are valid).
    fn keys(&mut self) -> Vec<u8> {
        let n = self.byte() % 4;
        (0..n).map(|_| self.byte()).collect()
    }

    /// A Set's items: up to three, each a key set (to up to 10 bytes) or deleted; none
    /// is a Set with no data.
    fn set(&mut self) -> Body {
        let n = self.byte() % 4;
        Body::Set(
            (0..n)
                .map(|_| Item {
                    key: self.byte(),
                    value: (!self.byte().is_multiple_of(5)).then(|| self.bytes(10)),
                })
                .collect(),
        )
    }

    fn subscribe(&mut self) -> Body {
        Body::Subscribe {
            sid: self.byte(),
            interval: self.byte(),
            pick: self.byte(),
            how: self.byte(),
            keys: self.keys(),
        }
    }

    fn text(&mut self) -> Vec<u8> {
        self.bytes(12)
    }

    fn frame(&mut self) -> Piece {
        // One byte picks the kind (modulo 29) and, in its top values, a CRLF line end.
        let kind = self.byte();
        let crlf = kind >= 231;
        let (op, body) = match kind % 29 {
            0..=3 => (0x01, self.identity()),
            4..=8 => {
                let op = if self.flag() { 0x04 } else { 0x08 };
                if self.flag() {
                    (op, self.at(true))
                } else {
                    let target = self.target();
                    (
                        op,
                        Body::Routed {
                            target,
                            text: self.text(),
                        },
                    )
                }
            }
            9..=11 => (
                0x05,
                Body::Response {
                    pick: self.byte(),
                    form: self.byte(),
                    text: self.text(),
                },
            ),
            12..=13 => (
                0x0D,
                match self.byte() % 3 {
                    0 => Body::Name(self.target()),
                    1 => Body::Name(Vec::new()),
                    _ => self.at(false),
                },
            ),
            14..=15 => (0x06, Body::Bytes(self.text())),
            16..=17 => (
                0x0F,
                Body::Auth {
                    user: self.byte(),
                    key: self.byte(),
                },
            ),
            18..=19 => (0x02, Body::Token(self.byte())),
            20..=22 => {
                // 0x00 to 0x15: Presence (0x14) is the server's, 0x15 is no opcode.
                let op = if self.flag() {
                    self.byte() % 0x16
                } else {
                    self.byte()
                };
                (op, Body::Bytes(self.bytes(20)))
            }
            23..=25 => (0x10, self.set()),
            26 => (0x11, self.subscribe()),
            27 => (0x12, Body::Unsubscribe(self.byte())),
            _ => (
                0x13,
                Body::Get {
                    pick: self.byte(),
                    how: self.byte(),
                    keys: self.keys(),
                },
            ),
        };
        Piece::Frame { op, body, crlf }
    }

    fn piece(&mut self) -> Piece {
        if self.byte().is_multiple_of(5) {
            Piece::Raw(self.bytes(200))
        } else {
            self.frame()
        }
    }

    fn settings(&mut self) -> Settings {
        // Read in this order (a struct literal's fields are read as written).
        let max_frame = 20 + usize::from(self.byte()) % 77;
        let identify_ms = 10 + u64::from(self.u16()) % 2991;
        let idle_ms = 10 + u64::from(self.u16()) % 4991;
        let outbound_limit = 1024 + usize::from(self.u16()) % 513;
        let udp_quit_per_sec = u32::from(self.byte() % 5);
        let max_connections = usize::from(self.byte() % 9);
        let per_source = usize::from(self.byte() % 4);
        let connect_rate = u32::from(self.byte() % 6);
        // One byte: the secret (modulo 4) and, above it, the write deadline (0, as in
        // inputs written before it existed, keeps the default 10 s).
        let secret = self.byte();
        // One byte: whether there are users (modulo 4) and, above it, the per-shim rates
        // (0 lifts them).
        let users_byte = self.byte();
        let users = if users_byte.is_multiple_of(4) {
            (0..1 + self.byte() % 3).map(|_| self.user()).collect()
        } else {
            Vec::new()
        };
        // One byte: `duplicate_identity` (modulo 3; 0 the default) and the answer window
        // (0 the default 256).
        let access = self.byte();
        // One byte: the relay state limits (value bytes, keys, bytes of state,
        // subscriptions); one more: the Set rate (most often lifted).
        let state = self.byte();
        let sets = self.byte();
        Settings {
            max_frame,
            identify_ms,
            idle_ms,
            outbound_limit,
            write_deadline_ms: [10_000, 50, 500, 3000][usize::from(secret / 4 % 4)],
            udp_quit_per_sec,
            max_connections,
            per_source,
            connect_rate,
            routed_per_sec: [0, 3, 0, 6][usize::from(users_byte / 4 % 4)],
            deliveries_per_sec: [0, 0, 4, 10][usize::from(users_byte / 16 % 4)],
            who_per_sec: [0, 1, 0, 2][usize::from(users_byte / 64)],
            secret: secret.is_multiple_of(4),
            users,
            duplicate: [
                DuplicateIdentity::SameCredential,
                DuplicateIdentity::Replace,
                DuplicateIdentity::Refuse,
            ][usize::from(access % 3)],
            answer_window: [256, 1, 2, 4][usize::from(access / 3 % 4)],
            state_value_bytes: [8, 1, 3, 10][usize::from(state % 4)],
            state_keys: [4, 1, 2, 6][usize::from(state / 4 % 4)],
            state_bytes: [40, 12, 24, 64][usize::from(state / 16 % 4)],
            state_subscriptions: [3, 1, 2, 4][usize::from(state / 64)],
            state_sets_per_sec: [0, 0, 2, 5][usize::from(sets % 4)],
        }
    }

    fn step(&mut self) -> Step {
        match self.byte() % 50 {
            0..=5 => Step::Connect {
                source: self.byte(),
                reads: !self.byte().is_multiple_of(5),
            },
            6..=25 => {
                let conn = self.byte();
                let pieces = (0..1 + self.byte() % 3).map(|_| self.piece()).collect();
                Step::Tcp {
                    conn,
                    pieces,
                    split: self.u16(),
                }
            }
            26..=33 => {
                let source = self.byte();
                // One byte: several pieces or one frame (modulo 5) and, in its top values,
                // a datagram without its final 0x0A.
                let shape = self.byte();
                let pieces = if shape.is_multiple_of(5) {
                    (0..self.byte() % 3).map(|_| self.piece()).collect()
                } else {
                    vec![self.frame()]
                };
                Step::Udp {
                    source,
                    pieces,
                    newline: shape < 205,
                }
            }
            34..=36 => Step::Read { conn: self.byte() },
            37..=38 => Step::Eof { conn: self.byte() },
            39..=43 => {
                let ms = if self.flag() {
                    self.u16() % 50
                } else {
                    self.u16() % 6000
                };
                // Odd bytes sweep: 1 (so 0x01, a plain "sweep") twice, enough for a timer
                // to fire, 3 once; even bytes not at all.
                let sweeps = [0, 2, 0, 1][usize::from(self.byte() % 4)];
                Step::Advance { ms, sweeps }
            }
            44 => Step::Reload(self.settings()),
            45 => Step::Shutdown,
            48..=49 => Step::Settle,
            // A client that connects and at once says Auth and Identify: most often the
            // credential the hub wants and an identity its user may take.
            46..=47 => {
                let source = self.byte();
                let reads = !self.byte().is_multiple_of(5);
                let user = self.byte();
                let key = self.byte();
                let name = if self.flag() {
                    Body::As {
                        user,
                        pick: self.byte(),
                    }
                } else {
                    Body::Name(self.label())
                };
                let frame = |op, body| Piece::Frame {
                    op,
                    body,
                    crlf: false,
                };
                Step::Join {
                    source,
                    reads,
                    pieces: vec![frame(0x0F, Body::Auth { user, key }), frame(0x01, name)],
                }
            }
            _ => unreachable!("modulo 50"),
        }
    }

    fn scenario(&mut self) -> Scenario {
        let settings = self.settings();
        let mut steps = Vec::new();
        while !self.0.is_empty() && steps.len() < MAX_STEPS {
            steps.push(self.step());
        }
        Scenario { settings, steps }
    }
}

fuzz_target!(|data: &[u8]| {
    let scenario = Input(data).scenario();
    // `VELIUM_FUZZ_PRINT=1 cargo +nightly fuzz run connection FILE` shows what an input means.
    static PRINT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *PRINT.get_or_init(|| std::env::var_os("VELIUM_FUZZ_PRINT").is_some()) {
        eprintln!("{scenario:#?}");
    }
    harness::run(&scenario);
});
