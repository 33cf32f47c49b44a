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

# DESIGN.md "Hardware limits": datasheet HBM bandwidth and dense bf16 FLOP/s per GPU, matched on
# ``torch.cuda.get_device_name()`` (first match wins, so the specific names come first). The report
# also gives the device-to-device copy bandwidth measured in the same run.
GPU_LIMITS = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100", 1.555e12, 312e12),  # 40 GB
)


def hardware_limits(device: str) -> dict:
    """``{"gpu", "hbm_bytes_per_s", "bf16_flops_per_s"}`` for the GPU in use (None for the limits of
    a CPU or of a GPU not in :data:`GPU_LIMITS`: then no "% of limit" is reported)."""
    if device != "cuda":
        return {"gpu": None, "hbm_bytes_per_s": None, "bf16_flops_per_s": None}
    name = torch.cuda.get_device_name()
    for key, hbm, flops in GPU_LIMITS:
        if key.lower() in name.lower():
            return {"gpu": name, "hbm_bytes_per_s": hbm, "bf16_flops_per_s": flops}
    return {"gpu": name, "hbm_bytes_per_s": None, "bf16_flops_per_s": None}


def gpu_backends(op: str) -> list[str]:
    """The tokops backends to time, by name, for ``op`` on a GPU: ``triton``, and ``cuda`` when the
    extension has its CUDA kernel (never ``auto``: each row says which kernel ran)."""
    import tokops
    from tokops import _registry

    return ["triton"] + (["cuda"] if tokops.cuda_compiled() and _registry.has_impl(op, "cuda") else [])


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
