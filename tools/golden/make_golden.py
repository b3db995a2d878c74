#!/usr/bin/env python3
"""Build one tiny random-weight Llama 4 model with transformers and write a golden case.

    OUT/model/         the checkpoint exactly as transformers saves it (+ tokenizer, generation config)
    OUT/input.json     the eval input: {"max_new_tokens": N, "prompts": [...]}
    OUT/expected.json  transformers' f32 outputs for those prompts

Everything is deterministic: the same arguments give byte-identical files on the same machine and software
versions (weights are drawn with numpy's PCG64, which is platform independent; torch runs on one CPU thread
with deterministic algorithms). See tools/golden/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

# Must be set before tokenizers / torch are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
    Llama4VisionConfig,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.llama4.processing_llama4 import chat_template as LLAMA4_CHAT_TEMPLATE  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

# The Llama 4 / o200k pre-tokenizer split regex (transformers' convert_llama4_weights_to_hf.py, O200K_PATTERN).
O200K_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Llama 4's special tokens in their real relative order (real ids 200000..), with most reserved slots dropped so
# that they fit a tiny vocab. Offsets from the first special id match the real ones up to <|finetune_right_pad|>
# (+18); the vision block follows right after two text reserved tokens.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # +0
    "<|end_of_text|>",  # +1
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",  # +5
    "<|header_end|>",  # +6
    "<|eom|>",  # +7
    "<|eot|>",  # +8
    "<|step|>",  # +9
    "<|text_post_train_reserved_special_token_0|>",
    "<|text_post_train_reserved_special_token_1|>",
    "<|text_post_train_reserved_special_token_2|>",
    "<|text_post_train_reserved_special_token_3|>",
    "<|text_post_train_reserved_special_token_4|>",
    "<|text_post_train_reserved_special_token_5|>",
    "<|python_start|>",  # +16
    "<|python_end|>",  # +17
    "<|finetune_right_pad|>",  # +18 (pad)
    "<|text_post_train_reserved_special_token_8|>",
    "<|text_post_train_reserved_special_token_9|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|vision_reserved_special_token_0|>",
    "<|vision_reserved_special_token_1|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|vision_reserved_special_token_2|>",
    "<|vision_reserved_special_token_3|>",
    "<|vision_reserved_special_token_4|>",
    "<|vision_reserved_special_token_5|>",
    "<|image|>",
    "<|vision_reserved_special_token_6|>",
    "<|patch|>",
]
# Model vocab rows above the last special token that the tokenizer never produces (like Llama 4's 201134..202047).
# The special block starts at vocab - SPECIAL_AREA.
SPECIAL_AREA = 48
assert len(SPECIAL_TOKENS) <= SPECIAL_AREA

# Deterministic BPE training text (plain English, a little punctuation, digits and some non-ASCII).
CORPUS = """\
The quick brown fox jumps over the lazy dog. A tiny model is not a smart model, but it is a useful one: it lets
us check every step of the forward pass against a reference implementation. When the weights are random, the
text that the model writes is nonsense, yet the numbers are exact and can be compared to the last digit.
Mixture of experts layers send each token to one expert chosen by a router. The router is a small linear layer
that scores every expert; the best score wins, and its sigmoid scales the input of the chosen expert. A shared
expert sees every token. Attention layers use rotary position embeddings, except every fourth layer, which uses
no position embedding at all and a temperature that grows slowly with the position of the token.
Chunked attention splits the sequence into blocks; a token can only see earlier tokens in its own block. The
key and value cache stores what each layer has seen, so that generation does not recompute the whole prompt.
She said that the weather would be fine tomorrow, and they decided to walk to the station instead of taking the
bus. There were seven hundred and twenty-three people in the hall, and 42 of them had brought their own chairs.
In 1969, people walked on the moon for the first time. In 2025, models with hundreds of billions of parameters
answer questions, write programs, and translate between languages such as English, French and German.
Où est la gare? Die Straße ist lang. El niño comió una manzana. Ça va très bien, merci!
What is the capital of France? Paris is the capital of France. What is two plus two? Two plus two is four.
Please write a short poem about the sea. The sea is wide, the sea is deep, the sea will rock the ships to sleep.
You are a helpful assistant. Answer the question as well as you can, and say so when you do not know.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / ByteLevel byte -> printable unicode char mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def learn_bpe(n_vocab: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny deterministic byte-level BPE learner: ids 0..255 are the raw bytes (id == byte value), then one id
    per merge, most frequent pair first (ties: lexicographically smallest pair)."""
    byte_enc = bytes_to_unicode()
    vocab = {byte_enc[b]: b for b in range(256)}
    pre = make_pre_tokenizer()
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(CORPUS))
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(vocab) < n_vocab:
        pairs: Counter = Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return vocab, merges


def build_tokenizer(vocab_size: int) -> tuple[PreTrainedTokenizerFast, dict[str, int]]:
    n_bpe = vocab_size - SPECIAL_AREA
    if n_bpe < 256 + 16:
        raise SystemExit(f"--vocab must be at least {256 + 16 + SPECIAL_AREA}")
    vocab, merges = learn_bpe(n_bpe)
    n_bpe = len(vocab)  # may be smaller if the corpus ran out of pairs
    bpe = BPE(vocab=vocab, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.model.ignore_merges = True  # as in Llama 4's tokenizer.json (TikTokenConverter)
    tok.pre_tokenizer = make_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids["<|begin_of_text|>"] == n_bpe and max(ids.values()) == n_bpe + len(SPECIAL_TOKENS) - 1
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, ids[bos])],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=4096,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )
    return fast, ids


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------

SHAPE_DEFAULTS = {
    "maverick": dict(experts=16, interleave=2, qk_norm=False, rope="default"),
    "scout": dict(experts=8, interleave=1, qk_norm=True, rope="llama3"),
}


def build_config(args, ids):
    rope: dict
    if args.rope == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": args.rope_theta,
            "factor": args.rope_factor,
            "low_freq_factor": args.low_freq_factor,
            "high_freq_factor": args.high_freq_factor,
            "original_max_position_embeddings": args.rope_original_max,
        }
    else:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    text = Llama4TextConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        intermediate_size_mlp=args.dense_width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        pad_token_id=ids["<|finetune_right_pad|>"],
        tie_word_embeddings=False,
        num_experts_per_tok=1,
        num_local_experts=args.experts,
        interleave_moe_layer_step=args.interleave,
        use_qk_norm=args.qk_norm,
        rope_parameters=rope,
        no_rope_layer_interval=4,
        attention_chunk_size=args.chunk,
        attn_temperature_tuning=True,
        floor_scale=args.floor_scale,
        attn_scale=0.1,
        attention_bias=False,
    )
    if args.arch == "causal":
        return text
    vision = Llama4VisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
        pixel_shuffle_ratio=0.5,
        hidden_act="gelu",
        norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=ids["<|image_start|>"],
        eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
        tie_word_embeddings=False,
    )


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter with numpy PCG64 (platform independent), in sorted name order, at a scale that gives
    O(1) activations, spread-out logits and decisive but varied routing (transformers' std 0.02 gives near-uniform
    logits on a model this small)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(p.shape)
            if p.ndim == 1:
                if name.endswith("bias"):
                    val = 0.1 * rng.standard_normal(shape, dtype=np.float32)
                else:  # RMSNorm / LayerNorm weights: random around 1 (never all ones)
                    val = rng.uniform(0.6, 1.4, size=shape).astype(np.float32)
            elif name.endswith("embed_tokens.weight"):
                val = rng.standard_normal(shape, dtype=np.float32)
            elif name.endswith("lm_head.weight"):
                val = (3.0 / math.sqrt(shape[1])) * rng.standard_normal(shape, dtype=np.float32)
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                # fused expert weights are [E, in, out] (x @ W)
                val = (1.0 / math.sqrt(shape[1])) * rng.standard_normal(shape, dtype=np.float32)
            elif name.endswith("router.weight"):
                val = (1.5 / math.sqrt(shape[1])) * rng.standard_normal(shape, dtype=np.float32)
            elif p.ndim == 2:  # nn.Linear [out, in]
                val = (1.0 / math.sqrt(shape[1])) * rng.standard_normal(shape, dtype=np.float32)
            else:  # vision conv / embeddings etc.
                val = 0.1 * rng.standard_normal(shape, dtype=np.float32)
            p.copy_(torch.from_numpy(np.ascontiguousarray(val)))


# --------------------------------------------------------------------------------------------------------------
# Config layout rewriting
# --------------------------------------------------------------------------------------------------------------


def to_hub_layout(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json into the older Hub layout (Llama-4-Scout/Maverick as published)."""
    cfg = copy.deepcopy(cfg)

    def fix_common(d: dict) -> None:
        if "dtype" in d:
            d["torch_dtype"] = d.pop("dtype")

    def fix_text(d: dict) -> None:
        fix_common(d)
        rp = d.pop("rope_parameters", None) or {}
        d["rope_theta"] = float(rp.get("rope_theta", 500000.0))
        if rp.get("rope_type", "default") != "default":
            d["rope_scaling"] = {k: v for k, v in sorted(rp.items()) if k != "rope_theta"}
        else:
            d["rope_scaling"] = None
        if d.get("attn_temperature_tuning"):
            d["attn_temperature_tuning"] = 4
        n = d["num_hidden_layers"]
        nrl = d.get("no_rope_layers") or [int((i + 1) % d.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
        d["no_rope_layers"] = [int(x) for x in nrl]
        # derived lists that the 4.5x-era Hub files do not rely on: make consumers derive them
        d.pop("layer_types", None)
        d.pop("moe_layers", None)

    if "text_config" in cfg:
        fix_common(cfg)
        fix_text(cfg["text_config"])
        cfg["text_config"] = dict(sorted(cfg["text_config"].items()))
        if isinstance(cfg.get("vision_config"), dict):
            vc = cfg["vision_config"]
            fix_common(vc)
            vrp = vc.pop("rope_parameters", None) or {}
            vc["rope_theta"] = float(vrp.get("rope_theta", 10000.0))
            cfg["vision_config"] = dict(sorted(vc.items()))
    else:
        fix_text(cfg)
    return dict(sorted(cfg.items()))


def load_config_for_transformers(cls, model_dir: Path):
    """Parse config.json with transformers. transformers 5.x validates strictly and rejects the Hub's integer
    `attn_temperature_tuning: 4` ("expected bool, got int"); that one field is coerced to a bool in memory (the
    model applies the tuning whenever the value is truthy, so this changes nothing numerically). Every other
    legacy key (rope_theta + rope_scaling, torch_dtype, explicit no_rope_layers, missing layer_types/moe_layers)
    goes through transformers' own loading code unchanged. Returns (config, list of shims applied)."""
    d = json.loads((model_dir / "config.json").read_text())
    shims = []
    for sub in (d, d.get("text_config")):
        if isinstance(sub, dict) and "attn_temperature_tuning" in sub:
            v = sub["attn_temperature_tuning"]
            if not isinstance(v, bool):
                sub["attn_temperature_tuning"] = bool(v)
                shims.append(f"attn_temperature_tuning {v!r} -> {bool(v)}")
    return cls.config_class.from_dict(d), shims


# --------------------------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------------------------


def f32_list(t: torch.Tensor) -> list[float]:
    """float32 values as Python floats whose repr is the shortest string that round-trips the f32 value."""
    arr = t.detach().to(torch.float32).cpu().numpy()
    return [float(np.format_float_positional(x, unique=True, trim="-")) if np.isfinite(x) else float(x) for x in arr]


def dumps(obj, indent: int = 0) -> str:
    """JSON with dicts one key per line and lists of scalars on one line."""
    pad = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad}  {json.dumps(str(k))}: {dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "[" + ", ".join(json.dumps(x, ensure_ascii=False) for x in obj) + "]"
        items = [pad + "  " + dumps(v, indent + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path: Path, obj) -> None:
    path.write_text(dumps(obj) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------------------------


class RouterRecorder:
    """Records top-1 expert choices and the top1-top2 router-logit margin of every MoE layer."""

    def __init__(self, lm: Llama4ForCausalLM):
        self.handles = []
        self.active = False
        self.counts: dict[int, Counter] = {}
        self.min_margin = math.inf
        for i, layer in enumerate(lm.model.layers):
            if getattr(layer, "is_moe_layer", False):
                self.counts[i] = Counter()
                self.handles.append(layer.feed_forward.router.register_forward_hook(self._hook(i)))

    def _hook(self, layer_idx):
        def hook(_module, _inp, out):
            if not self.active:
                return
            _, logits = out
            logits = logits.detach().float()
            top = torch.topk(logits, min(2, logits.shape[-1]), dim=-1)
            for e in top.indices[:, 0].tolist():
                self.counts[layer_idx][e] += 1
            if logits.shape[-1] > 1:
                self.min_margin = min(self.min_margin, float((top.values[:, 0] - top.values[:, 1]).min()))

        return hook


def top2_margin(logits: torch.Tensor) -> float:
    v = torch.topk(logits.float(), 2, dim=-1).values
    return float((v[..., 0] - v[..., 1]).min())


@torch.no_grad()
def run_prompt(lm, ids: list[int], max_new: int, recorder: RouterRecorder) -> dict:
    x = torch.tensor([ids], dtype=torch.long)
    # 1. one full forward over the prompt (no cache)
    full = lm(input_ids=x, use_cache=False).logits[0].float()
    last_logits = full[-1]
    argmax = full.argmax(-1).tolist()
    # 2. greedy decoding with the KV cache: prefill, then one token per call; never stops at EOS
    cache = DynamicCache(config=lm.config)
    out = lm(input_ids=x, past_key_values=cache, use_cache=True)
    step_logits = [out.logits[0, -1].float()]
    prefill_diff = float((out.logits[0].float() - full).abs().max())
    gen: list[int] = []
    for i in range(max_new):
        nxt = int(step_logits[-1].argmax())
        gen.append(nxt)
        if i + 1 == max_new:
            break
        out = lm(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        step_logits.append(out.logits[0, -1].float())
    # 3. cross-check: one full forward of prompt + generated ids must give the same argmaxes
    recorder.active = True
    seq = torch.tensor([ids + gen[:-1]], dtype=torch.long) if gen else x
    full2 = lm(input_ids=seq, use_cache=False).logits[0].float()
    recorder.active = False
    n = len(ids)
    check = full2[n - 1 :].argmax(-1).tolist()[: len(gen)]
    if check != gen:
        raise SystemExit(f"KV-cache greedy ids {gen} disagree with the full forward {check}")
    cache_vs_full = float((torch.stack(step_logits) - full2[n - 1 :]).abs().max()) if gen else 0.0
    margins = [top2_margin(full)] + ([top2_margin(torch.stack(step_logits))] if gen else [])
    return {
        "last_logits": last_logits,
        "argmax": argmax,
        "greedy_new_ids": gen,
        "prefill_vs_full_max_diff": prefill_diff,
        "cache_vs_full_max_diff": cache_vs_full,
        "min_top2_logit_margin": min(margins),
        "logits_std": float(full.std()),
    }


def make_prompts(ids: dict[str, int], n_bpe: int, chunk: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed + 7919)
    n_raw = 2 * chunk + 10
    raw = [ids["<|begin_of_text|>"]] + [int(v) for v in rng.integers(0, n_bpe, size=n_raw - 1)]
    raw[n_raw // 2] = ids["<|header_start|>"]  # a special id in the middle, as a raw id
    return [
        {"name": "raw_ids_long", "input_ids": raw},
        {
            "name": "chat_system_two_turns",
            "messages": [
                {"role": "system", "content": "  You are a helpful assistant. Answer briefly.  "},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris is the capital of France."},
                {"role": "user", "content": "And what is two plus two?"},
            ],
        },
        {
            "name": "chat_no_system",
            "messages": [{"role": "user", "content": "Please write a short poem about the sea."}],
        },
        {
            "name": "text_unicode_special",
            "text": "Héllo wörld — naïve café, 日本語 😀!<|eot|> after the eot; 123456 tokens.\n\nDone",
        },
        {"name": "bos_only", "input_ids": [ids["<|begin_of_text|>"]]},
        {"name": "text_empty", "text": ""},
    ]


def encode_prompt(tok, p: dict) -> tuple[list[int], str | None]:
    if "input_ids" in p:
        return list(p["input_ids"]), None
    if "messages" in p:
        rendered = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        direct = tok.apply_chat_template(p["messages"], tokenize=True, add_generation_prompt=True)
        if hasattr(direct, "keys"):
            direct = direct["input_ids"]
        if list(direct) != list(ids):
            raise SystemExit(f"apply_chat_template(tokenize=True) differs from render+encode for {p['name']}")
        return list(ids), rendered
    return list(tok(p["text"])["input_ids"]), None


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["maverick", "scout"], required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=None, help="default 16 (maverick) / 8 (scout)")
    ap.add_argument("--vocab", type=int, default=512, help="model vocab; tokenizer = vocab-48 BPE + 34 specials")
    ap.add_argument("--chunk", type=int, default=16, help="attention_chunk_size")
    ap.add_argument("--floor-scale", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--expert-width", type=int, default=32, help="intermediate_size (routed + shared expert)")
    ap.add_argument("--dense-width", type=int, default=96, help="intermediate_size_mlp (maverick dense layers)")
    ap.add_argument("--max-position-embeddings", type=int, default=4096)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--rope-factor", type=float, default=16.0, help="scout llama3 scaling factor")
    ap.add_argument("--low-freq-factor", type=float, default=1.0)
    ap.add_argument("--high-freq-factor", type=float, default=4.0, help="scout; 1.0 = current Scout (no blend band)")
    ap.add_argument("--rope-original-max", type=int, default=64, help="llama3 original_max_position_embeddings")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="checkpoint dtype")
    ap.add_argument("--arch", choices=["causal", "conditional"], default="causal")
    ap.add_argument("--config-layout", choices=["v5", "hub"], default="v5")
    ap.add_argument(
        "--no-rope-layers",
        choices=["explicit", "empty"],
        default="explicit",
        help="explicit: the 0/1 list (what transformers 5 writes, and the hub rewrite); empty: write [] like the "
        "published Llama 4 config.json files (consumers must derive NoPE = every 4th layer)",
    )
    ap.add_argument("--shard-size", type=int, default=None, help="max_shard_size in bytes (gives an index file)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    d = SHAPE_DEFAULTS[args.shape]
    if args.experts is None:
        args.experts = d["experts"]
    args.interleave = d["interleave"]
    args.qk_norm = d["qk_norm"]
    args.rope = d["rope"]
    return args


def chmod_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(root, 0o755)


def main(argv=None) -> int:
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)

    out: Path = args.out
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)

    # ---- tokenizer
    tok, ids = build_tokenizer(args.vocab)
    n_bpe = ids["<|begin_of_text|>"]

    # ---- model
    config = build_config(args, ids)
    cls = Llama4ForCausalLM if args.arch == "causal" else Llama4ForConditionalGeneration
    model = cls(config).eval()  # default dtype f32 (no .to(): it would drop the vision complex RoPE buffer)
    randomize_weights(model, args.seed)
    if args.dtype == "bfloat16":
        # round the parameters in place (avoid model.to(): it would also cast the vision tower's complex buffer)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        if args.arch == "conditional":
            model.config.text_config.dtype = torch.bfloat16
            model.config.vision_config.dtype = torch.bfloat16
    saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    gen_cfg = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]],
        pad_token_id=ids["<|finetune_right_pad|>"],
        do_sample=True,
        temperature=0.6,
        top_p=0.9,
    )
    model.generation_config = gen_cfg
    save_kwargs = {}
    if args.shard_size:
        save_kwargs["max_shard_size"] = args.shard_size
    model.save_pretrained(model_dir, **save_kwargs)
    tok.save_pretrained(model_dir)

    cfg_path = model_dir / "config.json"
    saved_cfg = json.loads(cfg_path.read_text())
    written_cfg = to_hub_layout(saved_cfg) if args.config_layout == "hub" else copy.deepcopy(saved_cfg)
    if args.no_rope_layers == "empty":
        tcfg = written_cfg.get("text_config", written_cfg)
        tcfg["no_rope_layers"] = []
        tcfg.pop("layer_types", None)
    config_rewritten = written_cfg != saved_cfg
    if config_rewritten:
        cfg_path.write_text(json.dumps(written_cfg, indent=2) + "\n")
    chmod_tree(out)
    del model

    # ---- reload exactly what was written, in f32
    ref_cfg, shims = load_config_for_transformers(cls, model_dir)
    for s in shims:
        log(f"  config shim for transformers {transformers.__version__}: {s}")
    loaded, info = cls.from_pretrained(
        model_dir,
        config=ref_cfg,
        dtype=torch.float32,
        attn_implementation=args.attn_implementation,
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"} if isinstance(info, dict) else {}
    if bad or (isinstance(info, dict) and info.get("error_msgs")):
        raise SystemExit(f"loading the saved checkpoint reported problems: {info}")
    loaded.eval()
    lm = loaded if args.arch == "causal" else loaded.language_model
    state = loaded.state_dict()
    for k, v in saved_state.items():
        if k not in state:
            raise SystemExit(f"reloaded model lacks {k}")
        if not torch.equal(state[k], v.to(torch.float32)):
            raise SystemExit(f"reloaded weight {k} differs from the saved one")
    # the text config the reference actually runs with
    tc = lm.config
    expected_nrl = [int((i + 1) % 4 != 0) for i in range(args.layers)]
    assert list(tc.no_rope_layers) == expected_nrl, tc.no_rope_layers
    assert bool(tc.attn_temperature_tuning), tc.attn_temperature_tuning
    assert tc.attention_chunk_size == args.chunk and tc.floor_scale == args.floor_scale
    assert list(tc.moe_layers) == list(range(args.interleave - 1, args.layers, args.interleave)), tc.moe_layers
    assert tc.rope_parameters["rope_type"] == args.rope, tc.rope_parameters
    assert tc.use_qk_norm == args.qk_norm
    inv_freq = lm.model.rotary_emb.inv_freq.float()
    plain = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim))
    rope_changed = [j for j in range(len(plain)) if float(inv_freq[j]) != float(plain[j])]

    tok2 = AutoTokenizer.from_pretrained(model_dir, config=ref_cfg)  # (AutoTokenizer also parses config.json)
    assert tok2.convert_tokens_to_ids("<|eot|>") == ids["<|eot|>"]
    assert tok2.bos_token == "<|begin_of_text|>" and tok2.eos_token == "<|eot|>"

    # ---- prompts and reference outputs
    prompts = make_prompts(ids, n_bpe, args.chunk, args.seed)
    recorder = RouterRecorder(lm)
    results = []
    for p in prompts:
        pids, rendered = encode_prompt(tok2, p)
        r = run_prompt(lm, pids, args.max_new_tokens, recorder)
        entry = {"name": p["name"], "input_ids": pids}
        if rendered is not None:
            entry["rendered"] = rendered
        entry["argmax"] = r["argmax"]
        entry["greedy_new_ids"] = r["greedy_new_ids"]
        entry["greedy_text"] = tok2.decode(r["greedy_new_ids"])
        entry["diagnostics"] = {
            "min_top2_logit_margin": r["min_top2_logit_margin"],
            "logits_std": r["logits_std"],
            "prefill_vs_full_max_diff": r["prefill_vs_full_max_diff"],
            "cache_vs_full_max_diff": r["cache_vs_full_max_diff"],
        }
        entry["last_logits"] = f32_list(r["last_logits"])
        results.append((entry, r))
        log(
            f"  {p['name']:<24} len={len(pids):3d}  logits_std={r['logits_std']:.3f}  "
            f"margin={r['min_top2_logit_margin']:.2e}  greedy={r['greedy_new_ids'][:8]}..."
        )

    # ---- the same model must come out of the v5 config transformers wrote (hub layout only), and the outer
    #      Llama4ForConditionalGeneration.forward must agree with the inner language model (conditional only)
    cross_checks = {}
    all_ids = [e["input_ids"] for e, _ in results]
    with torch.no_grad():
        ref_full = [lm(input_ids=torch.tensor([i]), use_cache=False).logits[0] for i in all_ids]
        if config_rewritten:
            v5_cfg = cls.config_class.from_dict(copy.deepcopy(saved_cfg))
            alt = cls.from_pretrained(
                model_dir, config=v5_cfg, dtype=torch.float32, attn_implementation=args.attn_implementation
            ).eval()
            alt_lm = alt if args.arch == "causal" else alt.language_model
            same = all(
                torch.equal(alt_lm(input_ids=torch.tensor([i]), use_cache=False).logits[0], r)
                for i, r in zip(all_ids, ref_full)
            )
            if not same:
                raise SystemExit("the rewritten config.json does not give the same model as the one transformers wrote")
            cross_checks["rewritten_config_equals_transformers_config"] = "identical logits"
            del alt, alt_lm
        if args.arch == "conditional":
            try:
                diffs = [
                    float((loaded(input_ids=torch.tensor([i]), use_cache=False).logits[0] - r).abs().max())
                    for i, r in zip(all_ids, ref_full)
                ]
                cross_checks["conditional_forward_max_diff"] = max(diffs)
            except Exception as exc:  # transformers 5.24's image_outputs bug (reference doc section 9.1)
                cross_checks["conditional_forward_max_diff"] = f"forward failed: {type(exc).__name__}: {exc}"
            log(f"  Llama4ForConditionalGeneration.forward vs language_model: {cross_checks['conditional_forward_max_diff']}")
    if shims:
        cross_checks["config_shims"] = shims

    # ---- checks on the model being useful as a test
    min_std = min(r["logits_std"] for _, r in results)
    if min_std < 0.05:
        raise SystemExit(f"logits are nearly flat (std {min_std}); raise the weight scale")
    routing = {str(k): [c.get(e, 0) for e in range(args.experts)] for k, c in recorder.counts.items()}
    distinct = {k: sum(1 for v in vals if v) for k, vals in routing.items()}
    if any(d < 2 for d in distinct.values()):
        raise SystemExit(f"degenerate routing: {distinct}")
    if recorder.min_margin < 1e-4:
        log(f"WARNING: smallest router top1-top2 margin is {recorder.min_margin:.2e} (f32 noise may flip an expert)")
    min_margin = min(r["min_top2_logit_margin"] for _, r in results)
    if min_margin < 1e-4:
        log(f"WARNING: smallest top1-top2 logit margin is {min_margin:.2e} (f32 noise may flip a greedy token)")

    input_json = {"max_new_tokens": args.max_new_tokens, "prompts": prompts}
    expected = {
        "dtype": "f32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "attn_implementation": args.attn_implementation,
        "reference_class": "Llama4ForCausalLM"
        + ("" if args.arch == "causal" else " (Llama4ForConditionalGeneration.language_model)"),
        "max_new_tokens": args.max_new_tokens,
        "cross_checks": cross_checks,
        "case": {
            "shape": args.shape,
            "seed": args.seed,
            "arch": args.arch,
            "checkpoint_dtype": args.dtype,
            "config_layout": args.config_layout,
            "no_rope_layers_style": args.no_rope_layers,
            "shard_size": args.shard_size,
            "vocab_size": args.vocab,
            "tokenizer_size": len(tok2),
            "hidden_size": args.hidden,
            "num_hidden_layers": args.layers,
            "num_local_experts": args.experts,
            "attention_chunk_size": args.chunk,
            "floor_scale": args.floor_scale,
            "moe_layers": list(tc.moe_layers),
            "nope_layers": [i for i, v in enumerate(tc.no_rope_layers) if not v],
            "rope_parameters": dict(sorted(tc.rope_parameters.items())),
            "rope_pairs_changed_by_scaling": rope_changed,
            "special_token_ids": {t: ids[t] for t in SPECIAL_TOKENS if "reserved" not in t},
        },
        "routing": {
            "note": "top-1 expert counts per MoE layer over every prompt + generated token (full forward)",
            "counts": routing,
            "distinct_experts": distinct,
            "min_router_top2_margin": recorder.min_margin,
        },
        "prompts": [e for e, _ in results],
    }
    write_json(out / "input.json", input_json)
    write_json(out / "expected.json", expected)
    chmod_tree(out)

    # ---- summary
    log(f"wrote {out}")
    log(f"  prompt lengths: {[len(e['input_ids']) for e, _ in results]}")
    log(f"  distinct experts per MoE layer: {distinct}")
    log(f"  rope pairs changed by scaling: {rope_changed}; min logit margin {min_margin:.3e}; "
        f"min router margin {recorder.min_margin:.3e}")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"  total size: {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
