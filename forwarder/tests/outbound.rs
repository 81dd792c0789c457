//! The backend side of connections: `source=`, `--source`, `interface=` and `mark=` decide the
//! address a backend sees and the route the forwarder's packets take; an address the host does
//! not have is refused on load, naming the line.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;

use common::netns::{sh, Netns};
use common::{Forwarder, WAIT};
use testbed_dev::testing::{free_port, wait_until, ChildGuard};

/// A TCP server that tells each client the address it came from, then closes.
fn who_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = s.write_all(format!("{peer}\n").as_bytes());
        }
    });
}

/// The address the backend behind `addr` saw this connection come from.
fn seen_from(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn the_backend_sees_the_source_a_row_names_or_the_default() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = backend.local_addr().unwrap().port();
    who_server(backend);
    let udp_backend = UdpSocket::bind("127.0.0.1:0").unwrap();
    let uport = udp_backend.local_addr().unwrap().port();
    let (a, b, c, u) = (free_port(), free_port(), free_port(), free_port());
    let rules = format!(
        "named,{a},127.0.0.1,{bport},source=127.0.0.2\n\
         device,{b},127.0.0.1,{bport},\"source=127.0.0.3 interface=lo mark=0x1281\"\n\
         default,{c},127.0.0.1,{bport}\n\
         dns,{u}/udp,127.0.0.1,{uport},source=127.0.0.5\n"
    );
    let fwd = Forwarder::builder()
        .rules(&rules)
        .workers(2)
        .args(["--source", "127.0.0.4"])
        .listening(&[a, b, c])
        .start();
    assert_eq!(seen_from(local(a)).as_deref(), Some("127.0.0.2"));
    assert_eq!(seen_from(local(b)).as_deref(), Some("127.0.0.3"));
    assert_eq!(
        seen_from(local(c)).as_deref(),
        Some("127.0.0.4"),
        "--source applies to rows without source="
    );
    // Many connections from one source keep working: the port is picked at connect time.
    for _ in 0..50 {
        assert_eq!(seen_from(local(a)).as_deref(), Some("127.0.0.2"));
    }
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    udp_backend.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    let from = {
        let mut got = None;
        assert!(
            wait_until(WAIT, || {
                client.send_to(b"ping", local(u)).unwrap();
                udp_backend
                    .set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .unwrap();
                got = udp_backend.recv_from(&mut buf).ok().map(|(_, f)| f);
                got.is_some()
            }),
            "no datagram reached the UDP backend:\n{}",
            fwd.process.output()
        );
        got.unwrap()
    };
    assert_eq!(from.ip(), "127.0.0.5".parse::<IpAddr>().unwrap());
    assert!(fwd
        .process
        .output()
        .contains("source=127.0.0.3 interface=lo mark=0x1281"));
}

