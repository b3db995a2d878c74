//! Prometheus metrics in the `herd:` namespace, named after vLLM's where they overlap, in a
//! [`Registry`] owned by the API state (other parts of the coordinator may register theirs in
//! the same registry through [`super::ApiState::registry`]).
//!
//! Gauges are read from the [`InferenceService`](super::service::InferenceService) at scrape
//! time; histograms and counters are fed per request by a [`RequestTracker`].

use super::service::Load;
use herd_worker::engine::stop::FinishReason;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use std::sync::Arc;
use std::time::Instant;

/// vLLM's buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// The API's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    kv_cache_usage: Gauge,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_latency: Histogram,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    request_success: IntCounterVec,
}

impl Metrics {
    /// Every metric carries the label `model_name` (as vLLM's do).
    pub fn new(model_name: &str) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let histogram = |name: &str, help: &str, buckets: &[f64]| -> prometheus::Result<Histogram> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help).const_label("model_name", model_name).buckets(buckets.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let running = IntGauge::with_opts(opts("herd:num_requests_running", "Requests running on the engines."))?;
        let waiting =
            IntGauge::with_opts(opts("herd:num_requests_waiting", "Requests waiting for room on the engines."))?;
        let kv_cache_usage =
            Gauge::with_opts(opts("herd:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent."))?;
        let prompt_tokens = IntCounter::with_opts(opts("herd:prompt_tokens_total", "Prompt tokens processed."))?;
        let generation_tokens =
            IntCounter::with_opts(opts("herd:generation_tokens_total", "Generation tokens produced."))?;
        let request_success = IntCounterVec::new(
            opts("herd:request_success_total", "Ended requests, by finished_reason (stop, length, abort)."),
            &["finished_reason"],
        )?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(kv_cache_usage.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        registry.register(Box::new(request_success.clone()))?;
        let time_to_first_token = histogram(
            "herd:time_to_first_token_seconds",
            "Time from the request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )?;
        let inter_token_latency = histogram(
            "herd:inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            ITL_BUCKETS,
        )?;
        let e2e_latency = histogram(
            "herd:e2e_request_latency_seconds",
            "Time from the request's arrival to its last token.",
            E2E_BUCKETS,
        )?;
        Ok(Self {
            registry,
            running,
            waiting,
            kv_cache_usage,
            time_to_first_token,
            inter_token_latency,
            e2e_latency,
            prompt_tokens,
            generation_tokens,
            request_success,
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition, with the gauges set from `load`.
    pub fn render(&self, load: Load) -> prometheus::Result<String> {
        self.running.set(i64::try_from(load.running).unwrap_or(i64::MAX));
        self.waiting.set(i64::try_from(load.waiting).unwrap_or(i64::MAX));
        self.kv_cache_usage.set(load.kv_usage);
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    /// Start tracking one request (one choice) that arrived at `arrived`.
    pub(crate) fn tracker(self: &Arc<Self>, arrived: Instant) -> RequestTracker {
        RequestTracker { metrics: self.clone(), arrived, last_token: None, ended: false }
    }
}

/// Latencies and counts of one request. Dropped before its end (the client left), it counts
/// as an abort.
#[derive(Debug)]
pub(crate) struct RequestTracker {
    metrics: Arc<Metrics>,
    arrived: Instant,
    last_token: Option<Instant>,
    ended: bool,
}

impl RequestTracker {
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.time_to_first_token.observe((now - self.arrived).as_secs_f64()),
            Some(last) => self.metrics.inter_token_latency.observe((now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    pub fn finished(&mut self, reason: FinishReason, prompt_tokens: usize, completion_tokens: usize) {
        let m = &self.metrics;
        m.e2e_latency.observe(self.arrived.elapsed().as_secs_f64());
        m.prompt_tokens.inc_by(prompt_tokens as u64);
        m.generation_tokens.inc_by(completion_tokens as u64);
        m.request_success.with_label_values(&[reason.as_str()]).inc();
        self.ended = true;
    }

    pub fn aborted(&mut self) {
        if !self.ended {
            self.metrics.request_success.with_label_values(&["abort"]).inc();
            self.ended = true;
        }
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        self.aborted();
    }
}
