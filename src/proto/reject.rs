//! Every refusal the server answers with: its wire text and the metric it counts in, in
//! one place, so that the protocol document, the Error frames and `/metrics` agree.
//!
//! A request the server will not carry out is answered with one Error frame (the
//! protocol's rule: one answer per request, in order); [`Reject::text`] is that frame's
//! data, and [`Reject::metric`] says whether it counts in `velium_errors_total{kind}`
//! (the client sent something malformed or out of place) or `velium_refused_total{reason}`
//! (a limit or an access rule said no).

use super::identity::IdentityError;
use super::state::KeyError;
use super::target::TargetError;
use super::{Opcode, encode};
use std::borrow::Cow;
use std::fmt;

/// How the Error texts that refuse a CommandResponse begin. A CommandResponse is owed no
/// answer, so such an Error answers none of the client's requests: a client must not
/// match it to its oldest waiting request ([`answers_no_request`]).
pub const RESPONSE_REFUSED: &str = "response refused:";
/// How the Error texts that refuse a Set begin. A Set is owed no answer either.
pub const STATE_REFUSED: &str = "state refused:";
/// How the notice begins that follows the answer to a Command, Echo or Who while the
/// node is cut off from the rest of its cluster: it answers no request either.
pub const CLUSTER_UNREACHABLE: &str = "cluster unreachable:";

/// How the Error texts begin that give the reason the server closes the connection (idle
/// timeout, replaced, shutdown): each comes directly before the Quit, and answers no
/// request.
pub const CLOSING: &str = "closing:";

/// Whether an Error frame's data refuses a CommandResponse or a Set, is the cluster's
/// notice, or gives the reason for a close, and so answers no request.
pub fn answers_no_request(error_text: &[u8]) -> bool {
    error_text.starts_with(RESPONSE_REFUSED.as_bytes())
        || error_text.starts_with(STATE_REFUSED.as_bytes())
        || error_text.starts_with(CLUSTER_UNREACHABLE.as_bytes())
        || error_text.starts_with(CLOSING.as_bytes())
}

/// The last frames of a connection the server closes for `reason`: `Error "closing:
/// REASON"`, then Quit.
pub fn closing(reason: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(CLOSING.len() + reason.len() + 5);
    encode(
        Opcode::Error,
        format!("{CLOSING} {reason}").as_bytes(),
        &mut f,
    );
    f.extend_from_slice(&super::QUIT);
    f
}

/// What an Error frame (or a dropped datagram) was about, for `velium_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A frame longer than `max_frame` (the connection is closed).
    Oversized,
    /// An opcode the protocol does not define.
    UnknownOpcode,
    /// A routed frame before Identify.
    IdentifyFirst,
    /// An identity label that breaks the rules.
    BadIdentity,
    /// An opcode only the server sends, or one not accepted on that transport.
    WrongOpcode,
    /// A frame whose data is not in its documented form (target, id, pattern).
    Malformed,
    /// A Command or Echo whose target matched no shim.
    NoMatch,
    /// No Identify within `identify_timeout`.
    IdentifyTimeout,
    /// A datagram that is not one frame.
    BadDatagram,
    /// A TLS record that did not decrypt or parse after the handshake (the connection is
    /// closed).
    TlsRecord,
    /// A TLS ClientHello on a port without TLS (the connection is closed).
    TlsNotServed,
    /// A Command, Echo or Who answered while the node is cut off from its cluster.
    ClusterUnreachable,
}

impl ErrorKind {
    /// Every kind, in the order `/metrics` lists them.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Oversized,
        ErrorKind::UnknownOpcode,
        ErrorKind::IdentifyFirst,
        ErrorKind::BadIdentity,
        ErrorKind::WrongOpcode,
        ErrorKind::Malformed,
        ErrorKind::NoMatch,
        ErrorKind::IdentifyTimeout,
        ErrorKind::BadDatagram,
        ErrorKind::TlsRecord,
        ErrorKind::TlsNotServed,
        ErrorKind::ClusterUnreachable,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Oversized => "oversized",
            ErrorKind::UnknownOpcode => "unknown_opcode",
            ErrorKind::IdentifyFirst => "identify_first",
            ErrorKind::BadIdentity => "bad_identity",
            ErrorKind::WrongOpcode => "wrong_opcode",
            ErrorKind::Malformed => "malformed",
            ErrorKind::NoMatch => "no_match",
            ErrorKind::IdentifyTimeout => "identify_timeout",
            ErrorKind::BadDatagram => "bad_datagram",
            ErrorKind::TlsRecord => "tls_record",
            ErrorKind::TlsNotServed => "tls_not_served",
            ErrorKind::ClusterUnreachable => "cluster_unreachable",
        }
    }
}

