//! Everything a checkpoint directory provides at run time, loaded together.

use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::model::ModelError;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{GenerationConfig, ModelConfig};
use crate::model::text::TextModel;
use crate::model::weights::ComputeDtype;
use crate::tokenizer::{Tokenizer, TokenizerError};
use std::path::{Path, PathBuf};

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
}

/// A checkpoint's model, tokenizer, chat template and generation defaults.
#[derive(Debug)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: TextModel,
    pub tokenizer: Tokenizer,
    /// `None` when the checkpoint ships no chat template (base models).
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
}

impl LoadedModel {
    /// Load `dir`. Cheap files (config, tokenizer, template) are read first so that a broken
    /// checkpoint fails before any weight is mapped.
    pub fn load(dir: &Path, compute: ComputeDtype) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::NotADirectory(dir.to_path_buf()));
        }
        let config = ModelConfig::from_dir(dir).map_err(ModelError::from)?;
        let generation = GenerationConfig::from_dir(dir).map_err(ModelError::from)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let chat_template = ChatTemplate::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir).map_err(ModelError::from)?;
        let model = TextModel::from_checkpoint(&ckpt, &config.text, compute)?;
        Ok(Self { dir: dir.to_path_buf(), config, model, tokenizer, chat_template, generation })
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
