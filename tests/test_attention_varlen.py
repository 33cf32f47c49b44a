"""Variable-length (packed, ``cu_seqlens``) block-sparse attention (issue 14 item 4): every packed call
equals running each sequence alone through the padded op -- output, LSE, key mass and the gradients
dq, dk, dv, dkey_bias -- against the float64 reference and, for the Triton kernels, against the padded
Triton kernels themselves.  Ragged lengths (1, 17, 40 with blocks of 16), empty sequences, rows with no
allowed key, GQA, causal with seqlen_q != seqlen_k (bottom-right per sequence), key bias, per-sequence
and broadcast masks; bad input; opcheck; torch.compile(fullgraph=True); no host sync."""

import math

import pytest
import torch

import tokops
from tokops.attention import (BlockMask, attention_with_key_mass, attention_with_key_mass_varlen,
                              block_sparse_attention, block_sparse_attention_varlen, causal_block_mask,
                              validate_cu_seqlens)
from tokops.attention import reference as ref

from nosync import no_host_sync


def _cu(lens, device):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _packed(lens_q, lens_k, H, Hkv, D, dtype, device, seed=0, bias_dim=None):
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, H, D, generator=g)
    k = torch.randn(Tk, Hkv, D, generator=g)
    v = torch.randn(Tk, Hkv, D, generator=g) + 0.5
    bias = None
    if bias_dim == 1:
        bias = torch.randn(Tk, generator=g)
    elif bias_dim == 2:
        bias = torch.randn(H, Tk, generator=g)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return (cast(q), cast(k), cast(v), None if bias is None else bias.to(device), _cu(lens_q, device),
            _cu(lens_k, device))


def _dense_mask(kind, S, H, lens_q, lens_k, bq, bk, seed):
    """Block mask on the max_seqlen grid: "per_seq" (S, H, ...) random with an empty row, "broadcast"
    (1, 1, ...) random, or None."""
    if kind is None:
        return None
    nq, nk = math.ceil(max(lens_q) / bq), math.ceil(max(lens_k) / bk)
    g = torch.Generator().manual_seed(seed)
    B, Hm = (S, H) if kind == "per_seq" else (1, 1)
    d = torch.rand(B, Hm, nq, nk, generator=g) < 0.6
    d[..., 0, 0] = True
    if nq > 1:
        d[-1, 0, 1] = False  # a query block that attends to nothing: rows with no allowed key
    if kind == "per_seq":
        d[0, -1, 0] = ~d[0, -1, 0]
    return d


def _per_sequence(attend, q, k, v, bias, lens_q, lens_k, dense, bq, bk, with_mass=False):
    """Run ``attend(q_s, k_s, v_s, mask_s, bias_s) -> (out (1,H,Lq,D), lse (1,H,Lq)[, mass (1,H,Lk)])`` on each
    sequence alone (padded layout, its own block grid), and pack the results like the varlen op:
    ``out (total_q, H, D)``, ``lse (H, total_q)`` (and ``mass (H, total_k)``).  A sequence without keys
    gives 0 / -inf; one without queries gives nothing (its keys get mass 0)."""
    H, D = q.shape[1], q.shape[2]
    outs, lses, masses = [], [], []
    cq = ck = 0
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs = q[cq:cq + lq].transpose(0, 1).unsqueeze(0)
        ks = k[ck:ck + lk].transpose(0, 1).unsqueeze(0)
        vs = v[ck:ck + lk].transpose(0, 1).unsqueeze(0)
        if lq and lk:
            nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
            d = torch.ones(1, 1, nq, nk, dtype=torch.bool) if dense is None else dense[s if dense.shape[0] > 1 else 0]
            d = d.reshape(1, *d.shape[-3:])[..., :nq, :nk].to(q.device)
            m = BlockMask.from_dense(d.contiguous(), bq, bk, lq, lk)
            bs = None if bias is None else (bias[ck:ck + lk][None] if bias.dim() == 1 else bias[:, ck:ck + lk][None])
            res = attend(qs, ks, vs, m, bs)
            outs.append(res[0][0].transpose(0, 1))
            lses.append(res[1][0])
            if with_mass:
                masses.append(res[2][0])
        else:
            if lq:
                outs.append(torch.zeros(lq, H, D, dtype=q.dtype, device=q.device))
                lses.append(torch.full((H, lq), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64
                                       else torch.float32, device=q.device))
            if with_mass:
                masses.append(torch.zeros(H, lk, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                                          device=q.device))
        cq, ck = cq + lq, ck + lk
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1)
    return (out, lse, torch.cat(masses, 1)) if with_mass else (out, lse)


