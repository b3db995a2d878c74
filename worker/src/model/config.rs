//! `config.json` and `generation_config.json` of Llama 4 checkpoints, as published.
//!
//! Two architectures carry the text model: `Llama4ForConditionalGeneration` (model_type
//! `llama4`, text settings nested under `text_config`) and `Llama4ForCausalLM` (model_type
//! `llama4_text`, flat). Fields take transformers' defaults when absent, and every field that
//! changes inference is resolved here into a per-layer plan ([`LayerSpec`]) so the model code
//! never re-derives them. Both config layouts are accepted: transformers 5's
//! `rope_parameters` and the Hub files' `rope_theta` + `rope_scaling`.

use herd_kernels::cpu::rope::RopeScaling;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: field `{field}`: {source}")]
    Field { path: PathBuf, field: String, source: serde_json::Error },
    #[error(
        "{path}: not a Llama 4 checkpoint (model_type {model_type:?}, architectures {architectures:?}); herd runs Llama4ForConditionalGeneration and Llama4ForCausalLM"
    )]
    NotLlama4 { path: PathBuf, model_type: Option<String>, architectures: Vec<String> },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: unsupported setting: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// Which Hugging Face class the checkpoint was saved from; decides tensor name prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Text + vision; text weights under `language_model.`.
    ConditionalGeneration,
    /// Text only.
    CausalLm,
}

/// The attention mask of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    /// `full_attention`: causal over the whole history.
    Full,
    /// `chunked_attention`: causal within `attention_chunk_size`-aligned blocks.
    Chunked,
}

/// Everything that differs between decoder layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    /// RoPE layer (true) or NoPE layer (false); from `no_rope_layers` where 1 means RoPE.
    pub uses_rope: bool,
    pub attention: LayerAttention,
    /// Mixture-of-experts feed-forward (true) or dense SwiGLU of width `intermediate_size_mlp`.
    pub moe: bool,
    /// Weightless RMS norm of q and k after RoPE (`use_qk_norm` and a RoPE layer).
    pub qk_norm: bool,
    /// Position-dependent query scaling (`attn_temperature_tuning` and a NoPE layer).
    pub temperature_tuning: bool,
}

/// The text model's settings, fully resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of each routed expert and of the shared expert.
    pub intermediate_size: usize,
    /// Width of dense feed-forward layers.
    pub intermediate_size_mlp: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    /// `None` means chunked layers see the whole history, like full layers.
    pub attention_chunk_size: Option<usize>,
    pub floor_scale: f32,
    pub attn_scale: f32,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub max_position_embeddings: usize,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSpec>,
}

impl TextConfig {
    /// The shape of this model's KV cache: every layer's key rows, and the chunk of each
    /// chunked-attention layer.
    pub fn kv_layout(&self) -> crate::kv_cache::KvLayout {
        let chunks = self
            .layers
            .iter()
            .map(|l| match (l.attention, self.attention_chunk_size) {
                (LayerAttention::Chunked, Some(c)) => Some(c),
                _ => None,
            })
            .collect();
        crate::kv_cache::KvLayout { kv_heads: self.num_key_value_heads, head_dim: self.head_dim, chunks }
    }

    /// The decoder layers whose feed-forward is a MoE block, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers).filter(|&l| self.layers[l].moe).collect()
    }
}

/// A whole checkpoint's config.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub text: TextConfig,
    /// `<|patch|>` id whose rows image features replace (multimodal checkpoints).
    pub image_token_id: Option<u32>,
}

