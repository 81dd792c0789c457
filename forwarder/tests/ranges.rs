//! Port ranges end to end: the real forwarder on a range of loopback ports, backends that say
//! which port they were reached on, every port of the range checked, TCP and UDP; overlaps refused
//! at `--check` and on a live edit (which keeps the rules in force); limits `--check` and the
//! start agree on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{is_listening, local, Forwarder, WAIT};
use testbed_dev::testing::wait_until;

const PORTS: u16 = 100;

/// `n` consecutive loopback ports that are free for both TCP and UDP right now (bound and let go:
/// another process could take one in between, so tests that start listeners on them retry).
fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let first = 10_000 + fastrand::u16(0..20_000);
        let ok = (first..first + n)
            .all(|p| TcpListener::bind(local(p)).is_ok() && UdpSocket::bind(local(p)).is_ok());
        if ok {
            return first;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// TCP backends on `n` consecutive ports, each greeting a connection with `port NNNNN\n` (its
/// own port), then echoing.
fn tcp_port_backends(n: u16) -> u16 {
    loop {
        let first = free_ports(n);
        let listeners: Vec<TcpListener> = (first..first + n)
            .map_while(|p| TcpListener::bind(local(p)).ok())
            .collect();
        if listeners.len() < n as usize {
            continue;
        }
        for l in listeners {
            std::thread::spawn(move || {
                let port = l.local_addr().unwrap().port();
                for s in l.incoming() {
                    let Ok(mut s) = s else { continue };
                    std::thread::spawn(move || {
                        let _ = s.write_all(format!("port {port:05}\n").as_bytes());
                        let mut buf = [0u8; 4096];
                        while let Ok(k @ 1..) = s.read(&mut buf) {
                            if s.write_all(&buf[..k]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        return first;
    }
}

/// One TCP backend that reads a PROXY v1 header and answers with the destination port it names
/// (`port NNNNN\n`): how a to-one-port range shows which port the client reached.
fn tcp_proxy_backend() -> u16 {
    let l = TcpListener::bind(local(0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let mut r = BufReader::new(s);
                let mut header = String::new();
                if r.read_line(&mut header).is_err() {
                    return;
                }
                // PROXY TCP4 client dest cport dport
                let dport = header.split_whitespace().nth(5).unwrap_or("0").to_string();
                let mut s = r.into_inner();
                let _ = s.write_all(
                    format!("port {:05}\n", dport.parse::<u16>().unwrap_or(0)).as_bytes(),
                );
            });
        }
    });
    port
}

/// UDP backends on `n` consecutive ports answering each datagram with `NNNNN:` (their port) and
/// the datagram.
fn udp_port_backends(n: u16) -> u16 {
    loop {
        let first = free_ports(n);
        let sockets: Vec<UdpSocket> = (first..first + n)
            .map_while(|p| UdpSocket::bind(local(p)).ok())
            .collect();
        if sockets.len() < n as usize {
            continue;
        }
        for s in sockets {
            std::thread::spawn(move || {
                let port = s.local_addr().unwrap().port();
                let mut buf = [0u8; 2048];
                while let Ok((k, from)) = s.recv_from(&mut buf) {
                    let mut reply = format!("{port:05}:").into_bytes();
                    reply.extend_from_slice(&buf[..k]);
                    let _ = s.send_to(&reply, from);
                }
            });
        }
        return first;
    }
}

/// Connects to `port` and reads the backend's greeting.
fn greeting(port: u16) -> String {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = [0u8; 11];
    s.read_exact(&mut line).unwrap();
    let text = String::from_utf8_lossy(&line).to_string();
    // And the bytes pass both ways.
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping", "through {port}");
    text
}

fn check(rules: &str) -> (bool, String) {
    check_with(rules, &[])
}

fn check_with(rules: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.csv");
    std::fs::write(&path, rules).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .arg("--rules")
        .arg(&path)
        .arg("--check")
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_tcp_range_reaches_the_same_offset_or_one_port_on_every_port() {
    let backends = tcp_port_backends(PORTS);
    let one = tcp_proxy_backend();
    let listen = free_ports(2 * PORTS);
    let (a, b) = (listen, listen + PORTS);
    let rules = format!(
        "game,{a}-{},127.0.0.1,{backends}-{}\nweb,127.0.0.1:{b}-{},127.0.0.1,{one},send_proxy=v1\n",
        a + PORTS - 1,
        backends + PORTS - 1,
        b + PORTS - 1
    );
    let f = Forwarder::builder()
        .rules(&rules)
        .workers(2)
        .listening(&[a, a + PORTS - 1, b, b + PORTS - 1])
        .start();
    for k in 0..PORTS {
        assert_eq!(
            greeting(a + k),
            format!("port {:05}\n", backends + k),
            "listen port {} must reach backend port {}",
            a + k,
            backends + k
        );
    }
    for k in 0..PORTS {
        let mut s = TcpStream::connect(local(b + k)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut line = String::new();
        BufReader::new(&mut s).read_line(&mut line).unwrap();
        assert_eq!(
            line,
            format!("port {:05}\n", b + k),
            "the PROXY header names the port reached"
        );
    }
    let out = f.process.output();
    assert!(
        out.contains(&format!("0.0.0.0:{a}-{}", a + PORTS - 1))
            && out.contains("100 ports served port by port"),
        "the start says how the range is served:\n{out}"
    );
}

#[test]
fn a_udp_range_keeps_a_session_per_client_per_port() {
    let backends = udp_port_backends(PORTS);
    let listen = free_ports(PORTS);
    let rules = format!(
        "dns,{listen}-{}/udp,127.0.0.1,{backends}-{}\n",
        listen + PORTS - 1,
        backends + PORTS - 1
    );
    let f = Forwarder::builder()
        .rules(&rules)
        .web("127.0.0.1")
        .udp_bound(&[listen, listen + PORTS - 1])
        .start();
    let client = UdpSocket::bind(local(0)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for k in 0..PORTS {
        let msg = format!("hello {k}");
        let mut buf = [0u8; 2048];
        // UDP may drop a datagram: a few tries, each waiting for its own answer.
        let got = (0..5).find_map(|_| {
            client.send_to(msg.as_bytes(), local(listen + k)).unwrap();
            let (n, from) = client.recv_from(&mut buf).ok()?;
            Some((String::from_utf8_lossy(&buf[..n]).to_string(), from))
        });
        let (reply, from) = got.unwrap_or_else(|| panic!("no answer through {}", listen + k));
        assert_eq!(reply, format!("{:05}:{msg}", backends + k));
        assert_eq!(
            from,
            local(listen + k),
            "the reply comes from the port the client used"
        );
    }
    let sessions = f.json("/api/connections");
    let listens: std::collections::HashSet<String> = sessions
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["listen"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listens.len(),
        PORTS as usize,
        "one session per port, each naming its port"
    );
    let stats = f.json("/api/stats");
    assert_eq!(
        stats["pools"][0]["label"],
        format!("0.0.0.0:{listen}-{}/udp", listen + PORTS - 1),
        "one pool for the range"
    );
}

#[test]
fn overlaps_are_refused_at_check_and_live_and_the_rules_in_force_stay() {
    let backends = tcp_port_backends(10);
    let listen = free_ports(20);
    let range = format!("{listen}-{}", listen + 9);
    let good = format!("game,{range},127.0.0.1,{backends}-{}\n", backends + 9);
    let overlap = format!("{good}other,{},127.0.0.1,{backends}\n", listen + 5);
    let (ok, err) = check(&overlap);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "entries.csv:2: listen_port: {} is already in {range} (line 1)",
            listen + 5
        )),
        "{err}"
    );
    let (ok, err) = check(&format!(
        "game,{range},127.0.0.1,{backends}-{}\n",
        backends + 10
    ));
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "entries.csv:1: dest_port: {backends}-{} has 11 ports but listen_port {range} has 10",
            backends + 10
        )),
        "{err}"
    );

    let f = Forwarder::builder()
        .rules(&good)
        .listening(&[listen, listen + 9])
        .start();
    f.rewrite_rules(&overlap);
    assert!(
        wait_until(WAIT, || f
            .process
            .output()
            .contains("previous rules stay in force")),
        "{}",
        f.process.output()
    );
    assert!(f
        .process
        .output()
        .contains(&format!("{} is already in {range} (line 1)", listen + 5)));
    assert_eq!(greeting(listen + 5), format!("port {:05}\n", backends + 5));
    // A reload that removes the range and adds another: the listeners follow.
    let moved = format!(
        "game,{}-{},127.0.0.1,{backends}\n",
        listen + 10,
        listen + 19
    );
    f.rewrite_rules(&moved);
    assert!(wait_until(WAIT, || is_listening(listen + 19) && !is_listening(listen)));
    assert_eq!(greeting(listen + 15), format!("port {backends:05}\n"));
}

#[test]
fn check_and_start_agree_on_limits_and_five_thousand_rules_start() {
    // 20,000 ports of one range cannot be listened on port by port within 20,000 descriptors;
    // under --user (no CAP_NET_ADMIN for nftables) it cannot be steered either.
    let (ok, err) = check_with("big,20000-39999,127.0.0.1,80\n", &["--user", "nobody"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("entries.csv:1: listen_port: 0.0.0.0:20000-39999 needs 20000 listening sockets per worker"),
        "{err}"
    );
    assert!(
        err.contains("it cannot be steered to one socket: --user nobody drops CAP_NET_ADMIN"),
        "{err}"
    );
    // 5,000 single-port rules: `--check` says OK and the forwarder starts on all of them (the
    // old fixed cap refused this at start only).
    let backend = common::Backend::echo(None);
    let first = free_ports(5_000);
    let rules: String = (0..5_000u16)
        .map(|k| format!("r{k},{},127.0.0.1,{}\n", first + k, backend.port))
        .collect();
    let (ok, err) = check(&rules);
    assert!(ok, "{err}");
    assert!(err.contains("OK"), "{err}");
    let f = Forwarder::builder()
        .rules(&rules)
        .listening(&[first, first + 4_999])
        .start();
    let mut s = TcpStream::connect(local(first + 2_500)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(common::round_trip(&mut s, b"hi"), b"hi");
    drop(f);
}
