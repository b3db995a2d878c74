//! Request bodies → [`ValidRequest`]: every limit checked, prompts rendered and tokenized,
//! sampling parameters resolved (request, else the checkpoint's `generation_config.json` when it
//! asks to sample, else OpenAI's defaults) and checked with [`SamplingParams::validate`].
//!
//! Everything here is plain synchronous code over the [`ApiConfig`] and the checkpoint's
//! [`Frontend`]; the handlers run it on a blocking thread because templates and tokenizers can
//! take a while on a large prompt.

use super::ApiConfig;
use super::errors::ApiError;
use super::openai::GenerationRequest;
use herd_worker::engine::logprobs::MAX_TOP_LOGPROBS;
use herd_worker::engine::sampler::{DEFAULT_MAX_TOKENS, SamplingParams};
use herd_worker::frontend::Frontend;
use herd_worker::model::config::GenerationConfig;
use herd_worker::vision::PixelValues;
use serde_json::Value;

/// One prompt to run `n` times.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidPrompt {
    pub ids: Vec<u32>,
    /// The prompt's text, for completions' `echo`.
    pub echo: Option<String>,
    /// `max_tokens` depends on the prompt's length, so parameters are per prompt.
    pub params: SamplingParams,
    /// Preprocessed images, in the order of the prompt's image blocks.
    pub images: Vec<PixelValues>,
}

/// A request that passed every check: what to run and how to answer.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidRequest {
    /// One for chat; one or more for completions.
    pub prompts: Vec<ValidPrompt>,
    /// Choices per prompt.
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// Which endpoint, for defaults and error `param`s.
#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn prompt_param(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        }
    }
}

pub fn validate_chat(
    config: &ApiConfig,
    frontend: &Frontend,
    req: GenerationRequest,
) -> Result<ValidRequest, ApiError> {
    check_model(config, req.model.as_deref())?;
    let n = check_n(config, req.n)?;
    let mut base = base_params(&req, &frontend.generation)?;
    base.logprobs = chat_logprobs(&req)?;
    let messages = req.messages.as_ref().ok_or_else(|| ApiError::invalid(Some("messages"), "messages is required"))?;
    let mut messages = messages.clone();
    let images = super::images::take_images(config, frontend, &mut messages)?;
    let messages = chat_messages(messages)?;
    let template = frontend.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(Some("messages"), "this model has no chat template; use /v1/completions with a raw prompt")
    })?;
    let rendered = template
        .render(&messages, true, req.tools.as_ref())
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let ids = frontend
        .tokenizer
        .encode(&rendered, false)
        .map_err(|e| ApiError::internal(format!("tokenizing the rendered chat failed: {e}")))?;
    let (ids, pixels) = super::images::expand(frontend, &ids, &images)?;
    let requested = req.max_tokens_field();
    let mut prompt = valid_prompt(config, Endpoint::Chat, ids, None, &base, requested)?;
    prompt.images = pixels;
    Ok(ValidRequest { prompts: vec![prompt], n, stream: req.streaming(), include_usage: req.usage() })
}

pub fn validate_completion(
    config: &ApiConfig,
    frontend: &Frontend,
    req: GenerationRequest,
) -> Result<ValidRequest, ApiError> {
    check_model(config, req.model.as_deref())?;
    let n = check_n(config, req.n)?;
    let mut base = base_params(&req, &frontend.generation)?;
    base.logprobs = completion_logprobs(&req)?;
    let prompt = req.prompt.clone().ok_or_else(|| ApiError::invalid(Some("prompt"), "prompt is required"))?;
    let raw = raw_prompts(prompt, frontend.config.text.vocab_size)?;
    if raw.len() > config.max_prompts {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!("at most {} prompts are allowed in one request, got {}", config.max_prompts, raw.len()),
        ));
    }
    let echo = req.echo.unwrap_or(false);
    let requested = req.max_tokens.map(|m| (m, "max_tokens"));
    let mut prompts = Vec::with_capacity(raw.len());
    for prompt in raw {
        let (ids, text) = match prompt {
            RawPrompt::Text(text) => {
                let ids = frontend
                    .tokenizer
                    .encode(&text, true)
                    .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))?;
                (ids, text)
            }
            RawPrompt::Ids(ids) => {
                let text = if echo {
                    frontend
                        .tokenizer
                        .decode(&ids, false)
                        .map_err(|e| ApiError::invalid(Some("prompt"), format!("cannot decode the prompt: {e}")))?
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        let echo_text = echo.then_some(text);
        prompts.push(valid_prompt(config, Endpoint::Completions, ids, echo_text, &base, requested)?);
    }
    Ok(ValidRequest { prompts, n, stream: req.streaming(), include_usage: req.usage() })
}

