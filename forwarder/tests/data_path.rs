//! Bytes through the real forwarder: exact in both directions at once, half-close passed on,
//! resets passed on, backpressure against a stalled reader, thousands of connections.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use testbed_dev::testing::{free_port, wait_until};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// 32 MiB each way at once through the forwarder started with `extra`; returns the data path
/// the forwarder says it used, after checking the splice counters agree with it.
fn transfer_exact(extra: &[&str]) -> String {
    let backend = Backend::echo(None);
    let port = free_port();
    let fwd = Forwarder::builder()
        .forward("echo", port, backend.port)
        .workers(2)
        .web("127.0.0.1")
        .args(extra)
        .start();
    let web = fwd.web();
    const LEN: usize = 32 << 20;
    let data = random_bytes(LEN, 7);
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    // Write and read at once: both directions carry 32 MiB simultaneously.
    let send = std::thread::spawn(move || {
        for chunk in sent.chunks(100_003) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(LEN);
    client.read_to_end(&mut back).unwrap();
    send.join().unwrap();
    assert_eq!(back.len(), LEN, "bytes echoed");
    assert!(back == data, "echoed bytes differ from the sent bytes");
    // Which path the bytes took, as /metrics counts it: bulk goes through splice unless it is off.
    // (A direction's counters are added right after the pump that delivered its FIN.)
    let mut metrics = String::new();
    let counted = wait_until(WAIT, || {
        metrics = http_get(web, "/metrics");
        metrics.contains(&format!("forwarder_backend_bytes_down_total{{listen=\"0.0.0.0:{port}\",name=\"echo\",backend=\"127.0.0.1:{}\"}} {LEN}\n", backend.port))
    });
    assert!(counted, "bytes down never reached {LEN}:\n{metrics}");
    let series = |name: &str| {
        metric(
            &metrics,
            &format!(
                "{name}{{listen=\"0.0.0.0:{port}\",name=\"echo\",backend=\"127.0.0.1:{}\"}} ",
                backend.port
            ),
        )
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert_eq!(series("forwarder_backend_bytes_up_total"), LEN as u64);
    assert_eq!(series("forwarder_backend_bytes_down_total"), LEN as u64);
    let (up, down) = (
        series("forwarder_backend_spliced_bytes_up_total"),
        series("forwarder_backend_spliced_bytes_down_total"),
    );
    let in_kernel = series("forwarder_backend_sockmap_connections_total");
    let path = data_path_in_force(&metrics);
    match path.as_str() {
        "sockmap" => {
            // The kernel moved every byte: nothing went through our pipes, and the counts above
            // came from the sockets' TCP_INFO.
            assert_eq!((up, down), (0, 0), "sockmap splices nothing");
            assert_eq!(in_kernel, 1, "the connection was handed to the kernel");
        }
        "copy" => assert_eq!((up, down), (0, 0), "copy ({extra:?}) copies every byte"),
        "splice" => {
            // The first reads are copied until they fill whole buffers; the bulk is spliced.
            assert!(up > LEN as u64 * 9 / 10, "spliced up {up} of {LEN}");
            assert!(down > LEN as u64 * 9 / 10, "spliced down {down} of {LEN}");
        }
        other => panic!("data path {other:?} in force:\n{metrics}"),
    }
    drop(fwd);
    path
}

/// The `path` label of `forwarder_data_path_info` (what the workers do).
fn data_path_in_force(metrics: &str) -> String {
    let line = metrics
        .lines()
        .find(|l| l.starts_with("forwarder_data_path_info{"))
        .unwrap_or_else(|| panic!("forwarder_data_path_info missing:\n{metrics}"));
    let path = line
        .split_once("path=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .unwrap_or_else(|| panic!("no path label: {line}"))
        .0;
    path.to_string()
}

/// The three values a user picks between; every data-path test runs with each.
const PATHS: [&str; 3] = ["copy", "splice", "auto"];

#[test]
fn thirty_two_mib_both_ways_exact_with_splice() {
    assert_eq!(transfer_exact(&["--data-path", "splice"]), "splice");
}

#[test]
fn thirty_two_mib_both_ways_exact_with_copying() {
    assert_eq!(transfer_exact(&["--data-path", "copy"]), "copy");
}

#[test]
fn thirty_two_mib_both_ways_exact_with_no_splice_which_is_copy() {
    assert_eq!(transfer_exact(&["--no-splice"]), "copy");
}

#[test]
fn thirty_two_mib_both_ways_exact_with_auto() {
    // Whichever auto chose, the counters agree with it (checked inside).
    let path = transfer_exact(&["--data-path", "auto"]);
    assert!(path == "copy" || path == "splice", "auto chose {path}");
}

#[test]
fn thirty_two_mib_both_ways_exact_in_the_kernel() {
    if !common::privileged("sockmap") {
        return;
    }
    assert_eq!(transfer_exact(&["--data-path", "sockmap"]), "sockmap");
}

#[test]
fn auto_is_the_default_and_says_what_it_chose_and_why() {
    let backend = Backend::echo(None);
    let port = free_port();
    let fwd = Forwarder::builder()
        .forward("echo", port, backend.port)
        .workers(1)
        .web("127.0.0.1")
        .start();
    let web = fwd.web();
    // The start-up line: the path and the calibration's figures.
    let out = fwd.process.output();
    let line = out
        .lines()
        .find(|l| l.contains("data path: "))
        .unwrap_or_else(|| panic!("no data path line at start:\n{out}"));
    let chosen = if line.contains("data path: copy (auto: calibrated in ") {
        "copy"
    } else if line.contains("data path: splice (auto: calibrated in ") {
        "splice"
    } else {
        panic!("auto did not say what it chose: {line}")
    };
    assert!(
        line.contains(" ms/GB") && line.contains("copy ") && line.contains("splice "),
        "{line}"
    );
    // The API and the metrics say the same.
    let mut stats = String::new();
    assert!(
        wait_until(WAIT, || {
            stats = http_get(web, "/api/stats");
            !stats.is_empty()
        }),
        "no /api/stats"
    );
    let json: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let dp = &json["data_path"];
    assert_eq!(dp["asked"], "auto", "{dp}");
    assert_eq!(dp["path"], chosen, "{dp}");
    let copy = dp["copy_ms_per_gb"].as_f64().expect("copy figure");
    let splice = dp["splice_ms_per_gb"].as_f64().expect("splice figure");
    assert!(copy > 0.0 && splice > 0.0, "{dp}");
    // The rule: splice only when at least 5 % cheaper.
    assert_eq!(chosen == "splice", splice < copy * 0.95, "{dp}");
    let metrics = http_get(web, "/metrics");
    assert!(
        metrics.contains(&format!(
            "forwarder_data_path_info{{path=\"{chosen}\",asked=\"auto\"}} 1\n"
        )),
        "{metrics}"
    );
    for p in ["copy", "splice"] {
        let series = format!("forwarder_data_path_calibration_cpu_ms_per_gb{{path=\"{p}\"}} ");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
}

#[test]
fn no_splice_is_an_alias_of_copy_and_contradictions_are_refused() {
    let backend = Backend::echo(None);
    let port = free_port();
    let fwd = Forwarder::builder()
        .forward("echo", port, backend.port)
        .workers(1)
        .web("127.0.0.1")
        .args(["--no-splice"])
        .start();
    let web = fwd.web();
    assert!(fwd.process.output().contains("data path: copy ("));
    let mut metrics = String::new();
    assert!(wait_until(WAIT, || {
        metrics = http_get(web, "/metrics");
        !metrics.is_empty()
    }));
    assert!(
        metrics.contains("forwarder_data_path_info{path=\"copy\",asked=\"copy\"} 1\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("forwarder_data_path_calibration_cpu_ms_per_gb"),
        "no calibration when the path is given"
    );
    drop(fwd);
    // Saying both ways round is accepted; contradicting is refused, naming both flags.
    for (extra, ok) in [
        (&["--no-splice", "--data-path", "copy"][..], true),
        (&["--no-splice", "--data-path", "splice"][..], false),
        (&["--no-splice", "--data-path", "auto"][..], false),
        (&["--data-path", "fast"][..], false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("r.csv");
        std::fs::write(&rules, "").unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_forwarder"))
            .arg("--rules")
            .arg(&rules)
            .args(["--no-web", "--check"])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{extra:?} refused: {err}");
            continue;
        }
        assert!(!out.status.success(), "{extra:?} accepted: {err}");
        if extra[0] == "--no-splice" {
            assert!(
                err.contains("--no-splice means --data-path copy; it contradicts --data-path"),
                "{extra:?}: {err}"
            );
        } else {
            assert!(err.contains("fast"), "{extra:?}: {err}");
        }
    }
}

#[test]
fn half_close_is_passed_on_while_the_other_direction_flows() {
    for path in PATHS {
        half_close(&["--data-path", path]);
    }
}

fn half_close(extra: &[&str]) {
    // Backend: reads the request to EOF, then answers with 1 MiB and closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = listener.local_addr().unwrap().port();
    let answer = random_bytes(1 << 20, 3);
    let reply = answer.clone();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        s.read_to_end(&mut request).unwrap(); // returns only once our FIN arrived
        s.write_all(&reply).unwrap();
        request
    });
    let port = free_port();
    let _fwd = Forwarder::builder()
        .rules(&format!("hc,{port},127.0.0.1,{bport}\n"))
        .workers(1)
        .args(extra)
        .listening(&[port])
        .start();
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"request body").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(server.join().unwrap(), b"request body");
    assert!(
        got == answer,
        "answer after half-close arrived intact ({extra:?})"
    );

    // The other way round: the backend closes its side first, the client keeps sending.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport2 = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"bye").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest
    });
    let port2 = free_port();
    let _fwd2 = Forwarder::builder()
        .rules(&format!("hc2,{port2},127.0.0.1,{bport2}\n"))
        .workers(1)
        .args(extra)
        .listening(&[port2])
        .start();
    let mut c = TcpStream::connect(local(port2)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap(); // the backend's FIN reached us...
    assert_eq!(got, b"bye");
    let late = random_bytes(300_000, 9);
    c.write_all(&late).unwrap(); // ...and we can still send
    c.shutdown(Shutdown::Write).unwrap();
    assert!(server.join().unwrap() == late, "{extra:?}");
}

#[test]
fn backend_reset_is_passed_to_the_client() {
    for path in PATHS {
        backend_reset(&["--data-path", path]);
    }
}

fn backend_reset(extra: &[&str]) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        (&s).read_exact(&mut buf).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s); // RST
    });
    let port = free_port();
    let _fwd = Forwarder::builder()
        .rules(&format!("rst,{port},127.0.0.1,{bport}\n"))
        .workers(1)
        .args(extra)
        .listening(&[port])
        .start();
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    let err = c.read(&mut buf).expect_err("a reset, not an orderly close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{extra:?}");
}

