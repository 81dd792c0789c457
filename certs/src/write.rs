//! Storing a [`CertSet`] as six files. Keys are created with mode 0600 from the first byte (never
//! chmod'ed afterwards), each file is written to a temporary name and renamed into place, and
//! nothing is written at all when a file exists and overwriting was not asked for.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{fingerprint_sha256, generate, CertSet, CertsError, Options};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const CLIENT_CERT: &str = "client.crt";
pub const CLIENT_KEY: &str = "client.key";

/// One file written by [`CertSet::write_to`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub mode: u32,
    /// SHA-256 fingerprint of the certificate; `None` for keys.
    pub fingerprint: Option<String>,
}

/// Where a set was written.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl CertPaths {
    /// The standard file names inside `dir`.
    pub fn in_dir(dir: &Path) -> CertPaths {
        CertPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join(CA_CERT),
            ca_key: dir.join(CA_KEY),
            server_cert: dir.join(SERVER_CERT),
            server_key: dir.join(SERVER_KEY),
            client_cert: dir.join(CLIENT_CERT),
            client_key: dir.join(CLIENT_KEY),
        }
    }
}

impl CertSet {
    /// Writes `ca.crt`, `ca.key`, `server.crt`, `server.key`, `client.crt`, `client.key` into
    /// `dir` (created if missing).
    /// Without `force`, refuses before writing anything if any of them exists.
    pub fn write_to(&self, dir: &Path, force: bool) -> Result<Vec<WrittenFile>, CertsError> {
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| CertsError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let files: [(&str, &str, u32, Option<&[u8]>); 6] = [
            (CA_CERT, &self.ca_cert_pem, 0o644, Some(&self.ca_cert_der)),
            (CA_KEY, &self.ca_key_pem, 0o600, None),
            (
                SERVER_CERT,
                &self.server_cert_pem,
                0o644,
                Some(&self.server_cert_der),
            ),
            (SERVER_KEY, &self.server_key_pem, 0o600, None),
            (
                CLIENT_CERT,
                &self.client_cert_pem,
                0o644,
                Some(&self.client_cert_der),
            ),
            (CLIENT_KEY, &self.client_key_pem, 0o600, None),
        ];
        if !force {
            let existing: Vec<String> = files
                .iter()
                .map(|(name, ..)| dir.join(name))
                .filter(|p| p.symlink_metadata().is_ok())
                .map(|p| p.display().to_string())
                .collect();
            if !existing.is_empty() {
                return Err(CertsError::Exists { files: existing });
            }
        }
        let mut written = Vec::with_capacity(files.len());
        for (name, pem, mode, der) in files {
            let path = dir.join(name);
            write_atomically(&path, pem.as_bytes(), mode).map_err(io_err(&path))?;
            written.push(WrittenFile {
                path,
                mode,
                fingerprint: der.map(fingerprint_sha256),
            });
        }
        Ok(written)
    }
}

/// Writes `bytes` to a temporary file created with `mode`, syncs it, and renames it to `path`, so a
/// reader never sees half a key and a replaced key never had looser permissions on the way.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A fresh ECDSA set in `dir` for tests and demos: generates, writes (overwriting), and returns the
/// paths. Extra SANs can be given for tests that connect by another name.
pub fn write_throwaway(dir: &Path, extra_sans: &[&str]) -> Result<CertPaths, CertsError> {
    let set = generate(&Options {
        extra_sans: extra_sans.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    })?;
    set.write_to(dir, true)?;
    Ok(CertPaths::in_dir(dir))
}
