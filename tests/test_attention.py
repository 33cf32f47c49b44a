"""Sparse attention: agreement with the float64 reference (ragged N, causal, GQA, key_bias, empty
rows, block sizes 64/128, CSR and dense masks), gradients, per-key mass, mask builders, bad
masks, opcheck and torch.compile."""

import math

import pytest
import torch

import tokops
from tokops.attention import (BlockMask, attention_with_key_mass, block_sparse_attention, causal_block_mask,
                              decode_attention_with_key_mass, full_block_mask, retrieval_heads_mask,
                              sliding_window_mask, stack_heads, token_select_mask, topk_block_mask)
from tokops.attention import reference as ref
from tokops.attention.masks import causal_token_mask

from oracles import dense_token_mask, sdpa_attention


def _skip_interp_bf16(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


def _inputs(B, H, Hkv, Nq, Nk, D, dtype, device, seed=0, bias_dim=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, Hkv, Nk, D, generator=g)
    v = torch.randn(B, Hkv, Nk, D, generator=g) + 0.5
    bias = None
    if bias_dim == 2:
        bias = torch.randn(B, Nk, generator=g)
    elif bias_dim == 3:
        bias = torch.randn(B, H, Nk, generator=g)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(q), cast(k), cast(v), (None if bias is None else bias.to(device))


def _random_dense(B, H, nq, nk, seed, density=0.6, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(B, H, nq, nk, generator=g) < density
    if empty_row and nq > 1:
        d[0, 0, 1] = False  # a query block with no key block at all -> empty rows
    return d


def _check_close(got, exp64, base, floor):
    """|got - ref| <= 2 |torch same-dtype - ref| + floor (DESIGN.md tolerance rule)."""
    got, base = got.double().cpu(), base.double().cpu()
    err = (got - exp64).abs().max().item()
    base_err = (base - exp64).abs().max().item()
    assert err <= 2 * base_err + floor, (err, base_err)


# Absolute floors added to the 2x rule, for cases where torch in the same dtype happens to be (nearly)
# exact: outputs are convex combinations of v (|v| < 5), so these are ~16 fp32 ulps, ~1 fp16 ulp and
# ~1 bf16 ulp at magnitude 1-2 (the output's rounding to the dtype alone costs half an ulp).
FLOORS = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

FWD_CASES = [
    # (B, H, Hkv, Nq, Nk, D, block_q, block_k, causal, bias_dim)
    (2, 2, 2, 100, 100, 64, 64, 64, False, None),
    (2, 2, 2, 100, 100, 64, 64, 64, True, 3),
    (1, 4, 2, 150, 150, 64, 128, 128, True, None),  # GQA, mask block 128 tiled by the kernel
    (2, 2, 1, 90, 200, 32, 64, 128, False, 2),  # MQA, Nq != Nk, head dim 32
    (1, 2, 2, 200, 130, 128, 128, 64, True, 2),  # head dim 128, bottom-right causal with Nq > Nk
    (1, 2, 2, 50, 50, 8, 64, 64, True, None),  # tiny head dim (padded to the 16-wide dot)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_reference(backend_device, case, dtype):
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the torch forward is reference.attention itself: checked against SDPA "
                    "(test_forward_matches_sdpa_oracle)")
    _skip_interp_bf16(backend, device, dtype)
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, dtype, device, seed=Nq + Nk, bias_dim=bias_dim)
    dense = _random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=D)
    mask = BlockMask.from_dense(dense.to(device), bq, bk, Nq, Nk)
    out, lse = block_sparse_attention(q, k, v, mask, causal=causal, key_bias=bias, return_lse=True, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (B, H, Nq)
    cpu = [t.cpu() if t is not None else None for t in (q, k, v, bias)]
    args = (mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(), bq, bk, causal, D ** -0.5, cpu[3])
    exp_out, exp_lse = ref.attention(*cpu[:3], *args)
    base_out, _ = ref.attention(*cpu[:3], *args, dtype=dtype)  # the same computation in torch, in dtype
    assert not out.isnan().any() and not lse.isnan().any()
    _check_close(out, exp_out, base_out, FLOORS[dtype])
    empty = torch.isinf(exp_lse)
    assert empty.any(), "the case must contain empty rows"
    assert torch.equal(torch.isinf(lse.cpu()), empty) and (lse.cpu()[empty] < 0).all()
    assert (out.cpu()[empty] == 0).all()
    fin = ~empty
    assert (lse.cpu()[fin].double() - exp_lse[fin]).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_dense_mask_csr_mask_and_broadcast_agree(backend_device):
    backend, device = backend_device
    B, H, N, D = 2, 2, 100, 32
    q, k, v, _ = _inputs(B, H, H, N, N, D, torch.float32, device, seed=3)
    dense = _random_dense(1, H, 2, 2, seed=5, empty_row=False).to(device)  # B = 1 broadcasts
    a = block_sparse_attention(q, k, v, dense, block_q=64, backend=backend)
    m = BlockMask.from_dense(dense, 64, 64, N, N)
    b = block_sparse_attention(q, k, v, m, backend=backend)
    c = block_sparse_attention(q, k, v, m.expand(B, H), backend=backend)
    assert torch.equal(a, b) and torch.equal(b, c)
    # CSR rows may list their blocks in any order, and entries past kv_num_blocks are ignored
    idx = m.kv_indices.flip(-1).clone()
    num = m.kv_num_blocks
    perm = torch.where(torch.arange(2, device=device) < num[..., None], m.kv_indices.gather(
        -1, (num[..., None] - 1 - torch.arange(2, device=device)).clamp(min=0).long()), idx)
    d = block_sparse_attention(q, k, v, m._replace(kv_indices=perm.to(torch.int32).contiguous()), backend=backend)
    torch.testing.assert_close(d, b, atol=1e-6, rtol=1e-5)


def test_all_blocks_is_dense_attention(backend_device):
    backend, device = backend_device
    q, k, v, _ = _inputs(1, 2, 2, 70, 70, 64, torch.float32, device, seed=9)
    for causal in (False, True):
        out = block_sparse_attention(q, k, v, None, causal=causal, block_q=64, backend=backend)
        exp = torch.nn.functional.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                                               is_causal=causal)
        torch.testing.assert_close(out.cpu().double(), exp, atol=2e-6, rtol=1e-5)


