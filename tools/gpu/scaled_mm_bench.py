#!/usr/bin/env python3
"""Baselines for scripts/gpu-check.sh (runs on the GPU machine, needs PyTorch with CUDA).

0. Memory bandwidth: device-to-device copy and a read-only reduction over 1 GiB.
1. Dense FP8 peak of this card: torch._scaled_mm on one large square-ish e4m3 GEMM.
2. The per-expert torch._scaled_mm loop at Maverick's MoE shapes (hidden 5120, width 8192,
   128 experts, top-1), uniform and skewed routing: gate_up ([n, 5120] x [5120, 16384]) and down
   ([n, 8192] x [8192, 5120]) per active expert, per-row / per-column scales, bf16 output.
Prints one JSON object per line.
"""
import argparse
import json

import torch

HIDDEN, WIDTH = 5120, 8192


def timed(fn, iters):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def fp8(rows, cols):
    return (torch.randn(rows, cols, device="cuda") * 0.5).to(torch.float8_e4m3fn)


def mm(a, b_t, sa, sb):
    # _scaled_mm wants b column-major: pass the [n, k] weight transposed.
    return torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="16,64,256,1024,4096,16384")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--experts", type=int, default=128, help="128: all on one GPU; 16: one GPU's share of 8-way EP")
    ap.add_argument("--skip-peak", action="store_true", help="skip the bandwidth and dense-peak measurements")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()

    if not a.skip_peak:
        # Memory ceilings: a device-to-device copy (bytes read + written) and a read-only reduction
        # (the decode floor: a decode step only reads weights).
        buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(buf)
        ms = timed(lambda: dst.copy_(buf), a.iters)
        print(json.dumps({"bench": "copy_bandwidth", "device": dev, "bytes": 2 * buf.numel(), "ms": ms,
                          "gbps": 2 * buf.numel() / ms / 1e6}), flush=True)
        words = buf.view(torch.int32)
        ms = timed(lambda: words.max(), a.iters)
        print(json.dumps({"bench": "read_bandwidth", "device": dev, "bytes": buf.numel(), "ms": ms,
                          "gbps": buf.numel() / ms / 1e6}), flush=True)
        del buf, dst, words

        m = n = k = 8192
        x, w = fp8(m, k), fp8(n, k)
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        ms = timed(lambda: mm(x, w, sa, sb), a.iters)
        print(json.dumps({"bench": "dense_fp8_peak", "device": dev, "m": m, "n": n, "k": k, "ms": ms,
                          "tflops": 2 * m * n * k / ms / 1e9}), flush=True)
        del x, w

    # Distinct weights per expert (as herd's bench has), so every active expert streams its own.
    gus = [fp8(2 * WIDTH, HIDDEN) for _ in range(a.experts)]
    dns = [fp8(HIDDEN, WIDTH) for _ in range(a.experts)]
    gen = torch.Generator().manual_seed(7)
    for tokens in [int(t) for t in a.tokens.split(",")]:
        for routing in ("uniform", "skewed"):
            experts = torch.randint(0, a.experts, (tokens,), generator=gen)
            if routing == "skewed":
                experts[::2] = torch.arange(0, tokens, 2) % 4
            counts = torch.bincount(experts, minlength=a.experts).tolist()
            active = [e for e, c in enumerate(counts) if c > 0]
            xs = [fp8(counts[e], HIDDEN) for e in active]
            hs = [fp8(counts[e], WIDTH) for e in active]
            sas = [torch.ones(counts[e], 1, device="cuda") for e in active]
            s_gu, s_dn = torch.ones(1, 2 * WIDTH, device="cuda"), torch.ones(1, HIDDEN, device="cuda")

            def loop():
                for e, xe, he, se in zip(active, xs, hs, sas):
                    mm(xe, gus[e], se, s_gu)
                    mm(he, dns[e], se, s_dn)

            ms = timed(loop, a.iters)
            flops = 2 * tokens * (2 * WIDTH * HIDDEN + HIDDEN * WIDTH)
            print(json.dumps({"bench": "scaled_mm_loop", "experts": a.experts, "tokens": tokens, "routing": routing,
                              "active_experts": len(active), "total_ms": ms, "total_tflops": flops / ms / 1e9}),
                  flush=True)


if __name__ == "__main__":
    main()
