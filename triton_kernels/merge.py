"""Triton kernels for token merging (ToMe, PiToMe) and pruning.

* ``tome_match``: for every A token (even position) ``max_j cos(a_i, b_j)`` and its first argmax
  over the B tokens (odd positions), with a running max over tiles of B tokens: the
  ``(N/2) x (N/2)`` score matrix is never stored (memory O(N C)).  Scores are
  ``dot(a, b) * inv_norm(a) * inv_norm(b)`` accumulated in fp32 (fp32 inputs use IEEE fp32 dots,
  not TF32).  Tie rule: the first (lowest) B index, like ``torch.max``.
* ``segment_reduce``: fused gather + scatter-reduce.  One program per output token and channel
  block reads its members through a CSR list (``order``/``offsets``) and reduces them in fp32,
  deterministically (no atomics).
* ``token_gather``: ``out[b, i] = x[b, idx[b, i]]`` or ``fill`` where ``idx < 0`` (unmerge, prune,
  scatter back).
* ``pitome_energy``: ``E_i = mean_j f(cos(x_i, x_j))`` tiled like ``tome_match``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tokops._registry import new_output

_MODES = {"sum": 0, "mean": 1, "amax": 2}


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _tiles(n_rows: int, n_cols: int, C: int):
    if _interp():  # the interpreter is slow: small tiles, and tl.dot needs >= 16
        return 16, 16, 32
    bm = 64 if n_rows >= 64 else 32 if n_rows >= 32 else 16
    bn = 64 if n_cols >= 64 else 32 if n_cols >= 32 else 16
    bk = 64 if C >= 64 else max(16, triton.next_power_of_2(C))
    return bm, bn, bk


@triton.jit
def _dot_tile(x_ptr, sx_b, sx_n, pid_b, rows_tok, rows_ok, cols_tok, cols_ok, C,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """fp32 (BM, BN) tile of dot(x[rows_tok], x[cols_tok]) over the channel dim."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    base = x_ptr + pid_b * sx_b
    rows_off = rows_tok.to(tl.int64)[:, None] * sx_n  # int64: N * C may pass 2**31
    cols_off = cols_tok.to(tl.int64)[:, None] * sx_n
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        km = k < C
        a = tl.load(base + rows_off + k[None, :], mask=rows_ok[:, None] & km[None, :], other=0.0)
        b = tl.load(base + cols_off + k[None, :], mask=cols_ok[:, None] & km[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
    return acc


@triton.jit
def _pow2(k):
    """fp32 ``2**k`` for int32 ``k`` in [-126, 127] (built from the exponent bits: exact)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_norm_kernel(m_ptr, inv_ptr, exp_ptr, flag_ptr, rows, N, C, SCALE: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
    """``inv[t] = 1 / ||m_t||`` (fp32, from the input dtype: no fp32 copy of ``m``).  SCALE: rows of
    extreme magnitude (``tokops.merge.reference.row_exponent``) get their exponent ``e`` in
    ``exp_ptr``, ``inv`` is that of the row divided by ``2**e``, and the row's sequence is flagged."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    r_ok = r < rows
    base = m_ptr + r[:, None] * C
    e = tl.zeros((BR,), tl.int32)
    if SCALE:
        amax = tl.zeros((BR,), tl.float32)
        bad = tl.zeros((BR,), tl.int32)
        for k0 in range(0, C, BC):
            k = k0 + tl.arange(0, BC)
            x = tl.load(base + k[None, :], mask=r_ok[:, None] & (k < C)[None, :], other=0.0).to(tl.float32)
            ax = tl.abs(x)
            bad += tl.sum((~(ax <= 3.4028234663852886e38)).to(tl.int32), axis=1)  # inf or NaN
            amax = tl.maximum(amax, tl.max(tl.where(ax == ax, ax, 0.0), axis=1))
        need = (bad == 0) & (amax > 0) & ((amax > 1125899906842624.0) | (amax < 8.881784197001252e-16))
        sub = amax < 1.1754943508222875e-38  # subnormal: read the exponent of amax * 2**64
        am = tl.where(sub, amax * 18446744073709551616.0, amax)
        ex = ((am.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126 - tl.where(sub, 64, 0)
        e = tl.where(need, ex, 0)
        tl.store(exp_ptr + r, e, mask=r_ok)
        tl.atomic_or(flag_ptr + r // N, need.to(tl.int32), mask=r_ok & need)
    h = e // 2
    f1 = _pow2(-h)
    f2 = _pow2(h - e)
    ss = tl.zeros((BR,), tl.float32)
    for k0 in range(0, C, BC):
        k = k0 + tl.arange(0, BC)
        x = tl.load(base + k[None, :], mask=r_ok[:, None] & (k < C)[None, :], other=0.0).to(tl.float32)
        if SCALE:
            x = x * f1[:, None] * f2[:, None]
        ss += tl.sum(x * x, axis=1)
    tl.store(inv_ptr + r, 1.0 / tl.sqrt_rn(tl.where(r_ok, ss, 1.0)), mask=r_ok)


@triton.jit
def _match_tiles(m_ptr, inv_ptr, valid_ptr, exp_ptr, N, C, nA, nB, sm_b, sm_n, pid_b, ai, a_ok, a_tok, inv_a,
                 DIST: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr, SCALED: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Running (max, first argmax) of the A rows ``ai`` over all B tiles.  SCALED: every row divided
    by ``2**exp`` on load (the path of a sequence with extreme rows; the same dots otherwise)."""
    best = tl.full((BM,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BM,), tl.int64)
    base = m_ptr + pid_b * sm_b
    a_off = a_tok.to(tl.int64)[:, None] * sm_n  # int64: N * C may pass 2**31
    if SCALED:
        ea = tl.load(exp_ptr + pid_b * N + a_tok, mask=a_ok, other=0)
        fa1 = _pow2(-(ea // 2))
        fa2 = _pow2(ea // 2 - ea)
    for j0 in range(0, nB, BN):
        bj = j0 + tl.arange(0, BN)
        b_ok = bj < nB
        b_tok = 2 * bj + 1
        inv_b = tl.load(inv_ptr + pid_b * N + b_tok, mask=b_ok, other=0.0)
        col_ok = b_ok
        if HAS_VALID:
            col_ok = col_ok & (tl.load(valid_ptr + pid_b * N + b_tok, mask=b_ok, other=0) != 0)
        if DIST:
            col_ok = col_ok & (bj != 0)
        if SCALED:
            eb = tl.load(exp_ptr + pid_b * N + b_tok, mask=b_ok, other=0)
            fb1 = _pow2(-(eb // 2))
            fb2 = _pow2(eb // 2 - eb)
        b_off = b_tok.to(tl.int64)[:, None] * sm_n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, C, BK):
            k = k0 + tl.arange(0, BK)
            km = k < C
            a = tl.load(base + a_off + k[None, :], mask=a_ok[:, None] & km[None, :], other=0.0)
            b = tl.load(base + b_off + k[None, :], mask=b_ok[:, None] & km[None, :], other=0.0)
            if SCALED:  # exact powers of two, back in the input dtype (like the unscaled path)
                a = (a.to(tl.float32) * fa1[:, None] * fa2[:, None]).to(a.dtype)
                b = (b.to(tl.float32) * fb1[:, None] * fb2[:, None]).to(b.dtype)
            if IEEE:
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            else:  # 16-bit inputs straight to the tensor cores, fp32 accumulation
                acc += tl.dot(a, tl.trans(b))
        s = acc * inv_a[:, None] * inv_b[None, :]
        s = tl.where(col_ok[None, :] & (s == s), s, float("-inf"))  # a NaN score never wins
        tile_max = tl.max(s, axis=1)
        tile_arg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + j0
        upd = tile_max > best  # strict: an equal later value keeps the earlier (lower) index
        best_idx = tl.where(upd, tile_arg, best_idx)
        best = tl.where(upd, tile_max, best)
    return best, best_idx


@triton.jit
def _match_kernel(m_ptr, inv_ptr, valid_ptr, exp_ptr, flag_ptr, max_ptr, idx_ptr, N, C, nA, nB, sm_b, sm_n,
                  CLS: tl.constexpr, DIST: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                  SCALE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    ai = pid_m * BM + tl.arange(0, BM)
    a_ok = ai < nA
    a_tok = 2 * ai
    inv_a = tl.load(inv_ptr + pid_b * N + a_tok, mask=a_ok, other=0.0)
    row_ok = a_ok
    if HAS_VALID:
        row_ok = row_ok & (tl.load(valid_ptr + pid_b * N + a_tok, mask=a_ok, other=0) != 0)
    if CLS:
        row_ok = row_ok & (ai != 0)
    if SCALE:  # a sequence with extreme rows takes the exact scaled path (uniform per program)
        if tl.load(flag_ptr + pid_b) != 0:
            best, best_idx = _match_tiles(m_ptr, inv_ptr, valid_ptr, exp_ptr, N, C, nA, nB, sm_b, sm_n, pid_b, ai,
                                          a_ok, a_tok, inv_a, DIST, HAS_VALID, IEEE, True, BM, BN, BK)
        else:
            best, best_idx = _match_tiles(m_ptr, inv_ptr, valid_ptr, exp_ptr, N, C, nA, nB, sm_b, sm_n, pid_b, ai,
                                          a_ok, a_tok, inv_a, DIST, HAS_VALID, IEEE, False, BM, BN, BK)
    else:
        best, best_idx = _match_tiles(m_ptr, inv_ptr, valid_ptr, exp_ptr, N, C, nA, nB, sm_b, sm_n, pid_b, ai,
                                      a_ok, a_tok, inv_a, DIST, HAS_VALID, IEEE, False, BM, BN, BK)
    best = tl.where(row_ok, best, float("-inf"))
    best_idx = tl.where(row_ok, best_idx, 0)
    tl.store(max_ptr + pid_b * nA + ai, best, mask=a_ok)
    tl.store(idx_ptr + pid_b * nA + ai, best_idx, mask=a_ok)


def _inv_norm(metric: torch.Tensor) -> torch.Tensor:
    # 1 / ||m||, fp32 (B, N) contiguous; an extra O(N C) read, no fp32 copy of metric (on a GPU the
    # fp16/bf16 -> fp32 norm reduction casts in registers).
    return torch.linalg.vector_norm(metric, dim=-1, dtype=torch.float32).reciprocal_().contiguous()


def _norms(metric: torch.Tensor, scale: bool):
    """``(inv, exp, flag)``: fp32 ``(B, N)`` inverse norms, int32 ``(B, N)`` row exponents and int32
    ``(B,)`` sequence flags (``exp``/``flag`` only with ``scale``): one read of ``metric``, O(B N)."""
    B, N, C = metric.shape
    inv = new_output((B, N), torch.float32, metric.device)
    ex = torch.empty((B, N), dtype=torch.int32, device=metric.device) if scale else inv
    flag = torch.zeros((B,), dtype=torch.int32, device=metric.device) if scale else inv
    rows = B * N
    if rows == 0:
        return inv, ex, flag
    br = 16 if _interp() else 8
    bc = min(max(16, triton.next_power_of_2(C)), 64 if _interp() else 256)
    _row_norm_kernel[(triton.cdiv(rows, br),)](metric, inv, ex, flag, rows, N, C, SCALE=scale, BR=br, BC=bc)
    return inv, ex, flag


def tome_match(metric: torch.Tensor, valid, class_token: bool, distill_token: bool):
    B, N, C = metric.shape
    nA, nB = (N + 1) // 2, N // 2
    node_max = new_output((B, nA), torch.float32, metric.device)
    node_idx = new_output((B, nA), torch.int64, metric.device)
    scale = metric.dtype != torch.float16  # fp16 is never out of the fp32 dot's range
    inv, ex, flag = _norms(metric, scale)
    bm, bn, bk = _tiles(nA, nB, C)
    v = valid.to(torch.int8).contiguous() if valid is not None else inv
    _match_kernel[(triton.cdiv(nA, bm), B)](
        metric, inv, v, ex, flag, node_max, node_idx, N, C, nA, nB, metric.stride(0), metric.stride(1),
        CLS=class_token, DIST=distill_token, HAS_VALID=valid is not None,
        IEEE=metric.dtype == torch.float32, SCALE=scale, BM=bm, BN=bn, BK=bk)
    return node_max, node_idx


@triton.jit
def _energy_kernel(m_ptr, inv_ptr, out_ptr, N, C, sm_b, sm_n, margin, alpha,
                   ELU: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    i = pid_m * BM + tl.arange(0, BM)
    i_ok = i < N
    inv_i = tl.load(inv_ptr + pid_b * N + i, mask=i_ok, other=0.0)
    acc = tl.zeros((BM,), tl.float32)
    for j0 in range(0, N, BN):
        j = j0 + tl.arange(0, BN)
        j_ok = j < N
        inv_j = tl.load(inv_ptr + pid_b * N + j, mask=j_ok, other=0.0)
        s = _dot_tile(m_ptr, sm_b, sm_n, pid_b, i, i_ok, j, j_ok, C, BM, BN, BK, IEEE)
        s = s * inv_i[:, None] * inv_j[None, :]
        neg = alpha * (tl.exp(s - margin) - 1.0)
        if ELU:
            f = tl.where(s > margin, s - margin, neg)
        else:
            f = tl.where(s >= margin, s, neg)
        acc += tl.sum(tl.where(j_ok[None, :], f, 0.0), axis=1)
    tl.store(out_ptr + pid_b * N + i, acc / N, mask=i_ok)


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float, elu: bool):
    B, N, C = metric.shape
    out = new_output((B, N), torch.float32, metric.device)
    inv = _inv_norm(metric)
    bm, bn, bk = _tiles(N, N, C)
    _energy_kernel[(triton.cdiv(N, bm), B)](
        metric, inv, out, N, C, metric.stride(0), metric.stride(1), float(margin), float(alpha),
        ELU=elu, IEEE=metric.dtype == torch.float32, BM=bm, BN=bn, BK=bk)
    return out


@triton.jit
def _segment_reduce_kernel(x_ptr, order_ptr, offs_ptr, out_ptr, N, C, n_out,
                           MODE: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_out
    o = pid % n_out
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    start = tl.load(offs_ptr + b * (n_out + 1) + o)
    end = tl.load(offs_ptr + b * (n_out + 1) + o + 1)
    if MODE == 2:
        acc = tl.full((BC,), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BC,), tl.float32)
    for p in range(start, end):
        t = tl.load(order_ptr + b * N + p)
        v = tl.load(x_ptr + (b * N + t) * C + c, mask=cm, other=0.0).to(tl.float32)
        if MODE == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    cnt = (end - start).to(tl.float32)
    if MODE == 1:
        acc = acc / tl.maximum(cnt, 1.0)
    if MODE == 2:
        acc = tl.where(cnt > 0, acc, 0.0)
    tl.store(out_ptr + (b * n_out + o) * C + c, acc.to(out_ptr.dtype.element_ty), mask=cm)


def segment_reduce(x: torch.Tensor, slot, order, offsets, mode: str):
    B, N, C = x.shape
    n_out = offsets.shape[1] - 1
    out = new_output((B, n_out, C), x.dtype, x.device)
    if B * n_out == 0:
        return out
    bc = min(triton.next_power_of_2(C), 256)
    _segment_reduce_kernel[(B * n_out, triton.cdiv(C, bc))](
        x, order, offsets, out, N, C, n_out, MODE=_MODES[mode], BC=bc)
    return out


@triton.jit
def _gather_kernel_b(x_ptr, idx_ptr, out_ptr, Mb, N_in, C, fill, BR: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    im = i < Mb
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    idx = tl.load(idx_ptr + b * Mb + i, mask=im, other=-1)
    take = idx >= 0
    src = (b * N_in + tl.where(take, idx, 0)) * C
    v = tl.load(x_ptr + src[:, None] + c[None, :], mask=(im & take)[:, None] & cm[None, :], other=0.0)
    v = tl.where(take[:, None], v.to(tl.float32), fill)
    tl.store(out_ptr + (b * Mb + i)[:, None] * C + c[None, :], v.to(out_ptr.dtype.element_ty),
             mask=im[:, None] & cm[None, :])


def token_gather(x: torch.Tensor, idx: torch.Tensor, fill: float):
    B, N_in, C = x.shape
    M = idx.shape[1]
    out = new_output((B, M, C), x.dtype, x.device)
    if B * M == 0:
        return out
    bc = min(triton.next_power_of_2(C), 256 if _interp() else 512)
    br = max(1, min(16 if _interp() else 32, 4096 // bc))
    _gather_kernel_b[(triton.cdiv(M, br), triton.cdiv(C, bc), B)](
        x, idx, out, M, N_in, C, float(fill), BR=br, BC=bc)
    return out
