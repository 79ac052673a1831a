//! The hub: the rules of the protocol, with no I/O. State shared by every core (settings,
//! session table, router, metrics) and the operations on it.
//!
//! - this file: the [`Hub`], its settings and reload, and a shim's life (accept,
//!   identify or rename, close);
//! - [`connection`]: the TCP state machine, fed the bytes a read returned;
//! - [`datagram`]: the UDP side, fed one datagram at a time;
//! - [`route`]: Command, Echo, CommandResponse and Who;
//! - [`state`]: relay state (Set, Subscribe, Get) and [`index`], the state index that
//!   resolves a target's filters;
//! - [`send`]: the one send path, with the outbound limit and the per-shim rates;
//!   [`handoff`]: the deliveries a slice hands to the cores that own their recipients;
//! - [`timers`]: identify deadline, idle timeout, write deadline, shutdown Quit;
//! - [`access`]: who may be whom: Auth, the identity a user may take, a second claim on a
//!   held identity, and the credentials a reload revokes;
//! - [`admission`]: what is turned away before any protocol work;
//! - [`table`], [`router`], [`shim`], [`outbox`]: the data they work on.
//!
//! Where the no-I/O line runs: nothing under `hub/` or `proto/` makes a system call or
//! reads a clock. Time comes in as an `Instant` argument from the driver; an outbox holds
//! its socket's descriptor only as a number, and reaches the socket through the two
//! functions the driver attached with it (`driver/sys.rs`); the open-file limit is read by
//! the driver and handed to [`Hub::with_open_file_limit`].

pub mod access;
pub mod admission;
pub mod cluster;
pub mod connection;
pub mod datagram;
pub mod handoff;
pub mod index;
pub mod journal;
pub mod outbox;
pub mod route;
pub mod router;
pub mod send;
pub mod shim;
pub mod state;
pub mod table;
pub mod timers;

pub use send::{Effects, Route, Via};

use crate::config::Config;
use crate::metrics::{Counters, Dir, Metrics, Transport};
use crate::proto::reject::Reject;
use crate::proto::reply;
use admission::Source;
use arc_swap::{ArcSwap, Guard};
use bytes::Bytes;
use dashmap::DashMap;
use journal::Happened;
use parking_lot::Mutex;
use router::{Claim, Router};
use shim::{CloseReason, Shim};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use table::Table;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// What Identify did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identified {
    /// First Identify: the shim is registered and was sent its Session.
    Registered,
    /// Later Identify: renamed from the old label.
    Renamed(Arc<str>),
    /// The connection was closed meanwhile (by a timer, or a newer holder of its
    /// identity): nothing was done.
    Closed,
}

/// The shared state of one server.
pub struct Hub {
    config: ArcSwap<Config>,
    /// Identified shims and UDP bindings.
    pub table: Table,
    /// Identities for routing.
    pub router: Router,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// Relay state: subscriptions and each core's waiting deliveries.
    pub states: state::States,
    /// The `state_index` keys' values, for target filters.
    pub index: index::Index,
    /// Each core's inbox of outboxes another core queued frames on.
    pub handoff: handoff::Handoff,
    epoch: Instant,
    /// The latest time a slice of input was handled at (hub milliseconds): the time of
    /// what the hub does outside any slice.
    clock_ms: AtomicU64,
    /// The Unix time of `epoch`, in microseconds.
    epoch_unix_us: u64,
    next_serial: AtomicU64,
    /// Open TCP connections (admitted, not yet ended).
    open: AtomicUsize,
    sources: DashMap<IpAddr, Source>,
    sources_pruned_ms: AtomicU64,
    /// When each refused source was last logged, so a flood is logged once a minute.
    refusals_logged: Mutex<HashMap<(IpAddr, &'static str), u64>>,
    /// The most connections the open-file limit leaves room for.
    fd_cap: usize,
    shutdown: watch::Sender<bool>,
    /// The cluster side, on a node of a cluster.
    cluster: Option<cluster::Cluster>,
    /// The last joins, leaves, refusals and reloads (the dashboard's event log).
    pub journal: journal::Journal,
    /// Held by a reload from its start to its end, and by an Identify that raced one.
    reloading: Mutex<()>,
}

impl Hub {
    /// A hub with no shims and no open-file limit of its own (tests, fuzzing).
    pub fn new(config: Config) -> Arc<Hub> {
        Hub::with_open_file_limit(config, usize::MAX, Instant::now(), Duration::ZERO)
    }

