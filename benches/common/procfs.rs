//! Readings from /proc: a process's resident set size and CPU time, which tell a
//! server-bound figure from a generator-bound one.

use super::Server;
use std::time::Instant;

/// Resident set size of a process in bytes (0 if it cannot be read).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) a process has used, in seconds, from /proc/PID/stat.
pub fn cpu_secs(pid: u32) -> f64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at state (3rd).
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}

/// CPU used by a server and by this bench process over an interval, as a share of one
/// core (1.0 = one core busy all along): what tells a server-bound figure from a
/// generator-bound one.
pub struct CpuMeter {
    server: u32,
    t0: Instant,
    server0: f64,
    bench0: f64,
}

impl CpuMeter {
    /// Starts measuring `server`.
    pub fn start(server: &Server) -> CpuMeter {
        CpuMeter {
            server: server.pid(),
            t0: Instant::now(),
            server0: cpu_secs(server.pid()),
            bench0: cpu_secs(std::process::id()),
        }
    }

    /// (server CPU seconds, bench CPU seconds) since the start.
    pub fn secs(&self) -> (f64, f64) {
        (
            cpu_secs(self.server) - self.server0,
            cpu_secs(std::process::id()) - self.bench0,
        )
    }

    /// (server cores busy, bench cores busy) since the start.
    pub fn stop(&self) -> (f64, f64) {
        let dt = self.t0.elapsed().as_secs_f64().max(1e-9);
        (
            (cpu_secs(self.server) - self.server0) / dt,
            (cpu_secs(std::process::id()) - self.bench0) / dt,
        )
    }
}

/// Formats a CPU share as a percentage of one core.
pub fn fmt_cpu(share: f64) -> String {
    format!("{:.0}%", share * 100.0)
}

/// Descriptors this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Runs `rt` until this process is back to at most `base` open descriptors (plus a few),
/// or 10 s have passed: a storm's client-library sessions close their sockets in tasks of
/// the runtime, so they must be driven before the next system's storm opens as many
/// again under the same descriptor limit.
pub fn settle_fds(rt: &tokio::runtime::Runtime, base: usize) {
    rt.block_on(async {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while open_fds() > base + 64 && std::time::Instant::now() < end {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}
