"""The single op registry of tokops.

Every public op is one ``torch.library`` op in the ``tokops`` namespace whose
last argument is the *concrete* backend name (``"torch"``, ``"triton"`` or
``"cuda"``).  The Python entry points (``tokops.kv.quantize`` ...) validate the
arguments, resolve ``backend="auto"`` with :func:`resolve_backend` and call the
op; the op's CPU/CUDA kernel then runs the implementation registered for that
backend with :func:`implements`.  Each op has a fake (meta) kernel so that
``torch.compile(fullgraph=True)`` traces through it.

The CUDA implementations are C++ ops (``tokops::<name>_cuda``) registered by
the compiled extension ``tokops._C``; Triton implementations live in
``tokops.triton_kernels`` and are imported lazily, on first use, so that
``import tokops`` never imports Triton.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

NAMESPACE = "tokops"
BACKENDS = ("auto", "torch", "triton", "cuda")

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
# op name -> backend -> implementation (a callable, or "module:function" to import lazily)
_IMPLS: dict[str, dict[str, Callable | str]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but is not built / installed / implemented."""


# --------------------------------------------------------------------------- build info
_EXT = None
_EXT_ERROR: str | None = None
_TORCH_MISMATCH: str | None = None
BUILD_INFO_FILE = "_build_info.json"  # written by setup.py next to the extension


