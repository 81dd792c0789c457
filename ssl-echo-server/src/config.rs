//! Start-up decisions: loading the TLS identity with errors that say which file is wrong and how to
//! make one, and planning how many worker processes the requested connections need.

use std::path::Path;

use anyhow::bail;

/// Descriptors each worker keeps back for everything that is not a client socket (listener,
/// epoll, signal pipe, stdio, files opened while running) — a margin, not an exact count.
pub const RESERVE_FDS: u64 = 500;

/// Loads the server certificate chain and key. A missing file is the common first-run mistake, so
/// that error says how to make one.
pub fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    for (what, path) in [("certificate", cert), ("private key", key)] {
        if !path.exists() {
            bail!(
                "{}: {what} file not found. Make a CA and server certificate with \
                 `cargo run -p certs` (or the `certs` binary: certs --out certs), pass \
                 --cert/--key, or run with --plain",
                path.display()
            );
        }
    }
    // The message already contains its cause; re-wrapping keeps `{:#}` from printing it twice.
    testbed::tls::server_config(cert, key).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Connections one worker may hold with `nofile` descriptors: all but a reserve (a tenth of the
/// limit when that is smaller than [`RESERVE_FDS`], so tiny limits still leave room to work).
pub fn per_worker_capacity(nofile: u64) -> u64 {
    nofile.saturating_sub(RESERVE_FDS.min(nofile / 10)).max(1)
}

/// How the connections are spread over worker processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub workers: usize,
    /// Connections one worker accepts before it stops accepting.
    pub per_worker: u64,
    /// workers × per_worker.
    pub capacity: u64,
    /// The `--workers` asked for, when it was too few for `--max-connections`.
    pub raised_from: Option<usize>,
}

/// Picks the worker count: what `--workers` asks (default: one per CPU), raised if that cannot
/// hold `max_connections` within `nofile` descriptors per process.
pub fn plan(max_connections: u64, requested: Option<usize>, cpus: usize, nofile: u64) -> Plan {
    let per_worker = per_worker_capacity(nofile);
    let needed = max_connections.div_ceil(per_worker).max(1) as usize;
    let wanted = requested.unwrap_or(cpus).max(1);
    let workers = wanted.max(needed);
    Plan {
        workers,
        per_worker,
        capacity: per_worker * workers as u64,
        raised_from: requested.filter(|&r| r < needed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_thousand_connections_need_two_workers_under_a_20000_limit() {
        let p = plan(20_000, None, 1, 20_000);
        assert_eq!(
            p,
            Plan {
                workers: 2,
                per_worker: 19_500,
                capacity: 39_000,
                raised_from: None
            }
        );
    }

    #[test]
    fn small_limits_keep_a_tenth_back() {
        assert_eq!(per_worker_capacity(64), 58);
        assert_eq!(per_worker_capacity(1024), 922);
        assert_eq!(per_worker_capacity(20_000), 19_500);
    }

    #[test]
    fn too_few_requested_workers_are_raised_and_reported() {
        let p = plan(50_000, Some(1), 2, 20_000);
        assert_eq!((p.workers, p.raised_from), (3, Some(1)));
        let p = plan(1_000, Some(4), 2, 20_000);
        assert_eq!((p.workers, p.raised_from), (4, None));
    }

    #[test]
    fn missing_files_name_the_file_and_the_certs_tool() {
        let err = load_tls(Path::new("/nonexistent/server.crt"), Path::new("/x.key")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/nonexistent/server.crt: certificate file not found."),
            "{text}"
        );
        assert!(text.contains("cargo run -p certs"), "{text}");
    }
}
