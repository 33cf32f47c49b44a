"""Every CUDA kernel of csrc/ run under the CPU emulator (csrc/emu) against the torch reference,
on the case matrices of its Triton tests, under three scheduling seeds (the ``seed`` fixture).

The quantization, decode and matching tests are the very test functions of tests/test_kv_quant.py,
tests/test_kv_cache.py and tests/test_merge.py, called with ``backend_device=("cuda", "cpu")``:
the ``cuda_backend`` fixture routes the registry's "cuda" backend to the emulated kernels. The
attention tests call the CUDA ops directly (like the GPU tests of tests/test_attention.py), on the
cases the CUDA kernels take (fp16/bf16, head dim 64/128, mask blocks multiple of 64)."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_attention as TA  # noqa: E402
import test_kv_cache as TC  # noqa: E402
import test_kv_decode_ragged as TR  # noqa: E402
import test_kv_quant as TQ  # noqa: E402
import test_merge as TM  # noqa: E402
import test_quant_exact as TX  # noqa: E402
from tokops.attention import BlockMask  # noqa: E402
from tokops.attention import reference as aref  # noqa: E402

EMU = ("cuda", "cpu")


# --------------------------------------------------------------------------- KV quantization
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bits,group_size", TQ.CASES)
@pytest.mark.parametrize("shape", TQ.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_dequantize(cuda_api_one_seed, shape, bits, group_size, axis, dtype):
    TQ.test_backends_agree_with_reference(EMU, shape, bits, group_size, axis, dtype)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_design_vectors(cuda_api, bits, axis):
    TQ.test_design_vectors(EMU, bits, axis)
    TQ.test_design_tie_vector(EMU, axis)


@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_hand_computed_vectors(cuda_api, axis):
    TQ.test_hand_computed_8bit_vector(EMU, axis)
    for bits, x, codes, words in TQ.TIES:
        TQ.test_hand_computed_tie_vectors(EMU, bits, x, codes, words, axis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bits,group_size", TQ.ORACLE_CASES)
@pytest.mark.parametrize("shape", TQ.SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_quantize_naive_oracle(cuda_api_one_seed, shape, bits, group_size, axis, dtype):
    TQ.test_backends_agree_with_naive_oracle(EMU, shape, bits, group_size, axis, dtype)


# exactness without a per-element division (issue 12): half-integers, ties, clamp edges, every fp16 value
@pytest.mark.parametrize("bits,group_size,axis,dtype", TX.ADV, ids=lambda v: str(v).replace("torch.", ""))
def test_quantize_adversarial_half_integers(cuda_api_one_seed, bits, group_size, axis, dtype):
    TX.test_adversarial_half_integers(EMU, bits, group_size, axis, dtype)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", [-1, -2])
def test_quantize_every_fp16_value(cuda_api_one_seed, bits, axis):
    TX.test_every_fp16_value_one_group(EMU, bits, axis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (4, 128), (3, 5, 96), (2, 20)], ids=lambda s: "x".join(map(str, s)))
def test_fp8(cuda_api_one_seed, shape, dtype):
    TQ.test_fp8(EMU, shape, dtype)


def test_quantize_rejects_bad_input(cuda_api):
    x = torch.randn(2, 3, 16, 64)
    op = cuda_api.kv_quantize_cuda
    with pytest.raises(RuntimeError, match="bits"):
        op(x, 3, 32, -1)
    with pytest.raises(RuntimeError, match="group_size"):
        op(x, 4, 48, -1)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.transpose(-1, -2), 4, 32, -1)


# --------------------------------------------------------------------------- fused decode
@pytest.mark.parametrize("cfg", TC.CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_decode_matches_oracle(cuda_api, cfg):
    TC.test_decode_matches_oracle(EMU, cfg)


@pytest.mark.parametrize("nq", [1, 3, 8])
def test_decode_nq_causal(cuda_api, nq):
    TC.test_decode_nq_causal(EMU, nq)


@pytest.mark.parametrize("H,Hk", [(1, 1), (4, 1), (6, 3), (8, 2)])
def test_decode_gqa(cuda_api, H, Hk):
    TC.test_decode_gqa(EMU, H, Hk)


@pytest.mark.parametrize("n", [1, 5, TC.G - 1, TC.G + 1, TC.R + TC.G, 2 * TC.R + 3 * TC.G + 7])
def test_decode_ragged_lengths(cuda_api, n):
    TC.test_decode_ragged_lengths(EMU, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_half_precision(cuda_api, dtype):
    TC.test_decode_half_precision(EMU, dtype)


def test_decode_many_splits(cuda_api, monkeypatch):
    TC.test_decode_many_splits(EMU, monkeypatch)


def test_decode_pinned_tokens_and_h2o(cuda_api):
    TC.test_pinned_tokens_stay_full_precision(EMU)
    TC.test_h2o_fp8(EMU)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_decode_head_dims(cuda_api, D):
    cache = TC.QuantizedKVCache(4, 2, group_size=TC.G, residual=TC.R, key_axis=-1, value_axis=-2)
    TC._fill(cache, [70, 3], B=1, Hk=2, D=D)
    TC._check_against_oracle(TC._q(1, 4, 2, D), cache, "cuda")


# ragged rows (per-row length tensors, issue 14): the very tests of tests/test_kv_decode_ragged.py
@pytest.mark.parametrize("cfg", TR.CONFIGS, ids=TR.CFG_IDS)
@pytest.mark.parametrize("nq", [1, 3])
def test_decode_ragged_rows(cuda_api, cfg, nq):
    TR.test_ragged_matches_oracle(EMU, cfg, nq)


@pytest.mark.parametrize("H,Hk", [(4, 1), (6, 3)])
def test_decode_ragged_gqa_without_mass(cuda_api_one_seed, H, Hk):
    TR.test_ragged_gqa_without_mass(EMU, H, Hk)


def test_decode_ragged_empty_residual_and_splits(cuda_api_one_seed, monkeypatch):
    TR.test_ragged_rows_with_empty_residual(EMU)
    TR.test_ragged_many_splits(EMU, monkeypatch)
    TR.test_uniform_lengths_equal_public_decode(EMU)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_ragged_half_precision(cuda_api_one_seed, dtype):
    TR.test_ragged_half_precision(EMU, dtype)


def test_decode_no_host_sync(cuda_api_one_seed):
    TR.test_decode_call_makes_no_host_sync(EMU)


# --------------------------------------------------------------------------- ToMe matching
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,C", [(2, 8), (3, 16), (17, 33), (40, 64), (67, 20)])
@pytest.mark.parametrize("cls,dist", [(False, False), (True, False), (True, True)])
def test_match_kernel(cuda_api_one_seed, N, C, cls, dist, dtype):
    TM.test_match_kernel_agrees_with_reference(EMU, N, C, cls, dist, dtype)


def test_match_ties_and_multi_tile(cuda_api):
    metric = TM._metric(1, 40, 24, seed=3).clone()
    metric[0, 2 * 13 + 1] = metric[0, 2 * 4 + 1]
    metric[0, 2 * 3] = metric[0, 2 * 4 + 1]
    metric[0, 2 * 17] = metric[0, 2 * 4 + 1]
    node_max, node_idx = torch.ops.tokops.tome_match(metric, None, False, False, "cuda")
    assert node_idx[0, 3].item() == 4 and node_idx[0, 17].item() == 4
    assert node_max[0, 3].item() == node_max[0, 17].item()
    TM.test_match_kernel_multi_tile_large_c(EMU)


def test_match_with_padding_mask(cuda_api):
    metric = TM._metric(2, 33, 16, seed=5)
    valid = torch.ones(2, 33, dtype=torch.bool)
    valid[1, 20:] = False
    got = torch.ops.tokops.tome_match(metric, valid, True, False, "cuda")
    exp = torch.ops.tokops.tome_match(metric, valid, True, False, "torch")
    assert torch.equal(got[1], exp[1])
    fin = torch.isfinite(exp[0])
    assert torch.equal(torch.isfinite(got[0]), fin)
    torch.testing.assert_close(got[0][fin], exp[0][fin], atol=2e-6, rtol=0)


def _match_oracle(metric, valid, cls, dist):
    """float64 scores of the (unscaled) metric with the op's masks: (scores, node_max, node_idx)."""
    s = TM._scores64(metric, cls, dist)
    if valid is not None:
        s = s.masked_fill(~valid[:, 1::2][:, None, :] | ~valid[:, 0::2][:, :, None], -math.inf)
    mx, ix = s.max(-1)
    return s, mx, ix


