#!/usr/bin/env bash
# The GPU check of issue 6, in two halves, because the GPU machine has no Rust and no network:
#
#   scripts/gpu-check.sh --build    here (x86-64, 2 cores): builds herd and the GPU test/bench
#                                   binaries with --features cuda into target/gpu-bundle/ (stripped;
#                                   send that folder with the device call's `carry`)
#   scripts/gpu-check.sh            on the GPU machine (CUDA driver, PyTorch, pip NCCL/NVRTC):
#                                   only runs the bundle; < 8 min on one H100
#
# The run, in order (each step's log in $OUT or gpu-check-logs/):
#  1. device info and the libraries found;
#  2. every kernel's parity test against the CPU reference (fresh random inputs, poisoned outputs;
#     any SKIPPED is a failure here): gpu_parity (MoE), _attention, _linear, _elementwise;
#  3. the whole model on the GPU: `herd eval --dtype f32 --device cuda` on the golden checkpoints,
#     compared with transformers' logits (≤ 2e-3) and greedy tokens (tools/golden/compare.py),
#     and `herd generate --device cuda` on the synthetic tiny model;
#     expert parallelism on the GPU: gpu_expert_parallel (thread-ranks, each holding a share of the
#     experts, equal to one GPU holding all) and `herd generate --workers 2 --device cuda` (worker
#     processes on this GPU, maverick-mini bf16 and FP8) against one engine, token for token;
#  4. NCCL: the transport's self-exchange and the dead-peer abort (nccl_check), if built;
#  5. timings: the grouped FP8 GEMM at Maverick shapes vs the per-expert torch._scaled_mm loop and
#     the card's dense FP8 peak; the dense linear layers at Maverick shapes; the two-layer Maverick
#     slice's decode step at batch 1/16/64/256 against its weight-read floor;
#  6. one summary table (each row also written to summary.txt as it is decided).
#
# Run here, without a GPU, it goes through every step in under a minute and reports each as FAIL
# or SKIPPED with the missing driver's one-line error: a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle

if [ "${1:-}" = --build ]; then
  set -e
  rm -rf "$bundle" && mkdir -p "$bundle"
  tdir=${CARGO_TARGET_DIR:-target}
  cargo build --release -p herd-coordinator --features cuda
  cargo build --release -p herd-kernels --features cuda --example gpu_moe_bench --example gpu_linear_bench
  cargo build --release -p herd-worker --features cuda --examples
  for t in kernels/gpu_parity kernels/gpu_parity_attention kernels/gpu_parity_linear \
      kernels/gpu_parity_elementwise worker/gpu_expert_parallel; do
    crate=herd-${t%%/*} t=${t#*/}
    bin=$(cargo test --release -p "$crate" --features cuda --test "$t" --no-run 2>&1 \
      | grep -o "target/release/deps/$t-[0-9a-f]*" | head -1)
    [ -n "$bin" ] || { echo "gpu-check: could not find the $t test binary" >&2; exit 1; }
    cp "${bin/target/$tdir}" "$bundle/$t"
  done
  cp "$tdir/release/herd" "$tdir/release/examples/gpu_moe_bench" "$tdir/release/examples/gpu_linear_bench" \
    "$tdir/release/examples/gpu_slice_bench" "$bundle/"
  [ -x "$tdir/release/examples/nccl_check" ] && cp "$tdir/release/examples/nccl_check" "$bundle/"
  strip "$bundle"/herd "$bundle"/gpu_*
  [ -e "$bundle/nccl_check" ] && strip "$bundle/nccl_check"
  cp tools/gpu/scaled_mm_bench.py "$bundle/"
  du -sh "$bundle"; ls -l "$bundle"
  exit 0
fi

logs=${OUT:-gpu-check-logs}
mkdir -p "$logs"
: >"$logs/summary.txt"
started=$(date +%s)
fail=0
declare -a rows
# Each row also lands in $logs/summary.txt at once: a run cut off at the device call's time
# limit still brings back what it had checked.
row() { rows+=("$(printf '%-52s %s' "$1" "$2")"); printf '%s\n' "${rows[-1]}" >>"$logs/summary.txt"; }

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
ls -l "$libs" > "$logs/libs.log"

echo "== device" | tee "$logs/device.log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$logs/device.log"

