//! Incremental output text: which part of the decoded text is safe to send
//! to the client, and where a stop string ends the output.
//!
//! The whole generated text is decoded again after every token (decoding is
//! cheap next to a forward pass) and compared with what was already sent.
//! Text that may still change is held back: a trailing U+FFFD (a multi-byte
//! character cut between tokens) and a suffix that could be the start of a
//! stop string. A stop string is trimmed from the output, as OpenAI does.

/// What one more token did to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextUpdate {
    /// Generation goes on; `delta` (maybe empty) is new text to send.
    Continue { delta: String },
    /// A stop string was found: `text` is the final output, without the stop
    /// string, and `delta` its part not sent yet.
    Stopped { text: String, delta: String },
}

/// The send position and stop strings of one request.
#[derive(Debug, Clone, Default)]
pub struct OutputText {
    stops: Vec<String>,
    /// Bytes of the decoded text already sent.
    sent: usize,
}

impl OutputText {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, sent: 0 }
    }

    /// Takes the whole decoded text so far.
    pub fn update(&mut self, text: &str) -> TextUpdate {
        let first_stop = self.stops.iter().filter_map(|stop| text.find(stop.as_str())).min();
        if let Some(end) = first_stop {
            let delta = self.take(text, end);
            return TextUpdate::Stopped { text: text[..end].to_owned(), delta };
        }
        let mut safe_end = text.trim_end_matches('\u{FFFD}').len();
        for stop in &self.stops {
            // The longest suffix of `text` that is a proper prefix of `stop`.
            let earliest = text.len().saturating_sub(stop.len().saturating_sub(1));
            if let Some(start) =
                (earliest..text.len()).find(|&i| text.is_char_boundary(i) && stop.starts_with(&text[i..]))
            {
                safe_end = safe_end.min(start);
            }
        }
        TextUpdate::Continue { delta: self.take(text, safe_end) }
    }

    /// The text not sent yet when generation ends for another reason.
    pub fn finish(&mut self, text: &str) -> String {
        self.take(text, text.len())
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        match text.get(self.sent..end) {
            Some(delta) if end > self.sent => {
                self.sent = end;
                delta.to_owned()
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds successive decoded texts and returns the deltas and the final result.
    fn check(stops: &[&str], texts: &[&str], expected_deltas: &[&str], expected_stop: Option<&str>) {
        let mut out = OutputText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        let mut stopped = None;
        for text in texts {
            match out.update(text) {
                TextUpdate::Continue { delta } => deltas.push(delta),
                TextUpdate::Stopped { text, delta } => {
                    deltas.push(delta);
                    stopped = Some(text);
                    break;
                }
            }
        }
        if stopped.is_none() {
            deltas.push(out.finish(texts.last().copied().unwrap_or("")));
        }
        assert_eq!(deltas, expected_deltas);
        assert_eq!(stopped.as_deref(), expected_stop);
    }

    #[test]
    fn deltas_hold_back_what_may_change() {
        check(&[], &["a", "ab", "abc"], &["a", "b", "c", ""], None);
        // A cut multi-byte character is not sent until complete.
        check(&[], &["a\u{FFFD}", "aé"], &["a", "é", ""], None);
        // A possible stop-string start is held back, then released.
        check(&["END"], &["x E", "x EN", "x ENx"], &["x ", "", "ENx", ""], None);
        // The stop string is trimmed, along with anything after it.
        check(&["END"], &["x E", "x EN", "x END!"], &["x ", "", ""], Some("x "));
        check(&["b", "zz"], &["a", "abc"], &["a", ""], Some("a"));
        // The earliest of several stop strings wins.
        check(&["c", "ab"], &["xabc"], &["x"], Some("x"));
    }
}
