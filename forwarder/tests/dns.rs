//! Backend host names that follow DNS, with a real DNS server: dnsmasq in a lab network
//! namespace serves `*.lab.test` from a hosts file with a 1 s TTL; the forwarder runs in the same
//! namespace (`ip netns exec` gives it the namespace's /etc/netns/NS/resolv.conf). The answer is
//! changed while traffic flows: new connections move, open ones stay, a name that appears later
//! starts to serve, several addresses are several members, NXDOMAIN keeps the last answer (said
//! once). Needs root and dnsmasq (`scripts/test.d/lab.sh` installs it); run under the lab lock.
//! Creates the namespace `dnsbk<pid>` and /etc/netns/dnsbk<pid>/, and removes both.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_get, round_trip, WAIT};
use serde_json::Value;
use testbed_dev::testing::{wait_for_listen, wait_until, ChildGuard};

/// The lab namespace, its resolv.conf, and dnsmasq; all removed on drop, even after a failure.
struct Lab {
    ns: String,
    dnsmasq: Option<ChildGuard>,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lab {
    fn start() -> Lab {
        let ns = format!("dnsbk{}", std::process::id() % 100_000);
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "").unwrap();
        let mut lab = Lab {
            ns,
            dnsmasq: None,
            hosts,
            _dir: dir,
        };
        run(&["ip", "netns", "add", &lab.ns]);
        run(&["ip", "-n", &lab.ns, "link", "set", "lo", "up"]);
        let etc = lab.etc();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.ns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--conf-file=/dev/null",
                "--no-hosts",
                "--no-resolv",
                "--user=root",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--port=53",
            ])
            .args(["--local=/lab.test/", "--local-ttl=1", "--pid-file="])
            .arg(format!("--addn-hosts={}", lab.hosts.display()));
        lab.dnsmasq = Some(ChildGuard::spawn(cmd));
        assert!(
            wait_until(WAIT, || {
                let out = Command::new("ip")
                    .args(["netns", "exec", &lab.ns, "ss", "-Hlun", "sport = :53"])
                    .output()
                    .unwrap();
                !out.stdout.is_empty()
            }),
            "dnsmasq never listened:\n{}",
            lab.dnsmasq.as_ref().unwrap().output()
        );
        lab
    }

    fn etc(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.ns)
    }

    /// Rewrites the hosts file and has dnsmasq read it again.
    fn serve(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        let pid = self.dnsmasq.as_ref().unwrap().pid() as i32;
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }

    /// Moves the calling thread (and the threads it starts from now on) into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(Path::new("/run/netns").join(&self.ns)).unwrap();
        // SAFETY: setns(2) with a namespace descriptor we opened; affects this thread only.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        drop(self.dnsmasq.take());
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed");
}

/// An echo server on `ip:port` that first sends its tag (the address's last digit).
fn tagged_echo(ip: &str, port: u16, stop: Arc<AtomicBool>) {
    let listener = TcpListener::bind((ip, port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let tag = ip.rsplit('.').next().unwrap().to_string();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let tag = tag.clone();
                    std::thread::spawn(move || {
                        let _ = s.write_all(tag.as_bytes());
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
}

/// The tag of the backend a new connection through `port` reaches, or `None` when the
/// forwarder had no backend for it (closed without a byte).
fn try_tag(port: u16) -> Option<(String, TcpStream)> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).ok()?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).ok()?;
    Some((String::from_utf8_lossy(&tag).into_owned(), s))
}

fn backend(web: SocketAddr, name: &str) -> Value {
    let stats: Value = serde_json::from_str(&http_get(web, "/api/stats")).unwrap();
    stats["pools"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["backends"].as_array().unwrap().clone())
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name}"))
}

/// Listening in this thread's namespace (/proc/self/net would show the main thread's).
fn listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/thread-self/net/tcp").is_ok_and(|t| {
        t.lines().any(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| format!("{a} ").ends_with(&hex))
                && l.split_whitespace().nth(3) == Some("0A")
        })
    })
}

