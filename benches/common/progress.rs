//! Fan-out progress: how many deliveries each receiver has, and a wake-up for the sender
//! when they move, and the windowed sender that waits on it (the relay, cluster and
//! dashboard benches share them).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
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

/// Sends `count` copies of `frame`, up to 32 per write, never more than `window` ahead of
/// the slowest receiver, whose count started at `from`.
pub async fn send_window(
    wr: &mut OwnedWriteHalf,
    progress: &Progress,
    frame: &[u8],
    window: u64,
    from: u64,
    count: u64,
) -> Result<(), String> {
    let mut sent = 0u64;
    let mut batch = Vec::new();
    while sent < count {
        let moved = progress.moved.notified();
        let behind = (from + sent).saturating_sub(progress.min());
        let room = window.saturating_sub(behind).min(count - sent);
        if room == 0 {
            if tokio::time::timeout(Duration::from_secs(30), moved)
                .await
                .is_err()
            {
                return Err(format!(
                    "stalled at {sent} of {count} sent; slowest receiver at {}",
                    progress.min()
                ));
            }
            continue;
        }
        let k = room.min(32);
        batch.clear();
        for _ in 0..k {
            batch.extend_from_slice(frame);
        }
        wr.write_all(&batch)
            .await
            .map_err(|e| format!("send: {e}"))?;
        sent += k;
    }
    Ok(())
}

/// Waits (up to 10 s) until the sender has `want_acks` Echo Acks, then checks that every
/// Ack counted `receivers` (`bad_ack` holds the first that did not) and that the
/// receivers got exactly `want_acks` each, nothing more.
pub async fn check_delivered(
    progress: &Progress,
    acks: &Cell<u64>,
    bad_ack: &RefCell<String>,
    want_acks: u64,
    receivers: usize,
) -> Result<(), String> {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while acks.get() < want_acks && bad_ack.borrow().is_empty() && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    if !bad_ack.borrow().is_empty() {
        return Err(format!(
            "the sender got {} (an Ack counting {receivers} expected)",
            bad_ack.borrow()
        ));
    }
    if acks.get() != want_acks {
        return Err(format!("{} Echo Acks, {want_acks} expected", acks.get()));
    }
    let want = want_acks * receivers as u64;
    if progress.total() != want {
        return Err(format!(
            "{} deliveries counted, {want} expected",
            progress.total()
        ));
    }
    Ok(())
}
