//! Start-up decisions: loading the TLS identity with errors that say which file is wrong and how to
//! make one, and planning how many worker processes the requested connections need.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};

/// Descriptors each worker keeps back for everything that is not a client socket (listener,
/// epoll, signal pipe, stdio, files opened while running) — a margin, not an exact count.
pub const RESERVE_FDS: u64 = 500;

/// The TLS settings of the server besides its identity.
#[derive(Debug, Clone, Default)]
pub struct TlsExtras {
    /// Require a client certificate signed by a CA in this file (`--client-ca`).
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols the server accepts, in preference order (`--alpn`); empty = no ALPN.
    pub alpn: Vec<String>,
}

/// Loads the server certificate chain and key, and applies `extras`. A missing file is the common
/// first-run mistake, so that error says how to make one.
pub fn load_tls(
    cert: &Path,
    key: &Path,
    extras: &TlsExtras,
) -> anyhow::Result<rustls::ServerConfig> {
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
    let Some(ca) = &extras.client_ca else {
        // The message already contains its cause; re-wrapping keeps `{:#}` from printing it twice.
        let mut config =
            testbed::tls::server_config(cert, key).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.alpn_protocols = alpn(&extras.alpn);
        return Ok(config);
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in testbed::tls::read_certs(ca).map_err(|e| anyhow::anyhow!("--client-ca {e}"))? {
        roots
            .add(der)
            .with_context(|| format!("--client-ca {}: CA certificate rejected", ca.display()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        testbed::tls::provider(),
    )
    .build()
    .with_context(|| format!("--client-ca {}", ca.display()))?;
    let chain = testbed::tls::read_certs(cert).map_err(|e| anyhow::anyhow!("{e}"))?;
    let key_der = testbed::tls::read_key(key).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(testbed::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable server identity",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = alpn(&extras.alpn);
    Ok(config)
}

fn alpn(protocols: &[String]) -> Vec<Vec<u8>> {
    protocols.iter().map(|p| p.as_bytes().to_vec()).collect()
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
    /// The `--max-connections` asked for, when the explicit `--workers` cannot hold it.
    pub short_of: Option<u64>,
}

/// Connections planned for when `--max-connections` is not given.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 20_000;

/// Picks the worker count. An explicit `--workers` stands, as the forwarder's does (each worker
/// keeps its own TLS session cache, so a user who asks for one worker to test resumption must get
/// one); `short_of` says when it cannot hold the `--max-connections` asked for. Without
/// `--workers`: one per CPU, raised until the workers hold `max_connections` (default
/// [`DEFAULT_MAX_CONNECTIONS`]) within `nofile` descriptors per process.
pub fn plan(
    max_connections: Option<u64>,
    requested: Option<usize>,
    cpus: usize,
    nofile: u64,
) -> Plan {
    let per_worker = per_worker_capacity(nofile);
    let needed = |max: u64| max.div_ceil(per_worker).max(1) as usize;
    let (workers, short_of) = match requested {
        Some(asked) => {
            let asked = asked.max(1);
            let short = max_connections.filter(|&max| asked < needed(max));
            (asked, short)
        }
        None => (
            cpus.max(1)
                .max(needed(max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS))),
            None,
        ),
    };
    Plan {
        workers,
        per_worker,
        capacity: per_worker * workers as u64,
        short_of,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_thousand_connections_need_two_workers_under_a_20000_limit() {
        let p = plan(None, None, 1, 20_000);
        assert_eq!(
            p,
            Plan {
                workers: 2,
                per_worker: 19_500,
                capacity: 39_000,
                short_of: None
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
    fn an_explicit_worker_count_stands_and_a_shortfall_is_reported() {
        // The default --max-connections does not override an explicit --workers 1.
        let p = plan(None, Some(1), 2, 20_000);
        assert_eq!((p.workers, p.short_of, p.capacity), (1, None, 19_500));
        let p = plan(Some(50_000), Some(1), 2, 20_000);
        assert_eq!((p.workers, p.short_of), (1, Some(50_000)));
        let p = plan(Some(1_000), Some(4), 2, 20_000);
        assert_eq!((p.workers, p.short_of), (4, None));
        // Without --workers the count still grows to hold what is asked.
        let p = plan(Some(50_000), None, 2, 20_000);
        assert_eq!((p.workers, p.short_of), (3, None));
    }

    #[test]
    fn missing_files_name_the_file_and_the_certs_tool() {
        let err = load_tls(
            Path::new("/nonexistent/server.crt"),
            Path::new("/x.key"),
            &TlsExtras::default(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/nonexistent/server.crt: certificate file not found."),
            "{text}"
        );
        assert!(text.contains("cargo run -p certs"), "{text}");
    }
}
