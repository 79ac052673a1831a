//! Test harness: a real `velium-server` process per test on 127.0.0.1 with an ephemeral
//! port, and raw TCP / UDP clients that speak the wire format byte by byte.
//!
//! Every wait is on an event (a frame, a log line, a closed socket) with a generous
//! deadline that only a failure ever reaches.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

/// How long any expected event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Instantiates each named `fn name(io: &str)` once per I/O driver.
#[macro_export]
macro_rules! drivers {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    super::$name("uring")
                }
                #[test]
                fn epoll() {
                    super::$name("epoll")
                }
            }
        )*
    };
}

type Log = Arc<(Mutex<Vec<String>>, Condvar)>;

/// A running server process, killed on drop.
pub struct Server {
    child: Child,
    /// The TCP and UDP address it serves.
    pub addr: SocketAddr,
    /// The admin HTTP address, when started with `--admin`.
    pub admin: Option<SocketAddr>,
    log: Log,
}

impl Server {
    /// Starts `velium-server --listen 127.0.0.1:0 --cores 2 --io IO` plus `extra` flags.
    pub fn start(io: &str, extra: &[&str]) -> Server {
        Server::start_level(io, "debug", extra)
    }

    /// Waits until a log line contains every one of `needles`; returns that line.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        let (m, cv) = &*self.log;
        let end = Instant::now() + DEADLINE;
        let mut lines = m.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needles:?}; log:\n{}",
                lines.join("\n")
            );
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Every log line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    /// A connected raw TCP client.
    pub fn tcp(&self) -> Tcp {
        Tcp::connect(self.addr)
    }

    /// A raw UDP client aimed at the server.
    pub fn udp(&self) -> Udp {
        Udp::new(self.addr)
    }

    /// Stops the server (SIGSTOP), like a hung host, and returns once every thread of it
    /// has stopped (kill(2) returns before that, while a thread may still run).
    pub fn freeze(&self) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) and waitpid(2) on our own child; WUNTRACED reports the stop
        // without reaping it.
        unsafe {
            assert_eq!(libc::kill(pid, libc::SIGSTOP), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, libc::WUNTRACED), pid);
            assert!(
                libc::WIFSTOPPED(status),
                "server not stopped: status {status}"
            );
        }
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `sig` to the server process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the process to exit; returns its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "server did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `GET path` on the admin listener: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let admin = self.admin.expect("server started with --admin");
        velium_server::admin::fetch(admin, "GET", path).unwrap()
    }

    /// `POST path` on the admin listener: (status, body).
    pub fn post(&self, path: &str) -> (u16, String) {
        let admin = self.admin.expect("server started with --admin");
        velium_server::admin::fetch(admin, "POST", path).unwrap()
    }

    /// The current value of one `/metrics` sample (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        velium_server::admin::sample(&body, name).unwrap_or(0.0)
    }

    /// Waits until the `/metrics` sample `name` satisfies `ok`; returns its value. The
    /// counters are updated by other threads after the event a test saw, so a test reads
    /// them until they settle (or the deadline says they never will).
    pub fn wait_metric(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let end = Instant::now() + DEADLINE;
        loop {
            let v = self.metric(name);
            if ok(v) {
                return v;
            }
            assert!(Instant::now() < end, "{name} stuck at {v}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Encodes one frame.
pub fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![op];
    v.extend_from_slice(data);
    v.push(0x0A);
    v
}

/// A raw TCP client.
pub struct Tcp {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Tcp {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> Tcp {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Tcp { s, buf: Vec::new() }
    }

    /// Sends one frame.
    pub fn send(&mut self, op: u8, data: &[u8]) {
        self.s.write_all(&frame(op, data)).expect("send");
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    /// The next frame, or `None` when the server closed the connection.
    pub fn try_recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == 0x0A) {
                let f: Vec<u8> = self.buf.drain(..=i).collect();
                return Some((f[0], f[1..f.len() - 1].to_vec()));
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("no frame within {DEADLINE:?}: {e}"),
            }
        }
    }

    /// The next frame; fails if the connection closed.
    pub fn recv(&mut self) -> (u8, Vec<u8>) {
        self.try_recv()
            .expect("connection closed while a frame was expected")
    }

    /// The next frame's data, which must have opcode `op`.
    pub fn expect(&mut self, op: u8) -> Vec<u8> {
        let (got, data) = self.recv();
        assert_eq!(
            got,
            op,
            "expected opcode 0x{op:02X}, got 0x{got:02X} {:?}",
            String::from_utf8_lossy(&data)
        );
        data
    }

    /// Asserts the next frame is an Error whose text contains `needle`.
    pub fn expect_error(&mut self, needle: &str) -> String {
        let text = String::from_utf8(self.expect(0x09)).unwrap();
        assert!(text.contains(needle), "error {text:?} lacks {needle:?}");
        text
    }

    /// Asserts the server closes the connection (after any frames, which are returned).
    pub fn expect_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(f) = self.try_recv() {
            got.push(f);
        }
        got
    }

    /// Pings with `data` and waits for the matching Pong: proves every frame sent before it
    /// was handled, since a connection's frames are handled in order.
    pub fn sync(&mut self, data: &[u8]) {
        self.send(0x06, data);
        assert_eq!(self.expect(0x07), data);
    }

    /// Identifies and returns the 16-byte session token; the Terms frame that follows the
    /// Session is read too (and must be one).
    pub fn identify(&mut self, name: &str) -> [u8; 16] {
        self.send(0x01, name.as_bytes());
        let data = self.expect(0x02);
        assert_eq!(data.len(), 16, "token is 16 bytes");
        self.expect_terms();
        data.try_into().unwrap()
    }

    /// The next frame, which must be Terms, parsed.
    pub fn expect_terms(&mut self) -> velium_server::proto::reply::Terms {
        let data = self.expect(0x15);
        velium_server::proto::reply::parse_terms(&data).expect("Terms in their form")
    }
}