def _ref64(causal, scale, with_mass=False):
    """The float64 reference of one padded sequence (differentiable)."""
    def attend(qs, ks, vs, m, bs):
        o, l = ref.attention(qs, ks, vs, m.kv_num_blocks, m.kv_indices, m.block_q, m.block_k, causal, scale, bs)
        if not with_mass:
            return o, l
        return o, l, ref.key_mass(qs, ks, m.kv_num_blocks, m.kv_indices, m.block_q, m.block_k, causal, scale, bs)
    return attend


CASES = [
    # (lens_q, lens_k, H, Hkv, D, block_q, block_k, causal, bias_dim, mask)
    ((1, 17, 40), (1, 17, 40), 2, 2, 16, 16, 16, False, None, "per_seq"),
    ((1, 17, 40), (1, 17, 40), 4, 2, 16, 16, 16, True, 1, "broadcast"),  # GQA, causal, (total_k,) bias
    ((17, 0, 40, 5), (30, 9, 0, 33), 2, 1, 16, 16, 32, True, 2, "per_seq"),  # empty q / empty k, Lq != Lk
    ((40, 23, 3), (23, 40, 3), 2, 2, 8, 32, 16, True, None, None),  # Lq > Lk: rows before the diagonal see nothing
]
_ids = [f"case{i}" for i in range(len(CASES))]


