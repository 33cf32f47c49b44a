"""Block masks for sparse attention (FlexAttention-compatible CSR) and mask builders.

A :class:`BlockMask` says which ``block_k``-key blocks each ``block_q``-query block attends to:

* ``kv_num_blocks: int32 (B, H, nQ)`` with ``nQ = ceil(q_len / block_q)``;
* ``kv_indices: int32 (B, H, nQ, nK)`` with ``nK = ceil(k_len / block_k)``: the first
  ``kv_num_blocks[b, h, i]`` entries of row ``i`` are the (distinct) key blocks of query block ``i``;
  the rest of the row is ignored.

``B`` or ``H`` may be 1 to broadcast over the batch / the heads.  A dense boolean block mask
``(B, H, nQ, nK)`` converts with :meth:`BlockMask.from_dense`.  Everything here is plain torch on
the mask tensors (no host sync), so it traces under ``torch.compile``; only :func:`validate_mask`
reads mask values (it is skipped while compiling).

Mask values are validated where the mask is built, not per call (issue 12): every builder here
(:meth:`BlockMask.from_dense` and the builders below, :meth:`BlockMask.expand`, :func:`stack_heads`)
returns a mask that is valid by construction and *known valid* (a host-side mark on its tensors, see
:mod:`tokops._known_valid`), and so is a mask that :func:`validate_mask` / :meth:`BlockMask.validate`
checked once.  The attention ops do not read a known-valid mask again: no host sync per call.  The
mark is dropped when a tensor is replaced (``_replace``) or edited in place.

The builders are block-granular: a block is kept when *any* of its (query, key) pairs is allowed.
Use them with ``causal=True`` in the attention call for exact token-level causal masking inside the
diagonal blocks.  Causal alignment is bottom-right (FlashAttention >= 2.1): query ``i`` sees key ``j``
iff ``j <= i + (k_len - q_len)``; for ``q_len == k_len`` that is the usual ``j <= i``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .. import _known_valid
from .._checks import check_int, check_power_of_two

MIN_BLOCK, MAX_BLOCK = 16, 256
DEFAULT_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockMask(NamedTuple):
    """CSR block mask (see the module docstring)."""

    kv_num_blocks: torch.Tensor  # int32 (B, H, nQ)
    kv_indices: torch.Tensor  # int32 (B, H, nQ, nK)
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, nQ, nK)`` of the block grid (B, H possibly 1)."""
        return tuple(self.kv_indices.shape)

    @staticmethod
    def from_dense(dense: torch.Tensor, block_q: int = DEFAULT_BLOCK, block_k: int | None = None,
                   q_len: int | None = None, k_len: int | None = None) -> "BlockMask":
        """From a boolean block mask ``(B, H, nQ, nK)`` (``True`` = attend).  ``q_len``/``k_len``
        default to ``nQ * block_q`` / ``nK * block_k``."""
        block_k = block_q if block_k is None else block_k
        _check_dense("mask", dense)
        _check_blocks(block_q, block_k)
        nq, nk = dense.shape[-2:]
        q_len = nq * block_q if q_len is None else q_len
        k_len = nk * block_k if k_len is None else k_len
        check_int("q_len", q_len, min_value=1)
        check_int("k_len", k_len, min_value=1)
        if nq != _cdiv(q_len, block_q) or nk != _cdiv(k_len, block_k):
            raise ValueError(f"mask: a dense block mask for q_len={q_len}, k_len={k_len}, block_q={block_q}, "
                             f"block_k={block_k} must have shape (B, H, {_cdiv(q_len, block_q)}, "
                             f"{_cdiv(k_len, block_k)}), got {tuple(dense.shape)}")
        num, idx = dense_to_csr(dense)
        return _mark_valid(BlockMask(num, idx, block_q, block_k, q_len, k_len))

    def to_dense(self) -> torch.Tensor:
        """Boolean block mask ``(B, H, nQ, nK)``."""
        return csr_to_dense(self.kv_num_blocks, self.kv_indices)

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_num_blocks (B, H, nK), q_indices (B, H, nK, nQ))``: the query blocks of every key
        block (what a key-block-major backward iterates)."""
        return transpose_csr(self.kv_num_blocks, self.kv_indices)

    def expand(self, B: int, H: int) -> "BlockMask":
        """Broadcast B = 1 / H = 1 to ``(B, H)`` (views, no copy)."""
        nq, nk = self.kv_indices.shape[-2:]
        out = self._replace(kv_num_blocks=self.kv_num_blocks.expand(B, H, nq),
                            kv_indices=self.kv_indices.expand(B, H, nq, nk))
        how = _known_how(self)
        return out if how is None else _mark_valid(out, how)

    def validate(self) -> "BlockMask":
        """Check the mask *values* once (one host sync): ``0 <= kv_num_blocks <= nK``, listed indices
        in ``[0, nK)``, no block listed twice in a row; raise ``ValueError`` naming the field, else
        return the mask, now known valid (the attention ops do not read it again)."""
        idx = self.kv_indices
        is4 = isinstance(idx, torch.Tensor) and idx.dim() == 4
        B, H = (idx.shape[0], idx.shape[1]) if is4 else (1, 1)  # else validate_mask names the bad field
        dev = idx.device if isinstance(idx, torch.Tensor) else getattr(self.kv_num_blocks, "device", None)
        validate_mask(self, B, H, self.q_len, self.k_len, dev)
        return self

    def token_mask(self, causal: bool = False) -> torch.Tensor:
        """Boolean token mask ``(B, H, q_len, k_len)`` (for reference code and small sizes only)."""
        d = self.to_dense()
        t = d.repeat_interleave(self.block_q, -2)[..., :self.q_len, :]
        t = t.repeat_interleave(self.block_k, -1)[..., :self.k_len]
        if causal:
            t = t & causal_token_mask(self.q_len, self.k_len, t.device)
        return t

    def density(self) -> float:
        """Fraction of kept blocks (reads the mask)."""
        nk = self.kv_indices.shape[-1]
        return float(self.kv_num_blocks.double().mean()) / nk

    def to_flex(self):
        """The same mask as a ``torch.nn.attention.flex_attention.BlockMask`` (all blocks 'full'
        unless used with a causal ``mask_mod``)."""
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        return FlexBlockMask.from_kv_blocks(self.kv_num_blocks, self.kv_indices,
                                            BLOCK_SIZE=(self.block_q, self.block_k),
                                            seq_lengths=(self.q_len, self.k_len))

    @staticmethod
    def from_flex(flex_mask) -> "BlockMask":
        """From a ``torch.nn.attention.flex_attention.BlockMask``: every block it visits (its partial
        blocks ``kv_num_blocks``/``kv_indices`` and its full blocks ``full_kv_*``), same block sizes and
        sequence lengths.  The ``mask_mod`` is not kept: inside a partial block all tokens attend.
        So the result is the same attention for a block-aligned mask, and for a causal ``mask_mod``
        when the tokops op is called with ``causal=True`` (other token-level masks: not expressible)."""
        for name in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths"):
            if not hasattr(flex_mask, name):
                raise TypeError(f"flex_mask must be a torch FlexAttention BlockMask (no attribute {name!r}), "
                                f"got {type(flex_mask).__name__}")
        dense = csr_to_dense(flex_mask.kv_num_blocks, flex_mask.kv_indices)
        if getattr(flex_mask, "full_kv_num_blocks", None) is not None:
            dense = dense | csr_to_dense(flex_mask.full_kv_num_blocks, flex_mask.full_kv_indices)
        bq, bk = flex_mask.BLOCK_SIZE
        q_len, k_len = flex_mask.seq_lengths
        return BlockMask.from_dense(dense, int(bq), int(bk), int(q_len), int(k_len))


# --------------------------------------------------------------------------- CSR <-> dense
def dense_to_csr(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(..., nQ, nK)`` -> ``(kv_num_blocks int32, kv_indices int32)``, indices ascending."""
    dense = dense.contiguous()
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx.contiguous()


