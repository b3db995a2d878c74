//! Image requests in the engine, on the committed multimodal golden model (f32): the results
//! of an image prompt do not depend on how its prefill is chunked (chunks that cut through an
//! image take exactly their own feature rows) or on a text prompt sharing its batches, and
//! requests whose images do not fit the prompt or the model are rejected at submission.

use herd_worker::engine::request::{Event, Rejection, Request};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::engine::{Engine, EngineConfig};
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::vision::{DecodeLimits, PixelValues, decode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/vision")
}

fn engine(f: &Frontend, max_step_tokens: usize, vision: bool) -> Engine {
    let model = f.load_model(ComputeDtype::F32, None).expect("load model");
    let config = EngineConfig { kv_cache_bytes: 16 << 20, max_step_tokens, ..EngineConfig::default() };
    let mut e = Engine::new(Arc::new(model), Arc::clone(&f.tokenizer), f.eos_ids(), config).expect("engine");
    if vision {
        let (v, patch) = f.load_vision(ComputeDtype::F32).expect("vision weights").expect("a vision tower");
        e.enable_vision(Arc::new(v), patch);
    }
    e
}

/// The ids and pixel values of a user message with two images (of `testdata/golden/vision/images`)
/// around some text.
fn image_prompt(f: &Frontend, names: [&str; 2]) -> (Vec<u32>, Vec<PixelValues>) {
    let messages = [json!({"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What differs between these?"}, {"type": "image"}]})];
    let rendered = f.chat_template.as_ref().expect("template").render(&messages, true, None).expect("render");
    let ids = f.tokenizer.encode(&rendered, false).expect("encode");
    let images: Vec<_> = names
        .iter()
        .map(|n| {
            let bytes = std::fs::read(case().join(format!("images/{n}.png"))).expect("image");
            decode(&bytes, &DecodeLimits::default()).expect("decode")
        })
        .collect();
    f.vision.as_ref().expect("vision").prepare(&ids, &images).expect("prepare")
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

/// (prompt argmax, last logits, generated ids) of request `id`.
type Outcome = (Vec<u32>, Vec<f32>, Vec<u32>);

fn run(engine: &mut Engine, requests: Vec<Request>) -> Vec<Outcome> {
    let n = requests.len();
    let ids: Vec<u64> = requests.iter().map(|r| r.id).collect();
    for r in requests {
        engine.submit(r).expect("submit");
    }
    let mut out: Vec<Outcome> = vec![(Vec::new(), Vec::new(), Vec::new()); n];
    let mut open = n;
    while open > 0 {
        for event in engine.step().expect("step").0 {
            let i = ids.iter().position(|&id| id == event.id()).expect("known id");
            match event {
                Event::PromptLogits { argmax, last_logits, .. } => (out[i].0, out[i].1) = (argmax, last_logits),
                Event::Token { token, .. } => out[i].2.push(token),
                Event::Finished { .. } => open -= 1,
                Event::Aborted { reason, .. } => panic!("aborted: {reason}"),
            }
        }
    }
    out
}

#[test]
fn chunking_and_batching_do_not_change_image_prompts() {
    let f = Frontend::load(&case().join("model")).expect("frontend");
    let (ids, images) = image_prompt(&f, ["wide", "tall"]);
    let text = f.tokenizer.encode("A text prompt that shares the batches.", true).expect("encode");
    let request = |id, prompt: &Vec<u32>, images: &Vec<PixelValues>| Request {
        id,
        prompt: prompt.clone(),
        params: greedy(6),
        prompt_logits: true,
        images: images.clone(),
    };
    let reference = run(&mut engine(&f, 4096, true), vec![request(1, &ids, &images)]);
    assert_eq!(reference[0].2.len(), 6);
    // Budgets of 5 and 23 tokens cut the 22-token image blocks at many different offsets.
    for budget in [5, 23, 64] {
        let got = run(&mut engine(&f, budget, true), vec![request(1, &ids, &images), request(2, &text, &Vec::new())]);
        assert_eq!(got[0], reference[0], "image prompt with a step budget of {budget} and a text prompt beside it");
    }
    // The images matter: the same text with the images swapped gives other logits.
    let (swapped_ids, swapped) = image_prompt(&f, ["tall", "wide"]);
    let other = run(&mut engine(&f, 4096, true), vec![request(1, &swapped_ids, &swapped)]);
    assert_ne!(other[0].1, reference[0].1, "swapping the images must change the logits");
}

#[test]
fn mismatched_images_are_rejected() {
    let f = Frontend::load(&case().join("model")).expect("frontend");
    let (ids, images) = image_prompt(&f, ["wide", "tall"]);
    let req = |prompt: Vec<u32>, images: Vec<PixelValues>| Request {
        id: 9,
        prompt,
        params: greedy(2),
        prompt_logits: false,
        images,
    };
    let no_tower = engine(&f, 64, false).submit(req(ids.clone(), images.clone()));
    assert_eq!(no_tower, Err(Rejection::NoVision));
    let mut e = engine(&f, 64, true);
    let one = e.submit(req(ids.clone(), images[..1].to_vec()));
    assert!(matches!(one, Err(Rejection::ImageTokens { patches: 32, features: 16 })), "{one:?}");
    let mut bad = images.clone();
    bad[0].values.truncate(100);
    assert!(matches!(e.submit(req(ids.clone(), bad)), Err(Rejection::BadImage { index: 0, .. })));
    assert_eq!(e.submit(req(ids, images)), Ok(()));
}
