//! The cluster thread: the NATS connection of a node, on a thread and runtime of its own,
//! so that nothing NATS does (connecting, reconnecting, a slow server) ever blocks a
//! serving core.
//!
//! It takes what the cores queued for the cluster (`hub/cluster.rs` [`Outbound`]) in
//! batches, publishes it (`proto/cluster.rs` says on which subjects), and hands what other
//! nodes publish to the cores' inboxes, one batch per core per turn. It also keeps the
//! book of the other nodes' presence: their heartbeats (one every
//! [`HEARTBEAT`]; a node silent for [`NODE_LOST`] is gone, with its shims), the
//! sequence numbers of their changes (a gap asks that node for a snapshot), and their
//! members, so that a snapshot is applied as the joins and leaves it differs by.

use crate::config::{ClusterAuth, ClusterSettings};
use crate::hub::cluster::{Cluster, Inbound, Outbound};
use crate::hub::{Effects, Hub};
use crate::proto::cluster::{
    self as wire, Body, Change, Direct, Hello, Member, Presence, Routed, State, Want,
};
use crate::proto::pattern::Pattern;
use async_nats::{Client, ConnectOptions, Event};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How often a node says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a node may be silent before it is taken for gone, with its shims.
pub const NODE_LOST: Duration = Duration::from_millis(1500);
/// Members per snapshot message.
const SNAPSHOT_PART: usize = 2000;
/// Bytes of routed frames per message to one node, about.
const DIRECT_BYTES: usize = 256 * 1024;
/// Messages taken from NATS per turn before what was taken is handed to the cores.
const TURN: usize = 1024;
/// Messages received and not yet taken, at most.
const GOT_QUEUE: usize = 16 * 1024;

/// Starts the cluster thread of `hub`.
pub fn spawn(hub: Arc<Hub>, settings: Arc<ClusterSettings>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("velium-cluster".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cluster thread");
            rt.block_on(run(hub, settings));
        })
        .map(|_| ())
}

/// How a subscription's messages are told apart.
type Wrap = fn(Bytes) -> Got;

/// What a subscription received.
enum Got {
    Presence(Bytes),
    Hello(Bytes),
    Sync,
    Want(Bytes),
    State(Bytes),
}

/// Another node, as this one knows it.
struct Peer {
    epoch: u64,
    /// The last change applied.
    seq: u64,
    /// Its changes can be applied as they come (no gap since its last snapshot).
    synced: bool,
    heard: Instant,
    asked: Option<Instant>,
    /// Its members: serial to identity.
    members: HashMap<u64, String>,
    /// A snapshot being received: its seq and the parts so far.
    snapshot: Option<(u64, u32, Vec<Member>)>,
    /// Its settings' fingerprint, as last compared with this node's.
    config: Option<(u64, u64)>,
}

struct Node {
    hub: Arc<Hub>,
    client: Client,
    prefix: String,
    name: String,
    epoch: u64,
    seq: u64,
    /// This node's members, as its changes published them.
    local: HashMap<u64, Member>,
    peers: HashMap<String, Peer>,
    /// Subscriptions for state, by subject pattern.
    interest: HashMap<String, tokio::task::JoinHandle<()>>,
    got: mpsc::Sender<Got>,
    /// Items for the cores, by core, this turn.
    inbound: Vec<Vec<Inbound>>,
    connected_once: bool,
    snapshot_due: bool,
}

