//! The rules file as the page shows and edits it: every row with an id derived from its content
//! (so an id keeps naming the same rule while other rows come and go), and what an add, edit or
//! delete makes of the rows. Reading, validating and writing the file is `rules::file`'s job.

use std::collections::HashMap;

use serde::Serialize;

use crate::rules::file::version;
use crate::rules::options::{with_admin, Admin};
use crate::rules::{Entry, Row};

/// What a request asks to change.
#[derive(Debug, Clone)]
pub enum Change {
    Add(Entry),
    Edit(String, Entry),
    Delete(Vec<String>),
    /// Put one backend in or out of service (`drain`, `disabled`, `active`): only its
    /// `drain`/`disabled` option changes.
    Admin(String, Admin),
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

/// The entries after `change`; `ids` are the rows' ids ([`assign_ids`]).
pub fn plan(rows: &[Row], ids: &[String], change: &Change) -> Result<Plan, String> {
    let mut entries: Vec<Entry> = rows.iter().map(|r| r.entry.clone()).collect();
    let mut lines: Vec<usize> = rows.iter().map(|r| r.line).collect();
    let index_of = |id: &str| {
        ids.iter()
            .position(|i| i == id)
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
        Change::Admin(id, admin) => {
            let i = index_of(id)?;
            entries[i].options = with_admin(&entries[i].options, *admin);
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
    /// The entries with the lines their errors should cite.
    pub fn numbered(&self) -> Vec<(usize, Entry)> {
        self.lines
            .iter()
            .copied()
            .zip(self.entries.iter().cloned())
            .collect()
    }

    /// The entry an error citing `line` is about.
    pub fn index_of_line(&self, line: usize) -> Option<usize> {
        self.lines.iter().position(|&l| l == line)
    }
}

/// The id of an entry: a hash of its fields, so it does not depend on the row's position.
pub fn entry_id(entry: &Entry) -> String {
    let mut key = format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        entry.name, entry.listen_port, entry.dest_ip, entry.dest_port
    );
    // Rows without options keep the ids they had before the fifth column existed.
    if !entry.options.is_empty() {
        key.push('\u{0}');
        key.push_str(&entry.options);
    }
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
    use crate::rules;

    fn e(name: &str, listen: &str, ip: &str, port: &str) -> Entry {
        Entry {
            name: name.into(),
            listen_port: listen.into(),
            dest_ip: ip.into(),
            dest_port: port.into(),
            options: String::new(),
        }
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

    fn rows_of(text: &str) -> (Vec<Row>, Vec<String>) {
        let rows = rules::read_rows(text, "f");
        let ids = assign_ids(rows.iter().map(|r| &r.entry));
        (rows, ids)
    }

    #[test]
    fn plan_adds_edits_and_deletes_by_id_keeping_file_lines() {
        let (rows, ids) =
            rows_of("# c\na,8080,127.0.0.1,9001\nb,8081,127.0.0.1,9002\n\nc,8082,127.0.0.1,9003\n");
        let added = plan(&rows, &ids, &Change::Add(e("d", "1", "h", "2"))).unwrap();
        assert_eq!((added.entries.len(), added.target), (4, Some(3)));
        assert_eq!(added.lines, vec![2, 3, 5, 6]);
        let edited = plan(
            &rows,
            &ids,
            &Change::Edit(ids[1].clone(), e("B", "1", "h", "2")),
        )
        .unwrap();
        assert_eq!(
            (edited.entries[1].name.as_str(), edited.target),
            ("B", Some(1))
        );
        let left = plan(
            &rows,
            &ids,
            &Change::Delete(vec![ids[0].clone(), ids[2].clone()]),
        )
        .unwrap();
        assert_eq!(left.entries, vec![e("b", "8081", "127.0.0.1", "9002")]);
        assert_eq!(left.lines, vec![3]);
        let missing = plan(&rows, &ids, &Change::Delete(vec!["nope".into()])).unwrap_err();
        assert_eq!(
            missing,
            "no rule with id \"nope\" (the rules changed? reload them)"
        );
    }

    #[test]
    fn messages_cite_the_lines_the_page_shows() {
        let (rows, ids) = rows_of("# c\n\na,8080,127.0.0.1,9001\n");
        let p = plan(
            &rows,
            &ids,
            &Change::Add(e("b", "8080", "127.0.0.1", "9001")),
        )
        .unwrap();
        let errs = rules::validate(&p.numbered(), "f").unwrap_err();
        assert_eq!(
            errs.to_string(),
            "f:4: dest_ip: duplicate destination 127.0.0.1:9001 for listen port 8080 (already on line 3)"
        );
        assert_eq!(p.index_of_line(4), Some(1));
    }
}