/// A raw UDP client.
pub struct Udp {
    pub s: UdpSocket,
    pub server: SocketAddr,
}

impl Udp {
    /// A socket on 127.0.0.1 with an ephemeral port.
    pub fn new(server: SocketAddr) -> Udp {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Udp { s, server }
    }

    /// Sends one datagram.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.s.send_to(bytes, self.server).unwrap();
    }

    /// Sends one frame as a datagram.
    pub fn send(&self, op: u8, data: &[u8]) {
        self.send_raw(&frame(op, data));
    }

    /// The next datagram and where it came from.
    pub fn recv_from(&self) -> (Vec<u8>, SocketAddr) {
        let mut b = [0u8; 65536];
        let (n, from) = self
            .s
            .recv_from(&mut b)
            .unwrap_or_else(|e| panic!("no datagram within {DEADLINE:?}: {e}"));
        (b[..n].to_vec(), from)
    }

    /// The next datagram, which must come from the server's own port.
    pub fn recv(&self) -> Vec<u8> {
        let (d, from) = self.recv_from();
        assert_eq!(
            from, self.server,
            "UDP replies leave from the listening port"
        );
        d
    }

    /// Sends the bind datagram for `token`.
    pub fn bind(&self, token: &[u8; 16]) {
        self.send(0x02, token);
    }

    /// Binds, then confirms the bind with a UDP Ping answered by a Pong.
    pub fn bind_confirmed(&self, token: &[u8; 16]) {
        self.bind(token);
        self.send(0x06, b"bind");
        assert_eq!(self.recv(), frame(0x07, b"bind"));
    }
}

impl Server {
    /// Like [`Server::start`], but with `--log-level LEVEL` instead of `debug`.
    ///
    /// Every test connects from 127.0.0.1, so the per-source connection limits are lifted
    /// unless `extra` sets them (a later flag wins).
    pub fn start_level(io: &str, level: &str, extra: &[&str]) -> Server {
        let mut args = vec!["--listen", "127.0.0.1:0", "--cores", "2", "--io", io];
        args.extend_from_slice(&["--log-level", level]);
        args.extend_from_slice(&[
            "--connect-rate-per-source",
            "0",
            "--max-connections-per-source",
            "0",
        ]);
        args.extend_from_slice(extra);
        Server::spawn(&args)
    }

