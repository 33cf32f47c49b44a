"""Decode attention over the paged quantized KV cache vs the contiguous one, at equal lengths (issue 14
items 2 and 5).

Per case, the same tokens (B rows of L tokens, fp16) go into a contiguous
:class:`~tokops.kv.QuantizedKVCache` and into a :class:`~tokops.kv.PagedKVCache` with the same bits,
group size and residual window (the same residual rule, so both hold the same quantized groups and
the same window); one query per row is attended with

* ``contiguous_<backend>``: ``tokops.kv.decode_attention`` (the baseline: the first entry);
* ``paged_<backend>``: ``tokops.kv.paged_decode_attention`` (block-table indirection per page).

Backends by name: ``torch`` on CPU, ``triton`` and ``cuda`` on a GPU.  The paged prefill is appended
in chunks of 4096 tokens per step across all rows, so a row's pages are interleaved with the other
rows' pages in the pool (not one contiguous run).  ``bytes`` is what both must move: packed KV + scales
+ zeros + residual window + q/out (the block table, ``4 * B * pages`` bytes, is left out).
"""

from __future__ import annotations

import torch

from tokops.kv import PagedKVCache, QuantizedKVCache, decode_attention, paged_decode_attention

from .harness import Case, gpu_backends


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _case(device, B, H, Hk, L, D, bits, group_size, residual, page_size, chunk=4096):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16
    k = torch.randn(B, Hk, L, D, generator=g, device=device, dtype=dtype)
    v = torch.randn(B, Hk, L, D, generator=g, device=device, dtype=dtype)
    q = torch.randn(B, H, 1, D, generator=g, device=device, dtype=dtype)
    cache = QuantizedKVCache(bits, bits, group_size=group_size, residual=residual)
    cache.append(k, v)
    pages = _cdiv(L, page_size)
    pc = PagedKVCache(B * pages, page_size, Hk, D, B, max_pages_per_row=pages, bits_k=bits, bits_v=bits,
                      group_size=group_size, residual=residual, dtype=dtype, device=device)
    for s in range(0, L, chunk):
        pc.append(k[:, :, s:s + chunk].contiguous(), v[:, :, s:s + chunk].contiguous())
    scale = D ** -0.5
    fns = {}
    backends = ["torch"] if device == "cpu" else None
    for be in backends or gpu_backends("kv_decode_attention"):
        fns[f"contiguous_{be}"] = (lambda be=be: decode_attention(q, cache, scale=scale, backend=be))
    for be in backends or gpu_backends("kv_paged_decode_attention"):
        fns[f"paged_{be}"] = (lambda be=be: paged_decode_attention(q, pc, scale=scale, backend=be))
    io = 2 * q.numel() * q.element_size()
    return Case(
        family="kv", name=f"paged vs contiguous decode int{bits} G={group_size} R={residual} P={page_size}",
        params=dict(B=B, H=H, H_kv=Hk, L=L, D=D, bits=bits, group_size=group_size, residual=residual,
                    page_size=page_size),
        fns=fns,
        bytes=cache.memory_bytes() + io,
        notes="bytes: packed KV + scales + zeros + residual + q/out (the same for both layouts)",
        extra={"pages_per_row": pages, "pool_bytes": pc.memory_bytes()})


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu" or quick:
        return [_case(device, B, 4, 2, L, 32, 4, 32, 32, 64) for B in (1, 2) for L in (256, 1000)]
    out = []
    for L in (4096, 32768):
        for B in (1, 16):
            for P in (16, 64) if L == 32768 else (64,):
                out.append(_case(device, B, 32, 8, L, 128, 4, 16 if P == 16 else 32, 128, P))
    return out
