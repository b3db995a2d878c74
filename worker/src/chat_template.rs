//! The checkpoint's Jinja chat template, rendered as transformers' `apply_chat_template` does.
//!
//! transformers renders with Jinja2 (`ImmutableSandboxedEnvironment`, `trim_blocks`,
//! `lstrip_blocks`, loop controls), its own `tojson`, `raise_exception` and `strftime_now`,
//! with the tokenizer's named special tokens (`bos_token`, ...) as variables. Before rendering
//! it drops message keys whose value is null and copies reasoning under `thinking` and
//! `reasoning_content`. This module does the same with minijinja, with the Python behaviour
//! that leaks into prompts in [`python`].

mod python;

use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, syntax::SyntaxConfig};
use serde_json::{Map, Value as Json};
use thiserror::Error;

use crate::tokenizer::{SpecialTokens, TOKENIZER_CONFIG_FILE, TokenizerError, read_optional_json};

pub const CHAT_TEMPLATE_JINJA_FILE: &str = "chat_template.jinja";
pub const CHAT_TEMPLATE_JSON_FILE: &str = "chat_template.json";
/// Named templates saved next to `chat_template.jinja` by transformers 4.54+.
pub const ADDITIONAL_TEMPLATES_DIR: &str = "additional_chat_templates";

const DEFAULT_TEMPLATE: &str = "default";
/// transformers picks a template of this name when tools are passed.
const TOOL_USE_TEMPLATE: &str = "tool_use";

#[derive(Debug, Error)]
pub enum ChatTemplateError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid chat template config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("chat template {name:?} does not compile: {message}")]
    Syntax { name: String, message: String },
    #[error("chat template has no {DEFAULT_TEMPLATE:?} template (it has {names:?})")]
    NoDefault { names: Vec<String> },
    /// The template called `raise_exception(message)`.
    #[error("chat template raised: {0}")]
    Raised(String),
    #[error("chat template failed: {0}")]
    Render(String),
    #[error("invalid chat input: {0}")]
    Input(String),
}

/// Marks an error as coming from the template's `raise_exception`, so that its message can be
/// told apart from engine errors after minijinja has added its location.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(Raised(message)))
}

/// A compiled chat template (and any named alternatives) plus the special tokens it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    names: Vec<String>,
    special_tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("names", &self.names)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

fn read_text(path: &Path) -> Result<Option<String>, ChatTemplateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChatTemplateError::Io { path: path.to_path_buf(), source }),
    }
}

/// A `chat_template` entry: a string, or a list of `{"name", "template"}` objects.
fn templates_from_json(value: &Json, path: &Path) -> Result<Vec<(String, String)>, ChatTemplateError> {
    let bad = |message: &str| ChatTemplateError::Config { path: path.to_path_buf(), message: message.to_string() };
    match value {
        Json::String(source) => Ok(vec![(DEFAULT_TEMPLATE.to_string(), source.clone())]),
        Json::Array(list) => list
            .iter()
            .map(|entry| {
                let name = entry.get("name").and_then(Json::as_str);
                let source = entry.get("template").and_then(Json::as_str);
                match (name, source) {
                    (Some(name), Some(source)) => Ok((name.to_string(), source.to_string())),
                    _ => Err(bad("chat_template list entries need string \"name\" and \"template\"")),
                }
            })
            .collect(),
        _ => Err(bad("chat_template must be a string or a list of named templates")),
    }
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask extension) only
/// mark their body; minijinja has no such tag, so they become an always-true `if`, keeping
/// any whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_string();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_mod, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, close_mod) = match body.trim_end().strip_suffix(['-', '+']) {
            Some(b) => (b, body.trim_end()[b.len()..].to_string()),
            None => (body, String::new()),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{open_mod} {r} {close_mod}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn new_environment() -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_syntax(SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(python::unknown_method);
    env.set_formatter(|out, _state, value| {
        let written = match value.as_str() {
            Some(s) => out.write_str(s),
            None => out.write_str(&python::str_of(value)),
        };
        written.map_err(|_| minijinja::Error::new(ErrorKind::WriteFailure, "cannot write output"))
    });
    env.add_filter("tojson", python::tojson);
    env.add_filter("trim", python::trim);
    env.add_filter("string", python::string);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", |format: String| python::strftime_now(&format));
    Ok(env)
}

