//! Memory per idle connection: reads the proxy's resident memory (its whole process tree), opens
//! `--connections` connections through it one by one — each proven end to end by a one-byte echo
//! so the proxy has connected its backend side too — waits for the proxy's RSS to settle, reads it
//! again and divides the growth by the connections opened. The connections are then closed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procstat;

#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    /// Address to connect to (loopback)
    #[arg(long)]
    target: SocketAddr,
    /// Idle connections to open
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Proxy process whose resident memory (with its descendants) is measured
    #[arg(long)]
    proxy_pid: u32,
    /// Give up opening connections after this long
    #[arg(long, default_value_t = 60.0)]
    max_seconds: f64,
}

pub fn run(args: IdleArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.target)?;
    let limit = testbed::fdlimit::raise_nofile()?;
    anyhow::ensure!(
        (args.connections as u64) + 100 <= limit.soft,
        "{} connections do not fit this process's open-file limit {}",
        args.connections,
        limit.soft
    );
    let tree = procstat::Tree::of(args.proxy_pid);
    let before = tree.sample();
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let mut open: Vec<TcpStream> = Vec::with_capacity(args.connections);
    let mut stopped_by: Option<String> = None;
    while open.len() < args.connections {
        if Instant::now() >= deadline {
            stopped_by = Some(format!("time limit of {} s", args.max_seconds));
            break;
        }
        match open_one(args.target, open.len() as u8) {
            Ok(s) => open.push(s),
            Err(e) => {
                stopped_by = Some(format!("connection {}: {e:#}", open.len() + 1));
                break;
            }
        }
    }
    let after = settled(&tree);
    let opened = open.len();
    let grown_kib = after.rss_kib.saturating_sub(before.rss_kib);
    let now = procstat::Tree::of(args.proxy_pid);
    let warning = (now.pids() != tree.pids()).then(|| {
        format!(
            "the proxy's processes changed ({:?} -> {:?})",
            tree.pids(),
            now.pids()
        )
    });
    println!(
        "{}",
        serde_json::json!({
            "load": "idle",
            "target": args.target.to_string(),
            "wanted": args.connections,
            "connections": opened,
            "stopped_by": stopped_by,
            "rss_before_kib": before.rss_kib,
            "rss_after_kib": after.rss_kib,
            "bytes_per_connection": (grown_kib * 1024) as f64 / opened.max(1) as f64,
            "warning": warning,
        })
    );
    drop(open);
    Ok(())
}

/// Connects and checks the path with a one-byte echo.
fn open_one(target: SocketAddr, byte: u8) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).context("connect")?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(&[byte]).context("write")?;
    let mut echo = [0u8; 1];
    s.read_exact(&mut echo)
        .context("no echo (the proxy did not forward it)")?;
    anyhow::ensure!(echo[0] == byte, "echo {} differs from {byte}", echo[0]);
    Ok(s)
}

/// Samples until the RSS stops moving (two readings 200 ms apart within 0.5 %), at most 3 s.
fn settled(tree: &procstat::Tree) -> procstat::Sample {
    let mut last = tree.sample();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        let now = tree.sample();
        let moved = now.rss_kib.abs_diff(last.rss_kib) as f64;
        last = now;
        if moved <= now.rss_kib as f64 * 0.005 {
            break;
        }
    }
    last
}
