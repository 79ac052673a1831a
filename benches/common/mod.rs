//! Shared benchmark code: the machine banner, settings from the environment, server
//! processes (velium-server, the floor server, nats-server, mosquitto), raw-protocol
//! handshakes, latency histograms and the result tables with their ratio tables.
//!
//! Every bench is a `harness = false` binary: `main` first calls [`floor::maybe_run`], so
//! that the same binary, started as a child with `--floor-server`, serves as the floor.
#![allow(dead_code)]

pub mod floor;

use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use velium_server::client::{Client, ClientError, ClientOptions};

// ---------------------------------------------------------------------------------------
// Machine, settings, limits
// ---------------------------------------------------------------------------------------

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
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# velium-server bench: {bench}");
    println!();
    println!("- date: {date}");
    println!("- machine: {nproc} cores, {cpu}, Linux {kernel}");
    println!(
        "- descriptor limit (RLIMIT_NOFILE) of this process and its servers: {}",
        nofile_limit()
    );
    let extra = velium_extra_args();
    if !extra.is_empty() {
        println!(
            "- extra velium-server flags (VELIUM_BENCH_SERVER_ARGS): {}",
            extra.join(" ")
        );
    }
    println!();
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
/// [`System::key`]) restricts a run; by default every system runs.
pub fn selected(system: System) -> bool {
    match std::env::var("VELIUM_BENCH_ONLY") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|k| k.trim() == system.key()),
        _ => true,
    }
}

/// Whether this run includes the part `name` of a bench: `VELIUM_BENCH_PARTS=storm,rtt`
/// (handshake: serial, storm; memory: idle, fleet; relay: fanout, rtt) restricts a run;
/// by default every part runs.
pub fn part(name: &str) -> bool {
    match std::env::var("VELIUM_BENCH_PARTS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').any(|k| k.trim() == name),
        _ => true,
    }
}

/// The soft RLIMIT_NOFILE, raised to the hard limit first when it is lower.
pub fn nofile_limit() -> u64 {
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
        r.rlim_cur
    }
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

// ---------------------------------------------------------------------------------------
// Systems and their processes
// ---------------------------------------------------------------------------------------

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// velium-server `--io uring`.
    VeliumUring,
    /// velium-server `--io epoll`.
    VeliumEpoll,
    /// The floor server built into the bench binary.
    Floor,
    /// nats-server.
    Nats,
    /// mosquitto.
    Mosquitto,
}

impl System {
    /// The name printed in tables.
    pub fn name(self) -> &'static str {
        match self {
            System::VeliumUring => "velium io_uring",
            System::VeliumEpoll => "velium epoll",
            System::Floor => "floor (bench)",
            System::Nats => "nats-server",
            System::Mosquitto => "mosquitto",
        }
    }

    /// The key used by `VELIUM_BENCH_ONLY`.
    pub fn key(self) -> &'static str {
        match self {
            System::VeliumUring => "uring",
            System::VeliumEpoll => "epoll",
            System::Floor => "floor",
            System::Nats => "nats",
            System::Mosquitto => "mosquitto",
        }
    }

    /// True for both velium drivers.
    pub fn is_velium(self) -> bool {
        matches!(self, System::VeliumUring | System::VeliumEpoll)
    }
}

/// Lines a server wrote to stderr, kept for log checks.
pub type Log = Arc<Mutex<Vec<String>>>;

/// A server process on 127.0.0.1, killed when dropped.
pub struct Server {
    /// What it is.
    pub system: System,
    /// Its TCP (and UDP) address.
    pub addr: SocketAddr,
    /// Its stderr lines.
    pub log: Log,
    child: Child,
    _dir: Option<TempDir>,
}

/// velium-server's log level in a bench: `warn` unless a bench needs the per-connect
/// lines (`info`), so that no system pays for a log line per connection.
pub const QUIET: &str = "warn";

