//! The one-shot operator commands over a shim connection: `send`, `tell` and `who`.

use super::*;

/// Operator commands are short-lived: no keep-alive.
pub(crate) async fn operator(hub: &Hub, identity: &str) -> Result<Client, Fatal> {
    let options = ClientOptions {
        keepalive: None,
        ..hub.options.clone()
    };
    hub.connect(identity, options).await
}

pub(crate) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// How long a `send` waits for answers.
#[derive(Clone, Copy)]
pub(crate) struct Wait {
    /// For all of them.
    pub(crate) timeout: Duration,
    /// For one more, once every shim reached has answered.
    pub(crate) settle: Duration,
}

pub(crate) async fn send(
    hub: &Hub,
    identity: &str,
    target: &str,
    text: &str,
    wait: Wait,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let sent = client.command(target, text).await?;
    let deadline = Instant::now() + wait.timeout;
    // Every answer of each responder, by identity (ignoring case, as the hub compares).
    let mut answers: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut closed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Until every shim reached has answered: the deadline; then a shim that answers
        // several times has `settle` for each further answer.
        let limit = if answers.len() < sent.reached {
            left
        } else {
            left.min(wait.settle)
        };
        match client.next_response(sent.id, limit).await {
            Ok(r) => {
                let entry = answers
                    .entry(r.from.to_ascii_lowercase())
                    .or_insert_with(|| (r.from.to_string(), Vec::new()));
                entry.1.push(r.text);
            }
            Err(ClientError::Timeout(_)) => break,
            Err(ClientError::Closed) => {
                closed = true;
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Who did not answer: the shims the same pattern lists now, less those that did.
    let mut silent = Vec::new();
    if answers.len() < sent.reached && !closed {
        let me = client.identity().to_ascii_lowercase();
        if let Ok(entries) = client.who(Some(target)).await {
            silent = entries
                .iter()
                .map(|e| e.identity.to_string())
                .filter(|i| {
                    let key = i.to_ascii_lowercase();
                    key != me && !answers.contains_key(&key)
                })
                .collect();
            silent.sort();
        }
    }
    if !closed {
        let _ = client.close().await;
    }
    let missing = sent.reached.saturating_sub(answers.len());
    let gone = missing.saturating_sub(silent.len());
    if json {
        let answered: Vec<_> = answers
            .values()
            .map(|(identity, texts)| serde_json::json!({"identity": identity, "answers": texts}))
            .collect();
        emit(&serde_json::json!({
            "id": sent.id,
            "reached": sent.reached,
            "answered": answered,
            "silent": silent,
            "gone": gone,
        }));
    } else {
        for (identity, texts) in answers.values() {
            let texts: Vec<String> = texts.iter().map(|t| one_line(t)).collect();
            println!("{identity}: {}", texts.join(" | "));
        }
    }
    if missing > 0 {
        let why = if closed {
            "before the server closed the connection".to_string()
        } else {
            format!("within {}", humantime::format_duration(wait.timeout))
        };
        let mut names = silent.join(", ");
        if gone > 0 {
            if !names.is_empty() {
                names.push_str(", and ");
            }
            names.push_str(&format!("{gone} no longer connected"));
        }
        eprintln!(
            "velium: {missing} of {} shim{} did not answer {why}: {names}",
            sent.reached,
            plural(sent.reached)
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn tell(
    hub: &Hub,
    identity: &str,
    target: &str,
    text: &str,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let reached = client.echo(target, text).await?;
    let _ = client.close().await;
    println!("reached {reached} shim{}", plural(reached));
    Ok(ExitCode::SUCCESS)
}

/// Says that nothing matched: on stderr, and for `--json` an empty list on stdout.
pub(crate) fn none_matched(pattern: Option<&str>, json: bool) -> ExitCode {
    if json {
        emit(&serde_json::json!([]));
    }
    match pattern {
        Some(p) => eprintln!("velium: no shim matches {p}"),
        None => eprintln!("velium: no shims connected"),
    }
    // As `send` and `tell` do: nothing matched is status 2.
    ExitCode::from(2)
}

pub(crate) async fn who(
    hub: &Hub,
    identity: &str,
    pattern: Option<&str>,
    json: bool,
) -> Result<ExitCode, Fatal> {
    let client = operator(hub, identity).await?;
    let mut entries = client.who(pattern).await?;
    let me = client.identity();
    let _ = client.close().await;
    // The listing includes this tool's own connection; it is not a shim.
    if let Some(i) = entries.iter().position(|e| *e.identity == *me) {
        entries.remove(i);
    }
    if entries.is_empty() {
        return Ok(none_matched(pattern, json));
    }
    entries.sort_by(|a, b| a.identity.cmp(&b.identity).then(a.since.cmp(&b.since)));
    if json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| {
                let mut v = serde_json::json!({
                    "identity": &*e.identity,
                    "since": humantime::format_rfc3339_seconds(e.since).to_string(),
                    "udp": e.udp,
                });
                if let Some(node) = &e.node {
                    v["node"] = serde_json::json!(&**node);
                }
                v
            })
            .collect();
        emit(&serde_json::Value::Array(list));
        return Ok(ExitCode::SUCCESS);
    }
    let width = entries
        .iter()
        .map(|e| e.identity.chars().count())
        .max()
        .unwrap_or(0);
    for e in &entries {
        let udp = if e.udp { "udp" } else { "-" };
        let since = humantime::format_rfc3339_seconds(e.since);
        match &e.node {
            // On a node of a cluster: the node serving the shim, last.
            Some(node) => println!("{:<width$}  {since}  {udp:<3}  {node}", e.identity),
            None => println!("{:<width$}  {since}  {udp}", e.identity),
        }
    }
    Ok(ExitCode::SUCCESS)
}