GRAD_CASES = [
    # (B, H, Hkv, Nq, Nk, D, block_q, block_k, causal, bias_dim)
    (2, 2, 1, 100, 100, 32, 64, 64, True, 2),
    (1, 4, 2, 130, 90, 64, 128, 64, False, 3),
    (1, 2, 2, 70, 150, 32, 64, 128, True, None),
    (1, 2, 1, 140, 140, 128, 128, 128, True, 3),  # head dim 128
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gradients_match_reference(backend_device, case):
    backend, device = backend_device
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, torch.float32, device, seed=11, bias_dim=bias_dim)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    dense = _random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=Nq)
    mask = BlockMask.from_dense(dense.to(device), bq, bk, Nq, Nk)
    out, lse = block_sparse_attention(q, k, v, mask, causal=causal, key_bias=bias, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=g).to(device)
    glse = torch.randn(lse.shape, generator=g).to(device)
    loss = (out * gout).sum() + (torch.where(lse.isinf(), 0, lse) * glse).sum()
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    rb = ref_leaves[3] if bias is not None else None
    rout, rlse = ref.attention(*ref_leaves[:3], mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(), bq, bk, causal,
                               D ** -0.5, rb)
    rloss = (rout * gout.cpu().double()).sum() + (torch.where(rlse.isinf(), 0, rlse) * glse.cpu().double()).sum()
    rgrads = torch.autograd.grad(rloss, ref_leaves)
    for name, got, exp in zip(("dq", "dk", "dv", "dbias"), grads, rgrads):
        assert got.shape == exp.shape and not got.isnan().any(), name
        torch.testing.assert_close(got.cpu().double(), exp, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradients_low_precision(backend_device, dtype):
    backend, device = backend_device
    _skip_interp_bf16(backend, device, dtype)
    B, H, N, D = 1, 2, 100, 64
    q, k, v, bias = _inputs(B, H, H, N, N, D, dtype, device, seed=2, bias_dim=3)
    leaves = [q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), bias.requires_grad_(True)]
    mask = causal_block_mask(N, block_q=64, device=device)
    out = block_sparse_attention(q, k, v, mask, causal=True, key_bias=bias, backend=backend)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    grads = torch.autograd.grad((out.float() * gout.float()).sum(), leaves)

    def run(dt):
        rl = [t.detach().cpu().to(dt).requires_grad_(True) for t in leaves]
        ro, _ = ref.attention(*rl[:3], mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(), 64, 64, True, D ** -0.5,
                              rl[3], dtype=dt)
        return torch.autograd.grad((ro * gout.cpu().to(dt)).sum(), rl)

    exp = run(torch.float64)
    base = run(dtype)
    for name, got, e, b in zip(("dq", "dk", "dv", "dbias"), grads, exp, base):
        _check_close(got, e, b, 2e-2 if dtype == torch.bfloat16 else 3e-3)


# --------------------------------------------------------------------------- second oracle: SDPA with a float mask
# The torch backend of the forward *is* ``reference.attention``; these tests check every backend (torch
# included) against ``torch.nn.functional.scaled_dot_product_attention`` with a float mask built in
# tests/oracles.py from the dense block mask (key_bias where allowed, -inf elsewhere), GQA by repeating
# the kv heads -- code that shares nothing with tokops.
#
# Off-by-one lengths for the causal tile bounds: the kernels skip key tiles that start after the last key
# any row of the query tile may see (``BM - 1 + Nk - Nq``) and, in the key-major passes, query tiles
# that end before the first query that sees the key tile.  ``Nk - Nq = 1 (mod 64)`` puts exactly one key
# of the last row in the next tile (Nq=64, Nk=65: with the bound off by one the last row loses key 64).
OFF_BY_ONE = [
    # (B, H, Hkv, Nq, Nk, D, block_q, block_k, bias_dim)
    (1, 4, 2, 64, 65, 32, 64, 64, 3),
    (1, 2, 1, 64, 129, 32, 64, 64, 2),
    (1, 2, 2, 63, 64, 32, 64, 64, None),
    (1, 2, 2, 65, 64, 32, 64, 64, 2),
    (1, 2, 2, 1, 65, 32, 64, 64, None),
    (1, 2, 1, 127, 129, 32, 64, 64, 3),
    (1, 2, 2, 100, 165, 32, 128, 128, 2),  # mask block 128 tiled by 64-row kernel tiles
    (1, 2, 2, 65, 130, 16, 64, 128, None),
]
SDPA_CASES = [c[:8] + (True, c[8]) for c in OFF_BY_ONE] + FWD_CASES


def _oracle_inputs(case, dtype, device, seed):
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, dtype, device, seed=seed, bias_dim=bias_dim)
    dense = _random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=D + Nk, density=0.7)
    dense[0, 0, -1] = True  # the last query block sees every key block (the causal diagonal tiles)
    if dense.shape[-2] > 1:
        dense[-1, -1, 0] = False
    return q, k, v, bias, dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_matches_sdpa_oracle(backend_device, case, dtype):
    """Tolerance (DESIGN.md): |out - oracle64| <= 2 |SDPA in the same dtype - oracle64| + floor, the
    floor a few ulps of the dtype (FLOORS) for the cases where SDPA in that dtype happens to be exact;
    LSE within 1e-5 (fp32) / 2e-2 (fp16, bf16: the same bound as test_forward_matches_reference;
    the LSE is fp32 from fp16/bf16 inputs, |logit| < 20)."""
    backend, device = backend_device
    _skip_interp_bf16(backend, device, dtype)
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias, dense = _oracle_inputs(case, dtype, device, seed=Nq * 7 + Nk)
    mask = BlockMask.from_dense(dense.to(device), bq, bk, Nq, Nk)
    out, lse = block_sparse_attention(q, k, v, mask, causal=causal, key_bias=bias, return_lse=True, backend=backend)
    allowed = dense_token_mask(dense, bq, bk, Nq, Nk, causal)
    cpu = [t.cpu() if t is not None else None for t in (q, k, v, bias)]
    exp_out, exp_lse = sdpa_attention(*cpu[:3], allowed, D ** -0.5, cpu[3])
    base_out, _ = sdpa_attention(*cpu[:3], allowed, D ** -0.5, cpu[3], dtype=dtype)
    assert not out.isnan().any() and not lse.isnan().any()
    _check_close(out, exp_out, base_out, FLOORS[dtype])
    empty = torch.isinf(exp_lse)
    assert torch.equal(torch.isinf(lse.cpu()), empty) and (out.cpu()[empty] == 0).all()
    fin = ~empty
    assert (lse.cpu()[fin].double() - exp_lse[fin]).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("case", [c[:8] + (True, c[8]) for c in OFF_BY_ONE[:6]],
                         ids=lambda c: "-".join(map(str, c)))
