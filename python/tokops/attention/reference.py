"""Pure-torch reference of block-sparse attention (the oracle; float64, dense token mask).

Semantics (DESIGN.md "Sparse attention"): logits ``s = scale * q k^T + key_bias`` over the keys
of the allowed blocks only (and ``j <= i + Nk - Nq`` when ``causal``); ``P = softmax(s)``;
``out = P v``; ``lse = logsumexp(s)``.  A query row with no allowed key has ``P = 0``,
``out = 0`` and ``lse = -inf`` (never NaN); a key whose bias is ``-inf`` counts as not allowed.
Memory is O(B H Nq Nk): for tests and small CPU inputs only.
"""

from __future__ import annotations

import torch

from .masks import BlockMask, causal_token_mask, csr_to_dense


def token_mask(kv_num_blocks, kv_indices, block_q, block_k, q_len, k_len, causal) -> torch.Tensor:
    return BlockMask(kv_num_blocks, kv_indices, block_q, block_k, q_len, k_len).token_mask(causal)


def _expand_kv(t: torch.Tensor, H: int) -> torch.Tensor:
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], 1)


def _bias(key_bias, dtype):
    if key_bias is None:
        return None
    b = key_bias.to(dtype)
    return b[:, None, None, :] if b.dim() == 2 else b[:, :, None, :]


def probs(q, k, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias=None,
          dtype=torch.float64):
    """``(P (B,H,Nq,Nk), lse (B,H,Nq))`` in ``dtype`` (differentiable)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[-2]
    allowed = token_mask(kv_num_blocks, kv_indices, block_q, block_k, Nq, Nk, causal)
    s = (q.to(dtype) @ _expand_kv(k, H).to(dtype).transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + _bias(key_bias, dtype)
    s = torch.where(allowed, s, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, 1.0, denom)
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return p, lse


def attention(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias=None,
              dtype=torch.float64):
    """``(out (B,H,Nq,D) in dtype, lse (B,H,Nq) in dtype)``."""
    p, lse = probs(q, k, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias, dtype)
    return p @ _expand_kv(v, q.shape[1]).to(dtype), lse


def key_mass(q, k, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias=None):
    """``mass[b, h, j] = sum_i P[b, h, i, j]`` (float64)."""
    p, _ = probs(q, k, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias)
    return p.sum(-2)


# --------------------------------------------------------------------------- torch backend of the ops
def fwd(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias):
    out, lse = attention(q, k, v, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias)
    return out.to(q.dtype), lse.to(torch.float32)


def bwd(dout, q, k, v, out, lse, dlse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_q, block_k,
        causal, scale, key_bias):
    """Analytic backward in float64: ``dS = P * (dO V^T - delta)``, ``delta = rowsum(dO * O) - dlse``.
    Returns ``(dq, dk, dv, dbias (B,H,Nk) fp32 per query head, or an empty tensor without key_bias)``."""
    f = torch.float64
    H, Hkv = q.shape[1], k.shape[1]
    p, _ = probs(q, k, kv_num_blocks, kv_indices, block_q, block_k, causal, scale, key_bias)
    do = dout.to(f)
    delta = (do * out.to(f)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(f)
    dp = do @ _expand_kv(v, H).to(f).transpose(-1, -2)
    ds = p * (dp - delta.unsqueeze(-1))
    dq = (ds @ _expand_kv(k, H).to(f)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f)) * scale
    dv = p.transpose(-1, -2) @ do
    if Hkv != H:
        dk = dk.unflatten(1, (Hkv, H // Hkv)).sum(2)
        dv = dv.unflatten(1, (Hkv, H // Hkv)).sum(2)
    dbias = ds.sum(-2).to(torch.float32) if key_bias is not None else q.new_empty(0, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def mass_from_lse(q, k, lse, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias):
    """Torch backend of the key-mass op: ``P = exp(s - lse)`` with the given forward ``lse``."""
    f = torch.float64
    B, H, Nq, _ = q.shape
    Nk = k.shape[-2]
    allowed = token_mask(q_num_blocks, q_indices, block_k, block_q, Nk, Nq, False).transpose(-1, -2)
    if causal:
        allowed = allowed & causal_token_mask(Nq, Nk, q.device)
    s = (q.to(f) @ _expand_kv(k, H).to(f).transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + _bias(key_bias, f)
    l = lse.to(f).unsqueeze(-1)
    p = torch.where(allowed & ~torch.isinf(l), torch.exp(s - torch.where(torch.isinf(l), 0.0, l)), 0.0)
    return p.sum(-2).to(torch.float32)


# --------------------------------------------------------------------------- varlen (packed sequences)
def _varlen_positions(cu_seqlens, total, max_len):
    """Per packed row: ``(seq (total,) int64 clamped to [0, S), pos (total,) position inside its sequence,
    length (total,) of its sequence, valid (total,) bool)``.  Plain device code (no host sync): a row
    outside every sequence, or at a position >= ``max_len`` (bad ``cu_seqlens``), is not valid -- the
    same clamping as the Triton kernels' ``_seq_bounds``."""
    cu = cu_seqlens.to(torch.int64)
    S = cu.shape[0] - 1
    lo = cu[:-1].clamp(0, total)
    hi = torch.maximum(cu[1:].clamp(0, total), lo)
    length = torch.minimum(hi - lo, torch.full_like(lo, max_len))
    rows = torch.arange(total, device=cu.device)
    seq = (torch.searchsorted(hi, rows, right=True)).clamp(max=max(S - 1, 0))
    pos = rows - lo[seq]
    valid = (pos >= 0) & (pos < length[seq])
    return seq, pos.clamp_min(0), length[seq], valid


