//! `bench-load`: the load tools behind `scripts/bench/bench-forwarder.sh`. An echo backend, and clients
//! that measure, through any TCP proxy on loopback, what the script compares side by side: new
//! connections per second, closed-loop request/response messages per second, ping-pong latency and
//! the memory an idle connection costs; and for UDP, datagrams/s and loss at a set rate. Each client can read the proxy's own CPU time and RSS from
//! /proc (the proxy's whole process tree), exactly over its measuring window, and prints one JSON
//! line on stdout. Every load is bounded in count and in time.

mod connrate;
mod echo;
mod idle;
mod pingpong;
mod procstat;
mod rr;
mod udp;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load tools for the forwarder benchmark (loopback only).
#[derive(Parser, Debug)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Echo server: every byte received is sent back; a client's FIN closes the connection
    Echo(echo::EchoArgs),
    /// New connections per second: connect, send a request, read its echo, close
    Connrate(connrate::ConnrateArgs),
    /// Closed-loop request/response messages per second over many connections
    Rr(rr::RrArgs),
    /// Ping-pong latency over one connection (p50/p90/p99/p99.9)
    Pingpong(pingpong::PingpongArgs),
    /// Memory per idle connection: open N connections through the proxy and compare its RSS
    Idle(idle::IdleArgs),
    /// UDP echo server (every non-empty datagram sent back to its sender)
    UdpEcho(udp::UdpEchoArgs),
    /// UDP datagrams at a set rate through a proxy to an echo: datagrams/s, loss, CPU per datagram
    UdpBlast(udp::UdpBlastArgs),
    /// The CPU time and RSS of a process tree, as JSON
    Proc(ProcArgs),
}

#[derive(clap::Args, Debug)]
struct ProcArgs {
    /// Root process; its descendants are included
    #[arg(long)]
    pid: u32,
}

/// Refuses anything but loopback: every benchmark load stays on this host.
pub fn ensure_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "{addr} is not a loopback address; bench-load only sends to 127.0.0.0/8 or ::1"
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Echo(a) => echo::run(a),
        Command::Connrate(a) => connrate::run(a),
        Command::Rr(a) => rr::run(a),
        Command::Pingpong(a) => pingpong::run(a),
        Command::Idle(a) => idle::run(a),
        Command::UdpEcho(a) => udp::echo(a),
        Command::UdpBlast(a) => udp::blast(a),
        Command::Proc(a) => {
            let tree = procstat::Tree::of(a.pid);
            let sample = tree.sample();
            println!(
                "{}",
                serde_json::json!({
                    "pids": tree.pids(),
                    "cpu_ns": sample.cpu_ns,
                    "rss_kib": sample.rss_kib,
                })
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