/// Why a connection or a request was refused by a limit or an access rule, for
/// `velium_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The source is outside `allow_networks` (closed without a byte).
    AllowList,
    /// `max_connections` reached.
    MaxConnections,
    /// `max_connections_per_source` reached for the source IP.
    PerSource,
    /// `connect_rate_per_source` exceeded.
    Rate,
    /// Identify without the secret, or a wrong secret.
    Auth,
    /// A Command or Echo the sender's user may not send to that target.
    Permission,
    /// An Identify or rename as an identity the user may not take.
    Identity,
    /// An Identify or rename as an identity another live shim holds (policy `refuse`).
    IdentityInUse,
    /// A CommandResponse whose responder was not sent that Command (or not recently).
    Answer,
    /// A connection closed because a reload removed or changed its credentials.
    Revoked,
    /// More routed frames per second than `routed_per_sec`.
    RateRouted,
    /// More deliveries per second than `deliveries_per_sec`.
    RateDeliveries,
    /// More Who per second than `who_per_sec`.
    RateWho,
    /// A plaintext client on a port that requires TLS.
    TlsRequired,
    /// A TLS handshake that failed (a certificate refused, a protocol error).
    TlsHandshake,
    /// A TLS handshake that did not finish in time.
    TlsTimeout,
    /// A plain UDP bind refused: plain UDP is off, or the session is a TLS one.
    PlainUdp,
    /// A Set past `state_value_bytes`, `state_keys` or `state_bytes`.
    StateLimit,
    /// More Set frames per second than `state_sets_per_sec`.
    StateRate,
    /// A Subscribe past `state_subscriptions`.
    Subscriptions,
}

impl Refusal {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [Refusal; 20] = [
        Refusal::AllowList,
        Refusal::MaxConnections,
        Refusal::PerSource,
        Refusal::Rate,
        Refusal::Auth,
        Refusal::Permission,
        Refusal::Identity,
        Refusal::IdentityInUse,
        Refusal::Answer,
        Refusal::Revoked,
        Refusal::RateRouted,
        Refusal::RateDeliveries,
        Refusal::RateWho,
        Refusal::TlsRequired,
        Refusal::TlsHandshake,
        Refusal::TlsTimeout,
        Refusal::PlainUdp,
        Refusal::StateLimit,
        Refusal::StateRate,
        Refusal::Subscriptions,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::AllowList => "allow_list",
            Refusal::MaxConnections => "max_connections",
            Refusal::PerSource => "per_source",
            Refusal::Rate => "rate",
            Refusal::Auth => "auth",
            Refusal::Permission => "permission",
            Refusal::Identity => "identity",
            Refusal::IdentityInUse => "identity_in_use",
            Refusal::Answer => "answer",
            Refusal::Revoked => "revoked",
            Refusal::RateRouted => "rate_routed",
            Refusal::RateDeliveries => "rate_deliveries",
            Refusal::RateWho => "rate_who",
            Refusal::TlsRequired => "tls_required",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::TlsTimeout => "tls_timeout",
            Refusal::PlainUdp => "plain_udp",
            Refusal::StateLimit => "state_limit",
            Refusal::StateRate => "state_rate",
            Refusal::Subscriptions => "subscriptions",
        }
    }
}

/// Where a refusal is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// `velium_errors_total{kind}`.
    Error(ErrorKind),
    /// `velium_refused_total{reason}`.
    Refusal(Refusal),
}

/// A routed frame whose data is not in its documented form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Command or Echo: `TARGET SP TEXT`.
    TargetText,
    /// CommandResponse: `ID SP RESPONSE`, ID a canonical decimal.
    IdResponse,
    /// Subscribe: `SID SP INTERVAL_MS SP PATTERN [SP KEY...]`.
    Subscribe,
}

/// Why a connection's credentials no longer hold after a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// Its user is no longer in the configuration.
    UserRemoved,
    /// Its user's secret changed.
    SecretChanged,
    /// Its user may no longer take its identity.
    IdentityNotPermitted,
    /// The hub now has users, and the connection authenticated as none.
    CredentialsRequired,
}

impl Revoked {
    /// The reason, as the Error frame and the close line give it.
    pub fn text(self) -> &'static str {
        match self {
            Revoked::UserRemoved => "user removed",
            Revoked::SecretChanged => "secret changed",
            Revoked::IdentityNotPermitted => "identity no longer permitted",
            Revoked::CredentialsRequired => "credentials now required",
        }
    }
}

