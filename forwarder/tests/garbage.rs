//! Garbage at the forwarder: at a forwarding port (relayed to an echo backend, which echoes it)
//! and at the web page (random bytes, TLS where HTTP is expected, requests that never end or
//! promise a gigabyte), on hundreds of connections ended by FIN, reset or half-close, plus
//! connections that hang after a few bytes. Meanwhile a well-behaved client keeps using the same
//! port: every exchange must be right, no worker may die, and memory must come back near where
//! it was.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use testbed_dev::garbage;
use testbed_dev::testing::{free_port, wait_until};

const GARBAGE: usize = 400;
/// Memory the forwarder may keep after the garbage has gone: allocator slack and pooled pipes,
/// not per-connection buffers.
const RSS_SLACK_KIB: u64 = 16 * 1024;

/// A forwarder with two workers, one port to an echo backend, and its web page.
struct Setup {
    forwarder: Forwarder,
    port: u16,
    web: SocketAddr,
    _backend: Backend,
}

fn start() -> Setup {
    let backend = Backend::echo(None);
    let port = free_port();
    let forwarder = Forwarder::builder()
        .forward("echo", port, backend.port)
        .workers(2)
        .web("127.0.0.1")
        .args(["--max-connections", "2000"])
        .start();
    Setup {
        web: forwarder.web(),
        forwarder,
        port,
        _backend: backend,
    }
}

impl Setup {
    fn pids(&self) -> Vec<u32> {
        let mut p = self.forwarder.worker_pids();
        p.sort_unstable();
        p
    }

    fn rss_kib(&self) -> u64 {
        self.forwarder.rss_kib()
    }

    /// One exchange of `n`-numbered bytes through the forwarding port.
    fn forward(&self, n: usize) -> Result<(), String> {
        let msg: Vec<u8> = (0..1000 + n % 3000).map(|i| (i * 7 + n) as u8).collect();
        let mut s = TcpStream::connect(local(self.port)).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&msg).map_err(|e| format!("send: {e}"))?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
        if back != msg {
            return Err(format!("exchange {n}: the echo differs"));
        }
        Ok(())
    }

    /// GET /api/stats as a browser would; the answer must be 200 with the figures.
    fn stats(&self) -> Result<(), String> {
        let answer = http::request(self.web, None, "GET", "/api/stats", &[], "")
            .map_err(|e| format!("GET /api/stats: {e}"))?;
        if answer.status != 200 || !answer.body.contains("\"workers\"") {
            return Err(format!(
                "GET /api/stats: {} {}",
                answer.head,
                &answer.body[..answer.body.len().min(200)]
            ));
        }
        Ok(())
    }

    /// The checks after a garbage run: nothing failed, no worker died, memory came back.
    fn check(&self, run: &garbage::Alongside, workers: &[u32], before: u64, what: &str) {
        assert!(
            run.good_failures.is_empty(),
            "{what}: the good client failed {} times: {:?}",
            run.good_failures.len(),
            &run.good_failures[..run.good_failures.len().min(5)]
        );
        assert_eq!(run.garbage.connections, GARBAGE);
        assert_eq!(
            run.garbage.refused, 0,
            "{what}: garbage connections refused"
        );
        assert_eq!(
            self.pids(),
            workers,
            "{what}: a worker died:\n{}",
            self.forwarder.process.output()
        );
        let mut after = 0;
        let settled = wait_until(Duration::from_secs(30), || {
            after = self.rss_kib();
            after <= before + RSS_SLACK_KIB
        });
        eprintln!(
            "{what}: {} garbage connections, {} bytes; {} good exchanges alongside; RSS {before} -> {after} KiB",
            run.garbage.connections, run.garbage.bytes_sent, run.good_ok
        );
        assert!(
            settled,
            "{what}: RSS {before} KiB before, {after} KiB after"
        );
        let out = self.forwarder.process.output();
        assert!(!out.contains("panicked"), "{out}");
    }
}

#[test]
fn garbage_at_a_forwarding_port_does_not_stop_a_good_client() {
    let f = start();
    for n in 0..20 {
        f.forward(n).unwrap();
    }
    let (workers, before) = (f.pids(), f.rss_kib());
    assert_eq!(workers.len(), 2);
    let idle = garbage::hold_idle(local(f.port), 50, 5);
    let mut n = 100;
    let run = garbage::spray_alongside(local(f.port), GARBAGE, 4, 11, 20, || {
        n += 1;
        f.forward(n)
    });
    drop(idle);
    f.check(&run, &workers, before, "forwarding port");
    f.forward(1).unwrap();
}

#[test]
fn garbage_at_the_web_page_does_not_stop_it_or_the_forwarding() {
    let f = start();
    for _ in 0..5 {
        f.stats().unwrap();
    }
    let (workers, before) = (f.pids(), f.rss_kib());
    let idle = garbage::hold_idle(f.web, 50, 6);
    let mut n = 0;
    let run = garbage::spray_alongside(f.web, GARBAGE, 4, 13, 20, || {
        n += 1;
        f.stats()?;
        f.forward(n)
    });
    drop(idle);
    f.check(&run, &workers, before, "web page");
    f.stats().unwrap();
}