def _check_match(got, metric, valid, cls, dist, tol):
    """node_max within ``tol`` of the float64 answer; node_idx equal to it wherever the row's best
    beats its runner-up by more than 2 * tol, else an index whose float64 score is within tol."""
    s, mx, ix = _match_oracle(metric, valid, cls, dist)
    got_max, got_idx = got
    fin = torch.isfinite(mx)
    assert torch.equal(torch.isfinite(got_max), fin)
    assert torch.equal(got_idx[~fin], torch.zeros_like(got_idx[~fin]))  # no finite score: (-inf, 0)
    torch.testing.assert_close(got_max[fin].double(), mx[fin], atol=tol, rtol=0)
    top2 = s.topk(2, dim=-1).values
    clear = fin & (top2[..., 0] - top2[..., 1] > 2 * tol)
    assert torch.equal(got_idx[clear], ix[clear])
    picked = s.gather(-1, got_idx[..., None])[..., 0]
    assert ((picked - mx)[fin].abs() <= tol).all()


# Tensor-core tiles are 128 x 128 (BK = 32, 3 stages): N = 301 / 517 give two / three row blocks and
# B tiles with ragged tails; C = 136 (5 K steps: the pipeline wraps, an 8-channel tail, 16-B copies),
# C = 100 (not a multiple of 8: plain loads), C = 8 (one partial K step).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("N,C", [(301, 136), (517, 8), (258, 100)])
@pytest.mark.parametrize("cls,masked", [(False, False), (True, True)])
def test_match_tensor_core_tiles(cuda_api_one_seed, N, C, cls, masked, dtype):
    g = torch.Generator().manual_seed(N + C)
    metric = (torch.randn(2, N, C, generator=g) + 0.3 * torch.randn(2, 1, C, generator=g)).to(dtype)
    valid = None
    if masked:
        valid = torch.rand(2, N, generator=g) > 0.2
        valid[1, N // 2:] = False  # a padded tail
    got = torch.ops.tokops.tome_match(metric, valid, cls, cls, "cuda")
    _check_match(got, metric, valid, cls, cls, 2e-6 if dtype == torch.float32 else 1e-5)
    if masked:  # padding rows: (-inf, 0); padding columns never chosen
        assert torch.isinf(got[0][~valid[:, 0::2]]).all()
        chosen = torch.isfinite(got[0])
        assert valid[:, 1::2].gather(1, got[1])[chosen].all()


def test_match_unaligned_input_takes_plain_loads(cuda_api):
    """A contiguous view whose data pointer is not 16-byte aligned (C % 8 == 0): no 16-B cp.async."""
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(2 * 150 * 64 + 1, generator=g).to(torch.float16)
    metric = buf[1:].view(2, 150, 64)
    assert metric.is_contiguous() and metric.data_ptr() % 16 != 0
    got = torch.ops.tokops.tome_match(metric, None, True, True, "cuda")
    _check_match(got, metric, None, True, True, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_match_extreme_magnitudes_exact(cuda_api, dtype):
    """Rows beyond the fp32 dot's range (sequence 0 at 2**90, one row of sequence 1 at 2**-100): the
    row norm kernel flags them and the exact SIMT path divides them by 2**e, so the result is that of
    the normal-range rows. Sequence 2 (not flagged: bf16 on the tensor cores) is unaffected."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 140, 40, generator=g) + 0.3 * torch.randn(3, 1, 40, generator=g)).to(dtype)
    metric = base.clone()
    metric[0] *= 2.0 ** 90
    metric[1, 7] *= 2.0 ** -100
    got = torch.ops.tokops.tome_match(metric, None, False, False, "cuda")
    want = torch.ops.tokops.tome_match(base, None, False, False, "cuda")
    assert torch.equal(got[0][2], want[0][2]) and torch.equal(got[1][2], want[1][2])
    if dtype == torch.float32:  # the same fp32 path on the same (rescaled) values: bit-identical
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _check_match(got, base, None, False, False, 2e-6 if dtype == torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_match_allocates_only_outputs_and_workspace(cuda_api_one_seed, dtype):
    """The CUDA host code allocates the two outputs and the O(B N) workspace of
    benchmarks.memtrack.match_workspace_bytes, nothing else: no copy of metric (every allocation of
    the CPU allocator, C++ included, as the profiler records it)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.memtrack import match_workspace_bytes

    B, N, C = 2, 70, 64
    metric = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = torch.ops.tokops.tome_match(metric, None, True, False, "cuda")
    # each allocation is the self memory of the ATen op that made it (at::empty / at::zeros called by
    # the C++ host code are recorded too); the op that frees the workspace has a negative self memory
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    nA = (N + 1) // 2
    assert allocated == 12 * B * nA + match_workspace_bytes(B, N, dtype)
    _check_match(out, metric, None, True, False, 2e-6 if dtype == torch.float32 else 1e-5)


# --------------------------------------------------------------------------- block-sparse attention
FWD_CASES = [  # (B, H, Hkv, Nq, Nk, D, block_q, block_k, causal, bias_dim)
    (1, 2, 2, 100, 100, 64, 64, 64, False, None),
    (1, 2, 2, 100, 100, 64, 64, 64, True, 3),
    (1, 4, 2, 150, 150, 64, 128, 128, True, None),  # GQA, mask block 128 tiled by the kernel
    (1, 2, 1, 90, 200, 64, 64, 128, False, 2),  # MQA, Nq != Nk
    (1, 2, 2, 130, 70, 128, 128, 64, True, 2),  # head dim 128, bottom-right causal with Nq > Nk
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_forward(cuda_backend, case, dtype):
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias = TA._inputs(B, H, Hkv, Nq, Nk, D, dtype, "cpu", seed=Nq + Nk, bias_dim=bias_dim)
    dense = TA._random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=D)
    m = BlockMask.from_dense(dense, bq, bk, Nq, Nk)
    scale = D ** -0.5
    out, lse = cuda_backend.block_sparse_attn_fwd_cuda(q, k, v, m.kv_num_blocks, m.kv_indices, bq, bk, causal,
                                                       scale, bias)
    args = (m.kv_num_blocks, m.kv_indices, bq, bk, causal, scale, bias)
    exp_out, exp_lse = aref.attention(q, k, v, *args)
    base_out, _ = aref.attention(q, k, v, *args, dtype=dtype)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, H, Nq)
    assert not out.isnan().any() and not lse.isnan().any()
    TA._check_close(out, exp_out, base_out, TA.FLOORS[dtype])
    empty = torch.isinf(exp_lse)
    assert empty.any(), "the case must contain empty rows"
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all() and (out[empty] == 0).all()
    assert (lse[~empty].double() - exp_lse[~empty]).abs().max() < 1e-2


# The FlashAttention-2 design of the forward (issue 12): 4-warp (64-row) and 8-warp (128-row) CTAs,
# several 64-key tiles per walk (the cp.async double buffer turns over), D 64 and 128, ragged ends.
FWD_PIPELINE_CASES = [  # (B, H, Hkv, Nq, Nk, D, block_q, block_k, causal, bias_dim)
    (1, 2, 1, 61, 333, 128, 64, 64, False, 3),  # 4 warps, D 128, 6 key tiles (ragged), MQA, per-head bias
    (1, 4, 2, 200, 260, 128, 128, 128, True, 2),  # 8 warps, D 128, GQA, causal with Nk > Nq, batch bias
    (1, 2, 2, 40, 45, 64, 128, 256, False, None),  # Nq < 64 with 128-row blocks: 4 warps; Nk < one tile
    (1, 3, 3, 257, 257, 64, 256, 64, True, 3),  # 256-row mask blocks: two 8-warp CTAs per block
    (2, 2, 1, 130, 190, 64, 128, 64, False, None),  # 8 warps, D 64, batch 2, MQA
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FWD_PIPELINE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_forward_pipeline(cuda_backend_one_seed, case, dtype):
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim = case
    q, k, v, bias = TA._inputs(B, H, Hkv, Nq, Nk, D, dtype, "cpu", seed=Nq * Nk + D, bias_dim=bias_dim)
    dense = TA._random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=Nk, density=0.7)
    m = BlockMask.from_dense(dense, bq, bk, Nq, Nk)
    scale = D ** -0.5
    out, lse = cuda_backend_one_seed.block_sparse_attn_fwd_cuda(q, k, v, m.kv_num_blocks, m.kv_indices, bq, bk,
                                                                causal, scale, bias)
    args = (m.kv_num_blocks, m.kv_indices, bq, bk, causal, scale, bias)
    exp_out, exp_lse = aref.attention(q, k, v, *args)
    base_out, _ = aref.attention(q, k, v, *args, dtype=dtype)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, H, Nq)
    assert not out.isnan().any() and not lse.isnan().any()
    TA._check_close(out, exp_out, base_out, TA.FLOORS[dtype])
    empty = torch.isinf(exp_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all() and (out[empty] == 0).all()
    assert (~empty).any()
    assert (lse[~empty].double() - exp_lse[~empty]).abs().max() < 1e-2


def test_attention_forward_no_blocks_and_empty_queries(cuda_backend):
    """Every count zero (nothing listed: out = 0, lse = -inf, no tile loaded) and Nq = 0 (no launch)."""
    q, k, v, _ = TA._inputs(1, 2, 2, 70, 90, 64, torch.bfloat16, "cpu", seed=4)
    m = BlockMask.from_dense(torch.zeros(1, 2, 2, 2, dtype=torch.bool), 64, 64, 70, 90)
    op = cuda_backend.block_sparse_attn_fwd_cuda
    out, lse = op(q, k, v, m.kv_num_blocks, m.kv_indices, 64, 64, True, 0.125, None)
    assert (out == 0).all() and (lse == -math.inf).all()
    num0, idx0 = torch.zeros(1, 2, 0, dtype=torch.int32), torch.zeros(1, 2, 0, 2, dtype=torch.int32)
    out, lse = op(q[:, :, :0].contiguous(), k, v, num0, idx0, 64, 64, False, 0.125, None)
    assert out.shape == (1, 2, 0, 64) and lse.shape == (1, 2, 0)


BWD_CASES = [  # (B, H, Hkv, Nq, Nk, D, block_q, block_k, causal, bias_dim, with_dlse)
    (1, 4, 2, 100, 133, 64, 64, 64, False, 3, True),  # GQA, ragged, per-head bias, gradient through lse
    (1, 2, 1, 150, 80, 128, 128, 64, True, 2, False),  # MQA, head dim 128, bottom-right causal with Nq > Nk
    (1, 2, 2, 70, 140, 64, 64, 128, True, None, True),  # Nq < Nk causal, mixed block sizes, no bias
]
# several 64-row tiles per walk on both sides (the cp.async double buffers turn over); one seed per case
BWD_PIPELINE_CASES = [
    (1, 2, 1, 140, 170, 128, 128, 128, True, 2, False),  # GQA group of 2, causal with Nk > Nq, D 128
    (1, 2, 1, 130, 333, 64, 64, 256, False, 3, True),  # MQA, 6 key tiles, 256-key mask blocks, ragged
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_backward(cuda_backend, case, dtype):
    _check_backward(cuda_backend, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BWD_PIPELINE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_attention_backward_pipeline(cuda_backend_one_seed, case, dtype):
    _check_backward(cuda_backend_one_seed, case, dtype)


def _check_backward(cuda_backend, case, dtype):
    B, H, Hkv, Nq, Nk, D, bq, bk, causal, bias_dim, with_dlse = case
    scale = D ** -0.5
    q, k, v, bias = TA._inputs(B, H, Hkv, Nq, Nk, D, dtype, "cpu", seed=Nq + D, bias_dim=bias_dim)
    dense = TA._random_dense(B, H, math.ceil(Nq / bq), math.ceil(Nk / bk), seed=Nk)
    m = BlockMask.from_dense(dense, bq, bk, Nq, Nk)
    qn, qi = m.transpose()
    num, idx = m.kv_num_blocks, m.kv_indices
    out, lse = aref.fwd(q, k, v, num, idx, bq, bk, causal, scale, bias)
    assert lse.isinf().any()  # the empty rows are exercised
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(q.shape, generator=g).to(dtype)
    glse = torch.randn(lse.shape, generator=g) if with_dlse else None
    dq, dk, dv, dbias = cuda_backend.block_sparse_attn_bwd_cuda(gout, q, k, v, out, lse, glse, num, idx, qn, qi, bq,
                                                                bk, causal, scale, bias)
    got = {"dq": dq, "dk": dk, "dv": dv}
    if bias is not None:
        got["dbias"] = dbias if bias_dim == 3 else dbias.sum(1)
    else:
        assert dbias.numel() == 0

    def grads(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        if bias is not None:
            leaves.append(bias.detach().to(dt).requires_grad_(True))
        rb = leaves[3] if bias is not None else None
        ro, rl = aref.attention(*leaves[:3], num, idx, bq, bk, causal, scale, rb, dtype=dt)
        loss = (ro * gout.to(dt)).sum()
        if glse is not None:
            loss = loss + (torch.where(rl.isinf(), 0, rl) * glse.to(dt)).sum()
        return dict(zip(("dq", "dk", "dv", "dbias"), torch.autograd.grad(loss, leaves)))

    exp, base = grads(torch.float64), grads(dtype)
    floor = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for name, t in got.items():
        assert not t.isnan().any(), name
        assert t.shape == exp[name].shape, name
        TA._check_close(t, exp[name], base[name], floor)


def test_attention_rejects_bad_input(cuda_backend):
    q, k, v, _ = TA._inputs(1, 2, 2, 64, 64, 64, torch.float16, "cpu")
    m = BlockMask.from_dense(torch.ones(1, 1, 1, 1, dtype=torch.bool), 64, 64, 64, 64)
    op = cuda_backend.block_sparse_attn_fwd_cuda
    with pytest.raises(RuntimeError, match="head dim"):
        op(q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(), m.kv_num_blocks,
           m.kv_indices, 64, 64, False, 1.0, None)
    with pytest.raises(RuntimeError, match="kv_indices"):
        op(q, k, v, m.kv_num_blocks, m.kv_indices.long(), 64, 64, False, 1.0, None)
    with pytest.raises(RuntimeError, match="block_q"):
        op(q, k, v, m.kv_num_blocks, m.kv_indices, 48, 64, False, 1.0, None)


@pytest.mark.parametrize("Nq,Nk,bq,bk", [(100, 150, 64, 64), (200, 300, 128, 128)])
def test_attention_forward_bound_checks_block_indices(cuda_backend, Nq, Nk, bq, bk):
    """A mask whose values were never validated (``check_mask=False``, ``torch.compile``): block
    counts past the number of key blocks (or negative) are clamped and out-of-range indices
    (negative, huge) skipped by the kernel itself -- never read (ASan reports any read out of
    bounds) -- and the result is attention over the listed valid blocks (issue 15). Both CTA
    shapes (64 rows for 64-row mask blocks, 128 rows for 128-row blocks)."""
    B, H, D = 1, 2, 64  # 2 query blocks, 3 key blocks
    q, k, v, _ = TA._inputs(B, H, H, Nq, Nk, D, torch.float16, "cpu", seed=11)
    idx = torch.tensor([[[1, -1, 100000000], [2, -100000000, 0]],
                        [[0, 5, 2], [-7, 1, 2]]], dtype=torch.int32)[None]
    num = torch.tensor([[[1000, 2], [-3, 3]]], dtype=torch.int32)
    valid = torch.zeros(B, H, 2, 3, dtype=torch.bool)  # what the kernel must attend to
    valid[0, 0, 0, 1] = valid[0, 0, 1, 2] = True  # counts clamped to 3 / 2; -1, 1e8, -1e8 skipped
    valid[0, 1, 1, 1] = valid[0, 1, 1, 2] = True  # count -3 -> no block; -7 skipped
    m = BlockMask.from_dense(valid, bq, bk, Nq, Nk)
    scale = D ** -0.5
    out, lse = cuda_backend.block_sparse_attn_fwd_cuda(q, k, v, num, idx, bq, bk, False, scale, None)
    exp_out, exp_lse = aref.attention(q, k, v, m.kv_num_blocks, m.kv_indices, bq, bk, False, scale, None)
    base_out, _ = aref.attention(q, k, v, m.kv_num_blocks, m.kv_indices, bq, bk, False, scale, None,
                                 dtype=torch.float16)
    assert not out.isnan().any() and not lse.isnan().any()
    TA._check_close(out, exp_out, base_out, TA.FLOORS[torch.float16])
    empty = torch.isinf(exp_lse)
    assert empty[0, 1, :bq].all() and torch.equal(torch.isinf(lse), empty) and (out[empty] == 0).all()