def csr_to_dense(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``(kv_num_blocks, kv_indices)`` -> boolean ``(..., nQ, nK)``; entries past ``num`` are ignored.

    Never reads out of bounds and never raises on bad values: a count outside ``[0, nK]`` is clamped,
    an index outside ``[0, nK)`` is ignored and a repeated index counts once (the set semantics that
    every backend follows for a mask whose values were not validated, see :func:`canonical_csr`)."""
    nk = idx.shape[-1]
    pos = torch.arange(nk, device=idx.device) < num.unsqueeze(-1)
    il = idx.long()
    col = torch.where(pos & (il >= 0) & (il < nk), il, nk)
    dense = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, col, torch.ones_like(col, dtype=torch.bool))
    return dense[..., :nk]


def canonical_csr(num: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical CSR of the *set* of valid blocks of ``(num, idx)``: counts in ``[0, nK]``, indices
    in range, distinct and ascending.  Plain torch on device (no host sync, traces under
    ``torch.compile``); the attention wrappers apply it when the mask values were not validated."""
    return dense_to_csr(csr_to_dense(num, idx))


def transpose_csr(num: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the transposed block mask: for every key block, its query blocks (ascending)."""
    return dense_to_csr(csr_to_dense(num, idx).transpose(-1, -2))


def causal_token_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """``(q_len, k_len)`` bool, bottom-right aligned: ``j <= i + k_len - q_len``."""
    i = torch.arange(q_len, device=device).unsqueeze(-1)
    j = torch.arange(k_len, device=device)
    return j <= i + (k_len - q_len)


# --------------------------------------------------------------------------- validation
_CANONICAL, _VALIDATED = "canonical", "validated"


def _mark_valid(mask: BlockMask, how: str = _CANONICAL) -> BlockMask:
    """Record that ``mask``'s values are valid; returns it.  ``how``: ``"canonical"`` (a builder's
    output: indices also ascending, exactly what :func:`canonical_csr` gives) or ``"validated"``
    (passed :func:`validate_mask`).  Host-side only."""
    if not torch.compiler.is_compiling() and mask.kv_indices.device.type != "meta":
        _known_valid.mark(mask.kv_indices, mask.kv_num_blocks, tag=how)
    return mask


def _known_how(mask) -> str | None:
    """``"canonical"`` / ``"validated"`` (see :func:`_mark_valid`) for a known-valid mask, else None."""
    if torch.compiler.is_compiling() or not isinstance(mask, BlockMask):
        return None
    num, idx = mask.kv_num_blocks, mask.kv_indices
    if not isinstance(num, torch.Tensor) or not isinstance(idx, torch.Tensor):
        return None
    return _known_valid.lookup(idx, num)[1]


def is_known_valid(mask: BlockMask) -> bool:
    """Whether ``mask``'s values are known valid without reading them: built by a tokops builder, or
    checked once by :func:`validate_mask`, and neither tensor replaced or edited in place since.
    Host-side bookkeeping only (never reads the mask); always False under ``torch.compile``."""
    return _known_how(mask) is not None


def _check_blocks(block_q, block_k) -> None:
    check_power_of_two("block_q", block_q, MIN_BLOCK, MAX_BLOCK)
    check_power_of_two("block_k", block_k, MIN_BLOCK, MAX_BLOCK)


def _check_dense(name: str, dense) -> None:
    if not isinstance(dense, torch.Tensor):
        raise TypeError(f"{name} must be a tokops.attention.BlockMask or a bool tensor, got {type(dense).__name__}")
    if dense.dtype != torch.bool:
        raise TypeError(f"{name}: a dense block mask must have dtype bool, got {str(dense.dtype).replace('torch.', '')}")
    if dense.dim() != 4:
        raise ValueError(f"{name}: a dense block mask must have 4 dims (B, H, nQ, nK), got shape {tuple(dense.shape)}")


def validate_mask(mask: BlockMask, B: int, H: int, q_len: int, k_len: int, device: torch.device,
                  *, read_values: bool = True) -> None:
    """Check ``mask`` against the attention shapes; raise TypeError/ValueError naming the field.

    Shape/dtype checks never read values; with ``read_values`` (skipped under ``torch.compile``)
    also checks ``0 <= kv_num_blocks <= nK``, indices in ``[0, nK)`` and no repeated block in a row:
    one host sync, unless the mask is already known valid (:func:`is_known_valid`: built by a tokops
    builder or checked before), in which case nothing is read.  A mask that passes becomes known valid.
    """
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a tokops.attention.BlockMask, got {type(mask).__name__}")
    _check_blocks(mask.block_q, mask.block_k)
    if mask.q_len != q_len:
        raise ValueError(f"mask.q_len must equal the number of queries {q_len}, got {mask.q_len}")
    if mask.k_len != k_len:
        raise ValueError(f"mask.k_len must equal the number of keys {k_len}, got {mask.k_len}")
    num, idx = mask.kv_num_blocks, mask.kv_indices
    for name, t, nd in (("mask.kv_num_blocks", num, 3), ("mask.kv_indices", idx, 4)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype int32, got {str(t.dtype).replace('torch.', '')}")
        if t.dim() != nd:
            raise ValueError(f"{name} must have {nd} dims, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on the device of q ({device}), got {t.device}")
    nq, nk = _cdiv(q_len, mask.block_q), _cdiv(k_len, mask.block_k)
    mb, mh = idx.shape[:2]
    if mb not in (1, B) or mh not in (1, H):
        raise ValueError(f"mask.kv_indices: batch/head dims must be ({B} or 1, {H} or 1), got shape {tuple(idx.shape)}")
    if tuple(idx.shape[2:]) != (nq, nk):
        raise ValueError(f"mask.kv_indices must have shape (B, H, {nq}, {nk}) for q_len={q_len}, k_len={k_len}, "
                         f"block_q={mask.block_q}, block_k={mask.block_k}; got {tuple(idx.shape)}")
    if tuple(num.shape) != (mb, mh, nq):
        raise ValueError(f"mask.kv_num_blocks must have shape {(mb, mh, nq)}, got {tuple(num.shape)}")
    if idx.stride(-1) != 1:
        raise ValueError(f"mask.kv_indices must be contiguous in its last dim, got strides {idx.stride()}")
    if not read_values or is_known_valid(mask):
        return
    # one host sync for all value checks; the details are computed only when something is wrong
    used = torch.arange(nk, device=idx.device) < num.unsqueeze(-1)
    bad_num = (num < 0) | (num > nk)
    bad_idx = used & ((idx < 0) | (idx >= nk))
    numc = num.clamp(0, nk)
    dup = csr_to_dense(numc, idx.clamp(0, nk - 1)).sum(-1, dtype=torch.int32) != numc
    flags = torch.stack([bad_num.any(), bad_idx.any(), dup.any()]).tolist()
    if flags[0]:
        raise ValueError(f"mask.kv_num_blocks must be in [0, {nk}], got values in [{int(num.min())}, {int(num.max())}]")
    if flags[1]:
        vals = idx[used]
        raise ValueError(f"mask.kv_indices out of range: key block indices must be in [0, {nk}), "
                         f"got values in [{int(vals.min())}, {int(vals.max())}]")
    if flags[2]:
        raise ValueError("mask.kv_indices: a key block is listed twice in one row")
    _mark_valid(mask, _VALIDATED)


def as_block_mask(mask, q_len: int, k_len: int, block_q: int | None = None, block_k: int | None = None,
                  device=None) -> BlockMask:
    """``mask`` (a :class:`BlockMask`, a dense bool block mask, or ``None`` = all blocks) -> BlockMask."""
    if isinstance(mask, BlockMask):
        if block_q is not None and block_q != mask.block_q or block_k is not None and block_k != mask.block_k:
            raise ValueError(f"block_q/block_k ({block_q}, {block_k}) disagree with the mask's "
                             f"({mask.block_q}, {mask.block_k}); leave them unset")
        return mask
    block_q = DEFAULT_BLOCK if block_q is None else block_q
    block_k = block_q if block_k is None else block_k
    if mask is None:
        _check_blocks(block_q, block_k)
        return full_block_mask(q_len, k_len, block_q=block_q, block_k=block_k, device=device)
    return BlockMask.from_dense(mask, block_q, block_k, q_len, k_len)



# --------------------------------------------------------------------------- key padding (valid masks)
def _check_valid(valid, k_len: int, B: int | None = None) -> torch.Tensor:
    """``valid: (B, k_len)`` bool key validity (``True`` = a real key)."""
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a bool tensor (B, Nk), got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must have dtype bool, got {str(valid.dtype).replace('torch.', '')}")
    if valid.dim() != 2 or valid.shape[1] != k_len or (B is not None and valid.shape[0] != B):
        want = f"({'B' if B is None else B}, {k_len})"
        raise ValueError(f"valid must have shape {want} (batch, keys), got {tuple(valid.shape)}")
    return valid


def _query_valid(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Query validity ``(B, q_len)`` from key validity, bottom-right aligned (query ``i`` is the token
    at key position ``i + k_len - q_len``; queries before the first key count as valid)."""
    k_len = valid.shape[1]
    if q_len <= k_len:
        return valid[:, k_len - q_len:]
    return torch.cat([valid.new_ones(valid.shape[0], q_len - k_len), valid], 1)


def _block_any(valid: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, N)`` bool -> ``(B, ceil(N / block))``: the block holds at least one True."""
    n = valid.shape[-1]
    nb = _cdiv(n, block)
    return torch.nn.functional.pad(valid, (0, nb * block - n)).unflatten(-1, (nb, block)).any(-1)


def _restrict_to_valid(dense: torch.Tensor, valid: torch.Tensor, q_len: int, k_len: int, block_q: int,
                       block_k: int, eligible: torch.Tensor | None) -> torch.Tensor:
    """Apply key padding to a block mask ``(1 or B, H, nQ, nK)`` -> ``(B, H, nQ, nK)``: key blocks
    without a valid key are dropped, query blocks without a valid query keep nothing, and a query
    block holding a valid query that would keep no valid key block gets one: the last ``eligible``
    (``(nQ, nK)``, causal) block holding a valid key, else (``eligible=None``) the first valid one."""
    kb = _block_any(valid, block_k)[:, None, None, :]  # (B, 1, 1, nK)
    qb = _block_any(_query_valid(valid, q_len), block_q)[:, None, :, None]  # (B, 1, nQ, 1)
    dense = dense & kb & qb
    cand = kb & qb if eligible is None else kb & qb & eligible
    nk = kb.shape[-1]
    ar = torch.arange(nk, device=valid.device)
    pos = torch.where(cand, ar if eligible is not None else nk - 1 - ar, -1)  # pick last (causal) / first
    best = pos.amax(-1, keepdim=True)
    col = best if eligible is not None else nk - 1 - best
    fallback = (ar == col) & (best >= 0)
    empty = ~dense.any(-1, keepdim=True)
    return dense | (fallback & empty)


# --------------------------------------------------------------------------- builders
def _grid(q_len, k_len, block_q, block_k, device):
    _check_blocks(block_q, block_k)
    check_int("q_len", q_len, min_value=1)
    check_int("k_len", k_len, min_value=1)
    nq, nk = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    qi = torch.arange(nq, device=device).unsqueeze(-1)
    kj = torch.arange(nk, device=device)
    q_lo, q_hi = qi * block_q, torch.clamp((qi + 1) * block_q, max=q_len) - 1
    k_lo, k_hi = kj * block_k, torch.clamp((kj + 1) * block_k, max=k_len) - 1
    return q_lo, q_hi, k_lo, k_hi


def full_block_mask(q_len: int, k_len: int | None = None, *, block_q: int = DEFAULT_BLOCK,
                    block_k: int | None = None, device=None, valid: torch.Tensor | None = None) -> BlockMask:
    """Every query block attends to every key block (B = H = 1).

    ``valid: (B, Nk)`` bool key validity (padded batches): every block holding a valid key, for the
    query blocks holding a valid query; the mask is then ``(B, 1, nQ, nK)``."""
    k_len = q_len if k_len is None else k_len
    block_k = block_q if block_k is None else block_k
    if valid is not None:
        device = _check_valid(valid, k_len).device
    q_lo, _, k_lo, _ = _grid(q_len, k_len, block_q, block_k, device)
    dense = torch.ones(1, 1, q_lo.shape[0], k_lo.shape[0], dtype=torch.bool, device=device)
    if valid is not None:
        dense = _restrict_to_valid(dense, valid, q_len, k_len, block_q, block_k, None)
    return BlockMask.from_dense(dense, block_q, block_k, q_len, k_len)


def causal_block_mask(q_len: int, k_len: int | None = None, *, block_q: int = DEFAULT_BLOCK,
                      block_k: int | None = None, device=None, valid: torch.Tensor | None = None) -> BlockMask:
    """Blocks with at least one causal pair (bottom-right aligned); use with ``causal=True``.

    ``valid: (B, Nk)`` bool key validity (padded batches): key blocks without a valid key are
    dropped and query blocks without a valid query keep nothing; the mask is then ``(B, 1, nQ, nK)``.
    """
    k_len = q_len if k_len is None else k_len
    block_k = block_q if block_k is None else block_k
    if valid is not None:
        device = _check_valid(valid, k_len).device
    q_lo, q_hi, k_lo, k_hi = _grid(q_len, k_len, block_q, block_k, device)
    dense = (k_lo <= q_hi + (k_len - q_len))[None, None]
    if valid is not None:
        dense = _restrict_to_valid(dense, valid, q_len, k_len, block_q, block_k, dense[0, 0])
    return BlockMask.from_dense(dense, block_q, block_k, q_len, k_len)


def _window_dense(q_len, k_len, window, sinks, block_q, block_k, device, valid=None):
    """``(nQ, nK)`` window + sinks blocks; with ``valid (B, Nk)`` the sinks are the first ``sinks``
    *valid* keys of each row and the result is ``(B, 1, nQ, nK)`` restricted to valid blocks."""
    q_lo, q_hi, k_lo, k_hi = _grid(q_len, k_len, block_q, block_k, device)
    off = k_len - q_len
    # token rule: key j is visible to query i iff i+off-window < j <= i+off, or j < sinks
    causal = k_lo <= q_hi + off
    win = causal & (k_hi > q_lo + off - window)
    if valid is None:
        sink = (k_lo < sinks) & causal
        return win | sink
    first = valid & (torch.cumsum(valid.to(torch.int32), 1) <= sinks)  # the first `sinks` valid keys
    sink = _block_any(first, block_k)[:, None, None, :] & causal
    return _restrict_to_valid(win[None, None] | sink, valid, q_len, k_len, block_q, block_k, causal)


def sliding_window_mask(q_len: int, window: int, sinks: int = 0, k_len: int | None = None, *,
                        block_q: int = DEFAULT_BLOCK, block_k: int | None = None, device=None,
                        valid: torch.Tensor | None = None) -> BlockMask:
    """Causal sliding window of ``window`` keys (``i+off-window < j <= i+off``) plus the first
    ``sinks`` keys (attention sinks, StreamingLLM), block-granular; use with ``causal=True``.

    ``valid: (B, Nk)`` bool key validity (padded batches; mask ``(B, 1, nQ, nK)``): the sinks are the
    first ``sinks`` *valid* keys of each row, key blocks without a valid key are never kept, query
    blocks without a valid query keep nothing, and every query block holding a valid query keeps at
    least one block holding a valid key (the last causal one).  Right-padded rows get exactly the
    mask of the row alone; with left padding the block grid is shifted against the tokens, so the
    blocks (not the rule) differ from the row alone.
    """
    check_int("window", window, min_value=1)
    check_int("sinks", sinks, min_value=0)
    k_len = q_len if k_len is None else k_len
    block_k = block_q if block_k is None else block_k
    if valid is not None:
        device = _check_valid(valid, k_len).device
        dense = _window_dense(q_len, k_len, window, sinks, block_q, block_k, device, valid)
        return BlockMask.from_dense(dense, block_q, block_k, q_len, k_len)
    dense = _window_dense(q_len, k_len, window, sinks, block_q, block_k, device)
    return BlockMask.from_dense(dense[None, None], block_q, block_k, q_len, k_len)


def retrieval_heads_mask(num_heads: int, full_heads: Sequence[int], q_len: int, window: int, sinks: int = 0,
                         k_len: int | None = None, *, block_q: int = DEFAULT_BLOCK, block_k: int | None = None,
                         device=None, valid: torch.Tensor | None = None) -> BlockMask:
    """Per-head combination (DuoAttention / RazorAttention style): heads in ``full_heads``
    (retrieval heads) see every causal block, the others a sliding ``window`` plus ``sinks``.
    Shape ``(1, num_heads, nQ, nK)`` (``(B, num_heads, nQ, nK)`` with ``valid: (B, Nk)``, the key
    padding rule of :func:`sliding_window_mask` applied to both kinds of head); use with ``causal=True``."""
    check_int("num_heads", num_heads, min_value=1)
    full = sorted(set(int(h) for h in full_heads))
    if any(h < 0 or h >= num_heads for h in full):
        raise ValueError(f"full_heads must be head indices in [0, {num_heads}), got {list(full_heads)}")
    check_int("window", window, min_value=1)
    check_int("sinks", sinks, min_value=0)
    k_len = q_len if k_len is None else k_len
    block_k = block_q if block_k is None else block_k
    if valid is not None:
        device = _check_valid(valid, k_len).device
    causal = causal_block_mask(q_len, k_len, block_q=block_q, block_k=block_k, device=device,
                               valid=valid).to_dense()
    win = _window_dense(q_len, k_len, window, sinks, block_q, block_k, device, valid)
    is_full = torch.zeros(num_heads, dtype=torch.bool, device=device)
    is_full[full] = True
    if valid is None:
        dense = torch.where(is_full[:, None, None], causal[0, 0], win)[None]
    else:
        dense = torch.where(is_full[None, :, None, None], causal, win)
    return BlockMask.from_dense(dense, block_q, block_k, q_len, k_len)


def stack_heads(masks: Sequence[BlockMask]) -> BlockMask:
    """Combine one mask per head (each with H = 1 and equal geometry) into an ``(B, H, ...)`` mask."""
    if not masks:
        raise ValueError("masks must be a non-empty sequence of BlockMask")
    m0 = masks[0]
    for i, m in enumerate(masks):
        if not isinstance(m, BlockMask):
            raise TypeError(f"masks[{i}] must be a BlockMask, got {type(m).__name__}")
        if m[2:] != m0[2:] or m.kv_indices.shape[1] != 1 or m.kv_indices.shape[0] != m0.kv_indices.shape[0]:
            raise ValueError(f"masks[{i}]: every mask needs H = 1 and the geometry of masks[0]")
    out = m0._replace(kv_num_blocks=torch.cat([m.kv_num_blocks for m in masks], 1),
                      kv_indices=torch.cat([m.kv_indices for m in masks], 1))
    hows = {_known_how(m) for m in masks}
    if None in hows:
        return out
    return _mark_valid(out, _CANONICAL if hows == {_CANONICAL} else _VALIDATED)


def _pool(x: torch.Tensor, block: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each block of tokens (the tail block over its valid tokens): (B,H,N,D) -> (B,H,nB,D).
    With ``valid: (B, N)`` the mean is over the valid tokens of each block only (0 for a block
    without one); for a right-padded row this is bit for bit the pooling of the row alone."""
    n = x.shape[-2]
    nb = _cdiv(n, block)
    pad = nb * block - n
    if valid is None:
        xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).unflatten(-2, (nb, block)).sum(-2)
        cnt = torch.clamp(n - torch.arange(nb, device=x.device) * block, max=block).to(xs.dtype)
        return xs / cnt[:, None]
    xv = torch.where(valid[:, None, :, None], x.float(), 0.0)
    xs = torch.nn.functional.pad(xv, (0, 0, 0, pad)).unflatten(-2, (nb, block)).sum(-2)
    cnt = torch.nn.functional.pad(valid, (0, pad)).unflatten(-1, (nb, block)).sum(-1).to(xs.dtype)
    return xs / cnt.clamp_min(1)[:, None, :, None]


