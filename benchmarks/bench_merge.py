"""Token merging and pruning: tokops (fused matching + fused merge) vs the pure-torch ToMe reference.

The baseline is :mod:`tokops.merge.reference` with scores in the input dtype, i.e. what
facebookresearch/ToMe ``tome/merge.py`` computes (it materialises the ``(N/2) x (N/2)`` score
matrix: at N = 65536 that is 2 GiB per sequence in fp16).  ``extra["peak_bytes"]`` holds the peak
extra device memory of one call of each implementation (GPU only); the ToMe step case also has
``extra["traced_peak_bytes"]``, the same quantity traced on meta tensors (any device, see
:mod:`benchmarks.memtrack`).
"""

from __future__ import annotations

import torch

import tokops
from tokops import _registry
from tokops.merge import reference as R

from .harness import Case, peak_memory

M = tokops.merge


def _impls(device: str, op: str) -> list[str]:
    impls = ["torch"]
    if device == "cuda" or _registry.triton_interpreter():
        impls.append("triton")
    if device == "cuda" and tokops.cuda_compiled() and _registry.has_impl(op, "cuda"):
        impls.append("cuda")
    return impls


def _label(be: str) -> str:
    return {"torch": "tokops torch", "triton": "tokops triton", "cuda": "tokops cuda"}[be]


def _peaks(fns: dict, device: str) -> dict:
    if device != "cuda":
        return {}
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = peak_memory(fn, device)
        except Exception as e:  # the reference may not fit at the largest sizes
            out[name] = f"{type(e).__name__}"
        torch.cuda.empty_cache()
    return {"peak_bytes": out}


def _torch_step(metric, x, r):
    m = R.bipartite_soft_matching(metric, r, True, score_dtype=metric.dtype)
    y, _ = R.merge_wavg(m, x)
    return R.unmerge(m, y)


def _tokops_step(metric, x, r, be="auto", mbe="auto"):
    m = M.bipartite_soft_matching(metric, r, True, backend=be)
    y, _ = M.merge_wavg(m, x, backend=mbe)
    return M.unmerge(m, y, backend=mbe)


def _traced_step_peaks(B: int, N: int, C: int, dtype, r: int) -> dict:
    """Peak extra bytes of one ToMe step, traced on meta tensors at this size (benchmarks.memtrack):
    the same for every tokops backend (the match kernels' internal workspace added analytically)."""
    from .memtrack import match_workspace_bytes, traced_peak

    metric = torch.empty(B, N, C, device="meta", dtype=dtype)
    x = torch.empty(B, N, C, device="meta", dtype=dtype)
    out = {"ToMe step (torch)": traced_peak(lambda: _torch_step(metric, x, r), [metric, x])[0]}
    out["tokops"] = traced_peak(lambda: _tokops_step(metric, x, r), [metric, x])[0] + match_workspace_bytes(
        B, N, dtype)
    return out


