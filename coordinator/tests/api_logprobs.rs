//! Logprobs through the OpenAI API (chat and completions, plain and streamed) over the golden
//! checkpoint's engine in process: the numbers are the raw model's log-softmax, checked against
//! the prompt's last logits computed independently, and the request checks are 400s.

mod api_support;

use api_support::*;
use axum::http::StatusCode;
use herd_worker::engine::request::{Event, Request as EngineRequest};
use serde_json::{Value, json};

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me"}], "temperature": 0});
    body.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
    body
}

/// `log_softmax` of the logits after the prompt, in f64, from the engine's prompt-logits report.
fn first_step_logprobs(ids: Vec<u32>) -> Vec<f64> {
    let frontend = frontend();
    let mut engine = engine(&frontend, 64 << 20);
    let params = greedy(1);
    engine
        .submit(EngineRequest { id: 1, prompt: ids, params, prompt_logits: true, images: Vec::new() })
        .expect("submit");
    loop {
        for event in engine.step().expect("step").0 {
            if let Event::PromptLogits { last_logits, .. } = event {
                let max = last_logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let z: f64 = last_logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
                return last_logits.iter().map(|&l| l as f64 - z).collect();
            }
        }
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_are_the_models_log_softmax() {
    let api = local();
    let body = chat(json!({"max_tokens": 6, "logprobs": true, "top_logprobs": 3}));
    let (status, whole) = post_json(&api.state, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(content.len(), whole["usage"]["completion_tokens"].as_u64().expect("usage") as usize);
    for entry in content {
        let top = entry["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the best one.
        assert_eq!(entry["token"], top[0]["token"]);
        assert_eq!(f(&entry["logprob"]), f(&top[0]["logprob"]));
        assert!(top.windows(2).all(|w| f(&w[0]["logprob"]) >= f(&w[1]["logprob"])));
        assert!(top.iter().all(|t| f(&t["logprob"]) <= 0.0));
        let bytes: Vec<u8> =
            entry["bytes"].as_array().expect("bytes").iter().map(|b| b.as_u64().expect("byte") as u8).collect();
        assert_eq!(bytes, entry["token"].as_str().expect("token").as_bytes());
    }
    // The first token's numbers, against an independent log-softmax of the prompt's logits.
    let reference = first_step_logprobs(chat_ids(&api.frontend, "Tell me"));
    let mut order: Vec<usize> = (0..reference.len()).collect();
    order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]).then(a.cmp(&b)));
    for (k, t) in content[0]["top_logprobs"].as_array().expect("top").iter().enumerate() {
        let want_text = api.frontend.tokenizer.decode(&[order[k] as u32], false).expect("decode");
        assert_eq!(t["token"], want_text.as_str());
        assert!((f(&t["logprob"]) - reference[order[k]]).abs() < 1e-4, "{t} vs {}", reference[order[k]]);
    }

    // Streamed: the same entries, one per chunk.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (status, _, text) = send(&api.state, post("/v1/chat/completions", &streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let mut entries = Vec::new();
    for data in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).expect("chunk");
        if let Some(list) = chunk["choices"][0]["logprobs"]["content"].as_array() {
            entries.extend(list.iter().cloned());
        }
    }
    assert_eq!(&entries, content);

    // Without logprobs, the field stays null.
    let (_, plain) = post_json(&api.state, "/v1/chat/completions", chat(json!({"max_tokens": 2}))).await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_logprobs_have_openais_parallel_lists() {
    let api = local();
    let body = json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 2});
    let (status, whole) = post_json(&api.state, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let lp = &whole["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 5);
    assert_eq!(lp["token_logprobs"].as_array().expect("token_logprobs").len(), 5);
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().expect("offsets").iter().map(|o| o.as_u64().expect("u64")).collect();
    assert_eq!(offsets[0], 0);
    for i in 1..5 {
        let prev = tokens[i - 1].as_str().expect("token").chars().count() as u64;
        assert_eq!(offsets[i], offsets[i - 1] + prev);
    }
    for (i, top) in lp["top_logprobs"].as_array().expect("top").iter().enumerate() {
        let top = top.as_object().expect("map");
        assert!(!top.is_empty() && top.len() <= 2);
        let best = top.values().map(f).fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(best, f(&lp["token_logprobs"][i]), "greedy picks the best token");
    }

    // Streamed: the lists of all chunks concatenate to the whole.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, _, text) = send(&api.state, post("/v1/completions", &streamed)).await;
    let (mut got_tokens, mut got_offsets) = (Vec::new(), Vec::new());
    for data in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).expect("chunk");
        let lp = &chunk["choices"][0]["logprobs"];
        if !lp.is_null() {
            got_tokens.extend(lp["tokens"].as_array().expect("tokens").iter().cloned());
            got_offsets.extend(lp["text_offset"].as_array().expect("offsets").iter().map(|o| o.as_u64().expect("u64")));
        }
    }
    assert_eq!(&got_tokens, tokens);
    assert_eq!(got_offsets, offsets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprob_mistakes_are_400() {
    let api = local();
    let cases = [
        ("/v1/chat/completions", chat(json!({"logprobs": true, "top_logprobs": 21})), "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"logprobs": true, "top_logprobs": -1})), "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"top_logprobs": 2})), "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"logprobs": 3})), "logprobs"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "a", "logprobs": 21}), "logprobs"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "a", "logprobs": true}), "logprobs"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "a", "logprobs": 1, "echo": true}), "logprobs"),
    ];
    for (path, body, param) in cases {
        let (status, response) = post_json(&api.state, path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {response}");
        assert_eq!(envelope(&response)["param"], param, "{body}");
    }
}
