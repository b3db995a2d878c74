//! Expert parallelism across real `herd worker` processes on 127.0.0.1.
//!
//! - Distributed equals local: the golden prompts give the same logits (within 1e-5; in
//!   practice bit-identical) and greedy tokens on 1–4 workers under every placement.
//! - Concurrent requests of mixed lengths spread over workers give what they give alone.
//! - Killing a worker mid-generation fails the survivors' requests within the deadline and
//!   they exit, instead of hanging.

use herd_coordinator::local_cluster::{ClusterOptions, LocalCluster, WorkerMsg};
use herd_worker::control::{FromWorker, ToWorker};
use herd_worker::engine::request::{Event, Request};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::frontend::Frontend;
use herd_worker::placement::{MoeShape, Placement};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden").join(case)
}

fn eval(model: &Path, input: &Path, extra: &[&str]) -> Value {
    let out = tempfile::NamedTempFile::new().expect("tmp");
    let status = Process::new(env!("CARGO_BIN_EXE_herd"))
        .args(["eval", "--dtype", "f32", "--kv-cache-bytes", "256M", "--model"])
        .arg(model)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(out.path())
        .args(extra)
        .status()
        .expect("run herd eval");
    assert!(status.success(), "herd eval {extra:?} failed");
    serde_json::from_str(&std::fs::read_to_string(out.path()).expect("read")).expect("json")
}

fn max_logit_diff(a: &Value, b: &Value) -> f64 {
    let (a, b) = (a["last_logits"].as_array().expect("logits"), b["last_logits"].as_array().expect("logits"));
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x.as_f64().expect("f") - y.as_f64().expect("f")).abs()).fold(0.0, f64::max)
}

fn assert_same(local: &Value, dist: &Value, what: &str) {
    let (lp, dp) = (local["prompts"].as_array().expect("prompts"), dist["prompts"].as_array().expect("prompts"));
    assert_eq!(lp.len(), dp.len());
    for (l, d) in lp.iter().zip(dp) {
        let name = l["name"].as_str().expect("name");
        let diff = max_logit_diff(l, d);
        assert!(diff <= 1e-5, "{what}/{name}: logits differ by {diff}");
        assert_eq!(l["argmax"], d["argmax"], "{what}/{name}: argmax");
        assert_eq!(l["greedy_new_ids"], d["greedy_new_ids"], "{what}/{name}: greedy tokens");
    }
}

#[test]
fn distributed_equals_local_for_every_worker_count_and_placement() {
    for case in ["maverick", "scout"] {
        let (model, input) = (golden(case).join("model"), golden(case).join("input.json"));
        let local = eval(&model, &input, &[]);
        for workers in 1..=4 {
            for placement in ["round-robin", "skewed", "replicated"] {
                let w = workers.to_string();
                let dist = eval(&model, &input, &["--workers", &w, "--placement", placement]);
                assert_same(&local, &dist, &format!("{case} on {workers} workers, {placement}"));
            }
        }
    }
}

#[test]
fn sixteen_mixed_requests_over_workers_match_each_run_alone() {
    let case = golden("maverick");
    let model = case.join("model");
    let vocab = 384;
    let prompts: Vec<Value> = (0..16u64)
        .map(|i| {
            let len = 1 + (i * 17) % 90;
            let ids: Vec<u64> = (0..len).map(|j| (j * 7919 + i * 104729 + 5) % (vocab - 20) + 3).collect();
            serde_json::json!({"name": format!("r{i}"), "input_ids": ids})
        })
        .collect();
    let dir = tempfile::tempdir().expect("tmp");
    let all = dir.path().join("all.json");
    std::fs::write(&all, serde_json::json!({"max_new_tokens": 20, "prompts": prompts}).to_string()).expect("write");
    // A small step budget makes prefill chunks of different requests share steps.
    let together = eval(&model, &all, &["--workers", "3", "--max-step-tokens", "40"]);
    for (i, p) in prompts.iter().enumerate() {
        let one = dir.path().join(format!("one{i}.json"));
        std::fs::write(&one, serde_json::json!({"max_new_tokens": 20, "prompts": [p]}).to_string()).expect("write");
        let alone = eval(&model, &one, &[]);
        let t = &together["prompts"][i];
        let a = &alone["prompts"][0];
        assert_eq!(t["greedy_new_ids"], a["greedy_new_ids"], "request {i}");
        assert_eq!(t["argmax"], a["argmax"], "request {i}");
        assert_eq!(max_logit_diff(t, a), 0.0, "request {i}");
    }
}

