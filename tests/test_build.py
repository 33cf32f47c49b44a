"""The extension, the op registry and backend selection."""

import pytest
import torch

import tokops
from tokops import _registry


def test_extension_builds_and_loads():
    info = tokops.info()
    assert info["extension"], info["extension_error"]
    assert info["tokops"] == tokops.__version__


def test_cuda_kernels_compiled_when_required():
    """What ``tokops.info()`` says about the CUDA kernels is what the extension holds, on every
    machine: compiled <=> the CUDA ops are registered and at least one arch is listed, and a
    backend='cuda' call without them is a clear error.  .ci/run sets TOKOPS_REQUIRE_CUDA_BUILD=1:
    there they must also have been compiled."""
    import os

    info = tokops.info()
    compiled = info["cuda_compiled"]
    assert compiled == tokops.cuda_compiled()
    assert compiled == hasattr(torch.ops.tokops, "kv_quantize_cuda"), info
    assert bool(info["cuda_archs"]) == compiled, info
    if os.environ.get("TOKOPS_REQUIRE_CUDA_BUILD") == "1":
        assert compiled, info
    if not compiled:
        with pytest.raises((RuntimeError, ValueError), match="(?i)cuda"):
            tokops.kv.quantize(torch.randn(2, 64), 4, 32, -1, backend="cuda")


def test_every_op_has_fake_reference_and_triton():
    # Every op: a pure-torch reference and a Triton kernel; a CUDA kernel where CUDA can win.
    impls = _registry.implementations()
    assert impls, "no op registered"
    for name, backends in impls.items():
        assert {"torch", "triton"} <= set(backends), (name, backends)
        assert torch._library.utils.has_fake_kernel(getattr(torch.ops.tokops, name).default), name


def test_backend_argument_errors():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="backend must be one of"):
        tokops.kv.quantize(x, backend="fast")
    with pytest.raises(TypeError, match="backend must be a str"):
        tokops.kv.quantize(x, backend=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for CPU tensors")
def test_cuda_backend_on_cpu_tensor_is_a_clear_error():
    x = torch.randn(4, 32)
    expected = ValueError if tokops.cuda_compiled() else tokops.BackendUnavailableError
    with pytest.raises(expected, match="backend='cuda'"):
        tokops.kv.quantize(x, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tokops.kv.quantize(torch.randn(4, 32), backend="triton")


def test_auto_on_cpu_is_torch():
    assert _registry.resolve_backend("kv_quantize", "auto", torch.device("cpu")) == "torch"


def test_auto_takes_only_gpu_verified_cuda_kernels(monkeypatch):
    """On a GPU, auto picks a CUDA kernel only once it is verified there (or TOKOPS_AUTO_CUDA=1)."""
    monkeypatch.setattr(_registry, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_registry, "triton_available", lambda: True)
    monkeypatch.delenv("TOKOPS_AUTO_CUDA", raising=False)
    gpu = torch.device("cuda")
    assert _registry.resolve_backend("kv_quantize", "auto", gpu) == "triton"
    monkeypatch.setattr(_registry, "GPU_VERIFIED_CUDA", frozenset({"kv_quantize"}))
    assert _registry.resolve_backend("kv_quantize", "auto", gpu) == "cuda"
    assert _registry.resolve_backend("kv_dequantize", "auto", gpu) == "triton"
    monkeypatch.setenv("TOKOPS_AUTO_CUDA", "1")
    assert _registry.resolve_backend("kv_dequantize", "auto", gpu) == "cuda"
    assert _registry.resolve_backend("kv_dequantize", "auto", torch.device("cpu")) == "torch"


def test_missing_implementation_is_a_clear_error():
    _registry._IMPLS["__probe"] = {"torch": lambda: None}
    try:
        with pytest.raises(tokops.BackendUnavailableError, match="no 'triton' implementation"):
            _registry.resolve_backend("__probe", "triton", torch.device("cpu"))
    finally:
        del _registry._IMPLS["__probe"]
