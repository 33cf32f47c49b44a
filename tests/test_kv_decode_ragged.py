"""Decode attention over ragged rows (issue 14 item 1, kernel side; issue 12 item 2): the op
``tokops::kv_decode_attention`` with per-row lengths ``n_quant, n_res: int32 (B,)`` on the device and
``max_len``, against a float64 loop per row, on every backend (torch; Triton under the interpreter;
the CUDA kernel under the emulation through tests/emu/test_kernels.py).

The ragged batches are built from one single-row ``QuantizedKVCache`` per row (different appends per
row), their buffers stacked into one capacity-sized batch; the padding of each row past its own
buffers is poisoned (NaN scales, random codes, NaN residual tokens), so a kernel reading past a row's
length fails.  Also: the launch grid does not depend on the lengths; ``torch.compile(fullgraph=True)``
over the op call with length tensors compiles once for every length; no host sync in a decode call;
CUDA-graph replay over 16 steps (GPU only)."""

import math

import pytest
import torch

from tokops import _registry
from tokops.kv import QuantizedKVCache, decode_attention

from nosync import no_host_sync
from oracles import cache_kv, naive_decode, ulp_floor

D = 32
# (mode, bits_k, bits_v, key_axis, value_axis, group_size, residual)
CONFIGS = [
    ("int", 4, 4, -2, -1, 16, 24),   # KIVI, groups smaller than the Triton tile (grouped dequant)
    ("int", 2, 8, -2, -2, 32, 8),    # both per channel, groups of the tile (scale/zero folded)
    ("int", 8, 2, -1, -1, 16, 16),   # both per token
    ("int", 4, 4, -2, -1, 32, 0),    # no residual window: rows without residual tokens
    ("fp8", 8, 8, -1, -1, 16, 24),
]
CFG_IDS = ["-".join(map(str, c)) for c in CONFIGS]

# per row: appends (chunk sizes); None = an empty row (an empty append: shape only)
ROWS = [
    [70, 1, 3],      # quantized + residual
    [5],             # n_quant = 0 (residual only, unless residual=0)
    [1],             # L = 1 < nq (for nq = 3)
    None,            # L = 0: nothing visible, out 0 and LSE -inf
    [40, 40, 9],     # longest row
    [2],             # L = 2 < nq
]


def _kv(n, Hk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, Hk, n, D, generator=g) * 1.5 + torch.rand(1, Hk, 1, D, generator=g)
    v = torch.randn(1, Hk, n, D, generator=g) + 0.3
    return k.to(dtype), v.to(dtype)