fn render_error(err: &minijinja::Error) -> ChatTemplateError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(raised) = e.downcast_ref::<Raised>() {
            return ChatTemplateError::Raised(raised.0.clone());
        }
        cause = e.source();
    }
    ChatTemplateError::Render(err.to_string())
}

/// transformers' preprocessing of one message: keys with null values are dropped, and
/// reasoning found under any of its names is copied to `thinking` (first) and
/// `reasoning_content`, as `{"thinking": r, **message, "reasoning_content": r}`.
fn prepare_message(index: usize, message: &Json) -> Result<Json, ChatTemplateError> {
    let Json::Object(fields) = message else {
        return Err(ChatTemplateError::Input(format!("message {index} is not a JSON object")));
    };
    let fields: Map<String, Json> =
        fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| fields.get(*k)).cloned();
    let Some(reasoning) = reasoning else {
        return Ok(Json::Object(fields));
    };
    let mut aliased = Map::new();
    aliased.insert("thinking".to_string(), reasoning.clone());
    // Inserting an existing key keeps its position, as a Python dict update does.
    aliased.extend(fields);
    aliased.insert("reasoning_content".to_string(), reasoning);
    Ok(Json::Object(aliased))
}

impl ChatTemplate {
    /// Finds the checkpoint's template: `DIR/chat_template.jinja` (plus named templates in
    /// `DIR/additional_chat_templates/*.jinja`), else `DIR/chat_template.json`
    /// (`{"chat_template": ...}`), else the `chat_template` entry of `tokenizer_config.json`
    /// (a string, or a list of `{"name", "template"}`). `Ok(None)` when there is none. The
    /// special tokens come from `tokenizer_config.json` as for [`crate::tokenizer::Tokenizer`].
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let special_tokens = SpecialTokens::from_dir(dir)?;
        let mut templates = Vec::new();
        if let Some(source) = read_text(&dir.join(CHAT_TEMPLATE_JINJA_FILE))? {
            templates.push((DEFAULT_TEMPLATE.to_string(), source));
        }
        templates.extend(additional_templates(&dir.join(ADDITIONAL_TEMPLATES_DIR))?);
        if templates.is_empty() {
            let path = dir.join(CHAT_TEMPLATE_JSON_FILE);
            if let Some(config) = read_optional_json(&path)?
                && let Some(entry) = config.get("chat_template")
            {
                templates = templates_from_json(entry, &path)?;
            }
        }
        if templates.is_empty() {
            let path = dir.join(TOKENIZER_CONFIG_FILE);
            if let Some(config) = read_optional_json(&path)?
                && let Some(entry) = config.get("chat_template").filter(|e| !e.is_null())
            {
                templates = templates_from_json(entry, &path)?;
            }
        }
        if templates.is_empty() {
            return Ok(None);
        }
        Self::from_named_sources(templates, special_tokens).map(Some)
    }

    /// A single template from its source, with the given special tokens as variables
    /// (see [`SpecialTokens::from_bos_eos`] for the common case).
    pub fn from_source(source: &str, special_tokens: &SpecialTokens) -> Result<Self, ChatTemplateError> {
        Self::from_named_sources(vec![(DEFAULT_TEMPLATE.to_string(), source.to_string())], special_tokens.clone())
    }

    /// Several named templates; `"default"` is required, `"tool_use"` is used when tools are
    /// passed, as in transformers.
    pub fn from_named_sources(
        templates: Vec<(String, String)>,
        special_tokens: SpecialTokens,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = new_environment().map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        let mut names = Vec::new();
        for (name, source) in templates {
            env.add_template_owned(name.clone(), rewrite_generation_tags(&source))
                .map_err(|e| ChatTemplateError::Syntax { name: name.clone(), message: e.to_string() })?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if !names.iter().any(|n| n == DEFAULT_TEMPLATE) {
            return Err(ChatTemplateError::NoDefault { names });
        }
        Ok(Self { env, names, special_tokens })
    }

    /// The named special tokens the template sees.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Renders like transformers' `apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=..., tokenize=False)`. Messages are OpenAI-style JSON objects;
    /// `tools` is a JSON array of tool schemas.
    pub fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tools: Option<&Json>,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_kwargs(messages, add_generation_prompt, tools, &Map::new())
    }

    /// [`render`](Self::render) with extra template variables, like transformers'
    /// `apply_chat_template(..., **kwargs)` (e.g. `tools_in_user_message=False` for Llama 4).
    /// They override special tokens of the same name.
    pub fn render_with_kwargs(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tools: Option<&Json>,
        kwargs: &Map<String, Json>,
    ) -> Result<String, ChatTemplateError> {
        if messages.is_empty() {
            // transformers refuses before rendering, whatever the template does.
            return Err(ChatTemplateError::Input("cannot apply a chat template to an empty conversation".into()));
        }
        let messages =
            messages.iter().enumerate().map(|(i, m)| prepare_message(i, m)).collect::<Result<Vec<_>, _>>()?;
        let tools = match tools {
            None | Some(Json::Null) => Json::Null,
            Some(Json::Array(list)) if list.iter().all(Json::is_object) => Json::Array(list.clone()),
            Some(_) => {
                return Err(ChatTemplateError::Input("tools must be a JSON array of objects".into()));
            }
        };
        let name = if !tools.is_null() && self.names.iter().any(|n| n == TOOL_USE_TEMPLATE) {
            TOOL_USE_TEMPLATE
        } else {
            DEFAULT_TEMPLATE
        };
        let mut context = Map::new();
        for (token_name, token) in self.special_tokens.iter() {
            context.insert(token_name.to_string(), Json::String(token.to_string()));
        }
        context.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        context.insert("messages".into(), Json::Array(messages));
        context.insert("tools".into(), tools);
        context.insert("documents".into(), Json::Null);
        context.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        let template = self.env.get_template(name).map_err(|e| render_error(&e))?;
        template.render(Value::from(minijinja::value::Serde(&context))).map_err(|e| render_error(&e))
    }
}