impl ModelConfig {
    /// Read `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        Self::from_json_str(&text, &path)
    }

    /// Parse config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let root: Value =
            serde_json::from_str(text).map_err(|source| ConfigError::Json { path: path.to_path_buf(), source })?;
        let model_type = root.get("model_type").and_then(Value::as_str).map(str::to_owned);
        let architectures: Vec<String> = root
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let not_llama4 = || ConfigError::NotLlama4 {
            path: path.to_path_buf(),
            model_type: model_type.clone(),
            architectures: architectures.clone(),
        };
        let (architecture, text_value) = match model_type.as_deref() {
            Some("llama4") => {
                let text = root.get("text_config").cloned().unwrap_or(Value::Object(Default::default()));
                (Architecture::ConditionalGeneration, text)
            }
            Some("llama4_text") => (Architecture::CausalLm, root.clone()),
            _ => return Err(not_llama4()),
        };
        for arch in &architectures {
            if !matches!(arch.as_str(), "Llama4ForConditionalGeneration" | "Llama4ForCausalLM" | "Llama4TextModel") {
                return Err(not_llama4());
            }
        }
        let text = parse_text_config(text_value, &root, path)?;
        let image_token_id = match architecture {
            Architecture::ConditionalGeneration => {
                Some(root.get("image_token_index").and_then(Value::as_u64).unwrap_or(200092) as u32)
            }
            Architecture::CausalLm => None,
        };
        Ok(Self { architecture, text, image_token_id })
    }
}

/// The raw text config with transformers' `Llama4TextConfig` defaults.
#[derive(Deserialize)]
#[serde(default)]
struct RawTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    intermediate_size_mlp: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: String,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    tie_word_embeddings: Option<bool>,
    num_experts_per_tok: usize,
    num_local_experts: usize,
    moe_layers: Option<Vec<usize>>,
    interleave_moe_layer_step: usize,
    use_qk_norm: bool,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    no_rope_layers: Option<Vec<i64>>,
    no_rope_layer_interval: usize,
    attention_chunk_size: Option<usize>,
    layer_types: Option<Vec<String>>,
    attn_temperature_tuning: Value,
    floor_scale: f64,
    attn_scale: f64,
    attention_bias: bool,
    quantization_config: Option<Value>,
}

impl Default for RawTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 202048,
            hidden_size: 5120,
            intermediate_size: 8192,
            intermediate_size_mlp: 16384,
            num_hidden_layers: 48,
            num_attention_heads: 40,
            num_key_value_heads: Some(8),
            head_dim: Some(128),
            hidden_act: "silu".into(),
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-5,
            bos_token_id: Some(1),
            eos_token_id: Some(OneOrMany::One(2)),
            pad_token_id: None,
            tie_word_embeddings: None,
            num_experts_per_tok: 1,
            num_local_experts: 16,
            moe_layers: None,
            interleave_moe_layer_step: 1,
            use_qk_norm: true,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            no_rope_layers: None,
            no_rope_layer_interval: 4,
            attention_chunk_size: Some(8192),
            layer_types: None,
            attn_temperature_tuning: Value::Bool(true),
            floor_scale: 8192.0,
            attn_scale: 0.1,
            attention_bias: false,
            quantization_config: None,
        }
    }
}

#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

