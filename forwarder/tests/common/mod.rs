//! What the forwarder's integration tests share: start the real binary on a rules file, find
//! its worker processes, and backends (echo servers that can tag their replies) on loopback.

#![allow(dead_code)]

pub mod netns;
pub mod udp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use testbed::testing::{free_port, wait_until, ChildGuard};

pub const WAIT: Duration = Duration::from_secs(20);

/// A running forwarder and its rules file.
pub struct Forwarder {
    pub process: ChildGuard,
    pub rules: PathBuf,
    _dir: tempfile::TempDir,
}

impl Forwarder {
    /// Starts the forwarder on `rules` text with `workers` workers and extra flags; waits until
    /// every listen port in `ports` accepts connections.
    pub fn start(rules: &str, workers: usize, extra: &[&str], ports: &[u16]) -> Forwarder {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.csv");
        std::fs::write(&path, rules).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forwarder"));
        cmd.arg("--rules").arg(&path);
        // No web page unless the test asks for one.
        if !extra.contains(&"--web") {
            cmd.arg("--no-web");
        }
        cmd.arg("--workers")
            .arg(workers.to_string())
            .arg("--log-level")
            .arg("info")
            .args(extra);
        let process = ChildGuard::spawn(cmd);
        for &port in ports {
            assert!(
                wait_until(WAIT, || is_listening(port)),
                "forwarder never listened on {port}:\n{}",
                process.output()
            );
        }
        Forwarder {
            process,
            rules: path,
            _dir: dir,
        }
    }

    /// Replaces the rules file (atomically, as an editor would) and waits for the forwarder to
    /// log that it reloaded.
    pub fn rewrite_rules(&self, text: &str) {
        let before = self.process.output().matches("reloading").count();
        let tmp = self.rules.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.rules).unwrap();
        assert!(
            wait_until(WAIT, || self.process.output().matches("reloading").count()
                > before),
            "no reload noticed:\n{}",
            self.process.output()
        );
    }

    /// Pids of the worker processes (children of the supervisor).
    pub fn worker_pids(&self) -> Vec<u32> {
        children_of(self.process.pid())
    }

    /// Sum of VmRSS of the supervisor and its workers, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let mut pids = self.worker_pids();
        pids.push(self.process.pid());
        pids.iter().map(|&p| rss_kib(p)).sum()
    }
}

/// True when a socket listens on `port` (IPv4 or IPv6). Read from /proc rather than by
/// connecting, so no probe connection reaches a test's backend.
pub fn is_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1).unwrap_or("");
                let state = fields.nth(1).unwrap_or("");
                format!("{local} ").ends_with(&hex) && state == "0A"
            })
        })
    })
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the ")" of the command name: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) && state != Some("Z") {
            out.push(pid);
        }
    }
    out.sort();
    out
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// An echo server on loopback, one thread per connection. When `tag` is set, each connection
/// first receives the tag, so a test can tell which backend served it.
pub struct Backend {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
}

impl Backend {
    pub fn echo(tag: Option<&str>) -> Backend {
        let listener = listen_any();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let tag = tag.map(|t| t.as_bytes().to_vec());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let tag = tag.clone();
                std::thread::spawn(move || {
                    if let Some(tag) = tag {
                        if stream.write_all(&tag).is_err() {
                            return;
                        }
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    // Echo the half-close: our FIN follows the client's.
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Backend { port, accepted }
    }
}

/// A blocking listener on a free loopback port with a deep accept queue (std's 128 overflows
/// when thousands connect at once, and dropped SYNs then look like a slow backend).
pub fn listen_any() -> TcpListener {
    let addr = local(0);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(4096).unwrap();
    socket.into()
}

/// A port with nothing listening on it.
pub fn dead_port() -> u16 {
    free_port()
}

/// Connects through the forwarder and reads the backend's tag (`len` bytes).
pub fn read_tag(port: u16, len: usize) -> String {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut tag = vec![0u8; len];
    s.read_exact(&mut tag).unwrap();
    String::from_utf8(tag).unwrap()
}

/// Opens `n` connections to an echo behind `port`, all at once, then checks that each one carries
/// its own bytes (a tag sent on every one, read back on every one). Returns them still open.
pub fn all_open_each_echoes_its_own(port: u16, n: usize, wait: Duration) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(local(port)).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("conn {i:05}\n").as_bytes()).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, format!("conn {i:05}\n").as_bytes());
    }
    conns
}

/// Sends `msg` and reads the same number of bytes back.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    back
}

/// One HTTP GET on a fresh connection (the web page's API, `/metrics`); the body of a 200.
pub fn http_get(web: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(web).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body.to_string()
}

/// The value of one series in Prometheus text, by the start of its line (name and labels).
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

pub fn rules_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// True when the test runs as root (BPF programs need CAP_BPF and CAP_NET_ADMIN); otherwise says
/// that `what` is skipped.
pub fn privileged(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("{what}: needs root, skipped");
    }
    root
}

/// Connections the forwarder handed to the kernel (`--data-path sockmap`), over all backends.
pub fn kernel_connections(web: SocketAddr) -> u64 {
    http_get(web, "/metrics")
        .lines()
        .filter(|l| l.starts_with("forwarder_backend_sockmap_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Kernel memory of the TCP sockets with local or remote port in `ports` (`ss -tm`): bytes
/// queued to receive (`r`) and to send (`w`), summed.
pub fn socket_memory(ports: &[u16]) -> u64 {
    let filter = ports
        .iter()
        .map(|p| format!("sport = :{p} or dport = :{p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let out = Command::new("ss")
        .args(["-tmnH", &format!("( {filter} )")])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    for skmem in text.split("skmem:(").skip(1) {
        let fields = skmem.split(')').next().unwrap_or("");
        for field in fields.split(',') {
            let (name, value) =
                field.split_at(field.find(|c: char| c.is_ascii_digit()).unwrap_or(0));
            if name == "r" || name == "w" {
                total += value.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}
