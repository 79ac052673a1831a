//! Relay-state benchmarks (issue 12): shims publishing their state every tick, watchers
//! receiving what changed.
//!
//! (a) NETBOTS: S shims (default 54), K keys each (default 22: 21 short text values of
//!     10-30 bytes and `t`, the send time), T ticks per second (default 20), about C% of
//!     the keys changing per tick (default 30: `t` and 6 of the 21 others), every shim
//!     watching every other one. Each tick, each shim sends its whole state:
//!     - velium, UDP: one Set datagram with all K keys (the hub drops unchanged values),
//!       each shim subscribed with `Subscribe 1 0 >` (the pattern leaves the subscriber
//!       itself out) and bound over UDP, so deltas come back as UDP datagrams;
//!     - velium, TCP only: the same over TCP, no UDP bind;
//!     - nats-server, changed keys: one subject per key (`state.SHIM.KEY`), the publisher
//!       sending only the keys that changed (the best a NATS user can do), every shim
//!       subscribed to `state.>` with `"echo":false` (so it does not get its own);
//!     - nats-server, every key every tick: the E3Next way, no change filter, every key to
//!       every peer, measured over nats the same way.
//!     Measured over a window after a warm-up: deliveries per second (changed values
//!     delivered to subscribers: State D items for velium, MSGs for nats), the server's
//!     CPU (utime + stime from /proc) per delivery, the latency from a set to its
//!     delivery (the `t` key's value is the send time in µs from an Instant shared by
//!     every client; every client is in this process), and the bytes the subscribers
//!     received (protocol bytes: TCP payload and UDP payload, no IP/TCP/UDP headers).
//!     The full refresh velium sends a UDP subscriber 20-30 s after its deltas started
//!     (F frames over TCP, counted apart from the deliveries; their bytes are in the
//!     total) falls after the default window (2 s warm-up, then 10 s); `--seconds 30`
//!     takes it in. The publish-everything bytes
//!     are also computed exactly from what the window's PUBs make, and in velium's own
//!     framing (the State D frame that would carry every key).
//! (b) FLEET: F shims (default 2,000) in Z zones (default 50; identities
//!     `bench.zNN.sNNNN`), the same state and change rate, T' ticks per second (default
//!     10), each subscribed to its own zone (`bench.zNN.*`; nats `state.zNN.>`):
//!     deliveries per second, latency, server RSS. Open loop: a shim whose tick is more
//!     than one period late skips it, so a saturated run shows a lower achieved Set rate.
//! (c) FILTER: a Command to one shim of a fleet (default 2,000, `bench.zNN.sNNNN`, each
//!     holding 11 keys, the six of the default `state_index` and `role` among them) named
//!     by a filter on its state, against a Command to its exact identity, in the same run:
//!     an indexed key (`bench.>,group=sNNNN`, the target alone in its group), an unindexed
//!     one over every shim (`bench.>,role=ma`) and over the target's zone
//!     (`bench.zNN.*,role=ma`), and, on a second server started with `--state-index none`
//!     beside the first, the same `group` filter. Two phases: one Command at a time
//!     (written -> its Ack and the target's answer both read; the targets in turn, a
//!     batch of Commands to one at a time, each batch after a few unrecorded ones), then
//!     up to W in flight for short interleaved blocks (Commands/s, server CPU per Command,
//!     and from the server's `/metrics` the filtered targets and candidates, the shims
//!     looked at, per Command).
//!
//! The load generator runs in this process on `--threads` (default 1) current-thread
//! tokio runtimes, each driving its share of the shims in raw protocol bytes. Each row
//! also reports what tells a server-bound figure from a noisy machine: the CPU of the
//! bench, of the kernel's softirq threads and of every other process in the window, how
//! late a 1 ms sleep woke, the datagrams the kernel dropped at the server's and the
//! bench's UDP sockets (/proc/net/udp), and for velium the hub's own counters over the
//! window (its `/metrics`, from an `--admin` listener on a loopback port: Sets applied,
//! items delivered, coalesced). `VELIUM_BENCH_TRACE=1` prints, per row, when the
//! deliveries later than 5 ms were sent (in 50 ms buckets): a stall shows as a few
//! buckets holding most of them.
//!
//! Settings (flag or environment `VELIUM_BENCH_<NAME>`): `--shims` (54), `--keys` (22),
//! `--ticks` (20), `--change` (30, percent), `--seconds` (10, measured per round),
//! `--warmup` (2), `--rounds` (1; NetBots rounds are interleaved, a fresh server each,
//! figures summed and histograms merged), `--fleet` (2000), `--zones` (50),
//! `--fleet_ticks` (10), `--fleet_seconds` (10), `--threads` (1); for the filter part
//! `--filter_shims` (2000), `--filter_samples` (2000 per target), `--filter_batch` (50),
//! `--filter_warmup` (5 per batch), `--filter_window` (32), `--filter_block_ms` (250),
//! `--filter_rounds` (8); `VELIUM_BENCH_ONLY=uring,epoll,nats`,
//! `VELIUM_BENCH_PARTS=netbots,fleet,filter`.

mod common;
#[path = "common/state.rs"]
mod state_load;

use common::{
    CpuMeter, Hist, LatRow, QUIET, Server, System, banner, cap_connections, connect_from, cpu_secs,
    floor, fmt_bytes, fmt_cpu, fmt_rate, part, print_latency_table, ratio, read_until, selected,
    setting, source_ip, target, udp_bind_confirm, udp_to, velium_identify,
};
use state_load::{T_KEY, key_names, value_of};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use velium_server::proto::state::{
    Mode, StateFrame, encode_set, encode_subscribe, item_len, parse_state,
};

/// How a row drives its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// velium: Set over UDP, deltas over UDP.
    VeliumUdp,
    /// velium: no UDP bind; Set and deltas over TCP.
    VeliumTcp,
    /// nats: one subject per key, only changed keys published.
    NatsChanged,
    /// nats: every key published every tick.
    NatsAll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    system: System,
    way: Way,
}

impl Row {
    fn name(&self) -> String {
        let how = match self.way {
            Way::VeliumUdp => "UDP",
            Way::VeliumTcp => "TCP only",
            Way::NatsChanged => "changed keys",
            Way::NatsAll => "every key every tick",
        };
        format!("{}, {how}", self.system.name())
    }

    fn velium(&self) -> bool {
        matches!(self.way, Way::VeliumUdp | Way::VeliumTcp)
    }
}

const NETBOTS_ROWS: [Row; 5] = [
    Row {
        system: System::VeliumUring,
        way: Way::VeliumUdp,
    },
    Row {
        system: System::VeliumEpoll,
        way: Way::VeliumUdp,
    },
    Row {
        system: System::VeliumUring,
        way: Way::VeliumTcp,
    },
    Row {
        system: System::Nats,
        way: Way::NatsChanged,
    },
    Row {
        system: System::Nats,
        way: Way::NatsAll,
    },
];

const FLEET_ROWS: [Row; 3] = [
    Row {
        system: System::VeliumUring,
        way: Way::VeliumUdp,
    },
    Row {
        system: System::VeliumEpoll,
        way: Way::VeliumUdp,
    },
    Row {
        system: System::Nats,
        way: Way::NatsChanged,
    },
];

/// The workload: who the shims are, what they send and how often.
#[derive(Clone)]
struct Load {
    shims: usize,
    /// 0: one group, everyone watching everyone (`>`); else zones watched each by its own.
    zones: usize,
    /// Key names, `t` last.
    keys: Vec<String>,
    /// Keys changed per tick, `t` included.
    change: usize,
    period: Duration,
    warm: Duration,
    measure: Duration,
    threads: usize,
}

impl Load {
    fn zone(&self, i: usize) -> usize {
        if self.zones == 0 { 0 } else { i % self.zones }
    }

    fn identity(&self, i: usize) -> String {
        if self.zones == 0 {
            format!("bench.nb.s{i:02}")
        } else {
            format!("bench.z{:02}.s{i:04}", self.zone(i))
        }
    }

    /// The nats subject prefix of shim `i` (a key's subject is PREFIX.KEY).
    fn nats_prefix(&self, i: usize) -> String {
        if self.zones == 0 {
            format!("state.s{i:02}")
        } else {
            format!("state.z{:02}.s{i:04}", self.zone(i))
        }
    }

    fn velium_pattern(&self, i: usize) -> String {
        if self.zones == 0 {
            ">".into()
        } else {
            format!("bench.z{:02}.*", self.zone(i))
        }
    }

    fn nats_sub(&self, i: usize) -> String {
        if self.zones == 0 {
            "state.>".into()
        } else {
            format!("state.z{:02}.>", self.zone(i))
        }
    }

    /// How many shims watch shim `i` (and how many shim `i` watches).
    fn watchers(&self, i: usize) -> usize {
        if self.zones == 0 {
            self.shims - 1
        } else {
            let z = self.zone(i);
            (0..self.shims).filter(|&j| j % self.zones == z).count() - 1
        }
    }

    fn ticks_per_sec(&self) -> f64 {
        1.0 / self.period.as_secs_f64()
    }
}

