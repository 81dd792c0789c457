//! UDP forwarding through the real binary on loopback: datagrams whole both ways (0, 1 and
//! 65,507 bytes), sessions balanced and sticky, 10,000 concurrent sessions, idle expiry, eviction
//! when full, failover on port unreachable, reload of UDP ports next to TCP traffic, floods and
//! odd sources, and SIGTERM letting replies in flight arrive.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::udp::{udp_sockets_on, MAX_DATAGRAM};
use common::{local, Backend, Forwarder, WAIT};
use forwarder::udp::sys;
use testbed_dev::testing::{free_port, wait_until};

/// A UDP echo server on loopback: sends every datagram back unchanged (after `delay`), and
/// remembers which source addresses it saw and how many datagrams.
struct UdpEcho {
    port: u16,
    clients: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl UdpEcho {
    fn start(delay: Duration) -> UdpEcho {
        let socket = UdpSocket::bind(local(0)).unwrap();
        sys::set_buffers(socket.as_raw_fd(), 4 << 20);
        let port = socket.local_addr().unwrap().port();
        let clients = Arc::new(Mutex::new(HashMap::new()));
        let seen = Arc::clone(&clients);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                *seen.lock().unwrap().entry(from).or_insert(0) += 1;
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        UdpEcho { port, clients }
    }

    fn sessions(&self) -> usize {
        self.clients.lock().unwrap().len()
    }

    fn datagrams(&self) -> usize {
        self.clients.lock().unwrap().values().sum()
    }
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind(local(0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends `msg` to the forwarder's `port` and returns the reply.
fn ping(s: &UdpSocket, port: u16, msg: &[u8]) -> Vec<u8> {
    s.send_to(msg, local(port)).unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).expect("reply through the forwarder");
    assert_eq!(
        from,
        local(port),
        "the reply comes from the address sent to"
    );
    buf.truncate(n);
    buf
}

/// A payload whose every byte depends on `seed` and its position (a corrupted, cut or
/// reordered datagram does not compare equal).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn datagrams_pass_whole_both_ways_and_sessions_split_evenly() {
    let (a, b) = (
        UdpEcho::start(Duration::ZERO),
        UdpEcho::start(Duration::ZERO),
    );
    let port = free_port();
    let f = Forwarder::builder().rules(&format!(
            "a,127.0.0.1:{port}/udp,127.0.0.1,{}\n\"b\",\"127.0.0.1:{port}/udp\",\"127.0.0.1\",\"{}\"\n",
            a.port, b.port
        )).workers(2).web("127.0.0.1").udp_bound(&[port]).start();
    let clients: Vec<UdpSocket> = (0..10).map(|_| client()).collect();
    for (i, c) in clients.iter().enumerate() {
        for (j, len) in [1, 0, MAX_DATAGRAM, 1400, 1, MAX_DATAGRAM]
            .into_iter()
            .enumerate()
        {
            let msg = pattern(len, (i * 100 + j) as u64);
            let back = ping(c, port, &msg);
            assert_eq!(back.len(), len, "client {i}, datagram {j}: cut or merged");
            assert!(back == msg, "client {i}, datagram {j}: bytes differ");
        }
    }
    // Ten clients, one session each, round robin over two backends: five each, and every
    // datagram of a client went to the same backend (one source address per session there).
    assert_eq!((a.sessions(), b.sessions()), (5, 5));
    assert_eq!(a.datagrams() + b.datagrams(), 60);
    let up = |name: &str| {
        f.metric(&format!(
            "forwarder_backend_datagrams_total{{listen=\"127.0.0.1:{port}\",name=\"{name}\",backend=\"127.0.0.1:{}\",proto=\"udp\",direction=\"up\"}}",
            if name == "a" { a.port } else { b.port }
        ))
    };
    assert_eq!((up("a"), up("b")), (Some(30), Some(30)));
    assert_eq!(f.metric("forwarder_active_udp_sessions"), Some(10));
    let bytes: u64 = ["a", "b"]
        .iter()
        .map(|n| {
            f.metric(&format!(
                "forwarder_backend_bytes_down_total{{listen=\"127.0.0.1:{port}\",name=\"{n}\",backend=\"127.0.0.1:{}\",proto=\"udp\"}}",
                if *n == "a" { a.port } else { b.port }
            ))
            .unwrap()
        })
        .sum();
    assert_eq!(bytes, 10 * (2 + 2 * MAX_DATAGRAM as u64 + 1400));

    let sessions = f.json("/api/connections");
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 10);
    for s in sessions {
        assert_eq!(s["proto"], "udp");
        assert_eq!(s["state"], "session");
        assert_eq!(s["listen"], format!("127.0.0.1:{port}/udp"));
        assert_eq!(s["datagrams_up"], 6);
        assert_eq!(s["datagrams_down"], 6);
    }
    let stats = f.json("/api/stats");
    assert_eq!(stats["pools"][0]["proto"], "udp");
    assert_eq!(stats["pools"][0]["accepted"], 10);
    assert_eq!(stats["udp_sessions"], 10);
    let rules = f.json("/api/rules");
    assert_eq!(
        rules["entries"][0]["listen"],
        format!("127.0.0.1:{port}/udp")
    );
}

#[test]
fn replies_leave_from_the_address_the_client_used() {
    let echo = UdpEcho::start(Duration::ZERO);
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!("a,{port}/udp,127.0.0.1,{}\n", echo.port))
        .workers(1)
        .web("127.0.0.1")
        .udp_bound(&[port])
        .start();
    // The forwarder listens on 0.0.0.0; 127.0.0.7 is one of the host's addresses.
    let c = client();
    for ip in [[127, 0, 0, 7], [127, 0, 0, 1]] {
        let to = SocketAddr::from((ip, port));
        c.send_to(b"where from?", to).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = c.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"where from?");
        assert_eq!(from, to);
    }
    drop(f);
}

