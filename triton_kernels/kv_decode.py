"""Triton fused decode attention over a quantized KV cache (flash-decoding, ragged rows).

Three kernels:

* ``_decode_partial_kernel``, grid ``(B * H_kv, S)`` from :func:`decode_grid` (a function of the batch,
  the kv heads and the buffers' *capacities*, never of the current lengths, so that a captured CUDA
  graph replays across decode steps): program ``(bh, s)`` owns one kv head and *all* its
  ``GQ = H / H_kv`` query heads times the ``nq`` new queries (``GQ * nq`` rows of one ``tl.dot``), and
  one split of the sequence: the first ``S_q`` splits cover the quantized store (chunks of
  ``iters_q * BN`` tokens), the others the full-precision residual window.  Each row reads its own
  lengths ``n_quant[b]``, ``n_res[b]`` (int32 device tensors): splits past them run no iteration and
  store an empty partial.  Key/value tiles come straight from the packed int32 codes: each word is
  loaded once and unpacked in registers, codes become fp32 by the ``2^23`` magic (no int->float
  instruction), scale and zero are loaded once per group; when a tile lies inside one group of tokens
  (axis -2, ``G >= BN``) they are folded (KIVI): into q for keys (``(q*s).c + q.z``) and applied after
  ``p @ c`` for values; fp8 keys: the per-token scale multiplies the scores.  The whole cache is never
  dequantized into a temporary.  Online softmax in fp32 (base 2), partial ``(m, l, acc)`` per split.
* ``_merge_kernel``, one program per (b, h, query): LSE merge of the ``S`` splits (empty ones weigh 0)
  -> ``out`` (input dtype) and ``lse`` (fp32, natural log; ``-inf`` and ``out = 0`` when nothing is
  visible).
* ``_mass_kernel`` (only with ``return_mass``), grid ``(B * H_kv, key blocks of the capacity)``:
  recomputes the scores of one key block for every query head of the kv head and sums
  ``exp(s - lse)`` over the ``nq`` queries -> per-key attention mass ``(B, H, max_len)`` fp32 (0 past
  each row's length).

Causal rule among the ``nq`` new queries of row ``b``: query ``i`` sees store indices
``j <= L_b - nq + i`` with ``L_b = n_quant[b] + n_res[b]``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokops._registry import gpu_sm_count, new_output

from .kv_quant import _fp8_e4m3_value, native_fp8

# Globals read inside @triton.jit code must be tl.constexpr (the compiler rejects plain module globals).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_quant_tile(codes_ptr, scale_ptr, zero_ptr, bh, t0, end, d, dmask, c_bh, s_bh, D, WD, NGD,
                     FP8: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr, NATIVE_FP8: tl.constexpr):
    """Dequantized fp32 tile ``(BN, BD)`` of tokens ``[t0, t0 + BN)`` (``t0`` a multiple of ``BN``) of
    kv head ``bh``; zeros at tokens ``>= end``.  Each int32 word is loaded once and unpacked in
    registers (shift + mask + reshape)."""
    t = t0 + tl.arange(0, BN)
    tmask = t < end
    m2 = tmask[:, None] & dmask[None, :]
    t2 = t[:, None].to(tl.int64)
    d2 = d[None, :]
    if FP8:
        c = tl.load(codes_ptr + bh * c_bh + t2 * D + d2, mask=m2, other=0)
        s = tl.load(scale_ptr + bh * s_bh + t.to(tl.int64), mask=tmask, other=0.0)
        if NATIVE_FP8:
            x = c.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, None]
        else:  # sm_80/86: no fp8 instructions
            x = _fp8_e4m3_value(c.to(tl.int32)) * s[:, None]
    else:
        CPW: tl.constexpr = 32 // BITS
        QMAX: tl.constexpr = (1 << BITS) - 1
        shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
        if AXIS == -2:  # groups of G tokens per channel: word w holds tokens [w*CPW, (w+1)*CPW)
            NW: tl.constexpr = BN // CPW
            w = t0 // CPW + tl.arange(0, NW)
            words = tl.load(codes_ptr + bh * c_bh + w[:, None].to(tl.int64) * D + d2,
                            mask=(w * CPW < end)[:, None] & dmask[None, :], other=0)
            q3 = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & QMAX
            code = tl.reshape(q3, (BN, BD))
            soff = bh * s_bh + (t2 // G) * D + d2
        else:  # groups of G channels per token: word w of a token holds channels [w*CPW, (w+1)*CPW)
            BW: tl.constexpr = BD // CPW
            w = tl.arange(0, BW)
            words = tl.load(codes_ptr + bh * c_bh + t2 * WD + w[None, :],
                            mask=tmask[:, None] & (w < WD)[None, :], other=0)
            q3 = (words.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & QMAX
            code = tl.reshape(q3, (BN, BD))
            soff = bh * s_bh + t2 * NGD + d2 // G
        s = tl.load(scale_ptr + soff, mask=m2, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + soff, mask=m2, other=0.0).to(tl.float32)
        x = tl.where(m2, code.to(tl.float32) * s + z, 0.0)
    return x


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _code_f32(code, OFFSET: tl.constexpr):
    """Unsigned integer codes (< 2^23) as fp32 minus ``OFFSET``, exactly, without an int->float
    conversion instruction: ``(code | 0x4B000000)`` is the fp32 ``2^23 + code``."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def _words_tokens(codes_ptr, bh, c_bh, t0, end, d, dmask, D, BITS: tl.constexpr, BN: tl.constexpr,
                  BD: tl.constexpr):
    """Codes ``(BN, BD)`` (uint32) of tokens ``[t0, t0 + BN)`` of a store packed along tokens (axis -2):
    each int32 word (``32 / BITS`` tokens of one channel) is loaded once and unpacked in registers."""
    CPW: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    NW: tl.constexpr = BN // CPW
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    w = t0 // CPW + tl.arange(0, NW)
    words = tl.load(codes_ptr + bh * c_bh + w[:, None].to(tl.int64) * D + d[None, :],
                    mask=(w * CPW < end)[:, None] & dmask[None, :], other=0)
    q3 = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & QMAX
    return tl.reshape(q3, (BN, BD))