fn main() {
    floor::maybe_run();
    banner("state");
    let threads = setting("threads", 1).max(1);
    let rounds = setting("rounds", 1).max(1);
    let warm = Duration::from_secs(setting("warmup", 2) as u64);
    let keys = key_names(setting("keys", 22).max(2));
    let change_pct = setting("change", 30).min(100);
    let change = ((keys.len() * change_pct) as f64 / 100.0).round().max(1.0) as usize;
    let netbots = Load {
        shims: setting("shims", 54).max(2),
        zones: 0,
        keys: keys.clone(),
        change,
        period: Duration::from_secs_f64(1.0 / setting("ticks", 20).max(1) as f64),
        warm,
        measure: Duration::from_secs(setting("seconds", 10).max(1) as u64),
        threads,
    };
    let fleet = Load {
        shims: setting("fleet", 2000).max(2),
        zones: setting("zones", 50).max(1),
        keys,
        change,
        period: Duration::from_secs_f64(1.0 / setting("fleet_ticks", 10).max(1) as f64),
        warm,
        measure: Duration::from_secs(setting("fleet_seconds", 10).max(1) as u64),
        threads,
    };
    println!(
        "- load generator: {threads} current-thread tokio runtime(s) in this process, raw \
         protocol bytes; every shim's connections from 127.0.0.1-127.0.0.4 in turn"
    );
    println!();

    let mut nb_results: Vec<(Row, RunResult)> = Vec::new();
    if part("netbots") {
        let t_part = Instant::now();
        println!(
            "## NetBots-like: {} shims x {} keys, {:.0} ticks/s, {} keys changing per tick \
             (`t` and {} of the {} others), every shim watching the {} others; {} s warm-up, \
             {} s measured{}",
            netbots.shims,
            netbots.keys.len(),
            netbots.ticks_per_sec(),
            netbots.change,
            netbots.change - 1,
            netbots.keys.len() - 1,
            netbots.shims - 1,
            netbots.warm.as_secs(),
            netbots.measure.as_secs(),
            if rounds > 1 {
                format!(", {rounds} interleaved rounds (a fresh server each; figures summed)")
            } else {
                String::new()
            }
        );
        println!();
        for _ in 0..rounds {
            for row in NETBOTS_ROWS {
                if !selected(row.system) {
                    continue;
                }
                let Some(r) = run(row, &netbots) else {
                    continue;
                };
                match nb_results.iter_mut().find(|(x, _)| *x == row) {
                    Some((_, acc)) => acc.merge(r),
                    None => nb_results.push((row, r)),
                }
            }
        }
        report_netbots(&netbots, &nb_results);
        println!("(NetBots part: {:.0} s)", t_part.elapsed().as_secs_f64());
        println!();
    }

    let mut fleet_results: Vec<(Row, RunResult)> = Vec::new();
    if part("fleet") {
        let t_part = Instant::now();
        println!(
            "## Fleet: {} shims in {} zones (`bench.zNN.sNNNN`), {} keys, {:.0} ticks/s, {} \
             keys changing per tick, each watching its own zone (`bench.zNN.*`, {} others); \
             {} s warm-up, {} s measured",
            fleet.shims,
            fleet.zones,
            fleet.keys.len(),
            fleet.ticks_per_sec(),
            fleet.change,
            fleet.watchers(0),
            fleet.warm.as_secs(),
            fleet.measure.as_secs(),
        );
        println!();
        for row in FLEET_ROWS {
            if !selected(row.system) {
                continue;
            }
            if let Some(r) = run(row, &fleet) {
                fleet_results.push((row, r));
            }
        }
        report_fleet(&fleet, &fleet_results);
        println!("(fleet part: {:.0} s)", t_part.elapsed().as_secs_f64());
        println!();
    }

    if part("filter") {
        let t_part = Instant::now();
        filter_part();
        println!("(filter part: {:.0} s)", t_part.elapsed().as_secs_f64());
        println!();
    }

    // ----- targets -----
    if part("netbots") {
        println!("## Targets");
        println!();
        targets(&nb_results);
        println!();
    }
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// What one run (or several rounds of one row, summed) measured.
#[derive(Default)]
struct RunResult {
    /// Set -> delivery of the `t` key, deliveries in the window.
    hist: Hist,
    /// Items (velium D) or MSGs (nats) received in the window.
    delivered: u64,
    /// What the sets sent in the window should have delivered.
    expected: u64,
    /// Bytes received by subscribers in the window (TCP + UDP payloads).
    bytes: u64,
    /// UDP datagrams received by subscribers in the window.
    datagrams: u64,
    /// State D frames (velium) or MSGs (nats) received in the window.
    frames: u64,
    /// velium State F frames received in the window (a resync; none expected).
    full_frames: u64,
    /// Their items, and the bytes that came over UDP (the rest: TCP).
    full_items: u64,
    udp_bytes: u64,
    /// velium Presence frames received in the window (none expected).
    presence: u64,
    /// Error frames (velium) or -ERR (nats), all run long.
    errors: u64,
    first_error: String,
    /// Frames that did not parse.
    bad_frames: u64,
    /// Subscriptions acknowledged, and those whose Ack count was not the watched count.
    acks: u64,
    ack_mismatch: u64,
    ack_first_mismatch: String,
    /// Set frames (velium) or PUB batches (nats) sent in the window.
    sets: u64,
    /// Ticks skipped (more than one period late) in the window.
    skipped: u64,
    /// Bytes a velium State frame with every key would take, times the watchers, for the
    /// sets sent in the window (ages written as 0: a lower bound).
    everything_bytes: u64,
    /// nats: the bytes of the MSGs the window's PUBs make, times the watchers (exact: what
    /// full delivery takes).
    wire_bytes: u64,
    /// Bytes the publishers sent in the window.
    sent_bytes: u64,
    /// Seconds measured (summed over rounds).
    window_s: f64,
    server_cpu_s: f64,
    bench_cpu_s: f64,
    /// CPU of the kernel's softirq threads in the window.
    softirqd_cpu_s: f64,
    /// CPU used by every other process of the machine in the window (/proc/stat busy time
    /// less the server's, this process's and the softirq threads').
    other_cpu_s: f64,
    /// Server RSS at the end of the window (the largest over rounds), and at the start.
    rss_end: u64,
    rss_idle: u64,
    /// System-wide UDP receive errors in the window (/proc/net/snmp InErrors).
    udp_in_errors: u64,
    /// Datagrams dropped in the window by the server's UDP sockets and by this process's
    /// (their receive buffers full; /proc/net/udp `drops`).
    udp_drops_server: u64,
    udp_drops_bench: u64,
    /// velium: the hub's counters over the window.
    hub: Option<HubCounters>,
    /// How late a 1 ms sleep of a thread of this process woke in the window.
    stall: Hist,
    /// How late a 1 ms tokio sleep woke in the generator's runtime(s), in the window.
    rt_late: Hist,
    /// velium: the AGE (ms) the hub wrote on the delivered `t` items.
    age: Hist,
    /// The control probe's Ping -> Pong round trips in the window, and its pings left
    /// unanswered.
    rtt: Hist,
    rtt_lost: u64,
    /// The busiest other processes in the window (command, share of a core).
    top_others: Vec<(String, f64)>,
    /// Server log lines at warn or error level, and the first one.
    warn_lines: usize,
    first_warn: String,
    setup_s: f64,
    setup_errors: Vec<String>,
}

impl RunResult {
    fn merge(&mut self, o: RunResult) {
        self.hist.merge(&o.hist);
        self.delivered += o.delivered;
        self.expected += o.expected;
        self.bytes += o.bytes;
        self.datagrams += o.datagrams;
        self.frames += o.frames;
        self.full_frames += o.full_frames;
        self.full_items += o.full_items;
        self.udp_bytes += o.udp_bytes;
        self.presence += o.presence;
        self.errors += o.errors;
        if self.first_error.is_empty() {
            self.first_error = o.first_error;
        }
        self.bad_frames += o.bad_frames;
        self.acks += o.acks;
        self.ack_mismatch += o.ack_mismatch;
        if self.ack_first_mismatch.is_empty() {
            self.ack_first_mismatch = o.ack_first_mismatch;
        }
        self.sets += o.sets;
        self.skipped += o.skipped;
        self.everything_bytes += o.everything_bytes;
        self.wire_bytes += o.wire_bytes;
        self.sent_bytes += o.sent_bytes;
        self.window_s += o.window_s;
        self.server_cpu_s += o.server_cpu_s;
        self.bench_cpu_s += o.bench_cpu_s;
        self.other_cpu_s += o.other_cpu_s;
        self.softirqd_cpu_s += o.softirqd_cpu_s;
        self.udp_drops_server += o.udp_drops_server;
        self.udp_drops_bench += o.udp_drops_bench;
        self.stall.merge(&o.stall);
        self.rt_late.merge(&o.rt_late);
        self.age.merge(&o.age);
        self.rtt.merge(&o.rtt);
        self.rtt_lost += o.rtt_lost;
        if self.top_others.is_empty() {
            self.top_others = o.top_others;
        }
        match (&mut self.hub, &o.hub) {
            (Some(a), Some(b)) => a.add(b),
            (None, Some(b)) => self.hub = Some(*b),
            _ => {}
        }
        self.rss_end = self.rss_end.max(o.rss_end);
        self.rss_idle = self.rss_idle.max(o.rss_idle);
        self.udp_in_errors += o.udp_in_errors;
        self.warn_lines += o.warn_lines;
        if self.first_warn.is_empty() {
            self.first_warn = o.first_warn;
        }
        self.setup_s = self.setup_s.max(o.setup_s);
        self.setup_errors.extend(o.setup_errors);
    }

    fn per_sec(&self, v: u64) -> f64 {
        v as f64 / self.window_s.max(1e-9)
    }

    /// Server CPU per delivery, µs.
    fn cpu_per_delivery_us(&self) -> f64 {
        self.server_cpu_s * 1e6 / self.delivered.max(1) as f64
    }

    fn completeness(&self) -> f64 {
        self.delivered as f64 / self.expected.max(1) as f64
    }

    fn notes(&self, load: &Load) -> Vec<String> {
        let mut n = Vec::new();
        if !self.setup_errors.is_empty() {
            n.push(format!(
                "{} setup errors, first: {}",
                self.setup_errors.len(),
                self.setup_errors[0]
            ));
        }
        if self.errors > 0 {
            n.push(format!(
                "{} Error frames, first: {:?}",
                self.errors, self.first_error
            ));
        }
        if self.bad_frames > 0 {
            n.push(format!("{} frames that did not parse", self.bad_frames));
        }
        if self.ack_mismatch > 0 {
            n.push(format!(
                "{} of {} Subscribe Acks did not count the watched shims: {}",
                self.ack_mismatch, self.acks, self.ack_first_mismatch
            ));
        }
        if self.full_frames > 0 {
            n.push(format!(
                "{} State F frames/s in the window ({} items/s; over TCP: the refresh of shims \
                 whose deltas went over UDP, 20-30 s after), not counted as deliveries; their \
                 bytes are in the total",
                fmt_rate(self.per_sec(self.full_frames)),
                fmt_rate(self.per_sec(self.full_items))
            ));
        }
        if self.udp_bytes > 0 {
            n.push(format!(
                "bytes to subscribers: {}/s over UDP, {}/s over TCP",
                fmt_bytes(self.per_sec(self.udp_bytes)),
                fmt_bytes(self.per_sec(self.bytes - self.udp_bytes))
            ));
        }
        if self.presence > 0 {
            n.push(format!("{} Presence frames in the window", self.presence));
        }
        if self.skipped > 0 {
            n.push(format!(
                "{} ticks skipped (the generator was more than one period late), {:.0} Set/s \
                 achieved of {:.0} scheduled",
                self.skipped,
                self.per_sec(self.sets),
                load.shims as f64 * load.ticks_per_sec()
            ));
        }
        if self.udp_in_errors > 0 || self.udp_drops_server > 0 || self.udp_drops_bench > 0 {
            n.push(format!(
                "UDP datagrams dropped by the kernel in the window (receive buffer full): {} \
                 by the server's sockets, {} by the bench's ({} in all, /proc/net/snmp \
                 InErrors)",
                self.udp_drops_server, self.udp_drops_bench, self.udp_in_errors
            ));
        }
        if !self.rtt.is_empty() || self.rtt_lost > 0 {
            n.push(format!(
                "control: Ping -> Pong on an extra connection, one at a time, 5 ms apart ({}): \
                 {} answered, p50 {} µs, p99 {} µs, max {} µs{}",
                if self.udp_bytes > 0 {
                    "over UDP"
                } else {
                    "over TCP"
                },
                self.rtt.len(),
                us(self.rtt.us(0.5)),
                us(self.rtt.us(0.99)),
                us(self.rtt.max_us()),
                if self.rtt_lost > 0 {
                    format!(
                        ", {} unanswered (1 s over UDP, 10 s over TCP)",
                        self.rtt_lost
                    )
                } else {
                    String::new()
                }
            ));
        }
        if !self.age.is_empty() {
            n.push(format!(
                "the AGE the hub wrote on the `t` items (set accepted -> frame built, whole \
                 ms): p50 {:.0}, p99 {:.0}, p99.9 {:.0}, max {:.0} ms",
                self.age.us(0.5) / 1000.0,
                self.age.us(0.99) / 1000.0,
                self.age.us(0.999) / 1000.0,
                self.age.max_us() / 1000.0
            ));
        }
        if let Some(h) = &self.hub {
            n.push(format!(
                "the hub's counters over the window: {} Sets applied/s ({} of those sent), {} \
                 changes/s, {} items delivered/s, D and F (the bench received {} of them), {} \
                 coalesced/s, {} datagrams dropped by its send queues, {} refusals, {} slow \
                 consumers",
                fmt_rate(self.per_sec(h.sets)),
                pct(h.sets as f64 / self.sets.max(1) as f64),
                fmt_rate(self.per_sec(h.changes)),
                fmt_rate(self.per_sec(h.delivered)),
                pct((self.delivered + self.full_items) as f64 / h.delivered.max(1) as f64),
                fmt_rate(self.per_sec(h.coalesced)),
                h.udp_dropped,
                h.refused,
                h.slow_consumers
            ));
        }
        if !self.stall.is_empty() {
            n.push(format!(
                "machine: a 1 ms sleep woke up to {} ms late (p99 {} ms), in the bench's \
                 runtime up to {} ms (p99 {} ms){}",
                us(self.stall.max_us() / 1000.0),
                us(self.stall.us(0.99) / 1000.0),
                us(self.rt_late.max_us() / 1000.0),
                us(self.rt_late.us(0.99) / 1000.0),
                if self.top_others.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; busiest other processes: {}",
                        self.top_others
                            .iter()
                            .map(|(n, c)| format!("{n} {}", fmt_cpu(*c)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ));
        }
        if self.warn_lines > 0 {
            n.push(format!(
                "{} server log lines at warn/error, first: {:?}",
                self.warn_lines, self.first_warn
            ));
        }
        n
    }
}

fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

fn report_netbots(load: &Load, results: &[(Row, RunResult)]) {
    if results.is_empty() {
        return;
    }
    println!(
        "| system | sets/s | deliveries/s | delivered / expected | server CPU | server CPU per \
         delivery | bench CPU | ksoftirqd CPU | other processes' CPU | bytes/s to subscribers \
         | bytes per delivery |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (row, r) in results {
        println!(
            "| {} | {} | {} | {} | {} | {} µs | {} | {} | {} | {}/s | {:.1} |",
            row.name(),
            fmt_rate(r.per_sec(r.sets)),
            fmt_rate(r.per_sec(r.delivered)),
            pct(r.completeness()),
            fmt_cpu(r.server_cpu_s / r.window_s.max(1e-9)),
            us(r.cpu_per_delivery_us()),
            fmt_cpu(r.bench_cpu_s / r.window_s.max(1e-9)),
            fmt_cpu(r.softirqd_cpu_s / r.window_s.max(1e-9)),
            fmt_cpu(r.other_cpu_s / r.window_s.max(1e-9)),
            fmt_bytes(r.per_sec(r.bytes)),
            r.bytes as f64 / r.delivered.max(1) as f64,
        );
    }
    println!();
    for (row, r) in results {
        for n in r.notes(load) {
            println!("- {}: {n}", row.name());
        }
        if row.velium() && r.frames > 0 {
            println!(
                "- {}: {} State D frames/s ({:.2} items each), server CPU {} µs per frame{}",
                row.name(),
                fmt_rate(r.per_sec(r.frames)),
                r.delivered as f64 / r.frames as f64,
                us(r.server_cpu_s * 1e6 / r.frames as f64),
                if r.datagrams > 0 {
                    format!(", {} UDP datagrams/s", fmt_rate(r.per_sec(r.datagrams)))
                } else {
                    String::new()
                }
            );
        }
    }
    println!(
        "- sets/s: velium Set frames (each the shim's whole state) or nats PUB batches (one \
         tick of one shim) sent in the window. deliveries: values delivered to subscribers \
         (velium: items of State D frames; nats: MSGs); expected: the values the window's sets \
         changed (for \"every key every tick\": every value) times the watchers. CPU: share of \
         one core over the window (server: utime + stime of its process; bench: this whole \
         process; ksoftirqd: the kernel's softirq threads, where loopback receive processing \
         goes once a CPU is busy with it; other processes: the machine's busy time from \
         /proc/stat, steal excluded, less all three). Bytes: \
         protocol bytes the subscribers received (TCP and UDP payloads; no IP/TCP/UDP headers)."
    );
    println!();
    print_latency_table(
        "Set -> delivery (the `t` key: its value is the send time)",
        "deliveries/s",
        &lat_rows(results),
    );

    // Against nats-server (changed keys), and the bytes against publishing everything.
    let find = |w: Way| results.iter().find(|(r, _)| r.way == w).map(|(_, r)| r);
    let nats = find(Way::NatsChanged);
    let all = find(Way::NatsAll);
    if nats.is_none() && all.is_none() {
        return;
    }
    println!(
        "Against nats-server (changed keys), and the bytes against the publish-everything way \
         (every key every tick to every peer):"
    );
    println!();
    println!(
        "| system | p50 / nats | p99 / nats | server CPU per delivery / nats | bytes / \
         everything over nats (measured) | bytes / everything over nats (full delivery, \
         computed) | bytes / everything in velium framing (computed) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (row, r) in results {
        let (p50, p99, cpu) = match nats {
            Some(n) => (
                ratio(r.hist.us(0.5), n.hist.us(0.5)),
                ratio(r.hist.us(0.99), n.hist.us(0.99)),
                ratio(r.cpu_per_delivery_us(), n.cpu_per_delivery_us()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let (b_meas, b_full) = all.map_or(("-".into(), "-".into()), |a| {
            (
                ratio(r.per_sec(r.bytes), a.per_sec(a.bytes)),
                ratio(r.per_sec(r.bytes), a.per_sec(a.wire_bytes)),
            )
        });
        let b_comp = if row.velium() && r.everything_bytes > 0 {
            ratio(r.bytes as f64, r.everything_bytes as f64)
        } else {
            "-".into()
        };
        println!(
            "| {} | {p50} | {p99} | {cpu} | {b_meas} | {b_full} | {b_comp} |",
            row.name()
        );
    }
    println!();
    if let Some(a) = all {
        println!(
            "- everything over nats: measured {}/s received; full delivery of the window's \
             PUBs takes {}/s (each PUB's MSG, `MSG SUBJECT 1 LEN`, times its watchers: exact); \
             the row delivered {} of its values in the window.",
            fmt_bytes(a.per_sec(a.bytes)),
            fmt_bytes(a.per_sec(a.wire_bytes)),
            pct(a.completeness())
        );
    }
    println!(
        "- everything in velium framing: for each Set of the window, the State D frame that \
         would carry all {} of its values (header, then `KEY:AGE=VALUE` per key, every age \
         written as `0`: a lower bound), times its watchers. Bytes are per second of the \
         window (every row ran as long, at the same tick rate).",
        load.keys.len()
    );
    println!();
}

fn lat_rows(results: &[(Row, RunResult)]) -> Vec<LatRow> {
    results
        .iter()
        .map(|(row, r)| LatRow {
            name: row.name(),
            hist: r.hist.clone(),
            rate: Some(r.per_sec(r.delivered)),
            note: String::new(),
        })
        .collect()
}

fn report_fleet(load: &Load, results: &[(Row, RunResult)]) {
    if results.is_empty() {
        return;
    }
    let scheduled = load.shims as f64 * load.ticks_per_sec();
    println!(
        "| system | sets/s (of {}) | deliveries/s | delivered / expected | server CPU | server \
         CPU per delivery | bench CPU | ksoftirqd CPU | other processes' CPU | server RSS: \
         subscribed, no state -> end | connect + subscribe |",
        fmt_rate(scheduled)
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (row, r) in results {
        println!(
            "| {} | {} | {} | {} | {} | {} µs | {} | {} | {} | {} -> {} | {:.1} s |",
            row.name(),
            fmt_rate(r.per_sec(r.sets)),
            fmt_rate(r.per_sec(r.delivered)),
            pct(r.completeness()),
            fmt_cpu(r.server_cpu_s / r.window_s.max(1e-9)),
            us(r.cpu_per_delivery_us()),
            fmt_cpu(r.bench_cpu_s / r.window_s.max(1e-9)),
            fmt_cpu(r.softirqd_cpu_s / r.window_s.max(1e-9)),
            fmt_cpu(r.other_cpu_s / r.window_s.max(1e-9)),
            fmt_bytes(r.rss_idle as f64),
            fmt_bytes(r.rss_end as f64),
            r.setup_s,
        );
    }
    println!();
    for (row, r) in results {
        for n in r.notes(load) {
            println!("- {}: {n}", row.name());
        }
        println!(
            "- {}: {}/s to subscribers, {} frames/s{}",
            row.name(),
            fmt_bytes(r.per_sec(r.bytes)),
            fmt_rate(r.per_sec(r.frames)),
            if r.datagrams > 0 {
                format!(", {} UDP datagrams/s", fmt_rate(r.per_sec(r.datagrams)))
            } else {
                String::new()
            }
        );
    }
    println!(
        "- server RSS: after the {} shims connected and subscribed (no state yet), and at the \
         end of the window (every shim holding {} keys, the watchers' pending state).",
        load.shims,
        load.keys.len()
    );
    println!();
    print_latency_table(
        "Fleet: Set -> delivery (the `t` key)",
        "deliveries/s",
        &lat_rows(results),
    );
}

fn targets(results: &[(Row, RunResult)]) {
    let get = |system: System, way: Way| {
        results
            .iter()
            .find(|(r, _)| r.system == system && r.way == way)
            .map(|(_, r)| r)
    };
    let v = get(System::VeliumUring, Way::VeliumUdp);
    let e = get(System::VeliumEpoll, Way::VeliumUdp);
    let n = get(System::Nats, Way::NatsChanged);
    let a = get(System::Nats, Way::NatsAll);
    let epoll = |f: &dyn Fn(&RunResult) -> String| {
        e.map_or(String::new(), |e| format!(" [epoll {}]", f(e)))
    };
    match (v, n) {
        (Some(v), Some(n)) => {
            let p = |r: &RunResult| r.hist.us(0.99);
            target(
                p(v) <= p(n),
                "NetBots set -> delivery p99 no slower than nats-server's (changed keys)",
                &format!(
                    "velium io_uring UDP {} µs, nats-server {} µs: {}{}",
                    us(p(v)),
                    us(p(n)),
                    ratio(p(v), p(n)),
                    epoll(&|e| format!("{} µs: {}", us(p(e)), ratio(p(e), p(n))))
                ),
            );
            let c = |r: &RunResult| r.cpu_per_delivery_us();
            target(
                c(v) <= 0.5 * c(n),
                "NetBots server CPU per delivered change at most 0.5x nats-server's",
                &format!(
                    "velium io_uring UDP {} µs, nats-server {} µs: {}{}",
                    us(c(v)),
                    us(c(n)),
                    ratio(c(v), c(n)),
                    epoll(&|e| format!("{} µs: {}", us(c(e)), ratio(c(e), c(n))))
                ),
            );
        }
        _ => println!(
            "- NOT JUDGED: p99 and CPU per delivered change against nats-server (a row did not \
             run)"
        ),
    }
    match (v, a) {
        (Some(v), Some(a)) => {
            let b = |r: &RunResult| r.per_sec(r.bytes);
            let full = a.per_sec(a.wire_bytes);
            target(
                b(v) <= 0.3 * full,
                "NetBots bytes on the wire at most 0.3x the publish-everything way",
                &format!(
                    "velium io_uring UDP {}/s received, every key every tick over nats {}/s \
                     for full delivery: {} (against the {}/s nats delivered in the window: {}; \
                     against velium's own framing carrying every key, computed: {}){}",
                    fmt_bytes(b(v)),
                    fmt_bytes(full),
                    ratio(b(v), full),
                    fmt_bytes(b(a)),
                    ratio(b(v), b(a)),
                    ratio(v.bytes as f64, v.everything_bytes as f64),
                    epoll(&|e| ratio(b(e), full))
                ),
            );
        }
        _ => println!("- NOT JUDGED: bytes against the publish-everything way (a row did not run)"),
    }
}

// ---------------------------------------------------------------------------------------
// One run
// ---------------------------------------------------------------------------------------

/// Starts a fresh server for `row`, runs `load` against it, and returns what it measured
/// (`None` when the system is not installed).
fn run(row: Row, load: &Load) -> Option<RunResult> {
    let (mut server, admin) = start_server(row.system)?;
    let addr = server.addr;
    let base = Instant::now();
    let barrier = Arc::new(Barrier::new(load.threads + 1));
    let start_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let mut handles = Vec::new();
    for t in 0..load.threads {
        let (load, barrier, start_at) = (load.clone(), barrier.clone(), start_at.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("state-gen-{t}"))
                .spawn(move || generator(t, row, load, addr, base, barrier, start_at))
                .expect("spawn a generator thread"),
        );
    }
    let t_setup = Instant::now();
    barrier.wait(); // connected (and bound)
    barrier.wait(); // subscribed
    let setup_s = t_setup.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let rss_idle = server.rss();
    let softirqd = ksoftirqd_pids();
    let start = Instant::now() + Duration::from_millis(50);
    start_at.set(start).expect("start set once");
    barrier.wait(); // go
    let w0 = start + load.warm;
    let w1 = w0 + load.measure;
    let probe = StallProbe::start(w0, w1);
    sleep_until(w0);
    let s0 = Snapshot::take(&server, &softirqd, admin);
    let procs0 = process_cpu();
    sleep_until(w1);
    let s1 = Snapshot::take(&server, &softirqd, admin);
    let procs1 = process_cpu();
    let rss_end = server.rss();
    let d = |f: fn(&Snapshot) -> f64| f(&s1) - f(&s0);
    let server_cpu_s = d(|s| s.server);
    let bench_cpu_s = d(|s| s.bench);
    let softirqd_cpu_s = d(|s| s.softirqd);
    let mut r = RunResult {
        window_s: (w1 - w0).as_secs_f64(),
        server_cpu_s,
        bench_cpu_s,
        softirqd_cpu_s,
        other_cpu_s: (d(|s| s.busy) - server_cpu_s - bench_cpu_s - softirqd_cpu_s).max(0.0),
        rss_end,
        rss_idle,
        udp_in_errors: s1.udp_in_errors.saturating_sub(s0.udp_in_errors),
        udp_drops_server: s1.drops_server.saturating_sub(s0.drops_server),
        udp_drops_bench: s1.drops_bench.saturating_sub(s0.drops_bench),
        hub: match (&s0.hub, &s1.hub) {
            (Some(a), Some(b)) => Some(b.minus(a)),
            _ => None,
        },
        setup_s,
        ..RunResult::default()
    };
    for h in handles {
        let g = h.join().expect("generator thread");
        r.merge_gen(g);
    }
    r.stall = probe.finish();
    r.top_others = top_others(
        &procs0,
        &procs1,
        &[server.pid(), std::process::id()],
        &softirqd,
    )
    .into_iter()
    .map(|(name, secs)| (name, secs / r.window_s.max(1e-9)))
    .collect();
    server.assert_running();
    {
        let log = server.log.lock().unwrap();
        let warns: Vec<&String> = log
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        r.warn_lines = warns.len();
        r.first_warn = warns.first().map_or(String::new(), |l| l.to_string());
    }
    Some(r)
}

/// Starts `system`; velium with an admin listener on a free loopback port, whose
/// `/metrics` tell what the hub itself applied, delivered and coalesced.
fn start_server(system: System) -> Option<(Server, Option<SocketAddr>)> {
    if !system.is_velium() {
        return Server::start(system, QUIET).map(|s| (s, None));
    }
    let (s, admin) = start_velium_admin(system, QUIET, &[]);
    Some((s, Some(admin)))
}

/// Starts velium-server with `extra` flags and an admin listener (`--admin`) on a free
/// loopback port; returns the server and that port's address.
fn start_velium_admin(system: System, log: &str, extra: &[&str]) -> (Server, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let admin = SocketAddr::from(([127, 0, 0, 1], port));
    let admin_s = admin.to_string();
    let mut flags = vec!["--admin", admin_s.as_str()];
    flags.extend_from_slice(extra);
    (Server::start_velium_with(system, log, &flags), admin)
}

/// One reading of velium's `/metrics` (the admin listener's Prometheus text).
struct MetricsPage(String);

impl MetricsPage {
    fn fetch(admin: SocketAddr) -> Option<MetricsPage> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        // Named by its address: an admin listener without a token refuses other names.
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let status = body.lines().next()?.split(' ').nth(1)?;
        (status == "200").then_some(MetricsPage(body))
    }

    /// The sum of the samples of metric `name` (every label set).
    fn sum(&self, name: &str) -> u64 {
        (self.0.lines())
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// The hub's own counters (velium `/metrics`).
#[derive(Clone, Copy, Default)]
struct HubCounters {
    sets: u64,
    changes: u64,
    delivered: u64,
    coalesced: u64,
    udp_dropped: u64,
    refused: u64,
    slow_consumers: u64,
}

impl HubCounters {
    fn fetch(admin: SocketAddr) -> Option<HubCounters> {
        let m = MetricsPage::fetch(admin)?;
        Some(HubCounters {
            sets: m.sum("velium_state_sets_total"),
            changes: m.sum("velium_state_changes_total"),
            delivered: m.sum("velium_state_delivered_total"),
            coalesced: m.sum("velium_state_coalesced_total"),
            udp_dropped: m.sum("velium_udp_dropped_total"),
            refused: m.sum("velium_refused_total"),
            slow_consumers: m.sum("velium_slow_consumers_total"),
        })
    }

    fn minus(&self, a: &HubCounters) -> HubCounters {
        HubCounters {
            sets: self.sets.saturating_sub(a.sets),
            changes: self.changes.saturating_sub(a.changes),
            delivered: self.delivered.saturating_sub(a.delivered),
            coalesced: self.coalesced.saturating_sub(a.coalesced),
            udp_dropped: self.udp_dropped.saturating_sub(a.udp_dropped),
            refused: self.refused.saturating_sub(a.refused),
            slow_consumers: self.slow_consumers.saturating_sub(a.slow_consumers),
        }
    }

    fn add(&mut self, o: &HubCounters) {
        self.sets += o.sets;
        self.changes += o.changes;
        self.delivered += o.delivered;
        self.coalesced += o.coalesced;
        self.udp_dropped += o.udp_dropped;
        self.refused += o.refused;
        self.slow_consumers += o.slow_consumers;
    }
}

/// The readings taken at each end of the window.
struct Snapshot {
    server: f64,
    bench: f64,
    softirqd: f64,
    busy: f64,
    udp_in_errors: u64,
    drops_server: u64,
    drops_bench: u64,
    hub: Option<HubCounters>,
}

impl Snapshot {
    fn take(server: &Server, softirqd: &[u32], admin: Option<SocketAddr>) -> Snapshot {
        let drops = udp_drops_by_inode();
        let sum_of =
            |pid: u32| -> u64 { socket_inodes(pid).iter().filter_map(|i| drops.get(i)).sum() };
        Snapshot {
            server: cpu_secs(server.pid()),
            bench: cpu_secs(std::process::id()),
            softirqd: softirqd.iter().map(|&p| cpu_secs(p)).sum(),
            busy: busy_secs(),
            udp_in_errors: udp_in_errors(),
            drops_server: sum_of(server.pid()),
            drops_bench: sum_of(std::process::id()),
            hub: admin.and_then(HubCounters::fetch),
        }
    }
}

/// A thread that sleeps 1 ms at a time and records how late it wakes within the window:
/// what the machine's scheduler does to every thread of the run (a stall of the server's
/// or the bench's threads shows in every latency).
struct StallProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Hist>,
}

impl StallProbe {
    fn start(w0: Instant, w1: Instant) -> StallProbe {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut h = Hist::default();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(Duration::from_millis(1));
                let late = t.elapsed().saturating_sub(Duration::from_millis(1));
                if t >= w0 && t < w1 {
                    h.record(late);
                }
                if t >= w1 {
                    break;
                }
            }
            h
        });
        StallProbe { stop, handle }
    }

    fn finish(self) -> Hist {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// CPU seconds of every process, by pid, with its command name.
fn process_cpu() -> std::collections::HashMap<u32, (String, f64)> {
    let mut m = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return m;
    };
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        m.insert(pid, (comm.trim().to_string(), cpu_secs(pid)));
    }
    m
}

/// The three other processes (not `exclude`, not `also`) that used the most CPU between
/// the two readings (a process born in between counts from 0), by command name.
fn top_others(
    a: &std::collections::HashMap<u32, (String, f64)>,
    b: &std::collections::HashMap<u32, (String, f64)>,
    exclude: &[u32],
    also: &[u32],
) -> Vec<(String, f64)> {
    let mut by_name: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    for (pid, (name, cpu)) in b {
        if exclude.contains(pid) || also.contains(pid) {
            continue;
        }
        let before = a.get(pid).map_or(0.0, |x| x.1);
        let d = cpu - before;
        if d > 0.0 {
            *by_name.entry(name.clone()).or_default() += d;
        }
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, d)| *d >= 0.05).collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1));
    v.truncate(3);
    v
}

