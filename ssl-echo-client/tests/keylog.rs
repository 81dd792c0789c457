//! `SSLKEYLOGFILE`, as browsers do it: tshark captures a run on loopback, and with the key log
//! the capture shows every message in clear; without it, none.
//!
//! Needs tshark. `scripts/test.d/keylog.sh` installs it and runs this test with
//! `SSL_ECHO_CLIENT_KEYLOG_REQUIRED=1` under the lab lock; elsewhere, without tshark, the test says
//! loudly that it skipped.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use testbed_dev::testing::{wait_until, ChildGuard};

const LIMIT: Duration = Duration::from_secs(120);

fn tshark_present() -> bool {
    Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `data.data` fields (hex) of every frame tshark can show as data, with `keylog` if given.
fn decoded_payloads(
    capture: &std::path::Path,
    port: u16,
    keylog: Option<&std::path::Path>,
) -> Vec<String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(capture)
        .args(["-d", &format!("tcp.port=={port},tls")]);
    if let Some(k) = keylog {
        cmd.arg("-o")
            .arg(format!("tls.keylog_file:{}", k.display()));
    }
    let out = cmd
        .args(["-Y", "data", "-T", "fields", "-e", "data.data"])
        .output()
        .expect("running tshark -r");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_key_log_decrypts_a_capture_with_tshark() {
    if !tshark_present() {
        assert!(
            std::env::var_os("SSL_ECHO_CLIENT_KEYLOG_REQUIRED").is_none(),
            "tshark is required here (scripts/test.d/keylog.sh installs it)"
        );
        eprintln!(
            "\n*** SKIPPED the_key_log_decrypts_a_capture_with_tshark: tshark is not installed \
             (scripts/test.d/keylog.sh installs it and runs this test) ***\n"
        );
        return;
    }
    let setup = Setup::tls_with("keylog.xlsx", &["--workers", "1"]);
    let port = setup.port;
    let capture = setup.work.path().join("run.pcapng");
    let keylog = setup.work.path().join("keys.log");
    let mut cmd = Command::new("tshark");
    // -P -l: also print each packet, line by line, so the test can see the capture is live.
    cmd.args([
        "-i",
        "lo",
        "-f",
        &format!("tcp port {port}"),
        "-P",
        "-l",
        "-w",
    ])
    .arg(&capture);
    let mut tshark = ChildGuard::spawn(cmd);
    // "Capturing on" comes before the filter is live: poke the port until a packet shows.
    let live = wait_until(Duration::from_secs(60), || {
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
        tshark.output().lines().any(|l| l.contains("[SYN]"))
    });
    assert!(live, "tshark never showed a packet:\n{}", tshark.output());

    let message = "keylog-secret-0123456789";
    let mut args = setup.args(&["--connections", "2", "--count", "2", "--message", message]);
    args.retain(|a| a != "--json");
    let mut client = Command::new(CLIENT);
    client.args(&args).env("SSLKEYLOGFILE", &keylog);
    let run = ClientProcess::spawn(client).finish(LIMIT);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains("SSLKEYLOGFILE=")
            && run
                .stderr
                .contains("writing every connection's TLS secrets"),
        "{}",
        run.stderr
    );
    // Two connections: each has its client and server traffic secrets (TLS 1.3).
    let keys = std::fs::read_to_string(&keylog).expect("the key log was written");
    assert_eq!(
        keys.lines()
            .filter(|l| l.starts_with("CLIENT_TRAFFIC_SECRET_0 "))
            .count(),
        2,
        "{keys}"
    );

    // tshark prints (and writes) packets in order, a little behind the wire: once a connection
    // made after the run shows, every packet of the run is in. Then it flushes when interrupted.
    let syns = |t: &ChildGuard| t.output().lines().filter(|l| l.contains("[SYN]")).count();
    let before = syns(&tshark);
    let caught_up = wait_until(Duration::from_secs(60), || {
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
        syns(&tshark) > before
    });
    assert!(
        caught_up,
        "tshark never showed the connection after the run"
    );
    tshark.signal(libc::SIGINT);
    assert!(
        tshark.wait_exit(Duration::from_secs(30)).is_some(),
        "tshark did not stop"
    );

    let hex: String = message.bytes().map(|b| format!("{b:02x}")).collect();
    let clear = decoded_payloads(&capture, port, Some(&keylog));
    // 2 connections × 2 messages, each seen going out and coming back.
    assert_eq!(clear.len(), 8, "{clear:?}");
    assert!(clear.iter().all(|d| d == &hex), "{clear:?}");
    let opaque = decoded_payloads(&capture, port, None);
    assert!(
        opaque.is_empty(),
        "readable without the key log: {opaque:?}"
    );
}