    /// Spawns `velium-server ARGS` (which must make it listen) and reads its address.
    pub fn spawn(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_velium-server"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn velium-server");
        let log: Log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (m, cv) = &*l;
                m.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).expect("read the listening line");
        let addr = first
            .split_whitespace()
            .find_map(|w| w.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}; log: {:?}", log.0.lock()));
        let admin = args.contains(&"--admin").then(|| {
            let mut line = String::new();
            out.read_line(&mut line).expect("read the admin line");
            line.trim()
                .strip_prefix("velium-server admin on http://")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no admin address in {line:?}"))
        });
        Server {
            child,
            addr,
            admin,
            log,
        }
    }

    /// Waits until `n` log lines contain every one of `needles` (a log line may be read
    /// after the event it reports has reached a client).
    pub fn wait_log_count(&self, needles: &[&str], n: usize) {
        let (m, cv) = &*self.log;
        let has = |lines: &Vec<String>| {
            lines
                .iter()
                .filter(|l| needles.iter().all(|k| l.contains(k)))
                .count()
                >= n
        };
        let (lines, waited) = cv
            .wait_timeout_while(m.lock().unwrap(), DEADLINE, |lines| !has(lines))
            .unwrap();
        assert!(
            !waited.timed_out(),
            "fewer than {n} log lines with {needles:?}; log:\n{}",
            lines.join("\n")
        );
    }

    /// How many log lines so far contain every one of `needles`.
    pub fn count_log(&self, needles: &[&str]) -> usize {
        self.log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

/// The Quit frame, `| 0x03 | 0x0A |`, as sent over TCP and UDP.
pub const QUIT: [u8; 2] = [0x03, 0x0A];

impl Tcp {
    /// Asserts the next frame is exactly `op` with `data`.
    pub fn expect_frame(&mut self, op: u8, data: &[u8]) {
        let got = self.expect(op);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(data),
            "data of frame 0x{op:02X}"
        );
        assert_eq!(got, data, "data of frame 0x{op:02X}");
    }

    /// Asserts the server closes the connection without sending anything more.
    pub fn expect_closed_quietly(&mut self) {
        let rest = self.expect_closed();
        assert!(rest.is_empty(), "frames before the close: {rest:?}");
    }
}

impl Tcp {
    /// A second handle on the same connection (for a reader thread), with its own empty
    /// frame buffer: call it only when no partial frame has been read.
    pub fn try_clone(&self) -> Tcp {
        Tcp {
            s: self.s.try_clone().expect("clone the socket"),
            buf: Vec::new(),
        }
    }
}

impl Udp {
    /// Asserts the next datagram from the server is exactly the frame `op` `data`.
    pub fn expect_frame(&self, op: u8, data: &[u8]) {
        let got = self.recv();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&frame(op, data)),
            "datagram"
        );
    }

    /// Sends a Ping from a bound socket and asserts the next datagram is its Pong: a
    /// barrier, since one source's datagrams are handled in order on one core, and a
    /// single reply to each is sent before the next is handled.
    pub fn sync(&self, data: &[u8]) {
        self.send(0x06, data);
        self.expect_frame(0x07, data);
    }
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident set size (VmRSS in /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.pid()).expect("VmRSS of the server")
    }
}

/// The resident set size of process `pid` (VmRSS in /proc/PID/status), in KiB; `None`
/// when the process is gone.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `request` (again every 100 ms, since loopback drops datagrams when a socket buffer
/// is full) until a datagram `ok` accepts arrives; other datagrams are skipped.
pub fn udp_until(u: &Udp, request: &[&[u8]], ok: impl Fn(&[u8]) -> bool, what: &str) {
    let end = Instant::now() + DEADLINE;
    u.s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = vec![0u8; 65536];
    'send: while Instant::now() < end {
        for r in request {
            u.send_raw(r);
        }
        loop {
            match u.s.recv_from(&mut b) {
                Ok((n, from)) if from == u.server && ok(&b[..n]) => {
                    u.s.set_read_timeout(Some(DEADLINE)).unwrap();
                    return;
                }
                Ok(_) => {}
                Err(_) => continue 'send,
            }
        }
    }
    panic!("no UDP answer: {what}");
}

/// Binds `token` from `u` with the 18-byte bind and confirms it with a Ping, retrying
/// both.
pub fn udp_bind(u: &Udp, token: &[u8; 16]) {
    udp_until(
        u,
        &[&frame(0x02, token), &frame(0x06, b"bound?")],
        |d| d == frame(0x07, b"bound?"),
        &format!("bind confirmed for the token {token:02X?}"),
    );
}

// ---------------------------------------------------------------------------------------
// Scratch files, users, exact refusal texts
// ---------------------------------------------------------------------------------------