/// The kernel's softirq threads (`ksoftirqd/N`): loopback traffic's receive processing
/// runs there once a CPU is busy with it, outside the server's and the bench's CPU time.
fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd"))
        })
        .collect()
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let link = std::fs::read_link(e.ok()?.path()).ok()?;
        let s = link.to_str()?;
        s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
    })
    .collect()
}

/// Datagrams each UDP socket dropped (its receive buffer full), by inode, from
/// /proc/net/udp and /proc/net/udp6.
fn udp_drops_by_inode() -> std::collections::HashMap<u64, u64> {
    let mut m = std::collections::HashMap::new();
    for f in ["/proc/net/udp", "/proc/net/udp6"] {
        let s = std::fs::read_to_string(f).unwrap_or_default();
        for l in s.lines().skip(1) {
            let w: Vec<&str> = l.split_whitespace().collect();
            if let (Some(inode), Some(drops)) = (
                w.get(9).and_then(|v| v.parse::<u64>().ok()),
                w.get(12).and_then(|v| v.parse::<u64>().ok()),
            ) {
                m.insert(inode, drops);
            }
        }
    }
    m
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Busy CPU time of the whole machine, in seconds (/proc/stat: every state but idle and
/// iowait, summed over the CPUs).
fn busy_secs() -> f64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq (then steal: not this machine's work;
    // guest time is in user already).
    let busy: f64 = f
        .iter()
        .take(7)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / ticks
}

/// System-wide UDP receive errors (`Udp: InErrors` of /proc/net/snmp): datagrams the
/// kernel dropped, mostly for a full receive buffer.
fn udp_in_errors() -> u64 {
    let s = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = s.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        return 0;
    };
    head.split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(h, _)| *h == "InErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What one generator thread measured.
#[derive(Default)]
struct GenResult {
    hist: Hist,
    delivered: u64,
    expected: u64,
    bytes: u64,
    datagrams: u64,
    frames: u64,
    full_frames: u64,
    /// Their items, and the bytes that came over UDP (the rest: TCP).
    full_items: u64,
    udp_bytes: u64,
    presence: u64,
    errors: u64,
    first_error: String,
    bad_frames: u64,
    acks: u64,
    ack_mismatch: u64,
    ack_first_mismatch: String,
    sets: u64,
    skipped: u64,
    everything_bytes: u64,
    wire_bytes: u64,
    sent_bytes: u64,
    setup_errors: Vec<String>,
    rt_late: Hist,
    age: Hist,
    rtt: Hist,
    rtt_lost: u64,
}

impl RunResult {
    fn merge_gen(&mut self, g: GenResult) {
        self.hist.merge(&g.hist);
        self.delivered += g.delivered;
        self.expected += g.expected;
        self.bytes += g.bytes;
        self.datagrams += g.datagrams;
        self.frames += g.frames;
        self.full_frames += g.full_frames;
        self.full_items += g.full_items;
        self.udp_bytes += g.udp_bytes;
        self.presence += g.presence;
        self.errors += g.errors;
        if self.first_error.is_empty() {
            self.first_error = g.first_error;
        }
        self.bad_frames += g.bad_frames;
        self.acks += g.acks;
        self.ack_mismatch += g.ack_mismatch;
        if self.ack_first_mismatch.is_empty() {
            self.ack_first_mismatch = g.ack_first_mismatch;
        }
        self.sets += g.sets;
        self.skipped += g.skipped;
        self.everything_bytes += g.everything_bytes;
        self.wire_bytes += g.wire_bytes;
        self.sent_bytes += g.sent_bytes;
        self.setup_errors.extend(g.setup_errors);
        self.rt_late.merge(&g.rt_late);
        self.age.merge(&g.age);
        self.rtt.merge(&g.rtt);
        self.rtt_lost += g.rtt_lost;
    }
}

// ---------------------------------------------------------------------------------------
// The generator: one thread, a share of the shims
// ---------------------------------------------------------------------------------------

/// What a thread's receivers count (one thread: Cells).
struct Stats {
    base: Instant,
    window: Cell<Option<(Instant, Instant)>>,
    hist: RefCell<Hist>,
    delivered: Cell<u64>,
    bytes: Cell<u64>,
    datagrams: Cell<u64>,
    frames: Cell<u64>,
    full_frames: Cell<u64>,
    full_items: Cell<u64>,
    udp_bytes: Cell<u64>,
    presence: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<String>,
    bad_frames: Cell<u64>,
    acks: Cell<u64>,
    ack_mismatch: Cell<u64>,
    ack_first_mismatch: RefCell<String>,
    acked: tokio::sync::Notify,
    /// `VELIUM_BENCH_TRACE`: deliveries later than 5 ms (send time µs, latency µs).
    trace: bool,
    late: RefCell<Vec<(u64, u64)>>,
    /// The AGE the hub wrote on the `t` items delivered in the window (ms: from the hub
    /// accepting the value to building the frame).
    age: RefCell<Hist>,
}

impl Stats {
    fn new(base: Instant) -> Stats {
        Stats {
            base,
            window: Cell::new(None),
            hist: RefCell::new(Hist::default()),
            delivered: Cell::new(0),
            bytes: Cell::new(0),
            datagrams: Cell::new(0),
            frames: Cell::new(0),
            full_frames: Cell::new(0),
            full_items: Cell::new(0),
            udp_bytes: Cell::new(0),
            presence: Cell::new(0),
            errors: Cell::new(0),
            first_error: RefCell::new(String::new()),
            bad_frames: Cell::new(0),
            acks: Cell::new(0),
            ack_mismatch: Cell::new(0),
            ack_first_mismatch: RefCell::new(String::new()),
            acked: tokio::sync::Notify::new(),
            trace: std::env::var_os("VELIUM_BENCH_TRACE").is_some(),
            late: RefCell::new(Vec::new()),
            age: RefCell::new(Hist::default()),
        }
    }

    fn in_window(&self, now: Instant) -> bool {
        self.window
            .get()
            .is_some_and(|(w0, w1)| now >= w0 && now < w1)
    }

    fn add(c: &Cell<u64>, k: u64) {
        c.set(c.get() + k);
    }

    fn error(&self, text: &[u8]) {
        Self::add(&self.errors, 1);
        let mut e = self.first_error.borrow_mut();
        if e.is_empty() {
            *e = String::from_utf8_lossy(&text[..text.len().min(256)]).into_owned();
        }
    }

    /// A `t` value received at `now_us`.
    fn latency(&self, value: &[u8], now_us: u64) {
        if let Some(t) = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            let lat = now_us.saturating_sub(t);
            self.hist.borrow_mut().record(Duration::from_micros(lat));
            if lat > 5_000 && self.trace {
                self.late.borrow_mut().push((t, lat));
            }
        }
    }

    fn now_us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_micros() as u64
    }

    /// One velium frame (without its 0x0A) that shim with `watched` watched shims got.
    fn velium_frame(&self, f: &[u8], now: Instant, inw: bool, watched: usize) {
        match f.first() {
            Some(0x10) => {
                let Some(s) = parse_state(&f[1..]) else {
                    return Self::add(&self.bad_frames, 1);
                };
                match s.mode {
                    Mode::Delta => {
                        if inw {
                            Self::add(&self.frames, 1);
                            Self::add(&self.delivered, s.items.len() as u64);
                            let now_us = self.now_us(now);
                            for it in &s.items {
                                if it.key == T_KEY.as_bytes()
                                    && let Some((age, v)) = it.value
                                {
                                    self.latency(v, now_us);
                                    self.age.borrow_mut().record(Duration::from_millis(age));
                                }
                            }
                        }
                    }
                    Mode::Full => {
                        if inw {
                            Self::add(&self.full_frames, 1);
                            Self::add(&self.full_items, s.items.len() as u64);
                        }
                    }
                }
            }
            Some(0x0C) => {
                // Ack SID COUNT: the subscription's (SID 1).
                let text = &f[1..];
                let mut it = text.split(|&b| b == b' ');
                if it.next() == Some(b"1") {
                    Self::add(&self.acks, 1);
                    let count = it
                        .next()
                        .and_then(|c| std::str::from_utf8(c).ok())
                        .and_then(|c| c.parse::<usize>().ok());
                    if count != Some(watched) {
                        Self::add(&self.ack_mismatch, 1);
                        let mut m = self.ack_first_mismatch.borrow_mut();
                        if m.is_empty() {
                            *m = format!(
                                "Ack {:?}, {watched} watched",
                                String::from_utf8_lossy(text)
                            );
                        }
                    }
                    self.acked.notify_one();
                }
            }
            Some(0x09) => self.error(&f[1..]),
            Some(0x14) if inw => Self::add(&self.presence, 1),
            _ => {}
        }
    }
}

