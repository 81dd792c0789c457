//! `ssl-echo-server`: a mio + rustls echo server. The process started by the user is the
//! supervisor ([`supervisor`]); it runs this same binary again as worker processes ([`worker`]),
//! each with its own SO_REUSEPORT listener and event loop, so together they hold more connections
//! than one process's open-file limit allows.

mod config;
mod connection;
mod shared;
mod stats;
mod supervisor;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tracing::{info, warn};

/// TLS echo server (mio + rustls) with worker processes; --plain for the same without TLS.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8005")]
    listen: SocketAddr,
    /// Server certificate chain (PEM). Make one with `cargo run -p certs`.
    #[arg(long, default_value = "certs/server.crt")]
    cert: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, default_value = "certs/server.key")]
    key: PathBuf,
    /// Echo without TLS (to compare plaintext with TLS under the same load).
    #[arg(long)]
    plain: bool,
    /// Worker processes [default: one per CPU, more if --max-connections needs them]. An explicit
    /// count stands (each worker has its own TLS session cache: use 1 to test resumption).
    #[arg(long)]
    workers: Option<usize>,
    /// Require client certificates signed by a CA in this PEM file; a client without one, or
    /// with one from another CA, is refused (logged and counted as client_cert_refused).
    #[arg(long, value_name = "PATH", conflicts_with = "plain")]
    client_ca: Option<PathBuf>,
    /// ALPN protocols to accept, in preference order (repeatable or comma-separated); a client
    /// that offers only others is refused. None given: no ALPN.
    #[arg(
        long,
        value_name = "PROTO,...",
        value_delimiter = ',',
        conflicts_with = "plain"
    )]
    alpn: Vec<String>,
    /// Seconds between stats lines (and stats file writes); fractions allowed.
    #[arg(long, default_value_t = 5.0)]
    stats_interval: f64,
    /// Also write the counters as JSON to this file every interval and at exit (atomically).
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Connections the server must be able to hold [default: 20000]; without --workers it sets
    /// the worker count with the open-file limit; with --workers a shortfall is warned about.
    #[arg(long, value_name = "N")]
    max_connections: Option<u64>,
    /// Close a TLS connection whose handshake has not finished after this many milliseconds.
    // Longer than ssl-echo-client's whole budget for opening a connection (10 s to connect, then
    // 10 s for the handshake): at equal limits an overloaded run saw the server give up on
    // handshakes the client had just finished, which the client then lost as connections.
    #[arg(long, default_value_t = 30_000)]
    handshake_timeout_ms: u64,
    /// Log filter (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Internal: run as worker number N of a supervisor.
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    /// Internal: descriptor of the supervisor's shared counter mapping.
    #[arg(long, hide = true)]
    stats_fd: Option<i32>,
}

/// More worker processes than this is a mistake (a tiny open-file limit), not a plan.
const MAX_WORKERS: usize = 64;

