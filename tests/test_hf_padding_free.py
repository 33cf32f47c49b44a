"""transformers cache with left-padded prompts stored without the padding (issue 14 item 3/4):
``TokopsQuantizedCache.set_padding(attention_mask)`` makes each layer a ragged cache."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokops.kv.hf import TokopsQuantizedCache  # noqa: E402
# the tiny random Llama, the test cache and the left-padded batches of the serving tests
from test_hf_cache_serving import _cache, _left_padded, llama  # noqa: E402, F401


@pytest.mark.parametrize("fused", [False, True])
def test_padding_free_generate_matches_full_precision(llama, fused):
    lens = [21, 9, 14]
    ids, mask = _left_padded(lens)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    ref = llama.generate(ids, cache=transformers.DynamicCache(config=llama.config), **kw)
    llama.set_attn_implementation("tokops_kv" if fused else "sdpa")
    try:
        cache, padded = _cache(fused), _cache(fused)
        cache.set_padding(mask)
        out = llama.generate(ids, cache=cache, **kw)
        llama.generate(ids, cache=padded, **kw)
    finally:
        llama.set_attn_implementation("sdpa")
    assert out.shape == ref.shape
    for row in range(ids.shape[0]):  # token for token, every row
        assert torch.equal(out[row], ref[row]), row
    kv = cache.layers[0].kv
    assert not kv.is_uniform and cache.layers[0].padding_free
    # each row holds exactly its real tokens: prompt + generated (the last generated token is not fed back)
    assert kv.lengths().tolist() == [m + 11 for m in lens]
    assert int(kv.tensors()["n_quant"].max()) > 0
    assert cache.memory_bytes() < padded.memory_bytes()  # the padding is not stored


def test_padding_free_beam_search_matches_full_precision(llama):
    ids, mask = _left_padded([17, 11], seed=2)
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=3,
              num_return_sequences=2)
    ref = llama.generate(ids, cache=transformers.DynamicCache(config=llama.config), **kw)
    cache = _cache()
    cache.set_padding(mask)
    out = llama.generate(ids, cache=cache, **kw)
    assert out.shape == ref.shape and torch.equal(out, ref)
    kv = cache.layers[0].kv
    assert kv._shape[0] == 6 and not kv.is_uniform


def test_padding_free_crop_per_row(llama):
    """crop(-n) drops the last n tokens of every row; logits afterwards equal a cache that never saw them."""
    ids, mask = _left_padded([19, 12], seed=3)
    nxt = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(7))
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        a, b = _cache(), _cache()
        for c in (a, b):
            c.set_padding(mask)
            llama(ids, attention_mask=mask, cache=c)
        llama(nxt[:, :5], attention_mask=full_mask[:, :-1], cache=a)  # a draft of 5 tokens
        a.crop(-3)
        assert a.get_seq_length() == b.get_seq_length() + 2
        llama(nxt[:, :2], attention_mask=full_mask[:, :-4], cache=b)  # b sees only the 2 accepted
        assert torch.equal(a.layers[0].kv.lengths(), b.layers[0].kv.lengths())
        la = llama(nxt[:, 2:3], attention_mask=full_mask[:, :-3], cache=a).logits
        lb = llama(nxt[:, 2:3], attention_mask=full_mask[:, :-3], cache=b).logits
    torch.testing.assert_close(la, lb, atol=2e-3, rtol=0)


def test_set_padding_errors():
    c = _cache(key_axis=-1, value_axis=-1, budget=40)
    with pytest.raises(ValueError, match="budget"):
        c.set_padding(torch.ones(2, 5))
    c = _cache()
    with pytest.raises(ValueError, match="2-D"):
        c.set_padding(torch.ones(5))
    c = TokopsQuantizedCache(bits_k=8, bits_v=8)
    with pytest.raises(ValueError, match="num_layers"):
        c.set_padding(torch.ones(2, 5))


@pytest.mark.parametrize("padding_free", [False, True])
def test_fused_layer_decode_step_no_host_sync(padding_free):
    """One fused decode step of a layer (update + the tokops_kv attention) reads nothing on the host:
    a padding-free layer ignores the padding mask, a uniform one gets no mask from transformers."""
    from nosync import no_host_sync
    from tokops.kv.hf import tokops_kv_attention_forward

    cache = _cache(fused=True, key_axis=-1, value_axis=-1, checks="deferred")
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 11, 16, generator=g), torch.randn(3, 2, 11, 16, generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    if padding_free:
        layer.set_padding(mask)
    layer.update(k, v)
    for step in range(10):
        k1, v1 = torch.randn(3, 2, 1, 16, generator=g), torch.randn(3, 2, 1, 16, generator=g)
        q = torch.randn(3, 4, 1, 16, generator=g)
        amask = torch.zeros(3, 1, 1, 12 + step, dtype=torch.bool) if padding_free else None  # ignored
        with no_host_sync():
            kk, vv = layer.update(k1, v1)
            out, _ = tokops_kv_attention_forward(None, q, kk, vv, amask, scaling=0.25)
        assert out.shape == (3, 1, 4, 16) and torch.isfinite(out).all()
