//! Bandwidth limits with the real binary on loopback: each rate measured at the backend over a
//! steady window lands within 5 % of the limit — per connection, per client address (two
//! addresses get one limit each, eight connections of one address share one), for the pool over
//! three workers, after a live edit on a running transfer; UDP over the limit is dropped and
//! counted. The figures measured are printed.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{metric, Forwarder, WAIT};
use testbed_dev::testing::{free_port, wait_until};

/// A backend that reads and counts every byte, in all and per client address.
struct Sink {
    port: u16,
    total: Arc<AtomicU64>,
    by_ip: Arc<Mutex<HashMap<IpAddr, u64>>>,
}

impl Sink {
    fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let total = Arc::new(AtomicU64::new(0));
        let by_ip: Arc<Mutex<HashMap<IpAddr, u64>>> = Arc::default();
        let (t, m) = (Arc::clone(&total), Arc::clone(&by_ip));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let (t, m) = (Arc::clone(&t), Arc::clone(&m));
                std::thread::spawn(move || {
                    // The first line names the client address the test sent from.
                    let mut ip = Vec::new();
                    let mut byte = [0u8; 1];
                    while s.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
                        ip.push(byte[0]);
                    }
                    let ip: IpAddr = String::from_utf8_lossy(&ip).parse().unwrap();
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        t.fetch_add(n as u64, Relaxed);
                        *m.lock().unwrap().entry(ip).or_default() += n as u64;
                    }
                });
            }
        });
        Sink { port, total, by_ip }
    }

    fn from(&self, ip: &str) -> u64 {
        let ip: IpAddr = ip.parse().unwrap();
        self.by_ip.lock().unwrap().get(&ip).copied().unwrap_or(0)
    }
}

/// Connections that write as fast as they can until dropped (bounded: they stop at the
/// deadline in any case).
struct Senders {
    stop: Arc<AtomicBool>,
}

impl Senders {
    fn start(to: u16, from: &str, n: usize, max: Duration) -> Senders {
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..n {
            let stop = Arc::clone(&stop);
            let from: IpAddr = from.parse().unwrap();
            std::thread::spawn(move || {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
                socket
                    .connect(&SocketAddr::from(([127, 0, 0, 1], to)).into())
                    .unwrap();
                let mut s: TcpStream = socket.into();
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                s.write_all(format!("{from}\n").as_bytes()).unwrap();
                let chunk = vec![7u8; 64 * 1024];
                let end = Instant::now() + max;
                while !stop.load(Relaxed) && Instant::now() < end {
                    match s.write(&chunk) {
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            });
        }
        Senders { stop }
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// One figure to measure: what it is, its limit (bits per second), and the byte count it reads.
type Figure<'a> = (&'a str, f64, &'a dyn Fn() -> u64);

/// Measures each figure's rate over windows of [`WINDOW`] after `warmup` (the first burst and
/// TCP's slow start are not the steady rate), and prints them. No window may pass more than 5 %
/// over a limit; one of at most [`WINDOWS`] must land every figure within 5 % of its limit (on a
/// shared machine a starved forwarder falls short of a window; it never exceeds one).
fn assert_near(figures: &[Figure], warmup: Duration) {
    std::thread::sleep(warmup); // measuring a rate needs time to pass; not synchronisation
    let mut last = Vec::new();
    for _ in 0..WINDOWS {
        let before: Vec<u64> = figures.iter().map(|f| f.2()).collect();
        let t0 = Instant::now();
        std::thread::sleep(WINDOW);
        let secs = t0.elapsed().as_secs_f64();
        last.clear();
        for ((what, limit, count), b) in figures.iter().zip(before) {
            let got = (count() - b) as f64 * 8.0 / secs;
            let ratio = got / limit;
            eprintln!(
                "{what}: {:.2} Mbit/s against a limit of {:.2} ({ratio:.3})",
                got / 1e6,
                limit / 1e6
            );
            assert!(
                ratio <= 1.05,
                "{what}: {:.2} Mbit/s is more than 5 % over {:.2}",
                got / 1e6,
                limit / 1e6
            );
            last.push(ratio);
        }
        if last.iter().all(|r| *r >= 0.95) {
            return;
        }
    }
    panic!("no window of {WINDOWS} had every figure within 5 % of its limit: last {last:?}");
}

const WINDOWS: usize = 3;
const WARMUP: Duration = Duration::from_millis(700);
const WINDOW: Duration = Duration::from_secs(2);
const MAX: Duration = Duration::from_secs(30);

#[test]
fn a_connection_limit_holds_for_one_and_for_each_of_eight() {
    let _one = one_at_a_time();
    let sink = Sink::start();
    let p = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "lim,{p},127.0.0.1,{},conn_rate_up=24m\n",
            sink.port
        ))
        .workers(1)
        .listening(&[p])
        .start();
    let one = Senders::start(p, "127.0.0.1", 1, MAX);
    let total = || sink.total.load(Relaxed);
    assert_near(
        &[("one connection, conn_rate_up=24m", 24e6, &total)],
        WARMUP,
    );
    drop(one);
    // The stopped sender's bytes still queued drain at the limit before the next measure.
    let eight = Senders::start(p, "127.0.0.2", 8, MAX);
    let eight_of = || sink.from("127.0.0.2");
    assert_near(
        &[(
            "eight connections, conn_rate_up=24m each",
            8.0 * 24e6,
            &eight_of,
        )],
        WARMUP * 2,
    );
    drop(eight);
    drop(fwd);
}

/// Rates are measured one test at a time: tests in parallel would share two cores and measure
/// the machine, not the limit.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn each_client_address_gets_its_own_ip_rate_shared_by_its_connections() {
    let _one = one_at_a_time();
    let sink = Sink::start();
    let p = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!("lim,{p},127.0.0.1,{},ip_rate_up=30m\n", sink.port))
        .workers(2)
        .web("127.0.0.1")
        .listening(&[p])
        .start();
    let _a = Senders::start(p, "127.0.0.3", 8, MAX);
    let _b = Senders::start(p, "127.0.0.4", 1, MAX);
    let (a, b) = (|| sink.from("127.0.0.3"), || sink.from("127.0.0.4"));
    assert_near(
        &[
            ("eight connections of 127.0.0.3 over two workers", 30e6, &a),
            ("one connection of 127.0.0.4", 30e6, &b),
        ],
        WARMUP,
    );
    let metrics = fwd.text("/metrics");
    let listen = format!("0.0.0.0:{p}");
    assert_eq!(
        metric(&metrics, &format!("forwarder_pool_rate_limit_bits_per_second{{listen=\"{listen}\",scope=\"ip\",direction=\"up\"}}")),
        Some(30_000_000)
    );
    let held = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "forwarder_pool_throttled_bytes_total{{listen=\"{listen}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        held > 1_000_000,
        "throttled bytes counted: {held}\n{metrics}"
    );
    drop(fwd);
}

