//! Who may be whom: the credential a connection presents (Auth), the identities its user
//! may take, what happens to a second claim on a held identity, and the credentials a
//! reload revokes.
//!
//! Every decision rests on the user the connection authenticated as, never on the name
//! it chose: a name is only ever one the user may take, and no two live shims hold the
//! same one (the router enforces that, `router.rs`).

use super::Hub;
use super::shim::{CloseReason, Shim};
use crate::config::{DuplicateIdentity, Secret, User};
use crate::metrics::Counters;
use crate::proto::SP;
use crate::proto::reject::{self, Reject, Revoked};
use std::sync::{Arc, LazyLock};
use tracing::{info, warn};

/// What an Auth frame proved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// The hub has no credentials: the frame means nothing.
    Ignored,
    /// The shared secret (`None`), or a user's name and secret.
    Granted(Option<Arc<User>>),
    /// Neither: the connection is refused.
    Failed,
}

/// What a claim on an identity held by another live shim does, decided for one claimant.
pub(crate) struct Policy {
    rule: DuplicateIdentity,
    /// The claimant's user.
    user: Option<Arc<str>>,
}

impl Policy {
    /// Whether the claimant takes the identity from `holder`.
    pub(crate) fn replaces(&self, hub: &Hub, holder: &Shim) -> bool {
        match self.rule {
            DuplicateIdentity::Replace => true,
            DuplicateIdentity::Refuse => false,
            DuplicateIdentity::SameCredential => match hub.remote_of(holder) {
                // A shim of another node: the user its node reported.
                Some(r) => r.user.as_deref() == self.user.as_deref(),
                None => holder.user().map(|u| u.name.clone()) == self.user,
            },
        }
    }
}

/// Verified when an Auth names no user of the hub, so that a wrong name costs the same
/// time as a wrong secret.
static NOBODY: LazyLock<Secret> = LazyLock::new(|| Secret::new(b"velium: no such user"));

