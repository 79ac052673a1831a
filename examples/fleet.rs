//! A stand-in fleet for trying the dashboard: N characters on one hub, each publishing
//! NetBots-like state (hp, mana, target, level, zone, rtt) every second and answering
//! every Command with "ok".
//!
//! ```text
//! cargo run --release --example fleet -- 127.0.0.1:12345 54
//! ```
//!
//! Every seventh character stops publishing after its first Set, so the dashboard has
//! stale rows to show.

use std::net::SocketAddr;
use std::time::Duration;
use velium_server::client::{Client, ClientOptions, Event};

const SERVERS: [&str; 2] = ["peq", "test"];
const ZONES: [&str; 5] = [
    "ecommons",
    "gfaydark",
    "poknowledge",
    "nektulos",
    "lavastorm",
];
const CLASSES: [&str; 8] = ["WAR", "CLR", "SHM", "ENC", "WIZ", "MAG", "NEC", "BRD"];
const NAMES: [&str; 18] = [
    "Brennan", "Aeris", "Tolvar", "Mirelle", "Dunstan", "Kaelith", "Orrin", "Sabeth", "Voss",
    "Ilyra", "Garrik", "Thessaly", "Corwin", "Elspeth", "Halvard", "Nyssa", "Pellam", "Rowen",
];

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let server: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:12345".into())
        .parse()
        .expect("usage: fleet HOST:PORT [COUNT]");
    let count: usize = args.next().map_or(54, |n| n.parse().expect("COUNT"));
    let mut tasks = Vec::new();
    for i in 0..count {
        let name = format!("{}{}", NAMES[i % NAMES.len()], i / NAMES.len());
        let identity = format!(
            "{}.{}.{}",
            SERVERS[i % 3 / 2],
            ZONES[i % ZONES.len()],
            name.to_lowercase()
        );
        tasks.push(tokio::spawn(character(server, identity, i)));
    }
    println!("{count} characters on {server}; ctrl-c to stop");
    for t in tasks {
        let _ = t.await;
    }
}

/// One character: connect, bind UDP, publish state every second, answer Commands.
async fn character(server: SocketAddr, identity: String, i: usize) {
    let options = ClientOptions {
        keepalive: Some(Duration::from_secs(10)),
        ..ClientOptions::default()
    };
    let client = match Client::connect_with(server, &identity, options).await {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => return eprintln!("{identity}: {e}"),
    };
    let udp = client.bind_udp().await.is_ok() && i % 5 != 4;
    let answering = client.clone();
    tokio::spawn(async move {
        while let Some(event) = answering.next_event().await {
            if let Event::Command { id, .. } = event {
                let _ = answering.respond(id, "ok").await;
            }
        }
    });
    let class = CLASSES[i % CLASSES.len()];
    let zone = ZONES[i % ZONES.len()];
    let max_hp = 3000 + (i as u32 % 9) * 400;
    let max_mana = if class == "WAR" {
        0
    } else {
        2000 + (i as u32 % 5) * 500
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for t in 0u32.. {
        tick.tick().await;
        if i % 7 == 6 && t > 0 {
            continue;
        }
        let wave = |period: u32, phase: u32| {
            let x = ((t + phase) % period) as f32 / period as f32;
            (1.0 - (x * std::f32::consts::TAU).sin().abs() * 0.6).clamp(0.05, 1.0)
        };
        let hp = format!("{}/{max_hp}", (max_hp as f32 * wave(40, i as u32)) as u32);
        let mana = format!(
            "{}/{max_mana}",
            (max_mana as f32 * wave(60, i as u32 * 3)) as u32
        );
        let target = if (t / 10 + i as u32).is_multiple_of(3) {
            String::new()
        } else {
            format!("{}:{}", 5100 + i, 100 - (t * 7 + i as u32) % 100)
        };
        let level = format!("{}:{class}", 60 + i % 6);
        let rtt = format!("{}", 8 + (i * 7 + t as usize) % 30);
        let mut items = vec![
            ("hp", Some(hp.as_str())),
            ("mana", Some(mana.as_str())),
            ("target", Some(target.as_str())),
            ("level", Some(level.as_str())),
            ("zone", Some(zone)),
        ];
        if udp {
            items.push(("rtt", Some(rtt.as_str())));
        }
        let sent = if udp {
            client.set_state_udp(&items).await
        } else {
            client.set_state(&items).await
        };
        if let Err(e) = sent {
            return eprintln!("{identity}: {e}");
        }
    }
}