#[test]
fn ten_thousand_concurrent_sessions_all_answered() {
    let echo = UdpEcho::start(Duration::ZERO);
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!("a,127.0.0.1:{port}/udp,127.0.0.1,{}\n", echo.port))
        .workers(1)
        .web("127.0.0.1")
        .udp_bound(&[port])
        .start();
    // 10,000 client addresses from 100 sockets: each socket sends from 100 loopback addresses
    // (127.0.1.1 ... 127.0.1.100 chosen per datagram with IP_PKTINFO), so the test needs 100
    // descriptors, not 10,000. Four threads, each with at most 100 datagrams in flight.
    const SOCKETS: usize = 100;
    const SOURCES: usize = 100;
    const ROUNDS: usize = 3;
    let target = local(port);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let sockets: Vec<UdpSocket> = (0..SOCKETS / 4)
                    .map(|_| {
                        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                        sys::enable_pktinfo(s.as_raw_fd(), false).unwrap();
                        sys::set_buffers(s.as_raw_fd(), 1 << 20);
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        s
                    })
                    .collect();
                let mut answered = 0;
                let mut buf = [0u8; 64];
                for round in 0..ROUNDS {
                    for (i, s) in sockets.iter().enumerate() {
                        for src in 0..SOURCES {
                            let ip = Ipv4Addr::new(127, 0, 1, src as u8 + 1);
                            let msg = format!("{t}/{i}/{src}/{round}");
                            sys::send_from_to(
                                s.as_raw_fd(),
                                msg.as_bytes(),
                                target,
                                Some(IpAddr::V4(ip)),
                            )
                            .unwrap();
                        }
                        let mut seen = HashSet::new();
                        for _ in 0..SOURCES {
                            let got = sys::recv_from_to(s.as_raw_fd(), &mut buf)
                                .expect("every ping answered");
                            let text = std::str::from_utf8(&buf[..got.len]).unwrap();
                            let src: usize = text.split('/').nth(2).unwrap().parse().unwrap();
                            assert_eq!(text, format!("{t}/{i}/{src}/{round}"));
                            assert_eq!(
                                got.to,
                                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 1, src as u8 + 1))),
                                "reply went to the address that sent it"
                            );
                            seen.insert(src);
                        }
                        assert_eq!(seen.len(), SOURCES);
                        answered += SOURCES;
                    }
                }
                answered
            })
        })
        .collect();
    let answered: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(answered, SOCKETS * SOURCES * ROUNDS);
    assert_eq!(echo.sessions(), SOCKETS * SOURCES);
    assert_eq!(f.metric("forwarder_active_udp_sessions"), Some(10_000));
    assert_eq!(
        f.metric(&format!(
            "forwarder_pool_accepted_total{{listen=\"127.0.0.1:{port}\",proto=\"udp\"}}"
        )),
        Some(10_000)
    );
}

