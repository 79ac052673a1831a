//! Server processes: every system runs as its own process on 127.0.0.1, started the same
//! way (stderr captured as its log, the listening address from its first stdout line or a
//! port chosen here), killed when dropped.

use super::{System, floor, parse_cpu_list, rss_of};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
            System::VeliumUring | System::VeliumEpoll => Self::velium(system, velium_log),
            System::VeliumBefore => {
                if baseline_binary().is_none() {
                    skipped_baseline();
                    return None;
                }
                Self::velium(system, velium_log)
            }
            System::Floor => Self::floor(),
            System::Nats => Self::nats()?,
            System::Mosquitto => Self::mosquitto()?,
        };
        Some(s)
    }

    /// Starts velium-server (`VeliumUring` or `VeliumEpoll`, the build this bench was made
    /// with) with `extra` flags after the bench's own (and before those of
    /// `VELIUM_BENCH_SERVER_ARGS`); `velium_log` is its `--log-level`.
    pub fn start_velium_with(system: System, velium_log: &str, extra: &[&str]) -> Server {
        assert!(
            matches!(system, System::VeliumUring | System::VeliumEpoll),
            "{} is not the current velium build",
            system.name()
        );
        Self::velium_with(system, velium_log, extra)
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

    /// Starts `system` with TLS 1.3 on its client port: the certificate chain `cert` and
    /// its private key `key` (PEM files, readable by every user: mosquitto started as root
    /// drops to its own user before it reads them). velium-server gets `--tls-cert` and
    /// `--tls-key`, then `velium_extra` (e.g. `--tls-optional`); nats-server a config file
    /// with a `tls` block (its handshake timeout 5 s, velium's default); mosquitto its
    /// plaintext bench config with the listener made TLS 1.3 only, and `set_tcp_nodelay`
    /// (off by default, and then its CONNACK, a small write behind unacknowledged data,
    /// most likely its TLS session tickets, waits out the client's delayed ACK, ~40 ms). `None` (with a line saying so) when a
    /// peer is not installed. Not for the floor nor the baseline.
    pub fn start_tls(
        system: System,
        velium_log: &str,
        cert: &Path,
        key: &Path,
        velium_extra: &[&str],
    ) -> Option<Server> {
        let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
        match system {
            System::VeliumUring | System::VeliumEpoll => {
                let mut extra = vec!["--tls-cert", &cert_s, "--tls-key", &key_s];
                extra.extend_from_slice(velium_extra);
                Some(Self::velium_with(system, velium_log, &extra))
            }
            System::Nats => {
                let Some(bin) = find_binary("nats-server") else {
                    skipped("nats-server");
                    return None;
                };
                let port = free_port();
                let dir = TempDir::new("nats-tls");
                let conf = dir.0.join("nats.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listen: 127.0.0.1:{port}\ntls {{\n  cert_file: {cert_s:?}\n  \
                         key_file: {key_s:?}\n  timeout: 5\n}}\n"
                    ),
                )
                .expect("write nats.conf");
                let mut cmd = Command::new(bin);
                cmd.arg("-c").arg(&conf);
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                Some(Self::spawn(
                    System::Nats,
                    cmd,
                    "nats-server (TLS)",
                    Some(addr),
                    Some(dir),
                ))
            }
            System::Mosquitto => {
                let Some(bin) = find_binary("mosquitto") else {
                    skipped("mosquitto");
                    return None;
                };
                let port = free_port();
                let dir = TempDir::new("mosquitto-tls");
                let conf = dir.0.join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\ncertfile {cert_s}\nkeyfile {key_s}\n\
                         tls_version tlsv1.3\nallow_anonymous true\nlog_dest stderr\n\
                         log_type error\nlog_type warning\npersistence false\n\
                         max_connections -1\nset_tcp_nodelay true\n"
                    ),
                )
                .expect("write mosquitto.conf");
                let mut cmd = Command::new(bin);
                cmd.arg("-c").arg(&conf);
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                Some(Self::spawn(
                    System::Mosquitto,
                    cmd,
                    "mosquitto (TLS)",
                    Some(addr),
                    Some(dir),
                ))
            }
            other => panic!("{} has no TLS setup in the benches", other.name()),
        }
    }

    /// velium-server: the one this bench was built with (io_uring or epoll), or the
    /// baseline binary with io_uring's flags.
    fn velium(system: System, log_level: &str) -> Server {
        Self::velium_with(system, log_level, &[])
    }

    /// [`Server::velium`] with `extra` flags after the bench's own (and before those of
    /// `VELIUM_BENCH_SERVER_ARGS`).
    fn velium_with(system: System, log_level: &str, extra: &[&str]) -> Server {
        let (bin, io, what) = match system {
            System::VeliumUring => (current_velium(), "uring", "velium-server"),
            System::VeliumEpoll => (current_velium(), "epoll", "velium-server"),
            System::VeliumBefore => (
                baseline_binary().expect("VELIUM_BENCH_BASELINE"),
                "uring",
                "baseline velium-server (VELIUM_BENCH_BASELINE)",
            ),
            other => unreachable!("{other:?} is not velium"),
        };
        let mut cmd = Command::new(&bin);
        cmd.args(["--listen", "127.0.0.1:0", "--io", io])
            .args(["--log-level", log_level])
            .args(["--idle-timeout", "10m", "--identify-timeout", "60s"])
            // The load comes from a few loopback addresses, and the peers have no
            // per-source limits: lift velium's so that all systems do the same work.
            .args(["--connect-rate-per-source", "0"])
            .args(["--max-connections-per-source", "0"])
            // Nor per-shim rate limits, in the builds that have them.
            .args(shim_limit_args(&bin))
            .args(extra)
            .args(velium_extra_args());
        Self::spawn(system, cmd, what, None, None)
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
        if let Some(cpus) = server_cpus() {
            // Go sizes GOMAXPROCS from the affinity mask too; say it outright.
            cmd.env("GOMAXPROCS", cpus.len().to_string());
        }
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
        pin_to_server_cpus(&mut cmd);
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

/// The CPUs every server a bench starts is confined to, from `VELIUM_BENCH_SERVER_CPUS`
/// (a taskset-style list, e.g. `0-1`), so that the load generator can be pinned to the
/// others (`taskset -c 2-3 cargo bench ...`): `None` when unset. Each server process is
/// started with that affinity mask (set in the child before it runs, as `taskset` would);
/// velium-server picks the cores it pins its threads to from its mask, nats-server gets
/// `GOMAXPROCS` = the number of CPUs, mosquitto is single-threaded.
pub fn server_cpus() -> Option<Vec<usize>> {
    let v = std::env::var("VELIUM_BENCH_SERVER_CPUS").unwrap_or_default();
    if v.trim().is_empty() {
        return None;
    }
    Some(parse_cpu_list(&v).unwrap_or_else(|| {
        panic!("VELIUM_BENCH_SERVER_CPUS={v}: not a CPU list (e.g. 0-1 or 0,2)")
    }))
}

/// Confines `cmd`'s process to [`server_cpus`], when set.
fn pin_to_server_cpus(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let Some(cpus) = server_cpus() else {
        return;
    };
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in &cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: between fork and exec only sched_setaffinity, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Extra velium-server flags from `VELIUM_BENCH_SERVER_ARGS` (for diagnosis, e.g.
/// `--cores 1`); printed once when set.
pub fn velium_extra_args() -> Vec<String> {
    let v = std::env::var("VELIUM_BENCH_SERVER_ARGS").unwrap_or_default();
    v.split_whitespace().map(String::from).collect()
}

/// The velium-server this bench was built with.
pub fn current_velium() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_velium-server"))
}

/// The baseline velium-server from `VELIUM_BENCH_BASELINE` (an earlier build, measured as
/// [`System::VeliumBefore`]), or `None` when the variable is unset or empty. Panics when it
/// names no executable file: a before/after run must not quietly lose its "before".
pub fn baseline_binary() -> Option<PathBuf> {
    let v = std::env::var("VELIUM_BENCH_BASELINE").unwrap_or_default();
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let p = PathBuf::from(v);
    assert!(
        is_executable(&p),
        "VELIUM_BENCH_BASELINE={v}: not an executable file (build it with `cargo build \
         --release --bin velium-server` in a worktree of the baseline commit)"
    );
    Some(p)
}

/// The flags that lift velium-server's per-shim rate limits (routed frames, deliveries
/// and Who per second; the defaults would throttle a bench's load), when the binary `bin`
/// has them: builds from before these limits reject the flags, so `bin --help` is asked
/// once per binary.
pub fn shim_limit_args(bin: &Path) -> Vec<&'static str> {
    static KNOWN: Mutex<Vec<(PathBuf, bool)>> = Mutex::new(Vec::new());
    let mut known = KNOWN.lock().unwrap();
    let has = match known.iter().find(|(p, _)| p == bin) {
        Some(&(_, has)) => has,
        None => {
            let has = Command::new(bin)
                .arg("--help")
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains("--routed-per-sec")
                        || String::from_utf8_lossy(&o.stderr).contains("--routed-per-sec")
                });
            known.push((bin.to_path_buf(), has));
            has
        }
    };
    if has {
        vec![
            "--routed-per-sec",
            "0",
            "--deliveries-per-sec",
            "0",
            "--who-per-sec",
            "0",
        ]
    } else {
        Vec::new()
    }
}

/// Says once per run that the baseline was asked for (`VELIUM_BENCH_ONLY=before`) but not
/// given.
pub(super) fn skipped_baseline() {
    static SAID: Mutex<bool> = Mutex::new(false);
    let mut said = SAID.lock().unwrap();
    if !*said {
        println!(
            "> {}: VELIUM_BENCH_BASELINE is not set, skipped (set it to a velium-server \
             binary built from the commit to compare with)",
            System::VeliumBefore.name()
        );
        println!();
        *said = true;
    }
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