fn parse_text_config(value: Value, root: &Value, path: &Path) -> Result<TextConfig, ConfigError> {
    let raw: RawTextConfig = deserialize_fields(value, path)?;
    let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
    let unsupported = |message: String| ConfigError::Unsupported { path: path.to_path_buf(), message };

    if let Some(q) = raw.quantization_config.as_ref().or_else(|| root.get("quantization_config")) {
        // Which tensors are quantized is read from the checkpoint; here only the scheme is checked.
        super::quant_config::parse(q).map_err(unsupported)?;
    }
    if raw.hidden_act != "silu" {
        return Err(unsupported(format!("hidden_act {:?} (Llama 4 uses silu)", raw.hidden_act)));
    }
    if raw.attention_bias {
        return Err(unsupported("attention_bias true (Llama 4 has no attention biases)".into()));
    }
    let layers_n = raw.num_hidden_layers;
    let heads = raw.num_attention_heads;
    let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
    if layers_n == 0 || raw.hidden_size == 0 || heads == 0 || kv_heads == 0 || raw.vocab_size == 0 {
        return Err(invalid(
            "num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads and vocab_size must be positive"
                .into(),
        ));
    }
    if !heads.is_multiple_of(kv_heads) {
        return Err(invalid(format!(
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )));
    }
    let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / heads);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(format!("head_dim {head_dim} must be positive and even")));
    }
    if raw.num_local_experts == 0 || raw.num_experts_per_tok == 0 || raw.num_experts_per_tok > raw.num_local_experts {
        return Err(invalid(format!(
            "num_experts_per_tok {} must be between 1 and num_local_experts {}",
            raw.num_experts_per_tok, raw.num_local_experts
        )));
    }

    let (rope_theta, rope_scaling) = parse_rope(&raw, path)?;

    // no_rope_layers: 1 = the layer uses RoPE. transformers falls back to the interval rule
    // when the list is absent or empty; a longer list is allowed ("at least" one per layer).
    let uses_rope: Vec<bool> = match raw.no_rope_layers.as_deref() {
        Some(list) if !list.is_empty() => {
            if list.len() < layers_n {
                return Err(invalid(format!("no_rope_layers has {} entries for {layers_n} layers", list.len())));
            }
            list[..layers_n].iter().map(|&v| v != 0).collect()
        }
        _ => {
            if raw.no_rope_layer_interval == 0 {
                return Err(invalid("no_rope_layer_interval must be positive".into()));
            }
            (0..layers_n).map(|i| (i + 1) % raw.no_rope_layer_interval != 0).collect()
        }
    };
    let moe_layers: Vec<usize> = match raw.moe_layers {
        Some(list) => list,
        None => {
            let step = raw.interleave_moe_layer_step;
            if step == 0 {
                return Err(invalid("interleave_moe_layer_step must be positive".into()));
            }
            (step - 1..layers_n).step_by(step).collect()
        }
    };
    if let Some(&bad) = moe_layers.iter().find(|&&l| l >= layers_n) {
        return Err(invalid(format!("moe_layers names layer {bad}, but there are {layers_n} layers")));
    }
    let attention: Vec<LayerAttention> = match raw.layer_types {
        Some(types) => {
            if types.len() < layers_n {
                return Err(invalid(format!("layer_types has {} entries for {layers_n} layers", types.len())));
            }
            types[..layers_n]
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(LayerAttention::Full),
                    "chunked_attention" => Ok(LayerAttention::Chunked),
                    other => Err(unsupported(format!("layer type {other:?}"))),
                })
                .collect::<Result<_, _>>()?
        }
        None => uses_rope.iter().map(|&r| if r { LayerAttention::Chunked } else { LayerAttention::Full }).collect(),
    };
    let temperature_tuning = truthy(&raw.attn_temperature_tuning).ok_or_else(|| {
        invalid(format!("attn_temperature_tuning must be a bool or a number, got {}", raw.attn_temperature_tuning))
    })?;
    if raw.attention_chunk_size == Some(0) {
        return Err(invalid("attention_chunk_size must be positive".into()));
    }
    if raw.floor_scale.is_nan() || raw.floor_scale <= 0.0 {
        return Err(invalid(format!("floor_scale must be positive, got {}", raw.floor_scale)));
    }

    let layers = (0..layers_n)
        .map(|i| LayerSpec {
            uses_rope: uses_rope[i],
            attention: attention[i],
            moe: moe_layers.contains(&i),
            qk_norm: raw.use_qk_norm && uses_rope[i],
            temperature_tuning: temperature_tuning && !uses_rope[i],
        })
        .collect();
    // The top-level value wins where transformers reads it from the outer config.
    let tie =
        raw.tie_word_embeddings.or_else(|| root.get("tie_word_embeddings").and_then(Value::as_bool)).unwrap_or(false);
    Ok(TextConfig {
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        intermediate_size_mlp: raw.intermediate_size_mlp,
        num_hidden_layers: layers_n,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: raw.rms_norm_eps as f32,
        rope_theta,
        rope_scaling,
        attention_chunk_size: raw.attention_chunk_size,
        floor_scale: raw.floor_scale as f32,
        attn_scale: raw.attn_scale as f32,
        num_local_experts: raw.num_local_experts,
        num_experts_per_tok: raw.num_experts_per_tok,
        tie_word_embeddings: tie,
        bos_token_id: raw.bos_token_id,
        eos_token_ids: raw.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
        pad_token_id: raw.pad_token_id,
        max_position_embeddings: raw.max_position_embeddings,
        layers,
    })
}

