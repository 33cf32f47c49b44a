"""Bit-exact KIVI codes without a per-element division (issue 12): the kernels compute
``round_half_even((x - zero) / scale)`` with one reciprocal per group and an exact comparison at
the half-integer boundary (``triton_kernels/kv_quant.py: _group_codes``, ``csrc/kv/quant_cuda.cu:
group_code``).  DESIGN.md defines the codes by the fp32 division, so every backend must give its
bits on *every* input, not only on random ones.  These tests build the inputs where a shortcut
breaks: ``(x - zero) / scale`` exactly on, and 1-2 ulps either side of, every half-integer
``k + 1/2`` and of 0 and QMAX, for 8/4/2 bits, both axes, ragged lengths, fp32/fp16/bf16.

The expected codes come from ``tests/oracles.naive_quantize`` (one fp32 division per element,
written from DESIGN.md, no tokops code); the torch backend (``kv.reference``) is checked against it
too.  ``test_method_*`` check the arithmetic argument itself in numpy, exhaustively over every
fp16 scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokops
from tokops.kv import reference as ref

from oracles import naive_dequantize, naive_quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (bits, group size): the CUDA fast path (G = 32, 128), its general path (G = 8: several groups per
# word at 2 and 4 bits) and the Triton units U = max(G, 32 / bits).
CASES = [(8, 32), (4, 32), (2, 32), (8, 128), (4, 8), (2, 8)]

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _ulps(t: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``t`` moved by ``n`` ulps of its own dtype (toward +inf for n > 0), through the bit pattern
    (torch.nextafter has no bf16 on CPU).  ``t`` nonzero and finite, ``|n|`` small."""
    iv = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
    step = torch.where(t > 0, n, -n)
    return (iv + step).to(_INT_VIEW[t.dtype]).view(t.dtype)


