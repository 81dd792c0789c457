//! A small, bounded load generator for the echo server, so the benchmark does not depend on the
//! full load client (`ssl-echo-client`). Two modes:
//!
//! - `handshakes`: each of `--concurrency` tasks repeatedly connects, completes the TLS handshake
//!   (none with `--plain`), echoes one `--size`-byte message and closes: connection setups per second.
//! - `echo`: `--concurrency` connections stay open and each echoes `--size`-byte messages back to
//!   back: round trips per second, with latency percentiles.
//!
//! Every run stops after `--seconds` (and `--max-ops`), and prints a human line to stderr and one
//! `RESULT key=value ...` line to stdout for scripts.
//!
//! ```sh
//! cargo run --release -p ssl-echo-server --example echo_load -- \
//!     --addr 127.0.0.1:8005 --ca certs/ca.crt --mode echo --concurrency 50 --seconds 5
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Handshakes,
    Echo,
}

/// Bounded load for ssl-echo-server: TLS handshakes/s or echo round trips/s.
#[derive(Parser, Debug)]
struct Args {
    /// Server address (loopback only: this tool refuses anything else).
    #[arg(long)]
    addr: SocketAddr,
    /// CA certificate to trust; TLS is used unless --plain.
    #[arg(long, default_value = "certs/ca.crt")]
    ca: PathBuf,
    /// Plain TCP instead of TLS.
    #[arg(long)]
    plain: bool,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// Concurrent tasks (handshakes) or open connections (echo).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// How long to run, in seconds (at most 300).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Stop after this many operations in total, whichever comes first.
    #[arg(long, default_value_t = 50_000_000)]
    max_ops: u64,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// TLS server name to verify.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

struct Totals {
    ops: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.addr.ip().is_loopback() {
        bail!("--addr {}: only loopback addresses are allowed", args.addr);
    }
    if !(args.seconds > 0.0 && args.seconds <= 300.0) {
        bail!("--seconds {}: must be in (0, 300]", args.seconds);
    }
    if args.concurrency == 0 || args.size == 0 {
        bail!("--concurrency and --size must be at least 1");
    }
    testbed::fdlimit::raise_nofile().context("cannot raise the open-file limit")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let connector = if args.plain {
        None
    } else {
        let cfg = testbed::tls::client_config(&args.ca)?;
        Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    };
    let name = rustls::pki_types::ServerName::try_from(args.server_name.clone())
        .with_context(|| format!("--server-name {:?}", args.server_name))?;
    let totals = Arc::new(Totals {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let message: Arc<Vec<u8>> = Arc::new((0..args.size).map(|i| (i % 251) as u8).collect());
    let duration = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let totals = Arc::clone(&totals);
        let message = Arc::clone(&message);
        let connector = connector.clone();
        let name = name.clone();
        let (addr, mode, max_ops) = (args.addr, args.mode, args.max_ops);
        tasks.push(tokio::spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds");
            let keep_going = |t: &Totals| {
                !t.stop.load(Ordering::Relaxed) && t.ops.load(Ordering::Relaxed) < max_ops
            };
            match mode {
                Mode::Handshakes => {
                    while keep_going(&totals) {
                        let t0 = Instant::now();
                        match one_connection(addr, connector.as_ref(), &name, &message).await {
                            Ok(()) => {
                                let _ = hist.record(t0.elapsed().as_micros() as u64);
                                totals.ops.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                totals.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Mode::Echo => {
                    let stream = match connect(addr, connector.as_ref(), &name).await {
                        Ok(s) => s,
                        Err(_) => {
                            totals.errors.fetch_add(1, Ordering::Relaxed);
                            return hist;
                        }
                    };
                    let mut stream = stream;
                    let mut buf = vec![0u8; message.len()];
                    while keep_going(&totals) {
                        let t0 = Instant::now();
                        if round_trip(&mut stream, &message, &mut buf).await.is_err() {
                            totals.errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        let _ = hist.record(t0.elapsed().as_micros() as u64);
                        totals.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = stream.shutdown().await;
                }
            }
            hist
        }));
    }
    tokio::time::sleep(duration).await;
    totals.stop.store(true, Ordering::SeqCst);
    let elapsed = started.elapsed().as_secs_f64();
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        // A task stuck on a dead server must not hold the tool: give each a moment, then move on.
        if let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(5), t).await {
            hist.add(&h)?;
        }
    }
    let ops = totals.ops.load(Ordering::SeqCst);
    let errors = totals.errors.load(Ordering::SeqCst);
    let rate = ops as f64 / elapsed;
    let what = match args.mode {
        Mode::Handshakes if args.plain => "connections/s",
        Mode::Handshakes => "handshakes/s",
        Mode::Echo => "round trips/s",
    };
    eprintln!(
        "{} {:?} c={} size={}: {ops} ops in {elapsed:.2} s = {rate:.0} {what}; latency p50 {} µs p99 {} µs; {errors} errors",
        if args.plain { "plain" } else { "tls" },
        args.mode,
        args.concurrency,
        args.size,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
    );
    println!(
        "RESULT mode={:?} tls={} concurrency={} size={} ops={ops} seconds={elapsed:.3} rate={rate:.1} p50_us={} p99_us={} errors={errors}",
        args.mode,
        !args.plain,
        args.concurrency,
        args.size,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
    );
    Ok(())
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(
    addr: SocketAddr,
    connector: Option<&tokio_rustls::TlsConnector>,
    name: &rustls::pki_types::ServerName<'static>,
) -> std::io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(match connector {
        Some(c) => Box::new(c.connect(name.clone(), tcp).await?),
        None => Box::new(tcp),
    })
}

async fn round_trip(
    stream: &mut Box<dyn Stream>,
    message: &[u8],
    buf: &mut [u8],
) -> std::io::Result<()> {
    stream.write_all(message).await?;
    stream.read_exact(buf).await?;
    if buf != message {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "echo differs from what was sent",
        ));
    }
    Ok(())
}

async fn one_connection(
    addr: SocketAddr,
    connector: Option<&tokio_rustls::TlsConnector>,
    name: &rustls::pki_types::ServerName<'static>,
    message: &[u8],
) -> std::io::Result<()> {
    let mut stream = connect(addr, connector, name).await?;
    let mut buf = vec![0u8; message.len()];
    round_trip(&mut stream, message, &mut buf).await?;
    stream.shutdown().await?;
    // Wait for the server's close (close_notify / FIN) so the server side is done too.
    let mut rest = [0u8; 16];
    while stream.read(&mut rest).await? > 0 {}
    Ok(())
}
