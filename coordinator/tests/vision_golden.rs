//! `herd eval` on image prompts against transformers (`testdata/golden/vision`, written by
//! `tools/golden/make_golden_vision.py`): per prompt, identical input ids (with the expanded
//! image token blocks), max |Δ last logits| ≤ 2e-3 in f32, argmax equal at every prompt
//! position, identical greedy continuations. The image prompts are batched with a text prompt,
//! and the same run with two expert-parallel worker processes must give the same numbers.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const LOGIT_TOLERANCE: f64 = 2e-3;

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/vision")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id")).collect()
}

fn run_eval(extra: &[&str]) -> Value {
    let dir = case_dir();
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
    assert!(status.success(), "herd eval {extra:?} failed");
    read_json(out.path())
}

fn check(actual: &Value, label: &str) {
    let expected = read_json(&case_dir().join("expected.json"));
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
        eprintln!(
            "{label}/{name}: {} prompt ids ({} patch tokens), max |Δlogit| {max_diff:.2e}, greedy identical",
            ids(&e["input_ids"]).len(),
            e["patch_tokens"]
        );
    }
}

#[test]
fn image_prompts_match_transformers_locally_and_expert_parallel() {
    // A small step budget splits the image prompts into several prefill chunks, some of which
    // cut through an image's patch tokens.
    check(&run_eval(&["--max-step-tokens", "40"]), "local");
    check(&run_eval(&["--workers", "2"]), "workers=2");
}
