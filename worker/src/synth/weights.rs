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

/// Total number of parameters of the checkpoint for `cfg` (computed from the shapes).
pub fn parameter_count(cfg: &SynthConfig) -> u64 {
    tensor_specs(cfg, TensorDtype::Bf16).iter().map(TensorSpec::numel).sum()
}

fn fan_in(n: usize) -> Init {
    Init::Uniform { std: (1.0 / n as f64).sqrt() as f32 }
}
