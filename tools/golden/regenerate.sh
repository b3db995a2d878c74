#!/usr/bin/env bash
# Rebuild every committed golden case under testdata/golden/ (about a minute on one CPU core).
#   tools/golden/regenerate.sh            # uses $PYTHON, else python3
#   PYTHON=/path/to/venv/bin/python tools/golden/regenerate.sh
# Afterwards `git status testdata/golden` should show no change unless transformers/torch/tokenizers changed
# (the outputs are byte-identical for the pinned versions in tools/golden/requirements.txt on x86-64 Linux).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
GEN=tools/golden/make_golden.py
OUT=testdata/golden
# Sizes below the script defaults (vocab 384, expert width 16, dense width 48) keep the three cases at ~3.5 MB in all.
SMALL=(--vocab 384 --expert-width 16 --dense-width 48)

# Maverick shape: MoE on odd layers, dense layers, no QK-norm, plain RoPE; causal LM, f32, transformers 5
# config layout, sharded into 3 safetensors files + model.safetensors.index.json.
"$PY" "$GEN" --shape maverick --seed 5 "${SMALL[@]}" --arch causal --dtype float32 --config-layout v5 \
    --shard-size 700000 --out "$OUT/maverick"

# Scout shape: MoE on every layer, QK-norm, llama3 RoPE scaling with a blend band (16 / 1 / 4, original 64);
# Llama4ForConditionalGeneration (language_model.* names + tiny vision tower), bf16, Hub config layout.
"$PY" "$GEN" --shape scout --seed 3 "${SMALL[@]}" --arch conditional --dtype bfloat16 --config-layout hub \
    --out "$OUT/scout"

# Scout shape with the current Scout RoPE values (low_freq_factor == high_freq_factor == 1: no blend band);
# causal LM, f32, transformers 5 layout; 4 layers (NoPE layer 3 only) to save space.
"$PY" "$GEN" --shape scout --seed 4 "${SMALL[@]}" --layers 4 --high-freq-factor 1 --arch causal \
    --dtype float32 --config-layout v5 --out "$OUT/scout-v5"

# Multimodal: Llama4ForConditionalGeneration with a tiny vision tower (tile 28, patch 7, pixel shuffle 0.5),
# f32, three synthetic PNG images (1x3 canvas + global tile, a single tile, a downscaled 3x1 canvas + global tile).
"$PY" tools/golden/make_golden_vision.py --seed 14 --out "$OUT/vision"

du -sh "$OUT"/*
