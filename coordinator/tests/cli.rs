//! The `herd` binary end to end: generation on a synthesised preset, and bad inputs that must
//! fail with one readable line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn herd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herd")).args(args).output().expect("run herd")
}

/// Asserts a clean failure and returns its stderr.
fn expect_clean_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want a one-line error, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    stderr
}

fn golden_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/scout-v5/model")
}

/// A private copy of a golden checkpoint to break.
fn copy_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(golden_model()).expect("golden model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

fn generate_on(model: &Path) -> Output {
    herd(&["generate", "--model", model.to_str().expect("utf8"), "--prompt", "hello", "--max-tokens", "4"])
}

#[test]
fn generate_streams_text_then_a_stats_line_on_a_synth_preset() {
    let cache = tempfile::tempdir().expect("tmp");
    let cache_dir = cache.path().to_str().expect("utf8");
    let args = ["generate", "--model", "tiny", "--cache-dir", cache_dir, "--chat", "Hi there", "--max-tokens", "12"];
    let out = herd(&[&args[..], &["--temperature", "0.8", "--seed", "7"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("a stats line");
    assert!(last.starts_with("[herd] "), "{stdout}");
    assert!(last.contains("tok/s") && last.contains("peak RSS"), "{last}");
    // The preset was synthesised once into the cache and is reused; same seed, same text.
    let again = herd(&[&args[..], &["--temperature", "0.8", "--seed", "7"]].concat());
    assert!(again.status.success());
    let text = |s: &str| s.rsplit_once("\n[herd]").map(|(t, _)| t.to_owned()).unwrap_or_default();
    assert_eq!(text(&stdout), text(&String::from_utf8_lossy(&again.stdout)));
}

#[test]
fn missing_model_directory() {
    let err = expect_clean_error(&generate_on(Path::new("/nonexistent/herd-model")));
    assert!(err.contains("no such directory, and not a preset"), "{err}");
}

#[test]
fn config_of_another_architecture() {
    let dir = copy_model();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#)
        .expect("write");
    let err = expect_clean_error(&generate_on(dir.path()));
    assert!(err.contains("not a Llama 4 checkpoint"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let dir = copy_model();
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&path).expect("open").set_len(len / 2).expect("truncate");
    let err = expect_clean_error(&generate_on(dir.path()));
    assert!(err.contains("model.safetensors") && err.contains("truncated or corrupt"), "{err}");
}

#[test]
fn unknown_tokenizer() {
    let dir = copy_model();
    std::fs::write(dir.path().join("tokenizer.json"), r#"{"version": "1.0", "model": {"type": "SentencePieceV9"}}"#)
        .expect("write");
    let err = expect_clean_error(&generate_on(dir.path()));
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn missing_tokenizer() {
    let dir = copy_model();
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    let err = expect_clean_error(&generate_on(dir.path()));
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn missing_tensor_names_the_tensor() {
    let dir = copy_model();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).expect("read")).expect("json");
    config["num_hidden_layers"] = serde_json::json!(5);
    config["layer_types"] = serde_json::Value::Null;
    config["no_rope_layers"] = serde_json::Value::Null;
    config["moe_layers"] = serde_json::Value::Null;
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
    let err = expect_clean_error(&generate_on(dir.path()));
    assert!(err.contains("layers.4.") && err.contains("missing"), "{err}");
}

#[test]
fn eval_with_missing_or_bad_input() {
    let model = golden_model();
    let model = model.to_str().expect("utf8");
    let out_dir = tempfile::tempdir().expect("tmp");
    let output = out_dir.path().join("out.json");
    let output = output.to_str().expect("utf8");
    let err =
        expect_clean_error(&herd(&["eval", "--model", model, "--input", "/nonexistent.json", "--output", output]));
    assert!(err.contains("/nonexistent.json"), "{err}");
    for (bad, needle) in [
        ("{", "not valid JSON"),
        (r#"{"prompts": [{"name": "x"}]}"#, "exactly one of"),
        (r#"{"prompts": [{"name": "x", "input_ids": [999999]}]}"#, "outside the vocabulary"),
        (r#"{"prompts": [{"name": "x", "input_ids": []}]}"#, "no tokens"),
        (r#"{"prompts": [{"name": "x", "messages": []}]}"#, "empty conversation"),
    ] {
        let input = out_dir.path().join("in.json");
        std::fs::write(&input, bad).expect("write");
        let err = expect_clean_error(&herd(&[
            "eval",
            "--model",
            model,
            "--input",
            input.to_str().expect("utf8"),
            "--output",
            output,
        ]));
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

#[test]
fn invalid_sampling_flags_are_rejected() {
    let err = expect_clean_error(&herd(&[
        "generate",
        "--model",
        golden_model().to_str().expect("utf8"),
        "--prompt",
        "x",
        "--top-p",
        "1.5",
    ]));
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn synth_refuses_a_non_empty_directory_without_force() {
    let dir = copy_model();
    let err = expect_clean_error(&herd(&["synth", "--preset", "tiny", "--out", dir.path().to_str().expect("utf8")]));
    assert!(err.contains("--force"), "{err}");
}

#[test]
fn quantize_names_a_missing_input_directory() {
    let out = tempfile::tempdir().expect("tmp");
    let missing = out.path().join("no-such-checkpoint");
    let target = out.path().join("fp8");
    let args = ["quantize", "--format", "fp8", "--in", missing.to_str().expect("utf8")];
    let err = expect_clean_error(&herd(&[&args[..], &["--out", target.to_str().expect("utf8")]].concat()));
    assert!(err.contains("--in") && err.contains("no-such-checkpoint"), "{err}");
    assert!(!err.contains("different directories"), "{err}");
}

#[test]
fn device_cuda_without_a_usable_gpu_is_a_one_line_error_on_every_model_command() {
    // This runs where CI runs: no GPU. A build without the feature must say so; a `cuda` build
    // must name what is missing (driver library or device) instead of panicking in cudarc.
    let model = golden_model();
    let m = model.to_str().expect("utf8");
    let commands: [&[&str]; 5] = [
        &["generate", "--model", m, "--prompt", "x"],
        &["eval", "--model", m, "--input", "/nonexistent.json", "--output", "/nonexistent-out.json"],
        &["bench", "--model", m],
        &["serve", "--model", m],
        &["worker", "--model", m, "--rank", "0", "--world", "1"],
    ];
    for args in commands {
        for device in ["cuda", "cuda:1"] {
            let mut argv = args.to_vec();
            argv.extend(["--device", device]);
            let err = expect_clean_error(&herd(&argv));
            assert!(
                err.contains(&format!("--device {}", if device == "cuda" { "cuda:0" } else { device })),
                "{argv:?}: {err}"
            );
            if cfg!(feature = "cuda") {
                assert!(err.contains("libcuda.so not found") || err.contains("no CUDA device"), "{argv:?}: {err}");
            } else {
                assert!(err.contains("this herd was built without the `cuda` feature"), "{argv:?}: {err}");
            }
        }
    }
    let out = herd(&["generate", "--model", m, "--prompt", "x", "--device", "gpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use cpu, cuda or cuda:N"));
}
