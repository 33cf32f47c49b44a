"""Strided (non-contiguous) inputs: every public op takes transposed, sliced and expanded views and
gives the result it gives on the same values made contiguous (DESIGN.md "Inputs: accept strided
views").  Attention q/k/v with a contiguous last dim are read in place by the Triton kernels (no
copy); the other ops copy once in their check helper."""

import pytest
import torch

import tokops
from tokops import _checks

A, M, KV = tokops.attention, tokops.merge, tokops.kv


def _views(shape, gen, kinds=("transposed", "sliced", "expanded")):
    """(kind, strided view, same values contiguous) for a (B, X, Y, ...) shape; every view is
    non-contiguous."""
    B, X, Y, *rest = shape
    out = []
    if "transposed" in kinds:  # memory (B, Y, X, ...) seen as (B, X, Y, ...)
        t = torch.randn(B, Y, X, *rest, generator=gen).transpose(1, 2)
        out.append(("transposed", t))
    if "sliced" in kinds:  # every other row along X, and a slice of the last dim
        t = torch.randn(B, 2 * X, Y, *rest[:-1], rest[-1] + 3, generator=gen) if rest else \
            torch.randn(B, 2 * X, Y + 3, generator=gen)
        t = t[:, ::2, ..., :rest[-1]] if rest else t[:, ::2, :Y]
        out.append(("sliced", t))
    if "expanded" in kinds:  # one batch row broadcast over B
        t = torch.randn(1, X, Y, *rest, generator=gen).expand(B, X, Y, *rest)
        out.append(("expanded", t))
    for kind, t in out:
        assert not t.is_contiguous(), kind
    return [(k, t, t.contiguous()) for k, t in out]


KINDS = ("transposed", "sliced", "expanded")


def test_check_helpers():
    t = torch.randn(2, 3, 4).transpose(0, 1)
    assert _checks.last_dim_dense(t) is t  # last dim contiguous: read in place
    u = torch.randn(4, 3).t()
    assert _checks.last_dim_dense(u).is_contiguous() and torch.equal(_checks.last_dim_dense(u), u)
    assert _checks.dense(t).is_contiguous() and _checks.dense(None) is None


# --------------------------------------------------------------------------- attention
def _qkv_view(kind, B, H, N, D, gen):
    """A (B, H, N, D) view with a contiguous last dim: the (B, N, H, D) projection a model hands
    over, transposed; every other token of a longer sequence with a slice of the channels; or one
    batch row expanded over B."""
    if kind == "transposed":
        return torch.randn(B, N, H, D, generator=gen).transpose(1, 2)
    if kind == "sliced":
        return torch.randn(B, H, 2 * N, D + 8, generator=gen)[:, :, ::2, :D]
    return torch.randn(1, H, N, D, generator=gen).expand(B, H, N, D)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_strided_qkv(backend_device, kind):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 40, 16
    q, k, v = (_qkv_view(kind, B, H, N, D, gen) for _ in range(3))
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    assert not q.is_contiguous() and q.stride(-1) == 1
    bias = torch.randn(B, 2 * N, generator=gen)[:, ::2]  # strided key_bias
    mask = torch.tensor([[True, False], [True, True]]).expand(B, H, 2, 2)
    kw = dict(block_q=32, block_k=32, key_bias=bias, backend=backend)
    q, k, v, qc, kc, vc = (t.to(device).requires_grad_(True) for t in (q, k, v, qc, kc, vc))
    kw["key_bias"] = bias.to(device)
    out = A.block_sparse_attention(q, k, v, mask.to(device), **kw)
    exp = A.block_sparse_attention(qc, kc, vc, mask.to(device), **kw)
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    exp.backward(g)
    for a, b in ((q, qc), (k, kc), (v, vc)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    o2, mass = A.attention_with_key_mass(q.detach(), k.detach(), v.detach(), mask.to(device), **kw)
    o3, mass3 = A.attention_with_key_mass(qc.detach(), kc.detach(), vc.detach(), mask.to(device), **kw)
    torch.testing.assert_close(mass, mass3, atol=1e-5, rtol=1e-5)
    d, dm = A.decode_attention_with_key_mass(q[:, :, -3:].detach(), k.detach(), v.detach(), backend=backend)
    d3, dm3 = A.decode_attention_with_key_mass(qc[:, :, -3:].detach(), kc.detach(), vc.detach(), backend=backend)
    torch.testing.assert_close(d, d3, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dm, dm3, atol=1e-5, rtol=1e-5)


def test_attention_last_dim_strided_is_copied(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 16, 20, generator=gen).transpose(-1, -2).to(device)  # (1, 2, 20, 16), stride(-1) != 1
    k = torch.randn(1, 2, 20, 16, generator=gen).to(device)
    out = A.block_sparse_attention(q, k, k, None, backend=backend)
    torch.testing.assert_close(out, A.block_sparse_attention(q.contiguous(), k, k, None, backend=backend))


def test_topk_block_mask_strided():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 64, 2, 16, generator=gen).transpose(1, 2)
    k = torch.randn(1, 64, 2, 16, generator=gen).transpose(1, 2)
    a = A.topk_block_mask(q, k, 1, block_q=32, block_k=32)
    b = A.topk_block_mask(q.contiguous(), k.contiguous(), 1, block_q=32, block_k=32)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)


