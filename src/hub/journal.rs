//! The journal: the last things that happened to the fleet (joins, renames, leaves with
//! their reasons, slow consumers, refusals, reloads), for the dashboard's event log.
//!
//! It is a ring of [`CAPACITY`] entries under one lock, written where the log line of the
//! same event is written. An entry holds no text of its own for the common events (an
//! identity is the shim's shared label, a reason a copied enum), so a join or a leave
//! costs one short lock and no allocation. Refusals enter only when their log line does
//! (once a minute per source or per shim), so a flood of them cannot push the joins and
//! leaves out.

use super::shim::CloseReason;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

/// Entries kept; the oldest is dropped for a new one. A page reads the journal every
/// 250 ms: this holds a quarter second of a storm of 16,000 connections a second (a join
/// and a leave each), and costs about 300 KiB.
pub const CAPACITY: usize = 4096;

/// One thing that happened.
#[derive(Clone, Debug)]
pub enum Happened {
    /// A shim identified; the user it authenticated as, if any.
    Join {
        identity: Arc<str>,
        user: Option<Arc<str>>,
    },
    /// A shim took a new identity.
    Rename { from: Arc<str>, to: Arc<str> },
    /// An identified shim's connection ended.
    Leave {
        identity: Arc<str>,
        reason: CloseReason,
    },
    /// A connection refused before any protocol work (logged once a minute per source).
    Refused {
        source: IpAddr,
        reason: &'static str,
    },
    /// A shim's request refused by a rate or an access rule (logged once a minute per
    /// shim).
    Rate { identity: Arc<str>, reason: String },
    /// Settings re-read: what was applied, or why nothing was.
    Reload { ok: bool, text: String },
}

/// An entry: its number (growing by one from 1), when (Unix milliseconds), what.
#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub unix_ms: u64,
    pub what: Happened,
}

/// The ring.
#[derive(Default)]
pub struct Journal {
    ring: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    last: u64,
    entries: VecDeque<Entry>,
}

impl Journal {
    /// Adds an entry.
    pub fn push(&self, unix_ms: u64, what: Happened) {
        let mut r = self.ring.lock();
        if r.entries.len() >= CAPACITY {
            r.entries.pop_front();
        }
        r.last += 1;
        let seq = r.last;
        r.entries.push_back(Entry { seq, unix_ms, what });
    }

    /// The entries after `seq`, oldest first, at most `max` of them (the newest).
    pub fn since(&self, seq: u64, max: usize) -> Vec<Entry> {
        let r = self.ring.lock();
        let newer = r.entries.iter().filter(|e| e.seq > seq).count();
        r.entries
            .iter()
            .skip(r.entries.len() - newer.min(max))
            .cloned()
            .collect()
    }

    /// The number of the newest entry (0 before the first).
    pub fn last(&self) -> u64 {
        self.ring.lock().last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leave(n: u64) -> Happened {
        Happened::Leave {
            identity: Arc::from(format!("a.b.c{n}")),
            reason: CloseReason::Eof,
        }
    }

    #[test]
    fn keeps_the_newest_and_reads_after_a_number() {
        let j = Journal::default();
        assert!(j.since(0, 10).is_empty());
        for n in 0..(CAPACITY as u64 + 5) {
            j.push(n, leave(n));
        }
        assert_eq!(j.last(), CAPACITY as u64 + 5);
        let all = j.since(0, usize::MAX);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 6);
        let tail = j.since(0, 3);
        assert_eq!(
            tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [
                CAPACITY as u64 + 3,
                CAPACITY as u64 + 4,
                CAPACITY as u64 + 5
            ]
        );
        let after = j.since(CAPACITY as u64 + 4, 100);
        assert_eq!(after.len(), 1);
        assert!(j.since(j.last(), 100).is_empty());
    }
}
