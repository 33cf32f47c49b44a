"""Test configuration.

* Without a GPU, Triton kernels run under the interpreter on CPU tensors
  (TRITON_INTERPRET must be set before triton is first imported).
* TOKOPS_POISON=1 makes every kernel output start as NaN / 0x55 bytes, so an
  element a kernel forgot to write cannot pass by luck.
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKOPS_POISON", "1")

import pytest  # noqa: E402

import tokops  # noqa: E402
from tokops import _registry  # noqa: E402
from backends import runnable_backends  # noqa: E402  (tests/backends.py)


def pytest_generate_tests(metafunc):
    if "backend_device" in metafunc.fixturenames:
        pairs = runnable_backends()
        metafunc.parametrize("backend_device", pairs, ids=[f"{b}-{d}" for b, d in pairs])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip)
    _cap_fuzz_examples(items)


def pytest_report_header(config):
    info = tokops.info()
    return (f"tokops {info['tokops']}, torch {info['torch']}, triton {info['triton']}, "
            f"cuda kernels compiled: {info['cuda_compiled']} {info['cuda_archs']}, gpu: {info['gpu']}, "
            f"triton interpreter: {_registry.triton_interpreter()}")


def _cap_fuzz_examples(items):
    """``TOKOPS_FUZZ_MAX_EXAMPLES=N`` caps every Hypothesis test at N examples (the GPU smoke run of
    ``benchmarks/gpu_check.sh`` uses it; a test's own ``@settings`` would otherwise win over a profile)."""
    cap = os.environ.get("TOKOPS_FUZZ_MAX_EXAMPLES", "").strip()
    if not cap:
        return
    from hypothesis import settings

    for item in items:
        fn = getattr(item, "obj", None)
        s = getattr(fn, "_hypothesis_internal_use_settings", None)
        if s is not None and s.max_examples > int(cap):
            fn._hypothesis_internal_use_settings = settings(s, max_examples=int(cap))