#[test]
fn a_pool_limit_holds_over_three_workers() {
    let _one = one_at_a_time();
    let sink = Sink::start();
    let p = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!("lim,{p},127.0.0.1,{},rate_up=60m\n", sink.port))
        .workers(3)
        .listening(&[p])
        .start();
    let _s: Vec<Senders> = (5..11)
        .map(|i| Senders::start(p, &format!("127.0.0.{i}"), 2, MAX))
        .collect();
    let total = || sink.total.load(Relaxed);
    assert_near(
        &[(
            "twelve connections, rate_up=60m, three workers",
            60e6,
            &total,
        )],
        WARMUP,
    );
    drop(fwd);
}

#[test]
fn an_edited_limit_applies_to_a_running_transfer() {
    let _one = one_at_a_time();
    let sink = Sink::start();
    let p = free_port();
    let rule = |rate: &str| format!("lim,{p},127.0.0.1,{},conn_rate_up={rate}\n", sink.port);
    let fwd = Forwarder::builder()
        .rules(&rule("16m"))
        .workers(2)
        .listening(&[p])
        .start();
    let _s = Senders::start(p, "127.0.0.1", 1, MAX);
    let total = || sink.total.load(Relaxed);
    assert_near(&[("before the edit, 16m", 16e6, &total)], WARMUP);
    fwd.rewrite_rules(&rule("48m"));
    // Within a second of the reload the open connection runs at the new limit.
    assert_near(
        &[("the same connection after the edit to 48m", 48e6, &total)],
        Duration::from_secs(1),
    );
    drop(fwd);
}

