//! `--source-ip` in a network namespace of the test's own, whose ephemeral port range is cut to
//! 100 ports: one local address can hold at most 100 connections to the server's port; two hold
//! all 150. Each run gets a fresh namespace (so no TIME_WAIT of an earlier run is in the way),
//! deleted at the end even when the test fails.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use testbed_dev::testing::{bin_path, wait_until, ChildGuard};

const LIMIT: Duration = Duration::from_secs(120);
const PORTS: &str = "40000 40099";
const SERVER_PORT: u16 = 9000;

/// A network namespace, deleted (with whatever still runs in it) when dropped.
struct Netns(String);

impl Netns {
    /// `None` (the test is skipped, and says so) where namespaces cannot be made (not root).
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("sec-srcip-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
            return None;
        }
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        let range = format!("net.ipv4.ip_local_port_range={PORTS}");
        ns.run(&["sysctl", "-qw", &range]);
        Some(ns)
    }

    /// Runs a command inside and checks it succeeded.
    fn run(&self, cmd: &[&str]) {
        let status = self.command(cmd[0]).args(&cmd[1..]).status().unwrap();
        assert!(status.success(), "{cmd:?} in {}", self.0);
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a process inside the namespace this test made.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// 150 plain connections (one message each) to an echo server inside a fresh namespace.
fn run_in_namespace(tag: &str, extra: &[&str]) -> Option<serde_json::Value> {
    let ns = Netns::new(tag)?;
    let work = tempfile::tempdir().unwrap();
    let mut server = ns.command(bin_path("ssl-echo-server"));
    server.args(["--listen", &format!("127.0.0.1:{SERVER_PORT}"), "--plain"]);
    let server = ChildGuard::spawn(server);
    assert!(
        wait_until(LIMIT, || server.output().contains("workers ready")),
        "echo server in {} did not start:\n{}",
        ns.0,
        server.output()
    );
    let report = work.path().join("source-ip.xlsx");
    let mut client = ns.command(CLIENT);
    client
        .args(["--plain", "--port", &SERVER_PORT.to_string()])
        .args([
            "--connections",
            "150",
            "--count",
            "1",
            "--max-errors",
            "150",
        ])
        .args(["--json", "--report", report.to_str().unwrap()])
        .args(extra);
    let run = ClientProcess::spawn(client).finish(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    if extra.is_empty() {
        let rows = sheet(&report, "Connections");
        let error = (1..=150)
            .map(|r| text(&rows, r, 12))
            .find(|e| !e.is_empty())
            .unwrap_or_default();
        assert!(
            error.starts_with("other during connect: ") && error.contains("ddress"),
            "{error}"
        );
    } else {
        let rows = sheet(&report, "Connections");
        let on = |ip: &str| (1..=150).filter(|&r| text(&rows, r, 14) == ip).count();
        assert_eq!((on("127.0.0.1"), on("127.0.0.2")), (75, 75));
    }
    Some(j)
}

#[test]
fn two_source_addresses_hold_more_connections_than_one_address_has_ports() {
    let Some(one) = run_in_namespace("one", &[]) else {
        return;
    };
    assert_eq!(one["connections_ok"], 100, "one address: 100 ports");
    assert_eq!(one["connections_failed"], 50);
    assert_eq!(one["errors"]["other"], 50);
    let two = run_in_namespace("two", &["--source-ip", "127.0.0.1,127.0.0.2"]).unwrap();
    assert_eq!(two["connections_ok"], 150, "two addresses: 100 ports each");
    assert_eq!(two["errors_total"], 0);
    assert_eq!(two["messages"], 150);
}
