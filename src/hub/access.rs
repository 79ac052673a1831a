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
use crate::proto::reject::{Reject, Revoked};
use crate::proto::{QUIT, SP};
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
    pub(crate) fn replaces(&self, holder: &Shim) -> bool {
        match self.rule {
            DuplicateIdentity::Replace => true,
            DuplicateIdentity::Refuse => false,
            DuplicateIdentity::SameCredential => holder.user().map(|u| u.name.clone()) == self.user,
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
        self.send_last(holder, CloseReason::Replaced, &QUIT);
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
            warn!(connections = revoked, "reload revoked credentials; connections closed");
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
