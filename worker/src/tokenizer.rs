//! The checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` crate, the named special
//! tokens from `tokenizer_config.json`, and an incremental detokenizer for streaming.
//!
//! Parity target is transformers' `AutoTokenizer` (5.x, `TokenizersBackend`): the same added
//! tokens, the same special-token names for chat templates, and `encode(text, true)` equal to
//! `tokenizer(text)["input_ids"]` for Llama 4 tokenizers, whose post-processor prepends BOS.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use thiserror::Error;

/// File names inside a checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";

/// The special-token attributes every transformers tokenizer has, in its order.
const NAMED_SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("tokenizer file {} does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode ids: {0}")]
    Decode(String),
}

/// Reads a JSON file that a checkpoint may or may not have.
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Json>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io { path: path.to_path_buf(), source });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

/// A token in a config file: a plain string, or an `AddedToken` object with a `content` field.
fn token_content(value: &Json) -> Option<&str> {
    match value {
        Json::String(s) => Some(s),
        Json::Object(map) => map.get("content").and_then(Json::as_str),
        _ => None,
    }
}

/// The named special tokens (`bos_token`, `eos_token`, ... and model-specific `*_token` keys),
/// which transformers passes into the chat template's context as variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    entries: Vec<(String, String)>,
}

impl SpecialTokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// Just a BOS and an EOS token, for templates built in code.
    pub fn from_bos_eos(bos_token: Option<&str>, eos_token: Option<&str>) -> Self {
        let mut tokens = Self::new();
        if let Some(bos) = bos_token {
            tokens.set("bos_token", bos);
        }
        if let Some(eos) = eos_token {
            tokens.set("eos_token", eos);
        }
        tokens
    }

    /// The names transformers 5 takes from `tokenizer_config.json`: the seven standard
    /// attributes, every other string-valued `*_token` key, and `extra_special_tokens` when it
    /// is a mapping.
    pub fn from_tokenizer_config(config: &Json) -> Self {
        let mut tokens = Self::new();
        let Some(map) = config.as_object() else {
            return tokens;
        };
        for (key, value) in map {
            let named = NAMED_SPECIAL_TOKENS.contains(&key.as_str());
            // Model-specific names are only picked up when they hold a token, which rules out
            // flags like `add_bos_token`.
            if (named || key.ends_with("_token"))
                && let Some(content) = token_content(value)
            {
                tokens.set(key, content);
            }
        }
        if let Some(Json::Object(extra)) = map.get("extra_special_tokens") {
            for (key, value) in extra {
                if let Some(content) = token_content(value) {
                    tokens.set(key, content);
                }
            }
        }
        tokens
    }

    /// Reads `tokenizer_config.json`, and the legacy `special_tokens_map.json`, which
    /// transformers only consults (and lets override the config) when the config has no
    /// `added_tokens_decoder`.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = read_optional_json(&dir.join(TOKENIZER_CONFIG_FILE))?;
        Self::from_config_and_map(config.as_ref(), dir)
    }

    fn from_config_and_map(config: Option<&Json>, dir: &Path) -> Result<Self, TokenizerError> {
        let mut tokens = config.map(Self::from_tokenizer_config).unwrap_or_default();
        let has_decoder = config.is_some_and(|c| c.get("added_tokens_decoder").is_some());
        if !has_decoder && let Some(Json::Object(map)) = read_optional_json(&dir.join(SPECIAL_TOKENS_MAP_FILE))? {
            for (key, value) in &map {
                if let Some(content) = token_content(value) {
                    tokens.set(key, content);
                }
            }
        }
        Ok(tokens)
    }

    /// Sets (or replaces) the token called `name`.
    pub fn set(&mut self, name: &str, content: &str) {
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = content.to_string(),
            None => self.entries.push((name.to_string(), content.to_string())),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, c)| c.as_str())
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.get("bos_token")
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.get("eos_token")
    }

    /// `(name, token)` pairs, e.g. `("bos_token", "<|begin_of_text|>")`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, c)| (n.as_str(), c.as_str()))
    }
}