impl Server {
    /// Starts `system`; `None` (with a line saying so) when its binary is not installed.
    /// `velium_log` is velium-server's `--log-level`.
    pub fn start(system: System, velium_log: &str) -> Option<Server> {
        let s = match system {
            System::VeliumUring => Self::velium("uring", velium_log),
            System::VeliumEpoll => Self::velium("epoll", velium_log),
            System::Floor => Self::floor(),
            System::Nats => Self::nats()?,
            System::Mosquitto => Self::mosquitto()?,
        };
        Some(s)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The resident set size, from /proc/PID/status (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// Panics if the process has exited (a crash mid-bench must not pass unnoticed).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = self.log.lock().unwrap();
            let tail: Vec<&String> = log.iter().rev().take(20).collect();
            panic!(
                "{} exited mid-bench ({status}); last log lines: {tail:?}",
                self.system.name()
            );
        }
    }

    /// Log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Which core velium-server put the shim registered as `identity` on, from the
    /// `identify conn=S identity=...` and `connect conn=S core=N` log lines (info level).
    pub fn velium_core_of(&self, identity: &str, wait: Duration) -> Option<usize> {
        let end = Instant::now() + wait;
        let want_id = format!("identity={identity}");
        loop {
            {
                let log = self.log.lock().unwrap();
                let conn = log
                    .iter()
                    .filter(|l| l.contains(" identify ") || l.contains("identify conn="))
                    .find(|l| l.split_whitespace().any(|w| w == want_id))
                    .and_then(|l| field(l, "conn"));
                if let Some(conn) = conn {
                    let want_conn = format!("conn={conn}");
                    if let Some(core) = log
                        .iter()
                        .filter(|l| l.contains("connect"))
                        .find(|l| l.split_whitespace().any(|w| w == want_conn))
                        .and_then(|l| field(l, "core"))
                    {
                        return core.parse().ok();
                    }
                }
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn velium(io: &str, log_level: &str) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_velium-server"));
        cmd.args(["--listen", "127.0.0.1:0", "--io", io])
            .args(["--log-level", log_level])
            .args(["--idle-timeout", "10m", "--identify-timeout", "60s"])
            // The load comes from a few loopback addresses, and the peers have no
            // per-source limits: lift velium's so that all systems do the same work.
            .args(["--connect-rate-per-source", "0"])
            .args(["--max-connections-per-source", "0"])
            .args(velium_extra_args());
        let system = if io == "uring" {
            System::VeliumUring
        } else {
            System::VeliumEpoll
        };
        Self::spawn(system, cmd, "velium-server", None, None)
    }

    fn floor() -> Server {
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.arg(floor::FLAG);
        Self::spawn(System::Floor, cmd, "floor server", None, None)
    }

    fn nats() -> Option<Server> {
        let Some(bin) = find_binary("nats-server") else {
            skipped("nats-server");
            return None;
        };
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Some(Self::spawn(
            System::Nats,
            cmd,
            "nats-server",
            Some(addr),
            None,
        ))
    }

    fn mosquitto() -> Option<Server> {
        let Some(bin) = find_binary("mosquitto") else {
            skipped("mosquitto");
            return None;
        };
        let port = free_port();
        let dir = TempDir::new("mosquitto");
        let conf = dir.0.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nlog_dest stderr\n\
                 log_type error\nlog_type warning\npersistence false\nmax_connections -1\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Some(Self::spawn(
            System::Mosquitto,
            cmd,
            "mosquitto",
            Some(addr),
            Some(dir),
        ))
    }

    /// Spawns `cmd` as `system` (`what` in messages), its stderr captured as the log, and
    /// waits until it listens: on `addr` when given (stdout discarded), else at the
    /// address the first line of its stdout announces. `dir` lives as long as the server.
    fn spawn(
        system: System,
        mut cmd: Command,
        what: &str,
        addr: Option<SocketAddr>,
        dir: Option<TempDir>,
    ) -> Server {
        let stdout = if addr.is_some() {
            Stdio::null()
        } else {
            Stdio::piped()
        };
        let mut child = cmd
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e:?}"));
        let log = capture(child.stderr.take().unwrap());
        let addr = match addr {
            Some(addr) => {
                wait_listening(&mut child, addr, &log, what);
                addr
            }
            None => read_listening_line(&mut child, &log, what),
        };
        Server {
            system,
            addr,
            log,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Extra velium-server flags from `VELIUM_BENCH_SERVER_ARGS` (for diagnosis, e.g.
/// `--cores 1`); printed once when set.
pub fn velium_extra_args() -> Vec<String> {
    let v = std::env::var("VELIUM_BENCH_SERVER_ARGS").unwrap_or_default();
    v.split_whitespace().map(String::from).collect()
}

/// Says once per run that a peer is missing.
fn skipped(name: &str) {
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap();
    if !said.iter().any(|s| s == name) {
        println!("> {name}: not installed, skipped (bash benches/install-peers.sh installs it)");
        println!();
        said.push(name.to_string());
    }
}

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

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let k = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(k.as_str()))
}

fn capture(stderr: std::process::ChildStderr) -> Log {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    log
}

fn read_listening_line(child: &mut Child, log: &Log, what: &str) -> SocketAddr {
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).expect("read the listening line");
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    first
        .split_whitespace()
        .find_map(|w| w.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "{what}: no address in {first:?}; log: {:?}",
                log.lock().unwrap()
            )
        })
}