/// One shim's sending side.
enum Link {
    Velium {
        wr: OwnedWriteHalf,
        udp: Option<Rc<UdpSocket>>,
    },
    Nats {
        wr: OwnedWriteHalf,
    },
}

/// One shim's state, as the generator keeps it.
struct Shim {
    /// Global index.
    i: usize,
    link: Link,
    /// Values of every key but `t`, and how many times each changed.
    values: Vec<String>,
    versions: Vec<u64>,
    rng: u64,
    /// Its nats subject prefix, or velium identity.
    name: String,
    watchers: usize,
    /// Ticks sent.
    sets: u64,
}

impl Shim {
    fn new(i: usize, link: Link, load: &Load, name: String) -> Shim {
        let n = load.keys.len() - 1;
        let mut s = Shim {
            i,
            link,
            values: vec![String::new(); n],
            versions: vec![0; n],
            rng: 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9),
            name,
            watchers: load.watchers(i),
            sets: 0,
        };
        for k in 0..n {
            s.values[k] = value_of(k, 0, i);
        }
        s
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Changes `k` of the keys other than `t`, at random; returns their indices.
    fn tick(&mut self, k: usize, changed: &mut Vec<usize>) {
        let n = self.values.len();
        changed.clear();
        // A partial Fisher-Yates over 0..n.
        let mut idx: Vec<usize> = (0..n).collect();
        for j in 0..k.min(n) {
            let r = j + (self.next_rand() % (n - j) as u64) as usize;
            idx.swap(j, r);
            let key = idx[j];
            self.versions[key] += 1;
            self.values[key] = value_of(key, self.versions[key], self.i);
            changed.push(key);
        }
    }
}