#[test]
fn idle_sessions_expire_and_a_full_table_evicts_the_least_recently_active() {
    let echo = UdpEcho::start(Duration::ZERO);
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!("a,127.0.0.1:{port}/udp,127.0.0.1,{}\n", echo.port))
        .workers(1)
        .web("127.0.0.1")
        .args(["--udp-max-sessions", "3", "--udp-idle-timeout-s", "2"])
        .udp_bound(&[port])
        .start();
    let c: Vec<UdpSocket> = (0..5).map(|_| client()).collect();
    for s in &c[..3] {
        assert_eq!(ping(s, port, b"x"), b"x");
    }
    // 0 speaks again: 1 is now the least recently active, then 2.
    assert_eq!(ping(&c[0], port, b"y"), b"y");
    assert_eq!(ping(&c[3], port, b"z"), b"z");
    assert_eq!(ping(&c[4], port, b"w"), b"w");
    let evicted = format!(
        "forwarder_pool_udp_sessions_evicted_total{{listen=\"127.0.0.1:{port}\",proto=\"udp\"}}"
    );
    assert_eq!(f.metric(&evicted), Some(2));
    assert_eq!(f.metric("forwarder_active_udp_sessions"), Some(3));
    let clients: HashSet<String> = f
        .json("/api/connections")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["client"].as_str().unwrap().to_string())
        .collect();
    let expect: HashSet<String> = [0, 3, 4]
        .iter()
        .map(|&i| c[i].local_addr().unwrap().to_string())
        .collect();
    assert_eq!(clients, expect, "sessions 1 and 2 were evicted");
    // The log reaches us through a reader thread, possibly after the figures: wait for it.
    f.process.wait_for_output("udp session table full", WAIT);
    assert_eq!(
        f.process.output().matches("udp session table full").count(),
        1,
        "one log line per episode:\n{}",
        f.process.output()
    );
    // An evicted client simply gets a new session.
    assert_eq!(ping(&c[1], port, b"back"), b"back");
    assert_eq!(f.metric(&evicted), Some(3));
    // Idle for 2 s: every session ends.
    assert!(
        wait_until(WAIT, || f.metric("forwarder_active_udp_sessions")
            == Some(0)),
        "sessions never expired"
    );
    assert_eq!(
        f.metric(&evicted),
        Some(3),
        "expiry is not counted as eviction"
    );
    assert_eq!(ping(&c[2], port, b"new"), b"new");
    assert_eq!(f.metric("forwarder_active_udp_sessions"), Some(1));
}

#[test]
fn sessions_fail_over_when_a_backend_is_port_unreachable() {
    let live = UdpEcho::start(Duration::ZERO);
    let dead = common::dead_port();
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!(
            "dead,127.0.0.1:{port}/udp,127.0.0.1,{dead}\nlive,127.0.0.1:{port}/udp,127.0.0.1,{}\n",
            live.port
        ))
        .workers(1)
        .web("127.0.0.1")
        .udp_bound(&[port])
        .start();
    // The session on the dead backend loses its first datagram (answered by ICMP port
    // unreachable), moves to the live one, and the client's retry is answered.
    let mut retries = 0;
    for i in 0..6 {
        let c = client();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let msg = format!("hello {i}");
        let mut answered = false;
        for _ in 0..5 {
            c.send_to(msg.as_bytes(), local(port)).unwrap();
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = c.recv_from(&mut buf) {
                assert_eq!(&buf[..n], msg.as_bytes());
                answered = true;
                break;
            }
            retries += 1;
        }
        assert!(
            answered,
            "client {i} never answered:\n{}",
            f.process.output()
        );
    }
    assert!(retries >= 1, "the first session landed on the dead backend");
    assert!(
        retries <= 2,
        "once marked down, new sessions go straight to the live backend"
    );
    let labels = |name: &str, p: u16| {
        format!("{{listen=\"127.0.0.1:{port}\",name=\"{name}\",backend=\"127.0.0.1:{p}\",proto=\"udp\"}}")
    };
    assert_eq!(
        f.metric(&format!("forwarder_backend_up{}", labels("dead", dead))),
        Some(0)
    );
    assert!(
        f.metric(&format!(
            "forwarder_backend_connect_failures_total{}",
            labels("dead", dead)
        ))
        .unwrap()
            >= 1
    );
    assert_eq!(
        f.metric(&format!(
            "forwarder_backend_active_connections{}",
            labels("live", live.port)
        )),
        Some(6),
        "every session ends up on the live backend: {}\n{}",
        f.text("/api/connections"),
        f.process.output()
    );
    assert!(f
        .process
        .output()
        .contains("backend down: udp port unreachable"));
}