fn wait_listening(child: &mut Child, addr: SocketAddr, log: &Log, what: &str) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited at start ({st}): {:?}", log.lock().unwrap());
        }
        assert!(
            Instant::now() < end,
            "{what} not listening on {addr}: {:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago (for peers that take a port, not port 0).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// Finds an executable in PATH or the sbin directories Debian puts daemons in.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain(
            [
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/usr/local/sbin",
                "/usr/local/bin",
            ]
            .iter()
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "velium-bench-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&d).expect("create temp dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

// ---------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------

/// Source addresses a bench spreads its connections over (127.0.0.1 .. 127.0.0.SOURCES),
/// so that the number of connections to one server is not bound by the ephemeral ports
/// of a single source address.
pub const SOURCES: u8 = 4;

/// The source address for connection number `i`.
pub fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES as usize) as u8)
}

/// The client options a bench shim uses: the defaults, from [`source_ip`]`(i)`.
pub fn client_options(i: usize) -> ClientOptions {
    ClientOptions {
        bind_ip: Some(IpAddr::V4(source_ip(i))),
        ..ClientOptions::default()
    }
}

/// `Client::connect` for shim number `i`, from [`source_ip`]`(i)` like the raw
/// connections ([`connect_from`]), so that client and raw rows load the kernel alike.
pub async fn client_connect(addr: SocketAddr, name: &str, i: usize) -> Result<Client, ClientError> {
    Client::connect_with(addr, name, client_options(i)).await
}

/// Connects to `dst` from `src` (any port), with TCP_NODELAY.
pub async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    // Let connect() pick the port by the whole 4-tuple instead of bind() reserving one.
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    let s = sock.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A UDP socket on `src` aimed at `dst`.
pub async fn udp_to(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(src, 0))).await?;
    s.connect(dst).await?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// Raw protocols: the handshake of each system
// ---------------------------------------------------------------------------------------

/// One velium frame.
pub fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 2);
    v.push(op);
    v.extend_from_slice(data);
    v.push(0x0A);
    v
}

/// velium raw handshake: Identify `name`, read the 18-byte Session; returns the token.
pub async fn velium_identify(s: &mut TcpStream, name: &str) -> std::io::Result<[u8; 16]> {
    s.write_all(&frame(0x01, name.as_bytes())).await?;
    let mut b = [0u8; 18];
    s.read_exact(&mut b).await?;
    if b[0] != 0x02 || b[17] != 0x0A {
        return Err(std::io::Error::other(format!(
            "expected Session, got {:?}",
            String::from_utf8_lossy(&b)
        )));
    }
    Ok(b[1..17].try_into().unwrap())
}

