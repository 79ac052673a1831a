//! Fuzzes the sealed datagram decoder (`proto::sealed`): `header`, `Key::open` and the
//! `ReplayWindow`, used in the order the hub uses them (`hub/datagram.rs` `on_sealed`:
//! header, window check, open, window accept).
//!
//! Input: 72 bytes of exporter output (the session's id and keys), then steps. Each step
//! is one byte `kind`, then:
//! - kind % 3 == 0: a length byte and that many raw bytes, handed to the receiver as a
//!   datagram. Raw bytes cannot carry a valid tag, so nothing may be accepted.
//! - kind % 3 == 1: a counter (2 bytes, little endian, added to the highest counter sent,
//!   or subtracted when kind's high bit is set), a length byte and a frame: sealed by the
//!   sender and received intact. It must be accepted exactly when the model says the
//!   counter is new and within the window, and open to the same frame.
//! - kind % 3 == 2: as 1, then one byte of the datagram altered (position and xor from
//!   two more bytes) or the datagram truncated: never accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use velium_server::proto::sealed::{self, EXPORTER_LEN, Keys, ReplayWindow, WINDOW};

struct Receiver {
    keys: Keys,
    window: ReplayWindow,
    seen: BTreeSet<u64>,
}

impl Receiver {
    /// What the hub does with a datagram: the frame inside when it is accepted.
    fn receive(&mut self, dgram: &[u8]) -> Option<Vec<u8>> {
        let h = sealed::header(dgram).ok()?;
        if h.session != self.keys.session || !self.window.check(h.counter) {
            return None;
        }
        let mut buf = dgram.to_vec();
        let frame = self.keys.client.open(&mut buf).ok()?.to_vec();
        self.window.accept(h.counter);
        Some(frame)
    }

    /// Whether the model accepts `counter`.
    fn model_accepts(&self, counter: u64) -> bool {
        match self.seen.iter().next_back() {
            None => counter != u64::MAX,
            Some(&m) => !self.seen.contains(&counter) && (counter > m || m - counter <= WINDOW),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((x, mut rest)) = data.split_first_chunk::<EXPORTER_LEN>() else {
        return;
    };
    let mut rx = Receiver {
        keys: Keys::from_exporter(x),
        window: ReplayWindow::default(),
        seen: BTreeSet::new(),
    };
    let mut top = 0u64;
    while let Some((&kind, tail)) = rest.split_first() {
        rest = tail;
        if kind % 3 == 0 {
            let Some((&n, tail)) = rest.split_first() else { return };
            let n = usize::from(n).min(tail.len());
            let (raw, tail) = tail.split_at(n);
            rest = tail;
            assert!(rx.receive(raw).is_none(), "forged datagram accepted");
            continue;
        }
        let Some((c, tail)) = rest.split_first_chunk::<2>() else { return };
        let Some((&n, tail)) = tail.split_first() else { return };
        let n = usize::from(n).min(tail.len());
        let (frame, tail) = tail.split_at(n);
        rest = tail;
        let delta = u64::from(u16::from_le_bytes(*c));
        let counter = if kind & 0x80 != 0 { top.saturating_sub(delta) } else { top + delta };
        top = top.max(counter);
        let mut d = Vec::new();
        rx.keys.client.seal(rx.keys.session, counter, frame, &mut d);
        if kind % 3 == 2 {
            let Some((m, tail)) = rest.split_first_chunk::<2>() else { return };
            rest = tail;
            let at = usize::from(m[0]) % (d.len() + 1);
            if at == d.len() || m[1] == 0 {
                d.truncate(at.min(d.len() - 1));
            } else {
                d[at] ^= m[1];
            }
            assert!(rx.receive(&d).is_none(), "altered datagram accepted");
            continue;
        }
        let expect = rx.model_accepts(counter);
        let got = rx.receive(&d);
        assert_eq!(got.is_some(), expect, "counter {counter}");
        if let Some(f) = got {
            assert_eq!(f, frame);
            rx.seen.insert(counter);
        }
    }
});
