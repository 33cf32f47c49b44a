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
