"""Token merging (ToMe, PiToMe) and pruning: agreement with the pure-torch reference (float64
scores), ties, r=0 / r > N/2, class + distill tokens, odd N, padded batches, autograd, bad input,
opcheck, torch.compile and an end-to-end ToMe transformer block."""

import math

import pytest
import torch

import tokops
from tokops.merge import reference as R

M = tokops.merge


def _mb(backend):
    """Backend for the ops other than tome_match, which have no CUDA kernel (Triton runs them)."""
    return "triton" if backend == "cuda" else backend


def _skip_bf16(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


def _scores64(metric, class_token=False, distill_token=False):
    return R._scores(metric, class_token, distill_token, torch.float64)


def _separated(metric, class_token=False, distill_token=False, gap=1e-4) -> bool:
    """True when the float64 answer is unambiguous at fp32 accuracy: every row's best score beats
    its second best by ``gap`` and the finite ``node_max`` values are ``gap`` apart."""
    s = _scores64(metric, class_token, distill_token)
    if s.shape[-1] >= 2:
        top2 = s.topk(2, dim=-1).values
        fin = torch.isfinite(top2[..., 0])
        d = (top2[..., 0] - top2[..., 1])[fin]
        if d.numel() and d.min() < gap:
            return False
    if s.shape[-1] == 0:
        return True
    nm = s.max(-1).values
    for row in nm:
        v = row[torch.isfinite(row)].sort().values
        if v.numel() > 1 and (v[1:] - v[:-1]).min() < gap:
            return False
    return True


def _metric(B, N, C, dtype=torch.float32, seed=0, class_token=False, distill_token=False):
    """Random metric (cast to dtype) whose matching is unambiguous (see _separated)."""
    for s in range(seed, seed + 200):
        g = torch.Generator().manual_seed(s)
        m = (torch.randn(B, N, C, generator=g) + 0.3 * torch.randn(B, 1, C, generator=g)).to(dtype)
        if _separated(m, class_token, distill_token):
            return m
    raise AssertionError("no separated metric found")


def _x(B, N, C, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, C, generator=g) * 2 + 0.5).to(dtype)


def _cos_tol(dtype):
    """Absolute tolerance on a cosine: fp32 rounding; fp16/bf16 inputs may go through tensor-core
    dots whose fp32 accumulation rounds a little differently."""
    return 2e-6 if dtype == torch.float32 else 1e-5


def _ref_match(metric, class_token, distill_token):
    s = _scores64(metric, class_token, distill_token)
    if s.shape[-1] == 0:  # a single token: no B token, nothing to match
        return torch.full(s.shape[:2], -math.inf, dtype=torch.float64), torch.zeros(s.shape[:2], dtype=torch.int64)
    return s.max(-1)


