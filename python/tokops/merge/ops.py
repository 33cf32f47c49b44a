"""Token merging (ToMe, PiToMe) and token pruning.

Papers: Bolya et al., "Token Merging: Your ViT But Faster" (ICLR 2023; reference code
facebookresearch/ToMe ``tome/merge.py``); Tran et al., "Accelerating Transformers with Spectrum-
Preserving Token Merging" (PiToMe, NeurIPS 2024; reference code hchautran/PiToMe).
Exact spec: ``DESIGN.md`` ("Token merging", "PiToMe energy", "Token pruning"); oracle:
:mod:`tokops.merge.reference`.

Every merge is described by a :class:`Matching`: ``slot[b, i]``, the output position of input token
``i`` (``-1``: dropped padding).  Merging is then one fused gather + scatter-reduce op
(``tokops::tome_segment_reduce``, CSR form ``order``/``offsets``), unmerging one gather op
(``tokops::token_gather``); both have autograd (the matching itself is not differentiable).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import _known_valid
from .. import _registry as reg
from .._checks import FLOAT_DTYPES, check_int, check_same_device, check_shape, check_tensor, dense
from . import reference as ref

MODES = ref.MODES
FORMULAS = ("design", "elu")
PITOME_FORMULA = "elu"  # default of pitome_energy and pitome_merge: the formula hchautran/PiToMe ranks by


class Matching(NamedTuple):
    """A token merge: where every input token goes.

    ``slot``: int64 ``(B, N)``, output position of each input token, ``-1`` for a dropped padding
    token; ``order``/``offsets``: the same map in CSR form (input tokens sorted by slot, and the
    start of each of the ``n_out`` output tokens), used by the fused merge kernel.
    ``unm_idx``/``src_idx``/``dst_idx``: ToMe's own index form (``None`` for padded batches and
    PiToMe).  ``valid``: ``(B, n_out)`` bool, which output tokens are real (``None`` when no mask
    was given).  ``r_rows``: ``(B,)`` tokens merged per row (``None`` when ``r`` is the same for
    every row).
    """

    slot: torch.Tensor
    order: torch.Tensor
    offsets: torch.Tensor
    n_out: int
    N: int
    r: int
    class_token: bool
    distill_token: bool
    unm_idx: torch.Tensor | None
    src_idx: torch.Tensor | None
    dst_idx: torch.Tensor | None
    valid: torch.Tensor | None
    r_rows: torch.Tensor | None

    def merge(self, x: torch.Tensor, mode: str = "mean", *, backend: str = "auto") -> torch.Tensor:
        return merge(self, x, mode, backend=backend)

    def unmerge(self, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        return unmerge(self, x, backend=backend)

    @property
    def is_identity(self) -> bool:
        return self.r == 0 and self.valid is None


# --------------------------------------------------------------------------- checks (one helper per op)
def _check_metric(metric, name="metric") -> torch.Tensor:
    """Checks ``metric``; returns it, or one contiguous copy of a strided view (the merge kernels
    take contiguous inputs: the internal ``.contiguous()`` of DESIGN.md "Inputs")."""
    check_tensor(name, metric, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    return dense(metric)


def _check_r(r) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"r must be an int (tokens to merge) or a float fraction in [0, 1], "
                        f"got {type(r).__name__} ({r!r})")
    if isinstance(r, int):
        check_int("r", r, min_value=0)
    elif not (0.0 <= r <= 1.0):
        raise ValueError(f"r as a float must be a fraction of the valid tokens in [0, 1], got {r}")


def _check_matching(metric, r, class_token, distill_token, valid):
    """Checks; returns ``(metric, valid)``, contiguous (see :func:`_check_metric`)."""
    metric = _check_metric(metric)
    _check_r(r)
    for name, v in (("class_token", class_token), ("distill_token", distill_token)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if distill_token and not class_token:
        raise ValueError("distill_token=True needs class_token=True (the distillation token follows the class token)")
    if valid is not None:
        check_tensor("valid", valid, dtypes=(torch.bool,), ndim=2, contiguous=False)
        check_shape("valid", valid, metric.shape[:2])
        check_same_device(metric=metric, valid=valid)
    return metric, dense(valid)


def _check_merge_input(matching, x, name="x") -> torch.Tensor:
    if not isinstance(matching, Matching):
        raise TypeError(f"matching must be a tokops.merge.Matching, got {type(matching).__name__}")
    check_tensor(name, x, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    B, N = matching.slot.shape
    if x.shape[0] != B or x.shape[1] != N:
        raise ValueError(f"{name} must have shape ({B}, {N}, C) to match the matching's metric, got {tuple(x.shape)}")
    check_same_device(**{name: x, "matching.slot": matching.slot})
    return dense(x)  # the merge kernels take contiguous inputs: one internal copy of a strided view


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# --------------------------------------------------------------------------- op definitions
def _match_fake(metric, valid, class_token, distill_token, backend):
    B, N, _ = metric.shape
    nA = (N + 1) // 2
    return metric.new_empty((B, nA), dtype=torch.float32), metric.new_empty((B, nA), dtype=torch.int64)


def _segment_reduce_fake(x, slot, order, offsets, mode, backend):
    return x.new_empty((x.shape[0], offsets.shape[1] - 1, x.shape[2]))


def _gather_fake(x, idx, fill, backend):
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


def _energy_fake(metric, margin, alpha, elu, backend):
    return metric.new_empty(metric.shape[:2], dtype=torch.float32)


_match_op = reg.define(
    "tome_match",
    "(Tensor metric, Tensor? valid, bool class_token, bool distill_token, str backend) -> (Tensor, Tensor)",
    _match_fake)
_segment_reduce_op = reg.define(
    "tome_segment_reduce", "(Tensor x, Tensor slot, Tensor order, Tensor offsets, str mode, str backend) -> Tensor",
    _segment_reduce_fake, differentiable=True)
_gather_op = reg.define("token_gather", "(Tensor x, Tensor idx, float fill, str backend) -> Tensor", _gather_fake,
                        differentiable=True)
_energy_op = reg.define("pitome_energy", "(Tensor metric, float margin, float alpha, bool elu, str backend) -> Tensor",
                        _energy_fake)

reg.implements("tome_match", "torch", ref.tome_match_torch)
reg.implements("tome_segment_reduce", "torch", ref.segment_reduce_torch)
reg.implements("token_gather", "torch", ref.token_gather_torch)
reg.implements("pitome_energy", "torch", ref.pitome_energy_torch)
reg.implements("tome_match", "triton", "tokops.triton_kernels.merge:tome_match")
reg.implements("tome_segment_reduce", "triton", "tokops.triton_kernels.merge:segment_reduce")
reg.implements("token_gather", "triton", "tokops.triton_kernels.merge:token_gather")
reg.implements("pitome_energy", "triton", "tokops.triton_kernels.merge:pitome_energy")
reg.implements("tome_match", "cuda", reg.cuda_op("tome_match"))


# autograd: merge (segment reduce) <-> gather are each other's backward
def _sr_setup(ctx, inputs, output):
    x, slot, order, offsets, mode, backend = inputs
    ctx.mode, ctx.backend = mode, backend
    ctx.save_for_backward(x if mode == "amax" else None, slot, order, offsets, output if mode == "amax" else None)


def _sr_backward(ctx, grad):
    x, slot, order, offsets, out = ctx.saved_tensors
    grad = grad.contiguous()
    if ctx.mode == "mean":
        counts = (offsets[:, 1:] - offsets[:, :-1]).clamp_min(1).to(grad.dtype)
        grad = (grad / counts[..., None]).contiguous()
    gx = _gather_op(grad, slot, 0.0, ctx.backend)
    if ctx.mode == "amax":  # like scatter_reduce: split evenly between the members equal to the max
        eq = (x == _gather_op(out, slot, 0.0, ctx.backend)) & (slot >= 0)[..., None]
        n_eq = _segment_reduce_op(eq.to(grad.dtype).contiguous(), slot, order, offsets, "sum", ctx.backend)
        gx = _gather_op((grad / n_eq.clamp_min(1)).contiguous(), slot, 0.0, ctx.backend) * eq
    return gx, None, None, None, None, None


def _gather_setup(ctx, inputs, output):
    x, idx, fill, backend = inputs
    ctx.n_in = x.shape[1]
    ctx.save_for_backward(idx)


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    B, M, C = grad.shape
    g = torch.where((idx >= 0)[..., None], grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    gx = torch.zeros(B, ctx.n_in, C, dtype=torch.float32, device=grad.device)
    gx.scatter_add_(1, idx.clamp_min(0)[..., None].expand(B, M, C), g.float())
    return gx.to(grad.dtype), None, None, None


torch.library.register_autograd("tokops::tome_segment_reduce", _sr_backward, setup_context=_sr_setup)
torch.library.register_autograd("tokops::token_gather", _gather_backward, setup_context=_gather_setup)


# --------------------------------------------------------------------------- matching construction
def _rows_r(r, n_valid: torch.Tensor, protected: int) -> torch.Tensor:
    """Per-row merge count as a (B,) int64 tensor (see :func:`reference.rows_r`)."""
    if isinstance(r, int):
        want = torch.full_like(n_valid, r)
    else:
        want = torch.floor(n_valid.double() * r).to(torch.int64)
    return torch.minimum(want, torch.div(n_valid - protected, 2, rounding_mode="floor")).clamp_min(0)


def _csr(slot: torch.Tensor, n_out: int):
    B, N = slot.shape
    key = torch.where(slot < 0, n_out, slot)
    order = torch.argsort(key, dim=1, stable=True)
    counts = torch.zeros(B, n_out + 1, dtype=torch.int64, device=slot.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    offsets = torch.zeros(B, n_out + 1, dtype=torch.int64, device=slot.device)
    offsets[:, 1:] = torch.cumsum(counts[:, :n_out], 1)
    return order, offsets


def _check_length_safety(min_keep, threshold, B: int, device) -> None:
    """``min_keep``: None, an int >= 0 or an int64 ``(B,)`` tensor; ``threshold``: None or a float in [-1, 1]."""
    if min_keep is not None:
        if isinstance(min_keep, torch.Tensor):
            check_tensor("min_keep", min_keep, dtypes=(torch.int64, torch.int32), ndim=1, contiguous=False)
            check_shape("min_keep", min_keep, (B,))
            if min_keep.device != device:
                raise ValueError(f"min_keep must be on the device of metric ({device}), got {min_keep.device}")
        else:
            check_int("min_keep", min_keep, min_value=0)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float cosine similarity in [-1, 1] or None, "
                            f"got {type(threshold).__name__} ({threshold!r})")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")


def _limit_rows_r(r_rows, n_valid, node_max, min_keep, threshold):
    """Length safety, per row: keep at least ``min_keep`` valid tokens (``r_b <= n_valid_b - min_keep_b``)
    and merge only sources whose best similarity is at least ``threshold``."""
    if min_keep is not None:
        r_rows = torch.minimum(r_rows, (n_valid - min_keep).clamp_min(0))
    if threshold is not None:
        r_rows = torch.minimum(r_rows, (node_max >= threshold).sum(1))
    return r_rows


def _tome_layout(edge, node_idx, r_rows, N: int, class_token: bool, distill_token: bool):
    """Slot of every token in ToMe's layout ``cat([unm, dst])`` (distill: ``[unm0, dst0, unm1.., dst1..]``)
    when row b merges its first ``r_rows[b]`` A tokens of ``edge``.  Rows with ``r_b == 0`` are the
    identity (ToMe returns ``x`` unchanged)."""
    B, nA = edge.shape
    nB = N // 2
    dev = edge.device
    r_b = r_rows[:, None]
    ar_a = torch.arange(nA, device=dev).expand(B, nA)
    rank = torch.empty_like(edge).scatter_(1, edge, ar_a)  # position of each A token in edge order
    is_src = rank < r_b
    if class_token:
        unm_pos = torch.cumsum((~is_src).to(torch.int64), 1) - 1  # kept A tokens in ascending order
    else:
        unm_pos = rank - r_b
    n_unm = nA - r_b
    pos_b = n_unm + torch.arange(nB, device=dev)[None, :]
    if distill_token:
        unm_pos = unm_pos + (unm_pos >= 1).to(torch.int64)
        pos_b = torch.where(torch.arange(nB, device=dev)[None, :] == 0, 1, pos_b)
    if nB == 0:  # a single token: nothing can merge
        pos_a = unm_pos
    else:
        pos_a = torch.where(is_src, pos_b.gather(1, node_idx.clamp_max(nB - 1)), unm_pos)
    slot = torch.empty(B, N, dtype=torch.int64, device=dev)
    slot[:, 0::2] = pos_a
    slot[:, 1::2] = pos_b
    ident = torch.arange(N, device=dev).expand(B, N)
    return torch.where(r_b == 0, ident, slot), is_src


def _edge_order(node_max: torch.Tensor, class_token: bool) -> torch.Tensor:
    """``argsort(node_max, descending, stable)`` with the class token (A index 0) strictly last, even
    when other rows tie with it at ``-inf`` (rows without a finite score)."""
    edge = torch.argsort(node_max, dim=-1, descending=True, stable=True)
    if class_token:
        edge = edge.gather(1, torch.argsort((edge == 0).to(torch.int8), dim=-1, stable=True))
    return edge


def _finish(slot, n_out, N, r, class_token, distill_token, unm=None, src=None, dst=None, valid=None, r_rows=None):
    order, offsets = _csr(slot, n_out)
    return Matching(slot, order, offsets, n_out, N, r, class_token, distill_token, unm, src, dst, valid, r_rows)


def _identity(B: int, N: int, device, class_token=False, distill_token=False) -> Matching:
    slot = torch.arange(N, device=device).expand(B, N).contiguous()
    return _finish(slot, N, N, 0, class_token, distill_token)


def bipartite_soft_matching(metric: torch.Tensor, r, class_token: bool = False, distill_token: bool = False, *,
                            valid: torch.Tensor | None = None, backend: str = "auto", min_keep=None,
                            threshold: float | None = None) -> Matching:
    """ToMe bipartite soft matching of ``metric: (B, N, C)`` (fp16/bf16/fp32), DESIGN.md steps 1-5.

    ``r``: tokens to merge per row (int), or a float fraction in [0, 1] of each row's valid tokens
    (``floor(r * n_valid)``); never more than ``(n_valid - protected) // 2`` where ``protected =
    class_token + distill_token``.  A tokens are the even positions, B tokens the odd ones;
    ``node_max, node_idx = max_j cos(a_i, b_j)`` come from the fused ``tokops::tome_match`` kernel
    (running max over tiles of B tokens; the score matrix is never stored; fp32 scores; ties go to
    the lowest B index).  ``argsort(node_max)`` is stable.  ``class_token``: token 0 never merges
    (it sorts strictly last, whatever the ties); ``distill_token`` (needs ``class_token``): token 1
    never receives.

    Non-finite metrics (identical on every backend): a NaN score -- a token with a NaN/inf component
    or a zero norm on either side -- never wins a max (it counts as ``-inf``); an A token without any
    finite score has ``node_max = -inf`` and sorts after every A token with one (stable by index),
    before the protected class token.  Without ``valid`` such a token still merges (into B token 0)
    once ``r`` exceeds the tokens with a finite score; with ``valid`` it never merges.  Rows of huge
    or tiny magnitude are rescaled by a power of two first (exact), so they match like their
    normal-range copies (inside every match backend, without a copy of ``metric``).

    ``valid: (B, N) bool`` (padded batches): padding tokens are never sources or destinations; each
    row merges ``r_b`` of its own valid tokens; the output row holds the surviving valid tokens in
    ToMe's layout followed by padding (zeros, ``Matching.valid`` False), and ``n_out = max_b(n_valid_b
    - r_b)``.  Host syncs: the unpadded path (no ``valid``, no ``threshold``, ``min_keep`` None or an
    int) has none -- its output length ``N - r`` is known on the host.  The padded path has exactly
    one: ``n_out`` (and ``Matching.r = max_b r_b``) is read in one transfer, because the output shape
    depends on the per-row counts (no host-known length bounds it in general: NaN scores and
    ``threshold`` can make any row merge fewer tokens).

    Length safety (applied per row, after ``r``; DESIGN.md "Padded batches"):

    * ``min_keep``: int or int64 ``(B,)`` tensor; row ``b`` keeps at least ``min_keep[b]`` of its
      valid tokens (``r_b <= n_valid_b - min_keep_b``), so short rows are never collapsed.
    * ``threshold``: float cosine similarity ``tau`` in [-1, 1]; only sources whose best match has
      ``node_max >= tau`` merge (the first ``r_b`` of ``argsort(node_max)`` with ``node_max >= tau``),
      so the number merged adapts per row (the adaptive-rate idea of DiffRate / Zero-TPrune); ``r``
      is then the most a row may merge.  ``node_max`` is the fp32 score of the match kernel, so every
      backend (torch, Triton, CUDA) supports it.
    With a ``threshold`` or a per-row ``min_keep`` rows can merge different counts: the padded
    layout below is used (``valid`` defaults to all True) and the counts are read on the host.

    Returns a :class:`Matching`; apply it with :func:`merge`, :func:`merge_wavg`, :func:`merge_source`,
    :func:`unmerge`.
    """
    metric, valid = _check_matching(metric, r, class_token, distill_token, valid)
    B, N, _ = metric.shape
    _check_length_safety(min_keep, threshold, B, metric.device)
    protected = int(class_token) + int(distill_token)
    be = reg.resolve_backend("tome_match", backend, metric.device)
    if valid is None and (threshold is not None or isinstance(min_keep, torch.Tensor)):
        valid = torch.ones(B, N, dtype=torch.bool, device=metric.device)  # per-row counts: padded layout
    if valid is None:
        r_int = r if isinstance(r, int) else math.floor(r * N)
        r_int = min(r_int, (N - protected) // 2)
        if min_keep is not None:
            r_int = min(r_int, max(0, N - min_keep))
        if r_int <= 0:
            return _identity(B, N, metric.device, class_token, distill_token)
        with torch.no_grad():
            node_max, node_idx = _match_op(metric.detach(), None, class_token, distill_token, be)
            edge = _edge_order(node_max, class_token)
            src_idx = edge[:, :r_int]
            unm_idx = edge[:, r_int:]
            if class_token:
                unm_idx = unm_idx.sort(dim=1).values
            dst_idx = node_idx.gather(1, src_idx)
            r_rows = torch.full((B,), r_int, dtype=torch.int64, device=metric.device)
            slot, _ = _tome_layout(edge, node_idx, r_rows, N, class_token, distill_token)
        return _finish(slot, N - r_int, N, r_int, class_token, distill_token, unm_idx, src_idx, dst_idx)

    if metric.device.type == "meta":
        raise ValueError("valid: the padded path (valid=...) reads per-row token counts on the host and cannot "
                         "run on meta tensors; got metric and valid on the meta device")
    with torch.no_grad():
        node_max, node_idx = _match_op(metric.detach(), valid, class_token, distill_token, be)
        n_valid = valid.sum(1)
        r_rows = _rows_r(r, n_valid, protected)
        # never more sources than valid A tokens that have a valid destination (finite node_max)
        r_rows = torch.minimum(r_rows, torch.isfinite(node_max).sum(1))
        r_rows = _limit_rows_r(r_rows, n_valid, node_max, min_keep, threshold)
        edge = _edge_order(node_max, class_token)
        slot, is_src = _tome_layout(edge, node_idx, r_rows, N, class_token, distill_token)
        # compact: surviving valid tokens first (in layout order), padding dropped
        survivor = valid.clone()
        survivor[:, 0::2] &= ~is_src
        lay = torch.zeros(B, N, dtype=torch.int64, device=metric.device)  # 1 at each surviving layout position
        lay.scatter_add_(1, torch.where(survivor, slot, 0), survivor.to(torch.int64))
        new_pos = torch.cumsum(lay, 1) - 1
        comp = torch.where(survivor, new_pos.gather(1, slot.clamp(0, N - 1)), -1)
        # sources go where their destination went
        src_dst_tok = 2 * node_idx + 1  # (B, nA) destination token of each A token
        comp_a = torch.where(is_src & valid[:, 0::2], comp.gather(1, src_dst_tok.clamp_max(N - 1)), comp[:, 0::2])
        comp[:, 0::2] = comp_a
        n_keep = n_valid - r_rows
        # The one host sync of the padded path (issue 12): the output length max_b(n_keep_b) depends on
        # the data (per-row r, NaN scores, thresholds); read it together with Matching.r in one transfer.
        n_out, r_max = torch.stack([n_keep.max(), r_rows.max()]).tolist()
        out_valid = torch.arange(n_out, device=metric.device)[None, :] < n_keep[:, None]
    return _finish(comp, n_out, N, r_max, class_token, distill_token, valid=out_valid, r_rows=r_rows)


# --------------------------------------------------------------------------- applying a matching
def merge(matching: Matching, x: torch.Tensor, mode: str = "mean", *, backend: str = "auto") -> torch.Tensor:
    """Merge ``x: (B, N, C)`` (fp16/bf16/fp32) with ``matching``: ``(B, n_out, C)``.

    ``mode``: ``"mean"`` (destination and its sources averaged, ToMe's ``scatter_reduce(mean)``
    with ``include_self``), ``"sum"``, or ``"amax"``.  One fused gather + reduce kernel, fp32
    accumulation; padding outputs are 0.  Differentiable w.r.t. ``x``.
    """
    x = _check_merge_input(matching, x)
    _check_mode(mode)
    if matching.is_identity:
        return x
    be = reg.resolve_backend("tome_segment_reduce", backend, x.device)
    return _segment_reduce_op(x, matching.slot, matching.order, matching.offsets, mode, be)


def merge_wavg(matching: Matching, x: torch.Tensor, size: torch.Tensor | None = None, *, backend: str = "auto"):
    """Size-weighted average: ``x = merge(x * size, "sum") / merge(size, "sum")``; returns
    ``(x, size)`` with ``size`` starting at ones ``(B, N, 1)``.  Padding outputs get ``size = 0``
    and ``x = 0``, so ``log(size)`` as attention key bias masks them."""
    _check_merge_input(matching, x)
    if size is None:
        size = torch.ones_like(x[..., :1])
    else:
        _check_merge_input(matching, size, "size")
        check_shape("size", size, (*x.shape[:2], 1))
    xs = merge(matching, (x * size).contiguous(), "sum", backend=backend)
    size = merge(matching, size.contiguous(), "sum", backend=backend)
    denom = size if matching.valid is None else torch.where(size > 0, size, torch.ones_like(size))
    return xs / denom, size


def merge_source(matching: Matching, x: torch.Tensor, source: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """Source tracking: ``(B, n_out, N_0)`` with 1 where output token o contains original token j."""
    _check_merge_input(matching, x)
    if source is None:
        B, N, _ = x.shape
        source = torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)
    return merge(matching, source.contiguous(), "amax", backend=backend)


def unmerge(matching: Matching, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Inverse layout of :func:`merge`: ``(B, n_out, C) -> (B, N, C)``, every merged token copied
    back to each of its sources (dropped padding tokens get 0).  Differentiable."""
    if not isinstance(matching, Matching):
        raise TypeError(f"matching must be a tokops.merge.Matching, got {type(matching).__name__}")
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    x = dense(x)  # the gather kernel takes a contiguous input: one internal copy of a strided view
    B = matching.slot.shape[0]
    if x.shape[0] != B or x.shape[1] != matching.n_out:
        raise ValueError(f"x must have shape ({B}, {matching.n_out}, C) (the merged length), got {tuple(x.shape)}")
    check_same_device(x=x, **{"matching.slot": matching.slot})
    if matching.is_identity:
        return x
    be = reg.resolve_backend("token_gather", backend, x.device)
    return _gather_op(x, matching.slot, 0.0, be)


