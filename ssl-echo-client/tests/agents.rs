//! Agents on loopback: one coordinator spreads the connections over `ssl-echo-client agent`
//! processes, holds one barrier across them and writes one report; a lost agent is named, a
//! wrong token refused.

mod common;

use std::time::Duration;

use common::*;
use testbed_dev::testing::{free_port, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

fn latency(j: &serde_json::Value, stat: &str) -> f64 {
    j["response_ms"][stat].as_f64().unwrap()
}

#[test]
fn two_agents_give_one_report_whose_totals_are_the_sums_of_theirs() {
    let setup = Setup::plain("agents.xlsx");
    let (a1, a2) = (Agent::start(&[]), Agent::start(&[]));
    let agents = format!("{},{}", a1.addr, a2.addr);
    let run = setup.run(
        &[
            "--agents",
            &agents,
            "--connections",
            "61",
            "--count",
            "9",
            "--message",
            "abc",
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains("61 connections to 127.0.0.1:") && run.stderr.contains("over 2 agents"),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["connections_ok"], 61);
    assert_eq!(j["messages"], 61 * 9);
    assert_eq!(j["bytes_received"], 61 * 9 * 3);
    assert_eq!(j["errors_total"], 0);
    let agents = j["agents"].as_array().unwrap();
    let names: Vec<&str> = agents.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, [a1.addr.as_str(), a2.addr.as_str()]);
    let conns: Vec<u64> = agents
        .iter()
        .map(|a| a["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(conns, [31, 30]);
    let msgs: u64 = agents.iter().map(|a| a["messages"].as_u64().unwrap()).sum();
    assert_eq!(
        msgs,
        j["messages"].as_u64().unwrap(),
        "merged total = sum of the agents'"
    );
    // The merged histogram holds every sample of both: its extremes are theirs.
    let max = agents.iter().map(|a| latency(a, "max")).fold(0.0, f64::max);
    let min = agents
        .iter()
        .map(|a| latency(a, "min"))
        .fold(f64::MAX, f64::min);
    assert_eq!(latency(&j, "max"), max);
    assert_eq!(latency(&j, "min"), min);
    let (lo, hi) = (
        latency(&agents[0], "p50").min(latency(&agents[1], "p50")),
        latency(&agents[0], "p50").max(latency(&agents[1], "p50")),
    );
    assert!((lo..=hi).contains(&latency(&j, "p50")), "{j}");

    // The server saw every byte; the report has a row per connection tagged with its agent.
    assert!(wait_until(Duration::from_secs(5), || setup
        .server()
        .stat("bytes_echoed")
        == 61 * 9 * 3));
    assert_eq!(
        sheet_names(&setup.report),
        ["Summary", "Connections", "Timeline", "Agents"]
    );
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(rows.height(), 62);
    assert_eq!(text(&rows, 0, 13), "agent");
    let on = |name: &str| (1..=61).filter(|&r| text(&rows, r, 13) == name).count();
    assert_eq!((on(&a1.addr), on(&a2.addr)), (31, 30));
    let per_agent = sheet(&setup.report, "Agents");
    assert_eq!(text(&per_agent, 1, 0), a1.addr);
    assert_eq!(
        num(&per_agent, 1, 5) + num(&per_agent, 2, 5),
        (61 * 9) as f64
    );
    // The distribution chart's data (every bar of the merged histogram) counts every message.
    let summary = sheet(&setup.report, "Summary");
    let bars: f64 = (3..summary.height())
        .filter_map(|r| match summary.get((r, 5)) {
            Some(calamine::Data::Float(n)) => Some(*n),
            _ => None,
        })
        .sum();
    assert_eq!(bars, (61 * 9) as f64);
}

#[test]
fn a_killed_agent_is_named_and_stops_the_run_with_a_full_report() {
    let setup = Setup::plain("killed-agent.xlsx");
    let (a1, mut a2) = (Agent::start(&[]), Agent::start(&[]));
    let agents = format!("{},{}", a1.addr, a2.addr);
    let client = setup.start(&[
        "--agents",
        &agents,
        "--connections",
        "40",
        "--duration",
        "600",
        "--message",
        "ping",
    ]);
    assert!(
        wait_until(LIMIT, || setup.server().stat("bytes_echoed") >= 4 * 200),
        "the server never echoed 200 messages"
    );
    a2.kill();
    let run = client.finish(LIMIT);
    assert_eq!(
        run.status.code(),
        Some(EXIT_TOO_MANY_ERRORS),
        "{}",
        run.stderr
    );
    let lost = format!("agent {} lost: the connection to it closed", a2.addr);
    assert!(run.stderr.contains(&lost), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("ssl-echo-client: the run was stopped: {lost}")),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["agents_lost"][0]["who"], format!("agent {}", a2.addr));
    assert_eq!(j["connections"], 40);
    // The killed agent's 20 connections are failures; the other's stopped cleanly.
    assert_eq!(j["errors"]["other"], 20, "{}", j["errors"]);
    assert_eq!(j["errors_total"], 20);
    assert_eq!(j["agents"][0]["connections_lost"], 0);
    let rows = sheet(&setup.report, "Connections");
    for row in 1..=40 {
        let error = text(&rows, row, 12);
        if text(&rows, row, 13) == a2.addr {
            assert_eq!(
                error,
                format!(
                    "other during exchange: agent {} lost: the connection to it closed",
                    a2.addr
                )
            );
        } else {
            assert_eq!(error, "", "row {row}");
            assert!(num(&rows, row, 5) > 0.0, "row {row} sent nothing");
        }
    }
}

#[test]
fn an_unreachable_agent_stops_the_run_or_is_left_out() {
    let setup = Setup::plain("unreachable.xlsx");
    let good = Agent::start(&[]);
    let dead = format!("127.0.0.1:{}", free_port()); // nothing listens there
    let agents = format!("{},{dead}", good.addr);
    let args = ["--agents", &agents, "--connections", "10", "--count", "3"];
    let run = setup.run(&args, LIMIT);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("ssl-echo-client: agent {dead}: cannot connect: ")),
        "{}",
        run.stderr
    );
    let mut more = args.to_vec();
    more.extend(["--on-agent-loss", "continue"]);
    let run = setup.run(&more, LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("agent {dead} left out: cannot connect")),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(
        j["messages"], 30,
        "the whole run on the agent that was there"
    );
    assert_eq!(j["agents"][0]["connections"], 10);
}

