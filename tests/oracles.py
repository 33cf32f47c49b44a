"""Second oracles, written from DESIGN.md independently of ``tokops.*.reference``.

The references in ``python/tokops/*/reference.py`` are also the torch *backends* of some ops
(``kv_quantize``/``kv_dequantize`` torch = ``kv.reference``, attention torch forward =
``attention.reference.attention``, torch decode = ``dequantize_store`` + ``dense_decode``).  A test
that compares such a backend with its reference compares code with itself, so the tests also check
every backend against the oracles below, which share no code with tokops:

* :func:`naive_quantize` / :func:`naive_unpack`: one group at a time in Python scalars (numpy fp32
  for the correctly rounded fp32 division, Python's ``round`` for round-half-even, Python ints for
  the packing);
* :func:`sdpa_attention`: ``torch.nn.functional.scaled_dot_product_attention`` with a float mask
  (``key_bias`` where allowed, ``-inf`` elsewhere) built here from the dense block mask;
* :func:`naive_decode`: the decode causal rule as a float64 loop over (batch, head, query) on the
  cache's buffers unpacked by :func:`naive_unpack` (not ``QuantizedKVCache.dequantized``).
"""

from __future__ import annotations

import math

import numpy as np
import torch


# --------------------------------------------------------------------------- KIVI group quantization
def naive_quantize(x: torch.Tensor, bits: int, group_size: int, axis: int):
    """DESIGN.md "Quantized KV" one group at a time.  Returns ``(codes int32, scale fp16, zero fp16)``
    in the packed layout of ``tokops.kv.quantize``."""
    assert axis in (-1, -2)
    qmax = 2 ** bits - 1
    cpw = 32 // bits
    xt = (x if axis == -1 else x.transpose(-1, -2)).float().contiguous()
    lead = xt.shape[:-1]
    L = xt.shape[-1]
    ng = -(-L // group_size)
    nw = -(-ng * group_size * bits // 32)
    rows = xt.reshape(-1, L).numpy()
    codes = np.zeros((rows.shape[0], nw), dtype=np.int64)
    scales = np.zeros((rows.shape[0], ng), dtype=np.float16)
    zeros = np.zeros((rows.shape[0], ng), dtype=np.float16)
    for r, row in enumerate(rows):
        q_all = []
        for gi in range(ng):
            grp = [np.float32(v) for v in row[gi * group_size:(gi + 1) * group_size]]
            mn, mx = min(grp), max(grp)
            zero = np.float16(mn)
            scale = np.float16(np.float32(mx - mn) / np.float32(qmax))
            zeros[r, gi], scales[r, gi] = zero, scale
            z, s = np.float32(zero), np.float32(scale)
            for v in grp:
                if s == 0:
                    q = 0
                else:
                    t = np.float32(np.float32(v - z) / s)  # IEEE fp32 division, correctly rounded
                    q = min(max(round(float(t)), 0), qmax)  # Python round(): ties to even
                q_all.append(q)
            q_all += [0] * (group_size - len(grp))  # padded tail of the last group
        for w in range(nw):
            word = 0
            for j in range(cpw):
                idx = w * cpw + j
                if idx < len(q_all):
                    word |= q_all[idx] << (bits * j)
            codes[r, w] = word - (1 << 32) if word >= 1 << 31 else word
    c = torch.from_numpy(codes).to(torch.int32).reshape(*lead, nw)
    s = torch.from_numpy(scales).reshape(*lead, ng)
    z = torch.from_numpy(zeros).reshape(*lead, ng)
    if axis == -2:
        c, s, z = (t.transpose(-1, -2).contiguous() for t in (c, s, z))
    return c, s, z


def naive_unpack(codes: torch.Tensor, bits: int, axis: int, length: int) -> torch.Tensor:
    """int32 words -> integer codes along the grouped axis (first ``length`` entries), int64."""
    cpw = 32 // bits
    ct = (codes if axis == -1 else codes.transpose(-1, -2)).contiguous()
    lead = ct.shape[:-1]
    flat = ct.reshape(-1, ct.shape[-1]).tolist()
    out = []
    for row in flat:
        vals = []
        for w in row:
            w &= 0xFFFFFFFF
            vals += [(w >> (bits * j)) & (2 ** bits - 1) for j in range(cpw)]
        out.append(vals[:length])
    q = torch.tensor(out, dtype=torch.int64).reshape(*lead, length)
    return q if axis == -1 else q.transpose(-1, -2)


def naive_dequantize(codes, scale, zero, bits: int, group_size: int, axis: int, length: int) -> torch.Tensor:
    """``q * scale + zero`` in fp32 (two roundings, DESIGN.md), float32 result of the original shape."""
    q = naive_unpack(codes, bits, axis, length).float()
    rep = lambda t: t.float().repeat_interleave(group_size, axis)  # noqa: E731
    s, z = rep(scale), rep(zero)
    if axis == -1:
        s, z = s[..., :length], z[..., :length]
    else:
        s, z = s[..., :length, :], z[..., :length, :]
    return (q * s) + z


def _e4m3_table():
    """The 127 non-negative finite e4m3fn values by code (sign bit 0), decoded from the format:
    exponent bias 7, 3 mantissa bits, subnormals at exponent 0, code 0x7F is NaN."""
    vals = []
    for c in range(127):
        e, m = c >> 3, c & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def naive_fp8(x: torch.Tensor):
    """DESIGN.md fp8: ``scale = amax / 448`` per row (fp32), codes = x / scale rounded to the nearest
    e4m3fn value, ties to the even code (round-to-nearest-even), written without torch's fp8 cast.
    Returns ``(code values float64 (..., D), scale fp32 (...))``."""
    xf = x.cpu().float()
    scale = xf.abs().amax(-1) / 448.0
    safe = torch.where(scale == 0, 1.0, scale)
    y = (xf / safe.unsqueeze(-1)).double().clamp(-448.0, 448.0)
    table = _e4m3_table()
    a = y.abs().flatten()
    hi = torch.searchsorted(table, a).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - table[lo], table[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    idx = torch.where(pick_hi, hi, lo)
    vals = (table[idx] * torch.sign(y.flatten())).view(y.shape)
    vals = torch.where((scale == 0).unsqueeze(-1), 0.0, vals)
    return vals, scale


def check_fp8_codes(x, got_codes, exp_codes) -> None:
    """fp8 codes must equal the reference's bit for bit, on every backend.  (The Triton interpreter's
    own fp32 -> e4m3 cast loses the mantissa carry at binade crossings and rounds ties away from zero;
    under the interpreter the Triton kernels therefore take their exact bit-manipulation path,
    ``triton_kernels.kv_quant.native_fp8``, and nothing needs to be admitted.)"""
    got_codes, exp_codes = got_codes.cpu(), exp_codes.cpu()
    mismatch = got_codes.view(torch.uint8) != exp_codes.view(torch.uint8)
    assert not mismatch.any(), f"fp8 codes differ in {mismatch.sum().item()} places: x={x.cpu()[mismatch][:5].tolist()}"


# --------------------------------------------------------------------------- attention
def dense_token_mask(dense_blocks: torch.Tensor, block_q: int, block_k: int, Nq: int, Nk: int, causal: bool):
    """Allowed (query, key) pairs from a dense block mask (B|1, H|1, nqb, nkb), bottom-right causal."""
    t = dense_blocks.bool().repeat_interleave(block_q, -2)[..., :Nq, :].repeat_interleave(block_k, -1)[..., :Nk]
    if causal:
        i = torch.arange(Nq)[:, None]
        j = torch.arange(Nk)[None, :]
        t = t & (j - i <= Nk - Nq)
    return t


def sdpa_attention(q, k, v, allowed, scale, key_bias=None, dtype=torch.float64):
    """SDPA with a float mask (bias where allowed, -inf elsewhere); GQA by repeating k/v heads.
    Rows with no allowed key: out 0, lse -inf.  Returns ``(out, lse)`` in ``dtype``."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[-2]
    g = H // k.shape[1]
    kk = k.to(dtype).repeat_interleave(g, 1)
    vv = v.to(dtype).repeat_interleave(g, 1)
    bias = torch.zeros(B, H, 1, Nk, dtype=dtype)
    if key_bias is not None:
        kb = key_bias.to(dtype)
        bias = bias + (kb[:, None, None, :] if kb.dim() == 2 else kb[:, :, None, :])
    allowed = allowed.expand(B, H, Nq, Nk)
    fmask = torch.where(allowed, bias.expand(B, H, Nq, Nk), torch.tensor(float("-inf"), dtype=dtype))
    empty = ~allowed.any(-1)
    safe = fmask.masked_fill(empty[..., None], 0.0)  # SDPA gives NaN on all -inf rows
    out = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), kk, vv, attn_mask=safe, scale=scale)
    out = out.masked_fill(empty[..., None], 0.0)
    logits = (q.to(dtype) @ kk.transpose(-1, -2)) * scale + safe
    lse = torch.logsumexp(logits, -1).masked_fill(empty, float("-inf"))  # finite gradients on empty rows
    return out, lse


# --------------------------------------------------------------------------- quantized decode
def cache_kv(cache, dtype=torch.float64):
    """The cache's tokens in store order, rebuilt from its raw buffers with :func:`naive_unpack`."""
    t = cache.tensors()
    nq, nr, G = cache.n_quant, cache.n_res, cache.group_size
    out = []
    for p, bits, ax in (("k", cache.bits_k, cache.key_axis), ("v", cache.bits_v, cache.value_axis)):
        codes, scale = t[p + "_codes"], t[p + "_scale"]
        B, Hk = codes.shape[:2]
        D = t[p + "_res"].shape[-1]
        if nq == 0:
            xq = torch.zeros(B, Hk, 0, D, dtype=torch.float32)
        elif cache.mode == "fp8":
            c = codes[:, :, :nq].cpu().contiguous().view(torch.float8_e4m3fn).float()
            xq = c * scale[:, :, :nq, None].cpu().float()
        elif ax == -2:
            xq = naive_dequantize(codes[:, :, : nq * bits // 32].cpu(), scale[:, :, : nq // G].cpu(),
                                  t[p + "_zero"][:, :, : nq // G].cpu(), bits, G, -2, nq)
        else:
            xq = naive_dequantize(codes[:, :, :nq].cpu(), scale[:, :, :nq].cpu(), t[p + "_zero"][:, :, :nq].cpu(),
                                  bits, G, -1, D)
        out.append(torch.cat([xq.to(dtype), t[p + "_res"][:, :, :nr].cpu().to(dtype)], 2))
    return out[0], out[1]


def naive_decode(q, k, v, scale, dtype=torch.float64):
    """Decode attention as a loop over (batch, head, query) in ``dtype``: query ``i`` of ``nq`` sees
    store indices ``j <= L - nq + i``; GQA head ``h`` reads kv head ``h // (H / H_kv)``.
    Returns ``(out (B,H,nq,D), lse (B,H,nq), mass (B,H,L))``."""
    B, H, nq, D = q.shape
    Hk, L = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, nq, D, dtype=dtype)
    lse = torch.full((B, H, nq), float("-inf"), dtype=dtype)
    mass = torch.zeros(B, H, L, dtype=dtype)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(nq):
                n = L - nq + i + 1  # visible prefix
                if n <= 0:
                    continue
                kk, vv = k[b, hk, :n].to(dtype), v[b, hk, :n].to(dtype)
                s = (kk @ q[b, h, i].to(dtype)) * scale
                m = s.max()
                e = torch.exp(s - m)
                tot = e.sum()
                p = e / tot
                out[b, h, i] = p @ vv
                lse[b, h, i] = m + torch.log(tot)
                mass[b, h, :n] += p
    return out, lse, mass


def ulp_floor(dtype, scale: float, n: int) -> float:
    """A few ulps of ``dtype`` at magnitude ``scale``, growing like log2 of the reduction length."""
    return 8 * torch.finfo(dtype).eps * scale * (1 + math.log2(max(n, 2)))
