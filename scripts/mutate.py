#!/usr/bin/env python
"""Mutation testing of tokops: plant realistic bugs one at a time and check that the tests catch them.

    python scripts/mutate.py            # every mutant
    python scripts/mutate.py --fast     # the subset CI runs (.ci/run)
    python scripts/mutate.py --list     # the mutants, without running anything
    python scripts/mutate.py -m attn-fwd-causal-tile-bound -m kv-quant-round-half-up

Each mutant is a (file, anchor, old snippet, new snippet): the first occurrence of ``old`` after the
unique ``anchor`` (or the unique occurrence of ``old`` when there is no anchor) is replaced by ``new``
in a scratch copy of the working tree (``/tmp/tokops-mutate-*``; the repository is never modified),
and the mutant's tests run there with ``timeout``.  A mutant whose snippet is not found fails loudly
("mutant does not apply"): after a refactor, update the snippet rather than dropping the mutant.

Outcome per mutant: ``killed`` (a test failed), ``killed (timeout)``, ``SURVIVED`` (every test
passed), or ``ERROR`` (pytest could not run the selection: counted as not killed).  Before the
mutants, the union of the selected tests runs on the unmutated copy and must pass.  Prints
``killed K of N`` and exits non-zero unless K == N.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TA = "tests/test_attention.py"
TV = "tests/test_attention_varlen.py"
TK = "tests/test_kv_quant.py"
TC = "tests/test_kv_cache.py"
TM = "tests/test_merge.py"
TP = "tests/test_patch.py"


@dataclass
class Mutant:
    name: str
    family: str  # attention | kv | merge
    path: str
    old: str
    new: str
    tests: list[str]  # pytest arguments (node ids / files)
    k: str = ""  # pytest -k expression
    anchor: str = ""  # the mutation is the first ``old`` after this unique text
    fast: bool = False
    why: str = ""
    extra: list[str] = field(default_factory=list)


MUTANTS = [
    # ------------------------------------------------------------------ attention: Triton kernels
    Mutant("attn-fwd-causal-tile-bound", "attention", "triton_kernels/block_sparse_attn.py",
           "lim_n = pid_m * BM + BM - 1 + causal_off", "lim_n = pid_m * BM + BM - 2 + causal_off",
           [TA], "off_by_one and triton-", anchor="def _fwd_kernel(", fast=True,
           why="forward skips the key tile holding the last row's last key when Nk - Nq = 1 (mod 64)"),
    Mutant("attn-dq-causal-tile-bound", "attention", "triton_kernels/block_sparse_attn.py",
           "lim_n = pid_m * BM + BM - 1 + causal_off", "lim_n = pid_m * BM + BM - 2 + causal_off",
           [TA], "off_by_one and triton-", anchor="def _bwd_dq_kernel(",
           why="dQ pass skips the same tile"),
    Mutant("attn-dkdv-causal-tile-bound", "attention", "triton_kernels/block_sparse_attn.py",
           "lim_m = pid_n * BN - BM + 1 - causal_off", "lim_m = pid_n * BN - BM + 2 - causal_off",
           [TA], "off_by_one and triton-", anchor="def _bwd_dkdv_kernel(", 
           why="dK/dV pass skips the query tile whose last row sees the key tile"),
    Mutant("attn-mass-causal-tile-bound", "attention", "triton_kernels/block_sparse_attn.py",
           "lim_m = pid_n * BN - BM + 1 - causal_off", "lim_m = pid_n * BN - BM + 2 - causal_off",
           [TA], "off_by_one and triton-", anchor="def _mass_kernel(",
           why="key-mass pass skips the same query tile"),
    Mutant("attn-causal-diagonal-strict", "attention", "triton_kernels/block_sparse_attn.py",
           "valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_off)",
           "valid = valid & (offs_n[None, :] < offs_m[:, None] + causal_off)",
           [TA], "sdpa and triton- and float32", anchor="def _logits(",
           why="causal mask drops the diagonal"),
    Mutant("attn-dropped-key-bias", "attention", "triton_kernels/block_sparse_attn.py",
           "s += bias[None, :] * 1.4426950408889634", "s += bias[None, :] * 0.0",
           [TA], "sdpa and triton- and float32", anchor="def _logits(", 
           why="key_bias never reaches the logits"),
    Mutant("attn-gqa-head-mapping", "attention", "triton_kernels/block_sparse_attn.py",
           "hk = h // GROUP", "hk = h % GROUP",
           [TA], "sdpa and triton- and float32", anchor="def _fwd_kernel(",
           why="query head h reads kv head h % G instead of h // G"),
    Mutant("attn-wrong-scale", "attention", "triton_kernels/block_sparse_attn.py",
           "return scale * LOG2E", "return scale",
           [TA], "sdpa and triton- and float32",
           why="softmax in base 2 without the log2(e) factor"),
    Mutant("attn-split-combine-no-rescale", "attention", "triton_kernels/block_sparse_attn.py",
           "acc = acc * alpha[:, None] + a_s * beta[:, None]", "acc = acc * alpha[:, None] + a_s",
           [TA], "split_kv", anchor="def _combine_kernel(",
           why="split-KV merge adds a split's accumulator without its max rescaling"),
    Mutant("attn-varlen-sequence-start", "attention", "triton_kernels/block_sparse_attn.py",
           "return lo.to(tl.int64), tl.minimum(hi - lo, max_len)",
           "return lo.to(tl.int64) * 0, tl.minimum(hi - lo, max_len)",
           [TV], "fp64 and triton-", anchor="def _seq_bounds(",
           why="varlen: every packed sequence reads its rows from row 0 instead of cu_seqlens[s]"),
    Mutant("attn-varlen-causal-alignment", "attention", "triton_kernels/block_sparse_attn.py",
           "causal_off = Nk - Nq", "causal_off = 0", [TV], "fp64 and triton-", anchor="def _bwd_dkdv_kernel(",
           why="varlen dK/dV: top-left causal instead of bottom-right per sequence (Lq != Lk)"),
    # ------------------------------------------------------------------ attention: reference (= torch backend)
    Mutant("attn-ref-dropped-key-bias", "attention", "python/tokops/attention/reference.py",
           "s = s + _bias(key_bias, dtype)", "s = s",
           [TA], "sdpa and torch- and float32", fast=True,
           why="the reference (and torch backend) ignores key_bias: only an independent oracle sees it"),
    Mutant("attn-ref-causal-bound", "attention", "python/tokops/attention/masks.py",
           "return j <= i + (k_len - q_len)", "return j <= i + (k_len - q_len) - 1",
           [TA], "sdpa and torch- and float32",
           why="reference causal mask one key short"),
    # ------------------------------------------------------------------ kv: quantization
    Mutant("kv-quant-round-half-up", "kv", "triton_kernels/kv_quant.py",
           "up = (d > p) | ((d == p) & ((k & 1) != 0))", "up = d >= p",
           [TK], "hand_computed and triton-", 
           why="round half up instead of half to even"),
    Mutant("kv-quant-pack-msb-first", "kv", "triton_kernels/kv_quant.py",
           "shifts = (tl.arange(0, CPW) * BITS).to(tl.uint32)",
           "shifts = ((CPW - 1 - tl.arange(0, CPW)) * BITS).to(tl.uint32)",
           [TK], "(hand_computed or design) and triton-", anchor="def _quantize_kernel(",
           why="codes packed most-significant first"),
    Mutant("kv-ref-round-half-up", "kv", "python/tokops/kv/reference.py",
           "q = torch.clamp(torch.round((xg - z) / torch.where(s == 0, torch.ones_like(s), s)), 0, qmax)",
           "q = torch.clamp(torch.floor((xg - z) / torch.where(s == 0, torch.ones_like(s), s) + 0.5), 0, qmax)",
           [TK], "(hand_computed or naive) and torch-", fast=True,
           why="the reference (= torch backend) rounds half up: only the independent oracle sees it"),
    Mutant("kv-ref-dequant-no-zero", "kv", "python/tokops/kv/reference.py",
           "x = (q * s.unsqueeze(-1) + z.unsqueeze(-1)).flatten(-2)[..., :length]",
           "x = (q * s.unsqueeze(-1)).flatten(-2)[..., :length]",
           [TK], "(hand_computed or naive) and torch-",
           why="reference dequantize drops the zero point"),
    Mutant("kv-fp8-scale", "kv", "triton_kernels/kv_quant.py",
           "y = tl.math.div_rn(x, tl.where(scale == 0, 1.0, scale)[:, None])",
           "y = tl.math.div_rn(x, tl.where(scale == 0, 1.0, 2 * scale)[:, None])",
           [TK], "fp8 and triton-",
           why="fp8 codes computed with the wrong scale"),
    # ------------------------------------------------------------------ kv: decode
    Mutant("kv-decode-swapped-kv", "kv", "triton_kernels/kv_decode.py",
           "_quant_pv(p, vc, vs, vz, bh, t0, end, d, dmask, vc_bh, vs_bh, D, V_WD,",
           "_quant_pv(p, kc, ks, kz, bh, t0, end, d, dmask, kc_bh, ks_bh, D, K_WD,",
           [TC], "decode_matches_oracle and triton-", fast=True,
           why="values read from the key store"),
    Mutant("kv-decode-causal-limit", "kv", "triton_kernels/kv_decode.py",
           "limit = L - NQ + qi  # last store index query i may see",
           "limit = L - NQ + qi + 1  # last store index query i may see",
           [TC], "decode_nq_causal and triton-", anchor="def _decode_partial_kernel(",
           why="query i sees one later new token"),
    Mutant("kv-decode-scale-one", "kv", "triton_kernels/kv_decode.py",
           "qk_scale = scale * _LOG2E", "qk_scale = _LOG2E",
           [TC], "decode_matches_oracle and triton-",
           why="logits not scaled by 1/sqrt(D)"),
    Mutant("kv-decode-gqa-mapping", "kv", "triton_kernels/kv_decode.py",
           "qrow = (b * H + hk * GQ + hh) * NQ + qi", "qrow = (b * H + hh * HKV + hk) * NQ + qi",
           [TC], "decode_gqa and triton-", anchor="def _decode_partial_kernel(",
           why="GQA: query heads of a kv head interleaved instead of contiguous"),
    Mutant("kv-decode-dequant-no-zero", "kv", "triton_kernels/kv_decode.py",
           "x = tl.where(m2, code.to(tl.float32) * s + z, 0.0)", "x = tl.where(m2, code.to(tl.float32) * s, 0.0)",
           [TC], "decode_matches_oracle and triton-",
           why="fused dequantization drops the zero point"),
    Mutant("kv-torch-decode-causal", "kv", "python/tokops/kv/decode.py",
           "allowed = j[None, :] <= (L - nq + i)[:, None]", "allowed = j[None, :] <= (L - nq + i + 1)[:, None]",
           [TC], "decode_nq_causal and torch-", fast=True,
           why="dense_decode (torch backend AND the package's fp64 reference) off by one: only the "
               "independent loop sees it"),
    # ------------------------------------------------------------------ merge
    Mutant("merge-match-ties-last", "merge", "triton_kernels/merge.py",
           "upd = tile_max > best", "upd = tile_max >= best",
           [TM], "ties_across and triton-", anchor="def _match_tiles(", fast=True,
           why="equal scores in a later tile take the later B index"),
    Mutant("merge-match-cls-unprotected", "merge", "triton_kernels/merge.py",
           "row_ok = row_ok & (ai != 0)", "row_ok = row_ok",
           [TM], "match_kernel_agrees and triton-", anchor="def _match_kernel(",
           why="class token can be merged"),
    Mutant("merge-segment-mean", "merge", "triton_kernels/merge.py",
           "acc = acc / tl.maximum(cnt, 1.0)", "acc = acc / tl.maximum(cnt, 2.0)",
           [TM], "matching_and_merge_equal and triton-",
           why="mean of a singleton segment halved"),
    Mutant("merge-pitome-energy-mean", "merge", "triton_kernels/merge.py",
           "tl.store(out_ptr + pid_b * N + i, acc / N, mask=i_ok)",
           "tl.store(out_ptr + pid_b * N + i, acc / (N - 1), mask=i_ok)",
           [TM], "pitome_energy and triton-",
           why="energy averaged over N - 1"),
    Mutant("merge-ref-argsort-ascending", "merge", "python/tokops/merge/reference.py",
           "edge_idx = torch.argsort(node_max, dim=-1, descending=True, stable=True)",
           "edge_idx = torch.argsort(node_max, dim=-1, descending=False, stable=True)",
           [TM], "matching_and_merge_equal and torch-", fast=True,
           why="reference merges the least similar tokens"),
    Mutant("merge-tome-no-proportional-attention", "merge", "python/tokops/patch/tome.py",
           "bias = size[..., 0].float().log()", "bias = size[..., 0].float().log() * 0",
           [TP], "tome",
           why="ToMe models attend without log(size)"),
]


def _scratch_copy(dest: Path) -> None:
    """The working tree (tracked + untracked, not ignored) plus the built extension, with
    ``tokops.triton_kernels`` reachable under the copy's ``python/tokops``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in files:
        if not f:
            continue
        src = ROOT / f
        if not src.is_file():
            continue
        d = dest / f
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, d)
    for so in (ROOT / "python" / "tokops").glob("_C*.so"):
        shutil.copy2(so, dest / "python" / "tokops" / so.name)
    link = dest / "python" / "tokops" / "triton_kernels"
    if not link.exists():
        link.symlink_to(dest / "triton_kernels", target_is_directory=True)


