//! Why a client operation failed, and how a server's Error text becomes an error a caller
//! can act on.

use std::io;
use std::net::SocketAddr;
use thiserror::Error;

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("server unreachable at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// What the connect returned.
        source: io::Error,
    },
    /// The server found no shim for a Command or Echo target.
    #[error("no shim matches {target}")]
    NoMatch {
        /// The target as the server quoted it.
        target: String,
    },
    /// The server refused a request with this reason (for example a bad target).
    #[error("{0}")]
    Server(String),
    /// A reply did not arrive in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The connection is over.
    #[error("server closed the connection")]
    Closed,
    /// An argument was refused before anything was sent.
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A target or pattern the hub would refuse, refused before anything was sent; it
    /// reads as the hub's Error would (`bad target a.>.b: '>' must be the last segment`),
    /// an empty one shown as `""`.
    #[error("bad {what} {}: {why}", shown(text))]
    BadTarget {
        /// `target` (Command, Echo) or `pattern` (Who, Get, Subscribe).
        what: &'static str,
        /// The target as given.
        text: String,
        /// The hub's reason.
        why: String,
    },
    /// A UDP method was called before [`Client::bind_udp`](super::Client::bind_udp)
    /// succeeded.
    #[error("the UDP channel is not bound (call bind_udp first)")]
    NotBound,
    /// [`Client::bind_udp`](super::Client::bind_udp) gave up.
    #[error("UDP bind failed: {0}")]
    Bind(String),
    /// The server answered a UDP request with Quit: it no longer knows this channel.
    #[error("the server no longer knows this UDP channel; bind it again")]
    UdpUnbound,
    /// TLS failed: the options (an unreadable CA or certificate file), the handshake (the
    /// hub's certificate is not trusted or names another host), or an alert from the hub
    /// (it refused this client's certificate).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server sent something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A socket operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// A target as an error shows it: as given, or `""` when empty.
fn shown(text: &str) -> &str {
    if text.is_empty() { "\"\"" } else { text }
}

/// The error a failed read or write makes: a TLS alert or a bad record is a TLS error,
/// anything else an i/o error.
pub(super) fn io_error(e: io::Error) -> ClientError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => ClientError::Tls(tls.to_string()),
        None => ClientError::Io(e),
    }
}

/// Maps an Error text to the error a caller can act on.
pub(super) fn server_error(msg: String) -> ClientError {
    match msg.strip_prefix("no shim matches ") {
        Some(target) => ClientError::NoMatch {
            target: target.to_string(),
        },
        None => ClientError::Server(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_no_match() {
        assert!(matches!(
            server_error("no shim matches peq.x".into()),
            ClientError::NoMatch { target } if target == "peq.x"
        ));
        assert!(matches!(
            server_error("bad target >.a: x".into()),
            ClientError::Server(_)
        ));
        assert_eq!(
            ClientError::NoMatch {
                target: "a.b".into()
            }
            .to_string(),
            "no shim matches a.b"
        );
    }
}
