"""KV quantization ops: KIVI asymmetric group quantization (int8/int4/int2) and fp8 e4m3.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024).
Exact spec and test vectors: ``DESIGN.md`` ("Quantized KV"); see :mod:`tokops.kv.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _registry as reg
from .._checks import (FLOAT_DTYPES, check_int, check_power_of_two, check_same_device, check_shape, check_tensor,
                       dense, normalize_axis)
from . import reference as ref
from .layout import packed_shapes

BITS = (8, 4, 2)
MIN_GROUP, MAX_GROUP = 4, 1024


class QuantizedTensor(NamedTuple):
    """Packed group-quantized tensor (see :func:`quantize` for the layout)."""

    codes: torch.Tensor  # int32, 32/bits codes per word along the grouped axis
    scale: torch.Tensor  # fp16, one per group
    zero: torch.Tensor  # fp16, one per group
    bits: int
    group_size: int
    axis: int  # -1 (groups of channels, per token) or -2 (groups of tokens, per channel)
    length: int  # size of the grouped axis before padding
    dtype: torch.dtype  # dtype of the original tensor (dequantize's default)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


class Fp8Tensor(NamedTuple):
    """fp8 e4m3fn codes with one fp32 scale per row of the last dim."""

    codes: torch.Tensor  # float8_e4m3fn, same shape as the original tensor
    scale: torch.Tensor  # fp32, shape = original shape[:-1]
    dtype: torch.dtype

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()


# --------------------------------------------------------------------------- checks (one helper per op)
# Strided inputs: the quantize kernels read a contiguous tensor, so each check helper returns its
# tensors made contiguous (one internal copy of a strided view, DESIGN.md "Inputs").
def _check_quantize(x, bits, group_size, axis):
    """Checks; returns ``(x contiguous, axis)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=2, contiguous=False)
    check_int("bits", bits, choices=BITS)
    check_power_of_two("group_size", group_size, MIN_GROUP, MAX_GROUP)
    axis = normalize_axis("axis", axis, x.dim())
    if axis == -1 and x.shape[-1] % group_size:
        raise ValueError(f"group_size={group_size} must divide the channel dim (x.shape[-1]={x.shape[-1]}) "
                         f"when quantizing per token (axis=-1)")
    return dense(x), axis


