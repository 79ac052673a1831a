//! Admission: what is turned away before any protocol work. The allowed networks, the
//! total and per-source connection limits, the per-source connection rate, and the
//! datagram filter; every refusal counted and logged at most once a minute per source.

use super::Hub;
use crate::metrics::{Counters, Refusal};
use crate::proto::reject::Reject;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::warn;

/// Connection-limit state of one source IP.
pub(crate) struct Source {
    /// Connections open from it.
    open: u32,
    /// Connection attempts left in its bucket.
    tokens: u32,
    /// When the bucket was last refilled (hub milliseconds).
    refilled_ms: u64,
}

/// Sources tracked before idle ones are forgotten.
const SOURCES_PRUNE_AT: usize = 65_536;
/// How often one source's refusals are logged.
const REFUSAL_LOG_MS: u64 = 60_000;

impl Hub {
    /// The connection limit in force: `max_connections`, lowered to what the open-file
    /// limit leaves room for.
    pub fn max_connections(&self) -> usize {
        match self.config().max_connections {
            0 => self.fd_cap,
            n => n.min(self.fd_cap),
        }
    }

    /// Open TCP connections.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Decides whether a connection just accepted from `ip` may be served: the allowed
    /// networks, the total and per-source connection limits and the per-source attempt
    /// rate, in that order. An admitted connection must be [released](Hub::release) when
    /// it ends.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let c = self.config();
        let refused = |why| {
            self.refused(ip, why, now);
            Err(why)
        };
        if !c.allows(ip) {
            return refused(Refusal::AllowList);
        }
        if self.is_shutting_down() {
            return refused(Refusal::MaxConnections);
        }
        if self.open.load(Ordering::Relaxed) >= self.max_connections() {
            return refused(Refusal::MaxConnections);
        }
        let now_ms = self.ms(now);
        // Forget idle sources once there are many, at most once a second: with more
        // sources connected than the threshold, a scan per accept would cost O(sources).
        if self.sources.len() >= SOURCES_PRUNE_AT {
            let last = self.sources_pruned_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= 1000
                && self
                    .sources_pruned_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.sources
                    .retain(|_, s| s.open > 0 || now_ms.saturating_sub(s.refilled_ms) < 1000);
            }
        }
        let rate = c.connect_rate_per_source;
        let mut s = self.sources.entry(ip).or_insert(Source {
            open: 0,
            tokens: rate,
            refilled_ms: now_ms,
        });
        if rate > 0 {
            let refill = now_ms.saturating_sub(s.refilled_ms) * u64::from(rate) / 1000;
            if refill > 0 {
                s.tokens = (u64::from(s.tokens) + refill).min(u64::from(rate)) as u32;
                s.refilled_ms = now_ms;
            }
            if s.tokens == 0 {
                drop(s);
                return refused(Refusal::Rate);
            }
            s.tokens -= 1;
        }
        let per = c.max_connections_per_source;
        if per > 0 && s.open as usize >= per {
            drop(s);
            return refused(Refusal::PerSource);
        }
        s.open += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Ends an admitted connection from `ip`.
    pub fn release(&self, ip: IpAddr) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(mut s) = self.sources.get_mut(&ip) {
            s.open = s.open.saturating_sub(1);
        }
    }

    /// Counts a refusal and logs it, once a minute per source.
    pub fn refused(&self, ip: IpAddr, why: Refusal, now: Instant) {
        self.refused_for(ip, why, "", now)
    }

    /// As [`Hub::refused`], with a detail for the log line (a TLS error, say).
    pub fn refused_for(&self, ip: IpAddr, why: Refusal, detail: &str, now: Instant) {
        self.metrics.refuse(why);
        let now_ms = self.ms(now);
        let mut logged = self.refusals_logged.lock();
        if logged.len() >= SOURCES_PRUNE_AT {
            logged.retain(|_, t| now_ms.saturating_sub(*t) < REFUSAL_LOG_MS);
        }
        // Once a minute per source and reason: a second kind of refusal from the same
        // source is logged too. At the bound (every entry younger than a minute), a new
        // source is counted but not logged, so a flood cannot grow the table or the log.
        let key = (ip, why.label());
        let last = logged.get(&key).copied();
        let room = last.is_some() || logged.len() < SOURCES_PRUNE_AT;
        if room && last.is_none_or(|t| now_ms.saturating_sub(t) >= REFUSAL_LOG_MS) {
            logged.insert(key, now_ms);
            drop(logged);
            let unix_ms = self.unix_us(now_ms) / 1000;
            let what = super::journal::Happened::Refused {
                source: ip,
                reason: why.label(),
            };
            self.journal.push(unix_ms, what);
            if detail.is_empty() {
                warn!(source = %ip, reason = why.label(), "refused (logged once a minute per source and reason)");
            } else {
                warn!(source = %ip, reason = why.label(), detail,
                    "refused (logged once a minute per source and reason)");
            }
        }
    }

    /// What a connection turned away at accept is sent: its Error, or nothing on a port
    /// that requires TLS (where a TLS client would take plaintext for a broken record).
    pub fn refusal_frame(&self, why: Refusal) -> Vec<u8> {
        match &self.config().tls {
            Some(t) if !t.optional => Vec::new(),
            _ => Reject::Connection(why).frame(),
        }
    }

    /// Whether a datagram from `src` may be handled; counts and logs it when not.
    pub fn admit_datagram(&self, src: SocketAddr, now: Instant) -> bool {
        if self.config().allows(src.ip()) {
            return true;
        }
        Counters::bump(&self.counters().datagrams_refused);
        self.refused(src.ip(), Refusal::AllowList, now);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn admission_limits() {
        use std::time::Duration;
        let hub = Hub::new(Config {
            max_connections: 3,
            max_connections_per_source: 2,
            connect_rate_per_source: 2,
            allow_networks: vec!["10.0.0.0/8".parse().unwrap()],
            ..Config::default()
        });
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(
            hub.admit("192.168.0.1".parse().unwrap(), t0),
            Err(Refusal::AllowList)
        );
        assert_eq!(hub.admit(a, t0), Ok(()));
        assert_eq!(hub.admit(a, t0), Ok(()));
        // The bucket refills at 2 a second; the per-source cap still holds.
        assert_eq!(hub.admit(a, t0), Err(Refusal::Rate));
        assert_eq!(
            hub.admit(a, t0 + Duration::from_secs(1)),
            Err(Refusal::PerSource)
        );
        hub.release(a);
        assert_eq!(hub.admit(a, t0 + Duration::from_secs(1)), Ok(()));
        assert_eq!(hub.admit(b, t0), Ok(()));
        assert_eq!(hub.connections(), 3);
        assert_eq!(hub.admit(b, t0), Err(Refusal::MaxConnections));
        let refused: u64 = hub.metrics.refusals().map(|(_, n)| n).sum();
        assert_eq!(refused, 4);
        hub.begin_shutdown();
        hub.release(b);
        assert!(hub.admit(b, t0 + Duration::from_secs(2)).is_err());
    }
}
