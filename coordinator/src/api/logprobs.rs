//! Logprobs in OpenAI's two shapes: chat's `{"content": [{token, logprob, bytes,
//! top_logprobs}]}` and completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.
//! The numbers come from the worker ([`TokenLogprobs`]); this module only names the tokens.

use herd_worker::engine::logprobs::TokenLogprobs;
use herd_worker::frontend::Frontend;
use serde_json::{Map, Value, json};

/// What OpenAI reports for a token the model gives no probability at all (JSON has no -inf).
const NO_PROBABILITY: f32 = -9999.0;

/// One generated token's logprob and alternatives, with their text.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl LogprobEntry {
    pub fn new(frontend: &Frontend, token: u32, lp: &TokenLogprobs) -> Self {
        let text = |id: u32| frontend.tokenizer.decode(&[id], false).unwrap_or_default();
        Self {
            token: text(token),
            logprob: finite(lp.logprob),
            top: lp.top.iter().map(|&(id, l)| (text(id), finite(l))).collect(),
        }
    }
}

fn finite(l: f32) -> f32 {
    if l.is_finite() { l } else { NO_PROBABILITY }
}

/// Chat: `{"content": [...]}`.
pub(crate) fn chat(entries: &[LogprobEntry]) -> Value {
    let item = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = item(&e.token, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|(t, l)| item(t, *l)).collect();
            v
        })
        .collect();
    json!({ "content": content })
}

/// Completions: parallel lists; `offset` is the text offset (in characters) of the first entry.
pub(crate) fn completion(entries: &[LogprobEntry], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(offset);
        offset += e.token.chars().count();
    }
    let top: Vec<Value> = entries
        .iter()
        .map(|e| Value::Object(e.top.iter().map(|(t, l)| (t.clone(), json!(l))).collect::<Map<_, _>>()))
        .collect();
    json!({
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<LogprobEntry> {
        vec![
            LogprobEntry { token: "Hé".into(), logprob: -0.5, top: vec![("Hé".into(), -0.5), ("A".into(), -1.5)] },
            LogprobEntry { token: "llo".into(), logprob: -0.25, top: vec![] },
        ]
    }

    #[test]
    fn chat_shape() {
        let v = chat(&entries());
        assert_eq!(v["content"][0]["token"], "Hé");
        assert_eq!(v["content"][0]["bytes"], json!([72, 195, 169]));
        assert_eq!(v["content"][0]["top_logprobs"][1]["token"], "A");
        assert_eq!(v["content"][0]["top_logprobs"][1]["logprob"], -1.5);
        assert_eq!(v["content"][1]["top_logprobs"], json!([]));
    }

    #[test]
    fn completion_shape_counts_characters() {
        let v = completion(&entries(), 3);
        assert_eq!(v["tokens"], json!(["Hé", "llo"]));
        assert_eq!(v["token_logprobs"], json!([-0.5, -0.25]));
        assert_eq!(v["text_offset"], json!([3, 5]));
        assert_eq!(v["top_logprobs"][0]["A"], -1.5);
    }

    #[test]
    fn impossible_tokens_get_openais_floor() {
        assert_eq!(finite(f32::NEG_INFINITY), NO_PROBABILITY);
        assert_eq!(finite(-2.0), -2.0);
    }
}
