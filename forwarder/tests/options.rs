//! Rule options through the real forwarder on loopback: clients bound to 127.0.0.x look like
//! different hosts. Access lists, smooth weights, leastconn, source hashing, max_conns, the PROXY
//! protocol both ways, and a bad option in a live edit.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};

use common::*;
use forwarder::tcp::proxy;
use testbed_dev::testing::{free_port, wait_until};

/// Connects to the forwarder's `port` from loopback address `from` (127.0.0.x).
fn connect_from(from: [u8; 4], port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&local(port).into()).unwrap();
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// The backend's tag read from a connection from `from`; `None` when the forwarder closed it.
fn tag_from(from: [u8; 4], port: u16) -> Option<String> {
    let mut s = connect_from(from, port);
    let mut tag = [0u8; 2];
    match s.read_exact(&mut tag) {
        Ok(()) => Some(String::from_utf8_lossy(&tag).into_owned()),
        Err(_) => None,
    }
}

fn listen_label(port: u16) -> String {
    format!("{{listen=\"0.0.0.0:{port}\"")
}

#[test]
fn an_allowed_client_is_served_and_a_denied_one_closed_counted_and_logged_once() {
    let b = Backend::echo(Some("OK"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "ssh,{port},127.0.0.1,{},\"allow=127.0.0.0/24,2001:db8::/32 deny=127.0.0.66\"\n",
            b.port
        ))
        .workers(2)
        .web("127.0.0.1")
        .args(["--max-connections", "2000"])
        .listening(&[port])
        .start();
    assert_eq!(tag_from([127, 0, 0, 5], port).as_deref(), Some("OK"));
    assert_eq!(tag_from([127, 0, 0, 67], port).as_deref(), Some("OK"));
    for _ in 0..3 {
        assert_eq!(tag_from([127, 0, 0, 66], port), None, "denied");
        assert_eq!(tag_from([127, 0, 1, 5], port), None, "not allowed");
    }
    let denied = format!(
        "forwarder_pool_refused_total{},reason=\"denied\"}}",
        listen_label(port)
    );
    assert!(wait_until(WAIT, || fwd.counter(&denied) == 6));
    assert_eq!(
        b.accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "no backend connect"
    );
    // The log reaches us through a reader thread, possibly after the figures: wait for it.
    fwd.process.wait_for_output("client=127.0.0.66", WAIT);
    let out = fwd.process.output();
    // Once per address per worker and minute: at most two workers' worth.
    let logged = out.matches("client=127.0.0.66").count();
    assert!(
        (1..=2).contains(&logged),
        "{logged} lines for 127.0.0.66:\n{out}"
    );
}

#[test]
fn the_global_deny_list_applies_to_every_pool() {
    let b = Backend::echo(Some("OK"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .forward("open", port, b.port)
        .workers(1)
        .args(["--deny", "127.0.0.7", "--allow", "127.0.0.0/8"])
        .start();
    assert_eq!(tag_from([127, 0, 0, 8], port).as_deref(), Some("OK"));
    assert_eq!(tag_from([127, 0, 0, 7], port), None);
    assert!(fwd
        .process
        .wait_for_output("refused by the access list", WAIT));
}

#[test]
fn weights_three_to_one_are_exact_and_smooth_over_400_connections() {
    let a = Backend::echo(Some("AA"));
    let b = Backend::echo(Some("BB"));
    let port = free_port();
    let _fwd = Forwarder::builder()
        .rules(&format!(
            "a,{port},127.0.0.1,{},weight=3\nb,{port},127.0.0.1,{},weight=1\n",
            a.port, b.port
        ))
        .workers(2)
        .listening(&[port])
        .start();
    let got: Vec<String> = (0..400).map(|_| read_tag(port, 2)).collect();
    assert_eq!(got.iter().filter(|t| *t == "AA").count(), 300);
    // nginx's smooth order, whichever of the two workers accepted each connection.
    let want: Vec<&str> = ["AA", "AA", "BB", "AA"].repeat(100);
    assert_eq!(got, want);
}

#[test]
fn leastconn_sends_new_connections_to_the_backend_with_fewest_open() {
    let a = Backend::echo(Some("AA"));
    let b = Backend::echo(Some("BB"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "a,{port},127.0.0.1,{},balance=leastconn\nb,{port},127.0.0.1,{}\n",
            a.port, b.port
        ))
        .workers(2)
        .web("127.0.0.1")
        .args(["--max-connections", "2000"])
        .listening(&[port])
        .start();
    let open = |name: &str, backend: u16| {
        format!(
            "forwarder_backend_active_connections{{listen=\"0.0.0.0:{port}\",name=\"{name}\",backend=\"127.0.0.1:{backend}\"}}"
        )
    };
    // Six long-lived connections spread three and three.
    let mut held: Vec<(String, TcpStream)> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(local(port)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut tag = [0u8; 2];
            s.read_exact(&mut tag).unwrap();
            (String::from_utf8_lossy(&tag).into_owned(), s)
        })
        .collect();
    assert_eq!(held.iter().filter(|(t, _)| t == "AA").count(), 3);
    // Skew: a's three end, b keeps its three.
    held.retain(|(t, _)| t == "BB");
    assert!(wait_until(WAIT, || fwd.counter(&open("a", a.port)) == 0));
    assert_eq!(fwd.counter(&open("b", b.port)), 3);
    let next: Vec<(String, TcpStream)> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(local(port)).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut tag = [0u8; 2];
            s.read_exact(&mut tag).unwrap();
            (String::from_utf8_lossy(&tag).into_owned(), s)
        })
        .collect();
    let tags: Vec<&str> = next.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        tags,
        ["AA", "AA", "AA"],
        "the emptied backend takes the new ones"
    );
    drop(held);
}

