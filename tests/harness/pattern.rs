//! The model's identity grammar and target patterns, written from `docs/protocol.md` §3
//! and §6 and not from `src/proto/identity.rs`, `src/proto/pattern.rs` or
//! `src/hub/router.rs`, so that the model and the hub do not share a mistake. Only the
//! error values are the core's ([`IdentityError`], [`PatternError`]), so that the model's
//! refusals are encoded by the core's
//! [`Reject`](velium_server::proto::reject::Reject) like the hub's.

use velium_server::proto::identity::IdentityError;
use velium_server::proto::pattern::PatternError;

/// §3: an identity is segments of ASCII letters, digits, `_` and `-`, joined by single
/// dots, at most 64 bytes. An empty or too long label is named as such, anything else
/// by its first fault from the left: an empty segment (where it starts) or a byte outside
/// the grammar.
pub(super) fn check_label(label: &[u8]) -> Result<&str, IdentityError> {
    if label.is_empty() {
        return Err(IdentityError::Empty);
    }
    if label.len() > 64 {
        return Err(IdentityError::TooLong);
    }
    let mut at = 0;
    for seg in label.split(|&b| b == b'.') {
        if seg.is_empty() {
            return Err(IdentityError::EmptySegment { at });
        }
        if let Some(i) = seg
            .iter()
            .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(IdentityError::Byte {
                byte: seg[i],
                at: at + i,
            });
        }
        at += seg.len() + 1;
    }
    Ok(std::str::from_utf8(label).expect("only ASCII is left"))
}

#[derive(Clone, Debug, PartialEq)]
enum MSeg {
    Lit(String),
    One,
    Rest,
}

/// A target pattern as the model reads it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct MPat {
    segs: Vec<MSeg>,
    pub(super) include_self: bool,
}

fn lower(seg: &[u8]) -> String {
    String::from_utf8_lossy(seg).to_ascii_lowercase()
}

impl MPat {
    pub(super) fn parse(t: &[u8]) -> Result<MPat, PatternError> {
        let (include_self, body) = match t.first() {
            Some(b'+') => (true, &t[1..]),
            _ => (false, t),
        };
        if body.is_empty() {
            return Err(PatternError::Empty);
        }
        if body.len() > 255 {
            return Err(PatternError::TooLong);
        }
        if std::str::from_utf8(body).is_err() {
            return Err(PatternError::NotUtf8);
        }
        let parts: Vec<&[u8]> = body.split(|&b| b == b'.').collect();
        // §6: segments joined by single dots, the first fault from the left named; an
        // empty segment by where it starts in the target as written, the `+` counted.
        let mut at = t.len() - body.len();
        let mut segs = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if p.is_empty() {
                return Err(PatternError::EmptySegment { at });
            }
            at += p.len() + 1;
            segs.push(match *p {
                b"*" => MSeg::One,
                b">" if i + 1 == parts.len() => MSeg::Rest,
                b">" => return Err(PatternError::RestNotLast),
                lit => MSeg::Lit(lower(lit)),
            });
        }
        Ok(MPat { segs, include_self })
    }

    pub(super) fn all() -> MPat {
        MPat {
            segs: vec![MSeg::Rest],
            include_self: true,
        }
    }

    pub(super) fn matches(&self, identity: &str) -> bool {
        let parts: Vec<String> = identity.split('.').map(|p| lower(p.as_bytes())).collect();
        fn go(segs: &[MSeg], parts: &[String]) -> bool {
            match (segs.first(), parts.first()) {
                (None, None) => true,
                (Some(MSeg::Rest), Some(_)) => true,
                (Some(MSeg::One), Some(_)) => go(&segs[1..], &parts[1..]),
                (Some(MSeg::Lit(l)), Some(p)) if l == p => go(&segs[1..], &parts[1..]),
                _ => false,
            }
        }
        go(&self.segs, &parts)
    }

    /// Whether every identity `q` matches is matched by `self`.
    pub(super) fn covers(&self, q: &MPat) -> bool {
        fn go(p: &[MSeg], q: &[MSeg]) -> bool {
            match (p.first(), q.first()) {
                (Some(MSeg::Rest), Some(_)) => true,
                (None, None) => true,
                (_, Some(MSeg::Rest)) | (None, Some(_)) | (Some(_), None) => false,
                (Some(MSeg::One), Some(_)) => go(&p[1..], &q[1..]),
                (Some(MSeg::Lit(a)), Some(MSeg::Lit(b))) if a == b => go(&p[1..], &q[1..]),
                (Some(MSeg::Lit(_)), Some(_)) => false,
            }
        }
        go(&self.segs, &q.segs)
    }
}
