"""Drop-in parity with facebookresearch/ToMe and hchautran/PiToMe (issue 16).

The originals are not dependencies: the ``_tome_*`` functions below are transcriptions, written for
this project from the originals' documented behaviour (ToMe ``tome/merge.py``
``bipartite_soft_matching`` / ``merge_wavg``, ``tome/patch/timm.py`` ``ToMeBlock`` /
``ToMeAttention`` / ``apply_patch``, ``tome/utils.py`` ``parse_r``), in plain eager torch: the
attention is the dense softmax with ``+ size.log()`` on the logits, the metric is the keys averaged
over heads, the class token is ``model.cls_token is not None`` and the distillation token
``model.dist_token``, the merged layout is ``cat([unm, dst])`` (with a distillation token
``[unm[:1], dst[:1], unm[1:], dst[1:]]``), and the head sees the merged tokens (no unmerge).
Tiny random timm models are built locally (no weight downloads).
"""

import math

import pytest
import torch

import tokops
from tokops.merge import reference as mref

timm = pytest.importorskip("timm")
import tokops.patch as tp  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


# --------------------------------------------------------------------------- transcriptions of ToMe
def _tome_parse_r(num_layers, r):
    """ToMe ``parse_r``: list padded with zeros; ``(r, inflect)``: a linear ramp from
    ``int(r (1 - inflect))`` to ``2 r - that``; int: constant."""
    inflect = 0
    if isinstance(r, list):
        return r + [0] * (num_layers - len(r))
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def _tome_match(metric, r, class_token, distill_token):
    """ToMe bipartite soft matching; returns ``merge(x, mode)``."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge[..., r:, :], edge[..., :r, :]
    dst_idx = node_idx[..., None].gather(-2, src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1).values

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(-2, unm_idx.expand(n, t1 - r, c))
        src = src.gather(-2, src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], 1)
        return torch.cat([unm, dst], 1)

    return merge


def _tome_wavg(merge, x, size):
    size = torch.ones_like(x[..., :1]) if size is None else size
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size


@torch.no_grad()
def _tome_timm(model, px, r, prop_attn=True):
    """A timm ViT patched by ToMe (``apply_patch(model); model.r = r``), transcribed."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    sched = _tome_parse_r(len(model.blocks), r)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(px))))
    size = None
    for blk in model.blocks:
        at = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = at.qkv(h).reshape(B, N, 3, at.num_heads, C // at.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * at.scale
        if size is not None and prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + at.proj(o)
        rr = sched.pop(0)
        if rr > 0:
            x, size = _tome_wavg(_tome_match(k.mean(1), rr, class_token, distill_token), x, size)
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def _vit(seed=0, distilled=False, **kw):
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=7)
    args.update(kw)
    model = cls(**args).eval().float()
    if distilled:  # a trained DeiT's two heads differ; random init would make them equal-ish
        torch.nn.init.normal_(model.head_dist.weight, std=0.5)
    return model


def _px(B=2, seed=1):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "cls": lambda: _vit(),
    "no_cls_avg": lambda: _vit(class_token=False, global_pool="avg"),
    "distilled": lambda: _vit(distilled=True),
}


# --------------------------------------------------------------------------- timm parity
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("r", [8, [16, 4], (8, -1)])
def test_timm_matches_tome(backend_device, name, r):
    """Default tome(model, r) on a timm ViT = ToMe's patch: with and without class token, DeiT's
    distillation token, every r form (before issue 16: class_token=False raised "x must be
    contiguous", the distill token merged (logits off by ~1), r lists/tuples were rejected and the
    default unmerge changed avg-pooled logits)."""
    backend, device = backend_device
    model = MODELS[name]().to(device)
    px = _px().to(device)
    expected = _tome_timm(model, px, r)
    tp.tome(model, r, backend=backend)
    with torch.no_grad():
        got = model(px)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    st = model._tome_state
    assert (st.class_token, st.distill_token) == (name != "no_cls_avg", name == "distilled")
    assert st.unmerge_output is False


