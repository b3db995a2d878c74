//! Images in prompts (Llama 4 early fusion).
//!
//! An image flows: bytes → [`decode`] (format and size limits checked before decoding) →
//! [`preprocess`] (tile canvas, torch-exact resize, bf16 normalisation, global tile) →
//! [`PixelValues`] carried in the request → on the worker that owns the sequence,
//! [`encoder::VisionModel::forward`] turns the tiles into text-space rows, which replace the
//! embeddings of the `<|patch|>` tokens that [`tokens::ImageTokens`] expanded each `<|image|>`
//! placeholder into.
//!
//! Modules: [`config`] (vision_config and the image processor's settings), [`content`] (image
//! parts of chat messages, data URLs), [`decode`],
//! [`resize`] (torch's uint8 antialiased bilinear), [`preprocess`], [`tokens`] (the image
//! token block), [`encoder`] (vision tower, adapter, projector).

pub mod config;
pub mod content;
pub mod decode;
pub mod encoder;
pub mod preprocess;
pub mod resize;
pub mod tokens;

pub use config::{ProcessorConfig, VisionConfig};
pub use decode::{DecodeLimits, decode};
pub use preprocess::{PixelValues, Rgb8, preprocess};
pub use tokens::ImageTokens;

use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("the image is {bytes} bytes; the limit is {max}")]
    TooManyBytes { bytes: usize, max: usize },
    #[error("the image declares {width}x{height} pixels; the limit is {max} pixels")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    #[error("not an image in a known format (PNG, JPEG, WebP or GIF expected)")]
    UnknownFormat,
    #[error("image format {0} is not accepted (PNG, JPEG, WebP or GIF expected)")]
    UnsupportedFormat(String),
    #[error("the image cannot be decoded: {0}")]
    Corrupt(String),
    #[error("the tokenizer has no {0} token")]
    MissingToken(String),
    #[error("the prompt has {placeholders} <|image|> placeholders but {images} images")]
    PlaceholderCount { placeholders: usize, images: usize },
    #[error("message {message}, content part {part}: {reason}")]
    BadPart { message: usize, part: usize, reason: String },
    #[error("this model has no vision tower (config.json has no vision_config)")]
    NoVision,
    #[error("the image processor's tile ({tile} px) differs from the vision tower's image_size ({image_size} px)")]
    TileMismatch { tile: usize, image_size: usize },
}

/// What the prompt side needs to turn images into request inputs: the processor settings,
/// the encoder's token geometry and the block's token ids (no weights).
#[derive(Clone, Debug)]
pub struct VisionFrontend {
    pub processor: ProcessorConfig,
    pub config: VisionConfig,
    pub tokens: ImageTokens,
}

impl VisionFrontend {
    /// `None` for a checkpoint without a vision tower. A missing processor config means the
    /// transformers defaults, with the tile taken from the vision tower.
    pub fn load(dir: &Path, tokenizer: &Tokenizer) -> Result<Option<Self>, VisionError> {
        let Some(config) = VisionConfig::from_dir(dir)? else { return Ok(None) };
        let processor = ProcessorConfig::from_dir(dir)?
            .unwrap_or(ProcessorConfig { tile: config.image_size, ..ProcessorConfig::default() });
        if processor.tile != config.image_size {
            return Err(VisionError::TileMismatch { tile: processor.tile, image_size: config.image_size });
        }
        let tokens = ImageTokens::from_tokenizer(tokenizer)?;
        Ok(Some(Self { processor, config, tokens }))
    }

    /// Preprocess `images` and expand the `<|image|>` placeholders of `ids` (one per image,
    /// in order) into their token blocks.
    pub fn prepare(&self, ids: &[u32], images: &[Rgb8]) -> Result<(Vec<u32>, Vec<PixelValues>), VisionError> {
        let pixels: Vec<PixelValues> = images.iter().map(|im| preprocess(im, &self.processor)).collect();
        let blocks: Vec<Vec<u32>> =
            pixels.iter().map(|pv| self.tokens.block(pv.grid, self.config.tokens_per_tile())).collect();
        let ids = self.tokens.expand(ids, &blocks)?;
        Ok((ids, pixels))
    }
}
