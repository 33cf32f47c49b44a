"""Regression tests for issue 15 ("no crash and no silent wrong answer"): each numbered case of the
issue, on both CPU backends (torch, Triton interpreter) and, where the bug was in a GPU path, on a
GPU (``@pytest.mark.cuda``, skipped without one)."""

import math

import pytest
import torch

import tokops
from tokops.attention import BlockMask, attention_with_key_mass, block_sparse_attention
from tokops.attention import reference as aref
from tokops.attention.masks import csr_to_dense

from backends import runnable_backends

CPU_BACKENDS = [b for b, d in runnable_backends() if d == "cpu"]


def _qkv(B=1, H=2, Hkv=2, Nq=40, Nk=40, D=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    return [t.to(dtype).to(device) for t in (q, k, v)]


# =========================================================================== 1. mask indices
# A mask whose values were not validated (check_mask=False, torch.compile) is the *set* of its valid
# entries: counts clamped to [0, nK], out-of-range indices ignored, repeated blocks counted once.
def _set_mask(num, idx, block, nq, nk):
    dense = csr_to_dense(num, idx)
    return BlockMask.from_dense(dense, block, block, nq, nk)


BAD_ROWS = {
    # name: (kv_num_blocks row value, kv_indices row) for a 3 x 3 block grid (N = 40, block 16)
    "minus1": (2, [0, -1, 2]),
    "minus1000": (3, [-1000, 1, 2]),
    "minus1e8": (2, [-100000000, 2, 0]),
    "seven": (2, [7, 1, 0]),
    "1e5": (3, [0, 100000, 2]),
    "repeated": (3, [1, 1, 1]),
    "count_too_big": (7, [2, 0, 2]),
    "count_negative": (-5, [0, 1, 2]),
}


def _bad_mask(name, B=1, H=2):
    n, row = BAD_ROWS[name]
    num = torch.full((B, H, 3), n, dtype=torch.int32)
    num[..., 0] = 1  # query block 0 keeps a good row
    idx = torch.tensor(row, dtype=torch.int32).expand(B, H, 3, 3).contiguous()
    return BlockMask(num, idx, 16, 16, 40, 40)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_unvalidated_mask_values_are_bound_checked(backend, name):
    q, k, v = _qkv()
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    m = _bad_mask(name)
    out, lse = block_sparse_attention(q, k, v, m, check_mask=False, return_lse=True, backend=backend)
    good = _set_mask(m.kv_num_blocks, m.kv_indices, 16, 40, 40)
    args = (good.kv_num_blocks, good.kv_indices, 16, 16, False, 16 ** -0.5)
    exp, exp_lse = aref.attention(q.detach(), k.detach(), v.detach(), *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exp_lse, atol=2e-5, rtol=1e-5)
    # backward walks the same (and the transposed) mask
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    eo, _ = aref.attention(qd, kd, vd, *args)
    egrads = torch.autograd.grad(eo, (qd, kd, vd), dout.double())
    for gg, eg in zip(grads, egrads):
        torch.testing.assert_close(gg.double(), eg, atol=5e-5, rtol=1e-4)
    # the key-mass pass too
    _, mass = attention_with_key_mass(q.detach(), k, v, m, check_mask=False, backend=backend)
    torch.testing.assert_close(mass.double(), aref.key_mass(q.detach(), k.detach(), *args), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["minus1e8", "1e5", "repeated", "count_too_big"])
def test_unvalidated_mask_values_are_bound_checked_compiled(backend, name):
    q, k, v = _qkv()
    m = _bad_mask(name)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, num, idx: block_sparse_attention(
        q, k, v, BlockMask(num, idx, 16, 16, 40, 40), backend=backend), fullgraph=True, backend="aot_eager")
    out = f(q, k, v, m.kv_num_blocks, m.kv_indices)
    good = _set_mask(m.kv_num_blocks, m.kv_indices, 16, 40, 40)
    exp, _ = aref.attention(q, k, v, good.kv_num_blocks, good.kv_indices, 16, 16, False, 16 ** -0.5)
    torch.testing.assert_close(out.double(), exp, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_checked_mask_still_raises(backend):
    q, k, v = _qkv()
    for name in ("minus1", "1e5"):
        with pytest.raises(ValueError, match="mask.kv_indices"):
            block_sparse_attention(q, k, v, _bad_mask(name), backend=backend)
    with pytest.raises(ValueError, match="mask.kv_num_blocks"):
        block_sparse_attention(q, k, v, _bad_mask("count_too_big"), backend=backend)
    with pytest.raises(ValueError, match="listed twice"):
        block_sparse_attention(q, k, v, _bad_mask("repeated"), backend=backend)


def _op_level_case(device, dtype=torch.float32, D=16, block=16):
    """Out-of-range indices and counts straight into the op (no wrapper): kernels must skip them."""
    N = 3 * block - 8
    q, k, v = _qkv(Nq=N, Nk=N, D=D, dtype=dtype, device=device)
    num = torch.tensor([[[1, 3, 9]]], dtype=torch.int32, device=device).expand(1, 2, 3).contiguous()
    idx = torch.tensor([[0, 5, 6], [-100000000, 2, 1], [100000, 0, -3]], dtype=torch.int32,
                       device=device).expand(1, 2, 3, 3).contiguous()
    good = _set_mask(num.cpu(), idx.cpu(), block, N, N)
    return q, k, v, num, idx, good, N


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_level_kernels_skip_out_of_range_blocks(backend):
    q, k, v, num, idx, good, N = _op_level_case("cpu")
    out, lse = torch.ops.tokops.block_sparse_attn_fwd(q, k, v, num, idx, 16, 16, False, 0.25, None, backend)
    exp, exp_lse = aref.attention(q, k, v, good.kv_num_blocks, good.kv_indices, 16, 16, False, 0.25)
    torch.testing.assert_close(out.double(), exp, atol=2e-5, rtol=1e-5)
    # the transposed CSR with bad values, straight into the backward and mass kernels
    qn = torch.tensor([[[2, -1, 8]]], dtype=torch.int32).expand(1, 2, 3).contiguous()
    qi = torch.tensor([[0, 2, 9], [1, 0, 0], [-7, 1, 2]], dtype=torch.int32).expand(1, 2, 3, 3).contiguous()
    mass = torch.ops.tokops.attn_key_mass(q, k, lse, qn, qi, 16, 16, False, 0.25, None, backend)
    assert torch.isfinite(mass).all()
    dq, dk, dv, _ = torch.ops.tokops.block_sparse_attn_bwd(torch.ones_like(out), q, k, v, out, lse, None, num, idx,
                                                           qn, qi, 16, 16, False, 0.25, None, backend)
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()


@pytest.mark.cuda
@pytest.mark.skipif(not tokops.cuda_compiled(), reason="CUDA kernels not built")
def test_cuda_forward_skips_out_of_range_blocks():
    q, k, v, num, idx, good, N = _op_level_case("cuda", torch.float16, D=64, block=64)
    out, lse = torch.ops.tokops.block_sparse_attn_fwd(q, k, v, num, idx, 64, 64, False, 0.125, None, "cuda")
    exp, _ = aref.attention(q.cpu(), k.cpu(), v.cpu(), good.kv_num_blocks, good.kv_indices, 64, 64, False, 0.125)
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-3, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_unvalidated_mask_values(backend):
    if backend == "cuda" and not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    q, k, v = _qkv(Nq=160, Nk=160, D=64, dtype=torch.float16, device="cuda")
    num = torch.tensor([[[1, 3, 9]]], dtype=torch.int32, device="cuda").expand(1, 2, 3).contiguous()
    idx = torch.tensor([[0, 5, 6], [-100000000, 2, 2], [100000, 0, -1]], dtype=torch.int32,
                       device="cuda").expand(1, 2, 3, 3).contiguous()
    m = BlockMask(num, idx, 64, 64, 160, 160)
    out = block_sparse_attention(q, k, v, m, check_mask=False, backend=backend)
    good = _set_mask(num.cpu(), idx.cpu(), 64, 160, 160)
    exp, _ = aref.attention(q.cpu(), k.cpu(), v.cpu(), good.kv_num_blocks, good.kv_indices, 64, 64, False, 0.125)
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-3, rtol=1e-2)


