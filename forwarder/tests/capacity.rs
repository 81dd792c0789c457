//! With default settings, 20,000 concurrent connections go through the forwarder on a host
//! whose open-file limit is 20,000 per process. No single process can hold all the sockets, so
//! this test runs its backends and clients as helper processes: it re-executes its own binary
//! with `HOLD_ROLE` set, and the same test function then plays that role.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use testbed_dev::testing::{free_port, ChildGuard};

const CLIENT_PROCESSES: usize = 2;
const PER_CLIENT: usize = 10_000;

#[test]
fn twenty_thousand_concurrent_connections_with_default_settings() {
    testbed::fdlimit::raise_nofile().unwrap();
    match std::env::var("HOLD_ROLE").as_deref() {
        Ok("backend") => return backend_role(),
        Ok("clients") => return clients_role(),
        _ => {}
    }
    // Two backend processes (each holds 10,000 sockets), one pool.
    let mut backends: Vec<(ChildGuard, u16)> = (0..2)
        .map(|_| {
            let port = free_port();
            let child = helper("backend", &[("HOLD_PORT", port.to_string())]);
            assert!(child.wait_for_output("ready", WAIT), "{}", child.output());
            (child, port)
        })
        .collect();
    let port = free_port();
    let rules: String = backends
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("echo{i},{port},127.0.0.1,{p}\n"))
        .collect();
    let fwd = Forwarder::builder()
        .rules(&rules)
        .workers(0)
        .listening(&[port])
        .start();
    // Polled: the output is collected by a reader thread, which may lag behind the port opening.
    assert!(
        fwd.process.wait_for_output("with 3 workers", WAIT),
        "default settings size workers for 20,000 connections:\n{}",
        fwd.process.output()
    );

    // Two client processes, each from its own source address so ephemeral ports suffice.
    let mut clients: Vec<ChildGuard> = (0..CLIENT_PROCESSES)
        .map(|i| {
            let mut cmd = helper_command("clients");
            cmd.env("HOLD_PORT", port.to_string())
                .env("HOLD_SOURCE", format!("127.0.0.{}", 20 + i))
                .stdin(Stdio::piped());
            ChildGuard::spawn(cmd)
        })
        .collect();
    for c in &clients {
        assert!(
            c.wait_for_output(&format!("connected {PER_CLIENT}"), Duration::from_secs(240)),
            "client never connected all:\n{}\nforwarder:\n{}",
            c.output(),
            fwd.process.output()
        );
    }
    // All 20,000 are open now: each carries its own message while the others stay open.
    for c in clients.iter_mut() {
        c.child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    for c in &clients {
        assert!(
            c.wait_for_output(&format!("echoed {PER_CLIENT}"), Duration::from_secs(240)),
            "{}",
            c.output()
        );
    }
    // Round robin gives each backend exactly half: ask each for its final count (every
    // connection has echoed, so each was accepted by now). "accepted 10000" in the progress lines
    // would also be there with 10,400 accepted.
    for (b, _) in backends.iter_mut() {
        b.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"count\n")
            .unwrap();
    }
    for (b, _) in &backends {
        assert!(
            b.wait_for_output("total=", WAIT),
            "backend never answered its count: {}",
            b.output()
        );
        assert!(
            b.output().contains(&format!("total={PER_CLIENT};")),
            "round robin gives each backend exactly half ({PER_CLIENT}): {}",
            b.output()
        );
    }
}

fn helper_command(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "twenty_thousand_concurrent_connections_with_default_settings",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("HOLD_ROLE", role);
    cmd
}

fn helper(role: &str, env: &[(&str, String)]) -> ChildGuard {
    let mut cmd = helper_command(role);
    cmd.stdin(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    ChildGuard::spawn(cmd)
}

fn env_port() -> u16 {
    std::env::var("HOLD_PORT").unwrap().parse().unwrap()
}

/// An echo server holding up to 10,000 connections; prints "accepted N" every 1,000, and
/// "total=N;" (the exact count so far) for each line read from stdin.
fn backend_role() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for _ in BufReader::new(std::io::stdin())
            .lines()
            .map_while(Result::ok)
        {
            println!("total={};", counted.load(Ordering::SeqCst));
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", env_port()))
            .await
            .unwrap();
        println!("ready");
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let n = accepted.fetch_add(1, Ordering::SeqCst) + 1;
            if n.is_multiple_of(1000) {
                println!("accepted {n}");
            }
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// Opens 10,000 connections, reports, waits for "go", has every connection echo one message,
/// reports, then holds them until stdin closes.
fn clients_role() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let target = SocketAddr::from(([127, 0, 0, 1], env_port()));
        let source: std::net::IpAddr = std::env::var("HOLD_SOURCE").unwrap().parse().unwrap();
        let mut conns = Vec::with_capacity(PER_CLIENT);
        for i in 0..PER_CLIENT {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::new(source, 0)).unwrap();
            let s = tokio::time::timeout(Duration::from_secs(20), sock.connect(target))
                .await
                .unwrap_or_else(|_| panic!("connect {i} timed out"))
                .unwrap_or_else(|e| panic!("connect {i}: {e}"));
            conns.push(s);
        }
        println!("connected {}", conns.len());
        let mut line = String::new();
        BufReader::new(std::io::stdin())
            .read_line(&mut line)
            .unwrap();
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                tokio::spawn(async move {
                    let msg = format!("message {i:06}");
                    s.write_all(msg.as_bytes()).await.unwrap();
                    let mut back = vec![0u8; msg.len()];
                    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut back))
                        .await
                        .expect("echo in time")
                        .unwrap();
                    assert_eq!(back, msg.as_bytes());
                    s
                })
            })
            .collect();
        let mut held = Vec::with_capacity(PER_CLIENT);
        for t in tasks {
            held.push(t.await.unwrap());
        }
        println!("echoed {}", held.len());
        let mut rest = String::new();
        let _ = BufReader::new(std::io::stdin()).read_line(&mut rest);
        drop(held);
    });
}