#[test]
fn stalled_backend_keeps_memory_bounded_and_loses_nothing() {
    stalled_backend(&["--data-path", "splice"]);
}

#[test]
fn stalled_backend_keeps_memory_bounded_and_loses_nothing_when_copying() {
    stalled_backend(&["--data-path", "copy"]);
}

#[test]
fn stalled_backend_keeps_memory_bounded_and_loses_nothing_with_auto() {
    stalled_backend(&["--data-path", "auto"]);
}

fn stalled_backend(extra: &[&str]) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = listener.local_addr().unwrap().port();
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!("slow,{port},127.0.0.1,{bport}\n"))
        .workers(1)
        .args(extra)
        .listening(&[port])
        .start();
    let baseline = fwd.rss_kib();
    const LEN: usize = 64 << 20;
    let data = random_bytes(LEN, 11);
    let sent = data.clone();
    let mut c = TcpStream::connect(local(port)).unwrap();
    let (mut backend, _) = listener.accept().unwrap();
    let writer = std::thread::spawn(move || {
        c.write_all(&sent).unwrap(); // blocks while the backend does not read
        c.shutdown(Shutdown::Write).unwrap();
        c
    });
    // Let the client push until every buffer on the way is full.
    std::thread::sleep(Duration::from_millis(1500));
    let stalled = fwd.rss_kib();
    assert!(
        stalled < baseline + 8 * 1024,
        "forwarder RSS grew from {baseline} KiB to {stalled} KiB behind a stalled reader ({extra:?})"
    );
    backend.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::with_capacity(LEN);
    backend.read_to_end(&mut got).unwrap();
    let _client = writer.join().unwrap();
    assert_eq!(got.len(), LEN);
    assert!(got == data, "bytes lost or reordered behind backpressure");
}