# =========================================================================== 2/3. ToMe: class token, NaN/inf
from tokops.merge import bipartite_soft_matching  # noqa: E402


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["one_zero_token", "all_zero"])
def test_class_token_never_merges(backend, case):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, generator=g)
    if case == "one_zero_token":
        x[:, 4] = 0.0
        r = 7
    else:
        x.zero_()
        r = 3
    m = bipartite_soft_matching(x, r, class_token=True, backend=backend)
    assert (m.slot[:, 0] == 0).all()  # the class token stays output token 0
    assert (m.slot == 0).sum(1).eq(1).all()  # and nothing merges into it
    assert not (m.src_idx == 0).any()


def _plan(x, r, backend, **kw):
    m = bipartite_soft_matching(x, r, backend=backend, **kw)
    return m.slot, m.n_out


@pytest.mark.parametrize("kind", ["nan", "inf", "zero", "huge", "tiny"])
@pytest.mark.parametrize("class_token", [False, True])
def test_non_finite_metric_same_plan_on_every_backend(kind, class_token):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 18, 16, generator=g)
    if kind == "nan":
        x[0, 3, 2] = float("nan")
        x[1, 6] = float("nan")
    elif kind == "inf":
        x[0, 5, 1] = float("inf")
        x[1, 2, 0] = -float("inf")
    elif kind == "zero":
        x[:, 7] = 0
    elif kind == "huge":
        x[0] *= 2.0 ** 100  # powers of two: exactly the base rows, scaled
        x[1, :9] *= 2.0 ** 80
    else:
        x[0] *= 2.0 ** -100
    plans = [_plan(x, 6, b, class_token=class_token) for b in CPU_BACKENDS]
    for s, n in plans[1:]:
        assert n == plans[0][1] and torch.equal(s, plans[0][0])
    if kind in ("huge", "tiny"):  # scale invariant: the same plan as the normal-range rows
        base = torch.randn(2, 18, 16, generator=torch.Generator().manual_seed(5))
        assert torch.equal(plans[0][0], _plan(base, 6, "torch", class_token=class_token)[0])
    if kind == "nan":
        # one NaN token does not take every merge: the slots stay a permutation-like map
        assert (plans[0][0] >= 0).all() and plans[0][1] == 18 - 6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_metric_with_valid_still_merges_the_finite_tokens(backend):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 20, 8, generator=g)
    x[0, 4] = float("nan")
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, 16:] = False
    m = bipartite_soft_matching(x, 4, valid=valid, backend=backend)
    assert int(m.r_rows[0]) == 4 and m.n_out == 12


