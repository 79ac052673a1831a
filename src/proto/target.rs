//! Targets: a pattern over identities, optionally narrowed by filters on the shims' state.
//!
//! A target is written as one word: the pattern, then each filter after a comma
//! (`peq.>,class=CLR`, `*.*.*,group=Bob,channels~heal`). A filter is a state key (the key
//! grammar), then `=` and a value the key's value must equal, or `~` and a word that must
//! be one of the space-separated words of the key's value; both compare ignoring ASCII
//! case, and a shim without the key passes neither. A filter holds no space and no
//! control byte (the target is one field of its frame). Several filters all apply. A comma,
//! `=` and `~` are outside the identity grammar, so a target with filters can never be
//! read as a pattern, and none of them needs quoting in a POSIX shell.
//!
//! Filters only narrow a target: permissions are decided on the pattern alone
//! (`hub/access.rs`), so a filter never lets a user reach a shim its pattern could not.

use super::pattern::{Pattern, PatternError};
use super::state::{KeyError, check_key};
use thiserror::Error;

/// The most filters one target may carry.
pub const MAX_FILTERS: usize = 8;
/// The longest target, filters included, in bytes (after a leading `+`).
pub const MAX_TARGET: usize = 255;

/// How a filter compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    /// `KEY=VALUE`: the value equals, ignoring ASCII case.
    Equals,
    /// `KEY~WORD`: one of the value's space-separated words equals, ignoring ASCII case.
    Has,
}

/// One filter: a key, a test and what it compares with (ASCII-lowercased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The key, as written.
    pub key: Box<str>,
    /// The test.
    pub test: Test,
    /// The value or word, ASCII-lowercased.
    pub value: Box<[u8]>,
}

impl Filter {
    /// Whether a shim whose value for the key is `value` (`None`: it lacks the key) passes.
    pub fn passes(&self, value: Option<&[u8]>) -> bool {
        let Some(v) = value else { return false };
        match self.test {
            Test::Equals => v.eq_ignore_ascii_case(&self.value),
            Test::Has => words(v).any(|w| w.eq_ignore_ascii_case(&self.value)),
        }
    }
}

/// The words of a value: split on spaces, empty words dropped.
pub fn words(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

/// A parsed target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Which identities it names.
    pub pattern: Pattern,
    /// What their state must hold (empty: nothing).
    pub filters: Vec<Filter>,
}

/// Why a filter is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum FilterError {
    /// Neither `=` nor `~`.
    #[error("expected KEY=VALUE or KEY~WORD")]
    NoTest,
    /// The key breaks the key grammar.
    #[error("{0}")]
    Key(KeyError),
    /// Nothing after `=` or `~`.
    #[error("nothing after '{0}'")]
    Empty(char),
    /// A byte that cannot be in a filter's value.
    #[error("byte 0x{0:02X} in the value: a control byte")]
    Byte(u8),
    /// A space: a target is one word (a frame's fields are separated by spaces).
    #[error("a filter holds no space")]
    Space,
}

/// Why a target could not be parsed; the Display text follows `bad target T: ` (or
/// `bad pattern T: `) in the Error.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TargetError {
    /// The pattern part.
    #[error("{0}")]
    Pattern(#[from] PatternError),
    /// A filter (its place, counting from 1, and the filter as written).
    #[error("filter {0} ({1}): {2}")]
    Filter(usize, String, FilterError),
    /// An empty filter: two commas in a row, or a trailing one.
    #[error("empty filter after ','")]
    EmptyFilter,
    /// More than [`MAX_FILTERS`].
    #[error("more than {MAX_FILTERS} filters")]
    TooMany,
}

impl Target {
    /// Parses a target as written in Command, Echo, Who, Get and Subscribe frames.
    pub fn parse(text: &[u8]) -> Result<Target, TargetError> {
        // What a pattern is checked for first is checked on the whole target: an empty
        // one, one too long, one that is not UTF-8 are refused as such, filters or not.
        let body = text.strip_prefix(b"+").unwrap_or(text);
        if body.is_empty() {
            return Err(PatternError::Empty.into());
        }
        if body.len() > MAX_TARGET {
            return Err(PatternError::TooLong.into());
        }
        if std::str::from_utf8(body).is_err() {
            return Err(PatternError::NotUtf8.into());
        }
        let mut parts = text.split(|&b| b == b',');
        let pattern = Pattern::parse(parts.next().unwrap_or_default())?;
        let mut filters = Vec::new();
        for (i, f) in parts.enumerate() {
            if f.is_empty() {
                return Err(TargetError::EmptyFilter);
            }
            if i == MAX_FILTERS {
                return Err(TargetError::TooMany);
            }
            let bad = |e| TargetError::Filter(i + 1, String::from_utf8_lossy(f).into_owned(), e);
            filters.push(parse_filter(f).map_err(bad)?);
        }
        Ok(Target { pattern, filters })
    }

    /// The target that names every shim, the sender included.
    pub fn all() -> Target {
        Target::from(Pattern::all())
    }

