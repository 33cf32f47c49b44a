"""Serving features of the transformers cache (issue 14, item 3): ``QuantizedKVCache.truncate`` /
``crop`` (speculative rollback), beam search, batched left-padded ``generate``, the ``cache=`` argument."""

import pytest
import torch

from tokops.kv import QuantizedKVCache, decode_attention, decode_attention_reference

transformers = pytest.importorskip("transformers")
from tokops.kv.hf import TokopsQuantizedCache  # noqa: E402


def _kv(B, Hk, n, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hk, n, D, generator=g), torch.randn(B, Hk, n, D, generator=g)


def _append(cache, k, v, chunks, pins=None):
    i = 0
    for n in chunks:
        imp = None if pins is None else pins[i:i + n]
        cache.append(k[:, :, i:i + n], v[:, :, i:i + n], important=imp)
        i += n


def _state(c):
    return dict(n_quant=c.n_quant, n_res=c.n_res, len=len(c), pinned=c.n_pinned, seq=c.seq_length)


def _by_position(c):
    """Dequantized k, v sorted by token position (store order differs from positions with pins)."""
    k, v = c.dequantized(torch.float32)
    order = c.positions()[0, 0].argsort()
    return k[:, :, order], v[:, :, order], c.positions()[0, 0][order]


CONFIGS = [dict(bits_k=8, bits_v=4, key_axis=-2, value_axis=-1), dict(bits_k=4, bits_v=4, key_axis=-1, value_axis=-1),
           dict(mode="fp8")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["int-kchan", "int-tok", "fp8"])
@pytest.mark.parametrize("pinned", [False, True])
def test_truncate_is_exact_and_matches_a_fresh_cache(cfg, pinned):
    G, R, D = 8, 5, 16
    g = torch.Generator().manual_seed(3)
    for trial in range(6):
        M = int(torch.randint(1, 60, (1,), generator=g))
        L = int(torch.randint(0, M + 1, (1,), generator=g))
        chunks, left = [], M
        while left:
            chunks.append(min(left, int(torch.randint(1, 12, (1,), generator=g))))
            left -= chunks[-1]
        pins = (torch.rand(M, generator=g) < 0.15) if pinned else None
        k, v = _kv(2, 2, M, D, seed=trial)
        c = QuantizedKVCache(group_size=G, residual=R, **cfg)
        _append(c, k, v, chunks, pins)
        kb, vb, pb = _by_position(c)
        c.truncate(L)
        fresh = QuantizedKVCache(group_size=G, residual=R, **cfg)
        _append(fresh, k[:, :, :L], v[:, :, :L], [L] if L else [], None if pins is None else pins[:L])
        # the layout of a cache that only ever saw the first L tokens
        assert _state(c) == _state(fresh), (M, L, chunks)
        ka, va, pa = _by_position(c)
        assert torch.equal(pa, torch.arange(L))
        # the removed tokens are gone; every kept token keeps exactly the values attention used for it
        assert torch.equal(ka, kb[:, :, :L]) and torch.equal(va, vb[:, :, :L])
        # whole groups below the new n_quant are bitwise those of the fresh cache (same tokens, same groups)
        if not pinned and c.initialized and fresh.initialized:
            kq, _ = c.dequantized(torch.float32)
            kf, _ = fresh.dequantized(torch.float32)
            assert torch.equal(kq[:, :, :c.n_quant], kf[:, :, :c.n_quant])
        # the cache keeps working: append past the cut, decode against the float64 reference
        k2, v2 = _kv(2, 2, 23, D, seed=100 + trial)
        _append(c, k2, v2, [7, 1, 15])
        _append(fresh, k2, v2, [7, 1, 15])
        assert _state(c) == _state(fresh)
        q = torch.randn(2, 4, 1, D, generator=g)
        torch.testing.assert_close(decode_attention(q, c).double(), decode_attention_reference(q, c)[0],
                                   atol=1e-5, rtol=1e-5)


