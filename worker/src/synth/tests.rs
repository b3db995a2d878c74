//! Tests of `herd synth`: determinism, the safetensors layout, the tokenizer and the configs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use super::*;

fn write(preset: Preset, seed: u64, dtype: SynthDtype, dir: &Path) -> SynthSummary {
    let opts = SynthOptions { preset, seed, dtype, format: Default::default() };
    write_checkpoint(&opts, dir).expect("write_checkpoint")
}

fn read_dir(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("dir entry");
            let name = e.file_name().to_string_lossy().into_owned();
            (name, fs::read(e.path()).expect("read"))
        })
        .collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).expect("read")).expect("json")
}

#[test]
fn same_seed_gives_identical_files_and_other_seeds_differ() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let c = tempfile::tempdir().expect("tempdir");
    let summary = write(Preset::Tiny, 0, SynthDtype::Bf16, a.path());
    write(Preset::Tiny, 0, SynthDtype::Bf16, b.path());
    write(Preset::Tiny, 1, SynthDtype::Bf16, c.path());
    let (fa, fb, fc) = (read_dir(a.path()), read_dir(b.path()), read_dir(c.path()));
    assert_eq!(fa, fb);
    let names: Vec<&str> = fa.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    );
    assert_eq!(fa["tokenizer.json"], fc["tokenizer.json"]);
    assert_eq!(fa["config.json"], fc["config.json"]);
    assert_ne!(fa["model.safetensors"], fc["model.safetensors"]);

    let total: u64 = fa.values().map(|v| v.len() as u64).sum();
    assert_eq!(summary.bytes, total);
    assert_eq!(summary.weight_bytes, fa["model.safetensors"].len() as u64);
    assert_eq!(summary.files.len(), fa.len());

    // The same tensor differs between seeds, element by element, not just in its metadata.
    let ta = safetensors::SafeTensors::deserialize(&fa["model.safetensors"]).expect("parse");
    let tc = safetensors::SafeTensors::deserialize(&fc["model.safetensors"]).expect("parse");
    let name = "model.layers.1.feed_forward.experts.gate_up_proj";
    assert_ne!(ta.tensor(name).expect("tensor").data(), tc.tensor(name).expect("tensor").data());
}