#[test]
fn source_hash_is_stable_across_reconnects_and_a_new_backend_takes_about_one_in_n() {
    let backends: Vec<Backend> = ["B0", "B1", "B2", "B3"]
        .iter()
        .map(|t| Backend::echo(Some(t)))
        .collect();
    let port = free_port();
    let row = |i: usize| {
        format!(
            "b{i},{port},127.0.0.1,{},balance=source\n",
            backends[i].port
        )
    };
    let fwd = Forwarder::builder()
        .rules(&(0..3).map(row).collect::<String>())
        .workers(2)
        .listening(&[port])
        .start();
    let clients: Vec<[u8; 4]> = (10..74).map(|i| [127, 0, 0, i]).collect();
    let first: Vec<String> = clients
        .iter()
        .map(|&c| tag_from(c, port).unwrap())
        .collect();
    for (c, want) in clients.iter().zip(&first) {
        for _ in 0..2 {
            assert_eq!(&tag_from(*c, port).unwrap(), want, "client {c:?} moved");
        }
    }
    assert!(first.iter().any(|t| t == "B0") && first.iter().any(|t| t == "B2"));
    fwd.rewrite_rules(&(0..4).map(row).collect::<String>());
    assert!(wait_until(WAIT, || fwd
        .process
        .output()
        .contains("rules applied")
        || clients
            .iter()
            .any(|&c| tag_from(c, port).as_deref() == Some("B3"))));
    let mut moved = 0;
    for (c, before) in clients.iter().zip(&first) {
        let now = tag_from(*c, port).unwrap();
        if &now != before {
            assert_eq!(now, "B3", "client {c:?} moved between old backends");
            moved += 1;
        }
    }
    // 64 clients, a quarter expected on the new backend.
    assert!((4..=28).contains(&moved), "{moved} of 64 moved");
}

#[test]
fn max_conns_skips_a_full_backend_then_refuses_and_counts() {
    let a = Backend::echo(Some("AA"));
    let b = Backend::echo(Some("BB"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "a,{port},127.0.0.1,{},max_conns=1\nb,{port},127.0.0.1,{},max_conns=2\n",
            a.port, b.port
        ))
        .workers(2)
        .web("127.0.0.1")
        .args(["--max-connections", "2000"])
        .listening(&[port])
        .start();
    let mut held = Vec::new();
    let mut tags = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(local(port)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut tag = [0u8; 2];
        s.read_exact(&mut tag).unwrap();
        tags.push(String::from_utf8_lossy(&tag).into_owned());
        held.push(s);
    }
    tags.sort();
    assert_eq!(tags, ["AA", "BB", "BB"]);
    for _ in 0..2 {
        assert_eq!(tag_from([127, 0, 0, 1], port), None, "all full");
    }
    let full = format!(
        "forwarder_pool_refused_total{},reason=\"max_conns\"}}",
        listen_label(port)
    );
    assert_eq!(fwd.counter(&full), 2);
    drop(held.pop());
    assert!(
        wait_until(WAIT, || tag_from([127, 0, 0, 1], port).is_some()),
        "a freed place is taken again"
    );
}

