//! Strangers holding the room's slots for free, against the real chat-server binary: clients
//! that begin a line and never finish it are told `ERR line-timeout` and closed at the limit
//! (while idle clients stay), one address gets at most `--max-per-address` connections, and a
//! slowloris from twenty loopback addresses leaves a real client answered within a second, with
//! one log line per address.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{start, Client, PATIENCE};
use socket2::{Domain, Socket, Type};

const LINE_MS: u64 = 1_500;

/// A dribbler sends one more byte of its unfinished line this often: far inside the limit.
const DRIP: Duration = Duration::from_millis(300);

const ANSWER_WITHIN: Duration = Duration::from_secs(1);

fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(IpAddr::V4(from), 0).into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// A connection that keeps a line going, a byte at a time.
struct Dribbler {
    stream: TcpStream,
    started: Instant,
    got: Vec<u8>,
    /// When the server closed it.
    closed: Option<Duration>,
}

impl Dribbler {
    fn open(from: Ipv4Addr, to: SocketAddr) -> Dribbler {
        let stream = connect_from(from, to);
        stream.set_nonblocking(true).unwrap();
        Dribbler {
            stream,
            started: Instant::now(),
            got: Vec::new(),
            closed: None,
        }
    }

    /// True once closed.
    fn drip(&mut self) -> bool {
        if self.closed.is_some() {
            return true;
        }
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if self.stream.write_all(b"x").is_ok() {
                        return false;
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        self.closed = Some(self.started.elapsed());
        true
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.got).into_owned()
    }
}

/// Drips every dribbler and times a `/who` of `real` each round, until all are closed or
/// `limit`; returns the slowest answer.
fn siege(real: &mut Client, dribblers: &mut [Dribbler], limit: Duration) -> Duration {
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < limit {
        let mut all = true;
        for d in dribblers.iter_mut() {
            all &= d.drip();
        }
        let asked = Instant::now();
        real.send("/who");
        let answer = real.until("USERS ");
        assert!(answer.starts_with("USERS "));
        slowest = slowest.max(asked.elapsed());
        if all {
            break;
        }
        std::thread::sleep(DRIP);
    }
    slowest
}

#[test]
fn an_unfinished_line_is_cut_at_the_limit_and_an_idle_client_stays() {
    let line_ms = LINE_MS.to_string();
    let server = start(&["--line-timeout-ms", &line_ms]);
    let mut alice = Client::join(server.addr, "alice");
    let mut mallory = Client::join(server.addr, "mallory");
    let started = Instant::now();
    let mut cut = false;
    // Half a message, then a byte per drip, never the newline.
    mallory.send_bytes(b"this line never ends");
    while started.elapsed() < Duration::from_millis(LINE_MS * 3) {
        if mallory.closed_within(DRIP) {
            cut = true;
            break;
        }
        let _ = mallory.stream().write_all(b".");
    }
    let after = started.elapsed();
    assert!(cut, "the dribbler was never cut: {:?}", mallory.seen);
    assert!(
        after >= Duration::from_millis(LINE_MS) && after < Duration::from_millis(LINE_MS * 2),
        "cut after {after:?} (limit {LINE_MS} ms)"
    );
    let told = mallory
        .seen
        .iter()
        .find(|l| l.starts_with("ERR line-timeout "));
    assert!(told.is_some(), "{:?}", mallory.seen);
    // Alice, idle all along (longer than the line limit), saw mallory leave and still talks.
    let leave = alice.until("LEAVE ");
    assert!(leave.ends_with(" mallory timeout"), "{leave}");
    alice.send("still here");
    let echo = alice.until("MSG ");
    assert!(echo.ends_with(" alice still here"), "{echo}");
}

#[test]
fn a_slowloris_from_twenty_addresses_is_capped_cut_and_logged_once_per_address() {
    let line_ms = LINE_MS.to_string();
    let server = start(&["--line-timeout-ms", &line_ms, "--max-per-address", "4"]);
    let mut real = Client::join(server.addr, "operator");
    let mut dribblers = Vec::new();
    for host in 2..22u8 {
        for _ in 0..6 {
            dribblers.push(Dribbler::open(Ipv4Addr::new(127, 0, 0, host), server.addr));
        }
    }
    let slowest = siege(
        &mut real,
        &mut dribblers,
        Duration::from_millis(LINE_MS * 4),
    );
    assert!(slowest < ANSWER_WITHIN, "slowest /who answer {slowest:?}");

    let texts: Vec<String> = dribblers.iter().map(Dribbler::text).collect();
    let refused = texts
        .iter()
        .filter(|t| t.contains("ERR too-many-connections "))
        .count();
    let timed_out = texts
        .iter()
        .filter(|t| t.starts_with("HELLO ") && t.contains("ERR line-timeout "))
        .count();
    assert_eq!(refused, 20 * 2, "{texts:?}");
    assert_eq!(timed_out, 20 * 4, "{texts:?}");
    assert!(
        dribblers.iter().all(|d| d.closed.is_some()),
        "dribblers left open"
    );
    for d in dribblers
        .iter()
        .filter(|d| d.text().contains("line-timeout"))
    {
        let after = d.closed.unwrap();
        assert!(
            after < Duration::from_millis(LINE_MS * 2),
            "a dribbler was cut only after {after:?}"
        );
    }
    // The real client is still in the room.
    real.send("/who");
    assert!(real.until("USERS ").starts_with("USERS 1 "));

    let log = server.guard.output();
    for host in 2..22u8 {
        let needle = format!("client 127.0.0.{host}:");
        let lines = log.lines().filter(|l| l.contains(&needle)).count();
        assert_eq!(lines, 1, "{needle} logged {lines} times:\n{log}");
    }
    let _ = PATIENCE;
}