def test_distill_token_kept_in_place():
    """The distillation token stays at position 1 and is never merged (ToMe's merge layout)."""
    model = _vit(distilled=True)
    tp.tome(model, 16, backend="torch")
    px = _px()
    with torch.no_grad():
        feats = model.forward_features(px)
        tp.unpatch_tome(model)
        base = model.forward_features(px)
    assert feats.shape[1] < base.shape[1]
    # the first block attends over all tokens before any merge; tokens 0/1 stay un-merged and in place
    assert model._tome_state.tokens_per_layer[-1] == feats.shape[1]
    tp.tome(model, 16, backend="torch")
    m = tokops.merge.bipartite_soft_matching(torch.randn(2, 66, 8), 32, class_token=True, distill_token=True)
    assert (m.slot[:, :2] == torch.tensor([0, 1])).all()
    counts = torch.zeros(2, m.n_out, dtype=torch.long).scatter_add_(1, m.slot, torch.ones_like(m.slot))
    assert (counts[:, :2] == 1).all()


def test_unmerge_output_meaning_for_avg_pool():
    """unmerge_output=True on an avg-pooled timm ViT: every input position gets its merged token,
    so the mean over positions is the size-weighted mean of the merged tokens (not ToMe's plain
    mean); the default (False) is ToMe's."""
    model = _vit(class_token=False, global_pool="avg")
    px = _px()
    tp.tome(model, 8, backend="torch")
    with torch.no_grad():
        merged = model.forward_features(px)
        tp.tome(model, 8, unmerge_output=True, backend="torch")
        unmerged = model.forward_features(px)
    assert unmerged.shape[1] == 64 and merged.shape[1] < 64
    # each merged token appears in the unmerged output as many times as its size
    vals, counts = unmerged[0].unique(dim=0, return_counts=True)
    assert counts.sum() == 64 and vals.shape[0] == merged.shape[1]
    for val, count in zip(vals, counts):  # ... and each is one of the merged tokens
        assert (merged[0] == val).all(-1).any()
    # the pooled logits differ from ToMe's with unmerge (size-weighted), equal without
    with torch.no_grad():
        assert not torch.allclose(model(px), _tome_timm(model, px, 8), atol=1e-4)
        tp.tome(model, 8, backend="torch")
        torch.testing.assert_close(model(px), _tome_timm(model, px, 8), atol=2e-5, rtol=1e-4)


def test_model_r_settable_between_calls():
    """ToMe: ``model.r = ...`` between calls; the next forward uses it."""
    model = _vit()
    px = _px()
    tp.tome(model, 4, backend="torch")
    assert model.r == 4
    with torch.no_grad():
        for r in (8, 0, [16, 8], (6, 1)):
            model.r = r
            torch.testing.assert_close(model(px), _tome_timm(model, px, r), atol=2e-5, rtol=1e-4)
            n = 65
            expected = []
            for rr in _tome_parse_r(3, r):
                n -= min(rr, (n - 1) // 2)
                expected.append(n)
            assert model._tome_state.tokens_per_layer == expected


@pytest.mark.parametrize("r", [0, 5, 16, [3], [1, 2, 3], (4, -1), (4, 1), (4, 0.5), (7, -0.3), (3, 0)])
@pytest.mark.parametrize("layers", [1, 4, 12])
def test_parse_r_matches_tome(r, layers):
    from tokops.patch.tome import parse_r

    if isinstance(r, list) and len(r) > layers:
        with pytest.raises(ValueError, match="at most one entry per layer"):
            parse_r(layers, r)
        return
    if not isinstance(r, list) and layers == 1:  # ToMe divides by zero there; tokops: the ramp's start
        base, inflect = r if isinstance(r, tuple) else (r, 0)
        assert parse_r(1, r) == [int(base * (1.0 - inflect))]
        return
    assert parse_r(layers, r) == _tome_parse_r(layers, list(r) if isinstance(r, list) else r)


def test_parse_r_bad_input():
    from tokops.patch.tome import parse_r

    with pytest.raises(TypeError, match="r must be"):
        parse_r(3, "8")
    with pytest.raises(ValueError, match="inflect"):
        parse_r(3, (8, 2.0))
    with pytest.raises(ValueError, match="tuple"):
        parse_r(3, (8, 0.5, 1))
    with pytest.raises(TypeError, match=r"r\[1\]"):
        parse_r(3, [1, "2"])


def test_register_tokens_rejected():
    model = _vit(reg_tokens=2)
    with pytest.raises(ValueError, match="prefix tokens"):
        tp.tome(model, 4)


def test_transformers_deit_detects_distill_token():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    model = transformers.DeiTModel(cfg, add_pooling_layer=False).eval()
    tp.tome(model, 4, backend="torch")
    st = model._tome_state
    assert (st.class_token, st.distill_token, st.unmerge_output) == (True, True, True)
    with torch.no_grad():
        out = model(pixel_values=_px()).last_hidden_state
        tp.unpatch_tome(model)
        base = model(pixel_values=_px()).last_hidden_state
    assert out.shape == base.shape and st.tokens_per_layer == [14, 10]
    vcfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64)
    vit = transformers.ViTModel(vcfg, add_pooling_layer=False).eval()
    tp.tome(vit, 4, backend="torch")
    assert (vit._tome_state.class_token, vit._tome_state.distill_token) == (True, False)


