//! The testbed's certificate authority, server and client certificates, made with rcgen: [`generate`] returns
//! PEM strings, [`CertSet::write_to`] stores them with safe file modes, and [`write_throwaway`]
//! gives tests a fresh set in a directory of their own.

mod generate;
mod write;

pub use generate::{generate, KeyAlgorithm, Options, DEFAULT_DAYS, DEFAULT_SANS, MAX_DAYS};
pub use write::{
    write_throwaway, CertPaths, WrittenFile, CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, SERVER_CERT,
    SERVER_KEY,
};

/// Why certificates could not be made or written; each names the SAN, setting or file involved.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("SAN {name:?} is neither an IP address nor a valid DNS name: {source}")]
    BadSan { name: String, source: rcgen::Error },
    #[error("SAN must not be empty")]
    EmptySan,
    #[error("--days {days}: must be between 1 and {max}")]
    BadDays { days: u32, max: u32 },
    #[error("cannot generate the {what} key: {reason}")]
    KeyGen { what: &'static str, reason: String },
    #[error("cannot sign the {what} certificate: {source}")]
    Sign {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{}: already exists (use --force to overwrite)", files.join(", "))]
    Exists { files: Vec<String> },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The PEM documents of one certificate set: a CA, and a server and a client certificate it signed.
#[derive(Clone)]
pub struct CertSet {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// DER of the CA certificate (for fingerprints and trust stores without re-parsing PEM).
    pub ca_cert_der: Vec<u8>,
    /// DER of the server certificate.
    pub server_cert_der: Vec<u8>,
    /// A client certificate (extended key usage clientAuth) signed by the same CA, for servers
    /// that require client certificates.
    pub client_cert_pem: String,
    pub client_key_pem: String,
    pub client_cert_der: Vec<u8>,
}

impl std::fmt::Debug for CertSet {
    // Keys stay out of debug output: a panic message must never print a private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet")
            .field("ca_fingerprint", &fingerprint_sha256(&self.ca_cert_der))
            .field(
                "server_fingerprint",
                &fingerprint_sha256(&self.server_cert_der),
            )
            .finish_non_exhaustive()
    }
}

/// SHA-256 over DER bytes as colon-separated upper-case hex, the form `openssl x509 -fingerprint
/// -sha256` prints, so users can compare the two.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_of_empty_input_is_the_known_sha256() {
        assert_eq!(
            fingerprint_sha256(b""),
            "E3:B0:C4:42:98:FC:1C:14:9A:FB:F4:C8:99:6F:B9:24:27:AE:41:E4:64:9B:93:4C:A4:95:99:1B:78:52:B8:55"
        );
    }
}
