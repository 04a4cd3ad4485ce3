//! Server-sent events, split as they arrive: bytes in, whole events out (each with the
//! blank line that ends it), so the relay can look at an event, pass it on unchanged or
//! drop it, without waiting for the rest of the stream.

/// Longest event kept while waiting for its end; a longer one is passed on in pieces
/// (nothing is held without bound, and nothing is lost).
const MAX_EVENT: usize = 4 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
}

/// One piece of the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A whole event, terminator included.
    Event(Vec<u8>),
    /// Bytes of an event too long to hold; passed on as they are.
    Raw(Vec<u8>),
}

/// Where the first event in `buf` ends (after its blank line), if it has.
fn event_end(buf: &[u8]) -> Option<usize> {
    // An event ends at an empty line: "\n\n", "\r\n\r\n" or "\r\r" (and mixtures).
    let mut i = 0;
    while i < buf.len() {
        let nl = match buf[i] {
            b'\n' => 1,
            b'\r' if buf.get(i + 1) == Some(&b'\n') => 2,
            b'\r' => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        let j = i + nl;
        match buf.get(j) {
            Some(b'\n') => return Some(j + 1),
            Some(b'\r') if buf.get(j + 1) == Some(&b'\n') => return Some(j + 2),
            Some(b'\r') if j + 1 < buf.len() => return Some(j + 1),
            // A lone "\r" at the very end may be the start of "\r\n": wait.
            Some(b'\r') => return None,
            _ => i = j,
        }
    }
    None
}

impl Splitter {
    /// Feeds bytes; returns the pieces now complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let rest = self.buf.split_off(end);
            out.push(Piece::Event(std::mem::replace(&mut self.buf, rest)));
        }
        if self.buf.len() > MAX_EVENT {
            out.push(Piece::Raw(std::mem::take(&mut self.buf)));
        }
        out
    }

    /// What is left when the stream ends (an unterminated last event).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf))
    }
}

/// The `event:` name and the joined `data:` lines of one event.
pub fn fields(event: &[u8]) -> (Option<String>, String) {
    let text = String::from_utf8_lossy(event);
    let mut name = None;
    let mut data = String::new();
    let mut first = true;
    for line in text.split(['\n', '\r']) {
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim_start().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            if !first {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
            first = false;
        }
    }
    (name, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events(pieces: Vec<Piece>) -> Vec<Vec<u8>> {
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::Event(e) | Piece::Raw(e) => e,
            })
            .collect()
    }

    #[test]
    fn splits_on_blank_lines_of_every_kind() {
        let mut s = Splitter::default();
        let got = events(s.push(b"data: a\n\ndata: b\r\n\r\nevent: x\ndata: c\n"));
        assert_eq!(
            got,
            vec![b"data: a\n\n".to_vec(), b"data: b\r\n\r\n".to_vec()]
        );
        let got = events(s.push(b"\n"));
        assert_eq!(got, vec![b"event: x\ndata: c\n\n".to_vec()]);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn fields_joins_data_lines() {
        let (name, data) = fields(b"event: message_delta\ndata: {\"a\":\ndata: 1}\n\n");
        assert_eq!(name.as_deref(), Some("message_delta"));
        assert_eq!(data, "{\"a\":\n1}");
        assert_eq!(fields(b"data:[DONE]\n\n").1, "[DONE]");
    }

    proptest! {
        /// However the stream is cut into chunks, the same bytes come out, in order,
        /// and in the same events.
        #[test]
        fn chunking_never_changes_the_output(cuts in proptest::collection::vec(0usize..200, 0..20)) {
            let stream: &[u8] = b"event: a\ndata: {\"x\":1}\n\ndata: two\r\n\r\ndata: 3\n\n: comment\n\ndata: tail";
            let mut whole = Splitter::default();
            let expected = events(whole.push(stream));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = Splitter::default();
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([stream.len()]) {
                got.extend(events(s.push(&stream[at..c])));
                at = c;
            }
            prop_assert_eq!(&got, &expected);
            prop_assert_eq!(s.finish(), whole.finish());
        }
    }
}