def check_keep(keep) -> None:
    """``keep`` of the top-k builders: an int count >= 1 or a float fraction in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int count or a float fraction, got {type(keep).__name__}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep as a fraction must be in (0, 1], got {keep}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep as a count must be >= 1, got {keep}")


def topk_block_mask(q: torch.Tensor, k: torch.Tensor, keep, *, block_q: int = DEFAULT_BLOCK,
                    block_k: int | None = None, causal: bool = False,
                    valid: torch.Tensor | None = None) -> BlockMask:
    """Content-based block selection (a cheap proxy for the block attention mass).

    Mean-pool ``q (B,H,Nq,D)`` and ``k (B,H_kv,Nk,D)`` per block, score block pairs by pooled
    ``q . k``, keep the ``keep`` highest-scoring key blocks per query block (``keep`` an int count or a
    float fraction in (0, 1] of the key blocks, ``ceil(keep * n_blocks)``, at least 1).  With ``causal``
    only blocks holding a causal pair are eligible and the diagonal block (holding the last visible
    key of the block's last query) is always kept.  Returns a ``(B, H, nQ, nK)`` mask; use with
    ``causal`` in the attention call.  Equal scores keep the lower block index.

    ``valid: (B, Nk)`` bool key validity (padded batches; also pass the padding as a ``-inf``
    ``key_bias`` to the attention): pooling is over valid tokens only; key blocks without a valid key
    are never selected; a float ``keep`` counts each row's valid key blocks; query blocks without a
    valid query (query ``i`` is key position ``i + Nk - Nq``) keep nothing; when causal the forced
    "diagonal" is the last causal block holding a valid key, so every query block holding a valid
    query keeps at least one block holding a valid key.  A right-padded row gets exactly the blocks
    of the same row alone.  No host sync.
    """
    block_k = block_q if block_k is None else block_k
    _check_blocks(block_q, block_k)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (B, H, Nq, D) tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] \
            or q.shape[1] % k.shape[1]:
        raise ValueError(f"k must be (B, H_kv, Nk, D) matching q {tuple(q.shape)} with H % H_kv == 0, "
                         f"got {getattr(k, 'shape', type(k).__name__)}")
    k_len = k.shape[-2]
    check_keep(keep)
    if valid is None:
        valid = torch.ones(q.shape[0], k_len, dtype=torch.bool, device=q.device)
    else:
        _check_valid(valid, k_len, q.shape[0])
        if valid.device != q.device:
            raise ValueError(f"valid must be on the device of q ({q.device}), got {valid.device}")
    return _topk_valid(q, k, keep, block_q, block_k, causal, valid)


def _topk_valid(q, k, keep, block_q: int, block_k: int, causal: bool, valid: torch.Tensor) -> BlockMask:
    """:func:`topk_block_mask` with key padding ``valid (B, Nk)`` (see there); per-row counts, no host sync."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    qv = _query_valid(valid, q_len)
    kb = _block_any(valid, block_k)  # (B, nK) blocks holding a valid key
    qb = _block_any(qv, block_q)  # (B, nQ) blocks holding a valid query
    n_valid = kb.sum(-1)  # (B,) valid key blocks per row
    if isinstance(keep, float):
        count = torch.ceil(n_valid.double() * keep).to(torch.int64).clamp_min(1)
    else:
        count = n_valid.clamp(max=keep)
    pq = _pool(q, block_q, qv)
    pk = _pool(k, block_k, valid).repeat_interleave(q.shape[1] // k.shape[1], 1)
    score = pq @ pk.transpose(-1, -2)  # (B, H, nQ, nK) fp32
    eligible = kb[:, None, None, :]
    if causal:
        q_lo, q_hi, k_lo, k_hi = _grid(q_len, k_len, block_q, block_k, q.device)
        eligible = eligible & (k_lo <= q_hi + (k_len - q_len))
    nk = kb.shape[-1]
    score = torch.where(eligible, score, float("-inf"))
    if causal:  # the last eligible block (the diagonal when nothing is padded) is always kept
        ar = torch.arange(nk, device=q.device)
        last = torch.where(eligible, ar, -1).amax(-1, keepdim=True)
        score = torch.where(ar == last, float("inf"), score)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nk, device=q.device).expand_as(order))
    dense = (rank < count[:, None, None, None]) & eligible & qb[:, None, :, None]
    return BlockMask.from_dense(dense, block_q, block_k, q_len, k_len)


