//! The `sd_notify` protocol, written by hand: one datagram per state change to the socket named
//! by `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`). Under systemd with
//! `Type=notify` this is how `systemctl start` learns every port listens, and how `WatchdogSec=`
//! learns the supervisor and its workers are alive. Outside systemd every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the notifications go, read once from the environment.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `WATCHDOG_USEC`: systemd's advice is to ping at least twice per timeout.
    watchdog_every: Option<Duration>,
    last_ping: Mutex<Option<Instant>>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. A socket that cannot be reached
    /// is logged once and ignored: a missing notification must never stop forwarding.
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|name| {
            let name = name.to_string_lossy().into_owned();
            match connect(&name) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("NOTIFY_SOCKET={name}: {e}; systemd will not hear from us");
                    None
                }
            }
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&usec| usec > 0 && for_us && target.is_some())
            .map(|usec| Duration::from_micros(usec / 2));
        Notifier {
            target,
            watchdog_every,
            last_ping: Mutex::new(None),
        }
    }

    /// Sends one notification (`KEY=VALUE` lines). Errors are logged, never returned.
    pub fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            tracing::warn!("sd_notify {:?}: {e}", message.lines().next().unwrap_or(""));
        }
    }

    /// Pings the watchdog when half its timeout has passed since the last ping and `alive` holds.
    /// Called from the supervisor's loop, which turns every 200 ms.
    pub fn watchdog(&self, alive: bool) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        if !alive {
            return;
        }
        let mut last = self.last_ping.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        *last = Some(Instant::now());
        self.send("WATCHDOG=1");
    }

    /// How often the watchdog is pinged, when systemd asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_every
    }
}

/// Opens an unbound datagram socket for `name`: a path, or `@abstract`.
fn connect(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::linux::net::SocketAddrExt;
    let addr = match name.strip_prefix('@') {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
        None => SocketAddr::from_pathname(name)?,
    };
    let socket = UnixDatagram::unbound()?;
    Ok((socket, addr))
}

/// The process's notifier, made from the environment on first use.
fn notifier() -> &'static Notifier {
    static NOTIFIER: OnceLock<Notifier> = OnceLock::new();
    NOTIFIER.get_or_init(Notifier::from_env)
}

/// Every listener is open: `systemctl start` returns now.
pub fn ready() {
    notifier().send("READY=1\nSTATUS=forwarding");
}

/// A reload (SIGHUP, `systemctl reload`) starts; [`ready`] ends it. The timestamp lets systemd
/// tell this reload from an earlier one.
pub fn reloading() {
    notifier().send(&format!(
        "RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC={}",
        monotonic_usec()
    ));
}

/// Shutdown started; connections drain.
pub fn stopping() {
    notifier().send("STOPPING=1\nSTATUS=draining connections");
}

/// Pings the watchdog when due and `alive` (every worker process running).
pub fn watchdog(alive: bool) {
    notifier().watchdog(alive);
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares reload times on.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier_to(addr: SocketAddr, every: Option<Duration>) -> Notifier {
        Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
            watchdog_every: every,
            last_ping: Mutex::new(None),
        }
    }

    #[test]
    fn abstract_and_path_names_both_reach_the_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("forwarder-notify-test-{}", std::process::id());
        let abs = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&abs).unwrap();
        let (socket, addr) = connect(&format!("@{name}")).unwrap();
        socket.send_to_addr(b"READY=1", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = notifier_to(
            SocketAddr::from_pathname(&path).unwrap(),
            Some(Duration::from_secs(60)),
        );
        n.watchdog(false);
        n.watchdog(true);
        n.watchdog(true);
        server.set_nonblocking(true).unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1", "the first live ping goes out");
        assert!(
            server.recv(&mut buf).is_err(),
            "no second ping within the interval, none while not alive"
        );
    }
}