def _seq_lengths(cu_seqlens, total, max_len):
    """``(start (S,), length (S,))`` int64 of every sequence, clamped like the kernels' ``_seq_bounds``."""
    cu = cu_seqlens.to(torch.int64)
    lo = cu[:-1].clamp(0, total)
    hi = torch.maximum(cu[1:].clamp(0, total), lo)
    return lo, torch.minimum(hi - lo, torch.full_like(lo, max_len))


def varlen_allowed(dense_blocks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_q, block_k, causal,
                   H, total_q, total_k):
    """Token mask ``(H, total_q, total_k)`` bool of packed attention.  Query row ``i`` of sequence ``s``
    sees key ``j`` iff ``j`` is in sequence ``s``, the block mask of ``s`` (``dense_blocks`` bool
    ``(S|1, H|1, nQ, nK)``, blocks counted from each sequence's start) has the block pair, and, with
    ``causal``, ``pos_j <= pos_i + Lk_s - Lq_s`` (bottom-right alignment per sequence).  No host sync."""
    sq, pq, lq, vq = _varlen_positions(cu_seqlens_q, total_q, max_seqlen_q)
    sk, pk, _, vk = _varlen_positions(cu_seqlens_k, total_k, max_seqlen_k)
    nq, nk = dense_blocks.shape[-2:]
    dense = dense_blocks.expand(-1, H, -1, -1)
    mb = sq if dense.shape[0] > 1 else torch.zeros_like(sq)
    # advanced indices on dims 0, 2, 3 around the head slice: the result is (total_q, total_k, H)
    blk = dense[mb[:, None], :, (pq // block_q).clamp(max=nq - 1)[:, None], (pk // block_k).clamp(max=nk - 1)[None, :]]
    allowed = blk.permute(2, 0, 1) & ((sq[:, None] == sk[None, :]) & vq[:, None] & vk[None, :])
    if causal:
        _, lk = _seq_lengths(cu_seqlens_k, total_k, max_seqlen_k)
        allowed = allowed & (pk[None, :] <= pq[:, None] + (lk[sq] - lq)[:, None])
    return allowed


def _varlen_logits(q, k, scale, key_bias, dtype):
    """``(H, total_q, total_k)`` logits ``scale q.k + key_bias`` in ``dtype`` (GQA expanded)."""
    H = q.shape[1]
    qf = q.to(dtype).transpose(0, 1)
    kf = _varlen_kv(k, H, dtype)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if key_bias is not None:
        b = key_bias.to(dtype)
        s = s + (b[None, None, :] if b.dim() == 1 else b[:, None, :])
    return s


def _varlen_kv(t, H, dtype):
    """``(total, H_kv, D)`` -> ``(H, total, D)`` in ``dtype``."""
    return _expand_kv(t.transpose(0, 1).unsqueeze(0), H)[0].to(dtype)


def varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks, kv_indices, block_q,
                 block_k, causal, scale, key_bias=None, dtype=torch.float64):
    """Packed attention as one dense problem: ``(P (H, total_q, total_k), lse (H, total_q))`` in ``dtype``
    (differentiable); see :func:`varlen_allowed`.  O(H total_q total_k) memory: for tests and small CPU
    inputs."""
    Tq, H, _ = q.shape
    allowed = varlen_allowed(csr_to_dense(kv_num_blocks, kv_indices), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, block_q, block_k, causal, H, Tq, k.shape[0])
    s = torch.where(allowed, _varlen_logits(q, k, scale, key_bias, dtype), float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom == 0, 1.0, denom)
    lse = (m + torch.log(denom)).squeeze(-1)
    return p, lse


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks, kv_indices, block_q,
               block_k, causal, scale, key_bias):
    """Torch backend of the varlen forward: ``(out (total_q, H, D) in q.dtype, lse (H, total_q) fp32)``."""
    p, lse = varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks, kv_indices,
                          block_q, block_k, causal, scale, key_bias)
    out = (p @ _varlen_kv(v, q.shape[1], torch.float64)).transpose(0, 1)
    return out.to(q.dtype).contiguous(), lse.to(torch.float32)


