//! Random-weight Llama 4 checkpoints in the Hugging Face layout (`herd synth`).
//!
//! [`write_checkpoint`] fills a directory with everything `transformers` and herd load for a
//! text-only Llama 4 (`Llama4ForCausalLM`):
//! `config.json`, `generation_config.json` ([`config`]), `model.safetensors` ([`weights`],
//! streamed by [`writer`]), `tokenizer.json` ([`tokenizer`]), `tokenizer_config.json` (with the
//! Llama 4 chat template), `special_tokens_map.json` and a `README.md`.
//!
//! The shapes come from a [`Preset`] ([`SynthConfig`] holds every number); the weights come
//! from a seeded ChaCha8 stream per tensor, so one seed always gives byte-identical files.
//! Each file is written under a temporary name and renamed into place when complete, so a
//! crash never leaves a truncated `model.safetensors` behind.

pub mod config;
pub mod tokenizer;
pub mod weights;
pub mod writer;

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::model::quant_config::{self, WeightQuant};
pub use tokenizer::{SPECIAL_TOKENS, SpecialIds};
pub use weights::{fp8_expert_specs, parameter_count, tensor_specs};
pub use writer::{Init, TensorDtype, TensorSpec};

/// The Llama 4 chat template, verbatim from transformers' `processing_llama4.py`.
pub const LLAMA4_CHAT_TEMPLATE: &str = include_str!("llama4_chat_template.jinja");

/// Errors from writing a synthetic checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset `{0}` (expected one of: tiny, scout-mini, maverick-mini)")]
    UnknownPreset(String),
    #[error("unknown dtype `{0}` (expected bf16 or f32)")]
    UnknownDtype(String),
    #[error("unknown format `{0}` (expected hf or fp8)")]
    UnknownFormat(String),
    #[error("invalid synthetic config: {0}")]
    InvalidConfig(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serializing {what}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("building the tokenizer: {0}")]
    Tokenizer(String),
}

impl SynthError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// A named model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// A very small Maverick-like model (4 layers, hidden 64, 8 experts) for fast tests.
    Tiny,
    /// Scout-shaped: MoE on every layer (16 experts), QK-norm, llama3 RoPE scaling.
    ScoutMini,
    /// Maverick-shaped (~0.72 B parameters): dense/MoE interleaved, 128 experts, no QK-norm.
    MaverickMini,
}

impl Preset {
    /// Every preset, smallest first.
    pub fn all() -> [Preset; 3] {
        [Preset::Tiny, Preset::ScoutMini, Preset::MaverickMini]
    }

    /// The CLI name (`tiny`, `scout-mini`, `maverick-mini`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::ScoutMini => "scout-mini",
            Preset::MaverickMini => "maverick-mini",
        }
    }

    /// The full shape and hyper-parameters of this preset.
    pub fn config(self) -> SynthConfig {
        match self {
            Preset::Tiny => SynthConfig {
                vocab_size: 512,
                hidden_size: 64,
                intermediate_size: 32,
                intermediate_size_mlp: 64,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                num_local_experts: 8,
                num_experts_per_tok: 1,
                interleave_moe_layer_step: 2,
                no_rope_layer_interval: 4,
                use_qk_norm: false,
                rope_theta: 500_000.0,
                rope_scaling: None,
                // Small chunk and floor scale so that prompts of a few dozen tokens already
                // cross a chunk boundary and switch on attention temperature tuning.
                attention_chunk_size: 32,
                attn_temperature_tuning: true,
                floor_scale: 32,
                attn_scale: 0.1,
                rms_norm_eps: 1e-5,
                max_position_embeddings: 4096,
            },
            Preset::ScoutMini => SynthConfig {
                intermediate_size: 768,
                intermediate_size_mlp: 1536,
                num_local_experts: 16,
                interleave_moe_layer_step: 1,
                use_qk_norm: true,
                rope_scaling: Some(Llama3RopeScaling {
                    factor: 16.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 1.0,
                    original_max_position_embeddings: 8192,
                }),
                ..Preset::MaverickMini.config()
            },
            Preset::MaverickMini => SynthConfig {
                vocab_size: 32768,
                hidden_size: 1024,
                intermediate_size: 256,
                intermediate_size_mlp: 512,
                num_hidden_layers: 12,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                head_dim: 128,
                num_local_experts: 128,
                num_experts_per_tok: 1,
                interleave_moe_layer_step: 2,
                no_rope_layer_interval: 4,
                use_qk_norm: false,
                rope_theta: 500_000.0,
                rope_scaling: None,
                attention_chunk_size: 8192,
                attn_temperature_tuning: true,
                floor_scale: 8192,
                attn_scale: 0.1,
                rms_norm_eps: 1e-5,
                max_position_embeddings: 262_144,
            },
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Preset::all().into_iter().find(|p| p.name() == s).ok_or_else(|| SynthError::UnknownPreset(s.to_string()))
    }
}

/// The dtype of the floating-point weights in `model.safetensors`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SynthDtype {
    #[default]
    Bf16,
    F32,
}

