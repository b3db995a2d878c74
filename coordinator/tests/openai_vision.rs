//! The official `openai` Python client sends base64 images to `herd serve` (1 coordinator, 2
//! expert-parallel worker processes) on the golden multimodal checkpoint; malformed images get
//! 400s and the server keeps serving (`tools/openai/check_vision.py` does the checking).
//!
//! Like `openai_client.rs`: without the client the test says how to install it and passes,
//! unless `.ci/run` asks for it (`HERD_REQUIRE_OPENAI=1`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn official_openai_client_sends_images_to_herd_serve() {
    let has_client = Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has_client {
        assert!(
            std::env::var_os("HERD_REQUIRE_OPENAI").is_none(),
            "the openai Python package is required (python3 -m pip install openai)"
        );
        eprintln!("SKIPPED: no `openai` Python package (python3 -m pip install openai); .ci/run installs it");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let case = root.join("testdata/golden/vision");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("serve")
        .arg("--model")
        .arg(case.join("model"))
        .args(["--served-model-name", "golden-vision", "--workers", "2", "--listen", &addr.to_string()])
        .args(["--dtype", "f32", "--kv-cache-bytes", "64M", "--max-images-per-request", "3"])
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
        .arg(root.join("tools/openai/check_vision.py"))
        .args(["--base-url", &format!("http://{addr}/v1"), "--model", "golden-vision", "--max-images", "3"])
        .arg("--case")
        .arg(&case)
        .output()
        .expect("run the openai client");
    // SIGTERM lets `herd serve` stop its coordinator and workers before it exits.
    let _ = Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let _ = serve.wait();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "openai vision checks failed:\n{}", String::from_utf8_lossy(&out.stderr));
}
