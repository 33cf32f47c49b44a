#!/usr/bin/env bash
# One command for a GPU machine with no network (the lent H100/H200: torch, triton, pytest,
# pybind11, ninja, matplotlib, transformers, timm preinstalled): build the extension with the CUDA
# kernels for this GPU, run the whole test suite (CUDA tests included), run the benchmarks, and
# print a compact summary.
#
#   bash benchmarks/gpu_check.sh [STAGE] [OUTDIR]
#     STAGE: all (default) | build | test | bench | bench-quick
#     OUTDIR: default $OUT, else benchmarks/results/local/gpu
#
# The stages can run as separate calls (the build stays in the work tree), which keeps each call
# under the device tool's 10-minute limit: `build`, then `test`, then `bench`.
# Results in OUTDIR (at most 7 files, within the device tool's 8-file limit): build.log, tests.log,
# bench.log, report.md, results.json, speedup.png, summary.txt.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STAGE=${1:-all}
OUTDIR=${2:-${OUT:-$ROOT/benchmarks/results/local/gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # Only the architecture of the GPU in this machine: fastest build.
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
# TOKOPS_AUTO_CUDA=1: let backend="auto" take every built CUDA kernel, so the tests exercise the
# auto paths with them too (by default auto uses only the kernels in _registry.GPU_VERIFIED_CUDA).
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TOKOPS_CUDA=1 TOKOPS_AUTO_CUDA=1
summary() { echo "$*" | tee -a "$OUTDIR/summary.txt"; }
rc=0

if [ "$STAGE" = all ] || [ "$STAGE" = build ]; then
  : >"$OUTDIR/summary.txt"
  summary "tokops gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
  summary "$($PY -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)")"
  t0=$(date +%s)
  $PY -m pip install --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1
  b=$?
  tail -n 3 "$OUTDIR/build.log"
  summary "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST): rc=$b in $(( $(date +%s) - t0 )) s"
  summary "$($PY -m tokops.info 2>&1 | tr -d '\n' | tr -s ' ' | cut -c1-600)"
  [ "$b" = 0 ] || rc=$b
fi

if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  t0=$(date +%s)
  TOKOPS_REQUIRE_CUDA_BUILD=1 $PY -m pytest -q -p no:cacheprovider tests >"$OUTDIR/tests.log" 2>&1
  t=$?
  grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -n 40
  summary "tests: rc=$t in $(( $(date +%s) - t0 )) s: $(tail -n 1 "$OUTDIR/tests.log")"
  [ "$t" = 0 ] || rc=$t
fi

if [ "$STAGE" = all ] || [ "$STAGE" = bench ] || [ "$STAGE" = bench-quick ]; then
  t0=$(date +%s)
  args=(--all)
  [ "$STAGE" = bench-quick ] && args=(--quick)
  $PY -m benchmarks.run "${args[@]}" --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench.log" | tail -n 80
  bb=${PIPESTATUS[0]}
  summary "benchmarks (${args[*]}): rc=$bb in $(( $(date +%s) - t0 )) s -> $OUTDIR/report.md"
  [ "$bb" = 0 ] || rc=$bb
fi
exit $rc
