//! The image path's prompt side against transformers (`testdata/golden/vision`, written by
//! `tools/golden/make_golden_vision.py`): for every image prompt, the pixel values equal the
//! processor's bf16 `pixel_values` bit for bit, the tile grids equal its `aspect_ratios`, and
//! the chat template + tokenizer + image block expansion give the processor's input ids.

use herd_worker::frontend::Frontend;
use herd_worker::vision::{DecodeLimits, VisionFrontend, decode};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/vision")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().expect("list").iter().map(|x| x.as_u64().expect("integer")).collect()
}

#[test]
fn pixel_values_and_input_ids_match_transformers() {
    let dir = case_dir();
    let frontend = Frontend::load(&dir.join("model")).expect("frontend");
    let vision = VisionFrontend::load(&dir.join("model"), &frontend.tokenizer).expect("vision config").expect("vision");
    let template = frontend.chat_template.as_ref().expect("chat template");
    let input = read_json(&dir.join("input.json"));
    let expected = read_json(&dir.join("expected.json"));
    let mut image_prompts = 0;
    for (p, e) in input["prompts"].as_array().expect("prompts").iter().zip(expected["prompts"].as_array().expect("e")) {
        let name = e["name"].as_str().expect("name");
        let messages = p["messages"].as_array().expect("messages");
        let rendered = template.render(messages, true, None).expect("render");
        assert_eq!(rendered, e["rendered"].as_str().expect("rendered"), "{name}: rendered template");
        let ids = frontend.tokenizer.encode(&rendered, false).expect("encode");
        let paths: Vec<&str> = messages
            .iter()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|c| c["type"] == "image")
            .map(|c| c["path"].as_str().expect("path"))
            .collect();
        let images: Vec<_> = paths
            .iter()
            .map(|path| {
                decode(&std::fs::read(dir.join(path)).expect("image file"), &DecodeLimits::default()).expect("decode")
            })
            .collect();
        let (ids, pixels) = vision.prepare(&ids, &images).expect("prepare");
        let want_ids: Vec<u32> = u64s(&e["input_ids"]).into_iter().map(|v| v as u32).collect();
        assert_eq!(ids, want_ids, "{name}: input ids with the image blocks");
        if pixels.is_empty() {
            assert!(e.get("pixel_values_bf16_bits").is_none(), "{name}: expected pixel values");
            continue;
        }
        image_prompts += 1;
        let grids: Vec<Vec<u64>> = pixels.iter().map(|pv| vec![pv.grid.0 as u64, pv.grid.1 as u64]).collect();
        let want_grids: Vec<Vec<u64>> =
            e["aspect_ratios"].as_array().expect("aspect ratios").iter().map(u64s).collect();
        assert_eq!(grids, want_grids, "{name}: tile grids");
        let bits: Vec<u64> = pixels.iter().flat_map(|pv| pv.values.iter().map(|v| u64::from(v.to_bits()))).collect();
        let want = u64s(&e["pixel_values_bf16_bits"]);
        assert_eq!(bits.len(), want.len(), "{name}: pixel value count");
        let differing = bits.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} of {} bf16 pixel values differ", want.len());
        eprintln!("{name}: {} pixel values bit-identical, grids {grids:?}, {} ids", want.len(), ids.len());
    }
    assert_eq!(image_prompts, 2, "the case has two image prompts");
}