impl Hub {
    /// Checks the data of an Auth frame: on a hub with a shared secret, the secret byte
    /// for byte; on a hub with users, `NAME SP SECRET`.
    pub fn authenticate(&self, data: &[u8]) -> Auth {
        let c = self.config();
        if let Some(s) = &c.secret {
            return if s.verify(data) {
                Auth::Granted(None)
            } else {
                Auth::Failed
            };
        }
        if c.users.is_empty() {
            return Auth::Ignored;
        }
        let (name, secret) = match memchr::memchr(SP, data) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (data, &b""[..]),
        };
        let user = std::str::from_utf8(name).ok().and_then(|n| c.users.get(n));
        match user {
            Some(u) if u.secret.verify(secret) => Auth::Granted(Some(u.clone())),
            Some(_) => Auth::Failed,
            None => {
                let _ = NOBODY.verify(secret);
                Auth::Failed
            }
        }
    }

    /// Whether `shim` may take `label`: on a hub with users, its user (as the settings in
    /// force have it) must exist, with the secret it presented, and may take the label.
    /// Returns how a claim on a held label is decided.
    pub(crate) fn check_identity_claim(&self, shim: &Shim, label: &str) -> Result<Policy, Reject> {
        let c = self.config();
        let user = if c.users.is_empty() {
            // A user presented before a reload took the users away no longer counts, for
            // this claim or for a later one on the same identity.
            shim.set_user(None);
            None
        } else {
            let presented = shim.user().ok_or(Reject::AuthRequired)?;
            let current = match c.users.get(&presented.name) {
                None => return Err(Reject::Revoked(Revoked::UserRemoved)),
                Some(u) if u.secret != presented.secret => {
                    return Err(Reject::Revoked(Revoked::SecretChanged));
                }
                Some(u) => u.clone(),
            };
            if !current.may_be(label) {
                return Err(Reject::IdentityNotPermitted(label.to_owned()));
            }
            let name = current.name.clone();
            shim.set_user(Some(current));
            Some(name)
        };
        Ok(Policy {
            rule: c.duplicate_identity,
            user,
        })
    }

    /// Closes `holder`, whose identity `newcomer` took: Quit, then the close.
    pub(crate) fn displace(&self, holder: &Shim, newcomer: &Shim) {
        Counters::bump(&self.counters().replaced);
        info!(conn = holder.serial, identity = %holder.identity(), by = newcomer.serial,
            "identity taken by a newer connection");
        let why = format!(
            "replaced: a newer connection identified as {}",
            newcomer.identity()
        );
        self.send_last(holder, CloseReason::Replaced, &reject::closing(&why));
        self.remove(holder, CloseReason::Replaced);
    }

    /// After a reload: closes every identified shim whose credentials no longer hold (its
    /// user removed or its secret changed, its identity no longer one the user may take,
    /// or no user at all on a hub that now has users), and hands the others their user's
    /// new permissions. Connections not yet identified are checked when they identify.
    pub(crate) fn recheck_credentials(&self) {
        let c = self.config();
        let mut shims = Vec::new();
        self.table.for_each(|s| shims.push(s.clone()));
        let mut revoked = 0usize;
        for s in shims {
            let why = match (c.users.is_empty(), s.user()) {
                (true, None) => None,
                (true, Some(_)) => Some(Revoked::UserRemoved),
                (false, None) => Some(Revoked::CredentialsRequired),
                (false, Some(u)) => match c.users.get(&u.name) {
                    None => Some(Revoked::UserRemoved),
                    Some(cur) if cur.secret != u.secret => Some(Revoked::SecretChanged),
                    Some(cur) if !cur.may_be(&s.identity()) => Some(Revoked::IdentityNotPermitted),
                    Some(cur) => {
                        s.set_user(Some(cur.clone()));
                        None
                    }
                },
            };
            if let Some(why) = why {
                self.revoke(&s, why);
                revoked += 1;
            }
        }
        if revoked > 0 {
            warn!(
                connections = revoked,
                "reload revoked credentials; connections closed"
            );
        }
    }

    /// Closes `shim` because its credentials no longer hold: the Error, then the close.
    fn revoke(&self, shim: &Shim, why: Revoked) {
        let r = Reject::Revoked(why);
        self.metrics.reject(&r);
        let user = shim.user();
        info!(conn = shim.serial, identity = %shim.identity(),
            user = user.as_ref().map_or("-", |u| &*u.name), reason = why.text(),
            "credentials revoked");
        self.send_last(shim, CloseReason::Revoked(why), &r.frame());
        self.remove(shim, CloseReason::Revoked(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::hub::connection::{Connection, Flow};
    use crate::proto::pattern::Pattern;
    use std::time::Instant;

    fn user(name: &str, identities: &[&str], commands: &[&str]) -> (Arc<str>, Arc<User>) {
        let p = |v: &[&str]| -> Vec<Pattern> {
            v.iter()
                .map(|s| Pattern::parse(s.as_bytes()).unwrap())
                .collect()
        };
        let u = User {
            name: Arc::from(name),
            secret: Secret::new(format!("{name}-secret").as_bytes()),
            identities: p(identities),
            commands: p(commands),
            echoes: p(commands),
            who: p(&[">"]),
            state: p(&[">"]),
        };
        (u.name.clone(), Arc::new(u))
    }

    fn config() -> Config {
        Config {
            users: [
                user("ops", &["velium.cli.>", "ops.>"], &[">"]),
                user("boxer", &["peq.*.*"], &["peq.z.mallory"]),
                user("guest", &["peq.>"], &[]),
            ]
            .into_iter()
            .collect(),
            ..Config::default()
        }
    }

    /// Feeds `data` and returns what the connection was sent.
    fn feed(hub: &Hub, c: &mut Connection, data: &[u8]) -> (Flow, Vec<u8>) {
        let now = Instant::now();
        let (flow, used) = c.on_bytes(hub, data, now);
        assert_eq!(used, data.len());
        hub.finish(0, c.effects(), now);
        let mut out = Vec::new();
        c.shim().outbox.take(&mut out);
        c.shim().outbox.wrote(0);
        (flow, out)
    }

    fn connect(hub: &Hub) -> Connection {
        Connection::accept(hub, 0, "127.0.0.1:9".parse().unwrap(), Instant::now())
    }

    #[test]
    fn auth_names_a_user_and_its_secret() {
        let hub = Hub::new(config());
        assert!(
            matches!(hub.authenticate(b"ops ops-secret"), Auth::Granted(Some(u)) if &*u.name == "ops")
        );
        assert_eq!(hub.authenticate(b"ops boxer-secret"), Auth::Failed);
        assert_eq!(hub.authenticate(b"nobody ops-secret"), Auth::Failed);
        assert_eq!(hub.authenticate(b"ops-secret"), Auth::Failed);
        assert_eq!(
            Hub::new(Config::default()).authenticate(b"x"),
            Auth::Ignored
        );
    }

    #[test]
    fn identities_are_the_users_and_exclusive() {
        let hub = Hub::new(config());
        let mut mallory = connect(&hub);
        let (_, out) = feed(
            &hub,
            &mut mallory,
            b"\x0fboxer boxer-secret\n\x01peq.z.mallory\n",
        );
        assert_eq!(out[0], 0x02, "Session");
        // The rename from the issue: out of the user's identities.
        let (_, out) = feed(&hub, &mut mallory, b"\x01velium.cli.1\n");
        assert_eq!(out, b"\x09identity not permitted: velium.cli.1\n");
        assert_eq!(&*mallory.shim().identity(), "peq.z.mallory");
        // Another user may not take a held name, in any case (same-credential policy).
        let mut ops = connect(&hub);
        feed(&hub, &mut ops, b"\x0fops ops-secret\n\x01ops.one\n");
        let (_, out) = feed(&hub, &mut ops, b"\x01ops.ONE\n");
        assert!(out.is_empty(), "renaming to one's own name in another case");
        let mut guest = connect(&hub);
        let (_, out) = feed(
            &hub,
            &mut guest,
            b"\x0fguest guest-secret\n\x01PEQ.Z.MALLORY\n",
        );
        assert_eq!(out, b"\x09identity in use\n");
        assert!(!guest.shim().is_identified());
        let mut other = connect(&hub);
        feed(&hub, &mut other, b"\x0fboxer boxer-secret\n");
        // The same user replaces the holder: Quit, closed, out of routing.
        let (_, out) = feed(&hub, &mut other, b"\x01peq.z.mallory\n");
        assert_eq!(out[0], 0x02);
        let (flow, out) = feed(&hub, &mut mallory, b"\x06p\n");
        assert!(
            matches!(flow, Flow::Close(CloseReason::Replaced)),
            "{flow:?}"
        );
        assert_eq!(
            out,
            reject::closing("replaced: a newer connection identified as peq.z.mallory")
        );
        assert!(mallory.shim().is_closed());
        assert_eq!(
            hub.counters()
                .replaced
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_reload_revokes_what_no_longer_holds() {
        let hub = Hub::new(config());
        let mut boxer = connect(&hub);
        feed(&hub, &mut boxer, b"\x0fboxer boxer-secret\n\x01peq.z.bob\n");
        let mut ops = connect(&hub);
        feed(&hub, &mut ops, b"\x0fops ops-secret\n\x01ops.one\n");
        let mut next = config();
        next.users.remove("boxer");
        let (live, _) = hub.reload(next);
        assert!(live.contains(&"users"));
        let (flow, out) = feed(&hub, &mut boxer, b"\x06p\n");
        assert_eq!(out, b"\x09credentials revoked: user removed\n");
        assert!(matches!(
            flow,
            Flow::Close(CloseReason::Revoked(Revoked::UserRemoved))
        ));
        let (flow, out) = feed(&hub, &mut ops, b"\x06p\n");
        assert_eq!((flow, out), (Flow::Continue, b"\x07p\n".to_vec()));
        // Narrowed identities: the ops shim no longer may be `ops.one`.
        let mut next = config();
        let (name, narrowed) = user("ops", &["velium.cli.>"], &[">"]);
        next.users.insert(name, narrowed);
        hub.reload(next);
        let (_, out) = feed(&hub, &mut ops, b"\x06p\n");
        assert_eq!(
            out,
            b"\x09credentials revoked: identity no longer permitted\n"
        );
    }
}
