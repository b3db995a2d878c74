//! API limits on images in chat requests (`herd coordinator` and `herd serve`, which passes
//! them on to its coordinators).

use herd_coordinator::api::ApiConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct ImageFlags {
    /// Largest image a chat request may carry, in bytes after base64 decoding.
    #[arg(long, default_value_t = ApiConfig::DEFAULT_MAX_IMAGE_BYTES)]
    pub max_image_bytes: usize,
    /// Most pixels an image's header may declare; larger images are refused before decoding.
    #[arg(long, default_value_t = ApiConfig::DEFAULT_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Most images in one chat request.
    #[arg(long, default_value_t = ApiConfig::DEFAULT_MAX_IMAGES_PER_REQUEST)]
    pub max_images_per_request: usize,
}

impl ImageFlags {
    pub fn apply(&self, config: &mut ApiConfig) {
        config.max_image_bytes = self.max_image_bytes;
        config.max_image_pixels = self.max_image_pixels;
        config.max_images_per_request = self.max_images_per_request;
    }

    /// The same flags as command-line arguments (for the coordinators `herd serve` starts).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--max-image-bytes".into(),
            self.max_image_bytes.to_string(),
            "--max-image-pixels".into(),
            self.max_image_pixels.to_string(),
            "--max-images-per-request".into(),
            self.max_images_per_request.to_string(),
        ]
    }
}
