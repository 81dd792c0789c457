//! What the user controls about TLS (`--tls-version`, `--ciphers`, `--alpn`, `--cert`/`--key`,
//! `--resume`, `SSLKEYLOGFILE`), turned into one rustls client configuration on the ring provider,
//! and what each connection negotiated, read back after its handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConnection, HandshakeKind, SupportedCipherSuite};
use serde::{Deserialize, Serialize};

/// The environment variable browsers and curl read to write TLS secrets (NSS key log format).
pub const KEY_LOG_ENV: &str = "SSLKEYLOGFILE";

/// Client sessions kept for resumption (`--resume`). Sessions are keyed by server name, so one
/// target needs one entry; rustls keeps several TLS 1.3 tickets per entry.
const RESUMPTION_CACHE: usize = 256;

/// A protocol version the user can pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum TlsVersion {
    #[value(name = "1.2")]
    #[serde(rename = "1.2")]
    V12,
    #[value(name = "1.3")]
    #[serde(rename = "1.3")]
    V13,
}

/// The TLS settings of a run, as plain data so worker processes and agents get them in their plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsOptions {
    /// Only this version (`--tls-version`); `None` = 1.2 and 1.3, 1.3 preferred.
    #[serde(default)]
    pub version: Option<TlsVersion>,
    /// rustls cipher suite names (`--ciphers`), in preference order; empty = the provider's.
    #[serde(default)]
    pub ciphers: Vec<String>,
    /// ALPN protocols offered, in preference order (`--alpn`).
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Client certificate chain and key (`--cert`/`--key`), for servers that ask for one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Offer sessions from earlier connections of the same process (`--resume`).
    #[serde(default)]
    pub resume: bool,
}

/// The suite names the ring provider knows, as `--ciphers` takes them.
pub fn suite_names() -> Vec<&'static str> {
    rustls::crypto::ring::default_provider()
        .cipher_suites
        .iter()
        .map(|s| suite_name(*s))
        .collect()
}

fn suite_name(s: SupportedCipherSuite) -> &'static str {
    s.suite().as_str().unwrap_or("unknown")
}