/// A checkpoint tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special_tokens: SpecialTokens,
    bos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special_tokens", &self.special_tokens)
            .field("bos_id", &self.bos_id)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json` (required) and `DIR/tokenizer_config.json` (optional).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join(TOKENIZER_FILE);
        let json = match std::fs::read_to_string(&path) {
            Ok(json) => json,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenizerError::Missing { path });
            }
            Err(source) => return Err(TokenizerError::Io { path, source }),
        };
        let config = read_optional_json(&dir.join(TOKENIZER_CONFIG_FILE))?;
        let special_tokens = SpecialTokens::from_config_and_map(config.as_ref(), dir)?;
        Self::from_json(&json, config.as_ref(), special_tokens)
            .map_err(|message| TokenizerError::Parse { path, message })
    }

    /// Builds a tokenizer from the text of a `tokenizer.json` and an optional parsed
    /// `tokenizer_config.json`.
    pub fn from_json_str(tokenizer_json: &str, tokenizer_config: Option<&Json>) -> Result<Self, TokenizerError> {
        let special_tokens = tokenizer_config.map(SpecialTokens::from_tokenizer_config).unwrap_or_default();
        Self::from_json(tokenizer_json, tokenizer_config, special_tokens)
            .map_err(|message| TokenizerError::Parse { path: PathBuf::from(TOKENIZER_FILE), message })
    }

    fn from_json(json: &str, config: Option<&Json>, special_tokens: SpecialTokens) -> Result<Self, String> {
        // The checkpoint is untrusted input and the `tokenizers` deserialisers are not all
        // panic-free on malformed models, so a panic is turned into a parse error.
        let parsed =
            catch_unwind(AssertUnwindSafe(|| json.parse::<tokenizers::Tokenizer>().map_err(|e| e.to_string())))
                .map_err(|_| "the tokenizers library panicked while loading it".to_string())??;
        let mut inner = parsed;
        add_config_tokens(&mut inner, config, &special_tokens);
        if let Some(split) = config.and_then(|c| c.get("split_special_tokens")).and_then(Json::as_bool) {
            inner.set_encode_special_tokens(split);
        }
        let bos_id = special_tokens.bos_token().and_then(|bos| inner.token_to_id(bos));
        Ok(Self { inner, special_tokens, bos_id })
    }

    /// Encodes `text`. Special-token strings in the text become their special tokens (as in
    /// transformers, unless the config sets `split_special_tokens`). The post-processor is not
    /// run, so nothing is added; with `add_bos`, BOS is put first unless the text already
    /// begins with it, so a rendered chat template (which writes its own BOS) gets exactly one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_bos
            && let Some(bos) = self.bos_id
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder::new(skip_special_tokens)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.bos_token()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special_tokens.eos_token()
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token().and_then(|eos| self.token_to_id(eos))
    }

    /// The vocabulary size including added tokens (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The named special tokens, as the chat template sees them.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Adds the tokens transformers adds at load time: entries of `added_tokens_decoder` that
/// `tokenizer.json` lacks (in id order), then named special tokens that are still missing.
fn add_config_tokens(inner: &mut tokenizers::Tokenizer, config: Option<&Json>, special_tokens: &SpecialTokens) {
    let mut decoder: BTreeMap<u64, &Json> = BTreeMap::new();
    if let Some(Json::Object(map)) = config.and_then(|c| c.get("added_tokens_decoder")) {
        for (id, entry) in map {
            if let Ok(id) = id.parse::<u64>() {
                decoder.insert(id, entry);
            }
        }
    }
    for (id, entry) in decoder {
        let Some(content) = token_content(entry) else {
            continue;
        };
        if inner.token_to_id(content).is_some() {
            continue;
        }
        let flag = |name: &str, default: bool| entry.get(name).and_then(Json::as_bool).unwrap_or(default);
        let special = flag("special", false);
        let token = tokenizers::AddedToken::from(content, special)
            .single_word(flag("single_word", false))
            .lstrip(flag("lstrip", false))
            .rstrip(flag("rstrip", false))
            .normalized(flag("normalized", !special));
        if special {
            inner.add_special_tokens(&[token]);
        } else {
            inner.add_tokens(&[token]);
        }
        let got = inner.token_to_id(content);
        if got.map(u64::from) != Some(id) {
            tracing::warn!(
                token = content,
                expected = id,
                got = ?got,
                "added token from tokenizer_config.json got a different id"
            );
        }
    }
    for (_, content) in special_tokens.iter() {
        if inner.token_to_id(content).is_none() {
            inner.add_special_tokens(&[tokenizers::AddedToken::from(content, true)]);
        }
    }
}

/// Incremental detokenizer: push ids one at a time and get back the text that has become
/// final.
///
/// Decoding token by token is wrong in two ways: byte-level BPE can split one UTF-8 character
/// across tokens, and some decoders treat the start of a sequence specially (dropping a leading
/// space). So each step decodes a short window of earlier ids plus the new ones, and emits the
/// difference, holding text back while it ends in an incomplete character (U+FFFD).
///
/// The decoder owns only its window, not the tokenizer, so a long-lived request can keep one
/// beside a shared tokenizer; every call takes the tokenizer it decodes with.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    skip_special_tokens: bool,
    /// The window: `ids[..read]` is already emitted (kept as decoding context),
    /// `ids[read..]` is pending.
    ids: Vec<u32>,
    read: usize,
}

impl StreamDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ids: Vec::new(), read: 0 }
    }

    /// Adds one id; returns the newly final text (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = self.decode(tokenizer, &self.ids[..self.read])?;
        let full = self.decode(tokenizer, &self.ids)?;
        if full.len() <= prefix.len() || full.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        // Decoders that clean up text can rewrite the context; then nothing can be taken back,
        // and the new text is whatever lies past the emitted length on a character boundary.
        let Some(new) = full.strip_prefix(prefix.as_str()).or_else(|| full.get(prefix.len()..)) else {
            return Ok(String::new());
        };
        let new = new.to_string();
        // The ids just emitted become the context for the next step.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(new)
    }

    /// Returns whatever is still held back (an incomplete character comes out as U+FFFD) and
    /// resets the decoder.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        let prefix = self.decode(tokenizer, &self.ids[..self.read])?;
        let full = self.decode(tokenizer, &self.ids)?;
        self.ids.clear();
        self.read = 0;
        Ok(match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => full.get(prefix.len()..).unwrap_or_default().to_string(),
        })
    }

    fn decode(&self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        tokenizer.decode(ids, self.skip_special_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llama4_tokenizer")
    }

    fn golden() -> Json {
        let text = include_str!("../tests/data/llama4_chat_golden.json");
        serde_json::from_str(text).expect("parse")
    }

    fn ids(value: &Json) -> Vec<u32> {
        value
            .as_array()
            .expect("golden field")
            .iter()
            .map(|v| u32::try_from(v.as_u64().expect("golden field")).expect("id fits u32"))
            .collect()
    }

    #[test]
    fn tokenizer_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<StreamDecoder>();
    }

    #[test]
    fn loads_fixture_with_special_tokens() {
        let tok = Tokenizer::from_dir(&fixture_dir()).expect("load");
        assert_eq!(tok.bos_token(), Some("<|begin_of_text|>"));
        assert_eq!(tok.eos_token(), Some("<|eot|>"));
        assert_eq!(tok.bos_id(), tok.token_to_id("<|begin_of_text|>"));
        assert_eq!(tok.eos_id(), tok.token_to_id("<|eot|>"));
        assert_eq!(tok.special_tokens().get("pad_token"), Some("<|finetune_right_pad|>"));
        // transformers' len(tokenizer) for this fixture.
        assert_eq!(tok.vocab_size(), 445);
        let bos = tok.bos_id().expect("token in vocabulary");
        assert_eq!(tok.id_to_token(bos).as_deref(), Some("<|begin_of_text|>"));
    }

    #[test]
    fn encode_matches_transformers() {
        let tok = Tokenizer::from_dir(&fixture_dir()).expect("load");
        let golden = golden();
        for case in golden["encode"].as_array().expect("golden field") {
            let text = case["text"].as_str().expect("golden field");
            let expected = ids(&case["ids"]);
            let plain = ids(&case["ids_no_special"]);
            assert_eq!(tok.encode(text, false).expect("tokenizer call"), plain, "{text:?}");
            let with_bos = tok.encode(text, true).expect("tokenizer call");
            if text.starts_with("<|begin_of_text|>") {
                // transformers prepends a second BOS here; herd never does.
                assert_eq!(with_bos, expected[1..], "{text:?}");
            } else {
                assert_eq!(with_bos, expected, "{text:?}");
            }
        }
    }

    #[test]
    fn decode_matches_transformers() {
        let tok = Tokenizer::from_dir(&fixture_dir()).expect("load");
        for case in golden()["decode"].as_array().expect("golden field") {
            let ids = ids(&case["ids"]);
            assert_eq!(tok.decode(&ids, true).expect("tokenizer call"), case["skip"].as_str().expect("golden field"));
            assert_eq!(tok.decode(&ids, false).expect("tokenizer call"), case["keep"].as_str().expect("golden field"));
        }
    }

    #[test]
    fn chat_ids_match_transformers() {
        // apply_chat_template(tokenize=True) encodes the rendered text without special tokens.
        let tok = Tokenizer::from_dir(&fixture_dir()).expect("load");
        for case in golden()["chat"].as_array().expect("golden field") {
            let text = case["text"].as_str().expect("golden field");
            let expected = ids(&case["ids"]);
            assert_eq!(tok.encode(text, false).expect("tokenizer call"), expected, "{}", case["name"]);
            assert_eq!(tok.encode(text, true).expect("tokenizer call"), expected, "{}", case["name"]);
        }
    }

    #[test]
    fn stream_decoder_reassembles_split_characters() {
        let tok = Tokenizer::from_dir(&fixture_dir()).expect("load");
        let text = "Température à Paris: 22°C 東京 🙂🚀 👩‍👩‍👧<|eot|> done";
        let ids = tok.encode(text, true).expect("tokenizer call");
        for skip in [false, true] {
            let mut stream = tok.stream_decoder(skip);
            let mut out = String::new();
            for &id in &ids {
                let piece = stream.push(&tok, id).expect("tokenizer call");
                assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
                out.push_str(&piece);
            }
            out.push_str(&stream.flush(&tok).expect("tokenizer call"));
            assert_eq!(out, tok.decode(&ids, skip).expect("tokenizer call"));
        }
    }

    #[test]
    fn stream_decoder_flushes_incomplete_character() {
        let tok = Tokenizer::from_dir(&fixture_dir()).expect("load");
        // One byte-level token per byte of "東": three pieces of one character.
        let bytes: Vec<u32> =
            ["æ", "Ŀ", "±"].iter().map(|t| tok.token_to_id(t).expect("token in vocabulary")).collect();
        let mut stream = tok.stream_decoder(false);
        assert_eq!(stream.push(&tok, bytes[0]).expect("tokenizer call"), "");
        assert_eq!(stream.push(&tok, bytes[1]).expect("tokenizer call"), "");
        assert_eq!(stream.flush(&tok).expect("tokenizer call"), "\u{FFFD}");
        assert_eq!(stream.push(&tok, bytes[0]).expect("tokenizer call"), "");
        assert_eq!(stream.push(&tok, bytes[1]).expect("tokenizer call"), "");
        assert_eq!(stream.push(&tok, bytes[2]).expect("tokenizer call"), "東");
        assert_eq!(stream.flush(&tok).expect("tokenizer call"), "");
    }

    #[test]
    fn missing_tokenizer_names_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Tokenizer::from_dir(dir.path()).expect_err("should fail");
        assert!(matches!(err, TokenizerError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn malformed_tokenizer_is_a_parse_error() {
        let cases = [
            "not json",
            "{}",
            r#"{"version":"1.0","model":{"type":"NoSuchModel"}}"#,
            r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
                "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,
                "model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]}}"#,
        ];
        for json in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join(TOKENIZER_FILE), json).expect("fixture file");
            let err = Tokenizer::from_dir(dir.path()).expect_err("should fail");
            let TokenizerError::Parse { path, message } = &err else {
                panic!("expected a parse error for {json:?}, got {err}");
            };
            assert!(path.ends_with(TOKENIZER_FILE));
            assert!(!message.is_empty());
            assert!(err.to_string().contains("tokenizer.json"), "{err}");
        }
    }

    #[test]
    fn bad_config_is_a_parse_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(fixture_dir().join(TOKENIZER_FILE), dir.path().join(TOKENIZER_FILE)).expect("copy fixture");
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), "{").expect("fixture file");
        let err = Tokenizer::from_dir(dir.path()).expect_err("should fail");
        assert!(err.to_string().contains(TOKENIZER_CONFIG_FILE), "{err}");
    }

    #[test]
    fn special_tokens_from_config_shapes() {
        let config = json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": true},
            "eos_token": "</s>",
            "pad_token": null,
            "add_bos_token": true,
            "image_token": "<|image|>",
            "extra_special_tokens": {"audio_token": "<|audio|>"},
        });
        let tokens = SpecialTokens::from_tokenizer_config(&config);
        let pairs: Vec<_> = tokens.iter().collect();
        assert_eq!(
            pairs,
            [("bos_token", "<s>"), ("eos_token", "</s>"), ("image_token", "<|image|>"), ("audio_token", "<|audio|>"),]
        );
    }

    #[test]
    fn config_tokens_are_added_and_legacy_map_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(fixture_dir().join(TOKENIZER_FILE), dir.path().join(TOKENIZER_FILE)).expect("copy fixture");
        let config = json!({
            "bos_token": "<|begin_of_text|>",
            "added_tokens_decoder": {
                "445": {"content": "<|new_special|>", "special": true},
                "446": {"content": "plainword", "special": false},
            },
            "split_special_tokens": false,
        });
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), config.to_string()).expect("fixture file");
        let tok = Tokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.token_to_id("<|new_special|>"), Some(445));
        assert_eq!(tok.token_to_id("plainword"), Some(446));
        assert_eq!(tok.encode("x<|new_special|>", false).expect("tokenizer call")[1], 445);
        assert_eq!(tok.decode(&[445], true).expect("tokenizer call"), "");

        // Without added_tokens_decoder the legacy map is read, and its tokens win.
        let config = json!({"eos_token": "<|end_of_text|>"});
        std::fs::write(dir.path().join(TOKENIZER_CONFIG_FILE), config.to_string()).expect("fixture file");
        let map = json!({"eos_token": {"content": "<|eot|>"}, "unk_token": "<|unk_new|>"});
        std::fs::write(dir.path().join(SPECIAL_TOKENS_MAP_FILE), map.to_string()).expect("fixture file");
        let tok = Tokenizer::from_dir(dir.path()).expect("load");
        assert_eq!(tok.eos_token(), Some("<|eot|>"));
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.encode("hi", true).expect("tokenizer call"), tok.encode("hi", false).expect("tokenizer call"));
        // A named special token missing from the vocabulary is added, as transformers does.
        assert_eq!(tok.token_to_id("<|unk_new|>"), Some(445));
    }

    #[test]
    fn split_special_tokens_encodes_them_as_text() {
        let json = std::fs::read_to_string(fixture_dir().join(TOKENIZER_FILE)).expect("fixture file");
        let config = json!({"bos_token": "<|begin_of_text|>", "split_special_tokens": true});
        let tok = Tokenizer::from_json_str(&json, Some(&config)).expect("load");
        let eot = tok.token_to_id("<|eot|>").expect("token in vocabulary");
        assert!(!tok.encode("<|eot|>", false).expect("tokenizer call").contains(&eot));
    }
}
