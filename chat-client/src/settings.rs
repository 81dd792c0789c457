//! The connect dialog's last values (host, port, nickname), kept in a small JSON file so the next
//! start offers them again. A missing file is normal (first start); an unreadable one is reported
//! and replaced by defaults, never fatal.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the connect dialog remembers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastValues {
    pub host: String,
    pub port: u16,
    pub nick: String,
}

impl Default for LastValues {
    fn default() -> Self {
        LastValues {
            host: "127.0.0.1".into(),
            port: 7000,
            nick: default_nick(),
        }
    }
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid settings JSON: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// `$XDG_CONFIG_HOME/testbed-chat/last.json`, else `~/.config/testbed-chat/last.json`.
pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("testbed-chat").join("last.json"))
}

/// Reads the file; `Ok(None)` if it does not exist yet.
pub fn load(path: &Path) -> Result<Option<LastValues>, SettingsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SettingsError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| SettingsError::Parse {
            path: path.display().to_string(),
            source,
        })
}

/// Writes the file (creating its folder), via a temporary file so a crash cannot leave half a file.
pub fn save(path: &Path, values: &LastValues) -> Result<(), SettingsError> {
    let write_err = |source| SettingsError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    // Serialising plain strings and a number cannot fail.
    let text = serde_json::to_string_pretty(values).expect("settings serialise");
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(write_err)?;
    std::fs::rename(&tmp, path).map_err(write_err)
}

/// The login name, reduced to what the server accepts as a nickname.
fn default_nick() -> String {
    let user = std::env::var("USER").unwrap_or_default();
    let nick: String = user
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(chat_server::protocol::NICK_MAX_CHARS)
        .collect();
    if nick.is_empty() {
        "guest".into()
    } else {
        nick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("last.json");
        assert!(load(&path).unwrap().is_none());
        let v = LastValues {
            host: "chat.example".into(),
            port: 7001,
            nick: "zoe".into(),
        };
        save(&path, &v).unwrap();
        assert_eq!(load(&path).unwrap(), Some(v));
    }

    #[test]
    fn broken_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.json");
        std::fs::write(&path, "{\"host\": \"x\", \"port\": \"seven\"}").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: not valid settings JSON: invalid type",
                path.display()
            )),
            "{err}"
        );
    }
}
