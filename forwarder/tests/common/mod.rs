//! What the forwarder's integration tests share: the one way to start the real binary
//! (`Forwarder::builder()`), the one HTTP client (`http`), its worker processes, and backends
//! (echo servers that can tag their replies) on loopback.

#![allow(dead_code)]

pub mod http;
pub mod netns;
pub mod udp;

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use http::{http_get, metric};
use testbed_dev::testing::{free_port, wait_for_listen, wait_until, ChildGuard};

pub const WAIT: Duration = Duration::from_secs(20);

/// The forwarder binary as a command with nothing set: the one place tests name it.
pub fn command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forwarder"))
}

/// How to start a forwarder: the rules file's text, workers, the web page, extra flags and
/// environment, and what to wait for before the test goes on.
pub struct Builder {
    rules: String,
    /// A rules file the test made itself (its folder's owner and modes matter), used as it is.
    rules_at: Option<PathBuf>,
    workers: usize,
    /// The page's `--web` address (`IP:PORT`); `None` means `--no-web`.
    web: Option<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// TCP ports that must listen before `start` returns.
    listening: Vec<u16>,
    /// UDP ports that must be bound once per worker before `start` returns.
    udp_bound: Vec<u16>,
    open_files: Option<u64>,
}

impl Builder {
    /// The rules file's text (written to `entries.csv` in a temporary folder).
    pub fn rules(mut self, text: &str) -> Builder {
        self.rules = text.to_string();
        self
    }

    /// Adds the rule `name,listen_port,127.0.0.1,backend_port` and waits for `listen_port` to
    /// listen: the one-port-to-one-backend set-up most tests need.
    pub fn forward(mut self, name: &str, listen_port: u16, backend_port: u16) -> Builder {
        self.rules
            .push_str(&format!("{name},{listen_port},127.0.0.1,{backend_port}\n"));
        self.listening.push(listen_port);
        self
    }

    /// Runs on the rules file at `path` as it is, instead of writing one.
    pub fn rules_at(mut self, path: &Path) -> Builder {
        self.rules_at = Some(path.to_path_buf());
        self
    }

    pub fn workers(mut self, n: usize) -> Builder {
        self.workers = n;
        self
    }

    /// Serves the web page on `ip` and a free port (`--web`); without it, `--no-web`.
    pub fn web(mut self, ip: &str) -> Builder {
        self.web = Some(format!("{ip}:{}", free_port()));
        self
    }

    /// Serves the web page on exactly `addr` (`IP:PORT`), for a port the test holds itself.
    pub fn web_on(mut self, addr: &str) -> Builder {
        self.web = Some(addr.to_string());
        self
    }

    /// Extra flags, after the ones the builder writes.
    pub fn args<I, S>(mut self, args: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Builder {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// TCP ports `start` waits for until they listen.
    pub fn listening(mut self, ports: &[u16]) -> Builder {
        self.listening.extend_from_slice(ports);
        self
    }

    /// UDP ports `start` waits for until every worker has bound them.
    pub fn udp_bound(mut self, ports: &[u16]) -> Builder {
        self.udp_bound.extend_from_slice(ports);
        self
    }

    /// Starts the forwarder with this soft and hard open-file limit (set between fork and exec).
    pub fn open_files(mut self, limit: u64) -> Builder {
        self.open_files = Some(limit);
        self
    }

    /// Starts the forwarder without waiting for anything (a start that must fail, or a test
    /// that watches the start itself).
    pub fn spawn(self) -> Forwarder {
        // The builder writes these itself; a second copy in `args` would silently fight it.
        for own in ["--rules", "--web", "--no-web", "--workers"] {
            assert!(
                !self.args.iter().any(|a| a == own),
                "pass {own} through the builder (.rules, .web, .workers), not .args"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let rules = match &self.rules_at {
            Some(path) => path.clone(),
            None => {
                let path = dir.path().join("entries.csv");
                std::fs::write(&path, &self.rules).unwrap();
                path
            }
        };
        let mut cmd = command();
        cmd.arg("--rules").arg(&rules);
        let web = match &self.web {
            Some(addr) => {
                cmd.arg("--web").arg(addr);
                let port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
                let port = port.unwrap_or_else(|| panic!("--web {addr}: no port"));
                // Whatever address it is served on, the test reaches it over loopback.
                Some(local(port))
            }
            None => {
                cmd.arg("--no-web");
                None
            }
        };
        cmd.arg("--workers").arg(self.workers.to_string());
        cmd.args(&self.args);
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        if let Some(limit) = self.open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe, called between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                    Ok(())
                });
            }
        }
        Forwarder {
            process: ChildGuard::spawn(cmd),
            rules,
            web,
            workers: self.workers,
            _dir: dir,
        }
    }