impl GenerationRequest {
    fn streaming(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    fn usage(&self) -> bool {
        self.streaming() && self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }

    /// `max_completion_tokens` (chat's newer name) wins over `max_tokens`.
    fn max_tokens_field(&self) -> Option<(i64, &'static str)> {
        match self.max_completion_tokens {
            Some(m) => Some((m, "max_completion_tokens")),
            None => self.max_tokens.map(|m| (m, "max_tokens")),
        }
    }
}

/// Chat: `logprobs: true` asks for the chosen tokens' logprobs, `top_logprobs: N` (0–20) for N
/// alternatives as well; `top_logprobs` without `logprobs` is a mistake, as in OpenAI's API.
fn chat_logprobs(req: &GenerationRequest) -> Result<Option<u32>, ApiError> {
    let wanted = match &req.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(ApiError::invalid(Some("logprobs"), "logprobs must be a boolean")),
    };
    let top = match req.top_logprobs {
        None => 0,
        Some(n) if !(0..=i64::from(MAX_TOP_LOGPROBS)).contains(&n) => {
            let msg = format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}");
            return Err(ApiError::invalid(Some("top_logprobs"), msg));
        }
        Some(_) if !wanted => {
            return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs set to true"));
        }
        Some(n) => n as u32,
    };
    Ok(wanted.then_some(top))
}

/// Completions: `logprobs: N` (0–20) asks for the chosen tokens' logprobs and N alternatives.
fn completion_logprobs(req: &GenerationRequest) -> Result<Option<u32>, ApiError> {
    let n = match &req.logprobs {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v.as_i64().filter(|n| (0..=i64::from(MAX_TOP_LOGPROBS)).contains(n)).ok_or_else(|| {
            let msg = format!("logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}");
            ApiError::invalid(Some("logprobs"), msg)
        })?,
    };
    if req.echo == Some(true) {
        // Prompt logprobs would need the prompt's logits from the worker; refuse rather than
        // answer with half of what OpenAI returns.
        return Err(ApiError::invalid(Some("logprobs"), "logprobs together with echo are not supported"));
    }
    Ok(Some(n as u32))
}

fn check_model(config: &ApiConfig, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None | Some("") => Ok(()),
        Some(name) if name == config.served_model_name => Ok(()),
        Some(name) => Err(ApiError::model_not_found(name)),
    }
}

fn check_n(config: &ApiConfig, n: Option<i64>) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1);
    if n < 1 {
        return Err(ApiError::invalid(Some("n"), format!("n must be at least 1, got {n}")));
    }
    if n as u64 > config.max_n as u64 {
        return Err(ApiError::invalid(Some("n"), format!("n must be at most {}, got {n}", config.max_n)));
    }
    Ok(n as usize)
}

/// Sampling parameters without `max_tokens` (which depends on each prompt's length).
fn base_params(f: &GenerationRequest, g: &GenerationConfig) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    // generation_config.json's values apply only when it asks to sample (as in transformers
    // and `herd generate`); a request's own value always wins.
    let sample = g.do_sample.unwrap_or(false);
    let from_config = |v: Option<f32>, default: f32| if sample { v.unwrap_or(default) } else { default };
    let top_k = match f.top_k {
        None => {
            if sample {
                g.top_k.unwrap_or(d.top_k)
            } else {
                d.top_k
            }
        }
        Some(-1 | 0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("top_k must be -1 (disabled) or at least 1, got {k}"),
            ));
        }
    };
    Ok(SamplingParams {
        temperature: f.temperature.unwrap_or(from_config(g.temperature, d.temperature)),
        top_k,
        top_p: f.top_p.unwrap_or(from_config(g.top_p, d.top_p)),
        min_p: f.min_p.unwrap_or(d.min_p),
        // Negative seeds are accepted (some clients send them); only the bits matter.
        seed: f.seed.map(|s| s as u64),
        repetition_penalty: f.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
        max_tokens: d.max_tokens,
        stop: stop_strings(f.stop.as_ref())?,
        stop_token_ids: f.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: f.ignore_eos.unwrap_or(false),
        logprobs: None,
    })
}

fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid(Some("stop"), "stop must be a string or a list of strings");
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) => list.iter().map(|s| s.as_str().map(str::to_owned).ok_or_else(bad)).collect(),
        Some(_) => Err(bad()),
    }
}

/// Check a tokenized prompt's length, resolve `max_tokens` and check the whole parameter set.
fn valid_prompt(
    config: &ApiConfig,
    endpoint: Endpoint,
    ids: Vec<u32>,
    echo: Option<String>,
    base: &SamplingParams,
    requested: Option<(i64, &'static str)>,
) -> Result<ValidPrompt, ApiError> {
    let param = endpoint.prompt_param();
    let len = ids.len();
    if len == 0 {
        return Err(ApiError::invalid(Some(param), "the prompt is empty"));
    }
    if len > config.max_prompt_tokens {
        return Err(ApiError::context_length(
            param,
            format!(
                "the prompt is {len} tokens long, but at most {} prompt tokens are allowed; shorten the {param}",
                config.max_prompt_tokens
            ),
        ));
    }
    let room = config.max_model_len.saturating_sub(len);
    let max_tokens = match requested {
        Some((m, field)) => {
            if m < 1 {
                return Err(ApiError::invalid(Some(field), format!("{field} must be at least 1, got {m}")));
            }
            if m as u64 > config.max_tokens as u64 {
                return Err(ApiError::invalid(
                    Some(field),
                    format!("{field} must be at most {}, got {m}", config.max_tokens),
                ));
            }
            let m = m as usize;
            if m > room {
                return Err(ApiError::context_length(
                    field,
                    format!(
                        "this model's maximum context length is {} tokens, but {} were requested \
                         ({len} in the {param}, {m} in the completion); shorten the {param} or {field}",
                        config.max_model_len,
                        len + m
                    ),
                ));
            }
            m
        }
        None => {
            // Chat answers may use the rest of the context; completions default to OpenAI's 16.
            let default = match endpoint {
                Endpoint::Chat => room,
                Endpoint::Completions => DEFAULT_MAX_TOKENS,
            };
            let m = default.min(room).min(config.max_tokens);
            if m == 0 {
                return Err(ApiError::context_length(
                    param,
                    format!(
                        "the prompt is {len} tokens long and leaves no room to generate within this model's \
                         maximum context length of {} tokens",
                        config.max_model_len
                    ),
                ));
            }
            m
        }
    };
    let params = SamplingParams { max_tokens, ..base.clone() };
    params.validate()?;
    Ok(ValidPrompt { ids, echo, params, images: Vec::new() })
}

/// Messages as the chat template wants them: `content` lists of text parts joined into one
/// string (with newlines, as vLLM does for string-content templates); other keys kept.
fn chat_messages(messages: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages must not be empty"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, message)| {
            let Value::Object(mut message) = message else {
                return Err(ApiError::invalid(Some("messages"), format!("messages[{i}] must be an object")));
            };
            if !message.get("role").is_some_and(Value::is_string) {
                return Err(ApiError::invalid(Some("messages"), format!("messages[{i}].role must be a string")));
            }
            if let Some(content) = message.get_mut("content") {
                *content = message_content(i, content.take())?;
            }
            Ok(Value::Object(message))
        })
        .collect()
}

