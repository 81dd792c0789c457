//! Backends that change under a running forwarder, against the real binary and real sockets: a
//! backup tier that takes over exactly when the last primary goes and gives back after two good
//! checks, `max_conns` spilling to the backup, drain from the API with long connections open
//! (none cut, the count falling, still drained after a restart), slow start's rising share, and
//! health that says `unknown` until something was tried.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{http_get, local, metric, round_trip, rules_file, Backend, Forwarder, WAIT};
use serde_json::Value;
use testbed_dev::testing::{free_port, wait_until};

/// An echo backend that first sends its one-letter tag, and can be stopped (its port then
/// refuses connections) and started again on the same port.
struct Killable {
    port: u16,
    tag: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Killable {
    fn start(tag: &'static str) -> Killable {
        Self::on(tag, 0)
    }

    fn on(tag: &'static str, port: u16) -> Killable {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            if s.write_all(tag.as_bytes()).is_err() {
                                return;
                            }
                            let mut buf = [0u8; 4096];
                            while let Ok(n @ 1..) = s.read(&mut buf) {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    // Polling the stop flag between accepts; not a synchronisation.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Killable {
            port,
            tag,
            stop,
            thread: Some(thread),
        }
    }

    /// Closes the listener: new connections to the port are refused.
    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn revive(&mut self) {
        *self = Self::on(self.tag, self.port);
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Opens a connection through `port` and reads the one-letter tag of the backend that took it;
/// the connection stays open in the returned stream.
fn tagged(port: u16) -> (String, TcpStream) {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).unwrap();
    (String::from_utf8_lossy(&tag).into_owned(), s)
}

/// The tags of `n` connections made one after the other (each closed after its tag).
fn tags(port: u16, n: usize) -> String {
    (0..n).map(|_| tagged(port).0).collect()
}

fn count(tags: &str, tag: char) -> usize {
    tags.chars().filter(|&c| c == tag).count()
}

fn stats(web: SocketAddr) -> Value {
    serde_json::from_str(&http_get(web, "/api/stats")).unwrap()
}

/// One backend of `/api/stats` by its rule name.
fn backend(web: SocketAddr, name: &str) -> Value {
    stats(web)["pools"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["backends"].as_array().unwrap().clone())
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in /api/stats"))
}

/// `PUT /api/rules/ID/state` for the rule named `name`; the status.
fn set_admin(web: SocketAddr, name: &str, state: &str) -> u16 {
    let rules: Value = serde_json::from_str(&http_get(web, "/api/rules")).unwrap();
    let id = rules["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let body = format!("{{\"state\":\"{state}\"}}");
    let mut s = TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "PUT /api/rules/{id}/state HTTP/1.1\r\nHost: {web}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

/// The forwarder with its web page, waiting for `ports` to listen.
fn with_web(workers: usize, rules: &str, ports: &[u16], extra: &[&str]) -> (Forwarder, SocketAddr) {
    let fwd = Forwarder::builder()
        .rules(rules)
        .workers(workers)
        .web("127.0.0.1")
        .args(extra)
        .listening(ports)
        .start();
    let web = fwd.web();
    (fwd, web)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn backups_take_over_exactly_when_the_last_primary_goes_and_give_back_after_two_checks() {
    let port = free_port();
    let mut a = Killable::start("A");
    let mut b = Killable::start("B");
    let c = Killable::start("C");
    let d = Killable::start("D");
    let rules = format!(
        "a,{port},127.0.0.1,{}\nb,{port},127.0.0.1,{}\nc,{port},127.0.0.1,{},backup\nd,{port},127.0.0.1,{},backup\n",
        a.port, b.port, c.port, d.port
    );
    let (fwd, web) = with_web(2, &rules, &[port], &["--health-interval-s", "2"]);
    let out = || fwd.process.output();

    let all_up = tags(port, 40);
    assert_eq!(
        (count(&all_up, 'A'), count(&all_up, 'B')),
        (20, 20),
        "{all_up}"
    );
    assert_eq!(stats(web)["pools"][0]["serving"], "primary");

    a.kill();
    let one_left = tags(port, 20);
    assert_eq!(
        count(&one_left, 'B'),
        20,
        "one primary up: no backup yet: {one_left}"
    );

    b.kill();
    let backups = tags(port, 20);
    assert_eq!(
        count(&backups, 'C') + count(&backups, 'D'),
        20,
        "the last primary went: the backups serve: {backups}"
    );
    assert!(
        count(&backups, 'C') >= 7 && count(&backups, 'D') >= 7,
        "the backups balance among themselves: {backups}"
    );
    assert!(wait_until(WAIT, || stats(web)["pools"][0]["serving"] == "backup"));

    // A comes back: one good check is not enough, the backups keep serving until the second.
    a.revive();
    let mut checked_once = false;
    assert!(
        wait_until(WAIT, || {
            let s = backend(web, "a");
            if s["state"] == "down" && s["rise"] == 1 {
                // Held for a second after its first good check: a connection made well inside
                // that second must not go to A.
                if now_ms().saturating_sub(s["last_check_ms"].as_u64().unwrap()) < 500 {
                    let (tag, _) = tagged(port);
                    assert!(tag == "C" || tag == "D", "A served after one check: {tag}");
                    checked_once = true;
                }
            }
            s["state"] == "up"
        }),
        "A never came back:\n{}",
        out()
    );
    assert!(
        checked_once,
        "never saw A between its first and second good check"
    );
    let back = tags(port, 10);
    assert_eq!(
        count(&back, 'A'),
        10,
        "traffic returned to the primary: {back}"
    );
    assert_eq!(stats(web)["pools"][0]["serving"], "primary");
    let metrics = http_get(web, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            &format!("forwarder_backend_tier{{listen=\"0.0.0.0:{port}\",name=\"c\",backend=\"127.0.0.1:{}\",state=\"backup\"}}", c.port)
        ),
        Some(1)
    );
    drop(d);
}

#[test]
fn max_conns_on_the_primaries_spills_to_the_backup() {
    let port = free_port();
    let a = Killable::start("A");
    let b = Killable::start("B");
    let c = Killable::start("C");
    let rules = format!(
        "a,{port},127.0.0.1,{},max_conns=2\nb,{port},127.0.0.1,{},max_conns=2\nc,{port},127.0.0.1,{},backup\n",
        a.port, b.port, c.port
    );
    let (_fwd, web) = with_web(2, &rules, &[port], &[]);
    let mut held: Vec<(String, TcpStream)> = (0..6).map(|_| tagged(port)).collect();
    let got: String = held.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        (count(&got, 'A'), count(&got, 'B'), count(&got, 'C')),
        (2, 2, 2),
        "{got}"
    );
    assert_eq!(stats(web)["pools"][0]["serving"], "backup");
    // One place on A frees: the next connection is A's again.
    let i = held.iter().position(|(t, _)| t == "A").unwrap();
    held.remove(i);
    assert!(wait_until(WAIT, || backend(web, "a")["active"] == 1));
    assert_eq!(tagged(port).0, "A");
}

#[test]
fn drain_from_the_api_cuts_nothing_sends_nothing_new_and_survives_a_restart() {
    let port = free_port();
    let a = Backend::echo(Some("A"));
    let b = Backend::echo(Some("B"));
    let rules = format!(
        "a,{port},127.0.0.1,{}\nb,{port},127.0.0.1,{},weight=1\n",
        a.port, b.port
    );
    let (fwd, web) = with_web(2, &rules, &[port], &["--health-interval-s", "1"]);
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..100 {
        let (tag, s) = tagged(port);
        if tag == "A" {
            on_a.push(s)
        } else {
            on_b.push(s)
        }
    }
    assert_eq!((on_a.len(), on_b.len()), (50, 50));
    assert_eq!(set_admin(web, "a", "drain"), 200);
    assert!(rules_file(&fwd.rules).contains(&format!("a,{port},127.0.0.1,{},drain", a.port)));
    assert!(wait_until(WAIT, || backend(web, "a")["admin"] == "drain"));
    let new = tags(port, 20);
    assert_eq!(
        count(&new, 'B'),
        20,
        "a drained backend gets no new connection: {new}"
    );
    // Two health checks later it is still drained: a check does not undo it.
    let checked = backend(web, "a")["last_check_ms"].as_u64().unwrap();
    assert!(wait_until(WAIT, || backend(web, "a")["last_check_ms"]
        .as_u64()
        .unwrap()
        > checked + 1500));
    assert_eq!(backend(web, "a")["admin"], "drain");
    // None of the 50 was cut: each still echoes; then they end in tens and the count follows.
    for (i, s) in on_a.iter_mut().enumerate() {
        let msg = format!("still here {i:02}");
        assert_eq!(round_trip(s, msg.as_bytes()), msg.as_bytes());
    }
    let mut seen = vec![backend(web, "a")["active"].as_u64().unwrap()];
    while !on_a.is_empty() {
        on_a.truncate(on_a.len() - 10);
        let left = on_a.len() as u64;
        assert!(
            wait_until(WAIT, || backend(web, "a")["active"] == left),
            "page count stuck above {left}: {}",
            backend(web, "a")
        );
        seen.push(left);
    }
    assert_eq!(seen, [50, 40, 30, 20, 10, 0]);
    drop(on_b);

    // Restart on the same file: still drained.
    let text = rules_file(&fwd.rules);
    drop(fwd);
    let (again, web) = with_web(1, &text, &[port], &[]);
    assert_eq!(backend(web, "a")["admin"], "drain");
    assert_eq!(count(&tags(port, 10), 'B'), 10);
    let metrics = http_get(web, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            &format!("forwarder_backend_admin{{listen=\"0.0.0.0:{port}\",name=\"a\",backend=\"127.0.0.1:{}\",state=\"drain\"}}", a.port)
        ),
        Some(1)
    );
    // And back in service from the API.
    assert_eq!(set_admin(web, "a", "active"), 200);
    assert!(wait_until(WAIT, || count(&tags(port, 2), 'A') == 1));
    assert!(!rules_file(&again.rules).contains("drain"));
    assert_eq!(set_admin(web, "a", "asleep"), 400);
}

/// Slow start: B is lifted from drain with `slowstart=6s` beside A. Round robin over two gives
/// B half the connections at full weight; at a fraction f of the window it takes f of that
/// (at least 5%). Each batch of 200 connections is compared with f at its start and its end,
/// within 0.08 (the lottery over ~100 of B's turns has a standard deviation near 0.035).
#[test]
fn slow_start_share_rises_over_the_window_and_reaches_the_weight() {
    const WINDOW_MS: f64 = 6000.0;
    const TOLERANCE: f64 = 0.08;
    let port = free_port();
    let a = Backend::echo(Some("A"));
    let b = Backend::echo(Some("B"));
    let rules = format!(
        "a,{port},127.0.0.1,{}\nb,{port},127.0.0.1,{},slowstart=6s drain\n",
        a.port, b.port
    );
    let (_fwd, web) = with_web(1, &rules, &[port], &[]);
    assert_eq!(count(&tags(port, 10), 'A'), 10);
    assert_eq!(set_admin(web, "b", "active"), 200);
    let lifted = Instant::now();
    let expected = |ms: f64| (ms / WINDOW_MS).clamp(0.05, 1.0) / 2.0;
    // Batches back to back until the window is over (bounded in count too); each checked.
    let mut shares = Vec::new();
    for _ in 0..2000 {
        let start = lifted.elapsed().as_millis() as f64;
        let batch = tags(port, 200);
        let end = lifted.elapsed().as_millis() as f64;
        let share = count(&batch, 'B') as f64 / 200.0;
        let (low, high) = (expected(start) - TOLERANCE, expected(end) + TOLERANCE);
        assert!(
            (low..=high).contains(&share),
            "at {start}-{end} ms B took {share}, expected {low:.3}-{high:.3}"
        );
        shares.push((start, share));
        if start > WINDOW_MS + 500.0 {
            assert_eq!(share, 0.5, "after the window: its full weight");
            break;
        }
    }
    assert!(
        shares.last().unwrap().0 > WINDOW_MS,
        "never got past the window: {shares:?}"
    );
    // In steps of a second: the mean share of each rises.
    let steps: Vec<f64> = (0..6)
        .map(|k| {
            let lo = k as f64 * 1000.0;
            let in_step: Vec<f64> = shares
                .iter()
                .filter(|(t, _)| (lo..lo + 1000.0).contains(t))
                .map(|&(_, s)| s)
                .collect();
            in_step.iter().sum::<f64>() / in_step.len().max(1) as f64
        })
        .collect();
    eprintln!("B's share per second of the window: {steps:.3?}");
    assert!(
        steps.windows(2).all(|w| w[1] > w[0] - 0.03),
        "the share rises step by step: {steps:?}"
    );
    assert!(steps[5] > steps[0] + 0.25, "{steps:?}");
}

#[test]
fn health_is_unknown_until_something_was_tried() {
    let tcp = free_port();
    let udp = free_port();
    let live = Backend::echo(None);
    let dead = common::dead_port();
    let rules = format!(
        "t,{tcp},127.0.0.1,{}\nu,{udp}/udp,127.0.0.1,{dead}\n",
        live.port
    );
    let (_fwd, web) = with_web(1, &rules, &[tcp], &[]);
    let t = backend(web, "t");
    let u = backend(web, "u");
    assert_eq!(
        (t["state"].as_str(), u["state"].as_str()),
        (Some("unknown"), Some("unknown"))
    );
    assert_eq!(t["check"], "passive (connects)");
    assert_eq!(u["check"], "passive (replies, ICMP port unreachable)");
    let metrics = http_get(web, "/metrics");
    let series = |name: &str, port: u16, proto: &str, state: &str| {
        format!("forwarder_backend_health{{listen=\"0.0.0.0:{}\",name=\"{name}\",backend=\"127.0.0.1:{port}\"{proto},state=\"{state}\"}}", if name == "t" { tcp } else { udp })
    };
    assert_eq!(
        metric(&metrics, &series("u", dead, ",proto=\"udp\"", "unknown")),
        Some(1)
    );
    assert_eq!(
        metric(&metrics, &series("u", dead, ",proto=\"udp\"", "up")),
        Some(0)
    );
    assert_eq!(
        metric(&metrics, &series("t", live.port, "", "unknown")),
        Some(1)
    );
    let up = format!(
        "forwarder_backend_up{{listen=\"0.0.0.0:{tcp}\",name=\"t\",backend=\"127.0.0.1:{}\"}}",
        live.port
    );
    assert_eq!(metric(&metrics, &up), Some(0), "not up while unknown");

    // A datagram to nothing: the ICMP port unreachable marks it down.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(wait_until(WAIT, || {
        client.send_to(b"anyone?", local(udp)).unwrap();
        backend(web, "u")["state"] == "down"
    }));
    // A connection through the TCP rule: up.
    let mut s = TcpStream::connect(local(tcp)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(round_trip(&mut s, b"hi"), b"hi");
    assert!(wait_until(WAIT, || backend(web, "t")["state"] == "up"));
    let metrics = http_get(web, "/metrics");
    assert_eq!(metric(&metrics, &series("t", live.port, "", "up")), Some(1));
    assert_eq!(
        metric(&metrics, &series("u", dead, ",proto=\"udp\"", "down")),
        Some(1)
    );
}
