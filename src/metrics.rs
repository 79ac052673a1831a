//! Counters and latency histograms.
//!
//! Each core records into its own histograms (a lock nobody else takes while serving) and
//! its own traffic counters (a cache line nobody else writes), found through the core
//! index the driver stores in a thread-local when the core starts. They are summed or
//! merged only when someone asks: `/metrics`, or the summary logged at shutdown.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use crate::proto::reject::{ErrorKind, Refusal};
use crate::proto::reject::{Metric, Reject};

/// Event counters, updated with relaxed atomics (each is rare next to the traffic).
#[derive(Default, Debug)]
pub struct Counters {
    /// TCP connections accepted (and admitted).
    pub accepted: AtomicU64,
    /// Shims that completed Identify.
    pub identified: AtomicU64,
    /// Shims closed as slow consumers.
    pub slow_consumers: AtomicU64,
    /// CommandResponses whose command sender had gone.
    pub responses_dropped: AtomicU64,
    /// Routed frames delivered to a shim (TCP or UDP).
    pub deliveries: AtomicU64,
    /// Quit answers sent to unbound UDP sources.
    pub udp_quit_sent: AtomicU64,
    /// Quit answers withheld by the per-source rate limit.
    pub udp_quit_suppressed: AtomicU64,
    /// Datagrams dropped because their source is outside the allowed networks.
    pub datagrams_refused: AtomicU64,
    /// Datagrams dropped because a core's UDP send queue, or a destination's, was full.
    pub udp_dropped: AtomicU64,
    /// Connections still open when a graceful shutdown's deadline passed.
    pub shutdown_cut: AtomicU64,
    /// Connections closed because a newer one took their identity.
    pub replaced: AtomicU64,
    /// TLS handshakes finished.
    pub tls_established: AtomicU64,
    /// Sealed datagrams dropped, by `SealError` (in `SealError::ALL` order).
    pub sealed_dropped: [AtomicU64; 4],
    /// Plain binds that moved an address away from another live session.
    pub udp_address_taken: AtomicU64,
    /// State keys held by connected shims (a gauge).
    pub state_keys: AtomicU64,
    /// Set frames applied.
    pub state_sets: AtomicU64,
    /// State keys changed (set to a new value, or deleted).
    pub state_changes: AtomicU64,
    /// State items delivered to subscribers.
    pub state_delivered: AtomicU64,
    /// Changes that reached no subscriber on their own because a later value replaced
    /// them before the delivery (coalesced away).
    pub state_coalesced: AtomicU64,
    /// Shims that entered or left a filtered subscription's selection.
    pub state_reselected: AtomicU64,
    /// Filtered targets resolved (Command, Echo, Who, Get and admin queries; a Subscribe
    /// follows its selection per shim instead).
    pub filtered_targets: AtomicU64,
    /// Shims a filtered target's lookup looked at (index candidates or pattern matches).
    pub filter_candidates: AtomicU64,
}

impl Counters {
    /// Adds one to `c`.
    #[inline]
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Which way a frame went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Received from a client.
    In = 0,
    /// Sent (queued) to a client.
    Out = 1,
}

/// Which transport carried a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The TCP control connection.
    Tcp = 0,
    /// The UDP channel.
    Udp = 1,
}

/// Opcode slots: one per byte 0x00..=0x14, and one for anything else.
const OPS: usize = 22;
const SLOTS: usize = 2 * 2 * OPS;

