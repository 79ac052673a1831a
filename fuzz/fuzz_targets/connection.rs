//! Fuzzes the connection state machine with the hub, UDP datagrams, timers, reloads and
//! shutdown, against the reference model in `tests/harness`.
//!
//! The input is read as a [`Scenario`] by [`Input`], one byte per choice (a byte past the
//! end reads as 0), so that every input is valid and small changes to it make small
//! changes to the scenario. The choices and their weights are those of the proptest
//! generators in `tests/state_machine.rs`.
#![no_main]

#[path = "../../tests/harness/mod.rs"]
mod harness;

use harness::{Body, Piece, Scenario, Settings, Step, name};
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

    fn text(&mut self) -> Vec<u8> {
        self.bytes(12)
    }

    fn frame(&mut self) -> Piece {
        let (op, body) = match self.byte() % 21 {
            0..=3 => (0x01, Body::Name(self.target())),
            4..=8 => {
                let op = if self.flag() { 0x04 } else { 0x08 };
                let target = self.target();
                (
                    op,
                    Body::Routed {
                        target,
                        text: self.text(),
                    },
                )
            }
            9..=10 => (
                0x05,
                Body::Response {
                    pick: self.byte(),
                    text: self.text(),
                },
            ),
            11..=12 => (
                0x0D,
                Body::Name(if self.flag() {
                    self.target()
                } else {
                    Vec::new()
                }),
            ),
            13..=14 => (0x06, Body::Bytes(self.text())),
            15 => (0x0F, Body::Secret(self.flag())),
            16..=17 => (0x02, Body::Token(self.byte())),
            _ => {
                let op = if self.flag() {
                    self.byte() % 0x11
                } else {
                    self.byte()
                };
                (op, Body::Bytes(self.bytes(20)))
            }
        };
        Piece::Frame { op, body }
    }

    fn piece(&mut self) -> Piece {
        if self.byte().is_multiple_of(5) {
            Piece::Raw(self.bytes(200))
        } else {
            self.frame()
        }
    }

    fn settings(&mut self) -> Settings {
        Settings {
            max_frame: 20 + usize::from(self.byte()) % 77,
            identify_ms: 10 + u64::from(self.u16()) % 2991,
            idle_ms: 10 + u64::from(self.u16()) % 4991,
            outbound_limit: 1024 + usize::from(self.u16()) % 513,
            udp_quit_per_sec: u32::from(self.byte() % 5),
            max_connections: usize::from(self.byte() % 9),
            per_source: usize::from(self.byte() % 4),
            connect_rate: u32::from(self.byte() % 6),
            secret: self.byte().is_multiple_of(4),
            rules: if self.byte().is_multiple_of(4) {
                (0..1 + self.byte() % 2)
                    .map(|_| {
                        let from = self.target();
                        let to = (0..1 + self.byte() % 2).map(|_| self.target()).collect();
                        (from, to)
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    fn step(&mut self) -> Step {
        match self.byte() % 46 {
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
                let pieces = if self.byte().is_multiple_of(5) {
                    (0..self.byte() % 3).map(|_| self.piece()).collect()
                } else {
                    vec![self.frame()]
                };
                Step::Udp { source, pieces }
            }
            34..=36 => Step::Read { conn: self.byte() },
            37..=38 => Step::Eof { conn: self.byte() },
            39..=43 => {
                let ms = if self.flag() {
                    self.u16() % 50
                } else {
                    self.u16() % 6000
                };
                Step::Advance {
                    ms,
                    sweep: self.flag(),
                }
            }
            44 => Step::Reload(self.settings()),
            _ => Step::Shutdown,
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
