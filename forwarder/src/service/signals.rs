//! What the signals beyond reload and stop do, as text and as the one place a worker's
//! dispositions are set. The supervisor's one signal thread (`supervisor::Supervisor::run`)
//! owns SIGHUP (reload), SIGTERM/SIGINT (stop) and SIGUSR1, on which it logs [`status_lines`]
//! (the figures the web page shows, for a host without a browser) and passes SIGUSR1 on to the
//! workers, whose access log then reopens its file. Workers ignore SIGHUP, so a signal sent to
//! the whole service (`systemctl kill -s HUP`, `kill -HUP -PGID`) reaches the supervisor without
//! killing the workers; a SIGUSR1 sent that way makes each worker reopen its access log.

use crate::stats::snapshot::StatsSnapshot;

/// In a worker: SIGHUP is the supervisor's business, and SIGUSR1 is ignored until the worker
/// registers its access-log reopen handler (a USR1 arriving during start-up must not kill it).
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