/// Deserialize, reporting which field was wrong (serde's own message for a struct lacks it).
fn deserialize_fields<T: serde::de::DeserializeOwned + Default>(value: Value, path: &Path) -> Result<T, ConfigError> {
    match serde_json::from_value::<T>(value.clone()) {
        Ok(v) => Ok(v),
        Err(whole) => {
            // Find the first field whose value alone fails to deserialize.
            if let Value::Object(map) = &value {
                for (k, v) in map {
                    let mut one = serde_json::Map::new();
                    one.insert(k.clone(), v.clone());
                    if let Err(source) = serde_json::from_value::<T>(Value::Object(one)) {
                        return Err(ConfigError::Field { path: path.to_path_buf(), field: k.clone(), source });
                    }
                }
            }
            Err(ConfigError::Json { path: path.to_path_buf(), source: whole })
        }
    }
}

/// Python truthiness of a JSON bool or number (`attn_temperature_tuning` is `4` in Scout's file).
fn truthy(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => Some(n.as_f64().is_some_and(|x| x != 0.0)),
        Value::Null => Some(false),
        _ => None,
    }
}

fn parse_rope(raw: &RawTextConfig, path: &Path) -> Result<(f32, Option<RopeScaling>), ConfigError> {
    let unsupported = |message: String| ConfigError::Unsupported { path: path.to_path_buf(), message };
    let invalid = |message: String| ConfigError::Invalid { path: path.to_path_buf(), message };
    // transformers 5 writes `rope_parameters` (theta inside); Hub files have `rope_theta` and
    // an optional `rope_scaling`. When both appear, rope_parameters is the newer truth.
    let (theta, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p @ Value::Object(m)), _) => {
            let theta = m.get("rope_theta").and_then(Value::as_f64).or(raw.rope_theta).unwrap_or(500000.0);
            (theta, Some(p.clone()))
        }
        (Some(Value::Null) | None, Some(s @ Value::Object(_))) => (raw.rope_theta.unwrap_or(500000.0), Some(s.clone())),
        (Some(Value::Null) | None, Some(Value::Null) | None) => (raw.rope_theta.unwrap_or(500000.0), None),
        (Some(other), _) | (_, Some(other)) => {
            return Err(invalid(format!("rope settings must be an object, got {other}")));
        }
    };
    if theta.is_nan() || theta <= 0.0 {
        return Err(invalid(format!("rope_theta must be positive, got {theta}")));
    }
    let Some(params) = params else { return Ok((theta as f32, None)) };
    let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f32, ConfigError> {
        params
            .get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .ok_or_else(|| invalid(format!("rope_type {kind:?} needs a numeric `{key}`")))
    };
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => {
            let original = match params.get("original_max_position_embeddings").and_then(Value::as_f64) {
                Some(v) => v as f32,
                None => raw.max_position_embeddings as f32,
            };
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            })
        }
        other => return Err(unsupported(format!("rope_type {other:?} (herd supports default, linear and llama3)"))),
    };
    Ok((theta as f32, scaling))
}

/// `generation_config.json`: stop ids and the checkpoint's default sampling settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub do_sample: Option<bool>,
}

