//! Incremental detokenization: the text each new token adds, and stop strings found by
//! searching only the text near the end.
//!
//! Decoding a request's whole output after every token costs O(n) per token, O(n²) per
//! request, and dominates a step of many long streams. Instead each token decodes a
//! short window: the tokens since the last point where the text was known to be
//! complete (`prefix_offset..`), and separately the part of that window already
//! accounted for (`prefix_offset..read_offset`); the new text is the difference. Keeping
//! one already-decoded token of context in the window makes tokenizers whose text for a
//! token depends on its neighbour (a leading space dropped at the start of a decode)
//! give the same text as decoding the whole output. While the window ends in an
//! incomplete UTF-8 character (`U+FFFD`), nothing is committed: the bytes of a
//! character split across tokens come out together once the last one arrives.
//!
//! Stop strings are searched in the newly added text plus the `longest stop − 1` bytes
//! before it, which is where any occurrence not already found must start.

use batos_model::generate::TokenDecoder;

use crate::error::Result;

/// What [`OutputText::extend`] added.
struct Extended {
    /// Where the new text starts in `text` (the stop search goes back from here).
    scan_from: usize,
    end: End,
}

/// How the text ends after an extension.
enum End {
    /// With a complete character: the window may move on.
    Complete,
    /// With an incomplete character (kept out of the committed text).
    Incomplete,
    /// The whole output was decoded again; the offsets are already set.
    Resynced,
}

/// The decoded text of one request's output, kept up to date token by token.
#[derive(Debug, Default)]
pub(crate) struct OutputText {
    /// The text so far (cut before the stop string once one is found).
    text: String,
    /// Bytes of `text` already handed out by [`OutputText::take_delta`].
    sent: usize,
    /// Output tokens before the decode window.
    prefix_offset: usize,
    /// Output tokens whose text is committed to `text`.
    read_offset: usize,
    /// A stop string was found: the text is final.
    stopped: bool,
}

impl OutputText {
    /// The text so far.
    #[cfg(test)]
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Takes the output after one or more tokens were appended; decodes only the window
    /// since the last complete character. Returns the stop string the text now
    /// contains, if any (the text is then cut before it and is final).
    pub(crate) fn update(
        &mut self,
        output: &[u32],
        decoder: &dyn TokenDecoder,
        stops: &[String],
    ) -> Result<Option<String>> {
        if self.stopped || output.len() <= self.read_offset {
            return Ok(None);
        }
        let Some(ext) = self.extend(output, decoder)? else {
            return Ok(None);
        };
        if let Some((at, stop)) = find_stop(&self.text, ext.scan_from, stops) {
            self.text.truncate(at);
            self.sent = self.sent.min(at);
            self.read_offset = output.len();
            self.prefix_offset = output.len();
            self.stopped = true;
            return Ok(Some(stop.to_owned()));
        }
        match ext.end {
            End::Complete => {
                self.prefix_offset = self.read_offset;
                self.read_offset = output.len();
            }
            // An incomplete character at the end: keep it out until it completes (it
            // was appended only so that a stop string before it is found now).
            End::Incomplete => self.text.truncate(ext.scan_from),
            End::Resynced => {}
        }
        Ok(None)
    }

    /// Appends the window's new text to `self.text`; `None` when the window adds no
    /// text yet.
    fn extend(&mut self, output: &[u32], decoder: &dyn TokenDecoder) -> Result<Option<Extended>> {
        let prefix = if self.prefix_offset < self.read_offset {
            decoder.decode(&output[self.prefix_offset..self.read_offset])?
        } else {
            String::new()
        };
        let window = decoder.decode(&output[self.prefix_offset..])?;
        match window.strip_prefix(prefix.as_str()) {
            Some("") => Ok(None),
            Some(new) => {
                let scan_from = self.text.len();
                self.text.push_str(new);
                let end = if new.ends_with('\u{FFFD}') {
                    End::Incomplete
                } else {
                    End::Complete
                };
                Ok(Some(Extended { scan_from, end }))
            }
            None => {
                // The window's text does not extend its own prefix (a tokenizer whose
                // text depends on more context than the window holds): take the whole
                // output's text, and make the next window the whole output, so it
                // continues from text known to agree. Text already handed out cannot be
                // taken back; `sent` is clamped to what still agrees.
                let full = decoder.decode(output)?;
                let common = common_prefix_len(&self.text, &full);
                self.text = full;
                self.sent = self.sent.min(common);
                self.prefix_offset = 0;
                self.read_offset = output.len();
                Ok(Some(Extended {
                    scan_from: common,
                    end: End::Resynced,
                }))
            }
        }
    }

