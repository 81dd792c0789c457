//! Garbage and round trips through the rules file's one reader and writer: no input makes the
//! parser panic, every rejection names a line and a field, and entries written by the forwarder
//! read back as the same entries. `PROPTEST_CASES` raises the case count for a long run.

use forwarder::rules::{parse, read_rows, to_csv, Entry};
use proptest::prelude::*;

const FIELDS: [&str; 7] = [
    "file",
    "row",
    "name",
    "listen_port",
    "dest_ip",
    "dest_port",
    "options",
];

/// Text that looks a little like a rules file: CSV punctuation, quotes, comments, options,
/// digits, addresses, and arbitrary characters.
fn rules_like_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just(",".to_string()),
        Just("\"".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("#".to_string()),
        Just(";".to_string()),
        Just("/udp".to_string()),
        Just("weight=".to_string()),
        Just("allow=10.0.0.0/8".to_string()),
        Just("127.0.0.1".to_string()),
        Just("[::1]:".to_string()),
        "[0-9]{1,6}",
        "[a-z=/ .:-]{0,8}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

/// An entry the forwarder accepts (IP literals only: no name lookups in a property test).
fn valid_entry() -> impl Strategy<Value = Entry> {
    let name = "[#a-zA-Z0-9_][a-zA-Z0-9 _.,\"#-]{0,15}[a-zA-Z0-9_]?";
    let listen = prop_oneof![
        (1u16..=65535).prop_map(|p| p.to_string()),
        (1u16..=65535).prop_map(|p| format!("127.0.0.1:{p}")),
        (1u16..=65535).prop_map(|p| format!("{p}/udp")),
        (1u16..=65535).prop_map(|p| format!("[::1]:{p}/tcp")),
    ];
    let dest_ip = prop_oneof![
        Just("127.0.0.1".to_string()),
        Just("10.1.2.3".to_string()),
        Just("::1".to_string())
    ];
    let options = prop_oneof![
        Just(String::new()),
        (1u32..=256).prop_map(|w| format!("weight={w}")),
        Just("allow=10.0.0.0/24,2001:db8::/32 deny=10.0.0.66".to_string()),
        (1u64..1000).prop_map(|n| format!("weight=2 max_conns={n}")),
    ];
    (name, listen, dest_ip, 1u16..=65535, options).prop_map(|(name, listen, ip, port, options)| {
        Entry {
            name: name.trim().to_string(),
            listen_port: listen,
            dest_ip: ip,
            dest_port: port.to_string(),
            options,
        }
    })
}

proptest! {
    #[test]
    fn no_text_panics_and_every_error_names_a_line_and_a_field(text in rules_like_text()) {
        let rows = read_rows(&text, "f.csv");
        if let Err(errors) = parse(&text, "f.csv") {
            prop_assert!(!errors.0.is_empty());
            for e in &errors.0 {
                prop_assert!(FIELDS.contains(&e.field.as_str()), "field {:?}", e.field);
                prop_assert!(e.line >= 1, "no line: {e}");
                let prefix = format!("f.csv:{}: {}: ", e.line, e.field);
                prop_assert!(e.to_string().starts_with(&prefix));
            }
        }
        for r in rows {
            prop_assert!(r.line >= 1);
        }
    }

    #[test]
    fn written_entries_read_back_the_same(entries in proptest::collection::vec(valid_entry(), 0..8)) {
        let text = to_csv(&entries);
        let rows = read_rows(&text, "f.csv");
        let back: Vec<Entry> = rows.iter().map(|r| r.entry.clone()).collect();
        prop_assert_eq!(&back, &entries, "written:\n{}", text);
        prop_assert!(rows.iter().all(|r| r.malformed.is_none()));
        // And once more through the writer: a fixed point.
        prop_assert_eq!(to_csv(&back), text);
    }
}
