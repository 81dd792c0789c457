//! The relay's transitions driven without a worker: real loopback sockets, a mio poll of the
//! test's own, and a clock the test may move forward.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};

use mio::{Events, Poll};

use super::*;
use crate::control::{BackendSpec, PoolSpec};
use crate::tcp::buffers::{BufferPool, PipePool};

const WAIT: Duration = Duration::from_secs(10);

/// A relay, the user's end of its client connection, and what the relay last asked for.
struct Harness {
    poll: Poll,
    events: Events,
    shared: Shared,
    res: Resources,
    relay: Option<Relay>,
    user: std::net::TcpStream,
    timer: Option<Instant>,
    again: Option<Sides>,
    ending: Option<Ending>,
}

impl Harness {
    /// A relay for a fresh client connection to a pool of `backends`, started.
    fn start(backends: &[SocketAddr], splice: bool) -> Harness {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let user = std::net::TcpStream::connect(front.local_addr().unwrap()).unwrap();
        let (accepted, client_addr) = front.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let pool = PoolSpec {
            listen: front.local_addr().unwrap(),
            ports: 1,
            steered: false,
            proto: Default::default(),
            slot: 0,
            options: Default::default(),
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, &addr)| BackendSpec {
                    name: format!("b{i}"),
                    addr,
                    slot: i,
                    options: Default::default(),
                    port_range: false,
                    line: 0,
                })
                .collect(),
        };
        let client = TcpStream::from_std(accepted);
        let mut h = Harness {
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(64),
            shared: Shared::create().unwrap(),
            res: Resources {
                buffers: BufferPool::new(4, 4),
                pipes: PipePool::new(4),
                splice,
                sockmap: None,
            },
            relay: Some(Relay::new(
                1,
                0,
                client,
                client_addr,
                Rc::new(ServedPool::new(pool, &[], &[])),
                Instant::now(),
            )),
            user,
            timer: None,
            again: None,
            ending: None,
        };
        h.step(Instant::now(), |r, ctx| r.start(ctx));
        h
    }

    fn step(&mut self, now: Instant, f: impl FnOnce(&mut Relay, &mut Context) -> Next) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        let mut ctx = Context {
            worker: 0,
            registry: self.poll.registry(),
            shared: &self.shared,
            res: &mut self.res,
            connect_timeout: Duration::from_secs(3),
            now,
            access_log: None,
        };
        match f(relay, &mut ctx) {
            Next::Wait => {}
            Next::Again(sides) => self.again = Some(sides),
            Next::Timer(deadline) => self.timer = Some(deadline),
            Next::Close(ending) => {
                let relay = self.relay.take().unwrap();
                relay.close(&ending, &mut ctx);
                self.ending = Some(ending);
            }
        }
    }

    /// Hands the relay the events of one poll (and a pending fair-share continuation).
    fn turn(&mut self) {
        if let Some(sides) = self.again.take() {
            self.step(Instant::now(), |r, ctx| r.pump_again(sides, ctx));
        }
        self.poll
            .poll(&mut self.events, Some(Duration::from_millis(20)))
            .unwrap();
        let woken: Vec<(Side, Wake)> = self
            .events
            .iter()
            .map(|e| {
                let side = if e.token().0 % 2 == 1 {
                    Side::Backend
                } else {
                    Side::Client
                };
                (side, Wake::from(e))
            })
            .collect();
        for (side, wake) in woken {
            self.step(Instant::now(), |r, ctx| r.ready(side, wake, ctx));
        }
    }

    /// Turns until `done` holds (false after the deadline).
    fn turn_until(&mut self, mut done: impl FnMut(&mut Harness) -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            self.turn();
        }
        done(self)
    }

    fn relaying(&self) -> bool {
        matches!(
            self.relay.as_ref().map(|r| &r.phase),
            Some(Phase::Relaying { .. })
        )
    }
}

/// A backend that accepts in the background and hands its one connection over.
fn backend() -> (SocketAddr, std::sync::mpsc::Receiver<std::net::TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            let _ = tx.send(s);
        }
    });
    (addr, rx)
}

