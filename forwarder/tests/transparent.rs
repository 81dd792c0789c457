//! `transparent` in three namespaces of our own: a client, the gateway running the forwarder,
//! servers behind it. A server whose replies route back through the gateway sees the client's
//! address (TCP and UDP); one whose default route bypasses the gateway makes the forwarder say
//! why its connects time out; `transparent-setup` applies idempotently and its undo leaves no
//! rule, route or nft table behind.
//!
//!   tp-c 10.129.1.5 ── 10.129.1.1 tp-gw 10.129.2.1 ── tp-s 10.129.2.10 (default via the gateway)
//!                                       10.129.3.1 ── tp-b 10.129.3.20 (default via .254: gone)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::netns::{sh, Netns};
use common::WAIT;
use testbed_dev::testing::{wait_until, ChildGuard};

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

fn who_udp(socket: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(from.ip().to_string().as_bytes(), from);
        }
    });
}

fn seen_from(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// Whether process `pid` (in whatever namespace) has a TCP socket listening on `port`.
fn listening_in(pid: u32, port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", f[1]).ends_with(&hex) && f[3] == "0A"
        })
    })
}

fn setup(gw: &Netns, action: &str) -> String {
    let out = gw
        .command(env!("CARGO_BIN_EXE_forwarder"))
        .args(["transparent-setup", action])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "transparent-setup {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn in_gw(gw: &Netns, line: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &gw.name, "sh", "-c", line])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn servers_see_the_client_and_a_bypassing_route_is_named() {
    if !common::privileged("namespaces") {
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        panic!("nft is missing: apt-get install nftables");
    }
    let c = Netns::new("tp-c");
    let gw = Netns::new("tp-gw");
    let s = Netns::new("tp-s");
    let b = Netns::new("tp-b");
    let (cn, g, sn, bn) = (&c.name, &gw.name, &s.name, &b.name);
    sh(&format!(
        "ip -n {g} link add tpe0 type veth peer name tpc0 netns {cn} && \
         ip -n {g} link add tpe1 type veth peer name tps0 netns {sn} && \
         ip -n {g} link add tpe2 type veth peer name tpb0 netns {bn} && \
         ip -n {g} addr add 10.129.1.1/24 dev tpe0 && ip -n {g} addr add 10.129.2.1/24 dev tpe1 && \
         ip -n {g} addr add 10.129.3.1/24 dev tpe2 && \
         ip -n {cn} addr add 10.129.1.5/24 dev tpc0 && ip -n {sn} addr add 10.129.2.10/24 dev tps0 && \
         ip -n {bn} addr add 10.129.3.20/24 dev tpb0 && \
         for l in tpe0 tpe1 tpe2; do ip -n {g} link set $l up; done && \
         ip -n {cn} link set tpc0 up && ip -n {sn} link set tps0 up && ip -n {bn} link set tpb0 up && \
         ip -n {cn} route add default via 10.129.1.1 && ip -n {sn} route add default via 10.129.2.1 && \
         ip -n {bn} route add default via 10.129.3.254"
    ));
    s.spawn(|| who_server(TcpListener::bind("10.129.2.10:7000").unwrap()));
    s.spawn(|| who_udp(UdpSocket::bind("10.129.2.10:7001").unwrap()));
    b.spawn(|| who_server(TcpListener::bind("10.129.3.20:7000").unwrap()));

    setup(&gw, "apply");
    setup(&gw, "apply");
    let rules = in_gw(&gw, "ip -4 rule show; ip -6 rule show");
    assert_eq!(
        rules.matches("fwmark 0x1281 lookup 1281").count(),
        2,
        "one rule per family after two applies:\n{rules}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.csv");
    std::fs::write(
        &path,
        "ssh,7200,10.129.2.10,7000,transparent\n\
         gone,7201,10.129.3.20,7000,transparent\n\
         game,7202/udp,10.129.2.10,7001,transparent\n\
         plain,7203,10.129.2.10,7000\n",
    )
    .unwrap();
    let mut cmd = gw.command(env!("CARGO_BIN_EXE_forwarder"));
    cmd.arg("--rules").arg(&path).args([
        "--no-web",
        "--workers",
        "1",
        "--connect-timeout-ms",
        "300",
    ]);
    let fwd = ChildGuard::spawn(cmd);
    let pid = fwd.pid();
    assert!(
        wait_until(WAIT, || {
            common::children_of(pid)
                .iter()
                .any(|&w| listening_in(w, 7200) && listening_in(w, 7203))
        }),
        "forwarder never listened:\n{}",
        fwd.output()
    );
    assert!(fwd
        .output()
        .contains("transparent (the backend sees the client's address"));
    let gateway = |port| SocketAddr::from(([10, 129, 1, 1], port));
    assert_eq!(
        c.enter(move || seen_from(gateway(7200))).as_deref(),
        Some("10.129.1.5"),
        "the server sees the client:\n{}",
        fwd.output()
    );
    assert_eq!(
        c.enter(move || seen_from(gateway(7203))).as_deref(),
        Some("10.129.2.1"),
        "a plain rule still comes from the gateway"
    );
    let udp = c.enter(move || {
        let u = UdpSocket::bind("10.129.1.5:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..20 {
            u.send_to(b"who", gateway(7202)).unwrap();
            if let Ok(n) = u.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    });
    assert_eq!(udp.as_deref(), Some("10.129.1.5"), "UDP sessions too");

    // The bypassing server's SYN-ACKs go to its default router: every connect times out.
    for _ in 0..5 {
        assert_eq!(c.enter(move || seen_from(gateway(7201))), None);
    }
    let hint = "backend 10.129.3.20:7000: 5 transparent connects timed out: do replies to client addresses route back through this host? see docs/transparent.md";
    assert!(
        wait_until(WAIT, || fwd.output().contains(hint)),
        "no hint:\n{}",
        fwd.output()
    );
    assert_eq!(
        fwd.output()
            .matches("transparent connects timed out")
            .count(),
        1
    );
    drop(fwd);

    setup(&gw, "undo");
    let left = in_gw(
        &gw,
        "ip -4 rule show; ip -6 rule show; ip -4 route show table 1281; ip -6 route show table 1281; nft list tables",
    );
    assert!(!left.contains("0x1281"), "{left}");
    assert!(!left.contains("forwarder_tproxy"), "{left}");
    let routes = in_gw(
        &gw,
        "ip -4 route show table 1281; ip -6 route show table 1281",
    );
    assert_eq!(routes.trim(), "", "routes of table 1281 left");
    setup(&gw, "undo");
}
