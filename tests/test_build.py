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


def test_extension_built_against_other_torch_is_explained(tmp_path):
    """An extension compiled against another torch is not loaded: one warning names both torch versions
    and the fix, ``info()`` says why, and the torch and Triton backends keep working."""
    import importlib.util
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pkg = Path(tokops.__file__).parent
    dst = tmp_path / "tokops"
    shutil.copytree(pkg, dst, copy_function=os.symlink,
                    ignore=shutil.ignore_patterns("__pycache__", "_build_info.json", "triton_kernels"))
    tk = importlib.util.find_spec("tokops.triton_kernels").submodule_search_locations[0]
    os.symlink(tk, dst / "triton_kernels")
    (dst / "_build_info.json").write_text('{"torch": "2.0.0+cu118", "torch_cuda": "11.8", "cuda_kernels": true}')
    code = r'''
import warnings, torch
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import tokops
msgs = [str(x.message) for x in w if "tokops._C" in str(x.message)]
assert len(msgs) == 1, msgs
assert "2.0.0+cu118" in msgs[0] and torch.__version__ in msgs[0] and "--no-build-isolation" in msgs[0], msgs
assert tokops.__file__.startswith(TMP), tokops.__file__
info = tokops.info()
assert not info["extension"] and not info["cuda_compiled"], info
assert info["torch_mismatch"] == msgs[0] and info["built_with_torch"] == "2.0.0+cu118", info
x = torch.randn(2, 4, 64)
ref = tokops.kv.dequantize(tokops.kv.quantize(x, 4, 32, -1, backend="torch"), backend="torch")
tri = tokops.kv.dequantize(tokops.kv.quantize(x, 4, 32, -1, backend="triton"), backend="triton")
torch.testing.assert_close(tri, ref)
try:
    tokops.kv.quantize(x, 4, 32, -1, backend="cuda")
except tokops.BackendUnavailableError as e:
    assert "2.0.0+cu118" in str(e), e
else:
    raise AssertionError("backend='cuda' ran without its extension")
print("OK")
'''
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", f"TMP = {str(tmp_path)!r}\n" + code], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_torch_mismatch_rules():
    running = torch.__version__
    cuda = torch.version.cuda
    assert _registry.torch_mismatch({}) is None
    assert _registry.torch_mismatch({"torch": running, "torch_cuda": cuda, "cuda_kernels": True}) is None
    assert _registry.torch_mismatch({"torch": running.split("+")[0], "cuda_kernels": False}) is None
    msg = _registry.torch_mismatch({"torch": "2.0.0", "torch_cuda": cuda, "cuda_kernels": False})
    assert msg and "2.0.0" in msg and running in msg
    other_cuda = "11.8" if cuda != "11.8" else "12.8"
    assert _registry.torch_mismatch({"torch": running, "torch_cuda": other_cuda, "cuda_kernels": True})


def _setup_module():
    """setup.py of this checkout / unpacked sdist, imported as a module (its main() does not run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "setup.py"
    if not path.is_file():
        pytest.skip("no setup.py beside the tests")
    spec = importlib.util.spec_from_file_location("tokops_setup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_setup_finds_pip_cuda_headers_beside_torch(tmp_path, monkeypatch):
    import types

    setup = _setup_module()
    site, cuda = tmp_path / "site", tmp_path / "cuda"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("")
    (cuda / "include").mkdir(parents=True)
    inc = site / "nvidia" / "cu13" / "include"
    inc.mkdir(parents=True)
    fake_torch = types.SimpleNamespace(__file__=str(site / "torch" / "__init__.py"))
    monkeypatch.setattr("sys.path", [])
    assert setup.cuda_include_dirs(fake_torch, str(cuda)) is None  # no cusparse.h anywhere
    for h in setup.NEEDED_HEADERS:
        (inc / h).write_text("")
    assert setup.cuda_include_dirs(fake_torch, str(cuda)) == [str(cuda / "include"), str(inc)]


def test_setup_without_toolkit_builds_cpu_only_with_one_line(monkeypatch, capsys):
    setup = _setup_module()
    monkeypatch.setattr(setup, "find_cuda_home", lambda torch_cuda: None)
    monkeypatch.delenv("TOKOPS_CUDA", raising=False)
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    fake_torch = type("T", (), {"__version__": "2.14.1+cu130", "version": type("V", (), {"cuda": "13.0"})})
    assert setup.cuda_config(fake_torch) is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "CPU-only" in lines[0] and "no CUDA toolkit" in lines[0], lines
    monkeypatch.setenv("TOKOPS_CUDA", "1")
    with pytest.raises(SystemExit, match="TOKOPS_CUDA=1 but the CUDA kernels cannot be compiled"):
        setup.cuda_config(fake_torch)
