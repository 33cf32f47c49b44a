"""Triton kernels for KIVI group quantization (int8/int4/int2) and fp8 e4m3.

Both layouts go through one kernel.  A tensor is seen as a strided 3-D view
``(R, L, C)``: ``L`` is the grouped axis, ``C`` the other axis, ``R`` the
leading dims folded together.

* ``axis=-1`` (groups of channels): ``x (M, D)`` -> ``R=1, L=D, C=M``;
* ``axis=-2`` (groups of tokens):   ``x (R, N, D)`` -> ``L=N, C=D``.

A program owns one *unit* of ``U = max(G, 32/bits)`` grouped elements (whole
groups and whole int32 words) times ``BC`` columns.  Arithmetic follows
DESIGN.md exactly: fp32, correctly rounded division (``div_rn``),
round-half-even (the 1.5 * 2**23 trick, exact for 0 <= v < 2**22), and no
FMA contraction in dequantize so that every backend gives the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokops._registry import new_output, triton_interpreter
from tokops.kv.layout import packed_shapes

# Globals read inside @triton.jit code must be tl.constexpr: the compiler rejects plain module globals
# ("Cannot access global variable ... from within @jit'ed function"); only the interpreter accepts them.
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds v to the nearest integer, ties to even
_FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _unit_coords(L, C, n_units, n_cblocks, U: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % n_cblocks
    rest = pid // n_cblocks
    u = rest % n_units
    r = rest // n_units
    t = u * U + tl.arange(0, U)
    c = cb * BC + tl.arange(0, BC)
    return r, u, t, c


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, L, C, W, n_units, n_cblocks,
                     xsr, xst, xsc, csr, cst, csc, ssr, sst, ssc,
                     BITS: tl.constexpr, G: tl.constexpr, U: tl.constexpr, BC: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    NG: tl.constexpr = U // G
    NW: tl.constexpr = U // CPW
    QMAX: tl.constexpr = (1 << BITS) - 1
    r, u, t, c = _unit_coords(L, C, n_units, n_cblocks, U, BC)
    cmask = c < C
    mask = (t < L)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + r * xsr + t[:, None] * xst + c[None, :] * xsc, mask=mask, other=0.0).to(tl.float32)

    x3 = tl.reshape(x, (NG, G, BC))
    m3 = tl.reshape(mask, (NG, G, BC))
    mn = tl.min(tl.where(m3, x3, float("inf")), axis=1)
    mx = tl.max(tl.where(m3, x3, float("-inf")), axis=1)
    empty = mn > mx  # a group entirely past the end (only when U > G): keep its lanes finite
    mn = tl.where(empty, 0.0, mn)
    mx = tl.where(empty, 0.0, mx)
    has_nan = tl.max(tl.where(m3 & (x3 != x3), 1, 0), axis=1) > 0  # min/max may drop NaN: propagate it
    mn = tl.where(has_nan, float("nan"), mn)
    mx = tl.where(has_nan, float("nan"), mx)
    zero_h = mn.to(tl.float16)
    scale_h = tl.math.div_rn(mx - mn, tl.full(mx.shape, QMAX, tl.float32)).to(tl.float16)
    g = u * NG + tl.arange(0, NG)
    gmask = (g * G < L)[:, None] & cmask[None, :]
    soff = r * ssr + g[:, None] * sst + c[None, :] * ssc
    tl.store(scale_ptr + soff, scale_h, mask=gmask)
    tl.store(zero_ptr + soff, zero_h, mask=gmask)

    z = zero_h.to(tl.float32)[:, None, :]
    s = scale_h.to(tl.float32)[:, None, :]
    v = tl.math.div_rn(x3 - z, tl.where(s == 0, 1.0, s))
    v = tl.minimum(tl.maximum(v, 0.0), QMAX)
    q = (v + _RNE_MAGIC) - _RNE_MAGIC
    ok = (s != 0) & (tl.abs(s) < float("inf")) & (tl.abs(z) < float("inf"))  # False for NaN/inf scale or zero
    q = tl.where(m3 & ok, q, 0.0)
    q = tl.reshape(q.to(tl.uint32), (NW, CPW, BC))
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    words = tl.sum(q << shifts[None, :, None], axis=1)  # disjoint bit fields: sum == OR
    w = u * NW + tl.arange(0, NW)
    tl.store(codes_ptr + r * csr + w[:, None] * cst + c[None, :] * csc, words.to(tl.int32, bitcast=True),
             mask=(w < W)[:, None] & cmask[None, :])


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, L, C, W, n_units, n_cblocks,
                       csr, cst, csc, ssr, sst, ssc, osr, ost, osc,
                       BITS: tl.constexpr, G: tl.constexpr, U: tl.constexpr, BC: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    NG: tl.constexpr = U // G
    NW: tl.constexpr = U // CPW
    QMAX: tl.constexpr = (1 << BITS) - 1
    r, u, t, c = _unit_coords(L, C, n_units, n_cblocks, U, BC)
    cmask = c < C
    w = u * NW + tl.arange(0, NW)
    words = tl.load(codes_ptr + r * csr + w[:, None] * cst + c[None, :] * csc,
                    mask=(w < W)[:, None] & cmask[None, :], other=0)
    words = words.to(tl.uint32, bitcast=True)
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    q3 = (words[:, None, :] >> shifts[None, :, None]) & QMAX
    q = tl.reshape(q3, (NG, G, BC)).to(tl.float32)
    mask = (t < L)[:, None] & cmask[None, :]
    # scale and zero: loaded once per group (not per element), broadcast over the group's G rows
    g = u * NG + tl.arange(0, NG)
    soff = r * ssr + g[:, None] * sst + c[None, :] * ssc
    gmask = (g * G < L)[:, None] & cmask[None, :]
    s = tl.load(scale_ptr + soff, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + soff, mask=gmask, other=0.0).to(tl.float32)
    # launched with enable_fp_fusion=False: two roundings, like the reference
    out = tl.reshape(q * s[:, None, :] + z[:, None, :], (U, BC))
    if out_ptr.dtype.element_ty == tl.float16:  # saturate (never inf from a finite input); NaN stays NaN
        out = tl.where(out > 65504.0, 65504.0, tl.where(out < -65504.0, -65504.0, out))
    tl.store(out_ptr + r * osr + t[:, None] * ost + c[None, :] * osc, out.to(out_ptr.dtype.element_ty), mask=mask)


def _view3(shape, axis: int):
    """(R, L, C) and element strides (sr, st, sc) of a contiguous tensor of ``shape``."""
    *lead, n, d = shape
    if axis == -1:
        m = n
        for s in lead:
            m *= s
        return (1, d, m), (0, 1, d)
    r = 1
    for s in lead:
        r *= s
    return (r, n, d), (n * d, d, 1)


def _launch_geometry(bits: int, group_size: int, L: int, C: int):
    cpw = 32 // bits
    unit = max(group_size, cpw)
    n_units = triton.cdiv(triton.cdiv(L, group_size) * group_size, unit)
    bc = min(max(16, 4096 // unit), triton.next_power_of_2(C))
    return unit, n_units, bc, triton.cdiv(C, bc)


def _fp_fusion_kwargs() -> dict:
    # enable_fp_fusion is a compile option of the GPU backends; the interpreter has no such option.
    import os

    return {} if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else {"enable_fp_fusion": False}


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int):
    codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
    codes = new_output(codes_shape, torch.int32, x.device)
    scale = new_output(scale_shape, torch.float16, x.device)
    zero = new_output(scale_shape, torch.float16, x.device)
    (R, L, C), xs = _view3(x.shape, axis)
    _, cs = _view3(codes_shape, axis)
    _, ss = _view3(scale_shape, axis)
    W = codes_shape[-1] if axis == -1 else codes_shape[-2]
    unit, n_units, bc, n_cb = _launch_geometry(bits, group_size, L, C)
    _quantize_kernel[(R * n_units * n_cb,)](
        x, codes, scale, zero, L, C, W, n_units, n_cb, *xs, *cs, *ss,
        BITS=bits, G=group_size, U=unit, BC=bc)
    return codes, scale, zero


def dequantize(codes, scale, zero, bits: int, group_size: int, axis: int, length: int, dtype: torch.dtype):
    *lead, a, b = codes.shape
    shape = (*lead, a, length) if axis == -1 else (*lead, length, b)
    out = new_output(shape, dtype, codes.device)
    (R, L, C), os_ = _view3(shape, axis)
    _, cs = _view3(codes.shape, axis)
    _, ss = _view3(scale.shape, axis)
    W = codes.shape[-1] if axis == -1 else codes.shape[-2]
    unit, n_units, bc, n_cb = _launch_geometry(bits, group_size, L, C)
    _dequantize_kernel[(R * n_units * n_cb,)](
        codes, scale, zero, out, L, C, W, n_units, n_cb, *cs, *ss, *os_,
        BITS=bits, G=group_size, U=unit, BC=bc, **_fp_fusion_kwargs())
    return out


@triton.jit
def _fp8_e4m3_bits(y):
    """e4m3fn bit pattern (int32 in [0, 255]) of fp32 ``y`` with ``|y| <= 448``, rounded to nearest,
    ties to even: what ``cvt.rn.satfinite.e4m3x2.f32`` (and torch's cast) gives, without the fp8
    instructions that sm_80/sm_86 lack."""
    ybits = y.to(tl.uint32, bitcast=True)
    a = tl.abs(y)
    bits = a.to(tl.uint32, bitcast=True)
    # normal (a >= 2**-6): keep 3 mantissa bits, round half to even on the 20 dropped bits
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    normal = r.to(tl.int32) - (120 << 3)  # exponent bias 127 -> 7
    # subnormal (a < 2**-6): multiples of 2**-9; a * 512 is exact, rounded half to even
    sub = ((a * 512.0 + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(a != a, 0x7F, code)  # NaN
    return code | ((ybits >> 31).to(tl.int32) << 7)


@triton.jit
def _fp8_e4m3_value(c):
    """fp32 value of e4m3fn bit patterns ``c`` (int32 in [0, 255]), without fp8 instructions."""
    e = (c >> 3) & 15
    m = c & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@triton.jit
def _quantize_fp8_kernel(x_ptr, codes_ptr, scale_ptr, M, D, BM: tl.constexpr, BD: tl.constexpr,
                         NATIVE_FP8: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    amax = tl.where(tl.max(tl.where(mask & (x != x), 1, 0), axis=1) > 0, float("nan"), amax)  # keep NaN
    scale = tl.math.div_rn(amax, tl.full(amax.shape, _FP8_MAX, tl.float32))
    y = tl.math.div_rn(x, tl.where(scale == 0, 1.0, scale)[:, None])
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    y = tl.where(((scale == 0) | ~(scale < float("inf")))[:, None], 0.0, y)  # NaN/inf scale: codes 0
    if NATIVE_FP8:
        code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        code = _fp8_e4m3_bits(y).to(tl.uint8)
    tl.store(codes_ptr + off, code, mask=mask)  # codes_ptr: the e4m3fn codes viewed as uint8
    tl.store(scale_ptr + rows, scale, mask=rows < M)


@triton.jit
def _dequantize_fp8_kernel(codes_ptr, scale_ptr, out_ptr, M, D, BM: tl.constexpr, BD: tl.constexpr,
                           NATIVE_FP8: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    c = tl.load(codes_ptr + off, mask=mask, other=0)  # uint8 bit patterns
    if NATIVE_FP8:
        y = c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        y = _fp8_e4m3_value(c.to(tl.int32))
    s = tl.load(scale_ptr + rows, mask=rows < M, other=0.0)
    tl.store(out_ptr + off, (y * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def native_fp8() -> bool:
    """Whether the GPU Triton compiles for has fp8 e4m3 conversion instructions (sm_89+).  sm_80 and
    sm_86 lack them (``fp8e4nv`` does not compile there): the fp8 kernels then take the exact
    bit-manipulation path (:func:`_fp8_e4m3_bits` / :func:`_fp8_e4m3_value`), same bits.
    Under the Triton interpreter (CPU) the exact path is taken too: the interpreter's own fp8 casts
    round some values to the wrong binade and ties away from zero (issue 15), so CPU runs of the
    Triton backend give torch's fp8 bits instead of refusing fp8; the native cast is checked by the
    compile-only kernel check (``benchmarks/kernel_check.py``) and on a GPU."""
    if triton_interpreter():
        return False
    target = triton.runtime.driver.active.get_current_target()
    return not (target.backend == "cuda" and isinstance(target.arch, int) and target.arch < 89)


def _fp8_geometry(x: torch.Tensor):
    D = x.shape[-1]
    M = x.numel() // D
    bd = triton.next_power_of_2(D)
    bm = max(1, min(64, 4096 // bd))
    return M, D, bm, bd


def quantize_fp8(x: torch.Tensor):
    codes = new_output(x.shape, torch.float8_e4m3fn, x.device)
    scale = new_output(x.shape[:-1], torch.float32, x.device)
    M, D, bm, bd = _fp8_geometry(x)
    _quantize_fp8_kernel[(triton.cdiv(M, bm),)](x, codes.view(torch.uint8), scale, M, D, BM=bm, BD=bd,
                                                NATIVE_FP8=native_fp8())
    return codes, scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    out = new_output(codes.shape, dtype, codes.device)
    M, D, bm, bd = _fp8_geometry(codes)
    _dequantize_fp8_kernel[(triton.cdiv(M, bm),)](codes.view(torch.uint8), scale, out, M, D, BM=bm, BD=bd,
                                                  NATIVE_FP8=native_fp8())
    return out
