//! Deciding when a request's generation ends, and which of its text is safe to stream.
//!
//! The caller detokenises incrementally and feeds each generated token id with its text delta
//! to a [`StopChecker`]. The checker ends generation on the model's EOS ids (unless
//! `ignore_eos`), on the request's `stop_token_ids`, on a stop string, or at `max_tokens`, in
//! vLLM's order of precedence (EOS, stop token, stop string, length).
//!
//! Text that could be the start of a stop string is held back until the next deltas show it is
//! not, so a streamed response never shows part of a stop string; a matched stop string and
//! everything after it are dropped. Stop tokens contribute no text either.

use serde::{Deserialize, Serialize};

use super::sampler::SamplingParams;

/// The OpenAI `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// The API spelling: `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// Why generation ended, in more detail than [`FinishReason`] (for logs, and for vLLM's
/// `stop_reason`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StopReason {
    /// One of the model's EOS ids.
    Eos,
    /// One of the request's `stop_token_ids`.
    StopToken(u32),
    /// One of the request's stop strings.
    StopString(String),
    /// `max_tokens` tokens were generated.
    MaxTokens,
}

impl StopReason {
    pub fn finish_reason(&self) -> FinishReason {
        match self {
            Self::Eos | Self::StopToken(_) | Self::StopString(_) => FinishReason::Stop,
            Self::MaxTokens => FinishReason::Length,
        }
    }
}

/// One request's stop conditions and held-back text.
#[derive(Clone, Debug)]
pub struct StopChecker {
    /// Empty under `ignore_eos`.
    eos_ids: Vec<u32>,
    stop_token_ids: Vec<u32>,
    stop: Vec<String>,
    max_tokens: usize,
    generated: usize,
    /// Text received but not yet released: a suffix that may begin a stop string.
    held: String,
    reason: Option<StopReason>,
}

impl StopChecker {
    /// `eos_ids` are the model's end-of-sequence ids (Llama 4 has several).
    pub fn new(params: &SamplingParams, eos_ids: &[u32]) -> Self {
        Self {
            eos_ids: if params.ignore_eos { Vec::new() } else { eos_ids.to_vec() },
            stop_token_ids: params.stop_token_ids.clone(),
            // `validate` rejects empty stop strings; one slipping through would match at once.
            stop: params.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            max_tokens: params.max_tokens,
            generated: 0,
            held: String::new(),
            reason: None,
        }
    }

    /// Feeds one generated token and its text delta. Returns the text now safe to emit and,
    /// on the token that ends generation, why. Once stopped, further pushes are ignored (they
    /// return no text and the same reason).
    pub fn push(&mut self, token: u32, text_delta: &str) -> (String, Option<StopReason>) {
        if let Some(reason) = &self.reason {
            return (String::new(), Some(reason.clone()));
        }
        self.generated += 1;

        // A stop token's own text is never shown; whatever was held back for a stop string
        // that can no longer complete is.
        let token_reason = if self.eos_ids.contains(&token) {
            Some(StopReason::Eos)
        } else if self.stop_token_ids.contains(&token) {
            Some(StopReason::StopToken(token))
        } else {
            None
        };
        if let Some(reason) = token_reason {
            return self.end(reason);
        }

        self.held.push_str(text_delta);
        // Every match starts inside `held`: text released earlier had no suffix that could
        // begin a stop string.
        if let Some((at, which)) = earliest_match(&self.held, &self.stop) {
            self.held.truncate(at);
            let reason = StopReason::StopString(self.stop[which].clone());
            return self.end(reason);
        }
        if self.generated >= self.max_tokens {
            return self.end(StopReason::MaxTokens);
        }
        let keep_from = partial_match_start(&self.held, &self.stop);
        let rest = self.held.split_off(keep_from);
        let out = std::mem::replace(&mut self.held, rest);
        (out, None)
    }