impl SynthDtype {
    /// The CLI name (`bf16`, `f32`).
    pub fn name(self) -> &'static str {
        match self {
            SynthDtype::Bf16 => "bf16",
            SynthDtype::F32 => "f32",
        }
    }

    /// The name transformers uses in `config.json` (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            SynthDtype::Bf16 => "bfloat16",
            SynthDtype::F32 => "float32",
        }
    }

    /// The storage dtype of the tensors.
    pub fn tensor_dtype(self) -> TensorDtype {
        match self {
            SynthDtype::Bf16 => TensorDtype::Bf16,
            SynthDtype::F32 => TensorDtype::F32,
        }
    }
}

impl fmt::Display for SynthDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SynthDtype {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bf16" | "bfloat16" => Ok(SynthDtype::Bf16),
            "f32" | "float32" => Ok(SynthDtype::F32),
            _ => Err(SynthError::UnknownDtype(s.to_string())),
        }
    }
}

/// How the routed experts are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SynthFormat {
    /// HF's fused `experts.gate_up_proj` / `experts.down_proj` in the weight dtype.
    #[default]
    Hf,
    /// Meta's FP8 release: per-expert F8_E4M3 nn.Linear weights with per-channel f32 scales
    /// and a compressed-tensors `quantization_config`; everything else in the weight dtype.
    Fp8,
}

impl SynthFormat {
    /// The CLI name (`hf`, `fp8`).
    pub fn name(self) -> &'static str {
        match self {
            SynthFormat::Hf => "hf",
            SynthFormat::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for SynthFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SynthFormat {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hf" => Ok(SynthFormat::Hf),
            "fp8" => Ok(SynthFormat::Fp8),
            _ => Err(SynthError::UnknownFormat(s.to_string())),
        }
    }
}

/// Llama 3-style RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Every number that shapes a synthetic checkpoint; the fields mirror `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Routed-expert and shared-expert width.
    pub intermediate_size: usize,
    /// Dense-FFN width (layers that are not MoE).
    pub intermediate_size_mlp: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    /// Layer `i` is MoE iff `(i + 1) % interleave_moe_layer_step == 0`.
    pub interleave_moe_layer_step: usize,
    /// Layer `i` is NoPE iff `(i + 1) % no_rope_layer_interval == 0`.
    pub no_rope_layer_interval: usize,
    pub use_qk_norm: bool,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub attention_chunk_size: usize,
    pub attn_temperature_tuning: bool,
    pub floor_scale: usize,
    pub attn_scale: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
}

impl SynthConfig {
    /// Whether layer `layer` has a MoE feed-forward (otherwise a dense SwiGLU).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.interleave_moe_layer_step)
    }

    /// Indices of the MoE layers (`moe_layers` in `config.json`).
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers).filter(|&l| self.is_moe_layer(l)).collect()
    }

    /// HF's `no_rope_layers`: 1 = the layer uses RoPE, 0 = NoPE.
    pub fn no_rope_layers(&self) -> Vec<u8> {
        (0..self.num_hidden_layers).map(|l| u8::from(!(l + 1).is_multiple_of(self.no_rope_layer_interval))).collect()
    }

    /// The ids of the special tokens, which sit at the top of the vocabulary.
    pub fn special_ids(&self) -> SpecialIds {
        SpecialIds::for_vocab(self.vocab_size)
    }

    /// Checks the invariants the writers rely on.
    pub fn validate(&self) -> Result<(), SynthError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("intermediate_size_mlp", self.intermediate_size_mlp),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("interleave_moe_layer_step", self.interleave_moe_layer_step),
            ("no_rope_layer_interval", self.no_rope_layer_interval),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(SynthError::InvalidConfig(format!("{name} must be > 0")));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(SynthError::InvalidConfig(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(SynthError::InvalidConfig(format!("head_dim {} must be even for RoPE", self.head_dim)));
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return Err(SynthError::InvalidConfig(format!(
                "num_experts_per_tok {} exceeds num_local_experts {}",
                self.num_experts_per_tok, self.num_local_experts
            )));
        }
        let min_vocab = 256 + SPECIAL_TOKENS.len();
        if self.vocab_size < min_vocab {
            return Err(SynthError::InvalidConfig(format!(
                "vocab_size {} is below {min_vocab} (256 byte tokens + {} special tokens)",
                self.vocab_size,
                SPECIAL_TOKENS.len()
            )));
        }
        Ok(())
    }
}

/// What to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthOptions {
    pub preset: Preset,
    /// Seed of every random weight; the same seed gives byte-identical files.
    pub seed: u64,
    pub dtype: SynthDtype,
    pub format: SynthFormat,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthSummary {
    /// Number of parameters (elements of every tensor).
    pub parameters: u64,
    /// Total size of all files written, in bytes.
    pub bytes: u64,
    /// Size of `model.safetensors` alone, in bytes.
    pub weight_bytes: u64,
    /// Number of tensors in `model.safetensors`.
    pub tensors: usize,
    /// The files written, in the order they were written.
    pub files: Vec<PathBuf>,
}

