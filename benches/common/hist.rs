//! Latency histograms (HdrHistogram, nanoseconds, 3 significant digits).

use hdrhistogram::Histogram;
use std::time::Duration;

/// A latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
#[derive(Clone)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds"))
    }
}

impl Hist {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_nanos().max(1) as u64);
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value at quantile `q`, in microseconds.
    pub fn us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// The maximum in microseconds.
    pub fn max_us(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Hist) {
        self.0.add(&other.0).expect("histogram merge");
    }
}