# =========================================================================== 4. KV quantization: huge / NaN
from tokops.kv import (QuantizedKVCache, decode_attention, dequantize, dequantize_fp8, quantize,  # noqa: E402
                       quantize_fp8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_huge_finite_values_raise_instead_of_inf(backend, axis):
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0)) * 1e5
    with pytest.raises(ValueError, match=r"^x: values up to"):
        quantize(x, 4, 32, axis, backend=backend)
    # below the fp16 range: finite, within the error bound
    y = x / 1e5 * 6e4 / 5  # |min| < 65520 and range / 15 < 65520
    qt = quantize(y, 4, 32, axis, backend=backend)
    out = dequantize(qt, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fp16_range_edge_dequantizes_finite(backend, bits):
    x = torch.zeros(1, 32, 32, dtype=torch.float16)
    x[0, :, 0] = -65504.0
    x[0, ::2, 1], x[0, 1::2, 1] = 65504.0, -65504.0
    for axis in (-1, -2):
        out = dequantize(quantize(x, bits, 32, axis, backend=backend), backend=backend)
        assert torch.isfinite(out).all() and (out[0, ::2, 1] == 65504.0).all()
    cache = QuantizedKVCache(bits, bits, group_size=32, residual=0, backend=backend)
    cache.append(x[:, None], x[:, None])
    assert cache.n_quant == 32
    assert all(torch.isfinite(t).all() for t in cache.dequantized(torch.float16))


def test_quantize_huge_bf16_raises():
    x = torch.full((1, 4, 32), 1e6, dtype=torch.bfloat16)
    x[0, 0, 0] = -1e6
    with pytest.raises(ValueError, match=r"^x: values up to"):
        quantize(x, 4, 32, -1, backend="torch")


@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_nan_inf_propagate_identically(axis, bits):
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    x[0, 3, 5] = float("nan")
    x[1, 40, 9] = float("inf")
    res = {}
    for be in CPU_BACKENDS:
        qt = quantize(x, bits, 32, axis, backend=be)
        res[be] = (qt, dequantize(qt, backend=be))
    qt, out = res["torch"]
    assert out[0, 3, 5].isnan() and out[1, 40, 9].isnan()
    assert torch.isfinite(out[1 - 1, 20:30]).all() if axis == -1 else torch.isfinite(out[0, 40:]).all()
    for be, (qt2, out2) in res.items():
        assert torch.equal(qt2.codes, qt.codes), be
        torch.testing.assert_close(qt2.scale, qt.scale, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(qt2.zero, qt.zero, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(out2, out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp8_nan_propagates(backend):
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(2))
    x[1, 2, 7] = float("nan")
    x[2, 0, 1] = float("inf")
    ft = quantize_fp8(x, backend=backend)
    out = dequantize_fp8(ft, torch.float32, backend=backend)
    assert out[1, 2].isnan().all() and out[2, 0].isnan().all()
    ok = torch.ones(3, 4, dtype=torch.bool)
    ok[1, 2] = ok[2, 0] = False
    assert torch.isfinite(out[ok]).all()
    ref_ft = quantize_fp8(x, backend="torch")
    torch.testing.assert_close(ft.scale, ref_ft.scale, rtol=0, atol=0, equal_nan=True)
    # the rows holding NaN/inf have codes 0 on every backend (other fp8 codes: see test_kv_quant.test_fp8)
    assert (ft.codes[1, 2].view(torch.uint8) == 0).all() and (ft.codes[2, 0].view(torch.uint8) == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["int", "fp8"])
def test_cache_append_keeps_nan(backend, mode):
    cache = QuantizedKVCache(4, 4, group_size=32, residual=0, mode=mode, backend=backend)
    k = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    v = k.clone()
    k[0, 0, 5, 3] = float("nan")
    cache.append(k, v)
    kd, vd = cache.dequantized()
    assert kd[0, 0, 5, 3].isnan() and torch.isfinite(vd).all()


# =========================================================================== 6. gradients
from tokops.merge import pitome_energy  # noqa: E402
from tokops._registry import NotDifferentiableError  # noqa: E402


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_attention_gradient_raises(backend):
    cache = QuantizedKVCache(4, 4, group_size=32, residual=16, backend=backend)
    k = torch.randn(1, 1, 48, 32, generator=torch.Generator().manual_seed(0))
    cache.append(k, k + 1)
    q = torch.randn(1, 2, 1, 32, requires_grad=True)
    out = decode_attention(q, cache, backend=backend)
    with pytest.raises(NotDifferentiableError, match="kv_decode_attention is not differentiable"):
        out.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pitome_energy_gradient_raises(backend):
    x = torch.randn(1, 16, 8, requires_grad=True)
    e = pitome_energy(x, 0.5, backend=backend)
    with pytest.raises(NotDifferentiableError, match="pitome_energy is not differentiable"):
        e.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_through_attention_raises(backend):
    q, k, v = (t.requires_grad_(True) for t in _qkv(Nq=20, Nk=20))
    out = block_sparse_attention(q, k, v, block_q=16, block_k=16, backend=backend)
    (gq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(NotDifferentiableError, match="double backward"):
        gq.sum().backward()
    # a single backward still works
    (gq1,) = torch.autograd.grad(block_sparse_attention(q, k, v, block_q=16, block_k=16, backend=backend).sum(), q)
    assert torch.isfinite(gq1).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantize_gradient_raises(backend):
    x = torch.randn(1, 4, 32, requires_grad=True)
    qt = quantize(x, 4, 32, -1, backend=backend)
    with pytest.raises(NotDifferentiableError):
        qt.scale.float().sum().backward()


# =========================================================================== 7. cache all-or-nothing
def _cache_state(c):
    if not c.initialized:
        return (False, len(c))
    k, v = c.dequantized()
    return (True, len(c), c.n_quant, c.n_res, c.n_pinned, c._next_pos, k.clone(), v.clone(), c.positions().clone())


def _same_state(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
        else:
            assert x == y


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_failed_append_leaves_the_cache_unchanged(backend):
    cache = QuantizedKVCache(4, 4, group_size=32, residual=16, key_axis=-1, value_axis=-1, backend=backend)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 40, 32, generator=g)
    cache.append(k, k * 0.5)
    before = _cache_state(cache)
    new = torch.randn(1, 2, 40, 32, generator=g)
    with pytest.raises(ValueError, match="important"):
        cache.append(new, new, important=torch.zeros(40, dtype=torch.bool, device="meta"))
    _same_state(before, _cache_state(cache))
    huge = new * 1e6  # flushes a group the int quantizer refuses: nothing of it may stay
    with pytest.raises(ValueError, match="^x: values up to"):
        cache.append(huge, new)
    _same_state(before, _cache_state(cache))
    with pytest.raises(ValueError, match="index"):
        cache.select_batch(torch.tensor([0, 3]))
    _same_state(before, _cache_state(cache))
    # and the cache still works like one that never saw the failures
    ref_cache = QuantizedKVCache(4, 4, group_size=32, residual=16, key_axis=-1, value_axis=-1, backend=backend)
    ref_cache.append(k, k * 0.5)
    cache.append(new, new)
    ref_cache.append(new, new)
    _same_state(_cache_state(ref_cache), _cache_state(cache))


def test_failed_first_allocation_leaves_the_cache_empty():
    cache = QuantizedKVCache(4, 4, group_size=32, residual=16, capacity=2 ** 62)
    k = torch.randn(1, 1, 4, 32)
    with pytest.raises((RuntimeError, MemoryError, ValueError)):
        cache.append(k, k)
    assert not cache.initialized and len(cache) == 0
    out = decode_attention(torch.randn(1, 1, 1, 32), cache)  # an empty cache, not an AttributeError
    assert (out == 0).all()


def test_accumulate_mass_refuses_nan():
    cache = QuantizedKVCache(4, 4, group_size=32, residual=32, key_axis=-1, value_axis=-1, budget=80)
    k = torch.randn(1, 1, 40, 32)
    cache.append(k, k)
    before = cache._r_score.clone()
    mass = torch.rand(1, 1, 40)
    mass[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="mass must be finite"):
        cache.accumulate_mass(mass)
    assert torch.equal(before, cache._r_score)


# =========================================================================== 10. interpreter: bf16 refused
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs the Triton interpreter")
@pytest.mark.parametrize("op", ["attention", "pitome", "decode", "quantize", "dequantize_to_bf16"])
def test_interpreter_refuses_bf16(op):
    bf = torch.bfloat16
    with pytest.raises(TypeError, match="cannot compute bf16"):
        if op == "attention":
            block_sparse_attention(*_qkv(dtype=bf), backend="triton")
        elif op == "pitome":
            pitome_energy(torch.randn(1, 8, 16, dtype=bf), 0.5, backend="triton")
        elif op == "decode":
            cache = QuantizedKVCache(4, 4, group_size=32, residual=16, backend="torch")
            k = torch.randn(1, 1, 40, 32, dtype=bf)
            cache.append(k, k)
            decode_attention(torch.randn(1, 1, 1, 32, dtype=bf), cache, backend="triton")
        elif op == "quantize":
            quantize(torch.randn(2, 32, dtype=bf), 4, 32, -1, backend="triton")
        else:
            qt = quantize(torch.randn(2, 32), 4, 32, -1, backend="torch")
            dequantize(qt, torch.bfloat16, backend="triton")


# =========================================================================== 8. +inf key bias
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_pos_inf_key_bias_takes_all_the_weight(backend, causal):
    q, k, v = (t.requires_grad_(True) for t in _qkv(B=2, Nq=40, Nk=40))
    bias = torch.zeros(2, 40)
    bias[0, 7] = float("inf")
    bias[1, 30] = float("inf")
    bias[1, 33] = float("-inf")
    out = block_sparse_attention(q, k, v, causal=causal, key_bias=bias, block_q=16, block_k=16, backend=backend)
    assert torch.isfinite(out).all()
    rows0 = torch.arange(40) >= (7 if causal else 0)
    rows1 = torch.arange(40) >= (30 if causal else 0)
    vd = v.detach()
    torch.testing.assert_close(out[0][:, rows0], vd[0, :, 7:8].expand(-1, int(rows0.sum()), -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1][:, rows1], vd[1, :, 30:31].expand(-1, int(rows1.sum()), -1), atol=1e-5, rtol=0)
    # rows that do not see the +inf key are ordinary attention
    fin = torch.where(torch.isinf(bias) & (bias > 0), float("-inf"), bias)
    exp = block_sparse_attention(q.detach(), k.detach(), v.detach(), causal=causal, key_bias=fin, block_q=16,
                                 block_k=16, backend="torch")
    torch.testing.assert_close(out[0][:, ~rows0], exp[0][:, ~rows0], atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


# =========================================================================== 9. validation up front
import tokops.patch as tp  # noqa: E402
from tokops.merge import scatter_back  # noqa: E402


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("r,err", [(-1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                   ([2, -1], ValueError), ("3", TypeError)])
def test_tome_validates_r_when_patching(r, err):
    with pytest.raises(err, match="r"):
        tp.tome(_tiny_bert(), r)


@pytest.mark.parametrize("kw,err,name", [(dict(block=7), ValueError, "block"), (dict(keep=-1), ValueError, "keep"),
                                         (dict(keep=1.5), ValueError, "keep"), (dict(backend="xx"), ValueError,
                                                                                 "backend"),
                                         (dict(window=0), ValueError, "window"), (dict(keep="a"), TypeError, "keep")])
def test_sparse_policy_validates_at_construction(kw, err, name):
    with pytest.raises(err, match=name):
        tp.SparsePolicy(**kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meta_tensors_get_shapes_or_a_clear_error(backend):
    q, k, v = (t.to("meta") for t in _qkv())
    out = block_sparse_attention(q, k, v, block_q=16, block_k=16, backend=backend)
    assert out.shape == q.shape and out.device.type == "meta"
    metric = torch.randn(1, 10, 8, device="meta")
    with pytest.raises(ValueError, match="valid"):
        bipartite_soft_matching(metric, 2, valid=torch.ones(1, 10, dtype=torch.bool, device="meta"), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [99, -1])
def test_scatter_back_out_of_range_index(backend, bad):
    x = torch.randn(1, 3, 4)
    idx = torch.tensor([[0, 2, bad]])
    with pytest.raises(ValueError, match=r"kept_idx must hold token indices in \[0, N=10\)"):
        scatter_back(x, idx, 10, backend=backend)


def _tiny_llama(layers=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_quantized_cache_with_too_few_layers():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="num_layers"), torch.no_grad():
        model(ids, past_key_values=tp.quantized_cache(num_layers=1, bits_k=8, bits_v=8, residual=16))


# =========================================================================== 5. transformers integrations
def test_fused_cache_refuses_a_model_without_tokops_attention():
    model = _tiny_llama()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = tp.quantized_cache(num_layers=2, bits_k=8, bits_v=8, group_size=32, residual=16, fused=True,
                               backend="torch")
    with pytest.raises(RuntimeError, match="attn_implementation='tokops_kv'"), torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)


def test_tokops_kv_gets_the_padding_mask():
    import tokops.kv.hf  # noqa: F401  (registers tokops_kv)

    model = _tiny_llama()
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    ids[1, :5] = 0
    outs = {}
    for impl, fused in (("sdpa", False), ("tokops_kv", True)):
        model.set_attn_implementation(impl)
        cache = tp.quantized_cache(num_layers=2, bits_k=8, bits_v=8, group_size=32, residual=16, fused=fused,
                                   backend="torch")
        with torch.no_grad():
            outs[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        past_key_values=cache, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    assert torch.equal(outs["sdpa"], outs["tokops_kv"])


# =========================================================================== GPU paths (skipped without a GPU)
def _gpu_backends():
    bes = ["triton"]
    if tokops.cuda_compiled():
        bes.append("cuda")
    return bes


@pytest.mark.cuda
@pytest.mark.parametrize("axis", [-1, -2])
def test_gpu_quantize_nan_inf_and_fp16_edge_match_the_reference(axis):
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    x[0, 3, 5] = float("nan")
    x[1, 40, 9] = float("inf")
    exp = tokops.kv.reference.quantize(x, 4, 32, axis)
    e16 = torch.zeros(1, 32, 32, dtype=torch.float16)
    e16[0, :, 0], e16[0, ::2, 1], e16[0, 1::2, 1] = -65504.0, 65504.0, -65504.0
    for be in _gpu_backends():
        qt = quantize(x.cuda(), 4, 32, axis, backend=be)
        assert torch.equal(qt.codes.cpu(), exp[0]), be
        torch.testing.assert_close(qt.scale.cpu(), exp[1], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(qt.zero.cpu(), exp[2], rtol=0, atol=0, equal_nan=True)
        out = dequantize(qt, backend=be).cpu()
        assert out[0, 3, 5].isnan() and out[1, 40, 9].isnan()
        out16 = dequantize(quantize(e16.cuda(), 2, 32, axis, backend=be), backend=be)
        assert torch.isfinite(out16).all(), be
        ft = quantize_fp8(x.cuda(), backend=be)
        y = dequantize_fp8(ft, torch.float32, backend=be).cpu()
        assert y[0, 3].isnan().all() and y[1, 40].isnan().all() and torch.isfinite(y[0, 4]).all()
        with pytest.raises(ValueError, match="^x: values up to"):
            quantize(x.cuda().nan_to_num(0.0, 0.0, 0.0) * 1e6, 4, 32, axis, backend=be)


@pytest.mark.cuda
def test_gpu_tome_non_finite_metric_same_plan():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 18, 16, generator=g)
    x[0, 3, 2] = float("nan")
    x[1, 7] = 0
    x[1, 2, 0] = float("inf")
    ref_m = bipartite_soft_matching(x, 6, class_token=True, backend="torch")
    bes = ["triton"] + (["cuda"] if tokops.cuda_compiled() else [])
    for be in bes:
        m = bipartite_soft_matching(x.cuda(), 6, class_token=True, backend=be)
        assert torch.equal(m.slot.cpu(), ref_m.slot), be