#[test]
fn a_bad_option_in_a_live_edit_keeps_the_old_rules() {
    let a = Backend::echo(Some("AA"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .forward("a", port, a.port)
        .workers(1)
        .start();
    fwd.rewrite_rules(&format!(
        "a,{port},127.0.0.1,{},\"weight=0 allow=10.0.0.0/8\"\n",
        a.port
    ));
    assert!(
        fwd.process.wait_for_output(
            "entries.csv:1: options: weight=0 is out of range 1-256",
            WAIT
        ),
        "{}",
        fwd.process.output()
    );
    assert!(fwd
        .process
        .output()
        .contains("previous rules stay in force"));
    assert_eq!(
        read_tag(port, 2),
        "AA",
        "old rules (no allow list) still forward"
    );
}

/// A backend that accepts one connection and returns everything it received until EOF.
fn recording_backend() -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    (port, handle)
}

#[test]
fn send_proxy_v1_and_v2_name_the_real_client_before_its_bytes() {
    for version in ["v1", "v2"] {
        let (backend, received) = recording_backend();
        let port = free_port();
        let _fwd = Forwarder::builder()
            .rules(&format!(
                "web,{port},127.0.0.1,{backend},send_proxy={version}\n"
            ))
            .workers(1)
            .listening(&[port])
            .start();
        let mut s = connect_from([127, 0, 0, 9], port);
        let client = s.local_addr().unwrap();
        s.write_all(b"hello").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let got = received.join().unwrap();
        let header = proxy::parse(&got).unwrap().expect("a whole header");
        let (src, dst) = header.addrs.unwrap();
        assert_eq!(src, client, "{version}");
        assert_eq!(dst, local(port), "{version}");
        assert_eq!(&got[header.len..], b"hello", "{version}");
        if version == "v1" {
            let line = format!(
                "PROXY TCP4 127.0.0.9 127.0.0.1 {} {port}\r\n",
                client.port()
            );
            assert_eq!(&got[..header.len], line.as_bytes());
        } else {
            assert_eq!(&got[..12], proxy::V2_SIGNATURE);
        }
    }
}

#[test]
fn accept_proxy_takes_the_client_from_the_header_for_access_lists_and_send_proxy() {
    let (backend, received) = recording_backend();
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "lb,{port},127.0.0.1,{backend},\"accept_proxy send_proxy=v1 deny=10.9.9.9\"\n"
        ))
        .workers(1)
        .web("127.0.0.1")
        .args(["--max-connections", "2000"])
        .args(["--connect-timeout-ms", "500"])
        .listening(&[port])
        .start();
    // From the load balancer in front: a v2 header naming 10.9.8.7:1234 -> 10.0.0.1:443.
    let theirs: SocketAddr = "10.9.8.7:1234".parse().unwrap();
    let reached: SocketAddr = "10.0.0.1:443".parse().unwrap();
    let mut s = TcpStream::connect(local(port)).unwrap();
    let mut first = proxy::encode(forwarder::rules::options::ProxyVersion::V2, theirs, reached);
    first.extend_from_slice(b"payload");
    s.write_all(&first).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let got = received.join().unwrap();
    assert_eq!(got, b"PROXY TCP4 10.9.8.7 10.0.0.1 1234 443\r\npayload");
    // The header's address meets the access list.
    let mut denied = TcpStream::connect(local(port)).unwrap();
    denied.set_read_timeout(Some(WAIT)).unwrap();
    denied
        .write_all(b"PROXY TCP4 10.9.9.9 10.0.0.1 1 443\r\nx")
        .unwrap();
    assert!(matches!(denied.read(&mut [0u8; 4]), Ok(0) | Err(_)));
    // No header within the connect timeout, and garbage: closed and counted.
    let mut silent = TcpStream::connect(local(port)).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    assert!(matches!(silent.read(&mut [0u8; 4]), Ok(0) | Err(_)));
    let mut garbage = TcpStream::connect(local(port)).unwrap();
    garbage.set_read_timeout(Some(WAIT)).unwrap();
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(matches!(garbage.read(&mut [0u8; 4]), Ok(0) | Err(_)));
    let label = listen_label(port);
    assert_eq!(
        fwd.counter(&format!(
            "forwarder_pool_refused_total{label},reason=\"proxy_header\"}}"
        )),
        2
    );
    assert_eq!(
        fwd.counter(&format!(
            "forwarder_pool_refused_total{label},reason=\"denied\"}}"
        )),
        1
    );
}

