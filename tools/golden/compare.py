#!/usr/bin/env python3
"""Compare a golden expected.json with herd's eval output (same format).

    compare.py EXPECTED ACTUAL [--tol 2e-3]

Per prompt (matched by name) it checks:
  * input_ids identical (tokenization / chat template),
  * max |last_logits difference| <= tol,
  * argmax identical at every prompt position,
  * greedy_new_ids identical.
Prints one table row per prompt and exits 1 if anything fails (2 on unreadable input).
Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {path}: {exc}", file=sys.stderr)
        sys.exit(2)


def first_diff(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_prompt(exp: dict, act: dict, tol: float) -> tuple[list[str], list[str]]:
    """Returns (table cells, failure messages)."""
    fails: list[str] = []

    e_ids, a_ids = exp.get("input_ids"), act.get("input_ids")
    ids_ok = e_ids == a_ids
    if not ids_ok:
        i = first_diff(e_ids or [], a_ids or [])
        fails.append(
            f"input_ids differ (lengths {len(e_ids or [])} vs {len(a_ids or [])}, first difference at {i}: "
            f"{(e_ids or [])[i:i + 5] if i is not None else ''} vs {(a_ids or [])[i:i + 5] if i is not None else ''})"
        )

    e_log, a_log = exp.get("last_logits") or [], act.get("last_logits") or []
    if len(e_log) != len(a_log) or not e_log:
        max_diff, at = math.inf, None
        fails.append(f"last_logits lengths differ: {len(e_log)} vs {len(a_log)}")
    else:
        max_diff, at = 0.0, 0
        for i, (x, y) in enumerate(zip(e_log, a_log)):
            d = abs(float(x) - float(y))
            if not math.isfinite(d):
                d = math.inf
            if d > max_diff:
                max_diff, at = d, i
        if max_diff > tol:
            fails.append(f"max |last_logits diff| {max_diff:.3e} > tol {tol:.1e} at vocab id {at}")

    e_am, a_am = exp.get("argmax") or [], act.get("argmax") or []
    same = sum(1 for x, y in zip(e_am, a_am) if x == y)
    am_ok = len(e_am) == len(a_am) and same == len(e_am)
    if not am_ok:
        i = first_diff(e_am, a_am)
        fails.append(f"argmax differs: {same}/{len(e_am)} positions agree (lengths {len(e_am)}/{len(a_am)}), first at {i}")

    e_g, a_g = exp.get("greedy_new_ids") or [], act.get("greedy_new_ids") or []
    g_same = 0
    for x, y in zip(e_g, a_g):
        if x != y:
            break
        g_same += 1
    g_ok = e_g == a_g
    if not g_ok:
        fails.append(
            f"greedy_new_ids diverge at step {g_same} (lengths {len(e_g)}/{len(a_g)}): "
            f"expected {e_g[g_same:g_same + 5]}, got {a_g[g_same:g_same + 5]}"
        )

    cells = [
        "ok" if ids_ok else "DIFF",
        f"{max_diff:.2e}" + ("" if max_diff <= tol else " !"),
        f"{same}/{len(e_am)}",
        f"{g_same}/{len(e_g)}",
    ]
    return cells, fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("expected")
    ap.add_argument("actual")
    ap.add_argument("--tol", type=float, default=2e-3, help="max allowed |last_logits difference| (default 2e-3)")
    args = ap.parse_args(argv)

    exp, act = load(args.expected), load(args.actual)
    act_by_name = {p.get("name"): p for p in act.get("prompts", [])}

    header = ["prompt", "ids", "max|dlogit|", "argmax", "greedy", "result"]
    rows, failures = [], []
    for p in exp.get("prompts", []):
        name = p.get("name")
        a = act_by_name.get(name)
        if a is None:
            rows.append([name, "-", "-", "-", "-", "MISSING"])
            failures.append(f"{name}: missing from {args.actual}")
            continue
        cells, fails = compare_prompt(p, a, args.tol)
        rows.append([name, *cells, "PASS" if not fails else "FAIL"])
        failures.extend(f"{name}: {m}" for m in fails)
    extra = sorted(set(act_by_name) - {p.get("name") for p in exp.get("prompts", [])}, key=str)
    if not exp.get("prompts"):
        failures.append(f"{args.expected} has no prompts")

    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()
    meta = [f"tol={args.tol:g}"]
    for key in ("dtype", "transformers", "attn_implementation"):
        if key in exp:
            meta.append(f"expected {key}={exp[key]}")
    if act.get("dtype") and exp.get("dtype") and act["dtype"] != exp["dtype"]:
        meta.append(f"actual dtype={act['dtype']} (differs!)")
    print("; ".join(meta))
    if extra:
        print(f"note: {args.actual} has prompts not in the expected file (ignored): {', '.join(map(str, extra))}")
    if failures:
        print(f"\nFAIL ({len(failures)} problem(s)):")
        for f in failures:
            print(f"  - {f}")
        return 1
    print(f"\nPASS: {len(rows)} prompt(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
