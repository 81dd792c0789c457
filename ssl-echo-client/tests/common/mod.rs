//! Shared by the integration tests: throwaway certificates, the real `ssl-echo-server` on a free
//! loopback port, and running the client binary with a time limit, stdout and stderr kept apart.

#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use testbed_dev::testing::{bin_path, free_port, wait_for_listen, ChildGuard};

pub const CLIENT: &str = env!("CARGO_BIN_EXE_ssl-echo-client");

/// A fresh CA + server certificate for localhost / 127.0.0.1 in a temporary folder.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub paths: certs::CertPaths,
}

pub fn certs() -> Certs {
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = certs::write_throwaway(dir.path(), &[]).expect("throwaway certificates");
    Certs { dir, paths }
}

/// The workspace's `ssl-echo-server` (built by `cargo test --workspace`, or
/// `cargo build -p ssl-echo-server` in the same target folder).
pub fn server_binary() -> PathBuf {
    bin_path("ssl-echo-server")
}

/// A running echo server.
pub struct Server {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub stats_file: PathBuf,
}

impl Server {
    /// Starts an echo server on a free loopback port (TLS with `certs`, or plain).
    pub fn start(certs: Option<&Certs>, work: &Path) -> Server {
        Server::start_with(certs, work, &[])
    }

    /// Like [`Server::start`], with `extra` server flags (`--workers 1`, `--client-ca`, ...).
    pub fn start_with(certs: Option<&Certs>, work: &Path, extra: &[&str]) -> Server {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let stats_file = work.join(format!("server-{port}.json"));
        let mut cmd = Command::new(server_binary());
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--stats-file")
            .arg(&stats_file)
            // Stats written often, so tests can poll them.
            .arg("--stats-interval")
            .arg("0.2");
        match certs {
            Some(c) => {
                cmd.arg("--cert")
                    .arg(&c.paths.server_cert)
                    .arg("--key")
                    .arg(&c.paths.server_key);
            }
            None => {
                cmd.arg("--plain");
            }
        }
        cmd.args(extra);
        let guard = ChildGuard::spawn(cmd);
        assert!(
            wait_for_listen(addr, Duration::from_secs(20)),
            "echo server did not listen on {addr}:\n{}",
            guard.output()
        );
        Server {
            guard,
            addr,
            stats_file,
        }
    }

    /// Kills the server and all its worker processes at once (SIGKILL to its process group).
    pub fn kill(&mut self) {
        // SAFETY: kill(2) on the process group ChildGuard created for the server.
        unsafe {
            libc::kill(-(self.guard.pid() as i32), libc::SIGKILL);
        }
        self.guard
            .wait_exit(Duration::from_secs(10))
            .expect("server killed");
    }

    /// A number from the server's stats file (0 while the file is not there yet).
    pub fn stat(&self, field: &str) -> u64 {
        std::fs::read_to_string(&self.stats_file)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v[field].as_u64())
            .unwrap_or(0)
    }
}

/// What a finished client run printed.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\n--- stderr ---\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A started client; killed (with its worker processes) if dropped before it ends.
pub struct ClientProcess {
    child: Option<Child>,
    started: Instant,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl ClientProcess {
    pub fn start(args: &[&str]) -> ClientProcess {
        let mut cmd = Command::new(CLIENT);
        cmd.args(args);
        ClientProcess::spawn(cmd)
    }

    /// Starts `cmd` (the client, perhaps behind `ip netns exec`) with stdout and stderr kept.
    pub fn spawn(mut cmd: Command) -> ClientProcess {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start ssl-echo-client");
        let out = drain(child.stdout.take().unwrap());
        let err = drain(child.stderr.take().unwrap());
        ClientProcess {
            child: Some(child),
            started: Instant::now(),
            out: Some(out),
            err: Some(err),
        }
    }

    /// The client's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Process ids of the client's worker processes (its children).
    pub fn workers(&self) -> Vec<u32> {
        let parent = self.pid();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the ")" that closes the command name: state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) {
                found.push(pid);
            }
        }
        found.sort();
        found
    }

    /// Sends `sig` to the client process only.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Sends `sig` to the client's process group, as a terminal does for Ctrl-C.
    pub fn signal_group(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill(2) on the process group we created with process_group(0).
        unsafe {
            libc::kill(-pid, sig);
        }
    }

    /// Waits for the client to end; panics (after killing it) if it takes longer than `limit`.
    pub fn finish(mut self, limit: Duration) -> Run {
        let mut child = self.child.take().unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if self.started.elapsed() > limit {
                kill_group(&child);
                let _ = child.wait();
                let err = self.err.take().unwrap().join().unwrap_or_default();
                panic!("ssl-echo-client still running after {limit:?}; stderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = self.started.elapsed();
        Run {
            status,
            stdout: self.out.take().unwrap().join().unwrap_or_default(),
            stderr: self.err.take().unwrap().join().unwrap_or_default(),
            took,
        }
    }
}

fn kill_group(child: &Child) {
    // SAFETY: kill(2) on the process group we created with process_group(0).
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill_group(child);
            let _ = child.wait();
        }
    }
}

/// Runs the client to the end (at most `limit`).
pub fn run_client(args: &[&str], limit: Duration) -> Run {
    ClientProcess::start(args).finish(limit)
}

/// Reads one sheet of a report as rows of cells.
pub fn sheet(path: &Path, name: &str) -> calamine::Range<calamine::Data> {
    use calamine::Reader;
    let mut wb: calamine::Xlsx<_> = calamine::open_workbook(path).expect("open report");
    wb.worksheet_range(name).expect("sheet")
}

pub fn sheet_names(path: &Path) -> Vec<String> {
    use calamine::Reader;
    let wb: calamine::Xlsx<_> = calamine::open_workbook(path).expect("open report");
    wb.sheet_names()
}

