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
def _match_kernel(m_ptr, inv_ptr, valid_ptr, max_ptr, idx_ptr, N, C, nA, nB, sm_b, sm_n,
                  CLS: tl.constexpr, DIST: tl.constexpr, HAS_VALID: tl.constexpr, IEEE: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
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
    best = tl.full((BM,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BM,), tl.int64)
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
        s = _dot_tile(m_ptr, sm_b, sm_n, pid_b, a_tok, a_ok, b_tok, b_ok, C, BM, BN, BK, IEEE)
        s = s * inv_a[:, None] * inv_b[None, :]
        s = tl.where(col_ok[None, :] & (s == s), s, float("-inf"))  # a NaN score never wins
        tile_max = tl.max(s, axis=1)
        tile_arg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + j0
        upd = tile_max > best  # strict: an equal later value keeps the earlier (lower) index
        best_idx = tl.where(upd, tile_arg, best_idx)
        best = tl.where(upd, tile_max, best)
    best = tl.where(row_ok, best, float("-inf"))
    best_idx = tl.where(row_ok, best_idx, 0)
    tl.store(max_ptr + pid_b * nA + ai, best, mask=a_ok)
    tl.store(idx_ptr + pid_b * nA + ai, best_idx, mask=a_ok)


def _inv_norm(metric: torch.Tensor) -> torch.Tensor:
    # 1 / ||m||, fp32 (B, N) contiguous; an extra O(N C) read.
    return (1.0 / metric.float().norm(dim=-1)).contiguous()


def tome_match(metric: torch.Tensor, valid, class_token: bool, distill_token: bool):
    B, N, C = metric.shape
    nA, nB = (N + 1) // 2, N // 2
    node_max = new_output((B, nA), torch.float32, metric.device)
    node_idx = new_output((B, nA), torch.int64, metric.device)
    inv = _inv_norm(metric)
    bm, bn, bk = _tiles(nA, nB, C)
    v = valid.to(torch.int8).contiguous() if valid is not None else inv
    _match_kernel[(triton.cdiv(nA, bm), B)](
        metric, inv, v, node_max, node_idx, N, C, nA, nB, metric.stride(0), metric.stride(1),
        CLS=class_token, DIST=distill_token, HAS_VALID=valid is not None,
        IEEE=metric.dtype == torch.float32, BM=bm, BN=bn, BK=bk)
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
