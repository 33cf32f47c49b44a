"""Pure-torch reference of block-sparse attention (the oracle; float64, dense token mask).

Semantics (DESIGN.md "Sparse attention"): logits ``s = scale * q k^T + key_bias`` over the keys
of the allowed blocks only (and ``j <= i + Nk - Nq`` when ``causal``); ``P = softmax(s)``;
``out = P v``; ``lse = logsumexp(s)``.  A query row with no allowed key has ``P = 0``,
``out = 0`` and ``lse = -inf`` (never NaN); a key whose bias is ``-inf`` counts as not allowed.
Memory is O(B H Nq Nk): for tests and small CPU inputs only.
"""

from __future__ import annotations

import torch

from .masks import BlockMask, causal_token_mask


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
