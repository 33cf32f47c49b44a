"""KV quantization: DESIGN.md test vectors, backend agreement, error bound, bad input, registry."""

import os

import pytest
import torch

import tokops
from tokops import _registry
from tokops.kv import QuantizedTensor
from tokops.kv import reference as ref

from oracles import check_fp8_codes, naive_dequantize, naive_fp8, naive_quantize, naive_unpack


def _vector() -> torch.Tensor:
    i = torch.arange(32)
    return (((7 * i) % 11) - 5 + 0.25 * (i % 3)).to(torch.float16)


def _bits16(t: torch.Tensor) -> int:
    return t.view(torch.int16).item() & 0xFFFF


def _words(t: torch.Tensor) -> list[int]:
    return [w & 0xFFFFFFFF for w in t.reshape(-1).tolist()]


VECTORS = {
    4: dict(zero=0xC500, scale=0x399A, words=[0x7D49E5A0, 0x9F5A16B2, 0xB06C27E3, 0xC18D39F4],
            codes=[0, 10, 5, 14, 9, 4, 13, 7, 2, 11, 6, 1, 10, 5, 15, 9, 3, 14, 7, 2, 12, 6, 0, 11, 4, 15, 9, 3,
                   13, 8, 1, 12]),
    2: dict(zero=0xC500, scale=0x4300, words=[0xB618B6D8, 0x8B6D861D]),
}


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("axis", [-1, -2])
def test_design_vectors(backend_device, bits, axis):
    backend, device = backend_device
    x = _vector().to(device)
    x = x.view(1, 32) if axis == -1 else x.view(32, 1)
    qt = tokops.kv.quantize(x, bits, 32, axis, backend=backend)
    exp = VECTORS[bits]
    assert _bits16(qt.zero.cpu()) == exp["zero"]
    assert _bits16(qt.scale.cpu()) == exp["scale"]
    assert _words(qt.codes.cpu()) == exp["words"]
    if "codes" in exp:
        assert ref.unpack_codes(qt.codes.cpu(), bits, axis).reshape(-1).tolist() == exp["codes"]


@pytest.mark.parametrize("axis", [-1, -2])
def test_design_tie_vector(backend_device, axis):
    backend, device = backend_device
    x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6], dtype=torch.float16, device=device)
    x = x.view(1, 8) if axis == -1 else x.view(8, 1)
    qt = tokops.kv.quantize(x, 2, 8, axis, backend=backend)
    assert ref.unpack_codes(qt.codes.cpu(), 2, axis).reshape(-1)[:8].tolist() == [0, 0, 1, 2, 2, 2, 3, 3]


# Hand-computed vectors (independent of every implementation; derivations in the comments).
# DESIGN.md's vector at 8 bits: x_i = ((7 i) mod 11) - 5 + 0.25 (i mod 3).  min = -5 (i = 0), max = 5.5
# (i = 14: 7*14 mod 11 = 10, 14 mod 3 = 2), so zero = fp16(-5) = 0xC500 and scale = fp16(10.5 / 255) =
# fp16(0.0411765) = 0x2945 (= 1.3173828 * 2^-5 = 0.0411682).  Codes round((x_i + 5) / 0.0411682):
# i=1: x = 2.25, 7.25 / 0.0411682 = 176.1 -> 176; i=2: x = 3 - 5 + 0.5 = -1.5, 3.5 / 0.0411682 = 85.02 -> 85;
# i=14: x = 5.5, 10.5 / 0.0411682 = 255.05 -> 255 (clamped to QMAX), and so on; words pack 4 codes LSB first.
VECTOR8 = dict(zero=0xC500, scale=0x2945,
               codes=[0, 176, 85, 243, 152, 61, 219, 128, 36, 194, 103, 12, 170, 79, 255, 146, 55, 231, 121, 30, 206,
                      97, 6, 182, 73, 249, 158, 49, 225, 134, 24, 200],
               words=[0xF355B000, 0x80DB3D98, 0x0C67C224, 0x92FF4FAA, 0x1E79E737, 0xB60661CE, 0x319EF949,
                      0xC81886E1])
