//! Fan-out progress: how many deliveries each receiver has, and a wake-up for the sender
//! when they move (the relay and cluster benches share it).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;

/// Per-receiver delivery counts, and the sender's wake-up when they move.
pub struct Progress {
    /// Deliveries so far, by receiver.
    pub counts: Vec<Cell<u64>>,
    /// Notified whenever a count moves.
    pub moved: Notify,
}

impl Progress {
    pub fn new(n: usize) -> Rc<Progress> {
        Rc::new(Progress {
            counts: (0..n).map(|_| Cell::new(0)).collect(),
            moved: Notify::new(),
        })
    }

    pub fn add(&self, i: usize, k: u64) {
        if k > 0 {
            self.counts[i].set(self.counts[i].get() + k);
            self.moved.notify_one();
        }
    }

    pub fn min(&self) -> u64 {
        self.counts.iter().map(Cell::get).min().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(Cell::get).sum()
    }

    /// Waits until every receiver has at least `n`, or `limit` passes.
    pub async fn wait_min(&self, n: u64, limit: Duration) -> Result<(), String> {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let moved = self.moved.notified();
            let min = self.min();
            if min >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(end, moved).await.is_err() {
                return Err(format!(
                    "stalled: the slowest receiver has {min} of {n} messages \
                     ({} deliveries in all)",
                    self.total()
                ));
            }
        }
    }
}