#[test]
fn five_thousand_concurrent_connections() {
    testbed::fdlimit::raise_nofile().unwrap();
    let backend = Backend::echo(None);
    let port = free_port();
    let fwd = Forwarder::builder()
        .forward("many", port, backend.port)
        .workers(2)
        .start();
    const N: usize = 5000;
    let conns = all_open_each_echoes_its_own(port, N, WAIT);
    assert!(wait_until(WAIT, || backend
        .accepted
        .load(std::sync::atomic::Ordering::SeqCst)
        == N));
    drop(conns);
    drop(fwd);
}

/// CPU seconds (user + system) used so far by a process.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the command name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
fn a_full_worker_waits_without_spinning_and_resumes() {
    // Open-file limit 520 leaves room for 32 connections in one worker (2 sockets each, after
    // the descriptors kept for listeners and pipes).
    let backend = Backend::echo(None);
    let port = free_port();
    let forwarder = Forwarder::builder()
        .rules(&format!("full,{port},127.0.0.1,{}\n", backend.port))
        .open_files(520)
        .spawn();
    let fwd = &forwarder.process;
    assert!(wait_until(WAIT, || is_listening(port)), "{}", fwd.output());
    assert!(
        fwd.output()
            .contains("capacity ≈ 32 connections with 1 workers"),
        "{}",
        fwd.output()
    );
    let mut held: Vec<TcpStream> = (0..40)
        .map(|_| {
            let s = TcpStream::connect(local(port)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s
        })
        .collect();
    for s in held.iter_mut().take(32) {
        assert_eq!(round_trip(s, b"ping"), b"ping");
    }
    // The 8 beyond capacity wait in the kernel's queue; the worker must not spin meanwhile.
    let worker = workers_of(fwd.pid())[0];
    let before = cpu_seconds(worker);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(worker) - before;
    assert!(used < 0.3, "worker used {used} s of CPU while full");
    // Closing some lets the waiting ones in.
    held.drain(..8);
    for s in held.iter_mut() {
        assert_eq!(round_trip(s, b"pong"), b"pong");
    }
}