/// velium raw UDP bind confirmed: sends the bind datagram and a Ping, waits for the Pong
/// (resending both if none comes within 1 s; loopback may drop under load). Returns the
/// number of resends. The floor server answers the same exchange.
pub async fn udp_bind_confirm(u: &UdpSocket, token: &[u8; 16], seq: u64) -> std::io::Result<u32> {
    let bind = frame(0x02, token);
    let ping = frame(0x06, format!("b{seq}").as_bytes());
    let mut buf = [0u8; 256];
    for attempt in 0..10 {
        u.send(&bind).await?;
        u.send(&ping).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(deadline, u.recv(&mut buf)).await {
                // velium: the Pong echoing our data; floor: its fixed 18 bytes.
                Ok(Ok(n))
                    if (n == ping.len() && buf[0] == 0x07 && buf[1..n] == ping[1..])
                        || (n == 18 && buf[0] == 0x02) =>
                {
                    return Ok(attempt);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
    }
    Err(std::io::Error::other("no UDP pong after 10 tries"))
}

/// The floor's TCP handshake: one line, answered by 18 bytes.
pub async fn floor_handshake(s: &mut TcpStream, name: &str) -> std::io::Result<()> {
    s.write_all(&frame(0x01, name.as_bytes())).await?;
    let mut b = [0u8; 18];
    s.read_exact(&mut b).await?;
    Ok(())
}

/// nats handshake: read INFO, send CONNECT + PING, wait for PONG.
pub async fn nats_handshake(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    read_until(s, &mut buf, b"\r\n").await?;
    if !buf.starts_with(b"INFO ") {
        return Err(std::io::Error::other("nats: no INFO"));
    }
    s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
        .await?;
    buf.clear();
    read_until(s, &mut buf, b"PONG\r\n").await?;
    Ok(())
}

/// Reads until `buf` ends with `end`.
pub async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(end) {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// An MQTT 3.1.1 CONNECT packet (clean session, keep-alive 600 s).
pub fn mqtt_connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let remaining = 10 + 2 + id.len();
    assert!(remaining < 128);
    let mut p = vec![0x10, remaining as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    p.extend_from_slice(&600u16.to_be_bytes());
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p
}

/// mosquitto handshake: CONNECT, wait for a successful CONNACK.
pub async fn mqtt_handshake(s: &mut TcpStream, client_id: &str) -> std::io::Result<()> {
    s.write_all(&mqtt_connect_packet(client_id)).await?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    if b != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!("bad CONNACK {b:?}")));
    }
    Ok(())
}

/// The TCP handshake of `system` on a connected stream (velium: raw Identify -> Session).
/// Returns the velium session token (zeros for other systems).
pub async fn raw_handshake(
    system: System,
    s: &mut TcpStream,
    name: &str,
) -> std::io::Result<[u8; 16]> {
    match system {
        System::VeliumUring | System::VeliumEpoll => velium_identify(s, name).await,
        System::Floor => floor_handshake(s, name).await.map(|_| [0u8; 16]),
        System::Nats => nats_handshake(s).await.map(|_| [0u8; 16]),
        System::Mosquitto => mqtt_handshake(s, name).await.map(|_| [0u8; 16]),
    }
}

// ---------------------------------------------------------------------------------------
// Histograms and tables
// ---------------------------------------------------------------------------------------

/// A latency histogram in nanoseconds (1 ns .. 100 s, 3 significant digits).
#[derive(Clone)]
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("histogram bounds"))
    }
}

impl Hist {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record(d.as_nanos().max(1) as u64);
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value at quantile `q`, in microseconds.
    pub fn us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// The maximum in microseconds.
    pub fn max_us(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Hist) {
        self.0.add(&other.0).expect("histogram merge");
    }
}

/// One system's result in a latency table.
#[derive(Clone)]
pub struct LatRow {
    /// System name (may carry a qualifier, e.g. "velium io_uring (client lib)").
    pub name: String,
    /// Latencies.
    pub hist: Hist,
    /// A rate (per second) measured with it, if any.
    pub rate: Option<f64>,
    /// A free-form note printed after the row (e.g. errors, retries).
    pub note: String,
}

const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}", v)
    } else if v >= 100.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// Formats a rate with thousands separators.
