"""pytest-benchmark view of the same cases: ``pytest benchmarks/test_microbench.py --benchmark-only``.

Sizes follow ``python -m benchmarks.run`` (full on a GPU, small on CPU; ``TOKOPS_BENCH_QUICK=1`` for small).
"""

import importlib
import os

import pytest
import torch

from benchmarks.run import families

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
QUICK = DEVICE == "cpu" or os.environ.get("TOKOPS_BENCH_QUICK") == "1"


def _params():
    for fam in families():
        for case in importlib.import_module(f"benchmarks.bench_{fam}").cases(DEVICE, QUICK):
            for impl, fn in case.fns.items():
                yield pytest.param(case, fn, id=f"{fam}:{case.name}:{impl}".replace(" ", "_"))


@pytest.mark.parametrize("case,fn", list(_params()))
def test_bench(benchmark, case, fn):
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.extra_info.update(case.params)
    if case.bytes:
        benchmark.extra_info["bytes"] = case.bytes
    benchmark(run)