    /// A hub whose connections fit under `open_files` descriptors, started at `now`, which
    /// is `unix` (since the Unix epoch) on the wall clock; both read by the driver.
    pub fn with_open_file_limit(
        config: Config,
        open_files: usize,
        now: Instant,
        unix: Duration,
    ) -> Arc<Hub> {
        // The admin listener's connections come out of the same descriptor budget, so that
        // no number of admin clients can take the descriptors the shims need.
        let fd_cap = open_files
            .saturating_sub(64 + config.admin_connections)
            .max(1);
        let cluster = config.cluster.as_ref().map(|c| {
            let node = c.node.as_deref().unwrap_or("node");
            cluster::Cluster::new(node, config.cores, rand::random())
        });
        Arc::new(Hub {
            cluster,
            metrics: Metrics::new(config.cores),
            states: state::States::new(config.cores),
            handoff: handoff::Handoff::new(config.cores),
            index: index::Index::new(&config.state_index),
            config: ArcSwap::from_pointee(config),
            table: Table::default(),
            router: Router::default(),
            epoch: now,
            clock_ms: AtomicU64::new(0),
            epoch_unix_us: unix.as_micros() as u64,
            next_serial: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            sources: DashMap::new(),
            sources_pruned_ms: AtomicU64::new(0),
            refusals_logged: Mutex::new(HashMap::new()),
            fd_cap,
            shutdown: watch::Sender::new(false),
            journal: journal::Journal::default(),
            reloading: Mutex::new(()),
        })
    }

    /// The settings in force (a reload may replace them at any time).
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// Applies reloaded settings: those that need a restart keep their running values.
    /// Returns the keys that changed and were applied, and those that need a restart.
    /// Connected shims whose user was removed or changed, or may no longer hold its
    /// identity, are closed with the reason (see [`Hub::recheck_credentials`]); when the
    /// settings change what [`Hub::terms_for`] gives, every other identified shim is sent
    /// its new Terms (see [`Hub::resend_terms`]), before any relay state the new users
    /// make it watch or stop watching. One reload at a time.
    pub fn reload(&self, new: Config) -> (Vec<&'static str>, Vec<&'static str>) {
        let _one = self.reloading.lock();
        let old = self.config.load_full();
        let (live, restart) = old.diff(&new);
        let new = Arc::new(old.reloaded(new));
        let changed = |tls| self.terms_with(&old, tls) != self.terms_with(&new, tls);
        let (plain, tls) = (changed(false), changed(true));
        self.config.store(new);
        let users = live.contains(&"users");
        if users {
            self.recheck_credentials();
        }
        if plain || tls {
            self.resend_terms(plain, tls);
        }
        if users {
            self.state_recheck();
        }
        (live, restart)
    }

    /// After a reload that changed the Terms of plaintext connections (`plain`) or of TLS
    /// ones (`tls`): each identified shim of those is sent a Terms frame with the settings
    /// now in force. Queued as any reply is, under the outbound limit: a shim whose queue
    /// is full is cut off as a slow consumer, as it would be for any other frame. Outside
    /// any slice of input, so each outbox is flushed by its core's next relay state tick.
    fn resend_terms(&self, plain: bool, tls: bool) {
        let mut shims = Vec::with_capacity(self.table.len());
        self.table.for_each(|s| {
            if if s.is_tls() { tls } else { plain } {
                shims.push(s.clone());
            }
        });
        let now_ms = self.now_ms();
        let mut out = Effects::default();
        out.begin(self, now_ms);
        for s in &shims {
            self.send_terms(s, &mut out);
        }
        for shim in out.flush.drain(..) {
            self.states.defer_flush(&shim);
        }
        self.finish(0, &mut out, self.instant(now_ms));
        out.release_congested();
        debug!(shims = shims.len(), "Terms sent again after a reload");
    }

    /// Queues `shim` a Terms frame of the settings in force.
    fn send_terms(&self, shim: &Arc<Shim>, out: &mut Effects) {
        let mut f = Vec::with_capacity(160);
        reply::terms(&self.terms_for(shim), &mut f);
        self.send(shim, Route::Reply(Via::Tcp), &Bytes::from(f), out);
    }

