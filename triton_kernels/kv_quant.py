"""Triton kernels for KIVI group quantization (int8/int4/int2) and fp8 e4m3.

Both layouts go through one kernel.  A tensor is seen as a strided 3-D view
``(R, L, C)``: ``L`` is the grouped axis, ``C`` the other axis, ``R`` the
leading dims folded together.

* ``axis=-1`` (groups of channels): ``x (M, D)`` -> ``R=1, L=D, C=M``;
* ``axis=-2`` (groups of tokens):   ``x (R, N, D)`` -> ``L=N, C=D``.

A program owns one *unit* of ``U = max(G, 32/bits)`` grouped elements (whole
groups and whole int32 words) times ``BC`` columns.  Index math: the program id
is split into (r, unit, column block) once per program in int32, the program's
base offset is one int64 scalar, and the per-element offsets inside the tile
are int32 (``IDX64`` widens them only for tiles whose extent overflows int32).

Codes follow DESIGN.md bit for bit -- ``clamp(round_half_even((x - zero) / scale), 0, QMAX)`` with
one fp32 division -- but without a per-element division: see :func:`_group_codes` for the exact
reciprocal-per-group method and its proof.  Dequantize is launched without FMA contraction so that
``q * scale + zero`` is rounded twice, like the reference.
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
def _program_coords(n_units, n_cblocks):
    """(r, unit, column block) of this program: one int32 div/mod per program, none per element."""
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    rest = pid // n_cblocks
    return rest // n_units, rest % n_units, cb


@triton.jit
def _tile_offsets(r, sr, t0, st, c0, sc, R_EXT: tl.constexpr, C_EXT: tl.constexpr, IDX64: tl.constexpr):
    """Offsets of the (R_EXT, C_EXT) tile whose first element is (slice r, row t0, column c0): the
    scalar base ``r * sr + t0 * st + c0 * sc`` in int64 once per program, and the per-element part
    ``i * st + j * sc`` in int32 (int64 only when ``IDX64``: a tile whose extent does not fit in
    int32, see :func:`_idx64`)."""
    base = r.to(tl.int64) * sr + t0.to(tl.int64) * st + c0.to(tl.int64) * sc
    i = tl.arange(0, R_EXT)
    j = tl.arange(0, C_EXT)
    if IDX64:
        i = i.to(tl.int64)
        j = j.to(tl.int64)
    return base, i[:, None] * st + j[None, :] * sc


@triton.jit
def _group_codes(x, s, z, rcp, QMAX: tl.constexpr):
    """Codes ``clamp(round_half_even(fl(fl(x - z) / s)), 0, QMAX)`` (int32), bit-identical to the
    spec's fp32 division for every finite ``x`` and every finite fp16 ``s > 0`` and ``z``, with one
    reciprocal per group (``s``, ``z`` broadcast from the group) and no division per element.

    Method.  ``d = fl(x - z)`` (the spec's rounding), ``rcp = fl(1 / s)`` once per group,
    ``q0 = fl(d * rcp)``; ``k = floor(clamp(q0, 0, QMAX - 1))``; the only rounding boundary of
    ``round_half_even`` that can separate the spec's quotient ``v = fl(d / s)`` from ``k`` / ``k + 1`` is
    ``h = k + 1/2``, and which side of it ``v`` lies on is decided *exactly* by comparing ``d`` with
    ``p = s * h``:  code ``= k + 1`` if ``d > p``, ``k + (k odd)`` if ``d == p`` (an exact tie: even),
    ``k`` if ``d < p``.  No FMA is needed, so the result does not depend on FMA contraction either
    (the Triton interpreter evaluates ``tl.fma`` as two roundings).

    Proof.  (1) ``p`` is exact: ``s`` is an fp16 value (11 significant bits) and ``h = (2k+1)/2`` with
    ``2k + 1 <= 509`` (9 bits), so ``s * h`` has at most 20 significant bits, and
    ``2**-25 <= p < 2**24``: no rounding, no underflow.  (2) ``q0`` is ``d / s`` with relative error
    ``< 2**-22.9`` (two roundings), so for ``0 <= q0 < QMAX - 1`` the true quotient lies in
    ``[k - e, k + 1 + e]`` with ``e < 2**-14``, and so does ``v`` (one more rounding): the
    nearest integer of ``v`` is ``k`` or ``k + 1``, decided by ``h``.  (3) Double rounding: ``v`` is
    ``d / s`` rounded to fp32 *before* ``round_half_even``, so ``v == h`` for every ``d / s`` within half
    an ulp ``u/2`` of ``h`` (``u = ulp(h) = 2**(E-23)``, ``2**E <= h < 2**(E+1)``), and ``v`` then
    rounds to even, not to the side of the true quotient.  This never happens for ``d != p``: write
    ``s = m 2**es`` (``1 <= m < 2``) and suppose ``0 < |d - p| <= s u/2``.  Then ``d > s 2**E >= 2**(es+E)``
    (for ``d < p`` because ``h >= 2**E + u``: ``h`` is not a power of two unless ``h = 1/2``), so
    ``ulp(d) >= 2**(es+E-23)``; ``p`` is a multiple of ``2**(es-11)``, itself a multiple of ``ulp(d)``
    (``d < 2p < 2**(es+E+2)``, ``E <= 7``), hence ``|d - p| >= ulp(d) >= 2**(es+E-23) = 2 * 2**es * u/2
    > s u/2``: a contradiction.  So ``d > p`` implies ``d / s > h + u/2``, ``v > h``: code ``k + 1``;
    ``d < p`` implies ``v < h``: code ``k``; ``d == p`` gives ``v = h`` exactly: the even of ``k, k+1``.
    (For ``h = 1/2`` -- a power of two, finer ulp below -- only ``d > p`` matters: every ``v <= 1/2``
    gives code 0.)  (4) Clamp: ``q0 < 0`` means ``d < 0 < p``, code 0 (``v < 0``); ``q0 >= QMAX - 1``
    gives ``k = QMAX - 1`` (even) and code ``QMAX`` iff ``v > QMAX - 1/2``, else ``QMAX - 1``
    (``v >= QMAX - 1 - 2**-13``).  Every case equals ``clamp(round_half_even(v), 0, QMAX)``.

    Why not the plain Newton correction ``q = fma(fma(-q0, s, d), rcp, q0)`` with ``round_half_even(q)``:
    it is within one ulp of ``v`` but equal to it only when ``d / s`` is not within ~2**-46 (relative)
    of an fp32 midpoint; by (3) the midpoints next to a half-integer are never that close (the
    distance is at least ``2**-11 u/2``), so it would also give the right codes -- but only with a
    fused ``fma`` on every backend (one rounding of ``d - q0 s``): unfused (the interpreter, a
    compiler that splits it) its error is ~2**-24 relative and codes at half-integers +- 1 ulp flip.
    The comparison above is exact with or without contraction and costs no more instructions.
    """
    d = x - z
    kf = tl.floor(tl.clamp(d * rcp, 0.0, QMAX - 1.0))  # NaN (masked-out lanes) -> a bound, never NaN
    p = s * (kf + 0.5)  # exact
    k = kf.to(tl.int32)
    up = (d > p) | ((d == p) & ((k & 1) != 0))
    return k + up.to(tl.int32)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, L, C, W, n_units, n_cblocks,
                     xsr, xst, xsc, csr, cst, csc, ssr, sst, ssc,
                     BITS: tl.constexpr, G: tl.constexpr, U: tl.constexpr, BC: tl.constexpr,
                     IDX64: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    NG: tl.constexpr = U // G
    NW: tl.constexpr = U // CPW
    QMAX: tl.constexpr = (1 << BITS) - 1
    r, u, cb = _program_coords(n_units, n_cblocks)
    t = u * U + tl.arange(0, U)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    mask = (t < L)[:, None] & cmask[None, :]
    xb, xo = _tile_offsets(r, xsr, u * U, xst, cb * BC, xsc, U, BC, IDX64)
    x = tl.load(x_ptr + xb + xo, mask=mask, other=0.0).to(tl.float32)

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
    scale_h = tl.math.div_rn(mx - mn, tl.full(mx.shape, QMAX, tl.float32)).to(tl.float16)  # per group
    g = u * NG + tl.arange(0, NG)
    gmask = (g * G < L)[:, None] & cmask[None, :]
    sb, so = _tile_offsets(r, ssr, u * NG, sst, cb * BC, ssc, NG, BC, IDX64)
    tl.store(scale_ptr + sb + so, scale_h, mask=gmask)
    tl.store(zero_ptr + sb + so, zero_h, mask=gmask)

    z = zero_h.to(tl.float32)
    s = scale_h.to(tl.float32)
    ok = (s != 0) & (tl.abs(s) < float("inf")) & (tl.abs(z) < float("inf"))  # False for NaN/inf scale or zero
    s = tl.where(ok, s, 1.0)
    z = tl.where(ok, z, 0.0)
    rcp = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)  # one correctly rounded reciprocal per group
    q = _group_codes(x3, s[:, None, :], z[:, None, :], rcp[:, None, :], QMAX)
    q = tl.where(m3 & ok[:, None, :], q, 0)
    q = tl.reshape(q.to(tl.uint32, bitcast=True), (NW, CPW, BC))
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    words = tl.sum(q << shifts[None, :, None], axis=1)  # disjoint bit fields: sum == OR
    w = u * NW + tl.arange(0, NW)
    cb_, co = _tile_offsets(r, csr, u * NW, cst, cb * BC, csc, NW, BC, IDX64)
    tl.store(codes_ptr + cb_ + co, words.to(tl.int32, bitcast=True), mask=(w < W)[:, None] & cmask[None, :])


@triton.jit
def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, L, C, n_groups, n_cblocks, xsr, csr, ssr,
                          BITS: tl.constexpr, G: tl.constexpr, BC: tl.constexpr):
    """axis=-2 with G >= 32/bits (groups of G tokens, whole words per group): one program owns one
    group of G rows (tokens) times BC contiguous columns, walked row by row as 1-D vectors -- the
    min/max and the word packing stay inside each thread (no cross-thread reduction, no layout
    conversion), loads and stores are contiguous along the columns.  Two passes over the G rows
    (min/max, then codes; the second reads the tile again from L1/L2).  Row offsets ``j * C`` are
    int32 (the host checks ``(G + CPW) * C < 2**31``), the program's base is int64."""
    CPW: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    rest = pid // n_cblocks
    g = rest % n_groups
    r = rest // n_groups
    cl = tl.arange(0, BC)
    cmask = cb * BC + cl < C
    t0 = g * G
    x_ptr += r.to(tl.int64) * xsr + t0.to(tl.int64) * C + cb * BC
    mn = tl.full((BC,), float("inf"), tl.float32)
    mx = tl.full((BC,), float("-inf"), tl.float32)
    # the group's real rows only (the tail group of a ragged N is shorter); columns past C hold
    # garbage that is never stored.  NaN-propagating min/max (min.NaN.f32): a group holding NaN gets
    # a NaN scale and zero, like the reference's amin/amax.
    for j in range(tl.minimum(L - t0, G)):
        v = tl.load(x_ptr + j * C + cl, mask=cmask, other=0.0).to(tl.float32)
        mn = tl.minimum(mn, v, propagate_nan=tl.PropagateNan.ALL)
        mx = tl.maximum(mx, v, propagate_nan=tl.PropagateNan.ALL)
    zero_h = mn.to(tl.float16)
    scale_h = tl.math.div_rn(mx - mn, tl.full(mx.shape, QMAX, tl.float32)).to(tl.float16)  # per group
    so = r.to(tl.int64) * ssr + g.to(tl.int64) * C + cb * BC + cl
    tl.store(scale_ptr + so, scale_h, mask=cmask)
    tl.store(zero_ptr + so, zero_h, mask=cmask)
    z = zero_h.to(tl.float32)
    s = scale_h.to(tl.float32)
    ok = (s != 0) & (tl.abs(s) < float("inf")) & (tl.abs(z) < float("inf"))  # False for NaN/inf scale or zero
    s = tl.where(ok, s, 1.0)
    z = tl.where(ok, z, 0.0)
    rcp = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)  # one correctly rounded reciprocal per group
    codes_ptr += r.to(tl.int64) * csr + (g * (G // CPW)).to(tl.int64) * C + cb * BC
    for w in range(G // CPW):
        word = tl.zeros((BC,), tl.uint32)
        for k in tl.static_range(CPW):
            j = w * CPW + k
            m = cmask & (t0 + j < L)
            v = tl.load(x_ptr + j * C + cl, mask=m, other=0.0).to(tl.float32)
            q = _group_codes(v, s, z, rcp, QMAX)
            q = tl.where(m & ok, q, 0)
            word = word | (q.to(tl.uint32, bitcast=True) << (k * BITS))
        tl.store(codes_ptr + w * C + cl, word.to(tl.int32, bitcast=True), mask=cmask)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, L, C, W, n_units, n_cblocks,
                       csr, cst, csc, ssr, sst, ssc, osr, ost, osc,
                       BITS: tl.constexpr, G: tl.constexpr, U: tl.constexpr, BC: tl.constexpr,
                       IDX64: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS
    NG: tl.constexpr = U // G
    NW: tl.constexpr = U // CPW
    QMAX: tl.constexpr = (1 << BITS) - 1
    r, u, cb = _program_coords(n_units, n_cblocks)
    t = u * U + tl.arange(0, U)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    w = u * NW + tl.arange(0, NW)
    cb_, co = _tile_offsets(r, csr, u * NW, cst, cb * BC, csc, NW, BC, IDX64)
    words = tl.load(codes_ptr + cb_ + co, mask=(w < W)[:, None] & cmask[None, :], other=0)
    words = words.to(tl.uint32, bitcast=True)
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    q3 = (words[:, None, :] >> shifts[None, :, None]) & QMAX
    q = tl.reshape(q3, (NG, G, BC)).to(tl.float32)
    mask = (t < L)[:, None] & cmask[None, :]
    # scale and zero: loaded once per group (not per element), broadcast over the group's G rows
    g = u * NG + tl.arange(0, NG)
    sb, so = _tile_offsets(r, ssr, u * NG, sst, cb * BC, ssc, NG, BC, IDX64)
    gmask = (g * G < L)[:, None] & cmask[None, :]
    s = tl.load(scale_ptr + sb + so, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + sb + so, mask=gmask, other=0.0).to(tl.float32)
    # launched with enable_fp_fusion=False: two roundings, like the reference
    out = tl.reshape(q * s[:, None, :] + z[:, None, :], (U, BC))
    if out_ptr.dtype.element_ty == tl.float16:  # saturate (never inf from a finite input); NaN stays NaN
        out = tl.where(out > 65504.0, 65504.0, tl.where(out < -65504.0, -65504.0, out))
    ob, oo = _tile_offsets(r, osr, u * U, ost, cb * BC, osc, U, BC, IDX64)
    tl.store(out_ptr + ob + oo, out.to(out_ptr.dtype.element_ty), mask=mask)


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


_I32_MAX = 2**31 - 1


def _idx64(unit: int, bc: int, *strides) -> bool:
    """Whether a tile's per-element offsets ``i * st + j * sc`` (``i < unit``, ``j < bc``) can
    overflow int32 for one of the (st, sc) stride pairs: then the kernel widens them to int64 (a
    tensor with a grouped or other axis of ~2**24 elements and more); the program's base offset
    is int64 in every case."""
    return any(unit * st + bc * sc > _I32_MAX for st, sc in strides)


def _check_grid(n_programs: int) -> int:
    if n_programs > _I32_MAX:
        raise ValueError(f"x: too large for one launch ({n_programs} programs of 4096 elements, at most 2**31 - 1)")
    return n_programs


def _fp_fusion_kwargs() -> dict:
    # enable_fp_fusion is a compile option of the GPU backends; the interpreter has no such option.
    import os

    return {} if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else {"enable_fp_fusion": False}


# The row-walking quantize kernel (axis=-2) runs wherever Triton compiles; under the interpreter, where
# its per-row loops cost ~1000x more than one tile operation, the tile kernel serves the test suite and
# tests/test_quant_exact.py runs this kernel on its own cases (ROWS_KERNEL_IN_INTERPRETER = True).
ROWS_KERNEL_IN_INTERPRETER = False


def _rows_kernel() -> bool:
    return ROWS_KERNEL_IN_INTERPRETER or not triton_interpreter()


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int):
    codes_shape, scale_shape = packed_shapes(x.shape, bits, group_size, axis)
    codes = new_output(codes_shape, torch.int32, x.device)
    scale = new_output(scale_shape, torch.float16, x.device)
    zero = new_output(scale_shape, torch.float16, x.device)
    (R, L, C), xs = _view3(x.shape, axis)
    _, cs = _view3(codes_shape, axis)
    _, ss = _view3(scale_shape, axis)
    W = codes_shape[-1] if axis == -1 else codes_shape[-2]
    if axis == -2 and group_size >= 32 // bits and (group_size + 32) * C <= _I32_MAX and _rows_kernel():
        # groups of tokens: the row-walking kernel (thread-local min/max and packing)
        n_groups = triton.cdiv(L, group_size)
        bc = min(1024, triton.next_power_of_2(C))
        n_cb = triton.cdiv(C, bc)
        _quantize_rows_kernel[(_check_grid(R * n_groups * n_cb),)](
            x, codes, scale, zero, L, C, n_groups, n_cb, xs[0], cs[0], ss[0], BITS=bits, G=group_size, BC=bc,
            num_warps=max(1, min(4, bc // 256)))
        return codes, scale, zero
    unit, n_units, bc, n_cb = _launch_geometry(bits, group_size, L, C)
    _quantize_kernel[(_check_grid(R * n_units * n_cb),)](
        x, codes, scale, zero, L, C, W, n_units, n_cb, *xs, *cs, *ss,
        BITS=bits, G=group_size, U=unit, BC=bc, IDX64=_idx64(unit, bc, xs[1:], cs[1:], ss[1:]))
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
    _dequantize_kernel[(_check_grid(R * n_units * n_cb),)](
        codes, scale, zero, out, L, C, W, n_units, n_cb, *cs, *ss, *os_,
        BITS=bits, G=group_size, U=unit, BC=bc, IDX64=_idx64(unit, bc, os_[1:], cs[1:], ss[1:]),
        **_fp_fusion_kwargs())
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
    row0 = tl.program_id(0) * BM  # int32 (the grid has < 2**31 programs of BM rows; M < 2**31 checked)
    rl = tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (row0 + rl < M)[:, None] & (cols < D)[None, :]
    base = row0.to(tl.int64) * D  # int64 once per program; per element int32 (BM * D < 2**31)
    off = rl[:, None] * D + cols[None, :]
    x_ptr += base
    codes_ptr += base
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
    tl.store(scale_ptr + row0 + rl, scale, mask=row0 + rl < M)


@triton.jit
def _dequantize_fp8_kernel(codes_ptr, scale_ptr, out_ptr, M, D, BM: tl.constexpr, BD: tl.constexpr,
                           NATIVE_FP8: tl.constexpr):
    row0 = tl.program_id(0) * BM
    rl = tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (row0 + rl < M)[:, None] & (cols < D)[None, :]
    base = row0.to(tl.int64) * D
    off = rl[:, None] * D + cols[None, :]
    codes_ptr += base
    out_ptr += base
    c = tl.load(codes_ptr + off, mask=mask, other=0)  # uint8 bit patterns
    if NATIVE_FP8:
        y = c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        y = _fp8_e4m3_value(c.to(tl.int32))
    s = tl.load(scale_ptr + row0 + rl, mask=row0 + rl < M, other=0.0)
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
    if M + bm > _I32_MAX or bm * bd > _I32_MAX:
        raise ValueError(f"x: {M} rows of {D} elements: the fp8 kernels need fewer than 2**31 rows and row tiles")
    return M, D, bm, bd


def quantize_fp8(x: torch.Tensor):
    codes = new_output(x.shape, torch.float8_e4m3fn, x.device)
    scale = new_output(x.shape[:-1], torch.float32, x.device)
    M, D, bm, bd = _fp8_geometry(x)
    _quantize_fp8_kernel[(_check_grid(triton.cdiv(M, bm)),)](x, codes.view(torch.uint8), scale, M, D, BM=bm, BD=bd,
                                                NATIVE_FP8=native_fp8())
    return codes, scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    out = new_output(codes.shape, dtype, codes.device)
    M, D, bm, bd = _fp8_geometry(codes)
    _dequantize_fp8_kernel[(_check_grid(triton.cdiv(M, bm)),)](codes.view(torch.uint8), scale, out, M, D, BM=bm, BD=bd,
                                                  NATIVE_FP8=native_fp8())
    return out
