//! Pools through the real forwarder: strict round robin across workers, fall-over past a dead
//! backend, and failing open when every backend is down.

mod common;

use std::time::{Duration, Instant};

use common::*;
use testbed_dev::testing::free_port;

fn round_robin(backends: usize, workers: usize) {
    let servers: Vec<Backend> = (0..backends)
        .map(|i| Backend::echo(Some(&format!("B{i}"))))
        .collect();
    let port = free_port();
    let rules: String = servers
        .iter()
        .enumerate()
        .map(|(i, b)| format!("b{i},{port},127.0.0.1,{}\n", b.port))
        .collect();
    let _fwd = Forwarder::builder()
        .rules(&rules)
        .workers(workers)
        .listening(&[port])
        .start();
    // Readiness probes above took some turns of the counter: align on the next B0.
    let mut tag = read_tag(port, 2);
    while tag != format!("B{}", backends - 1) {
        tag = read_tag(port, 2);
    }
    for round in 0..4 {
        // k consecutive connections land on each of the k backends once, in order, whichever
        // worker accepted them (new connections spread over workers by SO_REUSEPORT).
        let got: Vec<String> = (0..backends).map(|_| read_tag(port, 2)).collect();
        let want: Vec<String> = (0..backends).map(|i| format!("B{i}")).collect();
        assert_eq!(got, want, "round {round}");
    }
}

#[test]
fn strict_round_robin_two_backends_two_workers() {
    round_robin(2, 2);
}

#[test]
fn strict_round_robin_three_backends_three_workers() {
    round_robin(3, 3);
}

#[test]
fn dead_backend_is_skipped_and_marked_down() {
    let live = Backend::echo(Some("LV"));
    let dead = dead_port();
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "dead,{port},127.0.0.1,{dead}\nlive,{port},127.0.0.1,{}\n",
            live.port
        ))
        .workers(2)
        .listening(&[port])
        .start();
    for _ in 0..10 {
        assert_eq!(
            read_tag(port, 2),
            "LV",
            "every connection reaches the live backend"
        );
    }
    assert!(
        fwd.process.wait_for_output("backend down", WAIT),
        "the dead backend was reported down:\n{}",
        fwd.process.output()
    );
}

#[test]
fn connect_timeout_falls_over_to_the_next_backend() {
    // A listener whose accept queue is full leaves new SYNs unanswered: a backend that times out.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bh_port = blackhole.local_addr().unwrap().port();
    let sock = socket2::SockRef::from(&blackhole);
    sock.listen(0).unwrap();
    // Fill the queue so later SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) =
            std::net::TcpStream::connect_timeout(&local(bh_port), Duration::from_millis(200))
        {
            fillers.push(s);
        }
    }
    let live = Backend::echo(Some("OK"));
    let port = free_port();
    let _fwd = Forwarder::builder()
        .rules(&format!(
            "hole,{port},127.0.0.1,{bh_port}\nlive,{port},127.0.0.1,{}\n",
            live.port
        ))
        .workers(1)
        .args(["--connect-timeout-ms", "300"])
        .listening(&[port])
        .start();
    let started = Instant::now();
    for _ in 0..4 {
        assert_eq!(read_tag(port, 2), "OK");
    }
    assert!(started.elapsed() < WAIT);
}

#[test]
fn all_backends_down_still_tries_them() {
    let port = free_port();
    let dead1 = dead_port();
    let dead2 = dead_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "d1,{port},127.0.0.1,{dead1}\nd2,{port},127.0.0.1,{dead2}\n"
        ))
        .workers(1)
        .listening(&[port])
        .start();
    // Both go down, then one comes back: the pool must find it although both are "down".
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(local(port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut s, &mut buf); // closed: no backend
    }
    assert!(fwd.process.wait_for_output("backend down", WAIT));
    let revived = std::net::TcpListener::bind(("127.0.0.1", dead2)).unwrap();
    let mut s = std::net::TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let (mut b, _) = revived.accept().unwrap();
    std::io::Write::write_all(&mut b, b"up").unwrap();
    let mut buf = [0u8; 2];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    assert_eq!(&buf, b"up");
}

#[test]
fn active_health_checks_bring_a_backend_back_without_traffic() {
    let port = free_port();
    let down = dead_port();
    let fwd = Forwarder::builder()
        .rules(&format!("later,{port},127.0.0.1,{down}\n"))
        .workers(1)
        .args(["--health-interval-s", "1"])
        .listening(&[port])
        .start();
    assert!(
        fwd.process
            .wait_for_output("backend down (health check)", WAIT),
        "{}",
        fwd.process.output()
    );
    let _revived = std::net::TcpListener::bind(("127.0.0.1", down)).unwrap();
    assert!(
        fwd.process
            .wait_for_output("backend up (health check)", WAIT),
        "{}",
        fwd.process.output()
    );
}