#[test]
fn an_agent_refuses_a_wrong_token_and_needs_one_off_loopback() {
    let setup = Setup::plain("token.xlsx");
    let agent = Agent::start(&["--token", "s3cret"]);
    let base = [
        "--agents",
        &agent.addr,
        "--connections",
        "4",
        "--count",
        "2",
    ];
    let mut wrong = base.to_vec();
    wrong.extend(["--agent-token", "guess"]);
    let run = setup.run(&wrong, LIMIT);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("agent {}: refused: wrong token", agent.addr)),
        "{}",
        run.stderr
    );
    assert!(agent
        .guard
        .wait_for_output("refused: wrong token", Duration::from_secs(5)));
    let run = setup.run(&base, LIMIT);
    assert!(
        run.stderr
            .contains("refused: this agent needs a token (--agent-token)"),
        "{}",
        run.stderr
    );
    let mut right = base.to_vec();
    right.extend(["--agent-token", "s3cret"]);
    let run = setup.run(&right, LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.json()["messages"], 8);

    let off = std::process::Command::new(CLIENT)
        .args(["agent", "--listen", "0.0.0.0:1"])
        .env_remove("SSL_ECHO_CLIENT_TOKEN")
        .output()
        .unwrap();
    assert!(!off.status.success());
    assert!(
        String::from_utf8_lossy(&off.stderr)
            .contains("--listen 0.0.0.0:1: an agent off loopback needs --token"),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
}

