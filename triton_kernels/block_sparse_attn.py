"""Triton block-sparse flash attention: forward, backward (dQ / dK dV dbias) and per-key mass.

* Forward (query-block-major): one program per ``(BM query rows, b*h)``; it walks only the
  ``kv_num_blocks[b,h,i]`` key blocks listed in ``kv_indices[b,h,i,:]`` of its mask block ``i``,
  each in ``block_k / BN`` sub-tiles (the kernel tile may be smaller than the mask block), with an
  online softmax in base 2.  Ragged tails are masked loads; ``causal`` masks ``j > i + Nk - Nq``
  inside any tile that crosses the diagonal and skips tiles entirely above it.  Rows that never see
  an allowed key write ``out = 0`` and ``lse = -inf``.
* Backward: ``delta = rowsum(dO * O) - dlse`` (preprocess kernel), then a query-major dQ kernel
  (same walk as the forward) and a key-major dK/dV/dbias kernel walking the *transposed* mask
  (query blocks of each key block, built in Python from the CSR mask).  A dK/dV program owns one
  KV head and loops over the query heads of its GQA group, so no atomics are needed.
* Key mass: the dV pass with ``dO = 1``: ``mass[b,h,j] = sum_i exp(s_ij - lse_i)``.
* Varlen (packed sequences, FlashAttention's ``cu_seqlens`` convention; ``VARLEN=True``): the same
  kernels, with ``b`` the sequence: ``q (total_q, H, D)`` / ``k, v (total_k, H_kv, D)`` are addressed
  with batch stride 0 from the sequence's start row ``cu_seqlens[b]`` (read on the device, clamped to
  the packed tensors and to ``max_seqlen``: bad ``cu_seqlens`` are never an out-of-bounds access), the
  per-sequence lengths replace ``Nq``/``Nk`` (ragged tails masked, causal bottom-right per sequence),
  the grids cover ``max_seqlen`` (tiles past a shorter sequence's end walk nothing), and the row
  statistics (lse, delta, dbias, mass) are ``(H, total)``.  The flat loops are unchanged (pipelined).

Mask bound checks (the mask values are validated on the host only in eager mode with
``check_mask=True``): every kernel clamps a block count to ``[0, nBlocks]`` and skips a block index
outside ``[0, nBlocks)`` -- it is never read, never a crash.  Repeated blocks in a row are removed
by the Python wrapper (:func:`tokops.attention.masks.canonical_csr`) before the kernels run when the
values were not validated; the kernels themselves assume distinct indices.

Accumulation is fp32; the probability tile is cast to the input dtype for the P@V / dS@K
products (as FlashAttention does).  fp32 inputs use IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokops._registry import gpu_sm_count, new_output, triton_interpreter

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _seq_bounds(Cu, b, total, max_len):
    """Start (int64) and length of packed sequence ``b`` from ``cu_seqlens``: clamped to
    ``[0, total]``, non-decreasing and at most ``max_len`` long, so that even bad ``cu_seqlens``
    (their values are not checked on the host: that would sync) never make a kernel read or write
    outside the packed tensors."""
    lo = tl.minimum(tl.maximum(tl.load(Cu + b), 0), total)
    hi = tl.minimum(tl.maximum(tl.load(Cu + b + 1), lo), total)
    return lo.to(tl.int64), tl.minimum(hi - lo, max_len)


@triton.jit
def _row0(bh, h, N, start, total, VARLEN: tl.constexpr):
    """First element of (batch b, head h) -- ``bh = b * H + h`` -- in a row-statistics tensor (lse,
    delta, dbias, mass): padded ``(B, H, N)``, varlen ``(H, total)`` (``start`` = the sequence's first
    row)."""
    if VARLEN:
        r = h * total + start
    else:
        r = bh.to(tl.int64) * N
    return r


@triton.jit
def _row_clamp(n_blocks, n_row, VARLEN: tl.constexpr):
    """The bound of a mask row's block count: the row's length (varlen: the sequence's own block count
    is smaller than the row of the max_seqlen grid); padded: the two are equal."""
    if VARLEN:
        r = n_row
    else:
        r = n_blocks
    return r


@triton.jit
def _logits(q, kT, bias_ptrs, offs_m, offs_n, Nq, Nk, causal_off, qk_scale,
            CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """Base-2 logits of a (BM, BN) tile with -inf where not allowed."""
    s = tl.dot(q, kT, input_precision=PREC) * qk_scale
    nmask = offs_n < Nk
    if HAS_BIAS:
        bias = tl.load(bias_ptrs, mask=nmask, other=0.0)
        s += bias[None, :] * 1.4426950408889634
    valid = nmask[None, :] & (offs_m < Nq)[:, None]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _fwd_kernel(Q, K, V, Bias, Out, Lse, KVN, KVI, PAcc, PM, PL, CuQ, CuK,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                sbb, sbh, snb, snh, snq, sib, sih, siq,
                H, GROUP, Nq, Nk, D, TQ, TK, n_kb_row, qk_scale, per_split, RN,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                SPLIT: tl.constexpr, VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    if VARLEN:  # b is the packed sequence: its rows start at q0 / k0 (the batch strides are 0)
        q0, Nq = _seq_bounds(CuQ, b, TQ, Nq)
        k0, Nk = _seq_bounds(CuK, b, TK, Nk)
    else:
        q0 = 0
        k0 = 0
    causal_off = Nk - Nq  # bottom-right causal alignment, per sequence
    qblk = (pid_m * BM) // BLOCK_Q
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + q0 * sqn + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m < Nq)[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    kbase = K + b * skb + hk * skh + k0 * skn
    vbase = V + b * svb + hk * svh + k0 * svn
    bbase = Bias + b * sbb + h * sbh + k0
    lim_n = Nk
    if CAUSAL:
        lim_n = pid_m * BM + BM - 1 + causal_off  # last key any row of this tile may see
    n_kb = tl.cdiv(Nk, BLOCK_K)
    # bound check: the count is clamped to the mask row's length (n_kb_row = nK of the mask)
    nblk = tl.minimum(tl.maximum(tl.load(KVN + b * snb + h * snh + qblk * snq), 0),
                      _row_clamp(n_kb, n_kb_row, VARLEN))
    if VARLEN:  # a query tile past the end of its (shorter) sequence walks nothing
        nblk = tl.where(pid_m * BM < Nq, nblk, 0)
    t_lo = split * per_split
    t_hi = tl.minimum(nblk, t_lo + per_split)
    kvi = KVI + b * sib + h * sih + qblk * siq
    # One flat loop over (listed key block, sub-tile) with the loads at its top level: Triton
    # software-pipelines it (async copies, num_stages buffers).  A sub-tile entirely above the
    # causal diagonal is not skipped by an `if` (that would stop the pipelining): its loads are
    # masked off (no memory traffic) and its logits are all -inf (p = 0, alpha = 1).
    SUBS: tl.constexpr = BLOCK_K // BN
    for it in range(t_lo * SUBS, t_hi * SUBS):
        kb = tl.load(kvi + it // SUBS)
        # bound check: an out-of-range block index (or, varlen, a block past the end of this
        # sequence's keys) becomes the sentinel n_kb, whose keys all lie past Nk (loads masked off,
        # logits -inf): never read, whatever the index
        kb = tl.where((kb >= 0) & (kb < n_kb), kb, n_kb)
        start_n = kb * BLOCK_K + (it % SUBS) * BN
        offs_n = start_n + tl.arange(0, BN)
        nmask = (offs_n < Nk) & (start_n <= lim_n)
        kT = tl.load(kbase + offs_n[None, :] * skn + offs_d[:, None],
                     mask=nmask[None, :] & dmask[:, None], other=0.0)
        v = tl.load(vbase + offs_n[:, None] * svn + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = _logits(q, kT, bbase + offs_n, offs_m, offs_n, Nq, Nk, causal_off, qk_scale,
                    CAUSAL, HAS_BIAS, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    mmask = offs_m < Nq
    lrow = _row0(bh, h, Nq, q0, TQ, VARLEN)  # this (sequence, head)'s first row in the LSE layout
    if SPLIT:  # flash-decoding: partial (acc, m, l) per split, merged by _combine_kernel
        if VARLEN:  # RN = rows of one split's partials (H * total_q)
            row = split.to(tl.int64) * RN + lrow + offs_m
        else:  # RN = B * H
            row = (split * RN + bh).to(tl.int64) * Nq + offs_m
        tl.store(PAcc + row[:, None] * BD + offs_d[None, :], acc, mask=mmask[:, None])
        tl.store(PM + row, m_i, mask=mmask)
        tl.store(PL + row, l_i, mask=mmask)
    else:
        _finish(acc, m_i, l_i, Out + b * sob + h * soh + q0 * son, Lse + lrow, offs_m, offs_d, son, Nq, D)


@triton.jit
def _finish(acc, m_i, l_i, out_ptr, lse_ptr, offs_m, offs_d, son, Nq, D):
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    mmask = offs_m < Nq
    tl.store(out_ptr + offs_m[:, None] * son + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & (offs_d < D)[None, :])
    tl.store(lse_ptr + offs_m, lse, mask=mmask)


@triton.jit
def _combine_kernel(PAcc, PM, PL, Out, Lse, CuQ, sob, soh, son, H, RN, Nq, D, TQ, n_splits,
                    BM: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if VARLEN:
        q0, Nq = _seq_bounds(CuQ, b, TQ, Nq)
    else:
        q0 = 0
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    mmask = offs_m < Nq
    lrow = _row0(bh, h, Nq, q0, TQ, VARLEN)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for sp in range(0, n_splits):
        if VARLEN:
            row = sp * RN + lrow + offs_m
        else:
            row = (sp * RN + bh).to(tl.int64) * Nq + offs_m
        m_s = tl.load(PM + row, mask=mmask, other=float("-inf"))
        l_s = tl.load(PL + row, mask=mmask, other=0.0)
        a_s = tl.load(PAcc + row[:, None] * BD + offs_d[None, :], mask=mmask[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        beta = tl.exp2(m_s - m_sub)
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    _finish(acc, m_i, l_i, Out + b * sob + h * soh + q0 * son, Lse + lrow, offs_m, offs_d, son, Nq, D)


@triton.jit
def _delta_kernel(O, DO, Delta, soh, son, sdh, sdn, Nq, D, BM: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    mask = (offs_m < Nq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + bh * soh + offs_m[:, None] * son + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + bh * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + bh * Nq + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit
def _bwd_dq_kernel(Q, K, V, Bias, DO, Lse, Delta, DQ, KVN, KVI, CuQ, CuK,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   sbb, sbh, snb, snh, snq, sib, sih, siq,
                   H, GROUP, Nq, Nk, D, TQ, TK, n_kb_row, qk_scale, scale,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    if VARLEN:  # b is the packed sequence (see _fwd_kernel)
        q0, Nq = _seq_bounds(CuQ, b, TQ, Nq)
        k0, Nk = _seq_bounds(CuK, b, TK, Nk)
    else:
        q0 = 0
        k0 = 0
    causal_off = Nk - Nq
    qblk = (pid_m * BM) // BLOCK_Q
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    mmask = offs_m < Nq
    qd_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + q0 * sqn + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + q0 * sdn + offs_m[:, None] * sdn + offs_d[None, :], mask=qd_mask,
                 other=0.0)
    lrow = _row0(bh, h, Nq, q0, TQ, VARLEN)
    lse = tl.load(Lse + lrow + offs_m, mask=mmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + lrow + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    kbase = K + b * skb + hk * skh + k0 * skn
    vbase = V + b * svb + hk * svh + k0 * svn
    bbase = Bias + b * sbb + h * sbh + k0
    lim_n = Nk
    if CAUSAL:
        lim_n = pid_m * BM + BM - 1 + causal_off  # last key any row of this tile may see
    n_kb = tl.cdiv(Nk, BLOCK_K)
    nblk = tl.minimum(tl.maximum(tl.load(KVN + b * snb + h * snh + qblk * snq), 0),
                      _row_clamp(n_kb, n_kb_row, VARLEN))  # bound check
    if VARLEN:
        nblk = tl.where(pid_m * BM < Nq, nblk, 0)
    kvi = KVI + b * sib + h * sih + qblk * siq
    SUBS: tl.constexpr = BLOCK_K // BN
    for it in range(0, nblk * SUBS):  # flat, loads at top level: pipelined (see _fwd_kernel)
        kb = tl.load(kvi + it // SUBS)
        # bound check: an out-of-range block index becomes the sentinel n_kb, whose keys all lie past Nk
        # (loads masked off, logits -inf): never read, whatever the index
        kb = tl.where((kb >= 0) & (kb < n_kb), kb, n_kb)
        start_n = kb * BLOCK_K + (it % SUBS) * BN
        offs_n = start_n + tl.arange(0, BN)
        nd_mask = ((offs_n < Nk) & (start_n <= lim_n))[None, :] & dmask[:, None]
        kT = tl.load(kbase + offs_n[None, :] * skn + offs_d[:, None], mask=nd_mask, other=0.0)
        vT = tl.load(vbase + offs_n[None, :] * svn + offs_d[:, None], mask=nd_mask, other=0.0)
        s = _logits(q, kT, bbase + offs_n, offs_m, offs_n, Nq, Nk, causal_off, qk_scale,
                    CAUSAL, HAS_BIAS, PREC)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
    tl.store(DQ + b * sqb + h * sqh + q0 * sqn + offs_m[:, None] * sqn + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Bias, DO, Lse, Delta, DK, DV, DBias, QN, QI, CuQ, CuK,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     sbb, sbh, snb, snh, snk, sib, sih, sik,
                     H, HKV, GROUP, Nq, Nk, D, TQ, TK, n_qb_row, qk_scale, scale,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     VARLEN: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    if VARLEN:  # b is the packed sequence (see _fwd_kernel)
        q0, Nq = _seq_bounds(CuQ, b, TQ, Nq)
        k0, Nk = _seq_bounds(CuK, b, TK, Nk)
    else:
        q0 = 0
        k0 = 0
    causal_off = Nk - Nq
    kblk = (pid_n * BN) // BLOCK_K
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    nmask = offs_n < Nk
    kd_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + k0 * skn + offs_n[:, None] * skn + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + k0 * svn + offs_n[:, None] * svn + offs_d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    lim_m = 0
    if CAUSAL:
        lim_m = pid_n * BN - BM + 1 - causal_off  # query tiles starting below this see no key of the tile
    n_qb = tl.cdiv(Nq, BLOCK_Q)
    SUBS: tl.constexpr = BLOCK_Q // BM
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        lrow = _row0(bh, h, Nq, q0, TQ, VARLEN)
        dbias = tl.zeros([BN], tl.float32)
        if HAS_BIAS:
            bias = tl.load(Bias + b * sbb + h * sbh + k0 + offs_n, mask=nmask, other=0.0) * 1.4426950408889634
        nblk = tl.minimum(tl.maximum(tl.load(QN + b * snb + h * snh + kblk * snk), 0),
                          _row_clamp(n_qb, n_qb_row, VARLEN))  # bound check
        if VARLEN:  # a key tile past the end of its (shorter) sequence walks nothing
            nblk = tl.where(pid_n * BN < Nk, nblk, 0)
        qib = QI + b * sib + h * sih + kblk * sik
        for it in range(0, nblk * SUBS):  # flat, loads at top level: pipelined (see _fwd_kernel)
            qb = tl.load(qib + it // SUBS)
            # bound check: an out-of-range block index becomes the sentinel n_qb, whose queries all lie past Nq
            # (loads masked off, no contribution): never read, whatever the index
            qb = tl.where((qb >= 0) & (qb < n_qb), qb, n_qb)
            start_m = qb * BLOCK_Q + (it % SUBS) * BM
            offs_m = start_m + tl.arange(0, BM)
            mmask = (offs_m < Nq) & (start_m >= lim_m)  # tiles below the causal limit: masked off
            qd_mask = mmask[:, None] & dmask[None, :]
            q = tl.load(Q + b * sqb + h * sqh + (q0 + offs_m[:, None]) * sqn + offs_d[None, :], mask=qd_mask,
                        other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + (q0 + offs_m[:, None]) * sdn + offs_d[None, :], mask=qd_mask,
                         other=0.0)
            lse = tl.load(Lse + lrow + offs_m, mask=mmask, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + lrow + offs_m, mask=mmask, other=0.0)
            # transposed tile: rows = keys, columns = queries
            sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            if HAS_BIAS:
                sT += bias[:, None]
            valid = nmask[:, None] & mmask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_off)
            pT = tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
            if HAS_BIAS:
                dbias += tl.sum(dsT, 1)
        if HAS_BIAS:
            tl.store(DBias + _row0(bh, h, Nk, k0, TK, VARLEN) + offs_n, dbias, mask=nmask)
    tl.store(DK + b * skb + hk * skh + k0 * skn + offs_n[:, None] * skn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + b * svb + hk * svh + k0 * svn + offs_n[:, None] * svn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_mask)


@triton.jit
def _mass_kernel(Q, K, Bias, Lse, Mass, QN, QI, CuQ, CuK,
                 sqb, sqh, sqn, skb, skh, skn, sbb, sbh, snb, snh, snk, sib, sih, sik,
                 H, GROUP, Nq, Nk, D, TQ, TK, n_qb_row, qk_scale,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                 VARLEN: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    if VARLEN:  # b is the packed sequence (see _fwd_kernel)
        q0, Nq = _seq_bounds(CuQ, b, TQ, Nq)
        k0, Nk = _seq_bounds(CuK, b, TK, Nk)
    else:
        q0 = 0
        k0 = 0
    causal_off = Nk - Nq
    kblk = (pid_n * BN) // BLOCK_K
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    nmask = offs_n < Nk
    k = tl.load(K + b * skb + hk * skh + k0 * skn + offs_n[:, None] * skn + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(Bias + b * sbb + h * sbh + k0 + offs_n, mask=nmask, other=0.0) * 1.4426950408889634
    mass = tl.zeros([BN], tl.float32)
    lim_m = 0
    if CAUSAL:
        lim_m = pid_n * BN - BM + 1 - causal_off  # query tiles starting below this see no key of the tile
    n_qb = tl.cdiv(Nq, BLOCK_Q)
    nblk = tl.minimum(tl.maximum(tl.load(QN + b * snb + h * snh + kblk * snk), 0),
                      _row_clamp(n_qb, n_qb_row, VARLEN))  # bound check
    if VARLEN:
        nblk = tl.where(pid_n * BN < Nk, nblk, 0)
    qib = QI + b * sib + h * sih + kblk * sik
    qbase = Q + b * sqb + h * sqh + q0 * sqn
    lbase = Lse + _row0(bh, h, Nq, q0, TQ, VARLEN)
    SUBS: tl.constexpr = BLOCK_Q // BM
    for it in range(0, nblk * SUBS):  # flat, loads at top level: pipelined (see _fwd_kernel)
        qb = tl.load(qib + it // SUBS)
        # bound check: an out-of-range block index becomes the sentinel n_qb, whose queries all lie past Nq
        # (loads masked off, no contribution): never read, whatever the index
        qb = tl.where((qb >= 0) & (qb < n_qb), qb, n_qb)
        start_m = qb * BLOCK_Q + (it % SUBS) * BM
        offs_m = start_m + tl.arange(0, BM)
        mmask = (offs_m < Nq) & (start_m >= lim_m)
        q = tl.load(qbase + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(lbase + offs_m, mask=mmask, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        if HAS_BIAS:
            sT += bias[:, None]
        valid = nmask[:, None] & mmask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_off)
        mass += tl.sum(tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0), 1)
    tl.store(Mass + _row0(bh, h, Nk, k0, TK, VARLEN) + offs_n, mass, mask=nmask)


# --------------------------------------------------------------------------- launchers
def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# (BM, BN, num_warps, num_stages) per kernel, head dim (padded: 64 = up to 64) and operand width, chosen
# with benchmarks/kernel_check.py so that on sm_80 (164 KB of shared memory per block) and sm_90 the
# loops are pipelined, nothing spills and shared memory fits.  BM: query rows, BN: key rows.
_TILES = {
    # kind, bd, 4-byte operands (fp32): (BM, BN, warps, stages).  fp32 uses IEEE fp32 dots (FMA, no
    # tensor cores), whose operands and accumulators all live in registers: the tiles that fit at
    # D=256 without spilling are used at every D (fewer registers at smaller D).
    ("fwd", 64, False): (128, 64, 4, 3), ("fwd", 64, True): (32, 32, 4, 2),
    ("fwd", 128, False): (128, 64, 8, 3), ("fwd", 128, True): (32, 16, 4, 2),
    ("fwd", 256, False): (64, 32, 8, 3), ("fwd", 256, True): (32, 16, 4, 2),
    ("dq", 64, False): (64, 64, 4, 2), ("dq", 64, True): (32, 32, 8, 2),
    ("dq", 128, False): (64, 64, 4, 2), ("dq", 128, True): (32, 32, 8, 2),
    ("dq", 256, False): (64, 32, 8, 2), ("dq", 256, True): (32, 32, 8, 2),
    ("dkdv", 64, False): (64, 64, 4, 2), ("dkdv", 64, True): (32, 32, 8, 2),
    ("dkdv", 128, False): (32, 64, 8, 2), ("dkdv", 128, True): (16, 32, 8, 2),
    ("dkdv", 256, False): (32, 32, 8, 2), ("dkdv", 256, True): (16, 32, 8, 2),
    ("mass", 64, False): (64, 64, 4, 2), ("mass", 64, True): (32, 32, 8, 2),
    ("mass", 128, False): (64, 64, 4, 2), ("mass", 128, True): (32, 32, 8, 2),
    ("mass", 256, False): (64, 64, 4, 2), ("mass", 256, True): (32, 32, 8, 2),
}
# Before Hopper (mma.sync, no wgmma: the accumulators and both dot operands of the dQ step live in
# registers), the 16-bit dQ tile of 64 x 64 needs 255 registers and spills 8-44 B with causal + key bias
# (Triton 3.8, sm_80); 64 query x 32 key rows compiles to 180-224 registers with no spill.
_TILES_PRE_HOPPER = {
    ("dq", 64, False): (64, 32, 4, 2), ("dq", 128, False): (64, 32, 4, 2),
}


def _target_arch() -> int | None:
    """The compute capability Triton compiles for (major * 10 + minor), None when unknown."""
    try:
        t = triton.runtime.driver.active.get_current_target()
    except Exception:  # noqa: BLE001 - no driver: the tables' defaults
        return None
    return t.arch if getattr(t, "backend", None) == "cuda" and isinstance(t.arch, int) else None


# Varlen (VARLEN=True) overrides: the sequence bounds read from cu_seqlens are runtime values (the
# padded kernels get theirs as parameters, with divisibility hints), which costs registers; where the
# padded tile spilled with them (kernel_check, full matrix, causal + key bias), these fit on sm_80 and
# sm_90 without spilling (16-bit dQ at D<=64 on sm_80: the padded kernel's accepted small spill), still
# pipelined.
_TILES_VARLEN = {
    ("fwd", 128, True): (32, 16, 8, 2), ("fwd", 256, True): (32, 16, 8, 2),
    ("dq", 64, False): (64, 64, 8, 2), ("dkdv", 64, False): (64, 64, 8, 2),
    ("dq", 128, True): (16, 32, 8, 2),
    # fp32 varlen dQ at D=256: 32 x 16 (the padded 32 x 32 spilled 60 B on sm_80, 16 x 32 spills on sm_90);
    # fp32 varlen dK/dV at D<=64: 32 x 32 with 4 warps (8 warps spilled 8 B on sm_80 with causal + bias).
    ("dq", 256, True): (32, 16, 8, 2), ("dkdv", 64, True): (32, 32, 4, 2),
}


def _tiles(block_q: int, block_k: int, D: int, kind: str, dtype=torch.float16, varlen: bool = False):
    """(BM, BN, BD, num_warps, num_stages). BM | block_q and BN | block_k."""
    bd = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16; padded channels are masked
    if triton_interpreter():  # bigger tiles = fewer interpreted steps
        return min(64, block_q), min(64, block_k), bd, 4, 1
    key = (kind, max(64, bd), dtype == torch.float32)
    arch = _target_arch()
    if arch is not None and arch < 90 and key in _TILES_PRE_HOPPER:  # padded and varlen alike
        table = _TILES_PRE_HOPPER
    elif varlen and key in _TILES_VARLEN:
        table = _TILES_VARLEN
    else:
        table = _TILES
    bm, bn, warps, stages = table[key]
    return min(bm, block_q), min(bn, block_k), bd, warps, stages


def _bias_args(key_bias, q):
    """Padded: ``key_bias (B, Nk)`` or ``(B, H, Nk)`` -> (tensor, batch stride, head stride, has_bias)."""
    if key_bias is None:
        return q.new_empty(1, dtype=torch.float32), 0, 0, False
    kb = key_bias.contiguous()
    if kb.dim() == 2:
        return kb, kb.stride(0), 0, True
    return kb, kb.stride(0), kb.stride(1), True


def _bias_args_varlen(key_bias, q):
    """Varlen: ``key_bias (total_k,)`` or ``(H, total_k)`` -> (tensor, 0, head stride, has_bias)."""
    if key_bias is None:
        return q.new_empty(1, dtype=torch.float32), 0, 0, False
    kb = key_bias.contiguous()
    return kb, 0, (kb.stride(0) if kb.dim() == 2 else 0), True


def _qk_scale(scale: float) -> float:
    return scale * LOG2E


class _Layout:
    """How the kernels address one call: padded ``(B, H, N, D)`` tensors, or packed varlen
    ``(total, H, D)`` tensors with ``cu_seqlens`` (then ``b`` is the sequence, the batch strides are 0
    and every kernel adds its sequence's start row ``cu_seqlens[b]``).

    ``B``: batch / number of sequences; ``Nq``/``Nk``: the (max) lengths the grids cover; ``TQ``/``TK``:
    the packed totals (padded: unused); ``cu_q``/``cu_k``: the cu_seqlens (padded: a dummy pointer)."""

    def __init__(self, q, k, cu_q=None, cu_k=None, max_q=None, max_k=None):
        self.varlen = cu_q is not None
        if self.varlen:
            self.B = cu_q.shape[0] - 1
            self.H, self.D = q.shape[1], q.shape[2]
            self.Hkv = k.shape[1]
            self.Nq, self.Nk = int(max_q), int(max_k)
            self.TQ, self.TK = q.shape[0], k.shape[0]
            self.cu_q, self.cu_k = cu_q, cu_k
        else:
            self.B, self.H, self.Nq, self.D = q.shape
            self.Hkv, self.Nk = k.shape[1], k.shape[2]
            self.TQ, self.TK = self.Nq, self.Nk
            self.cu_q = self.cu_k = q.new_empty(2, dtype=torch.int32)  # never read (VARLEN=False)
        if self.B * self.H > 65535:
            raise ValueError(f"q: the Triton attention kernels launch (batch or sequences) x heads = "
                             f"{self.B} x {self.H} programs in a grid dimension limited to 65535")

    def s(self, t):
        """(batch, head, token) strides of q/k/v/out-like tensors."""
        if self.varlen:  # (total, H, D)
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def row_shape(self, which: str):
        if self.varlen:
            return (self.H, self.TQ if which == "q" else self.TK)
        return (self.B, self.H, self.Nq if which == "q" else self.Nk)


def _fwd(L: _Layout, q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, bias_args, num_splits):
    B, H, D, Nq = L.B, L.H, L.D, L.Nq
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output(L.row_shape("q"), torch.float32, q.device)
    num = kv_num_blocks.expand(B, H, -1)
    idx = kv_indices.expand(B, H, -1, -1)
    bias, sbb, sbh, has_bias = bias_args
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "fwd", q.dtype, L.varlen)
    n_tiles = triton.cdiv(Nq, BM) * B * H
    nk = idx.shape[-1]
    splits = _num_splits(n_tiles, nk, q.device) if num_splits is None else max(1, min(int(num_splits), nk))
    per_split = triton.cdiv(nk, splits)
    splits = triton.cdiv(nk, per_split)
    LN = lse.numel()
    RN = LN if L.varlen else B * H  # see the SPLIT branch of _fwd_kernel
    if splits > 1:
        pacc = torch.empty((splits, LN, BD), dtype=torch.float32, device=q.device)
        pm = torch.empty((splits, LN), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        pacc = pm = pl = lse
    grid = (triton.cdiv(Nq, BM), B * H, splits)
    _fwd_kernel[grid](q, k, v, bias, out, lse, num, idx, pacc, pm, pl, L.cu_q, L.cu_k,
                      *L.s(q), *L.s(k), *L.s(v), *L.s(out),
                      sbb, sbh, *num.stride(), *idx.stride()[:3],
                      H, H // L.Hkv, Nq, L.Nk, D, L.TQ, L.TK, nk, _qk_scale(scale), per_split, RN,
                      BLOCK_Q=block_q, BLOCK_K=block_k, BM=BM, BN=BN, BD=BD, CAUSAL=bool(causal),
                      HAS_BIAS=has_bias, PREC=_prec(q.dtype), SPLIT=splits > 1, VARLEN=L.varlen,
                      num_warps=warps, num_stages=stages)
    if splits > 1:
        CM = 16 if Nq <= 16 else 64
        _combine_kernel[(triton.cdiv(Nq, CM), B * H)](pacc, pm, pl, out, lse, L.cu_q, *L.s(out), H, RN, Nq, D,
                                                     L.TQ, splits, BM=CM, BD=BD, VARLEN=L.varlen)
    return out, lse


def fwd(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias, num_splits=None):
    """Padded forward: ``q (B, H, Nq, D)``, ``k, v (B, H_kv, Nk, D)`` -> ``out (B, H, Nq, D)``, ``lse (B, H, Nq)``."""
    L = _Layout(q, k)
    return _fwd(L, q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, _bias_args(key_bias, q),
                num_splits)


def fwd_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks, kv_indices, block_q,
               block_k, causal, scale, key_bias, num_splits=None):
    """Packed forward: ``q (total_q, H, D)``, ``k, v (total_k, H_kv, D)``, ``cu_seqlens`` int32 ``(S+1,)``;
    one program per (query tile of ``max_seqlen_q``, sequence x head) -> ``out (total_q, H, D)``,
    ``lse (H, total_q)``."""
    L = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _fwd(L, q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale,
                _bias_args_varlen(key_bias, q), num_splits)


def _num_splits(n_tiles: int, nk: int, device) -> int:
    """Split the key-block list of each query tile (flash-decoding) when the query tiles alone
    cannot fill the GPU: aim for ~2 programs per SM, at least 4 key blocks per split."""
    sms = gpu_sm_count(device)
    on_gpu = sms is not None
    if not on_gpu:  # interpreter: a small pretend GPU so that tests exercise the split path
        sms = 4
    if n_tiles >= sms or nk < 2:
        return 1
    want = triton.cdiv(2 * sms, n_tiles)
    cap = nk if not on_gpu else max(1, nk // 4)
    return max(1, min(want, cap, 128))


def _delta(o, do, BH, N, D, soh, son, sdh, sdn, dlse):
    """``delta[bh, n] = sum_d o * do - dlse``, fp32 ``(BH, N)`` (rows addressed by (bh, n) strides)."""
    delta = torch.empty((BH, N), dtype=torch.float32, device=o.device)
    BM = 64
    _delta_kernel[(triton.cdiv(N, BM), BH)](o, do, delta, soh, son, sdh, sdn, N, D, BM=BM,
                                             BD=max(16, triton.next_power_of_2(D)))
    if dlse is not None:
        delta = delta - dlse.reshape(BH, N)
    return delta


def _bwd(L: _Layout, dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q,
         block_k, causal, scale, key_bias, bias_fn):
    B, H, Hkv, D = L.B, L.H, L.Hkv, L.D
    dout = dout.contiguous()
    # the dq / dk dv kernels write the gradients with the strides of q / k / v: a strided view
    # (the forward reads it in place) is copied here, once per backward
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    if L.varlen:  # rows (h, t): o[t, h, :]
        delta = _delta(out, dout, H, L.TQ, D, out.stride(1), out.stride(0), dout.stride(1), dout.stride(0), dlse)
    else:
        Nq = L.Nq
        o2, do2 = out.reshape(B * H, Nq, D), dout.reshape(B * H, Nq, D)
        delta = _delta(o2, do2, B * H, Nq, D, o2.stride(0), o2.stride(1), do2.stride(0), do2.stride(1), dlse)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    bias, sbb, sbh, has_bias = bias_fn(key_bias, q)
    dbias = new_output(L.row_shape("k") if has_bias else (0,), torch.float32, q.device)
    dbias_arg = dbias if has_bias else bias  # never hand Triton a 0-element (null) pointer
    num = kv_num_blocks.expand(B, H, -1)
    idx = kv_indices.expand(B, H, -1, -1)
    qn = q_num_blocks.expand(B, H, -1)
    qi = q_indices.expand(B, H, -1, -1)
    common = dict(BLOCK_Q=block_q, BLOCK_K=block_k, CAUSAL=bool(causal), HAS_BIAS=has_bias, PREC=_prec(q.dtype),
                  VARLEN=L.varlen)
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "dq", q.dtype, L.varlen)
    _bwd_dq_kernel[(triton.cdiv(L.Nq, BM), B * H)](
        q, k, v, bias, dout, lse, delta, dq, num, idx, L.cu_q, L.cu_k,
        *L.s(q), *L.s(k), *L.s(v), *L.s(dout),
        sbb, sbh, *num.stride(), *idx.stride()[:3],
        H, H // Hkv, L.Nq, L.Nk, D, L.TQ, L.TK, idx.shape[-1], _qk_scale(scale), scale,
        BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=stages, **common)
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "dkdv", q.dtype, L.varlen)
    _bwd_dkdv_kernel[(triton.cdiv(L.Nk, BN), B * Hkv)](
        q, k, v, bias, dout, lse, delta, dk, dv, dbias_arg, qn, qi, L.cu_q, L.cu_k,
        *L.s(q), *L.s(k), *L.s(v), *L.s(dout),
        sbb, sbh, *qn.stride(), *qi.stride()[:3],
        H, Hkv, H // Hkv, L.Nq, L.Nk, D, L.TQ, L.TK, qi.shape[-1], _qk_scale(scale), scale,
        BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv, dbias


def bwd(dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
        causal, scale, key_bias):
    """Padded backward -> ``(dq, dk, dv, dbias (B, H, Nk) per query head, or empty)``."""
    return _bwd(_Layout(q, k), dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                block_q, block_k, causal, scale, key_bias, _bias_args)


def bwd_varlen(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks,
               kv_indices, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias):
    """Packed backward -> ``(dq (total_q, H, D), dk, dv (total_k, H_kv, D), dbias (H, total_k) per query head,
    or empty)``."""
    L = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _bwd(L, dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q,
                block_k, causal, scale, key_bias, _bias_args_varlen)


def _key_mass(L: _Layout, q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale, bias_args):
    B, H = L.B, L.H
    mass = new_output(L.row_shape("k"), torch.float32, q.device)
    qn = q_num_blocks.expand(B, H, -1)
    qi = q_indices.expand(B, H, -1, -1)
    bias, sbb, sbh, has_bias = bias_args
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, L.D, "mass", q.dtype, L.varlen)
    _mass_kernel[(triton.cdiv(L.Nk, BN), B * H)](
        q, k, bias, lse.contiguous(), mass, qn, qi, L.cu_q, L.cu_k,
        *L.s(q), *L.s(k), sbb, sbh, *qn.stride(), *qi.stride()[:3],
        H, H // L.Hkv, L.Nq, L.Nk, L.D, L.TQ, L.TK, qi.shape[-1], _qk_scale(scale),
        BLOCK_Q=block_q, BLOCK_K=block_k, BM=BM, BN=BN, BD=BD, CAUSAL=bool(causal), HAS_BIAS=has_bias,
        PREC=_prec(q.dtype), VARLEN=L.varlen, num_warps=warps, num_stages=stages)
    return mass


def key_mass(q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias):
    """Padded key mass -> ``(B, H, Nk)`` fp32."""
    return _key_mass(_Layout(q, k), q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale,
                     _bias_args(key_bias, q))


def key_mass_varlen(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_num_blocks, q_indices,
                    block_q, block_k, causal, scale, key_bias):
    """Packed key mass -> ``(H, total_k)`` fp32."""
    L = _Layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _key_mass(L, q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale,
                     _bias_args_varlen(key_bias, q))