# --------------------------------------------------------------------------- PiToMe
def test_pitome_one_default_formula():
    metric = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(5))
    e = tokops.merge.pitome_energy(metric, 0.3, backend="torch")
    torch.testing.assert_close(e, tokops.merge.pitome_energy(metric, 0.3, formula="elu", backend="torch"))
    m = tokops.merge.pitome_merge(metric, 5, 0.3, backend="torch")
    assert torch.equal(m.slot, tokops.merge.pitome_merge(metric, 5, 0.3, formula="elu", backend="torch").slot)
    # the merge ranks tokens by the energy pitome_energy returns by default
    order = torch.argsort(e, dim=-1, descending=True, stable=True)
    protected = order[:, 10:]
    slots = m.slot.gather(1, protected)
    assert (slots == torch.arange(20)).all()


@pytest.mark.parametrize("cls", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9, 0.95, 1.0])
def test_pitome_ratio_form(backend_device, cls, ratio):
    """PiToMe's ratio (fraction kept): r = floor(T - T * ratio), T the tokens after the class token."""
    backend, device = backend_device
    metric = torch.randn(2, 29, 16, generator=torch.Generator().manual_seed(6)).to(device)
    T = 29 - int(cls)
    r = math.floor(T - T * ratio)
    a = tokops.merge.pitome_merge(metric, margin=0.4, class_token=cls, ratio=ratio, backend=backend)
    b = tokops.merge.pitome_merge(metric, r, 0.4, class_token=cls, backend=backend)
    assert a.n_out == 29 - r and torch.equal(a.slot, b.slot)
    if r:
        x = torch.randn(2, 29, 8, generator=torch.Generator().manual_seed(7))
        exp = mref.pitome_merge_ref(metric.cpu(), x, r, 0.4, 1.0, cls, "elu", "mean")
        torch.testing.assert_close(tokops.merge.merge(a, x.to(device), backend=backend).cpu(), exp)


def test_pitome_r_above_half():
    """r > T/2: clipped to T//2 (documented; as ToMe in tokops); ratio < 0.5: ValueError."""
    metric = torch.randn(1, 21, 8, generator=torch.Generator().manual_seed(8))
    m = tokops.merge.pitome_merge(metric, 50, 0.5, class_token=True, backend="torch")
    assert m.r == 10 and m.n_out == 11
    t = tokops.merge.bipartite_soft_matching(metric, 50, class_token=True, backend="torch")
    assert t.r == 10  # the same clip as ToMe's bipartite matching
    with pytest.raises(ValueError, match="ratio"):
        tokops.merge.pitome_merge(metric, margin=0.5, ratio=0.3)
    with pytest.raises(TypeError, match="not both"):
        tokops.merge.pitome_merge(metric, 3, 0.5, ratio=0.9)
    with pytest.raises(TypeError, match="give r"):
        tokops.merge.pitome_merge(metric, margin=0.5)
