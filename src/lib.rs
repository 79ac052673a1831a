//! velium-server: a hub for fleets of game-client shims.
//!
//! A shim keeps one TCP control connection and one UDP channel to the hub, to relay data
//! and accept commands. The wire protocol is specified in `docs/protocol.md`; the path of
//! a frame through these modules is drawn in `docs/architecture.md`.
//!
//! - [`proto`]: the wire, with no state (frames, codec, identity and pattern grammar, typed
//!   requests, server frames, refusals). Shared by the server, the client and the tests.
//! - [`hub`]: the rules, with no I/O: connections, datagrams, routing, the one send path,
//!   timers, admission, and the session table and router they work on.
//! - [`driver`]: sockets and loops only: `driver/uring.rs` (io_uring) and
//!   `driver/epoll.rs` (epoll) adapt their sockets to the loops in `driver/tasks.rs`;
//!   every unsafe system call sits in `driver/sys.rs`.
//! - [`client`]: the client library used by the `velium` CLI, the tests and the benches.
//! - [`admin`] (the admin HTTP listener), [`config`] (settings), [`metrics`] (counters).

pub mod admin;
pub mod client;
pub mod config;
pub mod driver;
pub mod hub;
pub mod manual;
pub mod metrics;
pub mod proto;
pub mod tls;