def _round(v: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float64 values rounded to nearest in ``dtype`` (one rounding: float64 -> dtype)."""
    return torch.from_numpy(np.asarray(v, dtype=np.float64)).to(dtype)


def adversarial_groups(bits: int, G: int, n_groups: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``(n_groups, G)`` values of ``dtype``: group i has its minimum at slot 0 and maximum at slot 1
    (so its stored zero ``z`` and scale ``s`` are fixed before the other slots are chosen), the
    other slots are ``x = z + (k + 1/2) s`` rounded to ``dtype`` and moved by -2..2 ulps
    (k = 0..QMAX-1), or ``z`` / ``z + QMAX s`` +- ulps (the clamp edges), clipped to [min, max].
    Scales: powers of two (exact ties in every dtype), random fp16 significands, fp16 subnormals;
    fp32 minima slightly below their fp16 zero (so that ``x - z < 0`` happens)."""
    rng = np.random.default_rng(seed)
    qmax = (1 << bits) - 1
    out = torch.empty(n_groups, G, dtype=dtype)
    for gi in range(n_groups):
        while True:
            kind = gi % 4
            e = int(rng.integers(-12, 3)) - (bits - 2)
            if kind == 0:  # power-of-two scale: x = z + (k + 1/2) s is often exactly representable
                s0 = 2.0 ** e
            elif kind == 3 and bits <= 4:  # an fp16-subnormal scale (multiple of 2**-24)
                s0 = float(rng.integers(1, 1024)) * 2.0 ** -24
            else:
                s0 = float(np.float16(rng.uniform(1, 2) * 2.0 ** e))
            z0 = float(np.float16(rng.choice([-1, 1]) * rng.uniform(0.5, 2) * 2.0 ** int(rng.integers(-6, 7))))
            if kind == 0 and gi % 8 == 0:  # zero 0 or a small multiple of a power-of-two scale: then
                z0 = -float(rng.integers(0, 40)) * s0 + 0.0  # z + (k + 1/2) s is exact even in bf16 (8 bits)
            if dtype == torch.bfloat16:
                z0 = float(torch.tensor(z0).to(torch.bfloat16).float())  # also an fp16 value
            mn = z0
            if dtype == torch.float32 and gi % 3 == 1:  # min below its fp16 rounding: x - zero < 0 occurs
                ulp16 = float(np.spacing(np.float16(abs(z0))))
                mn = z0 - float(rng.uniform(0, 0.45)) * ulp16
            mn_t = _round([mn], dtype)
            mx_t = _round([float(mn_t) + qmax * s0 * (1 + float(rng.uniform(0, 2.0 ** -11)))], dtype)
            mnf, mxf = mn_t.float(), mx_t.float()
            z = mnf.half().float()
            s = ((mxf - mnf) / qmax).half().float()  # the spec's scale
            if float(s) > 0 and float(mxf) > float(mnf) and torch.isfinite(s):
                break
        z, s = float(z), float(s)
        n = G - 2
        cat = rng.integers(0, 10, n)
        k = rng.integers(0, qmax, n).astype(np.float64)
        edge = rng.choice(np.array([0, 1, qmax - 2, qmax - 1], dtype=np.float64).clip(0), n)
        k = np.where(rng.random(n) < 0.3, edge, k)  # the half-integers next to the clamp edges, often
        target = z + (k + 0.5) * s  # half-integers (80 %)
        target = np.where(cat == 8, z + 0.0 * k, target)  # the 0 edge
        target = np.where(cat == 9, z + qmax * s + 0.0 * k, target)  # the QMAX edge
        t = _round(target, dtype)
        t = torch.where(t == 0, t, _ulps(t, torch.from_numpy(rng.integers(-2, 3, n))))  # (no steps across 0)
        t = torch.minimum(torch.maximum(t, mn_t), mx_t)
        out[gi, 0], out[gi, 1], out[gi, 2:] = mn_t[0], mx_t[0], t
    return out


def _layout(groups: torch.Tensor, G: int, axis: int, rows: int, tail: int) -> torch.Tensor:
    """Put (n_groups, G) groups into an x of shape (2, rows, L) (axis=-1, L = D) or (2, L, rows)
    (axis=-2, L = N) whose grouped axis holds n_groups / (2 rows) groups; for axis=-2 the last group
    keeps only ``tail`` of its G tokens (ragged N; its min and max are slots 0 and 1)."""
    per = groups.shape[0] // (2 * rows)
    x = groups[: 2 * rows * per].reshape(2, rows, per * G)
    if axis == -1:
        return x.contiguous()
    return x[..., : (per - 1) * G + tail].transpose(-1, -2).contiguous()


def _spec_quotients(x: torch.Tensor, bits: int, G: int, axis: int):
    """(d, s, v) per element: d = fl(x - zero), s = scale (fp32), v = fl(d / s), grouped axis last."""
    codes, scale, zero = ref.quantize(x, bits, G, axis)
    xt = (x if axis == -1 else x.transpose(-1, -2)).float()
    L = xt.shape[-1]
    s = (scale if axis == -1 else scale.transpose(-1, -2)).float().repeat_interleave(G, -1)[..., :L]
    z = (zero if axis == -1 else zero.transpose(-1, -2)).float().repeat_interleave(G, -1)[..., :L]
    d = xt - z
    return d, s, d / s


ADV = [(b, g, a, t) for b, g in CASES for a in (-1, -2) for t in DTYPES]


@pytest.mark.parametrize("bits,group_size,axis,dtype", ADV, ids=lambda v: str(v).replace("torch.", ""))
def test_adversarial_half_integers(backend_device, bits, group_size, axis, dtype):
    """Every backend gives the division's codes where ``(x - zero) / scale`` is on or within 1-2 ulps
    of a half-integer, of 0 and of QMAX (and its scale/zero and dequantized values)."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    _check_adversarial(backend, device, bits, group_size, axis, dtype, max(24, 2048 // group_size))


def _check_adversarial(backend, device, bits, group_size, axis, dtype, n_groups):
    G = group_size
    n_groups -= n_groups % 6
    groups = adversarial_groups(bits, G, n_groups, dtype, seed=bits * 100 + G + (axis == -1))
    x = _layout(groups, G, axis, rows=3, tail=G // 2 + 3)

    # the set bites: exact ties d = (k + 1/2) s and near-ties (d within 2 ulps of x's dtype of one,
    # not equal) are both present, at both ends of the code range too
    d, s, v = _spec_quotients(x, bits, G, axis)
    p = s * (torch.floor(v) + 0.5)  # exact (11 x 9 significant bits)
    xt = (x if axis == -1 else x.transpose(-1, -2))
    ulp = (_ulps(xt, torch.ones((), dtype=torch.int64)) - xt).float().abs()
    ties, near = d == p, (d != p) & ((d - p).abs() <= 2 * ulp)
    assert ties.sum() >= 8 and near.sum() >= 8, (ties.sum(), near.sum())
    assert (ties & (v < 1)).any() and (near & (v > (1 << bits) - 2)).any()
    if dtype == torch.float32:
        naive = torch.clamp(torch.round(d * (1 / s)), 0, (1 << bits) - 1)  # reciprocal, no correction
        assert (naive != torch.clamp(torch.round(v), 0, (1 << bits) - 1)).any(), "the shortcut is never wrong here"

    expected = naive_quantize(x, bits, G, axis)
    for name, got, exp in zip(("codes", "scale", "zero"), ref.quantize(x, bits, G, axis), expected):
        assert torch.equal(got, exp), f"reference {name}"
    qt = tokops.kv.quantize(x.to(device), bits, G, axis, backend=backend)
    for name, got, exp in zip(("codes", "scale", "zero"), qt[:3], expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert torch.equal(got.cpu(), exp), f"{name} differs in {(got.cpu() != exp).sum().item()} places"
    got = tokops.kv.dequantize(qt, torch.float32, backend=backend).cpu()
    assert torch.equal(got, naive_dequantize(*expected, bits, G, axis, x.shape[axis]))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", [-1, -2])
def test_every_fp16_value_one_group(backend_device, bits, axis):
    """fp16 inputs: every finite fp16 value in [-8, 8) against a few (zero, scale) pairs (the group's
    min and max fix them), so every exact tie an fp16 x can make at these scales is hit."""
    backend, device = backend_device
    allv = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    allv = allv[torch.isfinite(allv) & (allv.abs() < 8)]
    G = 32
    rows = []
    for mn, mx in [(-8.0, 7.5), (-3.0, 4.0), (-0.25, 0.125), (-6.0, 7.9375)]:
        inside = allv[(allv.float() >= mn) & (allv.float() <= mx)]
        n = -(-inside.numel() // (G - 2)) * (G - 2)
        body = torch.cat([inside, inside[: n - inside.numel()]]).view(-1, G - 2)
        ends = torch.tensor([mn, mx], dtype=torch.float16).expand(body.shape[0], 2)
        rows.append(torch.cat([ends, body], 1))
    groups = torch.cat(rows)  # (n_groups, G): one group per token (axis=-1) or per channel (axis=-2)
    x = groups if axis == -1 else groups.t().contiguous()
    expected = naive_quantize(x, bits, G, axis)
    qt = tokops.kv.quantize(x.to(device), bits, G, axis, backend=backend)
    for name, got, exp in zip(("codes", "scale", "zero"), qt[:3], expected):
        assert torch.equal(got.cpu(), exp), f"{name} differs in {(got.cpu() != exp).sum().item()} places"


# --------------------------------------------------------------------------- Triton row kernel
@pytest.fixture
def rows_kernel(monkeypatch):
    """Run the Triton row-walking quantize kernel (axis=-2, G >= 32/bits) under the interpreter too
    (by default the interpreter takes the tile kernel: see kv_quant.ROWS_KERNEL_IN_INTERPRETER)."""
    from tokops import _registry

    if not (_registry.triton_available() and _registry.triton_interpreter()):
        pytest.skip("on a GPU the row kernel is the default (covered by every Triton test)")
    from tokops.triton_kernels import kv_quant

    monkeypatch.setattr(kv_quant, "ROWS_KERNEL_IN_INTERPRETER", True)


@pytest.mark.parametrize("bits,group_size,dtype", [(8, 32, torch.float32), (4, 32, torch.float16), (2, 32, torch.float32),
                                                   (4, 64, torch.float32), (2, 16, torch.float16)], ids=str)
def test_rows_kernel_adversarial(rows_kernel, bits, group_size, dtype):
    _check_adversarial("triton", "cpu", bits, group_size, -2, dtype, 24)


def test_rows_kernel_vectors_and_non_finite(rows_kernel):
    """DESIGN.md vectors, the tie check, and NaN/inf groups (NaN scale/zero, codes 0) through the row
    kernel, against the oracle and the reference."""
    for bits in (4, 2):
        x = torch.arange(32)
        x = (((7 * x) % 11) - 5 + 0.25 * (x % 3)).to(torch.float16).view(32, 1)
        qt = tokops.kv.quantize(x, bits, 32, -2, backend="triton")
        for got, exp in zip(qt[:3], naive_quantize(x, bits, 32, -2)):
            assert torch.equal(got, exp)
    x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6], dtype=torch.float16).view(8, 1)
    qt = tokops.kv.quantize(x, 2, 8, -2, backend="triton")
    assert ref.unpack_codes(qt.codes, 2, -2).reshape(-1)[:8].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    x = torch.randn(2, 70, 48)
    x[0, 3, 5], x[0, 40, 7], x[1, 69, 0], x[1, 33, 1] = float("nan"), float("inf"), float("-inf"), float("nan")
    for bits in (8, 4, 2):
        qt = tokops.kv.quantize(x, bits, 32, -2, backend="triton")
        for name, got, exp in zip(("codes", "scale", "zero"), qt[:3], ref.quantize(x, bits, 32, -2)):
            assert torch.equal(got.view(torch.int16) if got.dtype == torch.float16 else got,
                               exp.view(torch.int16) if exp.dtype == torch.float16 else exp), name


# --------------------------------------------------------------------------- the method, in numpy
def _method(d: np.ndarray, s: np.ndarray, qmax: int) -> np.ndarray:
    """The kernels' codes (fp32 numpy, no division per element): see kv_quant._group_codes."""
    d, s = d.astype(np.float32), s.astype(np.float32)
    rcp = (np.float32(1) / s).astype(np.float32)
    kf = np.floor(np.clip((d * rcp).astype(np.float32), np.float32(0), np.float32(qmax - 1)))
    p = (s * (kf + np.float32(0.5))).astype(np.float32)
    k = kf.astype(np.int64)
    return k + ((d > p) | ((d == p) & (k % 2 == 1)))


def _division(d: np.ndarray, s: np.ndarray, qmax: int) -> np.ndarray:
    v = (d.astype(np.float32) / s.astype(np.float32)).astype(np.float32)
    return np.clip(np.rint(v), 0, qmax).astype(np.int64)  # np.rint: half to even


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_method_every_fp16_scale(bits):
    """The comparison method against the division for *every* positive finite fp16 scale, with
    ``d`` = each scale times each half-integer k + 1/2 (exact ties), +-1..3 fp32 ulps around it, the
    fp32 value nearest to the exact midpoints (k + 1/2) s +- s ulp(k + 1/2) / 2 (where double
    rounding would bite), and around 0 and QMAX."""
    qmax = (1 << bits) - 1
    s16 = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16)  # every positive finite fp16
    rng = np.random.default_rng(bits)
    ks = np.arange(qmax) if bits < 8 else np.concatenate([[0, 1, 2, 126, 127, 128, 253, 254], rng.integers(0, qmax, 8)])
    s = np.repeat(s16.astype(np.float32), len(ks))
    h = np.tile(ks + 0.5, len(s16)).astype(np.float32)
    p = (s * h).astype(np.float32)
    assert np.array_equal(p.astype(np.float64), s.astype(np.float64) * h.astype(np.float64))  # exact
    u = np.spacing(h).astype(np.float64)
    cands = [p] + [np.nextafter(p, np.float32(np.inf) * sgn) for sgn in (1, -1)]
    for j in (2, 3):
        cands.append(cands[-2].copy())
        cands.append(cands[-2].copy())
        cands[-2] = np.nextafter(cands[-2], np.float32(np.inf))
        cands[-1] = np.nextafter(cands[-1], -np.float32(np.inf))
    for sgn in (1, -1):  # fp32 nearest to the midpoint (k + 1/2 +- ulp/2) * s
        cands.append((s.astype(np.float64) * (h.astype(np.float64) + sgn * u / 2)).astype(np.float32))
    edges = [(s * np.float32(q)).astype(np.float32) for q in (0, qmax, qmax + 1)]
    for e in edges:
        cands += [np.nextafter(e, np.float32(np.inf)), np.nextafter(e, -np.float32(np.inf)), e]
    d = np.concatenate(cands)
    ss = np.tile(s, len(cands))
    assert np.array_equal(_method(d, ss, qmax), _division(d, ss, qmax))


def test_method_random_fp32():
    """Random fp32 d over many binades and random fp16 scales (1M pairs per bit width)."""
    rng = np.random.default_rng(0)
    n = 1 << 20
    s = np.abs(rng.standard_normal(n) * 2.0 ** rng.integers(-20, 8, n)).astype(np.float16).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1))
    for bits in (8, 4, 2):
        qmax = (1 << bits) - 1
        d = (s * rng.uniform(-2, qmax + 2, n)).astype(np.float32)
        assert np.array_equal(_method(d, s, qmax), _division(d, s, qmax))
