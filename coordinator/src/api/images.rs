//! Images in chat requests: `image_url` content parts with base64 data URLs, checked against
//! the server's limits before anything is decoded (count per request, encoded bytes, and the
//! pixel count the header declares), then preprocessed and expanded into the prompt.
//!
//! Remote `http(s)` URLs are refused: this server does not fetch images (a fetcher would need
//! its own timeouts, size limits and an allow-list; clients send data URLs instead).

use super::ApiConfig;
use super::errors::ApiError;
use herd_worker::frontend::Frontend;
use herd_worker::vision::content::{ImageSource, extract_images};
use herd_worker::vision::{DecodeLimits, PixelValues, Rgb8, decode};
use serde_json::Value;

const PARAM: &str = "messages";

/// Rewrite the image parts of `messages` to `{"type": "image"}` (what the chat template
/// renders as `<|image|>`) and decode their images, in order.
pub(super) fn take_images(
    config: &ApiConfig,
    frontend: &Frontend,
    messages: &mut [Value],
) -> Result<Vec<Rgb8>, ApiError> {
    let sources = extract_images(messages).map_err(|e| ApiError::invalid(Some(PARAM), e.to_string()))?;
    if sources.is_empty() {
        return Ok(Vec::new());
    }
    if frontend.vision.is_none() {
        return Err(ApiError::invalid(Some(PARAM), "this model does not accept images"));
    }
    if sources.len() > config.max_images_per_request {
        return Err(ApiError::invalid(
            Some(PARAM),
            format!(
                "at most {} images are allowed in one request, got {}",
                config.max_images_per_request,
                sources.len()
            ),
        ));
    }
    let limits = DecodeLimits { max_bytes: config.max_image_bytes, max_pixels: config.max_image_pixels };
    sources
        .into_iter()
        .enumerate()
        .map(|(i, source)| match source {
            ImageSource::Bytes(bytes) => {
                decode(&bytes, &limits).map_err(|e| ApiError::invalid(Some(PARAM), format!("image {i}: {e}")))
            }
            ImageSource::Remote(_) => Err(ApiError::invalid(
                Some(PARAM),
                format!("image {i}: remote image URLs are not fetched by this server; send a base64 data URL"),
            )),
            ImageSource::Path(_) => Err(ApiError::invalid(
                Some(PARAM),
                format!("image {i}: file paths are not accepted over the API; send an image_url with a data URL"),
            )),
        })
        .collect()
}

/// Preprocess `images` and expand the prompt's `<|image|>` placeholders into image blocks.
pub(super) fn expand(
    frontend: &Frontend,
    ids: &[u32],
    images: &[Rgb8],
) -> Result<(Vec<u32>, Vec<PixelValues>), ApiError> {
    if images.is_empty() {
        return Ok((ids.to_vec(), Vec::new()));
    }
    let vision =
        frontend.vision.as_ref().ok_or_else(|| ApiError::invalid(Some(PARAM), "this model does not accept images"))?;
    vision.prepare(ids, images).map_err(|e| ApiError::invalid(Some(PARAM), e.to_string()))
}