#[test]
fn reload_adds_and_removes_udp_ports_without_touching_tcp_or_other_sessions() {
    let tcp_backend = Backend::echo(None);
    let echo = UdpEcho::start(Duration::ZERO);
    let (tcp, u1, u2) = (free_port(), free_port(), free_port());
    let base = format!(
        "t,127.0.0.1:{tcp},127.0.0.1,{}\nu1,127.0.0.1:{u1}/udp,127.0.0.1,{}\n",
        tcp_backend.port, echo.port
    );
    let f = Forwarder::builder()
        .rules(&base)
        .workers(2)
        .web("127.0.0.1")
        .udp_bound(&[u1])
        .start();
    assert!(wait_until(WAIT, || common::is_listening(tcp)));
    let mut conn = TcpStream::connect(local(tcp)).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(common::round_trip(&mut conn, b"tcp 1"), b"tcp 1");
    let c1 = client();
    assert_eq!(ping(&c1, u1, b"udp 1"), b"udp 1");
    let session_ids = |f: &Forwarder| -> Vec<String> {
        f.json("/api/connections")
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{} {}", c["proto"], c["id"]))
            .collect()
    };
    let before = session_ids(&f);
    assert_eq!(before.len(), 2, "one TCP connection and one UDP session");

    // Traffic keeps running on both while the rules change.
    f.rewrite_rules(&format!(
        "{base}u2,127.0.0.1:{u2}/udp,127.0.0.1,{}\n",
        echo.port
    ));
    f.wait_bound(u2, 2);
    let c2 = client();
    assert_eq!(ping(&c2, u2, b"udp 2"), b"udp 2");
    assert_eq!(ping(&c1, u1, b"udp 1 again"), b"udp 1 again");
    assert_eq!(common::round_trip(&mut conn, b"tcp 2"), b"tcp 2");
    let during = session_ids(&f);
    assert!(
        before.iter().all(|id| during.contains(id)),
        "{before:?} {during:?}"
    );

    f.rewrite_rules(&base);
    assert!(
        wait_until(WAIT, || udp_sockets_on(u2) == 0),
        "u2 still bound"
    );
    // The removed port's session ended; its client now meets a closed port.
    c2.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c2.connect(local(u2)).unwrap();
    let _ = c2.send(b"anyone?");
    let mut buf = [0u8; 16];
    assert!(
        c2.recv(&mut buf).is_err(),
        "nothing answers on a removed port"
    );
    assert_eq!(ping(&c1, u1, b"udp 1 last"), b"udp 1 last");
    assert_eq!(common::round_trip(&mut conn, b"tcp 3"), b"tcp 3");
    assert_eq!(session_ids(&f), before);
    assert_eq!(
        echo.sessions(),
        2,
        "u1's client kept its one session throughout"
    );
}