def varlen_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks,
               kv_indices, q_num_blocks, q_indices, block_q, block_k, causal, scale, key_bias):
    """Analytic float64 backward of :func:`varlen_fwd` (as :func:`bwd`): ``(dq, dk, dv, dbias (H, total_k) fp32
    per query head, or an empty tensor without key_bias)``."""
    f = torch.float64
    H, Hkv = q.shape[1], k.shape[1]
    p, _ = varlen_probs(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks, kv_indices,
                        block_q, block_k, causal, scale, key_bias)
    do = dout.to(f).transpose(0, 1)  # (H, Tq, D)
    delta = (do * out.to(f).transpose(0, 1)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(f)
    dp = do @ _varlen_kv(v, H, f).transpose(-1, -2)
    ds = p * (dp - delta.unsqueeze(-1))
    dq = (ds @ _varlen_kv(k, H, f)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f).transpose(0, 1)) * scale
    dv = p.transpose(-1, -2) @ do
    if Hkv != H:
        dk = dk.unflatten(0, (Hkv, H // Hkv)).sum(1)
        dv = dv.unflatten(0, (Hkv, H // Hkv)).sum(1)
    dbias = ds.sum(-2).to(torch.float32) if key_bias is not None else q.new_empty(0, dtype=torch.float32)
    return (dq.transpose(0, 1).to(q.dtype).contiguous(), dk.transpose(0, 1).to(k.dtype).contiguous(),
            dv.transpose(0, 1).to(v.dtype).contiguous(), dbias)


def varlen_mass_from_lse(q, k, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_num_blocks, q_indices,
                         block_q, block_k, causal, scale, key_bias):
    """Torch backend of the varlen key-mass op: ``(H, total_k)`` fp32, ``sum_i exp(s_ij - lse_i)`` over the
    allowed pairs with the given forward ``lse (H, total_q)`` (the mask comes transposed, as the kernels
    take it)."""
    f = torch.float64
    Tq, H, _ = q.shape
    dense = csr_to_dense(q_num_blocks, q_indices).transpose(-1, -2)
    allowed = varlen_allowed(dense, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_q, block_k, causal,
                             H, Tq, k.shape[0])
    s = _varlen_logits(q, k, scale, key_bias, f)
    l = lse.to(f).unsqueeze(-1)
    p = torch.where(allowed & ~torch.isinf(l), torch.exp(s - torch.where(torch.isinf(l), 0.0, l)), 0.0)
    return p.sum(-2).to(torch.float32)
