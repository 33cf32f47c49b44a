"""Real-model fidelity (issue 11): padding-aware mask builders and sparse policies, length-safe ToMe."""

import math

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
