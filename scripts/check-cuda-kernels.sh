#!/usr/bin/env bash
# Compile-checks every kernels/cuda/*.cu for sm_90a without a GPU, and fails on any compile
# error or register spill.
#
# The CUDA 12.9 compiler comes from PyPI wheels installed into a venv under ~/.cache/herd (made
# once, ~350 MB, ~30 s): nvidia-cuda-nvrtc-cu12 (the compiler herd itself uses at run time),
# nvidia-cuda-nvcc-cu12 (only ptxas in the 12.x wheel) and nvidia-cuda-runtime-cu12. Each file
# goes through NVRTC → PTX (compute_90a) → ptxas (sm_90a cubin, -v), and a second PTX for
# compute_90 is made as the JIT fallback. Outputs land in target/cuda-kernels/ (never committed).
#
# Usage: scripts/check-cuda-kernels.sh [--venv DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$HOME/.cache/herd/cuda-12.9
if [ "${1:-}" = --venv ]; then venv=$2; shift 2; fi
out=${1:-target/cuda-kernels}
mkdir -p "$out"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import nvidia' 2>/dev/null; then
  echo "== installing the CUDA 12.9 compiler wheels into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "nvidia-cuda-nvcc-cu12==12.9.*" "nvidia-cuda-runtime-cu12==12.9.*" \
    "nvidia-cuda-nvrtc-cu12==12.9.*"
fi
nv=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0] + "/x"))')
nvrtc=$nv/cuda_nvrtc/lib/libnvrtc.so.12
ptxas=$nv/cuda_nvcc/bin/ptxas
for f in "$nvrtc" "$ptxas"; do
  [ -e "$f" ] || { echo "check-cuda-kernels: $f missing from the wheels" >&2; exit 1; }
done
echo "== $("$ptxas" --version | tail -1)"

status=0
table=()
for src in kernels/cuda/*.cu; do
  name=$(basename "$src" .cu)
  if ! "$venv/bin/python" scripts/nvrtc_compile.py --lib "$nvrtc" --arch compute_90a --include kernels/cuda \
      "$src" "$out/$name.sm_90a.ptx"; then
    echo "FAIL $src: NVRTC error" >&2; status=1; continue
  fi
  if ! "$venv/bin/python" scripts/nvrtc_compile.py --lib "$nvrtc" --arch compute_90 --include kernels/cuda \
      "$src" "$out/$name.compute_90.ptx"; then
    echo "FAIL $src: NVRTC error (compute_90 PTX fallback)" >&2; status=1; continue
  fi
  if ! log=$("$ptxas" -arch=sm_90a -O3 -v "$out/$name.sm_90a.ptx" -o "$out/$name.sm_90a.cubin" 2>&1); then
    echo "$log" >&2; echo "FAIL $src: ptxas error" >&2; status=1; continue
  fi
  # ptxas -v prints, per entry: "Compiling entry function 'K'", then "N bytes stack frame, N bytes
  # spill stores, N bytes spill loads", then "Used N registers, ..., N bytes smem".
  while IFS='|' read -r kernel regs smem stack spill_st spill_ld; do
    table+=("$(printf '%-16s %-24s %5s %8s %6s %6s %6s' "$name.cu" "$kernel" "$regs" "$smem" "$stack" "$spill_st" "$spill_ld")")
    if [ "$spill_st" != 0 ] || [ "$spill_ld" != 0 ]; then
      echo "FAIL $src: $kernel spills registers ($spill_st B stores, $spill_ld B loads)" >&2; status=1
    fi
  done < <(echo "$log" | awk '
    /Compiling entry function/ { k = $0; sub(/.*function .\047?/, "", k); sub(/\047.*/, "", k) }
    /bytes stack frame/ { st = $1; ss = $5; sl = $9 }
    /Used [0-9]+ registers/ {
      r = $0; sub(/.*Used /, "", r); sub(/ registers.*/, "", r)
      sm = 0; if ($0 ~ /bytes smem/) { sm = $0; sub(/ bytes smem.*/, "", sm); sub(/.*, /, "", sm) }
      print k "|" r "|" sm "|" st "|" ss "|" sl
    }')
done

echo
printf '%-16s %-24s %5s %8s %6s %6s %6s\n' file kernel regs smem_B stack spill_st spill_ld
printf '%s\n' "${table[@]}"
if [ "$status" != 0 ]; then
  echo "check-cuda-kernels: FAILED" >&2
else
  echo "check-cuda-kernels: all $(ls kernels/cuda/*.cu | wc -l) files compile for sm_90a without spills"
fi
exit "$status"