/// One generator thread: connects its shims (every `threads`-th from `t`), subscribes
/// them, then ticks them until the end of the window.
fn generator(
    t: usize,
    row: Row,
    load: Load,
    addr: SocketAddr,
    base: Instant,
    barrier: Arc<Barrier>,
    start_at: Arc<OnceLock<Instant>>,
) -> GenResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let stats = Rc::new(Stats::new(base));
    let mine: Vec<usize> = (t..load.shims).step_by(load.threads).collect();
    let mut res = GenResult::default();

    // Phase 1: connect (and bind UDP).
    let shims = rt.block_on(local.run_until(connect_all(row, &load, addr, &mine, &stats)));
    let mut shims = match shims {
        Ok(s) => s,
        Err(e) => {
            res.setup_errors.push(e);
            Vec::new()
        }
    };
    let probe_link = if t == 0 {
        match rt.block_on(local.run_until(Probe::connect(row, addr))) {
            Ok(p) => Some(p),
            Err(e) => {
                res.setup_errors.push(format!("control probe: {e}"));
                None
            }
        }
    } else {
        None
    };
    barrier.wait();

    // Phase 2: subscribe (nats subscribed at connect).
    if row.velium() && !shims.is_empty() {
        let r = rt.block_on(local.run_until(subscribe_all(&load, &mut shims, &stats)));
        if let Err(e) = r {
            res.setup_errors.push(e);
        }
    }
    barrier.wait();

    // Phase 3: tick.
    barrier.wait();
    let start = *start_at.get().expect("start set");
    let w0 = start + load.warm;
    let w1 = w0 + load.measure;
    stats.window.set(Some((w0, w1)));
    // How late this runtime wakes a task: its own stalls (a long poll) show here, the
    // machine's in the stall probe thread.
    let rt_late: Rc<RefCell<Hist>> = Rc::new(RefCell::new(Hist::default()));
    let rtt: Rc<RefCell<Hist>> = Rc::new(RefCell::new(Hist::default()));
    let rtt_lost: Rc<Cell<u64>> = Rc::new(Cell::new(0));
    let rtt_task =
        probe_link.map(|p| local.spawn_local(p.run(rtt.clone(), rtt_lost.clone(), w0, w1)));
    let probe = {
        let h = rt_late.clone();
        local.spawn_local(async move {
            loop {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(1)).await;
                if t >= w1 {
                    return;
                }
                if t >= w0 {
                    let late = t.elapsed().saturating_sub(Duration::from_millis(1));
                    h.borrow_mut().record(late);
                }
            }
        })
    };
    if !shims.is_empty() {
        let out =
            rt.block_on(local.run_until(tick_all(row, &load, &mut shims, base, start, w0, w1)));
        res.sets = out.sets;
        res.skipped = out.skipped;
        res.expected = out.expected;
        res.everything_bytes = out.everything_bytes;
        res.wire_bytes = out.wire_bytes;
        res.sent_bytes = out.sent_bytes;
        if let Some(e) = out.error {
            res.setup_errors.push(e);
        }
        // Let the last deliveries of the window arrive (they are counted by arrival).
        let drain = w1 + Duration::from_millis(100);
        rt.block_on(local.run_until(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(drain)).await
        }));
    }
    probe.abort();
    if let Some(t) = rtt_task {
        t.abort();
    }
    res.rtt = rtt.borrow().clone();
    res.rtt_lost = rtt_lost.get();
    res.rt_late = rt_late.borrow().clone();
    res.age = stats.age.borrow().clone();
    let s = &stats;
    if s.trace {
        // Late deliveries by send time, in 50 ms buckets: a stall of one party shows as a
        // few buckets holding them all.
        let mut b: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        for &(t, lat) in s.late.borrow().iter() {
            let e = b.entry(t / 50_000).or_default();
            e.0 += 1;
            e.1 = e.1.max(lat);
        }
        let total: u64 = b.values().map(|v| v.0).sum();
        let w0_us = w0.saturating_duration_since(base).as_micros() as u64;
        let mut v: Vec<_> = b.into_iter().collect();
        v.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
        eprintln!(
            "trace {}: {total} deliveries later than 5 ms of {}, in {} buckets of 50 ms; top: {}",
            row.name(),
            s.hist.borrow().len(),
            v.len(),
            v.iter()
                .take(8)
                .map(|(k, (n, m))| format!(
                    "{:+.2}s:{n} (max {} ms)",
                    (*k * 50_000) as f64 / 1e6 - w0_us as f64 / 1e6,
                    m / 1000
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    res.hist = s.hist.borrow().clone();
    res.delivered = s.delivered.get();
    res.bytes = s.bytes.get();
    res.datagrams = s.datagrams.get();
    res.frames = s.frames.get();
    res.full_frames = s.full_frames.get();
    res.full_items = s.full_items.get();
    res.udp_bytes = s.udp_bytes.get();
    res.presence = s.presence.get();
    res.errors = s.errors.get();
    res.first_error = s.first_error.borrow().clone();
    res.bad_frames = s.bad_frames.get();
    res.acks = s.acks.get();
    res.ack_mismatch = s.ack_mismatch.get();
    res.ack_first_mismatch = s.ack_first_mismatch.borrow().clone();
    drop(shims);
    drop(local);
    res
}

/// Connects the shims `mine` with up to 32 handshakes in flight; spawns their readers.
async fn connect_all(
    row: Row,
    load: &Load,
    addr: SocketAddr,
    mine: &[usize],
    stats: &Rc<Stats>,
) -> Result<Vec<Shim>, String> {
    let next = Rc::new(Cell::new(0usize));
    let out: Rc<RefCell<Vec<Shim>>> = Rc::new(RefCell::new(Vec::with_capacity(mine.len())));
    let err: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let mine: Rc<Vec<usize>> = Rc::new(mine.to_vec());
    let load = Rc::new(load.clone());
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (next, out, err, mine, load, stats) = (
            next.clone(),
            out.clone(),
            err.clone(),
            mine.clone(),
            load.clone(),
            stats.clone(),
        );
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let j = next.get();
                if j >= mine.len() || err.borrow().is_some() {
                    return;
                }
                next.set(j + 1);
                let i = mine[j];
                match connect_one(row, &load, addr, i, &stats).await {
                    Ok(s) => out.borrow_mut().push(s),
                    Err(e) => {
                        err.borrow_mut().get_or_insert(format!("shim {i}: {e}"));
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    if let Some(e) = err.borrow_mut().take() {
        return Err(e);
    }
    let mut v = std::mem::take(&mut *out.borrow_mut());
    v.sort_by_key(|s| s.i);
    Ok(v)
}

async fn connect_one(
    row: Row,
    load: &Load,
    addr: SocketAddr,
    i: usize,
    stats: &Rc<Stats>,
) -> std::io::Result<Shim> {
    let src = source_ip(i);
    let mut s = connect_from(src, addr).await?;
    // The control probe (`bench.probe`) is one more shim a `>` pattern matches.
    let watched = load.watchers(i) + usize::from(load.zones == 0);
    if row.velium() {
        let name = load.identity(i);
        let token = velium_identify(&mut s, &name).await?;
        let udp = if row.way == Way::VeliumUdp {
            let u = udp_to(src, addr).await?;
            udp_bind_confirm(&u, &token, i as u64).await?;
            Some(Rc::new(u))
        } else {
            None
        };
        let (rd, wr) = s.into_split();
        tokio::task::spawn_local(velium_tcp_reader(rd, stats.clone(), watched));
        if let Some(u) = &udp {
            tokio::task::spawn_local(velium_udp_reader(u.clone(), stats.clone(), watched));
        }
        Ok(Shim::new(i, Link::Velium { wr, udp }, load, name))
    } else {
        let mut buf = Vec::with_capacity(1024);
        read_until(&mut s, &mut buf, b"\r\n").await?;
        if !buf.starts_with(b"INFO ") {
            return Err(std::io::Error::other("nats: no INFO"));
        }
        let hello = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false}}\r\nSUB {} 1\r\n\
             PING\r\n",
            load.nats_sub(i)
        );
        s.write_all(hello.as_bytes()).await?;
        buf.clear();
        read_until(&mut s, &mut buf, b"PONG\r\n").await?;
        if let Some(p) = memchr::memmem::find(&buf, b"-ERR") {
            return Err(std::io::Error::other(format!(
                "nats: {}",
                String::from_utf8_lossy(&buf[p..])
            )));
        }
        let (rd, wr) = s.into_split();
        tokio::task::spawn_local(nats_reader(rd, stats.clone()));
        Ok(Shim::new(i, Link::Nats { wr }, load, load.nats_prefix(i)))
    }
}

/// Subscribes every shim (`Subscribe 1 0 PATTERN`), then waits for every Ack.
async fn subscribe_all(load: &Load, shims: &mut [Shim], stats: &Rc<Stats>) -> Result<(), String> {
    let mut f = Vec::with_capacity(64);
    for s in shims.iter_mut() {
        let Link::Velium { wr, .. } = &mut s.link else {
            continue;
        };
        f.clear();
        encode_subscribe(1, 0, &load.velium_pattern(s.i), &[], &mut f);
        wr.write_all(&f)
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
    }
    let want = shims.len() as u64;
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.acks.get() < want {
        let acked = stats.acked.notified();
        if stats.acks.get() >= want {
            break;
        }
        if tokio::time::timeout_at(end, acked).await.is_err() {
            return Err(format!(
                "only {} of {want} subscriptions acknowledged within 30 s (first error: {:?})",
                stats.acks.get(),
                stats.first_error.borrow()
            ));
        }
    }
    Ok(())
}

#[derive(Default)]
struct TickOut {
    sets: u64,
    skipped: u64,
    expected: u64,
    everything_bytes: u64,
    wire_bytes: u64,
    sent_bytes: u64,
    error: Option<String>,
}

/// Ticks every shim once per period from `start` until `w1`, shim `i` at offset
/// `i / shims` of the period; counts what the window's ticks sent.
async fn tick_all(
    row: Row,
    load: &Load,
    shims: &mut [Shim],
    base: Instant,
    start: Instant,
    w0: Instant,
    w1: Instant,
) -> TickOut {
    let mut out = TickOut::default();
    let period = load.period;
    let offsets: Vec<Duration> = shims
        .iter()
        .map(|s| period.mul_f64(s.i as f64 / load.shims as f64))
        .collect();
    let mut changed = Vec::with_capacity(load.keys.len());
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    let mut k: u32 = 0;
    let mut since_yield = 0;
    'ticks: loop {
        for (j, shim) in shims.iter_mut().enumerate() {
            let due = start + period * k + offsets[j];
            if due >= w1 {
                break 'ticks;
            }
            let now = Instant::now();
            if due > now {
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                since_yield = 0;
            } else if now - due > period {
                // More than a period late: a real shim's timer would not fire twice.
                if now >= w0 && now < w1 {
                    out.skipped += 1;
                }
                continue;
            }
            shim.tick(load.change - 1, &mut changed);
            shim.sets += 1;
            let sent_at = Instant::now();
            let t_value = sent_at
                .saturating_duration_since(base)
                .as_micros()
                .to_string();
            buf.clear();
            let mut msg_bytes = 0u64;
            let watchers = shim.watchers as u64;
            let values = &shim.values;
            let keys = &load.keys;
            let delivered_values = match row.way {
                Way::VeliumUdp | Way::VeliumTcp => {
                    encode_set(
                        keys[..keys.len() - 1]
                            .iter()
                            .zip(values)
                            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
                            .chain(std::iter::once((T_KEY, Some(t_value.as_str())))),
                        &mut buf,
                    );
                    changed.len() as u64 + 1
                }
                Way::NatsChanged => {
                    for &c in &changed {
                        msg_bytes += push_pub(&mut buf, &shim.name, &keys[c], &values[c]);
                    }
                    msg_bytes += push_pub(&mut buf, &shim.name, T_KEY, &t_value);
                    changed.len() as u64 + 1
                }
                Way::NatsAll => {
                    for (c, v) in values.iter().enumerate() {
                        msg_bytes += push_pub(&mut buf, &shim.name, &keys[c], v);
                    }
                    msg_bytes += push_pub(&mut buf, &shim.name, T_KEY, &t_value);
                    keys.len() as u64
                }
            };
            let r = match &mut shim.link {
                Link::Velium { udp: Some(u), .. } => u.send(&buf).await.map(|_| ()),
                Link::Velium { wr, udp: None } | Link::Nats { wr } => wr.write_all(&buf).await,
            };
            if let Err(e) = r {
                out.error
                    .get_or_insert(format!("shim {} send: {e}", shim.i));
                break 'ticks;
            }
            if sent_at >= w0 && sent_at < w1 {
                out.sets += 1;
                out.sent_bytes += buf.len() as u64;
                out.expected += delivered_values * watchers;
                out.wire_bytes += msg_bytes * watchers;
                if row.velium() {
                    // A State D frame with every value:
                    // `0x10 1 D SEQ IDENTITY (US KEY:0=VALUE)* 0x0A` (SEQ: the shim's sets).
                    let head = StateFrame::new(1, Mode::Delta, &shim.name, shim.sets).len();
                    let items: usize = keys[..keys.len() - 1]
                        .iter()
                        .zip(values)
                        .map(|(k, v)| item_len(k, 0, Some(v.as_bytes())))
                        .sum::<usize>()
                        + item_len(T_KEY, 0, Some(t_value.as_bytes()));
                    out.everything_bytes += (head + items) as u64 * watchers;
                }
            }
            since_yield += 1;
            if since_yield >= 32 {
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
        k += 1;
    }
    out
}

/// `PUB PREFIX.KEY LEN\r\nVALUE\r\n`; returns the bytes of the `MSG PREFIX.KEY 1
/// LEN\r\nVALUE\r\n` each subscriber gets for it (its subscription id is `1`).
fn push_pub(buf: &mut Vec<u8>, prefix: &str, key: &str, value: &str) -> u64 {
    let before = buf.len();
    buf.extend_from_slice(b"PUB ");
    buf.extend_from_slice(prefix.as_bytes());
    buf.push(b'.');
    buf.extend_from_slice(key.as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(value.len().to_string().as_bytes());
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(value.as_bytes());
    buf.extend_from_slice(b"\r\n");
    // PUB -> MSG (same length), and " 1" for the subscription id.
    (buf.len() - before + 2) as u64
}

// ---------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------

/// A velium shim's TCP stream: Acks, Errors, State F frames, and D frames when it has no
/// UDP channel.
async fn velium_tcp_reader(mut rd: OwnedReadHalf, stats: Rc<Stats>, watched: usize) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        let inw = stats.in_window(now);
        if inw {
            Stats::add(&stats.bytes, n as u64);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        while let Some(e) = memchr::memchr(b'\n', &buf[pos..]) {
            stats.velium_frame(&buf[pos..pos + e], now, inw, watched);
            pos += e + 1;
        }
        buf.drain(..pos);
    }
}

/// A velium shim's UDP channel: State D frames (and Errors for a refused Set).
async fn velium_udp_reader(u: Rc<UdpSocket>, stats: Rc<Stats>, watched: usize) {
    let mut b = vec![0u8; 65536];
    loop {
        let n = match u.recv(&mut b).await {
            Ok(n) => n,
            Err(_) => return,
        };
        let now = Instant::now();
        let inw = stats.in_window(now);
        if inw {
            Stats::add(&stats.bytes, n as u64);
            Stats::add(&stats.udp_bytes, n as u64);
            Stats::add(&stats.datagrams, 1);
        }
        for f in b[..n].split(|&c| c == b'\n').filter(|f| !f.is_empty()) {
            stats.velium_frame(f, now, inw, watched);
        }
    }
}

/// A nats subscriber: counts MSGs, and times those of the `t` key.
async fn nats_reader(mut rd: OwnedReadHalf, stats: Rc<Stats>) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        let inw = stats.in_window(now);
        if inw {
            Stats::add(&stats.bytes, n as u64);
        }
        buf.extend_from_slice(&chunk[..n]);
        let now_us = stats.now_us(now);
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            let Some(eol) = memchr::memmem::find(rest, b"\r\n") else {
                break;
            };
            let line = &rest[..eol];
            if let Some(args) = line.strip_prefix(b"MSG ") {
                // subject SP sid [SP reply] SP size
                let subject = args.split(|&b| b == b' ').next().unwrap_or_default();
                let Some(size) = args
                    .rsplit(|&b| b == b' ')
                    .next()
                    .and_then(|w| std::str::from_utf8(w).ok())
                    .and_then(|w| w.parse::<usize>().ok())
                else {
                    Stats::add(&stats.bad_frames, 1);
                    pos += eol + 2;
                    continue;
                };
                let total = eol + 2 + size + 2;
                if rest.len() < total {
                    break;
                }
                if inw {
                    Stats::add(&stats.delivered, 1);
                    Stats::add(&stats.frames, 1);
                    let key = subject.rsplit(|&b| b == b'.').next().unwrap_or_default();
                    if key == T_KEY.as_bytes() {
                        stats.latency(&rest[eol + 2..eol + 2 + size], now_us);
                    }
                }
                pos += total;
                continue;
            }
            if line.starts_with(b"-ERR") {
                stats.error(line);
            }
            pos += eol + 2;
        }
        buf.drain(..pos);
    }
}