def _poison(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if t.dtype in (torch.int32, torch.uint8):
        hi = 2 ** 31 - 1 if t.dtype == torch.int32 else 255
        return torch.randint(0, hi, t.shape, generator=g, dtype=torch.int64).to(t.dtype)
    return torch.full(t.shape, float("nan"), dtype=t.dtype)


def _pad(t: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``t`` padded along dim 2 to ``n`` entries with poison."""
    if t.shape[2] >= n:
        return t
    shape = list(t.shape)
    shape[2] = n - t.shape[2]
    return torch.cat([t, _poison(torch.empty(shape, dtype=t.dtype), g)], 2)


def make_ragged(cfg, rows=ROWS, Hk=2, dtype=torch.float32, seed=0, drop_res=(), extra_len=3):
    """A ragged batch: one single-row cache per entry of ``rows``; returns ``(args, caches, lens)``
    where ``args`` are the op's buffer arguments (CPU), ``lens = (n_quant, n_res, max_len)`` with
    ``n_res[b]`` forced to 0 for ``b in drop_res`` (a row whose residual is empty) and ``max_len``
    ``extra_len`` past the longest row (the mass is 0 there)."""
    mode, bk, bv, ka, va, G, R = cfg
    caches = []
    for b, chunks in enumerate(rows):
        c = QuantizedKVCache(bk, bv, group_size=G, residual=R, mode=mode, key_axis=ka, value_axis=va)
        total = sum(chunks or [])
        k, v = _kv(max(total, 1), Hk, dtype, seed + b)
        if chunks is None:
            c.append(k[:, :, :0], v[:, :, :0])
        i = 0
        for n in chunks or []:
            c.append(k[:, :, i:i + n].contiguous(), v[:, :, i:i + n].contiguous())
            i += n
        caches.append(c)
    g = torch.Generator().manual_seed(seed + 100)
    ts = [c.tensors() for c in caches]
    names = ["k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res"]
    args = []
    for name in names:
        parts = [t[name] for t in ts]
        if parts[0].dim() == 1:  # fp8 zeros: empty
            args.append(parts[0])
            continue
        n = max(p.shape[2] for p in parts) + (G if name.endswith("res") else 0)
        args.append(torch.cat([_pad(p, n, g) for p in parts], 0).contiguous())
    nq = torch.tensor([c.n_quant for c in caches], dtype=torch.int32)
    nr = torch.tensor([0 if b in drop_res else c.n_res for b, c in enumerate(caches)], dtype=torch.int32)
    max_len = int((nq + nr).max()) + extra_len
    return args, caches, (nq, nr, max_len)


def oracle(q, caches, lens, scale, dtype=torch.float64):
    """Per-row float64 loop (tests/oracles.py) over each row's own tokens; mass padded to max_len."""
    nq, nr, max_len = lens
    B, H, NQ, _ = q.shape
    out = torch.zeros(B, H, NQ, D, dtype=dtype)
    lse = torch.full((B, H, NQ), float("-inf"), dtype=dtype)
    mass = torch.zeros(B, H, max_len, dtype=dtype)
    for b, c in enumerate(caches):
        k, v = cache_kv(c, torch.float64)
        n_q, n_r = int(nq[b]), int(nr[b])
        sel = list(range(n_q)) + [n_q + j for j in range(n_r)]
        kk, vv = k[:, :, sel], v[:, :, sel]
        if dtype != torch.float64:
            kk, vv = kk.to(dtype), vv.to(dtype)
        o, ls, m = naive_decode(q[b:b + 1].cpu(), kk, vv, scale, dtype=dtype)
        out[b], lse[b], mass[b, :, :m.shape[-1]] = o[0], ls[0], m[0]
    return out, lse, mass


def run_op(q, args, lens, cfg, backend, return_mass=True, device="cpu", scale=None):
    mode, bk, bv, ka, va, G, R = cfg
    nq, nr, max_len = lens
    scale = D ** -0.5 if scale is None else scale
    a = [t.to(device) for t in args]
    return torch.ops.tokops.kv_decode_attention(q.to(device), *a, nq.to(device), nr.to(device), max_len, mode, bk,
                                                bv, G, ka, va, scale, return_mass, backend)


def check_ragged(backend, device, cfg, *, H=4, Hk=2, NQ=3, dtype=torch.float32, return_mass=True, drop_res=(),
                 rows=ROWS, seed=0):
    args, caches, lens = make_ragged(cfg, rows=rows, Hk=Hk, dtype=dtype, seed=seed, drop_res=drop_res)
    B = len(rows)
    g = torch.Generator().manual_seed(seed + 7)
    q = (torch.randn(B, H, NQ, D, generator=g) * 1.2).to(dtype)
    scale = D ** -0.5
    out, lse, mass = (t.cpu() for t in run_op(q, args, lens, cfg, backend, return_mass, device))
    o64, l64, m64 = oracle(q, caches, lens, scale)
    os_, ls_, ms_ = oracle(q, caches, lens, scale, dtype=dtype)  # the same loop in q's dtype
    nq, nr, max_len = lens
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, NQ) and lse.dtype == torch.float32
    assert mass.shape == (B, H, max_len if return_mass else 0) and mass.dtype == torch.float32
    vmax = max((cache_kv(c)[1].abs().max().item() for c in caches if len(c)), default=1.0)
    checks = [("out", out, o64, os_, vmax), ("lse", lse, l64, ls_, 1.0)]
    if return_mass:
        checks.append(("mass", mass, m64, ms_, 1.0))
    L = int((nq + nr).max())
    for name, got, exp, same, mag in checks:
        got = got.double()
        assert not got.isnan().any(), name
        assert torch.equal(torch.isinf(got), torch.isinf(exp)), name
        fin = torch.isfinite(exp)
        base = (same.double() - exp)[fin].abs().max().item() if fin.any() else 0.0
        err = (got - exp)[fin].abs().max().item() if fin.any() else 0.0
        tol = 2 * base + ulp_floor(dtype, mag, L) + (1e-6 if name == "mass" else 0.0)
        assert err <= tol, f"{name}: error {err:.3g} > tolerance {tol:.3g} (same loop in {dtype}: {base:.3g})"
    # rows with nothing visible: exactly 0 and -inf; mass exactly 0 past each row's length
    lens_b = (nq + nr).long()
    for b in range(B):
        for i in range(NQ):
            if lens_b[b] - NQ + i < 0:
                assert torch.equal(out[b, :, i], torch.zeros_like(out[b, :, i]))
                assert (lse[b, :, i] == float("-inf")).all()
        if return_mass:
            assert (mass[b, :, lens_b[b]:] == 0).all()
    return out, lse, mass


def _skip_bf16(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


# --------------------------------------------------------------------------- ragged vs the oracle
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("nq", [1, 3])
def test_ragged_matches_oracle(backend_device, cfg, nq):
    backend, device = backend_device
    check_ragged(backend, device, cfg, NQ=nq)


@pytest.mark.parametrize("H,Hk", [(4, 1), (6, 3), (2, 2)])
def test_ragged_gqa_without_mass(backend_device, H, Hk):
    backend, device = backend_device
    check_ragged(backend, device, CONFIGS[0], H=H, Hk=Hk, NQ=3, return_mass=False, seed=3)


def test_ragged_rows_with_empty_residual(backend_device):
    """Rows whose residual window is empty while others have one (n_res[b] = 0 with n_quant[b] > 0)."""
    backend, device = backend_device
    check_ragged(backend, device, CONFIGS[1], NQ=3, drop_res=(0, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ragged_half_precision(backend_device, dtype):
    backend, device = backend_device
    _skip_bf16(backend, device, dtype)
    check_ragged(backend, device, CONFIGS[0], NQ=3, dtype=dtype, seed=5)


def test_ragged_many_splits(backend_device, monkeypatch):
    """Capacity for several split-K chunks; short rows leave most splits empty."""
    backend, device = backend_device
    monkeypatch.setenv("TOKOPS_KV_DECODE_CPU_PROGRAMS", "9")
    rows = [[300, 7], [1], [130], [33, 2]]
    check_ragged(backend, device, ("int", 4, 4, -2, -1, 32, 40), rows=rows, NQ=2, seed=9)


def test_uniform_lengths_equal_public_decode(backend_device):
    """Equal lengths: the op on length tensors == decode_attention(q, cache) (which passes them)."""
    backend, device = backend_device
    cache = QuantizedKVCache(4, 4, group_size=16, residual=16)
    k, v = _kv(77, 2, torch.float32, 0)
    cache.append(k.expand(2, -1, -1, -1).contiguous().to(device), v.expand(2, -1, -1, -1).contiguous().to(device))
    t = cache.tensors()
    assert t["n_quant"].dtype == torch.int32 and t["n_quant"].shape == (2,) and t["n_quant"].device == k.to(device).device
    assert t["n_quant"].tolist() == [cache.n_quant] * 2 and t["n_res"].tolist() == [cache.n_res] * 2
    q = torch.randn(2, 4, 2, D, generator=torch.Generator().manual_seed(1)).to(device)
    out, mass = decode_attention(q, cache, return_mass=True, backend=backend)
    o2, _, m2 = torch.ops.tokops.kv_decode_attention(
        q, *(t[n] for n in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res")),
        t["n_quant"], t["n_res"], len(cache), "int", 4, 4, 16, -2, -1, D ** -0.5, True, backend)
    torch.testing.assert_close(out, o2, rtol=0, atol=0)
    torch.testing.assert_close(mass, m2, rtol=0, atol=0)


def test_cache_length_tensors_follow_the_cache():
    """cache.tensors()['n_quant'/'n_res'] stay in sync (same storage, updated in place) through
    appends, truncate and select_batch."""
    cache = QuantizedKVCache(4, 4, group_size=16, residual=16)
    k, v = _kv(100, 2, torch.float32, 0)
    k, v = k.expand(3, -1, -1, -1).contiguous(), v.expand(3, -1, -1, -1).contiguous()
    cache.append(k[:, :, :20], v[:, :, :20])
    t0 = cache.tensors()
    ptr = t0["n_quant"].data_ptr()
    for i in range(20, 60):
        cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        t = cache.tensors()
        assert t["n_quant"].data_ptr() == ptr  # in place: a captured graph sees the new lengths
        assert t["n_quant"].tolist() == [cache.n_quant] * 3 and t["n_res"].tolist() == [cache.n_res] * 3
    cache.truncate(33)
    t = cache.tensors()
    assert t["n_quant"].tolist() == [cache.n_quant] * 3 and t["n_res"].tolist() == [cache.n_res] * 3
    cache.select_batch(torch.tensor([2, 0]))
    t = cache.tensors()
    assert t["n_quant"].tolist() == [cache.n_quant] * 2 and t["n_res"].tolist() == [cache.n_res] * 2


# --------------------------------------------------------------------------- fixed grid
def test_launch_grid_does_not_depend_on_lengths():
    """decode_grid (the Triton launch configuration) is a function of the buffers' capacities: it
    stays the same over decode steps while the cache fills its capacity."""
    pytest.importorskip("triton")
    from tokops.triton_kernels.kv_decode import decode_grid

    cache = QuantizedKVCache(4, 4, group_size=16, residual=16, capacity=256)
    k, v = _kv(200, 2, torch.float32, 0)
    cache.append(k[:, :, :40], v[:, :, :40])
    grids = set()
    for i in range(40, 200):
        cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        t = cache.tensors()
        assert cache.capacity == 256
        cap_q = t["k_codes"].shape[2] * 32 // 4
        grids.add(tuple(sorted((kk, str(vv)) for kk, vv in decode_grid(1, 2, cap_q, t["k_res"].shape[2],
                                                                       torch.device("cpu")).items())))
    assert len(grids) == 1, grids
    # and the grid is never smaller than what the lengths need
    g = decode_grid(1, 2, 256, 32, torch.device("cpu"))
    assert g["qsplits"] * g["iters_q"] * g["BN"] >= 256 and g["rsplits"] * g["iters_r"] * g["BN"] >= 32


# --------------------------------------------------------------------------- compile / no sync
def test_torch_compile_no_recompile_when_lengths_change():
    """torch.compile(fullgraph=True) over the op call with length tensors: one graph, no graph break,
    no recompilation when the lengths (tensor values) change."""
    cfg = CONFIGS[0]
    args, caches, lens = make_ragged(cfg)
    nq, nr, max_len = lens
    mode, bk, bv, ka, va, G, R = cfg

    def step(q, n_quant, n_res, *bufs):
        out, lse, mass = torch.ops.tokops.kv_decode_attention(q, *bufs, n_quant, n_res, max_len, mode, bk, bv, G,
                                                             ka, va, 0.25, True, "torch")
        return out * 2, lse, mass.sum(-1)

    q = torch.randn(len(ROWS), 4, 3, D, generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    f = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shift in range(4):  # four different length vectors (shorter residuals)
            nr_s = (nr - shift).clamp(min=0).to(torch.int32)
            got = f(q, nq, nr_s, *args)
            exp = step(q, nq, nr_s, *args)
            for a, b in zip(got, exp):
                torch.testing.assert_close(a, b, equal_nan=True)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_decode_call_makes_no_host_sync(backend_device):
    """A decode call on an already-built cache reads nothing back to the host."""
    backend, device = backend_device
    cache = QuantizedKVCache(4, 4, group_size=16, residual=16)
    k, v = _kv(90, 2, torch.float32, 0)
    cache.append(k.to(device), v.to(device))
    q = torch.randn(1, 4, 2, D).to(device)
    decode_attention(q, cache, return_mass=True, backend=backend)  # warm up (Triton compile, lazy imports)
    with no_host_sync():
        out, mass, lse = decode_attention(q, cache, return_mass=True, return_lse=True, backend=backend)
    assert out.shape == q.shape and mass.shape == (1, 4, 90)


# --------------------------------------------------------------------------- CUDA graphs (GPU)
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_16_decode_steps(backend):
    """Capture one decode call, then replay it over 16 steps with the cache's length tensors (and the
    buffers) updated in place by the appends: equal to eager each step (the grid is capacity-sized)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import tokops

    if backend == "cuda" and not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    torch.manual_seed(0)
    Hk, H = 2, 8
    cache = QuantizedKVCache(4, 4, group_size=32, residual=32, capacity=1024)
    k = torch.randn(2, Hk, 400, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(2, Hk, 400, 64, device="cuda", dtype=torch.float16)
    cache.append(k[:, :, :300], v[:, :, :300])
    q = torch.randn(2, H, 1, 64, device="cuda", dtype=torch.float16)
    t = cache.tensors()
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res")

    def call():
        t2 = cache.tensors()
        assert all(t2[n].data_ptr() == t[n].data_ptr() for n in names + ("n_quant", "n_res"))
        return torch.ops.tokops.kv_decode_attention(q, *(t[n] for n in names), t["n_quant"], t["n_res"], 0, "int",
                                                    4, 4, 32, -2, -1, 0.125, False, backend)

    call()  # warm up (compile)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g, _ = call()
    for step in range(16):
        i = 300 + step
        cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])  # in place: capacity and residual buffer fixed
        if cache.tensors()["k_res"].data_ptr() != t["k_res"].data_ptr():
            pytest.fail("the residual buffer was reallocated: the test needs a fixed residual capacity")
        graph.replay()
        out_e, lse_e, _ = call()
        torch.cuda.synchronize()
        torch.testing.assert_close(out_g, out_e, rtol=0, atol=0)
        torch.testing.assert_close(lse_g, lse_e, rtol=0, atol=0)
    assert math.isfinite(lse_g.float().max().item())