# Ties at 8 and 4 bits (scale exactly 1, so (x - zero) / scale = x): round half to even.
# 8 bits, G = 8: min 0, max 255 -> scale 1; 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4, 254.5 -> 254;
# words (LSB first): 0 | 0<<8 | 2<<16 | 2<<24 = 0x02020000 and 4 | 254<<8 | 255<<16 | 7<<24 = 0x07FFFE04.
# 4 bits, G = 8: min 0, max 15 -> scale 1; nibbles 0,F,0,2,2,E,E,8 (LSB first) -> 0x8EE220F0.
TIES = [(8, [0, 0.5, 1.5, 2.5, 3.5, 254.5, 255, 7], [0, 0, 2, 2, 4, 254, 255, 7], [0x02020000, 0x07FFFE04]),
        (4, [0, 15, 0.5, 1.5, 2.5, 13.5, 14.5, 7.5], [0, 15, 0, 2, 2, 14, 14, 8], [0x8EE220F0]),
        (2, [0, 1, 2, 3, 4, 5, 6, 6], [0, 0, 1, 2, 2, 2, 3, 3], None)]


@pytest.mark.parametrize("axis", [-1, -2])
def test_hand_computed_8bit_vector(backend_device, axis):
    backend, device = backend_device
    x = _vector().to(device)
    x = x.view(1, 32) if axis == -1 else x.view(32, 1)
    qt = tokops.kv.quantize(x, 8, 32, axis, backend=backend)
    assert _bits16(qt.zero.cpu()) == VECTOR8["zero"] and _bits16(qt.scale.cpu()) == VECTOR8["scale"]
    assert _words(qt.codes.cpu()) == VECTOR8["words"]
    assert naive_unpack(qt.codes.cpu(), 8, axis, 32).reshape(-1).tolist() == VECTOR8["codes"]
    # dequantize: code * scale + zero in fp32, exactly
    got = tokops.kv.dequantize(qt, torch.float32, backend=backend).cpu().reshape(-1)
    s = float(torch.tensor(VECTOR8["scale"], dtype=torch.int16).view(torch.float16))
    exp = torch.tensor([c * s for c in VECTOR8["codes"]], dtype=torch.float32) - 5.0
    assert torch.equal(got, exp)


@pytest.mark.parametrize("bits,x,codes,words", TIES, ids=lambda v: str(v) if isinstance(v, int) else None)
@pytest.mark.parametrize("axis", [-1, -2])
def test_hand_computed_tie_vectors(backend_device, bits, x, codes, words, axis):
    backend, device = backend_device
    x = torch.tensor(x, dtype=torch.float16, device=device)
    x = x.view(1, 8) if axis == -1 else x.view(8, 1)
    qt = tokops.kv.quantize(x, bits, 8, axis, backend=backend)
    assert naive_unpack(qt.codes.cpu(), bits, axis, 8).reshape(-1).tolist() == codes
    if words is not None:
        assert _words(qt.codes.cpu()) == words


SHAPES = [(2, 3, 37, 64), (1, 2, 64, 128), (5, 128), (1, 1, 1, 32)]
CASES = [(b, g) for b in (8, 4, 2) for g in (32, 64, 128)] + [(2, 8), (8, 4)]


def _random(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + torch.rand(shape[:-1] + (1,), generator=g)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bits,group_size", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backends_agree_with_reference(backend_device, shape, bits, group_size, axis, dtype):
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the torch backend is kv.reference itself: it is checked against the independent oracle "
                    "(test_backends_agree_with_naive_oracle, the hand-computed vectors)")
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    if axis == -1 and shape[-1] % group_size:
        pytest.skip("group_size must divide D for axis=-1 (tested in test_bad_inputs)")
    x = _random(shape, dtype, "cpu", seed=bits * 1000 + group_size)
    expected = ref.quantize(x, bits, group_size, axis)
    qt = tokops.kv.quantize(x.to(device), bits, group_size, axis, backend=backend)
    for name, got, exp in zip(("codes", "scale", "zero"), qt[:3], expected):
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert torch.equal(got.cpu(), exp), f"{name} differs in {(got.cpu() != exp).sum().item()} places"
    for out_dtype in (dtype, torch.float32):
        got = tokops.kv.dequantize(qt, out_dtype, backend=backend)
        exp = ref.dequantize(*expected, bits, group_size, axis, x.shape[axis], out_dtype)
        assert got.shape == x.shape and got.dtype == out_dtype
        assert torch.equal(got.cpu(), exp)


