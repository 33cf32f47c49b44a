"""The CUDA kernels of csrc/ run on the CPU under the emulator (csrc/emu/cuda_emu.h), built with
ASan + UBSan. These tests need the ASan runtime preloaded into the Python process::

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 \\
        python -m pytest -q tests/emu -p no:cacheprovider

(.ci/run does this). Without it they are skipped. The CUDA ops are registered as
``torch.ops.tokops_emu.<name>_cuda`` for CPU tensors; the ``cuda_backend`` fixture routes the
registry's ``"cuda"`` backend to them, so a test calls ``torch.ops.tokops.<op>(..., "cuda")`` on
CPU tensors exactly as the Python layer calls the real kernel."""

import zlib

import pytest
import torch

import emu_build
from tokops import _registry as reg

SEEDS = (0, 1, 2)  # scheduling seeds (thread order after barriers, block order, WMMA layout)


@pytest.fixture(scope="session")
def emu():
    if not emu_build.asan_loaded():
        pytest.skip("the CUDA emulation tests need the ASan runtime preloaded: LD_PRELOAD=\"$(gcc "
                    "-print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)\" "
                    "ASAN_OPTIONS=detect_leaks=0 python -m pytest tests/emu (.ci/run does this)")
    if emu_build.cuda_include() is None:
        pytest.skip("the CUDA toolkit headers (cuda_fp16.h) are not installed; set CUDA_HOME")
    emu_build.build()
    return torch.ops.tokops_emu


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def seed(request, emu):
    emu.emu_set_seed(request.param)
    return request.param


def _route(emu, monkeypatch):
    for name in emu_build.CUDA_OPS:
        monkeypatch.setitem(reg._IMPLS[name], "cuda", getattr(emu, f"{name}_cuda"))
    return emu


@pytest.fixture
def cuda_backend(emu, seed, monkeypatch):
    """The registry's "cuda" backend runs the emulated kernels (on CPU tensors) for this test,
    once per scheduling seed."""
    return _route(emu, monkeypatch)


@pytest.fixture
def cuda_backend_one_seed(emu, request, monkeypatch):
    """Like cuda_backend, but one run per case, the seed cycling over SEEDS with the case (for the
    large matrices of kernels without intra-block communication: the suite still covers every
    seed)."""
    emu.emu_set_seed(SEEDS[zlib.crc32(request.node.name.encode()) % len(SEEDS)])
    return _route(emu, monkeypatch)


def _public_api_takes_cuda_on_cpu(monkeypatch):
    orig = reg.resolve_backend

    def resolve(name, backend, device):
        return "cuda" if backend == "cuda" and name in emu_build.CUDA_OPS else orig(name, backend, device)

    monkeypatch.setattr(reg, "resolve_backend", resolve)


@pytest.fixture
def cuda_api(cuda_backend, monkeypatch):
    """Also let the public API resolve backend="cuda" for CPU tensors (the emulated kernels)."""
    _public_api_takes_cuda_on_cpu(monkeypatch)
    return cuda_backend


@pytest.fixture
def cuda_api_one_seed(cuda_backend_one_seed, monkeypatch):
    _public_api_takes_cuda_on_cpu(monkeypatch)
    return cuda_backend_one_seed