#[test]
fn names_follow_dns_while_traffic_flows() {
    if !common::privileged("dns lab") {
        return;
    }
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        panic!(
            "dnsmasq is not installed (apt-get install dnsmasq-base; scripts/test.d/lab.sh does)"
        );
    }
    let lab = Lab::start();
    lab.serve("127.0.0.2 app.lab.test\n");
    lab.enter();
    let stop = Arc::new(AtomicBool::new(false));
    let port = 7400;
    for ip in ["127.0.0.2", "127.0.0.3"] {
        tagged_echo(ip, port, Arc::clone(&stop));
    }
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("entries.csv");
    let (app, late, web_port) = (7001, 7002, 7080);
    std::fs::write(
        &rules,
        format!("app,{app},app.lab.test,{port}\nlate,{late},late.lab.test,{port}\n"),
    )
    .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns, env!("CARGO_BIN_EXE_forwarder")])
        .arg("--rules")
        .arg(&rules)
        .args(["--web", &format!("127.0.0.1:{web_port}"), "--workers", "2"])
        .args(["--dns-min-ttl-s", "1", "--log-level", "info"]);
    let fwd = ChildGuard::spawn(cmd);
    let web = SocketAddr::from(([127, 0, 0, 1], web_port));
    assert!(wait_for_listen(web, WAIT), "{}", fwd.output());
    assert!(
        wait_until(WAIT, || listening(app) && listening(late)),
        "{}",
        fwd.output()
    );

    // A name that does not resolve at start is down, not an error in the file.
    let l = backend(web, "late");
    assert_eq!(l["state"], "down", "{l}");
    assert!(
        l["dns"]
            .as_str()
            .unwrap()
            .contains("late.lab.test does not resolve"),
        "{l}"
    );
    assert!(try_tag(late).is_none(), "nothing to serve late yet");
    let (tag, mut open) = try_tag(app).expect("app serves");
    assert_eq!(tag, "2");

    // The answer changes: new connections move within a TTL, the open one stays.
    lab.serve("127.0.0.3 app.lab.test\n127.0.0.2 late.lab.test\n");
    assert!(
        wait_until(WAIT, || try_tag(app).is_some_and(|(t, _)| t == "3")),
        "new connections never moved:\n{}",
        fwd.output()
    );
    assert_eq!(round_trip(&mut open, b"still on 2"), b"still on 2");
    assert!(
        wait_until(WAIT, || try_tag(late).is_some_and(|(t, _)| t == "2")),
        "the late name never served:\n{}",
        fwd.output()
    );

    // Two A records: two members, served in turn.
    lab.serve("127.0.0.2 app.lab.test\n127.0.0.3 app.lab.test\n127.0.0.2 late.lab.test\n");
    assert!(
        wait_until(WAIT, || {
            let tags: String = (0..6)
                .filter_map(|_| try_tag(app))
                .map(|(t, _)| t)
                .collect();
            tags.contains('2') && tags.contains('3')
        }),
        "never two members:\n{}",
        fwd.output()
    );

    // NXDOMAIN: the last answer is kept and said once, and traffic goes on.
    lab.serve("127.0.0.2 late.lab.test\n");
    assert!(
        wait_until(WAIT, || fwd
            .output()
            .contains("app.lab.test: lookup failed")),
        "{}",
        fwd.output()
    );
    let until = Instant::now() + Duration::from_millis(3000);
    let mut served = 0;
    while Instant::now() < until {
        let (t, _) = try_tag(app).expect("served from the last answer");
        assert!(t == "2" || t == "3");
        served += 1;
    }
    assert!(served > 0);
    assert_eq!(
        fwd.output().matches("app.lab.test: lookup failed").count(),
        1,
        "said once:\n{}",
        fwd.output()
    );
    let a = backend(web, "app");
    assert!(
        a["dns"]
            .as_str()
            .unwrap()
            .contains("keeping the last answer 127.0.0.2, 127.0.0.3"),
        "{a}"
    );
    assert_eq!(round_trip(&mut open, b"and still"), b"and still");
    stop.store(true, Ordering::SeqCst);
    drop(fwd);
}