impl GenerationConfig {
    /// Read `DIR/generation_config.json`; an absent file gives the empty config.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Raw {
            bos_token_id: Option<u32>,
            eos_token_id: Option<OneOrMany>,
            pad_token_id: Option<u32>,
            temperature: Option<f32>,
            top_p: Option<f32>,
            top_k: Option<usize>,
            do_sample: Option<bool>,
        }
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let value: Value =
            serde_json::from_str(&text).map_err(|source| ConfigError::Json { path: path.clone(), source })?;
        let raw: Raw = deserialize_fields(value, &path)?;
        Ok(Self {
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default(),
            pad_token_id: raw.pad_token_id,
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            do_sample: raw.do_sample,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json_str(json, Path::new("config.json"))
    }

    const SCOUT_HUB: &str = r#"{
        "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
        "image_token_index": 200092, "tie_word_embeddings": false,
        "text_config": {
            "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
            "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 202048,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "no_rope_layers": [], "interleave_moe_layer_step": 1, "use_qk_norm": true,
            "num_local_experts": 16, "num_experts_per_tok": 1, "attn_temperature_tuning": 4,
            "attention_chunk_size": 8192, "bos_token_id": 200000,
            "eos_token_id": [200001, 200007, 200008], "pad_token_id": 200018, "torch_dtype": "bfloat16"
        }
    }"#;

    #[test]
    fn scout_hub_config_resolves_per_layer_plan() {
        let c = parse(SCOUT_HUB).expect("parse");
        assert_eq!(c.architecture, Architecture::ConditionalGeneration);
        assert_eq!(c.image_token_id, Some(200092));
        let t = &c.text;
        assert_eq!(t.layers.len(), 48);
        for (i, l) in t.layers.iter().enumerate() {
            let nope = (i + 1) % 4 == 0;
            assert_eq!(l.uses_rope, !nope, "layer {i}");
            assert_eq!(l.attention, if nope { LayerAttention::Full } else { LayerAttention::Chunked });
            assert!(l.moe);
            assert_eq!(l.qk_norm, !nope);
            assert_eq!(l.temperature_tuning, nope);
        }
        assert_eq!(t.eos_token_ids, vec![200001, 200007, 200008]);
        assert!(matches!(t.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 16.0));
    }

    #[test]
    fn maverick_v5_layout_with_rope_parameters() {
        let c = parse(
            r#"{"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
                "num_hidden_layers": 6, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "vocab_size": 300, "interleave_moe_layer_step": 2, "use_qk_norm": false,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                "attn_temperature_tuning": false}"#,
        )
        .expect("parse");
        let t = &c.text;
        assert_eq!(t.rope_theta, 10000.0);
        assert_eq!(t.rope_scaling, None);
        let moe: Vec<bool> = t.layers.iter().map(|l| l.moe).collect();
        assert_eq!(moe, [false, true, false, true, false, true]);
        assert!(t.layers.iter().all(|l| !l.qk_norm && !l.temperature_tuning));
    }

    #[test]
    fn explicit_lists_override_the_interval_rules() {
        let c = parse(
            r#"{"model_type": "llama4_text", "num_hidden_layers": 3, "hidden_size": 8, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10,
                "no_rope_layers": [0, 1, 1, 1], "moe_layers": [2],
                "rope_parameters": {"rope_theta": 100.0, "rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}"#,
        )
        .expect("parse");
        let t = &c.text;
        assert_eq!(t.layers.iter().map(|l| l.uses_rope).collect::<Vec<_>>(), [false, true, true]);
        assert_eq!(t.layers.iter().map(|l| l.moe).collect::<Vec<_>>(), [false, false, true]);
        assert_eq!(
            t.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16.0
            })
        );
    }

    #[test]
    fn other_architectures_and_bad_fields_are_clear_errors() {
        let e = parse(r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#).expect_err("llama 3");
        assert!(e.to_string().contains("not a Llama 4 checkpoint"), "{e}");
        let e = parse(r#"{"model_type": "llama4_text", "hidden_size": "big"}"#).expect_err("type");
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = parse(r#"{"model_type": "llama4_text", "rope_scaling": {"rope_type": "yarn", "factor": 2}}"#)
            .expect_err("yarn");
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = parse("{not json").expect_err("json");
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }
}
