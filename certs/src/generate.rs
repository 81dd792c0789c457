//! Making the CA and the server and client certificates it signs. ECDSA P-256 keys come from rcgen (ring);
//! RSA 2048 keys come from the `rsa` crate, because rcgen on ring cannot generate RSA keys (only its
//! aws-lc-rs backend can, and we keep one crypto provider in the workspace).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};

use crate::{CertSet, CertsError};

/// Names every server certificate carries, so local tests work over IPv4, IPv6 and by name.
pub const DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Validity when none is asked for.
pub const DEFAULT_DAYS: u32 = 825;
/// Longest validity accepted (100 years); beyond that a typo is likelier than a wish.
pub const MAX_DAYS: u32 = 36_500;

/// The key type of both the CA and the server certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256: small and fast handshakes.
    #[default]
    EcdsaP256,
    /// RSA 2048 with PKCS#1 v1.5 SHA-256 signatures, like the original `openssl genrsa 2048`.
    Rsa2048,
}

/// What to make.
#[derive(Debug, Clone)]
pub struct Options {
    /// Extra SANs besides [`DEFAULT_SANS`]; IP address strings become IP SANs, others DNS names.
    pub extra_sans: Vec<String>,
    /// Validity of both certificates in days, counted from now.
    pub days: u32,
    pub algorithm: KeyAlgorithm,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_sans: Vec::new(),
            days: DEFAULT_DAYS,
            algorithm: KeyAlgorithm::EcdsaP256,
        }
    }
}

impl Options {
    /// The server certificate's SANs: the defaults, then the extra ones, without duplicates.
    pub fn sans(&self) -> Vec<String> {
        let mut out: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
        for san in &self.extra_sans {
            if !out.iter().any(|s| s.eq_ignore_ascii_case(san)) {
                out.push(san.clone());
            }
        }
        out
    }
}

/// Makes a fresh CA and a server certificate signed by it.
pub fn generate(opts: &Options) -> Result<CertSet, CertsError> {
    if opts.days == 0 || opts.days > MAX_DAYS {
        return Err(CertsError::BadDays {
            days: opts.days,
            max: MAX_DAYS,
        });
    }
    let sans = opts.sans();
    for san in &sans {
        if san.trim().is_empty() {
            return Err(CertsError::EmptySan);
        }
    }
    // An hour of slack before "now" so a peer whose clock is slightly behind still accepts them.
    let not_before = SystemTime::now() - Duration::from_secs(3600);
    let not_after = SystemTime::now() + Duration::from_secs(u64::from(opts.days) * 86_400);

    let ca_key = new_key(opts.algorithm, "CA")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = name("testbed CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before.into();
    ca_params.not_after = not_after.into();
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| CertsError::Sign { what: "CA", source })?;

    let server_key = new_key(opts.algorithm, "server")?;
    let mut params = CertificateParams::new(sans.clone()).map_err(|source| {
        // rcgen only says "invalid ASN.1 string"; find the SAN it refused so the user sees it.
        let name = sans
            .iter()
            .find(|s| CertificateParams::new(vec![(*s).clone()]).is_err())
            .cloned()
            .unwrap_or_default();
        CertsError::BadSan { name, source }
    })?;
    params.distinguished_name = name("testbed server");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = match opts.algorithm {
        KeyAlgorithm::EcdsaP256 => vec![KeyUsagePurpose::DigitalSignature],
        // TLS 1.2 RSA key exchange needs key encipherment; harmless for ECDHE.
        KeyAlgorithm::Rsa2048 => vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
    };
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert =
        params
            .signed_by(&server_key, &issuer)
            .map_err(|source| CertsError::Sign {
                what: "server",
                source,
            })?;

    // A client certificate from the same CA, for servers that require one (`--client-ca`).
    let client_key = new_key(opts.algorithm, "client")?;
    let mut client = CertificateParams::default();
    client.distinguished_name = name("testbed client");
    client.is_ca = IsCa::ExplicitNoCa;
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.use_authority_key_identifier_extension = true;
    client.not_before = not_before.into();
    client.not_after = not_after.into();
    let client_cert =
        client
            .signed_by(&client_key, &issuer)
            .map_err(|source| CertsError::Sign {
                what: "client",
                source,
            })?;

    Ok(CertSet {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        ca_cert_der: ca_cert.der().to_vec(),
        server_cert_der: server_cert.der().to_vec(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        client_cert_der: client_cert.der().to_vec(),
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "port-forwarder testbed");
    dn
}

fn new_key(algorithm: KeyAlgorithm, what: &'static str) -> Result<KeyPair, CertsError> {
    let keygen = |reason: String| CertsError::KeyGen { what, reason };
    match algorithm {
        KeyAlgorithm::EcdsaP256 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| keygen(e.to_string()))
        }
        KeyAlgorithm::Rsa2048 => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
                .map_err(|e| keygen(e.to_string()))?;
            let der = key.to_pkcs8_der().map_err(|e| keygen(e.to_string()))?;
            let alg: &'static SignatureAlgorithm = &rcgen::PKCS_RSA_SHA256;
            KeyPair::from_pkcs8_der_and_sign_algo(&der.as_bytes().into(), alg)
                .map_err(|e| keygen(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_start_with_the_defaults_and_skip_duplicates() {
        let opts = Options {
            extra_sans: vec!["echo.test".into(), "LOCALHOST".into(), "10.0.0.1".into()],
            ..Options::default()
        };
        assert_eq!(
            opts.sans(),
            ["localhost", "127.0.0.1", "::1", "echo.test", "10.0.0.1"]
        );
    }

    #[test]
    fn zero_and_huge_validity_are_refused() {
        for days in [0, MAX_DAYS + 1] {
            let err = generate(&Options {
                days,
                ..Options::default()
            })
            .unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("--days {days}: must be between 1 and 36500")
            );
        }
    }

    #[test]
    fn an_invalid_dns_name_is_named_in_the_error() {
        let err = generate(&Options {
            extra_sans: vec!["bad name\u{e9}".into()],
            ..Options::default()
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("SAN \"bad name\u{e9}\" is neither"),
            "{err}"
        );
    }

    #[test]
    fn pem_blocks_have_the_expected_labels() {
        let set = generate(&Options::default()).unwrap();
        assert!(set.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(set
            .server_cert_pem
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(set.ca_key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(set
            .server_key_pem
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(set.ca_cert_der, set.server_cert_der);
    }
}