def test_causal_off_by_one_gradients_and_mass_match_sdpa(backend_device, case):
    """Backward (dq, dk, dv, dbias) and per-key mass at the off-by-one lengths, against float64
    autograd through the SDPA oracle.  Tolerance: 2x the fp32 SDPA autograd error plus 1e-5 (fp32
    ulps times reductions over <= 129 keys/queries of O(1) terms)."""
    backend, device = backend_device
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias, dense = _oracle_inputs(case, torch.float32, device, seed=Nq + 3 * Nk)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    mask = BlockMask.from_dense(dense.to(device), bq, bk, Nq, Nk)
    out, mass = attention_with_key_mass(q, k, v, mask, causal=True, key_bias=bias, backend=backend)
    out2, lse = block_sparse_attention(q, k, v, mask, causal=True, key_bias=bias, return_lse=True, backend=backend)
    g = torch.Generator().manual_seed(5)
    gout = torch.randn(out.shape, generator=g)
    glse = torch.randn(lse.shape, generator=g)
    loss = (out2 * gout.to(device)).sum() + (torch.where(lse.isinf(), 0, lse) * glse.to(device)).sum()
    grads = torch.autograd.grad(loss, leaves)
    allowed = dense_token_mask(dense, bq, bk, Nq, Nk, True)

    def run(dt):
        rl = [t.detach().cpu().to(dt).requires_grad_(True) for t in leaves]
        o, l = sdpa_attention(*rl[:3], allowed, D ** -0.5, rl[3] if bias is not None else None, dtype=dt)
        rloss = (o * gout.to(dt)).sum() + (torch.where(l.isinf(), 0, l) * glse.to(dt)).sum()
        return torch.autograd.grad(rloss, rl)

    o64, l64 = sdpa_attention(*[t.detach().cpu() for t in (q, k, v)], allowed, D ** -0.5,
                              bias.detach().cpu() if bias is not None else None)
    o32, _ = sdpa_attention(*[t.detach().cpu() for t in (q, k, v)], allowed, D ** -0.5,
                            bias.detach().cpu() if bias is not None else None, dtype=torch.float32)
    _check_close(out2.detach(), o64, o32, FLOORS[torch.float32])
    _check_close(out.detach(), o64, o32, FLOORS[torch.float32])
    exp, base = run(torch.float64), run(torch.float32)
    for name, got, e, b in zip(("dq", "dk", "dv", "dbias"), grads, exp, base):
        assert got.shape == e.shape and not got.isnan().any(), name
        _check_close(got, e, b, 1e-5)
    # mass[j] = sum_i P[i, j], P from the oracle's float64 logits
    kk = k.detach().cpu().double().repeat_interleave(H // Hkv, 1)
    s = q.detach().cpu().double() @ kk.transpose(-1, -2) * D ** -0.5
    if bias is not None:
        b64 = bias.detach().cpu().double()
        s = s + (b64[:, None, None, :] if b64.dim() == 2 else b64[:, :, None, :])
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    torch.testing.assert_close(mass.detach().cpu().double(), p.sum(-2), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- key mass
@pytest.mark.parametrize("causal,bias_dim,hkv", [(False, None, 2), (True, 3, 1), (True, 2, 2)])
def test_key_mass_matches_reference(backend_device, causal, bias_dim, hkv):
    backend, device = backend_device
    B, H, Nq, Nk, D, bq, bk = 2, 2, 100, 150, 32, 64, 128
    q, k, v, bias = _inputs(B, H, hkv, Nq, Nk, D, torch.float32, device, seed=21, bias_dim=bias_dim)
    dense = _random_dense(B, H, 2, 2, seed=4)
    mask = BlockMask.from_dense(dense.to(device), bq, bk, Nq, Nk)
    out, mass = attention_with_key_mass(q, k, v, mask, causal=causal, key_bias=bias, backend=backend)
    assert mass.shape == (B, H, Nk) and mass.dtype == torch.float32
    cpu_bias = None if bias is None else bias.cpu()
    exp = ref.key_mass(q.cpu(), k.cpu(), mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(), bq, bk, causal, D ** -0.5,
                       cpu_bias)
    torch.testing.assert_close(mass.cpu().double(), exp, atol=1e-5, rtol=1e-5)
    # every non-empty row distributes exactly one unit of mass
    rows = (~torch.isinf(ref.attention(q.cpu(), k.cpu(), v.cpu(), mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(),
                                       bq, bk, causal, D ** -0.5, cpu_bias)[1])).sum(-1)
    torch.testing.assert_close(mass.sum(-1).cpu().double(), rows.double(), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask, causal=causal, key_bias=bias,
                                                           backend=backend))


@pytest.mark.parametrize("nq,causal", [(1, False), (5, True)])
def test_decode_key_mass(backend_device, nq, causal):
    backend, device = backend_device
    B, H, Nk, D = 2, 4, 300, 64
    q, k, v, bias = _inputs(B, H, 2, nq, Nk, D, torch.float32, device, seed=nq, bias_dim=2)
    out, mass = decode_attention_with_key_mass(q, k, v, causal=causal, key_bias=bias, backend=backend)
    kk, vv = k.cpu().double().repeat_interleave(2, 1), v.cpu().double().repeat_interleave(2, 1)
    s = q.cpu().double() @ kk.transpose(-1, -2) * D ** -0.5 + bias.cpu().double()[:, None, None]
    if causal:
        s = s.masked_fill(~causal_token_mask(nq, Nk), float("-inf"))
    p = s.softmax(-1)
    torch.testing.assert_close(out.cpu().double(), p @ vv, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(mass.cpu().double(), p.sum(-2), atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------- token selection
def test_token_select_mask_is_exact_token_selection(backend_device):
    backend, device = backend_device
    B, H, N, D = 2, 2, 150, 32
    q, k, v, _ = _inputs(B, H, H, N, N, D, torch.float32, device, seed=8)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(B, N, generator=g) < 0.3
    keep[1, 64:] = False  # whole key blocks unselected in batch 1 -> the block mask drops them
    keep[:, 0] = True
    mask, bias = token_select_mask(keep.to(device), N, block_q=64)
    assert mask.kv_num_blocks[1].max().item() == 1  # only block 0 holds selected keys in batch 1
    out, mass = attention_with_key_mass(q, k, v, mask, key_bias=bias, backend=backend)
    s = q.cpu().double() @ k.cpu().double().transpose(-1, -2) * D ** -0.5
    p = s.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(out.cpu().double(), p @ v.cpu().double(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(mass.cpu().double(), p.sum(-2), atol=2e-6, rtol=1e-5)
    assert (mass.cpu()[~keep[:, None, :].expand(-1, H, -1)] == 0).all()


# --------------------------------------------------------------------------- mask builders
def _block_any(token: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """Token mask (..., Nq, Nk) -> block mask: a block is on if any of its pairs is."""
    nq, nk = math.ceil(token.shape[-2] / bq), math.ceil(token.shape[-1] / bk)
    t = torch.nn.functional.pad(token, (0, nk * bk - token.shape[-1], 0, nq * bq - token.shape[-2]))
    return t.unflatten(-2, (nq, bq)).unflatten(-1, (nk, bk)).any(-1).any(-2)


@pytest.mark.parametrize("nq,nk,bq,bk", [(300, 300, 64, 64), (200, 450, 128, 64), (130, 100, 64, 128)])
def test_causal_and_window_builders(nq, nk, bq, bk):
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)
    cm = causal_block_mask(nq, nk, block_q=bq, block_k=bk)
    assert torch.equal(cm.to_dense()[0, 0], _block_any(j <= i, bq, bk))
    window, sinks = 70, 5
    wm = sliding_window_mask(nq, window, sinks, nk, block_q=bq, block_k=bk)
    tok = (j <= i) & ((j > i - window) | (j < sinks))
    assert torch.equal(wm.to_dense()[0, 0], _block_any(tok, bq, bk))
    rm = retrieval_heads_mask(4, [0, 2], nq, window, sinks, nk, block_q=bq, block_k=bk)
    d = rm.to_dense()[0]
    assert torch.equal(d[0], cm.to_dense()[0, 0]) and torch.equal(d[2], d[0])
    assert torch.equal(d[1], wm.to_dense()[0, 0]) and torch.equal(d[3], d[1])
    st = stack_heads([cm, wm, cm, wm])
    assert torch.equal(st.to_dense()[0], rm.to_dense()[0][[0, 1, 2, 3]])


def test_window_mask_with_causal_attention_matches_token_window(backend_device):
    backend, device = backend_device
    N, D, window, sinks = 200, 32, 64, 4
    q, k, v, _ = _inputs(1, 2, 2, N, N, D, torch.float32, device, seed=13)
    mask = retrieval_heads_mask(2, [1], N, window, sinks, block_q=64, device=device)
    out = block_sparse_attention(q, k, v, mask, causal=True, backend=backend)
    exp, _ = ref.attention(q.cpu(), k.cpu(), v.cpu(), mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(), 64, 64, True,
                           D ** -0.5)
    torch.testing.assert_close(out.cpu().double(), exp, atol=2e-6, rtol=1e-5)
    full = torch.nn.functional.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                                            is_causal=True)
    torch.testing.assert_close(out.cpu().double()[:, 1], full[:, 1], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("keep", [2, 0.5, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_block_mask(keep, causal):
    B, H, Hkv, N, D, blk = 2, 4, 2, 330, 32, 64
    q, k, _, _ = _inputs(B, H, Hkv, N, N, D, torch.float32, "cpu", seed=17)
    m = topk_block_mask(q, k, keep, block_q=blk, causal=causal)
    nb = math.ceil(N / blk)
    count = keep if isinstance(keep, int) else math.ceil(keep * nb)
    dense = m.to_dense()
    assert dense.shape == (B, H, nb, nb)
    # brute force: pooled scores, diagonal forced, future blocks ineligible
    pad = nb * blk - N
    pool = lambda x: torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (nb, blk)).sum(-2) / torch.tensor(  # noqa: E731
        [min(blk, N - i * blk) for i in range(nb)], dtype=torch.float32)[:, None]
    score = pool(q) @ pool(k).repeat_interleave(H // Hkv, 1).transpose(-1, -2)
    for b in range(B):
        for h in range(H):
            for i in range(nb):
                eligible = list(range(i + 1)) if causal else list(range(nb))
                row = dense[b, h, i].nonzero().flatten().tolist()
                if causal:
                    assert i in row and all(j <= i for j in row)
                    rest = sorted((j for j in eligible if j != i), key=lambda j: -score[b, h, i, j].item())
                    assert sorted(row) == sorted([i] + rest[:count - 1])
                else:
                    top = sorted(eligible, key=lambda j: -score[b, h, i, j].item())[:count]
                    assert sorted(row) == sorted(top)


def test_mask_roundtrip_and_transpose():
    dense = _random_dense(2, 3, 4, 5, seed=1)
    m = BlockMask.from_dense(dense, 64, 128, 200, 600)
    assert m.kv_num_blocks.dtype == torch.int32 and m.kv_indices.dtype == torch.int32
    assert torch.equal(m.to_dense(), dense)
    qn, qi = m.transpose()
    assert qi.shape == (2, 3, 5, 4) and qi.is_contiguous()
    assert torch.equal(BlockMask(qn, qi, 128, 64, 600, 200).to_dense(), dense.transpose(-1, -2))
    assert abs(m.density() - dense.float().mean().item()) < 1e-6


def test_flex_block_mask_interop():
    m = causal_block_mask(300, block_q=128)
    fm = m.to_flex()
    assert torch.equal(fm.kv_num_blocks, m.kv_num_blocks)
    assert torch.equal(fm.kv_indices, m.kv_indices)


# --------------------------------------------------------------------------- bad input
def _bad_calls():
    B, H, N, D = 1, 2, 100, 32
    q, k, v, _ = _inputs(B, H, H, N, N, D, torch.float32, "cpu")
    m = BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, 64, N, N)
    run = lambda mask, **kw: block_sparse_attention(q, k, v, mask, **kw)  # noqa: E731
    yield "mask.kv_indices", TypeError, lambda: run(m._replace(kv_indices=m.kv_indices.long()))
    yield "mask.kv_num_blocks", TypeError, lambda: run(m._replace(kv_num_blocks=m.kv_num_blocks.float()))
    yield "mask.kv_indices", ValueError, lambda: run(m._replace(kv_indices=m.kv_indices + 1))
    yield "mask.kv_indices", ValueError, lambda: run(m._replace(kv_indices=m.kv_indices - 1))
    yield "mask.kv_indices", ValueError, lambda: run(m._replace(kv_indices=torch.zeros_like(m.kv_indices)))
    yield "mask.kv_num_blocks", ValueError, lambda: run(m._replace(kv_num_blocks=m.kv_num_blocks + 1))
    yield "mask.kv_num_blocks", ValueError, lambda: run(m._replace(kv_num_blocks=m.kv_num_blocks - 3))
    yield "mask.kv_indices", ValueError, lambda: run(m._replace(kv_indices=m.kv_indices[:, :, :1].contiguous()))
    yield "mask.kv_indices", ValueError, lambda: run(m._replace(kv_indices=m.kv_indices.expand(3, 2, 2, 2)))
    yield "mask.kv_num_blocks", ValueError, lambda: run(m._replace(kv_num_blocks=m.kv_num_blocks[..., :1]))
    yield "mask.q_len", ValueError, lambda: run(m._replace(q_len=99))
    yield "block_q", ValueError, lambda: run(m._replace(block_q=48))
    yield "mask", TypeError, lambda: run(torch.ones(1, 1, 2, 2, dtype=torch.int32), block_q=64)
    yield "mask", ValueError, lambda: run(torch.ones(1, 1, 3, 2, dtype=torch.bool), block_q=64)
    yield "mask", TypeError, lambda: run((m.kv_num_blocks, m.kv_indices))
    yield "key_bias", ValueError, lambda: run(m, key_bias=torch.zeros(B, N + 1))
    yield "key_bias", TypeError, lambda: run(m, key_bias=torch.zeros(B, N, dtype=torch.float16))
    yield "k", TypeError, lambda: block_sparse_attention(q, k.half(), v, m)
    yield "k", ValueError, lambda: block_sparse_attention(q, k[:, :, :, :16].contiguous(), v, m)
    yield "k", ValueError, lambda: block_sparse_attention(torch.randn(B, 3, N, D), k, v, m)
    yield "v", ValueError, lambda: block_sparse_attention(q, k, v[:, :, :50].contiguous(), m)
    # (a strided q is accepted since issue 16, tests/test_strided.py; a head dim above 256 is not)
    yield "q", ValueError, lambda: block_sparse_attention(*(torch.randn(B, H, N, 264) for _ in range(3)), m)
    yield "causal", TypeError, lambda: run(m, causal=1)
    yield "keep", ValueError, lambda: topk_block_mask(q, k, 0, block_q=64)
    yield "keep", ValueError, lambda: topk_block_mask(q, k, 1.5, block_q=64)
    yield "window", ValueError, lambda: sliding_window_mask(N, 0)
    yield "full_heads", ValueError, lambda: retrieval_heads_mask(2, [2], N, 16)
    yield "keep", TypeError, lambda: token_select_mask(torch.ones(B, N), N)


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_inputs(case):
    name, exc, call = list(_bad_calls())[case]
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        call()


# --------------------------------------------------------------------------- registry / compile
def test_opcheck(backend_device):
    backend, device = backend_device
    # the CUDA kernels take fp16/bf16, head dim 64/128, blocks multiple of 64: give them such a case
    cuda = backend == "cuda"
    B, H, N, D, blk, dt = (1, 2, 130, 64, 64, torch.float16) if cuda else (1, 2, 40, 16, 16, torch.float32)
    q, k, v, bias = _inputs(B, H, 1, N, N, D, dt, device, bias_dim=2)
    m = causal_block_mask(N, block_q=blk, device=device)
    m = BlockMask.from_dense(m.to_dense().expand(B, H, -1, -1).contiguous(), blk, blk, N, N)
    args = (q, k, v, m.kv_num_blocks, m.kv_indices, blk, blk, True, D ** -0.5, bias, backend)
    torch.library.opcheck(torch.ops.tokops.block_sparse_attn_fwd.default, args)
    out, lse = torch.ops.tokops.block_sparse_attn_fwd(*args)
    qn, qi = m.transpose()
    bargs = (torch.randn_like(out), q, k, v, out, lse, None, m.kv_num_blocks, m.kv_indices, qn, qi, blk, blk, True,
             D ** -0.5, bias, backend)
    torch.library.opcheck(torch.ops.tokops.block_sparse_attn_bwd.default, bargs)
    mass_be = "triton" if cuda else backend  # no CUDA key-mass kernel: the CUDA backend uses Triton's
    torch.library.opcheck(torch.ops.tokops.attn_key_mass.default,
                          (q, k, lse, qn, qi, blk, blk, True, D ** -0.5, bias, mass_be))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    N, D = 80, 32

    def layer(q, k, v, bias):
        mask = causal_block_mask(N, block_q=64, device=q.device)
        out = block_sparse_attention(q, k, v, mask, causal=True, key_bias=bias)
        out2, mass = attention_with_key_mass(q, k, v, mask, causal=True)
        return out + out2, mass

    q, k, v, bias = _inputs(1, 2, 2, N, N, D, torch.float32, device, bias_dim=2)
    q.requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    out, mass = compiled(q, k, v, bias)
    exp_out, exp_mass = layer(q, k, v, bias)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(mass, exp_mass)
    (g,) = torch.autograd.grad(out.sum(), q)
    (eg,) = torch.autograd.grad(exp_out.sum(), q)
    torch.testing.assert_close(g, eg)


def test_backends_registered():
    impls = tokops._registry.implementations()
    for name in ("block_sparse_attn_fwd", "block_sparse_attn_bwd", "attn_key_mass"):
        assert {"torch", "triton"} <= set(impls[name]), name
    assert full_block_mask(10).kv_indices.shape == (1, 1, 1, 1)


def test_agrees_with_flex_attention_on_the_same_block_mask():
    """FlexAttention (compiled, CPU here) with the same CSR block mask gives the same output."""
    from torch.nn.attention.flex_attention import flex_attention

    N, D = 256, 32
    q, k, v, _ = _inputs(1, 2, 2, N, N, D, torch.float32, "cpu", seed=31)
    dense = _random_dense(1, 2, 2, 2, seed=6, empty_row=False)
    dense[..., 0] = True
    mask = BlockMask.from_dense(dense, 128, 128, N, N)
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, fullgraph=True)(q, k, v, block_mask=mask.to_flex())
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask, backend="torch"), flex, atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(not tokops.triton_available(), reason="needs triton")
@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_triton_split_kv_forward(num_splits):
    """The flash-decoding path (key-block list split over programs, then merged by LSE) agrees with
    the reference, including empty rows, causal tiles and splits that get no block."""
    from tokops import _registry

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _registry.triton_interpreter():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from tokops.triton_kernels import block_sparse_attn as tk

    B, H, Hkv, Nq, Nk, D = 1, 2, 1, 20, 300, 64
    q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, torch.float32, device, seed=5, bias_dim=3)
    dense = torch.tensor([[True, False, True], [False, False, False]]).view(1, 2, 1, 3)  # head 1: empty
    mask = BlockMask.from_dense(dense.to(device), 32, 128, Nq, Nk)
    for causal in (False, True):
        out, lse = tk.fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, 32, 128, causal, D ** -0.5, bias,
                          num_splits=num_splits)
        exp_out, exp_lse = ref.attention(q.cpu(), k.cpu(), v.cpu(), mask.kv_num_blocks.cpu(), mask.kv_indices.cpu(),
                                         32, 128, causal, D ** -0.5, bias.cpu())
        torch.testing.assert_close(out.cpu().double(), exp_out, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse.cpu().double(), exp_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not tokops.triton_available(), reason="needs triton")
@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_triton_split_kv_forward_every_split_nonempty(num_splits):
    """Split-KV with every split holding key blocks (5 listed blocks per row: 2 splits get 3 + 2,
    3 splits 2 + 2 + 1, 5 splits one each), GQA, per-head bias, causal and not, against the SDPA
    oracle.  Tolerance: fp32, 2x the error of SDPA in fp32 + 2e-6 (FLOORS)."""
    from tokops import _registry
    from tokops.triton_kernels import block_sparse_attn as tk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _registry.triton_interpreter():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    B, H, Hkv, Nq, Nk, D = 1, 2, 1, 20, 300, 32
    q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, torch.float32, device, seed=15, bias_dim=3)
    dense = torch.ones(1, H, 1, 5, dtype=torch.bool)
    dense[0, 1, 0, 2] = False  # head 1: 4 blocks, so its splits differ from head 0's
    mask = BlockMask.from_dense(dense.to(device), 32, 64, Nq, Nk)
    per_split = math.ceil(5 / num_splits)
    assert math.ceil(5 / per_split) == num_splits and 5 - per_split * (num_splits - 1) > 0  # all non-empty
    for causal in (False, True):
        out, lse = tk.fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, 32, 64, causal, D ** -0.5, bias,
                          num_splits=num_splits)
        allowed = dense_token_mask(dense, 32, 64, Nq, Nk, causal)
        cpu = [t.cpu() for t in (q, k, v, bias)]
        exp_out, exp_lse = sdpa_attention(*cpu[:3], allowed, D ** -0.5, cpu[3])
        base_out, _ = sdpa_attention(*cpu[:3], allowed, D ** -0.5, cpu[3], dtype=torch.float32)
        _check_close(out, exp_out, base_out, FLOORS[torch.float32])
        torch.testing.assert_close(lse.cpu().double(), exp_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("D,block", [(64, 64), (128, 128), (64, 128)])
def test_cuda_forward_kernel(dtype, D, block):
    """The CUDA kernel itself (called directly, so no silent Triton fallback) against the reference."""
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    B, H, Hkv, Nq, Nk = 2, 4, 2, 300, 333
    for causal, bias_dim in ((False, 3), (True, 2), (True, None)):
        q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, dtype, "cuda", seed=D + block, bias_dim=bias_dim)
        dense = _random_dense(B, H, math.ceil(Nq / block), math.ceil(Nk / block), seed=block)
        m = BlockMask.from_dense(dense.cuda(), block, block, Nq, Nk)
        out, lse = torch.ops.tokops.block_sparse_attn_fwd_cuda(q, k, v, m.kv_num_blocks, m.kv_indices, block, block,
                                                               causal, D ** -0.5, bias)
        cpu_bias = None if bias is None else bias.cpu()
        args = (m.kv_num_blocks.cpu(), m.kv_indices.cpu(), block, block, causal, D ** -0.5, cpu_bias)
        exp_out, exp_lse = ref.attention(q.cpu(), k.cpu(), v.cpu(), *args)
        base_out, _ = ref.attention(q.cpu(), k.cpu(), v.cpu(), *args, dtype=dtype)
        _check_close(out, exp_out, base_out, FLOORS[dtype])
        assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(exp_lse))
        fin = ~torch.isinf(exp_lse)
        assert (lse.cpu()[fin].double() - exp_lse[fin]).abs().max() < 1e-2


