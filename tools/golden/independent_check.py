#!/usr/bin/env python3
"""Check a golden case WITHOUT transformers: a from-scratch float64 Llama 4 text forward pass (written from
shared/docs/llama4-reference.md semantics) plus tokenization with the `tokenizers` library and the chat template rendered
with jinja2. It reads only the files herd reads (config.json in either layout, safetensors, tokenizer.json,
tokenizer_config.json, chat_template.jinja) and compares with expected.json:

  * input_ids: tokenizers + jinja2 must reproduce transformers' ids,
  * last_logits: max |f64 - transformers f32| must be <= --tol (default 1e-3),
  * argmax at every prompt position and the greedy ids (via one full forward over prompt + greedy ids).

    independent_check.py CASE_DIR [--tol 1e-3]

Exit status 0 when everything agrees. Needs torch, safetensors, tokenizers, jinja2 (all in requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

DT = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


def text_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    tc = dict(cfg.get("text_config", cfg))
    n = tc["num_hidden_layers"]
    # rope: v5 layout has rope_parameters (theta inside); Hub layout has rope_theta + rope_scaling
    rp = tc.get("rope_parameters")
    if rp is None:
        rp = dict(tc.get("rope_scaling") or {"rope_type": "default"})
        rp["rope_theta"] = tc.get("rope_theta", 500000.0)
    rp.setdefault("rope_type", rp.get("type", "default"))
    tc["_rope"] = rp
    nrl = tc.get("no_rope_layers") or []
    if not nrl:  # empty / missing: derived, 1 = RoPE, 0 = NoPE
        interval = tc.get("no_rope_layer_interval", 4)
        nrl = [int((i + 1) % interval != 0) for i in range(n)]
    tc["_use_rope"] = [bool(x) for x in nrl]
    moe = tc.get("moe_layers")
    if moe is None:
        step = tc.get("interleave_moe_layer_step", 1)
        moe = list(range(step - 1, n, step))
    tc["_moe"] = set(moe)
    tc["_temp"] = bool(tc.get("attn_temperature_tuning", True))  # Hub files say 4
    tc.setdefault("head_dim", tc["hidden_size"] // tc["num_attention_heads"])
    return tc


def inv_freq(tc: dict) -> torch.Tensor:
    rp, d = tc["_rope"], tc["head_dim"]
    base = float(rp["rope_theta"])
    w = 1.0 / (base ** (torch.arange(0, d, 2, dtype=DT) / d))
    if rp["rope_type"] == "llama3":
        factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        old = float(rp["original_max_position_embeddings"])
        lam_lo, lam_hi = old / lo, old / hi
        out = []
        for wj in w.tolist():
            lam = 2 * math.pi / wj
            if lam < lam_hi:
                out.append(wj)
            elif lam > lam_lo:
                out.append(wj / factor)
            else:  # only reachable when lo != hi
                s = (old / lam - lo) / (hi - lo)
                out.append((1 - s) * wj / factor + s * wj)
        w = torch.tensor(out, dtype=DT)
    elif rp["rope_type"] != "default":
        raise SystemExit(f"unsupported rope_type {rp['rope_type']}")
    return w


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    idx = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    w = {}
    for f in files:
        for k, v in load_file(str(model_dir / f)).items():
            if k.startswith("language_model."):
                k = k[len("language_model.") :]
            w[k] = v.to(DT)
    return w


# ---------------------------------------------------------------------------------------------------------------
# forward (float64)
# ---------------------------------------------------------------------------------------------------------------


def rms(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def forward(tc: dict, W: dict, ids: list[int]) -> torch.Tensor:
    T, H = len(ids), tc["hidden_size"]
    nh, nkv, d = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    eps, C = tc["rms_norm_eps"], tc["attention_chunk_size"]
    pos = torch.arange(T, dtype=DT)
    ang = pos[:, None] * inv_freq(tc)[None, :]  # [T, d/2]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = ki <= qi
    chunked = causal & ((ki // C) == (qi // C))
    tau = 1.0 + tc.get("attn_scale", 0.1) * torch.log1p(torch.floor((pos + 1.0) / tc.get("floor_scale", 8192)))

    def rope(x):  # interleaved pairs (2j, 2j+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)

    def mlp(prefix, x):
        g = x @ W[prefix + "gate_proj.weight"].T
        u = x @ W[prefix + "up_proj.weight"].T
        return (torch.nn.functional.silu(g) * u) @ W[prefix + "down_proj.weight"].T

    h = W["model.embed_tokens.weight"][torch.tensor(ids)]
    for layer in range(tc["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a = rms(h, W[p + "input_layernorm.weight"], eps)
        q = (a @ W[p + "self_attn.q_proj.weight"].T).view(T, nh, d)
        k = (a @ W[p + "self_attn.k_proj.weight"].T).view(T, nkv, d)
        v = (a @ W[p + "self_attn.v_proj.weight"].T).view(T, nkv, d)
        use_rope = tc["_use_rope"][layer]
        if use_rope:
            q, k = rope(q), rope(k)
            if tc.get("use_qk_norm", False):
                q, k = rms(q, None, eps), rms(k, None, eps)
            mask = chunked
        else:
            if tc["_temp"]:
                q = q * tau[:, None, None]
            mask = causal
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        s = s.masked_fill(~mask[None], float("-inf"))
        o = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v).reshape(T, nh * d)
        h = h + o @ W[p + "self_attn.o_proj.weight"].T
        b = rms(h, W[p + "post_attention_layernorm.weight"], eps)
        if layer in tc["_moe"]:
            logits = b @ W[p + "feed_forward.router.weight"].T  # [T, E]
            top_v, top_e = logits.max(dim=-1)
            score = torch.sigmoid(top_v)[:, None]
            x = b * score  # the score scales the expert INPUT
            gu = torch.einsum("th,thf->tf", x, W[p + "feed_forward.experts.gate_up_proj"][top_e])
            g, u = gu.chunk(2, dim=-1)  # gate first, then up
            y = torch.einsum("tf,tfh->th", u * torch.nn.functional.silu(g), W[p + "feed_forward.experts.down_proj"][top_e])
            out = mlp(p + "feed_forward.shared_expert.", b) + y
        else:
            out = mlp(p + "feed_forward.", b)
        h = h + out
    h = rms(h, W["model.norm.weight"], eps)
    return h @ W["lm_head.weight"].T


# ---------------------------------------------------------------------------------------------------------------
# tokenization without transformers
# ---------------------------------------------------------------------------------------------------------------


def make_encoder(model_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = tcfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    bos = tcfg.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")

    def render(messages):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos)

    def encode(p: dict) -> tuple[list[int], str | None]:
        if "input_ids" in p:
            return list(p["input_ids"]), None
        if "messages" in p:
            text = render(p["messages"])
            return tok.encode(text, add_special_tokens=False).ids, text
        return tok.encode(p["text"], add_special_tokens=True).ids, None

    return encode


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", type=Path)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model_dir = args.case / "model"
    tc, W = text_config(model_dir), load_weights(model_dir)
    inp = json.loads((args.case / "input.json").read_text())
    exp = json.loads((args.case / "expected.json").read_text())
    exp_by_name = {p["name"]: p for p in exp["prompts"]}
    encode = make_encoder(model_dir)
    ok = True
    print(f"{'prompt':<24} {'ids':<5} {'max|f64-f32|':<13} {'argmax':<8} {'greedy':<7}")
    for p in inp["prompts"]:
        e = exp_by_name[p["name"]]
        ids, rendered = encode(p)
        ids_ok = ids == e["input_ids"] and (rendered is None or rendered == e.get("rendered"))
        gen = e["greedy_new_ids"]
        logits = forward(tc, W, e["input_ids"] + gen[:-1])
        n = len(e["input_ids"])
        diff = float((logits[n - 1] - torch.tensor(e["last_logits"], dtype=DT)).abs().max())
        am = logits[:n].argmax(-1).tolist()
        am_ok = am == e["argmax"]
        g_ok = logits[n - 1 :].argmax(-1).tolist()[: len(gen)] == gen
        row_ok = ids_ok and am_ok and g_ok and diff <= args.tol
        ok &= row_ok
        print(
            f"{p['name']:<24} {'ok' if ids_ok else 'DIFF':<5} {diff:<13.3e} {'ok' if am_ok else 'DIFF':<8} "
            f"{'ok' if g_ok else 'DIFF':<7} {'PASS' if row_ok else 'FAIL'}"
        )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
