//! The continuous-batching engine on a committed golden model (f32): results do not depend on
//! what else is in the batch, on the prefill budget, or on KV-cache pressure; requests that
//! cannot fit are rejected; cancellation frees the cache.

use herd_worker::engine::request::{AbortReason, Event, Rejection, Request};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::engine::{Engine, EngineConfig};
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn frontend(case: &str) -> Frontend {
    Frontend::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden").join(case).join("model"))
        .expect("load golden frontend")
}

fn engine(f: &Frontend, config: EngineConfig) -> Engine {
    let model = f.load_model(ComputeDtype::F32, None).expect("load model");
    Engine::new(Arc::new(model), Arc::clone(&f.tokenizer), f.eos_ids(), config).expect("engine")
}

fn prompt(len: usize, salt: u64, vocab: usize) -> Vec<u32> {
    (0..len as u64).map(|i| ((i * 7919 + salt * 104729 + 13) % (vocab as u64 - 20)) as u32 + 3).collect()
}

/// Sixteen requests of mixed lengths and sampling settings.
fn mixed_requests(vocab: usize) -> Vec<Request> {
    (0..16u64)
        .map(|i| {
            let params = SamplingParams {
                temperature: if i % 3 == 0 { 0.0 } else { 0.7 + 0.1 * (i % 4) as f32 },
                top_k: if i % 4 == 1 { 20 } else { 0 },
                top_p: if i % 5 == 2 { 0.9 } else { 1.0 },
                seed: Some(1000 + i),
                max_tokens: 8 + (i as usize * 5) % 23,
                ignore_eos: i % 2 == 0,
                ..SamplingParams::default()
            };
            Request {
                id: i,
                prompt: prompt(1 + (i as usize * 13) % 70, i, vocab),
                params,
                prompt_logits: i % 4 == 0,
                images: Vec::new(),
            }
        })
        .collect()
}

/// Run requests to completion; every event per request id, in order.
fn run_all(engine: &mut Engine, requests: &[Request]) -> BTreeMap<u64, Vec<Event>> {
    let mut out: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    for r in requests {
        engine.submit(r.clone()).expect("submit");
    }
    let mut open = requests.len();
    while open > 0 {
        let (events, _) = engine.step().expect("step");
        for e in events {
            open -= usize::from(e.is_final());
            out.entry(e.id()).or_default().push(e);
        }
    }
    out
}

#[test]
fn sixteen_concurrent_requests_give_exactly_what_they_give_alone() {
    let f = frontend("maverick");
    let vocab = f.config.text.vocab_size;
    let requests = mixed_requests(vocab);
    let small_budget = EngineConfig { max_step_tokens: 24, ..EngineConfig::default() };
    let together = run_all(&mut engine(&f, small_budget), &requests);
    let mut alone_engine = engine(&f, EngineConfig::default());
    for r in &requests {
        let alone = run_all(&mut alone_engine, std::slice::from_ref(r));
        assert_eq!(together[&r.id], alone[&r.id], "request {} differs when batched", r.id);
        assert!(matches!(together[&r.id].last(), Some(Event::Finished { .. })));
    }
}

#[test]
fn requests_queue_when_the_kv_cache_is_small_and_all_finish_identically() {
    let f = frontend("scout");
    let requests = mixed_requests(f.config.text.vocab_size);
    let roomy = run_all(&mut engine(&f, EngineConfig::default()), &requests);
    // Room for about two requests at a time.
    let block_bytes = 2 * 16 * f.config.text.num_key_value_heads * f.config.text.head_dim * 4;
    let tight = EngineConfig {
        kv_cache_bytes: 40 * f.config.text.num_hidden_layers * block_bytes / 4,
        ..EngineConfig::default()
    };
    let squeezed = run_all(&mut engine(&f, tight), &requests);
    assert_eq!(roomy, squeezed);
}

#[test]
fn a_request_that_can_never_fit_is_rejected_with_a_clear_reason() {
    let f = frontend("scout-v5");
    let mut e = engine(&f, EngineConfig { kv_cache_bytes: 64 << 10, ..EngineConfig::default() });
    let vocab = f.config.text.vocab_size;
    let big = Request {
        id: 1,
        prompt: prompt(2000, 1, vocab),
        params: SamplingParams { max_tokens: 10, ..SamplingParams::default() },
        prompt_logits: false,
        images: Vec::new(),
    };
    let err = e.submit(big).expect_err("too large");
    assert!(matches!(err, Rejection::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("KV cache"), "{err}");
    let bad = Request {
        id: 2,
        prompt: vec![vocab as u32],
        params: SamplingParams::default(),
        prompt_logits: false,
        images: Vec::new(),
    };
    assert!(matches!(e.submit(bad), Err(Rejection::TokenOutOfRange { .. })));
    let empty =
        Request { id: 3, prompt: vec![], params: SamplingParams::default(), prompt_logits: false, images: Vec::new() };
    assert_eq!(e.submit(empty), Err(Rejection::EmptyPrompt));
    let bad_params = Request {
        id: 4,
        prompt: vec![5],
        params: SamplingParams { top_p: 0.0, ..SamplingParams::default() },
        prompt_logits: false,
        images: Vec::new(),
    };
    assert!(matches!(e.submit(bad_params), Err(Rejection::InvalidParams { .. })));
}

#[test]
fn cancelling_mid_generation_aborts_and_frees_the_cache() {
    let f = frontend("scout-v5");
    let mut e = engine(&f, EngineConfig::default());
    let vocab = f.config.text.vocab_size;
    for id in 0..3 {
        let params =
            SamplingParams { max_tokens: 1000, ignore_eos: true, temperature: 0.0, ..SamplingParams::default() };
        e.submit(Request { id, prompt: prompt(20, id, vocab), params, prompt_logits: false, images: Vec::new() })
            .expect("submit");
    }
    for _ in 0..5 {
        e.step().expect("step");
    }
    assert!(e.kv_usage() > 0.0);
    assert!(e.cancel(1));
    assert!(!e.cancel(99));
    let (events, _) = e.step().expect("step");
    assert!(events.contains(&Event::Aborted { id: 1, reason: AbortReason::Cancelled }));
    assert_eq!(e.running(), 2);
    e.cancel(0);
    e.cancel(2);
    e.step().expect("drain");
    assert_eq!(e.kv_usage(), 0.0);
    assert!(!e.has_work());
}

#[test]
fn prompt_logits_do_not_depend_on_the_prefill_budget() {
    let f = frontend("maverick");
    let vocab = f.config.text.vocab_size;
    let req = Request {
        id: 0,
        prompt: prompt(61, 9, vocab),
        params: SamplingParams { temperature: 0.0, max_tokens: 4, ignore_eos: true, ..SamplingParams::default() },
        prompt_logits: true,
        images: Vec::new(),
    };
    let whole = run_all(&mut engine(&f, EngineConfig::default()), std::slice::from_ref(&req));
    for budget in [1, 7, 16, 33] {
        let chunked = run_all(
            &mut engine(&f, EngineConfig { max_step_tokens: budget, ..EngineConfig::default() }),
            std::slice::from_ref(&req),
        );
        assert_eq!(whole, chunked, "budget {budget}");
    }
}