/// A file in a fresh scratch directory, removed with the directory on drop.
pub struct TempFile {
    pub dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl TempFile {
    /// Writes `text` to `name` in a new directory of its own.
    pub fn new(name: &str, text: &str) -> TempFile {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "velium-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        TempFile { dir, path }
    }

    /// Replaces the file's text.
    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    /// The path, as a command-line argument.
    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Writes `text` to `name` next to the file; returns its path.
    pub fn sibling(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `[[user]]` of a hub's config file. `echoes` and `who` are left to their defaults
/// when `None`.
#[derive(Clone, Copy, Debug)]
pub struct User<'a> {
    pub name: &'a str,
    pub secret: &'a str,
    pub identities: &'a [&'a str],
    pub commands: &'a [&'a str],
    pub echoes: Option<&'a [&'a str]>,
    pub who: Option<&'a [&'a str]>,
}

impl<'a> User<'a> {
    /// A user with its identities and commands; echoes and who by default.
    pub fn new(
        name: &'a str,
        secret: &'a str,
        identities: &'a [&'a str],
        commands: &'a [&'a str],
    ) -> User<'a> {
        User {
            name,
            secret,
            identities,
            commands,
            echoes: None,
            who: None,
        }
    }
}

fn toml_list(v: &[&str]) -> String {
    let items: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

/// A config file (`users.toml` in its own scratch directory) with `extra` settings
/// first, then one `[[user]]` per entry, each with its secret in a file of its own
/// beside it.
pub fn users_config(extra: &str, users: &[User]) -> TempFile {
    let cfg = TempFile::new("users.toml", "");
    cfg.write(&users_toml(&cfg, extra, users));
    cfg
}

/// The text of such a config, writing the secret files next to `cfg` (so a test can
/// rewrite the config for a reload).
pub fn users_toml(cfg: &TempFile, extra: &str, users: &[User]) -> String {
    let mut toml = extra.to_string();
    for u in users {
        let secret = cfg.sibling(&format!("{}.secret", u.name), &format!("{}\n", u.secret));
        toml.push_str(&format!(
            "\n[[user]]\nname = {:?}\nsecret_file = {secret:?}\nidentities = {}\ncommands = {}\n",
            u.name,
            toml_list(u.identities),
            toml_list(u.commands)
        ));
        if let Some(e) = u.echoes {
            toml.push_str(&format!("echoes = {}\n", toml_list(e)));
        }
        if let Some(w) = u.who {
            toml.push_str(&format!("who = {}\n", toml_list(w)));
        }
    }
    toml
}

/// The secret file [`users_toml`] wrote for `user` next to `cfg`.
pub fn secret_file(cfg: &TempFile, user: &str) -> String {
    cfg.dir
        .join(format!("{user}.secret"))
        .to_str()
        .unwrap()
        .to_string()
}

impl Server {
    /// Like [`Server::start`], with the admin listener on an ephemeral port of 127.0.0.1.
    pub fn with_admin(io: &str, extra: &[&str]) -> Server {
        let mut args = vec!["--admin", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Server::start(io, &args)
    }
}

impl Tcp {
    /// Authenticates as `user` with `secret` (Auth `USER SP SECRET`), then identifies.
    pub fn login(&mut self, user: &str, secret: &str, name: &str) -> [u8; 16] {
        self.send(0x0F, format!("{user} {secret}").as_bytes());
        self.identify(name)
    }
}

/// The Error text for an identity byte outside the grammar (` 'c'` shown for printable
/// ASCII only).
pub fn identity_byte_error(byte: u8, at: usize) -> String {
    let shown = if byte.is_ascii_graphic() {
        format!(" '{}'", byte as char)
    } else {
        String::new()
    };
    format!(
        "identity byte 0x{byte:02X}{shown} at {at}: only ASCII letters, digits, '_', '-' and '.' are allowed"
    )
}

/// The Error text for an identity with an empty segment starting at byte `at`.
pub fn empty_segment_error(at: usize) -> String {
    format!("identity has an empty segment at byte {at}: segments are joined by single dots")
}

/// The Error text for a CommandResponse whose id is not written as the hub writes ids.
pub const NON_CANONICAL_ID: &str =
    "response refused: ID must be a decimal number with no sign or leading zero";

/// The Error text for a CommandResponse to a Command its sender was not sent (among the
/// last `window`).
pub fn not_answerable(id: &str, window: usize) -> String {
    format!("response refused: {id} is not among the last {window} Commands sent to this shim")
}

// ---------------------------------------------------------------------------------------
// Reading routed frames, Acks and Who listings
// ---------------------------------------------------------------------------------------

/// Frame data as text (it must be UTF-8).
pub fn text(d: &[u8]) -> String {
    String::from_utf8(d.to_vec()).expect("UTF-8 frame data")
}

/// Splits `data` at its first space.
pub fn split2(data: &[u8]) -> (String, Vec<u8>) {
    let sp = data.iter().position(|&b| b == b' ').expect("a space");
    (text(&data[..sp]), data[sp + 1..].to_vec())
}

/// Reads a delivered Command: (sender, id, command text).
pub fn expect_command(c: &mut Tcp) -> (String, String, Vec<u8>) {
    command_of(&c.expect(0x04))
}

/// Parses the data of a delivered Command: (sender, id, command text).
pub fn command_of(data: &[u8]) -> (String, String, Vec<u8>) {
    let (sender, rest) = split2(data);
    let (id, cmd) = split2(&rest);
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "id {id:?}"
    );
    assert!(id.parse::<u64>().unwrap() != 0, "an id is never 0");
    (sender, id, cmd)
}

/// Reads an Ack: (id, count).
pub fn expect_ack(c: &mut Tcp) -> (String, u64) {
    ack_of(&c.expect(0x0C))
}

/// Parses the data of an Ack: (id, count).
pub fn ack_of(data: &[u8]) -> (String, u64) {
    let (id, count) = split2(data);
    (id, text(&count).parse().expect("a decimal count"))
}

/// Sends Who `pattern` and returns identity -> (since-ms, udp flag), checking the count.
pub fn who(c: &mut Tcp, pattern: &str) -> std::collections::BTreeMap<String, Vec<(u64, String)>> {
    c.send(0x0D, pattern.as_bytes());
    let mut out: std::collections::BTreeMap<String, Vec<(u64, String)>> =
        std::collections::BTreeMap::new();
    let mut n = 0;
    loop {
        match c.recv() {
            (0x0E, d) => {
                let e = text(&d);
                let f: Vec<&str> = e.split(' ').collect();
                assert_eq!(f.len(), 3, "{e}");
                assert!(f[2] == "udp" || f[2] == "-", "{e}");
                out.entry(f[0].to_string())
                    .or_default()
                    .push((f[1].parse().unwrap(), f[2].to_string()));
                n += 1;
            }
            (0x0C, d) => {
                assert_eq!(text(&d), format!("0 {n}"), "the Ack counts the entries");
                return out;
            }
            (op, d) => panic!("in a Who listing: 0x{op:02X} {:?}", text(&d)),
        }
    }
}

/// A connection identified as `name` (on a hub without credentials).
pub fn shim(srv: &Server, name: &str) -> Tcp {
    let mut c = srv.tcp();
    c.identify(name);
    c
}

/// A connection identified as `name`, with a bound UDP channel.
pub fn bound_shim(srv: &Server, name: &str) -> (Tcp, Udp) {
    let mut c = srv.tcp();
    let token = c.identify(name);
    let u = srv.udp();
    u.bind_confirmed(&token);
    (c, u)
}

// ---------------------------------------------------------------------------------------
// TLS: a throwaway PKI made at test time (no key is ever kept in the repository)
// ---------------------------------------------------------------------------------------

/// A CA and the hub certificate it signed (for 127.0.0.1 and localhost), as PEM files in a
/// scratch directory of their own; client certificates on demand ([`Pki::client`]).
pub struct Pki {
    /// The CA certificate: what a client trusts (`--ca`), or a hub's `--tls-client-ca`.
    pub ca: String,
    /// The hub's certificate chain (`--tls-cert`).
    pub cert: String,
    /// The hub's private key (`--tls-key`).
    pub key: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// Holds the files; removed on drop.
    pub dir: TempFile,
}

impl Pki {
    /// A new CA (`velium test CA N`) and a hub certificate signed by it.
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        use std::sync::atomic::{AtomicU64, Ordering};
        // Each CA its own name: a client that trusts another one finds no issuer at all.
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = TempFile::new("ca.pem", "");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            DnType::CommonName,
            format!("velium test CA {}", N.fetch_add(1, Ordering::Relaxed)),
        );
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        dir.write(&params.self_signed(&key).unwrap().pem());
        let mut pki = Pki {
            ca: dir.arg().to_string(),
            cert: String::new(),
            key: String::new(),
            issuer: rcgen::Issuer::new(params, key),
            dir,
        };
        (pki.cert, pki.key) = pki.issue(
            "hub",
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki
    }

    /// A client certificate whose subject Common Name is `cn`: (certificate, key) files.
    pub fn client(&self, cn: &str) -> (String, String) {
        self.issue(cn, &[], rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            self.dir.sibling(&format!("{cn}.pem"), &cert.pem()),
            self.dir.sibling(&format!("{cn}.key"), &key.serialize_pem()),
        )
    }

    /// The hub's flags for this certificate: `--tls-cert CERT --tls-key KEY`.
    pub fn server_args(&self) -> [&str; 4] {
        ["--tls-cert", &self.cert, "--tls-key", &self.key]
    }

    /// Client TLS options that trust this CA.
    pub fn client_tls(&self) -> velium_server::client::TlsOptions {
        velium_server::client::TlsOptions {
            ca: Some(self.ca.clone().into()),
            ..Default::default()
        }
    }
}

