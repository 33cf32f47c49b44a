"""Decode attention over a :class:`~tokops.kv.QuantizedKVCache` (flash-decoding on packed codes).

Papers: KIVI (Liu et al., ICML 2024) for the cache; Flash-Decoding (Dao et al., 2023) for the
split-K scheme.  Spec: ``DESIGN.md`` ("Quantized KV").

``decode_attention(q, cache)``: ``q (B, H, nq, D)``, ``1 <= nq <= 8`` (speculative decoding),
``H % H_kv == 0`` (GQA/MQA).  **Causal rule among the new queries:** the cache already contains the
``nq`` new tokens (append before attending); with ``L = len(cache)``, query ``i`` attends to the
tokens of store index ``j <= L - nq + i`` (so the last query sees everything, earlier queries do
not see the later new tokens).  A query with no visible token (``L < nq - i``, e.g. an empty
cache) returns 0 and LSE ``-inf``.

Op ``tokops::kv_decode_attention`` takes the cache's buffers (capacity-sized) and **per-row lengths**
``n_quant, n_res: int32 (B,)`` on q's device (ragged batches, issue 14): row ``b`` holds the quantized
tokens ``[0, n_quant[b])`` in store order followed by the residual tokens ``[0, n_res[b])``, ``L_b =
n_quant[b] + n_res[b]`` (``n_quant[b]`` a multiple of ``G`` when a store axis is -2; lengths past the
buffers are clamped to them), and ``max_len >= max_b L_b`` (an int: the mass's last dim).  Query ``i``
of row ``b`` sees ``j <= L_b - nq + i``; a query with nothing visible returns 0 and LSE ``-inf``.
Returns ``(out, lse, mass)``: ``out (B, H, nq, D)`` in q's dtype, ``lse (B, H, nq)`` fp32 (natural
log), ``mass (B, H, max_len)`` fp32 (``sum_i P[b, h, i, j]``, the H2O score, 0 at ``j >= L_b``) or
``(B, H, 0)`` when not requested.  No host sync: the lengths are only read on the device, and the
Triton/CUDA launch grids depend on the buffer capacities, not on the lengths (CUDA-graph replay).

Backends: ``torch`` dequantizes the valid tokens and runs dense fp32 attention (reference path);
``triton`` is the fused kernel (``triton_kernels/kv_decode.py``) that reads the packed codes and
scales directly, never building a dequantized copy; ``cuda`` (``csrc/kv/decode_cuda.cu``) is the
same scheme in CUDA C++ for head dims 32/64/128/256 with q in the cache's dtype (``auto`` falls
back to Triton otherwise).  :func:`decode_attention_reference` is the
float64 oracle used by the tests.
"""

from __future__ import annotations

import math

import torch

from .. import _registry as reg
from .._checks import FLOAT_DTYPES, check_tensor, dense
from . import reference as ref
from .cache import QuantizedKVCache

MAX_NQ = 8