@pytest.mark.cuda
def test_cuda_forward_kernel_rejects_bad_input_directly():
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 64, torch.float16, "cuda")
    m = causal_block_mask(64, block_q=64, device="cuda")
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.tokops.block_sparse_attn_fwd_cuda(q[..., :32].contiguous(), k[..., :32].contiguous(),
                                                    v[..., :32].contiguous(), m.kv_num_blocks, m.kv_indices, 64, 64,
                                                    False, 1.0, None)
    with pytest.raises(RuntimeError, match="kv_indices"):
        torch.ops.tokops.block_sparse_attn_fwd_cuda(q, k, v, m.kv_num_blocks, m.kv_indices.long(), 64, 64, False,
                                                    1.0, None)


@pytest.mark.cuda
def test_explicit_cuda_backend_is_not_a_silent_fallback():
    """backend='cuda' on a case the CUDA kernel does not cover is an error; 'auto' runs Triton there."""
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 32, torch.float16, "cuda")  # head dim 32: not a CUDA-kernel case
    with pytest.raises(ValueError, match="backend='cuda' cannot run this call"):
        tokops.attention.block_sparse_attention(q, k, v, None, backend="cuda")
    out = tokops.attention.block_sparse_attention(q, k, v, None, backend="auto")
    torch.testing.assert_close(out, tokops.attention.block_sparse_attention(q, k, v, None, backend="triton"))


