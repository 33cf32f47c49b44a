"""Benchmark cases, timing and hardware limits.

A family module ``benchmarks/bench_<family>.py`` exposes
``cases(device: str, quick: bool) -> list[Case]``; :mod:`benchmarks.run` times every
implementation of every case side by side in one run and reports time, GB/s or
TFLOP/s, the ratio to the baseline (the first entry of ``fns``) and to the hardware limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# DESIGN.md "Hardware limits" (H100 SXM, measured on the lent machine).
HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS_PER_S = 800e12


@dataclass
class Case:
    family: str  # "kv", "attention", "merge"
    name: str  # what is computed, e.g. "quantize int4 G=32 keys"
    params: dict  # shapes and settings, for the report
    fns: dict[str, Callable[[], object]]  # implementation -> zero-arg callable; the first is the baseline
    bytes: int | None = None  # bytes one call must move (for GB/s and % of HBM)
    flops: float | None = None  # flops of one call (for TFLOP/s and % of peak)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 3, rep_ms: float = 100.0,
            max_iters: int = 200) -> float:
    """Median seconds per call: ``triton.testing.do_bench`` (CUDA events, L2 flushed) on a GPU,
    ``time.perf_counter`` on CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=int(rep_ms), return_mode="median") * 1e-3
    for _ in range(warmup):
        fn()
    times = []
    budget = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak extra device memory (bytes) of one call, on a GPU; None on CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
