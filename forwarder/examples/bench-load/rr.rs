//! Closed-loop request/response: `--connections` connections each send a message, wait for its
//! exact echo, and send the next one. After every connection has completed one exchange (warm-up),
//! messages are counted for `--seconds` (or up to `--max-messages`), with the proxy's CPU time
//! read over exactly that window.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::procstat;

#[derive(clap::Args, Debug)]
pub struct RrArgs {
    /// Address to connect to (loopback)
    #[arg(long)]
    target: SocketAddr,
    /// Connections, each with one message in flight
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Length of the measured window
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Most messages to count
    #[arg(long, default_value_t = 50_000_000)]
    max_messages: u64,
    /// Message size in bytes (echoed back)
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Proxy process whose CPU time (with its descendants) is measured over the window
    #[arg(long)]
    proxy_pid: Option<u32>,
}

struct Conn {
    stream: TcpStream,
    seq: u64,
    message: Vec<u8>,
    written: usize,
    echo: Vec<u8>,
    received: usize,
}

impl Conn {
    /// Fills the next message with a byte that depends on the connection and sequence, so a
    /// mixed-up or reordered echo is caught.
    fn next_message(&mut self, key: usize) {
        self.seq += 1;
        let b = (self.seq.wrapping_mul(31) as usize + key) as u8;
        self.message.fill(b);
        self.written = 0;
        self.received = 0;
    }

    /// Writes what is unsent and reads what has come back. `Ok(true)` when the echo of the
    /// current message is complete and correct.
    fn step(&mut self) -> Result<bool, String> {
        while self.written < self.message.len() {
            match self.stream.write(&self.message[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        loop {
            match self.stream.read(&mut self.echo[self.received..]) {
                Ok(0) => return Err("connection closed by the far side".into()),
                Ok(n) => {
                    self.received += n;
                    if self.received == self.echo.len() {
                        if self.echo != self.message {
                            return Err("echo differs from the message".into());
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
}

pub fn run(args: RrArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.target)?;
    testbed::fdlimit::raise_nofile()?;
    anyhow::ensure!(args.size > 0, "--size must be at least 1");
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let std = std::net::TcpStream::connect_timeout(&args.target, Duration::from_secs(3))
            .with_context(|| {
                format!(
                    "connection {} of {} to {}",
                    i + 1,
                    args.connections,
                    args.target
                )
            })?;
        std.set_nodelay(true)?;
        std.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(std);
        poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        conns.push(Conn {
            stream,
            seq: 0,
            message: vec![0; args.size],
            written: 0,
            echo: vec![0; args.size],
            received: 0,
        });
    }
    // The first message goes out on each socket's first (writable) event.
    for (key, c) in conns.iter_mut().enumerate() {
        c.next_message(key);
    }

    let mut events = Events::with_capacity(4096);
    let give_up = Instant::now() + Duration::from_secs_f64(args.seconds + 30.0);
    let tree = procstat::watch(args.proxy_pid);
    let mut window: Option<(Instant, Option<procstat::Sample>)> = None;
    let mut warm = vec![false; conns.len()];
    let mut warming = conns.len();
    let mut messages = 0u64;
    loop {
        let now = Instant::now();
        match window {
            Some((start, _)) if now.duration_since(start).as_secs_f64() >= args.seconds => break,
            Some(_) if messages >= args.max_messages => break,
            None if now >= give_up => {
                anyhow::bail!("{warming} connections never completed a first exchange")
            }
            _ => {}
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in events.iter() {
            let key = event.token().0;
            let c = &mut conns[key];
            loop {
                match c.step() {
                    Ok(false) => break,
                    Ok(true) => {
                        if window.is_some() {
                            messages += 1;
                        } else if !warm[key] {
                            warm[key] = true;
                            warming -= 1;
                            if warming == 0 {
                                window = Some((Instant::now(), tree.as_ref().map(|t| t.sample())));
                            }
                        }
                        c.next_message(key);
                    }
                    Err(e) => anyhow::bail!("connection {key}: {e}"),
                }
            }
        }
    }
    let (start, before) = window.context("no measured window")?;
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu_ns, warning) = procstat::cpu_between(&tree, before);
    println!(
        "{}",
        serde_json::json!({
            "load": "rr",
            "target": args.target.to_string(),
            "connections": args.connections,
            "size": args.size,
            "messages": messages,
            "seconds": elapsed,
            "per_second": messages as f64 / elapsed,
            "proxy_cpu_ns": cpu_ns,
            "proxy_cpu_ns_per_message": cpu_ns.map(|c| c as f64 / messages.max(1) as f64),
            "warning": warning,
        })
    );
    Ok(())
}