CUDA_BWD_CASES = [
    # (B, H, Hkv, Nq, Nk, D, block_q, block_k, causal, bias_dim, with_dlse)
    (2, 4, 2, 300, 333, 64, 64, 64, False, 3, True),  # GQA, ragged, per-head bias, gradient through lse
    (1, 4, 1, 200, 130, 128, 128, 128, True, 2, False),  # MQA, head dim 128, bottom-right causal with Nq > Nk
    (2, 2, 2, 130, 260, 64, 64, 128, True, None, True),  # Nq < Nk causal, mixed block sizes, no bias
    (1, 2, 2, 200, 100, 128, 128, 64, False, None, False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CUDA_BWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_backward_kernel(dtype, case):
    """The CUDA backward kernel itself (called directly through torch.ops, so no Triton fallback)
    against the float64 autograd gradients of the reference: dq, dk, dv (summed over the GQA group)
    and dbias, with empty rows (a query block without key blocks) and a gradient through lse."""
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim, with_dlse = case
    scale = D ** -0.5
    q, k, v, bias = _inputs(B, H, Hkv, Nq, Nk, D, dtype, "cuda", seed=Nq + D, bias_dim=bias_dim)
    dense = _random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=Nk)
    m = BlockMask.from_dense(dense.cuda(), bq, bk, Nq, Nk)
    qn, qi = m.transpose()
    num, idx = m.kv_num_blocks.cpu(), m.kv_indices.cpu()
    cpu_bias = None if bias is None else bias.cpu()
    out, lse = ref.fwd(q.cpu(), k.cpu(), v.cpu(), num, idx, bq, bk, causal, scale, cpu_bias)
    assert lse.isinf().any()  # the empty rows are exercised
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(q.shape, generator=g).to(dtype)
    glse = torch.randn(lse.shape, generator=g) if with_dlse else None
    dq, dk, dv, dbias = torch.ops.tokops.block_sparse_attn_bwd_cuda(
        gout.cuda(), q, k, v, out.cuda(), lse.cuda(), None if glse is None else glse.cuda(), m.kv_num_blocks,
        m.kv_indices, qn, qi, bq, bk, causal, scale, bias)
    got = {"dq": dq, "dk": dk, "dv": dv}
    if bias is not None:
        got["dbias"] = dbias if bias_dim == 3 else dbias.sum(1)
    else:
        assert dbias.numel() == 0

    def grads(dt):
        leaves = [t.detach().cpu().to(dt).requires_grad_(True) for t in (q, k, v)]
        if bias is not None:
            leaves.append(bias.detach().cpu().to(dt).requires_grad_(True))
        rb = leaves[3] if bias is not None else None
        ro, rl = ref.attention(*leaves[:3], num, idx, bq, bk, causal, scale, rb, dtype=dt)
        loss = (ro * gout.to(dt)).sum()
        if glse is not None:
            loss = loss + (torch.where(rl.isinf(), 0, rl) * glse.to(dt)).sum()
        return dict(zip(("dq", "dk", "dv", "dbias"), torch.autograd.grad(loss, leaves)))

    exp, base = grads(torch.float64), grads(dtype)
    floor = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for name, t in got.items():
        assert not t.isnan().any(), name
        assert t.shape == exp[name].shape, name
        _check_close(t, exp[name], base[name], floor)


@pytest.mark.cuda
def test_cuda_backward_through_autograd_and_opcheck(monkeypatch):
    """backend='cuda': the backward of the CUDA forward runs the CUDA backward kernel (fp16, D 64,
    blocks 64) and agrees with the Triton backward; the op passes opcheck on the CUDA backend."""
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    monkeypatch.setenv("TOKOPS_AUTO_CUDA", "1")  # whatever GPU_VERIFIED_CUDA holds, take the CUDA backward
    from tokops.attention import ops

    B, H, N, D = 1, 2, 150, 64
    q, k, v, bias = _inputs(B, H, 1, N, N, D, torch.float16, "cuda", seed=3, bias_dim=2)
    mask = causal_block_mask(N, block_q=64, device="cuda")
    out = torch.empty(q.shape, dtype=q.dtype, device="cuda")
    assert ops._bwd_backend("cuda", out, q, k, v, out, 64, 64) == "cuda"
    misaligned = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape)
    assert ops._bwd_backend("cuda", misaligned, q, k, v, out, 64, 64) == "triton"
    assert ops._bwd_backend("cuda", out, q.float(), k.float(), v.float(), out, 64, 64) == "triton"
    assert ops._bwd_backend("cuda", out, q, k, v, out, 32, 64) == "triton"

    def run(backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
        o = block_sparse_attention(*leaves[:3], mask, causal=True, key_bias=leaves[3], backend=backend)
        gout = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(o)
        return torch.autograd.grad((o.float() * gout.float()).sum(), leaves)

    for name, a, b in zip(("dq", "dk", "dv", "dbias"), run("cuda"), run("triton")):
        assert not a.isnan().any(), name
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2, msg=name)
    full = BlockMask.from_dense(mask.to_dense().expand(B, H, -1, -1).contiguous(), 64, 64, N, N)
    o, lse = torch.ops.tokops.block_sparse_attn_fwd(q, k, v, full.kv_num_blocks, full.kv_indices, 64, 64, True,
                                                    D ** -0.5, bias, "cuda")
    qn, qi = full.transpose()
    torch.library.opcheck(torch.ops.tokops.block_sparse_attn_bwd.default,
                          (torch.randn_like(o), q, k, v, o, lse, torch.randn_like(lse), full.kv_num_blocks,
                           full.kv_indices, qn, qi, 64, 64, True, D ** -0.5, bias, "cuda"))


