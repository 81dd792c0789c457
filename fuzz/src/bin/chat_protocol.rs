//! The chat protocol (`chat_server::framing`, `chat_server::protocol`): any bytes cut into lines
//! at any split, each line read as a client command, a nickname and a server line. Besides not
//! panicking: the split changes nothing, no line exceeds the limit, and a server line that
//! parses is written back as the same text.
#![no_main]

use chat_server::framing::{Frame, LineSplitter};
use chat_server::protocol::{ClientLine, Nickname, ServerLine};
use libfuzzer_sys::fuzz_target;

/// A small limit, so the fuzzer reaches it.
const MAX_LINE: usize = 64;

fn split(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut s = LineSplitter::new(MAX_LINE);
    let mut out = Vec::new();
    for c in chunks {
        s.push(c, &mut out);
    }
    s.finish_eof(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let at = (cut as usize).min(data.len());
    let whole = split(&[data]);
    assert_eq!(
        whole,
        split(&[&data[..at], &data[at..]]),
        "the split changed the lines"
    );
    for frame in &whole {
        let Frame::Line(line) = frame else { continue };
        assert!(line.len() <= MAX_LINE, "line over the limit");
        let _ = ClientLine::parse(line);
        let _ = Nickname::parse(line);
        if let Ok(parsed) = ServerLine::parse(line) {
            let text = parsed.to_string();
            assert_eq!(ServerLine::parse(&text).as_ref(), Ok(&parsed), "{text:?}");
        }
    }
});
