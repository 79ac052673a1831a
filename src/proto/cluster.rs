//! The wire between nodes of a cluster: what one hub tells the others over NATS.
//!
//! Every message is one [`postcard`] encoding of a type below, sent on one of these
//! subjects (`C` is the cluster's name, `NODE` a node's name):
//!
//! | Subject | Message | From, to |
//! |---------|---------|----------|
//! | `velium.C.presence` | [`Presence`] | every node to every node: its shims' joins and leaves, its heartbeat, its snapshot |
//! | `velium.C.hello` | [`Hello`] | a node that (re)joins: everyone answers with a snapshot |
//! | `velium.C.sync.NODE` | [`Hello`] | a node that missed part of NODE's presence: NODE publishes a snapshot |
//! | `velium.C.node.NODE` | [`Direct`] | Commands, Echoes and CommandResponses for NODE's shims |
//! | `velium.C.want` | [`Want`] | a node with a new state subscription: the state of the shims it names, please |
//! | `velium.C.state.IDENTITY` | [`State`] | a shim's whole state, after it changed (coalesced) |
//!
//! Identities are lowercased in subjects, as the hub compares them; state subjects carry
//! them whole, so NATS routes a shim's state only to the nodes whose subscriptions'
//! patterns (`*`, `>`, the same wildcards) match it.

use serde::{Deserialize, Serialize};

/// The prefix of every subject of cluster `name`.
pub fn prefix(name: &str) -> String {
    format!("velium.{name}")
}

/// One identified shim of a node, as the other nodes know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its connection's serial on its node: what later messages name it by.
    pub serial: u64,
    /// Its identity, as it spelled it.
    pub identity: String,
    /// When its connection was accepted (Unix milliseconds).
    pub since_unix_ms: u64,
    /// Whether it has a bound UDP channel.
    pub udp: bool,
    /// The user it authenticated as, if any (a claim's `same-credential` rule compares it).
    pub user: Option<String>,
    /// When it claimed its identity (Unix microseconds on its node's clock): of two
    /// nodes that accepted one name before hearing of each other, the earlier keeps it.
    pub claimed_unix_us: u64,
    /// The holder this claim displaced (its node and serial), when the claimant knew of it
    /// and `duplicate_identity` let it take the name: that node closes its holder.
    pub replaces: Option<(String, u64)>,
}

/// What changed about a node's shims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// A shim identified, or renamed (a rename is a leave of the old name and a join).
    Join(Member),
    /// A shim left: its serial and the reason its watchers are told.
    Leave(u64, String),
    /// A shim bound (true) or lost (false) its UDP channel.
    Udp(u64, bool),
}

/// What a [`Presence`] message carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Changes, in the order the node made them; the message's `seq` is one past the
    /// previous one's.
    Changes(Vec<Change>),
    /// Nothing new: the node is alive, at `seq`.
    Heartbeat,
    /// Part `part` of `parts` of the node's whole membership at `seq`.
    Snapshot {
        /// This part's number, from 0.
        part: u32,
        /// How many parts.
        parts: u32,
        /// The members in this part.
        members: Vec<Member>,
    },
}

/// A node's presence: the sequence of its membership changes, numbered from its start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The sending node.
    pub node: String,
    /// A number drawn when the node started: a new one is a new process.
    pub epoch: u64,
    /// The number of the last change this message includes.
    pub seq: u64,
    /// The node's `Config::cluster_fingerprint`: nodes whose users or limits differ warn.
    pub config: u64,
    /// What it says.
    pub body: Body,
}

/// A node announcing itself (on `hello`) or asking another for a snapshot (on `sync`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The sending node.
    pub node: String,
}

/// A routed frame for the shims of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Routed {
    /// A Command (`id` set) or an Echo, for the shims of the receiving node that `target`
    /// names. The sender's node checked the sender's rates and permissions.
    Route {
        /// The opcode (Command or Echo).
        op: u8,
        /// The sender's identity.
        from: String,
        /// The Command's correlation id on the sender's node.
        id: Option<u64>,
        /// The target pattern, as the sender wrote it.
        target: Vec<u8>,
        /// The text.
        text: Vec<u8>,
        /// It came in over UDP: it goes on over UDP to targets that have a channel.
        udp: bool,
    },
    /// A CommandResponse for the Command `id` of the receiving node.
    Response {
        /// The receiving node's epoch when it sent the Command: an answer for an
        /// earlier process under the same name is dropped.
        epoch: u64,
        /// The id the sender's node gave the Command.
        id: u64,
        /// The responder's identity.
        from: String,
        /// The text.
        text: Vec<u8>,
        /// It came in over UDP: it goes on over UDP if the sender has a channel.
        udp: bool,
    },
}

impl Routed {
    /// Whether it goes on over UDP where it can.
    pub fn udp(&self) -> bool {
        match self {
            Routed::Route { udp, .. } | Routed::Response { udp, .. } => *udp,
        }
    }
}

/// Frames for one node, in the order they were routed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Direct {
    /// The sending node.
    pub node: String,
    /// Its epoch (see [`Presence::epoch`]).
    pub epoch: u64,
    /// The frames.
    pub items: Vec<Routed>,
}

/// A node's request for the state of the shims `pattern` names (a subject pattern).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    /// The asking node.
    pub node: String,
    /// The pattern, lowercased, as a subject: `peq.*.bob`.
    pub pattern: String,
}

/// A shim's whole state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Its node.
    pub node: String,
    /// Its node's epoch: state from an earlier process under that name is dropped.
    pub epoch: u64,
    /// Its serial there.
    pub serial: u64,
    /// Each key: the key, how long ago it was set (milliseconds) and the value.
    pub items: Vec<(String, u64, Vec<u8>)>,
}

/// `msg` encoded.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_allocvec(msg).unwrap_or_default()
}

/// A message decoded; `None` when the bytes are not one.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let p = Presence {
            node: "a".into(),
            epoch: 7,
            seq: 3,
            config: 1,
            body: Body::Changes(vec![
                Change::Join(Member {
                    serial: 5,
                    identity: "peq.z.Bob".into(),
                    since_unix_ms: 1,
                    udp: false,
                    user: Some("boxer".into()),
                    claimed_unix_us: 9,
                    replaces: Some(("b".into(), 4)),
                }),
                Change::Udp(5, true),
                Change::Leave(5, "eof".into()),
            ]),
        };
        assert_eq!(decode::<Presence>(&encode(&p)), Some(p));
        let d = Direct {
            node: "a".into(),
            epoch: 9,
            items: vec![Routed::Route {
                op: 4,
                from: "x".into(),
                id: Some(1 << 20),
                target: b"peq.>".to_vec(),
                text: b"/sit".to_vec(),
                udp: false,
            }],
        };
        let bytes = encode(&d);
        assert!(bytes.len() < 32, "compact: {} bytes", bytes.len());
        assert_eq!(decode::<Direct>(&bytes), Some(d));
        assert_eq!(decode::<Direct>(b"\xff\xff"), None);
    }
}
