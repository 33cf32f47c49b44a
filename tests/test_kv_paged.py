"""Paged quantized KV cache (issue 14 item 2): fuzzed per-row appends, rows finishing and their pages
reused, every backend against a float64 oracle written here (each row's pages dequantized with
tests/oracles.py's ``naive_dequantize`` + the row's own full-precision tokens, dense attention per row
with ``naive_decode``), the residual rule, bad inputs, opcheck, no host sync."""

import math
import random

import pytest
import torch

from tokops.kv import PagedKVCache, PagePoolExhausted, paged_decode, paged_decode_attention
from tokops.kv import reference as ref
from tokops.kv.paged import n_quant_of, paged_decode_reference, validate_block_table

from nosync import no_host_sync
from oracles import naive_decode, naive_dequantize, ulp_floor


def _skip_interp_dtype(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


class Sim:
    """Drives a PagedKVCache and keeps every row's full-precision tokens per layer (the oracle's input)."""

    def __init__(self, cache: PagedKVCache, seed: int = 0):
        self.c = cache
        self.g = torch.Generator().manual_seed(seed)
        self.tok = [[[] for _ in range(cache.max_rows)] for _ in range(cache.num_layers)]  # layer, row -> [(k, v)]

    def step(self, n_new, rows=None):
        c = self.c
        rows = list(range(c.max_rows)) if rows is None else rows
        n = max(n_new, default=0)
        c.extend(n_new, rows)
        for layer in range(c.num_layers):
            shape = (len(rows), c.num_kv_heads, n, c.head_dim)
            k = (torch.randn(shape, generator=self.g) * 1.5 + torch.rand(shape[:2] + (1, shape[3]), generator=self.g))
            v = torch.randn(shape, generator=self.g) + 0.3
            k, v = k.to(c.dtype), v.to(c.dtype)
            c.write(layer, k.to(c.device), v.to(c.device))
            for i, (r, m) in enumerate(zip(rows, n_new)):
                self.tok[layer][r].append((k[i, :, :m], v[i, :, :m]))

    def free(self, row):
        self.c.free_row(row)
        for layer in range(self.c.num_layers):
            self.tok[layer][row] = []

    def tokens(self, layer, row):
        t = self.tok[layer][row]
        D, H = self.c.head_dim, self.c.num_kv_heads
        if not t:
            z = torch.zeros(H, 0, D, dtype=self.c.dtype)
            return z, z
        return torch.cat([a for a, _ in t], 1), torch.cat([b for _, b in t], 1)

    def row_kv(self, layer, row, check_codes=True):
        """float64 (H_kv, L, D) keys and values of ``row`` as the cache holds them: pages dequantized
        from the raw pool tensors (naive_dequantize), the residual from the row's own tokens."""
        c = self.c
        K, V = self.tokens(layer, row)
        L = K.shape[1]
        assert c.length(row) == L
        nq = n_quant_of(L, c.residual, c.group_size)
        pages = c.pages_of(row)
        assert len(pages) == -(-nq // c.page_size)
        P, G, D = c.page_size, c.group_size, c.head_dim
        kq, vq = [], []
        for j, pid in enumerate(pages):
            n = min(P, nq - j * P)
            if c.mode == "fp8":
                kq.append((c.k_codes[layer, pid, :, :n].cpu().view(torch.float8_e4m3fn).float()
                           * c.k_scale[layer, pid, :, :n, None].cpu()))
                vq.append((c.v_codes[layer, pid, :, :n].cpu().view(torch.float8_e4m3fn).float()
                           * c.v_scale[layer, pid, :, :n, None].cpu()))
                continue
            kq.append(naive_dequantize(c.k_codes[layer, pid].cpu(), c.k_scale[layer, pid].cpu(),
                                       c.k_zero[layer, pid].cpu(), c.bits_k, G, -2, P)[:, :n])
            vq.append(naive_dequantize(c.v_codes[layer, pid, :, :n].cpu(), c.v_scale[layer, pid, :, :n].cpu(),
                                       c.v_zero[layer, pid, :, :n].cpu(), c.bits_v, G, -1, D))
        kq = torch.cat(kq, 1) if kq else torch.zeros(c.num_kv_heads, 0, D)
        vq = torch.cat(vq, 1) if vq else torch.zeros(c.num_kv_heads, 0, D)
        if check_codes and nq:
            # the pages hold exactly what quantizing the row's first nq tokens (KIVI layout) gives
            if c.mode == "fp8":
                for x, got in ((K[:, :nq], kq), (V[:, :nq], vq)):
                    codes, s = ref.quantize_fp8(x)
                    assert torch.equal(got, ref.dequantize_fp8(codes, s, torch.float32))
            else:
                ek = ref.dequantize(*ref.quantize(K[:, :nq], c.bits_k, G, -2), c.bits_k, G, -2, nq, torch.float32)
                ev = ref.dequantize(*ref.quantize(V[:, :nq], c.bits_v, G, -1), c.bits_v, G, -1, D, torch.float32)
                assert torch.equal(kq, ek) and torch.equal(vq, ev)
        return (torch.cat([kq.double(), K[:, nq:].double()], 1), torch.cat([vq.double(), V[:, nq:].double()], 1))

    def check_pages(self):
        """No page is held by two live rows; free + held == pool; the device table mirrors the host."""
        c = self.c
        held = [p for r in range(c.max_rows) for p in c.pages_of(r)]
        assert len(held) == len(set(held)), "a page is shared by two live rows"
        assert len(held) + c.num_free_pages == c.num_pages
        bt = c.block_table.cpu()
        for r in range(c.max_rows):
            ps = c.pages_of(r)
            assert bt[r, :len(ps)].tolist() == ps and (bt[r, len(ps):] == -1).all()
        assert c.lengths.cpu().tolist() == c.lengths_host()
        validate_block_table(c.block_table, c.lengths, c.num_pages, c.page_size, c.residual, c.group_size)


def check_decode(sim: Sim, q, backend, layer=0):
    c = sim.c
    out, mass, lse = paged_decode_attention(q, c, layer, return_mass=True, return_lse=True, backend=backend)
    B, H, nq, D = q.shape
    T = c.max_pages_per_row * c.page_size + c.residual + c.group_size
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, H, nq) and mass.shape == (B, H, T)
    scale = D ** -0.5
    for b in range(B):
        k, v = sim.row_kv(layer, b)
        L = k.shape[1]
        qb = q[b:b + 1].cpu()
        o64, l64, m64 = naive_decode(qb, k[None], v[None], scale)
        o_s, l_s, m_s = naive_decode(qb, k[None].to(q.dtype), v[None].to(q.dtype), scale, dtype=q.dtype)
        vmax = v.abs().max().item() if L else 1.0
        for name, got, exp, same, mag in (("out", out[b:b + 1], o64, o_s, vmax), ("lse", lse[b:b + 1], l64, l_s, 1.0),
                                          ("mass", mass[b:b + 1, :, :L], m64, m_s, 1.0)):
            got = got.cpu().double()
            assert not got.isnan().any(), (name, b)
            assert torch.equal(torch.isinf(got), torch.isinf(exp)), (name, b)
            fin = torch.isfinite(exp)
            base = (same.double() - exp)[fin].abs().max().item() if fin.any() else 0.0
            err = (got - exp)[fin].abs().max().item() if fin.any() else 0.0
            tol = 2 * base + ulp_floor(q.dtype, mag, max(L, 1))
            assert err <= tol, f"row {b} (L={L}) {name}: error {err:.3g} > {tol:.3g}"
        assert (mass[b, :, L:] == 0).all(), f"row {b}: mass past the row's length"
    # the package's float64 reference (the torch path in float64) agrees with the oracle
    r_out, r_lse, r_mass = paged_decode_reference(q, c, layer)
    for b in range(B):
        k, v = sim.row_kv(layer, b, check_codes=False)
        o64, l64, m64 = naive_decode(q[b:b + 1].cpu(), k[None], v[None], D ** -0.5)
        torch.testing.assert_close(r_out[b:b + 1].cpu(), o64, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r_lse[b:b + 1].cpu(), l64, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r_mass[b:b + 1, :, :k.shape[1]].cpu(), m64, atol=1e-6, rtol=1e-6)


def _q(B, H, nq, D, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, nq, D, generator=g) * 1.2).to(dtype).to(device)


