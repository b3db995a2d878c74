#!/usr/bin/env python3
"""Build one tiny random-weight multimodal Llama 4 model with transformers and write a golden image case.

    OUT/model/         Llama4ForConditionalGeneration as transformers saves it, plus the processor files
                       (preprocessor_config.json, processor_config.json), tokenizer and generation config
    OUT/images/        deterministic synthetic PNG images (numpy PCG64), a few hundred bytes each
    OUT/input.json     the eval input; image content parts are {"type": "image", "path": "images/NAME.png"}
                       (relative to input.json)
    OUT/expected.json  transformers' outputs: per prompt the expanded input ids, the processor's pixel values
                       (bf16 bit patterns), f32 last-position logits, per-position argmax and greedy ids

The text model, tokenizer, weight drawing and JSON helpers are make_golden.py's. The vision tower is tiny but
consistent: tile (image_size) 28, patch 7 -> a 4x4 patch grid per tile, pixel shuffle 0.5 -> 4 image tokens per
tile, intermediate_size = 4 * hidden_size (the adapter's fc1 reads the pixel-shuffled channels). See
tools/golden/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden as mg  # noqa: E402  (sets the single-thread / offline environment before torch loads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    GenerationConfig,
    Llama4Config,
    Llama4ForConditionalGeneration,
    Llama4ImageProcessor,
    Llama4Processor,
    Llama4VisionConfig,
)
from transformers.cache_utils import DynamicCache  # noqa: E402

# Images: (name, height, width). One wide image that upscales into a 1x3 canvas (+ global tile), one small one
# that fits a single tile (upscaled, padded, no global tile), one tall one that is downscaled (antialiased) into
# a 3x1 canvas (+ global tile).
IMAGES = [("wide", 20, 70), ("small", 17, 23), ("tall", 90, 40)]


def make_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus noise, so that resizing has real work to do and every channel differs."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 100 * np.sin((x + 2 * y) / 3.0)], -1)
    noise = rng.integers(-40, 41, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=32)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--vision-heads", type=int, default=2)
    ap.add_argument("--projector-dim", type=int, default=48, help="vision_output_dim = projector dims")
    ap.add_argument("--tile", type=int, default=28, help="vision image_size = the processor's tile size")
    ap.add_argument("--patch", type=int, default=7)
    ap.add_argument("--max-tiles", type=int, default=4, help="the image processor's max_patches")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    if (args.tile // args.patch) % 2:
        raise SystemExit("the patch grid per tile must be even for pixel shuffle 0.5")

    out: Path = args.out
    model_dir, img_dir = out / "model", out / "images"
    for d in (model_dir, img_dir):
        if d.exists():
            mg.shutil.rmtree(d)
        d.mkdir(parents=True)

    tok, ids = mg.build_tokenizer(384)
    text_args = mg.parse_args(
        ["--shape", "scout", "--seed", str(args.seed), "--out", str(out), "--hidden", str(args.hidden),
         "--layers", str(args.layers), "--vocab", "384", "--expert-width", "16", "--experts", "4", "--arch", "conditional"]
    )
    base = mg.build_config(text_args, ids)
    vh = args.vision_hidden
    vision = Llama4VisionConfig(
        hidden_size=vh,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_heads,
        intermediate_size=4 * vh,  # Llama4VisionMLP2.fc1 reads hidden / ratio^2 channels
        image_size=args.tile,
        patch_size=args.patch,
        vision_output_dim=args.projector_dim,
        projector_input_dim=args.projector_dim,
        projector_output_dim=args.projector_dim,
        pixel_shuffle_ratio=0.5,
        hidden_act="gelu",
        norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config = Llama4Config(
        text_config=base.text_config,
        vision_config=vision,
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
        tie_word_embeddings=False,
    )
    model = Llama4ForConditionalGeneration(config).eval()
    mg.randomize_weights(model, args.seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        pad_token_id=ids["<|finetune_right_pad|>"],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    model.save_pretrained(model_dir)
    image_processor = Llama4ImageProcessor(size={"height": args.tile, "width": args.tile}, max_patches=args.max_tiles)
    processor = Llama4Processor(
        image_processor=image_processor, tokenizer=tok, patch_size=args.patch, pixel_shuffle_ratio=0.5
    )
    processor.save_pretrained(model_dir)
    del model

    rng = np.random.default_rng(args.seed + 104729)
    for name, h, w in IMAGES:
        Image.fromarray(make_image(rng, h, w), "RGB").save(img_dir / f"{name}.png", optimize=True)
    mg.chmod_tree(out)

    # ---- reload exactly what was written
    model = Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    assert isinstance(proc.image_processor, Llama4ImageProcessor), type(proc.image_processor)

    img = lambda name: {"type": "image", "path": f"images/{name}.png"}  # noqa: E731
    txt = lambda t: {"type": "text", "text": t}  # noqa: E731
    prompts = [
        {"name": "one_wide_image", "messages": [{"role": "user", "content": [img("wide"), txt("Describe this image.")]}]},
        {
            "name": "two_images_system",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [txt("Compare "), img("small"), txt(" with "), img("tall"), txt(".")]},
            ],
        },
        {"name": "text_only", "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    ]
    patch_id = ids["<|patch|>"]
    results = []
    for p in prompts:
        rendered = proc.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        paths = [c["path"] for m in p["messages"] if isinstance(m["content"], list) for c in m["content"]
                 if c["type"] == "image"]
        images = [Image.open(out / path) for path in paths]
        enc = proc(text=rendered, images=images or None, add_special_tokens=False, return_tensors="pt")
        input_ids = enc["input_ids"][0].tolist()
        entry = {"name": p["name"], "input_ids": input_ids, "rendered": rendered}
        pv = enc.get("pixel_values")
        kw = {}
        if pv is not None:
            assert pv.dtype == torch.bfloat16, pv.dtype
            entry["images"] = [
                {"path": path, "size": [im.height, im.width]} for path, im in zip(paths, images)
            ]
            entry["pixel_values_shape"] = list(pv.shape)
            entry["pixel_values_bf16_bits"] = pv.contiguous().view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).flatten().tolist()
            # (rows, cols) tile grid per image; the processor drops this from its output, so ask its image processor
            entry["aspect_ratios"] = proc.image_processor(images, return_tensors="pt")["aspect_ratios"].tolist()
            kw["pixel_values"] = pv.to(torch.float32)
        n_patch = sum(1 for t in input_ids if t == patch_id)
        with torch.no_grad():
            x = torch.tensor([input_ids])
            full = model(input_ids=x, use_cache=False, **kw).logits[0].float()
            cache = DynamicCache(config=model.config.text_config)
            o = model(input_ids=x, past_key_values=cache, use_cache=True, **kw)
            step = o.logits[0, -1].float()
            gen = []
            for i in range(args.max_new_tokens):
                nxt = int(step.argmax())
                gen.append(nxt)
                if i + 1 == args.max_new_tokens:
                    break
                o = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
                step = o.logits[0, -1].float()
            full2 = model(input_ids=torch.tensor([input_ids + gen[:-1]]), use_cache=False, **kw).logits[0].float()
            check = full2[len(input_ids) - 1 :].argmax(-1).tolist()
            if check != gen:
                raise SystemExit(f"{p['name']}: cached greedy ids {gen} disagree with the full forward {check}")
        entry["patch_tokens"] = n_patch
        entry["argmax"] = full.argmax(-1).tolist()
        entry["greedy_new_ids"] = gen
        entry["greedy_text"] = tok.decode(gen)
        entry["diagnostics"] = {"min_top2_logit_margin": mg.top2_margin(full), "logits_std": float(full.std())}
        entry["last_logits"] = mg.f32_list(full[-1])
        results.append(entry)
        log(f"  {p['name']:<20} len={len(input_ids):3d} patches={n_patch:3d} margin="
            f"{entry['diagnostics']['min_top2_logit_margin']:.2e} greedy={gen[:8]}")

    input_json = {"max_new_tokens": args.max_new_tokens, "prompts": prompts}
    expected = {
        "dtype": "f32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "attn_implementation": "sdpa",
        "reference_class": "Llama4ForConditionalGeneration",
        "max_new_tokens": args.max_new_tokens,
        "case": {
            "seed": args.seed,
            "hidden_size": args.hidden,
            "num_hidden_layers": args.layers,
            "vision": {k: getattr(vision, k) for k in (
                "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "vision_output_dim", "pixel_shuffle_ratio")},
            "max_tiles": args.max_tiles,
            "special_token_ids": {t: ids[t] for t in mg.SPECIAL_TOKENS if "reserved" not in t},
        },
        "prompts": results,
    }
    mg.write_json(out / "input.json", input_json)
    mg.write_json(out / "expected.json", expected)
    mg.chmod_tree(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({total} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
