"""Which (backend, device) pairs can run on this machine.

A plain module (not ``conftest``): ``tests/emu/conftest.py`` is imported as ``conftest`` too, so test
modules must not import helpers from ``conftest`` (the second conftest replaces the first in
``sys.modules`` when the whole tree is collected)."""

import torch

import tokops
from tokops import _registry

HAS_GPU = torch.cuda.is_available()


def runnable_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs that can run on this machine."""
    pairs = [("torch", "cpu")]
    if _registry.triton_available() and _registry.triton_interpreter():
        pairs.append(("triton", "cpu"))
    if HAS_GPU:
        pairs.append(("torch", "cuda"))
        if _registry.triton_available():
            pairs.append(("triton", "cuda"))
        if tokops.cuda_compiled():
            pairs.append(("cuda", "cuda"))
    return pairs
