//! TLS on the TCP port, with rustls driven sans-IO: the settings loaded from PEM files, and
//! one connection's session, which takes the bytes a read returned and gives back the
//! plaintext, and takes plaintext frames and gives back the records to write.
//!
//! Nothing here touches a socket: the session lives in the connection's outbox
//! (`hub/outbox.rs`), whose lock orders every record it writes, so that a flush from any
//! core and the reader's handshake output leave in the order rustls numbered them. Both
//! drivers feed it the same buffers they feed a plaintext connection.
//!
//! Only TLS 1.3 is offered: the sealed UDP keys come from its exporter (RFC 8446 section
//! 7.5; see `proto/sealed.rs`), and a new protocol has no older clients to serve.

use crate::proto::sealed::{EXPORTER_LABEL, EXPORTER_LEN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first byte of a TLS ClientHello record (a handshake record, RFC 8446 section 5.1).
/// No velium opcode has this value, so one port can serve both while a fleet migrates.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// The rustls crypto provider every TLS context of the project uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider of the hub's TLS contexts, its cipher suites in the hub's order: AES-128-GCM
/// with SHA-256, ChaCha20-Poly1305, AES-256-GCM with SHA-384 (all three TLS 1.3's own, all
/// strong). A handshake hashes its transcript and derives every key with its suite's hash,
/// and SHA-256 is the one processors accelerate: with SHA-384 the hashing was a tenth of
/// the hub's cost of a handshake.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

/// The TLS settings: the certificate, its key, and optionally the CA client certificates
/// must chain to.
pub struct TlsSettings {
    /// The rustls context each new session is made from.
    pub server: Arc<ServerConfig>,
    /// Plaintext is also accepted on the port (`tls_optional`).
    pub optional: bool,
    /// Client certificates are required and verified (`tls_client_ca`).
    pub client_ca: bool,
    /// The files, for messages.
    pub cert_path: PathBuf,
    /// The key file.
    pub key_path: PathBuf,
    /// A digest of every file's contents and of `optional`: a reload that changes any of
    /// them lists `tls` as changed (new sessions use the new files; open ones keep theirs).
    digest: [u8; 32],
}

impl PartialEq for TlsSettings {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("optional", &self.optional)
            .field("client_ca", &self.client_ca)
            .finish()
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Every certificate in PEM `bytes` (read from `path`, for messages).
pub fn certificates(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "certificate file {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

impl TlsSettings {
    /// Loads the certificate chain at `cert`, its private key at `key`, and the CA client
    /// certificates must chain to at `client_ca`; checks that the key matches.
    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        optional: bool,
    ) -> Result<TlsSettings, String> {
        let cert_pem = read(cert, "tls_cert")?;
        let key_pem = read(key, "tls_key")?;
        let chain = certificates(&cert_pem, cert)?;
        let private = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("bad tls_key {}: {e}", key.display()))?;
        let mut digest = Sha256::new();
        digest.update(&cert_pem);
        digest.update(&key_pem);
        digest.update([optional as u8]);
        let provider = server_provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("tls: {e}"))?;
        let builder = match client_ca {
            Some(ca) => {
                let ca_pem = read(ca, "tls_client_ca")?;
                digest.update(&ca_pem);
                let mut roots = RootCertStore::empty();
                for c in certificates(&ca_pem, ca)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("bad tls_client_ca {}: {e}", ca.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("bad tls_client_ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_single_cert(chain, private).map_err(|e| {
            format!(
                "tls_cert {} and tls_key {} do not make a usable pair: {e}",
                cert.display(),
                key.display()
            )
        })?;
        // Shims reconnect rarely and a full handshake is cheap: no tickets to send, and no
        // resumption state kept per client.
        server.send_tls13_tickets = 0;
        // The hub's order of cipher suites decides (see `server_provider`).
        server.ignore_client_order = true;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(TlsSettings {
            server: Arc::new(server),
            optional,
            client_ca: client_ca.is_some(),
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            digest: digest.finalize().into(),
        })
    }
}

/// What reading a batch of records did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// The handshake finished during this batch.
    pub established: bool,
    /// The session has records to write (handshake messages, an alert).
    pub wants_write: bool,
    /// The peer sent close_notify.
    pub closed: bool,
}

/// One connection's TLS session (server side).
pub struct Session {
    conn: ServerConnection,
    established: bool,
}

/// What the handshake established, read once when it finishes.
pub struct Established {
    /// The exporter output the sealed UDP keys are derived from (`proto/sealed.rs`).
    pub exporter: [u8; EXPORTER_LEN],
    /// The client's certificate (end entity, DER), when one was required and verified.
    pub client_cert: Option<CertificateDer<'static>>,
}

/// Largest plaintext a session queues before writing it out (larger output is encrypted
/// as it is written).
const RECORD_BATCH: usize = 64 * 1024;

impl Session {
    /// A new session from the settings of the moment.
    pub fn new(settings: &TlsSettings) -> Result<Session, rustls::Error> {
        let mut conn = ServerConnection::new(settings.server.clone())?;
        // The outbox bounds what is queued (`outbound_limit`): rustls must take it all.
        conn.set_buffer_limit(None);
        Ok(Session {
            conn,
            established: false,
        })
    }

    /// Whether the handshake is done.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Takes the bytes a read returned, appends the plaintext they carried to `plain`,
    /// and appends any records the session must answer with (handshake, alert) to `wire`.
    /// An error (a bad record, a failed handshake) has its alert in `wire`; the
    /// connection is then closed.
    pub fn read(
        &mut self,
        mut input: &[u8],
        plain: &mut Vec<u8>,
        wire: &mut Vec<u8>,
    ) -> Result<Received, rustls::Error> {
        let mut r = Received::default();
        loop {
            let n = match self.conn.read_tls(&mut input) {
                Ok(n) => n,
                // The plaintext buffer is full: it is drained below, then reading goes on.
                Err(e) if e.kind() == io::ErrorKind::Other => 0,
                Err(e) => return Err(rustls::Error::General(e.to_string())),
            };
            let state = match self.conn.process_new_packets() {
                Ok(s) => s,
                Err(e) => {
                    self.write_out(wire);
                    return Err(e);
                }
            };
            let want = state.plaintext_bytes_to_read();
            if want > 0 {
                let start = plain.len();
                plain.resize(start + want, 0);
                let got = self.conn.reader().read(&mut plain[start..]).unwrap_or(0);
                plain.truncate(start + got);
            }
            if state.peer_has_closed() {
                r.closed = true;
            }
            if !self.established && !self.conn.is_handshaking() {
                self.established = true;
                r.established = true;
            }
            if input.is_empty() || r.closed {
                break;
            }
            if n == 0 && want == 0 {
                // Nothing taken and nothing to drain: the rest cannot be read as records.
                return Err(rustls::Error::General("records not consumed".into()));
            }
        }
        r.wants_write = self.conn.wants_write();
        self.write_out(wire);
        Ok(r)
    }

    /// What the finished handshake established (call once `established` was reported).
    pub fn established(&self) -> Established {
        let mut exporter = [0u8; EXPORTER_LEN];
        // Cannot fail once the handshake is done and the length is in range.
        let _ = self
            .conn
            .export_keying_material(&mut exporter, EXPORTER_LABEL, None);
        Established {
            exporter,
            client_cert: self
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned()),
        }
    }

    /// Encrypts `plain` (whole frames) into records appended to `wire`.
    pub fn seal(&mut self, plain: &[u8], wire: &mut Vec<u8>) {
        for part in plain.chunks(RECORD_BATCH) {
            let _ = self.conn.writer().write_all(part);
            self.write_out(wire);
        }
    }

    /// Appends a close_notify alert to `wire`.
    pub fn close(&mut self, wire: &mut Vec<u8>) {
        self.conn.send_close_notify();
        self.write_out(wire);
    }

    fn write_out(&mut self, wire: &mut Vec<u8>) {
        while self.conn.wants_write() {
            if self.conn.write_tls(wire).is_err() {
                break;
            }
        }
    }
}

/// The user name a client certificate carries: its subject's Common Name, when it has
/// exactly one (tools disagree on which of several counts, so none does).
pub fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let mut names = parsed.subject().iter_common_name();
    let cn = names.next()?;
    if names.next().is_some() {
        return None;
    }
    cn.as_str().ok().map(str::to_owned)
}

/// `s` fit for an Error frame and a log line: printable ASCII, at most 64 characters
/// (a certificate's name is the client's to choose).
pub fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
