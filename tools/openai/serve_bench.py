#!/usr/bin/env python3
"""Latency of a running `herd serve` (or any OpenAI-compatible server) under concurrent streams.

For each concurrency level C it keeps C streaming chat completions in flight until
`--requests-per-stream * C` have finished, and reports medians and p90 of:
  TTFT  time from sending the request to the first content chunk,
  ITL   gaps between later content chunks (one chunk per token on herd),
  E2E   whole request, and the aggregate generated tokens per second.

Every request uses `ignore_eos` and a fixed `max_tokens`, so each stream generates exactly
that many tokens. Prints a table, and with --json one JSON object per level.

    python3 tools/openai/serve_bench.py --base-url http://127.0.0.1:8000/v1 --model maverick-mini \\
        --concurrency 1,4,16 --max-tokens 64
"""

import argparse
import json
import statistics
import sys
import threading
import time

import openai


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def one_request(client, model, prompt, max_tokens):
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    stamps = []
    tokens = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError("the stream carried no content")
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - start, "itl": itl, "e2e": end - start, "tokens": tokens or len(stamps)}


def run_level(client, model, prompt, max_tokens, concurrency, per_stream):
    results, errors = [], []
    lock = threading.Lock()

    def worker():
        for _ in range(per_stream):
            try:
                r = one_request(client, model, prompt, max_tokens)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported, and the level fails
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    e2e = [r["e2e"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_median_ms": 1e3 * statistics.median(ttft) if ttft else None,
        "ttft_p90_ms": 1e3 * percentile(ttft, 0.9),
        "itl_median_ms": 1e3 * statistics.median(itl) if itl else None,
        "itl_p90_ms": 1e3 * percentile(itl, 0.9),
        "e2e_median_s": statistics.median(e2e) if e2e else None,
        "output_tokens_per_s": tokens / wall,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--prompt", default="Write a short story about a herd of llamas crossing the Andes.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=600, max_retries=0)
    # One warm-up request so that page faults of the first forward are not in the numbers.
    one_request(client, args.model, args.prompt, 4)
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        row = run_level(client, args.model, args.prompt, args.max_tokens, c, args.requests_per_stream)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"streams {c:>3}: {row['requests']} requests, {row['errors']} errors; "
                f"TTFT median {row['ttft_median_ms']:.0f} ms (p90 {row['ttft_p90_ms']:.0f}); "
                f"ITL median {row['itl_median_ms']:.1f} ms (p90 {row['itl_p90_ms']:.1f}); "
                f"E2E median {row['e2e_median_s']:.2f} s; {row['output_tokens_per_s']:.1f} output tok/s",
                flush=True,
            )
    if any(r["errors"] for r in rows):
        print(f"errors: {[r['first_error'] for r in rows if r['errors']]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
