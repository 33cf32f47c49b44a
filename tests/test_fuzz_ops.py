"""Fuzzing block-sparse attention (each random input gives the reference answer or a clear
``ValueError``/``TypeError``, never a crash or NaN) and a padded-batch ToMe property (the merge
family's own fuzzing is tests/test_fuzz_merge.py)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokops
from tokops.attention import reference as aref

from backends import runnable_backends

BACKENDS = runnable_backends()
SETTINGS = dict(deadline=None, derandomize=True,  # seeded: the same examples on every run
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _dtypes(backend, device):
    interp = backend == "triton" and device == "cpu"
    return [torch.float32, torch.float16] + ([] if interp else [torch.bfloat16])


# --------------------------------------------------------------------------- attention
@st.composite
def attention_inputs(draw):
    backend, device = draw(st.sampled_from(BACKENDS))
    B = draw(st.integers(1, 2))
    h_kv = draw(st.integers(1, 2))
    H = h_kv * draw(st.integers(1, 2))
    nq, nk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    D = draw(st.sampled_from([16, 32, 64]))
    block = draw(st.sampled_from([16, 32, 64]))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(_dtypes(backend, device)))
    bias = draw(st.sampled_from([None, "bh", "b"]))
    density = draw(st.floats(0.0, 1.0))
    return backend, device, B, H, h_kv, nq, nk, D, block, causal, dtype, bias, density, draw(st.integers(0, 2**16))


@settings(max_examples=25, **SETTINGS)
@given(attention_inputs())
def test_block_sparse_attention_fuzz(args):
    backend, device, B, H, h_kv, nq, nk, D, block, causal, dtype, bias, density, seed = args
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, nq, D, generator=g).to(dtype)
    k = torch.randn(B, h_kv, nk, D, generator=g).to(dtype)
    v = torch.randn(B, h_kv, nk, D, generator=g).to(dtype)
    dense = torch.rand(B, H, math.ceil(nq / block), math.ceil(nk / block), generator=g) < density
    key_bias = None if bias is None else torch.randn((B, H, nk) if bias == "bh" else (B, nk), generator=g)
    out, lse = tokops.attention.block_sparse_attention(
        q.to(device), k.to(device), v.to(device), dense.to(device), causal=causal,
        key_bias=None if key_bias is None else key_bias.to(device), return_lse=True, block_q=block, block_k=block,
        backend=backend)
    mask = tokops.attention.BlockMask.from_dense(dense, block, block, nq, nk)
    exp_out, exp_lse = aref.attention(q, k, v, mask.kv_num_blocks, mask.kv_indices, block, block, causal,
                                      D ** -0.5, key_bias)
    assert not out.isnan().any() and not lse.isnan().any()
    tol = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.cpu().double(), exp_out, atol=tol, rtol=tol)
    finite = torch.isfinite(exp_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu().double()[finite], exp_lse[finite], atol=tol, rtol=tol)


@settings(max_examples=40, **SETTINGS)
@given(st.data())
def test_attention_bad_inputs_fuzz(data):
    """Random malformed arguments: a clear error naming the argument, never a crash."""
    B, H, N, D = 1, 2, 20, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    which = data.draw(st.sampled_from(["q_dtype", "k_shape", "v_shape", "gqa", "bias_shape", "bias_dtype",
                                       "mask_shape", "mask_dtype", "causal", "scale", "q_ndim", "block"]))
    kwargs = {}
    mask = None
    if which == "q_dtype":
        q = q.double()
    elif which == "k_shape":
        k = torch.randn(B, H, N, D + 1)
    elif which == "v_shape":
        v = torch.randn(B, H, N + 1, D)
    elif which == "gqa":
        k, v = torch.randn(B, 3, N, D), torch.randn(B, 3, N, D)
    elif which == "bias_shape":
        kwargs["key_bias"] = torch.randn(B, N + data.draw(st.integers(1, 5)))
    elif which == "bias_dtype":
        kwargs["key_bias"] = torch.randn(B, N).double()
    elif which == "mask_shape":
        mask = torch.ones(B, H, data.draw(st.integers(2, 4)), 7, dtype=torch.bool)
    elif which == "mask_dtype":
        mask = torch.ones(B, H, 1, 1, dtype=torch.int32)
    elif which == "causal":
        kwargs["causal"] = 1
    elif which == "scale":
        kwargs["scale"] = data.draw(st.sampled_from([float("nan"), "0.1", float("inf")]))
    elif which == "q_ndim":
        q = q[0]
    elif which == "block":
        kwargs["block_q"] = data.draw(st.sampled_from([3, 0, 48]))
    with pytest.raises((ValueError, TypeError)):
        tokops.attention.block_sparse_attention(q, k, v, mask, **kwargs)


# --------------------------------------------------------------------------- merging
@settings(max_examples=20, **SETTINGS)
@given(st.sampled_from(BACKENDS), st.integers(2, 40), st.floats(0.05, 0.5), st.integers(0, 2**16))
def test_tome_padded_rows_match_rows_alone(backend_device, N, r, seed):
    """Padded batches: every row gives what the row alone gives (fraction r of its valid tokens)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(seed)
    lens = [N, max(1, N // 2), max(1, N // 3)]
    metric = torch.randn(3, N, 16, generator=g)
    x = torch.randn(3, N, 16, generator=g)
    valid = torch.arange(N)[None, :] < torch.tensor(lens)[:, None]
    m = tokops.merge.bipartite_soft_matching(metric.to(device), r, class_token=True, valid=valid.to(device),
                                             backend=backend)
    merged, size = tokops.merge.merge_wavg(m, x.to(device), backend=backend)
    for i, n in enumerate(lens):
        mi = tokops.merge.bipartite_soft_matching(metric[i:i + 1, :n].to(device), r, class_token=True, backend=backend)
        alone, alone_size = tokops.merge.merge_wavg(mi, x[i:i + 1, :n].to(device), backend=backend)
        k = alone.shape[1]
        torch.testing.assert_close(merged[i:i + 1, :k].cpu(), alone.cpu(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(size[i:i + 1, :k].cpu(), alone_size.cpu())
        assert (size[i, k:] == 0).all() and (merged[i, k:] == 0).all()


# --------------------------------------------------------------------------- pruning and PiToMe
@settings(max_examples=30, **SETTINGS)
@given(st.sampled_from(BACKENDS), st.integers(1, 3), st.integers(1, 50), st.sampled_from([4, 16, 48]),
       st.one_of(st.integers(-1, 60), st.floats(0.0, 1.2)), st.integers(0, 2**16))
def test_prune_topk_scatter_back_fuzz(backend_device, B, N, C, keep, seed):
    backend, device = backend_device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    scores = torch.randn(B, N, generator=g)
    try:
        kept, idx = tokops.merge.prune_topk(x.to(device), scores.to(device), keep, backend=backend)
    except (ValueError, TypeError) as e:
        assert "keep" in str(e), e
        bad = (isinstance(keep, int) and not 1 <= keep <= N) or (isinstance(keep, float) and not 0 < keep <= 1)
        assert bad, (keep, e)
        return
    k = keep if isinstance(keep, int) else max(1, int(keep * N))
    exp_idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(idx.cpu(), exp_idx)
    torch.testing.assert_close(kept.cpu(), x.gather(1, exp_idx[..., None].expand(B, k, C)))
    back = tokops.merge.scatter_back(kept, idx, N, backend=backend).cpu()
    expected = torch.zeros_like(x).scatter(1, exp_idx[..., None].expand(B, k, C), kept.cpu())
    torch.testing.assert_close(back, expected)


@settings(max_examples=25, **SETTINGS)
@given(st.sampled_from(BACKENDS), st.integers(1, 2), st.integers(1, 70), st.sampled_from([3, 16, 40]),
       st.floats(-0.9, 0.9), st.floats(0.1, 2.0), st.sampled_from(["design", "elu"]), st.integers(0, 2**16))
def test_pitome_energy_fuzz(backend_device, B, N, C, margin, alpha, formula, seed):
    """Margins stay away from 1: the paper's f jumps by m at s = m, and cos(x, x) = 1 up to fp32
    rounding, so m = 1 would compare two valid roundings of a discontinuity."""
    from tokops.merge import reference as mref

    backend, device = backend_device
    metric = torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))
    e = tokops.merge.pitome_energy(metric.to(device), margin, alpha, formula=formula, backend=backend)
    exp = mref.pitome_energy(metric, margin, alpha, formula, score_dtype=torch.float64)
    assert e.shape == (B, N) and e.dtype == torch.float32 and not e.isnan().any()
    torch.testing.assert_close(e.cpu().double(), exp.double(), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- non-finite, huge, unvalidated, compiled
# (issue 15) Derandomized and small: every example is either the documented answer or a clear error,
# identically eager and under torch.compile.
@st.composite
def hostile_attention_inputs(draw):
    backend, device = draw(st.sampled_from(BACKENDS))
    kind = draw(st.sampled_from(["nan_q", "nan_k", "inf_k", "huge_v", "huge_qk", "pos_inf_bias", "neg_inf_bias",
                                 "bad_mask"]))
    nq, nk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    causal = draw(st.booleans())
    compiled = draw(st.integers(0, 3)) == 0
    return backend, device, kind, nq, nk, causal, compiled, draw(st.integers(0, 2**16))


@settings(max_examples=16, **SETTINGS)
@given(hostile_attention_inputs())
def test_attention_non_finite_huge_and_compiled_fuzz(args):
    backend, device, kind, nq, nk, causal, compiled, seed = args
    g = torch.Generator().manual_seed(seed)
    B, H, D, blk = 1, 2, 16, 16
    q, k, v = torch.randn(B, H, nq, D, generator=g), torch.randn(B, H, nk, D, generator=g), \
        torch.randn(B, H, nk, D, generator=g)
    bias = torch.randn(B, nk, generator=g)
    nqb, nkb = math.ceil(nq / blk), math.ceil(nk / blk)
    num = torch.full((B, H, nqb), nkb, dtype=torch.int32)
    idx = torch.arange(nkb, dtype=torch.int32).expand(B, H, nqb, nkb).contiguous()
    i, j = int(torch.randint(nq, (), generator=g)), int(torch.randint(nk, (), generator=g))
    if kind == "nan_q":
        q[0, 0, i, 0] = float("nan")
    elif kind == "nan_k":
        k[0, 1, j, 3] = float("nan")
    elif kind == "inf_k":
        k[0, 0, j, 2] = float("inf")
    elif kind == "huge_v":
        v = v * 1e30
    elif kind == "huge_qk":
        q, k = q * 3e3, k * 3e3
    elif kind == "pos_inf_bias":
        bias[0, j] = float("inf")
    elif kind == "neg_inf_bias":
        bias[0, : j + 1] = float("-inf")
    else:  # unvalidated mask values: out-of-range, repeated, counts too large / negative
        num = torch.randint(-2, nkb + 3, (B, H, nqb), generator=g, dtype=torch.int32)
        idx = torch.randint(-3, nkb + 3, (B, H, nqb, nkb), generator=g, dtype=torch.int32)
    mask = tokops.attention.BlockMask(num, idx, blk, blk, nq, nk)

    def call(q, k, v, bias, num, idx):
        m = tokops.attention.BlockMask(num, idx, blk, blk, nq, nk)
        return tokops.attention.block_sparse_attention(q, k, v, m, causal=causal, key_bias=bias, return_lse=True,
                                                       check_mask=False, backend=backend)

    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    out, lse = (t.cpu() for t in call(*(t.to(device) for t in (q, k, v, bias, num, idx))))
    assert out.shape == q.shape and lse.shape == q.shape[:3]

    good = tokops.attention.BlockMask.from_dense(tokops.attention.masks.csr_to_dense(num, idx), blk, blk, nq, nk)
    ref_bias = torch.where(bias == float("inf"), tokops.attention.ops.POS_INF_BIAS, bias)
    exp_out, exp_lse = aref.attention(q, k, v, good.kv_num_blocks, good.kv_indices, blk, blk, causal, D ** -0.5,
                                      ref_bias)
    if kind == "huge_qk":  # logits ~1e6: no fp32 kernel matches fp64 there; the output stays a convex mix of v
        seen = exp_lse.isfinite()
        assert torch.isfinite(out).all() and (out[~seen] == 0).all()
        lo, hi = v.amin(2, keepdim=True), v.amax(2, keepdim=True)
        assert ((out >= lo - 1e-3) & (out <= hi + 1e-3))[seen].all()
        return
    # NaN exactly where the reference has NaN (a NaN/inf input reaches only the rows that see it)
    assert torch.equal(out.isnan(), exp_out.isnan()), kind
    torch.testing.assert_close(out.double(), exp_out, atol=2e-4, rtol=2e-4, equal_nan=True)
    fin = exp_lse.isfinite()
    torch.testing.assert_close(lse.double()[fin], exp_lse[fin], atol=2e-4, rtol=2e-4)
