//! rustls configurations built on the `ring` provider. Naming the provider explicitly avoids the
//! run-time panic rustls raises when feature unification enables both ring and aws-lc-rs.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS configuration could not be built; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{path}: cannot read certificate: {source}")]
    Cert {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: contains no certificate")]
    NoCert { path: String },
    #[error("{path}: cannot read private key: {source}")]
    Key {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{cert} and {key} do not make a usable server identity: {source}")]
    Identity {
        cert: String,
        key: String,
        source: rustls::Error,
    },
    #[error("{path}: CA certificate rejected: {source}")]
    Ca { path: String, source: rustls::Error },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every program uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsConfigError::Cert {
            path: shown.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCert { path: shown });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsConfigError::Key {
        path: path.display().to_string(),
        source,
    })
}

/// A server configuration from a PEM certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsConfigError> {
    let chain = read_certs(cert)?;
    let key_der = read_key(key)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|source| TlsConfigError::Identity {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source,
        })
}

/// A client configuration that trusts exactly the CAs in `ca` (PEM).
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).map_err(|source| TlsConfigError::Ca {
            path: ca.display().to_string(),
            source,
        })?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
