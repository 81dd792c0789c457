//! The chat wire format, shared by the server (which writes it) and the desktop client (which
//! parses it). Every line is UTF-8 and ends with `\n`; a server line starts with a fixed upper-case
//! word naming its kind, then space-separated fields, with any free text last. docs/chat-protocol.md
//! is the user-facing description of exactly this module.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};

/// Longest nickname, in characters (all nickname characters are ASCII, so also bytes).
pub const NICK_MAX_CHARS: usize = 24;

/// The nickname rules in one sentence, quoted in refusals and in the greeting.
pub const NICK_RULES: &str =
    "1-24 characters: letters a-z A-Z, digits, '-', '_' or '.', starting with a letter or digit";

/// A validated nickname. Nicknames are compared without regard to case (`Alice` and `alice` are
/// the same person), but shown as the user typed them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nickname(String);

/// Why a nickname was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NickError {
    #[error("nickname is empty; {NICK_RULES}")]
    Empty,
    #[error("nickname is {chars} characters long, the most is {NICK_MAX_CHARS}")]
    TooLong { chars: usize },
    #[error("nickname may not contain {ch:?}; {NICK_RULES}")]
    BadChar { ch: char },
    #[error("nickname must start with a letter or digit, not {ch:?}")]
    BadStart { ch: char },
}