// ---------------------------------------------------------------------------------------
// The control probe
// ---------------------------------------------------------------------------------------

/// One more connection to the server that holds no state and watches nothing, pinging
/// it every 5 ms under the load (velium: a UDP Ping in the UDP rows, a TCP Ping in the
/// TCP row; nats: PING -> PONG): how long the server and this process take to turn a
/// frame around while the state traffic flows, to set the state latencies against.
enum Probe {
    VeliumUdp(tokio::net::TcpStream, UdpSocket),
    Tcp(tokio::net::TcpStream, &'static [u8], &'static [u8]),
}

impl Probe {
    async fn connect(row: Row, addr: SocketAddr) -> std::io::Result<Probe> {
        let src = std::net::Ipv4Addr::LOCALHOST;
        let mut s = connect_from(src, addr).await?;
        if row.velium() {
            let token = velium_identify(&mut s, "bench.probe").await?;
            if row.way == Way::VeliumUdp {
                let u = udp_to(src, addr).await?;
                udp_bind_confirm(&u, &token, 0).await?;
                return Ok(Probe::VeliumUdp(s, u));
            }
            Ok(Probe::Tcp(s, b"\x06p\n", b"\x07p\n"))
        } else {
            let mut buf = Vec::new();
            read_until(&mut s, &mut buf, b"\r\n").await?;
            s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
                .await?;
            buf.clear();
            read_until(&mut s, &mut buf, b"PONG\r\n").await?;
            Ok(Probe::Tcp(s, b"PING\r\n", b"PONG\r\n"))
        }
    }

