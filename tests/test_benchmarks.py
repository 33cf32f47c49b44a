"""The benchmark harness runs end to end (CPU smoke run) and writes its report."""

import json

from benchmarks import run


def test_harness_smoke(tmp_path):
    assert {"attention", "kv", "kv_cache", "merge"} <= set(run.families())
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["env"]["date_utc"] and data["env"]["torch"] and data["env"]["device"]
    assert not [r for r in data["rows"] if "error" in r]
    rows = data["rows"]
    assert {r["family"] for r in rows} == {"attention", "kv", "merge"}
    assert rows and all(r["time_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert any(r["impl"] == "tokops triton" for r in rows) or data["env"]["device_kind"] == "cuda"
    report = (tmp_path / "report.md").read_text()
    assert "speedup" in report and data["env"]["torch"] in report
    if data["env"]["device_kind"] == "cpu":
        assert "CPU timings" in report


def _flat(o):
    import torch

    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _flat(x)]
    return []


def test_benchmark_implementations_compute_the_same_result():
    """The timings compare like with like: every implementation of a (quick, CPU) benchmark case
    returns what its baseline returns, where the two compute the same thing.  Exceptions, by design:
    block-sparse attention at density < 1 without causal (the dense baseline attends to more keys),
    and the quantized-cache decode vs the unquantized fp16 baseline (compared with the
    dequantize-then-SDPA implementation instead).  Tolerances: fp32 attention over 256-512 keys 1e-5;
    the fp16 decode outputs (|out| < 2) two fp16 ulps at 2 (2e-3; also paged vs contiguous decode, kv_paged);
    token merging fp32 1e-5 and exact indices; KV codes exact, fp8 codes exact up to the Triton interpreter's known e4m3 casts (< 5%)."""
    import importlib

    import torch

    from tokops import _registry

    interp = _registry.triton_interpreter()
    for fam in run.families():
        for case in importlib.import_module(f"benchmarks.bench_{fam}").cases("cpu", True):
            outs = {name: _flat(fn()) for name, fn in case.fns.items()}
            names = list(outs)
            base = names[0]
            if fam == "attention" and 0 < case.params.get("density", 1.0) < 1 and not case.params.get("causal"):
                continue
            if fam == "kv_cache":
                base, names = names[1], names[2:]
            for name in names[1:] if base == names[0] else names:
                for i, (a, b) in enumerate(zip(outs[base], outs[name])):
                    what = f"{fam} / {case.name} / {name} output {i}"
                    assert a.shape == b.shape and a.dtype == b.dtype, what
                    if a.dtype == torch.float8_e4m3fn:
                        diff = (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()
                        assert diff == 0 or (interp and diff < 0.05), (what, diff)
                    elif not a.is_floating_point():
                        assert torch.equal(a, b), what
                    else:
                        tol = {"attention": 1e-5, "kv": 0.0, "kv_cache": 2e-3, "kv_paged": 2e-3, "merge": 1e-5}[fam]
                        torch.testing.assert_close(b, a, atol=tol, rtol=0, equal_nan=True, msg=what)