@triton.jit
def _fold_group(scale_ptr, zero_ptr, bh, s_bh, t0, d, dmask, D, BITS: tl.constexpr, G: tl.constexpr):
    """Per-channel scale and *centred* zero ``(BD,)`` fp32 of the group of tokens holding ``t0`` (axis
    -2): ``x = c * s + z = (c - 2^(b-1)) * s + (z + 2^(b-1) * s)``; the centred codes keep the folded
    products no larger than the values themselves (fp16 rounding of ``q * s`` then costs no more than
    the rounding of a dequantized key)."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    off = bh * s_bh + (t0 // G) * D + d
    sc = tl.load(scale_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    z = tl.load(zero_ptr + off, mask=dmask, other=0.0).to(tl.float32)
    return sc, z + HALF * sc


@triton.jit
def _dequant_tokens(codes_ptr, scale_ptr, zero_ptr, bh, c_bh, s_bh, t0, end, d, dmask, D, BITS: tl.constexpr,
                    G: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Dequantized fp32 tile ``(BN, BD)`` of a store grouped along tokens (axis -2), scale and zero
    loaded once per (group, channel) and broadcast over the group's tokens."""
    code = _words_tokens(codes_ptr, bh, c_bh, t0, end, d, dmask, D, BITS, BN, BD)
    if G >= BN:  # the tile lies inside one group
        off = bh * s_bh + (t0 // G) * D + d
        sc = tl.load(scale_ptr + off, mask=dmask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + off, mask=dmask, other=0.0).to(tl.float32)
        return _code_f32(code, 0.0) * sc[None, :] + z[None, :]
    else:
        NGT: tl.constexpr = BN // G
        gi = t0 // G + tl.arange(0, NGT)
        off = bh * s_bh + gi[:, None].to(tl.int64) * D + d[None, :]
        m = (gi * G < end)[:, None] & dmask[None, :]
        sc = tl.load(scale_ptr + off, mask=m, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + off, mask=m, other=0.0).to(tl.float32)
        x = tl.reshape(_code_f32(code, 0.0), (NGT, G, BD)) * sc[:, None, :] + z[:, None, :]
        return tl.reshape(x, (BN, BD))


@triton.jit
def _dequant_channels(codes_ptr, scale_ptr, zero_ptr, bh, t, tmask, d, dmask, c_bh, s_bh, WD, NGD,
                      BITS: tl.constexpr, G: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                      PACKED_D: tl.constexpr):
    """Dequantized fp32 tile ``(BN, BD)`` of a store grouped along channels (axis -1: groups of ``G``
    channels per token).  Words loaded once, unpacked in registers; with ``PACKED_D`` (``BD == D``)
    scale and zero are loaded once per (token, group) and broadcast over the group's channels."""
    CPW: tl.constexpr = 32 // BITS
    QMAX: tl.constexpr = (1 << BITS) - 1
    BW: tl.constexpr = BD // CPW
    shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)
    t2 = t[:, None].to(tl.int64)
    w = tl.arange(0, BW)
    words = tl.load(codes_ptr + bh * c_bh + t2 * WD + w[None, :], mask=tmask[:, None] & (w < WD)[None, :], other=0)
    q3 = (words.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & QMAX
    cf = _code_f32(q3, 0.0)  # (BN, BW, CPW)
    if PACKED_D:
        NG: tl.constexpr = BD // G
        gi = tl.arange(0, NG)
        soff = bh * s_bh + t2 * NGD + gi[None, :]
        sc = tl.load(scale_ptr + soff, mask=tmask[:, None], other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + soff, mask=tmask[:, None], other=0.0).to(tl.float32)
        x = tl.reshape(cf, (BN, NG, G)) * sc[:, :, None] + z[:, :, None]
        return tl.reshape(x, (BN, BD))
    else:
        m2 = tmask[:, None] & dmask[None, :]
        soff = bh * s_bh + t2 * NGD + d[None, :] // G
        sc = tl.load(scale_ptr + soff, mask=m2, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + soff, mask=m2, other=0.0).to(tl.float32)
        return tl.reshape(cf, (BN, BD)) * sc + z


@triton.jit
def _fp8_tile(codes_ptr, bh, c_bh, t, tmask, d, dmask, D, NATIVE_FP8: tl.constexpr):
    c = tl.load(codes_ptr + bh * c_bh + t[:, None].to(tl.int64) * D + d[None, :],
                mask=tmask[:, None] & dmask[None, :], other=0)
    if NATIVE_FP8:
        return c.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:  # sm_80/86: no fp8 instructions
        return _fp8_e4m3_value(c.to(tl.int32))


@triton.jit
def _quant_scores(q, kc, ks, kz, bh, t0, end, d, dmask, c_bh, s_bh, D, WD, NGD, qk_scale,
                  FP8: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr, FOLD: tl.constexpr,
                  BN: tl.constexpr, BD: tl.constexpr, PACKED_D: tl.constexpr, NATIVE_FP8: tl.constexpr,
                  DOT_DTYPE: tl.constexpr):
    """Scores ``(BM, BN)`` fp32 (base 2: times ``qk_scale``) of the fp32 queries ``q`` against quantized
    keys ``[t0, t0 + BN)`` (unmasked).  fp8: the per-token scale multiplies the scores.  Axis -2 with
    ``FOLD`` (the tile inside one group): scale and zero folded into q (KIVI):
    ``q . (c * s + z) = (q * s) . c + q . z``, the codes entering the dot as exact small integers."""
    t = t0 + tl.arange(0, BN)
    tmask = t < end
    if FP8:
        x = _fp8_tile(kc, bh, c_bh, t, tmask, d, dmask, D, NATIVE_FP8)
        sc = tl.load(ks + bh * s_bh + t.to(tl.int64), mask=tmask, other=0.0)
        return _dot(q, tl.trans(x), DOT_DTYPE) * (sc * qk_scale)[None, :]
    elif AXIS == -2:
        if FOLD:
            code = _words_tokens(kc, bh, c_bh, t0, end, d, dmask, D, BITS, BN, BD)
            HALF: tl.constexpr = 1 << (BITS - 1)
            sc, zc = _fold_group(ks, kz, bh, s_bh, t0, d, dmask, D, BITS, G)
            qs = q * (sc * qk_scale)[None, :]
            qz = tl.sum(q * zc[None, :], 1) * qk_scale
            return _dot(qs, tl.trans(_code_f32(code, HALF)), DOT_DTYPE) + qz[:, None]
        else:
            x = _dequant_tokens(kc, ks, kz, bh, c_bh, s_bh, t0, end, d, dmask, D, BITS, G, BN, BD)
            return _dot(q, tl.trans(x), DOT_DTYPE) * qk_scale
    else:
        x = _dequant_channels(kc, ks, kz, bh, t, tmask, d, dmask, c_bh, s_bh, WD, NGD, BITS, G, BN, BD, PACKED_D)
        return _dot(q, tl.trans(x), DOT_DTYPE) * qk_scale


@triton.jit
def _quant_pv(p, vc, vs, vz, bh, t0, end, d, dmask, c_bh, s_bh, D, WD, NGD,
              FP8: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, AXIS: tl.constexpr, FOLD: tl.constexpr,
              BN: tl.constexpr, BD: tl.constexpr, PACKED_D: tl.constexpr, NATIVE_FP8: tl.constexpr,
              DOT_DTYPE: tl.constexpr):
    """``p @ v`` ``(BM, BD)`` fp32 for quantized values ``[t0, t0 + BN)`` (``p`` is 0 past ``end``).
    Axis -2 with ``FOLD``: ``p @ (c * s + z) = (p @ c) * s + rowsum(p) * z`` (scale and zero applied
    once per output element instead of once per code)."""
    t = t0 + tl.arange(0, BN)
    tmask = t < end
    if FP8:
        sc = tl.load(vs + bh * s_bh + t.to(tl.int64), mask=tmask, other=0.0)
        x = _fp8_tile(vc, bh, c_bh, t, tmask, d, dmask, D, NATIVE_FP8) * sc[:, None]
        return _dot(p, x, DOT_DTYPE)
    elif AXIS == -2:
        if FOLD:
            code = _words_tokens(vc, bh, c_bh, t0, end, d, dmask, D, BITS, BN, BD)
            HALF: tl.constexpr = 1 << (BITS - 1)
            sc, zc = _fold_group(vs, vz, bh, s_bh, t0, d, dmask, D, BITS, G)
            return _dot(p, _code_f32(code, HALF), DOT_DTYPE) * sc[None, :] + tl.sum(p, 1)[:, None] * zc[None, :]
        else:
            x = _dequant_tokens(vc, vs, vz, bh, c_bh, s_bh, t0, end, d, dmask, D, BITS, G, BN, BD)
            return _dot(p, x, DOT_DTYPE)
    else:
        x = _dequant_channels(vc, vs, vz, bh, t, tmask, d, dmask, c_bh, s_bh, WD, NGD, BITS, G, BN, BD, PACKED_D)
        return _dot(p, x, DOT_DTYPE)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Online-softmax step on base-2 scores ``s`` (``-inf`` = masked): ``(m_new, l_new, p, alpha)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit(do_not_specialize=["cap_q", "cap_r", "n_qsplits", "iters_q", "iters_r", "S"])
def _decode_partial_kernel(q_ptr, kc, ks, kz, vc, vs, vz, kr, vr, m_ptr, l_ptr, acc_ptr,
                           nq_ptr, nr_ptr, cap_q, cap_r, NQ, GQ, HKV, H, qk_scale,
                           kc_bh, ks_bh, vc_bh, vs_bh, kr_bh, kr_t, vr_bh, vr_t,
                           D, K_WD, K_NGD, V_WD, V_NGD, n_qsplits, iters_q, iters_r, S,
                           FP8: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, G: tl.constexpr,
                           K_AXIS: tl.constexpr, V_AXIS: tl.constexpr, FOLD_K: tl.constexpr, FOLD_V: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           PACKED_D: tl.constexpr, NATIVE_FP8: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    n_quant = tl.minimum(tl.load(nq_ptr + b), cap_q)  # this row's lengths (clamped to the buffers)
    n_res = tl.minimum(tl.load(nr_ptr + b), cap_r)
    L = n_quant + n_res
    rows = tl.arange(0, BM)
    hh = rows // NQ
    qi = rows % NQ
    rmask = rows < GQ * NQ
    qrow = (b * H + hk * GQ + hh) * NQ + qi  # flat (b, h, i) index, int64
    d = tl.arange(0, BD)
    dmask = d < D
    q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    qf = q.to(tl.float32)
    limit = L - NQ + qi  # last store index query i may see
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    # fixed grid (capacity-sized): a split past this row's tokens runs no iteration and stores an
    # empty partial (m = -inf, l = 0), which the merge ignores
    if split < n_qsplits:
        start = split * (iters_q * BN)
        end = tl.minimum(start + iters_q * BN, n_quant)
        for j in range(0, tl.cdiv(tl.maximum(end - start, 0), BN)):
            t0 = start + j * BN
            t = t0 + tl.arange(0, BN)
            s = _quant_scores(qf, kc, ks, kz, bh, t0, end, d, dmask, kc_bh, ks_bh, D, K_WD, K_NGD, qk_scale,
                              FP8, BITS_K, G, K_AXIS, FOLD_K, BN, BD, PACKED_D, NATIVE_FP8, DOT_DTYPE)
            s = tl.where((t < end)[None, :] & (t[None, :] <= limit[:, None]), s, float("-inf"))
            m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i)
            acc = acc * alpha[:, None] + _quant_pv(p, vc, vs, vz, bh, t0, end, d, dmask, vc_bh, vs_bh, D, V_WD,
                                                   V_NGD, FP8, BITS_V, G, V_AXIS, FOLD_V, BN, BD, PACKED_D,
                                                   NATIVE_FP8, DOT_DTYPE)
    else:
        start = (split - n_qsplits) * (iters_r * BN)
        end = tl.minimum(start + iters_r * BN, n_res)
        for j in range(0, tl.cdiv(tl.maximum(end - start, 0), BN)):
            t = start + j * BN + tl.arange(0, BN)
            tmask = t < end
            m2 = tmask[:, None] & dmask[None, :]
            t2 = t[:, None].to(tl.int64)
            k = tl.load(kr + bh * kr_bh + t2 * kr_t + d[None, :], mask=m2, other=0.0)
            s = _dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
            s = tl.where(tmask[None, :] & ((n_quant + t)[None, :] <= limit[:, None]), s, float("-inf"))
            v = tl.load(vr + bh * vr_bh + t2 * vr_t + d[None, :], mask=m2, other=0.0)
            m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i)
            acc = acc * alpha[:, None] + _dot(p, v, DOT_DTYPE)
    off = qrow * S + split
    tl.store(m_ptr + off, m_i, mask=rmask)
    tl.store(l_ptr + off, l_i, mask=rmask)
    tl.store(acc_ptr + off[:, None] * D + d[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, lse_ptr, S, D, BS: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BS)
    smask = s < S
    d = tl.arange(0, BD)
    dmask = d < D
    m = tl.load(m_ptr + row * S + s, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + row * S + s, mask=smask, other=0.0)
    mx = tl.max(m, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(m - mx_safe)
    ltot = tl.sum(w * l, 0)
    acc = tl.load(acc_ptr + (row * S + s)[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :],
                  other=0.0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(ltot == 0.0, 1.0, ltot)
    lse = tl.where(ltot == 0.0, float("-inf"), (mx_safe + tl.log2(tl.where(ltot == 0.0, 1.0, ltot))) * _LN2)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=dmask)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _mass_kernel(q_ptr, kc, ks, kz, kr, lse_ptr, mass_ptr, nq_ptr, nr_ptr, cap_q, cap_r, max_len, NQ, GQ, HKV, H,
                 qk_scale,
                 kc_bh, ks_bh, kr_bh, kr_t, D, K_WD, K_NGD, n_qblocks,
                 FP8: tl.constexpr, BITS_K: tl.constexpr, G: tl.constexpr, K_AXIS: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 NATIVE_FP8: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    n_quant = tl.minimum(tl.load(nq_ptr + b), cap_q)
    n_res = tl.minimum(tl.load(nr_ptr + b), cap_r)
    L = n_quant + n_res
    d = tl.arange(0, BD)
    dmask = d < D
    if blk < n_qblocks:
        t = blk * BN + tl.arange(0, BN)
        tmask = t < n_quant
        k = _load_quant_tile(kc, ks, kz, bh, blk * BN, n_quant, d, dmask, kc_bh, ks_bh, D, K_WD, K_NGD,
                             FP8, BITS_K, G, K_AXIS, BN, BD, NATIVE_FP8)
        pos = t
    else:
        t = (blk - n_qblocks) * BN + tl.arange(0, BN)
        tmask = t < n_res
        k = tl.load(kr + bh * kr_bh + t[:, None].to(tl.int64) * kr_t + d[None, :],
                    mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        pos = n_quant + t
    qi = tl.arange(0, BQ)
    qmask = qi < NQ
    limit = L - NQ + qi
    valid = qmask[:, None] & tmask[None, :] & (pos[None, :] <= limit[:, None])
    for hh in range(0, GQ):
        qrow = (b * H + hk * GQ + hh) * NQ + qi
        q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
        lse2 = tl.load(lse_ptr + qrow, mask=qmask, other=0.0) * _LOG2E
        s = _dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        mass = tl.sum(p, 0)
        tl.store(mass_ptr + (b * H + hk * GQ + hh) * max_len + pos, mass, mask=tmask & (pos < max_len))


_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _target_programs(device) -> int:
    sms = gpu_sm_count(device)
    if sms is not None:
        return 2 * sms
    return int(os.environ.get("TOKOPS_KV_DECODE_CPU_PROGRAMS", "16"))


def _store_capacity(codes, scale, fp8: bool, bits: int, G: int, axis: int) -> int:
    if fp8 or axis == -1:
        return codes.shape[2]
    return min(codes.shape[2] * 32 // bits, scale.shape[2] * G) // G * G


def decode_grid(B: int, HKV: int, cap_q: int, cap_r: int, device) -> dict:
    """The launch configuration of the split kernel for buffers of ``cap_q`` quantized and ``cap_r``
    residual tokens: a function of (B, H_kv, capacities, device) only, never of the current lengths,
    so that one captured CUDA graph replays across decode steps (splits past a row's tokens exit at
    once; the merge skips empty splits).  Returns ``BN``, ``iters_q``/``qsplits`` (quantized store:
    ``qsplits`` chunks of ``iters_q * BN`` tokens), ``iters_r``/``rsplits`` (residual window) and
    ``grid = (B * H_kv, qsplits + rsplits)``."""
    interp = gpu_sm_count(device) is None
    BN = 32 if interp else 64
    n_qblocks = triton.cdiv(cap_q, BN)
    if n_qblocks:
        want = max(1, triton.cdiv(_target_programs(device), B * HKV))
        iters_q = triton.cdiv(n_qblocks, min(n_qblocks, want))
        qsplits = triton.cdiv(n_qblocks, iters_q)
    else:
        iters_q, qsplits = 1, 0
    iters_r = max(1, min(triton.cdiv(cap_r, BN), 256 // BN))
    rsplits = triton.cdiv(cap_r, iters_r * BN)
    return dict(BN=BN, iters_q=iters_q, qsplits=qsplits, iters_r=iters_r, rsplits=rsplits,
                grid=(B * HKV, max(1, qsplits + rsplits)))


def decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, n_quant, n_res,
                     max_len: int, mode: str, bits_k: int, bits_v: int, group_size: int, key_axis: int,
                     value_axis: int, scale: float, return_mass: bool):
    B, H, NQ, D = q.shape
    HKV = k_res.shape[1]
    GQ = H // HKV
    dev = q.device
    out = new_output((B, H, NQ, D), q.dtype, dev)
    lse = new_output((B, H, NQ), torch.float32, dev)
    mass = new_output((B, H, max_len if return_mass else 0), torch.float32, dev)
    fp8 = mode == "fp8"
    if fp8:  # unused by the kernel; any pointer will do
        k_zero, v_zero = k_scale, v_scale
    cap_q = min(_store_capacity(k_codes, k_scale, fp8, bits_k, group_size, key_axis),
                _store_capacity(v_codes, v_scale, fp8, bits_v, group_size, value_axis))
    cap_r = k_res.shape[2]
    cfg = decode_grid(B, HKV, cap_q, cap_r, dev)
    BN = cfg["BN"]
    # a tile inside one group of tokens (axis -2, G >= BN): its scale and zero are folded into q (keys)
    # or applied after p @ codes (values); smaller groups: dequantized with one scale/zero load per
    # (group, channel).  (Shrinking the tile to G to fold anyway costs more per token than it saves:
    # benchmarks/loop_sass.py.)
    fold = group_size % BN == 0
    interp = gpu_sm_count(dev) is None
    BD = max(16, triton.next_power_of_2(D))
    BM = max(16, triton.next_power_of_2(GQ * NQ))
    dot = _DOT[q.dtype]
    S = cfg["grid"][1]
    m_part = torch.empty((B, H, NQ, S), dtype=torch.float32, device=dev)
    l_part = torch.empty((B, H, NQ, S), dtype=torch.float32, device=dev)
    acc_part = torch.empty((B, H, NQ, S, D), dtype=torch.float32, device=dev)
    k_wd = D * bits_k // 32 if not fp8 else D
    v_wd = D * bits_v // 32 if not fp8 else D
    qk_scale = scale * _LOG2E.value
    common = dict(FP8=fp8, G=group_size, DOT_DTYPE=dot, BN=BN, BD=BD, NATIVE_FP8=not fp8 or native_fp8())
    _decode_partial_kernel[cfg["grid"]](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, m_part, l_part, acc_part,
        n_quant, n_res, cap_q, cap_r, NQ, GQ, HKV, H, qk_scale,
        k_codes.stride(1), k_scale.stride(1), v_codes.stride(1), v_scale.stride(1),
        k_res.stride(1), k_res.stride(2), v_res.stride(1), v_res.stride(2),
        D, k_wd, D // group_size, v_wd, D // group_size, cfg["qsplits"], cfg["iters_q"], cfg["iters_r"], S,
        BITS_K=bits_k, BITS_V=bits_v, K_AXIS=key_axis, V_AXIS=value_axis, BM=BM, PACKED_D=BD == D,
        FOLD_K=fold and key_axis == -2, FOLD_V=fold and value_axis == -2,
        # 8 warps: two dequantized (BN, BD) fp32 tiles live at once; with 4 warps the kernel sits at
        # 255 registers and spills on sm_80 (benchmarks/kernel_check.py)
        num_warps=4 if interp else 8, **common)
    _merge_kernel[(B * H * NQ,)](m_part, l_part, acc_part, out, lse, S, D,
                                 BS=max(2, triton.next_power_of_2(S)), BD=BD)
    if return_mass and max_len:
        mass.zero_()  # entries past a row's length stay 0
        n_qblocks = triton.cdiv(cap_q, BN)
        n_rblocks = triton.cdiv(cap_r, BN)
        _mass_kernel[(B * HKV, max(1, n_qblocks + n_rblocks))](
            q, k_codes, k_scale, k_zero, k_res, lse, mass, n_quant, n_res, cap_q, cap_r, max_len, NQ, GQ, HKV, H,
            qk_scale, k_codes.stride(1), k_scale.stride(1), k_res.stride(1), k_res.stride(2), D, k_wd,
            D // group_size, n_qblocks, BITS_K=bits_k, K_AXIS=key_axis, BQ=max(16, triton.next_power_of_2(NQ)),
            **common)
    return out, lse, mass


__all__ = ["decode_attention", "decode_grid"]