    /// Pings every 5 ms until `w1`, recording the round trips of pings sent in the window.
    /// A UDP Ping unanswered within 1 s counts in `lost`; over TCP the answer is awaited
    /// up to 10 s.
    async fn run(self, hist: Rc<RefCell<Hist>>, lost: Rc<Cell<u64>>, w0: Instant, w1: Instant) {
        let mut seq = 0u64;
        let mut b = vec![0u8; 2048];
        match self {
            Probe::VeliumUdp(_tcp, u) => loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                seq += 1;
                let ping = format!("\x06c{seq}\n");
                let t = Instant::now();
                if t >= w1 || u.send(ping.as_bytes()).await.is_err() {
                    // Held open until aborted: its close would reach every watcher.
                    return std::future::pending().await;
                }
                let got = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        match u.recv(&mut b).await {
                            Ok(n) if b[0] == 0x07 && b[1..n] == ping.as_bytes()[1..] => {
                                return true;
                            }
                            Ok(_) => {}
                            Err(_) => return false,
                        }
                    }
                })
                .await;
                if t >= w0 {
                    if got == Ok(true) {
                        hist.borrow_mut().record(t.elapsed());
                    } else {
                        lost.set(lost.get() + 1);
                    }
                }
            },
            Probe::Tcp(mut s, ping, pong) => loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let t = Instant::now();
                if t >= w1 || s.write_all(ping).await.is_err() {
                    return std::future::pending().await;
                }
                // Until the answer; a server's own PING (nats-server sends one a while
                // after the connect) is answered and skipped.
                let mut got: Vec<u8> = Vec::new();
                let ok = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => got.extend_from_slice(&b[..n]),
                        }
                        if ping == b"PING\r\n"
                            && let Some(i) = memchr::memmem::find(&got, b"PING\r\n")
                        {
                            got.drain(i..i + 6);
                            if s.write_all(b"PONG\r\n").await.is_err() {
                                return false;
                            }
                        }
                        if memchr::memmem::find(&got, pong).is_some() {
                            return true;
                        }
                    }
                })
                .await;
                if ok != Ok(true) {
                    if t >= w0 {
                        lost.set(lost.get() + 1);
                    }
                    return std::future::pending().await;
                }
                if t >= w0 {
                    hist.borrow_mut().record(t.elapsed());
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Filters: a Command to one shim named by its state, against its exact identity
// ---------------------------------------------------------------------------------------

/// The classes the filter part's shims hold (`class`), in turn.
const CLASSES: [&str; 16] = [
    "WAR", "CLR", "PAL", "RNG", "SHD", "DRU", "MNK", "BRD", "ROG", "SHM", "NEC", "WIZ", "MAG",
    "ENC", "BST", "BER",
];
/// Their roles (`role`, a key outside the default `state_index`); the target's is `ma`.
const ROLES: [&str; 4] = ["tank", "healer", "dps", "puller"];
/// Their `channels`, in turn.
const CHANNELS: [&str; 4] = ["tanks", "heals", "tanks pullers", "dps"];
/// Zones of the filter part (identities `bench.zNN.sNNNN`).
const FILTER_ZONES: usize = 50;
/// Shims per group: `group` holds the leader's name, the first shim of each run of six.
const GROUP_SIZE: usize = 6;
/// Shims per raid (`raid`, the leader's name likewise).
const RAID_SIZE: usize = 72;

/// The filter part's workload.
#[derive(Clone)]
struct FilterLoad {
    shims: usize,
    /// The one shim every Command names: the only one in its group (`group` its own name)
    /// and the only one whose `role` is `ma`.
    target: usize,
    /// Commands one at a time per variant, in batches of `batch`, each batch after `warm`
    /// unrecorded ones.
    samples: usize,
    batch: usize,
    warm: usize,
    /// Commands in flight in the pipelined blocks.
    window: usize,
    block: Duration,
    rounds: usize,
}

impl FilterLoad {
    fn new(shims: usize) -> FilterLoad {
        // Not the first of a run of six, which would lead that run's group.
        let mut target = shims * 5 / 8;
        if target.is_multiple_of(GROUP_SIZE) {
            target += 1;
        }
        FilterLoad {
            shims,
            target: target.min(shims - 1),
            samples: setting("filter_samples", 2000).max(1),
            batch: setting("filter_batch", 50).max(1),
            warm: setting("filter_warmup", 5),
            window: setting("filter_window", 32).clamp(1, 200),
            block: Duration::from_millis(setting("filter_block_ms", 250).max(50) as u64),
            rounds: setting("filter_rounds", 8).max(1),
        }
    }

    fn zone(i: usize) -> usize {
        i % FILTER_ZONES
    }

    fn identity(i: usize) -> String {
        format!("bench.z{:02}.s{i:04}", Self::zone(i))
    }

    /// Shim `i`'s state: the six keys of the default index, `role`, and four NetBots-like
    /// values.
    fn state(&self, i: usize) -> Vec<(&'static str, String)> {
        let solo = i == self.target;
        let group = if solo { i } else { i / GROUP_SIZE * GROUP_SIZE };
        vec![
            ("zone", format!("z{:02}", Self::zone(i))),
            ("class", CLASSES[i % CLASSES.len()].into()),
            ("level", (1 + i * 7 % 65).to_string()),
            ("group", format!("s{group:04}")),
            ("raid", format!("s{:04}", i / RAID_SIZE * RAID_SIZE)),
            ("channels", CHANNELS[i % CHANNELS.len()].into()),
            (
                "role",
                if solo {
                    "ma".into()
                } else {
                    ROLES[i % ROLES.len()].into()
                },
            ),
            ("hp", value_of(0, 1, i)),
            ("mana", value_of(1, 1, i)),
            ("target", value_of(4, 1, i)),
            ("loc", value_of(8, 1, i)),
        ]
    }

    /// The targets measured, each naming the one target shim: on the server with the
    /// default index (hub 0), its exact identity (the base of hub 0's ratios), an indexed
    /// filter, an unindexed one over every shim and over the target's zone; on the server
    /// started with `--state-index none` (hub 1), the exact identity (its base) and the
    /// same `group` filter, resolved there by the pattern's matches.
    fn variants(&self) -> Vec<FilterVariant> {
        let t = self.target;
        let exact = Self::identity(t);
        let v = |name: &str, target: String, hub: usize, base: usize| FilterVariant {
            name: format!("{name}: `{target}`"),
            target,
            hub,
            base,
        };
        vec![
            v("exact identity", exact.clone(), 0, 0),
            v("indexed key", format!("bench.>,group=s{t:04}"), 0, 0),
            v("unindexed key, every shim", "bench.>,role=ma".into(), 0, 0),
            v(
                "unindexed key, the zone",
                format!("bench.z{:02}.*,role=ma", Self::zone(t)),
                0,
                0,
            ),
            v("no index: exact identity", exact, 1, 4),
            v(
                "no index: group key",
                format!("bench.>,group=s{t:04}"),
                1,
                4,
            ),
        ]
    }
}

/// One target measured.
struct FilterVariant {
    name: String,
    target: String,
    /// Which server: 0 with the default `state_index`, 1 with `--state-index none`.
    hub: usize,
    /// The variant its ratios are to: the exact identity on the same server.
    base: usize,
}

/// The servers of the filter part, by hub number.
const FILTER_HUBS: [(&str, &[&str]); 2] = [
    ("default `state_index`", &[]),
    ("`--state-index none`", &["--state-index", "none"]),
];

/// What the requester has received: every Command's Ack and answer.
#[derive(Default)]
struct Track {
    /// By sequence number (the Command's text): 1 = acknowledged, 2 = answered.
    flags: RefCell<Vec<u8>>,
    /// By sequence number: when the later of its Ack and its answer arrived.
    done_at: RefCell<Vec<Option<Instant>>>,
    acks: Cell<u64>,
    /// Commands both acknowledged and answered.
    done: Cell<u64>,
    /// Acks whose COUNT was not 1, and the first.
    bad_acks: Cell<u64>,
    first_bad_ack: RefCell<String>,
    errors: Cell<u64>,
    first_error: RefCell<String>,
    /// Frames that were none of Ack, CommandResponse and Error.
    others: Cell<u64>,
    moved: tokio::sync::Notify,
}

impl Track {
    fn mark(&self, seq: usize, bit: u8, now: Instant) {
        let mut flags = self.flags.borrow_mut();
        if flags.len() <= seq {
            flags.resize(seq + 1024, 0);
            self.done_at.borrow_mut().resize(seq + 1024, None);
        }
        if flags[seq] & bit != 0 {
            return;
        }
        flags[seq] |= bit;
        if flags[seq] == 3 {
            self.done_at.borrow_mut()[seq] = Some(now);
            self.done.set(self.done.get() + 1);
            self.moved.notify_one();
        }
    }

    fn frame(&self, f: &[u8], now: Instant) {
        match f.first() {
            // Ack: 0C ID SP COUNT (in the order of the Commands).
            Some(0x0C) => {
                let seq = self.acks.get() as usize;
                self.acks.set(self.acks.get() + 1);
                if f.rsplit(|&b| b == b' ').next() != Some(&b"1"[..]) {
                    if self.bad_acks.get() == 0 {
                        *self.first_bad_ack.borrow_mut() =
                            String::from_utf8_lossy(&f[1..]).into_owned();
                    }
                    self.bad_acks.set(self.bad_acks.get() + 1);
                }
                self.mark(seq, 1, now);
            }
            // CommandResponse: 05 ID SP RESPONDER SP TEXT, TEXT the sequence number.
            Some(0x05) => {
                match (f.rsplit(|&b| b == b' ').next())
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse::<usize>().ok())
                {
                    Some(seq) => self.mark(seq, 2, now),
                    None => self.others.set(self.others.get() + 1),
                }
            }
            // An Error answers its Command in the place of the Ack.
            Some(0x09) => {
                if self.errors.get() == 0 {
                    *self.first_error.borrow_mut() = String::from_utf8_lossy(&f[1..]).into_owned();
                }
                self.errors.set(self.errors.get() + 1);
                self.acks.set(self.acks.get() + 1);
                self.moved.notify_one();
            }
            _ => self.others.set(self.others.get() + 1),
        }
    }

    /// Waits until `n` Commands are done; fails on an Error or after `limit`.
    async fn wait_done(&self, n: u64, limit: Duration) -> Result<(), String> {
        let end = tokio::time::Instant::now() + limit;
        while self.done.get() < n {
            if self.errors.get() > 0 {
                return Err(format!(
                    "the requester got {} Error(s), first: {:?}",
                    self.errors.get(),
                    self.first_error.borrow()
                ));
            }
            if tokio::time::timeout_at(end, self.moved.notified())
                .await
                .is_err()
            {
                return Err(format!(
                    "only {} of {n} Commands acknowledged and answered within {limit:?} ({} \
                     Acks)",
                    self.done.get(),
                    self.acks.get()
                ));
            }
        }
        Ok(())
    }
}

/// Reads velium frames (lines) from `rd`, handing each to `f` with the time its chunk
/// was read.
async fn read_lines(mut rd: OwnedReadHalf, mut f: impl FnMut(&[u8], Instant)) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        while let Some(e) = memchr::memchr(b'\n', &buf[pos..]) {
            f(&buf[pos..pos + e], now);
            pos += e + 1;
        }
        buf.drain(..pos);
    }
}

/// The target shim: answers each Command `04 SENDER SP ID SP TEXT` with `05 ID SP TEXT`,
/// every answer to one read in one write.
async fn filter_responder(s: tokio::net::TcpStream) {
    let (mut rd, mut wr) = s.into_split();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let mut pos = 0;
        while let Some(e) = memchr::memchr(b'\n', &buf[pos..]) {
            let f = &buf[pos..pos + e];
            pos += e + 1;
            if f.first() != Some(&0x04) {
                continue;
            }
            let mut parts = f[1..].splitn(3, |&b| b == b' ');
            let (_sender, id, text) = (parts.next(), parts.next(), parts.next());
            if let (Some(id), Some(text)) = (id, text) {
                out.push(0x05);
                out.extend_from_slice(id);
                out.push(b' ');
                out.extend_from_slice(text);
                out.push(0x0A);
            }
        }
        buf.drain(..pos);
        if !out.is_empty() && wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// One server of the filter part with its shims connected, each holding its state, and
/// the requester's write half.
struct FilterHub {
    server: Server,
    admin: SocketAddr,
    wr: OwnedWriteHalf,
    track: Rc<Track>,
    /// Commands sent so far (the next one's sequence number).
    next: u64,
    /// Where the requester and the target landed.
    cores: String,
    setup_s: f64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The other shims, held open.
    _held: Vec<tokio::net::TcpStream>,
}

impl Drop for FilterHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects shim `i` and sets its state: Identify, then Set and a Ping in one write, and
/// the Pong back (a refused Set would be answered with an Error first).
async fn filter_shim(
    load: &FilterLoad,
    addr: SocketAddr,
    i: usize,
) -> Result<tokio::net::TcpStream, String> {
    let mut s = connect_from(source_ip(i), addr)
        .await
        .map_err(|e| format!("shim {i} connect: {e}"))?;
    velium_identify(&mut s, &FilterLoad::identity(i))
        .await
        .map_err(|e| format!("shim {i} identify: {e}"))?;
    let state = load.state(i);
    let mut f = Vec::with_capacity(256);
    encode_set(state.iter().map(|(k, v)| (*k, Some(v.as_str()))), &mut f);
    let pong = format!("\x07s{i}\n");
    f.extend_from_slice(format!("\x06s{i}\n").as_bytes());
    s.write_all(&f)
        .await
        .map_err(|e| format!("shim {i} set: {e}"))?;
    let mut got = Vec::new();
    read_until(&mut s, &mut got, pong.as_bytes())
        .await
        .map_err(|e| format!("shim {i} pong: {e}"))?;
    if got.len() != pong.len() {
        return Err(format!(
            "shim {i}: {:?} before its Pong",
            String::from_utf8_lossy(&got[..got.len() - pong.len()])
        ));
    }
    Ok(s)
}

/// Starts hub `hub` of the filter part on `system`, connects `load.shims` shims (100 at a
/// time), then the requester, on another server core than the target when it can.
async fn filter_hub(system: System, load: &FilterLoad, hub: usize) -> Result<FilterHub, String> {
    let (server, admin) = start_velium_admin(system, "info", FILTER_HUBS[hub].1);
    let addr = server.addr;
    let t0 = Instant::now();
    let conns: Rc<RefCell<Vec<Option<tokio::net::TcpStream>>>> =
        Rc::new(RefCell::new((0..load.shims).map(|_| None).collect()));
    let next = Rc::new(Cell::new(0usize));
    let mut workers = Vec::new();
    for _ in 0..100 {
        let (conns, next, load) = (conns.clone(), next.clone(), load.clone());
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= load.shims {
                    return Ok::<(), String>(());
                }
                next.set(i + 1);
                let s = filter_shim(&load, addr, i).await?;
                conns.borrow_mut()[i] = Some(s);
            }
        }));
    }
    for w in workers {
        w.await.map_err(|e| format!("a connecting task: {e}"))??;
    }
    let mut held: Vec<tokio::net::TcpStream> = conns.borrow_mut().drain(..).flatten().collect();
    let target = held.remove(load.target);
    let setup_s = t0.elapsed().as_secs_f64();
    let target_name = FilterLoad::identity(load.target);
    let core_of = |id: &str| {
        server
            .velium_core_of(id, Duration::from_secs(5))
            .ok_or_else(|| format!("no connect/identify log lines for {id}"))
    };
    let target_core = core_of(&target_name)?;
    let mut requester = None;
    for k in 0..20 {
        let name = format!("bench.req{k}");
        let mut s = connect_from(std::net::Ipv4Addr::LOCALHOST, addr)
            .await
            .map_err(|e| format!("requester: {e}"))?;
        velium_identify(&mut s, &name)
            .await
            .map_err(|e| format!("requester: {e}"))?;
        let core = core_of(&name)?;
        let other = core != target_core;
        requester = Some((s, core, k));
        if other {
            break;
        }
    }
    let (req, req_core, tries) = requester.expect("at least one requester");
    let cores = format!(
        "requester on core {req_core}{}, target on core {target_core}",
        if tries > 0 {
            format!(" (after {tries} reconnects)")
        } else {
            String::new()
        }
    );
    let track = Rc::new(Track::default());
    let (rd, wr) = req.into_split();
    let t = track.clone();
    let tasks = vec![
        tokio::task::spawn_local(filter_responder(target)),
        tokio::task::spawn_local(read_lines(rd, move |f, now| t.frame(f, now))),
    ];
    Ok(FilterHub {
        server,
        admin,
        wr,
        track,
        next: 0,
        cores,
        setup_s,
        tasks,
        _held: held,
    })
}