fn message_content(i: usize, content: Value) -> Result<Value, ApiError> {
    let bad = |what: String| ApiError::invalid(Some("messages"), what);
    match content {
        Value::Null | Value::String(_) => Ok(content),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            // Image parts (already rewritten to {"type": "image"}) keep the list form, so that
            // the chat template places `<|image|>` between the texts as transformers does.
            if parts.iter().any(|p| p.get("type").and_then(Value::as_str) == Some("image")) {
                for (j, part) in parts.iter().enumerate() {
                    let ok = match part.get("type").and_then(Value::as_str) {
                        Some("text") => part.get("text").is_some_and(Value::is_string),
                        Some("image") => true,
                        _ => false,
                    };
                    if !ok {
                        return Err(bad(format!("messages[{i}].content[{j}] must be a text or image part")));
                    }
                }
                return Ok(Value::Array(parts));
            }
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(text) => texts.push(text),
                        None => return Err(bad(format!("messages[{i}].content[{j}].text must be a string"))),
                    },
                    Some(other) => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}]: unsupported content part type `{other}`"
                        )));
                    }
                    None => return Err(bad(format!("messages[{i}].content[{j}] has no `type`"))),
                }
            }
            Ok(Value::String(texts.join("\n")))
        }
        _ => Err(bad(format!("messages[{i}].content must be a string, null, or a list of content parts"))),
    }
}

