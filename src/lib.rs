//! velium-server: a hub for fleets of game-client shims.
//!
//! A shim keeps one TCP control connection and one UDP channel to the hub, to relay data
//! and accept commands. The wire protocol is specified in `docs/protocol.md`.
//!
//! Layout: the protocol core does no I/O and is tested without sockets —
//! [`frame`] (opcodes, token, encoder), [`codec`] (splitting bytes into frames),
//! [`session`] (the per-connection state machine), [`udp`] (datagrams), [`table`] (the
//! sharded session table), [`router`] (target patterns and the identity index), [`shim`]
//! (a shim and its outbound queue) and [`hub`] (the shared state and the routing
//! operations). [`driver`] runs it on sockets: `driver/uring.rs` (io_uring) and
//! `driver/epoll.rs` (epoll). [`admin`] is the admin HTTP listener (metrics, health, shim
//! listing, reload) on a thread of its own; [`config`] and [`metrics`] hold the settings and
//! the counters. [`client`] is the client library used by the `velium` CLI, the tests and
//! the benchmarks.

pub mod admin;
pub mod client;
pub mod codec;
pub mod config;
pub mod driver;
pub mod frame;
pub mod hub;
pub mod metrics;
pub mod router;
pub mod session;
pub mod shim;
pub mod table;
pub mod udp;
