"""Argument checks shared by every op's own check helper.

Each helper raises ``TypeError`` (wrong type / dtype) or ``ValueError`` (wrong
value / shape / layout) with a message that names the argument, the expected
and the actual value.  None of them reads tensor *values* (no device sync).
"""

from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, dtypes: Iterable[torch.dtype] | None = None, ndim: int | None = None,
                 min_ndim: int | None = None, contiguous: bool = True, nonempty: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()}; "
                         f"call .contiguous() first")


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when contiguous, else one contiguous copy (``None`` passes through).

    DESIGN.md "Inputs: accept strided views": an op whose kernels cannot take strides calls this
    once, in its check helper, on each tensor it hands to a kernel -- and says so in its docstring.
    """
    return t if t is None or t.is_contiguous() else t.contiguous()


def last_dim_dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its last dim is contiguous (``stride(-1) == 1``, or size 1), else one
    contiguous copy: for kernels that take the strides of the other dims (any transposed, sliced or
    batch/head-expanded view keeps its memory; only a view strided in the last dim is copied)."""
    if t is None or t.dim() == 0 or t.shape[-1] == 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def check_int(name: str, v, *, choices: Iterable[int] | None = None, min_value: int | None = None,
              max_value: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    if choices is not None and v not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v}")
    if min_value is not None and v < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {v}")
    if max_value is not None and v > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {v}")


def check_power_of_two(name: str, v: int, lo: int, hi: int) -> None:
    check_int(name, v)
    if v < lo or v > hi or v & (v - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {v}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devs = {k: t.device for k, t in tensors.items()}
    first = next(iter(devs.values()))
    for k, d in devs.items():
        if d != first:
            raise ValueError(f"all tensors must be on one device; got {', '.join(f'{n} on {x}' for n, x in devs.items())}")
    return first


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def normalize_axis(name: str, axis, ndim: int, allowed=(-2, -1)) -> int:
    """Map ``axis`` to its negative form and check that it is one of ``allowed``."""
    check_int(name, axis)
    neg = axis - ndim if axis >= 0 else axis
    if neg not in allowed or neg < -ndim:
        raise ValueError(f"{name} must be one of {allowed} (or the matching non-negative index for a "
                         f"{ndim}-dim tensor), got {axis}")
    return neg
