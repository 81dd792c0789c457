//! The echo backend: a few threads, each with its own `SO_REUSEPORT` listener and mio event loop,
//! sending back every byte they read. A connection holds at most one read buffer of unsent bytes
//! (it stops reading while its client is not reading), and closes once its client's FIN has been
//! answered. It exits by itself after `--max-seconds`, so a forgotten one never lingers.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX);
const READ_BYTES: usize = 64 * 1024;

#[derive(clap::Args, Debug)]
pub struct EchoArgs {
    /// Address to listen on (loopback)
    #[arg(long)]
    listen: SocketAddr,
    /// Threads, each with its own listener and event loop
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Exit after this long, whatever happens
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet sent back.
    pending: Vec<u8>,
    sent: usize,
}

pub fn run(args: EchoArgs) -> anyhow::Result<()> {
    crate::ensure_loopback(args.listen)?;
    let limit = testbed::fdlimit::raise_nofile().context("raising the open-file limit")?;
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let mut threads = Vec::new();
    for i in 0..args.threads.max(1) {
        let listener = testbed::listener::reuseport_listener(args.listen)
            .with_context(|| format!("listening on {}", args.listen))?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("echo-{i}"))
                .spawn(move || serve(TcpListener::from_std(listener), deadline))?,
        );
    }
    eprintln!(
        "echo: listening on {} with {} threads (open-file limit {})",
        args.listen,
        threads.len(),
        limit.soft
    );
    for t in threads {
        match t.join() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("an echo thread panicked"),
        }
    }
    Ok(())
}

fn serve(mut listener: TcpListener, deadline: Instant) -> anyhow::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Slab<Conn> = Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; READ_BYTES];
    while Instant::now() < deadline {
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(500))) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept_all(&listener, &mut poll, &mut conns);
                continue;
            }
            let key = event.token().0;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            if !service(conn, &mut buf) {
                let mut conn = conns.remove(key);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
    Ok(())
}

fn accept_all(listener: &TcpListener, poll: &mut Poll, conns: &mut Slab<Conn>) {
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let entry = conns.vacant_entry();
                if poll
                    .registry()
                    .register(
                        &mut stream,
                        Token(entry.key()),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .is_ok()
                {
                    entry.insert(Conn {
                        stream,
                        pending: Vec::new(),
                        sent: 0,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE: say so and let the backlog wait; the loop's timeout retries.
                eprintln!("echo: accept: {e}");
                return;
            }
        }
    }
}

/// Echoes until the socket would block (edge-triggered). False when the connection is over.
fn service(conn: &mut Conn, buf: &mut [u8]) -> bool {
    loop {
        while conn.sent < conn.pending.len() {
            match conn.stream.write(&conn.pending[conn.sent..]) {
                Ok(n) => conn.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        conn.pending.clear();
        conn.sent = 0;
        let n = match conn.stream.read(buf) {
            Ok(0) => return false, // the client's FIN: answered by closing
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        // Most echoes go straight out; only what the socket does not take is kept.
        let mut written = 0;
        while written < n {
            match conn.stream.write(&buf[written..n]) {
                Ok(w) => written += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if written < n {
            conn.pending.extend_from_slice(&buf[written..n]);
        }
    }
}
