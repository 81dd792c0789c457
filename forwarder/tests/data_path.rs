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

fn transfer_exact(extra: &[&str]) {
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
    if extra.contains(&"sockmap") {
        // The kernel moved every byte: nothing went through our pipes, and the counts above
        // came from the sockets' TCP_INFO.
        assert_eq!((up, down), (0, 0), "sockmap splices nothing");
        assert_eq!(in_kernel, 1, "the connection was handed to the kernel");
    } else if extra.contains(&"--no-splice") {
        assert_eq!((up, down), (0, 0), "--no-splice copies every byte");
    } else {
        // The first reads are copied until they fill whole buffers; the bulk is spliced.
        assert!(up > LEN as u64 * 9 / 10, "spliced up {up} of {LEN}");
        assert!(down > LEN as u64 * 9 / 10, "spliced down {down} of {LEN}");
    }
    drop(fwd);
}

#[test]
fn thirty_two_mib_both_ways_exact_with_splice() {
    transfer_exact(&[]);
}

#[test]
fn thirty_two_mib_both_ways_exact_with_copying() {
    transfer_exact(&["--no-splice"]);
}

#[test]
fn thirty_two_mib_both_ways_exact_in_the_kernel() {
    if !common::privileged("sockmap") {
        return;
    }
    transfer_exact(&["--data-path", "sockmap"]);
}

#[test]
fn half_close_is_passed_on_while_the_other_direction_flows() {
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
        .listening(&[port])
        .start();
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"request body").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(server.join().unwrap(), b"request body");
    assert!(got == answer, "answer after half-close arrived intact");

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
    assert!(server.join().unwrap() == late);
}

#[test]
fn backend_reset_is_passed_to_the_client() {
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
        .listening(&[port])
        .start();
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    let err = c.read(&mut buf).expect_err("a reset, not an orderly close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn stalled_backend_keeps_memory_bounded_and_loses_nothing() {
    stalled_backend(&[]);
}

#[test]
fn stalled_backend_keeps_memory_bounded_and_loses_nothing_when_copying() {
    stalled_backend(&["--no-splice"]);
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
        "forwarder RSS grew from {baseline} KiB to {stalled} KiB behind a stalled reader"
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
