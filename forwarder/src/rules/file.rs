//! The rules file on disk, owned in one place: read once per change (parsed, validated and host
//! names resolved once), versioned for ETag / If-Match, written atomically with the previous file
//! kept as `<file>.bak`, all under one lock. `--check`, start-up, SIGHUP, the file watcher and the
//! web page all go through [`RulesFile`].

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{parse, read_rows, to_csv, validate, Entry, Row, RuleError, RuleSet, RulesError};

/// The rules file as last read.
#[derive(Debug)]
pub struct Snapshot {
    /// The file's text (empty when it does not exist).
    pub text: String,
    /// A short tag of `text`, for ETag / If-Match.
    pub version: String,
    /// Every row, valid or not, with its line.
    pub rows: Vec<Row>,
    /// The rules the text describes, or everything wrong with it.
    pub rules: Result<RuleSet, RulesError>,
    stamp: Option<FileStamp>,
}

/// Enough of a file's metadata to notice that it was replaced or edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    mtime_ns: i128,
    size: u64,
    inode: u64,
}

/// Why a write of the rules was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the rules changed since you loaded them (current version {current})")]
    Stale { current: String },
    /// The entries' errors (citing the lines given with them), or why they cannot be applied.
    #[error("{0}")]
    Invalid(RulesError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The one owner of the rules file.
pub struct RulesFile {
    path: PathBuf,
    label: String,
    state: Mutex<State>,
}

struct State {
    current: Arc<Snapshot>,
    /// The version last handed to the supervisor as a change (or written by it), so a change is
    /// applied once whoever noticed it first.
    delivered: String,
}

impl RulesFile {
    /// Reads `path` now; a file that cannot be read is an error naming it. (Later reads take a
    /// file that went missing as empty: the rules it describes are then refused as a change.)
    pub fn open(path: &Path) -> Result<RulesFile, RulesError> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            RulesError(vec![RuleError {
                file: label.clone(),
                line: 0,
                field: "file".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let current = Arc::new(Snapshot::of(text, &label, stamp(path)));
        Ok(RulesFile {
            path: path.to_path_buf(),
            label,
            state: Mutex::new(State {
                delivered: current.version.clone(),
                current,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How errors name the file.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file as it is now: read again only when it changed on disk since the last read.
    pub fn current(&self) -> Arc<Snapshot> {
        let mut state = self.lock();
        self.refresh(&mut state, false);
        Arc::clone(&state.current)
    }

    /// The file, if it changed since a change was last handed out or written (the watcher's
    /// question); `force` reads it again even when its metadata looks the same (SIGHUP).
    pub fn take_change(&self, force: bool) -> Option<Arc<Snapshot>> {
        let mut state = self.lock();
        self.refresh(&mut state, force);
        if state.current.version == state.delivered && !force {
            return None;
        }
        state.delivered = state.current.version.clone();
        Some(Arc::clone(&state.current))
    }

    fn refresh(&self, state: &mut State, force: bool) {
        let now = stamp(&self.path);
        if !force && now == state.current.stamp {
            return;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", self.label);
                return;
            }
        };
        state.current = Arc::new(Snapshot::of(text, &self.label, now));
    }

    /// Writes `entries` as the new rules file, all or nothing, one writer at a time: refused when
    /// `if_match` names another version than the file's, or when the entries are invalid, or when
    /// `apply` refuses them (it makes them the rules in force); only then is the file replaced,
    /// atomically, with the previous one kept as `<file>.bak`. Each entry comes with the line its
    /// errors should cite (where the page shows it); once written, rules carry their new lines.
    pub fn replace(
        &self,
        entries: &[(usize, Entry)],
        if_match: Option<&str>,
        apply: impl FnOnce(&RuleSet) -> Result<(), RulesError>,
    ) -> Result<Arc<Snapshot>, WriteError> {
        let mut state = self.lock();
        self.refresh(&mut state, false);
        if let Some(expected) = if_match {
            if expected.trim_matches('"') != state.current.version {
                return Err(WriteError::Stale {
                    current: state.current.version.clone(),
                });
            }
        }
        let mut set = validate(entries, &self.label).map_err(WriteError::Invalid)?;
        apply(&set).map_err(WriteError::Invalid)?;
        let plain: Vec<Entry> = entries.iter().map(|(_, e)| e.clone()).collect();
        let text = to_csv(&plain);
        write_atomically(&self.path, &text).map_err(|source| WriteError::Io {
            path: self.label.clone(),
            source,
        })?;
        let rows = read_rows(&text, &self.label);
        let written_line: HashMap<usize, usize> = entries
            .iter()
            .zip(&rows)
            .map(|((cited, _), row)| (*cited, row.line))
            .collect();
        for rule in set.pools.iter_mut().flat_map(|p| p.rules.iter_mut()) {
            rule.line = written_line.get(&rule.line).copied().unwrap_or(rule.line);
        }
        let written = Arc::new(Snapshot {
            version: version(&text),
            rows,
            rules: Ok(set),
            text,
            stamp: stamp(&self.path),
        });
        state.delivered = written.version.clone();
        state.current = Arc::clone(&written);
        tracing::info!(
            "rules written to {} ({} entries)",
            self.label,
            entries.len()
        );
        Ok(written)
    }
}

impl Snapshot {
    fn of(text: String, label: &str, stamp: Option<FileStamp>) -> Snapshot {
        Snapshot {
            version: version(&text),
            rows: read_rows(&text, label),
            rules: parse(&text, label),
            text,
            stamp,
        }
    }

    /// The entries of every row, in file order.
    pub fn entries(&self) -> Vec<Entry> {
        self.rows.iter().map(|r| r.entry.clone()).collect()
    }
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        size: m.size(),
        inode: m.ino(),
    })
}

/// A short version tag of a text, stable across runs (FNV-1a; the std hasher is seeded).
pub fn version(text: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Writes `text` to a temp file beside `path`, keeps the old file as `<path>.bak`, then renames.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    if path.exists() {
        std::fs::copy(path, dir.join(format!("{name}.bak")))?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, listen: &str, port: &str) -> Entry {
        Entry {
            name: name.into(),
            listen_port: listen.into(),
            dest_ip: "127.0.0.1".into(),
            dest_port: port.into(),
            options: String::new(),
        }
    }

    #[test]
    fn a_change_is_handed_out_once_and_a_write_is_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.csv");
        std::fs::write(&path, "a,8080,127.0.0.1,9001\n").unwrap();
        let file = RulesFile::open(&path).unwrap();
        assert!(
            file.take_change(false).is_none(),
            "the opening read is known"
        );
        std::fs::write(&path, "a,8080,127.0.0.1,9002\n").unwrap();
        // The page reading it first does not hide the change from the watcher.
        assert_eq!(file.current().rows[0].entry.dest_port, "9002");
        let change = file
            .take_change(false)
            .expect("an edit on disk is a change");
        assert!(change.rules.is_ok());
        assert!(file.take_change(false).is_none());
        let version = file.current().version.clone();
        let mut applied = None;
        file.replace(&[(1, entry("b", "8081", "9003"))], Some(&version), |set| {
            applied = Some(set.pools[0].listen.port());
            Ok(())
        })
        .unwrap();
        assert_eq!(applied, Some(8081));
        let written = file.current();
        let rule_line = written.rules.as_ref().unwrap().pools[0].rules[0].line;
        assert_eq!(
            rule_line, written.rows[0].line,
            "rules carry their written lines"
        );
        assert!(rule_line > 1, "after the comment header");
        assert!(file.take_change(false).is_none(), "the writer applied it");
        assert!(file.take_change(true).is_some(), "SIGHUP reads regardless");
        let bak = std::fs::read_to_string(dir.path().join("entries.csv.bak")).unwrap();
        assert_eq!(bak, "a,8080,127.0.0.1,9002\n");
    }

    #[test]
    fn stale_invalid_or_refused_writes_leave_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entries.csv");
        std::fs::write(&path, "a,8080,127.0.0.1,9001\n").unwrap();
        let file = RulesFile::open(&path).unwrap();
        let ok = [(1, entry("b", "8081", "9003"))];
        let stale = file.replace(&ok, Some("0000"), |_| Ok(())).unwrap_err();
        assert!(matches!(stale, WriteError::Stale { .. }));
        let bad = file
            .replace(&[(7, entry("b", "99999", "9003"))], None, |_| Ok(()))
            .unwrap_err();
        assert!(bad
            .to_string()
            .contains(":7: listen_port: port 99999 is out of range"));
        let refused = file
            .replace(&ok, None, |_| {
                Err(RulesError(vec![RuleError {
                    file: "f".into(),
                    line: 1,
                    field: "listen_port".into(),
                    message: "cannot listen".into(),
                }]))
            })
            .unwrap_err();
        assert!(matches!(refused, WriteError::Invalid(_)));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "a,8080,127.0.0.1,9001\n"
        );
        assert!(!dir.path().join("entries.csv.bak").exists());
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let err = RulesFile::open(Path::new("/nonexistent/entries.csv"))
            .err()
            .unwrap();
        assert!(err
            .to_string()
            .starts_with("/nonexistent/entries.csv:0: file: cannot read:"));
    }
}
