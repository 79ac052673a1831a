//! The session table: every identified shim by token and by serial, and every UDP
//! binding by source address.
//!
//! Shared by all cores. Each map is a `DashMap`, sharded with one lock per shard, so two
//! cores only meet on a lock when they touch the same shard at the same moment: there is
//! no global lock on the handshake or the datagram path.

use super::shim::Shim;
use crate::proto::Token;
use dashmap::DashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a UDP bind did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindOutcome {
    /// The shim had no UDP address; now it has this one.
    Bound,
    /// The shim was bound to `from`; the binding moved (NAT rebinding).
    Rebound {
        /// The previous address.
        from: SocketAddr,
    },
    /// Already bound to this address.
    Unchanged,
    /// The shim's TCP connection has ended.
    Dead,
}

/// The session table.
#[derive(Default)]
pub struct Table {
    tokens: DashMap<Token, Arc<Shim>>,
    serials: DashMap<u64, Arc<Shim>>,
    bindings: DashMap<SocketAddr, Arc<Shim>>,
    /// TLS sessions by sealed UDP session id.
    sealed: DashMap<u64, Arc<Shim>>,
    /// Sealed sessions with an address to send to.
    sealed_bound: AtomicUsize,
}

impl Table {
    /// Registers an identified shim.
    pub fn insert(&self, shim: &Arc<Shim>) {
        self.tokens.insert(shim.token, shim.clone());
        self.serials.insert(shim.serial, shim.clone());
        if let Some(s) = shim.sealed.get() {
            // Ids are 64 random bits from the TLS exporter: a clash is next to impossible,
            // and leaves the newcomer with TCP only rather than taking another's channel.
            if let dashmap::Entry::Vacant(e) = self.sealed.entry(s.session) {
                e.insert(shim.clone());
            } else {
                tracing::warn!(conn = shim.serial, "sealed UDP session id in use: TCP only");
            }
        }
    }

    /// Removes a shim, its token and its UDP binding. After this returns, a bind with its
    /// token and a datagram from its UDP address both find nothing.
    pub fn remove(&self, shim: &Shim) {
        self.tokens.remove(&shim.token);
        self.serials.remove(&shim.serial);
        if let Some(s) = shim.sealed.get() {
            self.sealed
                .remove_if(&s.session, |_, o| o.serial == shim.serial);
        }
        let addr = {
            let mut udp = shim.udp.lock();
            udp.dead = true;
            udp.addr.take()
        };
        if let Some(addr) = addr {
            if shim.sealed.get().is_some() {
                self.sealed_bound.fetch_sub(1, Ordering::Relaxed);
            } else {
                self.bindings
                    .remove_if(&addr, |_, s| s.serial == shim.serial);
            }
        }
    }

    /// The live shim holding `token`.
    pub fn by_token(&self, token: &Token) -> Option<Arc<Shim>> {
        self.tokens.get(token).map(|s| s.clone())
    }

    /// The live shim with `serial`.
    pub fn by_serial(&self, serial: u64) -> Option<Arc<Shim>> {
        self.serials.get(&serial).map(|s| s.clone())
    }

    /// The live TLS session whose sealed UDP session id is `session`.
    pub fn by_sealed(&self, session: u64) -> Option<Arc<Shim>> {
        self.sealed.get(&session).map(|s| s.clone())
    }

    /// Records `addr` as where a sealed session's datagrams go (the source of its newest
    /// authenticated datagram).
    pub fn move_sealed(&self, shim: &Shim, addr: SocketAddr) -> BindOutcome {
        let mut udp = shim.udp.lock();
        if udp.dead {
            return BindOutcome::Dead;
        }
        match udp.addr.replace(addr) {
            None => {
                self.sealed_bound.fetch_add(1, Ordering::Relaxed);
                BindOutcome::Bound
            }
            Some(a) if a == addr => BindOutcome::Unchanged,
            Some(from) => BindOutcome::Rebound { from },
        }
    }

    /// The live shim whose UDP channel is `addr`.
    pub fn by_udp(&self, addr: &SocketAddr) -> Option<Arc<Shim>> {
        self.bindings.get(addr).map(|s| s.clone())
    }

    /// Binds `addr` to `shim` (moving any earlier binding of either).
    pub fn bind_udp(&self, shim: &Arc<Shim>, addr: SocketAddr) -> (BindOutcome, Option<u64>) {
        let outcome;
        let displaced;
        {
            // The shim's UDP lock orders this bind against remove(): either the bind sees
            // `dead`, or remove() sees the address and takes the binding out again.
            let mut udp = shim.udp.lock();
            if udp.dead {
                return (BindOutcome::Dead, None);
            }
            match udp.addr {
                Some(a) if a == addr => return (BindOutcome::Unchanged, None),
                Some(from) => {
                    self.bindings
                        .remove_if(&from, |_, s| s.serial == shim.serial);
                    outcome = BindOutcome::Rebound { from };
                }
                None => outcome = BindOutcome::Bound,
            }
            udp.addr = Some(addr);
            displaced = self.bindings.insert(addr, shim.clone());
        }
        // Another shim had this source address (a client reusing a port, or a forged
        // source): it loses it, and the caller says so.
        let mut took = None;
        if let Some(other) = displaced.filter(|o| o.serial != shim.serial) {
            let mut udp = other.udp.lock();
            if udp.addr == Some(addr) {
                udp.addr = None;
                took = Some(other.serial);
            }
        }
        (outcome, took)
    }

    /// Calls `f` for every identified shim.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Shim>)) {
        self.serials.iter().for_each(|e| f(e.value()));
    }

    /// Identified shims.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// True when no shim is identified.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// UDP bindings, plain and sealed.
    pub fn udp_bound(&self) -> usize {
        self.bindings.len() + self.sealed_bound.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shim(serial: u64) -> Arc<Shim> {
        Arc::new(Shim::new(serial, 0, "127.0.0.1:1".parse().unwrap(), 0, 0))
    }

    #[test]
    fn bind_rebind_and_remove() {
        let t = Table::default();
        let a = shim(1);
        t.insert(&a);
        let x: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let y: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        assert_eq!(t.bind_udp(&a, x).0, BindOutcome::Bound);
        assert_eq!(t.bind_udp(&a, x).0, BindOutcome::Unchanged);
        assert_eq!(t.bind_udp(&a, y).0, BindOutcome::Rebound { from: x });
        assert!(t.by_udp(&x).is_none());
        assert_eq!(t.by_udp(&y).unwrap().serial, 1);
        t.remove(&a);
        assert!(t.by_udp(&y).is_none());
        assert!(t.by_token(&a.token).is_none());
        assert_eq!(t.bind_udp(&a, x).0, BindOutcome::Dead);
        assert!(t.by_udp(&x).is_none());
    }

    #[test]
    fn a_source_taken_by_another_shim_moves_to_it() {
        let t = Table::default();
        let (a, b) = (shim(1), shim(2));
        t.insert(&a);
        t.insert(&b);
        let x: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        assert_eq!(t.bind_udp(&a, x), (BindOutcome::Bound, None));
        assert_eq!(
            t.bind_udp(&b, x),
            (BindOutcome::Bound, Some(1)),
            "a lost it"
        );
        assert_eq!(t.by_udp(&x).unwrap().serial, 2);
        assert_eq!(a.udp_addr(), None);
        t.remove(&a);
        assert_eq!(t.by_udp(&x).unwrap().serial, 2, "b keeps its binding");
    }
}