fn additional_templates(dir: &Path) -> Result<Vec<(String, String)>, ChatTemplateError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ChatTemplateError::Io { path: dir.to_path_buf(), source });
        }
    };
    let mut templates = Vec::new();
    for entry in entries {
        let path = entry.map_err(|source| ChatTemplateError::Io { path: dir.to_path_buf(), source })?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".jinja")) else {
            continue;
        };
        if let Some(source) = read_text(&path)? {
            templates.push((name.to_string(), source));
        }
    }
    templates.sort();
    Ok(templates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LLAMA4: &str = crate::synth::LLAMA4_CHAT_TEMPLATE;

    fn llama4() -> ChatTemplate {
        let tokens = SpecialTokens::from_bos_eos(Some("<|begin_of_text|>"), Some("<|eot|>"));
        ChatTemplate::from_source(LLAMA4, &tokens).expect("load")
    }

    fn render_case(template: &ChatTemplate, case: &Json) -> Result<String, ChatTemplateError> {
        let messages = case["messages"].as_array().expect("golden field");
        let tools = case.get("tools").filter(|t| !t.is_null());
        let kwargs = case.get("kwargs").and_then(Json::as_object).cloned().unwrap_or_default();
        let agp = case["add_generation_prompt"].as_bool().expect("golden field");
        template.render_with_kwargs(messages, agp, tools, &kwargs)
    }

    #[test]
    fn template_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn llama4_matches_transformers() {
        let golden: Json = serde_json::from_str(include_str!("../tests/data/llama4_chat_golden.json")).expect("parse");
        let template = llama4();
        for case in golden["chat"].as_array().expect("golden field") {
            let got = render_case(&template, case).expect("render");
            assert_eq!(got, case["text"].as_str().expect("golden field"), "case {}", case["name"]);
        }
    }

    #[test]
    fn python_behaviour_matches_transformers_jinja() {
        let golden: Json =
            serde_json::from_str(include_str!("../tests/data/python_compat_golden.json")).expect("parse");
        let context = golden["context"].as_object().expect("golden field");
        for case in golden["cases"].as_array().expect("golden field") {
            let template =
                ChatTemplate::from_source(case["template"].as_str().expect("golden field"), &SpecialTokens::new())
                    .expect("compile");
            let got = template.render_with_kwargs(&[json!({})], false, None, context).expect("render");
            assert_eq!(got, case["expected"].as_str().expect("golden field"), "case {}", case["name"]);
        }
    }

    #[test]
    fn raise_exception_is_its_own_error() {
        let messages = [json!({"role": "system", "content": "sys"})];
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let err = llama4().render(&messages, true, Some(&tools)).expect_err("should fail");
        let ChatTemplateError::Raised(message) = err else { panic!("expected Raised, got {err}") };
        assert_eq!(message, "Cannot put tools in the first user message when there's no first user message!");
    }

    #[test]
    fn template_errors_do_not_panic() {
        let err = llama4().render(&[], true, None).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::Input(_)), "{err}");
        // An index past the end is undefined, and a lookup on undefined fails as in Jinja2.
        let template = ChatTemplate::from_source("{{ messages[1]['role'] }}", &SpecialTokens::new()).expect("load");
        let err = template.render(&[json!({"role": "user"})], true, None).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::Render(_)), "{err}");
        let err = llama4().render(&[json!("not an object")], true, None).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::Input(_)), "{err}");
        let messages = [json!({"role": "user", "content": "hi"})];
        let err = llama4().render(&messages, true, Some(&json!({"not": "a list"}))).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::Input(_)), "{err}");
        // A tool turn without content: Jinja2's Undefined is iterable, and json.dumps fails on it.
        let messages = [json!({"role": "user", "content": "hi"}), json!({"role": "tool", "content": null})];
        let err = llama4().render(&messages, true, None).expect_err("should fail");
        assert!(err.to_string().contains("not JSON serializable"), "{err}");
        let err = ChatTemplate::from_source("{% if %}", &SpecialTokens::new()).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::Syntax { .. }), "{err}");
        let template =
            ChatTemplate::from_source("{{ x | tojson(bogus=1) }}{{ 'a' + 1 }}", &SpecialTokens::new()).expect("load");
        assert!(matches!(template.render(&[json!({})], false, None), Err(ChatTemplateError::Render(_))));
    }

    #[test]
    fn special_tokens_and_kwargs_reach_the_template() {
        let mut tokens = SpecialTokens::from_bos_eos(Some("<s>"), Some("</s>"));
        tokens.set("image_token", "<img>");
        let source =
            "{{ bos_token }}{{ eos_token }}{{ image_token }}{{ pad_token }}{{ documents }}|{{ tools }}|{{ extra }}";
        let template = ChatTemplate::from_source(source, &tokens).expect("load");
        let mut kwargs = Map::new();
        kwargs.insert("extra".into(), json!(1.5));
        kwargs.insert("eos_token".into(), json!("<end>"));
        assert_eq!(
            template.render_with_kwargs(&[json!({})], false, None, &kwargs).expect("render"),
            "<s><end><img>None|None|1.5"
        );
    }

    #[test]
    fn message_preprocessing_follows_transformers() {
        let source = "{% for m in messages %}{{ m|tojson }};{% endfor %}";
        let template = ChatTemplate::from_source(source, &SpecialTokens::new()).expect("load");
        let messages = [
            json!({"role": "assistant", "content": "a", "tool_calls": null, "reasoning": "r"}),
            json!({"role": "assistant", "thinking": "t", "content": "b", "reasoning_content": null}),
        ];
        assert_eq!(
            template.render(&messages, false, None).expect("render"),
            r#"{"thinking": "r", "role": "assistant", "content": "a", "reasoning": "r", "reasoning_content": "r"};"#
                .to_string()
                + r#"{"thinking": "t", "role": "assistant", "content": "b", "reasoning_content": "t"};"#
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source = "{% for m in messages %}{%- generation -%}\n[{{ m.content }}]\n{%- endgeneration %}{% endfor %}";
        let template = ChatTemplate::from_source(source, &SpecialTokens::new()).expect("load");
        let messages = [json!({"role": "user", "content": "x"}), json!({"role": "user", "content": "y"})];
        assert_eq!(template.render(&messages, false, None).expect("render"), "[x][y]");
        assert_eq!(rewrite_generation_tags("{%+ generation %}"), "{%+ if true %}");
        assert_eq!(rewrite_generation_tags("{% endgeneration -%}"), "{% endif -%}");
        assert_eq!(rewrite_generation_tags("{{ 'generation' }}{% if x %}"), "{{ 'generation' }}{% if x %}");
    }

    #[test]
    fn strftime_now_is_a_date() {
        let template =
            ChatTemplate::from_source("{{ strftime_now('%d %b %Y') }}", &SpecialTokens::new()).expect("load");
        let date = template.render(&[json!({})], false, None).expect("render");
        let parts: Vec<&str> = date.split(' ').collect();
        assert_eq!(parts.len(), 3, "{date}");
        assert_eq!(parts[0].len(), 2);
        assert!(parts[2].parse::<u32>().expect("numeric year") >= 2025);
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("fixture file");
    }

    #[test]
    fn from_dir_finds_templates_in_transformers_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let one = [json!({"role": "user", "content": "x"})];
        assert!(ChatTemplate::from_dir(d).expect("load").is_none());

        write(
            d,
            TOKENIZER_CONFIG_FILE,
            r#"{"bos_token": {"content": "<B>"}, "chat_template": [
            {"name": "default", "template": "cfg-default {{ bos_token }}"},
            {"name": "tool_use", "template": "cfg-tools {{ tools|length }}"}]}"#,
        );
        let template = ChatTemplate::from_dir(d).expect("load").expect("load");
        assert_eq!(template.render(&one, false, None).expect("render"), "cfg-default <B>");
        assert_eq!(template.render(&one, false, Some(&json!([{}]))).expect("render"), "cfg-tools 1");

        write(d, CHAT_TEMPLATE_JSON_FILE, r#"{"chat_template": "json {{ bos_token }}"}"#);
        let template = ChatTemplate::from_dir(d).expect("load").expect("load");
        assert_eq!(template.render(&one, false, Some(&json!([]))).expect("render"), "json <B>");

        write(d, CHAT_TEMPLATE_JINJA_FILE, "jinja {{ bos_token }}\n");
        let template = ChatTemplate::from_dir(d).expect("load").expect("load");
        assert_eq!(template.render(&one, false, None).expect("render"), "jinja <B>");

        write(d, TOKENIZER_CONFIG_FILE, r#"{"chat_template": [{"name": "other", "template": "x"}]}"#);
        std::fs::remove_file(d.join(CHAT_TEMPLATE_JINJA_FILE)).expect("fixture file");
        std::fs::remove_file(d.join(CHAT_TEMPLATE_JSON_FILE)).expect("fixture file");
        let err = ChatTemplate::from_dir(d).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::NoDefault { .. }), "{err}");

        write(d, TOKENIZER_CONFIG_FILE, r#"{"chat_template": 7}"#);
        let err = ChatTemplate::from_dir(d).expect_err("should fail");
        assert!(matches!(err, ChatTemplateError::Config { .. }), "{err}");
    }

    /// The checkpoints the golden helper generated with transformers, when present.
    #[test]
    fn golden_checkpoints_match_transformers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden");
        let Ok(entries) = std::fs::read_dir(&root) else {
            eprintln!("skipping: no golden checkpoints under {}", root.display());
            return;
        };
        let mut checked = 0;
        for entry in entries {
            let case_dir = entry.expect("dir entry").path();
            let model = case_dir.join("model");
            let (Ok(input), Ok(expected)) = (
                std::fs::read_to_string(case_dir.join("input.json")),
                std::fs::read_to_string(case_dir.join("expected.json")),
            ) else {
                eprintln!("skipping {}: no input.json/expected.json", case_dir.display());
                continue;
            };
            let input: Json = serde_json::from_str(&input).expect("parse");
            let expected: Json = serde_json::from_str(&expected).expect("parse");
            let tokenizer = crate::tokenizer::Tokenizer::from_dir(&model).expect("load");
            let template = ChatTemplate::from_dir(&model).expect("load");
            let expected_prompts = expected["prompts"].as_array().expect("golden field");
            for prompt in input["prompts"].as_array().expect("golden field") {
                let name = &prompt["name"];
                let want =
                    expected_prompts.iter().find(|p| p["name"] == *name).expect("expected.json has every prompt");
                if want.get("pixel_values_bf16_bits").is_some() {
                    continue; // image prompts expand <|image|>: checked by worker/tests/vision_preprocess.rs
                }
                let ids = if let Some(messages) = prompt.get("messages").and_then(Json::as_array) {
                    let template = template.as_ref().expect("golden checkpoint has a chat template");
                    let agp = prompt.get("add_generation_prompt").and_then(Json::as_bool).unwrap_or(true);
                    let rendered = template.render(messages, agp, prompt.get("tools")).expect("render");
                    if let Some(text) = want.get("rendered").and_then(Json::as_str) {
                        assert_eq!(rendered, text, "{} {name}", case_dir.display());
                    }
                    tokenizer.encode(&rendered, true).expect("tokenizer call")
                } else if let Some(text) = prompt.get("text").and_then(Json::as_str) {
                    tokenizer.encode(text, true).expect("tokenizer call")
                } else {
                    continue;
                };
                let want_ids: Vec<u32> = serde_json::from_value(want["input_ids"].clone()).expect("parse");
                assert_eq!(ids, want_ids, "{} {name}", case_dir.display());
                checked += 1;
            }
        }
        eprintln!("checked {checked} golden prompts");
    }
}