/// The access log's lines, once there are `n` of them.
fn log_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(WAIT, || read().len() >= n),
        "{} of {n} lines in {}",
        read().len(),
        path.display()
    );
    read()
}

#[test]
fn the_access_log_has_one_line_per_connection_matching_what_happened_and_reopens_on_sigusr1() {
    let b = Backend::echo(Some("OK"));
    let port = free_port();
    let dead_pool = free_port();
    let dead = dead_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let fwd = Forwarder::builder()
        .rules(&format!(
            "web,{port},127.0.0.1,{},deny=127.0.0.66\ngone,{dead_pool},127.0.0.1,{dead}\n",
            b.port
        ))
        .workers(2)
        .args(["--access-log", log.to_str().unwrap()])
        .listening(&[port, dead_pool])
        .start();
    // A whole exchange the client ends: 2 bytes up, tag + echo down.
    let mut s = connect_from([127, 0, 0, 5], port);
    let client = s.local_addr().unwrap();
    s.write_all(b"hi").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"OKhi");
    let lines = log_lines(&log, 1);
    let f: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(f.len(), 9, "{}", lines[0]);
    assert!(
        chrono::DateTime::parse_from_rfc3339(f[0]).is_ok(),
        "{}",
        f[0]
    );
    assert_eq!(f[1], client.to_string());
    assert_eq!(f[2], format!("0.0.0.0:{port}"));
    assert_eq!(f[3], "web");
    assert_eq!(f[4], format!("127.0.0.1:{}", b.port));
    assert_eq!(&f[5..7], ["up=2", "down=4"]);
    assert!(f[7].starts_with("ms="));
    assert_eq!(f[8], "client_fin");
    // Denied, then a pool whose only backend is gone.
    assert_eq!(tag_from([127, 0, 0, 66], port), None);
    let lines = log_lines(&log, 2);
    assert!(
        lines[1].ends_with(" - - up=0 down=0 ms=0 denied"),
        "{}",
        lines[1]
    );
    assert!(lines[1].contains(" 127.0.0.66:"));
    assert_eq!(tag_from([127, 0, 0, 5], dead_pool), None);
    let lines = log_lines(&log, 3);
    assert!(lines[2].ends_with(" no_backend"), "{}", lines[2]);
    assert!(
        lines[2].contains(&format!(" gone 127.0.0.1:{dead} ")),
        "{}",
        lines[2]
    );
    // logrotate: rename, SIGUSR1 to the supervisor, the next line lands in a new file.
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    fwd.process.signal(libc::SIGUSR1);
    assert!(fwd
        .process
        .wait_for_output("reopen their access logs", WAIT));
    assert!(
        wait_until(WAIT, || {
            let _ = tag_from([127, 0, 0, 5], port);
            log.exists()
        }),
        "no new file after SIGUSR1:\n{}",
        fwd.process.output()
    );
    assert!(log_lines(&log, 1)[0].contains(&format!(" web 127.0.0.1:{} ", b.port)));
    // The reopen is asynchronous: a connection that ended as the signal arrived may still be in
    // the old file, after the three above.
    let old = std::fs::read_to_string(dir.path().join("access.log.1")).unwrap();
    assert!(old.lines().count() >= 3);
    assert!(old.lines().nth(2).unwrap().ends_with(" no_backend"));
}