def test_truncate_bad_input_and_eviction_all_or_nothing():
    c = QuantizedKVCache(8, 8, group_size=8, residual=4, key_axis=-1, value_axis=-1, budget=20)
    k, v = _kv(1, 2, 40, 16)
    _append(c, k, v, [30, 10])
    assert c.n_evicted > 0
    with pytest.raises(TypeError, match="length must be an int"):
        c.truncate(3.0)
    with pytest.raises(ValueError, match="length must be >= 0"):
        c.truncate(-1)
    before = (_state(c), *c.dequantized(), c.positions())
    first_res = int(c.positions()[0, 0, c.n_quant])
    with pytest.raises(ValueError, match="after H2O eviction only tokens of the residual window"):
        c.truncate(first_res - 1)
    after = (_state(c), *c.dequantized(), c.positions())
    assert before[0] == after[0] and all(torch.equal(a, b) for a, b in zip(before[1:], after[1:]))
    c.truncate(first_res + 1)  # residual tokens only: allowed
    assert c.seq_length == first_res + 1 and c.n_res == 1 and c.n_quant == before[0]["n_quant"]
    c.truncate(10_000)  # past the end: no-op
    assert c.seq_length == first_res + 1


# --------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _cache(fused=False, **kw):
    kw = dict(dict(bits_k=8, bits_v=8, group_size=8, residual=4, backend="torch"), **kw)
    return TokopsQuantizedCache(2, fused=fused, **kw)


def _left_padded(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        ids[i, n - m:] = torch.randint(3, 96, (m,), generator=g)
        mask[i, n - m:] = 1
    return ids, mask


@pytest.mark.parametrize("fused", [False, True])
def test_batched_left_padded_greedy_generate_matches_full_precision(llama, fused):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if fused and "tokops_kv" not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        # without a registered mask function transformers hands the attention no padding mask at all
        pytest.skip("needs the tokops_kv mask function (registered by tokops.kv.hf on the 'safety' branch)")
    ids, mask = _left_padded([21, 9, 14])
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    ref = llama.generate(ids, cache=transformers.DynamicCache(config=llama.config), **kw)
    llama.set_attn_implementation("tokops_kv" if fused else "sdpa")
    try:
        cache = _cache(fused)
        out = llama.generate(ids, cache=cache, **kw)
    finally:
        llama.set_attn_implementation("sdpa")
    assert out.shape == ref.shape
    for row in range(ids.shape[0]):  # token for token, every row
        assert torch.equal(out[row], ref[row]), row
    assert cache.layers[0].kv.n_quant > 0  # the prompts really are partly quantized
    # and each row equals that prompt generated alone (unpadded)
    for row, m in enumerate([21, 9, 14]):
        alone = llama.generate(ids[row:row + 1, -m:], cache=_cache(), max_new_tokens=12, min_new_tokens=12,
                               do_sample=False)
        assert torch.equal(alone[0, m:], out[row, ids.shape[1]:]), row


def test_beam_search_matches_full_precision(llama):
    ids, mask = _left_padded([17, 11], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=3,
              num_return_sequences=2)
    ref = llama.generate(ids, cache=transformers.DynamicCache(config=llama.config), **kw)
    cache = _cache()
    out = llama.generate(ids, cache=cache, **kw)
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert cache.layers[0].kv._shape[0] == 6 and cache.layers[0].kv.n_quant > 0


def _snapshot(cache):
    return [(_state(c), c._shape, *c.dequantized(), c.positions()) for c in cache.kv_caches()]


def _same(a, b):
    return all(x[:2] == y[:2] and all(torch.equal(s, t) for s, t in zip(x[2:], y[2:])) for x, y in zip(a, b))


def test_cache_batch_methods_and_all_or_nothing():
    cache = _cache()
    k, v = _kv(3, 2, 30, 16)
    for i, layer in enumerate(cache.layers):
        layer.update(k + i, v - i)
    k0 = [c.dequantized()[0] for c in cache.kv_caches()]
    cache.batch_repeat_interleave(2)
    for c, kk in zip(cache.kv_caches(), k0):
        assert torch.equal(c.dequantized()[0], kk.repeat_interleave(2, 0))
    idx = torch.tensor([[5, 0, 0, 3]])[0, ::1]  # a view
    cache.reorder_cache(idx)
    for c, kk in zip(cache.kv_caches(), k0):
        assert torch.equal(c.dequantized()[0], kk.repeat_interleave(2, 0)[idx])
    cache.batch_select_indices(torch.tensor([True, False, False, True]))
    for c, kk in zip(cache.kv_caches(), k0):
        assert torch.equal(c.dequantized()[0], kk.repeat_interleave(2, 0)[idx][[0, 3]])
    k1 = [c.dequantized()[0] for c in cache.kv_caches()]
    strided = torch.tensor([1, 0, 0, 1])[::2]  # (2,) with stride (2,): the kind of index that used to fail
    cache.reorder_cache(strided)
    for c, kk in zip(cache.kv_caches(), k1):
        assert torch.equal(c.dequantized()[0], kk[[1, 0]])
    snap = _snapshot(cache)
    bad = [(lambda: cache.reorder_cache(torch.tensor([0, 2])), ValueError,
            r"beam_idx must hold batch rows in \[0, 2\)"),
           (lambda: cache.reorder_cache(torch.tensor([-1])), ValueError, "beam_idx must hold batch rows"),
           (lambda: cache.reorder_cache(torch.tensor([0.0])), TypeError, "beam_idx must be an integer tensor"),
           (lambda: cache.batch_select_indices(torch.tensor([[0]])), ValueError, "indices must be 1-D"),
           (lambda: cache.batch_select_indices(torch.tensor([True])), ValueError, "bool mask must have 2 entries"),
           (lambda: cache.batch_select_indices(torch.tensor([], dtype=torch.long)), ValueError, "at least one"),
           (lambda: cache.batch_repeat_interleave(0), ValueError, "repeats must be >= 1"),
           (lambda: cache.crop(1.5), TypeError, "tokens_to_remove must be an int")]
    for call, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            call()
        assert _same(snap, _snapshot(cache))


def test_cache_crop_semantics_and_all_or_nothing():
    cache = _cache(key_axis=-1, value_axis=-1, budget=16)
    k, v = _kv(1, 2, 30, 16)
    cache.layers[0].update(k, v)  # layer 0 evicts (30 > budget), layer 1 does not
    cache.layers[1].update(k[:, :, :12], v[:, :, :12])
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match="after H2O eviction"):
        cache.crop(-20)  # fine for layer 1, refused by layer 0: neither changes
    assert _same(snap, _snapshot(cache))
    cache = _cache()
    for layer in cache.layers:
        layer.update(k, v)
    assert cache.is_croppable and cache.get_seq_length() == 30
    cache.crop(0)
    assert cache.get_seq_length() == 30
    cache.crop(-7)
    assert cache.get_seq_length() == 23
    cache.crop(11)  # the legacy absolute crop(max_length)
    assert cache.get_seq_length() == 11
    cache.crop(-100)
    assert cache.get_seq_length() == 0


