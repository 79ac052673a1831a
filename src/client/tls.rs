//! TLS on the control connection (see "TLS" in the [client documentation](super)): the
//! rustls context made from [`TlsOptions`], the handshake, and the exporter output the
//! sealed UDP keys come from.

use super::error::ClientError;
use crate::proto::sealed::{EXPORTER_LABEL, EXPORTER_LEN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How a client speaks TLS to a hub ([`ClientOptions::tls`](super::ClientOptions::tls)).
/// Only TLS 1.3 is offered, as the hub requires (its exporter keys the sealed UDP channel).
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// The name the hub's certificate must carry (a DNS name or an IP address). Default:
    /// the server's IP address, which the certificate must then list.
    pub server_name: Option<String>,
    /// A PEM file of the CA certificates to trust. Default: the system's roots.
    pub ca: Option<PathBuf>,
    /// Accept any certificate: the link is encrypted but the hub is not authenticated,
    /// so anybody on the path can pose as it. For tests and first trials only.
    pub insecure: bool,
    /// A PEM certificate chain to present (mutual TLS: the hub may then take its subject's
    /// Common Name as the user, with no Auth frame). Needs [`TlsOptions::key`].
    pub cert: Option<PathBuf>,
    /// The private key of [`TlsOptions::cert`], PEM.
    pub key: Option<PathBuf>,
}

fn tls_error(why: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(why.to_string())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path)
        .map_err(|e| tls_error(format!("cannot read {what} {}: {e}", path.display())))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    crate::tls::certificates(&read(path, what)?, path)
        .map_err(|e| tls_error(format!("{what}: {e}")))
}

/// The system's trusted roots, loaded once per process (reading them takes milliseconds,
/// too long to repeat for every connection of a load generator).
fn system_roots() -> Result<Arc<RootCertStore>, ClientError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let why = found.errors.first().map(|e| format!(": {e}"));
                return Err(format!(
                    "no system root certificates found{} (give a CA file)",
                    why.unwrap_or_default()
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
        .map_err(tls_error)
}

/// The rustls context `options` describe.
fn client_config(options: &TlsOptions) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = crate::tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?;
    let builder = if options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        let roots = match &options.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(ca, "CA file")? {
                    roots
                        .add(c)
                        .map_err(|e| tls_error(format!("bad CA file {}: {e}", ca.display())))?;
                }
                Arc::new(roots)
            }
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    };
    let config = match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "client certificate")?;
            let key_der = PrivateKeyDer::from_pem_slice(&read(key, "client key")?)
                .map_err(|e| tls_error(format!("bad client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| tls_error(format!("client certificate and key: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(ClientError::Invalid {
                what: "tls",
                why: "a client certificate needs its key, and a key its certificate".into(),
            });
        }
    };
    Ok(Arc::new(config))
}

/// The name the certificate is checked against.
fn server_name(options: &TlsOptions, addr: SocketAddr) -> Result<ServerName<'static>, ClientError> {
    match &options.server_name {
        Some(name) => ServerName::try_from(name.clone()).map_err(|e| ClientError::Invalid {
            what: "server name",
            why: format!("{name:?}: {e}"),
        }),
        None => Ok(ServerName::IpAddress(addr.ip().into())),
    }
}

/// Checks `options` before anything is sent (a bad file is the caller's mistake, not the
/// hub's), then runs the handshake over `stream`. Returns the stream and the exporter
/// output of the session.
pub(super) async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    options: &TlsOptions,
) -> Result<(TlsStream<TcpStream>, [u8; EXPORTER_LEN]), ClientError> {
    let config = client_config(options)?;
    let name = server_name(options, addr)?;
    let tls = TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| {
            let why = handshake_failed(addr, &e);
            // A closed or reset connection (a hub turning connections away at accept, as
            // over its limits) is not a TLS failure: trying again later may succeed.
            match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                Some(_) => tls_error(why),
                None => ClientError::Io(std::io::Error::new(e.kind(), why)),
            }
        })?;
    let exporter = tls
        .get_ref()
        .1
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(tls_error)?;
    Ok((tls, exporter))
}

/// Why a handshake failed, in words: a hub that answered in plaintext (its Error frame
/// starts with 0x09, no TLS record type) is said to be one without TLS.
fn handshake_failed(addr: SocketAddr, e: &std::io::Error) -> String {
    let plaintext = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        });
    if plaintext {
        format!(
            "handshake with {addr} failed: the hub answered in plaintext (no TLS on that port: \
             connect without TLS, or turn TLS on at the hub)"
        )
    } else {
        format!("handshake with {addr} failed: {e}")
    }
}

/// The verifier `insecure` uses: any certificate is taken, but the handshake signatures
/// are still checked against it, so the session keys are at least those of whoever holds
/// that certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
