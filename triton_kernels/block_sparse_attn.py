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
def _fwd_kernel(Q, K, V, Bias, Out, Lse, KVN, KVI, PAcc, PM, PL,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                sbb, sbh, snb, snh, snq, sib, sih, siq,
                H, GROUP, Nq, Nk, D, causal_off, qk_scale, per_split, BH,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                SPLIT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    qblk = (pid_m * BM) // BLOCK_Q
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m < Nq)[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    bbase = Bias + b * sbb + h * sbh
    lim_n = Nk
    if CAUSAL:
        lim_n = pid_m * BM + BM - 1 + causal_off  # last key any row of this tile may see
    n_kb = tl.cdiv(Nk, BLOCK_K)
    nblk = tl.minimum(tl.maximum(tl.load(KVN + b * snb + h * snh + qblk * snq), 0), n_kb)  # bound check
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
        # bound check: an out-of-range block index becomes the sentinel n_kb, whose keys all lie past Nk
        # (loads masked off, logits -inf): never read, whatever the index
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
    if SPLIT:  # flash-decoding: partial (acc, m, l) per split, merged by _combine_kernel
        row = (split * BH + bh).to(tl.int64) * Nq + offs_m
        tl.store(PAcc + row[:, None] * BD + offs_d[None, :], acc, mask=mmask[:, None])
        tl.store(PM + row, m_i, mask=mmask)
        tl.store(PL + row, l_i, mask=mmask)
    else:
        _finish(acc, m_i, l_i, Out + b * sob + h * soh, Lse + bh.to(tl.int64) * Nq, offs_m, offs_d, son, Nq, D)


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
def _combine_kernel(PAcc, PM, PL, Out, Lse, sob, soh, son, H, BH, Nq, D, n_splits,
                    BM: tl.constexpr, BD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    mmask = offs_m < Nq
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for sp in range(0, n_splits):
        row = (sp * BH + bh).to(tl.int64) * Nq + offs_m
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
    _finish(acc, m_i, l_i, Out + b * sob + h * soh, Lse + bh.to(tl.int64) * Nq, offs_m, offs_d, son, Nq, D)


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
def _bwd_dq_kernel(Q, K, V, Bias, DO, Lse, Delta, DQ, KVN, KVI,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   sbb, sbh, snb, snh, snq, sib, sih, siq,
                   H, GROUP, Nq, Nk, D, causal_off, qk_scale, scale,
                   BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    qblk = (pid_m * BM) // BLOCK_Q
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    mmask = offs_m < Nq
    qd_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * Nq + offs_m, mask=mmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(Delta + bh.to(tl.int64) * Nq + offs_m, mask=mmask, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    bbase = Bias + b * sbb + h * sbh
    lim_n = Nk
    if CAUSAL:
        lim_n = pid_m * BM + BM - 1 + causal_off  # last key any row of this tile may see
    n_kb = tl.cdiv(Nk, BLOCK_K)
    nblk = tl.minimum(tl.maximum(tl.load(KVN + b * snb + h * snh + qblk * snq), 0), n_kb)  # bound check
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
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Bias, DO, Lse, Delta, DK, DV, DBias, QN, QI,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     sbb, sbh, snb, snh, snk, sib, sih, sik,
                     H, HKV, GROUP, Nq, Nk, D, causal_off, qk_scale, scale,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    kblk = (pid_n * BN) // BLOCK_K
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    nmask = offs_n < Nk
    kd_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kd_mask, other=0.0)
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
        dbias = tl.zeros([BN], tl.float32)
        if HAS_BIAS:
            bias = tl.load(Bias + b * sbb + h * sbh + offs_n, mask=nmask, other=0.0) * 1.4426950408889634
        nblk = tl.minimum(tl.maximum(tl.load(QN + b * snb + h * snh + kblk * snk), 0), n_qb)  # bound check
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
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=qd_mask,
                         other=0.0)
            lse = tl.load(Lse + bh * Nq + offs_m, mask=mmask, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + bh * Nq + offs_m, mask=mmask, other=0.0)
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
            tl.store(DBias + bh * Nk + offs_n, dbias, mask=nmask)
    tl.store(DK + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


@triton.jit
def _mass_kernel(Q, K, Bias, Lse, Mass, QN, QI,
                 sqb, sqh, sqn, skb, skh, skn, sbb, sbh, snb, snh, snk, sib, sih, sik,
                 H, GROUP, Nq, Nk, D, causal_off, qk_scale,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    kblk = (pid_n * BN) // BLOCK_K
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    nmask = offs_n < Nk
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(Bias + b * sbb + h * sbh + offs_n, mask=nmask, other=0.0) * 1.4426950408889634
    mass = tl.zeros([BN], tl.float32)
    lim_m = 0
    if CAUSAL:
        lim_m = pid_n * BN - BM + 1 - causal_off  # query tiles starting below this see no key of the tile
    n_qb = tl.cdiv(Nq, BLOCK_Q)
    nblk = tl.minimum(tl.maximum(tl.load(QN + b * snb + h * snh + kblk * snk), 0), n_qb)  # bound check
    qib = QI + b * sib + h * sih + kblk * sik
    SUBS: tl.constexpr = BLOCK_Q // BM
    for it in range(0, nblk * SUBS):  # flat, loads at top level: pipelined (see _fwd_kernel)
        qb = tl.load(qib + it // SUBS)
        # bound check: an out-of-range block index becomes the sentinel n_qb, whose queries all lie past Nq
        # (loads masked off, no contribution): never read, whatever the index
        qb = tl.where((qb >= 0) & (qb < n_qb), qb, n_qb)
        start_m = qb * BLOCK_Q + (it % SUBS) * BM
        offs_m = start_m + tl.arange(0, BM)
        mmask = (offs_m < Nq) & (start_m >= lim_m)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        lse = tl.load(Lse + bh * Nq + offs_m, mask=mmask, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        if HAS_BIAS:
            sT += bias[:, None]
        valid = nmask[:, None] & mmask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_off)
        mass += tl.sum(tl.where(valid, tl.exp2(sT - lse2[None, :]), 0.0), 1)
    tl.store(Mass + bh * Nk + offs_n, mass, mask=nmask)


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


def _tiles(block_q: int, block_k: int, D: int, kind: str, dtype=torch.float16):
    """(BM, BN, BD, num_warps, num_stages). BM | block_q and BN | block_k."""
    bd = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16; padded channels are masked
    if triton_interpreter():  # bigger tiles = fewer interpreted steps
        return min(64, block_q), min(64, block_k), bd, 4, 1
    key = (kind, max(64, bd), dtype == torch.float32)
    arch = _target_arch()
    table = _TILES_PRE_HOPPER if arch is not None and arch < 90 and key in _TILES_PRE_HOPPER else _TILES
    bm, bn, warps, stages = table[key]
    return min(bm, block_q), min(bn, block_k), bd, warps, stages


def _bias_args(key_bias, q):
    if key_bias is None:
        return q.new_empty(1, dtype=torch.float32), 0, 0, False
    kb = key_bias.contiguous()
    if kb.dim() == 2:
        return kb, kb.stride(0), 0, True
    return kb, kb.stride(0), kb.stride(1), True


def _qk_scale(scale: float) -> float:
    return scale * LOG2E


def fwd(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias, num_splits=None):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = new_output((B, H, Nq, D), q.dtype, q.device)
    lse = new_output((B, H, Nq), torch.float32, q.device)
    num = kv_num_blocks.expand(B, H, -1)
    idx = kv_indices.expand(B, H, -1, -1)
    bias, sbb, sbh, has_bias = _bias_args(key_bias, q)
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "fwd", q.dtype)
    n_tiles = triton.cdiv(Nq, BM) * B * H
    nk = idx.shape[-1]
    splits = _num_splits(n_tiles, nk, q.device) if num_splits is None else max(1, min(int(num_splits), nk))
    per_split = triton.cdiv(nk, splits)
    splits = triton.cdiv(nk, per_split)
    if splits > 1:
        pacc = torch.empty((splits, B * H, Nq, BD), dtype=torch.float32, device=q.device)
        pm = torch.empty((splits, B * H, Nq), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        pacc = pm = pl = lse
    grid = (triton.cdiv(Nq, BM), B * H, splits)
    _fwd_kernel[grid](q, k, v, bias, out, lse, num, idx, pacc, pm, pl,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                      sbb, sbh, *num.stride(), *idx.stride()[:3],
                      H, H // Hkv, Nq, Nk, D, Nk - Nq, _qk_scale(scale), per_split, B * H,
                      BLOCK_Q=block_q, BLOCK_K=block_k, BM=BM, BN=BN, BD=BD, CAUSAL=bool(causal),
                      HAS_BIAS=has_bias, PREC=_prec(q.dtype), SPLIT=splits > 1, num_warps=warps, num_stages=stages)
    if splits > 1:
        CM = 16 if Nq <= 16 else 64
        _combine_kernel[(triton.cdiv(Nq, CM), B * H)](pacc, pm, pl, out, lse, *out.stride()[:3], H, B * H, Nq, D,
                                                     splits, BM=CM, BD=BD)
    return out, lse


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


def _delta(out, dout, dlse):
    B, H, Nq, D = out.shape
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=out.device)
    o = out.reshape(B * H, Nq, D)
    do = dout.reshape(B * H, Nq, D)
    BM = 64
    _delta_kernel[(triton.cdiv(Nq, BM), B * H)](o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
                                                 Nq, D, BM=BM, BD=max(16, triton.next_power_of_2(D)))
    if dlse is not None:
        delta = delta - dlse
    return delta


def bwd(dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
        causal, scale, key_bias):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dout = dout.contiguous()
    # the dq / dk dv kernels write the gradients with the strides of q / k / v: a strided view
    # (the forward reads it in place) is copied here, once per backward
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    delta = _delta(out.contiguous(), dout, dlse)
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    bias, sbb, sbh, has_bias = _bias_args(key_bias, q)
    dbias = new_output((B, H, Nk) if has_bias else (0,), torch.float32, q.device)
    dbias_arg = dbias if has_bias else bias  # never hand Triton a 0-element (null) pointer
    num = kv_num_blocks.expand(B, H, -1)
    idx = kv_indices.expand(B, H, -1, -1)
    qn = q_num_blocks.expand(B, H, -1)
    qi = q_indices.expand(B, H, -1, -1)
    common = dict(BLOCK_Q=block_q, BLOCK_K=block_k, CAUSAL=bool(causal), HAS_BIAS=has_bias, PREC=_prec(q.dtype))
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "dq", q.dtype)
    _bwd_dq_kernel[(triton.cdiv(Nq, BM), B * H)](
        q, k, v, bias, dout, lse, delta, dq, num, idx,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        sbb, sbh, *num.stride(), *idx.stride()[:3],
        H, H // Hkv, Nq, Nk, D, Nk - Nq, _qk_scale(scale), scale,
        BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=stages, **common)
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "dkdv", q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(Nk, BN), B * Hkv)](
        q, k, v, bias, dout, lse, delta, dk, dv, dbias_arg, qn, qi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        sbb, sbh, *qn.stride(), *qi.stride()[:3],
        H, Hkv, H // Hkv, Nq, Nk, D, Nk - Nq, _qk_scale(scale), scale,
        BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv, dbias


def key_mass(q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    mass = new_output((B, H, Nk), torch.float32, q.device)
    qn = q_num_blocks.expand(B, H, -1)
    qi = q_indices.expand(B, H, -1, -1)
    bias, sbb, sbh, has_bias = _bias_args(key_bias, q)
    BM, BN, BD, warps, stages = _tiles(block_q, block_k, D, "mass", q.dtype)
    _mass_kernel[(triton.cdiv(Nk, BN), B * H)](
        q, k, bias, lse.contiguous(), mass, qn, qi,
        *q.stride()[:3], *k.stride()[:3], sbb, sbh, *qn.stride(), *qi.stride()[:3],
        H, H // Hkv, Nq, Nk, D, Nk - Nq, _qk_scale(scale),
        BLOCK_Q=block_q, BLOCK_K=block_k, BM=BM, BN=BN, BD=BD, CAUSAL=bool(causal), HAS_BIAS=has_bias,
        PREC=_prec(q.dtype), num_warps=warps, num_stages=stages)
    return mass