def build_info() -> dict | None:
    """What ``setup.py`` recorded when it compiled ``tokops._C`` (the torch it compiled against,
    CUDA kernels and architectures), or None for a build that did not record it."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(__file__).parent / BUILD_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def _base_version(v: str) -> str:
    return v.split("+")[0]


def torch_mismatch(built: dict | None = None) -> str | None:
    """A message when the extension was built against another torch than the one running, else None.

    A C++ extension only works with the torch release (and CUDA major version) it was compiled
    against: another one fails to load it with an undefined-symbol error, or worse."""
    built = build_info() if built is None else built
    if not built or not built.get("torch"):
        return None
    running, was = torch.__version__, built["torch"]
    same = _base_version(running) == _base_version(was)
    if same and built.get("cuda_kernels"):
        major = lambda c: c.split(".")[0] if c else None  # noqa: E731
        same = major(built.get("torch_cuda")) == major(torch.version.cuda)
    if same:
        return None
    return (f"tokops: its compiled extension (tokops._C) was built against torch {was} but torch {running} "
            f"is running; a C++ extension only loads into the torch it was compiled against, so tokops._C "
            f"is not loaded: the 'cuda' backend is unavailable, the 'torch' and 'triton' backends work. "
            f"Fix: rebuild tokops against this torch, e.g. `pip install --no-build-isolation --no-deps "
            f"--force-reinstall <tokops sdist or checkout>` (or `pip install --no-build-isolation -e .` "
            f"in a checkout), or install torch {_base_version(was)}.")


def extension():
    """The compiled extension ``tokops._C`` or ``None`` (with the reason in :func:`extension_error`).

    Not loaded, with a warning naming both versions and the fix, when it was built against
    another torch than the one running (:func:`torch_mismatch`)."""
    global _EXT, _EXT_ERROR, _TORCH_MISMATCH
    if _EXT is None and _EXT_ERROR is None:
        _TORCH_MISMATCH = torch_mismatch()
        if _TORCH_MISMATCH is not None:
            import warnings

            _EXT_ERROR = _TORCH_MISMATCH
            warnings.warn(_TORCH_MISMATCH, RuntimeWarning, stacklevel=2)
            return None
        try:
            _EXT = importlib.import_module("tokops._C")
        except ImportError as e:  # not built (pure-Python checkout) or ABI mismatch
            _EXT_ERROR = f"{type(e).__name__}: {e}"
            if "undefined symbol" in str(e):
                _EXT_ERROR += (f" (tokops._C was probably built against another torch than the running "
                               f"{torch.__version__}: rebuild it with `pip install --no-build-isolation "
                               f"--no-deps --force-reinstall <tokops source>`)")
    return _EXT


def extension_error() -> str | None:
    extension()
    return _EXT_ERROR


def cuda_compiled() -> bool:
    """True when the extension was built with the CUDA kernels (no GPU needed to ask)."""
    ext = extension()
    return bool(ext is not None and ext.cuda_compiled())


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set only by ``benchmarks.kernel_check``: it compiles the kernels for a GPU from a CPU-only machine
# (tensors on the meta device) and needs the launch heuristics to take their GPU branch.
_TARGET_SMS: int | None = None


def gpu_sm_count(device) -> int | None:
    """Number of SMs of the GPU a Triton launch on ``device`` runs on; ``None`` for a CPU launch
    (the interpreter), where the launchers pick small tiles and pretend-GPU split counts."""
    if _TARGET_SMS is not None:
        return _TARGET_SMS
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


# --------------------------------------------------------------------------- outputs
POISON_ENV = "TOKOPS_POISON"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. With ``TOKOPS_POISON=1`` (the tests set it) the buffer is
    filled with NaN (floats) or 0x55555555 (ints) so that an element a kernel forgot to
    write shows up as a mismatch instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV, "0") not in ("", "0"):
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.view(torch.uint8).fill_(0x55)
    return out


# --------------------------------------------------------------------------- definition
def define(name: str, schema: str, fake: Callable, *, differentiable: bool = False) -> Callable:
    """Define ``tokops::<name><schema>``; the schema's last argument must be ``str backend``.

    ``differentiable=False`` registers an autograd kernel whose backward raises: asking for a
    gradient through the op fails with a clear error on every backend (instead of a silent ``None``
    on the compiled backends and a gradient on the torch one).  An op with ``differentiable=True``
    must register its own autograd (``torch.library.register_autograd``).

    Returns the op (``torch.ops.tokops.<name>``).
    """
    if not schema.rstrip().split("->")[0].rstrip().rstrip(")").endswith("str backend"):
        raise AssertionError(f"schema of {name} must end with 'str backend'")
    _LIB.define(name + schema)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    _IMPLS.setdefault(name, {})

    def kernel(*args):
        *rest, backend = args
        if backend == "triton" and triton_interpreter():
            _refuse_interpreter_bf16(name, rest)
        return _load(name, backend)(*rest)

    kernel.__name__ = f"{name}_kernel"
    _LIB.impl(name, kernel, "CPU")
    _LIB.impl(name, kernel, "CUDA")
    if not differentiable:
        _register_not_differentiable(name)
    return getattr(torch.ops.tokops, name)


def _refuse_interpreter_bf16(name: str, args) -> None:
    """The Triton interpreter (``TRITON_INTERPRET=1``) has no bf16 arithmetic: its results are garbage
    (errors up to 1e9), so a bf16 tensor (or a bf16 output dtype) on the Triton backend there is an
    error rather than a wrong answer."""
    for i, a in enumerate(args):
        if (isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16) or a is torch.bfloat16:
            what = "a bf16 tensor" if isinstance(a, torch.Tensor) else "bf16 as the output dtype"
            raise TypeError(
                f"tokops::{name}: backend='triton' under the Triton interpreter (TRITON_INTERPRET=1) cannot "
                f"compute bf16 (the interpreter has no bf16 arithmetic), got {what} (argument {i}); use "
                f"backend='torch' on the CPU, or fp16/fp32")


class NotDifferentiableError(NotImplementedError):
    """A gradient was asked for through a tokops op that has no backward (or no double backward)."""


def _register_not_differentiable(name: str) -> None:
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        hint = (" (this op is the backward of block_sparse_attn_fwd: double backward is not implemented)"
                if name.endswith("_bwd") else "")
        raise NotDifferentiableError(
            f"tokops::{name} is not differentiable{hint}; detach its inputs (or compute the gradient "
            f"with a differentiable reference) -- no backend computes a gradient through it")

    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=_LIB)


def implements(name: str, backend: str, fn: Callable | str | None = None):
    """Register the ``backend`` implementation of op ``name``.

    ``fn`` may be a callable or a ``"module:function"`` string imported on first use.
    Usable as a decorator when ``fn`` is omitted.
    """
    if backend not in BACKENDS[1:]:
        raise AssertionError(f"unknown backend {backend!r}")

    def register(f):
        _IMPLS.setdefault(name, {})[backend] = f
        return f

    return register if fn is None else register(fn)


def cuda_op(name: str) -> Callable:
    """The CUDA implementation of ``name``: the C++ op ``tokops::<name>_cuda`` from ``tokops._C``."""

    def run(*args):
        extension()  # loading the extension registers its ops
        return getattr(torch.ops.tokops, f"{name}_cuda")(*args)

    run.__name__ = f"{name}_cuda"
    return run


def _load(name: str, backend: str) -> Callable:
    fn = _IMPLS[name].get(backend)
    if fn is None:
        raise BackendUnavailableError(f"tokops::{name} has no {backend!r} implementation")
    if isinstance(fn, str):
        mod, attr = fn.split(":")
        fn = getattr(importlib.import_module(mod), attr)
        _IMPLS[name][backend] = fn
    return fn


def has_impl(name: str, backend: str) -> bool:
    return backend in _IMPLS.get(name, {})


def implementations() -> dict[str, list[str]]:
    """op name -> backends with an implementation (for ``tokops.info`` and the README matrix)."""
    return {k: [b for b in BACKENDS[1:] if b in v] for k, v in sorted(_IMPLS.items())}


# --------------------------------------------------------------------------- backend choice
# CUDA kernels that ``auto`` may choose. A CUDA kernel is added here only after a GPU session ran
# its tests (``bash benchmarks/gpu_check.sh``) and they passed. Until then ``auto`` runs the Triton
# kernel on a GPU (tested under the interpreter and compile-checked for sm_80/sm_90), and the CUDA
# kernel runs only when asked for with ``backend="cuda"``: an untested kernel is never the silent
# default. ``TOKOPS_AUTO_CUDA=1`` lets ``auto`` take every built CUDA kernel (gpu_check.sh sets it).
GPU_VERIFIED_CUDA: frozenset[str] = frozenset()


def auto_may_use_cuda(name: str) -> bool:
    return name in GPU_VERIFIED_CUDA or os.environ.get("TOKOPS_AUTO_CUDA", "0") == "1"


def resolve_backend(name: str, backend: str, device: torch.device) -> str:
    """Turn ``backend`` ("auto" or a concrete name) into the backend that will run ``name``.

    ``auto``: the CUDA kernel if built, verified on a GPU (:data:`GPU_VERIFIED_CUDA`) and the
    tensors are on a GPU, else Triton on a GPU, else the pure-torch path.  An explicit backend
    that cannot run raises.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    on_gpu = device.type == "cuda"
    if backend == "auto":
        if on_gpu and has_impl(name, "cuda") and cuda_compiled() and auto_may_use_cuda(name):
            return "cuda"
        if on_gpu and has_impl(name, "triton") and triton_available():
            return "triton"
        return "torch"
    if not has_impl(name, backend):
        have = [b for b in BACKENDS[1:] if has_impl(name, b)]
        raise BackendUnavailableError(
            f"tokops.{name}: no {backend!r} implementation; available backends: {have}")
    if backend == "cuda":
        if not cuda_compiled():
            why = extension_error() or "the extension was built without CUDA (nvcc or a CUDA torch was missing at build time)"
            raise BackendUnavailableError(
                f"tokops.{name}: backend='cuda' requested but the CUDA kernels are not built ({why}). "
                "Rebuild with nvcc on PATH / CUDA_HOME set: pip install --no-build-isolation -e .")
        if not on_gpu:
            raise ValueError(f"tokops.{name}: backend='cuda' needs CUDA tensors; got tensors on {device}")
    elif backend == "triton":
        if not triton_available():
            raise BackendUnavailableError(f"tokops.{name}: backend='triton' requested but triton is not installed")
        if not on_gpu and not triton_interpreter():
            raise ValueError(
                f"tokops.{name}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}")
    return backend
