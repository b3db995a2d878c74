//! The official `openai` Python client against `herd serve` (1 coordinator, 2 worker
//! processes): chat, streaming, completions, models and the error cases
//! (`tools/openai/check_serve.py` does the checking).
//!
//! `.ci/run` installs the client and sets `HERD_REQUIRE_OPENAI=1`, so in CI a missing client
//! is a failure; elsewhere the test says how to install it and passes without running.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn official_openai_client_against_herd_serve() {
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
    let addr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("serve")
        .arg("--model")
        .arg(root.join("testdata/golden/maverick/model"))
        .args(["--served-model-name", "golden", "--workers", "2", "--listen", &addr.to_string()])
        .args(["--dtype", "f32", "--kv-cache-bytes", "64M", "--api-key", "sk-test"])
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
        .arg(root.join("tools/openai/check_serve.py"))
        .args(["--base-url", &format!("http://{addr}/v1"), "--model", "golden", "--api-key", "sk-test"])
        .output()
        .expect("run the openai client");
    // SIGTERM lets `herd serve` stop its coordinator and workers before it exits.
    let _ = Command::new("kill").args(["-TERM", &serve.id().to_string()]).status();
    let _ = serve.wait();
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "openai client checks failed:\n{}", String::from_utf8_lossy(&out.stderr));
}
