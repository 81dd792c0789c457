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

/// The rules as they will be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// Each entry's line in the file as it is now (an added one: after the last), so messages
    /// that cite a line agree with what the page shows.
    pub lines: Vec<usize>,
    /// The index of the added or edited entry.
    pub target: Option<usize>,
}

/// The entries after `change`.
pub fn plan(rows: &[Row], change: &Change) -> Result<Plan, String> {
    let mut entries: Vec<Entry> = rows.iter().map(|r| r.entry.clone()).collect();
    let mut lines: Vec<usize> = rows.iter().map(|r| r.line).collect();
    let index_of = |id: &str| {
        rows.iter()
            .position(|r| r.id == id)
            .ok_or_else(|| format!("no rule with id \"{id}\" (the rules changed? reload them)"))
    };
    let target = match change {
        Change::Add(entry) => {
            entries.push(entry.clone());
            lines.push(lines.iter().max().map_or(1, |l| l + 1));
            Some(rows.len())
        }
        Change::Edit(id, entry) => {
            let i = index_of(id)?;
            entries[i] = entry.clone();
            Some(i)
        }
        Change::Delete(ids) => {
            let mut doomed = Vec::new();
            for id in ids {
                doomed.push(index_of(id)?);
            }
            let mut i = 0;
            entries.retain(|_| {
                i += 1;
                !doomed.contains(&(i - 1))
            });
            let mut i = 0;
            lines.retain(|_| {
                i += 1;
                !doomed.contains(&(i - 1))
            });
            None
        }
    };
    Ok(Plan {
        entries,
        lines,
        target,
    })
}

impl Plan {
    /// Validates the entries exactly as the rules file is validated.
    pub fn validate(&self, file: &str) -> Result<(), RulesError> {
        let numbered: Vec<(usize, Entry)> = self
            .lines
            .iter()
            .copied()
            .zip(self.entries.iter().cloned())
            .collect();
        rules::validate(&numbered, file).map(|_| ())
    }

    /// The entry a validation error of [`Plan::validate`] is about.
    pub fn index_of_line(&self, line: usize) -> Option<usize> {
        self.lines.iter().position(|&l| l == line)
    }
}

/// Lines the written file starts with before its first row (`rules::to_csv` writes the example
/// header, then one row per line).
fn header_lines() -> usize {
    rules::EXAMPLE_FILE.lines().count()
}

/// The index in the written entries of a line of the written file.
pub fn index_of_written_line(line: usize) -> Option<usize> {
    line.checked_sub(header_lines() + 1)
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
        if rules::skipped_row(&record, &mut first) {
            continue;
        }
        let line = record
            .position()
            .map(|p| rules::line_at(text, p.byte()))
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
    fn plan_adds_edits_and_deletes_by_id_keeping_file_lines() {
        let view = FileView::from_text(
            "f".into(),
            "# c\na,8080,127.0.0.1,9001\nb,8081,127.0.0.1,9002\n\nc,8082,127.0.0.1,9003\n".into(),
        );
        let ids: Vec<String> = view.rows.iter().map(|r| r.id.clone()).collect();
        let added = plan(&view.rows, &Change::Add(e("d", "1", "h", "2"))).unwrap();
        assert_eq!((added.entries.len(), added.target), (4, Some(3)));
        assert_eq!(added.lines, vec![2, 3, 5, 6]);
        let edited = plan(
            &view.rows,
            &Change::Edit(ids[1].clone(), e("B", "1", "h", "2")),
        )
        .unwrap();
        assert_eq!(
            (edited.entries[1].name.as_str(), edited.target),
            ("B", Some(1))
        );
        let left = plan(
            &view.rows,
            &Change::Delete(vec![ids[0].clone(), ids[2].clone()]),
        )
        .unwrap();
        assert_eq!(left.entries, vec![e("b", "8081", "127.0.0.1", "9002")]);
        assert_eq!(left.lines, vec![3]);
        let missing = plan(&view.rows, &Change::Delete(vec!["nope".into()])).unwrap_err();
        assert_eq!(
            missing,
            "no rule with id \"nope\" (the rules changed? reload them)"
        );
    }

    #[test]
    fn messages_cite_the_lines_the_page_shows() {
        let view = FileView::from_text("f".into(), "# c\n\na,8080,127.0.0.1,9001\n".into());
        let p = plan(
            &view.rows,
            &Change::Add(e("b", "8080", "127.0.0.1", "9001")),
        )
        .unwrap();
        let errs = p.validate("f").unwrap_err();
        assert_eq!(
            errs.to_string(),
            "f:4: dest_ip: duplicate destination 127.0.0.1:9001 for listen port 8080 (already on line 3)"
        );
        assert_eq!(p.index_of_line(4), Some(1));
    }

    #[test]
    fn written_lines_map_back_to_indexes() {
        let entries = vec![
            e("a", "8080", "127.0.0.1", "9001"),
            e("b", "8081", "127.0.0.1", "9002"),
        ];
        let text = rules::to_csv(&entries);
        let rows = read_rows(&text);
        assert_eq!(index_of_written_line(rows[1].0), Some(1));
        assert_eq!(index_of_written_line(rows[0].0), Some(0));
    }
}