def token_select_mask(keep: torch.Tensor, q_len: int, *, block_q: int = DEFAULT_BLOCK, block_k: int | None = None,
                      causal: bool = False) -> tuple[BlockMask, torch.Tensor]:
    """Attend to a token-level set of keys.

    ``keep: bool (B, Nk)`` or ``(B, H, Nk)`` (``True`` = the key is selected).  Returns
    ``(mask, key_bias)``: the block mask keeps every key block holding at least one selected key
    (intersected with the causal blocks when ``causal``), and ``key_bias`` (fp32, same shape as
    ``keep``) is 0 for selected keys and ``-inf`` for the others, so passing both to
    :func:`block_sparse_attention` gives exactly token-level selection while the kernel only visits the
    blocks that hold selected keys.  (Add it to a ToMe ``log(size)`` bias if you have one.)
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() not in (2, 3):
        raise TypeError(f"keep must be a bool tensor (B, Nk) or (B, H, Nk), got "
                        f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
    block_k = block_q if block_k is None else block_k
    k_len = keep.shape[-1]
    q_lo, q_hi, k_lo, k_hi = _grid(q_len, k_len, block_q, block_k, keep.device)
    kk = keep if keep.dim() == 3 else keep[:, None]
    nk = k_lo.shape[0]
    pad = nk * block_k - k_len
    blk = torch.nn.functional.pad(kk, (0, pad)).unflatten(-1, (nk, block_k)).any(-1)  # (B, H, nK)
    dense = blk[:, :, None, :].expand(-1, -1, q_lo.shape[0], -1)
    if causal:
        dense = dense & (k_lo <= q_hi + (k_len - q_len))
    bias = torch.where(keep, 0.0, float("-inf")).to(torch.float32)
    return BlockMask.from_dense(dense.contiguous(), block_q, block_k, q_len, k_len), bias