# --------------------------------------------------------------------------- pure torch
def dequantize_store(codes, scale, zero, mode: str, bits: int, group_size: int, axis: int, n: int, D: int,
                     dtype=torch.float32) -> torch.Tensor:
    """The first ``n`` tokens of one quantized store tensor, dequantized: ``(B, H_kv, n, D)``."""
    B, H = codes.shape[:2]
    if n == 0:
        return torch.zeros(B, H, 0, D, dtype=dtype, device=codes.device)
    if mode == "fp8":
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        x = codes[:, :, :n].view(torch.float8_e4m3fn).to(wide) * scale[:, :, :n, None].to(wide)
        return x.to(dtype)
    if axis == -2:
        c = codes[:, :, : n * bits // 32]
        s, z = scale[:, :, : n // group_size], zero[:, :, : n // group_size]
        length = n
    else:
        c, s, z = codes[:, :, :n], scale[:, :, :n], zero[:, :, :n]
        length = D
    # fp16 straight from the reference (it saturates at the fp16 range instead of rounding to inf)
    wide = torch.float16 if dtype == torch.float16 else torch.float32
    x = ref.dequantize(c.contiguous(), s.contiguous(), z.contiguous(), bits, group_size, axis, length, wide)
    return x.to(dtype)


def dense_decode(q, k, v, scale: float, return_mass: bool = True, lengths: torch.Tensor | None = None):
    """Dense attention of ``q (B, H, nq, D)`` over ``k, v (B, H_kv, L, D)`` in q's dtype, with the
    decode causal rule.  Returns ``(out, lse, mass)`` (mass ``(B, H, L)``, empty if not asked).

    ``lengths``: optional per-row lengths ``(B,)`` (ragged rows): row ``b`` holds the tokens
    ``[0, lengths[b])`` of ``k, v`` (the rest is ignored, its mass is 0) and query ``i`` sees
    ``j <= lengths[b] - nq + i``."""
    B, H, nq, D = q.shape
    Hk, L = k.shape[1], k.shape[2]
    g = H // Hk
    k = k.to(q.dtype).repeat_interleave(g, 1)
    v = v.to(q.dtype).repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, nq, L)
    j = torch.arange(L, device=q.device)
    i = torch.arange(nq, device=q.device)
    if lengths is None:
        allowed = j[None, :] <= (L - nq + i)[:, None]
    else:
        lb = lengths.to(device=q.device, dtype=torch.int64)[:, None, None, None]  # (B, 1, 1, 1)
        allowed = (j[None, None, None, :] < lb) & (j[None, None, None, :] <= lb - nq + i[None, None, :, None])
        v = torch.where((j[None, :] < lb[:, 0, 0])[:, None, :, None], v, torch.zeros((), dtype=v.dtype,
                                                                                     device=v.device))
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1) if L else torch.full((B, H, nq), float("-inf"), dtype=q.dtype, device=q.device)
    finite = torch.isfinite(lse)
    p = torch.where(allowed & finite[..., None], torch.exp(s - torch.where(finite, lse, 0)[..., None]),
                    torch.zeros((), dtype=q.dtype, device=q.device))
    out = p @ v
    mass = p.sum(2) if return_mass else p.new_zeros(B, H, 0)
    return out, lse, mass