    /// Whether it carries filters.
    pub fn is_filtered(&self) -> bool {
        !self.filters.is_empty()
    }

    /// Whether a shim whose keys `value` looks up passes every filter.
    pub fn passes<'v>(&self, mut value: impl FnMut(&str) -> Option<&'v [u8]>) -> bool {
        self.filters.iter().all(|f| f.passes(value(&f.key)))
    }

    /// Whether `key` is one the filters test (ignoring ASCII case).
    pub fn tests_key(&self, key: &[u8]) -> bool {
        (self.filters.iter()).any(|f| f.key.as_bytes().eq_ignore_ascii_case(key))
    }
}

impl From<Pattern> for Target {
    fn from(pattern: Pattern) -> Target {
        Target {
            pattern,
            filters: Vec::new(),
        }
    }
}

fn parse_filter(f: &[u8]) -> Result<Filter, FilterError> {
    let at = f
        .iter()
        .position(|&b| b == b'=' || b == b'~')
        .ok_or(FilterError::NoTest)?;
    let (key, op, value) = (&f[..at], f[at], &f[at + 1..]);
    let key = check_key(key).map_err(FilterError::Key)?;
    let test = if op == b'=' { Test::Equals } else { Test::Has };
    if value.is_empty() {
        return Err(FilterError::Empty(op as char));
    }
    if let Some(&b) = value.iter().find(|&&b| b < 0x20 || b == 0x7F) {
        return Err(FilterError::Byte(b));
    }
    if value.contains(&b' ') {
        return Err(FilterError::Space);
    }
    Ok(Filter {
        key: Box::from(key),
        test,
        value: value.to_ascii_lowercase().into_boxed_slice(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Result<Target, TargetError> {
        Target::parse(s.as_bytes())
    }

    #[test]
    fn forms() {
        let x = t("+peq.>,class=CLR,channels~Heal").unwrap();
        assert!(x.pattern.include_self);
        assert_eq!(x.filters.len(), 2);
        assert_eq!(x.filters[0].test, Test::Equals);
        assert_eq!(&*x.filters[0].value, b"clr");
        assert_eq!(x.filters[1].test, Test::Has);
        assert!(!t("peq.>").unwrap().is_filtered());
        // A value may hold '=' and '~' (an '=' test compares the whole value).
        let x = t("peq.>,note=a=b~c").unwrap();
        assert_eq!(&*x.filters[0].value, b"a=b~c");
    }

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(t("peq.>,"), Err(TargetError::EmptyFilter));
        assert_eq!(t("peq.>,,a=b"), Err(TargetError::EmptyFilter));
        assert_eq!(t(",a=b"), Err(TargetError::Pattern(PatternError::Empty)));
        let e = t("peq.>,class").unwrap_err();
        assert_eq!(
            e.to_string(),
            "filter 1 (class): expected KEY=VALUE or KEY~WORD"
        );
        let e = t("peq.>,a=b,cl ass=x").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("filter 2 (cl ass=x): key byte 0x20"),
            "{e}"
        );
        assert_eq!(
            t("peq.>,class=").unwrap_err().to_string(),
            "filter 1 (class=): nothing after '='"
        );
        assert_eq!(
            t("peq.>,ch~a b").unwrap_err().to_string(),
            "filter 1 (ch~a b): a filter holds no space"
        );
        let many = format!("peq.>{}", ",a=b".repeat(9));
        assert_eq!(t(&many), Err(TargetError::TooMany));
        let long = Err(PatternError::TooLong.into());
        assert_eq!(t(&"a".repeat(256)), long);
        assert_eq!(t(&format!("a.>,{}", "k=v,".repeat(63))), long);
        let plus = t(&format!("+{}", "a".repeat(255)));
        assert_eq!(
            plus.map(|t| t.filters.len()),
            Ok(0),
            "255 bytes after the '+'"
        );
        let not_utf8 = Target::parse(b"a.>,k=\xE9");
        assert_eq!(not_utf8, Err(PatternError::NotUtf8.into()));
        assert_eq!(t("a.>,k=\u{e9}").map(|t| t.filters.len()), Ok(1));
    }

    #[test]
    fn filters_compare_ignoring_case() {
        let x = t("a.>,class=clr,channels~TANKS").unwrap();
        let state = |k: &str| match k {
            "class" => Some(&b"CLR"[..]),
            "channels" => Some(&b"heal  tanks raid"[..]),
            _ => None,
        };
        assert!(x.passes(state));
        let x = t("a.>,class=clr,group=bob").unwrap();
        assert!(
            !x.passes(state),
            "a shim without the key passes no filter on it"
        );
        let x = t("a.>,channels~tank").unwrap();
        assert!(!x.passes(state), "a word matches whole");
    }

    proptest! {
        /// Whatever the bytes, parsing never panics, and a target without a comma parses
        /// exactly as its pattern does.
        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let r = Target::parse(&b);
            if !b.contains(&b',') {
                prop_assert_eq!(r.map(|t| t.pattern), Pattern::parse(&b).map_err(TargetError::from));
            }
        }
    }
}
