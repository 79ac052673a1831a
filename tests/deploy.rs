//! The files in `deploy/`: every shipped config passes `velium-server --check-config`,
//! broken copies are refused with exit 2 (a bad value in one line, what the TOML parser
//! refuses in its own lines), the documented values are the real defaults, every setting
//! is documented, and the unit's stop timeout covers every shipped `shutdown_timeout`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use velium_server::config::{Args, Config};

const SERVER: &str = env!("CARGO_BIN_EXE_velium-server");

/// The shipped config files, relative to the repository root.
const CONFIGS: [&str; 3] = [
    "deploy/velium-server.toml",
    "deploy/presets/small.toml",
    "deploy/presets/large.toml",
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("velium-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `velium-server --check-config PATH`, with no secret from the environment.
fn check(path: &Path) -> Output {
    Command::new(SERVER)
        .arg("--check-config")
        .arg(path)
        .env_remove("VELIUM_SECRET")
        .output()
        .expect("run velium-server")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that `path` was refused: exit 2, nothing on stdout, one line on stderr that
/// contains `needle`.
fn assert_refused(path: &Path, needle: &str) {
    let out = check(path);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}: stderr {stderr:?}",
        path.display()
    );
    assert_eq!(stdout, "", "{}", path.display());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.ends_with('\n'), "{stderr:?}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

#[test]
fn shipped_configs_pass_check_config() {
    for rel in CONFIGS {
        let path = repo(rel);
        let out = check(&path);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{rel}: {stderr}");
        assert_eq!(text(&out.stdout), format!("{}: ok\n", path.display()));
        assert_eq!(stderr, "", "{rel}");
    }
}

/// Asserts that `path` was refused by the TOML parser: exit 2, nothing on stdout, and on
/// stderr a line naming the file, then the parser's lines (its place, the line of the file
/// with a caret under the spot, then `what`).
fn assert_refused_by_toml(path: &Path, what: &str) {
    let out = check(path);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
    assert_eq!(stdout, "", "{}", path.display());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("velium-server: config file {}:", path.display()).as_str()),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("TOML parse error at line "),
        "{stderr}"
    );
    assert!(lines[4].trim_end().ends_with('^'), "{stderr}");
    assert!(lines[5].contains(what), "{what:?} not in {stderr}");
    assert_eq!(lines.len(), 6, "{stderr}");
    assert!(stderr.ends_with('\n'), "{stderr:?}");
}

