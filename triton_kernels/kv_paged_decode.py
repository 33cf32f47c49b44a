"""Triton decode attention over a paged quantized KV cache (flash-decoding over pages).

Layout and rules: ``python/tokops/kv/paged.py`` (``PagedKVCache``).  Three kernels:

* ``_paged_partial_kernel``, grid ``(B * H_kv, S_q + 1)`` -- fixed by ``(B, H_kv, max_pages_per_row)``
  and the SM count, never by the lengths' values (a CUDA graph can replay it): program ``(bh, s)``
  owns one kv head with all its ``GQ = H / H_kv`` query heads times the ``nq`` new queries (the rows
  of one ``tl.dot``).  Splits ``s < S_q`` cover block-table columns ``[s * PPS, (s + 1) * PPS)`` of
  the row (clipped to the row's ``ceil(n_quant / P)`` pages, read from ``lengths`` on the device;
  a split past them writes an empty partial); each page id is read from the block table and its
  key/value tiles are dequantized in registers from the packed codes + fp16 scales/zeros (or fp8
  codes + fp32 per-token scales).  The last split covers the full-precision residual ring.  Online
  softmax in fp32 (base 2), partial ``(m, l, acc)`` per split.
* ``kv_decode._merge_kernel`` (shared): LSE merge of the splits -> ``out`` (q's dtype), ``lse`` (fp32, natural log).
* ``_paged_mass_kernel`` (``return_mass``), grid ``(B * H_kv, ceil(T / BN))``: per-key mass by token
  position, ``T = max_pages_per_row * P + R + G``; 0 at positions past the row's length.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokops._registry import gpu_sm_count, new_output

# shared with the contiguous decode; a page's tile is the contiguous tile at base offsets (bh=1,
# c_bh/s_bh = the page's offsets), every token of it in the page (end = off + BN)
from .kv_decode import _dot, _load_quant_tile, _merge_kernel, _softmax_step
from .kv_quant import _fp8_e4m3_value, native_fp8

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _online_update(s, v, m_i, l_i, acc, DOT_DTYPE: tl.constexpr):
    m_new, l_i, p, alpha = _softmax_step(s, m_i, l_i)
    return m_new, l_i, acc * alpha[:, None] + _dot(p, v, DOT_DTYPE)

@triton.jit
def _paged_partial_kernel(q_ptr, kc, ks, kz, vc, vs, vz, kr, vr, bt_ptr, len_ptr, m_ptr, l_ptr, acc_ptr,
                          NQ, GQ, HKV, H, qk_scale, R, RC, bt_b, MPP,
                          kc_p, kc_h, ks_p, ks_h, vc_p, vc_h, vs_p, vs_h, kr_b, kr_h, vr_b, vr_h,
                          D, K_WD, V_WD, NGD, PPS, S_Q, S,
                          FP8: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr, G: tl.constexpr,
                          P: tl.constexpr, DOT_DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr, NATIVE_FP8: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    rows = tl.arange(0, BM)
    hh = rows // NQ
    qi = rows % NQ
    rmask = rows < GQ * NQ
    qrow = (b * H + hk * GQ + hh) * NQ + qi  # flat (b, h, i), int64
    d = tl.arange(0, BD)
    dmask = d < D
    q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    L = tl.load(len_ptr + b)
    nqt = G * (tl.maximum(L - R, 0) // G)  # the residual rule: tokens held in pages
    limit = L - NQ + qi  # last position query i may see
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    TPP: tl.constexpr = P // BN
    if split < S_Q:
        npages = tl.minimum((nqt + P - 1) // P, MPP)  # never past the block table
        c0 = split * PPS
        c1 = tl.minimum(c0 + PPS, npages)
        n_it = tl.maximum(c1 - c0, 0) * TPP
        for it in range(0, n_it):
            col = c0 + it // TPP
            off = (it % TPP) * BN
            page = tl.load(bt_ptr + b * bt_b + col).to(tl.int64)
            t = col * P + off + tl.arange(0, BN)
            tmask = t < nqt
            k = _load_quant_tile(kc, ks, kz, 1, off, off + BN, d, dmask, page * kc_p + hk * kc_h,
                                 page * ks_p + hk * ks_h, D, K_WD, NGD, FP8, BITS_K, G, -1 if FP8 else -2,
                                 BN, BD, NATIVE_FP8)
            s = _dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
            s = tl.where(tmask[None, :] & (t[None, :] <= limit[:, None]), s, float("-inf"))
            v = _load_quant_tile(vc, vs, vz, 1, off, off + BN, d, dmask, page * vc_p + hk * vc_h,
                                 page * vs_p + hk * vs_h, D, V_WD, NGD, FP8, BITS_V, G, -1, BN, BD, NATIVE_FP8)
            v = tl.where(tmask[:, None], v, 0.0)  # a stale token past the row's end never reaches acc
            m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, DOT_DTYPE)
    else:  # the residual ring: positions [nqt, L), position p in slot p % RC
        n_it = (L - nqt + BN - 1) // BN
        for it in range(0, n_it):
            t = nqt + it * BN + tl.arange(0, BN)
            tmask = t < L
            m2 = tmask[:, None] & dmask[None, :]
            slot = (t % RC).to(tl.int64)[:, None]
            k = tl.load(kr + b * kr_b + hk * kr_h + slot * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            s = _dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
            s = tl.where(tmask[None, :] & (t[None, :] <= limit[:, None]), s, float("-inf"))
            v = tl.load(vr + b * vr_b + hk * vr_h + slot * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, DOT_DTYPE)
    off_o = qrow * S + split
    tl.store(m_ptr + off_o, m_i, mask=rmask)
    tl.store(l_ptr + off_o, l_i, mask=rmask)
    tl.store(acc_ptr + off_o[:, None] * D + d[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _paged_mass_kernel(q_ptr, kc, ks, kz, kr, bt_ptr, len_ptr, lse_ptr, mass_ptr, NQ, GQ, HKV, H, qk_scale, R, RC,
                       bt_b, T, MPP, kc_p, kc_h, ks_p, ks_h, kr_b, kr_h, D, K_WD, NGD,
                       FP8: tl.constexpr, BITS_K: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                       NATIVE_FP8: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    d = tl.arange(0, BD)
    dmask = d < D
    L = tl.load(len_ptr + b)
    nqt = G * (tl.maximum(L - R, 0) // G)
    p0 = blk * BN
    t = p0 + tl.arange(0, BN)
    # quantized part (zeros when the block holds no quantized token: page 0 is read and discarded)
    col = tl.minimum(p0 // P, MPP - 1)
    page = tl.load(bt_ptr + b * bt_b + col, mask=p0 < nqt, other=0).to(tl.int64)
    off = p0 % P
    kq = _load_quant_tile(kc, ks, kz, 1, off, off + BN, d, dmask, page * kc_p + hk * kc_h,
                          page * ks_p + hk * ks_h, D, K_WD, NGD, FP8, BITS_K, G, -1 if FP8 else -2,
                          BN, BD, NATIVE_FP8)
    rmask = (t >= nqt) & (t < L)
    slot = (t % RC).to(tl.int64)[:, None]
    krr = tl.load(kr + b * kr_b + hk * kr_h + slot * D + d[None, :], mask=rmask[:, None] & dmask[None, :],
                  other=0.0).to(tl.float32)
    k = tl.where((t < nqt)[:, None], kq, krr)
    qi = tl.arange(0, BQ)
    qmask = qi < NQ
    limit = L - NQ + qi
    valid = qmask[:, None] & (t < L)[None, :] & (t[None, :] <= limit[:, None])
    for hh in range(0, GQ):
        qrow = (b * H + hk * GQ + hh) * NQ + qi
        q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
        lse2 = tl.load(lse_ptr + qrow, mask=qmask, other=0.0) * _LOG2E
        s = _dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        mass = tl.sum(p, 0)
        tl.store(mass_ptr + (b * H + hk * GQ + hh) * T + t, mass, mask=t < T)


_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _target_programs(device) -> int:
    sms = gpu_sm_count(device)
    if sms is not None:
        return 2 * sms
    return int(os.environ.get("TOKOPS_KV_DECODE_CPU_PROGRAMS", "16"))


def num_page_splits(B: int, HKV: int, max_pages: int, device) -> tuple[int, int]:
    """``(S_q, pages per split)``: from the shapes and the SM count only (never the lengths)."""
    want = max(1, triton.cdiv(_target_programs(device), B * HKV))
    pps = triton.cdiv(max_pages, min(max_pages, want))
    return triton.cdiv(max_pages, pps), pps


def paged_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, block_table,
                           lengths, residual: int, mode: str, bits_k: int, bits_v: int, group_size: int,
                           scale: float, return_mass: bool):
    B, H, NQ, D = q.shape
    HKV = k_res.shape[1]
    GQ = H // HKV
    NP, P = v_codes.shape[0], v_codes.shape[2]
    MPP = block_table.shape[1]
    RC = k_res.shape[2]
    T = MPP * P + RC
    dev = q.device
    out = new_output((B, H, NQ, D), q.dtype, dev)
    lse = new_output((B, H, NQ), torch.float32, dev)
    mass = new_output((B, H, T if return_mass else 0), torch.float32, dev)
    fp8 = mode == "fp8"
    if fp8:  # unused by the kernels; any pointer will do
        k_zero, v_zero = k_scale, v_scale
    interp = gpu_sm_count(dev) is None
    cap = 32 if interp else 64
    BN = next(b for b in (64, 32, 16) if b <= cap and P % b == 0)
    BD = max(16, triton.next_power_of_2(D))
    BM = max(16, triton.next_power_of_2(GQ * NQ))
    dot = _DOT[q.dtype]
    S_Q, PPS = num_page_splits(B, HKV, MPP, dev)
    S = S_Q + 1
    m_part = torch.empty((B, H, NQ, S), dtype=torch.float32, device=dev)
    l_part = torch.empty((B, H, NQ, S), dtype=torch.float32, device=dev)
    acc_part = torch.empty((B, H, NQ, S, D), dtype=torch.float32, device=dev)
    k_wd = D if fp8 else D * bits_k // 32
    v_wd = D if fp8 else D * bits_v // 32
    qk_scale = scale * _LOG2E.value
    common = dict(FP8=fp8, G=group_size, P=P, DOT_DTYPE=dot, BN=BN, BD=BD, NATIVE_FP8=not fp8 or native_fp8())
    _paged_partial_kernel[(B * HKV, S)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, block_table, lengths,
        m_part, l_part, acc_part, NQ, GQ, HKV, H, qk_scale, residual, RC, block_table.stride(0), MPP,
        k_codes.stride(0), k_codes.stride(1), k_scale.stride(0), k_scale.stride(1),
        v_codes.stride(0), v_codes.stride(1), v_scale.stride(0), v_scale.stride(1),
        k_res.stride(0), k_res.stride(1), v_res.stride(0), v_res.stride(1),
        D, k_wd, v_wd, D // group_size, PPS, S_Q, S, BITS_K=bits_k, BITS_V=bits_v, BM=BM,
        num_warps=4 if interp else 8, **common)
    _merge_kernel[(B * H * NQ,)](m_part, l_part, acc_part, out, lse, S, D,
                                       BS=max(2, triton.next_power_of_2(S)), BD=BD)
    if return_mass:
        _paged_mass_kernel[(B * HKV, triton.cdiv(T, BN))](
            q, k_codes, k_scale, k_zero, k_res, block_table, lengths, lse, mass, NQ, GQ, HKV, H, qk_scale,
            residual, RC, block_table.stride(0), T, MPP, k_codes.stride(0), k_codes.stride(1), k_scale.stride(0),
            k_scale.stride(1), k_res.stride(0), k_res.stride(1), D, k_wd, D // group_size, BITS_K=bits_k,
            BQ=max(16, triton.next_power_of_2(NQ)), **common)
    return out, lse, mass


__all__ = ["paged_decode_attention", "num_page_splits"]