/// One core's traffic counters, on cache lines of their own.
#[repr(align(128))]
struct Traffic {
    frames: [AtomicU64; SLOTS],
    bytes: [AtomicU64; SLOTS],
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            frames: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn slot(dir: Dir, t: Transport, op: u8) -> usize {
    ((dir as usize * 2) + t as usize) * OPS + (op as usize).min(OPS - 1)
}

thread_local! {
    static CORE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Marks the current thread as serving core `index`: its counters go to that core's block.
pub fn set_core(index: usize) {
    CORE.with(|c| c.set(index));
}

/// One core's latency histograms (microseconds).
pub struct CoreHistograms {
    /// TCP accept -> Session reply written.
    pub handshake: Mutex<Histogram<u64>>,
    /// UDP bind datagram received -> binding in place.
    pub udp_bind: Mutex<Histogram<u64>>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 us .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Default for CoreHistograms {
    fn default() -> Self {
        CoreHistograms {
            handshake: Mutex::new(new_histogram()),
            udp_bind: Mutex::new(new_histogram()),
        }
    }
}

/// Everything measured.
pub struct Metrics {
    /// Counters.
    pub counters: Counters,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
    cores: Vec<CoreHistograms>,
    /// One block per core, and a last one for other threads (admin, signals).
    traffic: Vec<Traffic>,
}

/// Which histogram.
#[derive(Clone, Copy, Debug)]
pub enum Latency {
    /// accept -> Session written.
    Handshake,
    /// UDP bind handled.
    UdpBind,
}

impl Metrics {
    /// Metrics for `cores` cores.
    pub fn new(cores: usize) -> Metrics {
        Metrics {
            counters: Counters::default(),
            errors: Default::default(),
            refused: Default::default(),
            cores: (0..cores.max(1))
                .map(|_| CoreHistograms::default())
                .collect(),
            traffic: (0..cores.max(1) + 1).map(|_| Traffic::default()).collect(),
        }
    }

    /// Counts one frame of `len` bytes (opcode and 0x0A included) with opcode byte `op`.
    #[inline]
    pub fn frame(&self, dir: Dir, t: Transport, op: u8, len: usize) {
        self.frames(dir, t, op, 1, len);
    }

    /// Counts `n` frames of `len` bytes in all, with opcode byte `op`.
    #[inline]
    pub fn frames(&self, dir: Dir, t: Transport, op: u8, n: u64, len: usize) {
        let core = CORE.with(Cell::get).min(self.traffic.len() - 1);
        let block = &self.traffic[core];
        let i = slot(dir, t, op);
        block.frames[i].fetch_add(n, Ordering::Relaxed);
        block.bytes[i].fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Frames and bytes counted for one direction, transport and opcode slot (0x00..=0x0F,
    /// 16 for any other byte), summed over the cores.
    pub fn traffic(&self, dir: Dir, t: Transport, op: u8) -> (u64, u64) {
        let i = slot(dir, t, op);
        self.traffic.iter().fold((0, 0), |(f, b), c| {
            (
                f + c.frames[i].load(Ordering::Relaxed),
                b + c.bytes[i].load(Ordering::Relaxed),
            )
        })
    }

    /// Counts an Error frame sent (or a datagram dropped) for `kind`.
    pub fn error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        Counters::bump(&self.errors[i]);
    }

    /// Counts a refusal.
    pub fn refuse(&self, why: Refusal) {
        let i = Refusal::ALL.iter().position(|k| *k == why).unwrap_or(0);
        Counters::bump(&self.refused[i]);
    }

    /// Counts a refusal where [`Reject::metric`] says it belongs.
    pub fn reject(&self, r: &Reject) {
        match r.metric() {
            Metric::Error(k) => self.error(k),
            Metric::Refusal(why) => self.refuse(why),
        }
    }

    /// Every error kind with its count.
    pub fn errors(&self) -> impl Iterator<Item = (ErrorKind, u64)> + '_ {
        ErrorKind::ALL
            .iter()
            .zip(&self.errors)
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
    }

    /// Every refusal reason with its count.
    pub fn refusals(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .iter()
            .zip(&self.refused)
            .map(|(k, c)| (*k, c.load(Ordering::Relaxed)))
    }

    /// Records one sample on `core`'s histogram.
    pub fn record(&self, core: usize, which: Latency, d: Duration) {
        let h = &self.cores[core % self.cores.len()];
        let h = match which {
            Latency::Handshake => &h.handshake,
            Latency::UdpBind => &h.udp_bind,
        };
        h.lock().saturating_record(d.as_micros().max(1) as u64);
    }

    /// All cores' samples of one histogram, merged.
    pub fn merged(&self, which: Latency) -> Histogram<u64> {
        let mut all = new_histogram();
        for c in &self.cores {
            let h = match which {
                Latency::Handshake => c.handshake.lock(),
                Latency::UdpBind => c.udp_bind.lock(),
            };
            all.add(&*h).expect("same bounds");
        }
        all
    }

    /// One line: count and percentiles of a merged histogram, in microseconds.
    pub fn summary(&self, which: Latency) -> String {
        let h = self.merged(which);
        if h.is_empty() {
            return "no samples".into();
        }
        format!(
            "n={} p50={}us p90={}us p99={}us p99.9={}us max={}us",
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_across_cores() {
        let m = Metrics::new(2);
        m.record(0, Latency::Handshake, Duration::from_micros(100));
        m.record(1, Latency::Handshake, Duration::from_micros(300));
        let h = m.merged(Latency::Handshake);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= 300);
        assert!(m.summary(Latency::Handshake).starts_with("n=2 "));
        assert_eq!(m.summary(Latency::UdpBind), "no samples");
    }

    #[test]
    fn traffic_sums_over_cores() {
        let m = Metrics::new(2);
        std::thread::scope(|s| {
            for core in 0..2 {
                let m = &m;
                s.spawn(move || {
                    set_core(core);
                    m.frame(Dir::In, Transport::Tcp, 0x04, 10);
                });
            }
        });
        m.frame(Dir::Out, Transport::Udp, 0x99, 3);
        assert_eq!(m.traffic(Dir::In, Transport::Tcp, 0x04), (2, 20));
        assert_eq!(m.traffic(Dir::Out, Transport::Udp, 0x15), (1, 3));
        assert_eq!(m.traffic(Dir::Out, Transport::Tcp, 0x04), (0, 0));
        m.error(ErrorKind::NoMatch);
        m.refuse(Refusal::Rate);
        assert!(m.errors().any(|(k, n)| k == ErrorKind::NoMatch && n == 1));
        assert!(m.refusals().any(|(k, n)| k == Refusal::Rate && n == 1));
    }
}
