//! Helpers for integration tests: find the workspace's binaries, start them, wait until they
//! listen, and kill them when the test ends, even when it fails (the guard kills on drop).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of a binary of this workspace, next to the running test executable's profile folder.
/// `cargo test --workspace` builds every package's binaries before it runs any test.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile> folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A port that is free now, below the kernel's ephemeral range (32768 and up), so it cannot
/// collide with the local port of some outgoing connection of a load test running at the same
/// time. Never the same port twice in one process.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::OnceLock;
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    let mut given = given.lock().unwrap_or_else(|p| p.into_inner());
    // Start somewhere different in each process so parallel test binaries rarely meet.
    let seed = std::process::id() as usize * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as usize)
            .unwrap_or(0);
    const LOW: usize = 12_000;
    const SPAN: usize = 20_000;
    for i in 0..SPAN {
        let port = (LOW + (seed + i * 37) % SPAN) as u16;
        if given.contains(&port) {
            continue;
        }
        // Free on every address (a 0.0.0.0 bind conflicts with any holder of the port).
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN);
}

/// Polls `cond` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_listen(addr: SocketAddr, timeout: Duration) -> bool {
    wait_until(timeout, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// A child process that is killed (SIGKILL to its whole process group) when dropped. Its stderr
/// and stdout are collected so a failing test can show them.
pub struct ChildGuard {
    pub child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    name: String,
}

impl ChildGuard {
    /// Starts `cmd` in its own process group with stdout and stderr captured.
    pub fn spawn(mut cmd: Command) -> ChildGuard {
        use std::os::unix::process::CommandExt;
        let name = format!("{:?}", cmd.get_program());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // Own process group, so the guard also kills the worker processes a supervisor started.
        cmd.process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = Arc::clone(&output);
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                    o.push_str(&line);
                    o.push('\n');
                }
            }));
        }
        ChildGuard {
            child,
            output,
            readers,
            name,
        }
    }

    /// Everything the process printed so far (stdout and stderr interleaved by line).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.output().contains(needle))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process (not its group).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc_kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the process to exit on its own, up to `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Whether it had ended on its own tells a crash from a test's own failure.
        let ended = self.child.try_wait().ok().flatten();
        // SAFETY: negative pid = the process group we created in spawn().
        unsafe {
            libc_kill(-(self.child.id() as i32), 9);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The group is dead, so the pipes reach EOF: read what it printed last (bounded, in
            // case something outside the group still holds a pipe).
            wait_until(Duration::from_secs(2), || {
                self.readers.iter().all(|r| r.is_finished())
            });
            let state = match ended {
                Some(status) => format!("it had exited on its own: {status}"),
                None => "it was running until the test ended".to_string(),
            };
            eprintln!(
                "--- output of {} ({state}) ---\n{}",
                self.name,
                self.output()
            );
        }
    }
}

unsafe fn libc_kill(pid: i32, sig: i32) {
    libc::kill(pid, sig);
}