async fn run(hub: Arc<Hub>, settings: Arc<ClusterSettings>) {
    let c = hub.cluster().expect("a clustered hub");
    let name = c.node.to_string();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let mut opts = ConnectOptions::new()
        .name(format!("velium-server {name}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .ping_interval(Duration::from_secs(1))
        .reconnect_delay_callback(|n| Duration::from_millis((100 * n as u64).min(1000)))
        .event_callback(move |e| {
            let tx = ev_tx.clone();
            async move {
                let _ = tx.send(e);
            }
        });
    opts = match &settings.auth {
        ClusterAuth::None => opts,
        ClusterAuth::UserPassword(u, p) => opts.user_and_password(u.clone(), p.clone()),
        ClusterAuth::Token(t) => opts.token(t.clone()),
        ClusterAuth::Nkey(k) => opts.nkey(k.clone()),
    };
    let client = match opts.connect(settings.url.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            warn!(url = %settings.url, error = %e, "cluster: cannot use the NATS address; serving this node alone");
            return;
        }
    };
    // Bounded: past it the subscriptions wait, NATS drops what they cannot take (a slow
    // consumer), and the gap in a node's presence asks for a snapshot.
    let (got_tx, mut got_rx) = mpsc::channel(GOT_QUEUE);
    let mut node = Node {
        prefix: wire::prefix(&settings.name),
        name,
        epoch: hub.cluster().map_or(0, |c| c.epoch),
        seq: 0,
        local: HashMap::new(),
        peers: HashMap::new(),
        interest: HashMap::new(),
        got: got_tx,
        inbound: (0..hub.config().cores.max(1)).map(|_| Vec::new()).collect(),
        hub: hub.clone(),
        client,
        connected_once: false,
        snapshot_due: false,
    };
    node.subscribe_fixed().await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_beat = Instant::now();
    loop {
        let c = hub.cluster().expect("a clustered hub");
        tokio::select! {
            _ = c.wake.notified() => {}
            e = ev_rx.recv() => match e {
                Some(e) => node.event(e).await,
                None => return,
            },
            g = got_rx.recv() => {
                let Some(g) = g else { return };
                node.got(g).await;
                let mut n = 1;
                while n < TURN {
                    match got_rx.try_recv() {
                        Ok(g) => node.got(g).await,
                        Err(_) => break,
                    }
                    n += 1;
                }
            }
            _ = tick.tick() => {}
        }
        node.outbound().await;
        if hub.is_shutting_down() {
            // The leaves of the shims this node says goodbye to reach the others before
            // the process ends (the main thread waits for this, briefly).
            let _ = node.client.flush().await;
            c.flushed.fetch_add(1, Ordering::Release);
        }
        let now = Instant::now();
        if now.duration_since(last_beat) >= HEARTBEAT {
            last_beat = now;
            node.heartbeat().await;
        }
        node.expire(now);
        if std::mem::take(&mut node.snapshot_due) {
            node.publish_snapshot().await;
        }
        node.hand_over();
    }
}

impl Node {
    fn cluster(&self) -> &Cluster {
        self.hub.cluster().expect("a clustered hub")
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    async fn subscribe_fixed(&mut self) {
        let me = self.name.clone();
        // Frames for shims here are delivered by a task of their own as each message
        // arrives: the latency of a Command across nodes never waits for a turn of the
        // main loop.
        let subject = self.subject(&format!("node.{me}"));
        match self.client.subscribe(subject.clone()).await {
            Ok(s) => {
                tokio::spawn(deliver_direct(self.hub.clone(), s));
            }
            Err(e) => warn!(%subject, error = %e, "cluster: cannot subscribe"),
        }
        let subs: [(String, Wrap); 4] = [
            (self.subject("presence"), Got::Presence),
            (self.subject("hello"), Got::Hello),
            (self.subject(&format!("sync.{me}")), |_| Got::Sync),
            (self.subject("want"), Got::Want),
        ];
        for (subject, kind) in subs {
            match self.client.subscribe(subject.clone()).await {
                Ok(mut s) => {
                    let tx = self.got.clone();
                    tokio::spawn(async move {
                        while let Some(m) = s.next().await {
                            if tx.send(kind(m.payload)).await.is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => warn!(%subject, error = %e, "cluster: cannot subscribe"),
            }
        }
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) {
        let c = self.cluster();
        if !c.is_reachable() {
            return;
        }
        let n = payload.len() as u64;
        match self.client.publish(subject, Bytes::from(payload)).await {
            Ok(()) => {
                c.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                c.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => debug!(error = %e, "cluster: publish failed"),
        }
    }

    fn count_in(&self, n: usize) {
        let s = &self.cluster().stats;
        s.messages_in.fetch_add(1, Ordering::Relaxed);
        s.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    async fn event(&mut self, e: Event) {
        let c = self.hub.cluster().expect("a clustered hub");
        match e {
            Event::Connected => {
                c.set_reachable(true);
                if self.connected_once {
                    info!(node = %self.name, "cluster reconnected");
                } else {
                    info!(node = %self.name, "cluster connected");
                    self.connected_once = true;
                }
                let hello = wire::encode(&Hello {
                    node: self.name.clone(),
                });
                self.publish(self.subject("hello"), hello).await;
                self.snapshot_due = true;
            }
            Event::Disconnected => {
                if c.is_reachable() {
                    c.set_reachable(false);
                    c.stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    warn!(node = %self.name,
                        "cluster unreachable: serving this node's shims alone until NATS is back");
                    for (peer, _) in self.peers.drain() {
                        let core = c.core_for(&peer);
                        self.inbound[core].push(Inbound::NodeGone(
                            Arc::from(peer.as_str()),
                            "cluster unreachable",
                        ));
                    }
                    c.stats.nodes.store(0, Ordering::Relaxed);
                }
            }
            other => debug!(event = %other, "cluster: NATS event"),
        }
    }

    async fn got(&mut self, g: Got) {
        match g {
            Got::Presence(b) => {
                self.count_in(b.len());
                // What was on its way when the connection dropped is not taken for news.
                if let Some(p) = wire::decode::<Presence>(&b)
                    && p.node != self.name
                    && self.cluster().is_reachable()
                {
                    self.presence(p).await;
                }
            }
            Got::Hello(b) => {
                self.count_in(b.len());
                if let Some(h) = wire::decode::<Hello>(&b)
                    && h.node != self.name
                {
                    self.snapshot_due = true;
                }
            }
            Got::Sync => {
                self.count_in(0);
                self.snapshot_due = true;
            }
            Got::Want(b) => {
                self.count_in(b.len());
                if let Some(w) = wire::decode::<Want>(&b)
                    && w.node != self.name
                {
                    self.publish_wanted(&w.pattern).await;
                }
            }
            Got::State(b) => {
                self.count_in(b.len());
                if let Some(s) = wire::decode::<State>(&b)
                    && s.node != self.name
                    && self
                        .peers
                        .get(&s.node)
                        .is_some_and(|p| p.epoch == s.epoch && p.members.contains_key(&s.serial))
                {
                    let core = self.cluster().core_for(&s.node);
                    self.inbound[core].push(Inbound::State(
                        Arc::from(s.node.as_str()),
                        s.serial,
                        s.items,
                    ));
                }
            }
        }
    }

    /// Another node's presence message.
    async fn presence(&mut self, p: Presence) {
        let now = Instant::now();
        let core = self.cluster().core_for(&p.node);
        let node: Arc<str> = Arc::from(p.node.as_str());
        let known = self.peers.get(&p.node).map(|peer| peer.epoch);
        if known != Some(p.epoch) {
            if known.is_some() {
                // The same name, a new process: the old one's shims are gone.
                self.inbound[core].push(Inbound::NodeGone(node.clone(), "node lost"));
            }
            info!(node = %p.node, "node joined");
            self.peers.insert(
                p.node.clone(),
                Peer {
                    epoch: p.epoch,
                    seq: 0,
                    synced: false,
                    heard: now,
                    asked: None,
                    members: HashMap::new(),
                    snapshot: None,
                    config: None,
                },
            );
            self.cluster()
                .stats
                .nodes
                .store(self.peers.len() as u64, Ordering::Relaxed);
        }
        let mine = self.hub.config().cluster_fingerprint();
        let peer = self.peers.get_mut(&p.node).expect("just made");
        peer.heard = now;
        if peer.config != Some((p.config, mine)) {
            if p.config != mine {
                warn!(node = %p.node,
                    "node's users, identity rule or limits differ from this node's: give every node the same");
            }
            peer.config = Some((p.config, mine));
        }
        let mut ask = false;
        let mut synced = false;
        match p.body {
            Body::Heartbeat => {
                if !peer.synced || p.seq != peer.seq {
                    peer.synced = false;
                    ask = true;
                }
            }
            Body::Changes(changes) => {
                if peer.synced && p.seq == peer.seq + changes.len() as u64 {
                    peer.seq = p.seq;
                    for ch in &changes {
                        match ch {
                            Change::Join(m) => {
                                peer.members.insert(m.serial, m.identity.clone());
                            }
                            Change::Leave(s, _) => {
                                peer.members.remove(s);
                            }
                            Change::Udp(..) => {}
                        }
                    }
                    self.inbound[core].push(Inbound::Changes(node.clone(), changes));
                } else if !(peer.synced && p.seq <= peer.seq) {
                    peer.synced = false;
                    ask = true;
                }
            }
            Body::Snapshot {
                part,
                parts,
                members,
            } => {
                if peer.synced && p.seq <= peer.seq && peer.snapshot.is_none() {
                    // Nothing it does not know.
                } else {
                    let snap = peer.snapshot.get_or_insert((p.seq, 0, Vec::new()));
                    if snap.0 != p.seq || snap.1 != part {
                        *snap = (p.seq, 0, Vec::new());
                    }
                    if snap.1 == part {
                        snap.1 += 1;
                        snap.2.extend(members);
                    }
                    if snap.1 == parts {
                        let (seq, _, members) = peer.snapshot.take().expect("being received");
                        peer.members = (members.iter())
                            .map(|m| (m.serial, m.identity.clone()))
                            .collect();
                        peer.seq = seq;
                        synced = !peer.synced;
                        peer.synced = true;
                        // The core compares it with the remote shims it holds, when it
                        // gets there (after everything before it from this node).
                        self.inbound[core].push(Inbound::Snapshot(node.clone(), members));
                    }
                }
            }
        }
        if synced {
            // Its shims are known here now: their state can be taken in. (Asked before
            // the snapshot, it would be dropped, for shims not known yet.)
            for pat in self.interest.keys().cloned().collect::<Vec<_>>() {
                self.want(&pat).await;
            }
        }
        if ask {
            let peer = self.peers.get_mut(&p.node).expect("known");
            if peer
                .asked
                .is_none_or(|t| now.duration_since(t) >= HEARTBEAT)
            {
                peer.asked = Some(now);
                self.cluster().stats.resyncs.fetch_add(1, Ordering::Relaxed);
                let hello = wire::encode(&Hello {
                    node: self.name.clone(),
                });
                self.publish(self.subject(&format!("sync.{}", p.node)), hello)
                    .await;
            }
        }
    }

    /// What the cores queued: published in as few messages as it takes.
    async fn outbound(&mut self) {
        let c = self.hub.cluster().expect("a clustered hub");
        let mut items = c.take_outbound();
        if c.lost.swap(false, Ordering::AcqRel) {
            // Presence changes were dropped: those taken now are no use either. This
            // node's membership is read from the router (where every change is made under
            // its lock), and sent whole.
            items.retain(|i| !matches!(i, Outbound::Change(_)));
            self.local.clear();
            let hub = self.hub.clone();
            hub.router.for_each_match(&Pattern::all(), |s| {
                if !s.is_remote() && !s.is_closed() && s.is_identified() {
                    self.local.insert(s.serial, hub.member(s, None));
                }
            });
            self.seq += 1;
            self.snapshot_due = true;
        }
        if items.is_empty() {
            return;
        }
        let mut changes = Vec::new();
        let mut direct: Vec<(Arc<str>, Vec<Routed>, usize)> = Vec::new();
        let mut states = Vec::new();
        for item in items {
            match item {
                Outbound::Change(ch) => {
                    match &ch {
                        Change::Join(m) => {
                            self.local.insert(
                                m.serial,
                                Member {
                                    replaces: None,
                                    ..m.clone()
                                },
                            );
                        }
                        Change::Leave(s, _) => {
                            self.local.remove(s);
                        }
                        Change::Udp(s, b) => {
                            if let Some(m) = self.local.get_mut(s) {
                                m.udp = *b;
                            }
                        }
                    }
                    changes.push(ch);
                }
                Outbound::Route(node, r) => {
                    let size = match &r {
                        Routed::Route { text, target, .. } => text.len() + target.len() + 64,
                        Routed::Response { text, .. } => text.len() + 64,
                    };
                    match direct
                        .iter_mut()
                        .find(|(n, _, b)| *n == node && *b < DIRECT_BYTES)
                    {
                        Some((_, v, b)) => {
                            v.push(r);
                            *b += size;
                        }
                        None => direct.push((node, vec![r], size)),
                    }
                }
                Outbound::State(shim) => states.push(shim),
                Outbound::Interest(pattern, add) => self.interest_changed(pattern, add).await,
            }
        }
        for chunk in changes.chunks(SNAPSHOT_PART) {
            self.seq += chunk.len() as u64;
            let msg = wire::encode(&Presence {
                node: self.name.clone(),
                epoch: self.epoch,
                seq: self.seq,
                config: self.hub.config().cluster_fingerprint(),
                body: Body::Changes(chunk.to_vec()),
            });
            self.publish(self.subject("presence"), msg).await;
        }
        for (node, items, _) in direct {
            let msg = wire::encode(&Direct {
                node: self.name.clone(),
                epoch: self.epoch,
                items,
            });
            self.publish(self.subject(&format!("node.{node}")), msg)
                .await;
        }
        for shim in states {
            self.publish_state(&shim).await;
        }
    }

    /// Publishes the whole state of the local shim `shim` on its subject.
    async fn publish_state(&self, shim: &crate::hub::shim::Shim) {
        if shim.is_closed() || !shim.is_identified() {
            return;
        }
        let now_ms = self.hub.ms(Instant::now());
        let mut items = Vec::new();
        self.hub.state_items(shim, |k, v, at| {
            items.push((k.to_owned(), now_ms.saturating_sub(at), v.to_vec()));
        });
        let identity = shim.identity().to_ascii_lowercase();
        let msg = wire::encode(&State {
            node: self.name.clone(),
            epoch: self.epoch,
            serial: shim.serial,
            items,
        });
        self.publish(self.subject(&format!("state.{identity}")), msg)
            .await;
    }

    /// Another node wants the state of the shims `pattern` names.
    async fn publish_wanted(&self, pattern: &str) {
        let Ok(p) = Pattern::parse(pattern.as_bytes()) else {
            return;
        };
        let mut shims = Vec::new();
        self.hub.router.for_each_match(&p, |s| {
            if !s.is_remote() {
                shims.push(s.clone());
            }
        });
        for s in shims {
            let has = s.state.lock().as_ref().is_some_and(|st| st.has_entries());
            if has {
                self.publish_state(&s).await;
            }
        }
    }

    /// Asks every node for the state `pattern` names.
    async fn want(&self, pattern: &str) {
        let msg = wire::encode(&Want {
            node: self.name.clone(),
            pattern: pattern.to_owned(),
        });
        self.publish(self.subject("want"), msg).await;
    }

    async fn interest_changed(&mut self, pattern: String, add: bool) {
        if add {
            if self.interest.contains_key(&pattern) {
                return;
            }
            let subject = self.subject(&format!("state.{pattern}"));
            match self.client.subscribe(subject.clone()).await {
                Ok(mut s) => {
                    let tx = self.got.clone();
                    let task = tokio::spawn(async move {
                        while let Some(m) = s.next().await {
                            if tx.send(Got::State(m.payload)).await.is_err() {
                                break;
                            }
                        }
                    });
                    self.interest.insert(pattern.clone(), task);
                    self.want(&pattern).await;
                }
                Err(e) => warn!(%subject, error = %e, "cluster: cannot subscribe"),
            }
        } else if let Some(task) = self.interest.remove(&pattern) {
            // Dropping the subscriber unsubscribes.
            task.abort();
        }
    }

    async fn heartbeat(&self) {
        let msg = wire::encode(&Presence {
            node: self.name.clone(),
            epoch: self.epoch,
            seq: self.seq,
            config: self.hub.config().cluster_fingerprint(),
            body: Body::Heartbeat,
        });
        self.publish(self.subject("presence"), msg).await;
    }

    /// Nodes silent for [`NODE_LOST`] are gone, with their shims.
    fn expire(&mut self, now: Instant) {
        let c = self.hub.cluster().expect("a clustered hub");
        let lost: Vec<String> = (self.peers.iter())
            .filter(|(_, p)| now.duration_since(p.heard) >= NODE_LOST)
            .map(|(n, _)| n.clone())
            .collect();
        for n in lost {
            let p = self.peers.remove(&n).expect("listed");
            warn!(node = %n, shims = p.members.len(), "node lost");
            let core = c.core_for(&n);
            self.inbound[core].push(Inbound::NodeGone(Arc::from(n.as_str()), "node lost"));
        }
        c.stats
            .nodes
            .store(self.peers.len() as u64, Ordering::Relaxed);
    }

    async fn publish_snapshot(&self) {
        let members: Vec<Member> = self.local.values().cloned().collect();
        let parts = members.len().div_ceil(SNAPSHOT_PART).max(1) as u32;
        let mut chunks: Vec<Vec<Member>> = members
            .chunks(SNAPSHOT_PART)
            .map(<[Member]>::to_vec)
            .collect();
        if chunks.is_empty() {
            chunks.push(Vec::new());
        }
        for (i, members) in chunks.into_iter().enumerate() {
            let msg = wire::encode(&Presence {
                node: self.name.clone(),
                epoch: self.epoch,
                seq: self.seq,
                config: self.hub.config().cluster_fingerprint(),
                body: Body::Snapshot {
                    part: i as u32,
                    parts,
                    members,
                },
            });
            self.publish(self.subject("presence"), msg).await;
        }
    }

    /// Hands this turn's inbound items to the cores.
    fn hand_over(&mut self) {
        let c = self.hub.cluster().expect("a clustered hub");
        for (core, items) in self.inbound.iter_mut().enumerate() {
            if !items.is_empty() {
                c.deliver(core, std::mem::take(items));
            }
        }
    }
}

/// Delivers the frames other nodes route to shims here, from the cluster thread: outboxes
/// take frames from any thread, and their flush is a non-blocking send. What arrived
/// together is flushed together.
async fn deliver_direct(hub: Arc<Hub>, mut sub: async_nats::Subscriber) {
    let mut out = Effects::default();
    while let Some(first) = sub.next().await {
        out.begin(&hub, hub.ms(Instant::now()));
        let mut next = Some(first);
        let mut n = 0;
        while let Some(m) = next.take() {
            if let Some(c) = hub.cluster() {
                c.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                (c.stats.bytes_in).fetch_add(m.payload.len() as u64, Ordering::Relaxed);
            }
            if let Some(d) = wire::decode::<Direct>(&m.payload) {
                let node: Arc<str> = Arc::from(d.node.as_str());
                // What goes on over UDP is sent by a core, from its UDP socket.
                let (udp, tcp): (Vec<Routed>, Vec<Routed>) =
                    d.items.into_iter().partition(Routed::udp);
                hub.cluster_routed(&node, d.epoch, tcp, &mut out);
                if !udp.is_empty()
                    && let Some(c) = hub.cluster()
                {
                    c.deliver(c.core_for(&node), vec![Inbound::Routed(node, d.epoch, udp)]);
                }
            }
            n += 1;
            if n < TURN {
                // What else has arrived, without waiting.
                next = futures_util::FutureExt::now_or_never(sub.next()).flatten();
            }
        }
        let now_ms = hub.ms(Instant::now());
        for shim in out.flush.drain(..) {
            shim.outbox.flush(now_ms);
        }
        // Routed frames from other nodes go over TCP: no datagram is made here.
        out.datagrams.clear();
        hub.finish(0, &mut out, Instant::now());
        out.release_congested();
    }
}
