//! The rules file reader and the options column: `read_rows` on any text, then each row's listen
//! field, port and options as validation reads them (not `parse` itself: it resolves host names,
//! which a fuzzer must not do thousands of times a second). Besides not panicking: rows are
//! numbered in order, and the well-formed ones written back by `to_csv` read back the same.
#![no_main]

use forwarder::rules::{
    options::parse_options, parse_listen, parse_port, read_rows, to_csv, Proto,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rows = read_rows(text, "fuzz.csv");
    let mut last = 0;
    for row in &rows {
        assert!(row.line > last, "rows out of order");
        last = row.line;
        let proto = parse_listen(&row.entry.listen_port).map_or(Proto::Tcp, |l| l.proto);
        let _ = parse_port(&row.entry.dest_port);
        let _ = parse_options(&row.entry.options, proto);
    }
    let good: Vec<_> = rows
        .iter()
        .filter(|r| r.malformed.is_none())
        .map(|r| r.entry.clone())
        .collect();
    let again: Vec<_> = read_rows(&to_csv(&good), "fuzz.csv")
        .into_iter()
        .map(|r| {
            assert!(
                r.malformed.is_none(),
                "our own row is malformed: {:?}",
                r.malformed
            );
            r.entry
        })
        .collect();
    assert_eq!(good, again, "to_csv then read_rows changed the rows");
});