# --------------------------------------------------------------------------- merging / pruning
@pytest.mark.parametrize("kind", KINDS)
def test_merge_ops_strided(backend_device, kind):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(3)
    B, N, C = 2, 17, 8
    (_, metric, metric_c), = [t for t in _views((B, N, C), gen) if t[0] == kind]
    (_, x, x_c), = [t for t in _views((B, N, C), gen) if t[0] == kind]
    if kind == "expanded":  # distinct rows, so the matching is unambiguous per row
        x = x + 0.0 * torch.arange(B, dtype=x.dtype)[:, None, None]  # x: dense; metric stays expanded
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        x_c = x.contiguous()
    metric, metric_c, x, x_c = (t.to(device) for t in (metric, metric_c, x, x_c))
    valid = torch.ones(B, 2 * N, dtype=torch.bool, device=device)[:, ::2]
    valid[1, -3:] = False
    for kw in ({}, {"class_token": True}, {"valid": valid}):
        m = M.bipartite_soft_matching(metric, 5, backend=backend, **kw)
        mc = M.bipartite_soft_matching(metric_c, 5, backend=backend, **kw)
        assert torch.equal(m.slot, mc.slot)
        torch.testing.assert_close(M.merge(m, x, backend=backend), M.merge(mc, x_c, backend=backend))
        xs, size = M.merge_wavg(m, x, backend=backend)
        xsc, sizec = M.merge_wavg(mc, x_c, backend=backend)
        torch.testing.assert_close(xs, xsc)
        torch.testing.assert_close(M.merge_source(m, x, backend=backend), M.merge_source(mc, x_c, backend=backend))
        merged = M.merge(m, x, backend=backend)
        merged_t = merged.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
        if merged_t.is_contiguous():
            merged_t = torch.cat([merged, merged], 2)[..., :C]
        torch.testing.assert_close(M.unmerge(m, merged_t, backend=backend), M.unmerge(m, merged, backend=backend))
    e = M.pitome_energy(metric, 0.5, backend=backend)
    torch.testing.assert_close(e, M.pitome_energy(metric_c, 0.5, backend=backend))
    p = M.pitome_merge(metric, 4, 0.5, backend=backend)
    assert torch.equal(p.slot, M.pitome_merge(metric_c, 4, 0.5, backend=backend).slot)
    scores = torch.randn(B, 2 * N, generator=gen)[:, ::2].to(device)
    kept, idx = M.prune_topk(x, scores, 9, backend=backend)
    kept_c, idx_c = M.prune_topk(x_c, scores.contiguous(), 9, backend=backend)
    torch.testing.assert_close(kept, kept_c)
    kept_t = torch.cat([kept, kept], 2)[..., :C]
    torch.testing.assert_close(M.scatter_back(kept_t, idx, N, backend=backend),
                               M.scatter_back(kept_c, idx_c, N, backend=backend))


# --------------------------------------------------------------------------- quantized KV
@pytest.mark.parametrize("kind", KINDS)
def test_kv_ops_strided(backend_device, kind):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(4)
    B, H, N, D = 1, 2, 40, 32
    # (B, N, H, D) seen as (B, H, N, D) (transposed), sliced, expanded over heads
    if kind == "transposed":
        x = torch.randn(B, N, H, D, generator=gen).transpose(1, 2)
    elif kind == "sliced":
        x = torch.randn(B, H, 2 * N, D + 8, generator=gen)[:, :, ::2, :D]
    else:
        x = torch.randn(B, 1, N, D, generator=gen).expand(B, H, N, D)
    x = x.to(device)
    assert not x.is_contiguous()
    xc = x.contiguous()
    for axis in (-1, -2):
        qt = KV.quantize(x, 4, 32, axis, backend=backend)
        qc = KV.quantize(xc, 4, 32, axis, backend=backend)
        assert torch.equal(qt.codes, qc.codes) and torch.equal(qt.scale, qc.scale)
        strided_qt = qt._replace(codes=torch.cat([qt.codes, qt.codes], -1)[..., :qt.codes.shape[-1]])
        torch.testing.assert_close(KV.dequantize(strided_qt, backend=backend), KV.dequantize(qc, backend=backend))
    ft = KV.quantize_fp8(x, backend=backend)
    fc = KV.quantize_fp8(xc, backend=backend)
    assert torch.equal(ft.scale, fc.scale)
    torch.testing.assert_close(KV.dequantize_fp8(ft, backend=backend), KV.dequantize_fp8(fc, backend=backend))
    caches = []
    for kv in (x, xc):
        cache = KV.QuantizedKVCache(4, 4, group_size=32, residual=4, backend=backend)
        cache.append(kv, kv)
        caches.append(cache)
    q = torch.randn(B, 1, H, D, generator=gen).transpose(1, 2).to(device)  # (B, H, 1, D) strided
    q = torch.cat([q, q], -1)[..., :D]
    assert not q.is_contiguous()
    out, mass = KV.decode_attention(q, caches[0], return_mass=True, backend=backend)
    exp, mass_c = KV.decode_attention(q.contiguous(), caches[1], return_mass=True, backend=backend)
    torch.testing.assert_close(out, exp)
    caches[0].accumulate_mass(torch.stack([mass, mass], -1)[..., 0])  # same values, strided
    caches[1].accumulate_mass(mass_c)
    torch.testing.assert_close(caches[0]._q_score, caches[1]._q_score)