#[test]
fn udp_over_the_rate_is_dropped_and_counted() {
    let backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let bport = backend.local_addr().unwrap().port();
    backend
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&received);
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let end = Instant::now() + MAX;
        while Instant::now() < end {
            if backend.recv(&mut buf).is_ok() {
                r.fetch_add(1, Relaxed);
            }
        }
    });
    let _one = one_at_a_time();
    let p = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!("u,{p}/udp,127.0.0.1,{bport},rate_up=8m\n"))
        .web("127.0.0.1")
        .udp_bound(&[p])
        .start();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = SocketAddr::from(([127, 0, 0, 1], p));
    let dropped = || {
        fwd.metric(&format!(
            "forwarder_pool_rate_dropped_datagrams_total{{listen=\"0.0.0.0:{p}\",proto=\"udp\"}}"
        ))
        .unwrap_or(0)
    };
    // 1,000-byte datagrams at 2,000 a second: 16 Mbit/s, twice the limit, for two seconds. A
    // sender that fell more than 50 ms behind its schedule sent a burst larger than the bucket's
    // (100 ms; a busy machine): that run says nothing about the limit and is sent again.
    let sent = 4000u64;
    for run in 1..=4 {
        let (got0, dropped0) = (received.load(Relaxed), dropped());
        let start = Instant::now();
        let mut worst_late = Duration::ZERO;
        for i in 0..sent {
            let due = start + Duration::from_micros(i * 500);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            worst_late = worst_late.max(Instant::now() - due);
            client.send_to(&[1u8; 1000], to).unwrap();
        }
        let counted = || received.load(Relaxed) - got0 + dropped() - dropped0;
        assert!(
            wait_until(WAIT, || counted() >= sent),
            "run {run}: {} of {sent} datagrams received or counted as dropped",
            counted()
        );
        let (got, over) = (received.load(Relaxed) - got0, dropped() - dropped0);
        let share = got as f64 / sent as f64;
        eprintln!(
            "udp at twice rate_up=8m, run {run}: {got} of {sent} datagrams passed ({share:.3}), \
             {over} dropped over the rate; sender at most {worst_late:?} behind"
        );
        assert_eq!(got + over, sent, "every datagram passed or was counted");
        // The rate's half, plus one 100 ms burst (50 datagrams, 0.0125).
        assert!(share <= 0.58, "more than the limit passed: {share}");
        if worst_late > Duration::from_millis(50) {
            continue;
        }
        assert!(
            share >= 0.45,
            "a paced sender lost more than the excess: {share}"
        );
        return;
    }
    panic!("the sender never kept to its schedule within 50 ms in four runs (a loaded machine)");
}

/// The issue's own measure: iperf3, one stream and eight (`-P 8`), through a `conn_rate` pool (each
/// stream gets the limit) and an `ip_rate` pool (the eight share it). Run by
/// scripts/test.d/rates.sh, which installs iperf3.
#[test]
#[ignore = "needs iperf3: scripts/test.d/rates.sh"]
fn iperf3_streams_land_within_five_percent_of_conn_and_ip_rates() {
    let _one = one_at_a_time();
    let server_port = free_port();
    let mut server = std::process::Command::new("iperf3");
    server.args(["-s", "-p", &server_port.to_string(), "-B", "127.0.0.1"]);
    let server = testbed_dev::testing::ChildGuard::spawn(server);
    assert!(
        wait_until(WAIT, || common::is_listening(server_port)),
        "iperf3 -s never listened:\n{}",
        server.output()
    );
    let (conn, ip) = (free_port(), free_port());
    let fwd = Forwarder::builder()
        .rules(&format!(
            "conn,{conn},127.0.0.1,{server_port},conn_rate_up=10m\n\
             ip,{ip},127.0.0.1,{server_port},ip_rate_up=40m\n"
        ))
        .workers(2)
        .listening(&[conn, ip])
        .start();
    for (port, streams, limit, what) in [
        (conn, 1, 10e6, "iperf3 one stream, conn_rate_up=10m"),
        (conn, 8, 80e6, "iperf3 -P 8, conn_rate_up=10m each"),
        (ip, 1, 40e6, "iperf3 one stream, ip_rate_up=40m"),
        (
            ip,
            8,
            40e6,
            "iperf3 -P 8 from one address, ip_rate_up=40m shared",
        ),
    ] {
        let mut last = 0.0;
        let mut landed = false;
        for _ in 0..WINDOWS {
            let out = std::process::Command::new("iperf3")
                .args([
                    "-c",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-t",
                    "4",
                    "-O",
                    "1",
                    "-J",
                ])
                .args(["-P", &streams.to_string()])
                .output()
                .expect("iperf3 runs");
            let report: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                    panic!("iperf3 -J: {e}: {}", String::from_utf8_lossy(&out.stdout))
                });
            let bits = report["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or_else(|| panic!("no sum_received in {report}"));
            last = bits / limit;
            eprintln!("{what}: {:.2} Mbit/s ({last:.3} of the limit)", bits / 1e6);
            assert!(last <= 1.05, "{what}: more than 5 % over the limit");
            if last >= 0.95 {
                landed = true;
                break;
            }
        }
        assert!(
            landed,
            "{what}: no run within 5 % of the limit (last {last:.3})"
        );
    }
    drop(fwd);
}
