"""Pure-torch references (the oracles) for token merging and pruning.

* :func:`bipartite_soft_matching` / :func:`merge` / :func:`merge_wavg` / :func:`merge_source` /
  :func:`unmerge`: ToMe (Bolya et al., ICLR 2023), DESIGN.md "Token merging" steps 1-7, written
  after the semantics of facebookresearch/ToMe ``tome/merge.py`` with index tensors
  (gather / scatter_reduce / cat) exactly as described there.  Differences from that code, on
  purpose: scores are computed in ``score_dtype`` (fp32 by default, float64 for the tests) instead
  of the input dtype, and ``argsort`` is *stable* so that exactly equal ``node_max`` values keep
  ascending A-token order (ToMe's unstable sort leaves that order unspecified).
* :func:`padded_groups`: a row-by-row, list-based oracle for padded batches (``valid`` masks).
* :func:`pitome_energy` and :func:`pitome_groups`: PiToMe energy and candidate split with the
  full N x N similarity matrix.
* The ``*_torch`` functions are the ``backend="torch"`` implementations of the registered ops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MODES = ("sum", "mean", "amax")


# =========================================================================== ToMe reference
class RefMatching(NamedTuple):
    unm_idx: torch.Tensor | None  # (B, nA - r) A-indices of the kept A tokens, in output order
    src_idx: torch.Tensor | None  # (B, r) A-indices of the merged A tokens
    dst_idx: torch.Tensor | None  # (B, r) B-indices they merge into
    r: int
    N: int
    class_token: bool
    distill_token: bool


def _scores(metric: torch.Tensor, class_token: bool, distill_token: bool, score_dtype) -> torch.Tensor:
    m = metric.to(score_dtype)
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, 0::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token and scores.shape[-1]:
        scores[:, :, 0] = -math.inf
    return scores


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False,
                            distill_token: bool = False, score_dtype=torch.float32) -> RefMatching:
    """ToMe bipartite soft matching, DESIGN.md steps 1-5 (materialises the scores)."""
    B, N, _ = metric.shape
    protected = int(class_token) + int(distill_token)
    r = min(r, (N - protected) // 2)
    if r <= 0:
        return RefMatching(None, None, None, 0, N, class_token, distill_token)
    with torch.no_grad():
        scores = _scores(metric, class_token, distill_token, score_dtype)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = torch.argsort(node_max, dim=-1, descending=True, stable=True)
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1).values
    return RefMatching(unm_idx, src_idx, dst_idx, r, N, class_token, distill_token)


def merge(m: RefMatching, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """DESIGN.md step 6: ``cat([unm, dst.scatter_reduce(dst_idx, src, mode)])``."""
    if m.r <= 0:
        return x
    src, dst = x[:, 0::2], x[:, 1::2]
    n, t1, c = src.shape
    unm = src.gather(1, m.unm_idx[..., None].expand(n, t1 - m.r, c))
    src = src.gather(1, m.src_idx[..., None].expand(n, m.r, c))
    dst = dst.scatter_reduce(1, m.dst_idx[..., None].expand(n, m.r, c), src, reduce=mode)
    if m.distill_token:
        return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    return torch.cat([unm, dst], dim=1)


def merge_wavg(m: RefMatching, x: torch.Tensor, size: torch.Tensor | None = None):
    """DESIGN.md step 7: size-weighted average; returns ``(x, size)``."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(m, x * size, "sum")
    size = merge(m, size, "sum")
    return x / size, size


def merge_source(m: RefMatching, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
    """Source tracking: ``(B, N_out, N_0)`` 0/1 map from merged tokens to original tokens."""
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype)[None].expand(n, t, t)
    return merge(m, source, "amax")


def unmerge(m: RefMatching, x: torch.Tensor) -> torch.Tensor:
    """Restore length N: every merged token is copied back to its sources."""
    if m.r <= 0:
        return x
    n, _, c = x.shape
    unm_len = m.unm_idx.shape[1]
    if m.distill_token:
        unm = torch.cat([x[:, :1], x[:, 2:unm_len + 1]], 1)
        dst = torch.cat([x[:, 1:2], x[:, unm_len + 1:]], 1)
    else:
        unm, dst = x[:, :unm_len], x[:, unm_len:]
    src = dst.gather(1, m.dst_idx[..., None].expand(n, m.r, c))
    out = torch.zeros(n, m.N, c, device=x.device, dtype=x.dtype)
    out[:, 1::2] = dst
    out.scatter_(1, (2 * m.unm_idx)[..., None].expand(n, unm_len, c), unm)
    out.scatter_(1, (2 * m.src_idx)[..., None].expand(n, m.r, c), src)
    return out


