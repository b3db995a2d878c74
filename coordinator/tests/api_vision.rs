//! Images over `/v1/chat/completions` on the golden multimodal checkpoint
//! (`testdata/golden/vision`), through the router and a real in-process engine: a base64 PNG
//! gives exactly the greedy text of the engine run on transformers' expanded input ids and the
//! Rust preprocessing of the same file, and malformed images are 400s in the OpenAI envelope
//! while the server keeps serving.

mod api_support;

use api_support::{envelope, post_json};
use axum::http::StatusCode;
use herd_coordinator::api::{ApiConfig, ApiState, LocalService};
use herd_worker::engine::request::{Event, Request};
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::engine::{Engine, EngineConfig};
use herd_worker::frontend::Frontend;
use herd_worker::model::weights::ComputeDtype;
use herd_worker::vision::{DecodeLimits, decode};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/vision")
}

fn engine(frontend: &Frontend) -> Engine {
    let model = frontend.load_model(ComputeDtype::F32, None).expect("text model");
    let config = EngineConfig { kv_cache_bytes: 32 << 20, ..EngineConfig::default() };
    let mut engine =
        Engine::new(Arc::new(model), frontend.tokenizer.clone(), frontend.eos_ids(), config).expect("engine");
    let (vision, patch) = frontend.load_vision(ComputeDtype::F32).expect("vision weights").expect("a vision tower");
    engine.enable_vision(Arc::new(vision), patch);
    engine
}

fn image_part(bytes: &[u8]) -> Value {
    json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", base64(bytes))}})
}

/// Standard base64 with padding (test-side encoder; the server decodes).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
        }
    }
    out
}

/// A PNG signature, an IHDR declaring `w` x `h` RGB pixels and the start of an IDAT chunk.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (&b"IDAT"[..], &[0x78, 0x9c, 0, 0][..])] {
        let mut body = kind.to_vec();
        body.extend(data);
        out.extend((data.len() as u32).to_be_bytes());
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    out
}

fn chat(parts: Vec<Value>) -> Value {
    json!({"messages": [{"role": "user", "content": parts}], "max_tokens": 12, "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_images_run_and_bad_images_are_400s() {
    let dir = case();
    let frontend = Arc::new(Frontend::load(&dir.join("model")).expect("frontend"));
    let service = Arc::new(LocalService::start(engine(&frontend), 16).expect("engine thread"));
    let mut config = ApiConfig::for_model(&frontend);
    config.max_images_per_request = 2;
    config.max_image_pixels = 1_000_000;
    let state = ApiState::new(config, frontend.clone(), service).expect("state");
    let wide = std::fs::read(dir.join("images/wide.png")).expect("image");

    // The reference: the engine on transformers' ids and the Rust pixel values of the file.
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("read"))
        .expect("expected.json");
    let golden = &expected["prompts"][0];
    assert_eq!(golden["name"], "one_wide_image");
    let ids: Vec<u32> =
        golden["input_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
    let pixels = frontend.vision.as_ref().expect("vision").prepare(
        &frontend.tokenizer.encode(golden["rendered"].as_str().expect("rendered"), false).expect("encode"),
        &[decode(&wide, &DecodeLimits::default()).expect("decode")],
    );
    let (_, images) = pixels.expect("prepare");
    let mut direct = engine(&frontend);
    let params = SamplingParams { temperature: 0.0, max_tokens: 12, ignore_eos: true, ..SamplingParams::default() };
    direct.submit(Request { id: 1, prompt: ids.clone(), params, prompt_logits: false, images }).expect("submit");
    let mut want = String::new();
    'run: loop {
        for event in direct.step().expect("step").0 {
            match event {
                Event::Token { text, .. } => want.push_str(&text),
                Event::Finished { .. } => break 'run,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    let ok = chat(vec![image_part(&wide), json!({"type": "text", "text": "Describe this image."})]);
    let (status, body) = post_json(&state, "/v1/chat/completions", ok.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], ids.len(), "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], want.as_str(), "{body}");

    let bomb = png_header(5000, 5000); // 25 MP > the 1 MP limit set above
    let cases: Vec<(Value, &str)> = vec![
        (chat(vec![image_part(&wide[..wide.len() / 2])]), "cannot be decoded"),
        (chat(vec![image_part(b"GIF87a\x01\x00\x01\x00")]), "cannot be decoded"), // 1x1, then nothing
        (chat(vec![image_part(b"plain text")]), "not an image"),
        (chat(vec![image_part(&bomb)]), "limit"),
        (chat(vec![image_part(&wide), image_part(&wide), image_part(&wide)]), "at most 2 images"),
        (chat(vec![json!({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}})]), "remote"),
        (chat(vec![json!({"type": "image", "path": "/etc/hostname"})]), "file paths are not accepted"),
        (chat(vec![json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}})]), "base64"),
        (chat(vec![image_part(&wide), json!({"type": "text", "text": "<|image|>"})]), "placeholders"),
    ];
    for (body, fragment) in cases {
        let (status, response) = post_json(&state, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{response}");
        let error = envelope(&response);
        assert_eq!(error["param"], "messages", "{response}");
        let message = error["message"].as_str().expect("message");
        assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
    }
    // Still serving, with the same answer.
    let (status, again) = post_json(&state, "/v1/chat/completions", ok).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["choices"][0]["message"]["content"], want.as_str());
}