impl Server {
    /// Like [`Server::start`], with TLS on the TCP port (the hub certificate of `pki`).
    pub fn tls(io: &str, pki: &Pki, extra: &[&str]) -> Server {
        let mut args = pki.server_args().to_vec();
        args.extend_from_slice(extra);
        Server::start(io, &args)
    }
}

/// The `velium` command-line tool of this build.
pub const VELIUM: &str = env!("CARGO_BIN_EXE_velium");

/// What a finished `velium` run left.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `velium --server ADDR ARGS...` to completion (killed and failed at the deadline).
pub fn velium(addr: SocketAddr, args: &[&str]) -> Run {
    let child = Command::new(VELIUM)
        .arg("--server")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn velium");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for velium"),
        Err(_) => {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("velium {args:?} did not finish within {DEADLINE:?}");
        }
    };
    let run = Run {
        code: out.status.code().expect("velium exited by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    assert!(
        !run.stderr.contains("panicked"),
        "velium {args:?} panicked: {run:?}"
    );
    run
}

/// A frame from the hub as one line: a State frame as `SID MODE IDENTITY` then `|KEY=VALUE`
/// per value and `|KEY` per deleted key (every age checked present and under the test
/// deadline, and left out); Presence as its data (`SID +IDENTITY`, `SID -IDENTITY
/// REASON`); `ack DATA`, `pong DATA`, `error TEXT`; anything else as `0xNN DATA`.
pub fn describe(op: u8, data: &[u8]) -> String {
    const PONG: u8 = 0x07;
    const ERROR: u8 = 0x09;
    const ACK: u8 = 0x0C;
    const SET: u8 = 0x10;
    const PRESENCE: u8 = 0x14;
    match op {
        SET => {
            let s = velium_server::proto::state::parse_state(data).unwrap_or_else(|| {
                panic!("not a State frame: {:?}", String::from_utf8_lossy(data))
            });
            let mode = match s.mode {
                velium_server::proto::state::Mode::Full => "F",
                velium_server::proto::state::Mode::Delta => "D",
            };
            let mut line = format!("{} {mode} {}", s.sid, text(s.identity));
            for it in &s.items {
                line.push('|');
                line.push_str(&text(it.key));
                match it.value {
                    Some((age, v)) => {
                        assert!(
                            age < DEADLINE.as_millis() as u64,
                            "age {age} ms in {line:?}"
                        );
                        line.push('=');
                        line.push_str(&String::from_utf8_lossy(v));
                    }
                    None => assert_eq!(
                        s.mode,
                        velium_server::proto::state::Mode::Delta,
                        "a deletion in an F frame"
                    ),
                }
            }
            line
        }
        PRESENCE => {
            assert!(
                velium_server::proto::state::parse_presence(data).is_some(),
                "not a Presence frame: {:?}",
                String::from_utf8_lossy(data)
            );
            text(data)
        }
        ACK => format!("ack {}", text(data)),
        PONG => format!("pong {}", text(data)),
        ERROR => format!("error {}", text(data)),
        _ => format!("0x{op:02X} {}", String::from_utf8_lossy(data)),
    }
}

/// The next frame on `c`, described.
pub fn next(c: &mut Tcp) -> String {
    let (op, d) = c.recv();
    describe(op, &d)
}

/// Reads a listing up to its Ack (or an Error): the State frames, sorted (their order is
/// the router's), and that last line.
pub fn listing(c: &mut Tcp) -> (Vec<String>, String) {
    let mut frames = Vec::new();
    loop {
        let line = next(c);
        if line.starts_with("ack ") || line.starts_with("error ") {
            frames.sort();
            return (frames, line);
        }
        frames.push(line);
    }
}
