#!/usr/bin/env bash
# The GPU run: one command for a lent H100/H200 (16 cores, no network; torch, triton, pytest, ninja,
# matplotlib preinstalled) that finishes in at most 8 minutes, start of the command included.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#
# Stages, each under its own `timeout` (seconds; a stage never runs past the overall deadline,
# GPU_CHECK_BUDGET_S, default 470 s), each recorded in summary.txt, none fatal to the next:
#   env     (15)  device, versions, peak HBM bandwidth / bf16 FLOP/s of the detected GPU
#   build  (200)  pip install --no-build-isolation --no-deps -e . for the one architecture present
#                 (TORCH_CUDA_ARCH_LIST=9.0a on H100/H200), MAX_JOBS = all cores
#   cuda    (60)  pytest -m cuda (TOKOPS_AUTO_CUDA=1 here only: auto takes the built CUDA kernels)
#   triton  (75)  Triton-on-GPU smoke subset; Hypothesis capped at TOKOPS_FUZZ_MAX_EXAMPLES=5
#   bench  (100)  python -m benchmarks.run --quick: triton and cuda rows side by side (backends named,
#                 TOKOPS_AUTO_CUDA unset), results.json / report.md rewritten after every case,
#                 FlexAttention compiled for at most 2 shapes
#   kernels (25)  registers / shared memory / spills per CUDA kernel (benchmarks.cuda_resources)
# Files in OUTDIR (default $OUT, else benchmarks/results/local/gpu), 8 at most: summary.txt, build.log,
# tests.log, bench.log, results.json, report.md, speedup.png, kernels.md.
#
# --dry-run: the same stages on the CPU at tiny sizes, so the plumbing is tested without a GPU (CI
# runs it): the build stage checks what setup.py would build instead of rebuilding (CI has just
# built the extension), the cuda tests skip, the smoke subset and the benchmarks are smaller, and
# the stage limits are those of GPU_CHECK_DRY_BUDGET_S (default 900 s) for a slow shared CPU.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:-$ROOT/benchmarks/results/local/gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKOPS_POISON=1
unset TOKOPS_AUTO_CUDA
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
  DEADLINE=$(( T0 + ${GPU_CHECK_DRY_BUDGET_S:-900} ))
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  DEADLINE=$(( T0 + ${GPU_CHECK_BUDGET_S:-470} ))
fi
SUMMARY=$OUTDIR/summary.txt
: >"$SUMMARY"
: >"$OUTDIR/tests.log"
FAILED=()
summary() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS LOG CMD...: run CMD under `timeout` (SECONDS, cut to what is left before the
# deadline), output appended to LOG; the result and time go to summary.txt.
stage() {
  local name=$1 limit=$2 log=$3 left rc t
  shift 3
  [ "$DRY" = 1 ] && limit=$(( limit * 2 ))
  left=$(( DEADLINE - $(date +%s) - 5 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    summary "[$name] SKIPPED: no time left before the deadline"
    FAILED+=("$name")
    return 1
  fi
  t=$(date +%s)
  echo "### [$name] $* (timeout ${limit}s)" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${limit}s"; elif [ "$rc" != 0 ]; then status="FAILED rc=$rc"; fi
  summary "[$name] $status in $(( $(date +%s) - t )) s (at $(( $(date +%s) - T0 )) s)"
  [ "$status" = ok ] || FAILED+=("$name")
  return "$rc"
}

# pytest's outcome line (or, when the stage was stopped, the count of tests that passed so far)
pytest_line() {
  local last
  last=$(grep -E "^=* ?[0-9]+ (passed|failed|skipped|deselected|error)" "$OUTDIR/tests.log" | tail -n 1)
  echo "  ${last:-no summary line (stopped?): $(grep -c " PASSED" "$OUTDIR/tests.log") passed so far}" | tee -a "$SUMMARY"
}

summary "tokops gpu_check$([ "$DRY" = 1 ] && echo ' --dry-run (CPU, tiny sizes)') $(date -u '+%Y-%m-%d %H:%M UTC')"

# ---------------------------------------------------------------- env
stage env 15 "$SUMMARY" $PY - <<'PY'
import os, torch
import sys; sys.path.insert(0, os.getcwd())
from benchmarks.harness import hardware_limits
dev = "cuda" if torch.cuda.is_available() else "cpu"
lim = hardware_limits(dev)
tri = None
try:
    import triton
    tri = triton.__version__
except ImportError:
    pass
name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
print(f"device: {name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {tri} | cores {os.cpu_count()}")
if dev == "cuda":
    cap = torch.cuda.get_device_capability()
    hbm, fl = lim["hbm_bytes_per_s"], lim["bf16_flops_per_s"]
    print(f"sm_{cap[0]}{cap[1]}, peak HBM {hbm and hbm / 1e12} TB/s, bf16 {fl and fl / 1e12} TFLOP/s"
          + ("" if hbm else " (GPU not in benchmarks/harness.py GPU_LIMITS: no % of peak)"))
PY

# ---------------------------------------------------------------- build
if [ "$DRY" = 1 ]; then
  # CI built the extension a moment ago: check what setup.py detects and that the build loads.
  stage build 60 "$OUTDIR/build.log" bash -c "$PY setup.py --name && $PY -m tokops.info"
else
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  stage build 200 "$OUTDIR/build.log" env TOKOPS_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e .
  summary "  TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, $(tail -n 1 "$OUTDIR/build.log" | cut -c1-200)"
fi
summary "  $($PY -c "
import tokops; i = tokops.info()
print('extension', i['extension'], '| cuda kernels', i['cuda_compiled'], i['cuda_archs'], '| built with torch', i['built_with_torch'],
      '| error', i['extension_error'])" 2>&1 | tail -n 1 | cut -c1-400)"

# ---------------------------------------------------------------- tests
PYTEST=($PY -m pytest -q -p no:cacheprovider -rfE)
stage cuda 60 "$OUTDIR/tests.log" env TOKOPS_AUTO_CUDA=1 "${PYTEST[@]}" -m cuda tests
pytest_line
if [ "$DRY" = 1 ]; then
  SMOKE=(tests/test_fuzz_kv.py tests/test_kv_quant.py -k "test_fp8 or test_design_vectors or fuzz")
  FUZZ=2
else
  SMOKE=(tests/test_kv_quant.py tests/test_kv_cache.py tests/test_attention.py tests/test_merge.py
         tests/test_fuzz_kv.py tests/test_fuzz_kv_cache.py tests/test_fuzz_merge.py tests/test_fuzz_ops.py
         -k "(triton and not compile_for_gpu and (not test_backends_agree_with_reference or dtype1)) or fuzz")
  FUZZ=5
fi
stage triton 75 "$OUTDIR/tests.log" env TOKOPS_FUZZ_MAX_EXAMPLES=$FUZZ "${PYTEST[@]}" "${SMOKE[@]}"
pytest_line

# ---------------------------------------------------------------- benchmarks
if [ "$DRY" = 1 ]; then
  BENCH=(--quick --device cpu --family kv_cache --family attention)
else
  BENCH=(--quick)
fi
stage bench 100 "$OUTDIR/bench.log" $PY -m benchmarks.run "${BENCH[@]}" --out "$OUTDIR"
$PY - "$OUTDIR/results.json" <<'PY' | tee -a "$SUMMARY"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"  no benchmark results ({e})")
    raise SystemExit
rows = d["rows"]
err = [r for r in rows if "error" in r]
print(f"  {len(rows) - len(err)} rows measured, {len(err)} failed, complete={d.get('complete')}")
for r in err[:10]:
    print(f"  FAILED {r['family']} / {r['case']} / {r['impl']}: {r['error'][:150]}")
PY

# ---------------------------------------------------------------- CUDA kernel resources
stage kernels 25 "$OUTDIR/kernels.md" $PY -m benchmarks.cuda_resources

summary "total $(( $(date +%s) - T0 )) s; stages failed: ${FAILED[*]:-none}"
echo "==== $SUMMARY"
cat "$SUMMARY"
[ "${#FAILED[@]}" = 0 ]
