//! `herd quantize`: convert a float checkpoint's routed experts (or, with
//! [`QuantScope::AllLinear`], every text nn.Linear but the router) to FP8 or int4, offline.
//!
//! The output is one `model.safetensors` that herd memory-maps as is (no conversion at load):
//! - routed experts, fused (`experts.gate_up_proj` `[E, H, 2I]`, `experts.down_proj`
//!   `[E, I, H]`) or already per-expert, become per-expert nn.Linear modules
//!   `experts.{e}.{gate,up,down}_proj` (`[I, H]`, `[I, H]`, `[H, I]`, output-major), the
//!   layout of Meta's FP8 release:
//!   - FP8: `.weight` F8_E4M3 and `.weight_scale` F32 `[out, 1]`;
//!   - int4: `.weight_packed` U8 `[out, ceil(in/2)]` and `.weight_scale` F32 `[out, ceil(in/128)]`;
//! - with [`QuantScope::AllLinear`], the attention projections, dense and shared-expert MLPs
//!   and lm_head are quantized in place under their own names (same suffixes);
//! - every other tensor (router, norms, embeddings, and with the default scope attention,
//!   shared expert, dense FFNs and lm_head) is copied byte for byte in its stored dtype, as
//!   Meta's release keeps them bf16.
//!
//! Every other file of the input directory (tokenizer, chat template, generation config, …)
//! is copied; `config.json` gains a top-level `quantization_config`
//! ([`crate::model::quant_config::config_block`]) and is written last.
//!
//! Tensors are converted and written one at a time, so memory stays near one fused expert
//! tensor in f32 whatever the model size.

use crate::model::checkpoint::{Checkpoint, CheckpointError, StoredDtype, TensorSlice};
use crate::model::quant_config::{self, QuantScope, WeightQuant};
use half::{bf16, f16};
use herd_kernels::quant::{self as q, QuantError};
use rayon::prelude::*;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error(transparent)]
    Quant(#[from] QuantError),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> QuantizeError {
    let context = context.into();
    move |source| QuantizeError::Io { context, source }
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeSummary {
    /// Matrices quantized (three per routed expert, plus the other linears with `AllLinear`).
    pub quantized: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Size of `model.safetensors` in bytes.
    pub weight_bytes: u64,
    /// Size of the input's tensor data in bytes.
    pub input_bytes: u64,
}

/// One output tensor's header entry.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: usize,
}

/// One unit of work, producing one or more consecutive output tensors.
enum Job {
    Copy(TensorSlice),
    /// An nn.Linear quantized as `[out, inp]`: expert `e`'s projection `part` of a fused
    /// source, or a whole float `[out, inp]` tensor (`Part::Linear`).
    Quantize {
        src: TensorSlice,
        e: usize,
        part: Part,
        out_prefix: String,
        out: usize,
        inp: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Columns `[0, I)` of a fused `gate_up_proj` `[E, H, 2I]`.
    FusedGate,
    /// Columns `[I, 2I)` of a fused `gate_up_proj`.
    FusedUp,
    /// A fused `down_proj` `[E, I, H]`.
    FusedDown,
    /// An existing float nn.Linear `[out, inp]`.
    Linear,
}

/// Convert the checkpoint in `input` into `output` (created if missing).
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    format: WeightQuant,
    scope: QuantScope,
) -> Result<QuantizeSummary, QuantizeError> {
    let config_path = input.join("config.json");
    let text = fs::read_to_string(&config_path).map_err(io(format!("reading {}", config_path.display())))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| QuantizeError::Config { path: config_path.clone(), message: e.to_string() })?;
    let already = config.get("quantization_config").is_some()
        || config.get("text_config").and_then(|t| t.get("quantization_config")).is_some();
    if already {
        return Err(QuantizeError::Config {
            path: config_path,
            message: "the checkpoint is already quantized (it has a quantization_config)".into(),
        });
    }
    let ckpt = Checkpoint::open(input)?;
    let jobs = plan(&ckpt, scope)?;
    let entries: Vec<Entry> = jobs.iter().flat_map(|j| entries(j, format)).collect();

    fs::create_dir_all(output).map_err(io(format!("creating {}", output.display())))?;
    let out_config = output.join("config.json");
    if out_config.exists() {
        fs::remove_file(&out_config).map_err(io(format!("removing the old {}", out_config.display())))?;
    }
    copy_side_files(input, output)?;
    let weights = output.join("model.safetensors");
    let weight_bytes = write_weights(&weights, &jobs, &entries, format)?;

    config["quantization_config"] = quant_config::config_block(format, scope);
    let mut json = serde_json::to_string_pretty(&config)
        .map_err(|e| QuantizeError::Config { path: out_config.clone(), message: e.to_string() })?;
    json.push('\n');
    fs::write(&out_config, json).map_err(io(format!("writing {}", out_config.display())))?;
    let quantized = jobs.iter().filter(|j| matches!(j, Job::Quantize { .. })).count();
    Ok(QuantizeSummary { quantized, copied: jobs.len() - quantized, weight_bytes, input_bytes: ckpt.data_bytes() })
}

