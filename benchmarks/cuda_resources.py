"""Per-kernel resources of the CUDA kernels in the built extension ``tokops._C``, read from the binary.

    python -m benchmarks.cuda_resources [SO_PATH]     # markdown table: kernel x arch

The numbers come from the machine code that was really built (every architecture in
``TORCH_CUDA_ARCH_LIST``), through ``cuobjdump`` (CUDA toolkit, pip ``nvidia`` packages, or the copy
Triton bundles); no GPU is needed:

* ``registers``, ``shared_bytes``, ``stack_bytes``, ``local_bytes``: ``cuobjdump --dump-resource-usage``
  (``shared_bytes`` is the static shared memory per block as the binary records it; on sm_90 this
  includes the 1 KiB the driver reserves per block, ``-Xptxas -v`` prints it without);
* ``spill_stores`` / ``spill_loads``: the number of local-memory store / load instructions
  (``STL`` / ``LDL``) in the kernel's SASS (``cuobjdump --dump-sass``); with ``stack_bytes == 0``
  they are 0 and nothing spills;
* ``sass_instructions``: the kernel's SASS instruction count (``NOP`` padding excluded);
* ``mma``: tensor-core instructions in the SASS (``HMMA`` from ``mma.sync`` / WMMA, ``HGMMA`` from
  ``wgmma``): 0 means the kernel runs on the CUDA cores only.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

KEYS = ("kernel", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes", "stack_bytes",
        "local_bytes", "sass_instructions", "mma")


def extension_path() -> str | None:
    """The path of the built ``tokops._C`` (found without importing tokops or torch), or None."""
    try:
        spec = importlib.util.find_spec("tokops")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(glob.glob(os.path.join(loc, "_C.*.so")) + glob.glob(os.path.join(loc, "_C.*.pyd")))
        if found:
            return found[0]
    return None


def cuobjdump() -> str | None:
    """A ``cuobjdump``: on PATH, in CUDA_HOME or /usr/local/cuda*, in a pip nvidia package, or Triton's copy."""
    cands = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if home:
            cands.append(os.path.join(home, "bin", "cuobjdump"))
    for sp in sys.path:
        cands += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin", "cuobjdump")))
    try:
        tri = importlib.util.find_spec("triton")  # does not import triton
    except (ImportError, ValueError):
        tri = None
    if tri is not None and tri.submodule_search_locations:
        for loc in tri.submodule_search_locations:
            cands.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel name without the parameter list (``c++filt`` if present)."""
    out = {n: n for n in names}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        r = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
        lines = r.stdout.splitlines()
        if r.returncode == 0 and len(lines) == len(names):
            for n, d in zip(names, lines):
                d = re.sub(r"^void ", "", d).replace("(anonymous namespace)", "{anon}")
                depth, cut = 0, len(d)
                for i, ch in enumerate(d):  # drop the parameter list: the '(' at template depth 0
                    depth += ch == "<"
                    depth -= ch == ">"
                    if ch == "(" and depth == 0:
                        cut = i
                        break
                out[n] = d[:cut]
    return out


def _sections(text: str):
    """Yield (arch, section text) for each ``Fatbin elf code`` section of a cuobjdump listing."""
    parts = re.split(r"^Fatbin (?:elf|ptx) code:\s*\n=+\s*\n", text, flags=re.M)
    for part in parts[1:]:
        m = re.search(r"^arch = (\S+)", part, re.M)
        if m:
            yield m.group(1), part


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict]:
    """``cuobjdump --dump-resource-usage`` -> {(mangled kernel, arch): resources}."""
    res = {}
    for arch, part in _sections(text):
        for m in re.finditer(r"^\s*Function (\S+):\s*\n\s*(.+)$", part, re.M):
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", m.group(2)))
            res[(m.group(1), arch)] = {"registers": int(fields.get("REG", 0)),
                                       "shared_bytes": int(fields.get("SHARED", 0)),
                                       "stack_bytes": int(fields.get("STACK", 0)),
                                       "local_bytes": int(fields.get("LOCAL", 0))}
    return res


def parse_sass(text: str) -> dict[tuple[str, str], dict]:
    """``cuobjdump --dump-sass`` -> {(mangled kernel, arch): instruction counts}."""
    res = {}
    for arch, part in _sections(text):
        for block in re.split(r"^\s*Function : ", part, flags=re.M)[1:]:
            name = block.split(None, 1)[0]
            ops = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", block, re.M)
            res[(name, arch)] = {"sass_instructions": sum(op != "NOP" for op in ops),
                                 "spill_stores": sum(op == "STL" for op in ops),
                                 "spill_loads": sum(op == "LDL" for op in ops),
                                 "mma": sum(op.startswith(("HMMA", "HGMMA")) for op in ops)}
    return res


def cuda_kernel_rows(so_path: str | None = None, *, sass: bool = True) -> list[dict]:
    """One row per (CUDA kernel, architecture) in the built extension, sorted by kernel then arch.

    ``so_path`` defaults to the installed ``tokops._C``. Returns ``[]`` when the extension has no
    device code (a CPU-only build); raises ``FileNotFoundError`` when there is no extension or no
    ``cuobjdump``."""
    so = so_path or extension_path()
    if not so or not os.path.isfile(so):
        raise FileNotFoundError(f"no built tokops._C extension (looked at {so!r})")
    tool = cuobjdump()
    if tool is None:
        raise FileNotFoundError("no cuobjdump (CUDA toolkit, pip nvidia package or Triton's bundled copy)")
    r = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True, check=False)
    if r.returncode != 0 or "does not contain device code" in r.stdout + r.stderr:
        if "does not contain device code" in r.stdout + r.stderr:
            return []
        raise RuntimeError(f"{tool} --dump-resource-usage {so} failed: {r.stderr.strip()[:300]}")
    usage = parse_resource_usage(r.stdout)
    counts = {}
    if sass:
        s = subprocess.run([tool, "--dump-sass", so], capture_output=True, text=True, check=False)
        if s.returncode == 0:
            counts = parse_sass(s.stdout)
    names = _demangle(sorted({k for k, _ in usage}))
    rows = []
    for (mangled, arch), u in usage.items():
        row = {"kernel": names[mangled], "arch": arch, "registers": u["registers"],
               "spill_stores": None, "spill_loads": None, "shared_bytes": u["shared_bytes"],
               "stack_bytes": u["stack_bytes"], "local_bytes": u["local_bytes"], "sass_instructions": None,
               "mma": None, "mangled": mangled}
        row.update(counts.get((mangled, arch), {}))
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["arch"], r["mangled"]))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["kernel", "arch", "registers", "spill STL", "spill LDL", "shared (B)", "stack (B)", "SASS instr.", "HMMA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [f"`{r['kernel']}`", r["arch"], r["registers"], r["spill_stores"], r["spill_loads"],
                r["shared_bytes"], r["stack_bytes"], r["sass_instructions"], r["mma"]]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    so = argv[0] if argv else None
    try:
        rows = cuda_kernel_rows(so)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"cuda_resources: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"cuda_resources: {so or extension_path()} has no device code (a CPU-only build)")
        return 0
    print(f"CUDA kernels in {Path(so or extension_path()).name} (cuobjdump {cuobjdump()}):\n")
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
