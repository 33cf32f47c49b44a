#!/usr/bin/env bash
# One command for a GPU machine with no network (the lent H100/H200: torch, triton, pytest,
# pybind11, ninja, matplotlib preinstalled): build the extension with the CUDA kernels,
# run the whole test suite (CUDA tests included), run the benchmarks, print a summary.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      # OUTDIR default: $OUT or benchmarks/results/local/gpu
#
# Results land in OUTDIR (7 files, within the device tool's 8-file limit): build.log, tests.log,
# bench.log, report.md, results.json, speedup.png, summary.txt (with `python -m tokops.info`).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUTDIR=${1:-${OUT:-$ROOT/benchmarks/results/local/gpu}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  # Only the architecture of the GPU in this machine: fastest build.
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
  export TORCH_CUDA_ARCH_LIST
fi
# TOKOPS_AUTO_CUDA=1: let backend="auto" take every built CUDA kernel, so the tests exercise the
# auto paths with them too (by default auto uses only the kernels in _registry.GPU_VERIFIED_CUDA).
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TOKOPS_CUDA=1 TOKOPS_AUTO_CUDA=1
t0=$(date +%s)
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
$PY -m pip install --no-build-isolation --no-deps -e . >"$OUTDIR/build.log" 2>&1
build_rc=$?
tail -n 3 "$OUTDIR/build.log"
t_build=$(( $(date +%s) - t0 ))
info=$($PY -m tokops.info 2>&1)
echo "$info" | head -n 14
echo "== tests"
TOKOPS_REQUIRE_CUDA_BUILD=1 $PY -m pytest -q -p no:cacheprovider tests >"$OUTDIR/tests.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -n 40
tail -n 1 "$OUTDIR/tests.log"
t_tests=$(( $(date +%s) - t0 - t_build ))
echo "== benchmarks"
$PY -m benchmarks.run --all --out "$OUTDIR" 2>&1 | tee "$OUTDIR/bench.log" | tail -n 80
bench_rc=${PIPESTATUS[0]}
t_all=$(( $(date +%s) - t0 ))
{
  echo "tokops gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
  $PY -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"
  echo "build rc=$build_rc (${t_build}s) | tests rc=$test_rc (${t_tests}s): $(tail -n 1 "$OUTDIR/tests.log") | bench rc=$bench_rc | total ${t_all}s"
  echo "$info"
} | tee "$OUTDIR/summary.txt"
[ "$build_rc" = 0 ] && [ "$test_rc" = 0 ] && [ "$bench_rc" = 0 ]
