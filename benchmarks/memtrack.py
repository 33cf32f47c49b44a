"""Peak extra memory of a piece of PyTorch code, traced without a GPU (``LiveBytes``).

A ``TorchDispatchMode`` that sees every tensor an operator returns and keeps the bytes of each new
storage alive until the last tensor on it dies: ``peak`` is the most bytes that were alive at once,
counting everything the code allocated (intermediates and outputs) but not the storages passed in
``inputs``.  Works on meta tensors, so the pure-torch ToMe step and the tokops step can be traced at
their real sizes (B=16, N=4096, C=768) on a CPU.  What it cannot see: allocations *inside* one
operator (a custom op's internal workspace, an ATen kernel's scratch); callers add those
analytically (e.g. :func:`match_workspace_bytes`).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, inputs=()):
        super().__init__()
        self.known = {self._sid(t) for t in inputs}
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.cur = 0
        self.peak = 0

    @staticmethod
    def _sid(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata  # the StorageImpl: one id per storage, meta tensors too

    def _drop(self, sid: int) -> None:
        self.refs[sid] -= 1
        if self.refs[sid] == 0:
            self.cur -= self.live.pop(sid)
            del self.refs[sid]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            sid = self._sid(t)
            if sid in self.known:
                continue
            if sid not in self.live:
                self.live[sid] = t.untyped_storage().nbytes()
                self.refs[sid] = 0
                self.cur += self.live[sid]
                self.peak = max(self.peak, self.cur)
            self.refs[sid] += 1
            weakref.finalize(t, self._drop, sid)
        return out


def traced_peak(fn, inputs=()) -> tuple[int, int]:
    """``(peak, live_at_end)`` bytes allocated by ``fn()`` (see :class:`LiveBytes`); the result of
    ``fn`` is alive at the end."""
    with LiveBytes(inputs) as lb:
        out = fn()
        end = lb.cur
    del out
    return lb.peak, end


def match_workspace_bytes(B: int, N: int, dtype: torch.dtype, valid: bool = False) -> int:
    """Bytes the tome_match kernels allocate internally besides their outputs (CUDA and Triton):
    fp32 inverse norms (B, N), and except for fp16 the int32 row exponents (B, N) and the int32
    sequence flags (B,); Triton also copies ``valid`` to int8."""
    n = 4 * B * N
    if dtype != torch.float16:
        n += 4 * B * N + 4 * B
    return n + (B * N if valid else 0)
