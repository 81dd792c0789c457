//! End-to-end runs of the client against a real echo server on a loopback port: exact counts in
//! the JSON summary and in the spreadsheet read back with calamine, and failures counted by
//! cause instead of crashing or hanging.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::*;
use testbed_dev::testing::{free_port, wait_until};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn tls_300_connections_of_20_messages_give_exact_counts_in_json_and_report() {
    let setup = Setup::tls("r/client-300.xlsx");
    let (server, report) = (setup.server(), &setup.report);
    let message = "hello, echo"; // 11 bytes
    let run = setup.run(
        &[
            "--connections",
            "300",
            "--count",
            "20",
            "--message",
            message,
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("300 connections over 1 process (open-file limit "),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["connections"], 300);
    assert_eq!(j["connections_ok"], 300);
    assert_eq!(j["connections_failed"], 0);
    assert_eq!(j["messages"], 6000);
    assert_eq!(j["bytes_sent"], 6000 * 11);
    assert_eq!(j["bytes_received"], 6000 * 11);
    assert_eq!(j["errors_total"], 0);
    assert_eq!(j["processes"], 1);
    assert_eq!(j["tls"], true);
    assert_eq!(j["report"], report.to_str().unwrap());
    for cause in [
        "refused",
        "timeout",
        "tls",
        "reset",
        "wrong_echo",
        "eof",
        "other",
    ] {
        assert_eq!(j["errors"][cause], 0, "{cause}");
    }
    let r = &j["response_ms"];
    let (p50, p99, max) = (
        r["p50"].as_f64().unwrap(),
        r["p99"].as_f64().unwrap(),
        r["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{r}");
    assert!(j.get("corrected_response_ms").is_none(), "only with --rate");
    assert!(j["messages_per_sec"].as_f64().unwrap() > 0.0);

    // The server saw every byte, and so does the report.
    assert!(wait_until(Duration::from_secs(5), || server
        .stat("bytes_echoed")
        == 6000 * 11));
    assert_eq!(
        sheet_names(report),
        ["Summary", "Connections", "Timeline", "TLS"]
    );
    let rows = sheet(report, "Connections");
    assert_eq!(rows.height(), 301, "header + one row per connection");
    assert_eq!(text(&rows, 0, 5), "messages");
    let mut ports = std::collections::HashSet::new();
    for row in 1..=300 {
        assert_eq!(num(&rows, row, 0), (row - 1) as f64, "ids in order");
        assert_eq!(num(&rows, row, 5), 20.0, "messages of row {row}");
        assert_eq!(num(&rows, row, 6), 220.0, "bytes sent of row {row}");
        assert_eq!(num(&rows, row, 7), 220.0, "bytes received of row {row}");
        assert_eq!(num(&rows, row, 11), 0.0, "errors of row {row}");
        assert!(num(&rows, row, 4) > 0.0, "handshake ms of row {row}");
        assert!(
            num(&rows, row, 8) <= num(&rows, row, 9) && num(&rows, row, 9) <= num(&rows, row, 10)
        );
        ports.insert(num(&rows, row, 2) as u64);
    }
    assert_eq!(ports.len(), 300, "every connection has its own local port");
    assert_eq!(summary_value(report, "messages"), 6000.0);
    assert_eq!(summary_value(report, "connections up"), 300.0);
    assert_eq!(summary_value(report, "bytes sent"), 66000.0);
    assert_eq!(summary_value(report, "total"), 0.0);
    let timeline = sheet(report, "Timeline");
    assert!(timeline.height() >= 2, "at least one second of timeline");
}

#[test]
fn plaintext_mode_counts_the_same_way() {
    let setup = Setup::plain("plain.xlsx");
    let report = &setup.report;
    let run = setup.run(
        &[
            "--connections",
            "50",
            "--count",
            "10",
            "--connect-rate",
            "200",
            "--message",
            "abc",
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["tls"], false);
    assert_eq!(j["messages"], 500);
    // The ramp: the 50th connection starts 49/200 s after the first, so phase 1 cannot be shorter.
    assert!(
        j["connect_s"].as_f64().unwrap() >= 49.0 / 200.0,
        "{}",
        j["connect_s"]
    );
    assert_eq!(summary_value(report, "connect rate (/s)"), 200.0);
    assert_eq!(j["bytes_received"], 1500);
    assert_eq!(j["errors_total"], 0);
    let rows = sheet(report, "Connections");
    assert_eq!(rows.height(), 51);
    assert_eq!(
        rows.get((1, 4)),
        Some(&calamine::Data::Empty),
        "no handshake in plain mode"
    );
}

#[test]
fn a_dead_port_gives_one_refused_per_connection_without_hanging() {
    let setup = Setup::plain_to(free_port(), "dead.xlsx"); // nothing listens there
    let run = setup.run(
        &["--connections", "200", "--count", "5"],
        Duration::from_secs(60),
    );
    assert_eq!(
        run.status.code(),
        Some(EXIT_TOO_MANY_ERRORS),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("ssl-echo-client: 200 connections failed or were lost (--max-errors 0)"),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["connections_ok"], 0);
    assert_eq!(j["connections_failed"], 200);
    assert_eq!(j["errors"]["refused"], 200);
    assert_eq!(j["errors_total"], 200);
    assert_eq!(j["messages"], 0);
    assert_eq!(j["response_ms"]["max"], 0.0);
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(rows.height(), 201);
    assert!(
        text(&rows, 1, 12).starts_with("refused during connect: "),
        "{}",
        text(&rows, 1, 12)
    );
}

#[test]
fn killing_the_server_midway_ends_the_run_with_every_connection_counted() {
    let mut setup = Setup::tls("killed.xlsx");
    // 40 connections × 50 messages/s would take 2,000 s to reach the count: the kill ends it.
    // The 40 lost connections are allowed, so the exit status is 0.
    let client = setup.start(&[
        "--connections",
        "40",
        "--count",
        "100000",
        "--rate",
        "50",
        "--timeout-ms",
        "5000",
        "--max-errors",
        "40",
    ]);
    let report = setup.report.clone();
    let server = setup.server.as_mut().unwrap();
    // Midway: once the server has echoed a good number of messages.
    let bytes_per_message = "Hello, echo server!".len() as u64;
    assert!(
        wait_until(LIMIT, || server.stat("bytes_echoed")
            >= 500 * bytes_per_message),
        "the server never echoed 500 messages"
    );
    server.guard.signal(libc::SIGKILL);
    server
        .guard
        .wait_exit(Duration::from_secs(10))
        .expect("server killed");
    let run = client.finish(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["connections_ok"], 40);
    assert_eq!(j["connections_lost"], 40);
    let (eof, reset) = (
        j["errors"]["eof"].as_u64().unwrap(),
        j["errors"]["reset"].as_u64().unwrap(),
    );
    assert_eq!(
        eof + reset,
        40,
        "each connection ends with eof or reset: {}",
        j["errors"]
    );
    assert_eq!(j["errors_total"], 40);
    let messages = j["messages"].as_u64().unwrap();
    assert!((500..40 * 100_000).contains(&messages), "{messages}");
    // Measured from the intended send time, each message takes at least as long as measured
    // from the actual send, so every statistic is at least as high.
    for stat in ["p50", "p90", "p99", "max"] {
        let corrected = j["corrected_response_ms"][stat].as_f64().unwrap();
        let measured = j["response_ms"][stat].as_f64().unwrap();
        assert!(
            corrected >= measured && corrected > 0.0,
            "{stat}: {corrected} < {measured}"
        );
    }
    let rows = sheet(&report, "Connections");
    assert_eq!(rows.height(), 41);
    let counted: f64 = (1..=40).map(|r| num(&rows, r, 5)).sum();
    assert_eq!(counted as u64, messages);
    for row in 1..=40 {
        let error = text(&rows, row, 12);
        assert!(
            error == "eof during exchange: peer closed the connection without TLS close_notify"
                || error.starts_with("reset during exchange: "),
            "row {row}: {error}"
        );
        assert_eq!(num(&rows, row, 11), 1.0);
    }
    assert_eq!(summary_value(&report, "messages"), messages as f64);
    assert_eq!(summary_value(&report, "total"), 40.0);
}

#[test]
fn two_processes_share_the_connections_and_join_one_report() {
    let setup = Setup::tls("two.xlsx");
    let report = &setup.report;
    let run = setup.run(
        &["--connections", "101", "--count", "7", "--processes", "2"],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains("101 connections over 2 processes"),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["processes"], 2);
    assert_eq!(j["connections_ok"], 101);
    assert_eq!(j["messages"], 707);
    assert_eq!(j["errors_total"], 0);
    let rows = sheet(report, "Connections");
    assert_eq!(rows.height(), 102);
    let processes: Vec<u64> = (1..=101).map(|r| num(&rows, r, 1) as u64).collect();
    assert_eq!(processes.iter().filter(|p| **p == 0).count(), 51);
    assert_eq!(processes.iter().filter(|p| **p == 1).count(), 50);
    let ids: Vec<u64> = (1..=101).map(|r| num(&rows, r, 0) as u64).collect();
    assert_eq!(ids, (0..101).collect::<Vec<_>>());
    // The histograms of both processes were merged: the distribution has every message.
    let summary = sheet(report, "Summary");
    let mut bars = 0.0;
    for row in 3..summary.height() {
        if let Some(calamine::Data::Float(n)) = summary.get((row, 5)) {
            bars += n;
        }
    }
    assert_eq!(bars, 707.0);
}

#[test]
fn a_wrong_server_name_is_counted_as_tls_failures() {
    let setup = Setup::tls("sni.xlsx");
    let run = setup.run(
        &[
            "--server-name",
            "not-this-server.example",
            "--connections",
            "20",
            "--count",
            "1",
        ],
        LIMIT,
    );
    assert_eq!(
        run.status.code(),
        Some(EXIT_TOO_MANY_ERRORS),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["errors"]["tls"], 20);
    assert_eq!(j["connections_failed"], 20);
    let rows = sheet(&setup.report, "Connections");
    assert!(
        text(&rows, 1, 12).starts_with("tls during handshake: "),
        "{}",
        text(&rows, 1, 12)
    );
}

#[test]
fn a_wrong_echo_is_an_error_not_a_timeout() {
    // A server that answers every message with the same number of bytes, all 'X'.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&vec![b'X'; n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let setup = Setup::plain_to(port, "wrong.xlsx");
    let run = setup.run(
        &[
            "--connections",
            "5",
            "--count",
            "3",
            "--message",
            "ping",
            "--timeout-ms",
            "30000",
            "--max-errors",
            "4",
        ],
        LIMIT,
    );
    assert_eq!(run.status.code(), Some(EXIT_TOO_MANY_ERRORS));
    assert!(
        run.stderr
            .contains("5 connections failed or were lost (--max-errors 4)"),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["errors"]["wrong_echo"], 5);
    assert_eq!(j["errors"]["timeout"], 0);
    assert_eq!(j["connections_lost"], 5);
    assert_eq!(j["messages"], 0);
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(
        text(&rows, 1, 12),
        "wrong_echo during exchange: sent \"ping\", got back \"XXXX\""
    );
}

#[test]
fn a_missing_ca_file_is_one_clear_error() {
    let run = run_client(
        &[
            "--port",
            "1",
            "--ca",
            "/nonexistent/ca.crt",
            "--connections",
            "3",
            "--count",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(!run.status.success());
    assert!(
        run.stderr
            .contains("/nonexistent/ca.crt: cannot read certificate"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
}

#[test]
fn ctrl_c_ends_the_exchange_early_with_a_full_report() {
    let setup = Setup::tls("interrupted.xlsx");
    let server = setup.server();
    let client = setup.start(&[
        "--connections",
        "30",
        "--duration",
        "600",
        "--processes",
        "2",
        "--message",
        "abcd",
    ]);
    assert!(
        wait_until(LIMIT, || server.stat("bytes_echoed") >= 4 * 300),
        "the server never echoed 300 messages"
    );
    // Ctrl-C on a terminal reaches the whole group: the workers must leave the decision to the
    // parent, which stops them and still writes the report.
    client.signal_group(libc::SIGINT);
    let run = client.finish(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("stopping: finishing the messages in flight"),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["processes"], 2);
    assert_eq!(j["connections_ok"], 30);
    assert_eq!(j["errors_total"], 0, "{}", j["errors"]);
    assert!(j["duration_s"].as_f64().unwrap() < 300.0);
    let messages = j["messages"].as_u64().unwrap();
    assert!(messages >= 300, "{messages}");
    assert_eq!(j["bytes_received"].as_u64().unwrap(), 4 * messages);
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(rows.height(), 31);
    let counted: f64 = (1..=30).map(|r| num(&rows, r, 5)).sum();
    assert_eq!(counted as u64, messages);
}

#[test]
fn a_send_rate_schedules_exactly_rate_times_duration_messages_per_connection() {
    let setup = Setup::plain("rate.xlsx");
    let report = &setup.report;
    // 20 messages/s for 2 s: the schedule has exactly 40 send times before the deadline for every
    // connection (late sends are still sent), so the count does not depend on timing.
    let run = setup.run(
        &[
            "--connections",
            "10",
            "--duration",
            "2",
            "--rate",
            "20",
            "--message",
            "tick",
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["rate"], 20.0);
    assert_eq!(j["messages"], 400);
    assert_eq!(j["errors_total"], 0);
    assert!(
        j["corrected_response_ms"]["max"].as_f64().unwrap()
            >= j["response_ms"]["max"].as_f64().unwrap()
    );
    let rows = sheet(report, "Connections");
    for row in 1..=10 {
        assert_eq!(num(&rows, row, 5), 40.0, "row {row}");
    }
    let summary = sheet(report, "Summary");
    assert_eq!(text(&summary, 0, 0), "ssl-echo-client run");
    assert_eq!(summary_value(report, "send rate (/s per connection)"), 20.0);
}

#[test]
fn a_worker_process_that_dies_is_counted_not_fatal() {
    let setup = Setup::tls("lost-worker.xlsx");
    let server = setup.server();
    let client = setup.start(&[
        "--connections",
        "40",
        "--processes",
        "2",
        "--duration",
        "600",
        "--message",
        "ping",
    ]);
    assert!(
        wait_until(LIMIT, || server.stat("bytes_echoed") >= 4 * 200),
        "the server never echoed 200 messages"
    );
    let workers = client.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    // SAFETY: kill(2) on a worker process of the client we started.
    unsafe {
        libc::kill(workers[1] as i32, libc::SIGKILL);
    }
    // The other worker keeps going until told to stop (Ctrl-C to the parent alone).
    assert!(wait_until(LIMIT, || client.workers().len() == 1));
    client.signal(libc::SIGINT);
    let run = client.finish(LIMIT);
    assert_eq!(
        run.status.code(),
        Some(EXIT_TOO_MANY_ERRORS),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("worker process 1: exited with signal: 9"),
        "{}",
        run.stderr
    );
    let j = run.json();
    assert_eq!(j["connections"], 40);
    assert_eq!(j["errors"]["other"], 20, "{}", j["errors"]);
    assert_eq!(j["errors_total"], 20);
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(rows.height(), 41);
    for row in 1..=40 {
        let error = text(&rows, row, 12);
        if num(&rows, row, 1) == 1.0 {
            assert_eq!(
                error,
                "other during exchange: worker process ended without reporting this connection"
            );
        } else {
            assert_eq!(error, "", "row {row}");
            assert!(num(&rows, row, 5) > 0.0, "row {row} sent nothing");
        }
    }
}

#[test]
fn a_stalled_server_raises_the_corrected_percentiles_not_the_measured_ones() {
    let setup = Setup::plain("stall.xlsx");
    let server = setup.server();
    // 10 connections × 20 messages/s for 4 s: 80 send times per connection. Stopping the server
    // for STALL holds one message per connection for the whole stall (it shows in both maxima);
    // the ~20 messages per connection scheduled during the stall go out late, back to back, and
    // answer fast: measured from their send they look fine, from their intended send time they
    // waited up to STALL. A quarter of all messages is late, so the corrected p90 must rise.
    const STALL: Duration = Duration::from_secs(1);
    let client = setup.start(&[
        "--connections",
        "10",
        "--duration",
        "4",
        "--rate",
        "20",
        "--message",
        "tick",
    ]);
    assert!(
        wait_until(LIMIT, || server.stat("bytes_echoed") >= 4 * 100),
        "the server never echoed 100 messages"
    );
    let group = -(server.guard.pid() as i32);
    // SAFETY: kill(2) on the process group ChildGuard created for the server.
    unsafe { libc::kill(group, libc::SIGSTOP) };
    std::thread::sleep(STALL); // the stall itself, not a wait for a condition
                               // SAFETY: as above.
    unsafe { libc::kill(group, libc::SIGCONT) };
    let run = client.finish(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    assert_eq!(j["messages"], 800, "late sends are still sent");
    assert_eq!(j["errors_total"], 0);
    let stat = |which: &str, s: &str| j[which][s].as_f64().unwrap();
    let stall_ms = STALL.as_millis() as f64;
    // The message due just as the server stopped waited for all but one interval (50 ms).
    assert!(
        stat("corrected_response_ms", "max") >= stall_ms - 50.0,
        "{j}"
    );
    // The 8 latest of each connection's ~20 late messages were due more than 550 ms before
    // they were answered.
    let corrected_p90 = stat("corrected_response_ms", "p90");
    assert!(corrected_p90 >= 500.0, "corrected p90 {corrected_p90}: {j}");
    let measured_p90 = stat("response_ms", "p90");
    assert!(
        measured_p90 * 2.0 <= corrected_p90,
        "measured p90 {measured_p90} vs corrected {corrected_p90}"
    );
    for s in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            stat("corrected_response_ms", s) >= stat("response_ms", s),
            "{s}"
        );
    }
}