impl Nickname {
    /// Checks `text` against the nickname rules. Spaces would make server lines ambiguous (the
    /// nickname is a space-separated field), hence the small character set.
    pub fn parse(text: &str) -> Result<Nickname, NickError> {
        let mut chars = text.chars();
        let first = chars.next().ok_or(NickError::Empty)?;
        if let Some(ch) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(NickError::BadChar { ch });
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NickError::BadStart { ch: first });
        }
        let count = text.chars().count();
        if count > NICK_MAX_CHARS {
            return Err(NickError::TooLong { chars: count });
        }
        Ok(Nickname(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key under which nicknames are unique (ASCII lower case).
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

impl fmt::Display for Nickname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a named client's line asks for. A line starting with `/` is a command; `//` escapes a
/// message that itself starts with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientLine<'a> {
    /// An empty (or all-blank) line: ignored, so a stray Enter in nc does not broadcast nothing.
    Blank,
    Message(&'a str),
    Who,
    Nick(&'a str),
    Quit,
    Help,
    /// `/something` we do not know; carries the command word.
    Unknown(&'a str),
}

impl<'a> ClientLine<'a> {
    pub fn parse(line: &'a str) -> ClientLine<'a> {
        if line.trim().is_empty() {
            return ClientLine::Blank;
        }
        let Some(command) = line.strip_prefix('/') else {
            return ClientLine::Message(line);
        };
        if command.starts_with('/') {
            return ClientLine::Message(command);
        }
        let (word, rest) = command.split_once(' ').unwrap_or((command, ""));
        match word.to_ascii_lowercase().as_str() {
            "who" | "users" => ClientLine::Who,
            "nick" => ClientLine::Nick(rest.trim()),
            "quit" | "exit" => ClientLine::Quit,
            "help" => ClientLine::Help,
            _ => ClientLine::Unknown(word),
        }
    }
}

/// Machine-readable reason in an `ERR` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NickTaken,
    NickInvalid,
    LineTooLong,
    BadUtf8,
    ControlChars,
    UnknownCommand,
    ServerFull,
    /// Refused: the client's address already holds `--max-per-address` connections.
    TooManyConnections,
    /// Closed: a line was begun and not finished within `--line-timeout-ms`.
    LineTimeout,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NickTaken => "nick-taken",
            ErrorCode::NickInvalid => "nick-invalid",
            ErrorCode::LineTooLong => "line-too-long",
            ErrorCode::BadUtf8 => "bad-utf8",
            ErrorCode::ControlChars => "control-chars",
            ErrorCode::UnknownCommand => "unknown-command",
            ErrorCode::ServerFull => "server-full",
            ErrorCode::TooManyConnections => "too-many-connections",
            ErrorCode::LineTimeout => "line-timeout",
        }
    }

    fn parse(text: &str) -> Option<ErrorCode> {
        [
            ErrorCode::NickTaken,
            ErrorCode::NickInvalid,
            ErrorCode::LineTooLong,
            ErrorCode::BadUtf8,
            ErrorCode::ControlChars,
            ErrorCode::UnknownCommand,
            ErrorCode::ServerFull,
            ErrorCode::TooManyConnections,
            ErrorCode::LineTimeout,
        ]
        .into_iter()
        .find(|c| c.as_str() == text)
    }
}

/// Why someone left, as shown in a `LEAVE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    /// Sent `/quit`.
    Quit,
    /// Closed the connection.
    Closed,
    /// Stopped reading: the outgoing queue overflowed and the server dropped it.
    Dropped,
    /// The connection failed (reset, ...).
    Error,
    /// Began a line and did not finish it within `--line-timeout-ms`.
    TimedOut,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Quit => "quit",
            LeaveReason::Closed => "closed",
            LeaveReason::Dropped => "dropped",
            LeaveReason::Error => "error",
            LeaveReason::TimedOut => "timeout",
        }
    }

    fn parse(text: &str) -> Option<LeaveReason> {
        [
            LeaveReason::Quit,
            LeaveReason::Closed,
            LeaveReason::Dropped,
            LeaveReason::Error,
            LeaveReason::TimedOut,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

/// One line from the server. `Display` writes it without the trailing newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    /// `HELLO <text>`: the greeting; the server waits for a nickname.
    Hello { text: String },
    /// `OK <nick> <text>`: the nickname was accepted; chatting starts.
    Ok { nick: String, text: String },
    /// `ERR <code> <text>`: a refusal; the connection stays open.
    Err { code: ErrorCode, text: String },
    /// `HIST <time> <nick> <text>`: a message from before you joined (replayed on joining).
    Hist {
        at: DateTime<Utc>,
        nick: String,
        text: String,
    },
    /// `MSG <time> <nick> <text>`: a message, to everyone including its sender.
    Msg {
        at: DateTime<Utc>,
        nick: String,
        text: String,
    },
    /// `JOIN <time> <nick>`.
    Join { at: DateTime<Utc>, nick: String },
    /// `LEAVE <time> <nick> <reason>`.
    Leave {
        at: DateTime<Utc>,
        nick: String,
        reason: LeaveReason,
    },
    /// `NICK <time> <old> <new>`.
    Nick {
        at: DateTime<Utc>,
        old: String,
        new: String,
    },
    /// `USERS <count> <nick>...`: who is online (after joining and on `/who`).
    Users { nicks: Vec<String> },
    /// `INFO <text>`: help and other human-only text.
    Info { text: String },
    /// `BYE <text>`: the server is about to close this connection.
    Bye { text: String },
}

/// A server line that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a chat-server line ({why}): {line:?}")]
pub struct ParseError {
    pub why: &'static str,
    pub line: String,
}

/// Formats a timestamp the way every server line carries it: RFC 3339, UTC, milliseconds.
pub fn format_time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl fmt::Display for ServerLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerLine::Hello { text } => write!(f, "HELLO {text}"),
            ServerLine::Ok { nick, text } => write!(f, "OK {nick} {text}"),
            ServerLine::Err { code, text } => write!(f, "ERR {} {text}", code.as_str()),
            ServerLine::Hist { at, nick, text } => {
                write!(f, "HIST {} {nick} {text}", format_time(at))
            }
            ServerLine::Msg { at, nick, text } => {
                write!(f, "MSG {} {nick} {text}", format_time(at))
            }
            ServerLine::Join { at, nick } => write!(f, "JOIN {} {nick}", format_time(at)),
            ServerLine::Leave { at, nick, reason } => {
                write!(f, "LEAVE {} {nick} {}", format_time(at), reason.as_str())
            }
            ServerLine::Nick { at, old, new } => write!(f, "NICK {} {old} {new}", format_time(at)),
            ServerLine::Users { nicks } => {
                write!(f, "USERS {}", nicks.len())?;
                for nick in nicks {
                    write!(f, " {nick}")?;
                }
                Ok(())
            }
            ServerLine::Info { text } => write!(f, "INFO {text}"),
            ServerLine::Bye { text } => write!(f, "BYE {text}"),
        }
    }
}

