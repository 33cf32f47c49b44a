"""Issue 12 item 4: no host sync in the per-layer paths of sparse attention, the HF attention patch and
the merge ops (``no_host_sync()`` on CPU tensors, default arguments), and ``torch.compile(fullgraph=True)``
over one ToMe-patched and one sparse-attention-patched encoder layer with the eager result.

Mask values are validated where the mask is built: builder masks are known valid; a hand-built CSR
mask is checked once (its first checked use, or ``BlockMask.validate()``), not per call."""

import pytest
import torch

import tokops
import tokops.attention as tka
import tokops.merge as tkm
from nosync import HostSyncError, no_host_sync
from tokops.attention import BlockMask


def _qkv(B=2, H=2, Hkv=1, Nq=40, Nk=40, D=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _grads(q, k, v, mask, **kw):
    out = tka.block_sparse_attention(q, k, v, mask, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))


# --------------------------------------------------------------------------- sparse attention
@pytest.mark.parametrize("builder", ["causal", "window", "topk", "retrieval", "none"])
def test_block_sparse_forward_backward_builder_mask_no_sync(builder):
    q, k, v = _qkv(grad=True)
    causal = builder in ("causal", "window", "retrieval")
    with no_host_sync():
        mask = {"causal": lambda: tka.causal_block_mask(40, block_q=16),
                "window": lambda: tka.sliding_window_mask(40, 16, 2, block_q=16),
                "topk": lambda: tka.topk_block_mask(q.detach(), k.detach(), 0.5, block_q=16, causal=True),
                "retrieval": lambda: tka.retrieval_heads_mask(2, [1], 40, 16, 2, block_q=16),
                "none": lambda: None}[builder]()
        got = _grads(q, k, v, mask, causal=causal, block_q=None if mask is not None else 16)
    # the same call with the values read and checked (a copy of the tensors is not known valid)
    if mask is not None:
        assert tka.is_known_valid(mask)
        copy = mask._replace(kv_num_blocks=mask.kv_num_blocks.clone(), kv_indices=mask.kv_indices.clone())
        assert not tka.is_known_valid(copy)
    else:
        copy = None
    exp = _grads(q, k, v, copy, causal=causal, block_q=None if copy is not None else 16)
    for a, b in zip(got, exp):
        assert torch.equal(a, b)


def test_attention_with_key_mass_no_sync():
    q, k, v = _qkv(Nq=40, Nk=56)
    bias = torch.randn(2, 56)
    with no_host_sync():
        mask = tka.causal_block_mask(40, 56, block_q=16)
        out, mass = tka.attention_with_key_mass(q, k, v, mask, causal=True, key_bias=bias)
        out2, mass2 = tka.attention_with_key_mass(q, k, v, key_bias=bias, block_q=16)
    assert torch.isfinite(mass).all() and torch.isfinite(mass2).all()
    torch.testing.assert_close(mass.sum(-1), torch.full_like(mass.sum(-1), 40.0))


@pytest.mark.parametrize("nq,causal,block_k", [(1, False, 128), (3, True, 16), (20, True, 32)])
def test_decode_attention_with_key_mass_no_sync_same_result(nq, causal, block_k):
    q, k, v = _qkv(Nq=nq, Nk=70, Hkv=2)
    bias = torch.randn(2, 2, 70)
    with no_host_sync():
        out, mass = tka.decode_attention_with_key_mass(q, k, v, causal=causal, key_bias=bias, block_k=block_k)
    # the mask the decode path writes directly is what the builder gives (same values, same result)
    bq = max(16, 1 << (nq - 1).bit_length())
    full = tka.full_block_mask(nq, 70, block_q=bq, block_k=block_k)
    eo, em = tka.attention_with_key_mass(q, k, v, full, causal=causal, key_bias=bias, check_mask=False)
    assert torch.equal(out, eo) and torch.equal(mass, em)


