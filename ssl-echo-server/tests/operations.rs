//! Running the server: clear errors for missing or malformed certificate files and a busy port,
//! exact counts in the stats file and the exit summary, and restarting a killed worker.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

fn run_expecting_error(args: &[&str], cwd: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ssl-echo-server"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_default_certificate_says_to_run_certs() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_expecting_error(&[], dir.path());
    assert!(
        err.contains(
            "ssl-echo-server: error: certs/server.crt: certificate file not found. Make a CA and \
             server certificate with `cargo run -p certs`"
        ),
        "{err}"
    );
}

#[test]
fn missing_or_malformed_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let set = certs::write_throwaway(&dir.path().join("certs"), &[]).unwrap();
    let other = certs::write_throwaway(&dir.path().join("other"), &[]).unwrap();
    std::fs::write(dir.path().join("junk.pem"), "hello\n").unwrap();
    let cert = set.server_cert.to_str().unwrap();
    let key = set.server_key.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--cert", cert, "--key", "nokey.pem"],
            "error: nokey.pem: private key file not found.",
        ),
        (
            &["--cert", "junk.pem", "--key", key],
            "error: junk.pem: contains no certificate\n",
        ),
        (
            &["--cert", cert, "--key", "junk.pem"],
            "error: junk.pem: cannot read private key: no items found\n",
        ),
        (
            &["--cert", cert, "--key", other.server_key.to_str().unwrap()],
            "do not make a usable server identity",
        ),
    ];
    for (args, expected) in cases {
        let err = run_expecting_error(args, dir.path());
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn a_port_already_in_use_is_refused_even_by_another_reuseport_listener() {
    let dir = tempfile::tempdir().unwrap();
    let taken = testbed::listener::reuseport_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_ssl-echo-server"))
        .args(["--plain", "--listen", &addr])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "error: cannot listen on {addr}: Address already in use"
        )),
        "{err}"
    );
}

fn plain_echo(addr: std::net::SocketAddr, msg: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, msg);
}

#[test]
fn stats_file_and_summary_count_exactly_and_sigterm_exits_0() {
    const N: usize = 57;
    let mut server = common::start(&["--plain", "--workers", "2"]);
    for i in 0..N {
        plain_echo(server.addr, format!("hello {i:03}").as_bytes());
    }
    let stats = server.wait_stats("57 closed connections", |s| {
        s["connections_total"] == N && s["connections_now"] == 0
    });
    assert_eq!(stats["messages_echoed"], N);
    assert_eq!(stats["bytes_echoed"], N * 9);
    assert_eq!(stats["workers"], 2);
    assert_eq!(stats["plain"], true);
    assert_eq!(stats["final_report"], false);
    let per_worker: u64 = stats["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["connections_total"].as_u64().unwrap())
        .sum();
    assert_eq!(per_worker, N as u64);

    server.guard.signal(libc::SIGTERM);
    let status = server
        .guard
        .wait_exit(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    let last = server.stats();
    assert_eq!(last["final_report"], true);
    assert_eq!(last["connections_total"], N);
    let out = server.guard.output();
    assert!(
        out.contains(&format!(
            "summary: {N} connections accepted (per worker: 0="
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("{N} messages, {} bytes echoed", N * 9)),
        "{out}"
    );
}

#[test]
fn tls_handshakes_are_counted_and_stats_lines_are_printed() {
    let server = common::start(&["--workers", "1"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..5u64 {
            let s = server.connect_tls().await;
            let data = common::payload(1000, i);
            assert!(common::echo_all(s, &data).await.unwrap() == data);
        }
    });
    let stats = server.wait_stats("5 handshakes", |s| {
        s["handshakes_total"] == 5 && s["connections_now"] == 0
    });
    assert_eq!(stats["connections_total"], 5);
    assert_eq!(stats["bytes_echoed"], 5000);
    assert!(server.guard.wait_for_output(
        "stats: connections now 0 total 5 |",
        Duration::from_secs(10)
    ));
}

#[test]
fn a_killed_worker_is_restarted_and_serves_again() {
    let server = common::start(&["--plain", "--workers", "2"]);
    let pids = server.worker_pids();
    assert_eq!(pids.len(), 2, "{}", server.stats());
    for i in 0..10 {
        plain_echo(server.addr, format!("before {i}").as_bytes());
    }
    // SAFETY: kill(2) on a worker process of the server this test started.
    unsafe {
        libc::kill(pids[0] as i32, libc::SIGKILL);
    }
    let stats = server.wait_stats("a restarted worker", |s| {
        s["worker_restarts"] == 1
            && s["per_worker"][0]["pid"]
                .as_u64()
                .is_some_and(|p| p != u64::from(pids[0]))
    });
    assert_eq!(stats["per_worker"][1]["pid"], pids[1]);
    assert!(server.guard.wait_for_output(
        &format!("worker 0 (pid {}) died", pids[0]),
        Duration::from_secs(5)
    ));
    let new_pid = stats["per_worker"][0]["pid"].as_u64().unwrap() as u32;
    assert!(
        server.guard.wait_for_output(
            &format!("worker listening on {} worker=0 pid={new_pid}", server.addr),
            Duration::from_secs(10)
        ),
        "the new worker listens"
    );
    // Nothing is lost from before the kill: the counts live in shared memory, not in the worker.
    let before = server.wait_stats("10 connections", |s| s["connections_total"] == 10);
    let slot0_before = before["per_worker"][0]["connections_total"]
        .as_u64()
        .unwrap();
    // The kernel spreads new connections over both listeners again (by address hash, so with 40
    // connections the new worker gets some unless the odds are 1 in 2^39).
    for i in 0..40 {
        plain_echo(server.addr, format!("after {i}").as_bytes());
    }
    let stats = server.wait_stats("50 connections", |s| {
        s["connections_total"] == 50 && s["connections_now"] == 0
    });
    assert!(
        stats["per_worker"][0]["connections_total"]
            .as_u64()
            .unwrap()
            > slot0_before,
        "the restarted worker served none: {stats}"
    );
}

#[test]
fn an_explicit_worker_count_stands_with_a_warning_when_it_is_short() {
    // The default --max-connections (20,000) does not add a second worker to an explicit 1:
    // each worker has its own TLS session cache, so resumption needs exactly one.
    let server = common::start(&["--workers", "1"]);
    let stats = server.wait_stats("one worker", |s| s["workers"] == 1);
    assert_eq!(stats["per_worker"].as_array().map(Vec::len), Some(1));
    assert!(
        !server.guard.output().contains("cannot hold"),
        "{}",
        server.guard.output()
    );
    drop(server);

    // Asked for more than one worker can hold: it keeps 1 and says so.
    let server = common::start(&["--workers", "1", "--max-connections", "1000000"]);
    server.wait_stats("one worker", |s| s["workers"] == 1);
    let out = server.guard.output();
    assert!(
        out.contains("--workers 1 cannot hold --max-connections 1000000")
            && out.contains("keeping 1 as asked"),
        "{out}"
    );
}
