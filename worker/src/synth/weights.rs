//! The tensors of a `Llama4ForCausalLM` checkpoint: names, shapes and initialisation.
//!
//! Names and shapes follow the HF text-only layout (prefix `model.`, untied `lm_head.weight`;
//! fused experts `experts.gate_up_proj` [E, H, 2I] (gate columns, then up) and
//! `experts.down_proj` [E, I, H], without a `.weight` suffix). Initialisation keeps a random
//! model numerically healthy: every projection is uniform with std 1/√fan_in (so activations
//! keep unit scale through each matmul), embeddings have std 1, norm weights are 1.

use super::SynthConfig;
use super::writer::{Init, TensorDtype, TensorSpec};

/// Every tensor of the checkpoint for `cfg`, in file order (embedding, layers, norm, head).
pub fn tensor_specs(cfg: &SynthConfig, dtype: TensorDtype) -> Vec<TensorSpec> {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let e = cfg.num_local_experts;
    let i = cfg.intermediate_size;
    let i_mlp = cfg.intermediate_size_mlp;

    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| {
        specs.push(TensorSpec { name, shape, dtype, init });
    };
    // nn.Linear weight [out, in].
    let linear = |out: usize, inp: usize| (vec![out, inp], fan_in(inp));

    push("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h], Init::Uniform { std: 1.0 });
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}.");
        push(format!("{p}input_layernorm.weight"), vec![h], Init::Ones);
        for (name, (shape, init)) in
            [("q_proj", linear(q, h)), ("k_proj", linear(kv, h)), ("v_proj", linear(kv, h)), ("o_proj", linear(h, q))]
        {
            push(format!("{p}self_attn.{name}.weight"), shape, init);
        }
        push(format!("{p}post_attention_layernorm.weight"), vec![h], Init::Ones);
        let ff = format!("{p}feed_forward.");
        if cfg.is_moe_layer(layer) {
            let (shape, init) = linear(e, h);
            push(format!("{ff}router.weight"), shape, init);
            push(format!("{ff}experts.gate_up_proj"), vec![e, h, 2 * i], fan_in(h));
            push(format!("{ff}experts.down_proj"), vec![e, i, h], fan_in(i));
            for (name, (shape, init)) in
                [("gate_proj", linear(i, h)), ("up_proj", linear(i, h)), ("down_proj", linear(h, i))]
            {
                push(format!("{ff}shared_expert.{name}.weight"), shape, init);
            }
        } else {
            for (name, (shape, init)) in
                [("gate_proj", linear(i_mlp, h)), ("up_proj", linear(i_mlp, h)), ("down_proj", linear(h, i_mlp))]
            {
                push(format!("{ff}{name}.weight"), shape, init);
            }
        }
    }
    push("model.norm.weight".into(), vec![h], Init::Ones);
    let (shape, init) = linear(cfg.vocab_size, h);
    push("lm_head.weight".into(), shape, init);
    specs
}

/// [`tensor_specs`] with the routed experts in Meta's FP8 release layout: per-expert nn.Linear
/// `experts.{e}.{gate,up,down}_proj.weight` (F8_E4M3 `[out, in]`) and `.weight_scale` (F32
/// `[out, 1]`) instead of the fused tensors.
///
/// The codes are drawn uniform over (−448, 448) and every scale is `bound / 448` for the
/// projection's uniform bound `√3 / √fan_in`, so the dequantized weights have the same
/// distribution as the float layout's (rounded to e4m3), and each tensor still streams
/// element by element.
pub fn fp8_expert_specs(cfg: &SynthConfig, dtype: TensorDtype) -> Vec<TensorSpec> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut specs = Vec::new();
    for spec in tensor_specs(cfg, dtype) {
        if spec.name.ends_with("experts.down_proj") {
            continue;
        }
        let Some(ff) = spec.name.strip_suffix("experts.gate_up_proj") else {
            specs.push(spec);
            continue;
        };
        for e in 0..cfg.num_local_experts {
            for (proj, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                let p = format!("{ff}experts.{e}.{proj}");
                let code_std = FP8_MAX / 3f32.sqrt();
                let scale = (3.0 / inp as f64).sqrt() as f32 / FP8_MAX;
                specs.push(TensorSpec {
                    name: format!("{p}.weight"),
                    shape: vec![out, inp],
                    dtype: TensorDtype::F8E4M3,
                    init: Init::Uniform { std: code_std },
                });
                specs.push(TensorSpec {
                    name: format!("{p}.weight_scale"),
                    shape: vec![out, 1],
                    dtype: TensorDtype::F32,
                    init: Init::Const(scale),
                });
            }
        }
    }
    specs
}

const FP8_MAX: f32 = herd_kernels::quant::FP8_E4M3_MAX;

/// Total number of parameters of the checkpoint for `cfg` (computed from the shapes).
pub fn parameter_count(cfg: &SynthConfig) -> u64 {
    tensor_specs(cfg, TensorDtype::Bf16).iter().map(TensorSpec::numel).sum()
}

fn fan_in(n: usize) -> Init {
    Init::Uniform { std: (1.0 / n as f64).sqrt() as f32 }
}
