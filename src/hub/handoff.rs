//! Deliveries handed from the core that read a frame to the cores that own its recipients.
//!
//! Appending each frame to each recipient's queue is most of a fan-out's cost (far more than
//! the sends), so it is spread over the cores. The producing core decides everything about a
//! delivery (who is selected, the rates, the Ack's count, the answer window) and queues the
//! deliveries to its own connections itself; a delivery to another core's connection is only
//! noted ([`Outgoing`]), grouped with the frames before it that went to the same recipients
//! there. After the slice, each other core gets its [`Batch`] in one step (one lock, one
//! wake-up); its hand-off task appends each group's frames to each recipient in one push,
//! flushes them, and completes the batch's [`Ticket`]. The producer flushes its own outboxes
//! (the sender's Ack among them) only after every ticket is complete, so an Ack never
//! reaches its sender before the deliveries it counts are queued, one producer's frames to
//! one shim stay in order, and a recipient the other core found congested is waited for like
//! one of its own. The outbound limit is applied where the frame is queued: a recipient past
//! it is cut off there.
//!
//! Frames queued on another core's outbox by other paths (relay state) are flushed by that
//! core too: the producer hands it the list of those outboxes, unless it has fewer than
//! [`HANDOFF_MIN`], which are flushed from the producer directly.
//!
//! Bounded: a batch holds one slice's deliveries (a slice is bounded in frames and bytes), a
//! producer has one batch per core outstanding at most and waits for it; an outbox is listed
//! for a flush only when it goes from empty to busy, so each shim is in at most one flush
//! list at a time.

use super::shim::Shim;
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::Notify;

/// A destination core with fewer outboxes listed than this in one slice is flushed by the
/// producing core itself.
pub const HANDOFF_MIN: usize = 4;

/// One core's inbox: the shims to flush, the batches of frames to queue, and the wake-up
/// of its hand-off task.
#[derive(Default)]
struct Inbox {
    flush: Mutex<Vec<Arc<Shim>>>,
    batches: Mutex<Vec<Batch>>,
    wake: Notify,
}

/// Each core's inbox of outboxes to flush.
pub struct Handoff {
    cores: Box<[Inbox]>,
    /// Hand-offs made (one per destination core per slice).
    pub handoffs: AtomicU64,
    /// Outboxes flushed by their own core after a hand-off.
    pub handed: AtomicU64,
    /// Whether every core runs its hand-off task (set by the driver): until then, and in
    /// the tests that run the hub without one, every frame is queued by its producer.
    active: AtomicBool,
}

impl Handoff {
    /// Inboxes for `cores` cores.
    pub fn new(cores: usize) -> Handoff {
        Handoff {
            cores: (0..cores.max(1)).map(|_| Inbox::default()).collect(),
            handoffs: AtomicU64::new(0),
            handed: AtomicU64::new(0),
            active: AtomicBool::new(false),
        }
    }

    /// The number of cores.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// Marks the hand-off tasks started (the driver, once every core runs one).
    pub fn start(&self) {
        self.active.store(true, Ordering::Release);
    }

    /// Whether frames for another core's connections go to that core.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Hands `batch` to `core` and wakes its hand-off task.
    pub fn give_batch(&self, core: usize, batch: Batch) {
        let inbox = &self.cores[core];
        inbox.batches.lock().push(batch);
        inbox.wake.notify_one();
        self.handoffs.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the batches waiting for `core` into `into` (which is empty), oldest first.
    pub fn take_batches(&self, core: usize, into: &mut Vec<Batch>) {
        debug_assert!(into.is_empty());
        std::mem::swap(&mut *self.cores[core].batches.lock(), into);
    }

    /// Moves `shims` (all owned by `core`) to that core's inbox and wakes its hand-off task.
    pub fn give(&self, core: usize, shims: &mut Vec<Arc<Shim>>) {
        let Inbox {
            flush: inbox, wake, ..
        } = &self.cores[core];
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
        std::mem::swap(&mut *self.cores[core].flush.lock(), into);
    }

    /// Resolves once something was given to `core` (or was given since the last take).
    pub fn notified(&self, core: usize) -> tokio::sync::futures::Notified<'_> {
        self.cores[core].wake.notified()
    }
}