    /// Releases any held-back text, for when generation ends outside the checker (context
    /// full, cancellation). After a stop it returns nothing: `push` already released all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Why generation stopped, once it has.
    pub fn reason(&self) -> Option<&StopReason> {
        self.reason.as_ref()
    }

    /// Tokens pushed so far, the final stop token included.
    pub fn generated_tokens(&self) -> usize {
        self.generated
    }

    fn end(&mut self, reason: StopReason) -> (String, Option<StopReason>) {
        self.reason = Some(reason.clone());
        (std::mem::take(&mut self.held), Some(reason))
    }
}

/// Byte offset and index of the stop string whose match starts earliest in `text` (the first
/// listed wins a tie): the text before it is the longest that contains no stop string.
fn earliest_match(text: &str, stops: &[String]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for (i, s) in stops.iter().enumerate() {
        if let Some(at) = text.find(s.as_str())
            && best.is_none_or(|(b, _)| at < b)
        {
            best = Some((at, i));
        }
    }
    best
}

/// Start of the longest suffix of `text` that is a proper prefix of some stop string
/// (`text.len()` if none), i.e. where the held-back text must begin.
fn partial_match_start(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let lo = text.len().saturating_sub(longest.saturating_sub(1));
    // Suffixes start on char boundaries; the earliest one found is the longest.
    for (i, _) in text.char_indices().filter(|&(i, _)| i >= lo) {
        let suffix = &text[i..];
        if stops.iter().any(|s| s.len() > suffix.len() && s.starts_with(suffix)) {
            return i;
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 2;

    fn checker(stop: &[&str], max_tokens: usize) -> StopChecker {
        let params = SamplingParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            stop_token_ids: vec![99],
            max_tokens,
            ..SamplingParams::default()
        };
        StopChecker::new(&params, &[EOS, 3])
    }

    /// Feeds deltas as tokens 10, 11, ...; returns each step's released text and the outcome.
    fn feed(c: &mut StopChecker, deltas: &[&str]) -> (Vec<String>, Option<StopReason>) {
        let mut out = Vec::new();
        for (i, d) in deltas.iter().enumerate() {
            let (text, reason) = c.push(10 + i as u32, d);
            out.push(text);
            if reason.is_some() {
                return (out, reason);
            }
        }
        (out, None)
    }

    #[test]
    fn stop_string_split_across_deltas_is_detected_and_trimmed() {
        let mut c = checker(&["Hello world"], 100);
        let (out, reason) = feed(&mut c, &["Hel", "lo wor", "ld"]);
        assert_eq!(out, vec!["", "", ""]);
        assert_eq!(reason, Some(StopReason::StopString("Hello world".into())));

        let mut c = checker(&["world"], 100);
        let (out, reason) = feed(&mut c, &["Hi. Hel", "lo wor", "ld and more"]);
        assert_eq!(out, vec!["Hi. Hel", "lo ", ""]);
        assert_eq!(out.concat(), "Hi. Hello ");
        assert_eq!(reason, Some(StopReason::StopString("world".into())));
        assert_eq!(reason.map(|r| r.finish_reason()), Some(FinishReason::Stop));
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn stop_string_inside_one_delta_drops_the_rest() {
        let mut c = checker(&["\n\n"], 100);
        let (out, reason) = feed(&mut c, &["one", " two\n\nthree"]);
        assert_eq!(out.concat(), "one two");
        assert_eq!(reason, Some(StopReason::StopString("\n\n".into())));
        // Later pushes are ignored.
        assert_eq!(c.push(5, "more"), (String::new(), reason.clone()));
        assert_eq!(c.generated_tokens(), 2);
        assert_eq!(c.reason(), reason.as_ref());
    }

    #[test]
    fn held_back_text_is_released_when_the_match_fails() {
        let mut c = checker(&["world"], 100);
        let (out, reason) = feed(&mut c, &["a wor", "k", "s wo", "rl", "d!"]);
        assert_eq!(out, vec!["a ", "work", "s ", "", ""]);
        assert_eq!(reason, Some(StopReason::StopString("world".into())));

        // A failing partial match can still leave a shorter one held: "aab" vs "aab".
        let mut c = checker(&["aab"], 100);
        let (out, reason) = feed(&mut c, &["a", "a", "a", "c"]);
        assert_eq!(out, vec!["", "", "a", "aac"]);
        assert_eq!(reason, None);
    }

    #[test]
    fn earliest_stop_string_wins() {
        let mut c = checker(&["cd", "b"], 100);
        let (out, reason) = feed(&mut c, &["abcd"]);
        assert_eq!(out.concat(), "a");
        assert_eq!(reason, Some(StopReason::StopString("b".into())));
    }

    #[test]
    fn no_stop_strings_pass_text_straight_through() {
        let mut c = checker(&[], 100);
        let (out, reason) = feed(&mut c, &["a", "bc", "", "d"]);
        assert_eq!(out, vec!["a", "bc", "", "d"]);
        assert_eq!(reason, None);
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let mut c = checker(&["é!"], 100);
        let (out, reason) = feed(&mut c, &["caf", "é", "?", "né", "!"]);
        assert_eq!(out, vec!["caf", "", "é?", "n", ""]);
        assert_eq!(reason, Some(StopReason::StopString("é!".into())));
    }

    #[test]
    fn eos_stops_without_its_text_and_releases_held_text() {
        let mut c = checker(&["world"], 100);
        assert_eq!(c.push(10, "hello wor"), ("hello ".into(), None));
        let (text, reason) = c.push(EOS, "<|eot|>");
        assert_eq!(text, "wor");
        assert_eq!(reason, Some(StopReason::Eos));
        assert_eq!(reason.map(|r| r.finish_reason().as_str()), Some("stop"));
        // The second EOS id works too.
        let mut c = checker(&[], 100);
        assert_eq!(c.push(3, "</s>"), (String::new(), Some(StopReason::Eos)));
    }

    #[test]
    fn stop_token_ids_stop_even_with_ignore_eos() {
        let params =
            SamplingParams { stop_token_ids: vec![99], ignore_eos: true, max_tokens: 100, ..SamplingParams::default() };
        let mut c = StopChecker::new(&params, &[EOS]);
        assert_eq!(c.push(EOS, "<eos>"), ("<eos>".into(), None));
        assert_eq!(c.push(99, "<stop>"), (String::new(), Some(StopReason::StopToken(99))));
    }

    #[test]
    fn max_tokens_gives_length_and_flushes() {
        let mut c = checker(&["world"], 3);
        assert_eq!(c.push(10, "a"), ("a".into(), None));
        assert_eq!(c.push(11, "b"), ("b".into(), None));
        let (text, reason) = c.push(12, " wor");
        assert_eq!(text, " wor");
        assert_eq!(reason, Some(StopReason::MaxTokens));
        assert_eq!(reason.map(|r| r.finish_reason()), Some(FinishReason::Length));
        assert_eq!(c.generated_tokens(), 3);
    }

    #[test]
    fn a_stop_on_the_last_allowed_token_is_a_stop() {
        let mut c = checker(&["world"], 2);
        c.push(10, "a");
        assert_eq!(c.push(EOS, ""), ("".into(), Some(StopReason::Eos)));
        let mut c = checker(&["world"], 2);
        c.push(10, "wor");
        assert_eq!(c.push(11, "ld"), (String::new(), Some(StopReason::StopString("world".into()))));
    }

    #[test]
    fn finish_releases_held_text() {
        let mut c = checker(&["world"], 100);
        assert_eq!(c.push(10, "hello w"), ("hello ".into(), None));
        assert_eq!(c.finish(), "w");
        assert_eq!(c.finish(), "");
    }

    #[test]
    fn finish_reason_serialises_as_openai_spells_it() {
        assert_eq!(serde_json::to_string(&FinishReason::Length).expect("serialises"), "\"length\"");
        assert_eq!(FinishReason::Stop.as_str(), "stop");
    }
}
