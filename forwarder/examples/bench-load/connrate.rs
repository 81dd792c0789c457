//! New connections per second: keeps `--concurrency` connections in flight, each one connecting,
//! sending a small request, reading its exact echo and closing; a finished one is replaced at
//! once. Stops at `--seconds` or `--max-connections`, whichever comes first.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::procstat;

#[derive(clap::Args, Debug)]
pub struct ConnrateArgs {
    /// Address to connect to (loopback)
    #[arg(long)]
    target: SocketAddr,
    /// Connections in flight at once
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Length of the run
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Most connections to make
    #[arg(long, default_value_t = 200_000)]
    max_connections: u64,
    /// Request size in bytes (echoed back)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Proxy process whose CPU time (with its descendants) is measured over the run
    #[arg(long)]
    proxy_pid: Option<u32>,
}

struct Attempt {
    stream: TcpStream,
    written: usize,
    received: usize,
    echo: Vec<u8>,
}

pub fn run(args: ConnrateArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.target)?;
    testbed::fdlimit::raise_nofile()?;
    let request: Vec<u8> = (0..args.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut attempts: Slab<Attempt> = Slab::new();
    let (mut started, mut completed, mut errors) = (0u64, 0u64, 0u64);
    let mut first_error: Option<String> = None;

    let tree = procstat::watch(args.proxy_pid);
    let before = tree.as_ref().map(|t| t.sample());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);

    let mut note_error = |e: String, errors: &mut u64| {
        *errors += 1;
        first_error.get_or_insert(e);
    };
    loop {
        let now = Instant::now();
        let open = now < deadline && started < args.max_connections;
        if !open {
            break;
        }
        while attempts.len() < args.concurrency && started < args.max_connections {
            started += 1;
            match TcpStream::connect(args.target) {
                Ok(mut stream) => {
                    let entry = attempts.vacant_entry();
                    poll.registry().register(
                        &mut stream,
                        Token(entry.key()),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    entry.insert(Attempt {
                        stream,
                        written: 0,
                        received: 0,
                        echo: vec![0u8; args.size],
                    });
                }
                Err(e) => note_error(format!("connect: {e}"), &mut errors),
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in events.iter() {
            let key = event.token().0;
            let Some(a) = attempts.get_mut(key) else {
                continue;
            };
            match step(a, &request) {
                Ok(false) => {}
                Ok(true) => {
                    completed += 1;
                    let mut a = attempts.remove(key);
                    let _ = poll.registry().deregister(&mut a.stream);
                }
                Err(e) => {
                    note_error(e, &mut errors);
                    let mut a = attempts.remove(key);
                    let _ = poll.registry().deregister(&mut a.stream);
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu_ns, warning) = procstat::cpu_between(&tree, before);
    println!(
        "{}",
        serde_json::json!({
            "load": "connrate",
            "target": args.target.to_string(),
            "concurrency": args.concurrency,
            "connections": completed,
            "errors": errors,
            "first_error": first_error,
            "seconds": elapsed,
            "per_second": completed as f64 / elapsed,
            "proxy_cpu_ns": cpu_ns,
            "proxy_cpu_ns_per_connection": cpu_ns.map(|c| c as f64 / completed.max(1) as f64),
            "warning": warning,
        })
    );
    Ok(())
}

/// Advances one connection: send the request once connected, read the echo. True when the
/// exact echo has arrived (the caller then closes it).
fn step(a: &mut Attempt, request: &[u8]) -> Result<bool, String> {
    while a.written < request.len() {
        match a.stream.write(&request[a.written..]) {
            Ok(n) => a.written += n,
            // Still connecting, or the socket is full.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    loop {
        match a.stream.read(&mut a.echo[a.received..]) {
            Ok(0) => {
                return Err(format!(
                    "closed after {} of {} echoed bytes",
                    a.received,
                    request.len()
                ))
            }
            Ok(n) => {
                a.received += n;
                if a.received == request.len() {
                    if a.echo != request {
                        return Err("echo differs from the request".into());
                    }
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
