//! Ping-pong latency: one connection, one message in flight, each round trip timed. The first
//! `--warmup` round trips are not counted; then round trips are timed for `--seconds` (or up to
//! `--max-messages`) and reported as percentiles.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procstat;

#[derive(clap::Args, Debug)]
pub struct PingpongArgs {
    /// Address to connect to (loopback)
    #[arg(long)]
    target: SocketAddr,
    /// Length of the measured run
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Most round trips to time
    #[arg(long, default_value_t = 2_000_000)]
    max_messages: usize,
    /// Round trips before timing starts
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Message size in bytes (echoed back)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Proxy process whose CPU time (with its descendants) is measured over the timed run
    #[arg(long)]
    proxy_pid: Option<u32>,
}

pub fn run(args: PingpongArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.target)?;
    anyhow::ensure!(args.size > 0, "--size must be at least 1");
    let mut stream = std::net::TcpStream::connect_timeout(&args.target, Duration::from_secs(3))
        .with_context(|| format!("connecting to {}", args.target))?;
    stream.set_nodelay(true)?;
    // A lost echo must end the run, not hang it.
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut message = vec![0u8; args.size];
    let mut echo = vec![0u8; args.size];
    let mut round_trip = |seq: usize| -> anyhow::Result<Duration> {
        message.fill(seq as u8);
        let t = Instant::now();
        stream.write_all(&message).context("sending")?;
        stream.read_exact(&mut echo).context("reading the echo")?;
        let rtt = t.elapsed();
        anyhow::ensure!(echo == message, "echo {seq} differs from the message");
        Ok(rtt)
    };
    for seq in 0..args.warmup {
        round_trip(seq)?;
    }
    let tree = procstat::watch(args.proxy_pid);
    let before = tree.as_ref().map(|t| t.sample());
    let mut samples: Vec<u64> = Vec::with_capacity(args.max_messages.min(4_000_000));
    let start = Instant::now();
    let window = Duration::from_secs_f64(args.seconds);
    while samples.len() < args.max_messages && start.elapsed() < window {
        samples.push(round_trip(samples.len())?.as_nanos() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu_ns, warning) = procstat::cpu_between(&tree, before);
    anyhow::ensure!(!samples.is_empty(), "no round trip completed");
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[i.clamp(1, samples.len()) - 1] as f64 / 1000.0
    };
    println!(
        "{}",
        serde_json::json!({
            "load": "pingpong",
            "target": args.target.to_string(),
            "size": args.size,
            "messages": samples.len(),
            "seconds": elapsed,
            "per_second": samples.len() as f64 / elapsed,
            "mean_us": mean / 1000.0,
            "p50_us": pct(50.0),
            "p90_us": pct(90.0),
            "p99_us": pct(99.0),
            "p999_us": pct(99.9),
            "max_us": pct(100.0),
            "proxy_cpu_ns": cpu_ns,
            "proxy_cpu_ns_per_message": cpu_ns.map(|c| c as f64 / samples.len() as f64),
            "warning": warning,
        })
    );
    Ok(())
}
