//! The Llama 4 model: config, checkpoint access, weights, and the text forward pass.
//!
//! Loading: [`config::ModelConfig::from_dir`] → [`checkpoint::Checkpoint::open`] (mmap) →
//! [`text::TextModel::load`] builds every layer through [`weights::WeightLoader`], which checks
//! each tensor's name and shape. Running: [`text::TextModel::forward`] over a batch of
//! sequences, each bringing its own block tables in a [`crate::kv_cache::KvPool`].

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod mlp;
pub mod moe;
pub mod quant_config;
pub mod text;
pub mod weights;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{dir}: tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error(
        "tensor {name} has dtype {dtype}; herd loads F32, BF16 and F16 weights (F8_E4M3 / int4 for routed experts)"
    )]
    UnsupportedDtype { name: String, dtype: String },
    #[error("token id {id} is outside the vocabulary of {vocab} ids")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{patches} image tokens in a step but {rows} image feature rows")]
    ImageRows { patches: usize, rows: usize },
    #[error("KV cache: {0}")]
    KvCache(crate::kv_cache::KvError),
    #[error("running experts: {0}")]
    Experts(#[from] moe::ExpertError),
    #[error(transparent)]
    Exchange(#[from] moe::ExchangeError),
}
