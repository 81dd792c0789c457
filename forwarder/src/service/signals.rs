//! Signals beyond reload (SIGHUP) and stop (SIGTERM/SIGINT), which the supervisor owns:
//! SIGUSR1 logs the figures the web page shows, for a host without a browser; workers ignore
//! SIGHUP and SIGUSR1, so a signal sent to the whole service (`systemctl kill -s USR1`, or
//! `kill -HUP -PGID`) reaches the supervisor without killing the workers.

use crate::supervisor::{StatsSnapshot, Supervisor};

/// Starts a thread that logs [`status_lines`] at info level on every SIGUSR1.
pub fn log_status_on_usr1(sup: Supervisor) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || {
            for _ in signals.forever() {
                for line in status_lines(&sup.stats()) {
                    tracing::info!("{line}");
                }
            }
        })?;
    Ok(())
}

/// In a worker: SIGHUP and SIGUSR1 are the supervisor's business.
pub fn ignore_in_worker() {
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

/// One line for the whole forwarder, then one per listen port.
pub fn status_lines(s: &StatsSnapshot) -> Vec<String> {
    let mut lines = vec![format!(
        "status: {} workers, {} active connections (capacity {}), up {} s",
        s.workers,
        s.active,
        s.capacity,
        s.uptime_ms / 1000
    )];
    for p in &s.pools {
        let backends = p
            .backends
            .iter()
            .map(|b| format!("{} {} {} ({} active)", b.name, b.addr, b.state, b.active))
            .collect::<Vec<_>>()
            .join(", ");
        lines.push(format!(
            "status: {} accepted {}: {backends}",
            p.listen, p.accepted
        ));
    }
    lines
}