    /// At the end of the request: commits the window's text even if it ends in an
    /// incomplete character, so the text is what decoding the whole output gives.
    pub(crate) fn flush(&mut self, output: &[u32], decoder: &dyn TokenDecoder) -> Result<()> {
        if self.stopped || output.len() <= self.read_offset {
            return Ok(());
        }
        self.extend(output, decoder)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = output.len();
        Ok(())
    }

    /// The text not yet handed out. Unless `all`, a tail that may be the start of a
    /// stop string is held back (it is handed out once it is known not to be one).
    pub(crate) fn take_delta(&mut self, stops: &[String], all: bool) -> String {
        let ready = if all || self.stopped {
            self.text.len()
        } else {
            self.text.len() - stop_prefix_len(&self.text, stops)
        };
        if ready <= self.sent {
            return String::new();
        }
        let delta = self.text[self.sent..ready].to_owned();
        self.sent = ready;
        delta
    }

    /// The whole text, consuming the state.
    pub(crate) fn into_text(self) -> String {
        self.text
    }
}

/// The earliest stop string in `text` that ends after `new_from` (any occurrence ending
/// before it was found by an earlier call): its byte offset and the string.
fn find_stop<'s>(text: &str, new_from: usize, stops: &'s [String]) -> Option<(usize, &'s str)> {
    let longest = stops.iter().map(String::len).max()?;
    let mut from = new_from.saturating_sub(longest.saturating_sub(1));
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter_map(|s| {
            text[from..]
                .find(s.as_str())
                .map(|i| (from + i, s.as_str()))
        })
        .min_by_key(|&(at, _)| at)
}

