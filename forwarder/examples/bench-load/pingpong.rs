//! Ping-pong latency: one connection per target, one message in flight, each round trip timed.
//! With several targets (direct, and each proxy), the run alternates between them in short slices
//! (`--slice-ms`, rotating the order every cycle), so on a shared machine every target sees the
//! same background noise; each target gets `--seconds` of timed round trips in total. The first
//! `--warmup` round trips of each connection are not timed. One JSON line per target.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procstat;

#[derive(clap::Args, Debug)]
pub struct PingpongArgs {
    /// Address to connect to (loopback); repeat for several targets
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// Proxy process of each target, in the same order (0: none, e.g. for the direct target);
    /// its CPU time with its descendants is measured over the timed round trips
    #[arg(long)]
    proxy_pid: Vec<u32>,
    /// Timed seconds per target
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Length of one slice of a target's turn, in milliseconds
    #[arg(long, default_value_t = 200)]
    slice_ms: u64,
    /// Most round trips to time per target
    #[arg(long, default_value_t = 2_000_000)]
    max_messages: usize,
    /// Round trips on each connection before timing starts
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Message size in bytes (echoed back)
    #[arg(long, default_value_t = 64)]
    size: usize,
}

/// One target's connection and what was measured on it.
struct Pinger {
    target: SocketAddr,
    stream: TcpStream,
    tree: Option<procstat::Tree>,
    message: Vec<u8>,
    echo: Vec<u8>,
    seq: u64,
    samples_ns: Vec<u64>,
    timed: Duration,
    cpu_ns: Option<u64>,
    warning: Option<String>,
}

impl Pinger {
    fn round_trip(&mut self) -> anyhow::Result<Duration> {
        self.seq += 1;
        self.message.fill(self.seq as u8);
        let t = Instant::now();
        self.stream.write_all(&self.message).context("sending")?;
        self.stream
            .read_exact(&mut self.echo)
            .context("reading the echo")?;
        let rtt = t.elapsed();
        anyhow::ensure!(
            self.echo == self.message,
            "echo {} differs from the message",
            self.seq
        );
        Ok(rtt)
    }

    /// Times round trips for one slice.
    fn slice(&mut self, length: Duration, max_messages: usize) -> anyhow::Result<()> {
        let before = self.tree.as_ref().map(|t| t.sample());
        let start = Instant::now();
        while self.samples_ns.len() < max_messages && start.elapsed() < length {
            let rtt = self.round_trip()?;
            self.samples_ns.push(rtt.as_nanos() as u64);
        }
        self.timed += start.elapsed();
        let (cpu, warning) = procstat::cpu_between(&self.tree, before);
        if let Some(c) = cpu {
            *self.cpu_ns.get_or_insert(0) += c;
        }
        if warning.is_some() {
            self.warning = warning;
        }
        Ok(())
    }

    fn report(&mut self) -> serde_json::Value {
        let n = self.samples_ns.len();
        let s = &mut self.samples_ns;
        s.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            let i = ((p / 100.0) * n as f64).ceil() as usize;
            (n > 0).then(|| s[i.clamp(1, n) - 1] as f64 / 1000.0)
        };
        let mean = (n > 0).then(|| s.iter().sum::<u64>() as f64 / n as f64 / 1000.0);
        serde_json::json!({
            "load": "pingpong",
            "target": self.target.to_string(),
            "size": self.message.len(),
            "messages": n,
            "seconds": self.timed.as_secs_f64(),
            "mean_us": mean,
            "p50_us": pct(50.0),
            "p90_us": pct(90.0),
            "p99_us": pct(99.0),
            "p999_us": pct(99.9),
            "max_us": pct(100.0),
            "proxy_cpu_ns": self.cpu_ns,
            "proxy_cpu_ns_per_message": self.cpu_ns.map(|c| c as f64 / n.max(1) as f64),
            "warning": self.warning,
        })
    }
}

pub fn run(args: PingpongArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.size > 0, "--size must be at least 1");
    anyhow::ensure!(
        args.proxy_pid.is_empty() || args.proxy_pid.len() == args.target.len(),
        "give one --proxy-pid per --target (0 for none), or none at all"
    );
    let mut pingers = Vec::new();
    for (i, &target) in args.target.iter().enumerate() {
        crate::ensure_loopback(target)?;
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_nodelay(true)?;
        // A lost echo must end the run, not hang it.
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let pid = args.proxy_pid.get(i).copied().filter(|&p| p != 0);
        let mut p = Pinger {
            target,
            stream,
            tree: procstat::watch(pid),
            message: vec![0; args.size],
            echo: vec![0; args.size],
            seq: 0,
            samples_ns: Vec::with_capacity(args.max_messages.min(1 << 20)),
            timed: Duration::ZERO,
            cpu_ns: None,
            warning: None,
        };
        for _ in 0..args.warmup {
            p.round_trip()
                .with_context(|| format!("warming up {target}"))?;
        }
        pingers.push(p);
    }
    let per_target = Duration::from_secs_f64(args.seconds);
    let slice = Duration::from_millis(args.slice_ms.max(1));
    let mut cycle = 0;
    while pingers
        .iter()
        .any(|p| p.timed < per_target && p.samples_ns.len() < args.max_messages)
    {
        let count = pingers.len();
        for k in 0..count {
            let p = &mut pingers[(k + cycle) % count];
            let left = per_target.saturating_sub(p.timed);
            if left.is_zero() || p.samples_ns.len() >= args.max_messages {
                continue;
            }
            let target = p.target;
            p.slice(slice.min(left), args.max_messages)
                .with_context(|| format!("ping-pong with {target}"))?;
        }
        cycle += 1;
    }
    for p in &mut pingers {
        println!("{}", p.report());
    }
    Ok(())
}
