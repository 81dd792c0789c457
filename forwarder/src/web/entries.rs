//! The rules file as the page shows and edits it: every row with an id derived from its content
//! (so an id keeps naming the same rule while other rows come and go), the file's validation
//! errors attached to their rows, and the file's version for ETag / If-Match. The file on disk
//! is the truth: a hand edit shows up on the next read.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::rules::{self, Entry, RuleError, RulesError};
use crate::supervisor::version;

/// One row of the rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    /// 1-based line in the file.
    pub line: usize,
    pub entry: Entry,
}

/// The rules file as read now.
#[derive(Debug, Clone)]
pub struct FileView {
    pub path: String,
    pub text: String,
    pub version: String,
    pub rows: Vec<Row>,
    /// Everything wrong with the file (empty when it is valid).
    pub errors: Vec<RuleError>,
}

impl FileView {
    /// Reads the rules file; a missing file reads as empty (the forwarder creates it at start).
    pub fn read(path: &Path) -> std::io::Result<FileView> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(Self::from_text(path.display().to_string(), text))
    }

    pub fn from_text(path: String, text: String) -> FileView {
        let rows = read_rows(&text);
        let ids = assign_ids(rows.iter().map(|(_, e)| e));
        let errors = match rules::parse(&text, &path) {
            Ok(_) => Vec::new(),
            Err(RulesError(errors)) => errors,
        };
        FileView {
            version: version(&text),
            rows: rows
                .into_iter()
                .zip(ids)
                .map(|((line, entry), id)| Row { id, line, entry })
                .collect(),
            path,
            text,
            errors,
        }
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.rows.iter().map(|r| r.entry.clone()).collect()
    }
}

/// What a request asks to change.
#[derive(Debug, Clone)]
pub enum Change {
    Add(Entry),
    Edit(String, Entry),
    Delete(Vec<String>),
}

/// The entries after `change`, and the index of the added or edited one.
pub fn plan(rows: &[Row], change: &Change) -> Result<(Vec<Entry>, Option<usize>), String> {
    let mut entries: Vec<Entry> = rows.iter().map(|r| r.entry.clone()).collect();
    let index_of = |id: &str| {
        rows.iter()
            .position(|r| r.id == id)
            .ok_or_else(|| format!("no rule with id \"{id}\" (the rules changed? reload them)"))
    };
    match change {
        Change::Add(entry) => {
            entries.push(entry.clone());
            Ok((entries, Some(rows.len())))
        }
        Change::Edit(id, entry) => {
            let i = index_of(id)?;
            entries[i] = entry.clone();
            Ok((entries, Some(i)))
        }
        Change::Delete(ids) => {
            let mut doomed = Vec::new();
            for id in ids {
                doomed.push(index_of(id)?);
            }
            let kept = entries
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !doomed.contains(i))
                .map(|(_, e)| e)
                .collect();
            Ok((kept, None))
        }
    }
}

/// Lines the written file starts with before its first row (`rules::to_csv` writes the example
/// header, then one row per line).
fn header_lines() -> usize {
    rules::EXAMPLE_FILE.lines().count()
}

/// The line `entries[index]` will have in the written file.
pub fn line_of_index(index: usize) -> usize {
    header_lines() + index + 1
}

/// The index in the written entries of a line of the written file.
pub fn index_of_line(line: usize) -> Option<usize> {
    line.checked_sub(header_lines() + 1)
}

/// Validates entries exactly as the rules file is validated, numbered as they will be written,
/// so messages that cite a line agree with the file afterwards.
pub fn validate(entries: &[Entry], file: &str) -> Result<(), RulesError> {
    let numbered: Vec<(usize, Entry)> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (line_of_index(i), e.clone()))
        .collect();
    rules::validate(&numbered, file).map(|_| ())
}

/// The id of an entry: a hash of its four fields, so it does not depend on the row's position.
pub fn entry_id(entry: &Entry) -> String {
    let key = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        entry.name, entry.listen_port, entry.dest_ip, entry.dest_port
    );
    version(&key)[..12].to_string()
}

/// Ids for `entries` in order; a repeated row (only possible in a file with errors) gets `-2`,
/// `-3`, ... so every id is unique.
pub fn assign_ids<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    entries
        .map(|e| {
            let id = entry_id(e);
            let n = seen.entry(id.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                id
            } else {
                format!("{id}-{n}")
            }
        })
        .collect()
}

/// The rows of a rules file, valid or not, read the way `rules::parse` reads them: comments,
/// blank lines and a header row skipped, fields trimmed. A row with the wrong number of fields
/// is kept (padded or cut to four) so the page can show it and its error and let it be fixed.
pub fn read_rows(text: &str) -> Vec<(usize, Entry)> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    let mut first = true;
    for record in reader.records() {
        let Ok(record) = record else { continue };
        if record.iter().all(|f| f.is_empty()) {
            continue;
        }
        let is_header = first
            && record
                .get(1)
                .is_some_and(|f| f.eq_ignore_ascii_case("listen_port"));
        first = false;
        if is_header {
            continue;
        }
        let line = record
            .position()
            .map(|p| line_at(text, p.byte()))
            .unwrap_or(0);
        let field = |i: usize| record.get(i).unwrap_or("").to_string();
        rows.push((
            line,
            Entry {
                name: field(0),
                listen_port: field(1),
                dest_ip: field(2),
                dest_port: field(3),
            },
        ));
    }
    rows
}