@pytest.mark.cuda
def test_cuda_backward_kernel_rejects_bad_input_directly():
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    B, H, N, D = 1, 2, 64, 64
    q, k, v, _ = _inputs(B, H, H, N, N, D, torch.float16, "cuda")
    m = causal_block_mask(N, block_q=64, device="cuda")
    qn, qi = m.transpose()
    out = torch.randn_like(q)
    lse = torch.zeros(B, H, N, device="cuda")
    args = [out, q, k, v, out, lse, None, m.kv_num_blocks, m.kv_indices, qn, qi, 64, 64, False, 1.0, None]
    op = torch.ops.tokops.block_sparse_attn_bwd_cuda

    def bad(i, value, match):
        a = list(args)
        a[i] = value
        with pytest.raises(RuntimeError, match=match):
            op(*a)

    d32 = lambda t: t[..., :32].contiguous()  # noqa: E731
    with pytest.raises(RuntimeError, match="head dim"):
        op(d32(out), d32(q), d32(k), d32(v), d32(out), lse, None, m.kv_num_blocks, m.kv_indices, qn, qi, 64, 64,
           False, 1.0, None)
    bad(8, m.kv_indices.long(), "kv_indices")
    bad(10, qi[..., :0], "q_indices")
    bad(9, qn.long(), "q_num_blocks")
    bad(0, out[:, :, :32], "dout")
    bad(5, lse[:, :1], "lse")
    bad(6, torch.zeros(B, H, N + 1, device="cuda"), "dlse")
    bad(15, torch.zeros(B, N + 3, device="cuda"), "key_bias")
    bad(1, q.float(), "float16 or bfloat16")
    bad(1, q.transpose(2, 3), "contiguous")
    bad(11, 32, "multiples of 64")
    bad(2, k.cpu(), "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_triton_kernels_compile_for_gpu():
    """The interpreter does not run Triton's GPU compiler: ``benchmarks/kernel_check.py --quick`` compiles
    a representative subset of every Triton kernel family (attention fwd/bwd/mass/split, KV quantize /
    dequantize / fp8 / decode, merge) for sm_90 and sm_80 through the real launchers, in a process
    without TRITON_INTERPRET, and fails on a compile error, shared memory over the limit, unlisted
    spills or an attention/decode loop that is not pipelined.  ``.ci/run`` runs the full matrix."""
    import os
    import pathlib
    import subprocess
    import sys

    if not tokops.triton_available():
        pytest.skip("needs triton")
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "kernel_check.py").exists():
        pytest.skip("benchmarks/ is not shipped (installed wheel)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.kernel_check", "--quick"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0 and " 0 failures" in r.stdout, (r.stdout[-6000:], r.stderr[-3000:])


def test_token_select_per_head_and_causal(backend_device):
    backend, device = backend_device
    B, H, N, D = 1, 2, 130, 32
    q, k, v, _ = _inputs(B, H, 1, N, N, D, torch.float32, device, seed=12)
    keep = torch.rand(B, H, N, generator=torch.Generator().manual_seed(4)) < 0.4
    keep[..., 0] = True
    mask, bias = token_select_mask(keep.to(device), N, block_q=64, causal=True)
    assert bias.shape == (B, H, N) and mask.kv_indices.shape[:2] == (B, H)
    out = block_sparse_attention(q, k, v, mask, causal=True, key_bias=bias, backend=backend)
    s = q.cpu().double() @ k.cpu().double().transpose(-1, -2) * D ** -0.5
    allowed = keep[:, :, None, :] & causal_token_mask(N, N)
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(out.cpu().double(), p @ v.cpu().double(), atol=2e-6, rtol=1e-5)


def test_check_mask_false_skips_only_value_checks():
    q, k, v, _ = _inputs(1, 1, 1, 64, 64, 16, torch.float32, "cpu")
    m = full_block_mask(64, block_q=64)
    assert torch.equal(block_sparse_attention(q, k, v, m, check_mask=False), block_sparse_attention(q, k, v, m))
    with pytest.raises(TypeError, match="mask.kv_indices"):  # shapes and dtypes are always checked
        block_sparse_attention(q, k, v, m._replace(kv_indices=m.kv_indices.long()), check_mask=False)


def test_cuda_backward_restricted_to_where_it_can_win():
    """Issue 12: the CUDA backward (dK/dV spills at D=128; wgmma Triton on sm_90) is taken on sm_80-class
    GPUs at D=64 only; every other case names its reason (the autograd then runs the Triton backward)."""
    from tokops.attention.ops import cuda_backward_restricted

    assert cuda_backward_restricted(64, (8, 0)) is None
    assert cuda_backward_restricted(64, (8, 6)) is None
    assert "spills" in cuda_backward_restricted(128, (8, 0))
    assert "wgmma" in cuda_backward_restricted(64, (9, 0))
    assert "wgmma" in cuda_backward_restricted(128, (10, 0))
