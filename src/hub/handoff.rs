//! Flushes handed from the core that queued frames to the core that owns the socket.
//!
//! A slice of input queues its deliveries on the recipients' outboxes on the core that read
//! it (the push is a copy under the outbox's lock), and lists each outbox that went from
//! empty to busy. The system calls that send those outboxes are most of a fan-out's cost,
//! so they are spread over the cores: after the slice, the producer flushes its own core's
//! outboxes and hands each other core the list of that core's outboxes in one step (one
//! lock, one wake-up per destination core per slice); that core's hand-off task flushes
//! them. A busy publisher then uses every core of the hub, as each core writes its own
//! connections.
//!
//! A destination core with only a few outboxes listed ([`HANDOFF_MIN`]) is flushed from the
//! producer directly, as before: a Command to one shim on another core costs one send, not
//! a thread wake-up and a send (the wake-up is what a round trip would pay).
//!
//! Bounded: an outbox is listed only when it goes from empty to busy, and it stays busy
//! until its flush, so each shim is in at most one list at a time; a core's inbox holds at
//! most as many entries as the hub has connections.

use super::shim::Shim;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

/// A destination core with fewer outboxes listed than this in one slice is flushed by the
/// producing core itself.
pub const HANDOFF_MIN: usize = 4;

/// One core's inbox: the shims to flush, and the wake-up of its hand-off task.
type Inbox = (Mutex<Vec<Arc<Shim>>>, Notify);

/// Each core's inbox of outboxes to flush.
pub struct Handoff {
    cores: Box<[Inbox]>,
    /// Hand-offs made (one per destination core per slice).
    pub handoffs: AtomicU64,
    /// Outboxes flushed by their own core after a hand-off.
    pub handed: AtomicU64,
}

impl Handoff {
    /// Inboxes for `cores` cores.
    pub fn new(cores: usize) -> Handoff {
        Handoff {
            cores: (0..cores.max(1))
                .map(|_| (Mutex::default(), Notify::new()))
                .collect(),
            handoffs: AtomicU64::new(0),
            handed: AtomicU64::new(0),
        }
    }

    /// The number of cores.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// Moves `shims` (all owned by `core`) to that core's inbox and wakes its hand-off task.
    pub fn give(&self, core: usize, shims: &mut Vec<Arc<Shim>>) {
        let (inbox, wake) = &self.cores[core];
        let n = shims.len() as u64;
        {
            let mut q = inbox.lock();
            if q.is_empty() {
                std::mem::swap(&mut *q, shims);
            } else {
                q.append(shims);
            }
        }
        wake.notify_one();
        self.handoffs.fetch_add(1, Ordering::Relaxed);
        self.handed.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes what waits in `core`'s inbox into `into` (which is empty).
    pub fn take(&self, core: usize, into: &mut Vec<Arc<Shim>>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut *self.cores[core].0.lock(), into);
    }

    /// Resolves once something was given to `core` (or was given since the last take).
    pub fn notified(&self, core: usize) -> tokio::sync::futures::Notified<'_> {
        self.cores[core].1.notified()
    }
}
