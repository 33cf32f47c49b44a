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


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu" or quick:
        return [_case(device, B, 4, 2, L, 32, bits, 32, 32) for B in (1, 2) for L in (256, 1000) for bits in (4, 2)]
    out = []
    for L in (4096, 32768, 131072):
        for B in (1, 16):
            for bits in (4, 2):
                out.append(_case(device, B, 32, 8, L, 128, bits, 32, 128))
    return out
