#!/usr/bin/env bash
# The GPU check of issue 6, in two halves, because the GPU machine has no Rust and no network:
#
#   scripts/gpu-check.sh --build    here (x86-64, 2 cores): builds herd and the GPU test/bench
#                                   binaries with --features cuda into target/gpu-bundle/ (stripped;
#                                   send that folder with the device call's `carry`)
#   scripts/gpu-check.sh            on the GPU machine (CUDA driver, PyTorch, pip NCCL/NVRTC):
#                                   only runs the bundle; < 8 min on one H100
#
# The run: device info → `herd generate --device cuda` must find the GPU (and, for now, refuse to
# run a model on it) → every kernel's parity test against the CPU reference (fresh random inputs,
# poisoned outputs; any SKIPPED is a failure here) → the grouped FP8 GEMM at Maverick shapes vs the
# per-expert torch._scaled_mm loop and vs the card's measured dense FP8 peak → one table.
# Full logs go to gpu-check-logs/ (and to $OUT/ when the device tool provides it).
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle

if [ "${1:-}" = --build ]; then
  set -e
  rm -rf "$bundle" && mkdir -p "$bundle"
  cargo build --release -p herd-coordinator --features cuda
  cargo build --release -p herd-kernels --features cuda --example gpu_moe_bench
  parity=$(cargo test --release -p herd-kernels --features cuda --test gpu_parity --no-run 2>&1 \
    | grep -o 'target/release/deps/gpu_parity-[0-9a-f]*' | head -1)
  [ -n "$parity" ] || { echo "gpu-check: could not find the gpu_parity test binary" >&2; exit 1; }
  tdir=${CARGO_TARGET_DIR:-target}
  cp "$tdir/release/herd" "$tdir/release/examples/gpu_moe_bench" "$bundle/"
  cp "${parity/target/$tdir}" "$bundle/gpu_parity"
  strip "$bundle"/herd "$bundle"/gpu_moe_bench "$bundle"/gpu_parity
  cp tools/gpu/scaled_mm_bench.py "$bundle/"
  du -sh "$bundle"; ls -l "$bundle"
  exit 0
fi

logs=${OUT:-gpu-check-logs}
mkdir -p "$logs"
started=$(date +%s)
fail=0
declare -a rows
row() { rows+=("$(printf '%-44s %s' "$1" "$2")"); }

# NVRTC and NCCL come from pip wheels (PyTorch's dependencies; CUDA 12 wheels keep them in
# nvidia/<lib>/lib, CUDA 13 wheels in nvidia/cu13/lib) or from the toolkit. cudarc dlopens them by
# the CUDA 12 sonames it was built for, or by the bare name: link the bare names (libnccl.so,
# libnvrtc.so) to whatever version is there, so a CUDA 13 machine works too.
libs=$(mktemp -d)
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; [print(os.path.join(p, sub, "lib")) for p in nvidia.__path__ for sub in os.listdir(p)]' 2>/dev/null); do
  [ -d "$d" ] || continue
  export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  [ -e "$d/libnccl.so.2" ] && ln -sf "$d/libnccl.so.2" "$libs/libnccl.so"
  for v in 13 12; do [ -e "$d/libnvrtc.so.$v" ] && ln -sf "$d/libnvrtc.so.$v" "$libs/libnvrtc.so"; done
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
ls -l "$libs" | tee "$logs/libs.log"

echo "== device" | tee "$logs/device.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$logs/device.log"

echo "== herd --device cuda (must find the GPU)"
"$bundle/herd" generate --model tiny --prompt x --device cuda --cache-dir "$(mktemp -d)" >"$logs/device_flag.log" 2>&1
if grep -q "found .* but the engine cannot run a model on CUDA yet" "$logs/device_flag.log"; then
  row "--device cuda probe" "ok ($(grep -o 'found [^b]*' "$logs/device_flag.log"))"
else
  row "--device cuda probe" "FAIL: $(tail -1 "$logs/device_flag.log")"; fail=1
fi

echo "== parity tests (GPU vs CPU reference)"
timeout 300 "$bundle/gpu_parity" --nocapture --test-threads 1 >"$logs/parity.log" 2>&1
rc=$?
cat "$logs/parity.log"
for t in $(grep -o '^test gpu_[a-z0-9_]*' "$logs/parity.log" | sed 's/^test //' | sort -u); do
  if grep -q "SKIPPED $t" "$logs/parity.log"; then row "$t" "SKIPPED (counts as failure)"; fail=1
  # A test's own prints can land between "test NAME ..." and its verdict, so a failure is
  # read off libtest's "---- NAME stdout ----" section rather than off the "... ok" line.
  elif ! grep -q "^---- $t stdout ----" "$logs/parity.log" && grep -q "^test result: " "$logs/parity.log"; then row "$t" "ok"
  else row "$t" "FAIL"; fail=1; fi
done
[ $rc = 0 ] || fail=1

echo "== grouped FP8 GEMM, Maverick shapes (herd)"
timeout 240 "$bundle/gpu_moe_bench" >"$logs/herd_gemm.jsonl" 2>"$logs/herd_gemm.err" || { fail=1; cat "$logs/herd_gemm.err"; }
echo "== torch._scaled_mm loop and dense FP8 peak"
timeout 180 python3 "$bundle/scaled_mm_bench.py" >"$logs/torch.jsonl" 2>"$logs/torch.err" || { fail=1; cat "$logs/torch.err"; }

python3 - "$logs" <<'PY' > "$logs/gemm_table.txt"
import json, sys, os
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    return [json.loads(l) for l in open(p) if l.startswith("{")] if os.path.exists(p) else []
herd, torch = load("herd_gemm.jsonl"), load("torch.jsonl")
peak = next((r["tflops"] for r in torch if r["bench"] == "dense_fp8_peak"), None)
loop = {(r["tokens"], r["routing"]): r for r in torch if r["bench"] == "scaled_mm_loop"}
print(f"dense FP8 peak (torch._scaled_mm 8192^3): {peak:.0f} TFLOP/s" if peak else "dense FP8 peak: not measured")
for r in torch:
    if r["bench"] in ("copy_bandwidth", "read_bandwidth"):
        print(f"{r['bench']}: {r['gbps']:.0f} GB/s")
print(f"{'tokens':>6} {'routing':8} {'herd ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'torch loop ms':>13} {'speedup':>8}")
for r in herd:
    t = loop.get((r["tokens"], r["routing"]))
    pct = f"{100 * r['total_tflops'] / peak:6.1f}%" if peak else "    n/a"
    tl = f"{t['total_ms']:13.3f}" if t else "          n/a"
    sp = f"{t['total_ms'] / r['total_ms']:7.2f}x" if t else "     n/a"
    print(f"{r['tokens']:>6} {r['routing']:8} {r['total_ms']:9.3f} {r['total_tflops']:8.1f} {pct} {tl} {sp}")
PY

echo
echo "================ gpu-check summary ($(($(date +%s) - started)) s) ================"
printf '%s\n' "${rows[@]}"
echo
cat "$logs/gemm_table.txt"
echo
echo "Maverick two-layer slice decode (batch 1/16/64/256): NOT RUN: the engine cannot run a model on CUDA yet."
echo "logs: $logs/"
[ $fail = 0 ] && echo "gpu-check: PASS" || echo "gpu-check: FAIL"
exit $fail