def _sizes(device: str, quick: bool):
    if device == "cuda" and not quick:
        sizes = []
        for N in (197, 1024, 4096, 16384, 65536):
            B = max(1, min(64, 65536 // N))
            for C in (384, 768, 1024):
                sizes.append((B, N, C))
        return sizes, torch.float16
    if device == "cuda":
        return [(8, 197, 384), (2, 1024, 768)], torch.float16
    return [(2, 37, 32), (1, 64, 48)], torch.float32


def cases(device: str, quick: bool) -> list[Case]:
    sizes, dtype = _sizes(device, quick)
    e = torch.finfo(dtype).bits // 8
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for B, N, C in sizes:
        r = max(1, N // 4) if N > 197 else 16
        metric = torch.randn(B, N, C, device=device, dtype=dtype, generator=g)
        x = torch.randn(B, N, C, device=device, dtype=dtype, generator=g)
        params = {"B": B, "N": N, "C": C, "r": r, "dtype": str(dtype).removeprefix("torch."), "class_token": True}

        # one ToMe layer: matching + size-weighted merge (what a ViT block runs)
        fns = {"ToMe reference (torch)": lambda metric=metric, x=x, r=r: R.merge_wavg(
            R.bipartite_soft_matching(metric, r, True, score_dtype=metric.dtype), x)}
        for be in _impls(device, "tome_match"):
            mbe = be if _registry.has_impl("tome_segment_reduce", be) else "triton"
            fns[_label(be)] = lambda metric=metric, x=x, r=r, be=be, mbe=mbe: M.merge_wavg(
                M.bipartite_soft_matching(metric, r, True, backend=be), x, backend=mbe)
        layer_bytes = 2 * B * N * C * e + B * (N - r) * C * e + 4 * B * (2 * N - r)
        out.append(Case("merge", "ToMe layer: bipartite_soft_matching + merge_wavg", params, fns,
                        bytes=layer_bytes, flops=2.0 * B * ((N + 1) // 2) * (N // 2) * C,
                        notes="flops: the A x B cosine scores", extra=_peaks(fns, device)))

        # one ToMe step as the issue-12 target counts it: match + size-weighted merge + unmerge
        fns = {"ToMe step (torch)": lambda metric=metric, x=x, r=r: _torch_step(metric, x, r)}
        for be in _impls(device, "tome_match"):
            mbe = be if _registry.has_impl("tome_segment_reduce", be) else "triton"
            fns[_label(be)] = lambda metric=metric, x=x, r=r, be=be, mbe=mbe: _tokops_step(metric, x, r, be, mbe)
        step_bytes = 2 * B * N * C * e + 2 * B * (N - r) * C * e + B * N * C * e
        out.append(Case("merge", "ToMe step: match + merge_wavg + unmerge", params, fns, bytes=step_bytes,
                        flops=2.0 * B * ((N + 1) // 2) * (N // 2) * C,
                        notes="peak extra MiB: measured on a GPU, ~ traced on meta tensors (benchmarks.memtrack)",
                        extra={**_peaks(fns, device), "traced_peak_bytes": _traced_step_peaks(B, N, C, dtype, r)}))

        # the matching step alone: fused kernel vs score matrix + max
        nA, nB = (N + 1) // 2, N // 2
        fns = {"scores + max (torch)": lambda metric=metric: R._scores(metric, True, False, metric.dtype).max(-1)}
        for be in _impls(device, "tome_match"):
            fns[_label(be)] = lambda metric=metric, be=be: torch.ops.tokops.tome_match(metric, None, True, False, be)
        out.append(Case("merge", "tome_match (node_max, node_idx)", params, fns,
                        bytes=B * N * C * e + 12 * B * nA, flops=2.0 * B * nA * nB * C, extra=_peaks(fns, device)))

        # the merge step alone, for a fixed matching
        m = M.bipartite_soft_matching(metric, r, True, backend="torch")
        rm = R.bipartite_soft_matching(metric, r, True, score_dtype=metric.dtype)
        size = torch.rand(B, N, 1, device=device, dtype=dtype, generator=g) + 1
        fns = {"ToMe merge_wavg (torch)": lambda x=x, rm=rm, size=size: R.merge_wavg(rm, x, size)}
        for be in _impls(device, "tome_segment_reduce"):
            fns[_label(be)] = lambda x=x, m=m, size=size, be=be: M.merge_wavg(m, x, size, backend=be)
        out.append(Case("merge", "merge_wavg (fixed matching)", params, fns,
                        bytes=B * N * (C + 1) * e + B * (N - r) * (C + 1) * e + 8 * B * N * 3))

        if N <= 16384 and C == 768 or device != "cuda":
            fns = {"energy, full matrix (torch)": lambda metric=metric: R.pitome_energy(metric, 0.5, 1.0, "elu",
                                                                                       metric.dtype)}
            for be in _impls(device, "pitome_energy"):
                fns[_label(be)] = lambda metric=metric, be=be: M.pitome_energy(metric, 0.5, backend=be)
            out.append(Case("merge", "PiToMe energy", params, fns, bytes=B * N * C * e + 4 * B * N,
                            flops=2.0 * B * N * N * C, extra=_peaks(fns, device)))

            scores = torch.randn(B, N, device=device, generator=g)
            keep = N // 2
            fns = {"topk + sort + gather (torch)": lambda x=x, scores=scores, keep=keep: x.gather(
                1, scores.topk(keep, dim=1).indices.sort(1).values[..., None].expand(-1, -1, x.shape[-1]))}
            for be in _impls(device, "token_gather"):
                fns[_label(be)] = lambda x=x, scores=scores, keep=keep, be=be: M.prune_topk(x, scores, keep,
                                                                                            backend=be)
            out.append(Case("merge", "prune_topk (keep N/2)", {**params, "keep": keep}, fns,
                            bytes=B * N * C * e // 2 * 2 + 4 * B * N))
    return out
