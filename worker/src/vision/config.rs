//! The vision settings of a checkpoint: `config.json`'s `vision_config` (the encoder) and the
//! image processor's settings (`preprocessor_config.json` as on the Hub, or the
//! `image_processor` object inside `processor_config.json` as transformers 5 saves it).

use super::VisionError;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The vision encoder's shape (`vision_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Tile side in pixels.
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub pixel_shuffle_ratio: f64,
    pub projector_input_dim: usize,
    pub projector_output_dim: usize,
    pub vision_output_dim: usize,
    /// The text model's hidden size (the projector's output).
    pub text_hidden_size: usize,
}

impl VisionConfig {
    /// `None` when `config.json` has no `vision_config` (a text-only checkpoint).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, VisionError> {
        let path = dir.join("config.json");
        let root = read_json(&path)?;
        let Some(v) = root.get("vision_config").filter(|v| v.is_object()) else { return Ok(None) };
        let text = root.get("text_config").unwrap_or(&root);
        let int = |obj: &Value, key: &str, default: Option<u64>| -> Result<usize, VisionError> {
            match obj.get(key).and_then(Value::as_u64).or(default) {
                Some(n) => Ok(n as usize),
                None => Err(invalid(&path, format!("vision_config.{key} is missing or not an integer"))),
            }
        };
        let float = |key: &str, default: f64| v.get(key).and_then(Value::as_f64).unwrap_or(default);
        let rope_theta = v
            .get("rope_theta")
            .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let c = Self {
            hidden_size: int(v, "hidden_size", None)?,
            num_hidden_layers: int(v, "num_hidden_layers", None)?,
            num_attention_heads: int(v, "num_attention_heads", None)?,
            intermediate_size: int(v, "intermediate_size", None)?,
            image_size: int(v, "image_size", None)?,
            patch_size: int(v, "patch_size", None)?,
            num_channels: int(v, "num_channels", Some(3))?,
            norm_eps: float("norm_eps", 1e-5) as f32,
            rope_theta: rope_theta as f32,
            pixel_shuffle_ratio: float("pixel_shuffle_ratio", 0.5),
            projector_input_dim: int(v, "projector_input_dim", None)?,
            projector_output_dim: int(v, "projector_output_dim", None)?,
            vision_output_dim: int(v, "vision_output_dim", None)?,
            text_hidden_size: int(text, "hidden_size", None)?,
        };
        c.validate().map_err(|m| invalid(&path, m))?;
        Ok(Some(c))
    }

    fn validate(&self) -> Result<(), String> {
        let grid = self.grid();
        if self.num_channels != 3 {
            return Err(format!("vision_config.num_channels {} (herd feeds RGB)", self.num_channels));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        if self.pixel_shuffle_ratio != 0.5 || !grid.is_multiple_of(2) {
            return Err(format!(
                "pixel_shuffle_ratio {} with a {grid}x{grid} patch grid (herd implements ratio 0.5 on an even grid)",
                self.pixel_shuffle_ratio
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads".into());
        }
        if !self.head_dim().is_multiple_of(4) {
            return Err(format!("head_dim {} is not a multiple of 4 (2D RoPE needs x and y pairs)", self.head_dim()));
        }
        if self.intermediate_size != 4 * self.hidden_size {
            return Err(format!(
                "intermediate_size {} != 4 x hidden_size {}: the adapter reads the pixel-shuffled channels",
                self.intermediate_size, self.hidden_size
            ));
        }
        if self.projector_input_dim != self.projector_output_dim || self.vision_output_dim != self.projector_output_dim
        {
            return Err("projector_input_dim, projector_output_dim and vision_output_dim must be equal".into());
        }
        Ok(())
    }

    /// Patches per tile side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// `<|patch|>` tokens (text-space feature rows) per tile after pixel shuffle.
    pub fn tokens_per_tile(&self) -> usize {
        self.grid() * self.grid() / 4
    }
}

/// The image processor's settings (`Llama4ImageProcessor`).
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessorConfig {
    /// Tile side (`size.height` == `size.width`).
    pub tile: usize,
    /// Most tiles in the canvas (`max_patches`), the global tile not counted.
    pub max_tiles: usize,
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize_to_max_canvas: bool,
}

impl Default for ProcessorConfig {
    /// transformers' class defaults (Llama 4 Scout / Maverick ship these values).
    fn default() -> Self {
        Self {
            tile: 336,
            max_tiles: 16,
            rescale_factor: 1.0 / 255.0,
            mean: [0.5; 3],
            std: [0.5; 3],
            resize_to_max_canvas: false,
        }
    }
}

impl ProcessorConfig {
    /// Reads `preprocessor_config.json`, else `processor_config.json`'s `image_processor`;
    /// `None` when the checkpoint has neither.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, VisionError> {
        let pre = dir.join("preprocessor_config.json");
        let proc = dir.join("processor_config.json");
        let (path, obj) = if pre.is_file() {
            let v = read_json(&pre)?;
            (pre, v)
        } else if proc.is_file() {
            let v = read_json(&proc)?;
            match v.get("image_processor") {
                Some(ip) => (proc, ip.clone()),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        Self::from_json(&obj).map(Some).map_err(|m| invalid(&path, m))
    }

    fn from_json(v: &Value) -> Result<Self, String> {
        let d = Self::default();
        if let Some(t) = v.get("image_processor_type").and_then(Value::as_str)
            && !t.starts_with("Llama4ImageProcessor")
        {
            return Err(format!("image_processor_type {t:?} (herd implements Llama4ImageProcessor)"));
        }
        for (key, want) in [("do_resize", true), ("do_rescale", true), ("do_normalize", true)] {
            if v.get(key).and_then(Value::as_bool).is_some_and(|b| b != want) {
                return Err(format!("{key} = false is not supported"));
            }
        }
        // PIL's BILINEAR is 2; the processor ignores anything else only at its peril.
        if let Some(r) = v.get("resample").and_then(Value::as_u64)
            && r != 2
        {
            return Err(format!("resample {r} (herd implements bilinear, 2)"));
        }
        let tile = match v.get("size") {
            None => d.tile,
            Some(s) => {
                let h = s.get("height").and_then(Value::as_u64);
                let w = s.get("width").and_then(Value::as_u64);
                match (h, w) {
                    (Some(h), Some(w)) if h == w && h > 0 => h as usize,
                    _ => return Err(format!("size {s} must be a square {{height, width}}")),
                }
            }
        };
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3], String> {
            match v.get(key) {
                None => Ok(default),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                    Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
                }
                Some(other) => Err(format!("{key} {other} must be a number or three numbers")),
            }
        };
        let c = Self {
            tile,
            max_tiles: v.get("max_patches").and_then(Value::as_u64).map_or(d.max_tiles, |n| n as usize),
            rescale_factor: v.get("rescale_factor").and_then(Value::as_f64).unwrap_or(d.rescale_factor),
            mean: triple("image_mean", d.mean)?,
            std: triple("image_std", d.std)?,
            resize_to_max_canvas: v.get("resize_to_max_canvas").and_then(Value::as_bool).unwrap_or(false),
        };
        if c.max_tiles == 0 || c.std.contains(&0.0) {
            return Err("max_patches must be positive and image_std non-zero".into());
        }
        Ok(c)
    }
}

fn read_json(path: &Path) -> Result<Value, VisionError> {
    let text = std::fs::read_to_string(path).map_err(|e| invalid(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| invalid(path, format!("not valid JSON: {e}")))
}

fn invalid(path: &Path, message: String) -> VisionError {
    VisionError::Config { path: PathBuf::from(path), message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn processor_defaults_and_hub_values() {
        let c = ProcessorConfig::from_json(&json!({})).expect("empty object");
        assert_eq!(c, ProcessorConfig::default());
        let c = ProcessorConfig::from_json(&json!({
            "image_processor_type": "Llama4ImageProcessorFast", "size": {"height": 28, "width": 28},
            "max_patches": 4, "image_mean": [0.1, 0.2, 0.3], "image_std": 0.5, "resample": 2
        }))
        .expect("valid");
        assert_eq!((c.tile, c.max_tiles, c.mean, c.std), (28, 4, [0.1, 0.2, 0.3], [0.5; 3]));
    }

    #[test]
    fn processor_rejects_what_it_does_not_implement() {
        for bad in [
            json!({"size": {"height": 28, "width": 56}}),
            json!({"resample": 3}),
            json!({"do_normalize": false}),
            json!({"image_std": [0.5, 0.0, 0.5]}),
            json!({"image_processor_type": "SiglipImageProcessor"}),
        ] {
            assert!(ProcessorConfig::from_json(&bad).is_err(), "{bad}");
        }
    }
}