#[test]
fn killing_a_worker_mid_generation_fails_the_others_within_the_deadline() {
    let deadline_ms = 700;
    let model_dir = golden("scout").join("model");
    let text = Frontend::load(&model_dir).expect("the golden scout checkpoint").config.text;
    let shape = MoeShape { moe_layers: text.moe_layers(), experts: text.num_local_experts };
    let opts = ClusterOptions {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_herd")),
        workers: 3,
        model_dir,
        placement: Placement::round_robin(3, &shape),
        step_timeout: Duration::from_millis(deadline_ms),
        worker_args: ["--dtype", "f32", "--kv-cache-bytes", "64M"].map(String::from).to_vec(),
        rank_args: Vec::new(),
        threads: Some(1),
        start_timeout: Duration::from_secs(60),
        observe: true,
    };
    let mut cluster = LocalCluster::start(&opts).expect("start");
    for rank in 0..3 {
        let params =
            SamplingParams { temperature: 0.0, max_tokens: 20_000, ignore_eos: true, ..SamplingParams::default() };
        let req =
            Request { id: rank as u64, prompt: vec![10, 20, 30], params, prompt_logits: false, images: Vec::new() };
        cluster.send(rank, ToWorker::Submit(req)).expect("submit");
    }
    // Let every request produce tokens, then kill worker 1.
    let mut tokens = [0usize; 3];
    while tokens.iter().any(|&t| t < 5) {
        match cluster.recv(Duration::from_secs(30)).expect("tokens flow") {
            (rank, WorkerMsg::Message(FromWorker::Event(Event::Token { .. }))) => tokens[rank] += 1,
            (rank, WorkerMsg::Message(FromWorker::Rejected { reason, .. })) => {
                panic!("worker {rank} rejected: {reason}")
            }
            (_, WorkerMsg::Message(_)) => {}
            (rank, WorkerMsg::Closed) => panic!("worker {rank} exited early"),
        }
    }
    cluster.kill(1).expect("kill");
    let killed_at = Instant::now();
    let (mut aborted, mut fatal, mut closed) = ([false; 3], [false; 3], [false; 3]);
    while !(closed[0] && closed[2]) {
        let Some((rank, msg)) = cluster.recv(Duration::from_secs(20)) else {
            panic!("survivors did not exit: aborted {aborted:?}, fatal {fatal:?}, closed {closed:?}");
        };
        match msg {
            WorkerMsg::Message(FromWorker::Event(Event::Aborted { reason, .. })) => {
                let error = reason.to_string();
                assert!(error.contains("rank 1") || error.contains("lost") || error.contains("deadline"), "{error}");
                aborted[rank] = true;
            }
            WorkerMsg::Message(FromWorker::GroupFailed { .. }) => fatal[rank] = true,
            WorkerMsg::Closed => closed[rank] = true,
            WorkerMsg::Message(_) => {}
        }
    }
    let took = killed_at.elapsed();
    assert!(aborted[0] && aborted[2], "every survivor's request ends with an error");
    assert!(fatal[0] && fatal[2], "every survivor reports why it left");
    assert!(took < Duration::from_millis(deadline_ms) * 2 + Duration::from_secs(3), "took {took:?}");
    let codes = cluster.shutdown(Duration::from_secs(10));
    assert_eq!(codes[0], Some(1));
    assert_eq!(codes[2], Some(1));
}