# --------------------------------------------------------------------------- PiToMe
def _check_energy(metric, margin, alpha, formula) -> torch.Tensor:
    """Checks; returns ``metric`` (contiguous, see :func:`_check_metric`)."""
    metric = _check_metric(metric)
    for name, v in (("margin", margin), ("alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    return metric


def pitome_energy(metric: torch.Tensor, margin: float, alpha: float = 1.0, *, formula: str = PITOME_FORMULA,
                  backend: str = "auto") -> torch.Tensor:
    """PiToMe energy ``E_i = (1/N) sum_j f(cos(x_i, x_j))`` of ``metric: (B, N, C)``; fp32 ``(B, N)``.

    Default ``formula="elu"``, the same as :func:`pitome_merge` (``PITOME_FORMULA``, see there why).
    ``formula="design"`` (DESIGN.md, the paper's equation): ``f(s) = s if s >= m else
    alpha (exp(s - m) - 1)``.  ``formula="elu"`` (what hchautran/PiToMe ``pitome_vision`` computes):
    ``f(s) = ELU(s - m, alpha)``, i.e. ``s - m`` above the margin: the two differ by ``m`` times the
    fraction of neighbours above the margin, so their rankings can differ.  The sum includes
    ``j = i``.  Tiled kernel: the N x N matrix is never stored.
    """
    metric = _check_energy(metric, margin, alpha, formula)
    be = reg.resolve_backend("pitome_energy", backend, metric.device)
    return _energy_op(metric, float(margin), float(alpha), formula == "elu", be)


def _pitome_r(r, ratio, T: int) -> int:
    """Tokens to merge from PiToMe's ``r`` (int) or ``ratio`` (fraction of the ``T`` tokens kept).

    ``r`` above ``T // 2`` is clipped to ``T // 2`` (as ToMe's ``bipartite_soft_matching`` in tokops,
    and PiToMe's own ``min(r, T // 2)``); ``ratio`` maps to ``r = floor(T - T * ratio)`` as in PiToMe
    and must be in ``[0.5, 1]``: a smaller ratio asks for more than half of the tokens in one step,
    which bipartite merging cannot give (PiToMe's code fails there), so it is an error, not a clip.
    """
    if ratio is None:
        if r is None:
            raise TypeError("pitome_merge: give r (tokens to merge, int) or ratio (fraction of tokens kept)")
        check_int("r", r, min_value=0)
        return min(r, T // 2)
    if r is not None:
        raise TypeError(f"pitome_merge: give r or ratio, not both (got r={r!r}, ratio={ratio!r})")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0.5, 1], got {type(ratio).__name__} ({ratio!r})")
    if not 0.5 <= ratio <= 1.0:
        raise ValueError(f"ratio (fraction of tokens kept) must be in [0.5, 1]: one merge step keeps at least "
                         f"half of the tokens; got {ratio}")
    return max(0, min(math.floor(T - T * ratio), T // 2))


def pitome_merge(metric: torch.Tensor, r: int | None = None, margin: float = 0.5, alpha: float = 1.0,
                 class_token: bool = False, *, ratio: float | None = None, formula: str = PITOME_FORMULA,
                 backend: str = "auto") -> Matching:
    """PiToMe merge plan, matching hchautran/PiToMe ``pitome_vision`` + ``pitome`` (algo/pitome/merge.py).

    How many tokens merge: ``r`` (int; values above ``T // 2`` are clipped to ``T // 2``, ``T`` the
    tokens after the class token, as ToMe in tokops and PiToMe's code do) or ``ratio=`` (PiToMe's form,
    the fraction of the ``T`` tokens kept: ``r = floor(T - T * ratio)``; ``ratio`` below 0.5 is a
    ``ValueError``).  ``margin`` defaults to 0.5 (PiToMe's default).

    Formula: ``formula="elu"`` by default, here and in :func:`pitome_energy` (one default for both,
    ``PITOME_FORMULA``): it is what the reference code ranks tokens by, so by default the same
    tokens merge as in the code a user switches from; ``formula="design"`` (the paper's equation,
    DESIGN.md) is available in both functions.

    What is matched (checked in tests against :func:`reference.pitome_merge_ref`, a transcription
    of that code's semantics with the full similarity matrix): the class token (``class_token``) is
    removed first and kept as output token 0; energy over the other ``T`` tokens (``formula="elu"``
    as in the code); tokens sorted by energy, descending; the first ``2r`` are merge candidates,
    split alternately into ``a = cand[0::2]`` (sources, all ``r`` of them merge) and
    ``b = cand[1::2]`` (destinations); each ``a`` merges into its most similar ``b`` (first index on
    ties); output ``cat([cls, protected (energy order), b (merged)])``.
    What could not be checked / differs: the reference's ``argsort`` is unstable (ours is stable,
    so only exactly equal energies may order differently); the reference computes similarities in
    the input dtype (ours: fp32); ``margin`` is a float here (the paper schedules it per layer; pass
    the layer's value); PiToMe's ``ratio`` maps to ``r = floor(T - T * ratio)``; the
    ``use_bsm_pitome`` and text (Gaussian kernel) variants are not implemented.
    """
    metric = _check_energy(metric, margin, alpha, formula)
    if not isinstance(class_token, bool):
        raise TypeError(f"class_token must be a bool, got {type(class_token).__name__}")
    B, N, C = metric.shape
    p = int(class_token)
    T = N - p
    r = _pitome_r(r, ratio, T)
    if r <= 0:
        return _identity(B, N, metric.device, class_token)
    with torch.no_grad():
        m = metric[:, p:].contiguous() if p else metric
        energy = pitome_energy(m, margin, alpha, formula=formula, backend=backend)
        indices = torch.argsort(energy, dim=-1, descending=True, stable=True)
        cand, protected_idx = indices[:, :2 * r], indices[:, 2 * r:]
        a_idx, b_idx = cand[:, 0::2], cand[:, 1::2]
        pair = torch.empty(B, 2 * r, C, dtype=metric.dtype, device=metric.device)
        pair[:, 0::2] = m.gather(1, a_idx[..., None].expand(B, r, C))
        pair[:, 1::2] = m.gather(1, b_idx[..., None].expand(B, r, C))
        be = reg.resolve_backend("tome_match", backend, metric.device)
        _, dst_idx = _match_op(pair, None, False, False, be)
        n_prot = T - 2 * r
        slot_t = torch.empty(B, T, dtype=torch.int64, device=metric.device)
        ar = torch.arange(max(n_prot, r), device=metric.device)
        slot_t.scatter_(1, protected_idx, (p + ar[:n_prot]).expand(B, n_prot))
        b_slot = (p + n_prot + ar[:r]).expand(B, r)
        slot_t.scatter_(1, b_idx, b_slot)
        slot_t.scatter_(1, a_idx, b_slot.gather(1, dst_idx))
        if p:
            slot = torch.cat([torch.zeros(B, 1, dtype=torch.int64, device=metric.device), slot_t], 1)
        else:
            slot = slot_t
    return _finish(slot, N - r, N, r, class_token, False)


# --------------------------------------------------------------------------- pruning
def prune_topk(x: torch.Tensor, scores: torch.Tensor, keep, protect=None, *, backend: str = "auto"):
    """Keep the ``keep`` highest-scoring tokens of ``x: (B, N, C)`` in their original order.

    ``scores: (B, N)`` (any float dtype); ``keep``: int in [1, N] or float fraction in (0, 1]
    (``max(1, floor(keep * N))``); ``protect``: ``None``, an int ``p`` (the first ``p`` tokens are
    always kept, ``p <= keep``) or a bool mask ``(B, N)``/``(N,)`` of tokens always kept (if more
    than ``keep`` are protected, the lowest-index ones win).  Equal scores keep the lower index.
    Returns ``(x_kept (B, keep, C), kept_idx (B, keep) int64, ascending)``; gradients flow to the
    kept tokens.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    x = dense(x)  # the gather kernel takes a contiguous input: one internal copy of a strided view
    check_tensor("scores", scores, ndim=2, contiguous=False)
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating tensor, got {scores.dtype}")
    check_shape("scores", scores, x.shape[:2])
    check_same_device(x=x, scores=scores)
    B, N, _ = x.shape
    if isinstance(keep, float) and not isinstance(keep, bool):
        if not (0.0 < keep <= 1.0):
            raise ValueError(f"keep as a float must be a fraction in (0, 1], got {keep}")
        keep = max(1, math.floor(keep * N))
    check_int("keep", keep, min_value=1, max_value=N)
    s = scores.detach().float()
    if protect is not None:
        if isinstance(protect, int) and not isinstance(protect, bool):
            check_int("protect", protect, min_value=0, max_value=keep)
            mask = torch.arange(N, device=x.device) < protect
        elif isinstance(protect, torch.Tensor):
            if protect.dtype != torch.bool or protect.shape not in ((B, N), (N,)):
                raise ValueError(f"protect must be an int or a bool mask of shape ({B}, {N}) or ({N},), "
                                 f"got {protect.dtype} {tuple(protect.shape)}")
            check_same_device(x=x, protect=protect)
            mask = protect
        else:
            raise TypeError(f"protect must be None, an int or a bool tensor, got {type(protect).__name__}")
        s = s.masked_fill(mask.expand(B, N), math.inf)
    with torch.no_grad():
        kept_idx = torch.argsort(s, dim=1, descending=True, stable=True)[:, :keep].sort(dim=1).values
    if not torch.compiler.is_compiling() and x.device.type != "meta":
        _known_valid.mark(kept_idx, tag=N)  # indices in [0, N) by construction: scatter_back need not read them
    be = reg.resolve_backend("token_gather", backend, x.device)
    return _gather_op(x, kept_idx, 0.0, be), kept_idx


def scatter_back(x_kept: torch.Tensor, kept_idx: torch.Tensor, N: int, fill=None, *, backend: str = "auto"):
    """Put ``x_kept: (B, K, C)`` back at ``kept_idx: (B, K)`` (unique per row) of a ``(B, N, C)``
    tensor; the other tokens are ``fill``: ``None``/0, a float, or a ``(B, N, C)`` tensor (e.g. the
    tokens before pruning).  Differentiable w.r.t. ``x_kept`` (and ``fill`` when a tensor).

    ``kept_idx`` is range-checked where it is built, not per call: the ``kept_idx`` of
    :func:`prune_topk` (for ``N`` at least its input length) is not read (no host sync).  Any other
    index tensor is checked on its first use (one host sync; ``ValueError`` for an index outside
    ``[0, N)``) and then known valid while unchanged; under ``torch.compile`` nothing is read and an
    out-of-range index is dropped."""
    check_tensor("x_kept", x_kept, dtypes=FLOAT_DTYPES, ndim=3, contiguous=False)
    x_kept = dense(x_kept)  # the gather kernel takes a contiguous input: one internal copy of a strided view
    check_tensor("kept_idx", kept_idx, dtypes=(torch.int64,), ndim=2, contiguous=False)
    check_shape("kept_idx", kept_idx, x_kept.shape[:2])
    check_same_device(x_kept=x_kept, kept_idx=kept_idx)
    check_int("N", N, min_value=x_kept.shape[1])
    B, K, C = x_kept.shape
    if not torch.compiler.is_compiling() and kept_idx.device.type != "meta" and kept_idx.numel():
        known, bound = _known_valid.lookup(kept_idx)
        if not known or bound > N:
            lo, hi = (int(t) for t in torch.stack([kept_idx.min(), kept_idx.max()]).tolist())  # one host sync
            if lo < 0 or hi >= N:
                raise ValueError(f"kept_idx must hold token indices in [0, N={N}), got values in [{lo}, {hi}]")
            _known_valid.mark(kept_idx, tag=hi + 1)
    # out-of-range indices (only possible unchecked, under torch.compile) go to a dropped extra column
    idx = torch.where((kept_idx >= 0) & (kept_idx < N), kept_idx, N)
    slot = torch.full((B, N + 1), -1, dtype=torch.int64, device=x_kept.device)
    slot.scatter_(1, idx, torch.arange(K, device=x_kept.device).expand(B, K))
    slot = slot[:, :N].contiguous()
    be = reg.resolve_backend("token_gather", backend, x_kept.device)
    if fill is None or (isinstance(fill, (int, float)) and not isinstance(fill, bool)):
        return _gather_op(x_kept, slot, float(fill or 0.0), be)
    if not isinstance(fill, torch.Tensor):
        raise TypeError(f"fill must be None, a float or a tensor, got {type(fill).__name__}")
    check_shape("fill", fill, (B, N, C))
    out = _gather_op(x_kept, slot, 0.0, be)
    return torch.where((slot >= 0)[..., None], out, fill.to(out.dtype))
