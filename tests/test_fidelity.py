"""Real-model fidelity (issue 11): padding-aware mask builders and sparse policies, length-safe ToMe."""

import math
import sys

import pytest
import torch

import tokops
from tokops.attention import (block_sparse_attention, causal_block_mask, full_block_mask, retrieval_heads_mask,
                              sliding_window_mask, topk_block_mask)


def _qkv(B, H, Hkv, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g) + 0.5)


def _right_padded(lens, N):
    return torch.arange(N)[None, :] < torch.tensor(lens)[:, None]


def _mask_for(kind, q, k, causal, blk, valid):
    Nq, Nk = q.shape[2], k.shape[2]
    if kind == "topk_frac":
        return topk_block_mask(q, k, 0.4, block_q=blk, causal=causal, valid=valid)
    if kind == "topk_count":
        return topk_block_mask(q, k, 2, block_q=blk, causal=causal, valid=valid)
    if kind == "window":
        return sliding_window_mask(Nq, 40, 3, Nk, block_q=blk, valid=valid, device=q.device)
    if kind == "heads":
        return retrieval_heads_mask(q.shape[1], [1], Nq, 40, 3, Nk, block_q=blk, valid=valid, device=q.device)
    if kind == "causal":
        return causal_block_mask(Nq, Nk, block_q=blk, valid=valid, device=q.device)
    return full_block_mask(Nq, Nk, block_q=blk, valid=valid, device=q.device)


