//! Decoding with the KV cache gives the same logits as one full prefill, across attention
//! chunk boundaries, and a sequence's logits do not depend on what else is in its batch.
//!
//! The committed golden models have `attention_chunk_size` 16, so a 60-token sequence spans
//! four chunks (and chunked layers drop old chunks from the cache as it goes).

use herd_worker::model::text::{LogitsFor, SeqStep, TextModel};
use herd_worker::model::weights::ComputeDtype;
use std::path::{Path, PathBuf};

fn model_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden").join(case).join("model")
}

fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104729 + 13) % (vocab - 20)) as u32 + 3).collect()
}

fn prefill_all(model: &TextModel, ids: &[u32]) -> Vec<f32> {
    let mut pool = model.new_pool();
    let mut kv = pool.new_seq();
    model
        .forward(&mut pool, &mut [SeqStep { tokens: ids, kv: &mut kv, logits: LogitsFor::All, images: None }])
        .expect("forward")
        .remove(0)
}

fn check_decode_equals_prefill(case: &str) {
    let model = TextModel::load(&model_dir(case), ComputeDtype::F32).expect("load");
    let chunk = model.config().attention_chunk_size.expect("chunked model");
    let vocab = model.config().vocab_size;
    let ids = tokens(chunk * 3 + 12, vocab, 1);
    let full = prefill_all(&model, &ids);

    // Prefill a first piece that ends mid-chunk, then feed the rest one token at a time.
    let split = chunk + 5;
    let mut pool = model.new_pool();
    let mut kv = pool.new_seq();
    let mut rows = model
        .forward(&mut pool, &mut [SeqStep { tokens: &ids[..split], kv: &mut kv, logits: LogitsFor::All, images: None }])
        .expect("prefill")
        .remove(0);
    for t in &ids[split..] {
        let row = model
            .forward(
                &mut pool,
                &mut [SeqStep { tokens: std::slice::from_ref(t), kv: &mut kv, logits: LogitsFor::Last, images: None }],
            )
            .expect("decode")
            .remove(0);
        rows.extend(row);
    }
    assert_eq!(kv.len(), ids.len());
    // The kernels fix every reduction order per output element, so the cached path is not
    // just close to the full prefill: it is the same computation.
    assert_eq!(rows.len(), full.len());
    let max_diff = rows.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert_eq!(max_diff, 0.0, "{case}: decode differs from prefill by up to {max_diff}");
}

#[test]
fn maverick_decode_equals_prefill_across_chunks() {
    check_decode_equals_prefill("maverick");
}

#[test]
fn scout_decode_equals_prefill_across_chunks() {
    check_decode_equals_prefill("scout");
}

#[test]
fn batching_does_not_change_a_sequence() {
    let model = TextModel::load(&model_dir("maverick"), ComputeDtype::F32).expect("load");
    let vocab = model.config().vocab_size;
    let a = tokens(37, vocab, 2);
    let b = tokens(5, vocab, 3);
    let c = tokens(20, vocab, 4);
    let alone = prefill_all(&model, &b);
    let mut pool = model.new_pool();
    let (mut ka, mut kb, mut kc) = (pool.new_seq(), pool.new_seq(), pool.new_seq());
    let batched = model
        .forward(
            &mut pool,
            &mut [
                SeqStep { tokens: &a, kv: &mut ka, logits: LogitsFor::Last, images: None },
                SeqStep { tokens: &b, kv: &mut kb, logits: LogitsFor::All, images: None },
                SeqStep { tokens: &c, kv: &mut kc, logits: LogitsFor::None, images: None },
            ],
        )
        .expect("batch");
    assert_eq!(batched[0].len(), vocab);
    assert_eq!(batched[1], alone);
    assert!(batched[2].is_empty());
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let dir = model_dir("scout-v5");
    let f32_model = TextModel::load(&dir, ComputeDtype::F32).expect("load f32");
    let bf16_model = TextModel::load(&dir, ComputeDtype::Bf16).expect("load bf16");
    assert!(bf16_model.weight_bytes() * 2 == f32_model.weight_bytes(), "f32 weights are held as bf16");
    let ids = tokens(30, f32_model.config().vocab_size, 5);
    let (a, b) = (prefill_all(&f32_model, &ids), prefill_all(&bf16_model, &ids));
    let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    let spread = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    eprintln!("bf16 vs f32: max |Δlogit| {max_diff:.3e} (max |logit| {spread:.2})");
    assert!(b.iter().all(|v| v.is_finite()));
    // bf16 weights carry ~3 significant digits; random tiny MoE models may also flip an
    // expert, so this is a sanity bound, not a parity claim.
    assert!(max_diff < 0.25 * spread, "bf16 logits drift {max_diff} against a spread of {spread}");
}

#[test]
fn out_of_vocabulary_ids_are_rejected_before_any_state_changes() {
    let model = TextModel::load(&model_dir("maverick"), ComputeDtype::F32).expect("load");
    let mut pool = model.new_pool();
    let mut kv = pool.new_seq();
    let bad = [1u32, model.config().vocab_size as u32];
    let err = model
        .forward(&mut pool, &mut [SeqStep { tokens: &bad, kv: &mut kv, logits: LogitsFor::Last, images: None }])
        .expect_err("out of vocabulary");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!(kv.len(), 0);
}