def _env(scratch: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(scratch / "python"), str(scratch)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("TOKOPS_CUDA", "0")
    return env


def _check_imports(scratch: Path) -> None:
    code = ("import tokops, tokops.triton_kernels.block_sparse_attn as t; "
            "print(tokops.__file__); print(t.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=_env(scratch), capture_output=True, text=True)
    paths = r.stdout.split()
    if r.returncode or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(scratch.resolve()) for p in paths):
        sys.exit(f"mutate: the scratch copy does not shadow the installed tokops: {r.stdout} {r.stderr[-2000:]}")


def _apply(scratch: Path, m: Mutant) -> str:
    """Mutate the scratch copy; return the original text of the file."""
    p = scratch / m.path
    if not p.exists():
        raise SystemExit(f"mutant does not apply: {m.name}: {m.path} not found")
    text = p.read_text()
    start = 0
    if m.anchor:
        if text.count(m.anchor) != 1:
            raise SystemExit(f"mutant does not apply: {m.name}: anchor {m.anchor!r} found "
                             f"{text.count(m.anchor)} times in {m.path}")
        start = text.index(m.anchor)
    elif text.count(m.old) != 1:
        raise SystemExit(f"mutant does not apply: {m.name}: snippet {m.old!r} found {text.count(m.old)} times "
                         f"in {m.path} (give an anchor or a longer snippet)")
    i = text.find(m.old, start)
    if i < 0:
        raise SystemExit(f"mutant does not apply: {m.name}: snippet {m.old!r} not found"
                         f"{' after ' + repr(m.anchor) if m.anchor else ''} in {m.path}")
    p.write_text(text[:i] + m.new + text[i + len(m.old):])
    return text


def _pytest(scratch: Path, tests: list[str], k: str, timeout: int, extra=()) -> tuple[int, str, float]:
    cmd = ["timeout", str(timeout), sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-o", "addopts=", *tests, *extra]
    if k:
        cmd += ["-k", k]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=scratch, env=_env(scratch), capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr)[-3000:], time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="only the mutants marked fast (CI)")
    ap.add_argument("-m", "--mutant", action="append", default=[], help="run only these mutants (by name)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if (not args.fast or m.fast) and (not args.mutant or m.name in args.mutant)]
    unknown = set(args.mutant) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s): {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.family:9s} {'fast' if m.fast else '    '} {m.path}: {m.why}")
        return 0
    families = sorted({m.family for m in chosen})
    print(f"[mutate] {len(chosen)} mutants ({', '.join(families)})", flush=True)
    t_start = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="tokops-mutate-"))
    try:
        _scratch_copy(scratch)
        _check_imports(scratch)
        # every mutant must apply before anything runs (fail loudly on drift)
        for m in chosen:
            original = _apply(scratch, m)
            (scratch / m.path).write_text(original)
        # baseline: the selected tests pass on the unmutated copy (one pytest run over the union of
        # the selections: a superset of each, which must pass too)
        files = sorted({t for m in chosen for t in m.tests})
        union = " or ".join(sorted({f"({m.k})" for m in chosen if m.k})) if all(m.k for m in chosen) else ""
        rc, out, dt = _pytest(scratch, files, union, args.timeout * 2)
        if rc != 0:
            print(out)
            print(f"[mutate] baseline FAILED (rc {rc}): the tests fail without any mutant; fix them first")
            return 2
        print(f"[mutate] baseline ok: {' '.join(files)} ({dt:.0f} s)", flush=True)
        killed, survived = 0, []
        for m in chosen:
            original = _apply(scratch, m)
            try:
                rc, out, dt = _pytest(scratch, m.tests, m.k, args.timeout, m.extra)
            finally:
                (scratch / m.path).write_text(original)
            if rc == 1:
                verdict = "killed"
            elif rc in (124, 137):
                verdict = "killed (timeout)"
            elif rc == 0:
                verdict = "SURVIVED"
            else:
                verdict = f"ERROR rc={rc}"
            if verdict.startswith("killed"):
                killed += 1
            else:
                survived.append(m.name)
                if verdict.startswith("ERROR"):
                    print(out)
            print(f"[mutate] {verdict:17s} {m.name} ({m.family}, {dt:.0f} s): {m.why}", flush=True)
        print(f"killed {killed} of {len(chosen)}")
        if survived:
            print("survived: " + ", ".join(survived))
        print(f"[mutate] {time.time() - t_start:.0f} s")
        return 0 if killed == len(chosen) else 1
    finally:
        if args.keep:
            print(f"[mutate] scratch copy kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