ORACLE_CASES = [(8, 32), (4, 64), (2, 128), (2, 8), (8, 4), (4, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis", [-1, -2])
@pytest.mark.parametrize("bits,group_size", ORACLE_CASES)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_backends_agree_with_naive_oracle(backend_device, shape, bits, group_size, axis, dtype):
    """Every backend -- the torch one too, which *is* ``kv.reference`` -- against the group-by-group
    Python oracle of tests/oracles.py (bit-exact: the spec defines the codes by one fp32 division)."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    if axis == -1 and shape[-1] % group_size:
        pytest.skip("group_size must divide D for axis=-1")
    x = _random(shape, dtype, "cpu", seed=bits * 100 + group_size + axis)
    x.view(-1)[:: 7] = x.view(-1)[:: 7].round()  # exact small integers: ties of (x - zero) / scale happen
    expected = naive_quantize(x, bits, group_size, axis)
    qt = tokops.kv.quantize(x.to(device), bits, group_size, axis, backend=backend)
    for name, got, exp in zip(("codes", "scale", "zero"), qt[:3], expected):
        assert torch.equal(got.cpu(), exp), f"{name} differs in {(got.cpu() != exp).sum().item()} places"
    got = tokops.kv.dequantize(qt, torch.float32, backend=backend).cpu()
    assert torch.equal(got, naive_dequantize(*expected, bits, group_size, axis, x.shape[axis]))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", [-1, -2])
def test_error_bound(bits, axis):
    """|x - x_hat| <= scale/2, plus the fp16 rounding of zero and of scale (DESIGN.md)."""
    x = _random((2, 4, 77, 64), torch.float32, "cpu", seed=bits)
    qt = tokops.kv.quantize(x, bits, 32, axis)
    x_hat = tokops.kv.dequantize(qt, torch.float32)
    # per-element group statistics, broadcast back to x's shape
    xt = x if axis == -1 else x.transpose(-1, -2)
    n = xt.shape[-1]
    pad = -n % 32
    lo = torch.nn.functional.pad(xt, (0, pad), value=float("inf")).unflatten(-1, (-1, 32)).amin(-1)
    hi = torch.nn.functional.pad(xt, (0, pad), value=float("-inf")).unflatten(-1, (-1, 32)).amax(-1)

    def per_elem(t):
        t = (t if axis == -1 else t.transpose(-1, -2)).float()
        t = t.repeat_interleave(32, -1)[..., :n]
        return t if axis == -1 else t.transpose(-1, -2)

    scale, zero = per_elem(qt.scale), per_elem(qt.zero)
    mn, mx = per_elem(lo if axis == -1 else lo.transpose(-1, -2)), per_elem(hi if axis == -1 else hi.transpose(-1, -2))
    bound = scale / 2 + (zero - mn).abs() + (mx - mn) * 2.0**-11 + 1e-6 * x.abs()
    err = (x - x_hat).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert err.max() > 0  # the data is not trivially representable


def test_constant_group_has_zero_scale():
    x = torch.full((2, 64), 1.5)
    x[1] = torch.randn(64)
    qt = tokops.kv.quantize(x, 4, 32, -1)
    assert (qt.scale[0] == 0).all()
    assert torch.equal(tokops.kv.dequantize(qt)[0], x[0])


def test_packed_memory_is_smaller():
    x = _random((1, 8, 256, 128), torch.float16, "cpu")
    for bits, ratio in ((8, 0.6), (4, 0.35), (2, 0.2)):
        qt = tokops.kv.quantize(x, bits, 32, -2)
        assert qt.nbytes() < ratio * x.numel() * 2


# --------------------------------------------------------------------------- fp8
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (4, 128), (3, 5, 96)], ids=lambda s: "x".join(map(str, s)))
def test_fp8(backend_device, shape, dtype):
    backend, device = backend_device
    interp = backend == "triton" and device == "cpu"
    if interp and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    x = _random(shape, dtype, "cpu", seed=7)
    x[0, ...] = 0  # an all-zero row: scale 0, codes 0, no NaN
    exp_codes, exp_scale = ref.quantize_fp8(x)
    # the reference (= the torch backend) against the cast written from the format (tests/oracles.py)
    naive_vals, naive_scale = naive_fp8(x)
    assert torch.equal(exp_scale, naive_scale) and torch.equal(exp_codes.double(), naive_vals)
    ft = tokops.kv.quantize_fp8(x.to(device), backend=backend)
    assert ft.codes.dtype == torch.float8_e4m3fn and ft.scale.dtype == torch.float32
    assert torch.equal(ft.scale.cpu(), exp_scale)
    got_codes = ft.codes.cpu()
    check_fp8_codes(x, got_codes, exp_codes)
    got = tokops.kv.dequantize_fp8(ft, torch.float32, backend=backend).cpu()
    assert not got.isnan().any()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, absolute <= 2^-9 * scale near zero
    tol = x.float().abs() * 2.0**-4 + exp_scale.unsqueeze(-1) * 2.0**-9
    assert ((got - x.float()).abs() <= tol).all()
    # dequantize is exact arithmetic on the codes it is given: codes * scale in fp32
    assert torch.equal(got, got_codes.float() * ft.scale.cpu().unsqueeze(-1))


@pytest.mark.skipif(not (_registry.triton_available() and (_registry.triton_interpreter() or torch.cuda.is_available())),
                    reason="needs triton (interpreter or GPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_without_fp8_instructions(monkeypatch, dtype):
    """sm_80/sm_86 have no fp8 conversion instructions: the Triton fp8 kernels then encode and decode
    e4m3fn with integer bit manipulation (``NATIVE_FP8=False``); it must give torch's bits exactly,
    ties to even and subnormals included (the kernel check compiles this path for sm_80)."""
    from tokops.triton_kernels import kv_quant as tk

    monkeypatch.setattr(tk, "native_fp8", lambda: False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # every e4m3fn value, the midpoints between neighbours (ties), and points just off them
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[vals.isfinite()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    row = torch.cat([vals, mids, mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(-torch.tensor(
        float("inf")))])
    x = torch.cat([row, torch.full((2048 - row.numel(),), 0.0)]).view(8, 256)
    x[:, 0] = 448.0  # scale 1: the values are their own codes
    x[1] = x[1] * 0.37 - 0.1
    x[2] = torch.randn(256, generator=torch.Generator().manual_seed(3)) * 1e-3
    x[3] = 0.0
    x = x.to(dtype)
    exp_codes, exp_scale = ref.quantize_fp8(x)
    ft = tokops.kv.quantize_fp8(x.to(device), backend="triton")
    assert torch.equal(ft.scale.cpu(), exp_scale)
    assert torch.equal(ft.codes.cpu().view(torch.uint8), exp_codes.view(torch.uint8))
    got = tokops.kv.dequantize_fp8(ft, torch.float32, backend="triton").cpu()
    assert torch.equal(got, ref.dequantize_fp8(exp_codes, exp_scale, torch.float32))
    # every finite bit pattern decodes to torch's value
    all_codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = all_codes.float().isfinite()
    codes = all_codes[finite].view(1, -1)
    one = torch.ones(1, dtype=torch.float32)
    got = tokops.kv.dequantize_fp8(tokops.kv.Fp8Tensor(codes.to(device), one.to(device), torch.float32), torch.float32,
                                   backend="triton").cpu()
    assert torch.equal(got, codes.float())


# --------------------------------------------------------------------------- bad input
def _bad_calls():
    x = torch.randn(2, 3, 16, 64)
    yield "x", TypeError, lambda: tokops.kv.quantize(x.to(torch.int32))
    yield "x", TypeError, lambda: tokops.kv.quantize(x.double())
    yield "x", TypeError, lambda: tokops.kv.quantize(x.numpy())
    yield "bits", ValueError, lambda: tokops.kv.quantize(x, bits=3)
    yield "bits", TypeError, lambda: tokops.kv.quantize(x, bits=4.0)
    yield "group_size", ValueError, lambda: tokops.kv.quantize(x, group_size=48)
    yield "group_size", ValueError, lambda: tokops.kv.quantize(x, group_size=2)
    yield "group_size", ValueError, lambda: tokops.kv.quantize(x[..., :48].contiguous(), group_size=32, axis=-1)
    # (a transposed x is accepted since issue 16: tests/test_strided.py)
    yield "non-empty", ValueError, lambda: tokops.kv.quantize(torch.empty(2, 0, 64))
    yield "axis", ValueError, lambda: tokops.kv.quantize(x, axis=0)
    yield "axis", ValueError, lambda: tokops.kv.quantize(x, axis=-3)
    yield "x", ValueError, lambda: tokops.kv.quantize(torch.randn(64))
    qt = tokops.kv.quantize(x, 4, 32, -2)
    yield "qt.codes", ValueError, lambda: tokops.kv.dequantize(qt._replace(codes=qt.codes[:, :, :1].contiguous()))
    yield "qt.scale", TypeError, lambda: tokops.kv.dequantize(qt._replace(scale=qt.scale.float()))
    yield "qt.codes", ValueError, lambda: tokops.kv.dequantize(qt._replace(length=99))
    yield "qt.bits", ValueError, lambda: tokops.kv.dequantize(qt._replace(bits=3))
    yield "dtype", TypeError, lambda: tokops.kv.dequantize(qt, torch.int8)
    yield "qt", TypeError, lambda: tokops.kv.dequantize(tuple(qt))
    yield "x", TypeError, lambda: tokops.kv.quantize_fp8(x.half().to(torch.int16))
    ft = tokops.kv.quantize_fp8(x)
    yield "ft.scale", ValueError, lambda: tokops.kv.dequantize_fp8(ft._replace(scale=ft.scale[:1]))


@pytest.mark.parametrize("case", range(len(list(_bad_calls()))))
def test_bad_inputs(case):
    name, exc, call = list(_bad_calls())[case]
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        call()


@pytest.mark.cuda
def test_cuda_ops_reject_bad_input_directly():
    """A direct torch.ops call with a bad layout raises instead of reading out of bounds."""
    if not tokops.cuda_compiled():
        pytest.skip("CUDA kernels not built")
    x = torch.randn(2, 16, 48, device="cuda")
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.tokops.kv_quantize_cuda(x, 4, 32, -1)
    qt = tokops.kv.quantize(torch.randn(2, 16, 64, device="cuda"), 4, 32, -2, backend="cuda")
    with pytest.raises(RuntimeError, match="codes has shape"):
        torch.ops.tokops.kv_dequantize_cuda(qt.codes, qt.scale, qt.zero, 4, 32, -2, 999, torch.float16)


# --------------------------------------------------------------------------- registry / compile
def test_opcheck(backend_device):
    backend, device = backend_device
    x = _random((2, 2, 40, 64), torch.float32, device)
    torch.library.opcheck(torch.ops.tokops.kv_quantize.default, (x, 4, 32, -2, backend))
    codes, scale, zero = torch.ops.tokops.kv_quantize(x, 4, 32, -2, backend)
    torch.library.opcheck(torch.ops.tokops.kv_dequantize.default,
                          (codes, scale, zero, 4, 32, -2, 40, torch.float16, backend))
    # torch's schema checker compares tensors with arithmetic that float8 tensors do not
    # support ("mul_cpu_reduced_float" not implemented for Float8_e4m3fn), so test_schema is
    # skipped for the two ops with an fp8 input or output; their other opcheck tests run.
    no_schema = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.tokops.kv_quantize_fp8.default, (x, backend), test_utils=no_schema)
    c8, s8 = torch.ops.tokops.kv_quantize_fp8(x, backend)
    torch.library.opcheck(torch.ops.tokops.kv_dequantize_fp8.default, (c8, s8, torch.float32, backend),
                          test_utils=no_schema)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def roundtrip(x):
        qt = tokops.kv.quantize(x, 4, 32, -2)
        y = tokops.kv.dequantize(qt, torch.float32)
        ft = tokops.kv.quantize_fp8(x)
        return y + tokops.kv.dequantize_fp8(ft, torch.float32), qt.codes

    x = _random((2, 4, 40, 64), torch.float32, device)
    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend=compiler)
    y, codes = compiled(x)
    y_ref, codes_ref = roundtrip(x)
    assert torch.equal(codes, codes_ref)
    torch.testing.assert_close(y, y_ref)


def test_quantized_tensor_is_a_namedtuple():
    qt = tokops.kv.quantize(torch.randn(1, 4, 10, 32), 8, 32, -2)
    assert isinstance(qt, QuantizedTensor) and qt.length == 10 and qt.axis == -2 and qt.dtype == torch.float32
    codes, scale, zero, *_ = qt
    assert codes.shape == (1, 4, 8, 32) and scale.shape == (1, 4, 1, 32)


def test_auto_backend_resolves_as_documented_and_matches_the_oracle():
    """``auto`` is the CUDA kernel only where verified on a GPU, else Triton on a GPU, else torch on CPU
    (DESIGN.md), and whatever it resolves to gives the independent oracle's bits (on CPU auto = torch,
    so comparing auto with torch would compare torch with itself)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = _random((2, 4, 40, 64), torch.float16, device)
    be = _registry.resolve_backend("kv_quantize", "auto", device)
    if device.type == "cpu":
        assert be == "torch"
    else:
        assert be in ("cuda", "triton") and (be != "cuda" or "kv_quantize" in _registry.GPU_VERIFIED_CUDA
                                             or os.environ.get("TOKOPS_AUTO_CUDA") == "1")
    a = tokops.kv.quantize(x, 4, 32, -1)
    for got, exp in zip(a[:3], naive_quantize(x.cpu(), 4, 32, -1)):
        assert torch.equal(got.cpu(), exp)
