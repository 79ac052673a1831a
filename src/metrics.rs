//! Counters and latency histograms.
//!
//! Each core records into its own histograms (a lock nobody else takes while serving), and
//! they are merged only when someone asks: at shutdown, or by a report.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Event counters, updated with relaxed atomics.
#[derive(Default, Debug)]
pub struct Counters {
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// Shims that completed Identify.
    pub identified: AtomicU64,
    /// Shims closed as slow consumers.
    pub slow_consumers: AtomicU64,
    /// CommandResponses whose command sender had gone.
    pub responses_dropped: AtomicU64,
    /// Frames delivered to a shim (TCP or UDP).
    pub deliveries: AtomicU64,
    /// Quit answers sent to unbound UDP sources.
    pub udp_quit_sent: AtomicU64,
    /// Quit answers withheld by the per-source rate limit.
    pub udp_quit_suppressed: AtomicU64,
    /// Frames or datagrams rejected as malformed, oversized or out of place.
    pub rejected: AtomicU64,
}

impl Counters {
    /// Adds one to `c`.
    #[inline]
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
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
    cores: Vec<CoreHistograms>,
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
            cores: (0..cores.max(1))
                .map(|_| CoreHistograms::default())
                .collect(),
        }
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
}
