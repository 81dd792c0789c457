//! Property tests for everything the chat server reads from outside: any bytes, cut into reads
//! at any points, go through the line framing exactly as a simple model says (never a panic, a
//! line never longer than the limit, the same frames however the bytes are split); any line
//! parses as a client line or a server line without panicking; and every server line the server
//! can write parses back to itself. `PROPTEST_CASES=5000` for a longer run.

use chat_server::framing::{Frame, LineSplitter};
use chat_server::protocol::{ClientLine, ErrorCode, LeaveReason, Nickname, ServerLine};
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

/// The framing's contract, written the obvious way on the whole input at once: each
/// `\n`-terminated line (and a last unterminated one, at EOF) without its `\r`, refused as too
/// long past `max` bytes, refused when not UTF-8.
fn model(input: &[u8], max: usize) -> Vec<Frame> {
    let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    // The piece after the last newline is a line only if it is not empty (EOF).
    if parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
    }
    parts
        .into_iter()
        .map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max {
                Frame::TooLong
            } else {
                match std::str::from_utf8(line) {
                    Ok(t) => Frame::Line(t.to_string()),
                    Err(_) => Frame::BadUtf8,
                }
            }
        })
        .collect()
}

/// Feeds `input` cut at `cuts` (any positions, any order), then EOF.
fn framed(input: &[u8], cuts: &[usize], max: usize) -> Vec<Frame> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    let mut s = LineSplitter::new(max);
    let mut out = Vec::new();
    for w in at.windows(2) {
        s.push(&input[w[0]..w[1]], &mut out);
    }
    s.finish_eof(&mut out);
    out
}

/// Bytes that hit the framing's edges often: newlines, `\r`, invalid UTF-8, multi-byte UTF-8.
fn chat_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => b'a'..=b'z',
        2 => Just(b'\n'),
        1 => Just(b'\r'),
        1 => Just(b'/'),
        1 => Just(b' '),
        1 => any::<u8>(),
        1 => Just(0xc3u8),
        1 => Just(0xa9u8),
    ];
    prop::collection::vec(byte, 0..300)
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Milliseconds, as the server writes them; years 1970 to about 2096.
    (0i64..4_000_000_000_000).prop_map(|ms| Utc.timestamp_millis_opt(ms).unwrap())
}

fn nick() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,23}"
}

/// Free text as a server line carries it: anything on one line, not ending in `\r`.
fn text() -> impl Strategy<Value = String> {
    "[^\n]{0,40}".prop_filter("a trailing \\r is the line ending's", |t| {
        !t.ends_with('\r')
    })
}

fn server_line() -> impl Strategy<Value = ServerLine> {
    let code = prop_oneof![
        Just(ErrorCode::NickTaken),
        Just(ErrorCode::NickInvalid),
        Just(ErrorCode::LineTooLong),
        Just(ErrorCode::BadUtf8),
        Just(ErrorCode::ControlChars),
        Just(ErrorCode::UnknownCommand),
        Just(ErrorCode::ServerFull),
    ];
    let reason = prop_oneof![
        Just(LeaveReason::Quit),
        Just(LeaveReason::Closed),
        Just(LeaveReason::Dropped),
        Just(LeaveReason::Error),
    ];
    prop_oneof![
        text().prop_map(|text| ServerLine::Hello { text }),
        (nick(), text()).prop_map(|(nick, text)| ServerLine::Ok { nick, text }),
        (code, text()).prop_map(|(code, text)| ServerLine::Err { code, text }),
        (time(), nick(), text()).prop_map(|(at, nick, text)| ServerLine::Hist { at, nick, text }),
        (time(), nick(), text()).prop_map(|(at, nick, text)| ServerLine::Msg { at, nick, text }),
        (time(), nick()).prop_map(|(at, nick)| ServerLine::Join { at, nick }),
        (time(), nick(), reason).prop_map(|(at, nick, reason)| ServerLine::Leave {
            at,
            nick,
            reason
        }),
        (time(), nick(), nick()).prop_map(|(at, old, new)| ServerLine::Nick { at, old, new }),
        prop::collection::vec(nick(), 0..6).prop_map(|nicks| ServerLine::Users { nicks }),
        text().prop_map(|text| ServerLine::Info { text }),
        text().prop_map(|text| ServerLine::Bye { text }),
    ]
}

proptest! {
    #[test]
    fn any_bytes_any_split_frame_as_the_model_says(
        input in chat_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        max in 1usize..40,
    ) {
        let got = framed(&input, &cuts, max);
        prop_assert_eq!(&got, &model(&input, max));
        for f in &got {
            if let Frame::Line(l) = f {
                prop_assert!(l.len() <= max && !l.contains('\n'));
            }
        }
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once(input in prop::collection::vec(any::<u8>(), 0..200), max in 1usize..64) {
        let every: Vec<usize> = (0..input.len()).collect();
        prop_assert_eq!(framed(&input, &every, max), framed(&input, &[], max));
    }

    #[test]
    fn any_line_parses_as_a_client_line(line in "\\PC{0,60}|/[a-zA-Z]{0,6}( \\PC{0,20})?") {
        match ClientLine::parse(&line) {
            ClientLine::Blank => prop_assert!(line.trim().is_empty()),
            ClientLine::Message(m) => {
                // The message is the line, or the line without the `/` that escaped it.
                prop_assert!(line == m || (line.starts_with("//") && &line[1..] == m));
            }
            ClientLine::Unknown(w) => prop_assert!(line.starts_with('/') && line[1..].starts_with(w)),
            ClientLine::Nick(n) => prop_assert!(line.to_ascii_lowercase().starts_with("/nick") && line.ends_with(n.trim_end()) ),
            ClientLine::Who | ClientLine::Quit | ClientLine::Help => prop_assert!(line.starts_with('/')),
        }
    }

    #[test]
    fn a_message_starting_with_a_slash_is_sent_escaped(text in "/[^\n]{0,40}") {
        let escaped = format!("/{text}");
        prop_assert_eq!(ClientLine::parse(&escaped), ClientLine::Message(&text));
    }

    #[test]
    fn any_line_from_a_server_parses_or_is_refused_without_panic(line in "\\PC{0,80}|(MSG|HIST|JOIN|LEAVE|NICK|USERS|ERR|OK) [^\n]{0,60}") {
        if let Err(e) = ServerLine::parse(&line) {
            // The refusal names the line it refused.
            prop_assert!(e.to_string().contains("not a chat-server line"));
        }
    }

    #[test]
    fn every_server_line_parses_back_to_itself(l in server_line()) {
        let written = l.to_string();
        prop_assert!(!written.contains('\n'));
        prop_assert_eq!(ServerLine::parse(&written), Ok(l.clone()));
        // With the `\r\n` ending a telnet-style client might leave on it, too.
        prop_assert_eq!(ServerLine::parse(&format!("{written}\r")), Ok(l));
    }

    #[test]
    fn nicknames_are_accepted_exactly_by_the_rules(text in "\\PC{0,30}|[A-Za-z0-9._ -]{0,30}") {
        let ok = !text.is_empty()
            && text.chars().count() <= 24
            && text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && text.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        match Nickname::parse(&text) {
            Ok(n) => {
                prop_assert!(ok, "accepted {:?}", text);
                prop_assert_eq!(n.as_str(), text.as_str());
                prop_assert_eq!(n.key(), text.to_ascii_lowercase());
            }
            Err(e) => prop_assert!(!ok, "refused {:?}: {}", text, e),
        }
    }
}