#[test]
fn broken_copies_are_refused() {
    let dir = scratch("broken");
    for rel in CONFIGS {
        let name = Path::new(rel).file_name().unwrap().to_str().unwrap();
        let unknown = dir.join(format!("unknown-{name}"));
        std::fs::write(
            &unknown,
            format!("{}\nlisten_adress = \"0.0.0.0:1\"\n", read(rel)),
        )
        .unwrap();
        assert_refused_by_toml(&unknown, "unknown field `listen_adress`");
    }
    // A duration written as a number: what to write instead.
    let number = dir.join("number.toml");
    std::fs::write(
        &number,
        format!("{}\nidle_timeout = 30\n", read(CONFIGS[0])),
    )
    .unwrap();
    assert_refused_by_toml(
        &number,
        "idle_timeout = 30: a duration is a string with a unit, such as \"30s\"",
    );
    // allow_networks is commented out in the full file: a bad CIDR there.
    let cidr = dir.join("bad-cidr.toml");
    std::fs::write(
        &cidr,
        format!(
            "{}\nallow_networks = [\"10.0.0.0/8\", \"192.168.0.0/33\"]\n",
            read(CONFIGS[0])
        ),
    )
    .unwrap();
    assert_refused(&cidr, "192.168.0.0/33");
    // And in a preset that sets it: the same list with one entry broken.
    let small = read("deploy/presets/small.toml");
    assert!(small.contains("\"10.0.0.0/8\""));
    let cidr = dir.join("bad-cidr-small.toml");
    std::fs::write(&cidr, small.replace("\"10.0.0.0/8\"", "\"10.0.0/8\"")).unwrap();
    assert_refused(&cidr, "10.0.0/8");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The full file with every commented-out setting and example uncommented (secret, token,
/// certificate and key files pointed at scratch files, `cores` at 1). The hub-wide shared
/// secret cannot be combined with the `[[user]]` examples: with `shared`, it is kept and
/// the users are left out; without, the users are kept and it is left out.
fn uncommented(dir: &Path, shared: bool) -> String {
    let secret = dir.join("secret");
    std::fs::write(&secret, "hunter2\n").unwrap();
    // A self-signed certificate stands in for the hub's and for the client CA.
    let made = rcgen::generate_simple_self_signed(vec!["hub.example.org".to_string()]).unwrap();
    let (cert, key) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let files = [
        ("tls_cert", &cert),
        ("tls_key", &key),
        ("tls_client_ca", &cert),
        ("admin_token_file", &secret),
        ("cluster_password_file", &secret),
    ];
    let mut out = String::new();
    let mut in_user = false;
    for line in read(CONFIGS[0]).lines() {
        let setting = line.strip_prefix('#').filter(|l| {
            let key = l.split(" = ").next().unwrap_or("");
            l.starts_with("[[user]]")
                || (l.contains(" = ")
                    && !key.is_empty()
                    && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        });
        if setting.is_some_and(|s| s.starts_with("[[user]]")) {
            in_user = true;
        }
        let top_secret = !in_user && setting.is_some_and(|s| s.starts_with("secret_file = "));
        if setting.is_some() && if shared { in_user } else { top_secret } {
            continue;
        }
        match setting {
            Some(s) if s.starts_with("secret_file = ") => out.push_str(&format!(
                "secret_file = {:?}\n",
                secret.display().to_string()
            )),
            Some(s) if s.starts_with("cores = ") => out.push_str("cores = 1\n"),
            Some(s) if files.iter().any(|(k, _)| s.starts_with(&format!("{k} = "))) => {
                let (k, path) = files
                    .iter()
                    .find(|(k, _)| s.starts_with(&format!("{k} = ")))
                    .unwrap();
                out.push_str(&format!("{k} = {:?}\n", path.display().to_string()));
            }
            Some(s) => {
                out.push_str(s);
                out.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn documented_values_are_the_defaults() {
    let dir = scratch("defaults");
    let file = dir.join("uncommented.toml");
    let shared = dir.join("shared.toml");
    std::fs::write(&shared, uncommented(&dir, true)).unwrap();
    let out = check(&shared);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let toml = uncommented(&dir, false);
    std::fs::write(&file, &toml).unwrap();
    let out = check(&file);
    assert_eq!(out.status.code(), Some(0), "{toml}\n{}", text(&out.stderr));

    let c = Config::load(&Args {
        config: Some(file),
        ..Args::default()
    })
    .unwrap();
    let d = Config::default();
    assert_eq!(c.listen, d.listen);
    assert_eq!(c.io, d.io);
    assert_eq!(c.log_level, d.log_level);
    assert_eq!(c.shutdown_timeout, d.shutdown_timeout);
    assert_eq!(c.max_frame, d.max_frame);
    assert_eq!(c.identify_timeout, d.identify_timeout);
    assert_eq!(c.idle_timeout, d.idle_timeout);
    assert_eq!(c.outbound_limit, d.outbound_limit);
    assert_eq!(c.udp_quit_per_sec, d.udp_quit_per_sec);
    assert_eq!(c.max_connections, d.max_connections);
    assert_eq!(c.max_connections_per_source, d.max_connections_per_source);
    assert_eq!(c.connect_rate_per_source, d.connect_rate_per_source);
    // The settings that are off by default, and their examples.
    assert_eq!(d.admin, None);
    let admin = c.admin.expect("admin example");
    assert!(admin.ip().is_loopback(), "admin example binds {admin}");
    assert!(d.allow_networks.is_empty() && !c.allow_networks.is_empty());
    assert_eq!(c.duplicate_identity, d.duplicate_identity);
    assert_eq!(c.answer_window, d.answer_window);
    assert_eq!(c.tls_handshake_timeout, d.tls_handshake_timeout);
    assert_eq!(c.udp_plain, d.udp_plain);
    assert_eq!(c.admin_connections, d.admin_connections);
    // The cluster is off by default; the example joins one, with a password from a file.
    assert!(d.cluster.is_none());
    let cluster = c.cluster.as_ref().expect("cluster example");
    assert_eq!(cluster.name, "velium");
    assert!(matches!(
        &cluster.auth,
        velium_server::config::ClusterAuth::UserPassword(u, p) if u == "velium" && p == "hunter2"
    ));
    // TLS and the admin token are off by default; the examples turn them on.
    assert!(d.tls.is_none() && d.admin_token.is_none());
    let tls = c.tls.as_ref().expect("TLS example");
    assert!(!tls.optional && tls.client_ca);
    assert!(c.admin_token.as_ref().is_some_and(|t| t.verify(b"hunter2")));
    let s = Config::load(&Args {
        config: Some(shared),
        ..Args::default()
    })
    .unwrap();
    assert!(d.secret.is_none() && s.secret.is_some() && s.users.is_empty());
    // The worked example: an `ops` user and a `boxer` user.
    assert!(d.users.is_empty() && c.secret.is_none());
    let names: Vec<&str> = c.users.keys().map(|k| &**k).collect();
    assert_eq!(names, ["boxer", "ops"]);
    let target = |t: &str| velium_server::proto::pattern::Pattern::parse(t.as_bytes()).unwrap();
    assert!(c.users["ops"].may_command(&target(">")));
    assert!(c.users["boxer"].may_be("peq.ecommons.cleric"));
    assert!(!c.users["boxer"].may_be("velium.cli.1"));
    assert!(!c.users["boxer"].may_command(&target("peq.>")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_setting_is_documented() {
    let help = Command::new(SERVER).arg("--help").output().unwrap();
    let help = text(&help.stdout);
    let file = read(CONFIGS[0]);
    let mut flags: Vec<String> = help
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_string()
        })
        .filter(|w| !w.is_empty() && !["help", "version", "config", "check-config"].contains(&&**w))
        .collect();
    flags.sort();
    flags.dedup();
    assert!(flags.len() >= 15, "flags from --help: {flags:?}");
    for flag in flags {
        let key = match flag.as_str() {
            "allow-network" => "allow_networks".to_string(),
            "cluster" => "cluster_url".to_string(),
            f => f.replace('-', "_"),
        };
        assert!(
            file.contains(&format!("\n#{key} = ")),
            "--{flag}: no `#{key} = ...` line in {}",
            CONFIGS[0]
        );
    }
    assert!(file.contains("\n#[[user]]\n#name = "));
}

#[test]
fn unit_matches_the_configs() {
    let unit = read("deploy/velium-server.service");
    let value = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    assert_eq!(
        value("ExecStart"),
        ["/usr/local/bin/velium-server --config /etc/velium/velium-server.toml"]
    );
    assert!(value("ExecReload").contains(&"kill -HUP $MAINPID"));
    assert_eq!(value("KillSignal"), ["SIGTERM"]);
    assert_eq!(value("LimitNOFILE"), ["1048576"]);
    let stop = value("TimeoutStopSec");
    let stop = humantime::parse_duration(stop[0]).expect("TimeoutStopSec");
    // io_uring (in @aio), setrlimit and sched_setaffinity (in @resources) stay allowed.
    let filters = value("SystemCallFilter");
    assert!(
        filters.iter().any(|f| f.contains("@system-service")),
        "{filters:?}"
    );
    for f in filters.iter().filter(|f| f.starts_with('~')) {
        for needed in [
            "@system-service",
            "@aio",
            "io_uring",
            "@resources",
            "setrlimit",
        ] {
            assert!(!f.contains(needed), "SystemCallFilter={f} denies {needed}");
        }
    }

    // The unit stops the server with SIGTERM and kills it at TimeoutStopSec: that must
    // leave every shipped shutdown_timeout room (the process takes a little longer than
    // shutdown_timeout to exit).
    for rel in CONFIGS {
        let c = Config::load(&Args {
            config: Some(repo(rel)),
            cores: Some(1),
            ..Args::default()
        })
        .unwrap();
        assert!(
            c.shutdown_timeout + Duration::from_secs(5) <= stop,
            "{rel}: shutdown_timeout {:?} vs TimeoutStopSec {stop:?}",
            c.shutdown_timeout
        );
        if let Some(admin) = c.admin {
            assert!(admin.ip().is_loopback(), "{rel}: admin on {admin}");
        }
    }

    // The listen backlog (4096) must not be cut by the shipped somaxconn.
    let sysctl = read("deploy/sysctl.d/90-velium.conf");
    let somaxconn: u32 = sysctl
        .lines()
        .find_map(|l| l.strip_prefix("net.core.somaxconn = "))
        .expect("somaxconn")
        .parse()
        .unwrap();
    assert!(somaxconn >= 4096);
}

/// The three-node example: each node's config passes `--check-config` (with its NATS
/// password file in place) and names a node of its own in one cluster; the nats-server
/// configuration is one nats-server accepts; the compose file starts the three nodes.
#[test]
fn cluster_example_is_consistent() {
    let dir = scratch("cluster");
    let password = dir.join("nats.password");
    std::fs::write(&password, "hunter2\n").unwrap();
    let mut names = Vec::new();
    for n in ["a", "b", "c"] {
        let rel = format!("deploy/cluster/node-{n}.toml");
        let toml = read(&rel).replace("/etc/velium/nats.password", &password.display().to_string());
        let path = dir.join(format!("node-{n}.toml"));
        std::fs::write(&path, &toml).unwrap();
        let out = check(&path);
        assert_eq!(out.status.code(), Some(0), "{rel}: {}", text(&out.stderr));
        let c = Config::load(&Args {
            config: Some(path),
            ..Args::default()
        })
        .unwrap();
        let cluster = c.cluster.expect("a cluster node");
        assert_eq!(cluster.name, "fleet", "{rel}");
        names.push(cluster.node.clone().expect("a node name"));
    }
    assert_eq!(names, ["a", "b", "c"]);
    let compose = read("deploy/cluster/compose.yaml");
    for n in ["a", "b", "c"] {
        assert!(
            compose.contains(&format!("./node-{n}.toml:/etc/velium/node.toml")),
            "node {n}"
        );
    }
    let unit = read("deploy/cluster/velium-server@.service");
    assert!(unit.contains("--config /etc/velium/node-%i.toml"));
    // nats-server -t: test the configuration and exit.
    let nats = ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok())
        .expect("nats-server is installed (scripts/test-deps.sh installs it)");
    let out = Command::new(nats)
        .args(["-t", "-c"])
        .arg(repo("deploy/cluster/nats-server.conf"))
        .env("VELIUM_NATS_PASSWORD", "hunter2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nats-server -t: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--generate DIR`: both binaries write their man pages (one per `velium` subcommand) and
/// bash, zsh and fish completions, and every option of the server is in its page.
#[test]
fn man_pages_and_completions_are_generated() {
    use clap::CommandFactory;
    let dir = scratch("generate");
    for (bin, name) in [
        (SERVER, "velium-server"),
        (env!("CARGO_BIN_EXE_velium"), "velium"),
    ] {
        let out = Command::new(bin)
            .arg("--generate")
            .arg(dir.join(name))
            .output()
            .expect("run --generate");
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let listed = text(&out.stdout);
        for file in [
            format!("man/{name}.1"),
            format!("completions/{name}.bash"),
            format!("completions/_{name}"),
            format!("completions/{name}.fish"),
        ] {
            let path = dir.join(name).join(&file);
            assert!(path.is_file(), "{name}: no {file}");
            assert!(
                listed.contains(&*path.to_string_lossy()),
                "{name}: {listed}"
            );
        }
        let page = std::fs::read_to_string(dir.join(name).join(format!("man/{name}.1"))).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH"),
            "{name}: {page}"
        );
        assert!(
            page.contains(".SH \"EXIT STATUS\""),
            "{name}: no EXIT STATUS"
        );
    }
    let page = std::fs::read_to_string(dir.join("velium-server/man/velium-server.1")).unwrap();
    for arg in Args::command().get_arguments() {
        if let Some(long) = arg.get_long() {
            let roff = format!("\\fB\\-\\-{}\\fR", long.replace('-', "\\-"));
            assert!(page.contains(&roff), "velium-server.1 lacks --{long}");
        }
    }
    for sub in ["send", "tell", "who", "stats", "state", "watch", "shim"] {
        let path = dir.join(format!("velium/man/velium-{sub}.1"));
        assert!(path.is_file(), "no velium-{sub}.1");
        let bash = std::fs::read_to_string(dir.join("velium/completions/velium.bash")).unwrap();
        assert!(bash.contains(sub), "velium.bash lacks {sub}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