enum RawPrompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of token id lists.
fn raw_prompts(prompt: Value, vocab: usize) -> Result<Vec<RawPrompt>, ApiError> {
    let shape = || {
        ApiError::invalid(
            Some("prompt"),
            "prompt must be a string, a list of strings, a list of token ids, or a list of token id lists",
        )
    };
    let ids = |list: &[Value]| -> Result<Vec<u32>, ApiError> {
        list.iter()
            .map(|v| {
                let id = v.as_u64().ok_or_else(shape)?;
                if id >= vocab as u64 {
                    return Err(ApiError::invalid(
                        Some("prompt"),
                        format!("token id {id} is outside the vocabulary of {vocab} ids"),
                    ));
                }
                Ok(id as u32)
            })
            .collect()
    };
    match prompt {
        Value::String(text) => Ok(vec![RawPrompt::Text(text)]),
        Value::Array(list) if list.is_empty() => Err(ApiError::invalid(Some("prompt"), "prompt must not be empty")),
        Value::Array(list) if list.iter().all(Value::is_string) => {
            Ok(list.into_iter().filter_map(|v| v.as_str().map(|s| RawPrompt::Text(s.to_owned()))).collect())
        }
        Value::Array(list) if list.iter().all(Value::is_number) => Ok(vec![RawPrompt::Ids(ids(&list)?)]),
        Value::Array(list) if list.iter().all(Value::is_array) => list
            .iter()
            .map(|inner| match inner {
                Value::Array(inner) if !inner.is_empty() => Ok(RawPrompt::Ids(ids(inner)?)),
                _ => Err(ApiError::invalid(Some("prompt"), "prompt must not contain an empty token list")),
            })
            .collect(),
        _ => Err(shape()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> ApiConfig {
        ApiConfig { max_model_len: 100, max_prompt_tokens: 80, max_tokens: 50, ..ApiConfig::new("m", 100) }
    }

    #[test]
    fn text_parts_join_and_image_parts_keep_their_list() {
        let ok = chat_messages(vec![json!({"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "extra": 1})])
        .expect("valid");
        assert_eq!(ok, vec![json!({"role": "user", "content": "a\nb", "extra": 1})]);
        // Image parts arrive here already decoded and rewritten to {"type": "image"}
        // (api::images); they keep the list form for the chat template.
        let parts = json!([{"type": "text", "text": "a"}, {"type": "image"}]);
        let ok = chat_messages(vec![json!({"role": "user", "content": parts.clone()})]).expect("image part");
        assert_eq!(ok, vec![json!({"role": "user", "content": parts})]);
        // A raw `image_url` part that skipped that step is a clear 400, not a silent drop.
        let err = chat_messages(vec![json!({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]})])
        .expect_err("raw image_url");
        assert_eq!(err.message, "messages[0].content[0]: unsupported content part type `image_url`");
        assert_eq!(err.param.as_deref(), Some("messages"));
        let err = chat_messages(vec![json!({"role": "user", "content": [{"type": "image"}, {"type": "audio"}]})])
            .expect_err("audio");
        assert_eq!(err.message, "messages[0].content[1] must be a text or image part");
        assert!(chat_messages(vec![]).is_err());
        assert!(chat_messages(vec![json!("hi")]).is_err());
        assert!(chat_messages(vec![json!({"content": "hi"})]).is_err());
    }

    #[test]
    fn prompt_shapes() {
        let texts = raw_prompts(json!(["a", "b"]), 10).expect("texts");
        assert_eq!(texts.len(), 2);
        let ids = raw_prompts(json!([1, 2, 3]), 10).expect("ids");
        assert!(matches!(&ids[..], [RawPrompt::Ids(v)] if v == &[1, 2, 3]));
        assert_eq!(raw_prompts(json!([[1], [2, 3]]), 10).expect("lists").len(), 2);
        assert!(raw_prompts(json!([]), 10).is_err());
        assert!(raw_prompts(json!([1, "a"]), 10).is_err());
        assert!(raw_prompts(json!([-1]), 10).is_err());
        assert!(raw_prompts(json!([[]]), 10).is_err());
        let far = raw_prompts(json!([10]), 10).err().expect("out of vocab");
        assert!(far.message.contains("outside the vocabulary"), "{}", far.message);
        assert!(raw_prompts(json!({"a": 1}), 10).is_err());
    }

    #[test]
    fn max_tokens_limits_and_defaults() {
        let c = config();
        let base = SamplingParams::default();
        let run = |len: usize, endpoint, req| valid_prompt(&c, endpoint, vec![1; len], None, &base, req);
        assert_eq!(run(10, Endpoint::Chat, None).expect("chat default").params.max_tokens, 50);
        assert_eq!(run(70, Endpoint::Chat, None).expect("rest of context").params.max_tokens, 30);
        assert_eq!(run(10, Endpoint::Completions, None).expect("16").params.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(run(10, Endpoint::Chat, Some((7, "max_tokens"))).expect("given").params.max_tokens, 7);
        let zero = run(10, Endpoint::Chat, Some((0, "max_tokens"))).expect_err("zero");
        assert_eq!(zero.param.as_deref(), Some("max_tokens"));
        let cap = run(10, Endpoint::Chat, Some((51, "max_completion_tokens"))).expect_err("over the cap");
        assert_eq!(cap.param.as_deref(), Some("max_completion_tokens"));
        let ctx = run(60, Endpoint::Chat, Some((50, "max_tokens"))).expect_err("context");
        assert_eq!(ctx.code, Some("context_length_exceeded"));
        let long = run(81, Endpoint::Completions, None).expect_err("prompt too long");
        assert_eq!((long.code, long.param.as_deref()), (Some("context_length_exceeded"), Some("prompt")));
        assert!(run(0, Endpoint::Chat, None).is_err());
    }

    #[test]
    fn sampling_fields_resolve_against_generation_config() {
        let sampling = GenerationConfig {
            do_sample: Some(true),
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(5),
            ..Default::default()
        };
        let p = base_params(&GenerationRequest::default(), &sampling).expect("defaults");
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.6, 0.9, 5));
        let greedy_config = GenerationConfig { do_sample: Some(false), ..sampling.clone() };
        let p = base_params(&GenerationRequest::default(), &greedy_config).expect("openai defaults");
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 1.0, 0));
        let fields = GenerationRequest {
            temperature: Some(0.0),
            top_k: Some(-1),
            stop: Some(json!("x")),
            seed: Some(-1),
            ..Default::default()
        };
        let p = base_params(&fields, &sampling).expect("explicit");
        assert_eq!((p.temperature, p.top_k, p.stop.clone(), p.seed), (0.0, 0, vec!["x".to_owned()], Some(u64::MAX)));
        let bad_k = GenerationRequest { top_k: Some(-2), ..Default::default() };
        assert_eq!(base_params(&bad_k, &sampling).expect_err("top_k").param.as_deref(), Some("top_k"));
        let bad_stop = GenerationRequest { stop: Some(json!([1])), ..Default::default() };
        assert_eq!(base_params(&bad_stop, &sampling).expect_err("stop").param.as_deref(), Some("stop"));
    }
}