def test_speculative_rollback_then_continue_matches_uncropped(llama):
    """Run a draft of 5 tokens, crop them, feed the accepted 2: logits equal a cache that never saw the draft."""
    ids = torch.randint(3, 96, (2, 26), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = _cache(), _cache()
        llama(ids[:, :19], cache=a)
        llama(ids[:, :19], cache=b)
        llama(ids[:, 19:24], cache=a)  # draft (crosses a group boundary: 19 -> 24 with G=8, R=4)
        a.crop(-5)
        assert a.get_seq_length() == 19 and _state(a.layers[0].kv) == _state(b.layers[0].kv)
        la = llama(ids[:, 19:21], cache=a).logits
        lb = llama(ids[:, 19:21], cache=b).logits
    torch.testing.assert_close(la, lb, atol=2e-3, rtol=0)


def test_prompt_lookup_decoding_uses_crop_and_matches_greedy(llama):
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(5)).repeat(1, 3)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ref = llama.generate(ids, cache=transformers.DynamicCache(config=llama.config), **kw)
    cache = _cache()
    calls = []
    crop = cache.crop
    cache.crop = lambda n: (calls.append(n), crop(n))[1]
    out = llama.generate(ids, cache=cache, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(out, ref)
    assert any(n < 0 for n in calls), calls  # draft tokens were rejected and rolled back


def test_past_key_values_name_still_works(llama):
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=4, do_sample=False)
    new = llama.generate(ids, cache=_cache(), **kw)
    old = llama.generate(ids, past_key_values=_cache(), **kw)
    assert torch.equal(new, old)
