"""tokops: GPU kernels that make transformers cheaper per token.

Families: ``tokops.attention`` (block-sparse attention, per-key attention mass, mask builders),
``tokops.merge`` (ToMe / PiToMe merging, pruning), ``tokops.kv`` (quantized KV storage, cache,
decode attention); ``tokops.patch`` (transformers / timm integrations, imported on demand).
Every op takes ``backend="auto"|"torch"|"triton"|"cuda"``.
"""

from . import _registry

_registry.extension()  # load tokops._C (if built) so its C++ ops are registered
from ._registry import BackendUnavailableError, cuda_compiled, triton_available
from ._version import __version__
from . import kv  # noqa: E402  (registers the kv ops)
from . import attention  # noqa: E402  (registers the attention ops)
from . import merge  # noqa: E402  (registers the merge ops)

__all__ = ["__version__", "kv", "attention", "merge", "info", "BackendUnavailableError", "cuda_compiled",
           "triton_available"]


def info() -> dict:
    """What was built: version, torch/triton versions, CUDA kernels and their GPU architectures,
    and which backends each op has."""
    import torch

    ext = _registry.extension()
    build = ext.build_info() if ext is not None else {}
    recorded = _registry.build_info() or {}
    tri = None
    if triton_available():
        import triton

        tri = triton.__version__
    return {
        "tokops": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": tri,
        "extension": ext is not None,
        "extension_error": _registry.extension_error(),
        "cuda_compiled": cuda_compiled(),
        "cuda_archs": build.get("cuda_archs", []),
        "built_with_torch": recorded.get("torch", build.get("torch_version")),
        "torch_mismatch": _registry.torch_mismatch(),
        "build": recorded or None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": _registry.implementations(),
    }
