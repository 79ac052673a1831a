//! The timers: the identify deadline, the idle timeout, the write deadline, and the Quit
//! every connection is sent on a graceful shutdown.
//!
//! The driver's sweeper calls [`Hub::sweep`] for each of its connections every
//! [`Hub::sweep_every`]; everything it decides is here, so the tests and the fuzz target
//! run exactly what the drivers run.

use super::Hub;
use super::outbox::OutState;
use super::shim::{CloseReason, Shim};
use crate::proto::reject::{self, Refusal, Reject};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// How long a closing connection may take to write its last frames before it is cut.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

impl Hub {
    /// How often the sweeper runs: a tenth of the shortest timeout, within 5-250 ms.
    pub fn sweep_every(&self) -> Duration {
        let c = self.config();
        let mut shortest = c.identify_timeout.min(c.idle_timeout);
        if c.tls.is_some() {
            shortest = shortest.min(c.tls_handshake_timeout);
        }
        (shortest / 10).clamp(Duration::from_millis(5), Duration::from_millis(250))
    }

    /// Which timer, if any, has run out for `shim` at `now`: the identify deadline
    /// (measured from accept), the idle timeout (from the last frame received on TCP or
    /// UDP), or the write deadline (queued output that made no progress for that long: a
    /// slow consumer).
    pub fn expired(&self, shim: &Shim, now: Instant) -> Option<CloseReason> {
        let now_ms = self.ms(now);
        let c = self.config();
        let identify = c.identify_timeout.as_millis() as u64;
        let handshake = c.tls_handshake_timeout.as_millis() as u64;
        // A TLS session's sealed keys are set when its handshake finishes.
        if shim.is_tls()
            && !shim.is_sealed()
            && now_ms.saturating_sub(shim.accepted_ms()) >= handshake
        {
            return Some(CloseReason::TlsHandshakeTimeout);
        }
        if !shim.is_identified() && now_ms.saturating_sub(shim.accepted_ms()) >= identify {
            return Some(CloseReason::IdentifyTimeout);
        }
        let deadline = c.write_deadline.as_millis() as u64;
        if shim.outbox.stalled(now_ms, deadline) {
            return Some(CloseReason::SlowConsumer);
        }
        let idle = c.idle_timeout.as_millis() as u64;
        (now_ms.saturating_sub(shim.last_seen_ms()) >= idle).then_some(CloseReason::Idle)
    }

    /// Ends a connection whose timer ran out and removes the shim from routing at once:
    /// an identify timeout gets its Error and an idle one Quit, flushed before the socket
    /// is shut down; a slow consumer is cut off with nothing more written.
    pub fn expire(&self, shim: &Shim, reason: CloseReason, now: Instant) {
        match reason {
            CloseReason::IdentifyTimeout => {
                let r = Reject::IdentifyTimeout;
                self.metrics.reject(&r);
                self.send_last(shim, reason, &r.frame());
            }
            CloseReason::SlowConsumer => shim.outbox.cut(reason),
            // Nothing can be said in a handshake that never finished.
            CloseReason::TlsHandshakeTimeout => {
                self.refused(shim.peer.ip(), Refusal::TlsTimeout, now);
                shim.outbox.cut(reason)
            }
            _ => {
                let idle = humantime::format_duration(self.config().idle_timeout);
                let why = format!("idle timeout: nothing received for {idle}");
                self.send_last(shim, reason, &reject::closing(&why));
            }
        }
        self.remove(shim, reason);
    }

    /// Checks the timers and expires the connection if one ran out; true if it did.
    pub fn check_timers(&self, shim: &Shim, now: Instant) -> bool {
        self.expired(shim, now)
            .map(|r| self.expire(shim, r, now))
            .is_some()
    }

    /// One sweep of one connection: its timers, and an idle queue's large buffer given back.
    /// A timer must be found run out on two sweeps in a row
    /// (`flagged` remembers the first): after a stall of this core, frames already
    /// received but not yet read get one tick to count.
    ///
    /// A connection already closing that has made no progress writing its last frames for
    /// [`CLOSE_LINGER`] is cut: its peer stopped reading, and would otherwise hold the
    /// socket, the task and its admission slot for ever.
    pub fn sweep(&self, shim: &Shim, flagged: &Cell<bool>, now: Instant) {
        if shim.outbox.state() != OutState::Open {
            let linger = CLOSE_LINGER.as_millis() as u64;
            if shim.outbox.stalled(self.ms(now), linger) {
                let reason = shim.outbox.settle_reason(CloseReason::IoError);
                shim.outbox.cut(reason);
            }
            return;
        }
        match self.expired(shim, now) {
            Some(reason) if flagged.get() => self.expire(shim, reason, now),
            Some(_) => flagged.set(true),
            None => {
                flagged.set(false);
                shim.outbox.trim();
            }
        }
    }

    /// On a graceful shutdown: sends Quit to each connection (identified or not) and
    /// closes it; the readers then end as their sockets shut down.
    pub fn quit_all<'a>(&self, shims: impl Iterator<Item = &'a Arc<Shim>>) {
        let last = reject::closing("server shutting down");
        let mut n = 0usize;
        for shim in shims {
            if shim.outbox.is_open() {
                self.send_last(shim, CloseReason::Shutdown, &last);
                n += 1;
            }
        }
        debug!(conns = n, "sent Quit to every connection");
    }
}