/// Which tensors are quantized (and how routed experts are cut), in name order.
fn plan(ckpt: &Checkpoint, scope: QuantScope) -> Result<Vec<Job>, QuantizeError> {
    let mut jobs = Vec::new();
    for name in ckpt.names() {
        let t = ckpt.get(name).expect("listed");
        let bad = |message: String| QuantizeError::Tensor { name: name.to_owned(), message };
        if let Some(prefix) = name.strip_suffix(".experts.gate_up_proj") {
            let [e_n, h, i2] = rank3(&t).ok_or_else(|| bad(format!("shape {:?} is not [E, H, 2I]", t.shape)))?;
            for e in 0..e_n {
                for (part, proj) in [(Part::FusedGate, "gate_proj"), (Part::FusedUp, "up_proj")] {
                    let out_prefix = format!("{prefix}.experts.{e}.{proj}");
                    jobs.push(Job::Quantize { src: t.clone(), e, part, out_prefix, out: i2 / 2, inp: h });
                }
            }
        } else if let Some(prefix) = name.strip_suffix(".experts.down_proj") {
            let [e_n, i, h] = rank3(&t).ok_or_else(|| bad(format!("shape {:?} is not [E, I, H]", t.shape)))?;
            for e in 0..e_n {
                let out_prefix = format!("{prefix}.experts.{e}.down_proj");
                jobs.push(Job::Quantize { src: t.clone(), e, part: Part::FusedDown, out_prefix, out: h, inp: i });
            }
        } else if t.shape.len() == 2
            && (is_per_expert_linear(name) || (scope == QuantScope::AllLinear && is_text_linear(name)))
        {
            let out_prefix = name.strip_suffix(".weight").expect("checked").to_owned();
            let (out, inp) = (t.shape[0], t.shape[1]);
            jobs.push(Job::Quantize { src: t, e: 0, part: Part::Linear, out_prefix, out, inp });
        } else {
            jobs.push(Job::Copy(t));
        }
    }
    // Fused experts were expanded per tensor; keep each layer's experts in (layer, e, proj)
    // order, which is name order apart from the gate/up interleave, for readable headers.
    Ok(jobs)
}

fn rank3(t: &TensorSlice) -> Option<[usize; 3]> {
    t.shape.as_slice().try_into().ok()
}

/// `….experts.{e}.{gate,up,down}_proj.weight`.
fn is_per_expert_linear(name: &str) -> bool {
    let Some(rest) = name.strip_suffix(".weight") else { return false };
    let Some((head, proj)) = rest.rsplit_once('.') else { return false };
    let Some((head, e)) = head.rsplit_once('.') else { return false };
    matches!(proj, "gate_proj" | "up_proj" | "down_proj") && e.parse::<usize>().is_ok() && head.ends_with(".experts")
}