fn main() -> ExitCode {
    testbed::docs::generate_if_asked::<Args>(&[]);
    let args = Args::parse();
    testbed::logging::init(&args.log_level);
    let result = match args.worker_index {
        Some(index) => run_worker(&args, index),
        None => run_supervisor(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssl-echo-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_supervisor(args: &Args) -> anyhow::Result<()> {
    if !(args.stats_interval > 0.0 && args.stats_interval.is_finite()) {
        bail!(
            "--stats-interval {}: must be a positive number of seconds",
            args.stats_interval
        );
    }
    if args.handshake_timeout_ms == 0 {
        bail!("--handshake-timeout-ms 0: must be at least 1");
    }
    if args.workers == Some(0) {
        bail!("--workers 0: need at least one worker");
    }
    // Fail here, once, with a clear message, rather than in every worker.
    if !args.plain {
        config::load_tls(&args.cert, &args.key, &tls_extras(args))?;
    }
    // Bind once *without* SO_REUSEPORT: that fails if anything listens there already, even
    // another SO_REUSEPORT server that our workers would otherwise silently share the port with.
    // It also learns the port when 0 was asked. Dropped at once: the workers bind the same port
    // with SO_REUSEPORT, and a listener nobody accepts on would still get its share of connections.
    let listen = std::net::TcpListener::bind(args.listen)
        .and_then(|l| l.local_addr())
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let limit = testbed::fdlimit::raise_nofile().context("cannot read the open-file limit")?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let plan = config::plan(args.max_connections, args.workers, cpus, limit.soft);
    if plan.workers > MAX_WORKERS {
        bail!(
            "--max-connections {} needs {} workers with an open-file limit of {} per process (most allowed: {MAX_WORKERS}); \
             lower --max-connections or raise the limit (ulimit -n)",
            args.max_connections.unwrap_or(config::DEFAULT_MAX_CONNECTIONS),
            plan.workers,
            limit.soft
        );
    }
    if let Some(asked) = plan.short_of {
        warn!(
            "--workers {} cannot hold --max-connections {asked} with {} open files per process \
             (about {} connections); keeping {} as asked, connections beyond it wait in the backlog",
            plan.workers, limit.soft, plan.capacity, plan.workers
        );
    }
    if let Some(ca) = &args.client_ca {
        info!("client certificates required (signed by {})", ca.display());
    }
    info!(
        "listening on {listen} ({}); capacity ≈ {} connections with {} workers ({} each; open-file limit {} per process)",
        if args.plain { "plaintext" } else { "TLS" },
        plan.capacity,
        plan.workers,
        plan.per_worker,
        limit.soft
    );

    let mut worker_args = vec![
        "--cert".to_string(),
        args.cert.display().to_string(),
        "--key".to_string(),
        args.key.display().to_string(),
        "--handshake-timeout-ms".to_string(),
        args.handshake_timeout_ms.to_string(),
        "--log-level".to_string(),
        args.log_level.clone(),
    ];
    if args.plain {
        worker_args.push("--plain".to_string());
    }
    if let Some(ca) = &args.client_ca {
        worker_args.push("--client-ca".to_string());
        worker_args.push(ca.display().to_string());
    }
    if !args.alpn.is_empty() {
        worker_args.push("--alpn".to_string());
        worker_args.push(args.alpn.join(","));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }
    let sup = supervisor::Supervisor::start(supervisor::SupervisorConfig {
        listen,
        plain: args.plain,
        workers: plan.workers,
        stats_interval: Duration::from_secs_f64(args.stats_interval),
        stats_file: args.stats_file.clone(),
        worker_args,
    })?;
    info!("{} workers ready", plan.workers);
    sup.run(&stop)
}

fn tls_extras(args: &Args) -> config::TlsExtras {
    config::TlsExtras {
        client_ca: args.client_ca.clone(),
        alpn: args.alpn.clone(),
    }
}

fn run_worker(args: &Args, index: usize) -> anyhow::Result<()> {
    let limit = testbed::fdlimit::raise_nofile().context("cannot raise the open-file limit")?;
    let tls = if args.plain {
        None
    } else {
        Some(Arc::new(config::load_tls(
            &args.cert,
            &args.key,
            &tls_extras(args),
        )?))
    };
    let mut worker = worker::Worker::new(worker::WorkerConfig {
        index,
        listen: args.listen,
        tls,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        max_connections: config::per_worker_capacity(limit.soft) as usize,
    })?;
    let fd = args
        .stats_fd
        .context("--worker-index needs --stats-fd (workers are started by the supervisor)")?;
    // SAFETY: the supervisor passed this descriptor down for exactly this, and nothing else in
    // this process uses it.
    let shared =
        unsafe { shared::SharedStats::open(fd) }.context("cannot map the shared counters")?;
    if index >= shared.slots() {
        bail!("--worker-index {index}: only {} slots", shared.slots());
    }
    worker.run(&shared, testbed::workers::supervisor_alive)
}
