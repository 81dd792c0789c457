//! The web page under a slowloris, against the real forwarder: connections that dribble a
//! request head one header line at a time, from one loopback address and from twenty. A real
//! client's requests keep answering within a second, the dribblers are answered 408 within the
//! head limit, the ones over the per-address cap are closed at once, a slow body gets 408, an
//! idle connection is closed before a slow one, and `/metrics` and the log say so (the log once
//! per address).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{metric, Forwarder, WAIT};
use socket2::{Domain, Socket, Type};
use testbed_dev::testing::{free_port, wait_for_listen};

/// The head limit the tests run with (the default is 10 s).
const HEAD_MS: u64 = 2_000;

/// How often a dribbler sends one more header line: well inside every limit, so only the
/// head limit as a whole can stop it.
const DRIP: Duration = Duration::from_millis(400);

/// What the real client's every request must stay within.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

fn start(extra: &[&str]) -> (Forwarder, SocketAddr) {
    let port = free_port();
    let web = SocketAddr::from(([127, 0, 0, 1], port));
    let head = HEAD_MS.to_string();
    let web_arg = web.to_string();
    let mut args = vec!["--web-head-timeout-ms", head.as_str()];
    args.extend_from_slice(extra);
    let f = Forwarder::builder()
        .rules("")
        .workers(1)
        .web_on(&web_arg)
        .args(args)
        .start();
    assert!(
        wait_for_listen(web, WAIT),
        "web page never listened:\n{}",
        f.process.output()
    );
    (f, web)
}

/// A connection from `from` (any 127.0.0.x: they are all this host's).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(IpAddr::V4(from), 0).into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// How a dribbling connection ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Answered 408 after this long.
    Timeout408(Duration),
    /// Closed with no answer at all after this long (refused at once, or cut while silent).
    Closed(Duration),
    /// Still open when the test stopped watching.
    Open,
}

struct Dribbler {
    stream: TcpStream,
    started: Instant,
    got: Vec<u8>,
    end: Option<End>,
    lines: u32,
}

impl Dribbler {
    fn open(from: Ipv4Addr, web: SocketAddr) -> Dribbler {
        let mut stream = connect_from(from, web);
        let started = Instant::now();
        // The request line and Host at once, then one header line per drip, never the end.
        let _ = stream.write_all(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        stream.set_nonblocking(true).unwrap();
        Dribbler {
            stream,
            started,
            got: Vec::new(),
            end: None,
            lines: 0,
        }
    }

    /// Reads what came back; sends one more line when nothing did. True once it has ended.
    fn drip(&mut self) -> bool {
        if self.end.is_some() {
            return true;
        }
        let mut buf = [0u8; 512];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break self.finish(),
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.lines += 1;
                    let line = format!("X-Drip-{}: {}\r\n", self.lines, "a".repeat(8));
                    if self.stream.write_all(line.as_bytes()).is_err() {
                        break self.finish();
                    }
                    break;
                }
                // A reset after the server closed: the same as a close.
                Err(_) => break self.finish(),
            }
        }
        self.end.is_some()
    }

    fn finish(&mut self) {
        let after = self.started.elapsed();
        self.end = Some(if self.got.starts_with(b"HTTP/1.1 408") {
            End::Timeout408(after)
        } else {
            assert!(
                self.got.is_empty(),
                "a dribbler got an answer other than 408: {:?}",
                String::from_utf8_lossy(&self.got)
            );
            End::Closed(after)
        });
    }
}

/// Keeps every dribbler dribbling, and the real client asking `/api/stats` from 127.0.0.1,
/// until all dribblers ended or `limit` passed. Returns the slowest real answer and how many
/// real requests were made.
fn siege(web: SocketAddr, dribblers: &mut [Dribbler], limit: Duration) -> (Duration, u32) {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut asked = 0;
    while started.elapsed() < limit {
        let mut all_ended = true;
        for d in dribblers.iter_mut() {
            all_ended &= d.drip();
        }
        let took = real_request(web);
        slowest = slowest.max(took);
        asked += 1;
        if all_ended {
            break;
        }
        std::thread::sleep(DRIP);
    }
    for d in dribblers.iter_mut().filter(|d| d.end.is_none()) {
        d.end = Some(End::Open);
    }
    (slowest, asked)
}