echo "== parity tests (GPU vs CPU reference)"
for bin in gpu_parity gpu_parity_attention gpu_parity_linear gpu_parity_elementwise gpu_expert_parallel; do
  log="$logs/$bin.log"
  timeout 300 "$bundle/$bin" --nocapture --test-threads 1 >"$log" 2>&1
  rc=$?
  tail -3 "$log"
  for t in $(grep -o '^test gpu_[a-z0-9_]*' "$log" | sed 's/^test //' | sort -u); do
    if grep -q "SKIPPED $t" "$log"; then row "$t" "SKIPPED (counts as failure)"; fail=1
    # A test's own prints can land between "test NAME ..." and its verdict, so a failure is
    # read off libtest's "---- NAME stdout ----" section rather than off the "... ok" line.
    elif ! grep -q "^---- $t stdout ----" "$log" && grep -q "^test result: " "$log"; then row "$t" "ok"
    else row "$t" "FAIL"; fail=1; fi
  done
  [ $rc = 0 ] || { fail=1; row "$bin" "exit $rc"; }
done

echo "== the model on the GPU: golden checkpoints (f32) against transformers"
for c in maverick scout scout-v5; do
  g=testdata/golden/$c
  if timeout 180 "$bundle/herd" eval --dtype f32 --device cuda --model "$g/model" --input "$g/input.json" \
      --output "$logs/golden_$c.json" >"$logs/golden_$c.log" 2>&1 \
    && python3 tools/golden/compare.py "$g/expected.json" "$logs/golden_$c.json" >>"$logs/golden_$c.log" 2>&1; then
    row "golden $c (eval --device cuda, f32)" "ok"
  else
    row "golden $c (eval --device cuda, f32)" "FAIL: $(tail -1 "$logs/golden_$c.log")"; fail=1
  fi
done
cache=$(mktemp -d)
if timeout 180 "$bundle/herd" generate --model tiny --cache-dir "$cache" --prompt "The GPU" --max-tokens 16 \
    --device cuda >"$logs/generate_cuda.log" 2>&1; then
  row "generate --device cuda (tiny)" "ok"
else
  row "generate --device cuda (tiny)" "FAIL: $(tail -1 "$logs/generate_cuda.log")"; fail=1
fi

# End to end through the engine: maverick-mini (synthesised here, ~1.3 GB bf16) at batch 1 and 16.
for b in 1 16; do
  if timeout 240 "$bundle/herd" bench --model maverick-mini --cache-dir "$cache" --device cuda --batch $b \
      --prompt-tokens 512 --gen-tokens 64 --runs 2 --json "$logs/bench_cuda_b$b.json" >"$logs/bench_cuda_b$b.log" 2>&1; then
    row "bench --device cuda maverick-mini batch $b" "$(grep -iE 'decode' "$logs/bench_cuda_b$b.log" | head -1 | tr -s ' ')"
  else
    row "bench --device cuda maverick-mini batch $b" "FAIL: $(tail -1 "$logs/bench_cuda_b$b.log")"; fail=1
  fi
done

# Expert parallelism end to end: two worker processes on this GPU (TCP data plane between them)
# against one engine; greedy, so the texts must match. FP8 experts take the grouped-GEMM path.
mm=$cache/synth/maverick-mini-seed0
# The bench above synthesises it on first use; if the bench failed before that, make it here.
[ -d "$mm" ] || timeout 180 "$bundle/herd" synth --preset maverick-mini --out "$mm" >"$logs/synth.log" 2>&1 \
  || { row "synth maverick-mini" "FAIL: $(tail -1 "$logs/synth.log")"; fail=1; }
timeout 180 "$bundle/herd" quantize --format fp8 --in "$mm" --out "$cache/maverick-mini-fp8" \
  >"$logs/quantize_fp8.log" 2>&1 || { row "quantize maverick-mini to FP8" "FAIL: $(tail -1 "$logs/quantize_fp8.log")"; fail=1; }
for m in "$mm" "$cache/maverick-mini-fp8"; do
  [ -d "$m" ] || continue
  tag=$(basename "$m")
  gen=(generate --model "$m" --prompt "Experts across workers" --max-tokens 24 --temperature 0 --ignore-eos \
    --device cuda --kv-cache-bytes 1G)
  name="generate --workers 2 --device cuda ($tag)"
  if ! timeout 180 "$bundle/herd" "${gen[@]}" >"$logs/ep_${tag}_1.txt" 2>"$logs/ep_${tag}_1.log"; then
    row "$name" "FAIL (one engine): $(tail -n 1 "$logs/ep_${tag}_1.log")"; fail=1
  elif ! timeout 240 "$bundle/herd" "${gen[@]}" --workers 2 >"$logs/ep_${tag}_2.txt" 2>"$logs/ep_${tag}_2.log"; then
    row "$name" "FAIL (2 workers): $(tail -n 1 "$logs/ep_${tag}_2.log")"; fail=1
  # The last stdout line is the run's statistics ("[herd] ... | 2 workers | ..."): not compared.
  elif cmp -s <(grep -v '^\[herd\] ' "$logs/ep_${tag}_1.txt") <(grep -v '^\[herd\] ' "$logs/ep_${tag}_2.txt"); then
    row "$name" "ok (same text)"
  else
    row "$name" "FAIL: texts differ"; fail=1
  fi
