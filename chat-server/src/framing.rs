//! Cuts a client's byte stream into lines, with a bound on line length, so a client that never
//! sends a newline cannot make the server buffer without limit. An overlong line is reported once
//! and then skipped up to its newline; the connection carries on.

/// One result of splitting: a complete line, or why a line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its `\n` (and without a `\r` before it).
    Line(String),
    /// A line longer than the limit; its bytes were discarded.
    TooLong,
    /// A line that is not valid UTF-8; it was discarded.
    BadUtf8,
}

/// Buffers the partial last line between reads.
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max_line_bytes: usize,
    /// Inside an overlong line that was already reported: drop bytes up to the next newline.
    skipping: bool,
}

impl LineSplitter {
    pub fn new(max_line_bytes: usize) -> LineSplitter {
        LineSplitter {
            partial: Vec::new(),
            max_line_bytes,
            skipping: false,
        }
    }

    /// True while a line has begun and its newline has not come (an overlong one included).
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty() || self.skipping
    }

    /// Feeds bytes just read; complete lines and refusals are appended to `out` in order.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let (head, tail) = (&data[..nl], &data[nl + 1..]);
            data = tail;
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.partial.is_empty() {
                out.push(self.finish(head));
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(head);
                out.push(self.finish(&whole));
            }
        }
        if self.skipping || data.is_empty() {
            return;
        }
        self.partial.extend_from_slice(data);
        // One extra byte of room for the `\r` of a line that is exactly at the limit.
        if self.partial.len() > self.max_line_bytes + 1 {
            self.partial = Vec::new();
            self.skipping = true;
            out.push(Frame::TooLong);
        }
    }

    /// The connection ended: a last line without a newline still counts (`printf 'hi' | nc`).
    pub fn finish_eof(&mut self, out: &mut Vec<Frame>) {
        if !self.skipping && !self.partial.is_empty() {
            let whole = std::mem::take(&mut self.partial);
            out.push(self.finish(&whole));
        }
    }

    fn finish(&self, line: &[u8]) -> Frame {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max_line_bytes {
            return Frame::TooLong;
        }
        match std::str::from_utf8(line) {
            Ok(text) => Frame::Line(text.to_string()),
            Err(_) => Frame::BadUtf8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(s.to_string())
    }

    #[test]
    fn lines_across_reads() {
        assert_eq!(
            split(10, &[b"al", b"ice\nhel", b"lo\r\n\n"]),
            vec![line("alice"), line("hello"), line("")]
        );
    }

    #[test]
    fn limit_is_exact() {
        assert_eq!(split(5, &[b"12345\n"]), vec![line("12345")]);
        assert_eq!(split(5, &[b"12345\r\n"]), vec![line("12345")]);
        assert_eq!(split(5, &[b"123", b"45\r", b"\n"]), vec![line("12345")]);
        assert_eq!(
            split(5, &[b"123456\nok\n"]),
            vec![Frame::TooLong, line("ok")]
        );
    }

    #[test]
    fn overlong_line_reported_once_then_skipped() {
        // Reported as soon as the buffer passes the limit, not at the (maybe never) newline.
        let out = split(4, &[b"abcdefg", b"hijk", b"lmn\nnext\n"]);
        assert_eq!(out, vec![Frame::TooLong, line("next")]);
    }

    #[test]
    fn invalid_utf8_refused_and_stream_continues() {
        assert_eq!(
            split(100, &[b"caf\xc3\xa9\n\xff\xfe oops\nok\n"]),
            vec![line("café"), Frame::BadUtf8, line("ok")]
        );
        // A multi-byte character split across two reads is still one valid character.
        assert_eq!(split(100, &[b"caf\xc3", b"\xa9\n"]), vec![line("café")]);
    }

    #[test]
    fn last_line_without_newline_counts_at_eof() {
        let mut s = LineSplitter::new(10);
        let mut out = Vec::new();
        s.push(b"bob\nbye", &mut out);
        s.finish_eof(&mut out);
        assert_eq!(out, vec![line("bob"), line("bye")]);
    }
}
