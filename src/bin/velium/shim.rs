//! `velium shim`: a stand-in shim that answers commands, publishes state and connects
//! again when its connection is lost.

use super::*;

/// What a `velium shim` publishes: `--set` and `--set-every`.
pub(crate) struct Publish {
    pub(crate) items: Vec<(String, String)>,
    pub(crate) every: Option<Duration>,
}

impl Publish {
    pub(crate) fn items(&self) -> Vec<(&str, Option<&str>)> {
        self.items
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect()
    }
}

/// Waits for the next tick of `every`, or for ever without one.
pub(crate) async fn tick(every: &mut Option<tokio::time::Interval>) {
    match every {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How a `velium shim` runs.
#[derive(Clone, Copy)]
pub(crate) struct ShimRun {
    /// Bind a UDP channel.
    pub(crate) udp: bool,
    /// Connect again when the connection is lost.
    pub(crate) reconnect: bool,
}

/// How one connection of a `velium shim` ended.
pub(crate) enum Ended {
    /// SIGTERM or SIGINT: it said goodbye.
    Signal,
    /// Lost, for this reason; `again` when connecting again may help (not when a newer
    /// connection of the same identity replaced it: the two would take turns).
    Lost { reason: String, again: bool },
}

/// The waits between reconnections: doubling from [`Backoff::FIRST`] up to
/// [`Backoff::MAX`], each drawn between half and all of that, so that a fleet whose hub
/// restarts does not come back in one burst.
pub(crate) struct Backoff {
    pub(crate) attempt: u32,
}

impl Backoff {
    pub(crate) const FIRST: Duration = Duration::from_millis(500);
    pub(crate) const MAX: Duration = Duration::from_secs(30);
    /// A connection that lasted this long starts the waits over.
    pub(crate) const STEADY: Duration = Duration::from_secs(10);

    pub(crate) fn next(&mut self) -> Duration {
        let ceiling = Self::FIRST
            .saturating_mul(1 << self.attempt.min(16))
            .min(Self::MAX);
        self.attempt += 1;
        ceiling.mul_f64(rand::random_range(0.5..=1.0))
    }
}

pub(crate) async fn shim(
    hub: &Hub,
    identity: &str,
    publish: &Publish,
    how: ShimRun,
) -> Result<ExitCode, Fatal> {
    let mut signals = Signals::new()?;
    let mut backoff = Backoff { attempt: 0 };
    let mut addr = Ok(hub.addr);
    let mut connected_once = false;
    loop {
        let attempt = match addr {
            Ok(addr) => {
                let connecting = Client::connect_with(addr, identity, hub.options.clone());
                tokio::select! {
                    c = connecting => c.map_err(|e| (worth_retrying(&e), Fatal::from(e).0)),
                    _ = signals.recv() => return Ok(ExitCode::SUCCESS),
                }
            }
            // The name did not resolve this time (the hub's host moving, its DNS down).
            Err(Fatal(why)) => Err((true, why)),
        };
        let ended = match attempt {
            Ok(client) => {
                connected_once = true;
                let since = Instant::now();
                let ended = serve(&client, publish, how.udp, &mut signals).await;
                if since.elapsed() >= Backoff::STEADY {
                    backoff.attempt = 0;
                }
                if matches!(ended, Ended::Signal) {
                    let _ = client.close().await;
                }
                ended
            }
            // A refusal that another try would meet again (the credentials, the identity,
            // a certificate) ends the shim as it ends any command, as does any failure of
            // the first connection with --no-reconnect.
            Err((false, why)) => return Err(Fatal(why)),
            Err((true, why)) if !connected_once && !how.reconnect => return Err(Fatal(why)),
            Err((true, reason)) => Ended::Lost {
                reason,
                again: true,
            },
        };
        match ended {
            Ended::Signal => return Ok(ExitCode::SUCCESS),
            Ended::Lost { reason, again } if !again || !how.reconnect => {
                eprintln!("velium: {reason}");
                return Ok(ExitCode::from(1));
            }
            Ended::Lost { reason, .. } => {
                let wait = backoff.next();
                eprintln!(
                    "velium: {reason}; connecting again in {:.1}s",
                    wait.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = signals.recv() => return Ok(ExitCode::SUCCESS),
                }
                // Its name again: a hub that comes back may come back elsewhere.
                addr = resolve(&hub.server).await;
            }
        }
    }
}

/// Whether a failed connection may succeed later: a hub that is down, restarting, full,
/// rate-limiting or still holding the identity's old connection, yes; one that refused
/// the credentials or the identity, or a TLS failure of certificates, no.
pub(crate) fn worth_retrying(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. }
        | ClientError::Timeout(_)
        | ClientError::Closed
        | ClientError::Io(_) => true,
        ClientError::Server(msg) => {
            !(msg.starts_with("authentication")
                || msg.starts_with("credentials revoked")
                || msg.starts_with("identity not permitted"))
        }
        _ => false,
    }
}

