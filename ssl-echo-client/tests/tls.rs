//! TLS under the user's control, against the real echo server: the version and suite asked for
//! are what the server counted, ALPN is negotiated, `--resume` resumes reconnects on one worker,
//! client certificates are accepted and refused, and `--churn` holds its rate.

mod common;

use std::time::Duration;

use common::*;
use testbed_dev::testing::wait_until;

const LIMIT: Duration = Duration::from_secs(120);

/// Waits until the server's stats file shows `field == want` (its stats are written every 0.2 s).
fn server_counts(setup: &Setup, field: &str, want: u64) {
    let server = setup.server();
    assert!(
        wait_until(Duration::from_secs(10), || server.stat(field) == want),
        "server {field} = {}, expected {want}",
        server.stat(field)
    );
}

#[test]
fn the_version_suite_and_alpn_asked_for_are_what_the_server_negotiated() {
    let setup = Setup::tls_with("v12.xlsx", &["--workers", "1", "--alpn", "http/1.1"]);
    let suite = "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256";
    let run = setup.run(
        &[
            "--connections",
            "20",
            "--count",
            "2",
            "--server-name",
            "localhost",
            "--tls-version",
            "1.2",
            "--ciphers",
            suite,
            "--alpn",
            "h2",
            "--alpn",
            "http/1.1",
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    // The server's own count says 1.2, not the client's opinion.
    server_counts(&setup, "tls12_handshakes", 20);
    assert_eq!(setup.server().stat("tls13_handshakes"), 0);
    let n = &run.json()["negotiated"];
    assert_eq!(n["handshakes"], 20, "{n}");
    assert_eq!(n["versions"]["TLSv1.2"], 20, "{n}");
    assert_eq!(n["suites"][suite], 20, "{n}");
    assert_eq!(n["alpn"]["http/1.1"], 20, "{n}");
    assert_eq!(n["resumed"], 0, "no --resume: every handshake is full");
    assert!(
        run.stderr.contains(&format!(
            "negotiated             TLSv1.2 ×20 · {suite} ×20 · ALPN http/1.1 ×20 · resumed 0 of 20"
        )),
        "{}",
        run.stderr
    );
    // Each connection's row says it too.
    let rows = sheet(&setup.report, "Connections");
    assert_eq!(text(&rows, 0, 16), "TLS version");
    for row in 1..=20 {
        assert_eq!(text(&rows, row, 16), "TLSv1.2");
        assert_eq!(text(&rows, row, 17), suite);
        assert_eq!(text(&rows, row, 18), "http/1.1");
    }

    let run = setup.run(
        &["--connections", "5", "--count", "1", "--tls-version", "1.3"],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    server_counts(&setup, "tls13_handshakes", 5);
    assert_eq!(run.json()["negotiated"]["versions"]["TLSv1.3"], 5);
}

#[test]
fn an_unknown_cipher_suite_is_refused_with_the_valid_names() {
    let setup = Setup::tls("bad-suite.xlsx");
    let run = setup.run(&["--connections", "1", "--ciphers", "RC4-MD5"], LIMIT);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("--ciphers: unknown cipher suite \"RC4-MD5\"; valid names: TLS13_"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"),
        "{}",
        run.stderr
    );
    // Nothing connected: the server counted only the harness's readiness probe.
    server_counts(&setup, "connections_total", 1);
    assert_eq!(setup.server().stat("handshakes_total"), 0);
}

#[test]
fn resume_resumes_at_least_90_percent_of_reconnects_on_one_worker() {
    let setup = Setup::tls_with("resume.xlsx", &["--workers", "1"]);
    // 120 connections one after another (40/s), each one message: every one after the first has
    // a session from an earlier one to offer.
    let run = setup.run(
        &[
            "--churn",
            "40",
            "--duration",
            "3",
            "--lifetime",
            "1msg",
            "--resume",
        ],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    let n = &j["negotiated"];
    let handshakes = n["handshakes"].as_u64().unwrap();
    let resumed = n["resumed"].as_u64().unwrap();
    assert_eq!(handshakes, 120, "{n}");
    let reconnects = handshakes - 1;
    assert!(
        resumed * 10 >= reconnects * 9,
        "resumed {resumed} of {reconnects} reconnects: {n}"
    );
    // The server agrees; and it ran the one worker asked for (its default --max-connections no
    // longer adds a second one, whose separate session cache would break resumption).
    server_counts(&setup, "handshakes_total", 120);
    assert_eq!(setup.server().stat("workers"), 1);
    assert_eq!(setup.server().stat("resumed_handshakes"), resumed);

    // Without --resume nothing resumes.
    let run = setup.run(&["--connections", "10", "--count", "1"], LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.json()["negotiated"]["resumed"], 0);
}

#[test]
fn client_certificates_are_accepted_and_refused() {
    let certs = certs();
    let work = tempfile::tempdir().unwrap();
    let ca = certs.paths.ca_cert.display().to_string();
    let server = Server::start_with(Some(&certs), work.path(), &["--client-ca", &ca]);
    let base = |report: &str| -> Vec<String> {
        [
            "--port",
            &server.addr.port().to_string(),
            "--ca",
            &ca,
            "--json",
            "--connections",
            "4",
            "--count",
            "2",
            "--report",
            &work.path().join(report).display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run_with = |report: &str, extra: &[&str]| {
        let mut args = base(report);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_client(&args, LIMIT)
    };

    let cert = certs.paths.client_cert.display().to_string();
    let key = certs.paths.client_key.display().to_string();
    let ok = run_with("ok.xlsx", &["--cert", &cert, "--key", &key]);
    assert!(ok.status.success(), "{}", ok.stderr);
    assert_eq!(ok.json()["messages"], 8);

    // No certificate, and one from a CA the server does not trust: refused by the server, which
    // counts and logs them. (In TLS 1.3 the client learns it on its first read.)
    let stranger = certs::write_throwaway(&work.path().join("stranger"), &[]).unwrap();
    let (scert, skey) = (
        stranger.client_cert.display().to_string(),
        stranger.client_key.display().to_string(),
    );
    for (report, extra) in [
        ("none.xlsx", vec![]),
        ("stranger.xlsx", vec!["--cert", &scert, "--key", &skey]),
    ] {
        let run = run_with(report, &extra);
        assert_eq!(
            run.status.code(),
            Some(EXIT_TOO_MANY_ERRORS),
            "{}",
            run.stderr
        );
        let j = run.json();
        assert_eq!(j["errors_total"], 4, "{j}");
        assert_eq!(j["messages"], 0, "{j}");
    }
    assert!(
        wait_until(Duration::from_secs(10), || server
            .stat("client_cert_refused")
            == 8),
        "refused: {}",
        server.stat("client_cert_refused")
    );
    assert_eq!(server.stat("handshakes_total"), 4);
    let log = server.guard.output();
    assert!(
        log.contains("client certificate refused from 127.0.0.1:"),
        "{log}"
    );
}

#[test]
fn churn_holds_its_rate_against_the_echo_server() {
    let setup = Setup::tls_with("churn.xlsx", &["--workers", "1"]);
    let run = setup.run(
        &["--churn", "50", "--duration", "4", "--lifetime", "200ms"],
        LIMIT,
    );
    assert!(run.status.success(), "{}", run.stderr);
    let j = run.json();
    let c = &j["churn"];
    assert_eq!(c["asked_per_sec"], 50.0, "{c}");
    assert_eq!(c["opened"], 200, "{c}");
    assert_eq!(c["established"], 200, "{c}");
    assert_eq!(c["failed"], 0, "{c}");
    // The tolerance the docs state: within 10 % of the asked rate.
    let pct = c["achieved_pct"].as_f64().unwrap();
    assert!(
        (90.0..=110.0).contains(&pct),
        "achieved {pct} % of asked: {c}"
    );
    let p50 = c["handshake_ms"]["p50"].as_f64().unwrap();
    let p99 = c["handshake_ms"]["p99"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p99, "{c}");
    // Each connection lived its 200 ms: it sent messages for that long, then closed.
    assert!(j["messages"].as_u64().unwrap() >= 200, "{j}");
    // (connections_total also counts the harness's readiness probe, which makes no handshake.)
    server_counts(&setup, "handshakes_total", 200);
    server_counts(&setup, "connections_now", 0);
    assert!(
        run.stderr
            .contains("churn                  asked 50.0/s for 4.0 s: 200 opened, 200 up"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            "churn: opening 200 connections at 50.0/s over 4.0 s (open loop, no barrier)"
        ),
        "{}",
        run.stderr
    );
    let tls = sheet(&setup.report, "TLS");
    let labels: Vec<String> = (0..tls.height()).map(|r| text(&tls, r, 0)).collect();
    assert!(labels.iter().any(|l| l == "achieved (/s)"), "{labels:?}");
}
