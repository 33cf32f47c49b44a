"""Pure-torch reference (the oracle) for KIVI-style group quantization and fp8.

Follows ``DESIGN.md`` to the letter: min/max per group, ``zero = fp16(mn)``,
``scale = fp16((mx - mn) / QMAX)``, codes ``clamp(round_half_even((x - zero) / scale), 0, QMAX)``
computed in fp32 from the stored fp16 values (0 where ``scale == 0``), packed
``32 / bits`` codes per int32 word, least-significant bits first.

Layout (``axis`` is the grouped axis of ``x: (..., N, D)``):

* ``axis=-1`` (values, per token: a group is G consecutive channels): ``D % G == 0``;
  ``codes: (..., N, ceil(D*bits/32)) int32``, ``scale, zero: (..., N, D/G) fp16``.
* ``axis=-2`` (keys, per channel: a group is G consecutive tokens): ``N`` is padded to
  ``Np = ceil(N/G)*G`` (the tail group's min/max use only real tokens, padded codes are 0);
  ``codes: (..., ceil(Np*bits/32), D) int32``, ``scale, zero: (..., Np/G, D) fp16``.
"""

from __future__ import annotations

import torch

from .layout import packed_shapes  # noqa: F401  (re-exported: the layout lives in tokops.kv.layout)

FP8_MAX = 448.0
FP16_MAX = 65504.0  # dequantize saturates fp16 outputs here: q * scale + zero may round just past it


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _to_last(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t if axis == -1 else t.transpose(-1, -2)


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int):
    """Reference quantize. Returns ``(codes int32, scale fp16, zero fp16)``."""
    qmax = (1 << bits) - 1
    cpw = 32 // bits
    xt = _to_last(x, axis).float()  # (..., other, L), grouped axis last
    length = xt.shape[-1]
    n_groups = _ceil_div(length, group_size)
    padded = n_groups * group_size
    pad = padded - length
    lo = torch.nn.functional.pad(xt, (0, pad), value=float("inf")).unflatten(-1, (n_groups, group_size))
    hi = torch.nn.functional.pad(xt, (0, pad), value=float("-inf")).unflatten(-1, (n_groups, group_size))
    mn = lo.amin(-1)
    mx = hi.amax(-1)
    zero = mn.to(torch.float16)
    scale = ((mx - mn) / qmax).to(torch.float16)
    z = zero.float().unsqueeze(-1)
    s = scale.float().unsqueeze(-1)
    xg = torch.nn.functional.pad(xt, (0, pad)).unflatten(-1, (n_groups, group_size))
    q = torch.clamp(torch.round((xg - z) / torch.where(s == 0, torch.ones_like(s), s)), 0, qmax)
    # codes are 0 where scale == 0, and where scale or zero is not finite (a group holding NaN/inf:
    # it dequantizes to NaN through its scale/zero, identically on every backend)
    q = torch.where((s == 0) | ~torch.isfinite(s) | ~torch.isfinite(z), torch.zeros_like(q), q)
    valid = torch.arange(padded, device=x.device).view(n_groups, group_size) < length
    q = torch.where(valid, q, torch.zeros_like(q)).flatten(-2).to(torch.int64)
    words = _ceil_div(padded * bits, 32)
    q = torch.nn.functional.pad(q, (0, words * cpw - padded)).unflatten(-1, (words, cpw))
    shifts = torch.arange(cpw, device=x.device, dtype=torch.int64) * bits
    w = (q << shifts).sum(-1)
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return _to_last(w, axis).contiguous(), _to_last(scale, axis).contiguous(), _to_last(zero, axis).contiguous()


def unpack_codes(codes: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Unpack int32 words into int64 codes along the grouped axis (padded length)."""
    cpw = 32 // bits
    w = _to_last(codes, axis).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits
    q = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    return _to_last(q, axis)


def dequantize(codes, scale, zero, bits: int, group_size: int, axis: int, length: int, dtype: torch.dtype):
    """Reference dequantize: ``x_hat = q * scale + zero`` in fp32, cast to ``dtype``."""
    q = _to_last(unpack_codes(codes, bits, axis), axis).float()
    s = _to_last(scale, axis).float()
    z = _to_last(zero, axis).float()
    n_groups = s.shape[-1]
    q = q[..., : n_groups * group_size].unflatten(-1, (n_groups, group_size))
    x = (q * s.unsqueeze(-1) + z.unsqueeze(-1)).flatten(-2)[..., :length]
    if dtype == torch.float16:  # saturate: a finite input never dequantizes to inf (NaN stays NaN)
        x = torch.where(x > FP16_MAX, FP16_MAX, torch.where(x < -FP16_MAX, -FP16_MAX, x))
    return _to_last(x.to(dtype), axis).contiguous()


def quantize_fp8(x: torch.Tensor):
    """fp8 e4m3fn with one fp32 scale per row of the last dim: ``scale = amax / 448``.

    Returns ``(codes float8_e4m3fn (..., D), scale fp32 (...))``; an all-zero row has scale 0, codes 0.
    A row holding NaN/inf gets a NaN/inf scale and codes 0 (it dequantizes to NaN on every backend).
    """
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = amax / FP8_MAX
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).unsqueeze(-1)
    codes = torch.clamp(xf / safe, -FP8_MAX, FP8_MAX)
    bad = (scale == 0) | ~torch.isfinite(scale)
    codes = torch.where(bad.unsqueeze(-1), torch.zeros_like(codes), codes)
    return codes.to(torch.float8_e4m3fn), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)