/// `04 TARGET SP SEQ 0A`.
fn push_command(buf: &mut Vec<u8>, target: &str, seq: u64) {
    buf.push(0x04);
    buf.extend_from_slice(target.as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(seq.to_string().as_bytes());
    buf.push(0x0A);
}

/// What the pipelined blocks of one variant measured, summed over the rounds.
#[derive(Default)]
struct FilterBlocks {
    commands: u64,
    seconds: f64,
    server_cpu_s: f64,
    bench_cpu_s: f64,
    /// Deltas of `velium_filtered_targets_total` and `velium_filter_candidates_total`.
    filtered: u64,
    candidates: u64,
    /// Blocks whose /metrics could not be read.
    no_metrics: usize,
    /// Each block's Commands per second.
    rates: Vec<f64>,
}

impl FilterBlocks {
    /// The median block's Commands per second.
    fn rate(&self) -> f64 {
        let mut r = self.rates.clone();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(0.0)
    }

    /// Server CPU seconds per Command, over every block.
    fn cpu(&self) -> f64 {
        self.server_cpu_s / self.commands.max(1) as f64
    }
}

/// What one system measured in the filter part.
struct FilterResult {
    hist: Vec<Hist>,
    blocks: Vec<FilterBlocks>,
}

/// The one-at-a-time phase: the variants in turn, a batch of `load.batch` Commands of one
/// after `load.warm` unrecorded ones, until each has `load.samples`; latency = from before
/// the Command's write until its Ack and its answer have both been read.
async fn filter_latency(
    hubs: &mut [FilterHub],
    variants: &[FilterVariant],
    load: &FilterLoad,
) -> Result<Vec<Hist>, String> {
    let mut hist = vec![Hist::default(); variants.len()];
    let mut buf = Vec::with_capacity(128);
    while hist.iter().any(|h| (h.len() as usize) < load.samples) {
        for (v, h) in variants.iter().zip(hist.iter_mut()) {
            let hub = &mut hubs[v.hub];
            let batch = load.batch.min(load.samples - h.len() as usize);
            for k in 0..load.warm + batch {
                let seq = hub.next;
                hub.next += 1;
                buf.clear();
                push_command(&mut buf, &v.target, seq);
                let t0 = Instant::now();
                hub.wr
                    .write_all(&buf)
                    .await
                    .map_err(|e| format!("requester write: {e}"))?;
                hub.track
                    .wait_done(seq + 1, Duration::from_secs(10))
                    .await
                    .map_err(|e| format!("{}: {e}", v.name))?;
                if k >= load.warm {
                    let at = hub.track.done_at.borrow()[seq as usize].expect("done");
                    h.record(at.saturating_duration_since(t0));
                }
            }
        }
    }
    Ok(hist)
}

/// One pipelined block of `v`: up to `load.window` Commands in flight for `load.block`,
/// then until every one is acknowledged and answered.
async fn filter_block(
    hub: &mut FilterHub,
    v: &FilterVariant,
    load: &FilterLoad,
    acc: &mut FilterBlocks,
) -> Result<(), String> {
    let m0 = MetricsPage::fetch(hub.admin);
    let cpu = CpuMeter::start(&hub.server);
    let first = hub.next;
    let start = Instant::now();
    let end = start + load.block;
    let mut buf = Vec::with_capacity(64 * load.window);
    while Instant::now() < end {
        let in_flight = hub.next - hub.track.done.get();
        if in_flight < load.window as u64 {
            buf.clear();
            for _ in in_flight..load.window as u64 {
                push_command(&mut buf, &v.target, hub.next);
                hub.next += 1;
            }
            hub.wr
                .write_all(&buf)
                .await
                .map_err(|e| format!("requester write: {e}"))?;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), hub.track.moved.notified()).await;
        if hub.track.errors.get() > 0 {
            break;
        }
    }
    hub.track
        .wait_done(hub.next, Duration::from_secs(10))
        .await
        .map_err(|e| format!("{}: {e}", v.name))?;
    let seconds = start.elapsed().as_secs_f64();
    let (server_cpu, bench_cpu) = cpu.secs();
    let m1 = MetricsPage::fetch(hub.admin);
    let n = hub.next - first;
    acc.commands += n;
    acc.seconds += seconds;
    acc.server_cpu_s += server_cpu;
    acc.bench_cpu_s += bench_cpu;
    acc.rates.push(n as f64 / seconds);
    match (m0, m1) {
        (Some(a), Some(b)) => {
            let d = |name: &str| b.sum(name).saturating_sub(a.sum(name));
            acc.filtered += d("velium_filtered_targets_total");
            acc.candidates += d("velium_filter_candidates_total");
        }
        _ => acc.no_metrics += 1,
    }
    Ok(())
}

/// Both phases on `system`: the two servers up side by side, their shims connected.
async fn filter_run(
    system: System,
    load: &FilterLoad,
    variants: &[FilterVariant],
) -> Result<(FilterResult, Vec<FilterHub>), String> {
    let mut hubs = Vec::new();
    for hub in 0..FILTER_HUBS.len() {
        hubs.push(filter_hub(system, load, hub).await?);
    }
    let hist = filter_latency(&mut hubs, variants, load).await?;
    let mut blocks: Vec<FilterBlocks> = variants.iter().map(|_| FilterBlocks::default()).collect();
    for _ in 0..load.rounds {
        for (v, acc) in variants.iter().zip(blocks.iter_mut()) {
            filter_block(&mut hubs[v.hub], v, load, acc).await?;
        }
    }
    for h in &mut hubs {
        h.server.assert_running();
    }
    Ok((FilterResult { hist, blocks }, hubs))
}

/// The filter part: a filtered Command to one shim of a fleet against a Command to its
/// exact identity, on a server indexing the default keys and on one indexing none.
fn filter_part() {
    let wanted = setting("filter_shims", 2000).max(2);
    // Both servers' shims are held at once.
    let shims = cap_connections("filter part, two servers' shims", 2 * wanted, 300) / 2;
    let load = FilterLoad::new(shims.max(2));
    let variants = load.variants();
    println!(
        "## Filters: a Command to 1 of {} shims named by its state, against its exact \
         identity",
        load.shims
    );
    println!();
    println!(
        "- fleet: {} shims `bench.zNN.sNNNN` in {FILTER_ZONES} zones, each holding 11 keys \
         (zone, class of {}, level, group of {GROUP_SIZE}, raid of {RAID_SIZE}, channels, \
         role of {}, and 4 NetBots-like values); the target `{}` is the only one in its \
         group and the only one whose role is `ma`; `role` is not in the default index",
        load.shims,
        CLASSES.len(),
        ROLES.len(),
        FilterLoad::identity(load.target)
    );
    println!(
        "- two servers side by side, their shims connected at once: {} and {}; one requester \
         each (no state), raw protocol bytes",
        FILTER_HUBS[0].0, FILTER_HUBS[1].0
    );
    println!(
        "- one at a time: the {} targets in turn, a batch of {} Commands of one after {} \
         unrecorded, until each has {}; latency = Command written -> its Ack (COUNT \
         checked: 1) and the target's answer both read",
        variants.len(),
        load.batch,
        load.warm,
        load.samples
    );
    println!(
        "- pipelined: up to {} Commands in flight, {} interleaved rounds of {} ms per target \
         (then drained); candidates from the server's /metrics before and after each block",
        load.window,
        load.rounds,
        load.block.as_millis()
    );
    println!();
    for system in [System::VeliumUring, System::VeliumEpoll] {
        if !selected(system) {
            continue;
        }
        let rt = common::runtime();
        let local = tokio::task::LocalSet::new();
        let r = local.block_on(&rt, filter_run(system, &load, &variants));
        match r {
            Ok((r, hubs)) => report_filter(system, &load, &variants, &r, &hubs),
            Err(e) => {
                println!("- {}: the filter part failed: {e}", system.name());
                println!();
            }
        }
    }
}

fn report_filter(
    system: System,
    load: &FilterLoad,
    variants: &[FilterVariant],
    r: &FilterResult,
    hubs: &[FilterHub],
) {
    println!("### {}", system.name());
    println!();
    for (h, (what, _)) in hubs.iter().zip(FILTER_HUBS) {
        let t = &h.track;
        println!(
            "- server with {what}: {} shims connected and set in {:.1} s; {}; {} Commands \
             acknowledged and answered, {}",
            load.shims,
            h.setup_s,
            h.cores,
            fmt_rate(t.done.get() as f64),
            if t.bad_acks.get() == 0 {
                "every Ack counting 1".to_string()
            } else {
                format!(
                    "{} Acks NOT counting 1 (first: {:?})",
                    t.bad_acks.get(),
                    t.first_bad_ack.borrow()
                )
            }
        );
        if t.others.get() > 0 {
            println!(
                "  - the requester also got {} frames that were no Ack, answer or Error",
                t.others.get()
            );
        }
    }
    println!();
    println!("#### One at a time: Command -> Ack and answer");
    println!();
    println!("| target | samples | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (v, h) in variants.iter().zip(&r.hist) {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            h.len(),
            us(h.us(0.5)),
            us(h.us(0.9)),
            us(h.us(0.99)),
            us(h.us(0.999)),
            us(h.max_us())
        );
    }
    println!();
    println!("#### Pipelined: up to {} in flight", load.window);
    println!();
    println!(
        "| target | Commands | Commands/s (median block) | slowest - fastest block | server \
         CPU per Command | bench CPU | filtered targets per Command | candidates per filtered \
         target |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
    for (v, b) in variants.iter().zip(&r.blocks) {
        let lo = b.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = b.rates.iter().copied().fold(0.0, f64::max);
        println!(
            "| {} | {} | {} | {} - {} | {} µs | {} | {} | {} |",
            v.name,
            b.commands,
            fmt_rate(b.rate()),
            fmt_rate(lo),
            fmt_rate(hi),
            us(b.cpu() * 1e6),
            fmt_cpu(b.bench_cpu_s / b.seconds.max(1e-9)),
            if b.no_metrics > 0 {
                "-".into()
            } else {
                format!("{:.2}", b.filtered as f64 / b.commands.max(1) as f64)
            },
            if b.no_metrics > 0 || b.filtered == 0 {
                "-".into()
            } else {
                format!("{:.1}", b.candidates as f64 / b.filtered as f64)
            },
        );
    }
    println!();
    println!(
        "- server CPU: utime + stime of its process over the blocks (10 ms clock ticks), per \
         Command; bench CPU: this process, share of one core. Candidates: the shims the hub \
         looked at to resolve a filtered target (index candidates, or the pattern's matches, \
         the requester included)."
    );
    println!();
    println!("#### Ratios to the exact identity on the same server");
    println!();
    println!(
        "| target | p50 | p90 | p99 | p99.9 | Commands/s | server CPU per Command | \
         candidates per Command |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let rate = FilterBlocks::rate;
    let cpu = FilterBlocks::cpu;
    // Three decimals under 0.1x, where two would round a scan's figure to 0.01x.
    let ratio = |a: f64, b: f64| {
        if b > 0.0 && a / b < 0.1 {
            format!("{:.3}x", a / b)
        } else {
            ratio(a, b)
        }
    };
    for (i, v) in variants.iter().enumerate() {
        let (h, b) = (&r.hist[i], &r.blocks[i]);
        let (hb, bb) = (&r.hist[v.base], &r.blocks[v.base]);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name,
            ratio(h.us(0.5), hb.us(0.5)),
            ratio(h.us(0.9), hb.us(0.9)),
            ratio(h.us(0.99), hb.us(0.99)),
            ratio(h.us(0.999), hb.us(0.999)),
            ratio(rate(b), rate(bb)),
            ratio(cpu(b), cpu(bb)),
            if b.no_metrics > 0 {
                "-".into()
            } else {
                format!("{:.1}", b.candidates as f64 / b.commands.max(1) as f64)
            }
        );
    }
    println!();
    // The same group filter with and without the index.
    if let (Some(a), Some(b)) = (
        variants
            .iter()
            .position(|v| v.hub == 0 && v.target.contains(",group=")),
        variants
            .iter()
            .position(|v| v.hub == 1 && v.target.contains(",group=")),
    ) {
        println!(
            "- `{}` without the index over with it: p50 {}, p99 {}, Commands/s {}, server CPU \
             per Command {} (each over its own exact identity: p50 {} and {})",
            variants[a].target,
            ratio(r.hist[b].us(0.5), r.hist[a].us(0.5)),
            ratio(r.hist[b].us(0.99), r.hist[a].us(0.99)),
            ratio(rate(&r.blocks[b]), rate(&r.blocks[a])),
            ratio(cpu(&r.blocks[b]), cpu(&r.blocks[a])),
            ratio(r.hist[a].us(0.5), r.hist[variants[a].base].us(0.5)),
            ratio(r.hist[b].us(0.5), r.hist[variants[b].base].us(0.5)),
        );
        println!();
    }
}