/// A text-model nn.Linear other than a routed expert or the router: attention projections,
/// dense and shared-expert MLPs, lm_head.
fn is_text_linear(name: &str) -> bool {
    const SUFFIXES: [&str; 7] = [
        ".self_attn.q_proj.weight",
        ".self_attn.k_proj.weight",
        ".self_attn.v_proj.weight",
        ".self_attn.o_proj.weight",
        ".gate_proj.weight",
        ".up_proj.weight",
        ".down_proj.weight",
    ];
    let text = !name.contains("vision") && !name.contains("multi_modal") && !name.contains(".experts.");
    text && (name == "lm_head.weight"
        || name.ends_with(".lm_head.weight")
        || SUFFIXES.iter().any(|s| name.ends_with(s)))
}

fn entries(job: &Job, format: WeightQuant) -> Vec<Entry> {
    match job {
        Job::Copy(t) => vec![Entry {
            name: t.name.clone(),
            dtype: dtype_name(t.dtype),
            shape: t.shape.clone(),
            bytes: t.byte_len(),
        }],
        Job::Quantize { out_prefix, out, inp, .. } => {
            let (out, inp) = (*out, *inp);
            match format {
                WeightQuant::Fp8Channel => vec![
                    Entry {
                        name: format!("{out_prefix}.weight"),
                        dtype: "F8_E4M3",
                        shape: vec![out, inp],
                        bytes: out * inp,
                    },
                    Entry {
                        name: format!("{out_prefix}.weight_scale"),
                        dtype: "F32",
                        shape: vec![out, 1],
                        bytes: 4 * out,
                    },
                ],
                WeightQuant::Int4Group => {
                    let (rb, rg) = (q::int4_row_bytes(inp), q::int4_row_groups(inp));
                    vec![
                        Entry {
                            name: format!("{out_prefix}.weight_packed"),
                            dtype: "U8",
                            shape: vec![out, rb],
                            bytes: out * rb,
                        },
                        Entry {
                            name: format!("{out_prefix}.weight_scale"),
                            dtype: "F32",
                            shape: vec![out, rg],
                            bytes: 4 * out * rg,
                        },
                    ]
                }
            }
        }
    }
}

fn dtype_name(d: StoredDtype) -> &'static str {
    match d {
        StoredDtype::F32 => "F32",
        StoredDtype::Bf16 => "BF16",
        StoredDtype::F16 => "F16",
        StoredDtype::F8E4M3 => "F8_E4M3",
        StoredDtype::U8 => "U8",
        // Copied verbatim; the header keeps the dtype's safetensors spelling.
        StoredDtype::Other(d) => match d {
            safetensors::Dtype::BOOL => "BOOL",
            safetensors::Dtype::I8 => "I8",
            safetensors::Dtype::I16 => "I16",
            safetensors::Dtype::I32 => "I32",
            safetensors::Dtype::I64 => "I64",
            safetensors::Dtype::F64 => "F64",
            _ => "UNKNOWN",
        },
    }
}

/// Copy every file but the weights and config.json.
fn copy_side_files(input: &Path, output: &Path) -> Result<(), QuantizeError> {
    let list = fs::read_dir(input).map_err(io(format!("reading {}", input.display())))?;
    for entry in list {
        let entry = entry.map_err(io(format!("reading {}", input.display())))?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        let skip =
            name_s.ends_with(".safetensors") || name_s == "model.safetensors.index.json" || name_s == "config.json";
        if skip || !entry.file_type().map_err(io(format!("reading {}", input.display())))?.is_file() {
            continue;
        }
        fs::copy(entry.path(), output.join(&name)).map_err(io(format!("copying {}", entry.path().display())))?;
    }
    Ok(())
}

