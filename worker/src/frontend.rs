//! The cheap parts of a checkpoint directory — config, tokenizer, chat template, generation
//! defaults — loaded without touching weights, plus loading the weights when wanted.
//!
//! A driver of worker processes needs only the frontend (it tokenizes and renders
//! templates); a worker loads the model too, possibly just its own routed experts.

use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::model::ModelError;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{GenerationConfig, ModelConfig};
use crate::model::text::TextModel;
use crate::model::weights::ComputeDtype;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::vision::encoder::VisionModel;
use crate::vision::{VisionError, VisionFrontend};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error(transparent)]
    Vision(#[from] VisionError),
}

/// A checkpoint's config, tokenizer, chat template and generation defaults.
#[derive(Debug)]
pub struct Frontend {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Arc<Tokenizer>,
    /// `None` when the checkpoint ships no chat template (base models).
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
    /// The image processor and token geometry; `None` for a text-only checkpoint.
    pub vision: Option<VisionFrontend>,
}

impl Frontend {
    /// Read everything but the weights (and check the weight files' headers, so a broken
    /// checkpoint fails here rather than on the first worker).
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::NotADirectory(dir.to_path_buf()));
        }
        let config = ModelConfig::from_dir(dir).map_err(ModelError::from)?;
        let generation = GenerationConfig::from_dir(dir).map_err(ModelError::from)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let chat_template = ChatTemplate::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir).map_err(ModelError::from)?;
        // A conditional checkpoint without usable vision weights or settings runs as text only
        // (image requests are then refused); the text path must not depend on the tower.
        let vision = match VisionModel::present(&ckpt).then(|| VisionFrontend::load(dir, &tokenizer)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(v))) => Some(v),
            Some(Err(e)) => {
                tracing::warn!("{}: images disabled: {e}", dir.display());
                None
            }
        };
        Ok(Self { dir: dir.to_path_buf(), config, tokenizer: Arc::new(tokenizer), chat_template, generation, vision })
    }

    /// Load the text model's weights; `local_experts` (MoE layer → experts) restricts the
    /// routed experts to a worker's share.
    pub fn load_model(
        &self,
        compute: ComputeDtype,
        local_experts: Option<&BTreeMap<usize, Vec<usize>>>,
    ) -> Result<TextModel, LoadError> {
        let ckpt = Checkpoint::open(&self.dir).map_err(ModelError::from)?;
        Ok(TextModel::from_checkpoint(&ckpt, &self.config.text, compute, local_experts)?)
    }

    /// Load the vision tower and projector, with the prompt token their rows replace; `None`
    /// for a text-only checkpoint.
    pub fn load_vision(&self, compute: ComputeDtype) -> Result<Option<(VisionModel, u32)>, LoadError> {
        let Some(v) = &self.vision else { return Ok(None) };
        let ckpt = Checkpoint::open(&self.dir).map_err(ModelError::from)?;
        let model = VisionModel::load(&ckpt, &v.config, compute)?;
        Ok(Some((model, self.config.image_token_id.unwrap_or(v.tokens.patch))))
    }

    /// A hash of config.json (FNV-1a, 64 bits, hex): workers and coordinators compare it so
    /// that a worker with another checkpoint cannot join.
    pub fn fingerprint(&self) -> String {
        let bytes = std::fs::read(self.dir.join("config.json")).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// Stop ids: generation_config.json's, else config.json's.
    pub fn eos_ids(&self) -> Vec<u32> {
        if self.generation.eos_token_ids.is_empty() {
            self.config.text.eos_token_ids.clone()
        } else {
            self.generation.eos_token_ids.clone()
        }
    }
}
