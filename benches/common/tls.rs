//! TLS from the client side, for every system alike: a throwaway PKI made at run time, the
//! one rustls client context every system is driven with (so that only the servers
//! differ), each system's handshake over TLS in raw protocol bytes, a storm of TLS
//! connections held open, and velium's sealed UDP channel (`proto/sealed.rs`).

use super::{Hist, System, TempDir, connect_from, frame, mqtt_connect_packet, source_ip};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use velium_server::proto::sealed::{self, EXPORTER_LABEL, EXPORTER_LEN, Keys, ReplayWindow};

/// A CA made for this run and the server certificate it signed (ECDSA P-256, SAN
/// 127.0.0.1), as PEM files in a directory removed when dropped. Every server of the run
/// presents the same certificate.
pub struct Pki {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The server certificate (PEM, the end entity only).
    pub cert: PathBuf,
    /// The server's private key (PEM, PKCS#8).
    pub key: PathBuf,
    ca_der: CertificateDer<'static>,
    _dir: TempDir,
}

impl Pki {
    /// A fresh CA and server certificate.
    pub fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
        };
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("tls");
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "velium bench CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("server key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &issuer)
            .expect("sign the server cert");
        let write = |name: &str, text: &str| {
            let p = dir.0.join(name);
            std::fs::write(&p, text).expect("write a PEM file");
            // A throwaway key: readable by the peers, which drop root privileges.
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                .expect("chmod a PEM file");
            p
        };
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the PKI directory");
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            cert: write("server.pem", &cert.pem()),
            key: write("server.key", &key.serialize_pem()),
            ca_der: ca_cert.der().clone(),
            _dir: dir,
        }
    }

    /// The client context every system is driven with: rustls with the ring provider (the
    /// server's own), TLS 1.3 only, the run's CA as the only root, no client certificate,
    /// and no resumption (every handshake is a full one, whatever tickets a server sends).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add the bench CA");
        let mut c = ClientConfig::builder_with_provider(velium_server::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 with ring")
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }

    /// A connector from [`Pki::client_config`].
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client_config())
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// The name every server is verified as: the certificate's IP SAN.
pub fn server_name() -> ServerName<'static> {
    ServerName::from(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// One TLS connection after its system's handshake.
pub struct TlsShim {
    /// The stream (TLS over TCP).
    pub stream: TlsStream<TcpStream>,
    /// When the TLS handshake was done (the client's Finished sent), before the protocol's
    /// own handshake.
    pub tls_done: Instant,
    /// velium's session token (zeros for the other systems).
    pub token: [u8; 16],
}

impl TlsShim {
    /// What the handshake negotiated: "TLS13_AES_256_GCM_SHA384, X25519".
    pub fn negotiated(&self) -> String {
        let c = self.stream.get_ref().1;
        format!(
            "{}, {}",
            c.negotiated_cipher_suite()
                .map_or("?".into(), |s| format!("{:?}", s.suite())),
            c.negotiated_key_exchange_group()
                .map_or("?".into(), |g| format!("{:?}", g.name()))
        )
    }

    /// True while the connection is open as far as this side can tell without blocking
    /// (the probe reads below TLS: call it only on a connection about to be dropped).
    pub fn is_open(&self) -> bool {
        let mut probe = [0u8; 64];
        match self.stream.get_ref().0.try_read(&mut probe) {
            Ok(0) => false,
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

/// `system`'s handshake over TLS 1.3 from `src`, as its own clients do it: TCP connect, then
/// velium: TLS, Identify `name` -> Session; mosquitto: TLS, MQTT 3.1.1 CONNECT -> CONNACK;
/// nats-server (2.9, which sends its INFO in plaintext and then expects the client to
/// start TLS, as its clients do on `tls_required`): INFO, TLS, CONNECT + PING -> PONG.
pub async fn tls_handshake(
    system: System,
    tls: &TlsConnector,
    src: Ipv4Addr,
    addr: SocketAddr,
    name: &str,
) -> std::io::Result<TlsShim> {
    let mut tcp = connect_from(src, addr).await?;
    if system == System::Nats {
        let mut info = Vec::with_capacity(1024);
        super::read_until(&mut tcp, &mut info, b"\r\n").await?;
        if !info.starts_with(b"INFO ") {
            return Err(std::io::Error::other("nats: no INFO"));
        }
        if !info.windows(19).any(|w| w == b"\"tls_required\":true") {
            return Err(std::io::Error::other("nats: INFO without tls_required"));
        }
    }
    let mut stream = tls.connect(server_name(), tcp).await?;
    let tls_done = Instant::now();
    let mut token = [0u8; 16];
    match system {
        System::VeliumUring | System::VeliumEpoll | System::VeliumBefore => {
            stream.write_all(&frame(0x01, name.as_bytes())).await?;
            let mut b = [0u8; 18];
            stream.read_exact(&mut b).await?;
            if b[0] != 0x02 || b[17] != 0x0A {
                return Err(std::io::Error::other(format!(
                    "expected Session, got {:?}",
                    String::from_utf8_lossy(&b)
                )));
            }
            token.copy_from_slice(&b[1..17]);
        }
        System::Mosquitto => {
            stream.write_all(&mqtt_connect_packet(name)).await?;
            let mut b = [0u8; 4];
            stream.read_exact(&mut b).await?;
            if b != [0x20, 0x02, 0x00, 0x00] {
                return Err(std::io::Error::other(format!("bad CONNACK {b:?}")));
            }
        }
        System::Nats => {
            stream
                .write_all(
                    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":true}\r\n\
                      PING\r\n",
                )
                .await?;
            let mut buf = Vec::with_capacity(64);
            read_until_in(&mut stream, &mut buf, b"PONG\r\n").await?;
        }
        System::Floor => return Err(std::io::Error::other("the floor has no TLS")),
    }
    Ok(TlsShim {
        stream,
        tls_done,
        token,
    })
}

/// Reads from any stream until `buf` ends with `end`.
pub async fn read_until_in<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    end: &[u8],
) -> std::io::Result<()> {
    let mut chunk = [0u8; 1024];
    while !buf.ends_with(end) {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// What a TLS storm did.
pub struct TlsStormResult {
    /// Handshake latencies (connect -> the protocol's handshake answered).
    pub hist: Hist,
    /// From the first connect to the last handshake.
    pub elapsed: Duration,
    /// Connections still open at the end.
    pub held: usize,
    /// Failed handshakes.
    pub errors: usize,
    /// The first failure.
    pub first_error: String,
    /// The connections, open.
    pub conns: Vec<TlsShim>,
}

/// N TLS handshakes ([`tls_handshake`]) with C in flight, every connection held open
/// until the end; source addresses in turn from [`source_ip`].
pub async fn tls_storm(
    system: System,
    tls: &TlsConnector,
    addr: SocketAddr,
    n: usize,
    c: usize,
) -> TlsStormResult {
    #[derive(Default)]
    struct Shared {
        next: usize,
        conns: Vec<TlsShim>,
        errors: usize,
        first_error: String,
    }
    let shared = Rc::new(RefCell::new(Shared {
        conns: Vec::with_capacity(n),
        ..Shared::default()
    }));
    let local = tokio::task::LocalSet::new();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c {
        let shared = shared.clone();
        let tls = tls.clone();
        workers.push(local.spawn_local(async move {
            let mut hist = Hist::default();
            loop {
                let i = {
                    let mut sh = shared.borrow_mut();
                    sh.next += 1;
                    sh.next - 1
                };
                if i >= n {
                    break;
                }
                let name = format!("bench.tls.s{i}");
                let t0 = Instant::now();
                let res = tls_handshake(system, &tls, source_ip(i), addr, &name).await;
                let mut sh = shared.borrow_mut();
                match res {
                    Ok(shim) => {
                        hist.record(t0.elapsed());
                        sh.conns.push(shim);
                    }
                    Err(e) => {
                        if sh.errors == 0 {
                            sh.first_error = e.to_string();
                        }
                        sh.errors += 1;
                    }
                }
            }
            hist
        }));
    }
    let hist = local
        .run_until(async move {
            let mut hist = Hist::default();
            for w in workers {
                hist.merge(&w.await.expect("storm worker"));
            }
            hist
        })
        .await;
    let elapsed = start.elapsed();
    let mut sh = shared.borrow_mut();
    let conns = std::mem::take(&mut sh.conns);
    let held = conns.iter().filter(|c| c.is_open()).count();
    TlsStormResult {
        hist,
        elapsed,
        held,
        errors: sh.errors,
        first_error: std::mem::take(&mut sh.first_error),
        conns,
    }
}

/// How long a UDP ping waits for its Pong before it is sent again.
pub const PING_RESEND: Duration = Duration::from_secs(1);

/// The client end of velium's sealed UDP channel, keyed from a TLS session's exporter.
pub struct SealedUdp {
    sock: UdpSocket,
    keys: Keys,
    next: u64,
    window: ReplayWindow,
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Datagrams received that were not the awaited Pong (unsealed, or failing to open).
    pub ignored: u64,
}

impl SealedUdp {
    /// The sealed channel of `session` (its exporter read now), over `sock` (connected to
    /// the hub). The first sealed datagram sent binds it: there is no bind frame.
    pub fn new(sock: UdpSocket, session: &TlsStream<TcpStream>) -> SealedUdp {
        let mut x = [0u8; EXPORTER_LEN];
        session
            .get_ref()
            .1
            .export_keying_material(&mut x, EXPORTER_LABEL, None)
            .expect("TLS exporter");
        SealedUdp {
            sock,
            keys: Keys::from_exporter(&x),
            next: 0,
            window: ReplayWindow::default(),
            out: Vec::with_capacity(256),
            buf: vec![0u8; 2048],
            ignored: 0,
        }
    }

    /// A sealed Ping carrying `data`, until its sealed Pong is back and opened; each try
    /// a datagram of its own with the next counter. Returns the number of resends.
    pub async fn ping(&mut self, data: &[u8]) -> std::io::Result<u32> {
        let ping = frame(0x06, data);
        for attempt in 0..10 {
            self.out.clear();
            self.keys
                .client
                .seal(self.keys.session, self.next, &ping, &mut self.out);
            self.next += 1;
            self.sock.send(&self.out).await?;
            let deadline = tokio::time::Instant::now() + PING_RESEND;
            while let Ok(r) = tokio::time::timeout_at(deadline, self.sock.recv(&mut self.buf)).await
            {
                let n = r?;
                if self.open_pong(n, data) {
                    return Ok(attempt);
                }
                self.ignored += 1;
            }
        }
        Err(std::io::Error::other("no sealed UDP pong after 10 tries"))
    }

    /// Whether the `n` bytes received are a sealed Pong for `data` from the hub (the
    /// receiver's checks: header, session, replay window, then the tag).
    fn open_pong(&mut self, n: usize, data: &[u8]) -> bool {
        let d = &mut self.buf[..n];
        let Ok(h) = sealed::header(d) else {
            return false;
        };
        if h.session != self.keys.session || !self.window.check(h.counter) {
            return false;
        }
        let Ok(plain) = self.keys.hub.open(d) else {
            return false;
        };
        let ok = is_pong(plain, data);
        self.window.accept(h.counter);
        ok
    }
}

/// Whether `f` is a Pong frame echoing `data` (its trailing 0A optional, as in any
/// datagram).
pub fn is_pong(f: &[u8], data: &[u8]) -> bool {
    let f = f.strip_suffix(b"\n").unwrap_or(f);
    f.first() == Some(&0x07) && &f[1..] == data
}

/// A plain UDP Ping carrying `data` from a bound socket, until its Pong is back. Returns
/// the number of resends.
pub async fn plain_ping(u: &UdpSocket, data: &[u8], buf: &mut [u8]) -> std::io::Result<u32> {
    let ping = frame(0x06, data);
    for attempt in 0..10 {
        u.send(&ping).await?;
        let deadline = tokio::time::Instant::now() + PING_RESEND;
        while let Ok(r) = tokio::time::timeout_at(deadline, u.recv(buf)).await {
            let n = r?;
            if is_pong(&buf[..n], data) {
                return Ok(attempt);
            }
        }
    }
    Err(std::io::Error::other("no UDP pong after 10 tries"))
}
