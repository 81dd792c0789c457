//! `soak`: the traffic and the backends behind `scripts/soak.sh`. Byte-exact bulk streams both
//! ways (with early half-closes and slow readers), connection churn, a backend that checks what
//! it receives, the descriptor-budget fault and a reload probe. Each role writes its figures and
//! its lost or corrupted connections (with times) for the script's table; UDP sessions and
//! their echo backend likewise. Loopback only, every loop bounded in time.

mod backend;
mod datagrams;
mod exchange;
mod hold;
mod record;
mod stream;
mod traffic;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Soak traffic and backends (loopback only).
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A backend that sends the requested stream and checks the client's
    Backend(backend::BackendArgs),
    /// Bulk streams and connection churn through the forwarder for a duration
    Traffic(traffic::TrafficArgs),
    /// Fill the forwarder with idle connections until it stops taking them, hold, release
    Hold(hold::HoldArgs),
    /// One small exact exchange through an address (exit 0 if it worked)
    Probe(hold::ProbeArgs),
    /// A UDP echo backend
    UdpEcho(datagrams::UdpEchoArgs),
    /// UDP sessions through the forwarder, every echo checked whole
    Udp(datagrams::UdpArgs),
}

/// Refuses anything but loopback: the soak only sends to this host.
pub fn ensure_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "{addr} is not a loopback address; soak only sends to 127.0.0.0/8 or ::1"
    );
    Ok(())
}

fn main() -> ExitCode {
    let result = match Args::parse().command {
        Command::Backend(a) => backend::run(a),
        Command::Traffic(a) => traffic::run(a),
        Command::Hold(a) => hold::hold(a),
        Command::Probe(a) => hold::probe(a),
        Command::UdpEcho(a) => datagrams::echo(a),
        Command::Udp(a) => datagrams::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::FAILURE
        }
    }
}