def store_capacity(codes, scale, mode: str, bits: int, group_size: int, axis: int) -> int:
    """Tokens the quantized store tensors ``codes``/``scale`` can hold (from their shapes)."""
    if mode == "fp8" or axis == -1:
        return codes.shape[2]
    return min(codes.shape[2] * 32 // bits, scale.shape[2] * group_size) // group_size * group_size


def gather_rows(kq, kr, n_quant, max_len):
    """Per-row store order of ragged rows: ``(B, H_kv, max_len, D)`` whose token ``j`` of row ``b`` is
    quantized token ``j`` (``kq``) for ``j < n_quant[b]``, else residual token ``j - n_quant[b]``
    (``kr``); positions past the row's tokens hold clamped (finite) entries the caller masks."""
    B, Hk, Qn, D = kq.shape
    allk = torch.cat([kq, kr.to(kq.dtype)], 2)
    n = allk.shape[2]
    if n == 0:
        return kq.new_zeros(B, Hk, max_len, D)
    j = torch.arange(max_len, device=kq.device)[None, :]
    nqb = n_quant.to(device=kq.device, dtype=torch.int64)[:, None]
    idx = torch.where(j < nqb, j, Qn + j - nqb).clamp(0, n - 1)  # (B, max_len)
    return allk.gather(2, idx[:, None, :, None].expand(B, Hk, max_len, D))


def _torch_decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, n_quant, n_res, max_len,
                  mode, bits_k, bits_v, group_size, key_axis, value_axis, scale, return_mass):
    # no host sync: the store is dequantized up to min(capacity, max_len) tokens (a bound from shapes
    # and ints only) and each row's tokens are gathered by its device-side lengths
    D = q.shape[-1]
    cap = min(store_capacity(k_codes, k_scale, mode, bits_k, group_size, key_axis),
              store_capacity(v_codes, v_scale, mode, bits_v, group_size, value_axis))
    Qn = min(cap, -(-max_len // group_size) * group_size)
    Rn = min(k_res.shape[2], max_len)
    kq = dequantize_store(k_codes, k_scale, k_zero, mode, bits_k, group_size, key_axis, Qn, D)
    vq = dequantize_store(v_codes, v_scale, v_zero, mode, bits_v, group_size, value_axis, Qn, D)
    k = gather_rows(kq, k_res[:, :, :Rn].float(), n_quant, max_len)
    v = gather_rows(vq, v_res[:, :, :Rn].float(), n_quant, max_len)
    lengths = n_quant.to(torch.int64) + n_res.to(torch.int64)
    out, lse, mass = dense_decode(q.float(), k, v, scale, return_mass, lengths=lengths)
    o = reg.new_output(q.shape, q.dtype, q.device)
    o.copy_(out)
    lse_o = reg.new_output(lse.shape, torch.float32, q.device)
    lse_o.copy_(lse)
    m = reg.new_output(mass.shape, torch.float32, q.device)
    m.copy_(mass)
    return o, lse_o, m


def decode_attention_reference(q: torch.Tensor, cache: QuantizedKVCache, *, scale: float | None = None):
    """The float64 oracle: dequantize the cache (:meth:`QuantizedKVCache.dequantized`) and run dense
    attention in float64.  Returns ``(out, lse, mass)`` in float64."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not cache.initialized:
        B, H, nq, D = q.shape
        return (torch.zeros(B, H, nq, D, dtype=torch.float64), torch.full((B, H, nq), float("-inf"),
                dtype=torch.float64), torch.zeros(B, H, 0, dtype=torch.float64))
    k, v = cache.dequantized(torch.float64)
    lengths = None if cache.is_uniform else cache.lengths()  # ragged rows: each row over its own tokens
    return dense_decode(q.double().to(k.device), k, v, scale, lengths=lengths)


# --------------------------------------------------------------------------- checks
def _check_decode(q, cache, scale, return_mass) -> torch.Tensor:
    """Checks; returns ``q`` contiguous (a strided view is copied once: q is ``nq <= 8`` tokens)."""
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"cache must be a tokops.kv.QuantizedKVCache, got {type(cache).__name__}")
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=4, contiguous=False)
    B, H, nq, D = q.shape
    if not 1 <= nq <= MAX_NQ:
        raise ValueError(f"q must have 1 <= nq <= {MAX_NQ} new queries (q.shape[2]), got shape {tuple(q.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if not isinstance(return_mass, bool):
        raise TypeError(f"return_mass must be a bool, got {type(return_mass).__name__}")
    if cache.initialized:
        Bc, Hk, Dc = cache._shape
        if B != Bc:
            raise ValueError(f"q must have the cache's batch size {Bc} (q.shape[0]), got shape {tuple(q.shape)}")
        if D != Dc:
            raise ValueError(f"q must have the cache's head dim {Dc} (q.shape[3]), got shape {tuple(q.shape)}")
        if H % Hk:
            raise ValueError(f"q must have a number of heads (q.shape[1]={H}) that is a multiple of the cache's "
                             f"kv heads {Hk}")
        if q.device != cache.device:
            raise ValueError(f"q must be on the cache's device {cache.device}, got {q.device}")
        if cache.n_pinned and cache.n_res and nq > 1:
            # with pinned tokens the newest tokens are still last in store order as long as they are
            # in the residual window; that holds when the window is at least nq long
            if cache.residual < nq:
                raise ValueError(f"q: nq={nq} > cache.residual={cache.residual} with pinned tokens: the causal "
                                 f"rule needs the nq newest tokens at the end of the store")
    return dense(q)


# --------------------------------------------------------------------------- op
def _decode_fake(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res, n_quant, n_res, max_len, mode,
                 bits_k, bits_v, group_size, key_axis, value_axis, scale, return_mass, backend):
    B, H, nq, D = q.shape
    return (q.new_empty(q.shape), q.new_empty((B, H, nq), dtype=torch.float32),
            q.new_empty((B, H, max_len if return_mass else 0), dtype=torch.float32))


_decode_op = reg.define(
    "kv_decode_attention",
    "(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, Tensor v_scale, Tensor v_zero, "
    "Tensor k_res, Tensor v_res, Tensor n_quant, Tensor n_res, int max_len, str mode, int bits_k, int bits_v, int group_size, "
    "int key_axis, int value_axis, float scale, bool return_mass, str backend) -> (Tensor, Tensor, Tensor)",
    _decode_fake)
reg.implements("kv_decode_attention", "torch", _torch_decode)
reg.implements("kv_decode_attention", "triton", "tokops.triton_kernels.kv_decode:decode_attention")
reg.implements("kv_decode_attention", "cuda", reg.cuda_op("kv_decode_attention"))
CUDA_HEAD_DIMS = (32, 64, 128, 256)


def decode_attention(q: torch.Tensor, cache: QuantizedKVCache, *, scale: float | None = None,
                     return_mass: bool = False, return_lse: bool = False, backend: str = "auto"):
    """Attention of ``q: (B, H, nq, D)`` (fp16/bf16/fp32, ``1 <= nq <= 8``) over every token of
    ``cache`` (quantized store + full-precision residual window), GQA when ``H_kv < H``.

    ``scale`` defaults to ``D ** -0.5``.  Causal among the new queries: query ``i`` sees store
    indices ``j <= len(cache) - nq + i`` (append the ``nq`` new tokens first).  Returns ``out``
    ``(B, H, nq, D)`` in q's dtype; with ``return_mass`` also the per-key attention mass
    ``(B, H, len(cache))`` fp32 (the H2O score, in store order, see ``cache.positions()``); with
    ``return_lse`` also the fp32 LSE ``(B, H, nq)``.  Tuple order: ``(out[, mass][, lse])``.
    """
    q = _check_decode(q, cache, scale, return_mass)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    be = reg.resolve_backend("kv_decode_attention", backend, q.device)
    if be == "cuda" and cache.initialized:
        why = None
        if q.shape[-1] not in CUDA_HEAD_DIMS:
            why = f"head dim {q.shape[-1]} (the CUDA kernel supports {CUDA_HEAD_DIMS})"
        elif q.dtype != cache.dtype:
            why = f"q dtype {q.dtype} != cache dtype {cache.dtype}"
        if why is not None:
            if backend == "cuda":
                raise ValueError(f"q: backend='cuda' cannot run this call: {why}; use backend='triton'")
            be = "triton"
    if not cache.initialized:
        B, H, nq, D = q.shape
        out = torch.zeros_like(q)
        res = [out]
        if return_mass:
            res.append(torch.zeros(B, H, 0, dtype=torch.float32, device=q.device))
        if return_lse:
            res.append(torch.full((B, H, nq), float("-inf"), dtype=torch.float32, device=q.device))
        return res[0] if len(res) == 1 else tuple(res)
    t = cache.tensors()
    out, lse, mass = _decode_op(q, t["k_codes"], t["k_scale"], t["k_zero"], t["v_codes"], t["v_scale"],
                                t["v_zero"], t["k_res"], t["v_res"], t["n_quant"], t["n_res"], len(cache), cache.mode,
                                cache.bits_k, cache.bits_v, cache.group_size, cache.key_axis, cache.value_axis,
                                scale, return_mass, be)
    res = [out]
    if return_mass:
        res.append(mass)
    if return_lse:
        res.append(lse)
    return res[0] if len(res) == 1 else tuple(res)
