//! A real DNS server through the forwarder: two dnsmasq instances behind two rules of one UDP
//! pool, queried with dig. Needs `dnsmasq` and `dig` (Debian: dnsmasq-base, bind9-dnsutils), so it
//! is ignored by `cargo test` and run by scripts/test.d/udp.sh, which installs them; a missing
//! program fails the test, it never skips.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::udp::udp_sockets_on;
use common::{Forwarder, WAIT};
use testbed_dev::testing::{free_port, wait_until, ChildGuard};

/// A dnsmasq on loopback answering `web.lab A 10.0.0.80` and `who.lab TXT <who>`.
fn dnsmasq(who: &str) -> (ChildGuard, u16) {
    let port = free_port();
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--keep-in-foreground",
        "--no-daemon",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--user=root",
        "--pid-file=",
        "--address=/web.lab/10.0.0.80",
    ])
    .arg(format!("--port={port}"))
    .arg(format!("--txt-record=who.lab,{who}"));
    let guard = ChildGuard::spawn(cmd);
    assert!(
        wait_until(WAIT, || udp_sockets_on(port) >= 1),
        "dnsmasq never bound udp {port}:\n{}",
        guard.output()
    );
    (guard, port)
}

#[test]
#[ignore = "needs dnsmasq and dig: run by scripts/test.d/udp.sh"]
fn dig_through_the_forwarder_gets_answers_split_evenly_over_two_dnsmasq() {
    let (_one, p1) = dnsmasq("one");
    let (_two, p2) = dnsmasq("two");
    let port = free_port();
    let f = Forwarder::builder()
        .rules(&format!(
            "dns1,127.0.0.1:{port}/udp,127.0.0.1,{p1}\ndns2,127.0.0.1:{port}/udp,127.0.0.1,{p2}\n"
        ))
        .workers(2)
        .web("127.0.0.1")
        .udp_bound(&[port])
        .start();
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("queries");
    // Ten queries per client port: five for the server's name, five for a shared record.
    std::fs::write(&batch, "who.lab TXT\nweb.lab A\n".repeat(5)).unwrap();

    // 100 client ports, 10 queries each: 1,000 queries, one session per port.
    let mut served_by: HashMap<String, usize> = HashMap::new();
    for i in 0..100 {
        let source = free_port();
        let out = Command::new("dig")
            .arg("@127.0.0.1")
            .args(["-p", &port.to_string()])
            .args(["-b", &format!("127.0.0.1#{source}")])
            .args(["+short", "+tries=1", "+time=5", "-f"])
            .arg(&batch)
            .output()
            .expect("dig runs (install bind9-dnsutils)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "dig {i} failed: {text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10, "client {i}: {text}");
        let who: Vec<&str> = lines.iter().step_by(2).copied().collect();
        let web: Vec<&str> = lines.iter().skip(1).step_by(2).copied().collect();
        assert!(web.iter().all(|a| *a == "10.0.0.80"), "client {i}: {text}");
        assert!(
            who.iter().all(|w| *w == who[0]) && ["\"one\"", "\"two\""].contains(&who[0]),
            "client {i}: every query of one session reaches one server: {text}"
        );
        *served_by.entry(who[0].to_string()).or_default() += 1;
    }
    assert_eq!(served_by.get("\"one\""), Some(&50), "{served_by:?}");
    assert_eq!(served_by.get("\"two\""), Some(&50), "{served_by:?}");
    for (name, p) in [("dns1", p1), ("dns2", p2)] {
        for direction in ["up", "down"] {
            assert_eq!(
                f.metric(&format!(
                    "forwarder_backend_datagrams_total{{listen=\"127.0.0.1:{port}\",name=\"{name}\",backend=\"127.0.0.1:{p}\",proto=\"udp\",direction=\"{direction}\"}}"
                )),
                Some(500),
                "{name} {direction}"
            );
        }
    }
}
