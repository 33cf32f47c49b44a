"""Fuzzing the KV quantization ops: every input gives the reference answer or a clear error."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokops
from tokops.kv import reference as ref

from conftest import runnable_backends

BACKENDS = runnable_backends()


@st.composite
def quant_inputs(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]))
    bits = draw(st.sampled_from([8, 4, 2, 3, 1]))
    group_size = draw(st.sampled_from([4, 8, 16, 32, 64, 6, 0]))
    axis = draw(st.integers(-3, 3))
    transpose = draw(st.booleans()) and ndim >= 2
    backend, device = draw(st.sampled_from(BACKENDS))
    seed = draw(st.integers(0, 2**16))
    return shape, dtype, bits, group_size, axis, transpose, backend, device, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(quant_inputs())
def test_quantize_fuzz(args):
    shape, dtype, bits, group_size, axis, transpose, backend, device, seed = args
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter has no bf16 arithmetic
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 4).to(dtype) if dtype.is_floating_point else \
        torch.randint(-5, 5, shape, generator=g, dtype=dtype)
    if transpose:
        x = x.transpose(-1, -2)
    x = x.to(device)
    try:
        qt = tokops.kv.quantize(x, bits, group_size, axis, backend=backend)
    except (TypeError, ValueError) as e:
        assert any(name in str(e) for name in ("x", "bits", "group_size", "axis")), e
        return
    codes, scale, zero = ref.quantize(x.cpu(), bits, group_size, qt.axis)
    assert torch.equal(qt.codes.cpu(), codes) and torch.equal(qt.scale.cpu(), scale) and torch.equal(qt.zero.cpu(), zero)
    x_hat = tokops.kv.dequantize(qt, torch.float32, backend=backend)
    assert x_hat.shape == x.shape and not x_hat.isnan().any()


@st.composite
def valid_quant_inputs(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    bits = draw(st.sampled_from([8, 4, 2]))
    group_size = draw(st.sampled_from([4, 8, 16, 32, 64]))
    axis = draw(st.sampled_from([-1, -2]))
    n = draw(st.integers(1, 70))
    d = group_size * draw(st.integers(1, 3)) if axis == -1 else draw(st.integers(1, 20))
    backend, device = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16] + ([] if backend == "triton" and device == "cpu"
                                                                   else [torch.bfloat16])))
    return lead + (n, d), dtype, bits, group_size, axis, backend, device, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_quant_inputs())
def test_quantize_fuzz_valid(args):
    shape, dtype, bits, group_size, axis, backend, device, seed = args
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * torch.rand((), generator=g) * 100).to(dtype)
    qt = tokops.kv.quantize(x.to(device), bits, group_size, axis, backend=backend)
    for got, exp in zip(qt[:3], ref.quantize(x, bits, group_size, axis)):
        assert torch.equal(got.cpu(), exp)
    x_hat = tokops.kv.dequantize(qt, backend=backend).cpu()
    assert torch.equal(x_hat, ref.dequantize(*qt[:3], bits, group_size, axis, x.shape[axis], dtype).cpu())
    assert not x_hat.isnan().any()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=3), st.sampled_from(BACKENDS), st.integers(0, 2**16))
def test_fp8_fuzz(shape, backend_device, seed):
    backend, device = backend_device
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10).to(device)
    ft = tokops.kv.quantize_fp8(x, backend=backend)
    _, scale = ref.quantize_fp8(x.cpu())
    assert torch.equal(ft.scale.cpu(), scale)
    y = tokops.kv.dequantize_fp8(ft, backend=backend)
    assert y.shape == x.shape and not y.isnan().any()


def test_fuzz_covers_backends():
    assert ("torch", "cpu") in BACKENDS
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
        assert ("triton", "cpu") in BACKENDS


# --------------------------------------------------------------------------- non-finite, huge, compiled (issue 15)
@st.composite
def hostile_quant_inputs(draw):
    backend, device = draw(st.sampled_from(BACKENDS))
    kind = draw(st.sampled_from(["nan", "inf", "huge_fp32", "edge_fp16", "mixed"]))
    bits = draw(st.sampled_from([8, 4, 2]))
    group_size = draw(st.sampled_from([4, 16, 32]))
    axis = draw(st.sampled_from([-1, -2]))
    n = draw(st.integers(1, 40))
    d = group_size * draw(st.integers(1, 2)) if axis == -1 else draw(st.integers(1, 12))
    compiled = draw(st.integers(0, 3)) == 0
    return backend, device, kind, bits, group_size, axis, n, d, compiled, draw(st.integers(0, 2**16))


@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_quant_inputs())
def test_quantize_non_finite_huge_and_compiled_fuzz(args):
    """NaN/inf reach the dequantized group as NaN (never made finite), every finite input either
    dequantizes to finite values or raises a clear error naming x, identical on every backend."""
    backend, device, kind, bits, group_size, axis, n, d, compiled, seed = args
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=g)
    dtype = torch.float32
    pos = (int(torch.randint(2, (), generator=g)), int(torch.randint(n, (), generator=g)),
           int(torch.randint(d, (), generator=g)))
    if kind == "nan":
        x[pos] = float("nan")
    elif kind == "inf":
        x[pos] = float("inf") if seed % 2 else -float("inf")
    elif kind == "huge_fp32":
        x = x * 10.0 ** float(torch.randint(3, 7, (), generator=g))
    elif kind == "edge_fp16":  # the fp16 range: never an error, always finite
        x, dtype = (x.sign() * 65504.0 * torch.rand(x.shape, generator=g)).half(), torch.float16
    else:
        x[pos] = float("nan")
        x = x * 1e6
    finite_in = bool(torch.isfinite(x).all())

    def run(x):
        qt = tokops.kv.quantize(x, bits, group_size, axis, backend=backend)
        return qt.codes, qt.scale, qt.zero, tokops.kv.dequantize(qt, torch.float32, backend=backend)

    if compiled:
        torch._dynamo.reset()
        run = torch.compile(run, backend="aot_eager", fullgraph=True)
    try:
        codes, scale, zero, out = (t.cpu() for t in run(x.to(device)))
    except ValueError as e:
        assert not compiled and finite_in and str(e).startswith("x: values up to"), e
        return
    exp = ref.quantize(x, bits, group_size, axis)
    assert torch.equal(codes, exp[0])
    torch.testing.assert_close(scale, exp[1], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(zero, exp[2], rtol=0, atol=0, equal_nan=True)
    if finite_in and not compiled:
        assert torch.isfinite(out).all()
    assert (out.isnan() | ~torch.isfinite(x.float())).sum() >= int((~torch.isfinite(x)).sum())
    assert not torch.isfinite(out[~torch.isfinite(x)]).any()  # NaN / inf never comes back finite
