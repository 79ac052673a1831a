//! Systems under test, and how a bench drives each one ([`Subject`]: a system, with
//! velium driven through its client library or with raw protocol bytes).
//!
//! [`System::VeliumBefore`] is an earlier velium-server build (the binary named by
//! `VELIUM_BENCH_BASELINE`), run with velium io_uring's flags beside the current one, so
//! that one run gives before/after figures measured under the same load and noise.

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// velium-server `--io uring`.
    VeliumUring,
    /// velium-server `--io epoll`.
    VeliumEpoll,
    /// The baseline velium-server (`VELIUM_BENCH_BASELINE`) `--io uring`; only when set.
    VeliumBefore,
    /// The floor server built into the bench binary.
    Floor,
    /// nats-server.
    Nats,
    /// mosquitto.
    Mosquitto,
}

impl System {
    /// The name printed in tables.
    pub fn name(self) -> &'static str {
        match self {
            System::VeliumUring => "velium io_uring",
            System::VeliumEpoll => "velium epoll",
            System::VeliumBefore => "velium-before io_uring",
            System::Floor => "floor (bench)",
            System::Nats => "nats-server",
            System::Mosquitto => "mosquitto",
        }
    }

    /// The key used by `VELIUM_BENCH_ONLY`.
    pub fn key(self) -> &'static str {
        match self {
            System::VeliumUring => "uring",
            System::VeliumEpoll => "epoll",
            System::VeliumBefore => "before",
            System::Floor => "floor",
            System::Nats => "nats",
            System::Mosquitto => "mosquitto",
        }
    }

    /// True for every velium-server: both drivers, and the baseline.
    pub fn is_velium(self) -> bool {
        matches!(
            self,
            System::VeliumUring | System::VeliumEpoll | System::VeliumBefore
        )
    }
}

/// How a storm's velium shims are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Raw protocol bytes (the only way for the floor, nats and mosquitto).
    Raw,
    /// velium's client library: `Client::connect` (TCP connect, Identify, Session).
    Client,
}

/// A system measured one way: velium through its client library or raw protocol bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The server.
    pub system: System,
    /// How the bench speaks to it (always raw for the floor and the peers).
    pub via: Via,
}

impl Subject {
    /// velium through the client library.
    pub const fn client(system: System) -> Subject {
        Subject {
            system,
            via: Via::Client,
        }
    }

    /// Raw protocol bytes.
    pub const fn raw(system: System) -> Subject {
        Subject {
            system,
            via: Via::Raw,
        }
    }

    /// The row name: velium rows say how they were driven.
    pub fn name(&self) -> String {
        match (self.system.is_velium(), self.via) {
            (true, Via::Client) => format!("{} (client lib)", self.system.name()),
            (true, Via::Raw) => format!("{} (raw)", self.system.name()),
            (false, _) => self.system.name().to_string(),
        }
    }
}