pub fn fmt_rate(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints a markdown table header: `columns` (the first left-aligned, the rest right), and
/// a last `rate` column when there is one.
fn print_header(columns: &[&str], rate: Option<&str>) {
    let cols: Vec<&str> = columns.iter().copied().chain(rate).collect();
    println!("| {} |", cols.join(" | "));
    println!("|---|{}", "---:|".repeat(cols.len() - 1));
}

/// Prints a latency table (markdown) and, when it has more than one row, the ratio of
/// every row to the first one.
pub fn print_latency_table(title: &str, rate_label: &str, rows: &[LatRow]) {
    if rows.is_empty() {
        return;
    }
    println!("### {title}");
    println!();
    let has_rate = rows.iter().any(|r| r.rate.is_some());
    print_header(
        &[
            "system",
            "samples",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
        ],
        has_rate.then_some(rate_label),
    );
    for r in rows {
        let mut line = format!("| {} | {} |", r.name, r.hist.len());
        for (q, _) in QUANTILES {
            line.push_str(&format!(" {} |", fmt_us(r.hist.us(q))));
        }
        line.push_str(&format!(" {} |", fmt_us(r.hist.max_us())));
        if has_rate {
            line.push_str(&format!(" {} |", r.rate.map_or("-".to_string(), fmt_rate)));
        }
        println!("{line}");
    }
    let notes: Vec<&LatRow> = rows.iter().filter(|r| !r.note.is_empty()).collect();
    if !notes.is_empty() {
        println!();
        for r in notes {
            println!("- {}: {}", r.name, r.note);
        }
    }
    println!();
    if rows.len() > 1 && !rows[0].hist.is_empty() {
        let base = &rows[0];
        println!(
            "Ratios to {} (latency: >1 = slower than it; {}: >1 = more than it):",
            base.name, rate_label
        );
        println!();
        print_header(
            &["system", "p50", "p90", "p99", "p99.9", "max"],
            has_rate.then_some(rate_label),
        );
        for r in rows {
            let mut line = format!("| {} |", r.name);
            for (q, _) in QUANTILES {
                line.push_str(&format!(" {} |", ratio(r.hist.us(q), base.hist.us(q))));
            }
            line.push_str(&format!(
                " {} |",
                ratio(r.hist.max_us(), base.hist.max_us())
            ));
            if has_rate {
                let v = match (r.rate, base.rate) {
                    (Some(a), Some(b)) => ratio(a, b),
                    _ => "-".into(),
                };
                line.push_str(&format!(" {v} |"));
            }
            println!("{line}");
        }
        println!();
    }
}

/// `a / b` formatted as `1.23x`.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

/// Formats bytes as KiB / MiB.
pub fn fmt_bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{:.0} B", b)
    }
}

/// A line for a target the project set: met or missed, with the figures behind it.
pub fn target(met: bool, what: &str, detail: &str) {
    println!(
        "- target {}: {what} ({detail})",
        if met { "MET" } else { "MISSED" }
    );
}

// ---------------------------------------------------------------------------------------
// Storms: many connections held open
// ---------------------------------------------------------------------------------------

/// One connection a storm holds open.
pub enum Conn {
    /// A raw-protocol connection.
    Raw(TcpStream),
    /// A velium client-library session.
    Client(Client),
}

impl Conn {
    /// True while the connection is open as far as this side can tell without blocking.
    pub fn is_open(&self) -> bool {
        match self {
            Conn::Raw(s) => {
                let mut probe = [0u8; 64];
                match s.try_read(&mut probe) {
                    Ok(0) => false,
                    Ok(_) => true, // a peer may have sent something (e.g. a nats PING)
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                }
            }
            Conn::Client(c) => !c.is_closed(),
        }
    }
}

/// How a storm's velium shims are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Raw protocol bytes (the only way for the floor, nats and mosquitto).
    Raw,
    /// velium's client library: `Client::connect` (TCP connect, Identify, Session).
    Client,
}

/// A system measured one way: velium through its client library or raw protocol bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The server.
    pub system: System,
    /// How the bench speaks to it (always raw for the floor and the peers).
    pub via: Via,
}

impl Subject {
    /// velium through the client library.
    pub const fn client(system: System) -> Subject {
        Subject {
            system,
            via: Via::Client,
        }
    }

    /// Raw protocol bytes.
    pub const fn raw(system: System) -> Subject {
        Subject {
            system,
            via: Via::Raw,
        }
    }

    /// The row name: velium rows say how they were driven.
    pub fn name(&self) -> String {
        match (self.system.is_velium(), self.via) {
            (true, Via::Client) => format!("{} (client lib)", self.system.name()),
            (true, Via::Raw) => format!("{} (raw)", self.system.name()),
            (false, _) => self.system.name().to_string(),
        }
    }
}

/// The position of the row named `name`.
pub fn find_row(rows: &[LatRow], name: &str) -> Option<usize> {
    rows.iter().position(|r| r.name == name)
}