# =========================================================================== padded-batch oracle
def rows_r(r, n_valid: list[int], protected: int) -> list[int]:
    """Per-row merge count: ``r`` (int) or ``floor(r * n_valid)`` (float fraction), never more than
    ``(n_valid - protected) // 2``."""
    out = []
    for n in n_valid:
        want = r if isinstance(r, int) else math.floor(r * n)
        out.append(max(0, min(want, (n - protected) // 2)))
    return out


def padded_groups(metric: torch.Tensor, valid: torch.Tensor, r, class_token: bool = False,
                  distill_token: bool = False, min_keep=None, threshold=None) -> list[list[list[int]]]:
    """Row-by-row list oracle of padded matching (DESIGN.md "Padded batches").

    For each row: scores in float64 with invalid rows/columns at -inf, stable argsort, the first
    ``r_b`` A tokens that can merge are merged; the output row is the ToMe layout of the surviving
    *valid* tokens.  Returns, per row, the list of output groups (each a list of original token
    indices, the surviving token first).  The number of mergeable sources is also capped by the
    number of valid non-protected A tokens, and is 0 without a valid destination.
    Length safety: ``min_keep`` (int or a list / tensor per row): row ``b`` keeps at least
    ``min_keep[b]`` valid tokens; ``threshold``: only sources with ``node_max >= threshold`` merge.
    """
    B, N, _ = metric.shape
    protected = int(class_token) + int(distill_token)
    out = []
    for b in range(B):
        v = valid[b].tolist()
        nA, nB = (N + 1) // 2, N // 2
        (r_b,) = rows_r(r, [sum(v)], protected)
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True)
        s = m[0::2] @ m[1::2].T
        for i in range(nA):
            for j in range(nB):
                if not (v[2 * i] and v[2 * j + 1]) or (class_token and i == 0) or (distill_token and j == 0):
                    s[i, j] = -math.inf
        if nB == 0:
            out.append([[i] for i in range(N) if v[i]])
            continue
        node_max, node_idx = s.max(dim=-1)
        n_src = sum(1 for i in range(nA) if node_max[i] > -math.inf)
        r_b = min(r_b, n_src)
        if min_keep is not None:
            mk = min_keep if isinstance(min_keep, int) else int(min_keep[b])
            r_b = min(r_b, max(0, sum(v) - mk))
        if threshold is not None:
            r_b = min(r_b, sum(1 for i in range(nA) if node_max[i] >= threshold))
        if r_b == 0:
            out.append([[i] for i in range(N) if v[i]])
            continue
        edge = torch.argsort(node_max, descending=True, stable=True).tolist()
        src, unm = edge[:r_b], edge[r_b:]
        if class_token:
            unm = sorted(unm)
        dst_groups = [[2 * j + 1] for j in range(nB)]
        for a in src:
            dst_groups[node_idx[a].item()].append(2 * a)
        unm_groups = [[2 * a] for a in unm]
        if distill_token:
            layout = unm_groups[:1] + dst_groups[:1] + unm_groups[1:] + dst_groups[1:]
        else:
            layout = unm_groups + dst_groups
        out.append([g for g in layout if v[g[0]]])
    return out


def apply_groups(groups: list[list[list[int]]], x: torch.Tensor, n_out: int, mode: str = "sum") -> torch.Tensor:
    """Reduce ``x`` over the groups of :func:`padded_groups`; padding rows are 0."""
    B, _, C = x.shape
    out = torch.zeros(B, n_out, C, dtype=x.dtype, device=x.device)
    for b, row in enumerate(groups):
        for o, g in enumerate(row):
            xs = x[b, g]
            out[b, o] = {"sum": xs.sum(0), "mean": xs.mean(0), "amax": xs.amax(0)}[mode]
    return out


# =========================================================================== PiToMe reference
def pitome_f(s: torch.Tensor, margin: float, alpha: float, formula: str) -> torch.Tensor:
    """``design``: f(s) = s if s >= m else alpha (exp(s - m) - 1)  (DESIGN.md / paper eq.);
    ``elu``: f(s) = ELU(s - m, alpha) (hchautran/PiToMe ``pitome_vision`` code)."""
    neg = alpha * (torch.exp(s - margin) - 1)
    pos = s if formula == "design" else s - margin
    if formula == "design":
        return torch.where(s >= margin, pos, neg)
    return torch.where(s > margin, pos, neg)


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float = 1.0, formula: str = "design",
                  score_dtype=torch.float32) -> torch.Tensor:
    """``E_i = mean_j f(cos(x_i, x_j))`` with the full (B, N, N) matrix. Returns fp32 (B, N)."""
    m = metric.to(score_dtype)
    m = m / m.norm(dim=-1, keepdim=True)
    sim = m @ m.transpose(-1, -2)
    return pitome_f(sim, margin, alpha, formula).mean(-1).float()


def pitome_groups(metric: torch.Tensor, r: int, margin: float, alpha: float = 1.0, class_token: bool = False,
                  formula: str = "elu", score_dtype=torch.float64):
    """The PiToMe candidate split of hchautran/PiToMe ``pitome_vision`` + ``pitome`` (see
    :func:`tokops.merge.pitome_merge`), with the full similarity matrix.  Returns
    ``(protected_idx, a_idx, b_idx, dst_idx)`` (indices into the tokens after the class token)."""
    m = metric[:, 1:] if class_token else metric
    energy = pitome_energy(m, margin, alpha, formula, score_dtype)
    indices = torch.argsort(energy, dim=-1, descending=True, stable=True)
    merge_idx, protected_idx = indices[:, :2 * r], indices[:, 2 * r:]
    a_idx, b_idx = merge_idx[:, 0::2], merge_idx[:, 1::2]
    mm = m.to(score_dtype)
    mm = mm / mm.norm(dim=-1, keepdim=True)
    sim = mm @ mm.transpose(-1, -2)
    B = m.shape[0]
    bi = torch.arange(B, device=m.device)[:, None, None]
    scores = sim[bi, a_idx[:, :, None], b_idx[:, None, :]]
    dst_idx = scores.max(dim=-1).indices
    return protected_idx, a_idx, b_idx, dst_idx


def pitome_merge_ref(metric, x, r, margin, alpha=1.0, class_token=False, formula="elu", mode="mean"):
    """``cat([x_cls, protected, dst.scatter_reduce(dst_idx, src, mode)])`` as in hchautran/PiToMe."""
    protected_idx, a_idx, b_idx, dst_idx = pitome_groups(metric, r, margin, alpha, class_token, formula)
    if class_token:
        x_cls, x = x[:, :1], x[:, 1:]
    B, _, C = x.shape
    g = lambda idx: x.gather(1, idx[..., None].expand(B, idx.shape[1], C))  # noqa: E731
    dst = g(b_idx).scatter_reduce(1, dst_idx[..., None].expand(B, r, C), g(a_idx), reduce=mode)
    parts = ([x_cls] if class_token else []) + [g(protected_idx), dst]
    return torch.cat(parts, 1)


# =========================================================================== op implementations (torch backend)
def _chunk_rows(n_rows: int, n_cols: int, budget: int = 1 << 24) -> int:
    return max(1, min(n_rows, budget // max(1, n_cols)))


_HUGE, _TINY = 2.0 ** 50, 2.0 ** -50


def row_exponent(m: torch.Tensor) -> torch.Tensor:
    """int32 ``(..., 1)``: ``e`` with ``max|row| = f * 2**e``, ``f`` in [0.5, 1), for the rows whose
    fp32 dots would overflow or flush (``max|row| > 2**50`` or ``< 2**-50``, finite, non-zero), else
    0.  Every match backend divides such a row by ``2**e`` (exact; cosine is scale invariant)."""
    amax = torch.maximum(m.amax(-1, keepdim=True), -m.amin(-1, keepdim=True)).float()  # no |m| copy
    need = ((amax > _HUGE) | (amax < _TINY)) & (amax > 0) & torch.isfinite(amax)
    return torch.where(need, torch.frexp(amax).exponent, 0).to(torch.int32)


def _unit(metric: torch.Tensor, rescale: bool = False) -> torch.Tensor:
    m = metric.float()
    if rescale:  # rows of extreme magnitude divided by 2**e, in two exact power-of-two steps
        e = row_exponent(m).float()
        h = torch.trunc(e / 2)
        m = m * torch.exp2(-h) * torch.exp2(h - e)
    return m / m.norm(dim=-1, keepdim=True)


def tome_match_torch(metric, valid, class_token: bool, distill_token: bool):
    """``node_max, node_idx = max_j cos(a_i, b_j)`` (fp32, int64), chunked over A rows so that
    at most ~16M scores live at once.  Rows of extreme magnitude are rescaled first (``row_exponent``)."""
    m = _unit(metric, rescale=True)
    a, b = m[:, 0::2], m[:, 1::2]
    B, nA, nB = a.shape[0], a.shape[1], b.shape[1]
    if nB == 0:  # a single token: nothing to match
        return (torch.full((B, nA), -math.inf, dtype=torch.float32, device=m.device),
                torch.zeros(B, nA, dtype=torch.int64, device=m.device))
    col_ok = torch.ones(B, nB, dtype=torch.bool, device=m.device)
    row_ok = torch.ones(B, nA, dtype=torch.bool, device=m.device)
    if valid is not None:
        col_ok = col_ok & valid[:, 1::2]
        row_ok = row_ok & valid[:, 0::2]
    if distill_token:
        col_ok[:, 0] = False
    if class_token:
        row_ok[:, 0] = False
    node_max = torch.empty(B, nA, dtype=torch.float32, device=m.device)
    node_idx = torch.empty(B, nA, dtype=torch.int64, device=m.device)
    step = _chunk_rows(nA, B * nB)
    for i in range(0, nA, step):
        s = a[:, i:i + step] @ b.transpose(-1, -2)
        s = s.masked_fill(torch.isnan(s), -math.inf)  # a NaN score never wins (same on every backend)
        s = s.masked_fill(~col_ok[:, None, :] | ~row_ok[:, i:i + step, None], -math.inf)
        mx, ix = s.max(dim=-1)
        node_max[:, i:i + step] = mx
        node_idx[:, i:i + step] = ix
    return node_max, node_idx


def segment_reduce_torch(x, slot, order, offsets, mode: str):
    """``out[b, o] = reduce_{i: slot[b,i]==o} x[b, i]`` (fp32 accumulation); empty slots are 0;
    ``slot < 0`` drops the token.  ``order``/``offsets`` (the CSR form) are not needed here."""
    B, N, C = x.shape
    n_out = offsets.shape[1] - 1
    key = torch.where(slot < 0, n_out, slot)[..., None].expand(B, N, C)
    acc = x.float()
    out = torch.zeros(B, n_out + 1, C, dtype=torch.float32, device=x.device)
    out = out.scatter_reduce(1, key, acc, reduce=mode, include_self=False)
    return out[:, :n_out].to(x.dtype).contiguous()


def token_gather_torch(x, idx, fill: float):
    """``out[b, i] = x[b, idx[b, i]]`` if ``idx >= 0`` else ``fill``."""
    B, M = idx.shape
    C = x.shape[-1]
    g = x.gather(1, idx.clamp_min(0)[..., None].expand(B, M, C))
    return torch.where((idx >= 0)[..., None], g, torch.full((), fill, dtype=x.dtype, device=x.device))


def pitome_energy_torch(metric, margin: float, alpha: float, elu: bool):
    """Energy with the matrix chunked over rows (at most ~16M similarities at once)."""
    m = _unit(metric)
    B, N, _ = m.shape
    out = torch.empty(B, N, dtype=torch.float32, device=m.device)
    step = _chunk_rows(N, B * N)
    formula = "elu" if elu else "design"
    for i in range(0, N, step):
        s = m[:, i:i + step] @ m.transpose(-1, -2)
        out[:, i:i + step] = pitome_f(s, margin, alpha, formula).mean(-1)
    return out