@pytest.mark.parametrize("kind", ["topk_frac", "topk_count", "window", "heads", "causal", "full"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_rows_equal_rows_alone_op_level(kind, causal):
    """Right-padded batch: every row's blocks and attention output equal the row alone."""
    B, H, Hkv, N, D, blk = 3, 4, 2, 150, 16, 16
    lens = [150, 71, 9]
    q, k, v = _qkv(B, H, Hkv, N, D, seed=5)
    q[:, :, 100:] += 50.0  # loud padding: it must not move the pooled scores of short rows
    k[:, :, 100:] -= 30.0
    valid = _right_padded(lens, N)
    bias = torch.where(valid, 0.0, float("-inf"))
    mask = _mask_for(kind, q, k, causal, blk, valid)
    out = block_sparse_attention(q, k, v, mask, causal=causal, key_bias=bias, backend="torch")
    dense = mask.to_dense()
    for b, n in enumerate(lens):
        qa, ka, va = (t[b:b + 1, :, :n].contiguous() for t in (q, k, v))
        ma = _mask_for(kind, qa, ka, causal, blk, None)
        nb = math.ceil(n / blk)
        db = dense[b if dense.shape[0] > 1 else 0].expand(H, -1, -1)
        assert torch.equal(db[:, :nb, :nb], ma.to_dense()[0].expand(H, -1, -1)), (kind, b)
        assert not db[:, :, nb:].any() and not db[:, nb:].any()  # padded blocks never kept
        alone = block_sparse_attention(qa, ka, va, ma, causal=causal, backend="torch")
        torch.testing.assert_close(out[b:b + 1, :, :n], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("keep", [0.3, 0.75, 1, 3])
def test_topk_valid_rules_any_padding(causal, keep):
    """Arbitrary (left, right, holes) padding: the rules of DESIGN.md 'Mask builders'."""
    B, H, N, D, blk = 4, 2, 130, 8, 16
    q, k, _ = _qkv(B, H, H, N, D, seed=11)
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(B, N, generator=g) < 0.7
    valid[0] = True
    valid[1, :77] = False  # left padding
    valid[2, 20:] = False  # right padding
    dense = topk_block_mask(q, k, keep, block_q=blk, causal=causal, valid=valid).to_dense()
    nb = math.ceil(N / blk)
    kb = torch.nn.functional.pad(valid, (0, nb * blk - N)).unflatten(-1, (nb, blk)).any(-1)
    for b in range(B):
        nvalid = int(kb[b].sum())
        count = max(1, math.ceil(keep * nvalid)) if isinstance(keep, float) else min(keep, nvalid)
        for i in range(nb):
            row = dense[b, :, i]  # (H, nK)
            assert not (row & ~kb[b]).any()  # padded key blocks never selected
            if not valid[b, i * blk:(i + 1) * blk].any():
                assert not row.any()  # query blocks without a real query keep nothing
                continue
            assert (row.sum(-1) >= 1).all()  # at least one block holding real keys
            if causal:
                eligible = [j for j in range(nb) if kb[b, j] and j <= i]
                assert row[:, max(eligible)].all()  # the last causal valid block (the diagonal)
                assert (row.sum(-1) <= min(count, len(eligible))).all()
            else:
                assert (row.sum(-1) == count).all()


def test_topk_valid_no_host_sync_and_compiles():
    """The valid path is plain tensor code (no .item()/.tolist()): it traces with fullgraph."""
    q, k, _ = _qkv(2, 2, 2, 64, 8, seed=1)
    valid = _right_padded([64, 30], 64)

    def f(q, k, valid):
        m = topk_block_mask(q, k, 0.5, block_q=16, valid=valid)
        return m.kv_num_blocks, m.kv_indices

    eager = f(q, k, valid)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, valid)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_valid_bad_input():
    q, k, _ = _qkv(2, 2, 2, 64, 8)
    with pytest.raises(TypeError, match="valid must have dtype bool"):
        topk_block_mask(q, k, 0.5, block_q=16, valid=torch.ones(2, 64))
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 64\)"):
        topk_block_mask(q, k, 0.5, block_q=16, valid=torch.ones(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid must have shape"):
        sliding_window_mask(64, 16, valid=torch.ones(64, dtype=torch.bool))


# --------------------------------------------------------------------------- the transformers integration
transformers = pytest.importorskip("transformers")
import tokops.patch as tp  # noqa: E402


def _bert(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=160)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval().float()
    m.set_attn_implementation("sdpa")
    return m


def _ids(B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 120, (B, N), generator=g)


@pytest.mark.parametrize("policy", [tp.SparsePolicy("topk", keep=0.5, block=16), tp.SparsePolicy("topk", keep=2, block=16),
                                    tp.SparsePolicy("window", window=24, sinks=2, block=16),
                                    tp.SparsePolicy("full", block=16)], ids=["topk-frac", "topk-count", "window", "full"])
def test_sparse_policy_padded_batch_rows_match_single_rows(policy):
    """In a padded batch every row gives what the same row gives alone, for every policy."""
    model = tp.sparse_attention(_bert(), policy)
    N, lens = 100, [100, 45, 12]
    ids = _ids(3, N)
    mask = _right_padded(lens, N).long()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, n in enumerate(lens):
            alone = model(input_ids=ids[i:i + 1, :n]).last_hidden_state
            torch.testing.assert_close(batch[i:i + 1, :n], alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- length-safe ToMe: the op
from tokops.merge import reference as R  # noqa: E402

M = tokops.merge


def _metric_valid(B, N, C, lengths, seed, prefix=True):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, C, generator=g)  # a few clusters, so that similarities spread over [-1, 1]
    metric = base[torch.randint(0, 4, (B, N), generator=g)] + 0.6 * torch.randn(B, N, C, generator=g)
    if prefix:
        valid = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    else:
        valid = torch.rand(B, N, generator=g) < 0.7
        valid[:, 0] = True
    return metric.masked_fill(~valid[..., None], 0.0), valid


@pytest.mark.parametrize("r,cls,threshold,min_keep,prefix", [
    (8, True, 0.5, None, True), (0.5, False, 0.3, None, False), (0.5, True, 0.7, None, True),
    (6, True, None, 12, True), (0.5, False, None, "rows", False), (0.5, True, 0.4, "rows", True),
    (1.0, True, -1.0, None, True), (0.5, True, 1.0, None, False)])
def test_threshold_and_min_keep_match_reference(backend_device, r, cls, threshold, min_keep, prefix):
    backend, device = backend_device
    B, N, C = 5, 31, 16
    lengths = [31, 20, 13, 4, 1]
    metric, valid = _metric_valid(B, N, C, lengths, seed=7 + int(10 * r) + 3 * cls, prefix=prefix)
    if min_keep == "rows":
        min_keep = torch.tensor([25, 6, 11, 0, 3])
    mk = min_keep.to(device) if isinstance(min_keep, torch.Tensor) else min_keep
    x = torch.randn(B, N, 6, generator=torch.Generator().manual_seed(2))
    m = M.bipartite_soft_matching(metric.to(device), r, cls, valid=valid.to(device), backend=backend,
                                  min_keep=mk, threshold=threshold)
    groups = R.padded_groups(metric, valid, r, cls, min_keep=min_keep, threshold=threshold)
    n_keep = [len(g) for g in groups]
    assert m.n_out == max(n_keep)
    assert m.valid.cpu().tolist() == [[o < k for o in range(m.n_out)] for k in n_keep]
    mb = "triton" if backend == "cuda" else backend
    wx, size = M.merge_wavg(m, x.to(device), backend=mb)
    torch.testing.assert_close(wx.cpu(), R.apply_groups(groups, x, m.n_out, "mean"), atol=1e-5, rtol=1e-5)
    if isinstance(min_keep, int):
        assert all(k >= min(min_keep, L) for k, L in zip(n_keep, valid.sum(1).tolist()))
    if threshold is not None and threshold >= 1.0:
        assert n_keep == valid.sum(1).tolist()  # nothing is that similar: identity on every row
    if prefix:  # a padded row merges what it merges alone (no valid mask: the same per-row rule)
        for b, L in enumerate(lengths):
            mk_b = min_keep[b:b + 1].to(device) if isinstance(min_keep, torch.Tensor) else min_keep
            alone = M.bipartite_soft_matching(metric[b:b + 1, :L].to(device), r, cls, backend=backend,
                                              min_keep=mk_b, threshold=threshold)
            xa = x[b:b + 1, :L].to(device)
            got = M.merge(m, x.to(device), backend=mb).cpu()[b:b + 1, :n_keep[b]]
            exp = M.merge(alone, xa, backend=mb).cpu()
            exp = exp[:, :n_keep[b]] if alone.valid is not None else exp
            torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-6)


def test_threshold_without_valid_and_min_keep_int_fast_path(backend_device):
    backend, device = backend_device
    metric, valid = _metric_valid(3, 24, 8, [24, 24, 24], seed=3)
    metric = metric.to(device)
    m = M.bipartite_soft_matching(metric, 0.5, True, backend=backend, threshold=0.6)
    groups = R.padded_groups(metric.cpu(), valid, 0.5, True, threshold=0.6)
    assert m.valid is not None and m.valid.sum(1).cpu().tolist() == [len(g) for g in groups]
    a = M.bipartite_soft_matching(metric, 10, True, backend=backend, min_keep=18)
    assert a.valid is None and a.r == 6 and a.n_out == 18  # int floor keeps the unpadded fast path
    assert M.bipartite_soft_matching(metric, 10, True, backend=backend, min_keep=24).is_identity


def test_length_safety_bad_input():
    metric = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="threshold must be a cosine similarity in"):
        M.bipartite_soft_matching(metric, 2, threshold=1.5)
    with pytest.raises(TypeError, match="threshold must be a float"):
        M.bipartite_soft_matching(metric, 2, threshold="0.5")
    with pytest.raises(ValueError, match="min_keep"):
        M.bipartite_soft_matching(metric, 2, min_keep=-1)
    with pytest.raises(ValueError, match="min_keep"):
        M.bipartite_soft_matching(metric, 2, min_keep=torch.tensor([1, 2, 3]))


# --------------------------------------------------------------------------- length-safe ToMe: the patch
from tokops.merge import reference as mref  # noqa: E402


@torch.no_grad()
def _ref_bert_tome_rows(model, ids, rule, prop_attn=True):
    """One unpadded row through BERT with reference ToMe; ``rule(layer, n, node_max)`` gives r."""
    x = model.embeddings(input_ids=ids)
    size = torch.ones_like(x[..., :1])
    ms, counts = [], []
    for i, layer in enumerate(model.encoder.layer):
        sa = layer.attention.self
        B, N, _ = x.shape
        H, D = sa.num_attention_heads, sa.attention_head_size
        q, k, v = (f(x).view(B, N, H, D).transpose(1, 2) for f in (sa.query, sa.key, sa.value))
        logits = q @ k.transpose(-1, -2) * D ** -0.5
        if prop_attn:
            logits = logits + size[..., 0].log()[:, None, None, :]
        ctx = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)
        a = layer.attention.output(ctx, x)
        metric = k.transpose(1, 2).mean(2)
        node_max = mref._scores(metric, True, False, torch.float32).max(-1).values[0]
        m = mref.bipartite_soft_matching(metric, rule(i, N, node_max), class_token=True, score_dtype=torch.float32)
        a, size = mref.merge_wavg(m, a, size)
        ms.append(m)
        x = layer.output(layer.intermediate(a), a)
        counts.append(x.shape[1])
    for m in reversed(ms):
        x = mref.unmerge(m, x)
    return x, counts


