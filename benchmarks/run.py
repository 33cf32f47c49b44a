"""tokops microbenchmark harness.

    python -m benchmarks.run                 # every family, default sizes for this machine
    python -m benchmarks.run --family kv     # one family
    python -m benchmarks.run --quick         # small sizes (CI smoke run)
    python -m benchmarks.run --all           # every family, full sizes: the report for benchmarks/results/

Every implementation of a case is timed side by side in one run (CUDA events via
``triton.testing.do_bench`` on a GPU, ``time.perf_counter`` on CPU). Reported: time,
GB/s or TFLOP/s, the speedup over the baseline (the case's first implementation), and
the fraction of the hardware limit of the detected GPU (``harness.GPU_LIMITS``, from DESIGN.md:
H200 4.8 TB/s, H100 SXM 3.35 TB/s ...) and of the device-to-device copy bandwidth measured in the
same run. Writes ``report.md``, ``results.json`` and ``speedup.png`` to ``--out``; ``results.json``
and ``report.md`` are rewritten after every case, so a run that is stopped keeps what it measured,
and a case that fails is recorded as an error row and the run goes on.

tokops rows name their backend (``tokops triton``, ``tokops cuda``); ``TOKOPS_AUTO_CUDA`` is
ignored here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import pkgutil
import platform
import subprocess
import sys
from pathlib import Path

import torch

from . import harness

HERE = Path(__file__).resolve().parent


def families() -> list[str]:
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([str(HERE)])
                  if m.name.startswith("bench_"))


def environment(device: str) -> dict:
    import tokops

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=False).stdout.strip() or None
    except OSError:
        commit = None
    info = tokops.info()
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "device_kind": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": info["triton"],
        "tokops": info["tokops"],
        "tokops_cuda_kernels": info["cuda_compiled"],
        "cuda_archs": info["cuda_archs"],
        "python": platform.python_version(),
        "git_commit": commit,
    }


def copy_bandwidth(device: str) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    if device != "cuda":
        return None
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = harness.time_fn(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / t


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def run_case(case: harness.Case, device: str, copy_bw: float | None, limits: dict | None = None):
    """Time every implementation of ``case``; yields one row per implementation as soon as it is measured."""
    limits = limits or harness.hardware_limits(device)
    base_t = None
    for impl, fn in case.fns.items():
        row = {"family": case.family, "case": case.name, "impl": impl, "params": case.params, "notes": case.notes}
        try:
            t = harness.time_fn(fn, device)
        except Exception as e:  # e.g. the reference running out of memory at N = 65536
            row.update(error=_err(e))
            yield row
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        if base_t is None:
            base_t = t
        row.update(time_ms=t * 1e3, speedup=base_t / t)
        if case.bytes:
            row["GB/s"] = case.bytes / t / 1e9
            if limits["hbm_bytes_per_s"]:
                row["pct_hbm_limit"] = 100 * case.bytes / t / limits["hbm_bytes_per_s"]
            if device == "cuda":
                if copy_bw:
                    row["pct_measured_copy"] = 100 * case.bytes / t / copy_bw
        if case.flops:
            row["TFLOP/s"] = case.flops / t / 1e12
            if limits["bf16_flops_per_s"]:
                row["pct_peak_flops"] = 100 * case.flops / t / limits["bf16_flops_per_s"]
        row.update(case.extra)
        yield row


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _mem(r: dict) -> str:
    """Peak extra memory of this row's implementation in MiB: measured on the GPU (``peak_bytes``),
    else traced on meta tensors (``traced_peak_bytes``, shown as ``~N``); ``-`` when neither."""
    measured = r.get("peak_bytes", {}).get(r["impl"])
    if isinstance(measured, int):
        return f"{measured / 2**20:.3g}"
    traced = r.get("traced_peak_bytes", {})
    # the kernels' backends share one traced figure; the torch backend's match chunks are not in it
    t = traced.get(r["impl"], traced.get("tokops") if r["impl"] in ("tokops triton", "tokops cuda") else None)
    return "-" if t is None else f"~{t / 2**20:.3g}"


def markdown(env: dict, rows: list[dict], copy_bw: float | None, complete: bool = True) -> str:
    lines = ["# tokops microbenchmarks", ""]
    if not complete:
        lines += ["> **Partial**: the run is still going, or it was stopped before its last case.", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    if copy_bw:
        lines.append(f"- **measured device-to-device copy**: {copy_bw / 1e9:.0f} GB/s (read + write)")
    if env["device_kind"] != "cuda":
        lines += ["", "> **CPU timings.** No GPU here: the torch reference and the Triton interpreter ran on "
                  "the CPU at small sizes. These numbers say nothing about GPU performance."]
    lines += ["", "Speedup is the baseline's time (first row of each case) over this row's time.", "",
              "| family | case | params | impl | time (ms) | GB/s | TFLOP/s | speedup | % HBM limit | % peak | "
              "peak extra MiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append("| " + " | ".join([
            r["family"], r["case"], params, r["impl"], _fmt(r.get("time_ms")), _fmt(r.get("GB/s")),
            _fmt(r.get("TFLOP/s")), _fmt(r.get("speedup")), _fmt(r.get("pct_hbm_limit")),
            _fmt(r.get("pct_peak_flops")), _mem(r), r.get("error", r.get("notes", ""))]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, env: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "speedup" in r]
    if not ok:
        return False
    labels = [f"{r['case']} [{r['impl']}]" for r in ok]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(ok))))
    ax.barh(range(len(ok)), [r["speedup"] for r in ok], color=["#888" if r["speedup"] == 1 else "#2a7" for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over baseline (log scale)")
    cpu_note = "\nCPU timings: torch reference vs the Triton INTERPRETER, not GPU figures" if env["device_kind"] != "cuda" else ""
    ax.set_title(f"tokops — {env['device']} — torch {env['torch']} — {env['date_utc']}{cpu_note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=families(), help="repeatable; default: all")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--all", action="store_true", help="every family at full size (on a GPU; CPU runs stay small)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/local/...)")
    args = p.parse_args(argv)

    import os

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels only run interpreted on CPU
    if os.environ.pop("TOKOPS_AUTO_CUDA", None) is not None:
        print("NOTE: TOKOPS_AUTO_CUDA ignored: the benchmarks name each backend explicitly")
    # On CPU the Triton kernels run interpreted: always small sizes there (--all still means every family).
    quick = args.quick or device == "cpu"
    env = environment(device)
    limits = harness.hardware_limits(device)
    env["peak_hbm_TB/s"] = limits["hbm_bytes_per_s"] and limits["hbm_bytes_per_s"] / 1e12
    env["peak_bf16_TFLOP/s"] = limits["bf16_flops_per_s"] and limits["bf16_flops_per_s"] / 1e12
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out = args.out or HERE / "results" / "local" / f"{device}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    print(f"tokops benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['date_utc']})")
    if device == "cpu":
        print("NOTE: CPU timings (no GPU): reference and Triton-interpreter at small sizes, not GPU figures.")
    copy_bw = copy_bandwidth(device)
    rows = []

    def save(complete: bool) -> None:  # after every case: a stopped run keeps what it measured
        data = {"env": env, "copy_bandwidth": copy_bw, "complete": complete, "rows": rows}
        for name, text in (("results.json", json.dumps(data, indent=1)),
                           ("report.md", markdown(env, rows, copy_bw, complete))):
            tmp = out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(out / name)

    for fam in args.family or families():
        try:
            fam_cases = importlib.import_module(f"benchmarks.bench_{fam}").cases(device, quick)
        except Exception as e:  # a family that cannot even build its inputs: recorded, the others run
            rows.append({"family": fam, "case": "(building the cases)", "impl": "-", "params": {}, "notes": "",
                         "error": _err(e)})
            print(f"  {fam:<10} cases failed: {rows[-1]['error']}", flush=True)
            save(False)
            continue
        for case in fam_cases:
            try:
                for r in run_case(case, device, copy_bw, limits):
                    rows.append(r)
                    shown = r.get("error") or (f"{r['time_ms']:.4g} ms  x{r['speedup']:.2f}"
                                               + (f"  {r['GB/s']:.1f} GB/s" if "GB/s" in r else "")
                                               + (f"  {r['TFLOP/s']:.1f} TFLOP/s" if "TFLOP/s" in r else "")
                                               + (f"  {r['pct_hbm_limit']:.0f}% HBM" if "pct_hbm_limit" in r else ""))
                    print(f"  {r['family']:<10} {r['case']:<44} {r['impl']:<16} {shown}", flush=True)
                    save(False)
            except Exception as e:  # recorded; the next case runs
                rows.append({"family": case.family, "case": case.name, "impl": "-", "params": case.params,
                             "notes": case.notes, "error": _err(e)})
                print(f"  {case.family:<10} {case.name:<44} failed: {rows[-1]['error']}", flush=True)
                save(False)
    save(True)
    plotted = plot(rows, out / "speedup.png", env)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}" + (f", {out / 'speedup.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