/// One `GET /api/stats` as the page's own script makes it; how long the answer took.
fn real_request(web: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    s.write_all(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    if let Err(e) = s.read_to_string(&mut text) {
        panic!(
            "the real client's request was not answered within {ANSWER_WITHIN:?}: {e} (got {text:?})"
        );
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    started.elapsed()
}

fn metrics(web: SocketAddr) -> String {
    common::http_get(web, "/metrics")
}

fn count(text: &str, series: &str) -> u64 {
    metric(text, series).unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
}

#[test]
fn a_slowloris_from_one_address_is_capped_cut_with_408_and_logged_once() {
    let (f, web) = start(&["--web-per-address", "16"]);
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let mut dribblers: Vec<Dribbler> = (0..40).map(|_| Dribbler::open(attacker, web)).collect();
    let (slowest, asked) = siege(web, &mut dribblers, Duration::from_millis(HEAD_MS * 4));
    assert!(asked >= 3, "the siege ended before it started");
    assert!(slowest < ANSWER_WITHIN, "slowest real answer {slowest:?}");

    let timed_out: Vec<Duration> = dribblers
        .iter()
        .filter_map(|d| match d.end {
            Some(End::Timeout408(t)) => Some(t),
            _ => None,
        })
        .collect();
    let refused = dribblers
        .iter()
        .filter(|d| matches!(d.end, Some(End::Closed(t)) if t < Duration::from_millis(HEAD_MS)))
        .count();
    let open = dribblers
        .iter()
        .filter(|d| d.end == Some(End::Open))
        .count();
    assert_eq!(
        open,
        0,
        "dribblers still open: {:?}",
        dribblers.iter().map(|d| &d.end).collect::<Vec<_>>()
    );
    assert_eq!(
        timed_out.len(),
        16,
        "{:?}",
        dribblers.iter().map(|d| &d.end).collect::<Vec<_>>()
    );
    assert_eq!(refused, 24);
    // Cut at the head limit, not at the old 60 s of no progress (they never stopped sending).
    for t in &timed_out {
        assert!(
            *t >= Duration::from_millis(HEAD_MS) && *t < Duration::from_millis(HEAD_MS * 2),
            "a dribbler was cut after {t:?} (head limit {HEAD_MS} ms)"
        );
    }

    let m = metrics(web);
    assert_eq!(
        count(
            &m,
            "forwarder_web_connections_refused_total{reason=\"per_address\"}"
        ),
        24
    );
    assert_eq!(
        count(
            &m,
            "forwarder_web_connections_cut_total{reason=\"head_timeout\"}"
        ),
        16
    );
    let stats: serde_json::Value =
        serde_json::from_str(&common::http_get(web, "/api/stats")).unwrap();
    assert_eq!(stats["web"]["connections"]["refused_per_address"], 24);
    assert_eq!(stats["web"]["connections"]["cut_head_timeout"], 16);

    // 40 losses from one address, one log line.
    let log = f.process.output();
    let lines = log
        .lines()
        .filter(|l| l.contains("web page: connection from 127.0.0.2"))
        .count();
    assert_eq!(lines, 1, "{log}");
}

#[test]
fn a_slowloris_from_twenty_addresses_does_not_lock_out_a_real_client() {
    let (_f, web) = start(&["--web-per-address", "16"]);
    let mut dribblers = Vec::new();
    for host in 2..22u8 {
        for _ in 0..20 {
            dribblers.push(Dribbler::open(Ipv4Addr::new(127, 0, 0, host), web));
        }
    }
    let (slowest, asked) = siege(web, &mut dribblers, Duration::from_millis(HEAD_MS * 4));
    assert!(asked >= 3, "the siege ended before it started");
    assert!(slowest < ANSWER_WITHIN, "slowest real answer {slowest:?}");
    let ends: Vec<&End> = dribblers.iter().filter_map(|d| d.end.as_ref()).collect();
    let timed_out = ends
        .iter()
        .filter(|e| matches!(e, End::Timeout408(t) if *t < Duration::from_millis(HEAD_MS * 2)))
        .count();
    let open = ends.iter().filter(|e| **e == &End::Open).count();
    assert_eq!(open, 0, "dribblers still open after {:?}", HEAD_MS * 4);
    assert_eq!(timed_out, 20 * 16, "{ends:?}");
    let m = metrics(web);
    assert_eq!(
        count(
            &m,
            "forwarder_web_connections_refused_total{reason=\"per_address\"}"
        ),
        20 * 4
    );
}

#[test]
fn a_slow_body_gets_408_and_an_idle_connection_is_closed_before_a_slow_head() {
    let (_f, web) = start(&[
        "--web-body-timeout-ms",
        "1000",
        "--web-idle-timeout-ms",
        "300",
    ]);
    // A body that never completes.
    let mut s = TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let started = Instant::now();
    s.write_all(
        b"PUT /api/rules/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"name\":",
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(
        started.elapsed() < Duration::from_millis(HEAD_MS),
        "the body limit (1 s) was not what cut it: {:?}",
        started.elapsed()
    );

    // One request answered, then nothing: closed at the idle limit, before a head limit.
    let mut s = TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /api/stats HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        idle_from.elapsed() < Duration::from_millis(HEAD_MS),
        "an idle connection lasted {:?}",
        idle_from.elapsed()
    );
    let m = metrics(web);
    assert_eq!(
        count(
            &m,
            "forwarder_web_connections_cut_total{reason=\"body_timeout\"}"
        ),
        1
    );
    assert!(count(&m, "forwarder_web_connections_cut_total{reason=\"idle\"}") >= 1);
}
