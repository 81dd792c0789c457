//! Network namespaces for tests that need more than loopback (outbound addresses, marks and
//! policy routing, transparent sources): created with a per-process name, entered by one thread
//! at a time (`setns` changes only the calling thread), and deleted on drop even when the test
//! fails.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

/// A namespace that lives as long as the value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add PREFIX-PID` with loopback up; a namespace left by a killed run of the same
    /// pid is replaced.
    pub fn new(prefix: &str) -> Netns {
        let name = format!("{prefix}-{}", std::process::id());
        if std::path::Path::new(&format!("/run/netns/{name}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Netns { name }
    }

    /// Runs `f` on a thread inside the namespace: the sockets it creates belong to it.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: a namespace descriptor; setns affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// Starts `f` on a thread inside the namespace and returns at once (servers).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            // SAFETY: as in `enter`.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        });
    }

    /// A command to run inside the namespace (`ip netns exec NAME ...`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its veths (and their peers) too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a shell line; panics with its output when it fails.
pub fn sh(line: &str) {
    let out = Command::new("sh").args(["-c", line]).output().unwrap();
    assert!(
        out.status.success(),
        "{line}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
