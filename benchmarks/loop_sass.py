"""SASS instruction counts of the loops of compiled Triton kernels (a static proxy for issue 12's
"instructions per tile"), on a machine without a GPU.

Compiles the kernel check's cases (``benchmarks/kernel_check.py``: stand-in driver, real launchers,
meta tensors), assembles each kernel's PTX with Triton's bundled ``ptxas``, disassembles the cubin
with ``nvdisasm`` and reports, per loop (a backward branch), the number of SASS instructions of its
body and how many of them are global/shared loads, MMA, int->float conversions and arithmetic.

    TRITON_INTERPRET=0 python -m benchmarks.loop_sass --only "kv decode" --kernel _decode_partial_kernel
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

from benchmarks import kernel_check as kc

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
CLASSES = {
    "ldg": ("LDG", "LDGSTS", "UTMALDG"),
    "lds": ("LDS", "LDSM"),
    "mma": ("HMMA", "HGMMA", "IMMA", "QGMMA"),
    "i2f": ("I2F", "I2FP", "F2I"),
    "cvt16": ("F2FP", "F2F"),
}


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass(ptx: str) -> str:
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).split(",")[0]
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        subprocess.run([_tool("ptxas"), f"--gpu-name={arch}", src, "-o", cubin], check=True, capture_output=True)
        return subprocess.run([_tool("nvdisasm"), "-c", cubin], check=True, capture_output=True, text=True).stdout


def loops(text: str) -> list[dict]:
    """Per backward branch: body length and instruction classes (innermost loops first by size)."""
    insns = []
    for m in _INSN.finditer(text):
        insns.append((int(m.group(1), 16), m.group(3), m.group(4)))
    addr_idx = {a: i for i, (a, _, _) in enumerate(insns)}
    labels = dict(re.findall(r"^\.(L_x_\d+):\s*$", text, re.M) and [])
    # label -> address: nvdisasm prints ".L_x_N:" before the instruction at that address
    label_addr = {}
    pending = []
    for line in text.splitlines():
        lm = re.match(r"^\s*\.(L_x_\d+):", line)
        if lm:
            pending.append(lm.group(1))
            continue
        im = _INSN.search(line)
        if im and pending:
            for p in pending:
                label_addr[p] = int(im.group(1), 16)
            pending = []
    del labels
    out = []
    for i, (a, op, rest) in enumerate(insns):
        if op.startswith("BRA"):
            tm = re.search(r"`\(\.(L_x_\d+)\)", rest)
            if not tm or tm.group(1) not in label_addr:
                continue
            ta = label_addr[tm.group(1)]
            if ta > a:
                continue
            body = insns[addr_idx[ta]: i + 1]
            cnt = collections.Counter()
            for _, o, _ in body:
                base = o.split(".")[0]
                for cls, names in CLASSES.items():
                    if base in names:
                        cnt[cls] += 1
            out.append(dict(start=ta, end=a, n=len(body), **cnt))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="kv decode")
    ap.add_argument("--kernel", default="_decode_partial_kernel")
    ap.add_argument("--arch", type=int, action="append")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    recs = kc.run_check(tuple(a.arch or (90,)), a.quick, a.only, log=lambda m: None)
    for r in recs:
        if a.kernel not in r.kernel or r.kernel_obj is None:
            continue
        text = sass(r.kernel_obj.asm["ptx"])
        total = len(_INSN.findall(text))
        ls = sorted(loops(text), key=lambda d: -d["n"])
        desc = "; ".join(f"loop {d['n']} insns (ldg {d.get('ldg', 0)}, lds {d.get('lds', 0)}, mma {d.get('mma', 0)}, "
                         f"i2f {d.get('i2f', 0)}, f2f {d.get('cvt16', 0)})" for d in ls) or "no loop"
        print(f"sm_{r.arch} {r.kernel} [{r.case} | {r.config}]: {total} insns, regs {r.registers}, "
              f"spills {r.spill_stores}/{r.spill_loads}, async {r.async_copies}, {r.mma}: {desc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