# --------------------------------------------------------------------------- the fused matching kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,C", [(2, 8), (3, 16), (17, 33), (40, 64), (67, 20)])
@pytest.mark.parametrize("cls,dist", [(False, False), (True, False), (True, True)])
def test_match_kernel_agrees_with_reference(backend_device, N, C, cls, dist, dtype):
    backend, device = backend_device
    _skip_bf16(backend, device, dtype)
    metric = _metric(2, N, C, dtype, seed=N * 7 + C, class_token=cls, distill_token=dist)
    exp_max, exp_idx = _ref_match(metric, cls, dist)
    got_max, got_idx = torch.ops.tokops.tome_match(metric.to(device), None, cls, dist, backend)
    assert got_max.dtype == torch.float32 and got_idx.dtype == torch.int64
    assert got_max.shape == exp_max.shape == ((2, (N + 1) // 2))
    assert torch.equal(got_idx.cpu(), exp_idx)
    fin = torch.isfinite(exp_max)
    assert torch.equal(torch.isfinite(got_max.cpu()), fin)
    torch.testing.assert_close(got_max.cpu()[fin].double(), exp_max[fin], atol=_cos_tol(dtype), rtol=0)


def test_match_kernel_ties_take_first_index(backend_device):
    """Exactly equal scores: node_idx is the first B index (like torch.max), and equal node_max
    keep ascending A order in the stable argsort."""
    backend, device = backend_device
    metric = _metric(1, 40, 24, seed=3).clone()
    metric[0, 2 * 13 + 1] = metric[0, 2 * 4 + 1]  # B 13 duplicates B 4 (B 4 lies in the first tile, B 13 in another)
    metric[0, 2 * 3] = metric[0, 2 * 4 + 1]  # A 3 == B 4: its best is B 4 and B 13 (tie)
    metric[0, 2 * 17] = metric[0, 2 * 4 + 1]  # A 17 too: node_max ties with A 3
    node_max, node_idx = torch.ops.tokops.tome_match(metric.to(device), None, False, False, backend)
    assert node_idx[0, 3].item() == 4 and node_idx[0, 17].item() == 4
    assert node_max[0, 3].item() == node_max[0, 17].item()
    m = M.bipartite_soft_matching(metric.to(device), 1, backend=backend)
    assert m.src_idx.tolist() == [[3]] and m.dst_idx.tolist() == [[4]]
    m = M.bipartite_soft_matching(metric.to(device), 2, backend=backend)
    assert m.src_idx.tolist() == [[3, 17]]
    rm = R.bipartite_soft_matching(metric, 2, score_dtype=torch.float64)
    assert torch.equal(m.src_idx.cpu(), rm.src_idx) and torch.equal(m.dst_idx.cpu(), rm.dst_idx)


def test_match_kernel_ties_across_tiles(backend_device):
    """An exact tie between B tokens in different tiles of the running max (B 4 in the first tile,
    copies at B 18 and B 35: other tiles for the 16-wide interpreter tiles and the 32-wide GPU tiles
    of nB = 40) keeps the first index, like torch.max."""
    backend, device = backend_device
    metric = _metric(1, 80, 24, seed=5).clone()
    for j in (18, 35):
        metric[0, 2 * j + 1] = metric[0, 2 * 4 + 1]
    metric[0, 2 * 3] = metric[0, 2 * 4 + 1]  # A 3 == B 4 == B 18 == B 35
    metric[0, 2 * 30] = metric[0, 2 * 4 + 1]
    node_max, node_idx = torch.ops.tokops.tome_match(metric.to(device), None, False, False, backend)
    exp_max, exp_idx = _ref_match(metric, False, False)
    assert node_idx[0, 3].item() == 4 and node_idx[0, 30].item() == 4
    assert torch.equal(node_idx.cpu(), exp_idx)


def test_match_kernel_multi_tile_large_c(backend_device):
    """More B tokens than one tile and C larger than one K block, ragged everywhere."""
    backend, device = backend_device
    metric = _metric(1, 150, 97, seed=11)
    exp_max, exp_idx = _ref_match(metric, False, False)
    got_max, got_idx = torch.ops.tokops.tome_match(metric.to(device), None, False, False, backend)
    assert torch.equal(got_idx.cpu(), exp_idx)
    torch.testing.assert_close(got_max.cpu().double(), exp_max, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------- ToMe matching + merge
CASES = [  # N, r, class_token, distill_token
    (16, 4, False, False), (17, 5, False, False), (33, 16, False, False), (33, 100, False, False),
    (24, 7, True, False), (25, 12, True, False), (25, 1, True, True), (30, 13, True, True),
    (2, 1, False, False), (3, 1, True, False), (9, 0, False, False), (1, 3, False, False),
]


@pytest.mark.parametrize("N,r,cls,dist", CASES)
def test_matching_and_merge_equal_reference(backend_device, N, r, cls, dist):
    backend, device = backend_device
    C = 20
    metric = _metric(3, N, C, seed=N + r, class_token=cls, distill_token=dist)
    x = _x(3, N, 12)
    rm = R.bipartite_soft_matching(metric, r, cls, dist, score_dtype=torch.float64)
    m = M.bipartite_soft_matching(metric.to(device), r, cls, dist, backend=backend)
    assert m.r == rm.r and m.n_out == N - rm.r and m.N == N
    if rm.r > 0:
        for name in ("unm_idx", "src_idx", "dst_idx"):
            assert torch.equal(getattr(m, name).cpu(), getattr(rm, name)), name
    xd = x.to(device)
    for mode in ("mean", "sum", "amax"):
        got = M.merge(m, xd, mode, backend=_mb(backend))
        assert got.shape == (3, N - rm.r, 12)
        torch.testing.assert_close(got.cpu(), R.merge(rm, x, mode), atol=1e-5, rtol=1e-5)
    got_x, got_s = M.merge_wavg(m, xd, backend=_mb(backend))
    exp_x, exp_s = R.merge_wavg(rm, x)
    torch.testing.assert_close(got_x.cpu(), exp_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_s.cpu(), exp_s)
    # second round with sizes (sizes != 1)
    got_x2, got_s2 = M.merge_wavg(m, xd, (torch.rand(3, N, 1) + 0.5).to(device), backend=_mb(backend))
    assert not got_x2.isnan().any() and got_s2.shape == got_s.shape
    torch.testing.assert_close(M.merge_source(m, xd, backend=_mb(backend)).cpu(), R.merge_source(rm, x))
    merged = R.merge(rm, x)
    torch.testing.assert_close(M.unmerge(m, merged.to(device), backend=_mb(backend)).cpu(), R.unmerge(rm, merged))
    # Matching methods
    torch.testing.assert_close(m.merge(xd, "sum", backend=_mb(backend)).cpu(), R.merge(rm, x, "sum"),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_low_precision(backend_device, dtype):
    backend, device = backend_device
    _skip_bf16(backend, device, dtype)
    metric = _metric(2, 31, 16, dtype, seed=5, class_token=True)
    x = _x(2, 31, 40, dtype)
    m = M.bipartite_soft_matching(metric.to(device), 9, True, backend=backend)
    rm = R.bipartite_soft_matching(metric, 9, True, score_dtype=torch.float64)
    assert torch.equal(m.src_idx.cpu(), rm.src_idx)
    exp = R.merge(rm, x.double(), "mean")
    got = M.merge(m, x.to(device), "mean", backend=_mb(backend)).cpu()
    assert got.dtype == dtype
    err = (got.double() - exp).abs().max()
    err_torch = (R.merge(rm, x, "mean").double() - exp).abs().max()  # the same computation in torch, in dtype
    assert err <= 2 * err_torch + 1e-6


def test_fractional_r_and_identity():
    metric = _metric(2, 20, 8, seed=9)
    m = M.bipartite_soft_matching(metric, 0.25)
    assert m.r == 5 and m.n_out == 15
    assert M.bipartite_soft_matching(metric, 1.0).r == 10
    ident = M.bipartite_soft_matching(metric, 0)
    x = _x(2, 20, 4)
    assert ident.is_identity and M.merge(ident, x) is x and M.unmerge(ident, x) is x
    out, size = M.merge_wavg(ident, x)
    torch.testing.assert_close(out, x)
    assert (size == 1).all()


# --------------------------------------------------------------------------- padded batches
def _padded_case(B, N, C, lengths, seed=0, prefix=True):
    metric = _metric(B, N, C, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    if prefix:
        valid = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    else:
        valid = torch.rand(B, N, generator=g) < 0.7
        valid[:, 0] = True
    metric = metric.masked_fill(~valid[..., None], 0.0)  # zero padding: a NaN norm that must be masked
    return metric, valid


@pytest.mark.parametrize("r,cls,prefix", [(3, False, True), (8, True, True), (0.3, False, True), (0.5, True, True),
                                          (3, True, False), (8, False, False), (0.3, True, False),
                                          (0.5, False, False)])
def test_padded_batches(backend_device, r, cls, prefix):
    backend, device = backend_device
    B, N, C = 5, 23, 16
    lengths = [23, 14, 9, 2, 1]
    metric, valid = _padded_case(B, N, C, lengths, seed=int(r * 10) + 3 * cls + prefix, prefix=prefix)
    x = _x(B, N, 6)
    m = M.bipartite_soft_matching(metric.to(device), r, cls, valid=valid.to(device), backend=backend)
    groups = R.padded_groups(metric, valid, r, cls)
    n_keep = [len(g) for g in groups]
    assert m.n_out == max(n_keep)
    assert m.valid.cpu().tolist() == [[o < k for o in range(m.n_out)] for k in n_keep]
    xd = x.to(device)
    for mode in ("sum", "mean", "amax"):
        got = M.merge(m, xd, mode, backend=_mb(backend)).cpu()
        torch.testing.assert_close(got, R.apply_groups(groups, x, m.n_out, mode), atol=1e-5, rtol=1e-5)
    # padding never merged into real tokens: every real output group holds only valid tokens
    src = M.merge_source(m, xd, backend=_mb(backend)).cpu()
    assert (src[m.valid.cpu()] * (~valid[:, None, :]).float().expand(B, m.n_out, N)[m.valid.cpu()]).sum() == 0
    assert (src[~m.valid.cpu()] == 0).all()
    wx, size = M.merge_wavg(m, xd, backend=_mb(backend))
    assert not wx.isnan().any()
    assert (size.cpu()[..., 0][~m.valid.cpu()] == 0).all()
    torch.testing.assert_close(wx.cpu(), R.apply_groups(groups, x, m.n_out, "mean"), atol=1e-5, rtol=1e-5)
    if prefix:  # each row equals unpadded ToMe on its own valid prefix
        for b, L in enumerate(lengths):
            r_b = R.rows_r(r, [L], int(cls))[0]
            rm = R.bipartite_soft_matching(metric[b:b + 1, :L], r_b, cls, score_dtype=torch.float64)
            exp = R.merge(rm, x[b:b + 1, :L], "mean")
            torch.testing.assert_close(M.merge(m, xd, backend=_mb(backend)).cpu()[b:b + 1, :exp.shape[1]], exp,
                                       atol=1e-5, rtol=1e-5)


def test_padded_all_valid_equals_unpadded(backend_device):
    backend, device = backend_device
    metric = _metric(2, 21, 8, seed=4, class_token=True).to(device)
    valid = torch.ones(2, 21, dtype=torch.bool, device=device)
    a = M.bipartite_soft_matching(metric, 6, True, valid=valid, backend=backend)
    b = M.bipartite_soft_matching(metric, 6, True, backend=backend)
    assert torch.equal(a.slot, b.slot) and a.n_out == b.n_out and a.valid.all()


# --------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("mode", ["mean", "sum", "amax"])
def test_merge_gradients_match_float64_reference(backend_device, mode):
    backend, device = backend_device
    N, C = 27, 10
    metric = _metric(2, N, 12, seed=21, class_token=True)
    m = M.bipartite_soft_matching(metric.to(device), 10, True, backend=backend)
    rm = R.bipartite_soft_matching(metric, 10, True, score_dtype=torch.float64)
    x = _x(2, N, C)
    if mode == "amax":  # a source equal to its destination: the gradient is split between them, like torch
        a, d = rm.src_idx[0, 0].item(), rm.dst_idx[0, 0].item()
        x[0, 2 * a] = x[0, 2 * d + 1]
    w = _x(2, N - 10, C, seed=7)
    x64 = x.double().requires_grad_()
    (R.merge(rm, x64, mode) * w.double()).sum().backward()
    xt = x.clone().to(device).requires_grad_()
    (M.merge(m, xt, mode, backend=_mb(backend)) * w.to(device)).sum().backward()
    torch.testing.assert_close(xt.grad.cpu().double(), x64.grad, atol=1e-6, rtol=1e-5)
    # unmerge gradient
    y64 = R.merge(rm, x.double()).requires_grad_()
    w2 = _x(2, N, C, seed=8)
    (R.unmerge(rm, y64) * w2.double()).sum().backward()
    yt = y64.detach().float().to(device).requires_grad_()
    (M.unmerge(m, yt, backend=_mb(backend)) * w2.to(device)).sum().backward()
    torch.testing.assert_close(yt.grad.cpu().double(), y64.grad, atol=1e-6, rtol=1e-5)


def test_merge_wavg_gradient(backend_device):
    backend, device = backend_device
    metric = _metric(2, 18, 8, seed=2)
    m = M.bipartite_soft_matching(metric.to(device), 6, backend=backend)
    rm = R.bipartite_soft_matching(metric, 6, score_dtype=torch.float64)
    x, size = _x(2, 18, 5), torch.rand(2, 18, 1) + 0.5
    x64, s64 = x.double().requires_grad_(), size.double().requires_grad_()
    a, b = R.merge_wavg(rm, x64, s64)
    (a.sum() + (a * b).pow(2).sum()).backward()
    xt, st = x.clone().to(device).requires_grad_(), size.clone().to(device).requires_grad_()
    a, b = M.merge_wavg(m, xt, st, backend=_mb(backend))
    (a.sum() + (a * b).pow(2).sum()).backward()
    torch.testing.assert_close(xt.grad.cpu().double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.grad.cpu().double(), s64.grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- PiToMe
@pytest.mark.parametrize("formula", ["design", "elu"])
@pytest.mark.parametrize("N,C", [(1, 8), (19, 16), (70, 40)])
def test_pitome_energy(backend_device, N, C, formula):
    backend, device = backend_device
    metric = _x(2, N, C, seed=N)
    for margin in (0.1, 0.6):
        exp = R.pitome_energy(metric, margin, 0.8, formula, torch.float64)
        got = M.pitome_energy(metric.to(device), margin, 0.8, formula=formula, backend=_mb(backend))
        assert got.dtype == torch.float32 and got.shape == (2, N)
        torch.testing.assert_close(got.cpu(), exp, atol=2e-6, rtol=1e-5)


def _pitome_separated(metric, r, margin, cls):
    m = metric[:, 1:] if cls else metric
    e = R.pitome_energy(m, margin, 1.0, "elu", torch.float64).double()
    ev = e.sort(-1).values
    if (ev[:, 1:] - ev[:, :-1]).min() < 1e-5:
        return False
    protected_idx, a_idx, b_idx, _ = R.pitome_groups(metric, r, margin, 1.0, cls)
    mm = m.double() / m.double().norm(dim=-1, keepdim=True)
    bi = torch.arange(m.shape[0])[:, None, None]
    s = (mm @ mm.transpose(-1, -2))[bi, a_idx[:, :, None], b_idx[:, None, :]]
    if s.shape[-1] > 1:
        t = s.topk(2, -1).values
        return bool(((t[..., 0] - t[..., 1]) > 1e-4).all())
    return True


@pytest.mark.parametrize("N,r,cls", [(20, 6, False), (21, 10, True), (33, 3, True), (9, 100, False)])
def test_pitome_merge_matches_reference_code(backend_device, N, r, cls):
    backend, device = backend_device
    margin = 0.3
    for seed in range(100):
        metric = _x(2, N, 16, seed=seed) + _x(2, 1, 16, seed=seed + 500)
        r_eff = min(r, (N - int(cls)) // 2)
        if _pitome_separated(metric, r_eff, margin, cls):
            break
    x = _x(2, N, 7, seed=3)
    m = M.pitome_merge(metric.to(device), r, margin, class_token=cls, backend=_mb(backend))
    assert m.n_out == N - r_eff
    for mode in ("mean", "sum"):
        exp = R.pitome_merge_ref(metric, x, r_eff, margin, 1.0, cls, "elu", mode)
        got = M.merge(m, x.to(device), mode, backend=_mb(backend)).cpu()
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- pruning
def test_prune_topk_and_scatter_back(backend_device):
    backend, device = backend_device
    B, N, C = 3, 29, 9
    x = _x(B, N, C).to(device).requires_grad_()
    scores = torch.randn(B, N).to(device)
    scores[1, 5] = scores[1, 20] = 100.0  # a tie: the lower index wins when only one fits
    kept, idx = M.prune_topk(x, scores, 11, protect=1, backend=_mb(backend))
    assert kept.shape == (B, 11, C) and idx.shape == (B, 11)
    for b in range(B):
        s = scores[b].clone()
        s[0] = math.inf
        exp = sorted(torch.argsort(s, descending=True, stable=True)[:11].tolist())
        assert idx[b].tolist() == exp
    assert (idx[:, 0] == 0).all()
    torch.testing.assert_close(kept, x.detach().gather(1, idx[..., None].expand(B, 11, C)))
    kept1, idx1 = M.prune_topk(x, scores, 1, backend=_mb(backend))
    assert idx1[1].item() == 5
    w = torch.randn(B, 11, C, device=device)
    (kept * w).sum().backward()
    exp_grad = torch.zeros(B, N, C, device=device).scatter(1, idx[..., None].expand(B, 11, C), w)
    torch.testing.assert_close(x.grad, exp_grad)
    # scatter back: zeros, a float, a tensor
    full = M.scatter_back(kept.detach(), idx, N, backend=_mb(backend))
    mask = torch.zeros(B, N, dtype=torch.bool, device=device).scatter(1, idx, True)
    torch.testing.assert_close(full[mask], x.detach()[mask])
    assert (full[~mask] == 0).all()
    assert (M.scatter_back(kept.detach(), idx, N, fill=-2.5, backend=_mb(backend))[~mask] == -2.5).all()
    k2 = kept.detach().clone().requires_grad_()
    back = M.scatter_back(k2, idx, N, fill=x.detach(), backend=_mb(backend))
    torch.testing.assert_close(back, x.detach())
    (back * 2).sum().backward()
    assert (k2.grad == 2).all()
    # masks and fractions
    prot = torch.zeros(N, dtype=torch.bool, device=device)
    prot[[3, 28]] = True
    _, idx2 = M.prune_topk(x, scores, 0.25, protect=prot, backend=_mb(backend))
    assert idx2.shape == (B, 7) and (idx2 == 3).any(1).all() and (idx2 == 28).any(1).all()


# --------------------------------------------------------------------------- bad input
def _bad_calls():
    metric = torch.randn(2, 10, 8)
    x = torch.randn(2, 10, 4)
    m = M.bipartite_soft_matching(metric, 3)
    yield "metric", TypeError, lambda: M.bipartite_soft_matching(metric.double(), 2)
    yield "metric", ValueError, lambda: M.bipartite_soft_matching(metric[0], 2)
    # (a strided metric is accepted since issue 16: tests/test_strided.py)
    yield "r", ValueError, lambda: M.bipartite_soft_matching(metric, -1)
    yield "r", ValueError, lambda: M.bipartite_soft_matching(metric, 1.5)
    yield "r", TypeError, lambda: M.bipartite_soft_matching(metric, "3")
    yield "r", TypeError, lambda: M.bipartite_soft_matching(metric, True)
    yield "class_token", TypeError, lambda: M.bipartite_soft_matching(metric, 2, 1)
    yield "distill_token", ValueError, lambda: M.bipartite_soft_matching(metric, 2, False, True)
    yield "valid", TypeError, lambda: M.bipartite_soft_matching(metric, 2, valid=torch.ones(2, 10))
    yield "valid", ValueError, lambda: M.bipartite_soft_matching(metric, 2, valid=torch.ones(2, 9, dtype=torch.bool))
    yield "x", ValueError, lambda: M.merge(m, torch.randn(2, 9, 4))
    yield "x", TypeError, lambda: M.merge(m, x.to(torch.int32))
    yield "mode", ValueError, lambda: M.merge(m, x, "max")
    yield "matching", TypeError, lambda: M.merge(tuple(m), x)
    yield "size", ValueError, lambda: M.merge_wavg(m, x, torch.ones(2, 10, 2))
    yield "x", ValueError, lambda: M.unmerge(m, x)
    yield "margin", TypeError, lambda: M.pitome_energy(metric, "0.5")
    yield "formula", ValueError, lambda: M.pitome_energy(metric, 0.5, formula="paper")
    yield "r", TypeError, lambda: M.pitome_merge(metric, 0.5, 0.5)
    yield "keep", ValueError, lambda: M.prune_topk(x, torch.randn(2, 10), 11)
    yield "keep", ValueError, lambda: M.prune_topk(x, torch.randn(2, 10), 0)
    yield "scores", ValueError, lambda: M.prune_topk(x, torch.randn(2, 9), 3)
    yield "protect", ValueError, lambda: M.prune_topk(x, torch.randn(2, 10), 3, protect=4)
    yield "protect", ValueError, lambda: M.prune_topk(x, torch.randn(2, 10), 3, protect=torch.ones(3, dtype=torch.bool))
    yield "kept_idx", TypeError, lambda: M.scatter_back(x, torch.zeros(2, 10, dtype=torch.int32), 12)
    yield "N", ValueError, lambda: M.scatter_back(x, torch.zeros(2, 10, dtype=torch.int64), 5)
    yield "backend must be one of", ValueError, lambda: M.bipartite_soft_matching(metric, 2, backend="fast")


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_inputs(case):
    name, exc, call = list(_bad_calls())[case]
    with pytest.raises(exc, match=name):
        call()


# --------------------------------------------------------------------------- registry / compile
def test_opcheck(backend_device):
    backend, device = backend_device
    metric = _metric(2, 19, 16, seed=1).to(device)
    valid = (torch.arange(19) < 15).expand(2, 19).contiguous().to(device)
    torch.library.opcheck(torch.ops.tokops.tome_match.default, (metric, None, True, False, backend))
    torch.library.opcheck(torch.ops.tokops.tome_match.default, (metric, valid, False, False, backend))
    m = M.bipartite_soft_matching(metric, 6, backend=backend)
    x = _x(2, 19, 8).to(device).requires_grad_()
    for mode in ("mean", "amax"):
        torch.library.opcheck(torch.ops.tokops.tome_segment_reduce.default,
                              (x, m.slot, m.order, m.offsets, mode, _mb(backend)))
    torch.library.opcheck(torch.ops.tokops.token_gather.default, (x, m.slot[:, :13].contiguous(), 0.5, _mb(backend)))
    torch.library.opcheck(torch.ops.tokops.pitome_energy.default, (metric, 0.4, 1.0, True, _mb(backend)))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def step(metric, x, size):
        m = M.bipartite_soft_matching(metric, 7, class_token=True)
        x, size = M.merge_wavg(m, x, size)
        return x, size, M.unmerge(m, x)

    metric, x = _metric(2, 30, 16, seed=2, class_token=True).to(device), _x(2, 30, 8).to(device)
    size = torch.ones(2, 30, 1, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    for got, exp in zip(compiled(metric, x, size), step(metric, x, size)):
        torch.testing.assert_close(got, exp)


# --------------------------------------------------------------------------- end to end
class _Block:
    """A pre-norm ViT block with random weights, in plain torch; ToMe between attention and MLP."""

    def __init__(self, C, H, seed):
        g = torch.Generator().manual_seed(seed)
        w = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[0])  # noqa: E731
        self.H, self.qkv, self.proj, self.fc1, self.fc2 = H, w(C, 3 * C), w(C, C), w(C, 2 * C), w(2 * C, C)

    def attn(self, x, size):
        B, N, C = x.shape
        q, k, v = (x @ self.qkv).view(B, N, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(C // self.H)
        logits = logits + size.log()[:, None, None, :, 0]  # proportional attention: key_bias = log(size)
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C) @ self.proj, k.mean(1)

    def __call__(self, x, size, r, use_tokops, backend):
        ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:])  # noqa: E731
        a, metric = self.attn(ln(x), size)
        x = x + a
        if use_tokops:
            m = M.bipartite_soft_matching(metric.contiguous(), r, class_token=True, backend=backend)
            x, size = M.merge_wavg(m, x.contiguous(), size, backend=_mb(backend))
        else:
            m = R.bipartite_soft_matching(metric, r, class_token=True, score_dtype=torch.float64)
            x, size = R.merge_wavg(m, x, size)
        x = x + torch.nn.functional.gelu(ln(x) @ self.fc1) @ self.fc2
        return x, size


def test_tome_transformer_end_to_end(backend_device):
    backend, device = backend_device
    C, H, N = 32, 4, 49
    blocks = [_Block(C, H, seed=s) for s in range(4)]
    x0 = _x(2, N, C, seed=42)
    for blk in blocks:
        for k in ("qkv", "proj", "fc1", "fc2"):
            setattr(blk, k, getattr(blk, k).to(device))
    outs = []
    for use in (False, True):
        x, size = x0.to(device), torch.ones(2, N, 1, device=device)
        for blk in blocks:
            x, size = blk(x, size, 8, use, backend)
        outs.append((x.cpu(), size.cpu()))
    (xr, sr), (xt, st) = outs
    assert xt.shape == (2, N - 4 * 8, C)
    assert torch.equal(st, sr) and sr.sum(1).eq(N).all()
    torch.testing.assert_close(xt, xr, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_match_op_rejects_bad_input_directly():
    if not (torch.cuda.is_available() and tokops.cuda_compiled()):
        pytest.skip("CUDA kernels not built")
    metric = torch.randn(2, 10, 8, device="cuda")
    with pytest.raises(RuntimeError, match="valid must have shape"):
        torch.ops.tokops.tome_match_cuda(metric, torch.ones(2, 9, dtype=torch.bool, device="cuda"), False, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.tokops.tome_match_cuda(metric.transpose(1, 2), None, False, False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.tokops.tome_match_cuda(metric.double(), None, False, False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_match_kernel_large(dtype):
    """Every GPU backend on sizes past several tiles, with padding masks, against float64."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 1037, 200, generator=g).to(dtype)
    valid = torch.arange(1037)[None, :] < torch.tensor([1037, 300, 31])[:, None]
    s = _scores64(metric, class_token=True)
    s = s.masked_fill(~valid[:, 1::2][:, None, :] | ~valid[:, 0::2][:, :, None], -math.inf)
    exp_max, exp_idx = s.max(-1)
    exp_idx = torch.where(torch.isfinite(exp_max), exp_idx, 0)
    fin = torch.isfinite(exp_max)
    top2 = s.topk(2, dim=-1).values
    tol = _cos_tol(dtype)
    clear = (top2[..., 0] - top2[..., 1] > 5 * tol) | ~fin  # rows whose argmax is unambiguous
    backends = ["torch", "triton"] + (["cuda"] if tokops.cuda_compiled() else [])
    for backend in backends:
        got_max, got_idx = torch.ops.tokops.tome_match(metric.cuda(), valid.cuda(), True, False, backend)
        got_max, got_idx = got_max.cpu(), got_idx.cpu()
        assert torch.equal(got_idx[clear], exp_idx[clear]), backend
        # elsewhere the chosen B token scores within the tolerance of the best one
        chosen = s.gather(-1, got_idx[..., None])[..., 0]
        assert ((exp_max - chosen)[fin] <= 5 * tol).all(), backend
        assert torch.equal(torch.isfinite(got_max), fin), backend
        torch.testing.assert_close(got_max[fin].double(), exp_max[fin], atol=tol, rtol=0)


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import tokops.triton_kernels.merge as K

target = GPUTarget("cuda", int(sys.argv[1]), 32)
ptr = lambda dt: "*" + dt
for dt in ("fp32", "fp16"):
    ieee = dt == "fp32"
    jobs = [
        (K._match_kernel, dict(m_ptr=ptr(dt), inv_ptr="*fp32", valid_ptr="*i8", exp_ptr="*i32", flag_ptr="*i32",
                               max_ptr="*fp32", idx_ptr="*i64", N="i32", C="i32", nA="i32", nB="i32", sm_b="i32",
                               sm_n="i32"),
         dict(CLS=True, DIST=True, HAS_VALID=True, IEEE=ieee, SCALE=ieee, BM=64, BN=64, BK=64)),
        (K._row_norm_kernel, dict(m_ptr=ptr(dt), inv_ptr="*fp32", exp_ptr="*i32", flag_ptr="*i32", rows="i32",
                                  N="i32", C="i32"), dict(SCALE=ieee, BR=8, BC=256)),
        (K._energy_kernel, dict(m_ptr=ptr(dt), inv_ptr="*fp32", out_ptr="*fp32", N="i32", C="i32", sm_b="i32",
                                sm_n="i32", margin="fp32", alpha="fp32"),
         dict(ELU=False, IEEE=ieee, BM=64, BN=64, BK=64)),
        (K._segment_reduce_kernel, dict(x_ptr=ptr(dt), order_ptr="*i64", offs_ptr="*i64", out_ptr=ptr(dt), N="i32",
                                        C="i32", n_out="i32"), dict(MODE=1, BC=256)),
        (K._gather_kernel_b, dict(x_ptr=ptr(dt), idx_ptr="*i64", out_ptr=ptr(dt), Mb="i32", N_in="i32", C="i32",
                                  fill="fp32"), dict(BR=8, BC=512)),
    ]
    for fn, sig, consts in jobs:
        sig.update({k: "constexpr" for k in consts})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        assert "cubin" in k.asm, fn
print("compiled")
"""


@pytest.mark.parametrize("arch", [90])
def test_triton_kernels_compile_for_gpu(tmp_path, arch):
    """The interpreter does not lower kernels: compile every merge kernel to a cubin for an H100
    (no GPU needed), in a subprocess without TRITON_INTERPRET and with a private cache."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