    /// After an Identify whose Session went with Terms made from `sent`, and a reload
    /// replaced those settings before the shim was found in the session table: the new
    /// Terms, if they differ. Under the reload lock, so that the reload that is telling
    /// every shim has done so, and no other begins: the last Terms queued are the newest
    /// (the shim may get the same ones twice, when that reload found it after all).
    fn terms_after_reload(&self, shim: &Arc<Shim>, sent: &Config, out: &mut Effects) {
        let _one = self.reloading.lock();
        if self.terms_for(shim) != self.terms_with(sent, shim.is_tls()) {
            self.send_terms(shim, out);
        }
    }

    /// Starts a graceful shutdown: the cores stop accepting and send every connection
    /// Quit ([`Hub::shutdown_started`] wakes them).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves once a graceful shutdown has begun.
    pub async fn shutdown_started(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Counts one frame received from `from`.
    pub(crate) fn received(&self, from: &Shim, t: Transport, op: u8, len: usize) {
        from.frames_in.fetch_add(1, Ordering::Relaxed);
        self.metrics.frame(Dir::In, t, op, len);
    }

    /// `now` as milliseconds on the hub's clock (what [`Shim::last_seen_ms`] is kept in).
    pub fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// The latest time the drivers handed the hub (hub milliseconds).
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock_ms.load(Ordering::Relaxed)
    }