/// The longest tail of `text` that is a proper prefix of a stop string.
pub(crate) fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .flat_map(|s| {
            s.char_indices()
                .map(|(i, _)| i)
                .filter(|&k| k > 0 && text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}

/// Bytes at the start of `a` and `b` that agree, at a character boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use batos_model::forward::ForwardError;

    /// A byte-level vocabulary, as GPT-2 style BPE decodes: each id is a byte string,
    /// the text is the concatenation read as UTF-8 (invalid bytes become U+FFFD).
    struct Bytes(Vec<Vec<u8>>);

    impl TokenDecoder for Bytes {
        fn decode(&self, ids: &[u32]) -> std::result::Result<String, ForwardError> {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| self.0[i as usize].iter().copied())
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    /// A SentencePiece-like decoder: as [`Bytes`], then one leading space is dropped
    /// (so a token's text depends on whether it starts the decode).
    struct Metaspace(Bytes);

    impl TokenDecoder for Metaspace {
        fn decode(&self, ids: &[u32]) -> std::result::Result<String, ForwardError> {
            let s = self.0.decode(ids)?;
            Ok(s.strip_prefix(' ').map(str::to_owned).unwrap_or(s))
        }
    }

    fn vocab() -> Bytes {
        let mut v: Vec<Vec<u8>> = [
            "a",
            " b",
            "EN",
            "D",
            "E",
            "ND",
            " ",
            "<|im_end|>",
            "<|",
            "im",
            "_end",
            "|>",
            "x",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        // "é" (C3 A9) and "🦀" (F0 9F A6 80) split across tokens.
        v.extend([
            vec![0xC3],
            vec![0xA9],
            vec![0xF0, 0x9F],
            vec![0xA6],
            vec![0x80],
        ]);
        // "D" and the first byte of "é" in one token.
        v.push(vec![b'D', 0xC3]);
        Bytes(v)
    }

    /// The old, whole-output method: the text and the first stop string in it.
    fn reference(d: &dyn TokenDecoder, out: &[u32], stops: &[String]) -> (String, Option<String>) {
        let text = d.decode(out).unwrap();
        match stops
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at)
        {
            Some((at, s)) => (text[..at].to_owned(), Some(s.clone())),
            None => (text, None),
        }
    }

    /// Feeds `ids` one by one; returns the concatenated deltas, the final text and the
    /// stop (checked against the reference at every step).
    fn run(
        d: &dyn TokenDecoder,
        ids: &[u32],
        stops: &[String],
    ) -> (String, String, Option<String>) {
        let mut t = OutputText::default();
        let mut streamed = String::new();
        for n in 1..=ids.len() {
            let out = &ids[..n];
            let stop = t.update(out, d, stops).unwrap();
            let (ref_text, ref_stop) = reference(d, out, stops);
            assert_eq!(stop, ref_stop, "stop after {out:?}");
            let last = stop.is_some() || n == ids.len();
            if last {
                t.flush(out, d).unwrap();
            }
            streamed.push_str(&t.take_delta(stops, last));
            // Committed text is always a prefix of the whole decode.
            assert!(
                ref_text.starts_with(t.text()),
                "{:?} vs {ref_text:?}",
                t.text()
            );
            if last {
                assert_eq!(t.text(), ref_text, "final text after {out:?}");
                return (streamed, t.into_text(), stop);
            }
        }
        unreachable!("the loop returns at the last token")
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn split_characters_come_out_whole() {
        let d = vocab();
        // a é 🦀 a
        let ids = [0, 13, 14, 15, 16, 17, 0];
        let mut t = OutputText::default();
        let mut deltas = Vec::new();
        for n in 1..=ids.len() {
            t.update(&ids[..n], &d, &[]).unwrap();
            deltas.push(t.take_delta(&[], false));
        }
        assert_eq!(deltas, ["a", "", "é", "", "", "🦀", "a"]);
    }

    #[test]
    fn stop_string_across_token_boundaries() {
        let d = vocab();
        let stops = strs(&["END"]);
        // "a" "EN" → held back; "D" completes "END".
        let (streamed, text, stop) = run(&d, &[0, 2, 3, 12], &stops);
        assert_eq!(stop.as_deref(), Some("END"));
        assert_eq!((streamed.as_str(), text.as_str()), ("a", "a"));
        // "E" "ND" too, and a held-back "EN" that turns out not to be a stop is sent.
        let (streamed, _, stop) = run(&d, &[4, 1, 2, 0, 4, 5], &stops);
        assert_eq!(stop.as_deref(), Some("END"));
        assert_eq!(streamed, "E bENa");
        // A special-token stop string spelled over four tokens.
        let stops = strs(&["<|im_end|>"]);
        let (streamed, _, stop) = run(&d, &[0, 8, 9, 10, 11, 0], &stops);
        assert_eq!(
            (streamed.as_str(), stop.as_deref()),
            ("a", Some("<|im_end|>"))
        );
    }

    #[test]
    fn stop_before_an_incomplete_character_is_found_at_once() {
        let d = vocab();
        // "EN", then "D" with the first byte of "é" in one token: the whole-output
        // decode ends in U+FFFD and already contains the stop.
        let (streamed, _, stop) = run(&d, &[0, 2, 18, 14], &strs(&["END"]));
        assert_eq!((streamed.as_str(), stop.as_deref()), ("a", Some("END")));
    }

    #[test]
    fn held_back_tail_is_sent_at_the_end() {
        let d = vocab();
        // Ends with "EN" (a stop prefix) by length: the tail goes out with the end.
        let (streamed, text, stop) = run(&d, &[0, 1, 2], &strs(&["END"]));
        assert_eq!(stop, None);
        assert_eq!((streamed.as_str(), text.as_str()), ("a bEN", "a bEN"));
    }

    #[test]
    fn random_outputs_agree_with_whole_output_decoding() {
        use rand::{Rng, SeedableRng};
        let bytes = vocab();
        let meta = Metaspace(vocab());
        let stops = strs(&["END", "<|im_end|>", "é a", " b b"]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for case in 0..2000 {
            let len = rng.random_range(1..40);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..19)).collect();
            let stops = &stops[..case % 5];
            for d in [&bytes as &dyn TokenDecoder, &meta] {
                let (streamed, text, _) = run(d, &ids, stops);
                assert_eq!(streamed, text, "case {case}: {ids:?}");
            }
        }
    }

    #[test]
    fn held_back_tail_is_a_stop_prefix() {
        let stops = strs(&["<|im_end|>", "END"]);
        assert_eq!(stop_prefix_len("hello <|im", &stops), 4);
        assert_eq!(stop_prefix_len("hello EN", &stops), 2);
        assert_eq!(stop_prefix_len("hello", &stops), 0);
        assert_eq!(stop_prefix_len("", &stops), 0);
    }

    #[test]
    fn common_prefix_stops_at_a_character_boundary() {
        assert_eq!(common_prefix_len("abé", "abè"), 2);
        assert_eq!(common_prefix_len("ab", "abc"), 2);
        assert_eq!(common_prefix_len("", "x"), 0);
    }
}
