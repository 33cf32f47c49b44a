"""Fuzzing the quantized KV cache and fused decode attention: random layouts, bit widths, append
sequences and query counts give the float64 reference answer (or a clear error), never NaN."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokops
from tokops.kv import QuantizedKVCache, decode_attention, decode_attention_reference

from backends import runnable_backends

BACKENDS = runnable_backends()


@st.composite
def cache_inputs(draw):
    backend, device = draw(st.sampled_from(BACKENDS))
    mode = draw(st.sampled_from(["int", "int", "fp8"]))
    bits_k, bits_v = draw(st.sampled_from([8, 4, 2])), draw(st.sampled_from([8, 4, 2]))
    group_size = draw(st.sampled_from([16, 32]))
    key_axis, value_axis = draw(st.sampled_from([-2, -1])), draw(st.sampled_from([-1, -2]))
    residual = draw(st.sampled_from([0, 8, 32]))
    B, h_kv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = h_kv * draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([16, 32, 64]))
    chunks = draw(st.lists(st.integers(1, 45), min_size=1, max_size=4))
    nq = draw(st.integers(1, 8))
    return (backend, device, mode, bits_k, bits_v, group_size, key_axis, value_axis, residual, B, h_kv, H, D,
            chunks, nq, draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cache_inputs())
def test_decode_attention_fuzz(args):
    (backend, device, mode, bits_k, bits_v, G, key_axis, value_axis, residual, B, h_kv, H, D, chunks, nq,
     seed) = args
    try:
        cache = QuantizedKVCache(bits_k, bits_v, group_size=G, residual=residual, mode=mode, key_axis=key_axis,
                                 value_axis=value_axis)
    except ValueError as e:  # e.g. group_size * bits not a multiple of 32 for token-grouped keys
        assert "group_size" in str(e) or "axis" in str(e), e
        return
    g = torch.Generator().manual_seed(seed)
    total = sum(chunks)
    k = torch.randn(B, h_kv, total, D, generator=g) * 2 + torch.rand(B, h_kv, 1, D, generator=g)
    v = torch.randn(B, h_kv, total, D, generator=g)
    if (key_axis == -1 or value_axis == -1) and mode == "int" and D % G:
        try:  # channel groups need G | D: a clear error at the first append
            cache.append(k.to(device), v.to(device))
        except ValueError as e:
            assert "group_size" in str(e), e
            return
        raise AssertionError("group_size that does not divide D was accepted")
    i = 0
    for n in chunks:
        cache.append(k[:, :, i:i + n].contiguous().to(device), v[:, :, i:i + n].contiguous().to(device))
        i += n
    assert len(cache) == total
    q = torch.randn(B, H, nq, D, generator=g).to(device)
    out, mass = decode_attention(q, cache, return_mass=True, backend=backend)
    exp_out, _, exp_mass = decode_attention_reference(q, cache)
    assert out.shape == (B, H, nq, D) and mass.shape == (B, H, total)
    assert not out.isnan().any() and not mass.isnan().any()
    torch.testing.assert_close(out.cpu().double(), exp_out.cpu(), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(mass.cpu().double(), exp_mass.cpu(), atol=2e-4, rtol=2e-4)
    # every query's probabilities sum to one over the tokens it sees
    torch.testing.assert_close(mass.sum(-1).cpu().double(), torch.full((B, H), float(min(nq, total)),
                                                                       dtype=torch.float64), atol=1e-3, rtol=1e-4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.data())
def test_cache_bad_inputs_fuzz(data):
    cache = QuantizedKVCache(4, 4, group_size=16, residual=8)
    cache.append(torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32))
    which = data.draw(st.sampled_from(["k_dtype", "k_heads", "v_shape", "k_ndim", "q_dim", "q_heads", "nq",
                                       "q_dtype", "bits", "group", "mode"]))
    calls = {
        "k_dtype": lambda: cache.append(torch.randn(1, 2, 3, 32).double(), torch.randn(1, 2, 3, 32).double()),
        "k_heads": lambda: cache.append(torch.randn(1, 3, 3, 32), torch.randn(1, 3, 3, 32)),
        "v_shape": lambda: cache.append(torch.randn(1, 2, 3, 32), torch.randn(1, 2, 4, 32)),
        "k_ndim": lambda: cache.append(torch.randn(2, 3, 32), torch.randn(2, 3, 32)),
        "q_dim": lambda: decode_attention(torch.randn(1, 2, 1, 16), cache),
        "q_heads": lambda: decode_attention(torch.randn(1, 3, 1, 32), cache),
        "nq": lambda: decode_attention(torch.randn(1, 2, 9, 32), cache),
        "q_dtype": lambda: decode_attention(torch.randn(1, 2, 1, 32).to(torch.int32), cache),
        "bits": lambda: QuantizedKVCache(3, 4),
        "group": lambda: QuantizedKVCache(4, 4, group_size=24),
        "mode": lambda: QuantizedKVCache(4, 4, mode="int3"),
    }
    try:
        calls[which]()
    except (ValueError, TypeError) as e:
        assert str(e)
    else:
        raise AssertionError(f"{which}: bad input accepted")
    assert len(cache) == 20  # a rejected append leaves the cache as it was
    tokops.kv.decode_attention(torch.randn(1, 2, 1, 32), cache)