#[test]
fn the_json_access_log_parses_back() {
    let b = Backend::echo(Some("OK"));
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.json");
    let _fwd = Forwarder::builder()
        .rules(&format!("web,{port},127.0.0.1,{},max_conns=1\n", b.port))
        .workers(1)
        .args([
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
        ])
        .listening(&[port])
        .start();
    let held = connect_from([127, 0, 0, 5], port);
    let mut tag = [0u8; 2];
    (&held).read_exact(&mut tag).unwrap();
    assert_eq!(tag_from([127, 0, 0, 6], port), None, "full");
    drop(held);
    let lines = log_lines(&log, 2);
    let v: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let limit = v
        .iter()
        .find(|j| j["ending"] == "limit")
        .expect("a limit line");
    assert!(limit["client"].as_str().unwrap().starts_with("127.0.0.6:"));
    assert!(limit["backend"].is_null());
    let served = v
        .iter()
        .find(|j| j["rule"] == "web")
        .expect("a served line");
    assert_eq!(served["bytes_down"], 2);
    assert_eq!(served["backend"], format!("127.0.0.1:{}", b.port));
    assert!(["client_fin", "reset"].contains(&served["ending"].as_str().unwrap()));
}

#[test]
fn max_conns_per_ip_holds_across_workers_and_frees_on_close() {
    let b = Backend::echo(Some("OK"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "web,{port},127.0.0.1,{},max_conns_per_ip=2\n",
            b.port
        ))
        .workers(3)
        .web("127.0.0.1")
        .args(["--max-connections", "2000"])
        .listening(&[port])
        .start();
    // Held connections, spread over the workers by SO_REUSEPORT.
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let s = connect_from([127, 0, 0, 5], port);
            (&s).read_exact(&mut [0u8; 2]).unwrap();
            s
        })
        .collect();
    for _ in 0..3 {
        assert_eq!(
            tag_from([127, 0, 0, 5], port),
            None,
            "third from one address"
        );
    }
    assert_eq!(tag_from([127, 0, 0, 6], port).as_deref(), Some("OK"));
    let refused = format!(
        "forwarder_pool_refused_total{},reason=\"max_conns_per_ip\"}}",
        listen_label(port)
    );
    assert_eq!(fwd.counter(&refused), 3);
    held.pop();
    assert!(
        wait_until(WAIT, || tag_from([127, 0, 0, 5], port).is_some()),
        "the address's freed place is taken again"
    );
}

#[test]
fn check_prints_the_options_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.csv");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let out = command()
            .arg("--check")
            .arg("--rules")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let port = free_port();
    let (ok, out) = check(&format!(
        "\"a\",\"{port}\",\"127.0.0.1\",\"80\",\"weight=3 balance=source\"\nb,{port},127.0.0.1,81\n"
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains("a 127.0.0.1:80 [weight=3 balance=source], b 127.0.0.1:81  (source hash)"),
        "{out}"
    );
    let (ok, out) = check(&format!("a,{port},127.0.0.1,80,\"allow=10.0.0.0/33\"\n"));
    assert!(!ok);
    assert!(
        out.contains("entries.csv:1: options: allow: \"10.0.0.0/33\" is not an address or CIDR"),
        "{out}"
    );
}

#[test]
fn a_killed_workers_per_ip_counts_are_freed() {
    let b = Backend::echo(Some("OK"));
    let port = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!(
            "web,{port},127.0.0.1,{},max_conns_per_ip=1\n",
            b.port
        ))
        .workers(1)
        .listening(&[port])
        .start();
    let held = connect_from([127, 0, 0, 5], port);
    (&held).read_exact(&mut [0u8; 2]).unwrap();
    assert_eq!(tag_from([127, 0, 0, 5], port), None, "at its limit");
    let worker = fwd.worker_pids()[0];
    // SAFETY: kill(2) on the forwarder's own worker.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert!(
        wait_until(WAIT, || fwd.worker_pids().iter().any(|&p| p != worker)),
        "the worker was not restarted:\n{}",
        fwd.process.output()
    );
    // The new worker listens a moment after it exists: until then a connect is refused.
    let served = || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 5], 0)).into())
            .unwrap();
        if socket.connect(&local(port).into()).is_err() {
            return false;
        }
        let mut s: TcpStream = socket.into();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.read_exact(&mut [0u8; 2]).is_ok()
    };
    assert!(
        wait_until(WAIT, served),
        "the dead worker's count still held the address:\n{}",
        fwd.process.output()
    );
}