impl ServerLine {
    /// Parses one line (without its `\n`; a trailing `\r` is ignored).
    pub fn parse(line: &str) -> Result<ServerLine, ParseError> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let bad = |why| ParseError {
            why,
            line: line.to_string(),
        };
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        // Splits off `n` space-separated fields; the remainder (possibly empty) is the free text.
        let fields = |n: usize| -> Result<(Vec<&str>, &str), ParseError> {
            let mut parts = rest.splitn(n + 1, ' ');
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                match parts.next() {
                    Some(p) if !p.is_empty() => out.push(p),
                    _ => return Err(bad("missing field")),
                }
            }
            Ok((out, parts.next().unwrap_or("")))
        };
        let time = |text: &str| -> Result<DateTime<Utc>, ParseError> {
            let at = DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| bad("bad timestamp"))?;
            // Only the one fixed shape (what `format_time` writes): RFC 3339 also allows other
            // precisions and offsets, which would not be written back the same.
            if format_time(&at) != text {
                return Err(bad("timestamp not in the form 2026-11-25T06:40:01.123Z"));
            }
            Ok(at)
        };
        Ok(match kind {
            "HELLO" => ServerLine::Hello {
                text: rest.to_string(),
            },
            "OK" => {
                let (f, text) = fields(1)?;
                ServerLine::Ok {
                    nick: f[0].to_string(),
                    text: text.to_string(),
                }
            }
            "ERR" => {
                let (f, text) = fields(1)?;
                ServerLine::Err {
                    code: ErrorCode::parse(f[0]).ok_or_else(|| bad("unknown error code"))?,
                    text: text.to_string(),
                }
            }
            "HIST" | "MSG" => {
                let (f, text) = fields(2)?;
                let (at, nick, text) = (time(f[0])?, f[1].to_string(), text.to_string());
                if kind == "MSG" {
                    ServerLine::Msg { at, nick, text }
                } else {
                    ServerLine::Hist { at, nick, text }
                }
            }
            "JOIN" => {
                let (f, _) = fields(2)?;
                ServerLine::Join {
                    at: time(f[0])?,
                    nick: f[1].to_string(),
                }
            }
            "LEAVE" => {
                let (f, _) = fields(3)?;
                ServerLine::Leave {
                    at: time(f[0])?,
                    nick: f[1].to_string(),
                    reason: LeaveReason::parse(f[2]).ok_or_else(|| bad("unknown leave reason"))?,
                }
            }
            "NICK" => {
                let (f, _) = fields(3)?;
                ServerLine::Nick {
                    at: time(f[0])?,
                    old: f[1].to_string(),
                    new: f[2].to_string(),
                }
            }
            "USERS" => {
                let mut parts = rest.split(' ').filter(|p| !p.is_empty());
                let count: usize = parts
                    .next()
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| bad("missing user count"))?;
                let nicks: Vec<String> = parts.map(str::to_string).collect();
                if nicks.len() != count {
                    return Err(bad("user count does not match the names"));
                }
                ServerLine::Users { nicks }
            }
            "INFO" => ServerLine::Info {
                text: rest.to_string(),
            },
            "BYE" => ServerLine::Bye {
                text: rest.to_string(),
            },
            _ => return Err(bad("unknown line kind")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T06:40:01.123Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    /// Found by the `chat_protocol` fuzz target (docs/fuzzing.md): a time with four fractional
    /// digits parsed, and was written back with three, so the line did not survive a round trip.
    #[test]
    fn only_the_one_timestamp_shape_parses() {
        for line in [
            "MSG 2026-11-25T06:40:01.1239Z bob hi",
            "MSG 2026-11-25T06:40:01Z bob hi",
            "MSG 2026-11-25T07:40:01.123+01:00 bob hi",
            "JOIN 2026-11-25t06:40:01.123z alice",
        ] {
            assert!(ServerLine::parse(line).is_err(), "{line}");
        }
        let line = "MSG 2026-11-25T06:40:01.123Z bob hi";
        assert_eq!(ServerLine::parse(line).unwrap().to_string(), line);
    }

    #[test]
    fn nicknames_follow_the_rules() {
        assert_eq!(Nickname::parse("alice").unwrap().as_str(), "alice");
        assert_eq!(Nickname::parse("Bob_2.x-y").unwrap().key(), "bob_2.x-y");
        assert_eq!(Nickname::parse(""), Err(NickError::Empty));
        assert_eq!(Nickname::parse("a b"), Err(NickError::BadChar { ch: ' ' }));
        assert_eq!(Nickname::parse("zoë"), Err(NickError::BadChar { ch: 'ë' }));
        assert_eq!(Nickname::parse("_x"), Err(NickError::BadStart { ch: '_' }));
        assert_eq!(
            Nickname::parse(&"a".repeat(25)),
            Err(NickError::TooLong { chars: 25 })
        );
        assert!(Nickname::parse(&"a".repeat(24)).is_ok());
        assert_eq!(
            NickError::BadChar { ch: ' ' }.to_string(),
            "nickname may not contain ' '; 1-24 characters: letters a-z A-Z, digits, '-', '_' or '.', starting with a letter or digit"
        );
    }

    #[test]
    fn client_lines() {
        assert_eq!(
            ClientLine::parse("hi there"),
            ClientLine::Message("hi there")
        );
        assert_eq!(ClientLine::parse("   "), ClientLine::Blank);
        assert_eq!(ClientLine::parse("/who"), ClientLine::Who);
        assert_eq!(ClientLine::parse("/WHO"), ClientLine::Who);
        assert_eq!(ClientLine::parse("/nick  bob "), ClientLine::Nick("bob"));
        assert_eq!(ClientLine::parse("/nick"), ClientLine::Nick(""));
        assert_eq!(ClientLine::parse("/quit bye all"), ClientLine::Quit);
        assert_eq!(ClientLine::parse("/help"), ClientLine::Help);
        assert_eq!(
            ClientLine::parse("/dance now"),
            ClientLine::Unknown("dance")
        );
        assert_eq!(
            ClientLine::parse("//etc/passwd"),
            ClientLine::Message("/etc/passwd")
        );
    }

    #[test]
    fn lines_are_written_exactly() {
        let msg = ServerLine::Msg {
            at: at(),
            nick: "alice".into(),
            text: "hello  world ".into(),
        };
        assert_eq!(
            msg.to_string(),
            "MSG 2026-11-25T06:40:01.123Z alice hello  world "
        );
        let users = ServerLine::Users {
            nicks: vec!["alice".into(), "bob".into()],
        };
        assert_eq!(users.to_string(), "USERS 2 alice bob");
        let leave = ServerLine::Leave {
            at: at(),
            nick: "bob".into(),
            reason: LeaveReason::Dropped,
        };
        assert_eq!(
            leave.to_string(),
            "LEAVE 2026-11-25T06:40:01.123Z bob dropped"
        );
        let err = ServerLine::Err {
            code: ErrorCode::NickTaken,
            text: "nickname \"bob\" is taken; send another one".into(),
        };
        assert_eq!(
            err.to_string(),
            "ERR nick-taken nickname \"bob\" is taken; send another one"
        );
    }

    #[test]
    fn every_line_kind_round_trips() {
        let lines = [
            ServerLine::Hello {
                text: "send your nickname".into(),
            },
            ServerLine::Ok {
                nick: "alice".into(),
                text: "welcome".into(),
            },
            ServerLine::Err {
                code: ErrorCode::BadUtf8,
                text: "line is not UTF-8".into(),
            },
            ServerLine::Hist {
                at: at(),
                nick: "bob".into(),
                text: "earlier".into(),
            },
            ServerLine::Msg {
                at: at(),
                nick: "bob".into(),
                text: "".into(),
            },
            ServerLine::Msg {
                at: at(),
                nick: "bob".into(),
                text: "a b  c".into(),
            },
            ServerLine::Join {
                at: at(),
                nick: "carol".into(),
            },
            ServerLine::Leave {
                at: at(),
                nick: "carol".into(),
                reason: LeaveReason::Quit,
            },
            ServerLine::Nick {
                at: at(),
                old: "carol".into(),
                new: "caz".into(),
            },
            ServerLine::Users { nicks: vec![] },
            ServerLine::Users {
                nicks: vec!["a".into(), "b".into(), "c".into()],
            },
            ServerLine::Info {
                text: "/who lists users".into(),
            },
            ServerLine::Bye {
                text: "server shutting down".into(),
            },
        ];
        for line in lines {
            assert_eq!(
                ServerLine::parse(&line.to_string()),
                Ok(line.clone()),
                "{line}"
            );
        }
    }

    #[test]
    fn malformed_lines_are_named() {
        let err = ServerLine::parse("MSG yesterday bob hi").unwrap_err();
        assert_eq!(err.why, "bad timestamp");
        assert_eq!(
            ServerLine::parse("USERS 3 a b").unwrap_err().why,
            "user count does not match the names"
        );
        assert_eq!(
            ServerLine::parse("HELO x").unwrap_err().why,
            "unknown line kind"
        );
        assert_eq!(
            ServerLine::parse("JOIN 2026-11-25T06:40:01.123Z")
                .unwrap_err()
                .why,
            "missing field"
        );
        assert_eq!(
            ServerLine::parse("ERR nope text").unwrap_err().why,
            "unknown error code"
        );
        assert_eq!(
            ServerLine::parse("JOIN 2026-11-25T06:40:01.123Z bob\r").unwrap(),
            ServerLine::Join {
                at: at(),
                nick: "bob".into()
            }
        );
    }
}
