//! The model's targets: a pattern, then filters on the shims' relay state, written from
//! `docs/protocol.md` §6 ("Filters: targets by state") and not from
//! `src/proto/target.rs`. Only the error values are the core's ([`TargetError`],
//! [`FilterError`], [`PatternError`]), so that the model's refusals are encoded by the
//! core's [`Reject`](velium_server::proto::reject::Reject) like the hub's.
//!
//! What the model reads in §6:
//!
//! - `TARGET = PATTERN *( "," FILTER )`; a filter is `KEY=VALUE` (the key's whole value)
//!   or `KEY~WORD` (one of its space-separated words), the key in the key grammar of §13,
//!   the value one or more bytes but a control byte, a space or a comma;
//! - what a pattern is checked for first is checked on the whole target after a leading
//!   `+`: empty, longer than 255 bytes, not UTF-8; then the pattern (the part before the
//!   first comma), then the filters from the left, each named by its place from 1 and as
//!   written: at each place an empty filter (two commas in a row, a trailing comma), a
//!   ninth filter, or the filter's own fault (no `=` or `~`, then its key, then nothing
//!   after the test, then a control byte in the value);
//! - comparisons ignore ASCII case on both sides, words are separated by one or more
//!   spaces, every filter must hold, and a shim that does not hold a key passes no
//!   filter on it.

use super::pattern::MPat;
use super::state::{MKey, check_key};
use velium_server::proto::pattern::PatternError;
use velium_server::proto::target::{FilterError, TargetError};

/// §6: at most 8 filters.
const MAX_FILTERS: usize = 8;
/// §6: a target is 1 to 255 bytes after a leading `+`.
const MAX_TARGET: usize = 255;

/// One filter as the model reads it.
#[derive(Clone, Debug, PartialEq)]
struct MFilter {
    /// The key, as written.
    key: String,
    /// `~` (a word of the value) rather than `=` (the whole value).
    word: bool,
    /// What it compares with, as written.
    value: Vec<u8>,
}

impl MFilter {
    /// Whether a shim holding `state` passes it.
    fn passes(&self, state: &[MKey]) -> bool {
        let Some(held) = state.iter().find(|e| e.key.eq_ignore_ascii_case(&self.key)) else {
            return false;
        };
        if self.word {
            (held.value.split(|&b| b == b' ')).any(|w| w.eq_ignore_ascii_case(&self.value))
        } else {
            held.value.eq_ignore_ascii_case(&self.value)
        }
    }
}

/// A target as the model reads it: which identities, and what their state must hold.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct MTarget {
    pub(super) pattern: MPat,
    filters: Vec<MFilter>,
}

impl MTarget {
    pub(super) fn parse(t: &[u8]) -> Result<MTarget, TargetError> {
        let body = t.strip_prefix(b"+").unwrap_or(t);
        if body.is_empty() {
            return Err(PatternError::Empty.into());
        }
        if body.len() > MAX_TARGET {
            return Err(PatternError::TooLong.into());
        }
        if std::str::from_utf8(body).is_err() {
            return Err(PatternError::NotUtf8.into());
        }
        let mut parts = t.split(|&b| b == b',');
        let pattern = MPat::parse(parts.next().unwrap_or_default())?;
        let mut filters = Vec::new();
        for (i, f) in parts.enumerate() {
            if f.is_empty() {
                return Err(TargetError::EmptyFilter);
            }
            if i == MAX_FILTERS {
                return Err(TargetError::TooMany);
            }
            let named = |e| TargetError::Filter(i + 1, String::from_utf8_lossy(f).into(), e);
            filters.push(filter(f).map_err(named)?);
        }
        Ok(MTarget { pattern, filters })
    }

    /// The target of a Who or Get with no data: every shim.
    pub(super) fn all() -> MTarget {
        MTarget {
            pattern: MPat::all(),
            filters: Vec::new(),
        }
    }

    /// Whether it carries filters.
    pub(super) fn is_filtered(&self) -> bool {
        !self.filters.is_empty()
    }

    /// Whether a shim holding `state` passes every filter.
    pub(super) fn passes(&self, state: &[MKey]) -> bool {
        self.filters.iter().all(|f| f.passes(state))
    }
}

/// One filter (§6): no `=` or `~`; then its key; then nothing after the test; then a
/// control byte in the value. A space cannot be in a value (a target is one field of its
/// frame); only a Who, whose data is all target, can carry one there.
fn filter(f: &[u8]) -> Result<MFilter, FilterError> {
    let at = (f.iter().position(|&b| b == b'=' || b == b'~')).ok_or(FilterError::NoTest)?;
    let key = check_key(&f[..at]).map_err(FilterError::Key)?;
    let value = &f[at + 1..];
    if value.is_empty() {
        return Err(FilterError::Empty(f[at] as char));
    }
    if let Some(&b) = value.iter().find(|&&b| b < 0x20 || b == 0x7F) {
        return Err(FilterError::Byte(b));
    }
    if value.contains(&b' ') {
        return Err(FilterError::Space);
    }
    Ok(MFilter {
        key: key.to_string(),
        word: f[at] == b'~',
        value: value.to_vec(),
    })
}
