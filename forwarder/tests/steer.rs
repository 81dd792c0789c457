//! A 20,000-port range steered by nftables to one listener per worker, in network namespaces of
//! its own (`frs<pid>-gw` runs the forwarder, its table and a backend; `frs<pid>-c` is a client
//! host routed to it over a veth), so the steering never touches the host's traffic. Clients in
//! the client namespace and on the gateway itself reach sampled ports of the range; the backend
//! (PROXY v1 behind `send_proxy=v1`) tells which port each reached. Each worker holds fewer than
//! 100 descriptors more than without the range; reloads add and remove the table; a killed
//! forwarder's table is gone after its next start. Needs root and nftables (skipped otherwise).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use testbed_dev::testing::{bin_path, wait_until, ChildGuard};

const FIRST: u16 = 20_000;
const LAST: u16 = 39_999;
const BACKEND: u16 = 9_000;

/// The two namespaces and the veth between them; deleted on drop (which kills what runs there).
struct Lab {
    gw: String,
    client: String,
}

impl Lab {
    fn new() -> Lab {
        let id = std::process::id();
        let lab = Lab {
            gw: format!("frs{id}-gw"),
            client: format!("frs{id}-c"),
        };
        for cmd in [
            format!("ip netns add {}", lab.gw),
            format!("ip netns add {}", lab.client),
            format!(
                "ip link add frs{id}a netns {} type veth peer name frs{id}b netns {}",
                lab.gw, lab.client
            ),
            format!("ip -n {} addr add 10.128.0.1/24 dev frs{id}a", lab.gw),
            format!("ip -n {} addr add 10.128.0.2/24 dev frs{id}b", lab.client),
            format!("ip -n {} link set frs{id}a up", lab.gw),
            format!("ip -n {} link set frs{id}b up", lab.client),
            format!("ip -n {} link set lo up", lab.gw),
            format!("ip -n {} link set lo up", lab.client),
        ] {
            sh(&cmd);
        }
        lab
    }

    fn in_gw(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.gw]).arg(program);
        c
    }

    fn tables(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.gw, "nft", "list", "tables"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.gw, &self.client] {
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn sh(cmd: &str) {
    let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd}");
}

/// A backend in the gateway namespace: reads the PROXY v1 line and answers `port N`.
const BACKEND_PY: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024)
def serve(c):
    f = c.makefile("rb")
    line = f.readline().split()
    c.sendall(b"port %s\n" % (line[5] if len(line) > 5 else b"0"))
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client: connects to each port given on `host`, prints `PORT REPLY` per line.
const CLIENT_PY: &str = r#"
import socket, sys
host = sys.argv[1]
for p in sys.argv[2:]:
    try:
        c = socket.create_connection((host, int(p)), timeout=5)
        r = c.makefile("rb").readline().decode().strip()
        c.close()
    except Exception as e:
        r = "error " + str(e)
    print(p, r, flush=True)
"#;

fn reach(ns: &str, host: &str, ports: &[u16]) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", CLIENT_PY, host])
        .args(ports.iter().map(|p| p.to_string()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn sample() -> Vec<u16> {
    let mut ports = vec![FIRST, FIRST + 1, LAST];
    ports.extend((0..40).map(|_| fastrand::u16(FIRST..=LAST)));
    ports
}

fn worker_fds(f: &ChildGuard) -> Vec<usize> {
    common::children_of(f.pid())
        .iter()
        .map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0)
        })
        .collect()
}

fn start(lab: &Lab, rules: &Path) -> ChildGuard {
    let mut cmd = lab.in_gw(&bin_path("forwarder"));
    cmd.arg("--rules")
        .arg(rules)
        .args(["--workers", "2", "--no-web"])
        .stdin(Stdio::null());
    ChildGuard::spawn(cmd)
}

/// Waits until both workers are up and listening on the first port (a connection through it is
/// answered).
fn wait_serving(lab: &Lab, f: &ChildGuard, port: u16) {
    assert!(
        wait_until(common::WAIT, || reach(&lab.gw, "127.0.0.1", &[port])
            .first()
            .is_some_and(|l| l.contains("port "))),
        "{}",
        f.output()
    );
}

#[test]
fn a_20000_port_range_is_steered_to_one_listener_per_worker() {
    if !common::privileged("nftables steering") {
        return;
    }
    let status = Command::new("bash")
        .arg("-c")
        .arg("source scripts/lib/apt.sh && ensure_apt_packages nftables python3")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .unwrap();
    assert!(status.success());
    let lab = Lab::new();
    let mut backend = lab.in_gw(Path::new("python3"));
    backend.args(["-c", BACKEND_PY, &BACKEND.to_string()]);
    let _backend = ChildGuard::spawn(backend);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("entries.csv");
    let small = format!("small,7000,127.0.0.1,{BACKEND},send_proxy=v1\n");
    let big = format!("{small}big,{FIRST}-{LAST},127.0.0.1,{BACKEND},send_proxy=v1\n");

    // Without the range: the descriptors each worker holds.
    std::fs::write(&rules, &small).unwrap();
    let f = start(&lab, &rules);
    wait_serving(&lab, &f, 7000);
    let without = worker_fds(&f);
    drop(f);

    std::fs::write(&rules, &big).unwrap();
    let f = start(&lab, &rules);
    wait_serving(&lab, &f, FIRST);
    let out = f.output();
    let table = out
        .split_whitespace()
        .find(|w| w.starts_with("forwarder_ranges_"))
        .unwrap_or_else(|| panic!("no table named:\n{out}"))
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    assert!(
        out.contains("steered to one listening socket per worker by nftables"),
        "{out}"
    );
    assert!(lab.tables().contains(&table));
    let ports = sample();
    for (who, ns, host) in [
        ("a client host", lab.client.as_str(), "10.128.0.1"),
        ("the gateway itself", lab.gw.as_str(), "127.0.0.1"),
    ] {
        let lines = reach(ns, host, &ports);
        assert_eq!(lines.len(), ports.len(), "{who}: {lines:?}");
        for (line, port) in lines.iter().zip(&ports) {
            assert_eq!(
                line,
                &format!("{port} port {port}"),
                "{who} reached the right port"
            );
        }
    }
    let with = worker_fds(&f);
    assert_eq!(with.len(), 2);
    for (w, (a, b)) in with.iter().zip(&without).enumerate() {
        assert!(
            *a < b + 100,
            "worker {w} holds {a} descriptors with the range, {b} without"
        );
    }
    eprintln!("descriptors per worker without the range {without:?}, with it {with:?}");

    // Reload: the range removed takes the table with it; added back, it returns.
    std::fs::write(&rules, &small).unwrap();
    assert!(
        wait_until(common::WAIT, || !lab.tables().contains(&table)),
        "{}",
        f.output()
    );
    std::fs::write(&rules, &big).unwrap();
    assert!(wait_until(common::WAIT, || lab.tables().contains(&table)));
    wait_serving(&lab, &f, LAST);

    // Killed: the table stays behind; the next start on the same file cleans it up.
    for pid in common::children_of(f.pid()).into_iter().chain([f.pid()]) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    drop(f);
    assert!(lab.tables().contains(&table), "a crash leaves the table");
    std::fs::write(&rules, &small).unwrap();
    let f = start(&lab, &rules);
    wait_serving(&lab, &f, 7000);
    assert!(
        !lab.tables().contains(&table),
        "the next start removed the stale table"
    );
    drop(f);
}