    /// Starts the forwarder and waits until its web page (if any) and every port named with
    /// `listening` and `udp_bound` are up.
    pub fn start(self) -> Forwarder {
        let (listening, udp_bound) = (self.listening.clone(), self.udp_bound.clone());
        let fwd = self.spawn();
        if let Some(web) = fwd.web {
            assert!(
                wait_for_listen(web, WAIT),
                "web page never listened:\n{}",
                fwd.process.output()
            );
        }
        for port in listening {
            assert!(
                wait_until(WAIT, || is_listening(port)),
                "forwarder never listened on {port}:\n{}",
                fwd.process.output()
            );
        }
        for port in udp_bound {
            fwd.wait_bound(port, fwd.workers);
        }
        fwd
    }
}

/// A running forwarder (killed when dropped) and its rules file.
pub struct Forwarder {
    pub process: ChildGuard,
    pub rules: PathBuf,
    web: Option<SocketAddr>,
    workers: usize,
    _dir: tempfile::TempDir,
}

/// Dropping the `Forwarder` kills its process group (`ChildGuard`, the first field) and then
/// removes its folder with the rules file. Implementing `Drop` also makes moving `process` out
/// a compile error, so a test cannot keep the process while its rules file is deleted.
impl Drop for Forwarder {
    fn drop(&mut self) {}
}

impl Forwarder {
    /// One worker, no web page, an empty rules file: change what the test needs.
    pub fn builder() -> Builder {
        Builder {
            rules: String::new(),
            rules_at: None,
            workers: 1,
            web: None,
            args: Vec::new(),
            env: Vec::new(),
            listening: Vec::new(),
            udp_bound: Vec::new(),
            open_files: None,
        }
    }

    /// The web page's address on loopback.
    pub fn web(&self) -> SocketAddr {
        self.web
            .expect("this forwarder was started without .web(..)")
    }

    /// One plain GET to the web page, whatever its status.
    pub fn get(&self, path: &str) -> http::Response {
        http::get(self.web(), path)
    }

    /// The body of a GET to the web page that must answer 200.
    pub fn text(&self, path: &str) -> String {
        http_get(self.web(), path)
    }

    /// A GET to the web page that must answer 200, as JSON.
    pub fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.text(path)).unwrap()
    }

    /// The value of the `/metrics` line that starts with `series` (name and labels).
    pub fn metric(&self, series: &str) -> Option<u64> {
        metric(&self.text("/metrics"), series)
    }

    /// Like `metric`, for a series that must be there.
    pub fn counter(&self, series: &str) -> u64 {
        let text = self.text("/metrics");
        metric(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
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

    /// The rules file as it is on disk now.
    pub fn rules_text(&self) -> String {
        std::fs::read_to_string(&self.rules).unwrap()
    }

    /// Waits until `n` sockets hold UDP port `port` (one per worker).
    pub fn wait_bound(&self, port: u16, n: usize) {
        assert!(
            wait_until(WAIT, || udp::udp_sockets_on(port) >= n),
            "forwarder never bound udp {port}:\n{}",
            self.process.output()
        );
    }

    /// Pids of the worker processes (children of the supervisor).
    pub fn worker_pids(&self) -> Vec<u32> {
        workers_of(self.process.pid())
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

/// The worker processes of a supervisor: its children started with `--worker-fds` (a reload may
/// also run a short-lived `nft` for range steering, which is not a worker).
#[allow(dead_code)]
pub fn workers_of(parent: u32) -> Vec<u32> {
    children_of(parent)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|arg| arg == b"--worker-fds"))
                .unwrap_or(false)
        })
        .collect()
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