def _check_dequantize(qt: QuantizedTensor, dtype):
    """Checks; returns ``(codes, scale, zero)`` contiguous."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a tokops.kv.QuantizedTensor, got {type(qt).__name__}")
    check_int("qt.bits", qt.bits, choices=BITS)
    check_power_of_two("qt.group_size", qt.group_size, MIN_GROUP, MAX_GROUP)
    if qt.axis not in (-1, -2):
        raise ValueError(f"qt.axis must be -1 or -2, got {qt.axis}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
    check_tensor("qt.codes", qt.codes, dtypes=(torch.int32,), min_ndim=2, contiguous=False)
    check_tensor("qt.scale", qt.scale, dtypes=(torch.float16,), min_ndim=2, contiguous=False)
    check_tensor("qt.zero", qt.zero, dtypes=(torch.float16,), min_ndim=2, contiguous=False)
    check_same_device(codes=qt.codes, scale=qt.scale, zero=qt.zero)
    check_int("qt.length", qt.length, min_value=1)
    *lead, a, b = qt.codes.shape
    shape = (*lead, a, qt.length) if qt.axis == -1 else (*lead, qt.length, b)
    codes_shape, scale_shape = packed_shapes(shape, qt.bits, qt.group_size, qt.axis)
    check_shape("qt.codes", qt.codes, codes_shape)
    check_shape("qt.scale", qt.scale, scale_shape)
    check_shape("qt.zero", qt.zero, scale_shape)
    return dense(qt.codes), dense(qt.scale), dense(qt.zero)


def _check_fp8(x) -> torch.Tensor:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1, contiguous=False)
    return dense(x)


def _check_dequantize_fp8(ft: Fp8Tensor, dtype):
    """Checks; returns ``(codes, scale)`` contiguous."""
    if not isinstance(ft, Fp8Tensor):
        raise TypeError(f"ft must be a tokops.kv.Fp8Tensor, got {type(ft).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {dtype}")
    check_tensor("ft.codes", ft.codes, dtypes=(torch.float8_e4m3fn,), min_ndim=1, contiguous=False)
    check_tensor("ft.scale", ft.scale, dtypes=(torch.float32,), min_ndim=0, contiguous=False)
    check_same_device(codes=ft.codes, scale=ft.scale)
    check_shape("ft.scale", ft.scale, ft.codes.shape[:-1])
    return dense(ft.codes), dense(ft.scale)


# --------------------------------------------------------------------------- op definitions
def _quantize_fake(x, bits, group_size, axis, backend):
    codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
    return (x.new_empty(codes_shape, dtype=torch.int32), x.new_empty(scale_shape, dtype=torch.float16),
            x.new_empty(scale_shape, dtype=torch.float16))


def _dequantize_fake(codes, scale, zero, bits, group_size, axis, length, dtype, backend):
    *lead, a, b = codes.shape
    shape = (*lead, a, length) if axis == -1 else (*lead, length, b)
    return codes.new_empty(shape, dtype=dtype)


def _quantize_fp8_fake(x, backend):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _dequantize_fp8_fake(codes, scale, dtype, backend):
    return codes.new_empty(codes.shape, dtype=dtype)


_quantize_op = reg.define(
    "kv_quantize", "(Tensor x, int bits, int group_size, int axis, str backend) -> (Tensor, Tensor, Tensor)",
    _quantize_fake)
_dequantize_op = reg.define(
    "kv_dequantize", "(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, int axis, int length, "
    "ScalarType dtype, str backend) -> Tensor", _dequantize_fake)
_quantize_fp8_op = reg.define("kv_quantize_fp8", "(Tensor x, str backend) -> (Tensor, Tensor)", _quantize_fp8_fake)
_dequantize_fp8_op = reg.define(
    "kv_dequantize_fp8", "(Tensor codes, Tensor scale, ScalarType dtype, str backend) -> Tensor", _dequantize_fp8_fake)

reg.implements("kv_quantize", "torch", ref.quantize)
reg.implements("kv_dequantize", "torch", ref.dequantize)
reg.implements("kv_quantize_fp8", "torch", ref.quantize_fp8)
reg.implements("kv_dequantize_fp8", "torch", ref.dequantize_fp8)
for _name in ("kv_quantize", "kv_dequantize", "kv_quantize_fp8", "kv_dequantize_fp8"):
    reg.implements(_name, "triton", f"tokops.triton_kernels.kv_quant:{_name.removeprefix('kv_')}")
    reg.implements(_name, "cuda", reg.cuda_op(_name))


# --------------------------------------------------------------------------- public API
def quantize(x: torch.Tensor, bits: int = 4, group_size: int = 32, axis: int = -1, *,
             backend: str = "auto") -> QuantizedTensor:
    """Asymmetric group quantization of ``x: (..., N, D)`` (fp16/bf16/fp32; a strided view is copied
    once, internally).

    ``axis=-1`` groups ``group_size`` consecutive channels of one token (KIVI values, per token;
    ``D % group_size == 0``); ``axis=-2`` groups ``group_size`` consecutive tokens of one channel
    (KIVI keys, per channel; any ``N``, the tail group is padded).  ``bits`` in {8, 4, 2};
    ``group_size`` a power of two in [4, 1024].

    Returns a :class:`QuantizedTensor`: ``codes`` int32 with ``32/bits`` codes per word packed
    along the grouped axis (least-significant bits first), ``scale`` and ``zero`` fp16 per group.
    ``|x - dequantize(q)| <= scale/2`` (plus the fp16 rounding of ``zero``).

    Non-finite and huge values (identical on every backend): a group holding NaN or +-inf gets a
    NaN/inf scale or zero and codes 0, so it dequantizes to NaN -- NaN is never made finite.  A
    *finite* ``x`` whose group minimum or range does not fit the fp16 ``zero``/``scale``
    (``|min| >= 65520`` or ``(max - min) / (2**bits - 1) >= 65520``, e.g. fp32/bf16 values beyond
    ~6.5e4) raises ``ValueError`` instead of silently dequantizing to inf (use :func:`quantize_fp8`,
    whose scale is fp32, or scale the input).  That check reads one flag on the host (skipped under
    ``torch.compile``); fp16 inputs can never trigger it.
    """
    qt = quantize_unchecked(x, bits, group_size, axis, backend=backend)
    check_fp16_range(x, qt.scale, qt.zero, bits)
    return qt


def quantize_unchecked(x: torch.Tensor, bits: int = 4, group_size: int = 32, axis: int = -1, *,
                       backend: str = "auto") -> QuantizedTensor:
    """:func:`quantize` without the fp16-range check (no host sync at all): for callers that check
    the range themselves with :func:`fp16_overflow` at a point of their choosing (the KV cache keeps
    a device-side flag, see :class:`tokops.kv.QuantizedKVCache`)."""
    x, axis = _check_quantize(x, bits, group_size, axis)
    be = reg.resolve_backend("kv_quantize", backend, x.device)
    codes, scale, zero = _quantize_op(x, bits, group_size, axis, be)
    return QuantizedTensor(codes, scale, zero, bits, group_size, axis, x.shape[axis], x.dtype)


def fp16_overflow(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
    """A 0-d bool tensor on ``x``'s device, true when a finite ``x`` overflowed the fp16
    ``scale``/``zero`` of its groups (no host sync); ``None`` for fp16 ``x`` (it cannot overflow)
    and meta tensors."""
    if x.dtype == torch.float16 or x.device.type == "meta":
        return None
    return (torch.isinf(scale).any() | torch.isinf(zero).any()) & torch.isfinite(x).all()


def fp16_overflow_error(amax: float, bits: int) -> ValueError:
    return ValueError(
        f"x: values up to |x| = {amax:.4g} overflow the fp16 scale/zero of {bits}-bit group quantization "
        f"(a group's min must satisfy |min| < 65520 and its (max - min) / {(1 << bits) - 1} < 65520); "
        f"use fp8 quantization (fp32 scales, mode='fp8' for a QuantizedKVCache) or scale the input down")


def check_fp16_range(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> None:
    """Raise ``ValueError`` when a finite ``x`` overflowed the fp16 ``scale``/``zero`` of its groups
    (one host sync; skipped under ``torch.compile`` and for fp16 ``x``, which cannot overflow).
    Per-token callers that must not sync use :func:`fp16_overflow` (a device flag) instead."""
    if torch.compiler.is_compiling():
        return
    overflow = fp16_overflow(x, scale, zero)
    if overflow is not None and bool(overflow):
        raise fp16_overflow_error(float(x.abs().max()), bits)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`quantize`: ``x_hat = q * scale + zero`` (fp32), cast to ``dtype``
    (default: the original dtype).  Returns a tensor of the original shape."""
    dtype = qt.dtype if dtype is None and isinstance(qt, QuantizedTensor) else dtype
    codes, scale, zero = _check_dequantize(qt, dtype)
    be = reg.resolve_backend("kv_dequantize", backend, qt.codes.device)
    return _dequantize_op(codes, scale, zero, qt.bits, qt.group_size, qt.axis, qt.length, dtype, be)


def quantize_fp8(x: torch.Tensor, *, backend: str = "auto") -> Fp8Tensor:
    """fp8 e4m3fn quantization of ``x: (..., D)`` with one fp32 scale per row (per token and head
    for ``(B, H, N, D)``): ``scale = amax / 448``, ``codes = fp8(x / scale)``."""
    x = _check_fp8(x)
    be = reg.resolve_backend("kv_quantize_fp8", backend, x.device)
    codes, scale = _quantize_fp8_op(x, be)
    return Fp8Tensor(codes, scale, x.dtype)


def dequantize_fp8(ft: Fp8Tensor, dtype: torch.dtype | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``codes * scale`` in fp32, cast to ``dtype`` (default: the original dtype)."""
    dtype = ft.dtype if dtype is None and isinstance(ft, Fp8Tensor) else dtype
    codes, scale = _check_dequantize_fp8(ft, dtype)
    be = reg.resolve_backend("kv_dequantize_fp8", backend, ft.codes.device)
    return _dequantize_fp8_op(codes, scale, dtype, be)