#[test]
fn garbage_floods_and_odd_sources_keep_memory_bounded() {
    let echo = UdpEcho::start(Duration::ZERO);
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!("a,127.0.0.1:{port}/udp,127.0.0.1,{}\n", echo.port))
        .workers(1)
        .web("127.0.0.1")
        .args(["--udp-max-sessions", "500"])
        .udp_bound(&[port])
        .start();
    // Zero-length datagrams pass as zero-length datagrams.
    let c = client();
    assert_eq!(ping(&c, port, b""), b"");
    let rss_before = f.rss_kib();

    // A flood from one address: one session, the forwarder keeps answering.
    let flood = UdpSocket::bind(local(0)).unwrap();
    let big = vec![0xA5u8; 1400];
    let deadline = Instant::now() + Duration::from_secs(5);
    for i in 0..50_000 {
        let _ = flood.send_to(if i % 2 == 0 { &big[..] } else { &[] }, local(port));
        if Instant::now() > deadline {
            break;
        }
    }
    // 5,000 addresses nobody will hear from again (127.2.x.y via IP_PKTINFO), ten times the
    // session table: the oldest are evicted, the table stays at its limit.
    let spoof = UdpSocket::bind("0.0.0.0:0").unwrap();
    for i in 0..5_000u32 {
        let ip = Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250) as u8 + 1);
        let _ = sys::send_from_to(spoof.as_raw_fd(), b"?", local(port), Some(IpAddr::V4(ip)));
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(10)); // stay within the socket buffers
        }
    }
    let accepted =
        format!("forwarder_pool_accepted_total{{listen=\"127.0.0.1:{port}\",proto=\"udp\"}}");
    let evicted = format!(
        "forwarder_pool_udp_sessions_evicted_total{{listen=\"127.0.0.1:{port}\",proto=\"udp\"}}"
    );
    // Settled: what was made and not evicted is what is live, and the table is at its limit.
    assert!(
        wait_until(WAIT, || {
            let (made, gone) = (f.metric(&accepted), f.metric(&evicted));
            made.is_some_and(|m| m >= 2_000) && made.zip(gone).is_some_and(|(m, g)| m - g == 500)
        }),
        "the table never filled:\n{}",
        f.text("/metrics")
    );
    assert_eq!(f.metric("forwarder_active_udp_sessions"), Some(500));
    let c2 = client();
    assert_eq!(ping(&c2, port, b"still here"), b"still here");
    let grown = f.rss_kib().saturating_sub(rss_before);
    assert!(grown < 32 * 1024, "memory grew by {grown} KiB");
}

#[test]
fn sigterm_stops_reading_but_lets_replies_in_flight_arrive() {
    let slow = UdpEcho::start(Duration::from_millis(300));
    let port = free_port();
    let mut f = Forwarder::builder()
        .rules(&format!("a,127.0.0.1:{port}/udp,127.0.0.1,{}\n", slow.port))
        .workers(1)
        .web("127.0.0.1")
        .udp_bound(&[port])
        .start();
    let c = client();
    c.send_to(b"late reply", local(port)).unwrap();
    assert!(wait_until(WAIT, || slow.datagrams() == 1));
    f.process.signal(libc::SIGTERM);
    let mut buf = [0u8; 64];
    let (n, _) = c.recv_from(&mut buf).expect("the reply in flight arrives");
    assert_eq!(&buf[..n], b"late reply");
    let started = Instant::now();
    assert!(
        f.process.wait_exit(Duration::from_secs(10)).is_some(),
        "did not exit:\n{}",
        f.process.output()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_one_session_table_never_mixes_two_clients_datagrams() {
    let echo = UdpEcho::start(Duration::ZERO);
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!("a,127.0.0.1:{port}/udp,127.0.0.1,{}\n", echo.port))
        .workers(1)
        .web("127.0.0.1")
        .args(["--udp-max-sessions", "1"])
        .udp_bound(&[port])
        .start();
    let (a, b) = (client(), client());
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    b.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Interleaved so both clients' datagrams share the forwarder's receive batches; each new
    // session evicts the other's.
    for i in 0..200 {
        a.send_to(format!("a{i}").as_bytes(), local(port)).unwrap();
        b.send_to(format!("b{i}").as_bytes(), local(port)).unwrap();
    }
    let mut buf = [0u8; 64];
    for (s, tag) in [(&a, b'a'), (&b, b'b')] {
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            assert_eq!(
                buf[0],
                tag,
                "a datagram of the other client: {:?}",
                &buf[..n]
            );
        }
    }
    assert_eq!(ping(&a, port, b"a-last"), b"a-last");
    assert_eq!(f.metric("forwarder_active_udp_sessions"), Some(1));
}