/// A cell as a number (panics with the cell's position otherwise).
pub fn num(range: &calamine::Range<calamine::Data>, row: usize, col: usize) -> f64 {
    match range.get((row, col)) {
        Some(calamine::Data::Float(f)) => *f,
        Some(calamine::Data::Int(i)) => *i as f64,
        other => panic!("cell ({row},{col}) is not a number: {other:?}"),
    }
}

pub fn text(range: &calamine::Range<calamine::Data>, row: usize, col: usize) -> String {
    match range.get((row, col)) {
        Some(calamine::Data::String(s)) => s.clone(),
        Some(calamine::Data::Empty) | None => String::new(),
        other => panic!("cell ({row},{col}) is not text: {other:?}"),
    }
}

/// The Summary sheet's value next to the label `label` (column A → column B).
pub fn summary_value(path: &Path, label: &str) -> f64 {
    let s = sheet(path, "Summary");
    for row in 0..s.height() {
        if text_or_empty(&s, row, 0) == label {
            return num(&s, row, 1);
        }
    }
    panic!("no {label:?} row in the Summary sheet");
}

fn text_or_empty(range: &calamine::Range<calamine::Data>, row: usize, col: usize) -> String {
    match range.get((row, col)) {
        Some(calamine::Data::String(s)) => s.clone(),
        _ => String::new(),
    }
}

/// One test's set-up: a temporary folder, certificates (TLS runs), the echo server (unless the
/// test brings its own port), the report path, and the flags every run passes (`--port`, `--ca`
/// or `--plain`, `--report`, `--json`).
pub struct Setup {
    pub certs: Option<Certs>,
    pub work: tempfile::TempDir,
    pub server: Option<Server>,
    pub port: u16,
    pub report: PathBuf,
}

impl Setup {
    /// A TLS echo server with fresh certificates; the report is `WORK/report_name`.
    pub fn tls(report_name: &str) -> Setup {
        let certs = certs();
        let work = tempfile::tempdir().expect("temp dir");
        let server = Server::start(Some(&certs), work.path());
        Setup::with(Some(certs), work, Some(server), None, report_name)
    }

    /// A plaintext echo server.
    pub fn plain(report_name: &str) -> Setup {
        let work = tempfile::tempdir().expect("temp dir");
        let server = Server::start(None, work.path());
        Setup::with(None, work, Some(server), None, report_name)
    }

    /// A TLS echo server started with `extra` flags.
    pub fn tls_with(report_name: &str, extra: &[&str]) -> Setup {
        let certs = certs();
        let work = tempfile::tempdir().expect("temp dir");
        let server = Server::start_with(Some(&certs), work.path(), extra);
        Setup::with(Some(certs), work, Some(server), None, report_name)
    }

    /// Plaintext runs against `port`, where the test provides whatever listens (or nothing).
    pub fn plain_to(port: u16, report_name: &str) -> Setup {
        let work = tempfile::tempdir().expect("temp dir");
        Setup::with(None, work, None, Some(port), report_name)
    }

    fn with(
        certs: Option<Certs>,
        work: tempfile::TempDir,
        server: Option<Server>,
        port: Option<u16>,
        report_name: &str,
    ) -> Setup {
        let port = port.unwrap_or_else(|| server.as_ref().expect("a server").addr.port());
        let report = work.path().join(report_name);
        Setup {
            certs,
            work,
            server,
            port,
            report,
        }
    }

    /// The echo server (panics for a set-up without one).
    pub fn server(&self) -> &Server {
        self.server
            .as_ref()
            .expect("this set-up has no echo server")
    }

    /// The common flags followed by `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["--port".to_string(), self.port.to_string()];
        match &self.certs {
            Some(c) => args.extend(["--ca".to_string(), c.paths.ca_cert.display().to_string()]),
            None => args.push("--plain".to_string()),
        }
        args.extend([
            "--report".to_string(),
            self.report.display().to_string(),
            "--json".to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs the client with the common flags and `extra`, to the end (at most `limit`).
    pub fn run(&self, extra: &[&str], limit: Duration) -> Run {
        self.start(extra).finish(limit)
    }

    /// Starts the client with the common flags and `extra`.
    pub fn start(&self, extra: &[&str]) -> ClientProcess {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ClientProcess::start(&args)
    }
}

/// The exit status of a run that completed with more failures than `--max-errors` allows.
pub const EXIT_TOO_MANY_ERRORS: i32 = 3;

/// A running `ssl-echo-client agent` on a free loopback port.
pub struct Agent {
    pub guard: ChildGuard,
    /// `127.0.0.1:PORT`, as given to `--agents`.
    pub addr: String,
}

impl Agent {
    /// Starts an agent with `extra` flags and waits until it listens.
    pub fn start(extra: &[&str]) -> Agent {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(CLIENT);
        cmd.args(["agent", "--listen", &addr]).args(extra);
        Agent::spawn(cmd, addr)
    }

    /// Waits until the agent that `cmd` starts listens on `addr`.
    pub fn spawn(cmd: Command, addr: String) -> Agent {
        let guard = ChildGuard::spawn(cmd);
        assert!(
            guard.wait_for_output("agent listening on", Duration::from_secs(20)),
            "agent did not start:\n{}",
            guard.output()
        );
        Agent { guard, addr }
    }

    /// Kills the agent and its worker processes at once (SIGKILL to its process group).
    pub fn kill(&mut self) {
        // SAFETY: kill(2) on the process group ChildGuard created for the agent.
        unsafe {
            libc::kill(-(self.guard.pid() as i32), libc::SIGKILL);
        }
        self.guard
            .wait_exit(Duration::from_secs(10))
            .expect("agent killed");
    }
}
