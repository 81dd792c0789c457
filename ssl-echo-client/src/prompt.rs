//! The three questions the original client asked on a terminal (message, times per connection,
//! number of connections). Asked only when stdin is a terminal and none of them was given as a
//! flag; an empty answer takes the default, a bad one is asked again with the reason.

use std::io::{self, BufRead, Write};

/// Defaults shared by the prompts and the flags.
pub const DEFAULT_MESSAGE: &str = "Hello, echo server!";
pub const DEFAULT_COUNT: u64 = 10;
pub const DEFAULT_CONNECTIONS: u64 = 1000;

/// What the user answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    pub message: String,
    pub count: u64,
    pub connections: u64,
}

/// The message: the line as typed (without its line end); empty means the default.
pub fn parse_message(input: &str) -> String {
    let line = input.trim_end_matches(['\n', '\r']);
    if line.is_empty() {
        DEFAULT_MESSAGE.to_string()
    } else {
        line.to_string()
    }
}

/// A whole number of at least 1; empty means `default`. Accepts `1,000` and `1_000`.
pub fn parse_positive(input: &str, default: u64) -> Result<u64, String> {
    let t = input.trim();
    if t.is_empty() {
        return Ok(default);
    }
    let digits: String = t.chars().filter(|c| *c != ',' && *c != '_').collect();
    match digits.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{t:?} is not a whole number")),
    }
}

/// Asks the three questions on `out`, reading answers from `input`. End of input takes the
/// defaults for what is left.
pub fn ask(input: &mut impl BufRead, out: &mut impl Write) -> io::Result<Answers> {
    write!(out, "Message to send [{DEFAULT_MESSAGE}]: ")?;
    out.flush()?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    let message = parse_message(&line);
    let count = ask_number(input, out, "Times to send it per connection", DEFAULT_COUNT)?;
    let connections = ask_number(input, out, "Number of connections", DEFAULT_CONNECTIONS)?;
    Ok(Answers {
        message,
        count,
        connections,
    })
}

fn ask_number(
    input: &mut impl BufRead,
    out: &mut impl Write,
    question: &str,
    default: u64,
) -> io::Result<u64> {
    loop {
        write!(out, "{question} [{default}]: ")?;
        out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            return Ok(default);
        }
        match parse_positive(&line, default) {
            Ok(n) => return Ok(n),
            Err(why) => writeln!(out, "  {why}; try again")?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_accept_separators_and_refuse_zero_and_words() {
        assert_eq!(parse_positive("20,000\n", 1), Ok(20_000));
        assert_eq!(parse_positive(" 1_000 ", 1), Ok(1_000));
        assert_eq!(parse_positive("\n", 7), Ok(7));
        assert_eq!(
            parse_positive("0", 7),
            Err("must be at least 1".to_string())
        );
        assert_eq!(
            parse_positive("ten", 7),
            Err("\"ten\" is not a whole number".to_string())
        );
        assert_eq!(
            parse_positive("-3", 7),
            Err("\"-3\" is not a whole number".to_string())
        );
    }

    #[test]
    fn message_keeps_spaces_but_not_the_line_end() {
        assert_eq!(parse_message("  hi there \r\n"), "  hi there ");
        assert_eq!(parse_message("\n"), DEFAULT_MESSAGE);
    }

    #[test]
    fn bad_answers_are_asked_again() {
        let mut input = io::Cursor::new("ping\nlots\n0\n25\n\n");
        let mut out = Vec::new();
        let a = ask(&mut input, &mut out).unwrap();
        assert_eq!(
            a,
            Answers {
                message: "ping".into(),
                count: 25,
                connections: DEFAULT_CONNECTIONS
            }
        );
        let shown = String::from_utf8(out).unwrap();
        assert_eq!(
            shown,
            "Message to send [Hello, echo server!]: \
             Times to send it per connection [10]:   \"lots\" is not a whole number; try again\n\
             Times to send it per connection [10]:   must be at least 1; try again\n\
             Times to send it per connection [10]: \
             Number of connections [1000]: "
        );
    }

    #[test]
    fn end_of_input_takes_the_defaults() {
        let a = ask(&mut io::Cursor::new(""), &mut Vec::new()).unwrap();
        assert_eq!(a.message, DEFAULT_MESSAGE);
        assert_eq!(a.count, DEFAULT_COUNT);
        assert_eq!(a.connections, DEFAULT_CONNECTIONS);
    }
}