/// Picks the suites named in `names` (case-insensitive, in the user's order) from `all`. An
/// unknown name is an error that lists every valid one.
pub fn select_suites(
    names: &[String],
    all: &[SupportedCipherSuite],
) -> anyhow::Result<Vec<SupportedCipherSuite>> {
    let mut out = Vec::new();
    for name in names {
        let name = name.trim();
        match all
            .iter()
            .find(|s| suite_name(**s).eq_ignore_ascii_case(name))
        {
            Some(s) if !out.contains(s) => out.push(*s),
            Some(_) => {}
            None => bail!(
                "--ciphers: unknown cipher suite {name:?}; valid names: {}",
                all.iter()
                    .map(|s| suite_name(*s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

/// Builds the client configuration: trusts exactly the CAs in `ca`, applies `opts`, and writes
/// the session secrets to `SSLKEYLOGFILE` when it is set (as browsers do).
pub fn client_config(ca: &Path, opts: &TlsOptions) -> anyhow::Result<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !opts.ciphers.is_empty() {
        provider.cipher_suites = select_suites(&opts.ciphers, &provider.cipher_suites)?;
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match opts.version {
        None => rustls::DEFAULT_VERSIONS,
        Some(TlsVersion::V12) => &[&rustls::version::TLS12],
        Some(TlsVersion::V13) => &[&rustls::version::TLS13],
    };
    check_suites_fit_version(&provider, opts)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in testbed::tls::read_certs(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: CA certificate rejected", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .context("--tls-version / --ciphers")?
        .with_root_certificates(roots);
    let mut config = match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => {
            let chain = testbed::tls::read_certs(cert)?;
            let key_der = testbed::tls::read_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .with_context(|| {
                    format!(
                        "--cert {} --key {}: not a usable client identity",
                        cert.display(),
                        key.display()
                    )
                })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("--cert and --key go together"),
    };
    config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Without --resume every connection stands for a separate client and does a full handshake,
    // as the original lab's clients did; resumed sessions make the server's work look smaller.
    config.resumption = if opts.resume {
        Resumption::in_memory_sessions(RESUMPTION_CACHE)
    } else {
        Resumption::disabled()
    };
    if std::env::var_os(KEY_LOG_ENV).is_some() {
        config.key_log = Arc::new(rustls::KeyLogFile::new());
    }
    Ok(config)
}

/// A version pinned with suites of only the other version gives a config that can never connect;
/// say so now instead of failing every handshake.
fn check_suites_fit_version(provider: &CryptoProvider, opts: &TlsOptions) -> anyhow::Result<()> {
    let Some(version) = opts.version else {
        return Ok(());
    };
    let wanted = match version {
        TlsVersion::V12 => rustls::ProtocolVersion::TLSv1_2,
        TlsVersion::V13 => rustls::ProtocolVersion::TLSv1_3,
    };
    if !provider
        .cipher_suites
        .iter()
        .any(|s| s.version().version == wanted)
    {
        bail!(
            "--ciphers {}: none of them is a TLS {} suite (--tls-version {}); TLS 1.3 suites \
             start with TLS13_, TLS 1.2 suites with TLS_ECDHE_",
            opts.ciphers.join(","),
            version.shown(),
            version.shown()
        );
    }
    Ok(())
}

impl TlsVersion {
    pub fn shown(self) -> &'static str {
        match self {
            TlsVersion::V12 => "1.2",
            TlsVersion::V13 => "1.3",
        }
    }
}

/// What one connection's handshake settled on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// The rustls (IANA) suite name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub suite: String,
    /// The ALPN protocol the server chose, if any.
    pub alpn: Option<String>,
    /// The server accepted a session from an earlier connection.
    pub resumed: bool,
}

/// Reads what `conn` negotiated (call after the handshake).
pub fn negotiated(conn: &ClientConnection) -> Negotiated {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(other) => format!("{other:?}"),
        None => "none".to_string(),
    };
    Negotiated {
        version,
        suite: conn
            .negotiated_cipher_suite()
            .map_or("none", suite_name)
            .to_string(),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_are_picked_by_name_in_the_users_order() {
        let all = rustls::crypto::ring::default_provider().cipher_suites;
        let picked = select_suites(
            &[
                "tls13_chacha20_poly1305_sha256".into(),
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into(),
                "TLS13_CHACHA20_POLY1305_SHA256".into(),
            ],
            &all,
        )
        .unwrap();
        let names: Vec<&str> = picked.iter().map(|s| suite_name(*s)).collect();
        assert_eq!(
            names,
            [
                "TLS13_CHACHA20_POLY1305_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
            ]
        );
    }

    #[test]
    fn an_unknown_suite_lists_the_valid_ones() {
        let all = rustls::crypto::ring::default_provider().cipher_suites;
        let e = select_suites(&["RC4-MD5".into()], &all).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("--ciphers: unknown cipher suite \"RC4-MD5\"; valid names: "),
            "{text}"
        );
        for name in suite_names() {
            assert!(text.contains(name), "{name} missing from {text}");
        }
        assert!(text.contains("TLS13_AES_128_GCM_SHA256"), "{text}");
    }

    #[test]
    fn a_version_without_a_suite_of_its_own_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs::write_throwaway(dir.path(), &[]).unwrap();
        let opts = TlsOptions {
            version: Some(TlsVersion::V12),
            ciphers: vec!["TLS13_AES_128_GCM_SHA256".into()],
            ..TlsOptions::default()
        };
        let e = client_config(&certs.ca_cert, &opts).unwrap_err();
        assert!(
            e.to_string().contains("none of them is a TLS 1.2 suite"),
            "{e}"
        );
        let ok = TlsOptions {
            version: Some(TlsVersion::V13),
            alpn: vec!["h2".into(), "http/1.1".into()],
            resume: true,
            ..opts
        };
        let c = client_config(&certs.ca_cert, &ok).unwrap();
        assert_eq!(c.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[test]
    fn cert_without_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let certs = certs::write_throwaway(dir.path(), &[]).unwrap();
        let opts = TlsOptions {
            cert: Some(certs.server_cert.clone()),
            ..TlsOptions::default()
        };
        let e = client_config(&certs.ca_cert, &opts).unwrap_err();
        assert_eq!(e.to_string(), "--cert and --key go together");
    }
}