/// A per-shim rate a request went past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// Command, Echo and Who frames per second.
    Routed,
    /// Shims reached and Who entries listed per second.
    Deliveries,
    /// Who requests per second.
    Who,
    /// Set frames per second.
    Sets,
}

/// Why the server refused a frame, a request or a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reject {
    /// An opcode the protocol does not define.
    UnknownOpcode(u8),
    /// An opcode only the server sends.
    ServerOnly(Opcode),
    /// An opcode not accepted over UDP.
    NotOverUdp(Opcode),
    /// Who over UDP (a listing does not fit a datagram).
    WhoOverUdp,
    /// A routed frame before the first Identify.
    IdentifyFirst,
    /// An identity that breaks the grammar.
    BadIdentity(IdentityError),
    /// A routed frame whose data is not in its form.
    Malformed(Shape),
    /// A Command's or Echo's target that is not a target (the target, lossy).
    BadTarget(String, TargetError),
    /// A Who, Get or Subscribe target that is not a target.
    BadPattern(String, TargetError),
    /// A Command or Echo that matched no shim.
    NoMatch(String),
    /// A Command the sender's user may not send to the target (the target, lossy).
    NotPermitted(String),
    /// An Echo the sender's user may not send to the target.
    EchoNotPermitted(String),
    /// An identity the user may not take.
    IdentityNotPermitted(String),
    /// An identity another live shim holds.
    IdentityInUse,
    /// An identity claimed earlier on another node (that node's name): the later claim
    /// is closed.
    IdentityElsewhere(String),
    /// The notice after an answer while the node is cut off from its cluster.
    ClusterUnreachable,
    /// A CommandResponse for a Command the responder was not sent, or not among its last
    /// `answer_window` (the id and the window).
    NotAnswerable(u64, usize),
    /// A reload removed or changed the connection's credentials (the connection is closed).
    Revoked(Revoked),
    /// A rate went past its configured value (per second).
    RateLimited(Rate, u32),
    /// A frame longer than `max_frame` (the connection is closed).
    TooLong(usize),
    /// No Identify within `identify_timeout` (the connection is closed).
    IdentifyTimeout,
    /// Identify without the Auth the hub requires (the connection is closed).
    AuthRequired,
    /// A wrong secret (the connection is closed).
    AuthFailed,
    /// A connection turned away by a limit before any protocol work.
    Connection(Refusal),
    /// A plaintext client on a port that requires TLS (the connection is closed).
    TlsRequired,
    /// A verified client certificate whose Common Name names no user (the connection is
    /// closed).
    CertificateUser(String),
    /// A TLS ClientHello on a port that does not speak TLS (the connection is closed).
    TlsNotServed,
    /// A plain UDP bind on a hub with `udp_plain = false`.
    PlainUdpOff,
    /// A plain UDP bind from a TLS session, whose UDP is sealed.
    PlainUdpTls,
    /// A Set that is not `KEY=VALUE` items separated by 0x1F.
    SetMalformed,
    /// A Set with a key outside the grammar (the key, lossy).
    SetBadKey(String, KeyError),
    /// A Set with a value longer than `state_value_bytes` (the key and the limit).
    StateValue(String, usize),
    /// A Set that would leave the shim more than `state_keys` keys.
    StateKeys(usize),
    /// A Set that would leave the shim more than `state_bytes` bytes of state.
    StateBytes(usize),
    /// A subscription id that is not a canonical decimal from 1 to 2^32-1 (as written).
    BadSid(String),
    /// An interval that is not milliseconds from 0 to an hour (as written).
    BadInterval(String),
    /// A Subscribe or Get key outside the grammar (as written).
    BadKey(String, KeyError),
    /// A Subscribe whose id the connection already uses.
    SubscriptionExists(u32),
    /// A Subscribe past `state_subscriptions`.
    TooManySubscriptions(usize),
    /// A Subscribe or Get naming more keys than `state_keys`.
    KeysListed(usize),
    /// A Subscribe or Get whose listing would pass this many bytes.
    ListingTooLarge(usize),
    /// An Unsubscribe for no subscription of the connection (as written).
    NoSubscription(String),
}

