//! `quantization_config` in config.json: the schemes herd loads, and the blocks it writes.
//!
//! - FP8: compressed-tensors `float-quantized` with 8-bit float weights, `strategy: channel`
//!   (Meta's `Llama-4-Maverick-17B-128E-Instruct-FP8`). Per-expert nn.Linear tensors
//!   `….experts.{e}.{gate,up,down}_proj.weight` (F8_E4M3 `[out, in]`) and `.weight_scale`
//!   (`[out, 1]`). The scheme's dynamic per-token FP8 activations are not emulated: herd
//!   multiplies f32 activations by the dequantized weights (at least as accurate).
//! - int4: herd's own block (`quant_method: "herd"`, `format: "int4-group"`): `.weight_packed`
//!   (U8 `[out, ceil(in/2)]`) and `.weight_scale` (F32 `[out, ceil(in/128)]`), see
//!   [`herd_kernels::quant`].
//!
//! Which tensors are quantized is read from the checkpoint itself (dtype and names), so the
//! config only has to name a scheme herd knows.

use herd_kernels::quant::INT4_GROUP;
use serde_json::{Value, json};

/// The weight quantization a checkpoint declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightQuant {
    /// FP8 e4m3 weights, one scale per output channel.
    Fp8Channel,
    /// Symmetric int4 weights, one scale per group of 128 inputs.
    Int4Group,
}

/// `quant_method` of herd's own int4 block.
pub const HERD_QUANT_METHOD: &str = "herd";
/// `format` of herd's int4 block.
pub const HERD_INT4_FORMAT: &str = "int4-group";

/// Accept a `quantization_config` herd can load, or say why not.
pub fn parse(q: &Value) -> Result<WeightQuant, String> {
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
    match method {
        "compressed-tensors" => {
            let groups =
                q.get("config_groups").and_then(Value::as_object).ok_or("compressed-tensors without config_groups")?;
            if groups.is_empty() {
                return Err("compressed-tensors with empty config_groups".into());
            }
            for (name, group) in groups {
                let w = group.get("weights").ok_or_else(|| format!("config group {name} has no weights scheme"))?;
                let bits = w.get("num_bits").and_then(Value::as_u64);
                let kind = w.get("type").and_then(Value::as_str);
                let strategy = w.get("strategy").and_then(Value::as_str);
                if (bits, kind, strategy) != (Some(8), Some("float"), Some("channel")) {
                    return Err(format!(
                        "compressed-tensors group {name}: weights {bits:?}-bit {kind:?} with strategy {strategy:?} \
                         (herd loads 8-bit float per-channel weights)"
                    ));
                }
            }
            Ok(WeightQuant::Fp8Channel)
        }
        HERD_QUANT_METHOD => {
            let format = q.get("format").and_then(Value::as_str);
            let group = q.get("group_size").and_then(Value::as_u64);
            if format == Some(HERD_INT4_FORMAT) && group == Some(INT4_GROUP as u64) {
                Ok(WeightQuant::Int4Group)
            } else {
                Err(format!("herd quantization format {format:?} with group_size {group:?}"))
            }
        }
        other => Err(format!("quantization_config (quant_method {other:?}) is not supported")),
    }
}

/// Which nn.Linear weights a quantized checkpoint holds in the quantized format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantScope {
    /// Routed experts only, as Meta's FP8 release (everything else stays bf16).
    #[default]
    Experts,
    /// Every nn.Linear of the text model but the router: attention, dense and shared MLPs,
    /// routed experts and lm_head (what llama.cpp's Q8_0 or vLLM's `--quantization fp8` do).
    /// Embeddings, norms and the router stay in their float dtype.
    AllLinear,
}

/// The `quantization_config` block herd writes for `quant` over `scope`.
pub fn config_block(quant: WeightQuant, scope: QuantScope) -> Value {
    let mut block = experts_block(quant);
    if scope == QuantScope::AllLinear {
        match quant {
            WeightQuant::Fp8Channel => {
                block["ignore"] = json!(["re:.*router.*", "re:.*embed_tokens", "re:.*vision.*", "re:.*multi_modal.*"])
            }
            WeightQuant::Int4Group => block["modules"] = json!("every text nn.Linear but the router"),
        }
    }
    block
}

/// The block for routed experts only.
fn experts_block(quant: WeightQuant) -> Value {
    match quant {
        WeightQuant::Fp8Channel => json!({
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel",
                        "dynamic": false, "group_size": null, "observer": "minmax"
                    },
                    "input_activations": {
                        "num_bits": 8, "type": "float", "symmetric": true, "strategy": "token", "dynamic": true
                    },
                    "output_activations": null
                }
            },
            // Everything but the routed experts stays bf16, as in Meta's FP8 release.
            "ignore": ["re:.*self_attn.*", "re:.*router.*", "re:.*shared_expert.*",
                       "re:.*feed_forward\\.(gate|up|down)_proj", "re:.*lm_head", "re:.*embed_tokens"],
        }),
        WeightQuant::Int4Group => json!({
            "quant_method": HERD_QUANT_METHOD,
            "format": HERD_INT4_FORMAT,
            "bits": 4,
            "group_size": INT4_GROUP,
            "symmetric": true,
            "scale_dtype": "float32",
            "packing": "offset-binary nibbles (q + 8), even input in the low nibble",
            "modules": "routed experts (experts.{e}.{gate,up,down}_proj)",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_blocks_parse_back() {
        for q in [WeightQuant::Fp8Channel, WeightQuant::Int4Group] {
            for scope in [QuantScope::Experts, QuantScope::AllLinear] {
                assert_eq!(parse(&config_block(q, scope)), Ok(q));
            }
        }
    }

    #[test]
    fn unknown_schemes_are_refused_with_their_name() {
        let e = parse(&json!({"quant_method": "fbgemm_fp8"})).expect_err("fbgemm");
        assert!(e.contains("fbgemm_fp8"), "{e}");
        let mut int4ct = config_block(WeightQuant::Fp8Channel, QuantScope::Experts);
        int4ct["config_groups"]["group_0"]["weights"]["num_bits"] = json!(4);
        int4ct["config_groups"]["group_0"]["weights"]["type"] = json!("int");
        assert!(parse(&int4ct).is_err());
    }
}
