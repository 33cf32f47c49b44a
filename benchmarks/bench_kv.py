"""KV quantization: tokops Triton / CUDA kernels vs the pure-torch reference (the baseline)."""

from __future__ import annotations

import torch

import tokops

from .harness import Case


def _impls(device: str) -> list[str]:
    impls = ["torch", "triton"]
    if device == "cuda" and tokops.cuda_compiled():
        impls.append("cuda")
    return impls


def _label(be: str) -> str:
    return {"torch": "torch reference", "triton": "tokops triton", "cuda": "tokops cuda"}[be]


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda" and not quick:
        shape, dtype = (1, 8, 32768, 128), torch.float16  # 32k tokens x 8 heads x 128 dims
        settings = [(4, 32), (8, 32), (2, 32), (4, 64), (4, 128)]
    else:
        shape, dtype = ((1, 8, 1024, 128), torch.float16) if device == "cuda" else ((1, 2, 96, 64), torch.float32)
        settings = [(4, 32), (2, 32)]
    x = torch.randn(shape, dtype=dtype, device=device)
    out = []
    for bits, g in settings:
        for axis, what in ((-2, "keys, per channel"), (-1, "values, per token")):
            qt = tokops.kv.quantize(x, bits, g, axis, backend="torch")
            packed = qt.nbytes()
            params = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."),
                      "bits": bits, "G": g}
            out.append(Case("kv", f"quantize int{bits} G={g} ({what})", params,
                            {_label(be): (lambda be=be, axis=axis, bits=bits, g=g:
                                          tokops.kv.quantize(x, bits, g, axis, backend=be))
                             for be in _impls(device)},
                            bytes=x.numel() * x.element_size() + packed))
            out.append(Case("kv", f"dequantize int{bits} G={g} ({what})", params,
                            {_label(be): (lambda be=be, qt=qt: tokops.kv.dequantize(qt, backend=be))
                             for be in _impls(device)},
                            bytes=x.numel() * x.element_size() + packed))
    ft = tokops.kv.quantize_fp8(x, backend="torch")
    params = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch.")}
    fp8_impls = _impls(device)  # the Triton fp8 kernels also run on sm_80/86 (integer e4m3 conversion)
    out.append(Case("kv", "quantize fp8 e4m3 (per token, head)", params,
                    {_label(be): (lambda be=be: tokops.kv.quantize_fp8(x, backend=be)) for be in fp8_impls},
                    bytes=x.numel() * (x.element_size() + 1) + ft.scale.numel() * 4))
    out.append(Case("kv", "dequantize fp8 e4m3", params,
                    {_label(be): (lambda be=be: tokops.kv.dequantize_fp8(ft, backend=be)) for be in fp8_impls},
                    bytes=x.numel() * (x.element_size() + 1) + ft.scale.numel() * 4))
    return out
