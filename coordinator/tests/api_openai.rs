//! The OpenAI API through the router (tower `oneshot`), over the golden checkpoint's engine in
//! process: answers equal what the engine gives directly, response shapes are OpenAI's, and
//! every client mistake is a 4xx in the error envelope.

mod api_support;

use api_support::*;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use herd_coordinator::api::{InferenceService, ServiceError};
use herd_worker::engine::request::{AbortReason, Event, Rejection};
use herd_worker::engine::stop::StopReason;
use serde_json::{Value, json};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_chat_equals_the_engine() {
    let api = local();
    let ids = chat_ids(&api.frontend, "Hello there");
    let (text, tokens, reason) = run_engine(&api.frontend, ids.clone(), greedy(24));
    let (status, body) =
        post_json(&api.state, "/v1/chat/completions", chat("Hello there", json!({"max_tokens": 24, "temperature": 0})))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<&str> = body.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, ["id", "object", "created", "model", "choices", "usage"]);
    assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().expect("created") > 1_700_000_000);
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(body["choices"].as_array().expect("choices").len(), 1);
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"], json!({"role": "assistant", "content": text}));
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], reason.finish_reason().as_str());
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": ids.len(), "completion_tokens": tokens, "total_tokens": ids.len() + tokens})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_text_and_token_prompts_equal_the_engine() {
    let api = local();
    let prompt = "Once upon a time";
    let ids = api.frontend.tokenizer.encode(prompt, true).expect("encode");
    let (text, tokens, reason) = run_engine(&api.frontend, ids.clone(), greedy(12));

    let (status, body) = post_json(
        &api.state,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "text": text, "logprobs": null, "finish_reason": reason.finish_reason().as_str()}])
    );
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    assert_eq!(body["usage"]["completion_tokens"], tokens);

    // The same prompt as token ids, echoed.
    let (status, body) = post_json(
        &api.state,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 12, "temperature": 0, "echo": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let echoed = api.frontend.tokenizer.decode(&ids, false).expect("decode");
    assert_eq!(body["choices"][0]["text"], format!("{echoed}{text}"));

    // A list of prompts, n each: index = prompt * n + j; each prompt's tokens count once.
    let (status, body) = post_json(
        &api.state,
        "/v1/completions",
        json!({"prompt": [prompt, prompt], "n": 2, "max_tokens": 12, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choices = body["choices"].as_array().expect("choices");
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().expect("index")).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(choices.iter().all(|c| c["text"] == text));
    assert_eq!(body["usage"]["prompt_tokens"], 2 * ids.len());
    assert_eq!(body["usage"]["completion_tokens"], 4 * tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_distinct_requests_with_seed_plus_index() {
    let api = local();
    let ids = chat_ids(&api.frontend, "Pick a word");
    let body = chat(
        "Pick a word",
        json!({"n": 2, "max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 42, "ignore_eos": true}),
    );
    let (status, response) = post_json(&api.state, "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    let choices = response["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    for (j, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], j);
        let params = herd_worker::engine::sampler::SamplingParams {
            temperature: 1.0,
            seed: Some(42 + j as u64),
            max_tokens: 10,
            ignore_eos: true,
            ..Default::default()
        };
        let (text, _, _) = run_engine(&api.frontend, ids.clone(), params);
        assert_eq!(choice["message"]["content"], text, "choice {j}");
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(response["usage"]["prompt_tokens"], ids.len());
    assert_eq!(response["usage"]["completion_tokens"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    let api = local();
    let ids = chat_ids(&api.frontend, "Count");
    let (full, _, _) = run_engine(&api.frontend, ids.clone(), greedy(32));
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "the greedy text is too short to cut: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let expected = &full[..full.find(&stop).expect("stop occurs")];
    for stop_field in [json!(stop), json!(["\u{1}never", stop])] {
        let body = chat("Count", json!({"max_tokens": 32, "temperature": 0, "stop": stop_field}));
        let (status, response) = post_json(&api.state, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{response}");
        assert_eq!(response["choices"][0]["message"]["content"], expected);
        assert_eq!(response["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_concatenate_to_the_non_streaming_answer() {
    let api = local();
    let base = chat("Stream this", json!({"max_tokens": 20, "temperature": 0, "n": 2}));
    let (_, whole) = post_json(&api.state, "/v1/chat/completions", base.clone()).await;
    let mut streamed = base.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, headers, body) = send(&api.state, post("/v1/chat/completions", &streamed)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("chunk JSON")).collect();
    let mut texts = [String::new(), String::new()];
    let mut finish = [None, None];
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], chunks[0]["id"]);
        assert_eq!(chunk["model"], MODEL);
        if i + 1 == chunks.len() {
            assert_eq!(chunk["choices"], json!([]));
            assert_eq!(chunk["usage"], whole["usage"]);
            continue;
        }
        assert_eq!(chunk["usage"], Value::Null, "include_usage puts usage: null on the other chunks");
        assert!(chunk.as_object().expect("object").contains_key("usage"));
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().expect("index") as usize;
        assert!(finish[index].is_none(), "text after finish_reason");
        if texts[index].is_empty() && choice["delta"].get("role").is_some() {
            assert_eq!(choice["delta"], json!({"role": "assistant", "content": ""}));
        }
        if let Some(content) = choice["delta"]["content"].as_str() {
            texts[index].push_str(content);
        }
        if !choice["finish_reason"].is_null() {
            finish[index] = Some(choice["finish_reason"].clone());
            assert_eq!(choice["delta"], json!({}));
        }
        assert_eq!(choice["logprobs"], Value::Null);
    }
    // The first chunk of each choice carries the role.
    for index in 0..2 {
        let first = chunks.iter().find(|c| c["choices"][0]["index"] == index).expect("a chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(texts[index], whole["choices"][index]["message"]["content"].as_str().expect("content"));
        assert_eq!(finish[index].as_ref(), Some(&whole["choices"][index]["finish_reason"]));
    }

    // Without include_usage there is no usage anywhere.
    streamed["stream_options"] = json!({"include_usage": false});
    let (_, _, body) = send(&api.state, post("/v1/chat/completions", &streamed)).await;
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).expect("chunk");
        assert!(chunk.get("usage").is_none(), "{chunk}");
        assert_eq!(chunk["choices"].as_array().expect("choices").len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_completions_with_echo() {
    let api = local();
    let prompt = "Once upon a time";
    let body = json!({"prompt": prompt, "max_tokens": 10, "temperature": 0, "echo": true});
    let (_, whole) = post_json(&api.state, "/v1/completions", body.clone()).await;
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, text) = send(&api.state, post("/v1/completions", &streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("json")).collect();
    assert_eq!(chunks[0]["choices"][0]["text"], prompt, "the echo comes first");
    let joined: String = chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str())).collect();
    assert_eq!(joined, whole["choices"][0]["text"].as_str().expect("text"));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_and_openai_extras_are_ignored() {
    let api = local();
    let plain = chat("Hi", json!({"max_tokens": 5, "temperature": 0}));
    let (_, expected) = post_json(&api.state, "/v1/chat/completions", plain).await;
    let extras = chat(
        "Hi",
        json!({"max_tokens": 5, "temperature": 0, "user": "u-1", "frobnicate": {"x": [1, 2]},
               "response_format": {"type": "text"}, "parallel_tool_calls": false, "logprobs": false,
               "stream": false, "presence_penalty": 0, "frequency_penalty": 0, "top_k": -1}),
    );
    let (status, got) = post_json(&api.state, "/v1/chat/completions", extras).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["choices"], expected["choices"]);
    // Text parts are joined; a missing model name means the served one.
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                       "max_completion_tokens": 5, "temperature": 0});
    let (status, got) = post_json(&api.state, "/v1/chat/completions", parts).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["choices"], expected["choices"]);
}

/// (request body, status, param, code, message fragment)
type Case = (Value, StatusCode, Option<&'static str>, Option<&'static str>, &'static str);

async fn check_cases(state: &herd_coordinator::api::ApiState, path: &str, cases: Vec<Case>) {
    for (body, status, param, code, fragment) in cases {
        let (got, response) = post_json(state, path, body.clone()).await;
        assert_eq!(got, status, "{body} → {response}");
        let error = envelope(&response);
        assert_eq!(error["param"].as_str(), param, "{body} → {response}");
        assert_eq!(error["code"].as_str(), code, "{body} → {response}");
        let expected_type = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
        assert_eq!(error["type"], expected_type, "{body} → {response}");
        let message = error["message"].as_str().expect("message");
        assert!(message.contains(fragment), "{body}: {message:?} lacks {fragment:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_client_mistakes_are_4xx_in_the_envelope() {
    let api = local_with(
        |c| {
            c.max_prompt_tokens = 40;
            c.max_tokens = 100;
            c.max_n = 4;
        },
        64 << 20,
    );
    let user = |extra: Value| chat("Hi", extra);
    let bad = StatusCode::BAD_REQUEST;
    let long = "many words ".repeat(40);
    let cases: Vec<Case> = vec![
        (
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
            "gpt-4",
        ),
        (user(json!({"temperature": -1})), bad, Some("temperature"), None, "temperature"),
        (user(json!({"top_p": 0})), bad, Some("top_p"), None, "top_p"),
        (user(json!({"min_p": 2})), bad, Some("min_p"), None, "min_p"),
        (user(json!({"presence_penalty": 3})), bad, Some("presence_penalty"), None, "presence_penalty"),
        (user(json!({"repetition_penalty": 0})), bad, Some("repetition_penalty"), None, "repetition_penalty"),
        (user(json!({"top_k": -5})), bad, Some("top_k"), None, "top_k"),
        (user(json!({"stop": ["a", ""]})), bad, Some("stop"), None, "stop[1]"),
        (user(json!({"stop": 5})), bad, Some("stop"), None, "stop"),
        (user(json!({"max_tokens": 0})), bad, Some("max_tokens"), None, "at least 1"),
        (user(json!({"max_tokens": 101})), bad, Some("max_tokens"), None, "at most 100"),
        (user(json!({"max_completion_tokens": -3})), bad, Some("max_completion_tokens"), None, "at least 1"),
        (user(json!({"n": 0})), bad, Some("n"), None, "n must be at least 1"),
        (user(json!({"n": 5})), bad, Some("n"), None, "at most 4"),
        (user(json!({"top_logprobs": 2})), bad, Some("top_logprobs"), None, "needs logprobs"),
        (chat(&long, json!({})), bad, Some("messages"), Some("context_length_exceeded"), "at most 40 prompt tokens"),
        (json!({"messages": []}), bad, Some("messages"), None, "must not be empty"),
        (json!({"messages": [{"role": "user", "content": 3}]}), bad, Some("messages"), None, "content"),
        (json!({"messages": [{"content": "Hi"}]}), bad, Some("messages"), None, "role"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}),
            bad,
            Some("messages"),
            None,
            "does not accept images",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
            bad,
            Some("messages"),
            None,
            "input_audio",
        ),
        (json!({"model": MODEL}), bad, Some("messages"), None, "messages is required"),
        (user(json!({"temperature": "hot"})), bad, Some("temperature"), Some("invalid_json"), "temperature"),
        (user(json!({"stream_options": 3})), bad, Some("stream_options"), Some("invalid_json"), "stream_options"),
        (
            user(json!({"stream_options": {"include_usage": "yes"}})),
            bad,
            Some("stream_options.include_usage"),
            Some("invalid_json"),
            "include_usage",
        ),
        (json!([1, 2]), bad, None, Some("invalid_json"), "invalid type"),
    ];
    check_cases(&api.state, "/v1/chat/completions", cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_client_mistakes_are_4xx_in_the_envelope() {
    let api = local_with(|c| c.max_prompts = 2, 64 << 20);
    let bad = StatusCode::BAD_REQUEST;
    let vocab = api.frontend.config.text.vocab_size;
    let cases: Vec<Case> = vec![
        (json!({"prompt": [1, vocab]}), bad, Some("prompt"), None, "outside the vocabulary"),
        (json!({"prompt": []}), bad, Some("prompt"), None, "must not be empty"),
        (json!({"prompt": [[]]}), bad, Some("prompt"), None, "empty token list"),
        (json!({"prompt": [1, "a"]}), bad, Some("prompt"), None, "prompt must be"),
        (json!({"prompt": ["a", "b", "c"]}), bad, Some("prompt"), None, "at most 2 prompts"),
        (json!({"prompt": "x", "logprobs": 99}), bad, Some("logprobs"), None, "between 0 and 20"),
        (
            json!({"prompt": [1, 2], "max_tokens": 4095}),
            bad,
            Some("max_tokens"),
            Some("context_length_exceeded"),
            "maximum context length is 4096",
        ),
        (
            json!({"prompt": "x", "model": "other"}),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
            "other",
        ),
        (json!({"max_tokens": 3}), bad, Some("prompt"), None, "prompt is required"),
    ];
    check_cases(&api.state, "/v1/completions", cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_level_mistakes_use_the_envelope_too() {
    let api = local_with(|c| c.max_body_bytes = 2048, 64 << 20);
    let raw = |content_type: Option<&str>, body: String| {
        let mut builder = Request::post("/v1/chat/completions");
        if let Some(ct) = content_type {
            builder = builder.header(header::CONTENT_TYPE, ct);
        }
        builder.body(Body::from(body)).expect("request")
    };
    let check = |status: StatusCode, text: &str, want: StatusCode, code: Option<&str>| {
        assert_eq!(status, want, "{text}");
        let body: Value = serde_json::from_str(text).expect("JSON");
        assert_eq!(envelope(&body)["code"].as_str(), code, "{text}");
    };
    let (status, _, text) = send(&api.state, raw(Some("application/json"), "{\"messages\": [".into())).await;
    check(status, &text, StatusCode::BAD_REQUEST, Some("invalid_json"));
    let (status, _, text) = send(&api.state, raw(None, chat("Hi", json!({})).to_string())).await;
    check(status, &text, StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"));
    let (status, _, text) = send(&api.state, raw(Some("text/plain"), chat("Hi", json!({})).to_string())).await;
    check(status, &text, StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"));
    let big = chat(&"x".repeat(4096), json!({})).to_string();
    let (status, _, text) = send(&api.state, raw(Some("application/json"), big)).await;
    check(status, &text, StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large"));
    let (status, _, text) = send(&api.state, Request::get("/v1/nothing").body(Body::empty()).expect("req")).await;
    check(status, &text, StatusCode::NOT_FOUND, Some("not_found"));
    let (status, _, text) =
        send(&api.state, Request::get("/v1/chat/completions").body(Body::empty()).expect("req")).await;
    check(status, &text, StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_kv_cache_are_400() {
    // A cache of a few blocks: the engine itself refuses, after validation passed.
    let api = local_with(|_| {}, 256 << 10);
    let (status, body) =
        post_json(&api.state, "/v1/chat/completions", chat("Hi", json!({"max_tokens": 3000, "stream": true}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let error = envelope(&body);
    assert_eq!(error["code"], "context_length_exceeded");
    assert!(error["message"].as_str().expect("message").contains("KV cache"), "{body}");
    assert_eq!(api.service.load().running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_but_not_health_or_metrics() {
    let api = local_with(|c| c.api_key = Some("sk-herd".into()), 64 << 20);
    let with_key = |key: Option<&str>| {
        let mut builder = Request::get("/v1/models");
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, key);
        }
        builder.body(Body::empty()).expect("request")
    };
    for (key, want) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some("Bearer sk-wrong"), StatusCode::UNAUTHORIZED),
        (Some("Bearer sk-herd2"), StatusCode::UNAUTHORIZED),
        (Some("sk-herd"), StatusCode::UNAUTHORIZED),
        (Some("Bearer sk-herd"), StatusCode::OK),
    ] {
        let (status, _, text) = send(&api.state, with_key(key)).await;
        assert_eq!(status, want, "{key:?}: {text}");
        if want == StatusCode::UNAUTHORIZED {
            let body: Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(envelope(&body)["code"], "invalid_api_key");
        }
    }
    // The key is checked before the body is even parsed.
    let (status, _, _) = send(&api.state, post("/v1/chat/completions", &json!({"bad": true}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for open in ["/health", "/metrics"] {
        let (status, _, _) = send(&api.state, Request::get(open).body(Body::empty()).expect("req")).await;
        assert_eq!(status, StatusCode::OK, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_metrics() {
    let api = local();
    let (status, _, text) = send(&api.state, Request::get("/v1/models").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    let models: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["owned_by"], "herd");
    assert!(models["data"][0]["created"].is_u64());

    let (status, _, text) = send(&api.state, Request::get("/health").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).expect("JSON")["status"], "ok");

    for max_tokens in [3, 4] {
        let (status, _) = post_json(
            &api.state,
            "/v1/chat/completions",
            chat("Hi", json!({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, headers, text) = send(&api.state, Request::get("/metrics").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE].to_str().expect("ascii").starts_with("text/plain"));
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().expect("value").parse().expect("number")
    };
    assert_eq!(value("herd:num_requests_running{"), 0.0);
    assert_eq!(value("herd:num_requests_waiting{"), 0.0);
    assert_eq!(value("herd:kv_cache_usage_perc{"), 0.0);
    assert_eq!(value("herd:generation_tokens_total{"), 7.0);
    assert!(value("herd:prompt_tokens_total{") > 0.0);
    assert_eq!(value("herd:request_success_total{finished_reason=\"length\""), 2.0);
    assert_eq!(value("herd:time_to_first_token_seconds_count{"), 2.0);
    assert_eq!(value("herd:inter_token_latency_seconds_count{"), 5.0);
    assert_eq!(value("herd:e2e_request_latency_seconds_count{"), 2.0);
    assert!(text.contains("model_name=\"golden-maverick\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_refusals_map_to_429_503_and_400() {
    let cases = [
        (ServiceError::Overloaded { retry_after_s: 2 }, StatusCode::TOO_MANY_REQUESTS, "overloaded", Some("2")),
        (
            ServiceError::Unavailable { reason: "no workers".into(), retry_after_s: 7 },
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            Some("7"),
        ),
        (
            ServiceError::Rejected(Rejection::NotServing),
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            Some("5"),
        ),
        (
            ServiceError::Rejected(Rejection::TooLarge { need: 9, total: 4, tokens: 99 }),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            None,
        ),
    ];
    for (error, status, code, retry_after) in cases {
        let refusal = error.clone();
        let service = Scripted::new(move |_| Err(refusal.clone()));
        let (got, headers, text) =
            send(&service.state(), post("/v1/chat/completions", &chat("Hi", json!({"max_tokens": 3})))).await;
        assert_eq!(got, status, "{error:?}: {text}");
        let body: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(envelope(&body)["code"], code);
        assert_eq!(headers.get(header::RETRY_AFTER).map(|v| v.to_str().expect("ascii")), retry_after);
    }

    // A refusal that only the engine can make arrives through admission, before any header.
    let service = Scripted::new(|_| {
        let (sender, stream) = herd_coordinator::api::EventStream::channel(|| {});
        sender.refuse(ServiceError::Rejected(Rejection::InvalidParams { field: "top_p".into(), message: "no".into() }));
        Ok(stream)
    });
    let body = chat("Hi", json!({"stream": true}));
    let (status, _, text) = send(&service.state(), post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert_eq!(envelope(&serde_json::from_str(&text).expect("JSON"))["param"], "top_p");

    // An unhealthy service makes /health 503 with the reason.
    let mut unhealthy = Scripted::new(|_| Err(ServiceError::Overloaded { retry_after_s: 1 }));
    let s = std::sync::Arc::get_mut(&mut unhealthy).expect("the only handle");
    s.health.ok = false;
    s.health.reason = Some("worker 2 is on epoch 3, not 4".into());
    let (status, _, text) = send(&unhealthy.state(), Request::get("/health").body(Body::empty()).expect("req")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let health: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(health["status"], "unavailable");
    assert_eq!(health["reason"], "worker 2 is on epoch 3, not 4");
    assert_eq!(health["backend"], "scripted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_failure_mid_request_is_an_error_not_a_hang() {
    let aborted = || {
        scripted_stream(vec![
            token("Hel"),
            token("lo"),
            Event::Aborted { id: 0, reason: AbortReason::engine("worker 1 lost its peer") },
        ])
    };
    // Streaming: the text so far, then an error event in the envelope, then [DONE].
    let service = Scripted::new(move |_| Ok(aborted()));
    let body = chat("Hi", json!({"stream": true}));
    let (status, _, text) = send(&service.state(), post("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.len(), 5, "{text}");
    let content: Vec<Value> = data[..3].iter().map(|d| serde_json::from_str(d).expect("json")).collect();
    assert_eq!(content[1]["choices"][0]["delta"]["content"], "Hel");
    assert_eq!(content[2]["choices"][0]["delta"]["content"], "lo");
    let error: Value = serde_json::from_str(&data[3]).expect("error JSON");
    let error = envelope(&error);
    assert_eq!(error["code"], "generation_aborted");
    assert_eq!(error["type"], "server_error");
    assert!(error["message"].as_str().expect("message").contains("worker 1 lost its peer"));
    assert_eq!(data[4], "[DONE]");

    // Non-streaming: 500 in the envelope.
    let (status, body) = post_json(&service.state(), "/v1/chat/completions", chat("Hi", json!({}))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(envelope(&body)["code"], "generation_aborted");

    // A service that drops a request without a final event ends the stream the same way.
    let vanishing = Scripted::new(|_| Ok(scripted_stream(vec![token("Hi")])));
    let (status, _, text) =
        send(&vanishing.state(), post("/v1/completions", &json!({"prompt": "a", "stream": true}))).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert!(data[data.len() - 2].contains("generation_aborted"), "{text}");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_sees_validated_params() {
    let service = Scripted::new(|_| {
        Ok(scripted_stream(vec![Event::Finished {
            id: 0,
            reason: StopReason::Eos,
            prompt_tokens: 3,
            completion_tokens: 1,
        }]))
    });
    let body = json!({"prompt": [1, 2, 3], "n": 2, "seed": 5, "temperature": 0.5, "top_k": 7, "min_p": 0.1,
                      "stop": "x", "stop_token_ids": [9], "ignore_eos": true, "repetition_penalty": 1.1,
                      "max_tokens": 8});
    let (status, response) = post_json(&service.state(), "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    assert_eq!(response["usage"], json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
    let submitted = service.submitted.lock().expect("lock").clone();
    assert_eq!(submitted.len(), 2);
    for (j, (prompt, params)) in submitted.iter().enumerate() {
        assert_eq!(prompt, &[1, 2, 3]);
        assert_eq!(params.seed, Some(5 + j as u64));
        assert_eq!((params.temperature, params.top_k, params.min_p), (0.5, 7, 0.1));
        assert_eq!((params.stop.clone(), params.stop_token_ids.clone()), (vec!["x".to_owned()], vec![9]));
        assert!(params.ignore_eos);
        assert_eq!((params.repetition_penalty, params.max_tokens), (1.1, 8));
    }
    // Without sampling fields, the checkpoint's generation_config.json (do_sample: true,
    // temperature 0.6, top_p 0.9) applies.
    service.submitted.lock().expect("lock").clear();
    let (status, _) = post_json(&service.state(), "/v1/completions", json!({"prompt": "a"})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, params) = service.submitted.lock().expect("lock")[0].clone();
    assert_eq!((params.temperature, params.top_p, params.max_tokens), (0.6, 0.9, 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_service_refuses_past_max_in_flight() {
    use herd_coordinator::api::{ApiConfig, ApiState, LocalService};
    let frontend = frontend();
    let service = std::sync::Arc::new(LocalService::start(engine(&frontend, 64 << 20), 1).expect("start"));
    let mut config = ApiConfig::for_model(&frontend);
    config.served_model_name = MODEL.into();
    let state = ApiState::new(config, frontend.clone(), service.clone()).expect("state");
    let ids = chat_ids(&frontend, "Busy");
    let mut params = greedy(4000);
    params.ignore_eos = true;
    let submission = herd_coordinator::api::Submission { prompt: ids, params, ..Default::default() };
    let mut busy = service.submit(submission).expect("the first request fits");
    busy.admitted().await.expect("admitted");
    let (status, headers, text) = send(&state, post("/v1/chat/completions", &chat("Hi", json!({})))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    drop(busy);
    // Once the engine has let go of the cancelled request, there is room again.
    let started = std::time::Instant::now();
    loop {
        let (status, _) = post_json(&state, "/v1/completions", json!({"prompt": "a", "max_tokens": 2})).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the slot never came back");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