done

if [ -x "$bundle/nccl_check" ]; then
  export NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=WARN
  echo "== NCCL transport"
  timeout 120 "$bundle/nccl_check" >"$logs/nccl.log" 2>&1 || fail=1
  cat "$logs/nccl.log"
  while read -r line; do row "${line%%:*}" "${line#*: }"; done < <(grep '^nccl_check ' "$logs/nccl.log")
fi

echo "== timings"
# 128 experts: all of Maverick's on one GPU; 16: one GPU's share under 8-way expert parallelism.
: >"$logs/herd_gemm.jsonl"; : >"$logs/torch.jsonl"
for e in 128 16; do
  timeout 240 "$bundle/gpu_moe_bench" --experts $e >>"$logs/herd_gemm.jsonl" 2>>"$logs/herd_gemm.err" \
    || { fail=1; cat "$logs/herd_gemm.err"; }
  peak=$([ $e = 128 ] || echo --skip-peak)
  timeout 180 python3 "$bundle/scaled_mm_bench.py" --experts $e $peak >>"$logs/torch.jsonl" 2>>"$logs/torch.err" \
    || { fail=1; cat "$logs/torch.err"; }
done
timeout 180 "$bundle/gpu_linear_bench" --default-only >"$logs/linear.jsonl" 2>"$logs/linear.err" || { fail=1; cat "$logs/linear.err"; }
timeout 240 "$bundle/gpu_slice_bench" >"$logs/slice.jsonl" 2>"$logs/slice.err" || { fail=1; cat "$logs/slice.err"; }

python3 - "$logs" <<'PY' > "$logs/tables.txt"
import json, sys, os
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    return [json.loads(l) for l in open(p) if l.startswith("{")] if os.path.exists(p) else []
herd, torch, lin, sl = load("herd_gemm.jsonl"), load("torch.jsonl"), load("linear.jsonl"), load("slice.jsonl")
peak = next((r["tflops"] for r in torch if r["bench"] == "dense_fp8_peak"), None)
loop = {(r.get("experts", 128), r["tokens"], r["routing"]): r for r in torch if r["bench"] == "scaled_mm_loop"}
for r in torch:
    if r["bench"] in ("copy_bandwidth", "read_bandwidth"):
        print(f"{r['bench']}: {r['gbps']:.0f} GB/s")
print(f"dense FP8 peak (torch._scaled_mm 8192^3): {peak:.0f} TFLOP/s" if peak else "dense FP8 peak: not measured")
print()
print("grouped FP8 GEMM (gate_up + down), Maverick MoE layer")
print(f"{'kernel':6} {'experts':>7} {'tokens':>6} {'routing':8} {'herd ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'torch loop ms':>13} {'speedup':>8}")
for r in herd:
    t = loop.get((r.get("experts", 128), r["tokens"], r["routing"]))
    pct = f"{100 * r['total_tflops'] / peak:6.1f}%" if peak else "    n/a"
    tl = f"{t['total_ms']:13.3f}" if t else "          n/a"
    sp = f"{t['total_ms'] / r['total_ms']:7.2f}x" if t else "     n/a"
    print(f"{r.get('kernel', 'Mma'):6} {r.get('experts', 128):>7} {r['tokens']:>6} {r['routing']:8} {r['total_ms']:9.3f} {r['total_tflops']:8.1f} {pct} {tl} {sp}")
if lin:
    print()
    print("dense linear (default route)")
    for r in lin:
        if "layer" in r:
            print(f"  {r['layer']:14} {r['dtype']:5} m={r['m']:<4} {r['route']:9} {r['ms']:.4f} ms  {r.get('weight_gbps', 0):7.0f} GB/s  {r.get('tflops', 0):7.1f} TFLOP/s")
if sl:
    print()
    print("Maverick slice (dense + MoE layer, FP8) decode step")
    for r in sl:
        floor = f"floor {r['floor_ms']:.4f} ms, ratio {r['ratio_to_floor']:.2f}" if r.get("floor_ms") else ""
        print(f"  {r.get('moe_gemm', 'Mma'):5} batch {r['batch']:>3} depth {r['depth']}: {r['median_ms']:.4f} ms (min {r['min_ms']:.4f}), {r['tokens_per_s']:.0f} tok/s  {floor}")
PY

echo
echo "================ gpu-check summary ($(($(date +%s) - started)) s) ================"
printf '%s\n' "${rows[@]}"
echo
cat "$logs/tables.txt"
echo "logs: $logs/"
[ $fail = 0 ] && echo "gpu-check: PASS" || echo "gpu-check: FAIL"
exit $fail
