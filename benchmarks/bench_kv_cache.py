"""Decode attention over a quantized KV cache (one new token per sequence).

Per case, three implementations (the first is the baseline):

* ``sdpa_fp16``: ``F.scaled_dot_product_attention`` over a dense fp16 cache (what runs without
  quantization; reads 16-bit K and V);
* ``dequant_sdpa``: the HuggingFace ``QuantizedCache`` way: dequantize the whole quantized cache
  into fp16 temporaries (``tokops.kv.dequantize``), concatenate the residual window, then SDPA;
* ``tokops_<backend>``: ``tokops.kv.decode_attention`` (split-K over the packed codes, no temporary)
  with each backend named explicitly: ``torch`` on CPU, ``triton`` and ``cuda`` on a GPU.

``bytes`` is what the fused decode must move: packed KV + scales + zeros + residual window + q/out
(``extra["fp16_bytes"]`` is what the dense baseline moves).

**Ragged batches** (issue 14 item 5, decode part): rows of different lengths (spread 1k-32k on a GPU)
decoded by one ``tokops::kv_decode_attention`` call with per-row length tensors (``ragged_<backend>``)
against the same batch padded to the longest row (``padded_<backend>``, the baseline: what a cache
with one length per batch pays) and one decode call per row (``per_row_<backend>``, same result as the
ragged call).  ``bytes`` counts the ragged rows' own tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tokops
from tokops.kv import QuantizedKVCache, QuantizedTensor, decode_attention

from .harness import Case, gpu_backends


def _dequant_all(cache: QuantizedKVCache, dtype, backend: str):
    """Dequantize the whole cache (HF-style) with a tokops dequantize kernel (Triton on a GPU)."""
    t = cache.tensors()
    outs = []
    for p, bits, ax in (("k", cache.bits_k, cache.key_axis), ("v", cache.bits_v, cache.value_axis)):
        qt = QuantizedTensor(t[p + "_codes"], t[p + "_scale"], t[p + "_zero"], bits, cache.group_size, ax,
                             cache.n_quant if ax == -2 else cache.head_dim, dtype)
        x = tokops.kv.dequantize(qt, dtype, backend=backend)
        outs.append(torch.cat([x, t[p + "_res"][:, :, : cache.n_res]], 2))
    return outs


def _case(device, B, H, Hk, L, D, bits, group_size, residual):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16
    k = torch.randn(B, Hk, L, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hk, L, D, generator=g, device=device, dtype=dtype)
    q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype)
    cache = QuantizedKVCache(bits, bits, group_size=group_size, residual=residual)
    cache.append(k, v)  # one prefill: the store is allocated at exactly its size (contiguous views)
    scale = D ** -0.5

    def sdpa_fp16():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def dequant_sdpa():
        kd, vd = _dequant_all(cache, dtype, "torch" if device == "cpu" else "triton")
        return F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)

    def fused(backend):
        return lambda: decode_attention(q, cache, scale=scale, backend=backend)

    io = 2 * q.numel() * q.element_size()
    fns = {"sdpa_fp16": sdpa_fp16, "dequant_sdpa": dequant_sdpa}
    for be in (["torch"] if device == "cpu" else gpu_backends("kv_decode_attention")):
        fns[f"tokops_{be}"] = fused(be)
    return Case(
        family="kv", name=f"decode int{bits} G={group_size} R={residual}",
        params=dict(B=B, H=H, H_kv=Hk, L=L, D=D, bits=bits, group_size=group_size, residual=residual),
        fns=fns,
        bytes=cache.memory_bytes() + io,
        notes="bytes: packed KV + scales + zeros + residual + q/out (fused decode)",
        extra={"fp16_bytes": 2 * k.numel() * k.element_size() + io,
               "compression": cache.compression_report()["ratio_vs_fp16"]})


def _stack_rows(caches: list[QuantizedKVCache]):
    """One batch of capacity-sized buffers from single-row caches (rows of different lengths) and the
    per-row length tensors: ``(buffers, n_quant, n_res, max_len)``."""
    ts = [c.tensors() for c in caches]
    bufs = []
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res"):
        parts = [t[name] for t in ts]
        n = max(p.shape[2] for p in parts)
        bufs.append(torch.cat([F.pad(p, (0, 0, 0, n - p.shape[2])) for p in parts], 0).contiguous())
    dev = ts[0]["k_res"].device
    nq = torch.tensor([c.n_quant for c in caches], dtype=torch.int32, device=dev)
    nr = torch.tensor([c.n_res for c in caches], dtype=torch.int32, device=dev)
    return bufs, nq, nr, max(len(c) for c in caches)


def _ragged_case(device, lengths, H, Hk, D, bits, group_size, residual):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    B, Lmax = len(lengths), max(lengths)
    q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype)
    rows, per_row_bytes = [], 0
    for n in lengths:
        c = QuantizedKVCache(bits, bits, group_size=group_size, residual=residual)
        c.append(torch.randn(1, Hk, n, D, generator=g, device=device, dtype=dtype),
                 torch.randn(1, Hk, n, D, generator=g, device=device, dtype=dtype))
        rows.append(c)
        per_row_bytes += c.memory_bytes()
    bufs, nq, nr, max_len = _stack_rows(rows)
    padded = QuantizedKVCache(bits, bits, group_size=group_size, residual=residual)
    padded.append(torch.randn(B, Hk, Lmax, D, generator=g, device=device, dtype=dtype),
                  torch.randn(B, Hk, Lmax, D, generator=g, device=device, dtype=dtype))
    scale = D ** -0.5

    def run_padded(be):
        return lambda: decode_attention(q, padded, scale=scale, backend=be)

    def run_per_row(be):
        return lambda: torch.cat([decode_attention(q[b:b + 1], c, scale=scale, backend=be)
                                  for b, c in enumerate(rows)])

    def run_ragged(be):
        return lambda: torch.ops.tokops.kv_decode_attention(q, *bufs, nq, nr, max_len, "int", bits, bits, group_size,
                                                            -2, -1, scale, False, be)[0]

    bes = ["torch"] if device == "cpu" else gpu_backends("kv_decode_attention")
    fns = {f"padded_{bes[0]}": run_padded(bes[0]), f"per_row_{bes[0]}": run_per_row(bes[0])}
    for be in bes:
        fns[f"ragged_{be}"] = run_ragged(be)
    io = 2 * q.numel() * q.element_size()
    return Case(
        family="kv", name=f"decode ragged int{bits} G={group_size} R={residual}",
        params=dict(B=B, H=H, H_kv=Hk, L_min=min(lengths), L_max=Lmax, L_mean=sum(lengths) // B, D=D, bits=bits,
                    group_size=group_size, residual=residual),
        fns=fns,
        bytes=per_row_bytes + io,
        notes="baseline: the batch padded to its longest row; bytes: the ragged rows' own packed KV + q/out",
        extra={"padded_bytes": padded.memory_bytes() + io, "lengths": list(lengths)})


def ragged_lengths(B: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """``B`` row lengths spread over ``[lo, hi]`` (log-uniform, both ends included)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, generator=g)
    u[0], u[-1] = 0.0, 1.0
    return [int(round(lo * (hi / lo) ** float(x))) for x in u]


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu" or quick:
        return ([_case(device, B, 4, 2, L, 32, bits, 32, 32) for B in (1, 2) for L in (256, 1000) for bits in (4, 2)]
                + [_ragged_case(device, ragged_lengths(4, 8, 300), 4, 2, 32, 4, 32, 32)])
    out = [_ragged_case(device, ragged_lengths(16, 1024, 32768), 32, 8, 128, bits, 32, 128) for bits in (4, 2)]
    for L in (4096, 32768, 131072):
        for B in (1, 16):
            for bits in (4, 2):
                out.append(_case(device, B, 32, 8, L, 128, bits, 32, 128))
    return out
