//! The core protocol over real sockets: handshake, framing rules, timers, UDP.

mod common;
use common::*;

fn handshake_tcp_then_udp(io: &str) {
    let srv = Server::start(io, &[]);
    let mut c = srv.tcp();
    let token = c.identify("peq.ecommons.bob");
    assert!(!token.contains(&0x0A) && !token.contains(&0x0B));
    let u = srv.udp();
    u.bind_confirmed(&token);
    srv.wait_log(&["bind", "peq.ecommons.bob"]);
}

drivers!(handshake_tcp_then_udp);