impl Reject {
    /// The Error frame's text.
    pub fn text(&self) -> Cow<'static, str> {
        match self {
            Reject::UnknownOpcode(b) => format!("unknown opcode 0x{b:02X}").into(),
            Reject::ServerOnly(op) => format!(
                "opcode 0x{:02X} ({}) is sent by the server only",
                *op as u8,
                op.name()
            )
            .into(),
            Reject::NotOverUdp(op) => format!(
                "opcode 0x{:02X} ({}) is not accepted over UDP",
                *op as u8,
                op.name()
            )
            .into(),
            Reject::WhoOverUdp => "Who is answered over TCP only".into(),
            Reject::IdentifyFirst => "identify first".into(),
            Reject::BadIdentity(e) => e.to_string().into(),
            Reject::Malformed(Shape::TargetText) => "expected: TARGET SP TEXT".into(),
            Reject::Malformed(Shape::IdResponse) => {
                "response refused: ID must be a decimal number with no sign or leading zero".into()
            }
            Reject::BadTarget(t, e) => format!("bad target {t}: {e}").into(),
            Reject::BadPattern(t, e) => format!("bad pattern {t}: {e}").into(),
            Reject::NoMatch(t) => format!("no shim matches {t}").into(),
            Reject::NotPermitted(t) => format!("command not permitted: {t}").into(),
            Reject::EchoNotPermitted(t) => format!("echo not permitted: {t}").into(),
            Reject::IdentityNotPermitted(i) => format!("identity not permitted: {i}").into(),
            Reject::IdentityInUse => "identity in use".into(),
            Reject::IdentityElsewhere(node) => format!("identity in use on node {node}").into(),
            Reject::ClusterUnreachable => format!(
                "{CLUSTER_UNREACHABLE} only shims on this node were reached; the rest of \
                 the cluster is out of reach"
            )
            .into(),
            Reject::NotAnswerable(id, n) => format!(
                "response refused: {id} is not among the last {n} Commands sent to this shim"
            )
            .into(),
            Reject::Revoked(why) => format!("credentials revoked: {}", why.text()).into(),
            Reject::RateLimited(Rate::Sets, n) => {
                format!("{STATE_REFUSED} rate limit: more than {n} sets per second").into()
            }
            Reject::RateLimited(rate, n) => format!(
                "rate limit: more than {n} {} per second",
                match rate {
                    Rate::Routed => "routed frames",
                    Rate::Deliveries => "deliveries",
                    Rate::Who => "Who",
                    Rate::Sets => unreachable!("written above"),
                }
            )
            .into(),
            Reject::TooLong(max) => format!("frame longer than {max} bytes").into(),
            Reject::IdentifyTimeout => "identify timeout".into(),
            Reject::AuthRequired => "authentication required".into(),
            Reject::AuthFailed => "authentication failed".into(),
            Reject::TlsRequired => "this port requires TLS".into(),
            Reject::TlsNotServed => "this port does not speak TLS".into(),
            Reject::CertificateUser(cn) => {
                format!("authentication failed: certificate names no user: {cn}").into()
            }
            Reject::PlainUdpOff => "plain UDP is off on this hub: connect with TLS".into(),
            Reject::PlainUdpTls => "a TLS session seals its UDP: plain binds are refused".into(),
            Reject::SetMalformed => {
                format!("{STATE_REFUSED} expected KEY=VALUE items separated by 0x1F").into()
            }
            Reject::SetBadKey(k, e) => format!("{STATE_REFUSED} bad key {k}: {e}").into(),
            Reject::StateValue(k, n) => {
                format!("{STATE_REFUSED} value of {k} is longer than {n} bytes").into()
            }
            Reject::StateKeys(n) => format!("{STATE_REFUSED} more than {n} keys").into(),
            Reject::StateBytes(n) => format!("{STATE_REFUSED} more than {n} bytes of state").into(),
            Reject::Malformed(Shape::Subscribe) => {
                "expected: SID SP INTERVAL_MS SP PATTERN [SP KEY...]".into()
            }
            Reject::BadSid(s) => format!(
                "bad subscription id {s}: must be a decimal number from 1 to 4294967295 with no leading zero"
            )
            .into(),
            Reject::BadInterval(s) => {
                format!("bad interval {s}: must be milliseconds from 0 to 3600000").into()
            }
            Reject::BadKey(k, e) => format!("bad key {k}: {e}").into(),
            Reject::SubscriptionExists(sid) => format!("subscription {sid} already exists").into(),
            Reject::TooManySubscriptions(n) => format!("more than {n} subscriptions").into(),
            Reject::KeysListed(n) => format!("more than {n} keys listed").into(),
            Reject::ListingTooLarge(n) => format!(
                "state listing larger than {n} bytes: narrow the pattern or the keys"
            )
            .into(),
            Reject::NoSubscription(s) => format!("no subscription {s}").into(),
            Reject::Connection(r) => match r {
                Refusal::MaxConnections => "too many connections",
                Refusal::PerSource => "too many connections from this address",
                Refusal::Rate => "connecting too fast",
                _ => "",
            }
            .into(),
        }
    }

    /// Where this refusal is counted.
    pub fn metric(&self) -> Metric {
        use ErrorKind as E;
        match self {
            Reject::UnknownOpcode(_) => Metric::Error(E::UnknownOpcode),
            Reject::ServerOnly(_) | Reject::NotOverUdp(_) | Reject::WhoOverUdp => {
                Metric::Error(E::WrongOpcode)
            }
            Reject::IdentifyFirst => Metric::Error(E::IdentifyFirst),
            Reject::BadIdentity(_) => Metric::Error(E::BadIdentity),
            Reject::Malformed(_) | Reject::BadTarget(..) | Reject::BadPattern(..) => {
                Metric::Error(E::Malformed)
            }
            Reject::NoMatch(_) => Metric::Error(E::NoMatch),
            Reject::TooLong(_) => Metric::Error(E::Oversized),
            Reject::IdentifyTimeout => Metric::Error(E::IdentifyTimeout),
            Reject::NotPermitted(_) | Reject::EchoNotPermitted(_) => {
                Metric::Refusal(Refusal::Permission)
            }
            Reject::IdentityNotPermitted(_) => Metric::Refusal(Refusal::Identity),
            Reject::IdentityInUse | Reject::IdentityElsewhere(_) => {
                Metric::Refusal(Refusal::IdentityInUse)
            }
            Reject::ClusterUnreachable => Metric::Error(ErrorKind::ClusterUnreachable),
            Reject::NotAnswerable(..) => Metric::Refusal(Refusal::Answer),
            Reject::Revoked(_) => Metric::Refusal(Refusal::Revoked),
            Reject::RateLimited(Rate::Routed, _) => Metric::Refusal(Refusal::RateRouted),
            Reject::RateLimited(Rate::Deliveries, _) => Metric::Refusal(Refusal::RateDeliveries),
            Reject::RateLimited(Rate::Who, _) => Metric::Refusal(Refusal::RateWho),
            Reject::RateLimited(Rate::Sets, _) => Metric::Refusal(Refusal::StateRate),
            Reject::SetMalformed
            | Reject::SetBadKey(..)
            | Reject::BadSid(_)
            | Reject::BadInterval(_)
            | Reject::BadKey(..)
            | Reject::SubscriptionExists(_)
            | Reject::NoSubscription(_) => Metric::Error(E::Malformed),
            Reject::StateValue(..) | Reject::StateKeys(_) | Reject::StateBytes(_) => {
                Metric::Refusal(Refusal::StateLimit)
            }
            Reject::TooManySubscriptions(_)
            | Reject::KeysListed(_)
            | Reject::ListingTooLarge(_) => Metric::Refusal(Refusal::Subscriptions),
            Reject::AuthRequired | Reject::AuthFailed => Metric::Refusal(Refusal::Auth),
            Reject::Connection(r) => Metric::Refusal(*r),
            Reject::TlsRequired => Metric::Refusal(Refusal::TlsRequired),
            Reject::TlsNotServed => Metric::Error(E::TlsNotServed),
            Reject::CertificateUser(_) => Metric::Refusal(Refusal::Auth),
            Reject::PlainUdpOff | Reject::PlainUdpTls => Metric::Refusal(Refusal::PlainUdp),
        }
    }

    /// Appends the Error frame (nothing for a refusal that is answered with silence: a
    /// source outside the allowed networks).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let text = self.text();
        if !text.is_empty() {
            encode(Opcode::Error, text.as_bytes(), out);
        }
    }

    /// The Error frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        self.encode(&mut f);
        f
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_the_documented_ones() {
        assert_eq!(
            Reject::UnknownOpcode(0x42).frame(),
            b"\x09unknown opcode 0x42\n"
        );
        assert_eq!(
            Reject::RateLimited(Rate::Routed, 200).text(),
            "rate limit: more than 200 routed frames per second"
        );
        assert_eq!(
            Reject::ServerOnly(Opcode::Ack).text(),
            "opcode 0x0C (Ack) is sent by the server only"
        );
        assert!(Reject::Connection(Refusal::AllowList).frame().is_empty());
        for r in Refusal::ALL {
            assert!(!r.label().is_empty());
        }
    }
}
