//! The certificates work for real: a rustls client trusting only ca.crt completes a handshake with a
//! rustls server using server.crt/server.key under every SAN. Also the `certs` binary's file
//! handling: modes, refusal to overwrite, --force.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::ServerName;

/// Runs a complete TLS handshake in memory and one application record each way.
fn handshake(paths: &certs::CertPaths, server_name: &str) -> Result<(), rustls::Error> {
    let server_cfg = testbed::tls::server_config(&paths.server_cert, &paths.server_key).unwrap();
    let client_cfg = testbed::tls::client_config(&paths.ca_cert).unwrap();
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name)?;
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg))?;
    use std::io::{Read, Write};
    client.writer().write_all(b"ping").unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        server.read_tls(&mut buf.as_slice()).unwrap();
        server.process_new_packets()?;
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        client.read_tls(&mut buf.as_slice()).unwrap();
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let mut got = [0u8; 4];
            if server.reader().read_exact(&mut got).is_ok() {
                assert_eq!(&got, b"ping");
                return Ok(());
            }
        }
    }
    panic!("handshake did not finish in 10 rounds");
}

#[test]
fn ecdsa_chain_verifies_for_every_default_san_and_extra_ones() {
    let dir = tempfile::tempdir().unwrap();
    let paths = certs::write_throwaway(dir.path(), &["echo.test", "10.1.2.3"]).unwrap();
    for name in ["localhost", "127.0.0.1", "::1", "echo.test", "10.1.2.3"] {
        handshake(&paths, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let err = handshake(&paths, "other.test").unwrap_err();
    assert!(
        err.to_string().contains("certificate not valid for name"),
        "{err}"
    );
}

#[test]
fn a_different_ca_is_not_trusted() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let pa = certs::write_throwaway(a.path(), &[]).unwrap();
    let pb = certs::write_throwaway(b.path(), &[]).unwrap();
    let mixed = certs::CertPaths {
        ca_cert: pb.ca_cert.clone(),
        ..pa
    };
    let err = handshake(&mixed, "localhost").unwrap_err();
    // Both CAs carry the same name, so the client finds "its" CA and the signature check fails.
    assert_eq!(err.to_string(), "invalid peer certificate: BadSignature");
}

fn certs_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_certs"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn binary_writes_six_files_with_modes_and_fingerprints_then_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("set");
    let run = certs_bin()
        .args(["--out", out.to_str().unwrap(), "--san", "echo.test"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let paths = certs::CertPaths::in_dir(&out);
    assert_eq!(mode(&paths.ca_key), 0o600);
    assert_eq!(mode(&paths.server_key), 0o600);
    assert_eq!(mode(&paths.ca_cert), 0o644);
    assert_eq!(mode(&paths.server_cert), 0o644);
    assert_eq!(mode(&paths.client_cert), 0o644);
    assert_eq!(mode(&paths.client_key), 0o600);
    // The printed fingerprint is the one of the file on disk.
    let der = testbed::tls::read_certs(&paths.server_cert).unwrap();
    let fp = certs::fingerprint_sha256(&der[0]);
    assert!(
        stdout.contains(&format!(
            "wrote {} (mode 644)  SHA-256 {fp}",
            paths.server_cert.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "wrote {} (mode 600)\n",
            paths.server_key.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("server SANs: localhost, 127.0.0.1, ::1, echo.test"),
        "{stdout}"
    );
    handshake(&paths, "echo.test").unwrap();

    let before = std::fs::read(&paths.server_key).unwrap();
    let again = certs_bin()
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains(&format!("{}, ", paths.server_key.display()))
            && stderr.contains(&format!(
                "{}: already exists (use --force to overwrite)",
                paths.client_key.display()
            )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&paths.server_key).unwrap(),
        before,
        "refusal must not touch files"
    );

    let forced = certs_bin()
        .args(["--out", out.to_str().unwrap(), "--force"])
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert_ne!(std::fs::read(&paths.server_key).unwrap(), before);
    assert_eq!(mode(&paths.server_key), 0o600);
    handshake(&paths, "localhost").unwrap();
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
}

#[test]
fn one_existing_file_is_enough_to_refuse() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.key"), "mine").unwrap();
    let run = certs_bin()
        .args(["--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.key")).unwrap(),
        "mine"
    );
    assert!(!dir.path().join("server.crt").exists());
}

#[test]
fn rsa_option_makes_a_working_rsa_chain() {
    let dir = tempfile::tempdir().unwrap();
    let run = certs_bin()
        .args([
            "--out",
            dir.path().to_str().unwrap(),
            "--rsa",
            "--days",
            "30",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("certs: RSA 2048 keys, valid 30 days"));
    let paths = certs::CertPaths::in_dir(dir.path());
    handshake(&paths, "127.0.0.1").unwrap();
    // The key really is RSA: rcgen recognises it as such.
    let key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&paths.server_key).unwrap()).unwrap();
    assert!(key.is_compatible(&rcgen::PKCS_RSA_SHA256));
}

#[test]
fn bad_san_is_reported_by_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let run = certs_bin()
        .args([
            "--out",
            dir.path().to_str().unwrap(),
            "--san",
            "caf\u{e9}.test",
        ])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("SAN \"caf\u{e9}.test\" is neither an IP address nor a valid DNS name"),
        "{stderr}"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}
