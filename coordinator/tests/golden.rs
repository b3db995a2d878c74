//! `herd eval` against transformers' outputs on the committed tiny Llama 4 checkpoints
//! (`testdata/golden/*`, written by `tools/golden/make_golden.py`).
//!
//! Each case runs the real binary on its input.json and requires, per prompt: identical
//! input ids (chat template + tokenizer, and for image prompts the expanded image token
//! blocks), max |Δ last logits| ≤ 2e-3 in f32, argmax equal at every prompt position, and
//! identical greedy continuations.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const LOGIT_TOLERANCE: f64 = 2e-3;

fn golden_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden").join(case)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id")).collect()
}

/// `herd eval --dtype f32` on `case`'s input with `extra` flags; its output JSON.
fn run_eval(case: &str, extra: &[&str]) -> Value {
    let dir = golden_dir(case);
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let status = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["eval", "--dtype", "f32", "--model"])
        .arg(dir.join("model"))
        .arg("--input")
        .arg(dir.join("input.json"))
        .arg("--output")
        .arg(out.path())
        .args(extra)
        .status()
        .expect("run herd");
    assert!(status.success(), "herd eval {extra:?} failed on {case}");
    read_json(out.path())
}

/// `actual` against `case`'s expected.json, prompt by prompt.
fn check(case: &str, actual: &Value, label: &str) {
    let expected = read_json(&golden_dir(case).join("expected.json"));
    assert_eq!(actual["dtype"], "f32");
    let (exp, act) = (expected["prompts"].as_array().expect("prompts"), actual["prompts"].as_array().expect("prompts"));
    assert_eq!(exp.len(), act.len(), "{label}: prompt count");
    for (e, a) in exp.iter().zip(act) {
        let name = e["name"].as_str().expect("name");
        assert_eq!(a["name"], e["name"]);
        assert_eq!(ids(&a["input_ids"]), ids(&e["input_ids"]), "{label}/{name}: input ids");
        let (el, al) = (e["last_logits"].as_array().expect("logits"), a["last_logits"].as_array().expect("logits"));
        assert_eq!(el.len(), al.len(), "{label}/{name}: vocab size");
        let max_diff =
            el.iter().zip(al).map(|(x, y)| (x.as_f64().expect("f") - y.as_f64().expect("f")).abs()).fold(0.0, f64::max);
        assert!(max_diff <= LOGIT_TOLERANCE, "{label}/{name}: max |Δlogit| {max_diff} > {LOGIT_TOLERANCE}");
        assert_eq!(ids(&a["argmax"]), ids(&e["argmax"]), "{label}/{name}: argmax per position");
        assert_eq!(ids(&a["greedy_new_ids"]), ids(&e["greedy_new_ids"]), "{label}/{name}: greedy tokens");
        let patches = e.get("patch_tokens").map_or(String::new(), |p| format!(" ({p} patch tokens)"));
        eprintln!(
            "{label}/{name}: {} prompt ids{patches}, max |Δlogit| {max_diff:.2e}, greedy identical",
            ids(&e["input_ids"]).len()
        );
    }
}

fn check_case(case: &str) {
    check(case, &run_eval(case, &[]), case);
}

/// Maverick shape: MoE on odd layers, dense even layers, no QK-norm, sharded f32 weights,
/// transformers-5 config layout.
#[test]
fn maverick_shape_matches_transformers() {
    check_case("maverick");
}

/// Scout shape: all-MoE, QK-norm, llama3 rope scaling with a blend band; saved as
/// Llama4ForConditionalGeneration in bf16 with the Hub config layout.
#[test]
fn scout_shape_conditional_bf16_hub_layout_matches_transformers() {
    check_case("scout");
}

/// Scout shape with Scout-Instruct's rope scaling (low = high frequency factor: no blend band).
#[test]
fn scout_shape_without_blend_band_matches_transformers() {
    check_case("scout-v5");
}

/// Image prompts (`testdata/golden/vision`, written by `tools/golden/make_golden_vision.py`):
/// input ids with the expanded image token blocks, logits and greedy tokens, batched with a
/// text prompt; the same with two expert-parallel worker processes.
#[test]
fn image_prompts_match_transformers_locally_and_expert_parallel() {
    // A small step budget splits the image prompts into several prefill chunks, some of which
    // cut through an image's patch tokens.
    check("vision", &run_eval("vision", &["--max-step-tokens", "40"]), "vision local");
    check("vision", &run_eval("vision", &["--workers", "2"]), "vision workers=2");
}
