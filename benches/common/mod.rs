//! Shared benchmark code: the machine banner, settings from the environment, server
//! processes (velium-server, the floor server, nats-server, mosquitto), raw-protocol
//! handshakes, latency histograms and the result tables with their ratio tables.
//!
//! Every bench is a `harness = false` binary: `main` first calls [`floor::maybe_run`], so
//! that the same binary, started as a child with `--floor-server`, serves as the floor.
//!
//! One file per part, every item re-exported here, so a bench needs only `common::X`:
//! [`machine`] (banner, settings, limits), [`system`] (the systems and how each is
//! driven), [`servers`] (their processes), [`procfs`] (RSS and CPU from /proc),
//! [`sockets`], [`raw`] (each system's handshake in raw bytes), [`hist`], [`report`]
//! (tables and ratios), [`storm`] (many connections held open) and [`tls`] (a PKI made
//! per run, the one TLS client context, handshakes over TLS, sealed UDP).
#![allow(dead_code)]

pub mod floor;
pub mod hist;
pub mod machine;
pub mod procfs;
pub mod progress;
pub mod raw;
pub mod report;
pub mod servers;
pub mod sockets;
pub mod storm;
pub mod system;
pub mod tls;

// Not every bench uses every part (soak uses nothing from storm).
#[allow(unused_imports)]
pub use {
    hist::*, machine::*, procfs::*, progress::*, raw::*, report::*, servers::*, sockets::*,
    storm::*, system::*, tls::*,
};