def test_decode_attention_with_key_mass_sorts_nothing():
    """The decode step writes its mask and transpose directly: no sort (argsort) and no mask rebuild."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(Nq=1, Nk=300)
    with Ops():
        tka.decode_attention_with_key_mass(q, k, v, block_k=64)
    assert not [n for n in seen if n in ("aten::sort", "aten::argsort", "aten::scatter")], seen


def test_decode_attention_bad_block_k_still_raises():
    q, k, v = _qkv(Nq=1, Nk=70)
    with pytest.raises(ValueError, match="block_k"):
        tka.decode_attention_with_key_mass(q, k, v, block_k=24)


# --------------------------------------------------------------------------- mask validation: once, not per call
def _hand_csr(bad=None):
    """A hand-built (B=1, H=2) CSR mask for 40 tokens, block 16 (3 x 3 blocks), indices unsorted."""
    num = torch.tensor([[[1, 2, 3]]], dtype=torch.int32).expand(1, 2, 3).contiguous()
    idx = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]], dtype=torch.int32).expand(1, 2, 3, 3).contiguous()
    if bad == "repeat":
        idx[0, 0, 2, 1] = 2
    if bad == "range":
        idx[0, 1, 1, 0] = 7
    return BlockMask(num, idx, 16, 16, 40, 40)


def test_hand_built_mask_checked_once_then_no_sync():
    q, k, v = _qkv()
    m = _hand_csr()
    assert not tka.is_known_valid(m)
    with pytest.raises(HostSyncError):  # first checked use reads the values (one sync)
        with no_host_sync():
            tka.block_sparse_attention(q, k, v, m)
    first = tka.block_sparse_attention(q, k, v, m)
    assert tka.is_known_valid(m)
    with no_host_sync():
        again = tka.block_sparse_attention(q, k, v, m)
    assert torch.equal(first, again)
    # check_mask=False never reads: the mask runs as its canonical set (same attention)
    with no_host_sync():
        unchecked = tka.block_sparse_attention(q, k, v, _hand_csr(), check_mask=False)
    torch.testing.assert_close(unchecked, first, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [("repeat", "listed twice"), ("range", "mask.kv_indices out of range")])
def test_hand_built_bad_mask_raises_on_first_use_and_on_validate(bad, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        tka.block_sparse_attention(q, k, v, _hand_csr(bad))
    with pytest.raises(ValueError, match=match):
        _hand_csr(bad).validate()
    m = _hand_csr(bad)
    with pytest.raises(ValueError, match=match):  # a failed check never marks the mask
        m.validate()
    assert not tka.is_known_valid(m)


def test_validate_once_up_front():
    q, k, v = _qkv()
    m = _hand_csr().validate()
    assert tka.is_known_valid(m)
    with no_host_sync():
        tka.block_sparse_attention(q, k, v, m)
        tka.attention_with_key_mass(q, k, v, m)


def test_known_valid_mark_follows_the_tensors():
    q, k, v = _qkv()
    m = tka.causal_block_mask(40, block_q=16)
    # expand and stack_heads keep the mark (views / concatenations of known-valid masks)
    assert tka.is_known_valid(m.expand(2, 2))
    assert tka.is_known_valid(tka.stack_heads([m, tka.full_block_mask(40, block_q=16)]))
    h = _hand_csr()
    one_head = h._replace(kv_num_blocks=h.kv_num_blocks[:, :1], kv_indices=h.kv_indices[:, :1])
    assert not tka.is_known_valid(tka.stack_heads([m, one_head]))
    # replacing a tensor drops it
    bad = m._replace(kv_indices=torch.full_like(m.kv_indices, 1))
    assert not tka.is_known_valid(bad)
    with pytest.raises(ValueError, match="listed twice"):
        tka.block_sparse_attention(q, k, v, bad)
    # an in-place edit drops it (version counter)
    m2 = tka.full_block_mask(40, block_q=16)
    m2.kv_indices[0, 0, 1, 1] = 0
    assert not tka.is_known_valid(m2)
    with pytest.raises(ValueError, match="listed twice"):
        tka.block_sparse_attention(q, k, v, m2)


def test_builder_masks_in_inference_mode_are_known_valid():
    q, k, v = _qkv()
    with torch.inference_mode():
        m = tka.causal_block_mask(40, block_q=16)
        assert tka.is_known_valid(m)
        with no_host_sync():
            out = tka.block_sparse_attention(q, k, v, m, causal=True)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- merge ops
def test_tome_layer_merge_unmerge_proportional_attention_no_sync():
    """One ToMe layer: attention with log(size) key bias, bipartite matching on the keys, size-weighted
    merge, and the unmerge back to the input length -- the per-layer path of tokops.patch.tome."""
    g = torch.Generator().manual_seed(3)
    B, N, H, D = 2, 33, 2, 16
    x = torch.randn(B, N, H * D, generator=g)
    size = torch.ones(B, N, 1)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    with no_host_sync():
        ctx = tka.block_sparse_attention(q, k, v, key_bias=size[..., 0].log(), block_q=16)
        m = tkm.bipartite_soft_matching(k.mean(1), 6, class_token=True)
        xm, size2 = tkm.merge_wavg(m, x + ctx.transpose(1, 2).reshape(B, N, H * D), size)
        q2, k2, v2 = (t[:, :, :m.n_out] for t in (q, k, v))
        ctx2 = tka.block_sparse_attention(q2, k2, v2, key_bias=size2[..., 0].log(), block_q=16)
        back = tkm.unmerge(m, xm + ctx2.transpose(1, 2).reshape(B, m.n_out, H * D))
    assert back.shape == (B, N, H * D) and m.n_out == N - 6
    assert torch.equal(size2.sum(1), torch.full((B, 1), float(N)))


def test_tome_length_safety_unpadded_no_sync():
    metric = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    with no_host_sync():
        m = tkm.bipartite_soft_matching(metric, 0.4, class_token=True, min_keep=30)
    assert m.n_out == 30


def test_padded_matching_has_its_one_documented_sync():
    metric = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 12:] = False
    with pytest.raises(HostSyncError):  # the padded output length depends on the per-row counts
        with no_host_sync():
            tkm.bipartite_soft_matching(metric, 4, valid=valid)
    m = tkm.bipartite_soft_matching(metric, 4, valid=valid)
    assert m.n_out == 16 and m.r == 4 and m.valid.sum(1).tolist() == [16, 8]


def test_prune_scatter_back_no_sync_and_user_index_checked_once():
    x = torch.randn(2, 12, 4)
    with no_host_sync():
        kept, idx = tkm.prune_topk(x, x.sum(-1), 5, protect=1)
        back = tkm.scatter_back(kept, idx, 12)
    assert torch.equal(back.gather(1, idx[..., None].expand(2, 5, 4)), kept)
    # kept_idx of a 12-token prune is not known to fit in 6 tokens: checked (and here wrong)
    with pytest.raises(ValueError, match=r"kept_idx must hold token indices in \[0, N=6\)"):
        tkm.scatter_back(kept, idx.clamp_min(6), 6)
    user = torch.tensor([[0, 3, 5, 7, 9], [1, 2, 4, 6, 11]])
    with pytest.raises(HostSyncError):  # a hand-made index tensor is read on its first use
        with no_host_sync():
            tkm.scatter_back(kept, user, 12)
    first = tkm.scatter_back(kept, user, 12)
    with no_host_sync():  # then known valid while unchanged
        assert torch.equal(tkm.scatter_back(kept, user, 12), first)
    user[0, 0] = 12  # an in-place edit is seen
    with pytest.raises(ValueError, match="kept_idx"):
        tkm.scatter_back(kept, user, 12)


# --------------------------------------------------------------------------- transformers patches
transformers = pytest.importorskip("transformers")
import tokops.patch as tp  # noqa: E402


def _bert(layers=1, seed=0, minilm=False, attn="sdpa"):
    torch.manual_seed(seed)
    if minilm:  # all-MiniLM-L6-v2's layer shape (hidden 384, 12 heads, intermediate 1536)
        cfg = transformers.BertConfig(vocab_size=120, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                                      intermediate_size=1536, max_position_embeddings=128)
    else:
        cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=128)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval().float()
    m.set_attn_implementation(attn)
    return m


def _pad_mask4(B, N, lens):
    m = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b, n in enumerate(lens):
        m[b, ..., :n] = True
    return m


@pytest.mark.parametrize("policy", [tp.SparsePolicy("topk", keep=0.5, block=16), tp.SparsePolicy("full", block=16),
                                    tp.SparsePolicy("window", window=16, sinks=2, block=16)])
def test_hf_sparse_attention_call_no_sync(policy):
    model = tp.sparse_attention(_bert(), policy)
    sa = model.encoder.layer[0].attention.self
    h = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(1))
    mask = _pad_mask4(2, 50, [50, 31])
    with torch.no_grad():
        with no_host_sync():
            out = sa(h, attention_mask=mask)[0]
            out_nomask = sa(h)[0]
        assert torch.equal(out, sa(h, attention_mask=mask)[0])
    assert torch.isfinite(out).all() and torch.isfinite(out_nomask).all()


def test_hf_tome_encoder_forward_no_sync():
    """A ToMe-patched encoder forward (no padding mask) has no host sync at all."""
    for kw in ({}, dict(r=4, min_tokens=0, max_merged=None, prop_attn=True)):
        model = tp.tome(_bert(layers=2), **kw)
        h = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), no_host_sync():
            out = model.encoder(h).last_hidden_state
        assert out.shape == h.shape and model._tome_state.tokens_per_layer[-1] < 70


# --------------------------------------------------------------------------- torch.compile, no graph break
def _compiled_equals_eager(fn, *args, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        eager = fn(*args, **kwargs)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    torch._dynamo.reset()
    return eager, compiled


@pytest.mark.parametrize("kw", [dict(r=5, min_tokens=0, max_merged=None, prop_attn=True), {}],
                         ids=["plain-tome", "text-defaults"])
def test_compile_tome_bert_layer_fullgraph(kw):
    """One ToMe-patched MiniLM-shaped BERT encoder layer (merge + proportional attention + unmerge)."""
    model = tp.tome(_bert(layers=1, minilm=True), **kw)
    h = torch.randn(2, 70, 384, generator=torch.Generator().manual_seed(4))
    eager, compiled = _compiled_equals_eager(lambda x: model.encoder(x).last_hidden_state, h)
    assert model._tome_state.tokens_per_layer[-1] < 70  # it merged
    assert torch.equal(eager, compiled)


def test_compile_tome_vit_layer_fullgraph():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    vit = tp.tome(transformers.ViTModel(cfg, add_pooling_layer=False).eval(), 3)
    layer = tp.tome.__globals__["_vit_layers"](vit)[0]
    h = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(5))
    eager, compiled = _compiled_equals_eager(lambda x: layer(x), h)
    assert eager.shape == (2, 14, 64) and torch.equal(eager, compiled)


def test_compile_sparse_attention_bert_layer_fullgraph():
    model = tp.sparse_attention(_bert(), tp.SparsePolicy("topk", keep=0.5, block=16))
    layer = model.encoder.layer[0]
    h = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(6))
    mask = _pad_mask4(2, 50, [50, 31])
    eager, compiled = _compiled_equals_eager(lambda x, m: layer(x, attention_mask=m)[0], h, mask)
    assert torch.equal(eager, compiled)


# --------------------------------------------------------------------------- on a GPU: CUDA's own sync check
@pytest.mark.cuda
def test_gpu_per_layer_paths_do_not_synchronize():
    """On a GPU (auto = Triton), after one warm-up call (Triton compiles/autotunes), the same paths run
    under ``torch.cuda.set_sync_debug_mode("error")``, which also catches host-to-device copies that
    synchronize (invisible to ``no_host_sync()`` on CPU tensors).  Not run without a GPU."""
    q, k, v = (t.half().cuda().requires_grad_(True) for t in _qkv(Nq=256, Nk=256, D=64, Hkv=2))
    x = torch.randn(2, 65, 64, device="cuda", dtype=torch.half)

    def step():
        m = tka.topk_block_mask(q.detach(), k.detach(), 0.5, block_q=64, causal=True)
        out = tka.block_sparse_attention(q, k, v, m, causal=True)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        tka.attention_with_key_mass(q, k, v, tka.causal_block_mask(256, block_q=64), causal=True)
        tka.decode_attention_with_key_mass(q[:, :, -1:].detach(), k.detach(), v.detach())
        mt = tkm.bipartite_soft_matching(x, 16, class_token=True)
        y, size = tkm.merge_wavg(mt, x)
        tkm.unmerge(mt, y)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
