//! Machine, settings, limits: the banner every bench prints first, the settings a run
//! takes from its command line or the environment, the descriptor limit that caps how
//! many connections a bench can hold, and the single-threaded load-generator runtime.

use super::servers::skipped_baseline;
use super::{
    System, baseline_binary, current_velium, server_cpus, shim_limit_args, velium_extra_args,
};
use std::process::Command;

/// Prints the bench name, the date, and the machine (cores, kernel, CPU model).
pub fn banner(bench: &str) {
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown date".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    // Every CPU of the machine (online), and those this process may run on.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .map_or(0, |c| c.len());
    let usable = std::thread::available_parallelism().map_or(0, |n| n.get());
    let nproc = if online > usable {
        format!("{online} ({usable} usable by this process)")
    } else {
        usable.to_string()
    };
    println!("# velium-server bench: {bench}");
    println!();
    println!("- date: {date}");
    println!("- machine: {nproc} cores, {cpu}, Linux {kernel}");
    println!(
        "- descriptor limit (RLIMIT_NOFILE) of this process and its servers: {}",
        nofile_limit()
    );
    let lifted = shim_limit_args(&current_velium());
    if !lifted.is_empty() {
        println!(
            "- velium-server per-shim rate limits lifted: {}",
            lifted.join(" ")
        );
    }
    if let Some(bin) = baseline_binary() {
        println!(
            "- baseline (VELIUM_BENCH_BASELINE): {}, rows \"{}\", run with velium io_uring's \
             flags{}",
            bin.display(),
            System::VeliumBefore.name(),
            if shim_limit_args(&bin).is_empty() {
                " (it has no per-shim rate limits to lift)"
            } else {
                ""
            }
        );
    }
    let extra = velium_extra_args();
    if !extra.is_empty() {
        println!(
            "- extra velium-server flags (VELIUM_BENCH_SERVER_ARGS): {}",
            extra.join(" ")
        );
    }
    if let Some(cpus) = server_cpus() {
        println!(
            "- servers pinned (VELIUM_BENCH_SERVER_CPUS): CPUs {} (nats-server with \
             GOMAXPROCS={}); this bench process on CPUs {}",
            fmt_cpu_list(&cpus),
            cpus.len(),
            fmt_cpu_list(&own_cpus())
        );
    }
    println!();
}

/// The CPUs this process may run on (its affinity mask).
pub fn own_cpus() -> Vec<usize> {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ok != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Parses a CPU list as taskset takes it (`0-3,6`); `None` if it is not one.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    (!cpus.is_empty()).then_some(cpus)
}

/// Formats CPU numbers as a list (`0-3,6`).
pub fn fmt_cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if j > i {
            format!("{}-{}", cpus[i], cpus[j])
        } else {
            cpus[i].to_string()
        });
        i = j + 1;
    }
    out.join(",")
}

/// A list setting (`--NAME=1000,100` or `VELIUM_BENCH_<NAME>=1000,100`), else `default`.
pub fn setting_list(name: &str, default: &[usize]) -> Vec<usize> {
    let flag = format!("--{}", name.to_lowercase());
    let args: Vec<String> = std::env::args().collect();
    let mut raw = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            raw = Some(v.to_string());
        } else if *a == flag {
            raw = args.get(i + 1).cloned();
        }
    }
    let raw = raw.or_else(|| std::env::var(format!("VELIUM_BENCH_{}", name.to_uppercase())).ok());
    match raw {
        Some(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|w| {
                w.trim()
                    .replace('_', "")
                    .parse()
                    .expect("numeric bench setting")
            })
            .collect(),
        _ => default.to_vec(),
    }
}

/// A numeric setting: `--NAME=V` or `--NAME V` on the command line, else the environment
/// variable `VELIUM_BENCH_<NAME>` (upper case), else `default`.
pub fn setting(name: &str, default: usize) -> usize {
    let flag = format!("--{}", name.to_lowercase());
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            return v.replace('_', "").parse().expect("numeric bench setting");
        }
        if *a == flag
            && let Some(v) = args.get(i + 1)
        {
            return v.replace('_', "").parse().expect("numeric bench setting");
        }
    }
    std::env::var(format!("VELIUM_BENCH_{}", name.to_uppercase()))
        .ok()
        .map(|v| v.replace('_', "").parse().expect("numeric bench setting"))
        .unwrap_or(default)
}

/// Which systems this run measures: `VELIUM_BENCH_ONLY=nats,floor` (names as in
/// [`System::key`]) restricts a run; by default every system runs. The baseline
/// ([`System::VeliumBefore`], key `before`) runs only when `VELIUM_BENCH_BASELINE` names
/// its binary.
pub fn selected(system: System) -> bool {
    let only = std::env::var("VELIUM_BENCH_ONLY").unwrap_or_default();
    let named = only.split(',').any(|k| k.trim() == system.key());
    let chosen = only.trim().is_empty() || named;
    if system == System::VeliumBefore && chosen && baseline_binary().is_none() {
        if named {
            skipped_baseline();
        }
        return false;
    }
    chosen
}

/// Whether this run includes the part `name` of a bench: `VELIUM_BENCH_PARTS=storm,rtt`
/// (handshake: serial, storm; memory: idle, fleet; relay: fanout, rtt; state: netbots,
/// fleet, filter) restricts a run;
/// by default every part runs.
pub fn part(name: &str) -> bool {
    match std::env::var("VELIUM_BENCH_PARTS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|k| k.trim() == name),
        _ => true,
    }
}

/// The soft RLIMIT_NOFILE, raised to the hard limit first when it is lower (as the server
/// raises its own).
pub fn nofile_limit() -> u64 {
    velium_server::driver::sys::raise_open_file_limit() as u64
}

/// Caps a number of connections held at once to what the descriptor limit allows, keeping
/// `reserve` descriptors for everything else; prints a line when it caps.
pub fn cap_connections(what: &str, wanted: usize, reserve: usize) -> usize {
    let limit = nofile_limit() as usize;
    let cap = limit.saturating_sub(reserve);
    if wanted > cap {
        println!(
            "> {what}: capped at {cap} connections (asked for {wanted}): RLIMIT_NOFILE is \
             {limit} for this process and the server, less {reserve} kept for other descriptors"
        );
        cap
    } else {
        wanted
    }
}

/// A single-threaded tokio runtime: the load generator runs on one thread, leaving the
/// other core to the server (every system is measured the same way).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
