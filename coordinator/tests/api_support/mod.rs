//! Shared by the `api_*` tests: the golden Maverick-shaped checkpoint in f32 behind a
//! `LocalService`, a scripted service for failures no real engine produces on demand, and
//! helpers to call the router and read SSE bodies.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use herd_coordinator::api::{
    ApiConfig, ApiState, EventStream, Health, InferenceService, Load, LocalService, ServiceError, Submission, router,
};
use herd_worker::engine::request::{Event, Request as EngineRequest};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::engine::stop::StopReason;
use herd_worker::engine::{Engine, EngineConfig};
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

pub const MODEL: &str = "golden-maverick";

pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/maverick/model")
}

pub fn frontend() -> Arc<Frontend> {
    Arc::new(Frontend::load(&model_dir()).expect("load the golden frontend"))
}

pub fn engine(frontend: &Frontend, kv_cache_bytes: usize) -> Engine {
    let model = frontend.load_model(ComputeDtype::F32, None).expect("load the golden model");
    let config = EngineConfig { kv_cache_bytes, ..EngineConfig::default() };
    Engine::new(Arc::new(model), frontend.tokenizer.clone(), frontend.eos_ids(), config).expect("engine")
}

/// The API over a real in-process engine.
pub struct Local {
    pub state: ApiState,
    pub service: Arc<LocalService>,
    pub frontend: Arc<Frontend>,
}

pub fn local() -> Local {
    local_with(|_| {}, 64 << 20)
}

pub fn local_with(configure: impl FnOnce(&mut ApiConfig), kv_cache_bytes: usize) -> Local {
    let frontend = frontend();
    let service = Arc::new(LocalService::start(engine(&frontend, kv_cache_bytes), 64).expect("engine thread"));
    let mut config = ApiConfig::for_model(&frontend);
    config.served_model_name = MODEL.into();
    configure(&mut config);
    let state = ApiState::new(config, frontend.clone(), service.clone()).expect("state");
    Local { state, service, frontend }
}

/// Run `prompt` on a fresh engine directly: the reference for the API's answers.
pub fn run_engine(frontend: &Frontend, prompt: Vec<u32>, params: SamplingParams) -> (String, usize, StopReason) {
    let mut engine = engine(frontend, 64 << 20);
    engine.submit(EngineRequest { id: 7, prompt, params, prompt_logits: false, images: Vec::new() }).expect("submit");
    let mut text = String::new();
    let mut tokens = 0;
    loop {
        for event in engine.step().expect("step").0 {
            match event {
                Event::Token { text: t, .. } => {
                    text.push_str(&t);
                    tokens += 1;
                }
                Event::Finished { reason, .. } => return (text, tokens, reason),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

pub fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ..SamplingParams::default() }
}

/// The ids the API should build for a one-message chat.
pub fn chat_ids(frontend: &Frontend, user: &str) -> Vec<u32> {
    let template = frontend.chat_template.as_ref().expect("template");
    let rendered = template.render(&[json!({"role": "user", "content": user})], true, None).expect("render");
    frontend.tokenizer.encode(&rendered, false).expect("encode")
}

pub async fn send(state: &ApiState, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let response = router(state.clone()).oneshot(request).await.expect("router");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).expect("utf-8 body"))
}

pub fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).expect("request")
}

pub async fn post_json(state: &ApiState, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, text) = send(state, post(path, &body)).await;
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Asserts an error response is exactly the OpenAI envelope and returns its error object.
pub fn envelope(body: &Value) -> &Value {
    let error = body.get("error").unwrap_or_else(|| panic!("no error envelope: {body}"));
    let keys: Vec<&str> = error.as_object().expect("object").keys().map(String::as_str).collect();
    assert_eq!(keys, ["message", "type", "param", "code"], "{body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    error
}

type Script = dyn Fn(usize) -> Result<EventStream, ServiceError> + Send + Sync;

/// A service that answers each submission (numbered from 0) with a script.
pub struct Scripted {
    pub script: Box<Script>,
    pub health: Health,
    pub submitted: Mutex<Vec<(Vec<u32>, SamplingParams)>>,
}

impl Scripted {
    pub fn new(script: impl Fn(usize) -> Result<EventStream, ServiceError> + Send + Sync + 'static) -> Arc<Self> {
        let health = Health { ok: true, reason: None, detail: json!({"backend": "scripted"}) };
        Arc::new(Self { script: Box::new(script), health, submitted: Mutex::new(Vec::new()) })
    }

    pub fn state(self: &Arc<Self>) -> ApiState {
        let frontend = frontend();
        let mut config = ApiConfig::for_model(&frontend);
        config.served_model_name = MODEL.into();
        ApiState::new(config, frontend, self.clone()).expect("state")
    }
}

impl InferenceService for Scripted {
    fn submit(&self, submission: Submission) -> Result<EventStream, ServiceError> {
        let mut submitted = self.submitted.lock().expect("lock");
        submitted.push((submission.prompt, submission.params));
        (self.script)(submitted.len() - 1)
    }

    fn health(&self) -> Health {
        self.health.clone()
    }

    fn load(&self) -> Load {
        Load { running: 3, waiting: 2, kv_usage: 0.25 }
    }
}

/// A stream that has already received `events` (admitted first).
pub fn scripted_stream(events: Vec<Event>) -> EventStream {
    let (sender, stream) = EventStream::channel(|| {});
    sender.admit();
    for event in events {
        sender.send(event);
    }
    stream
}

pub fn token(text: &str) -> Event {
    Event::Token { id: 0, token: 1, text: text.into(), logprobs: None }
}

/// Drain a stream to a vec (for service-level checks).
pub async fn drain(mut stream: EventStream) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event);
    }
    events
}