# (mode, bits_k, bits_v, G, P, R, H, H_kv, D)
CONFIGS = [("int", 4, 4, 16, 32, 16, 4, 2, 32), ("int", 2, 8, 16, 16, 0, 2, 2, 32),
           ("int", 8, 2, 32, 64, 32, 3, 1, 64), ("fp8", 8, 8, 16, 32, 16, 4, 2, 32)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_fuzzed_appends_rows_finish_pages_reused(backend_device, cfg):
    """Random per-row append sizes (prefill chunks, decode steps, idle rows), rows finishing and new
    sequences starting in their slots (their pages reused by other rows), decode after every step."""
    backend, device = backend_device
    mode, bk, bv, G, P, R, H, Hk, D = cfg
    B = 3
    rng = random.Random(hash(cfg) % 1000)
    c = PagedKVCache(12, P, Hk, D, B, max_pages_per_row=6, bits_k=bk, bits_v=bv, group_size=G, residual=R,
                     mode=mode, dtype=torch.float32, device=device, backend=backend if backend != "cuda" else "auto")
    sim = Sim(c, seed=rng.randrange(100))
    reused = False
    for step in range(6):
        n_new = []
        for r in range(B):
            room = c.max_pages_per_row * P + R - c.length(r)  # never need more pages than a row may hold
            n = rng.choice([0, 1, 1, 2, G - 1, G + 3, 2 * P + 5])
            n_new.append(max(0, min(n, room - G)))
        try:
            sim.step(n_new)
        except PagePoolExhausted:
            done = max(range(B), key=c.length)
            before = set(c.pages_of(done))
            sim.free(done)
            sim.step([n if r != done else 0 for r, n in enumerate(n_new)])
            reused |= bool(before & {p for r in range(B) for p in c.pages_of(r)})
        if step == 3:  # a row finishes; a new sequence starts in its slot
            sim.free(1)
            sim.step([0, 2 * P + 3, 1])
        sim.check_pages()
        nq = rng.choice([1, 2, 3])
        check_decode(sim, _q(B, H, nq, D, torch.float32, step, device), backend)
    assert any(c.length(r) > R + P for r in range(B))


def test_pages_of_a_finished_row_go_to_other_rows():
    c = PagedKVCache(4, 16, 1, 32, 3, group_size=16, residual=0, dtype=torch.float32)
    sim = Sim(c)
    sim.step([32, 16, 0])
    assert c.pages_of(0) == [0, 1] and c.pages_of(1) == [2]
    with pytest.raises(PagePoolExhausted):
        sim.step([0, 0, 48])
    assert c.lengths_host() == [32, 16, 0] and c.num_free_pages == 1  # unchanged
    sim.free(0)
    sim.step([0, 0, 48])
    assert sorted(c.pages_of(2)) == [0, 1, 3]
    sim.check_pages()
    check_decode(sim, _q(3, 2, 1, 32, torch.float32, 0, "cpu"), "torch")


@pytest.mark.parametrize("R", [0, 32])
def test_residual_rule(R):
    """n_quant(n) = G * floor(max(0, n - R) / G), whatever the append sequence; the ring holds the rest."""
    G = 16
    c = PagedKVCache(16, 32, 1, 32, 2, group_size=G, residual=R, dtype=torch.float32)
    sim = Sim(c)
    for n_new in ([1, 17], [15, 0], [1, 40], [G, 1], [3 * G + 1, 2]):
        sim.step(n_new)
        for r in range(2):
            L = c.length(r)
            assert c.n_quant(r) == G * (max(0, L - R) // G)
            assert min(L, R) <= L - c.n_quant(r) <= R + G - 1
            K, V = sim.tokens(0, r)
            slots = [p % c.ring for p in range(c.n_quant(r), L)]
            assert torch.equal(c.k_res[0, r][:, slots], K[:, c.n_quant(r):])
            assert torch.equal(c.v_res[0, r][:, slots], V[:, c.n_quant(r):])
            sim.row_kv(0, r)  # pages == quantize of the row's first n_quant tokens


def test_multi_layer_shares_the_block_table():
    c = PagedKVCache(8, 16, 2, 32, 2, num_layers=3, group_size=16, residual=16, dtype=torch.float32)
    sim = Sim(c)
    sim.step([40, 7])
    sim.step([1, 30])
    sim.check_pages()
    for layer in range(3):
        check_decode(sim, _q(2, 4, 1, 32, torch.float32, layer, "cpu"), "torch", layer)
    with pytest.raises(ValueError, match="one-layer"):
        c.append(torch.zeros(2, 2, 1, 32), torch.zeros(2, 2, 1, 32))
    c.extend([1, 1])
    c.write(0, torch.zeros(2, 2, 1, 32), torch.zeros(2, 2, 1, 32))
    with pytest.raises(RuntimeError, match="already written"):
        c.write(0, torch.zeros(2, 2, 1, 32), torch.zeros(2, 2, 1, 32))
    with pytest.raises(RuntimeError, match="not written for layers"):
        c.extend([1, 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(backend_device, dtype):
    backend, device = backend_device
    _skip_interp_dtype(backend, device, dtype)
    c = PagedKVCache(10, 32, 2, 64, 2, bits_k=4, bits_v=4, group_size=32, residual=32, dtype=dtype, device=device)
    sim = Sim(c, seed=3)
    sim.step([100, 33])
    sim.step([1, 2])
    check_decode(sim, _q(2, 4, 2, 64, dtype, 5, device), backend)


def test_subset_rows_and_empty_rows(backend_device):
    backend, device = backend_device
    c = PagedKVCache(10, 16, 1, 32, 4, group_size=16, residual=16, dtype=torch.float32, device=device)
    sim = Sim(c, seed=4)
    sim.step([50, 3], rows=[2, 0])
    sim.step([1], rows=[2])
    check_decode(sim, _q(4, 2, 1, 32, torch.float32, 1, device), backend)  # rows 1 and 3 are empty
    out, lse = paged_decode_attention(_q(4, 2, 1, 32, torch.float32, 1, device), c, return_lse=True, backend=backend)
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (out[3] == 0).all()


def test_many_splits(backend_device, monkeypatch):
    """More splits than a row has pages (and pages spread over several splits)."""
    backend, device = backend_device
    monkeypatch.setenv("TOKOPS_KV_DECODE_CPU_PROGRAMS", "64")
    c = PagedKVCache(24, 16, 1, 32, 2, max_pages_per_row=12, group_size=16, residual=0, dtype=torch.float32,
                     device=device)
    sim = Sim(c, seed=5)
    sim.step([170, 20])
    check_decode(sim, _q(2, 2, 1, 32, torch.float32, 2, device), backend)


def test_stale_nan_in_a_freed_page_does_not_leak(backend_device):
    backend, device = backend_device
    c = PagedKVCache(4, 32, 1, 32, 2, group_size=16, residual=0, dtype=torch.float32, device=device)
    sim = Sim(c, seed=6)
    sim.step([32, 0])
    c.v_scale.fill_(float("nan"))  # poison every page (row 0's too: it finishes now)
    c.k_scale.fill_(float("nan"))
    sim.free(0)
    sim.step([0, 16])  # row 1 gets page 0; its quantized group fills half the page, the rest stays NaN
    assert c.pages_of(1) == [0]
    check_decode(sim, _q(2, 2, 1, 32, torch.float32, 3, device), backend)


# --------------------------------------------------------------------------- bad input
def _cache(**kw):
    args = dict(group_size=16, residual=16, dtype=torch.float32)
    args.update(kw)
    return PagedKVCache(8, 32, 1, 32, 2, **args)


def _raw(c):
    t = c.layer(0)
    return (t["k_codes"], t["k_scale"], t["k_zero"], t["v_codes"], t["v_scale"], t["v_zero"], t["k_res"], t["v_res"])


def _bad_calls():
    q = torch.randn(2, 2, 1, 32)
    yield "page_size", ValueError, lambda: PagedKVCache(8, 24, 1, 32, 2, group_size=16)
    yield "page_size", ValueError, lambda: PagedKVCache(8, 8, 1, 32, 2, group_size=8)
    yield "residual", ValueError, lambda: PagedKVCache(8, 32, 1, 32, 2, group_size=16, residual=8)
    yield "group_size", ValueError, lambda: PagedKVCache(8, 32, 1, 32, 2, group_size=12)
    yield "bits_k", ValueError, lambda: PagedKVCache(8, 32, 1, 32, 2, bits_k=3)
    yield "mode", ValueError, lambda: PagedKVCache(8, 32, 1, 32, 2, mode="int3")
    yield "max_pages_per_row", ValueError, lambda: _cache(max_pages_per_row=1).extend([80, 0])
    yield "n_new", ValueError, lambda: _cache().extend([1, 2, 3])
    yield "rows", ValueError, lambda: _cache().extend([1, 1], rows=[0, 0])
    yield "write", RuntimeError, lambda: _cache().write(0, torch.zeros(2, 1, 1, 32), torch.zeros(2, 1, 1, 32))

    def wrong_k_shape():
        c = _cache()
        c.extend([2, 1])
        c.write(0, torch.zeros(2, 1, 1, 32), torch.zeros(2, 1, 1, 32))
    yield "k must have shape", ValueError, wrong_k_shape

    def wrong_k_dtype():
        c = _cache()
        c.extend([1, 1])
        c.write(0, torch.zeros(2, 1, 1, 32, dtype=torch.float16), torch.zeros(2, 1, 1, 32))
    yield "k must have dtype", TypeError, wrong_k_dtype

    def filled():
        c = _cache()
        c.append(torch.randn(2, 1, 70, 32), torch.randn(2, 1, 70, 32))  # 2 pages per row: 0,1 / 2,3
        return c

    def bt_out_of_range():
        c = filled()
        bt = c.block_table.clone()
        bt[1, 1] = 8
        paged_decode(q, *_raw(c), bt, c.lengths, residual=16, group_size=16)
    yield r"block_table\[1, 1\] = 8 is out of range", ValueError, bt_out_of_range

    def bt_negative():
        c = filled()
        bt = c.block_table.clone()
        bt[0, 0] = -1
        paged_decode(q, *_raw(c), bt, c.lengths, residual=16, group_size=16)
    yield r"block_table\[0, 0\] = -1", ValueError, bt_negative

    def bt_shared():
        c = filled()
        bt = c.block_table.clone()
        bt[1, 0] = bt[0, 1]
        paged_decode(q, *_raw(c), bt, c.lengths, residual=16, group_size=16)
    yield "used by two rows", ValueError, bt_shared

    def too_long():
        c = filled()
        paged_decode(q, *_raw(c), c.block_table[:, :1], c.lengths, residual=16, group_size=16)
    yield "needs 2 pages", ValueError, too_long

    def bt_dtype():
        c = filled()
        paged_decode(q, *_raw(c), c.block_table.long(), c.lengths, residual=16, group_size=16)
    yield "block_table must have dtype", TypeError, bt_dtype

    def lengths_rows():
        c = filled()
        paged_decode(q, *_raw(c), c.block_table, c.lengths[:1], residual=16, group_size=16)
    yield "lengths", ValueError, lengths_rows

    def negative_length():
        c = filled()
        paged_decode(q, *_raw(c), c.block_table, torch.tensor([-1, 5], dtype=torch.int32), residual=16,
                     group_size=16)
    yield r"lengths\[0\] = -1", ValueError, negative_length

    def wrong_residual():
        c = filled()
        paged_decode(q, *_raw(c), c.block_table, c.lengths, residual=32, group_size=16)
    yield "ring", ValueError, wrong_residual

    def wrong_group():
        c = filled()
        paged_decode(q, *_raw(c), c.block_table, c.lengths, residual=32, group_size=32)
    yield "k_scale must have shape|page_size|ring", ValueError, wrong_group

    def nq_too_big():
        c = filled()
        paged_decode_attention(torch.randn(2, 2, 9, 32), c)
    yield "nq", ValueError, nq_too_big

    def q_rows():
        c = filled()
        paged_decode_attention(torch.randn(3, 2, 1, 32), c)
    yield "q must have shape", ValueError, q_rows

    def q_heads():
        c = PagedKVCache(8, 32, 2, 32, 2, group_size=16, residual=16, dtype=torch.float32)
        paged_decode_attention(torch.randn(2, 3, 1, 32), c)
    yield "multiple of the kv heads", ValueError, q_heads

    def q_dtype():
        c = filled()
        paged_decode_attention(torch.randn(2, 2, 1, 32, dtype=torch.float16), c)
    yield "q must have the cache's dtype", TypeError, q_dtype

    def cuda_on_cpu():
        c = filled()
        paged_decode_attention(q, c, backend="cuda")
    yield "cuda", (ValueError, RuntimeError), cuda_on_cpu


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_inputs(case):
    name, exc, call = list(_bad_calls())[case]
    with pytest.raises(exc, match=name):
        call()


# --------------------------------------------------------------------------- registry / sync
@pytest.mark.parametrize("mode", ["int", "fp8"])
def test_opcheck(backend_device, mode):
    backend, device = backend_device
    c = PagedKVCache(8, 16, 2, 32, 2, group_size=16, residual=16, mode=mode, dtype=torch.float32, device=device)
    sim = Sim(c, seed=7)
    sim.step([45, 20])
    q = _q(2, 4, 2, 32, torch.float32, 8, device)
    for return_mass in (False, True):
        args = (q, *_raw(c), c.block_table, c.lengths, 16, mode, c.bits_k, c.bits_v, 16, 0.2, return_mass, backend)
        torch.library.opcheck(torch.ops.tokops.kv_paged_decode_attention.default, args)


def test_decode_step_does_not_sync(backend_device):
    """A paged decode call (and a write of one token per row) makes no host sync."""
    backend, device = backend_device
    c = PagedKVCache(8, 16, 2, 32, 2, group_size=16, residual=16, dtype=torch.float32, device=device)
    sim = Sim(c, seed=9)
    sim.step([40, 17])
    c.extend([1, 1])
    k, v = torch.randn(2, 2, 1, 32, device=device), torch.randn(2, 2, 1, 32, device=device)
    q = _q(2, 4, 1, 32, torch.float32, 1, device)
    with no_host_sync():
        c.write(0, k, v)
        out, mass = paged_decode_attention(q, c, return_mass=True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(mass).all()


def test_torch_compile_fullgraph():
    c = PagedKVCache(8, 16, 2, 32, 2, group_size=16, residual=16, dtype=torch.float32)
    Sim(c, seed=10).step([40, 17])

    def step(q, *t):
        out, lse, mass = torch.ops.tokops.kv_paged_decode_attention(q, *t, 16, "int", 4, 4, 16, 0.25, True, "torch")
        return out * 2, mass.sum(-1)

    args = (_q(2, 4, 1, 32, torch.float32, 0, "cpu"), *_raw(c), c.block_table, c.lengths)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(got, step(*args))


def test_grid_does_not_depend_on_lengths():
    """The Triton launch grid is a function of (B, H_kv, max_pages_per_row) and the SM count only."""
    pytest.importorskip("triton")
    from tokops.triton_kernels.kv_paged_decode import num_page_splits

    a = num_page_splits(4, 2, 64, torch.device("cpu"))
    assert a == num_page_splits(4, 2, 64, torch.device("cpu")) and a[0] * a[1] >= 64
    assert math.ceil(64 / a[1]) == a[0]


def test_flashinfer_descriptors_round_trip():
    """kv_indptr / kv_indices / kv_last_page_len describe the quantized pages; the CSR converts back to
    the block table."""
    from tokops.kv.paged import block_table_from_csr

    c = PagedKVCache(12, 16, 1, 32, 3, max_pages_per_row=5, group_size=16, residual=16, dtype=torch.float32)
    sim = Sim(c)
    sim.step([40, 3, 70])
    sim.step([1, 0, 9])
    fi = c.flashinfer_indices()
    ptr, idx, last = fi["kv_indptr"].tolist(), fi["kv_indices"].tolist(), fi["kv_last_page_len"].tolist()
    for r in range(3):
        n = ptr[r + 1] - ptr[r]
        assert idx[ptr[r]:ptr[r + 1]] == c.pages_of(r)
        assert (n - 1) * 16 + last[r] == c.n_quant(r) if n else last[r] == 0 and c.n_quant(r) == 0
    assert torch.equal(block_table_from_csr(fi["kv_indptr"], fi["kv_indices"], 5), c.block_table)
    with pytest.raises(ValueError, match="kv_indptr"):
        block_table_from_csr(fi["kv_indptr"], fi["kv_indices"], 1)


def test_docs_example_runs():
    """docs/paged_kv.md: every fenced python block runs."""
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "paged_kv.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/paged_kv.md", "exec"), {"__name__": "__docs__"})


def test_torch_compile_public_decode_fullgraph():
    """The public entry point traces without a graph break (no host sync in a decode step)."""
    c = PagedKVCache(8, 16, 2, 32, 2, group_size=16, residual=16, dtype=torch.float32)
    Sim(c, seed=11).step([40, 17])

    def step(q):
        out, mass = paged_decode_attention(q, c, return_mass=True, backend="torch")
        return out, mass

    q = _q(2, 4, 2, 32, torch.float32, 0, "cpu")
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q)
    exp = step(q)
    torch.testing.assert_close(got, exp)
