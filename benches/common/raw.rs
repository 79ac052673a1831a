//! Raw protocols: the handshake of each system in its own protocol bytes, the way the
//! peers are always driven and velium is in its "raw" rows.

use super::System;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// One velium frame.
pub fn frame(op: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 2);
    v.push(op);
    v.extend_from_slice(data);
    v.push(0x0A);
    v
}

/// velium raw handshake: Identify `name`, read the 18-byte Session; returns the token.
pub async fn velium_identify(s: &mut TcpStream, name: &str) -> std::io::Result<[u8; 16]> {
    s.write_all(&frame(0x01, name.as_bytes())).await?;
    let mut b = [0u8; 18];
    s.read_exact(&mut b).await?;
    if b[0] != 0x02 || b[17] != 0x0A {
        return Err(std::io::Error::other(format!(
            "expected Session, got {:?}",
            String::from_utf8_lossy(&b)
        )));
    }
    Ok(b[1..17].try_into().unwrap())
}

/// velium raw UDP bind confirmed: sends the bind datagram and a Ping, waits for the Pong
/// (resending both if none comes within 1 s; loopback may drop under load). Returns the
/// number of resends. The floor server answers the same exchange.
pub async fn udp_bind_confirm(u: &UdpSocket, token: &[u8; 16], seq: u64) -> std::io::Result<u32> {
    let bind = frame(0x02, token);
    let ping = frame(0x06, format!("b{seq}").as_bytes());
    let mut buf = [0u8; 256];
    for attempt in 0..10 {
        u.send(&bind).await?;
        u.send(&ping).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(deadline, u.recv(&mut buf)).await {
                // velium: the Pong echoing our data; floor: its fixed 18 bytes.
                Ok(Ok(n))
                    if (n == ping.len() && buf[0] == 0x07 && buf[1..n] == ping[1..])
                        || (n == 18 && buf[0] == 0x02) =>
                {
                    return Ok(attempt);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
    }
    Err(std::io::Error::other("no UDP pong after 10 tries"))
}

/// The floor's TCP handshake: one line, answered by 18 bytes.
pub async fn floor_handshake(s: &mut TcpStream, name: &str) -> std::io::Result<()> {
    s.write_all(&frame(0x01, name.as_bytes())).await?;
    let mut b = [0u8; 18];
    s.read_exact(&mut b).await?;
    Ok(())
}

/// nats handshake: read INFO, send CONNECT + PING, wait for PONG.
pub async fn nats_handshake(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    read_until(s, &mut buf, b"\r\n").await?;
    if !buf.starts_with(b"INFO ") {
        return Err(std::io::Error::other("nats: no INFO"));
    }
    s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
        .await?;
    buf.clear();
    read_until(s, &mut buf, b"PONG\r\n").await?;
    Ok(())
}

/// Reads until `buf` ends with `end`.
pub async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(end) {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// An MQTT 3.1.1 CONNECT packet (clean session, keep-alive 600 s).
pub fn mqtt_connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let remaining = 10 + 2 + id.len();
    assert!(remaining < 128);
    let mut p = vec![0x10, remaining as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    p.extend_from_slice(&600u16.to_be_bytes());
    p.extend_from_slice(&(id.len() as u16).to_be_bytes());
    p.extend_from_slice(id);
    p
}

/// mosquitto handshake: CONNECT, wait for a successful CONNACK.
pub async fn mqtt_handshake(s: &mut TcpStream, client_id: &str) -> std::io::Result<()> {
    s.write_all(&mqtt_connect_packet(client_id)).await?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    if b != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!("bad CONNACK {b:?}")));
    }
    Ok(())
}

/// The TCP handshake of `system` on a connected stream (velium: raw Identify -> Session).
/// Returns the velium session token (zeros for other systems).
pub async fn raw_handshake(
    system: System,
    s: &mut TcpStream,
    name: &str,
) -> std::io::Result<[u8; 16]> {
    match system {
        System::VeliumUring | System::VeliumEpoll | System::VeliumBefore => {
            velium_identify(s, name).await
        }
        System::Floor => floor_handshake(s, name).await.map(|_| [0u8; 16]),
        System::Nats => nats_handshake(s).await.map(|_| [0u8; 16]),
        System::Mosquitto => mqtt_handshake(s, name).await.map(|_| [0u8; 16]),
    }
}