/// Frames one slice delivers to the connections of one other core, gathered by the
/// producer (which decides who gets each, and counts it) for that core to append to its
/// own connections' queues ([`Batch`]). Consecutive frames with the same recipients there
/// (a publisher's run of frames to one target) share one group: the destination appends
/// the group's frames to each recipient in one copy.
#[derive(Default)]
pub struct Outgoing {
    groups: Vec<Group>,
    /// The frame being gathered, and how far its recipients so far match the last
    /// group's (`None`: they did not, and a new group holds them).
    frame: Option<(Bytes, Option<usize>)>,
}

/// Frames and the recipients that get every one of them, in order.
pub struct Group {
    /// The recipients, each owned by the destination core.
    pub shims: Vec<Arc<Shim>>,
    /// The frames, one after the other.
    pub bytes: Vec<u8>,
    /// How many frames `bytes` holds.
    pub frames: u64,
}

impl Outgoing {
    /// Notes that `frame` goes to `to` (after every earlier frame of this slice to it).
    pub fn add(&mut self, frame: &Bytes, to: &Arc<Shim>) {
        let same = matches!(&self.frame, Some((f, _)) if f.as_ptr() == frame.as_ptr() && f.len() == frame.len());
        if !same {
            self.end_frame();
            self.frame = Some((frame.clone(), self.groups.last().map(|_| 0)));
        }
        let Some((f, matched)) = &mut self.frame else {
            return;
        };
        if let Some(i) = matched {
            let last = self.groups.last().expect("a group to match");
            if *i < last.shims.len() && Arc::ptr_eq(&last.shims[*i], to) {
                *i += 1;
                return;
            }
            // Another set: a new group of the recipients matched so far and this one.
            let mut shims: Vec<Arc<Shim>> = last.shims[..*i].to_vec();
            shims.push(to.clone());
            self.groups.push(Group {
                shims,
                bytes: f.to_vec(),
                frames: 1,
            });
            *matched = None;
            return;
        }
        if self.groups.last().is_none() {
            self.groups.push(Group {
                shims: Vec::new(),
                bytes: f.to_vec(),
                frames: 1,
            });
        }
        self.groups
            .last_mut()
            .expect("a group")
            .shims
            .push(to.clone());
    }

    /// Closes the frame being gathered: appended to the last group when its recipients
    /// were exactly that group's.
    fn end_frame(&mut self) {
        let Some((f, matched)) = self.frame.take() else {
            return;
        };
        let Some(i) = matched else { return };
        let last = self.groups.last_mut().expect("a group to match");
        if i == last.shims.len() {
            last.bytes.extend_from_slice(&f);
            last.frames += 1;
        } else {
            let shims = last.shims[..i].to_vec();
            self.groups.push(Group {
                shims,
                bytes: f.to_vec(),
                frames: 1,
            });
        }
    }

    /// Whether nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.frame.is_none()
    }

    /// The groups gathered, in order.
    pub fn take(&mut self) -> Vec<Group> {
        self.end_frame();
        std::mem::take(&mut self.groups)
    }
}

/// What one slice hands one core: its groups, and the ticket the producer waits on.
pub struct Batch {
    /// The groups, in order.
    pub groups: Vec<Group>,
    /// Done once the destination has queued them.
    pub ticket: Arc<Ticket>,
}

/// The destination's answer to a [`Batch`]: done, and the recipients it left congested
/// (past a quarter of the outbound limit), which the producer waits for as for its own.
#[derive(Default)]
pub struct Ticket {
    done: AtomicBool,
    congested: Mutex<Vec<Arc<Shim>>>,
    wake: Notify,
}

impl Ticket {
    /// Marks the batch queued, with the recipients it congested.
    pub fn complete(&self, congested: Vec<Arc<Shim>>) {
        *self.congested.lock() = congested;
        self.done.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether the batch has been queued.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits until the batch has been queued; returns the recipients it congested.
    pub async fn wait(&self) -> Vec<Arc<Shim>> {
        while !self.is_done() {
            let n = self.wake.notified();
            if self.is_done() {
                break;
            }
            n.await;
        }
        std::mem::take(&mut *self.congested.lock())
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("groups", &self.groups.len())
            .field("gathering", &self.frame.is_some())
            .finish()
    }
}
