//! The last 15 minutes of the hub's figures, one sample a second, for the dashboard's
//! charts.
//!
//! One task on the admin thread reads the counters and histograms the cores publish
//! (what `/metrics` reads) once a second, whether or not a page is open, so a page opened
//! now shows the quarter hour before it. A second's latencies are the difference of two
//! merged histograms, so no core records anything twice or takes a lock of the dashboard.

use crate::hub::Hub;
use crate::metrics::{Dir, Latency, Transport};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Samples kept: 15 minutes of one a second.
pub const SAMPLES: usize = 900;
/// Time between samples.
pub const EVERY: Duration = Duration::from_secs(1);

/// One second of the hub.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// When it was taken (Unix milliseconds).
    pub at_ms: u64,
    /// Open TCP connections.
    pub connections: u64,
    /// Identified shims.
    pub shims: u64,
    /// Handshakes (first Identifies) a second.
    pub handshakes: f64,
    /// Frames received a second (TCP and UDP).
    pub frames_in: f64,
    /// Frames sent a second (TCP and UDP).
    pub frames_out: f64,
    /// Handshake latency over the second (accept to Session queued); none without one.
    pub handshake_p50_us: Option<u64>,
    pub handshake_p99_us: Option<u64>,
    /// UDP bind latency over the second (Session to bind); none without one.
    pub bind_p50_us: Option<u64>,
    pub bind_p99_us: Option<u64>,
}

/// The samples, newest last, and what the next one is measured from.
pub struct History {
    pub samples: VecDeque<Sample>,
    last: Option<Totals>,
}

/// The cumulative figures a sample is the difference of.
struct Totals {
    at_ms: u64,
    identified: u64,
    frames_in: u64,
    frames_out: u64,
    handshake: Histogram<u64>,
    bind: Histogram<u64>,
}

impl Totals {
    fn read(hub: &Hub, at_ms: u64) -> Totals {
        let m = &hub.metrics;
        let frames = |dir| {
            // Every opcode's slot; the last (0x15) counts every other byte.
            (0..=0x15u8)
                .flat_map(|op| [Transport::Tcp, Transport::Udp].map(|t| m.traffic(dir, t, op).0))
                .sum()
        };
        Totals {
            at_ms,
            identified: m.counters.identified.load(Ordering::Relaxed),
            frames_in: frames(Dir::In),
            frames_out: frames(Dir::Out),
            handshake: m.merged(Latency::Handshake),
            bind: m.merged(Latency::UdpBind),
        }
    }
}

/// The median and 99th percentile of what `now` holds beyond `before`.
fn quantiles(now: &Histogram<u64>, before: &Histogram<u64>) -> (Option<u64>, Option<u64>) {
    let mut d = now.clone();
    if d.subtract(before).is_err() || d.is_empty() {
        return (None, None);
    }
    (
        Some(d.value_at_quantile(0.5)),
        Some(d.value_at_quantile(0.99)),
    )
}

impl History {
    fn new() -> History {
        History {
            samples: VecDeque::with_capacity(SAMPLES),
            last: None,
        }
    }

    /// Takes a sample at `at_ms` (Unix milliseconds); the first only sets the baseline.
    pub fn sample(&mut self, hub: &Hub, at_ms: u64) -> Option<&Sample> {
        let now = Totals::read(hub, at_ms);
        let before = self.last.replace(now)?;
        let now = self.last.as_ref().expect("just set");
        let secs = (now.at_ms.saturating_sub(before.at_ms) as f64 / 1000.0).max(0.001);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let (handshake_p50_us, handshake_p99_us) = quantiles(&now.handshake, &before.handshake);
        let (bind_p50_us, bind_p99_us) = quantiles(&now.bind, &before.bind);
        let sample = Sample {
            at_ms,
            connections: hub.connections() as u64,
            shims: hub.table.len() as u64,
            handshakes: rate(now.identified, before.identified),
            frames_in: rate(now.frames_in, before.frames_in),
            frames_out: rate(now.frames_out, before.frames_out),
            handshake_p50_us,
            handshake_p99_us,
            bind_p50_us,
            bind_p99_us,
        };
        if self.samples.len() >= SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.samples.back()
    }
}

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts the sampling task on the admin thread's `LocalSet`; returns the shared history
/// and a channel that carries each new sample to the open pages.
pub fn start(hub: Arc<Hub>) -> (Rc<RefCell<History>>, tokio::sync::broadcast::Sender<Sample>) {
    let history = Rc::new(RefCell::new(History::new()));
    // A page that fell more than a few samples behind gets the next ones only (it lagged
    // behind its own socket, which the write timeout ends anyway).
    let (tx, _) = tokio::sync::broadcast::channel(8);
    let (h, t) = (history.clone(), tx.clone());
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let sample = h.borrow_mut().sample(&hub, unix_ms()).cloned();
            if let Some(s) = sample {
                let _ = t.send(s);
            }
        }
    });
    (history, tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_sample_is_the_difference_of_two_readings() {
        let hub = Hub::new(Config::default());
        let mut h = History::new();
        assert!(
            h.sample(&hub, 1_000).is_none(),
            "the first reading is the baseline"
        );
        hub.metrics
            .record(0, Latency::Handshake, Duration::from_micros(200));
        hub.metrics
            .record(0, Latency::Handshake, Duration::from_micros(400));
        hub.metrics.frames(Dir::In, Transport::Tcp, 0x04, 10, 100);
        hub.metrics
            .counters
            .identified
            .fetch_add(4, Ordering::Relaxed);
        let s = h.sample(&hub, 3_000).unwrap().clone();
        assert_eq!(s.handshakes, 2.0);
        assert_eq!(s.frames_in, 5.0);
        assert!(s.handshake_p50_us.is_some_and(|p| (199..=201).contains(&p)));
        assert!(s.handshake_p99_us.is_some_and(|p| (399..=401).contains(&p)));
        assert_eq!(s.bind_p50_us, None);
        let s = h.sample(&hub, 4_000).unwrap();
        assert_eq!(s.handshakes, 0.0);
        assert_eq!(s.handshake_p50_us, None, "nothing new in this second");
    }
}
