//! The OpenAI-compatible HTTP API.
//!
//! A request's way through this module:
//!
//! 1. [`router`]: axum routes; the `/v1` routes sit behind the optional Bearer key (`auth`);
//!    bodies are bounded by [`ApiConfig::max_body_bytes`]; [`errors::Json`] puts axum's JSON
//!    rejections in the OpenAI envelope.
//! 2. [`chat`] / [`completions`] handlers: [`validation`] turns the body ([`openai`] types) into a
//!    [`validation::ValidRequest`] on a blocking thread: model name, `n`, limits, the chat template
//!    and the tokenizer, sampling parameters checked with `SamplingParams::validate`; chat image
//!    parts go through [`images`] (limits, decoding, preprocessing, the image token block).
//! 3. [`generation::launch`]: one [`InferenceService::submit`] per choice, then wait for
//!    admission ([`EventStream::admitted`]), so that engine refusals are still HTTP errors.
//! 4. Non-streaming: [`generation::collect`] reads every choice to its end. Streaming:
//!    [`sse::response`] turns events into OpenAI chunks as they come.
//! 5. Any failure is an [`ApiError`]; [`errors`] is the one place that maps errors to statuses.
//!    Per-request latencies and counts go to [`metrics`] (served at `/metrics`).
//!
//! A client that disconnects drops the handler future (non-streaming) or the SSE body
//! (streaming); either drops the [`EventStream`]s, and the service cancels the requests.
//!
//! The [`InferenceService`] is the seam to whatever runs requests: [`LocalService`] (an engine
//! thread in this process) or the coordinator's scheduler over workers.

mod chat;
mod completions;
pub mod errors;
mod generation;
mod images;
mod logprobs;
pub mod metrics;
pub mod openai;
pub mod service;
mod sse;
pub mod validation;

pub use errors::ApiError;
pub use service::{EventSender, EventStream, Health, InferenceService, Load, LocalService, ServiceError, Submission};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herd_worker::frontend::Frontend;
use metrics::Metrics;
use openai::{ModelCard, ModelList};
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The API's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// The model id clients must name (`--served-model-name`); requests naming another get 404.
    /// A request without `model` gets this one.
    pub served_model_name: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` (`/health` and `/metrics` stay open).
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Prompt plus completion tokens one request may use.
    pub max_model_len: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for (and the cap on chat's default).
    pub max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most prompts in one completions request.
    pub max_prompts: usize,
    /// Largest encoded image (bytes after base64 decoding).
    pub max_image_bytes: usize,
    /// Most pixels an image's header may declare (checked before decoding).
    pub max_image_pixels: u64,
    /// Most images in one chat request.
    pub max_images_per_request: usize,
}

impl ApiConfig {
    pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
    pub const DEFAULT_MAX_IMAGE_BYTES: usize = 8 << 20;
    /// 25 megapixels (e.g. 5000 × 5000): any real photo, far below what a decompression bomb declares.
    pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 25_000_000;
    pub const DEFAULT_MAX_IMAGES_PER_REQUEST: usize = 8;

    /// Defaults: no key, 4 MiB bodies, prompts and `max_tokens` up to `max_model_len`, `n` ≤ 16,
    /// 64 prompts per completions request.
    pub fn new(served_model_name: impl Into<String>, max_model_len: usize) -> Self {
        Self {
            served_model_name: served_model_name.into(),
            api_key: None,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_model_len,
            max_prompt_tokens: max_model_len,
            max_tokens: max_model_len,
            max_n: 16,
            max_prompts: 64,
            max_image_bytes: Self::DEFAULT_MAX_IMAGE_BYTES,
            max_image_pixels: Self::DEFAULT_MAX_IMAGE_PIXELS,
            max_images_per_request: Self::DEFAULT_MAX_IMAGES_PER_REQUEST,
        }
    }

    /// Named after the checkpoint directory, with the model's context length.
    pub fn for_model(frontend: &Frontend) -> Self {
        let name = frontend.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        Self::new(name, frontend.config.text.max_position_embeddings)
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    config: ApiConfig,
    frontend: Arc<Frontend>,
    service: Arc<dyn InferenceService>,
    metrics: Arc<Metrics>,
    /// Response ids: a per-process random key hashed with a counter.
    id_key: RandomState,
    id_counter: AtomicU64,
    started: u64,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("config", &self.inner.config).finish()
    }
}

impl ApiState {
    /// Fails only if the metrics cannot be registered.
    pub fn new(
        config: ApiConfig,
        frontend: Arc<Frontend>,
        service: Arc<dyn InferenceService>,
    ) -> prometheus::Result<Self> {
        let metrics = Arc::new(Metrics::new(&config.served_model_name)?);
        let inner = Inner {
            config,
            frontend,
            service,
            metrics,
            id_key: RandomState::new(),
            id_counter: AtomicU64::new(0),
            started: unix_time(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn config(&self) -> &ApiConfig {
        &self.inner.config
    }

    pub fn service(&self) -> &Arc<dyn InferenceService> {
        &self.inner.service
    }

    pub fn frontend(&self) -> &Arc<Frontend> {
        &self.inner.frontend
    }

    /// The registry `/metrics` serves; register more metrics here to serve them too.
    pub fn registry(&self) -> &prometheus::Registry {
        self.inner.metrics.registry()
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// `prefix-` and 24 hex digits, unique within this process.
    pub(crate) fn response_id(&self, prefix: &str) -> String {
        let n = self.inner.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut hasher = self.inner.id_key.build_hasher();
        hasher.write_u64(n);
        format!("{prefix}-{:016x}{:08x}", hasher.finish(), n as u32)
    }

    /// Run a validation on a blocking thread (templates and tokenizers are CPU work).
    pub(crate) async fn validate<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ApiConfig, &Frontend) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner.config, &inner.frontend))
            .await
            .map_err(|e| ApiError::internal(format!("the validation task failed: {e}")))?
    }
}

/// The API's routes, ready to serve.
pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .with_state(state)
}

/// Serve the API on `listener` until `shutdown` completes; then stop accepting and wait for
/// the open requests (streams included) to end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn auth(State(state): State<ApiState>, headers: HeaderMap, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config().api_key {
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        match given {
            None => {
                return ApiError::unauthorized("missing API key; send it as `Authorization: Bearer <key>`")
                    .into_response();
            }
            Some(token) if !constant_time_eq(token.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("incorrect API key provided").into_response();
            }
            Some(_) => {}
        }
    }
    next.run(request).await
}

/// Compares without an early exit, so the time taken does not reveal a key's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(state): State<ApiState>) -> axum::Json<ModelList> {
    let config = state.config();
    axum::Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: config.served_model_name.clone(),
            object: "model",
            created: state.inner.started,
            owned_by: "herd",
            max_model_len: config.max_model_len,
        }],
    })
}

async fn health(State(state): State<ApiState>) -> Response {
    let health = state.service().health();
    let mut body = serde_json::Map::new();
    body.insert("status".into(), (if health.ok { "ok" } else { "unavailable" }).into());
    if let Some(reason) = health.reason {
        body.insert("reason".into(), reason.into());
    }
    match health.detail {
        serde_json::Value::Object(detail) => body.extend(detail),
        serde_json::Value::Null => {}
        other => {
            body.insert("detail".into(), other);
        }
    }
    let status = if health.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::Value::Object(body))).into_response()
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    match state.metrics().render(state.service().load()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => ApiError::internal(format!("cannot render metrics: {e}")).into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