/// A loopback port nothing listens on: connects to it are refused.
fn refused_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Reads from a blocking stream while the relay turns, until `n` bytes or EOF.
fn read_while_turning(h: &mut Harness, from: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
    from.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let done = h.turn_until(|_| loop {
        match from.read(&mut buf) {
            Ok(0) => return true,
            Ok(k) => {
                got.extend_from_slice(&buf[..k]);
                if got.len() >= n {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    });
    assert!(done, "read {} of {n} bytes before the deadline", got.len());
    got
}

#[test]
fn refused_connect_falls_over_to_the_next_backend() {
    let (good, accepted) = backend();
    let mut h = Harness::start(&[refused_port(), good], false);
    assert!(h.turn_until(|h| h.relaying()), "never connected");
    assert_eq!(h.relay.as_ref().unwrap().backend_index, 1);
    assert_eq!(h.shared.backend(0).connect_failures.load(Relaxed), 1);
    assert_eq!(h.shared.active(1), 1);
    let mut server = accepted.recv_timeout(WAIT).unwrap();
    h.user.write_all(b"hello").unwrap();
    assert_eq!(read_while_turning(&mut h, &mut server, 5), b"hello");
}

#[test]
fn connect_timeout_tries_the_next_backend_and_then_gives_up() {
    let (good, _accepted) = backend();
    let mut h = Harness::start(&[good, refused_port()], false);
    let first = h.timer.take().expect("a connect arms a timer");
    // The deadline passes before the connect's event is looked at.
    h.step(first, |r, ctx| r.timer_expired(ctx));
    assert_eq!(h.shared.backend(0).connect_failures.load(Relaxed), 1);
    let second = h
        .timer
        .take()
        .expect("the next backend's connect arms a timer");
    assert!(second > first);
    // The first attempt's timer firing again is stale and ignored.
    h.step(first, |r, ctx| r.timer_expired(ctx));
    assert!(h.ending.is_none());
    // The second backend refuses: nothing left to try.
    assert!(h.turn_until(|h| h.ending.is_some()));
    assert!(matches!(h.ending, Some(Ending::NoBackend)));
    assert_eq!(h.shared.pool(0).unrouted.load(Relaxed), 1);
    assert_eq!(h.shared.active(0), 0);
}

#[test]
fn fin_is_passed_on_each_way_while_the_other_direction_flows() {
    let (addr, accepted) = backend();
    let mut h = Harness::start(&[addr], false);
    assert!(h.turn_until(|h| h.relaying()));
    let mut server = accepted.recv_timeout(WAIT).unwrap();
    h.user.write_all(b"request").unwrap();
    h.user.shutdown(Shutdown::Write).unwrap();
    // The backend sees the bytes, then EOF (read_while_turning stops at EOF).
    assert_eq!(
        read_while_turning(&mut h, &mut server, usize::MAX),
        b"request"
    );
    assert!(h.relay.as_ref().unwrap().up.finished());
    server.set_nonblocking(false).unwrap();
    server.write_all(b"late reply").unwrap();
    let mut user = h.user.try_clone().unwrap();
    assert_eq!(read_while_turning(&mut h, &mut user, 10), b"late reply");
    assert!(h.ending.is_none(), "one direction is still open");
    server.shutdown(Shutdown::Write).unwrap();
    assert!(h.turn_until(|h| h.ending.is_some()));
    assert!(matches!(h.ending, Some(Ending::Finished)));
    assert_eq!(h.shared.active(0), 0);
    assert_eq!(h.shared.backend(0).bytes_up.load(Relaxed), 7);
    assert_eq!(h.shared.backend(0).bytes_down.load(Relaxed), 10);
}

#[test]
fn a_reset_from_the_backend_resets_the_client() {
    let (addr, accepted) = backend();
    let mut h = Harness::start(&[addr], false);
    assert!(h.turn_until(|h| h.relaying()));
    let server = accepted.recv_timeout(WAIT).unwrap();
    h.user.write_all(b"x").unwrap();
    socket2::SockRef::from(&server)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(server);
    assert!(h.turn_until(|h| h.ending.is_some()));
    assert!(matches!(h.ending, Some(Ending::Failed(_))));
    h.user
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let err = h.user.read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

#[test]
fn a_full_sink_holds_one_batch_then_drains_exactly() {
    for splice in [false, true] {
        let (addr, accepted) = backend();
        let mut h = Harness::start(&[addr], splice);
        assert!(h.turn_until(|h| h.relaying()));
        let mut server = accepted.recv_timeout(WAIT).unwrap();
        // The user does not read: 16 MiB from the backend fill every buffer on the way.
        let total = 16 << 20;
        let writer = std::thread::spawn(move || {
            let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
            server.write_all(&data).unwrap();
            server
        });
        let full = h.turn_until(|h| {
            h.relay.as_ref().is_some_and(|r| r.down.holds_bytes())
                && h.shared.backend(0).bytes_down.load(Relaxed) > 0
        });
        assert!(full, "the client's socket never filled (splice {splice})");
        for _ in 0..20 {
            h.turn(); // still full: nothing more is read from the backend
        }
        let held = h.shared.backend(0).bytes_down.load(Relaxed);
        assert!(held < total as u64, "everything moved without a reader");
        let mut user = h.user.try_clone().unwrap();
        let got = read_while_turning(&mut h, &mut user, total);
        assert_eq!(got.len(), total);
        let spliced = h.shared.backend(0).spliced_down.load(Relaxed);
        if splice {
            assert!(
                spliced > total as u64 / 2,
                "bulk went through splice: {spliced}"
            );
        } else {
            assert_eq!(spliced, 0, "--no-splice copies");
        }
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        drop(writer.join().unwrap());
        assert!(h.turn_until(|h| h.relay.as_ref().is_some_and(|r| !r.down.holds_bytes())));
    }
}

#[test]
fn idle_for_counts_from_the_last_event() {
    let (addr, _accepted) = backend();
    let mut h = Harness::start(&[addr], false);
    assert!(h.turn_until(|h| h.relaying()));
    let relay = h.relay.as_ref().unwrap();
    let last = relay.last_active;
    let limit = Duration::from_secs(30);
    assert!(!relay.idle_for(limit, last + limit - Duration::from_millis(1)));
    assert!(relay.idle_for(limit, last + limit));
}