#[test]
fn an_agent_too_slow_for_the_barrier_is_named_and_the_run_stops() {
    // A TLS client against a port that accepts TCP (the kernel's backlog) but never answers the
    // handshake: the agent's connections hang in phase 1 for --timeout-ms.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let certs = certs();
    let agent = Agent::start(&[]);
    let report = certs.dir.path().join("slow.xlsx");
    let started = std::time::Instant::now();
    let run = run_client(
        &[
            "--port",
            &port.to_string(),
            "--ca",
            certs.paths.ca_cert.to_str().unwrap(),
            "--agents",
            &agent.addr,
            "--connections",
            "5",
            "--count",
            "1",
            "--timeout-ms",
            "60000",
            "--barrier-timeout-s",
            "1",
            "--report",
            report.to_str().unwrap(),
            "--json",
        ],
        LIMIT,
    );
    assert_eq!(
        run.status.code(),
        Some(EXIT_TOO_MANY_ERRORS),
        "{}",
        run.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the run waited for the handshakes instead of the barrier timeout"
    );
    let why = format!(
        "agent {} lost: did not reach the barrier within 1 s (0 of 5 connections opened or failed)",
        agent.addr
    );
    assert!(run.stderr.contains(&why), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["connections_failed"], 0);
    assert_eq!(j["errors"]["other"], 5);
    let rows = sheet(&report, "Connections");
    assert_eq!(text(&rows, 1, 12), format!("other during exchange: {why}"));
}

/// Opens a connection to `agent` from the loopback address `from` (127.0.0.0/8 is all local).
fn connect_from(from: [u8; 4], agent: &str) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((from, 0)).into())
        .unwrap();
    let addr: std::net::SocketAddr = agent.parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// True when the agent closed (or reset) `s` within `limit`, while we dribble a byte a second
/// that never makes a whole hello line.
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> bool {
    use std::io::{Read, Write};
    let start = std::time::Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let mut buf = [0u8; 256];
    let mut last_write = None::<std::time::Instant>;
    while start.elapsed() < limit {
        if last_write.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            if s.write_all(b"{").is_err() {
                return true;
            }
            last_write = Some(std::time::Instant::now());
        }
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {} // a refusal line, then the close
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn a_slow_control_client_is_cut_while_the_coordinator_still_reaches_the_agent() {
    let setup = Setup::plain("gate.xlsx");
    let agent = Agent::start(&[]);
    // Strangers from 127.0.0.2 take every slot one address may hold (8) by dribbling a hello
    // that never ends; a ninth from there is refused at once.
    let mut dribblers: Vec<std::net::TcpStream> = (0..8)
        .map(|_| connect_from([127, 0, 0, 2], &agent.addr))
        .collect();
    let opened = std::time::Instant::now();
    for d in &mut dribblers {
        use std::io::Write;
        d.write_all(b"{\"type\":").unwrap();
    }
    let mut ninth = connect_from([127, 0, 0, 2], &agent.addr);
    assert!(
        closed_within(&mut ninth, Duration::from_secs(2)),
        "a ninth greeting from one address must be refused at once"
    );
    // Meanwhile the coordinator (from 127.0.0.1) reaches the agent and runs.
    let run = setup.run(
        &[
            "--agents",
            &agent.addr,
            "--connections",
            "5",
            "--count",
            "3",
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.json()["messages"], 15);
    // The dribblers are cut within the hello limit (5 s), plus slack for a loaded machine.
    for d in &mut dribblers {
        let left = Duration::from_secs(10).saturating_sub(opened.elapsed());
        assert!(closed_within(d, left), "a dribbler was still open");
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(4),
        "cut before the limit"
    );
    // Counted, and logged once for that address (not once per connection).
    let log = agent.guard.output();
    let lines = log
        .lines()
        .filter(|l| l.contains("control port: 127.0.0.2: connections refused or cut"))
        .count();
    assert_eq!(lines, 1, "{log}");
}