#[test]
fn safetensors_has_every_llama4_tensor_with_its_shape() {
    for dtype in [SynthDtype::Bf16, SynthDtype::F32] {
        let dir = tempfile::tempdir().expect("tempdir");
        let summary = write(Preset::Tiny, 3, dtype, dir.path());
        let bytes = fs::read(dir.path().join("model.safetensors")).expect("read");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("metadata");
        let extra = meta.metadata().clone().expect("__metadata__");
        assert_eq!(extra["format"], "pt");
        assert_eq!(extra["herd_synth_preset"], "tiny");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");

        let cfg = Preset::Tiny.config();
        let specs = tensor_specs(&cfg, dtype.tensor_dtype());
        assert_eq!(st.len(), specs.len());
        assert_eq!(summary.tensors, specs.len());
        for spec in &specs {
            let t = st.tensor(&spec.name).expect(&spec.name);
            assert_eq!(t.shape(), spec.shape.as_slice(), "{}", spec.name);
            assert_eq!(t.dtype(), dtype.tensor_dtype().safetensors_dtype());
        }
        let params: u64 = specs.iter().map(TensorSpec::numel).sum();
        assert_eq!(summary.parameters, params);

        // Spot checks against the HF names and shapes (H 64, E 8, I 32, I_mlp 64, V 512).
        let shape = |name: &str| st.tensor(name).expect(name).shape().to_vec();
        assert_eq!(shape("model.embed_tokens.weight"), [512, 64]);
        assert_eq!(shape("lm_head.weight"), [512, 64]);
        assert_eq!(shape("model.norm.weight"), [64]);
        assert_eq!(shape("model.layers.0.self_attn.q_proj.weight"), [64, 64]);
        assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), [32, 64]);
        assert_eq!(shape("model.layers.0.self_attn.v_proj.weight"), [32, 64]);
        assert_eq!(shape("model.layers.0.self_attn.o_proj.weight"), [64, 64]);
        assert_eq!(shape("model.layers.0.feed_forward.gate_proj.weight"), [64, 64]);
        assert_eq!(shape("model.layers.0.feed_forward.down_proj.weight"), [64, 64]);
        assert_eq!(shape("model.layers.1.feed_forward.router.weight"), [8, 64]);
        assert_eq!(shape("model.layers.1.feed_forward.experts.gate_up_proj"), [8, 64, 64]);
        assert_eq!(shape("model.layers.1.feed_forward.experts.down_proj"), [8, 32, 64]);
        assert_eq!(shape("model.layers.3.feed_forward.shared_expert.up_proj.weight"), [32, 64]);
        assert_eq!(shape("model.layers.3.feed_forward.shared_expert.down_proj.weight"), [64, 32]);
        assert!(st.tensor("model.layers.1.feed_forward.gate_proj.weight").is_err());
        assert!(st.tensor("model.layers.0.feed_forward.router.weight").is_err());

        // Norm weights are exactly 1; projections are random with std ≈ 1/√fan_in.
        let values = |name: &str| -> Vec<f32> {
            let t = st.tensor(name).expect(name);
            match dtype {
                SynthDtype::Bf16 => {
                    t.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                SynthDtype::F32 => {
                    t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
            }
        };
        assert!(values("model.layers.2.input_layernorm.weight").iter().all(|&v| v == 1.0));
        let w = values("model.layers.1.feed_forward.experts.gate_up_proj");
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.125).abs() < 0.01, "std {std}");
        assert!(w.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn no_partial_files_are_left_and_rewriting_replaces_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(Preset::Tiny, 0, SynthDtype::Bf16, dir.path());
    write(Preset::Tiny, 5, SynthDtype::F32, dir.path());
    let files = read_dir(dir.path());
    assert!(files.keys().all(|n| !n.ends_with(".partial")));
    let config = read_json(&dir.path().join("config.json"));
    assert_eq!(config["torch_dtype"], "float32");
}

