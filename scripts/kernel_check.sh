#!/usr/bin/env bash
# The static kernel check (benchmarks/kernel_check.py: every Triton kernel compiled for sm_90 and sm_80
# without a GPU) twice: with the Triton of the main venv (what CI installs), then with Triton 3.6.0, the
# GPU machine's version, from a small venv layered over the main one (its own triton shadows the main
# venv's; torch, the editable tokops and the rest come from the main venv).  Fails if either fails.
#
#   bash scripts/kernel_check.sh [--report FILE] [kernel_check args, e.g. --quick --jobs 2 --arch 80]
#
# --report is written by the first run only (the committed report is from the CI Triton).
# Environment: TOKOPS_VENV (the main venv, default .venv), TOKOPS_T36_VENV (default /tmp/tokops-triton36),
# TOKOPS_T36_ARGS (kernel_check args of the Triton 3.6.0 run instead of the ones given, e.g. "--quick").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MAIN=${TOKOPS_VENV:-$ROOT/.venv}
T36=${TOKOPS_T36_VENV:-/tmp/tokops-triton36}
VERSION=3.6.0
report=()
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--report" ]; then report=(--report "$2"); shift 2; else args+=("$1"); shift; fi
done

start=$(date +%s)
env -u TRITON_INTERPRET "$MAIN/bin/python" -m benchmarks.kernel_check "${args[@]}" "${report[@]}"
echo "[kernel_check.sh] main venv's triton: $(( $(date +%s) - start )) s"

start=$(date +%s)
main_sp=$("$MAIN/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -x "$T36/bin/python" ]; then
  "$MAIN/bin/python" -m venv "$T36"
fi
t36_sp=$("$T36/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a bare path) so that the main venv's .pth files (the editable tokops) are processed;
# it appends, so this venv's own triton comes first on sys.path.
echo "import site; site.addsitedir('$main_sp')" > "$t36_sp/_tokops_main.pth"
if ! "$T36/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$VERSION')" 2>/dev/null; then
  "$T36/bin/python" -m pip install -q --no-deps "triton==$VERSION"
  echo "[kernel_check.sh] installed triton $VERSION in $(( $(date +%s) - start )) s"
fi
"$T36/bin/python" -c "import triton; assert triton.__version__ == '$VERSION', triton.__version__"
if [ -n "${TOKOPS_T36_ARGS:-}" ]; then read -r -a args <<< "$TOKOPS_T36_ARGS"; fi
env -u TRITON_INTERPRET "$T36/bin/python" -m benchmarks.kernel_check "${args[@]}"
echo "[kernel_check.sh] triton $VERSION: $(( $(date +%s) - start )) s"
