//! UDP loads: an echo backend, and an open-loop blaster that sends datagrams of one size at a set
//! rate from a few client sockets (a few sessions through the proxy) for a set time and counts the
//! echoes that come back. Datagrams/s, loss and the proxy's CPU per forwarded datagram come out as
//! one JSON line. The rate is the caller's: the script raises it step by step.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procstat;

/// Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max).
const SOCKET_BUFFER: usize = 4 << 20;

#[derive(clap::Args, Debug)]
pub struct UdpEchoArgs {
    /// Address to listen on (loopback)
    #[arg(long)]
    listen: SocketAddr,
    /// Threads, each with its own SO_REUSEPORT socket (the kernel spreads clients over them)
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Exit after this long
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

pub fn echo(args: UdpEchoArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.listen)?;
    let mut handles = Vec::new();
    for _ in 0..args.threads.max(1) {
        let socket = reuseport(args.listen)?;
        handles.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            loop {
                match socket.recv_from(&mut buf) {
                    // Empty datagrams are not echoed: rinetd sends one when it opens a
                    // session and takes an empty reply for the end of it.
                    Ok((0, _)) => {}
                    Ok((n, from)) => {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {}
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(args.max_seconds));
    Ok(())
}

fn reuseport(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.into())
}

#[derive(clap::Args, Debug)]
pub struct UdpBlastArgs {
    /// Address to send to (loopback): the proxy, or the echo backend directly
    #[arg(long)]
    target: SocketAddr,
    /// Datagrams per second to send, all sockets together
    #[arg(long)]
    rate: u64,
    /// Datagram size in bytes
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Client sockets (sessions through the proxy)
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// Length of the sending window
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Proxy process whose CPU time (with its descendants) is measured
    #[arg(long)]
    proxy_pid: Option<u32>,
}

pub fn blast(args: UdpBlastArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.target)?;
    anyhow::ensure!(
        args.size >= 8,
        "--size must be at least 8 (a sequence number)"
    );
    let sockets: Vec<UdpSocket> = (0..args.sockets.max(1))
        .map(|_| -> anyhow::Result<UdpSocket> {
            let s = reuseport(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            s.connect(args.target)?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })
        .collect::<anyhow::Result<_>>()?;
    // One exchange per socket first, so every session exists before the window opens.
    for s in &sockets {
        let mut buf = [0u8; 16];
        let warm = Instant::now();
        loop {
            s.send(&[0u8; 8])?;
            if s.recv(&mut buf).is_ok() {
                break;
            }
            anyhow::ensure!(
                warm.elapsed() < Duration::from_secs(5),
                "no echo from {}",
                args.target
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = sockets
        .iter()
        .map(|s| {
            let s = s.try_clone().expect("a socket clone");
            let (stop, received, bad, size) = (
                Arc::clone(&stop),
                Arc::clone(&received),
                Arc::clone(&bad),
                args.size,
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Relaxed) {
                    if let Ok(n) = s.recv(&mut buf) {
                        if n == size {
                            received.fetch_add(1, Relaxed);
                        } else {
                            bad.fetch_add(1, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    let cpu_before = args
        .proxy_pid
        .map(|p| procstat::Tree::of(p).sample().cpu_ns);
    let window = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut payload = vec![0x5Au8; args.size];
    let mut send_errors = 0u64;
    // Sends in small bursts paced against the clock, so the rate holds on average without a
    // timer per datagram.
    while start.elapsed() < window {
        let due = (start.elapsed().as_secs_f64() * args.rate as f64) as u64;
        while sent < due {
            payload[..8].copy_from_slice(&sent.to_le_bytes());
            let s = &sockets[(sent as usize) % sockets.len()];
            if s.send(&payload).is_err() {
                send_errors += 1;
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Late echoes still count.
    std::thread::sleep(Duration::from_millis(300));
    let cpu_after = args
        .proxy_pid
        .map(|p| procstat::Tree::of(p).sample().cpu_ns);
    stop.store(true, Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let got = received.load(Relaxed);
    let cpu_ns = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    let lost = sent.saturating_sub(got);
    println!(
        "{}",
        serde_json::json!({
            "rate": args.rate,
            "size": args.size,
            "sent": sent,
            "received": got,
            "wrong_size": bad.load(Relaxed),
            "send_errors": send_errors,
            "loss_percent": if sent > 0 { 100.0 * lost as f64 / sent as f64 } else { 0.0 },
            "received_per_s": got as f64 / elapsed,
            // Each echoed datagram crossed the proxy twice (to the backend and back).
            "cpu_ns_per_datagram": cpu_ns.filter(|_| got > 0).map(|c| c as f64 / (2 * got) as f64),
        })
    );
    Ok(())
}