    /// Notes that the drivers are at `now_ms`.
    pub(crate) fn tick_to(&self, now_ms: u64) {
        if self.clock_ms.load(Ordering::Relaxed) < now_ms {
            self.clock_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    /// The instant `ms` hub milliseconds after the start (the inverse of [`Hub::ms`]).
    pub fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.metrics.counters
    }

    /// The settings `shim` must follow, for its Terms frame: the idle timeout and the
    /// Ping interval it implies, the frame and queue limits, and what this hub serves the
    /// connection.
    pub fn terms_for(&self, shim: &Shim) -> reply::Terms {
        self.terms_with(&self.config(), shim.is_tls())
    }

    /// The Terms a connection (a TLS one when `tls`) is sent under the settings `c`: they
    /// depend on nothing else.
    fn terms_with(&self, c: &Config, tls: bool) -> reply::Terms {
        let idle_timeout_ms = c.idle_timeout.as_millis() as u64;
        let mut features = vec!["state".to_owned(), "filters".to_owned()];
        if tls {
            features.push("sealed_udp".to_owned());
        } else if c.udp_plain {
            features.push("udp".to_owned());
        }
        if self.cluster().is_some() {
            features.push("cluster".to_owned());
        }
        reply::Terms {
            idle_timeout_ms,
            ping_ms: idle_timeout_ms / 3,
            max_frame: c.max_frame as u64,
            outbound_limit: c.outbound_limit as u64,
            answer_window: c.answer_window as u64,
            features,
        }
    }

    /// A new, unidentified shim for a connection just accepted from `peer` on `core`.
    pub fn accept(&self, core: usize, peer: SocketAddr, now: Instant) -> Arc<Shim> {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let since = now.saturating_duration_since(self.epoch);
        let unix_ms = (self.epoch_unix_us + since.as_micros() as u64) / 1000;
        Counters::bump(&self.counters().accepted);
        info!(conn = serial, core, %peer, "connect");
        Arc::new(Shim::new(serial, core, peer, self.ms(now), unix_ms))
    }

    /// Applies an Identify: registers the shim (queueing its Session) or renames it, if
    /// its user may take the identity and nobody else holds it (or the holder is to be
    /// replaced: it is sent Quit and closed). A refusal changes nothing: an unidentified
    /// shim stays so, a renaming one keeps its name.
    pub fn identify(
        &self,
        shim: &Arc<Shim>,
        label: &str,
        out: &mut Effects,
    ) -> Result<Identified, Reject> {
        let policy = self.check_identity_claim(shim, label)?;
        let registering = !shim.is_identified();
        if !registering {
            if *shim.identity() == *label {
                // The same name, byte for byte: nothing changes, nobody is told.
                return Ok(Identified::Renamed(shim.identity()));
            }
            // A rename tells every subscription watching either name: it counts as a
            // routed frame, and its presence frames as deliveries.
            self.allow_route(shim, send::Work::FanOut, out.now_ms)?;
        }
        let label: Arc<str> = Arc::from(label);
        let now_us = match out.now_unix_us {
            0 => self.unix_us(out.now_ms),
            us => us,
        };
        // The settings the Terms that go with the Session are made from: a reload that
        // replaces them before the shim is in the table, where a reload finds the shims to
        // tell, does not tell this one. (A guard, not a clone: no count for every core to
        // write on every Identify.)
        let mut terms_under: Option<Guard<Arc<Config>>> = None;
        // On the first Identify the Session goes into the outbox while the router still
        // holds the shim out of sight: a frame routed to it by another core never reaches
        // the client ahead of its Session. The table entry is made there too, so that a
        // newer claim on the name, which may close this shim as soon as the lock is free,
        // always finds it to take out.
        // On a node of a cluster the other nodes are told there too, under the same lock,
        // so that what happens to one identity reaches them in the order it happened here.
        let session = |displaced: Option<&Arc<Shim>>, old: &str| {
            // First: a UDP bind found through the table below reaches the other nodes
            // after the join.
            self.cluster_claimed(shim, old, displaced, now_us);
            if registering {
                // The Terms go with it, in the same write.
                let mut f = Vec::with_capacity(160);
                reply::session(&shim.token, &mut f);
                let c = self.config();
                reply::terms(&self.terms_with(&c, shim.is_tls()), &mut f);
                terms_under = Some(c);
                self.send(shim, Route::Session, &Bytes::from(f), out);
                shim.mark_identified();
                self.table.insert(shim);
            }
        };
        let (claim, old) =
            (self.router).claim(shim, label.clone(), |h| policy.replaces(self, h), session);
        if let Some(c) = terms_under
            && !Arc::ptr_eq(&c, &self.config())
        {
            self.terms_after_reload(shim, &c, out);
        }
        let displaced = match claim {
            Claim::Held(displaced) => displaced,
            Claim::Taken => return Err(Reject::IdentityInUse),
            Claim::Closed => return Ok(Identified::Closed),
        };
        let unix_ms = now_us / 1000;
        let done = if !registering {
            info!(conn = shim.serial, old = %old, new = %label, "rename");
            let (from, to) = (old.clone(), label.clone());
            self.journal.push(unix_ms, Happened::Rename { from, to });
            Identified::Renamed(old.clone())
        } else {
            Counters::bump(&self.counters().identified);
            let user = shim.user();
            let name = user.as_ref().map(|u| u.name.clone());
            let user = user.as_ref().map_or("-", |u| &*u.name);
            info!(conn = shim.serial, identity = %label, user, token = %shim.token, "identify");
            let identity = label.clone();
            self.journal.push(
                unix_ms,
                Happened::Join {
                    identity,
                    user: name,
                },
            );
            Identified::Registered
        };
        if let Some(holder) = displaced {
            if holder.is_remote() {
                // A shim of another node: its node closes it when it hears of this claim.
                self.displace_remote(&holder);
            } else {
                self.displace(&holder, shim);
            }
        }
        self.cluster_state(shim, false);
        // After the holder it displaced is gone: its watchers see its leave, then this
        // shim's join.
        let told = self.state_identity(shim, out);
        if !registering {
            self.charge_deliveries(shim, told);
        }
        Ok(done)
    }

    /// Removes a shim whose connection ended, logging the close line. Only the first call
    /// for a shim does anything, so a timer and the connection's reader may both call it.
    pub fn remove(&self, shim: &Shim, reason: CloseReason) {
        if !shim.mark_closed() {
            return;
        }
        if shim.is_identified() {
            self.table.remove(shim);
        }
        // Under the router's lock, so that a claim racing this close is either undone here
        // or sees the close. A shim that never held an identity is not in the router, and
        // no claim of it can be under way (claims run on its own connection's task, which
        // is the caller, or shares its thread): no lock for it, so a flood of connections
        // that never identify does not contend with routing.
        if !shim.identity().is_empty() {
            // The other nodes of a cluster are told under the same lock (see `identify`).
            (self.router).remove_then(shim, || self.cluster_left(shim, reason));
        }
        self.state_closed(shim, reason);
        if reason == CloseReason::SlowConsumer {
            Counters::bump(&self.counters().slow_consumers);
            warn!(conn = shim.serial, identity = %shim.identity(), "slow consumer cut off");
        }
        info!(conn = shim.serial, identity = %shim.identity(), %reason, "close");
        if shim.is_identified() {
            let identity = shim.identity();
            let unix_ms = self.unix_us(self.now_ms()) / 1000;
            self.journal
                .push(unix_ms, Happened::Leave { identity, reason });
        }
    }
}