#[test]
fn config_json_matches_the_preset() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(Preset::Tiny, 0, SynthDtype::Bf16, dir.path());
    let config = read_json(&dir.path().join("config.json"));
    assert_eq!(config["architectures"][0], "Llama4ForCausalLM");
    assert_eq!(config["model_type"], "llama4_text");
    assert_eq!(config["moe_layers"], serde_json::json!([1, 3]));
    assert_eq!(config["no_rope_layers"], serde_json::json!([1, 1, 1, 0]));
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["rope_scaling"], serde_json::Value::Null);
    assert_eq!(config["bos_token_id"], 493);
    assert_eq!(config["eos_token_id"], serde_json::json!([494, 500, 501]));
    assert_eq!(config["pad_token_id"], 505);
    let generation = read_json(&dir.path().join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], config["eos_token_id"]);
    let tok_config = read_json(&dir.path().join("tokenizer_config.json"));
    assert_eq!(tok_config["chat_template"], LLAMA4_CHAT_TEMPLATE);
    assert_eq!(tok_config["bos_token"], "<|begin_of_text|>");
    assert_eq!(tok_config["eos_token"], "<|eot|>");
    assert_eq!(tok_config["added_tokens_decoder"]["501"]["content"], "<|eot|>");

    let maverick = config::config_json(&Preset::MaverickMini.config(), SynthDtype::Bf16);
    let odd: Vec<usize> = (1..12).step_by(2).collect();
    assert_eq!(maverick["moe_layers"], serde_json::json!(odd));
    assert_eq!(maverick["num_local_experts"], 128);
    assert_eq!(maverick["use_qk_norm"], false);
    let nope: Vec<usize> = (0..12).filter(|l| (l + 1) % 4 == 0).collect();
    let rope_flags = maverick["no_rope_layers"].as_array().expect("list");
    for (l, flag) in rope_flags.iter().enumerate() {
        assert_eq!(flag.as_u64() == Some(0), nope.contains(&l), "layer {l}");
    }

    let scout = config::config_json(&Preset::ScoutMini.config(), SynthDtype::Bf16);
    assert_eq!(scout["moe_layers"], serde_json::json!((0..12).collect::<Vec<_>>()));
    assert_eq!(scout["use_qk_norm"], true);
    assert_eq!(scout["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(scout["rope_scaling"]["factor"], 16.0);
    assert_eq!(scout["bos_token_id"], 32768 - 19);
}

fn check_tokenizer(tok: &tokenizers::Tokenizer, vocab_size: usize) {
    assert_eq!(tok.get_vocab_size(true), vocab_size);
    let ids = SpecialIds::for_vocab(vocab_size);
    let texts = [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnew lines\r\n\n  ",
        "Numbers 1234567 and 3.14159; code: fn main() { println!(\"hi\"); }",
        "café naïve résumé über déjà vu",
        "日本語のテキスト, 中文, 한국어, привет, Ελληνικά",
        "emoji 🙂🚀👩‍👩‍👧 and symbols ∑∫√ ≠ ≤",
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|eot|><|patch|><|image|>",
        "",
    ];
    for text in texts {
        let enc = tok.encode(text, false).expect("encode");
        assert!(enc.get_ids().iter().all(|&id| (id as usize) < vocab_size), "{text}");
        let back = tok.decode(enc.get_ids(), false).expect("decode");
        assert_eq!(back, text);
    }
    for (k, special) in SPECIAL_TOKENS.iter().enumerate() {
        let enc = tok.encode(*special, false).expect("encode");
        assert_eq!(enc.get_ids(), [ids.first + k as u32], "{special}");
    }
    // The post-processor prepends BOS.
    let enc = tok.encode("Hello", true).expect("encode");
    assert_eq!(enc.get_ids()[0], ids.bos);
    // Every id decodes.
    for id in 0..vocab_size as u32 {
        assert!(tok.id_to_token(id).is_some(), "id {id} has no token");
    }
}

#[test]
fn tiny_tokenizer_round_trips_and_keeps_ids_in_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(Preset::Tiny, 0, SynthDtype::Bf16, dir.path());
    let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).expect("load");
    check_tokenizer(&tok, 512);
}

#[test]
fn mini_tokenizer_round_trips_and_fills_the_vocabulary() {
    let cfg = Preset::MaverickMini.config();
    let json = tokenizer::build_tokenizer_json(&cfg).expect("build");
    let tok = tokenizers::Tokenizer::from_str(&json).expect("load");
    check_tokenizer(&tok, cfg.vocab_size);
    // Trained merges are real English pieces.
    let enc = tok.encode(" the river", false).expect("encode");
    assert_eq!(enc.get_tokens(), ["Ġthe", "Ġriver"]);
    // Deterministic.
    assert_eq!(json, tokenizer::build_tokenizer_json(&cfg).expect("build"));
}

#[test]
fn parameter_counts_match_the_presets() {
    let maverick = parameter_count(&Preset::MaverickMini.config());
    assert!((0.71e9..0.73e9).contains(&(maverick as f64)), "{maverick}");
    let scout = parameter_count(&Preset::ScoutMini.config());
    assert!((0.5e9..0.65e9).contains(&(scout as f64)), "{scout}");
    let tiny = parameter_count(&Preset::Tiny.config());
    assert!(tiny < 300_000, "{tiny}");
    for preset in Preset::all() {
        preset.config().validate().expect("valid preset");
    }
}

#[test]
fn names_parse_and_print() {
    for preset in Preset::all() {
        assert_eq!(Preset::from_str(&preset.to_string()).expect("parse"), preset);
    }
    assert!(Preset::from_str("maverick").is_err());
    assert_eq!("bf16".parse::<SynthDtype>().expect("parse"), SynthDtype::Bf16);
    assert_eq!("f32".parse::<SynthDtype>().expect("parse"), SynthDtype::F32);
    assert!("fp8".parse::<SynthDtype>().is_err());
}
