//! `velium-server`: serves the velium protocol on one TCP and UDP address.

use clap::Parser;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use velium_server::config::{Args, Config, IoMode};
use velium_server::driver;
use velium_server::metrics::Latency;

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("velium-server: {e}");
            return ExitCode::from(2);
        }
    };
    // Log lines are written by a background thread, so a connect or close line never
    // costs the serving core a write(2) of its own.
    let (writer, _flush_guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log_level))
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let running = match driver::start(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("velium-server: {e}");
            return ExitCode::from(1);
        }
    };
    let io = match running.io {
        IoMode::Epoll => "epoll",
        _ => "io_uring",
    };
    // Scripts and tests read the real address (port 0 picks one) from this line.
    println!(
        "velium-server listening on {} ({} cores, {io})",
        running.addr, running.hub.config.cores
    );
    let _ = std::io::stdout().flush();

    wait_for_signal();
    let hub = &running.hub;
    // Tell every shim the session is over, and give the writers a moment to flush it.
    hub.shutdown();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !hub.table.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::info!(
        handshake = %hub.metrics.summary(Latency::Handshake),
        udp_bind = %hub.metrics.summary(Latency::UdpBind),
        shims = hub.table.len(),
        counters = ?hub.metrics.counters,
        "shutting down"
    );
    ExitCode::SUCCESS
}

fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
}
