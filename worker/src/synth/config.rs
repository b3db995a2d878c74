//! The JSON side files of a checkpoint: `config.json`, `generation_config.json`,
//! `tokenizer_config.json` and `special_tokens_map.json`, in the Hugging Face Hub layout.
//!
//! `config.json` uses the Hub spelling (`rope_theta` + `rope_scaling`, `torch_dtype`) rather
//! than transformers 5's (`rope_parameters`, `dtype`), and writes the derived lists
//! `moe_layers` and `no_rope_layers` explicitly so no reader has to re-derive them.

use serde_json::{Value, json};

use super::tokenizer::{BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, SpecialIds};
use super::{LLAMA4_CHAT_TEMPLATE, SynthConfig, SynthDtype};

/// `config.json` for a text-only `Llama4ForCausalLM`.
pub fn config_json(cfg: &SynthConfig, dtype: SynthDtype) -> Value {
    let ids = cfg.special_ids();
    let rope_scaling = match cfg.rope_scaling {
        None => Value::Null,
        Some(s) => json!({
            "factor": s.factor,
            "high_freq_factor": s.high_freq_factor,
            "low_freq_factor": s.low_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "rope_type": "llama3",
        }),
    };
    json!({
        "architectures": ["Llama4ForCausalLM"],
        "attention_bias": false,
        "attention_chunk_size": cfg.attention_chunk_size,
        "attention_dropout": 0.0,
        "attn_scale": cfg.attn_scale,
        "attn_temperature_tuning": cfg.attn_temperature_tuning,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.stop_tokens(),
        "floor_scale": cfg.floor_scale,
        "for_llm_compressor": false,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "interleave_moe_layer_step": cfg.interleave_moe_layer_step,
        "intermediate_size": cfg.intermediate_size,
        "intermediate_size_mlp": cfg.intermediate_size_mlp,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "llama4_text",
        "moe_layers": cfg.moe_layers(),
        "no_rope_layers": cfg.no_rope_layers(),
        "num_attention_heads": cfg.num_attention_heads,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_local_experts": cfg.num_local_experts,
        "output_router_logits": false,
        "pad_token_id": ids.pad,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": cfg.rope_theta,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": false,
        "torch_dtype": dtype.torch_name(),
        "use_cache": true,
        "use_qk_norm": cfg.use_qk_norm,
        "vocab_size": cfg.vocab_size,
    })
}

/// `generation_config.json`: the special ids only, so generation defaults to greedy.
pub fn generation_config_json(cfg: &SynthConfig) -> Value {
    let ids = cfg.special_ids();
    json!({
        "bos_token_id": ids.bos,
        "eos_token_id": ids.stop_tokens(),
        "pad_token_id": ids.pad,
    })
}

/// `tokenizer_config.json`: special tokens, the chat template and the tokenizer class.
pub fn tokenizer_config_json(cfg: &SynthConfig) -> Value {
    let ids = SpecialIds::for_vocab(cfg.vocab_size);
    let added: serde_json::Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(k, token)| {
            (
                (ids.first + k as u32).to_string(),
                json!({
                    "content": token,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            )
        })
        .collect();
    json!({
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "chat_template": LLAMA4_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": cfg.max_position_embeddings,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

/// `special_tokens_map.json` (read by transformers 4.x; 5.x takes tokenizer_config.json).
pub fn special_tokens_map_json() -> Value {
    json!({
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
    })
}