/// Writes a random-weight checkpoint for `opts` into `out` (created if missing).
///
/// Existing files with the same names are replaced; other files in `out` are left alone
/// (refusing a non-empty directory is the caller's policy). An old `config.json` is removed
/// first and the new one is written last, so the directory only looks like a checkpoint
/// once every file is complete.
pub fn write_checkpoint(opts: &SynthOptions, out: &Path) -> Result<SynthSummary, SynthError> {
    let cfg = opts.preset.config();
    cfg.validate()?;
    fs::create_dir_all(out).map_err(|e| SynthError::io(format!("creating {}", out.display()), e))?;
    // Until the new config.json lands last, the directory must not look complete.
    let config_path = out.join("config.json");
    match fs::remove_file(&config_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SynthError::io(format!("removing the old {}", config_path.display()), e));
        }
        _ => {}
    }

    let mut outputs = Outputs::new(out);
    let tokenizer_json = tokenizer::build_tokenizer_json(&cfg)?;
    outputs.put("tokenizer.json", tokenizer_json.as_bytes())?;
    outputs.put_json("tokenizer_config.json", &config::tokenizer_config_json(&cfg))?;
    outputs.put_json("special_tokens_map.json", &config::special_tokens_map_json())?;
    outputs.put_json("generation_config.json", &config::generation_config_json(&cfg))?;
    outputs.put("README.md", readme(opts, &cfg).as_bytes())?;

    let specs = match opts.format {
        SynthFormat::Hf => tensor_specs(&cfg, opts.dtype.tensor_dtype()),
        SynthFormat::Fp8 => fp8_expert_specs(&cfg, opts.dtype.tensor_dtype()),
    };
    let metadata = [
        ("format", "pt".to_string()),
        ("herd_synth_preset", opts.preset.name().to_string()),
        ("herd_synth_seed", opts.seed.to_string()),
    ];
    let weights_path = out.join("model.safetensors");
    let weight_bytes = writer::write_safetensors(&weights_path, &specs, opts.seed, &metadata)?;
    outputs.bytes += weight_bytes;
    outputs.files.push(weights_path);

    // config.json last: a directory with a config.json is a complete checkpoint.
    let mut config_json = config::config_json(&cfg, opts.dtype);
    if opts.format == SynthFormat::Fp8 {
        config_json["quantization_config"] =
            quant_config::config_block(WeightQuant::Fp8Channel, quant_config::QuantScope::Experts);
    }
    outputs.put_json("config.json", &config_json)?;

    Ok(SynthSummary {
        parameters: parameter_count(&cfg),
        bytes: outputs.bytes,
        weight_bytes,
        tensors: specs.len(),
        files: outputs.files,
    })
}

/// The files written so far into one output directory.
struct Outputs<'a> {
    dir: &'a Path,
    files: Vec<PathBuf>,
    bytes: u64,
}

impl<'a> Outputs<'a> {
    fn new(dir: &'a Path) -> Self {
        Self { dir, files: Vec::new(), bytes: 0 }
    }

    fn put(&mut self, name: &str, contents: &[u8]) -> Result<(), SynthError> {
        let path = self.dir.join(name);
        write_file_atomically(&path, contents)?;
        self.bytes += contents.len() as u64;
        self.files.push(path);
        Ok(())
    }

    /// Writes `value` as pretty JSON (two-space indent, trailing newline), as HF does.
    fn put_json(&mut self, name: &'static str, value: &serde_json::Value) -> Result<(), SynthError> {
        let mut text = serde_json::to_string_pretty(value).map_err(|source| SynthError::Json { what: name, source })?;
        text.push('\n');
        self.put(name, text.as_bytes())
    }
}

/// The temporary name a file is written under before it is renamed to `path`.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `contents` to `path` through a temporary file and a rename.
fn write_file_atomically(path: &Path, contents: &[u8]) -> Result<(), SynthError> {
    let tmp = partial_path(path);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        SynthError::io(format!("writing {}", path.display()), e)
    })
}

fn readme(opts: &SynthOptions, cfg: &SynthConfig) -> String {
    format!(
        "# Synthetic Llama 4 checkpoint ({preset})\n\n\
         Random weights written by `herd synth --preset {preset} --seed {seed} --dtype {dtype} --format {format}`.\n\
         This is not a trained model: its output is gibberish. It exists so that tests and\n\
         benchmarks need no download.\n\n\
         - architecture: `Llama4ForCausalLM` (`llama4_text`), {layers} layers, hidden {hidden}\n\
         - {params} parameters, {experts} routed experts, MoE layers {moe:?}\n\
         - tokenizer: byte-level BPE trained on a small built-in English corpus, {vocab} ids,\n  \
           Llama 4 special tokens at the top of the vocabulary\n",
        preset = opts.preset,
        seed = opts.seed,
        dtype = opts.dtype,
        format = opts.format,
        layers = cfg.num_hidden_layers,
        hidden = cfg.hidden_size,
        params = parameter_count(cfg),
        experts = cfg.num_local_experts,
        moe = cfg.moe_layers(),
        vocab = cfg.vocab_size,
    )
}

#[cfg(test)]
mod tests;