#[test]
fn an_address_the_host_does_not_have_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.csv");
    std::fs::write(
        &path,
        "ok,8080,127.0.0.1,80\nbad,8081,127.0.0.1,81,source=192.0.2.1\nnic,8082,127.0.0.1,82,interface=nosuch7\nv6,8083,::1,83,source=127.0.0.1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .arg("--rules")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = path.display();
    for line in [
        format!("{file}:2: options: source=192.0.2.1 is not an address of this host"),
        format!("{file}:3: options: interface=nosuch7: no such interface on this host"),
        format!("{file}:4: options: source=127.0.0.1 is IPv4 but the destination [::1]:83 is IPv6"),
    ] {
        assert!(err.contains(&line), "missing {line:?} in:\n{err}");
    }
    std::fs::write(&path, "ok,8080,127.0.0.1,80\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .arg("--rules")
        .arg(&path)
        .args(["--check", "--source", "192.0.2.9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--source 192.0.2.9 is not an address of this host"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A live edit naming a foreign address is refused; the rules in force keep forwarding.
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = backend.local_addr().unwrap().port();
    who_server(backend);
    let p = free_port();
    let fwd = Forwarder::builder()
        .rules(&format!("a,{p},127.0.0.1,{bport}\n"))
        .workers(1)
        .listening(&[p])
        .start();
    std::fs::write(
        &fwd.rules,
        format!("a,{p},127.0.0.1,{bport},source=192.0.2.1\n"),
    )
    .unwrap();
    assert!(
        wait_until(WAIT, || fwd.process.output().contains(
            ":1: options: source=192.0.2.1 is not an address of this host"
        )),
        "{}",
        fwd.process.output()
    );
    assert_eq!(seen_from(local(p)).as_deref(), Some("127.0.0.1"));
}

/// A gateway namespace with two links to a server namespace: link a (10.128.1.0/24, the
/// gateway holding .1 and .11) is the main table's route to the server's service address, link b
/// (10.128.2.0/24) is table 1281's. The server tells each client the address it came from.
struct Lab {
    gw: Netns,
    _srv: Netns,
}

const SERVICE: &str = "10.128.9.9";

impl Lab {
    fn up() -> Lab {
        let gw = Netns::new("tpout-gw");
        let srv = Netns::new("tpout-srv");
        let (g, s) = (&gw.name, &srv.name);
        sh(&format!(
            "ip -n {g} link add tpa0 type veth peer name tpa1 netns {s} && \
             ip -n {g} link add tpb0 type veth peer name tpb1 netns {s} && \
             ip -n {g} addr add 10.128.1.1/24 dev tpa0 && ip -n {g} addr add 10.128.1.11/24 dev tpa0 && \
             ip -n {g} addr add 10.128.2.1/24 dev tpb0 && \
             ip -n {s} addr add 10.128.1.2/24 dev tpa1 && ip -n {s} addr add 10.128.2.2/24 dev tpb1 && \
             ip -n {s} addr add {SERVICE}/32 dev lo && \
             ip -n {g} link set tpa0 up && ip -n {g} link set tpb0 up && \
             ip -n {s} link set tpa1 up && ip -n {s} link set tpb1 up && \
             ip -n {g} route add {SERVICE}/32 via 10.128.1.2 && \
             ip -n {g} route add {SERVICE}/32 via 10.128.2.2 table 1281 && \
             ip -n {g} rule add fwmark 0x1281 lookup 1281"
        ));
        srv.spawn(|| who_server(TcpListener::bind(format!("{SERVICE}:7000")).unwrap()));
        Lab { gw, _srv: srv }
    }

    fn start(&self, rules: &str, ports: &[u16]) -> (ChildGuard, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.csv");
        std::fs::write(&path, rules).unwrap();
        let mut cmd = self.gw.command(env!("CARGO_BIN_EXE_forwarder"));
        cmd.arg("--rules")
            .arg(&path)
            .args(["--no-web", "--workers", "1"]);
        let fwd = ChildGuard::spawn(cmd);
        for &p in ports {
            let ok = self.gw.enter(move || {
                wait_until(WAIT, || {
                    seen_from(SocketAddr::from(([127, 0, 0, 1], p))).is_some()
                })
            });
            assert!(
                ok,
                "forwarder in {} never answered on {p}:\n{}",
                self.gw.name,
                fwd.output()
            );
        }
        (fwd, dir)
    }

    fn seen_through(&self, port: u16) -> Option<String> {
        self.gw
            .enter(move || seen_from(SocketAddr::from(([127, 0, 0, 1], port))))
    }
}

#[test]
fn the_named_address_and_the_marks_route_reach_the_backend() {
    if !common::privileged("namespaces") {
        return;
    }
    let lab = Lab::up();
    let rules = format!(
        "plain,7100,{SERVICE},7000\n\
         second,7101,{SERVICE},7000,source=10.128.1.11\n\
         marked,7102,{SERVICE},7000,mark=0x1281\n\
         device,7103,{SERVICE},7000,\"interface=tpa0 source=10.128.1.11\"\n"
    );
    let (fwd, _dir) = lab.start(&rules, &[7100, 7101, 7102, 7103]);
    assert_eq!(lab.seen_through(7100).as_deref(), Some("10.128.1.1"));
    assert_eq!(
        lab.seen_through(7101).as_deref(),
        Some("10.128.1.11"),
        "the second address of the server-side link"
    );
    assert_eq!(
        lab.seen_through(7102).as_deref(),
        Some("10.128.2.1"),
        "mark 0x1281 routes through table 1281 (link b)"
    );
    assert_eq!(lab.seen_through(7103).as_deref(), Some("10.128.1.11"));
    drop(fwd);
}

/// The effective capability set of `pid` (`CapEff:` in /proc/PID/status).
fn cap_eff(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn after_user_cap_net_admin_is_kept_only_when_a_rule_marks_or_is_transparent() {
    if !common::privileged("--user nobody") {
        return;
    }
    const NET_ADMIN: u64 = 1 << 12;
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let bport = backend.local_addr().unwrap().port();
    who_server(backend);
    for (options, kept) in [("mark=0x1281", true), ("weight=1", false)] {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("entries.csv");
        let p = free_port();
        std::fs::write(&path, format!("m,{p},127.0.0.1,{bport},{options}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forwarder"));
        cmd.arg("--rules")
            .arg(&path)
            .args(["--no-web", "--workers", "1", "--user", "nobody"]);
        let fwd = ChildGuard::spawn(cmd);
        assert!(
            wait_until(WAIT, || common::is_listening(p)),
            "{}",
            fwd.output()
        );
        let workers = common::workers_of(fwd.pid());
        assert_eq!(workers.len(), 1);
        for pid in [fwd.pid(), workers[0]] {
            assert_eq!(cap_eff(pid) & NET_ADMIN != 0, kept, "{options}: pid {pid}");
        }
        // As nobody, the marked connection still reaches the backend (SO_MARK needs the cap).
        assert_eq!(
            seen_from(local(p)).as_deref(),
            Some("127.0.0.1"),
            "{options}:\n{}",
            fwd.output()
        );
    }
}
