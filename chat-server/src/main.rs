//! chat-server command line: parse flags, raise the open-file limit, bind, serve until a signal.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tracing::{info, warn};

use chat_server::server::{Config, Server};

/// Descriptors kept back for the listener, the poll, signals, logs.
const FD_RESERVE: u64 = 64;

/// Bytes a server line adds around a message's text (kind, timestamp, nickname, spaces).
const LINE_OVERHEAD: usize = 64;

/// A chat room for the testbed: nc-friendly line protocol, one thread, thousands of clients.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000")]
    listen: SocketAddr,
    /// Messages replayed to each newcomer.
    #[arg(long, default_value_t = 50)]
    history: usize,
    /// Longest line a client may send, in bytes (without the newline).
    #[arg(long, default_value_t = 4096)]
    max_line_bytes: usize,
    /// Outgoing bytes queued for one client before it counts as not reading and is dropped.
    #[arg(long, default_value_t = 256 * 1024)]
    max_queue_bytes: usize,
    /// Most clients at once [default: the open-file limit minus 64].
    #[arg(long)]
    max_clients: Option<usize>,
    /// Connections one client address may hold at once; more are told ERR too-many-connections
    /// (0: no limit; raise it when clients come through a gateway that hides their addresses).
    #[arg(long, default_value_t = 32)]
    max_per_address: usize,
    /// A line begun must end (its newline) within this long, or ERR line-timeout and closed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    line_timeout_ms: u64,
    /// Log filter (RUST_LOG overrides), e.g. info or chat_server=debug.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("chat-server: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    testbed::docs::generate_if_asked::<Args>(&[]);
    let args = Args::parse();
    testbed::logging::init(&args.log_level);
    if args.max_line_bytes == 0 || args.max_line_bytes > 1024 * 1024 {
        bail!(
            "--max-line-bytes {} is out of range (1 to 1048576)",
            args.max_line_bytes
        );
    }
    if args.max_queue_bytes < args.max_line_bytes + LINE_OVERHEAD {
        bail!(
            "--max-queue-bytes {} cannot hold one line: it must be at least --max-line-bytes + {LINE_OVERHEAD} = {}",
            args.max_queue_bytes,
            args.max_line_bytes + LINE_OVERHEAD
        );
    }
    if args.history > 100_000 {
        bail!("--history {} is too large (at most 100000)", args.history);
    }
    let fd_soft = match testbed::fdlimit::raise_nofile() {
        Ok(lim) => {
            if lim.soft != lim.soft_before {
                info!(
                    "open-file limit raised from {} to {}",
                    lim.soft_before, lim.soft
                );
            }
            lim.soft
        }
        Err(e) => {
            warn!("cannot raise the open-file limit: {e}");
            1024
        }
    };
    let fd_clients = fd_soft.saturating_sub(FD_RESERVE) as usize;
    let max_clients = match args.max_clients {
        Some(0) => bail!("--max-clients must be at least 1"),
        Some(n) if n > fd_clients => {
            warn!("--max-clients {n} is more than the open-file limit allows; using {fd_clients}");
            fd_clients
        }
        Some(n) => n,
        None => fd_clients,
    };
    let config = Config {
        listen: args.listen,
        history: args.history,
        max_line_bytes: args.max_line_bytes,
        max_queue_bytes: args.max_queue_bytes,
        max_clients,
        max_per_address: args.max_per_address,
        line_timeout: std::time::Duration::from_millis(args.line_timeout_ms),
    };
    let server = Server::bind(config).context("starting chat-server")?;
    let addr = server.local_addr().context("reading the bound address")?;
    info!(
        "listening on {addr}: up to {max_clients} clients ({} per address), history {} messages, lines up to {} bytes finished within {} ms, {} bytes queued per client at most",
        if args.max_per_address == 0 { "any number".to_string() } else { args.max_per_address.to_string() },
        args.history, args.max_line_bytes, args.line_timeout_ms, args.max_queue_bytes
    );
    server.run()?;
    Ok(())
}