fn write_weights(path: &Path, jobs: &[Job], entries: &[Entry], format: WeightQuant) -> Result<u64, QuantizeError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt", "herd_quantize": format!("{format:?}")}));
    let mut offset = 0usize;
    for e in entries {
        if e.dtype == "UNKNOWN" {
            return Err(QuantizeError::Tensor { name: e.name.clone(), message: "unsupported dtype to copy".into() });
        }
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.bytes]}),
        );
        offset += e.bytes;
    }
    let mut json = serde_json::to_vec(&header)
        .map_err(|e| QuantizeError::Tensor { name: "header".into(), message: e.to_string() })?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let tmp = path.with_extension("safetensors.partial");
    let werr = || io(format!("writing {}", tmp.display()));
    let mut file = BufWriter::with_capacity(1 << 22, fs::File::create(&tmp).map_err(werr())?);
    file.write_all(&(json.len() as u64).to_le_bytes()).map_err(werr())?;
    file.write_all(&json).map_err(werr())?;
    for job in jobs {
        for bytes in produce(job, format)? {
            file.write_all(&bytes).map_err(werr())?;
        }
    }
    let file = file
        .into_inner()
        .map_err(|e| QuantizeError::Io { context: format!("writing {}", tmp.display()), source: e.into_error() })?;
    file.sync_all().map_err(werr())?;
    crate::model::checkpoint::evict_from_page_cache(&file);
    fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))?;
    Ok((8 + json.len() + offset) as u64)
}

/// The bytes of a job's output tensors, in entry order.
fn produce(job: &Job, format: WeightQuant) -> Result<Vec<Vec<u8>>, QuantizeError> {
    let (src, e, part, out, inp) = match job {
        Job::Copy(t) => return Ok(vec![t.read()?]),
        Job::Quantize { src, e, part, out, inp, .. } => (src, *e, *part, *out, *inp),
    };
    let w = expert_matrix(src, e, part, out, inp)?; // [out, inp]
    Ok(match format {
        WeightQuant::Fp8Channel => {
            let (mut codes, mut scales) = (vec![0u8; out * inp], vec![0f32; out]);
            q::quantize_fp8(&w, out, inp, &mut codes, &mut scales)?;
            vec![codes, bytemuck::cast_slice(&scales).to_vec()]
        }
        WeightQuant::Int4Group => {
            let (rb, rg) = (q::int4_row_bytes(inp), q::int4_row_groups(inp));
            let (mut packed, mut scales) = (vec![0u8; out * rb], vec![0f32; out * rg]);
            q::quantize_int4(&w, out, inp, &mut packed, &mut scales)?;
            vec![packed, bytemuck::cast_slice(&scales).to_vec()]
        }
    })
}

/// Expert `e`'s projection as an output-major f32 matrix `[out, inp]`.
fn expert_matrix(src: &TensorSlice, e: usize, part: Part, out: usize, inp: usize) -> Result<Vec<f32>, QuantizeError> {
    let size = src.dtype.size();
    let per_expert = if part == Part::Linear { out * inp } else { src.shape[1] * src.shape[2] };
    let (map, range) = src.map_range(e * per_expert * size..(e + 1) * per_expert * size)?;
    let vals = widen(&map[range], src.dtype).ok_or_else(|| QuantizeError::Tensor {
        name: src.name.clone(),
        message: format!("dtype {} cannot be quantized (F32, BF16 or F16 expected)", src.dtype),
    })?;
    Ok(match part {
        Part::Linear => vals,
        // Fused tensors are input-major [inp, cols]: transpose the chosen columns.
        Part::FusedGate | Part::FusedUp | Part::FusedDown => {
            let cols = src.shape[2];
            let c0 = if part == Part::FusedUp { out } else { 0 };
            let mut w = vec![0f32; out * inp];
            w.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
                for (p, v) in row.iter_mut().enumerate() {
                    *v = vals[p * cols + c0 + o];
                }
            });
            w
        }
    })
}

fn widen(bytes: &[u8], dtype: StoredDtype) -> Option<Vec<f32>> {
    Some(match dtype {
        StoredDtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StoredDtype::Bf16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        StoredDtype::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_per_expert_linear_names() {
        assert!(is_per_expert_linear("model.layers.1.feed_forward.experts.12.gate_proj.weight"));
        assert!(!is_per_expert_linear("model.layers.1.feed_forward.shared_expert.gate_proj.weight"));
        assert!(!is_per_expert_linear("model.layers.1.feed_forward.experts.gate_up_proj"));
        assert!(!is_per_expert_linear("model.layers.1.feed_forward.experts.3.gate_proj.weight_scale"));
    }
}