/// 1-based line of the record the csv reader reports at `byte` (it reports where it started
/// looking, before the blank and comment lines it skipped).
fn line_at(text: &str, byte: u64) -> usize {
    let mut start = (byte as usize).min(text.len());
    let mut line = text.as_bytes()[..start]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1;
    while let Some(rest) = text.get(start..) {
        let this = rest.split('\n').next().unwrap_or("");
        let skipped = this.trim().is_empty() || this.starts_with('#');
        if !skipped || this.len() == rest.len() {
            break;
        }
        start += this.len() + 1;
        line += 1;
    }
    line
}

/// One validation problem as the page shows it: next to `field` of the row `id`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FieldError {
    pub line: usize,
    pub field: String,
    pub message: String,
    /// The row it belongs to, when it belongs to one.
    pub id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, listen: &str, ip: &str, port: &str) -> Entry {
        Entry {
            name: name.into(),
            listen_port: listen.into(),
            dest_ip: ip.into(),
            dest_port: port.into(),
        }
    }

    #[test]
    fn rows_keep_lines_and_invalid_rows() {
        let text = "# c\nname,listen_port,dest_ip,dest_port\n\n a , 8080 ,127.0.0.1, 9001\n# x\nb,8081,127.0.0.1\n\"c,d\",8082,localhost,9003,extra\n";
        let rows = read_rows(text);
        assert_eq!(
            rows,
            vec![
                (4, e("a", "8080", "127.0.0.1", "9001")),
                (6, e("b", "8081", "127.0.0.1", "")),
                (7, e("c,d", "8082", "localhost", "9003")),
            ]
        );
        let view = FileView::from_text("f.csv".into(), text.into());
        assert_eq!(view.errors.len(), 2);
        assert_eq!(view.errors[0].line, 6);
        assert_eq!(view.rows[1].line, 6);
    }

    #[test]
    fn ids_follow_content_not_position() {
        let a = e("a", "8080", "127.0.0.1", "9001");
        let b = e("b", "8081", "127.0.0.1", "9002");
        let ids1 = assign_ids([a.clone(), b.clone()].iter());
        let ids2 = assign_ids([b.clone(), a.clone()].iter());
        assert_eq!(ids1[0], ids2[1]);
        assert_eq!(ids1[0].len(), 12);
        assert_ne!(ids1[0], ids1[1]);
        let dup = assign_ids([a.clone(), a.clone()].iter());
        assert_eq!(dup[1], format!("{}-2", dup[0]));
    }

    #[test]
    fn plan_adds_edits_and_deletes_by_id() {
        let view = FileView::from_text(
            "f".into(),
            "a,8080,127.0.0.1,9001\nb,8081,127.0.0.1,9002\nc,8082,127.0.0.1,9003\n".into(),
        );
        let ids: Vec<String> = view.rows.iter().map(|r| r.id.clone()).collect();
        let (added, at) = plan(&view.rows, &Change::Add(e("d", "1", "h", "2"))).unwrap();
        assert_eq!((added.len(), at), (4, Some(3)));
        let (edited, at) = plan(
            &view.rows,
            &Change::Edit(ids[1].clone(), e("B", "1", "h", "2")),
        )
        .unwrap();
        assert_eq!((edited[1].name.as_str(), at), ("B", Some(1)));
        let (left, _) = plan(
            &view.rows,
            &Change::Delete(vec![ids[0].clone(), ids[2].clone()]),
        )
        .unwrap();
        assert_eq!(left, vec![e("b", "8081", "127.0.0.1", "9002")]);
        let missing = plan(&view.rows, &Change::Delete(vec!["nope".into()])).unwrap_err();
        assert_eq!(
            missing,
            "no rule with id \"nope\" (the rules changed? reload them)"
        );
    }

    #[test]
    fn written_lines_map_back_to_indexes() {
        let entries = vec![
            e("a", "8080", "127.0.0.1", "9001"),
            e("b", "8081", "127.0.0.1", "9002"),
        ];
        let text = rules::to_csv(&entries);
        let rows = read_rows(&text);
        assert_eq!(rows[1].0, line_of_index(1));
        assert_eq!(index_of_line(line_of_index(1)), Some(1));
        let errs = validate(
            &[
                e("a", "8080", "127.0.0.1", "9001"),
                e("b", "99999", "127.0.0.1", "1"),
            ],
            "f",
        )
        .unwrap_err();
        assert_eq!(errs.0[0].line, line_of_index(1));
        assert_eq!(errs.0[0].field, "listen_port");
    }
}