def _loss(out, lse, gout, glse):
    return (out * gout).sum() + (torch.where(lse.isinf(), 0, lse) * glse).sum()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_varlen_matches_each_sequence_alone_fp64(backend_device, case):
    """Output, LSE and the gradients (dq, dk, dv, dkey_bias, through out and lse) of the packed call equal
    the float64 reference run on every sequence alone."""
    backend, device = backend_device
    lens_q, lens_k, H, Hkv, D, bq, bk, causal, bias_dim, kind = case
    q, k, v, bias, cu_q, cu_k = _packed(lens_q, lens_k, H, Hkv, D, torch.float32, device, seed=sum(lens_q),
                                        bias_dim=bias_dim)
    dense = _dense_mask(kind, len(lens_q), H, lens_q, lens_k, bq, bk, seed=D)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    out, lse = block_sparse_attention_varlen(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), None if dense is None else dense.to(device), causal=causal,
        key_bias=bias, return_lse=True, block_q=bq, block_k=bk, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (H, sum(lens_q)) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()

    rl = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    rb = rl[3] if bias is not None else None
    rout, rlse = _per_sequence(_ref64(causal, D ** -0.5), *rl[:3], rb, lens_q, lens_k, dense, bq, bk)
    torch.testing.assert_close(out.detach().cpu().double(), rout.detach(), atol=2e-6, rtol=1e-5)
    empty = torch.isinf(rlse.detach())
    assert empty.any(), "the case must contain rows with no allowed key"
    assert torch.equal(torch.isinf(lse.detach().cpu()), empty) and (lse.detach().cpu()[empty] < 0).all()
    assert (out.detach().cpu().transpose(0, 1)[empty] == 0).all()
    torch.testing.assert_close(lse.detach().cpu().double()[~empty], rlse.detach()[~empty], atol=1e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(1)
    gout, glse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    grads = torch.autograd.grad(_loss(out, lse, gout.to(device), glse.to(device)), leaves)
    rgrads = torch.autograd.grad(_loss(rout, rlse, gout.double(), glse.double()), rl)
    for name, got, exp in zip(("dq", "dk", "dv", "dkey_bias"), grads, rgrads):
        assert got.shape == exp.shape and not got.isnan().any(), name
        torch.testing.assert_close(got.cpu().double(), exp, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["gqa-causal-bias1", "empty-seqs-bias2"])
def test_varlen_equals_padded_op_same_backend(backend_device, case, dtype):
    """The packed call and the padded op on each sequence alone, same backend and dtype: the same numbers
    (the kernels share their code), forward and gradients."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    lens_q, lens_k, H, Hkv, D, bq, bk, causal, bias_dim, kind = case
    q, k, v, bias, cu_q, cu_k = _packed(lens_q, lens_k, H, Hkv, D, dtype, device, seed=7, bias_dim=bias_dim)
    dense = _dense_mask(kind, len(lens_q), H, lens_q, lens_k, bq, bk, seed=3)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    for t in leaves:
        t.requires_grad_(True)
    out, lse = block_sparse_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dense.to(device),
                                             causal=causal, key_bias=bias, return_lse=True, block_q=bq, block_k=bk,
                                             backend=backend)

    def attend(qs, ks, vs, m, bs):
        return block_sparse_attention(qs, ks, vs, m, causal=causal, key_bias=bs, return_lse=True, backend=backend)

    pout, plse = _per_sequence(attend, q, k, v, bias, lens_q, lens_k, dense, bq, bk)
    tol = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
           torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]
    torch.testing.assert_close(out, pout, **tol)
    torch.testing.assert_close(lse, plse, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(2)
    gout = torch.randn(out.shape, generator=g).to(dtype).to(device)
    glse = torch.randn(lse.shape, generator=g).to(device)
    grads = torch.autograd.grad(_loss(out.float(), lse, gout.float(), glse), leaves)
    pgrads = torch.autograd.grad(_loss(pout.float(), plse, gout.float(), glse), leaves)
    for name, a, b in zip(("dq", "dk", "dv", "dkey_bias"), grads, pgrads):
        lo = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(a.float(), b.float(), atol=lo, rtol=max(lo, 1e-3), msg=name)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=["gqa-causal-bias1", "empty-seqs-bias2"])
def test_varlen_key_mass_matches_each_sequence_alone(backend_device, case):
    backend, device = backend_device
    lens_q, lens_k, H, Hkv, D, bq, bk, causal, bias_dim, kind = case
    q, k, v, bias, cu_q, cu_k = _packed(lens_q, lens_k, H, Hkv, D, torch.float32, device, seed=5, bias_dim=bias_dim)
    dense = _dense_mask(kind, len(lens_q), H, lens_q, lens_k, bq, bk, seed=9)
    out, mass = attention_with_key_mass_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dense.to(device),
                                               causal=causal, key_bias=bias, block_q=bq, block_k=bk, backend=backend)
    assert mass.shape == (H, sum(lens_k)) and mass.dtype == torch.float32
    c64 = [None if t is None else t.cpu().double() for t in (q, k, v, bias)]
    rout, _, rmass = _per_sequence(_ref64(causal, D ** -0.5, with_mass=True), *c64, lens_q, lens_k, dense, bq, bk,
                                   with_mass=True)
    torch.testing.assert_close(out.cpu().double(), rout, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(mass.cpu().double(), rmass, atol=1e-5, rtol=1e-5)
    # and the padded op's mass, sequence by sequence
    if lens_q == lens_k:
        s = 2
        lq, q0 = lens_q[s], sum(lens_q[:s])
        ds = dense[s if dense.shape[0] > 1 else 0][None][..., :math.ceil(lq / bq), :math.ceil(lq / bk)]
        m = BlockMask.from_dense(ds.contiguous().to(device), bq, bk, lq, lq)
        bs = None if bias is None else (bias[q0:q0 + lq][None] if bias.dim() == 1 else bias[:, q0:q0 + lq][None])
        _, pm = attention_with_key_mass(q[q0:q0 + lq].transpose(0, 1)[None], k[q0:q0 + lq].transpose(0, 1)[None],
                                        v[q0:q0 + lq].transpose(0, 1)[None], m, causal=causal, key_bias=bs,
                                        backend=backend)
        torch.testing.assert_close(mass[:, q0:q0 + lq], pm[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_decode_shaped_split_kv(backend_device, causal):
    """Few queries per sequence against long keys: the Triton forward splits each query tile's key-block
    list over programs (flash-decoding) and merges them by LSE, per sequence (VARLEN split + combine)."""
    backend, device = backend_device
    lens_q, lens_k = (1, 3, 0), (40, 70, 9)
    H, D, bk = 1, 16, 16  # 3 query tiles: fewer than the interpreter's pretend 4 SMs -> split
    q, k, v, bias, cu_q, cu_k = _packed(lens_q, lens_k, H, 1, D, torch.float32, device, seed=12, bias_dim=2)
    if backend == "triton":
        from tokops.triton_kernels import block_sparse_attn as tk

        assert tk._num_splits(1 * len(lens_q) * H, math.ceil(70 / bk), torch.device(device)) > 1
    out, lse = block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 3, 70, None, causal=causal, key_bias=bias,
                                             return_lse=True, block_q=16, block_k=bk, backend=backend)
    c64 = [t.cpu().double() for t in (q, k, v, bias)]
    rout, rlse = _per_sequence(_ref64(causal, D ** -0.5), *c64, lens_q, lens_k, None, 16, bk)
    torch.testing.assert_close(out.cpu().double(), rout, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), rlse, atol=1e-5, rtol=1e-5)


def test_varlen_mask_forms_agree(backend_device):
    """A dense block mask, its BlockMask, a (1, ...) mask broadcast to S and None (all blocks) agree;
    strided q/k/v views (slices of a packed qkv projection) are read in place."""
    backend, device = backend_device
    lens = (9, 33, 20)
    H, D, S = 2, 16, 3
    q, k, v, _, cu, _ = _packed(lens, lens, H, H, D, torch.float32, device, seed=4)
    n = max(lens)
    dense = _dense_mask("broadcast", S, H, lens, lens, 16, 16, seed=1).to(device)
    a = block_sparse_attention_varlen(q, k, v, cu, cu, n, n, dense, block_q=16, backend=backend)
    m = BlockMask.from_dense(dense, 16, 16, n, n)
    b = block_sparse_attention_varlen(q, k, v, cu, cu, n, n, m, backend=backend)
    c = block_sparse_attention_varlen(q, k, v, cu, cu, n, n, m.expand(S, H), backend=backend)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-6)
    qkv = torch.stack([q, k, v], 1)  # (total, 3, H, D): q = qkv[:, 0] has strides (3HD, D, 1)
    d = block_sparse_attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, n, n, None, block_q=16,
                                      backend=backend)
    e = block_sparse_attention_varlen(q, k, v, cu, cu, n, n, None, block_q=16, backend=backend)
    torch.testing.assert_close(d, e, atol=1e-6, rtol=1e-6)


def test_varlen_torch_backend_is_dense_sdpa_per_sequence():
    """A second oracle for the torch backend (which shares code with nothing below): SDPA per sequence."""
    lens_q, lens_k = (5, 30, 12), (20, 30, 4)
    H, D = 2, 16
    q, k, v, _, cu_q, cu_k = _packed(lens_q, lens_k, H, H, D, torch.float32, "cpu", seed=8)
    out = block_sparse_attention_varlen(q, k, v, cu_q, cu_k, 30, 30, None, causal=True, block_q=16, backend="torch")
    cq = ck = 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = (t.transpose(0, 1).double() for t in (q[cq:cq + lq], k[ck:ck + lk], v[ck:ck + lk]))
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        exp = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed)
        exp = torch.where(allowed.any(-1)[None, :, None], exp, 0.0)
        torch.testing.assert_close(out[cq:cq + lq].transpose(0, 1).double(), exp, atol=2e-6, rtol=1e-5)
        cq, ck = cq + lq, ck + lk


# --------------------------------------------------------------------------- bad input
def _bad_calls():
    lens = (3, 20)
    q, k, v, bias, cu, _ = _packed(lens, lens, 2, 2, 16, torch.float32, "cpu", bias_dim=1)
    n = 20

    def call(**kw):
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)
        args.update(kw)
        return lambda: block_sparse_attention_varlen(**args, block_q=16, backend="torch")

    yield "cu_seqlens_q", TypeError, call(cu_seqlens_q=cu.long())
    yield "cu_seqlens_k", TypeError, call(cu_seqlens_k=cu.float())
    yield "cu_seqlens_q", ValueError, call(cu_seqlens_q=cu[None])
    yield "cu_seqlens_q", ValueError, call(cu_seqlens_q=cu[:1])
    yield "cu_seqlens_k", ValueError, call(cu_seqlens_k=_cu((3, 10, 10), "cpu"))
    yield "max_seqlen_q", ValueError, call(max_seqlen_q=24)  # more than total_q = 23
    yield "max_seqlen_k", ValueError, call(max_seqlen_k=0)
    yield "max_seqlen_q", TypeError, call(max_seqlen_q=torch.tensor(20))
    yield "q", ValueError, call(q=q[None])
    yield "k", ValueError, call(k=k[:, :, :8])
    yield "v", ValueError, call(v=v[:-1])
    k3, v3 = (t[:, :1].expand(-1, 3, -1).contiguous() for t in (k, v))  # 3 KV heads for 2 query heads
    yield "heads", ValueError, call(k=k3, v=v3)
    yield "key_bias", ValueError, lambda: block_sparse_attention_varlen(q, k, v, cu, cu, n, n, key_bias=bias[:-1])
    yield "key_bias", TypeError, lambda: block_sparse_attention_varlen(q, k, v, cu, cu, n, n, key_bias=bias.double())
    yield "mask", ValueError, lambda: block_sparse_attention_varlen(  # a batch dim of 3 for 2 sequences
        q, k, v, cu, cu, n, n, torch.ones(3, 1, 2, 2, dtype=torch.bool), block_q=16)
    yield "mask", ValueError, lambda: block_sparse_attention_varlen(  # the grid of max_seqlen: 2 x 2 blocks
        q, k, v, cu, cu, n, n, torch.ones(1, 1, 3, 2, dtype=torch.bool), block_q=16)
    yield "max_seqlen_q x max_seqlen_k", ValueError, lambda: block_sparse_attention_varlen(
        q, k, v, cu, cu, n, n, causal_block_mask(23, block_q=16))
    yield "padded batches only", ValueError, lambda: block_sparse_attention_varlen(q, k, v, cu, cu, n, n,
                                                                                     backend="cuda")
    yield "padded batches only", ValueError, lambda: attention_with_key_mass_varlen(q, k, v, cu, cu, n, n,
                                                                                      backend="cuda")
    yield "check_seqlens", TypeError, lambda: block_sparse_attention_varlen(q, k, v, cu, cu, n, n, check_seqlens=1)
    # the values of cu_seqlens, checked only on request (one host sync)
    bad = torch.tensor([0, 20, 3], dtype=torch.int32)
    yield "non-decreasing", ValueError, lambda: block_sparse_attention_varlen(q, k, v, bad, cu, n, n,
                                                                               check_seqlens=True)
    yield r"cu_seqlens_k\[-1\]", ValueError, lambda: block_sparse_attention_varlen(
        q, k, v, cu, torch.tensor([0, 3, 22], dtype=torch.int32), n, n, check_seqlens=True)
    yield "max_seqlen", ValueError, lambda: block_sparse_attention_varlen(q, k, v, cu, cu, 19, n, check_seqlens=True)
    yield r"cu_seqlens\[0\]", ValueError, lambda: validate_cu_seqlens(torch.tensor([1, 23], dtype=torch.int32), 23, 30)


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_varlen_bad_inputs(case):
    name, exc, call = list(_bad_calls())[case]
    with pytest.raises(exc, match=name):
        call()


def test_validate_cu_seqlens_accepts_good_values():
    validate_cu_seqlens(_cu((0, 5, 0, 7), "cpu"), 12, 7)


def test_bad_cu_seqlens_never_read_out_of_bounds(backend_device):
    """Unchecked bad cu_seqlens (past the total, decreasing, longer than max_seqlen) give undefined rows but
    never an out-of-bounds access, on every backend (the kernels clamp every sequence)."""
    backend, device = backend_device
    lens = (5, 20)
    q, k, v, _, cu, _ = _packed(lens, lens, 2, 2, 16, torch.float32, device)
    for bad in ([0, 30, 99], [0, 20, 3], [-5, 7, 25]):
        c = torch.tensor(bad, dtype=torch.int32, device=device)
        out = block_sparse_attention_varlen(q, k, v, c, c, 20, 20, causal=True, block_q=16, backend=backend)
        assert out.shape == q.shape


# --------------------------------------------------------------------------- registry / compile / sync
def test_varlen_opcheck(backend_device):
    backend, device = backend_device
    lens_q, lens_k = (1, 17, 0, 24), (9, 17, 5, 20)
    H, Hkv, D, blk = 2, 1, 16, 16
    q, k, v, bias, cu_q, cu_k = _packed(lens_q, lens_k, H, Hkv, D, torch.float32, device, bias_dim=2)
    m = BlockMask.from_dense(_dense_mask("per_seq", 4, H, lens_q, lens_k, blk, blk, seed=0).to(device), blk, blk,
                             24, 20)
    args = (q, k, v, cu_q, cu_k, 24, 20, m.kv_num_blocks, m.kv_indices, blk, blk, True, D ** -0.5, bias, backend)
    torch.library.opcheck(torch.ops.tokops.block_sparse_attn_varlen_fwd.default, args)
    out, lse = torch.ops.tokops.block_sparse_attn_varlen_fwd(*args)
    qn, qi = m.transpose()
    bargs = (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), cu_q, cu_k, 24, 20, m.kv_num_blocks,
             m.kv_indices, qn, qi, blk, blk, True, D ** -0.5, bias, backend)
    torch.library.opcheck(torch.ops.tokops.block_sparse_attn_varlen_bwd.default, bargs)
    torch.library.opcheck(torch.ops.tokops.attn_key_mass_varlen.default,
                          (q, k, lse, cu_q, cu_k, 24, 20, qn, qi, blk, blk, True, D ** -0.5, bias, backend))


def test_varlen_backends_registered():
    impls = tokops._registry.implementations()
    for name in ("block_sparse_attn_varlen_fwd", "block_sparse_attn_varlen_bwd", "attn_key_mass_varlen"):
        assert impls[name] == ["torch", "triton"], name


def test_varlen_torch_compile_fullgraph():
    """The packed call (mask builder, attention, key mass, backward) traces with no graph break."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lens = (7, 40, 0, 18)
    H, D, n = 2, 16, 40
    q, k, v, bias, cu, _ = _packed(lens, lens, H, H, D, torch.float32, device, bias_dim=1)

    def layer(q, k, v, cu, bias):
        mask = causal_block_mask(n, block_q=16, device=q.device)
        out = block_sparse_attention_varlen(q, k, v, cu, cu, n, n, mask, causal=True, key_bias=bias)
        out2, mass = attention_with_key_mass_varlen(q, k, v, cu, cu, n, n, mask, causal=True)
        return out + out2, mass

    q.requires_grad_(True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, mass = compiled(q, k, v, cu, bias)
    exp_out, exp_mass = layer(q, k, v, cu, bias)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(mass, exp_mass)
    (g,) = torch.autograd.grad(out.sum(), q)
    (eg,) = torch.autograd.grad(exp_out.sum(), q)
    torch.testing.assert_close(g, eg)


def test_varlen_no_host_sync(backend_device):
    """Forward, key mass and backward read cu_seqlens on the device only (check_mask=False: the mask value
    check is the one documented sync)."""
    backend, device = backend_device
    lens = (1, 17, 0, 40)
    H, D, n = 2, 16, 40
    q, k, v, bias, cu, _ = _packed(lens, lens, H, 1, D, torch.float32, device, bias_dim=2)
    mask = causal_block_mask(n, block_q=16, device=device)
    q.requires_grad_(True)
    with no_host_sync():
        out = block_sparse_attention_varlen(q, k, v, cu, cu, n, n, mask, causal=True, key_bias=bias, check_mask=False,
                                            backend=backend)
        _, mass = attention_with_key_mass_varlen(q, k, v, cu, cu, n, n, mask, causal=True, check_mask=False,
                                                 backend=backend)
        (dq,) = torch.autograd.grad(out.sum(), q)
    assert dq.shape == q.shape and mass.shape == (H, sum(lens))
