//! Which backend served each connection, through the real forwarder (round robin over two echo
//! servers): the client's per-backend table must agree exactly with the servers' own counts, and
//! a connection the forwarder does not list is unknown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use testbed_dev::testing::{bin_path, free_port, wait_for_listen, wait_until, ChildGuard};

const LIMIT: Duration = Duration::from_secs(120);

/// The forwarder on `port` (round robin over `backends`), its web page on `web`.
fn forwarder(work: &std::path::Path, port: u16, web: u16, backends: &[&Server]) -> ChildGuard {
    let rules = work.join("rules.csv");
    let text: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("echo{i},{port},127.0.0.1,{}\n", b.addr.port()))
        .collect();
    std::fs::write(&rules, text).unwrap();
    let mut cmd = Command::new(bin_path("forwarder"));
    cmd.arg("--rules")
        .arg(&rules)
        .args(["--workers", "1", "--web", &format!("127.0.0.1:{web}")])
        .args(["--log-level", "warn"]);
    let guard = ChildGuard::spawn(cmd);
    // A test connection to the forwarded port would reach a backend and count there: look for
    // the listening socket instead.
    assert!(
        wait_until(LIMIT, || listening(port)),
        "forwarder never listened on {port}:\n{}",
        guard.output()
    );
    assert!(
        wait_for_listen(format!("127.0.0.1:{web}").parse().unwrap(), LIMIT),
        "no web page on {web}:\n{}",
        guard.output()
    );
    guard
}

/// True when a socket listens on `port` (state 0A in /proc/net/tcp).
fn listening(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
    })
}

#[test]
fn the_per_backend_split_matches_the_servers_own_counts() {
    let setup = Setup::plain("backends.xlsx");
    let other = Server::start(None, setup.work.path());
    let servers = [setup.server(), &other];
    let (port, web) = (free_port(), free_port());
    let _forwarder = forwarder(setup.work.path(), port, web, &servers);
    let (a1, a2) = (Agent::start(&[]), Agent::start(&[]));
    let agents = format!("{},{}", a1.addr, a2.addr);
    let url = format!("http://127.0.0.1:{web}");
    // Server::start's own readiness check is one connection each; count from there.
    for s in servers {
        assert!(wait_until(LIMIT, || s.stat("connections_total") == 1));
    }
    let mut args = setup.args(&[
        "--agents",
        &agents,
        "--connections",
        "41",
        "--count",
        "6",
        "--message",
        "where",
        "--forwarder",
        &url,
    ]);
    // Through the forwarder, not to the server directly.
    args[1] = port.to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = ClientProcess::start(&args).finish(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["messages"], 41 * 6);
    let backends = j["backends"].as_array().unwrap();
    let names: Vec<String> = backends
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "both backends, no unknown: {j}");
    for (b, name) in backends.iter().zip(&names) {
        let server = servers
            .iter()
            .find(|s| s.addr.to_string() == *name)
            .unwrap();
        // The servers' stats are written every 0.2 s.
        let connections = b["connections"].as_u64().unwrap();
        let messages = b["messages"].as_u64().unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || server.stat("connections_total")
                == 1 + connections
                && server.stat("messages_echoed") == messages),
            "{name}: client says {connections} connections, {messages} messages; server 1 + {} and {}",
            server.stat("connections_total") - 1,
            server.stat("messages_echoed")
        );
        assert_eq!(messages, connections * 6);
        assert!(b["response_ms"]["p50"].as_f64().unwrap() > 0.0);
    }
    // Round robin over one forwarder worker: 21 and 20.
    let mut split: Vec<u64> = backends
        .iter()
        .map(|b| b["connections"].as_u64().unwrap())
        .collect();
    split.sort();
    assert_eq!(split, [20, 21]);
    // Every row names its backend; the Backends sheet has one row per backend.
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(text(&rows, 0, 15), "backend");
    for row in 1..=41 {
        assert!(names.contains(&text(&rows, row, 15)), "row {row}");
        assert_eq!(text(&rows, row, 14), "127.0.0.1");
    }
    let per_backend = sheet(&setup.report, "Backends");
    assert_eq!(num(&per_backend, 1, 1) + num(&per_backend, 2, 1), 41.0);
    // The Summary sheet has the same tables (per agent, then per backend) under its charts.
    let summary = sheet(&setup.report, "Summary");
    let at = (0..summary.height())
        .find(|&r| text(&summary, r, 7) == "Per backend")
        .expect("a per-backend table on the Summary sheet");
    assert_eq!(text(&summary, at + 1, 7), "name");
    assert_eq!(
        [text(&summary, at + 2, 7), text(&summary, at + 3, 7)],
        [names[0].clone(), names[1].clone()]
    );
    assert_eq!(num(&summary, at + 2, 8) + num(&summary, at + 3, 8), 41.0);
    assert!((0..at).any(|r| text(&summary, r, 7) == "Per agent"));
}

#[test]
fn a_connection_the_forwarder_does_not_list_is_unknown() {
    let setup = Setup::plain("unknown.xlsx");
    let (port, web) = (free_port(), free_port());
    let _forwarder = forwarder(setup.work.path(), port, web, &[setup.server()]);
    let url = format!("http://127.0.0.1:{web}");
    // Straight to the server: the forwarder has none of these connections.
    let run = setup.run(
        &["--connections", "5", "--count", "2", "--forwarder", &url],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["backends"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["backends"][0]["name"], "unknown");
    assert_eq!(j["backends"][0]["connections"], 5);
    assert_eq!(j["backends"][0]["messages"], 10);
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(text(&rows, 1, 15), "unknown");
}