/// What a storm did.
pub struct StormResult {
    /// TCP handshake latencies.
    pub tcp: Hist,
    /// UDP bind confirmed latencies (velium and floor, when asked).
    pub udp: Option<Hist>,
    /// From the first connect to the last handshake.
    pub elapsed: Duration,
    /// Connections still open at the end.
    pub held: usize,
    /// Failed handshakes.
    pub errors: usize,
    /// The first failure.
    pub first_error: String,
    /// UDP bind datagrams sent again.
    pub udp_resends: u32,
    /// The connections, open.
    pub conns: Vec<Conn>,
}

#[derive(Default)]
struct Shared {
    next: usize,
    conns: Vec<Conn>,
    errors: usize,
    first_error: String,
    udp_resends: u32,
}

/// N shims with C in flight; every connection stays open until the end.
///
/// With `udp`, velium and floor shims then confirm a UDP bind with a raw UDP socket
/// (bind datagram + Ping -> Pong, the socket's creation included), and drop that socket:
/// the server keeps the binding, and the bench stays within its descriptor limit (a
/// client's own `bind_udp` would hold a second descriptor per shim). Every connection,
/// raw or through the client library ([`client_connect`]), and its UDP socket come from
/// one of [`SOURCES`] source addresses in turn, so no source address nears the point
/// (about 14,000 connections to one port) where the kernel's ephemeral-port search slows
/// every connect down.
pub async fn storm(
    system: System,
    addr: SocketAddr,
    n: usize,
    c: usize,
    udp: bool,
    via: Via,
) -> StormResult {
    let with_udp = udp && (system.is_velium() || system == System::Floor);
    let client = via == Via::Client && system.is_velium();
    let shared = Rc::new(RefCell::new(Shared {
        conns: Vec::with_capacity(n),
        ..Shared::default()
    }));
    let local = tokio::task::LocalSet::new();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c {
        let shared = shared.clone();
        workers.push(local.spawn_local(async move {
            let mut tcp = Hist::default();
            let mut udp = Hist::default();
            loop {
                let i = {
                    let mut sh = shared.borrow_mut();
                    let i = sh.next;
                    sh.next += 1;
                    i
                };
                if i >= n {
                    break;
                }
                let src = source_ip(i);
                let name = format!("bench.storm.s{i}");
                let t0 = Instant::now();
                let res = async {
                    let (conn, token) = if client {
                        let cl = client_connect(addr, &name, i)
                            .await
                            .map_err(std::io::Error::other)?;
                        let token = cl.token().0;
                        (Conn::Client(cl), token)
                    } else {
                        let mut s = connect_from(src, addr).await?;
                        let token = raw_handshake(system, &mut s, &name).await?;
                        (Conn::Raw(s), token)
                    };
                    tcp.record(t0.elapsed());
                    let mut resends = 0;
                    if with_udp {
                        let t1 = Instant::now();
                        let u = udp_to(src, addr).await?;
                        resends = udp_bind_confirm(&u, &token, i as u64).await?;
                        udp.record(t1.elapsed());
                    }
                    Ok::<_, std::io::Error>((conn, resends))
                }
                .await;
                let mut sh = shared.borrow_mut();
                match res {
                    Ok((conn, resends)) => {
                        sh.conns.push(conn);
                        sh.udp_resends += resends;
                    }
                    Err(e) => {
                        if sh.errors == 0 {
                            sh.first_error = e.to_string();
                        }
                        sh.errors += 1;
                    }
                }
            }
            (tcp, udp)
        }));
    }
    let (tcp, udp) = local
        .run_until(async move {
            let mut tcp = Hist::default();
            let mut udp = Hist::default();
            for w in workers {
                let (t, u) = w.await.expect("storm worker");
                tcp.merge(&t);
                udp.merge(&u);
            }
            (tcp, udp)
        })
        .await;
    let elapsed = start.elapsed();
    let mut sh = shared.borrow_mut();
    let conns = std::mem::take(&mut sh.conns);
    let held = conns.iter().filter(|c| c.is_open()).count();
    StormResult {
        tcp,
        udp: with_udp.then_some(udp),
        elapsed,
        held,
        errors: sh.errors,
        first_error: std::mem::take(&mut sh.first_error),
        udp_resends: sh.udp_resends,
        conns,
    }
}
