"""Fuzzing token merging: every input gives the reference answer or a clear error."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokops
from tokops.merge import reference as R

from backends import runnable_backends
from fuzzing import assert_most_reach
from test_merge import _mb, _scores64, _separated

BACKENDS = runnable_backends()
M = tokops.merge


def _check_structure(m, x, N, valid=None):
    """What holds for any correct matching, ties or not: every token lands in exactly one output
    token (padding: none), sizes add up, outputs are finite."""
    be = "torch"
    src = M.merge_source(m, x, backend=be)
    owners = src.sum(1)  # (B, N): how many outputs hold each original token
    expect = torch.ones_like(owners) if valid is None else valid.to(owners.dtype)
    assert torch.equal(owners, expect)
    _, size = M.merge_wavg(m, x, backend=be)
    n_valid = torch.full((x.shape[0],), N) if valid is None else valid.sum(1)
    assert torch.equal(size.sum((1, 2)).round().long().cpu(), n_valid.cpu())


# Seeded (derandomize=True) and mostly valid: one example in 5 corrupts one argument, the others are
# valid with N >= 2 and r >= 1 and well-separated scores more often than not, so that most examples
# reach the reference comparison; REACHED records it (test_fuzz_examples_mostly_reach_the_reference).
REACHED: dict[str, list[bool]] = {}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def matching_inputs(draw):
    backend, device = draw(st.sampled_from(BACKENDS))
    shape = (draw(st.integers(1, 3)), draw(st.integers(4, 40)), draw(st.integers(1, 40)))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float16]))
    r = draw(st.one_of(st.integers(1, 25), st.floats(0.25, 1.0)))  # int(r * N) >= 1
    cls = draw(st.booleans())
    dist = cls and draw(st.booleans())
    transpose = False
    if draw(st.integers(0, 4)) == 0:  # corrupt one argument
        bad = draw(st.sampled_from(["ndim", "dtype", "r", "transpose", "empty"]))
        if bad == "ndim":
            shape = tuple(draw(st.lists(st.integers(0, 12), min_size=1, max_size=4).filter(lambda s: len(s) != 3)))
        elif bad == "dtype":
            dtype = draw(st.sampled_from([torch.float64, torch.int32]))
        elif bad == "r":
            r = draw(st.sampled_from([-2, -0.5, 1.5, True, "2", None]))
        elif bad == "transpose":
            transpose = True
        else:
            shape = (shape[0], 0, shape[2])
    return shape, dtype, r, cls, dist, transpose, backend, device, draw(st.integers(0, 2**16))


@settings(max_examples=60, **SETTINGS)
@given(matching_inputs())
def test_matching_fuzz(args):
    shape, dtype, r, cls, dist, transpose, backend, device, seed = args
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point else \
        torch.randint(-5, 5, shape, generator=g, dtype=dtype)
    if transpose:
        metric = metric.transpose(-1, -2)
    metric = metric.to(device)
    reached = REACHED.setdefault("test_matching_fuzz", [])
    try:
        m = M.bipartite_soft_matching(metric, r, cls, dist, backend=backend)
    except (TypeError, ValueError) as e:
        assert any(name in str(e) for name in ("metric", "r ", "r as", "class_token", "distill_token")), e
        reached.append(False)
        return
    B, N, C = metric.shape
    x = torch.randn(B, N, 5, generator=g).to(device)
    r_int = r if isinstance(r, int) else int(r * N)
    rm = R.bipartite_soft_matching(metric.cpu(), r_int, cls, dist, score_dtype=torch.float64)
    assert m.n_out == N - rm.r
    _check_structure(m, x, N)
    hit = bool(rm.r and _separated(metric.cpu(), cls, dist))
    reached.append(hit)
    if hit:
        assert torch.equal(m.src_idx.cpu(), rm.src_idx) and torch.equal(m.dst_idx.cpu(), rm.dst_idx)
        torch.testing.assert_close(M.merge(m, x, backend=_mb(backend)).cpu(), R.merge(rm, x.cpu()),
                                   atol=1e-5, rtol=1e-5)


def _padded_separated(metric, valid, cls, dist, gap=1e-4) -> bool:
    """_separated for the masked float64 scores of a padded batch (valid pairs only)."""
    s = _scores64(metric.masked_fill(~valid[..., None], 1.0), cls, dist)
    s = s.masked_fill(~valid[:, 0::2, None] | ~valid[:, None, 1::2], float("-inf"))
    for row in s:
        for scores in row:
            v = scores[torch.isfinite(scores)].sort(descending=True).values
            if v.numel() > 1 and v[0] - v[1] < gap:
                return False
        if row.shape[-1]:
            nm = row.max(-1).values
            v = nm[torch.isfinite(nm)].sort().values
            if v.numel() > 1 and (v[1:] - v[:-1]).min() < gap:
                return False
    return True


@st.composite
def valid_matching_inputs(draw):
    B, N, C = draw(st.integers(1, 3)), draw(st.integers(1, 45)), draw(st.integers(1, 40))
    # r = 0 and N = 1 (identity merges) stay possible but rare: most examples merge something
    if draw(st.integers(0, 9)) == 0:
        N, r = draw(st.integers(1, 3)), draw(st.one_of(st.integers(0, 2), st.floats(0.0, 0.2)))
    else:
        N = max(N, 4)
        r = draw(st.one_of(st.integers(1, 25), st.floats(0.25, 1.0)))
    cls = draw(st.booleans())
    dist = cls and draw(st.booleans())
    backend, device = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16] + ([] if backend == "triton" and device == "cpu"
                                                                   else [torch.bfloat16])))
    return (B, N, C), dtype, r, cls, dist, backend, device, draw(st.integers(0, 2**16))


@settings(max_examples=40, **SETTINGS)
@given(valid_matching_inputs())
def test_matching_fuzz_valid(args):
    shape, dtype, r, cls, dist, backend, device, seed = args
    g = torch.Generator().manual_seed(seed)
    metric = (torch.randn(shape, generator=g) + torch.randn(shape[0], 1, shape[2], generator=g)).to(dtype)
    B, N, C = shape
    m = M.bipartite_soft_matching(metric.to(device), r, cls, dist, backend=backend)
    x = torch.randn(B, N, 4, generator=g).to(dtype)
    rm = R.bipartite_soft_matching(metric, r if isinstance(r, int) else int(r * N), cls, dist,
                                   score_dtype=torch.float64)
    assert m.n_out == N - rm.r and m.r == rm.r
    _check_structure(m, x.to(device).float(), N)
    hit = bool(rm.r and _separated(metric, cls, dist))
    REACHED.setdefault("test_matching_fuzz_valid", []).append(hit)
    if hit:
        assert torch.equal(m.src_idx.cpu(), rm.src_idx) and torch.equal(m.dst_idx.cpu(), rm.dst_idx)
        assert torch.equal(m.unm_idx.cpu(), rm.unm_idx)
        got = M.merge(m, x.to(device), "sum", backend=_mb(backend)).cpu().double()
        torch.testing.assert_close(got, R.merge(rm, x.double(), "sum"), atol=0.05, rtol=0.02)


@st.composite
def padded_inputs(draw):
    B, N, C = draw(st.integers(1, 4)), draw(st.integers(1, 30)), draw(st.integers(1, 20))
    r = draw(st.one_of(st.integers(0, 16), st.floats(0.0, 1.0)))
    cls = draw(st.booleans())
    dist = cls and draw(st.booleans())
    backend, device = draw(st.sampled_from(BACKENDS))
    return B, N, C, r, cls, dist, draw(st.booleans()), backend, device, draw(st.integers(0, 2**16))


@settings(max_examples=40, **SETTINGS)
@given(padded_inputs())
def test_padded_fuzz(args):
    B, N, C, r, cls, dist, prefix, backend, device, seed = args
    g = torch.Generator().manual_seed(seed)
    if prefix:
        valid = torch.arange(N)[None, :] < torch.randint(0, N + 1, (B, 1), generator=g)
    else:
        valid = torch.rand(B, N, generator=g) < 0.6
    metric = torch.randn(B, N, C, generator=g).masked_fill(~valid[..., None], 0.0)
    x = torch.randn(B, N, 3, generator=g)
    m = M.bipartite_soft_matching(metric.to(device), r, cls, dist, valid=valid.to(device), backend=backend)
    _check_structure(m, x.to(device), N, valid.to(device))
    groups = R.padded_groups(metric, valid, r, cls, dist)
    assert m.n_out == max(len(row) for row in groups)
    hit = _padded_separated(metric, valid, cls, dist)
    REACHED.setdefault("test_padded_fuzz", []).append(hit)
    if hit:
        exp = R.apply_groups(groups, x, m.n_out, "mean")
        torch.testing.assert_close(M.merge(m, x.to(device), backend=_mb(backend)).cpu(), exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- non-finite / huge metrics (issue 15)
@st.composite
def hostile_metrics(draw):
    B, N, C = draw(st.integers(1, 2)), draw(st.integers(2, 30)), draw(st.sampled_from([4, 16]))
    kind = draw(st.sampled_from(["nan", "inf", "zero", "huge", "tiny", "all_zero"]))
    r = draw(st.one_of(st.integers(0, 16), st.floats(0.0, 0.5)))
    cls = draw(st.booleans())
    padded = draw(st.booleans())
    return B, N, C, kind, r, cls, padded, draw(st.integers(0, 2**16))


@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_metrics())
def test_tome_non_finite_and_huge_metric_fuzz(args):
    """One plan on every backend for NaN/inf/zero/huge metrics; the class token never merges; the
    plan is a valid matching (every token in exactly one output)."""
    B, N, C, kind, r, cls, padded, seed = args
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, C, generator=g)
    t = int(torch.randint(N, (), generator=g))
    if kind == "nan":
        metric[0, t, 0] = float("nan")
    elif kind == "inf":
        metric[0, t, 1 % C] = float("inf")
    elif kind == "zero":
        metric[0, t] = 0
    elif kind == "huge":
        metric[0] *= 2.0 ** 90
    elif kind == "tiny":
        metric[0] *= 2.0 ** -90
    else:
        metric.zero_()
    valid = None
    if padded:
        valid = torch.arange(N)[None, :] < torch.randint(1, N + 1, (B, 1), generator=g)
    plans = []
    for backend, device in BACKENDS:
        m = M.bipartite_soft_matching(metric.to(device), r, class_token=cls,
                                      valid=None if valid is None else valid.to(device), backend=backend)
        plans.append(m)
        if cls:
            assert (m.slot[:, 0].cpu() == 0).all() and ((m.slot.cpu() == 0).sum(1) == 1).all()
    for m in plans[1:]:
        assert m.n_out == plans[0].n_out and torch.equal(m.slot.cpu(), plans[0].slot.cpu())
    _check_structure(plans[0], torch.randn(B, N, 3, generator=g).to(plans[0].slot.device), N,
                     None if valid is None else valid.to(plans[0].slot.device))


def test_fuzz_examples_mostly_reach_the_reference():
    """Most fuzz examples reach the reference comparison (derandomized: the fraction is fixed)."""
    if "test_matching_fuzz" not in REACHED:
        pytest.skip("run together with the fuzz tests")
    assert_most_reach(REACHED, 0.6)