def _bert_eager(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=160)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval().float()


@pytest.mark.parametrize("cfg", [
    dict(r=0.25, min_tokens=20, max_merged=None),  # per-layer fraction with a floor
    dict(r=10, min_tokens=0, max_merged=0.3),  # fixed r with a total cap
    dict(r=0.4, r_mode="total", min_tokens=0, max_merged=None),  # total budget, evenly spread
    dict(r=9, r_mode="total", min_tokens=0, max_merged=None),  # total count
    dict(r=1.0, threshold=0.3, min_tokens=0, max_merged=None),  # similarity threshold only
    dict(r=5, threshold=0.2, min_tokens=12, max_merged=0.5, prop_attn=True),  # everything, proportional attn
    dict(),  # the text-encoder defaults
])
def test_tome_length_safety_matches_reference_and_padded_rows(cfg):
    model = _bert_eager()
    N, lens = 60, [60, 33, 14]
    ids = _ids(3, N, seed=4)
    tp.tome(model, **cfg)
    st = model._tome_state
    r, mode = st.r, st.r_mode
    tau = st.threshold

    def rule(layer, n, node_max, n0):
        floors = [st.min_tokens]
        if st.max_merged is not None:
            floors.append(math.ceil((1 - st.max_merged) * n0))
        if mode == "total":
            total = r * n0 if isinstance(r, float) else r
            floors.append(n0 - math.floor(total * (layer + 1) / 3))
            want = n
        else:
            want = r if isinstance(r, int) else math.floor(r * n)
        want = min(want, (n - 1) // 2, max(0, n - max(floors)))
        if tau is not None:
            want = min(want, int((node_max >= tau).sum()))
        return max(0, want)

    mask = _right_padded(lens, N).long()
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows_after = torch.stack(st.row_tokens, 1)
    for b, n in enumerate(lens):
        with torch.no_grad():
            alone = model(input_ids=ids[b:b + 1, :n]).last_hidden_state
        torch.testing.assert_close(batch[b:b + 1, :n], alone, atol=1e-5, rtol=1e-5)
        exp, counts = _ref_bert_tome_rows(model, ids[b:b + 1, :n], lambda i, m, nm: rule(i, m, nm, n), st.prop_attn)
        torch.testing.assert_close(alone, exp, atol=1e-4, rtol=1e-4)
        assert rows_after[b].tolist() == counts, (b, counts)
        if st.min_tokens:
            assert min(counts) >= min(st.min_tokens, n)
        if st.max_merged is not None:
            assert counts[-1] >= math.ceil((1 - st.max_merged) * n)


def test_tome_text_defaults_protect_short_inputs():
    model = tp.tome(_bert_eager(layers=6))
    st = model._tome_state
    d = sys.modules["tokops.patch.tome"].TEXT_DEFAULTS
    assert (st.r, st.r_mode, st.min_tokens, st.max_merged, st.prop_attn) == (
        d["r"], d["r_mode"], d["min_tokens"], d["max_merged"], d["prop_attn"])
    with torch.no_grad():
        model(input_ids=_ids(1, 12))
    assert [int(t) for t in st.row_tokens] == [12] * 6  # below the floor: nothing merged
    with torch.no_grad():
        model(input_ids=_ids(1, 120))
    assert int(st.row_tokens[-1]) == 120 - math.floor(120 * st.r)
    # plain ToMe on request; ViTs keep plain fixed r by default
    plain = tp.tome(_bert_eager(layers=6), 4, min_tokens=0, max_merged=None)
    with torch.no_grad():
        plain(input_ids=_ids(1, 12))
    assert [int(t) for t in plain._tome_state.row_tokens][-1] < 12


def test_tome_length_safety_bad_input():
    with pytest.raises(ValueError, match="r_mode must be one of"):
        tp.tome(_bert_eager(), 4, r_mode="sometimes")
    with pytest.raises(ValueError, match="r_mode='total' needs"):
        tp.tome(_bert_eager(), [1, 2, 3], r_mode="total")
    with pytest.raises(ValueError, match="min_tokens must be"):
        tp.tome(_bert_eager(), 4, min_tokens=-2)
    with pytest.raises(ValueError, match="max_merged must be"):
        tp.tome(_bert_eager(), 4, max_merged=1.5)
    with pytest.raises(ValueError, match="threshold must be"):
        tp.tome(_bert_eager(), 4, threshold=2.0)
    with pytest.raises(TypeError, match="prop_attn must be"):
        tp.tome(_bert_eager(), 4, prop_attn="yes")
