//! `state` and `watch`: the relay state shims publish, read once or followed.

use super::*;

/// `state`: one Get.
pub(crate) async fn state(
    hub: &Hub,
    identity: &str,
    pattern: &str,
    keys: &[String],
    json: bool,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let shims = client.get_state(pattern, &keys).await?;
    let me = client.identity();
    let _ = client.close().await;
    let shims = listed(shims, &me);
    if shims.is_empty() {
        return Ok(none_matched(Some(pattern), json));
    }
    if json {
        // The keys as the shim spells them (a JSON object: sorted by key).
        let list: Vec<_> = shims
            .iter()
            .map(|s| {
                let state: serde_json::Map<String, serde_json::Value> = s
                    .items
                    .iter()
                    .map(|i| (i.key.to_string(), serde_json::json!(i.value.as_deref())))
                    .collect();
                serde_json::json!({"identity": &*s.identity, "state": state})
            })
            .collect();
        emit(&serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    for s in &shims {
        let items = s.items.iter().map(|i| (&*i.key, i.value.as_deref()));
        let _ = writeln!(out, "{}", state_line(&s.identity, items));
    }
    Ok(ExitCode::SUCCESS)
}

/// A listing as printed: sorted by identity, without this tool's own connection (listed
/// only for a `+` pattern, and holding no state).
pub(crate) fn listed(mut shims: Vec<ShimState>, me: &str) -> Vec<ShimState> {
    shims.retain(|s| !s.identity.eq_ignore_ascii_case(me));
    shims.sort_by(|a, b| a.identity.cmp(&b.identity));
    shims
}

/// `watch`: one subscription, printed until interrupted.
pub(crate) async fn watch(
    hub: &Hub,
    identity: &str,
    pattern: &str,
    keys: &[String],
    interval: Duration,
) -> Result<ExitCode, Fatal> {
    /// The only subscription.
    const SID: u32 = 1;
    let mut signals = Signals::new()?;
    // Long-lived, unlike the other operator commands: the keep-alive stays on. No UDP
    // channel: everything comes over TCP, in order.
    let client = hub.connect(identity, hub.options.clone()).await?;
    let me = client.identity();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let snapshot = listed(client.subscribe(SID, pattern, &keys, interval).await?, &me);
    if snapshot.is_empty() {
        eprintln!("velium: no shim matches {pattern} yet; watching");
    }
    let mut view = View::default();
    for s in &snapshot {
        view.apply(&s.identity, true, &s.items);
        let items = s.items.iter().map(|i| (&*i.key, i.value.as_deref()));
        if !print(&state_line(&s.identity, items)) {
            return Ok(ExitCode::SUCCESS);
        }
    }
    loop {
        let event = tokio::select! {
            ev = client.next_event() => ev,
            _ = signals.recv() => break,
        };
        let line = match event {
            Some(Event::State {
                sid: SID,
                full,
                state,
                ..
            }) if !state.identity.eq_ignore_ascii_case(&me) => {
                let changed = view.apply(&state.identity, full, &state.items);
                if changed.is_empty() {
                    continue;
                }
                let items = changed.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
                state_line(&state.identity, items)
            }
            Some(Event::Join { sid: SID, identity }) if !identity.eq_ignore_ascii_case(&me) => {
                view.join(&identity);
                format!("+{identity}")
            }
            Some(Event::Leave {
                sid: SID,
                identity,
                reason,
            }) if !identity.eq_ignore_ascii_case(&me) => {
                view.leave(&identity);
                format!("-{identity} {reason}")
            }
            Some(Event::Error { message, .. }) if message.starts_with(CLOSING) => continue,
            Some(Event::Error { message, .. }) => {
                eprintln!("velium: server error: {message}");
                continue;
            }
            Some(Event::Closed { reason }) => {
                eprintln!("velium: {reason}");
                return Ok(ExitCode::from(1));
            }
            None => {
                eprintln!("velium: the connection to the hub closed");
                return Ok(ExitCode::from(1));
            }
            // Commands and echoes sent to this tool, our own shim, Quit before Closed.
            Some(_) => continue,
        };
        if !print(&line) {
            // Whoever read the output went away (a closed pipe): nothing left to do.
            return Ok(ExitCode::SUCCESS);
        }
    }
    let _ = client.close().await;
    Ok(ExitCode::SUCCESS)
}

/// What `watch` holds of each watched shim, to print only what really changed (a full
/// frame after a rename or a resync repeats what is known; a delta may carry a value that
/// changed and changed back). Identities and keys compare ignoring ASCII case, as the hub
/// compares them.
#[derive(Default)]
pub(crate) struct View {
    /// By identity in lower case: the keys (as spelled) and values, in order.
    pub(crate) shims: HashMap<String, Vec<(String, String)>>,
}

impl View {
    /// Applies a State frame; returns the changes: `(key, Some(value))` set, `(key,
    /// None)` deleted, in frame order (deletions a full frame implies last).
    pub(crate) fn apply(
        &mut self,
        identity: &str,
        full: bool,
        items: &[velium_server::client::StateItem],
    ) -> Vec<(String, Option<String>)> {
        let held = self.shims.entry(identity.to_ascii_lowercase()).or_default();
        let mut changes = Vec::new();
        let pos = |held: &[(String, String)], key: &str| {
            held.iter().position(|(k, _)| k.eq_ignore_ascii_case(key))
        };
        if full {
            let mut old = std::mem::take(held);
            for item in items {
                let Some(v) = &item.value else { continue };
                if pos(held, &item.key).is_some() {
                    continue;
                }
                match pos(&old, &item.key) {
                    Some(i) if old[i].1 == *v => {}
                    _ => changes.push((item.key.clone(), Some(v.clone()))),
                }
                if let Some(i) = pos(&old, &item.key) {
                    old.remove(i);
                }
                held.push((item.key.clone(), v.clone()));
            }
            changes.extend(old.into_iter().map(|(k, _)| (k, None)));
        } else {
            for item in items {
                match (&item.value, pos(held, &item.key)) {
                    (Some(v), Some(i)) if held[i].1 == *v => {}
                    (Some(v), Some(i)) => {
                        held[i].1 = v.clone();
                        changes.push((item.key.clone(), Some(v.clone())));
                    }
                    (Some(v), None) => {
                        held.push((item.key.clone(), v.clone()));
                        changes.push((item.key.clone(), Some(v.clone())));
                    }
                    (None, Some(i)) => {
                        let (k, _) = held.remove(i);
                        changes.push((k, None));
                    }
                    (None, None) => {}
                }
            }
        }
        changes
    }

    /// A shim appeared: it holds nothing yet.
    pub(crate) fn join(&mut self, identity: &str) {
        self.shims.insert(identity.to_ascii_lowercase(), Vec::new());
    }

    /// A shim went: forget it.
    pub(crate) fn leave(&mut self, identity: &str) {
        self.shims.remove(&identity.to_ascii_lowercase());
    }
}

/// `IDENTITY KEY=VALUE ...`, a deleted key as `-KEY`, values quoted as [`quote`] does.
pub(crate) fn state_line<'a>(
    identity: &str,
    items: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> String {
    let mut line = identity.to_string();
    for (key, value) in items {
        line.push(' ');
        match value {
            Some(v) => {
                line.push_str(key);
                line.push('=');
                line.push_str(&quote(v));
            }
            None => {
                line.push('-');
                line.push_str(key);
            }
        }
    }
    line
}

/// A value as `state` and `watch` print it, so that a line splits at its spaces: as it is,
/// unless it is empty or holds a space (or other white space), a double quote or a
/// backslash: then in double quotes, `"` and `\` escaped with a backslash. Line breaks
/// (and carriage returns and tabs) are shown as `\n` (`\r`, `\t`) either way, so every
/// value stays on its line.
pub(crate) fn quote(v: &str) -> Cow<'_, str> {
    let quoted = v.is_empty()
        || v.chars()
            .any(|c| c == '"' || c == '\\' || (c.is_whitespace() && c != '\n'));
    let escaped = v.contains(['\n', '\r', '\t']);
    if !quoted && !escaped {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 2);
    if quoted {
        out.push('"');
    }
    for c in v.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    if quoted {
        out.push('"');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use velium_server::client::StateItem;

    #[test]
    fn values_are_quoted_only_when_they_must_be() {
        assert_eq!(quote("4500/5000"), "4500/5000");
        assert_eq!(quote("a=b:c"), "a=b:c");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote("back in 5"), "\"back in 5\"");
        assert_eq!(quote("say \"hi\""), r#""say \"hi\"""#);
        assert_eq!(quote(r"C:\games"), r#""C:\\games""#);
        assert_eq!(quote("one\ntwo"), r"one\ntwo");
        assert_eq!(quote("one\ntwo three"), r#""one\ntwo three""#);
        assert_eq!(quote("tab\there"), r#""tab\there""#);
        assert_eq!(quote("héros"), "héros");
        assert!(matches!(quote("plain"), Cow::Borrowed(_)));
    }

    #[test]
    fn state_lines_join_items() {
        let items = [("hp", Some("1/2")), ("note", Some("a b")), ("zone", None)];
        assert_eq!(
            state_line("peq.a.bob", items.into_iter()),
            r#"peq.a.bob hp=1/2 note="a b" -zone"#
        );
        assert_eq!(state_line("peq.a.bob", std::iter::empty()), "peq.a.bob");
    }

    fn item(key: &str, value: Option<&str>) -> StateItem {
        StateItem {
            key: key.into(),
            value: value.map(Into::into),
            age: Duration::ZERO,
        }
    }

    fn changes(v: &[(String, Option<String>)]) -> Vec<(&str, Option<&str>)> {
        v.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect()
    }

    #[test]
    fn the_view_reports_only_changes() {
        let mut view = View::default();
        let snap = [item("hp", Some("1")), item("mp", Some("2"))];
        assert_eq!(
            changes(&view.apply("A.b", true, &snap)),
            [("hp", Some("1")), ("mp", Some("2"))]
        );
        // A delta repeating a value, a delete of an absent key: nothing.
        let same = [item("HP", Some("1")), item("gone", None)];
        assert!(view.apply("a.B", false, &same).is_empty());
        let d = [item("mp", Some("3")), item("hp", None), item("x", Some(""))];
        assert_eq!(
            changes(&view.apply("a.b", false, &d)),
            [("mp", Some("3")), ("hp", None), ("x", Some(""))]
        );
        // A full frame: what differs, then what it no longer holds.
        let full = [item("x", Some("")), item("y", Some("9"))];
        assert_eq!(
            changes(&view.apply("a.b", true, &full)),
            [("y", Some("9")), ("mp", None)]
        );
        assert!(view.apply("a.b", true, &full).is_empty());
        view.leave("A.B");
        view.join("a.b");
        assert_eq!(
            changes(&view.apply("a.b", true, &full)),
            [("x", Some("")), ("y", Some("9"))]
        );
    }
}