/// One connection of a `velium shim`: prints what arrives and answers commands until the
/// connection ends or a signal comes.
pub(crate) async fn serve(
    client: &Client,
    publish: &Publish,
    udp: bool,
    signals: &mut Signals,
) -> Ended {
    let items = publish.items();
    if !items.is_empty() {
        // Handled once the Pong is back (a refusal is an event printed below), so that
        // whoever reads the `connected` line finds the keys set.
        let set = match client.set_state(&items).await {
            Ok(()) => client.ping(b"velium-set").await.map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = set {
            return Ended::Lost {
                again: worth_retrying(&e),
                reason: Fatal::from(e).0,
            };
        }
    }
    if udp && let Err(e) = client.bind_udp().await {
        eprintln!("velium: {e}; continuing over TCP only");
    }
    println!("connected as {}", client.identity());
    let mut resend = publish.every.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        let event = tokio::select! {
            ev = client.next_event() => ev,
            _ = tick(&mut resend) => {
                let sent = match client.set_state_udp(&items).await {
                    Err(ClientError::NotBound) => client.set_state(&items).await,
                    other => other,
                };
                if let Err(e) = sent {
                    eprintln!("velium: could not send the state again: {e}");
                }
                continue;
            }
            _ = signals.recv() => return Ended::Signal,
        };
        match event {
            Some(Event::Command {
                from,
                id,
                text,
                via,
            }) => {
                println!("command from {from} (id {id}): {}", one_line(&text));
                let answered = match via {
                    Transport::Udp => client.respond_udp(id, &text).await,
                    Transport::Tcp => client.respond(id, &text).await,
                };
                if let Err(e) = answered {
                    eprintln!("velium: could not answer command {id}: {e}");
                }
            }
            Some(Event::Echo { from, text, .. }) => {
                println!("echo from {from}: {}", one_line(&text));
            }
            Some(Event::Response(r)) => {
                println!(
                    "response from {} (id {}): {}",
                    r.from,
                    r.id,
                    one_line(&r.text)
                );
            }
            // The reason the hub closes for comes again with the close.
            Some(Event::Error { message, .. }) if message.starts_with(CLOSING) => {}
            Some(Event::Error { message, .. }) => eprintln!("velium: server error: {message}"),
            Some(Event::Quit {
                via: Transport::Udp,
            }) => {
                eprintln!("velium: the hub dropped the UDP channel; binding again");
                if let Err(e) = client.bind_udp().await {
                    eprintln!("velium: {e}; continuing over TCP only");
                }
            }
            Some(Event::Quit {
                via: Transport::Tcp,
            }) => {}
            // A shim subscribes to nothing.
            Some(Event::State { .. } | Event::Join { .. } | Event::Leave { .. }) => {}
            Some(Event::Closed { reason }) => {
                let again = !reason.contains("closed the connection: replaced");
                return Ended::Lost { reason, again };
            }
            None => {
                return Ended::Lost {
                    reason: "the connection to the hub closed".into(),
                    again: true,
                };
            }
        }
    }
}
