//! The official `openai` Python client against `herd serve` (1 coordinator, 2 worker
//! processes):
//! - on the golden text checkpoint: chat, streaming, completions, models and the error cases
//!   (`tools/openai/check_serve.py` does the checking);
//! - on the golden multimodal checkpoint: base64 images get completions, malformed images get
//!   400s and the server keeps serving (`tools/openai/check_vision.py`).
//!
//! `.ci/run` installs the client and sets `HERD_REQUIRE_OPENAI=1`, so in CI a missing client
//! is a failure; elsewhere the tests say how to install it and pass without running.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether the client is importable; panics when CI requires it and it is not.
fn has_client() -> bool {
    let has = Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has {
        assert!(
            std::env::var_os("HERD_REQUIRE_OPENAI").is_none(),
            "the openai Python package is required (python3 -m pip install openai)"
        );
        eprintln!("SKIPPED: no `openai` Python package (python3 -m pip install openai); .ci/run installs it");
    }
    has
}

/// Start `herd serve` on `model` (2 workers, f32, on a free loopback port) with `serve_args`,
/// run `tools/openai/{script}` against it with `--base-url` and `script_args`, stop the server
/// and assert the script succeeded.
fn check_with_client(model: &Path, serve_args: &[&str], script: &str, script_args: &[&str]) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--workers", "2", "--listen", &addr.to_string(), "--dtype", "f32", "--kv-cache-bytes", "64M"])
        .args(serve_args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start herd serve");
    let stdout = serve.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let started = Instant::now();
    loop {
        let line = lines.next().expect("herd serve exited before it was ready").expect("read");
        if line.starts_with("herd serve: OpenAI API") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "herd serve did not get ready");
    }
    let out = Command::new("python3")
        .arg(root().join("tools/openai").join(script))
        .args(["--base-url", &format!("http://{addr}/v1")])
        .args(script_args)
        .output()
        .expect("run the openai client");
    // SIGTERM lets `herd serve` stop its coordinator and workers before it exits.
    let _ = Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let _ = serve.wait();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn official_openai_client_against_herd_serve() {
    if !has_client() {
        return;
    }
    check_with_client(
        &root().join("testdata/golden/maverick/model"),
        &["--served-model-name", "golden", "--api-key", "sk-test"],
        "check_serve.py",
        &["--model", "golden", "--api-key", "sk-test"],
    );
}

#[test]
fn official_openai_client_sends_images_to_herd_serve() {
    if !has_client() {
        return;
    }
    let case = root().join("testdata/golden/vision");
    let case_arg = case.to_str().expect("utf-8 path");
    check_with_client(
        &case.join("model"),
        &["--served-model-name", "golden-vision", "--max-images-per-request", "3"],
        "check_vision.py",
        &["--model", "golden-vision", "--max-images", "3", "--case", case_arg],
    );
}
