"""Static GPU verification of every Triton kernel, on a machine without a GPU.

The Triton interpreter (what the tests run on a CPU) is not the compiler: code that only the GPU
compiler rejects, shared memory over a GPU's limit, register spills and loops that are not
software-pipelined are invisible to it.  This module compiles the kernels the way a GPU run does:

* a stand-in Triton driver (:class:`StandInDriver`) whose current target is ``sm_90`` or ``sm_80``;
* the kernels are launched through the *real* launchers of ``tokops.triton_kernels`` (so the tile /
  warp / split heuristics are the ones a GPU takes), with tensors on the ``meta`` device (no memory,
  any size) and every launch turned into ``warmup=True``: Triton compiles and does not run;
* each compiled kernel gives its metadata (``shared``, ``num_warps``, ``num_stages``), its PTX (run
  through Triton's bundled ``ptxas -v``: registers, spills) and its TTGIR (async copies = the loop was
  software-pipelined; the MMA kind: ``wgmma`` on sm_90, ``mma`` (mma.sync) on sm_80, ``fma`` = no
  tensor cores).

It fails on: a compile error; shared memory over the architecture's per-block limit; spills in a
kernel not listed in :data:`ACCEPTED_SPILLS`; an attention or decode kernel (:data:`MUST_PIPELINE`)
whose loop is not pipelined on sm_80/sm_90 and is not listed in :data:`ACCEPTED_NOT_PIPELINED`.

    python -m benchmarks.kernel_check                    # full matrix, both archs; exit 1 on a failure
    python -m benchmarks.kernel_check --quick            # representative subset (what the test suite runs)
    python -m benchmarks.kernel_check --report benchmarks/results/kernel_report.md

Needs TRITON_INTERPRET unset (it is refused otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import tempfile
import time

ARCHS = (90, 80)
# Max dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# SM counts the launch heuristics see (H100/H200 SXM: 132, A100: 108).
SMS = {80: 108, 90: 132}

# The attention and decode kernels, whose key/query loop must be software-pipelined (async copies in
# the TTGIR; issue 12).  (kv_decode._mass_kernel is not listed: its loop runs over the query heads of a
# key tile, with one small q load per step, the key tile being loaded once.)
MUST_PIPELINE = {
    "block_sparse_attn._fwd_kernel", "block_sparse_attn._bwd_dq_kernel", "block_sparse_attn._bwd_dkdv_kernel",
    "block_sparse_attn._mass_kernel", "kv_decode._decode_partial_kernel", "kv_paged_decode._paged_partial_kernel",
}
# Spills fail in every kernel (each one is on a hot path: there is no cold setup kernel here).
# Known exceptions, reported as "accepted" in the report and printed by every run, never silent:
#   "module._kernel|cond&cond" -> why, where each cond is a substring of "sm_<arch> <config>",
#   e.g. "block_sparse_attn._bwd_dkdv_kernel|sm_80&BD=256": "issue 12: ...".
# ACCEPTED_SPILLS values are (most spill bytes accepted, stores + loads; why): a bigger spill fails.
ACCEPTED_NOT_PIPELINED: dict[str, str] = {}
ACCEPTED_SPILLS: dict[str, tuple[int, str]] = {
    # The padded kernels have none since issue 12's tile work (2026-12-05): the sm_80 16-bit dQ tile is
    # 64 x 32 before Hopper, the fp32 forward and dK/dV tiles at D <= 64 are 32 x 32.
    # sm_80, fp32 (IEEE FMA path, no tensor cores: the slow exact path) varlen kernels at D=256 (issue 14;
    # the sequence bounds read from cu_seqlens stay live in registers, where the padded kernels have them
    # as parameters).  dQ with causal + key bias, 32 x 16 tile: 8 + 8 B with Triton 3.8, 20 + 20 B with
    # Triton 3.6.0; the split (decode-shaped) forward: 0 B with 3.8, 8 + 8 B with 3.6.0.
    "block_sparse_attn._bwd_dq_kernel|sm_80&float32 &BD=256 &PREC=ieee&VARLEN=True": (
        48, "fp32 varlen dQ on sm_80 at D=256, <= 40 B, issue 12/14"),
    "block_sparse_attn._fwd_kernel|sm_80&float32 &BD=256 &PREC=ieee&VARLEN=True": (
        16, "fp32 varlen decode-shaped forward on sm_80 at D=256 with Triton 3.6.0, 16 B, issue 12/14"),
}


# --------------------------------------------------------------------------- stand-in driver
def _driver_base():
    from triton.backends.driver import DriverBase

    return DriverBase


def make_driver(arch: int):
    """A Triton driver for ``sm_<arch>`` that compiles but never loads or runs anything."""
    from triton.backends.compiler import GPUTarget

    class StandInDriver(_driver_base()):
        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            from triton.backends.nvidia.driver import ty_to_cpp

            return ty_to_cpp(ty)

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            import torch

            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("the stand-in driver cannot run kernels")

        # JITFunction caches its binder (and so the target) per device id: one id per arch.
        def get_current_device(self):
            return arch

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

    return StandInDriver()


@dataclasses.dataclass
class Record:
    arch: int
    case: str
    kernel: str  # module._name
    config: str  # constexpr values that select the code
    kernel_obj: object = None
    shared: int = 0
    num_warps: int = 0
    num_stages: int = 0
    ptxas_log: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    async_copies: int = 0
    mma: str = "-"
    error: str | None = None
    problems: list = dataclasses.field(default_factory=list)
    accepted: list = dataclasses.field(default_factory=list)


_CONFIG_KEYS = ("BITS", "BITS_K", "BITS_V", "G", "U", "BC", "FP8", "NATIVE_FP8", "K_AXIS", "V_AXIS", "DOT_DTYPE",
                "BM", "BN", "BD", "BQ", "BS", "BR", "BK", "BLOCK_Q", "BLOCK_K", "CAUSAL", "HAS_BIAS", "PREC", "SPLIT",
                "VARLEN",
                "MODE", "CLS", "DIST", "HAS_VALID", "IEEE", "ELU")


def _config(fn, args, kwargs) -> str:
    parts = []
    for k in _CONFIG_KEYS:
        if k in kwargs:
            v = kwargs[k]
            v = getattr(v, "name", v) if not isinstance(v, (bool, int, str)) else v
            parts.append(f"{k}={v}")
    dt = [a.dtype for a in args if hasattr(a, "dtype") and a.dtype.is_floating_point]
    if dt:
        parts.insert(0, str(dt[0]).replace("torch.", ""))
    for k in ("num_warps", "num_stages"):
        if k in kwargs:
            parts.append(f"{k}={kwargs[k]}")
    return " ".join(parts)


_TAG = {"text": ""}


def _tag(text: str) -> None:
    """Label the launches that follow (what the constexprs do not show: layout, causal, ...)."""
    _TAG["text"] = text


@contextlib.contextmanager
def compile_only(arch: int, sink: list):
    """Inside: Triton targets ``sm_<arch>``, every kernel launch compiles without running, and the
    launchers take their GPU branches.  Compiled kernels are appended to ``sink``."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    import tokops._registry as reg

    orig_run = JITFunction.run
    state = {"case": ""}

    def run(self, *args, grid, warmup, **kwargs):
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
        cfg = _config(self, args, kwargs) + (f" [{_TAG['text']}]" if _TAG["text"] else "")
        rec = Record(arch, state["case"], name, cfg)
        sink.append(rec)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):  # Triton prints its own `ptxas -v` log (dump_ptxas_log)
                rec.kernel_obj = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - reported, and fails the check
            rec.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            rec.ptxas_log = buf.getvalue()
        return rec.kernel_obj

    from triton import knobs

    old_sms, old_active = reg._TARGET_SMS, driver._active
    old_knobs = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    # Compile every kernel (no on-disk cache hit), so that Triton's own `ptxas -v` run (with the exact
    # options it builds the cubin with) reports registers and spills; its log is captured per launch.
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    driver.set_active(make_driver(arch))
    JITFunction.run = run
    reg._TARGET_SMS = SMS.get(arch, 100)
    try:
        yield state
    finally:
        JITFunction.run = orig_run
        reg._TARGET_SMS = old_sms
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = old_knobs
        driver._active = old_active  # not reset_active(): that looks for a real GPU driver
    del triton


# --------------------------------------------------------------------------- cases
def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def attention_cases(quick: bool):
    """(label, fn) over head dim x dtype x block; each fn drives fwd (+split/combine), bwd, key mass."""
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if quick:  # the benchmark's default case on sm_90, the largest shared-memory case on sm_80
        grid = [(128, "bf16", 128, (90,)), (256, "fp32", 64, (80,))]
    else:
        grid = [(d, t, b, ARCHS) for d in (64, 128, 256) for t in dtypes for b in (64, 128)]
    out = []
    for D, tname, block, archs in grid:
        def fn(D=D, dt=dtypes[tname], block=block):
            from tokops.attention.masks import causal_block_mask, full_block_mask
            from tokops.triton_kernels import block_sparse_attn as m

            B, H, N = 1, 16, 4096  # the benchmark's shapes (bench_attention: B=1, H=16, N=4k..32k)
            q, k, v = (_meta((B, H, N, D), dt) for _ in range(3))
            for causal in (False, True):
                _tag("causal+bias" if causal else "")
                mask = (causal_block_mask if causal else full_block_mask)(N, block_q=block, block_k=block)
                bias = _meta((B, H, N), torch.float32) if causal else None
                out_, lse = m.fwd(q, k, v, mask.kv_num_blocks, mask.kv_indices, block, block, causal, D ** -0.5, bias)
                qn, qi = mask.transpose()
                m.bwd(_meta(q.shape, dt), q, k, v, out_, lse, None, mask.kv_num_blocks, mask.kv_indices, qn, qi,
                      block, block, causal, D ** -0.5, bias)
                m.key_mass(q, k, lse, qn, qi, block, block, causal, D ** -0.5, bias)
            # decode-style call (decode_attention_with_key_mass): 1 query vs a long cache -> split + combine
            nk = 16384
            _tag("decode: 1 query")
            qd = _meta((B, 32, 1, D), dt)
            kd, vd = (_meta((B, 8, nk, D), dt) for _ in range(2))
            dm = full_block_mask(1, nk, block_q=16, block_k=block)
            _, lsed = m.fwd(qd, kd, vd, dm.kv_num_blocks, dm.kv_indices, 16, block, False, D ** -0.5, None)
            qn, qi = dm.transpose()
            m.key_mass(qd, kd, lsed, qn, qi, 16, block, False, D ** -0.5, None)
            # varlen (packed sequences, cu_seqlens; issue 14): the same kernels with VARLEN=True, S sequences
            # of at most N tokens packed into (total, H, D), fwd + bwd + key mass
            S = 8
            T = S * N // 2
            qv = _meta((T, H, D), dt)
            kv, vv = (_meta((T, H, D), dt) for _ in range(2))
            cu = _meta((S + 1,), torch.int32)
            for causal in (True,):  # causal + key bias: the superset of the non-causal code (CI time)
                _tag("varlen" + (" causal+bias" if causal else ""))
                mask = (causal_block_mask if causal else full_block_mask)(N, block_q=block, block_k=block)
                bias = _meta((H, T), torch.float32) if causal else None
                out_, lse = m.fwd_varlen(qv, kv, vv, cu, cu, N, N, mask.kv_num_blocks, mask.kv_indices, block, block,
                                         causal, D ** -0.5, bias)
                qn, qi = mask.transpose()
                m.bwd_varlen(_meta(qv.shape, dt), qv, kv, vv, out_, lse, None, cu, cu, N, N, mask.kv_num_blocks,
                             mask.kv_indices, qn, qi, block, block, causal, D ** -0.5, bias)
                m.key_mass_varlen(qv, kv, lse, cu, cu, N, N, qn, qi, block, block, causal, D ** -0.5, bias)
            # varlen decode: 1 query per sequence against its own long cache -> split + combine with VARLEN
            _tag("varlen decode: 1 query per sequence")
            Sd = 4
            qd = _meta((Sd, 32, D), dt)
            kd, vd = (_meta((Sd * nk, 8, D), dt) for _ in range(2))
            cuq, cuk = _meta((Sd + 1,), torch.int32), _meta((Sd + 1,), torch.int32)
            _, lsed = m.fwd_varlen(qd, kd, vd, cuq, cuk, 1, nk, dm.kv_num_blocks, dm.kv_indices, 16, block, False,
                                   D ** -0.5, None)
        out.append((f"attention D={D} {tname} block={block}", fn, archs))
    return out


def kv_quant_cases(quick: bool):
    import torch

    settings = [(4, 32)] if quick else [(b, g) for b in (8, 4, 2) for g in (32, 128)]
    out = []
    for bits, g in settings:
        def fn(bits=bits, g=g):
            from tokops.kv.reference import packed_shapes
            from tokops.triton_kernels import kv_quant as m

            shape = (1, 8, 32768, 128)  # bench_kv: 32k tokens x 8 heads x 128 dims, fp16
            x = _meta(shape, torch.float16)
            for axis in (-2, -1):
                _tag(f"axis={axis}")
                codes, scale, zero = m.quantize(x, bits, g, axis)
                cs, ss = packed_shapes(shape, bits, g, axis)
                m.dequantize(_meta(cs, torch.int32), _meta(ss, torch.float16), _meta(ss, torch.float16), bits, g,
                             axis, shape[-2 if axis == -2 else -1], torch.float16)
        out.append((f"kv quantize/dequantize int{bits} G={g}", fn, ARCHS))

    def fp8():
        from tokops.triton_kernels import kv_quant as m

        x = _meta((1, 8, 32768, 128), torch.float16)
        m.quantize_fp8(x)
        m.dequantize_fp8(_meta(x.shape, torch.float8_e4m3fn), _meta(x.shape[:-1], torch.float32), torch.float16)
    out.append(("kv quantize/dequantize fp8", fp8, ARCHS))
    return out


def kv_decode_cases(quick: bool):
    import torch

    if quick:
        modes = [("int", 4, (90,)), ("fp8", 8, (80,))]  # fp8 on sm_80: the path without fp8 instructions
    else:
        modes = [(m, b, ARCHS) for m, b in (("int", 8), ("int", 4), ("int", 2), ("fp8", 8))]
    Bs = (16,) if quick else (1, 16)
    out = []
    for mode, bits, archs in modes:
        for B in Bs:
            def fn(mode=mode, bits=bits, B=B):
                from tokops.triton_kernels import kv_decode as m

                H, HKV, L, D, G, R = 32, 8, 131072, 128, 32, 128  # bench_kv_cache: H=32, H_kv=8, D=128, R=128
                dt = torch.float16
                q = _meta((B, H, 1, D), dt)
                res = [_meta((B, HKV, R, D), dt) for _ in range(2)]
                if mode == "fp8":
                    kc, vc = (_meta((B, HKV, L, D), torch.uint8) for _ in range(2))
                    ks, vs = (_meta((B, HKV, L), torch.float32) for _ in range(2))
                    kz = vz = _meta((0,), torch.float16)
                    ka = va = -1
                else:
                    ka, va = -2, -1  # KIVI: keys per channel, values per token
                    kc = _meta((B, HKV, L * bits // 32, D), torch.int32)
                    ks = kz = _meta((B, HKV, L // G, D), torch.float16)
                    vc = _meta((B, HKV, L, D * bits // 32), torch.int32)
                    vs = vz = _meta((B, HKV, L, D // G), torch.float16)
                lens = [_meta((B,), torch.int32) for _ in range(2)]  # per-row lengths live on the device
                m.decode_attention(q, kc, ks, kz, vc, vs, vz, *res, *lens, L, mode, bits, bits, G, ka, va, D ** -0.5,
                                   True)
            out.append((f"kv decode {mode}{'' if mode == 'fp8' else bits} B={B}", fn, archs))
    # issue 12/14 configuration: ragged rows (per-row length tensors), nq=3 speculative queries, GQA 4,
    # groups of 64 tokens (keys: scale/zero folded into q; values per channel too: applied after p @ c)
    for bits, archs in (((4, (90, 80)),) if quick else ((8, ARCHS), (4, ARCHS), (2, ARCHS))):
        def fn(bits=bits):
            from tokops.triton_kernels import kv_decode as m

            B, H, HKV, L, D, G, R, NQ = 8, 32, 8, 32768, 128, 64, 128, 3
            dt = torch.bfloat16
            q = _meta((B, H, NQ, D), dt)
            res = [_meta((B, HKV, R + G, D), dt) for _ in range(2)]
            kc, vc = (_meta((B, HKV, L * bits // 32, D), torch.int32) for _ in range(2))
            ks = kz = vs = vz = _meta((B, HKV, L // G, D), torch.float16)
            lens = [_meta((B,), torch.int32) for _ in range(2)]
            m.decode_attention(q, kc, ks, kz, vc, vs, vz, *res, *lens, L, "int", bits, bits, G, -2, -2, D ** -0.5,
                               True)
        out.append((f"kv decode ragged nq=3 G=64 int{bits}", fn, archs))
    return out


def kv_paged_decode_cases(quick: bool):
    import torch

    if quick:
        modes = [("int", 4, (90,)), ("fp8", 8, (80,))]
    else:
        modes = [(m, b, ARCHS) for m, b in (("int", 8), ("int", 4), ("int", 2), ("fp8", 8))]
    pages = (64,) if quick else (16, 64, 256)
    out = []
    for mode, bits, archs in modes:
        for P in pages:
            def fn(mode=mode, bits=bits, P=P):
                from tokops.triton_kernels import kv_paged_decode as m

                # bench_kv_cache's paged rows: B=16 rows of up to 32k tokens, H=32, H_kv=8, D=128, G=32, R=128
                B, H, HKV, D, G, R = 16, 32, 8, 128, min(32, P), 128  # P % G == 0
                MPP = 32768 // P
                NP = B * MPP
                dt = torch.float16
                q = _meta((B, H, 1, D), dt)
                res = [_meta((B, HKV, R + G, D), dt) for _ in range(2)]
                bt, lens = _meta((B, MPP), torch.int32), _meta((B,), torch.int32)
                if mode == "fp8":
                    kc, vc = (_meta((NP, HKV, P, D), torch.uint8) for _ in range(2))
                    ks, vs = (_meta((NP, HKV, P), torch.float32) for _ in range(2))
                    kz = vz = _meta((0,), torch.float16)
                else:
                    kc = _meta((NP, HKV, P * bits // 32, D), torch.int32)
                    ks = kz = _meta((NP, HKV, P // G, D), torch.float16)
                    vc = _meta((NP, HKV, P, D * bits // 32), torch.int32)
                    vs = vz = _meta((NP, HKV, P, D // G), torch.float16)
                _tag(f"P={P}")
                m.paged_decode_attention(q, kc, ks, kz, vc, vs, vz, *res, bt, lens, R, mode, bits, bits, G,
                                         D ** -0.5, True)
            out.append((f"kv_paged decode {mode}{'' if mode == 'fp8' else bits} P={P}", fn, archs))
    return out


def merge_cases(quick: bool):
    import torch

    sizes = [(16, 4096, 768)] if quick else [(64, 197, 384), (16, 4096, 768), (1, 65536, 1024)]
    out = []
    for B, N, C in sizes:
        def fn(B=B, N=N, C=C):
            from tokops.triton_kernels import merge as m

            x = _meta((B, N, C), torch.float16)
            r = max(1, N // 4)
            _tag(f"N={N} C={C}")
            m.tome_match(x, None, True, False)
            # bf16: the variant with the per-sequence branch to the exact scaled path (extreme rows)
            m.tome_match(_meta((B, N, C), torch.bfloat16), None, True, False)
            m.pitome_energy(x, 0.9, 1.0, True)
            n_out = N - r
            m.segment_reduce(x, None, _meta((B, N), torch.int64), _meta((B, n_out + 1), torch.int64), "mean")
            m.token_gather(x, _meta((B, N), torch.int64), 0.0)
        out.append((f"merge B={B} N={N} C={C}", fn, (90,) if quick else ARCHS))
    return out


def all_cases(quick: bool):
    return (attention_cases(quick) + kv_quant_cases(quick) + kv_decode_cases(quick) + kv_paged_decode_cases(quick)
            + merge_cases(quick))


# --------------------------------------------------------------------------- analysis
def _ptxas():
    import triton

    cands = []
    try:
        from triton import knobs

        p = knobs.nvidia.ptxas.path  # 3.4+
        if p:
            cands.append(p)
    except Exception:  # noqa: BLE001
        pass
    cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise FileNotFoundError("Triton's bundled ptxas was not found")


def parse_ptxas_log(log: str) -> tuple[int, int, int] | None:
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log, or None."""
    regs = re.search(r"Used (\d+) registers", log)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not m:
        return None
    return int(regs.group(1)), int(m.group(1)), int(m.group(2))


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from running Triton's bundled ``ptxas -v``."""
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).split(",")[0]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    return parse_ptxas_log(r.stderr + r.stdout)


def ttgir_facts(ttgir: str) -> tuple[int, str]:
    """(number of async copies, MMA kind) of a kernel's TTGIR."""
    n_async = len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir))
    if "warp_group_dot" in ttgir:
        mma = "wgmma"
    elif re.search(r"nvidia_mma<\{versionMajor = 2", ttgir):
        mma = "mma"
    elif re.search(r"\btt\.dot\b", ttgir):
        mma = "fma"
    else:
        mma = "-"
    return n_async, mma


def analyse(rec: Record) -> None:
    k = rec.kernel_obj
    md = k.metadata
    rec.shared, rec.num_warps, rec.num_stages = int(md.shared), int(md.num_warps), int(md.num_stages)
    usage = parse_ptxas_log(rec.ptxas_log) or ptxas_usage(k.asm["ptx"])  # the latter: log not captured
    rec.registers, rec.spill_stores, rec.spill_loads = usage
    rec.async_copies, rec.mma = ttgir_facts(k.asm["ttgir"])
    limit = SHARED_LIMIT[rec.arch]
    if rec.shared > limit:
        rec.problems.append(f"shared memory {rec.shared} B > sm_{rec.arch} limit {limit} B")
    if rec.spill_stores or rec.spill_loads:
        cap, why = _accepted(ACCEPTED_SPILLS, rec) or (0, None)
        if rec.spill_stores + rec.spill_loads > cap:
            why = None
        msg = f"spills {rec.spill_stores} B stores / {rec.spill_loads} B loads"
        (rec.accepted if why else rec.problems).append(msg + (f" (accepted: {why})" if why else ""))
    if rec.kernel in MUST_PIPELINE and rec.async_copies == 0:
        why = _accepted(ACCEPTED_NOT_PIPELINED, rec)
        msg = "main loop not pipelined (no async copies)"
        (rec.accepted if why else rec.problems).append(msg + (f" (accepted: {why})" if why else ""))


def _accepted(table: dict, rec: Record) -> str | None:
    for pattern, why in table.items():
        kernel, _, cond = pattern.partition("|")
        if kernel == rec.kernel and all(c in f"sm_{rec.arch} {rec.config}" for c in cond.split("&") if c):
            return why
    return None


# --------------------------------------------------------------------------- driver
def run_check(archs=ARCHS, quick: bool = False, only: str | None = None, log=None, exact: str | None = None
              ) -> list[Record]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the kernel check runs Triton's GPU compiler")
    import triton

    if log is None:
        def log(msg):
            print(msg, flush=True)

    log(f"[kernel_check] triton {triton.__version__}, archs {list(archs)}, {'quick' if quick else 'full'} matrix")
    records: list[Record] = []
    cases = [c for c in all_cases(quick) if (only is None or only in c[0]) and (exact is None or exact == c[0])]
    for arch in archs:
        for label, fn, case_archs in cases:
            if arch not in case_archs:
                continue
            t0 = time.time()
            _tag("")
            sink: list[Record] = []
            with compile_only(arch, sink) as state:
                state["case"] = label
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - recorded
                    if not sink or sink[-1].error is None:
                        sink.append(Record(arch, label, "(launcher)", "", error=f"{type(e).__name__}: {e}"))
            records += sink
            log(f"[kernel_check] sm_{arch} {label}: {len(sink)} launches, {time.time() - t0:.1f} s")
    # one row per distinct compiled kernel
    seen, unique = set(), []
    for r in records:
        key = (r.arch, id(r.kernel_obj)) if r.kernel_obj is not None else (r.arch, r.case, r.kernel, r.error)
        if key in seen:
            continue
        seen.add(key)
        unique.append(r)
        if r.error is None:
            try:
                analyse(r)
            except Exception as e:  # noqa: BLE001
                r.error = f"analysis failed: {type(e).__name__}: {e}"
    return unique


def _one_case(arch: int, quick: bool, label: str) -> list[Record]:
    recs = run_check((arch,), quick, exact=label)
    for r in recs:
        r.kernel_obj = None  # not picklable; everything needed is in the record
    return recs


def run_parallel(archs, quick: bool, only: str | None, jobs: int) -> list[Record]:
    """run_check over ``jobs`` processes, one (arch, case) per task."""
    import concurrent.futures
    import multiprocessing

    tasks = [(arch, quick, c[0]) for arch in archs for c in all_cases(quick)
             if arch in c[2] and (only is None or only in c[0])]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        return [r for recs in ex.map(_one_case, *zip(*tasks)) for r in recs]


def _short(error: str) -> str:
    """First and last lines of an error (a Triton CompilationError puts the cause last)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    return (lines[0] + (" ... " + lines[-1] if len(lines) > 1 else ""))[:500]


def failures(records: list[Record]) -> list[str]:
    out = []
    for r in records:
        if r.error:
            out.append(f"sm_{r.arch} {r.kernel} [{r.case}] compile error: {_short(r.error)}")
        for p in r.problems:
            out.append(f"sm_{r.arch} {r.kernel} [{r.config}]: {p}")
    return out


def report_markdown(records: list[Record], cmd: str) -> str:
    import triton

    lines = ["# Kernel report", "",
             f"Generated by `{cmd}` (Triton {triton.__version__}, compiled for sm_90 and sm_80 on a CPU with a",
             "stand-in driver; see `benchmarks/kernel_check.py`). One row per distinct compiled kernel.",
             "`async` = async copies in the TTGIR (> 0: the loop is software-pipelined); `mma`: wgmma (sm_90",
             "warpgroup MMA), mma (mma.sync), fma (no tensor cores), - (no dot). Shared memory in bytes; limits:",
             f"sm_80 {SHARED_LIMIT[80]}, sm_90 {SHARED_LIMIT[90]}.", "",
             "## Triton kernels", "",
             "| kernel | arch | config | warps | stages | shared | regs | spills (st/ld B) | async | mma | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r.kernel, -r.arch, r.config)):
        if r.error:
            status = "ERROR: " + _short(r.error).replace("|", "/")
            lines.append(f"| {r.kernel} | sm_{r.arch} | {r.case} | | | | | | | | {status} |")
            continue
        status = "; ".join(r.problems) or ("ok" if not r.accepted else "accepted: " + "; ".join(r.accepted))
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.config} | {r.num_warps} | {r.num_stages} | {r.shared} | "
                     f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.async_copies} | {r.mma} | "
                     f"{status.replace('|', '/')} |")
    lines += ["", "## CUDA kernels", ""]
    try:
        from benchmarks.cuda_resources import cuda_kernel_rows

        rows = cuda_kernel_rows()
        lines += ["| kernel | arch | regs | spill stores | spill loads | shared |", "|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['kernel']} | {row['arch']} | {row['registers']} | {row['spill_stores']} | "
                         f"{row['spill_loads']} | {row['shared_bytes']} |")
    except ImportError:
        lines.append("(benchmarks/cuda_resources.py not available in this checkout: no CUDA section)")
    except Exception as e:  # noqa: BLE001 - e.g. the extension was built without CUDA
        lines.append(f"(CUDA resource usage unavailable: {type(e).__name__}: {e})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="representative subset (the test suite's)")
    ap.add_argument("--arch", type=int, action="append", help="80 or 90 (default: both)")
    ap.add_argument("--only", help="only cases whose label contains this")
    ap.add_argument("--report", help="write the markdown report here")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    a = ap.parse_args(argv)
    t0 = time.time()
    archs = tuple(a.arch or ARCHS)
    recs = run_parallel(archs, a.quick, a.only, a.jobs) if a.jobs > 1 else run_check(archs, a.quick, a.only)
    fails = failures(recs)
    for r in recs:
        if r.accepted:
            print(f"[kernel_check] known exception: sm_{r.arch} {r.kernel} [{r.config}]: {'; '.join(r.accepted)}")
    if a.report:
        cmd = "python -m benchmarks.kernel_check" + (" --quick" if a.quick else "") + f" --report {a.report}"
        with open(a.report, "w") as f:
            f.write(report_markdown(recs, cmd))
        print(f"[kernel_check] wrote {a.report}")
    for f in fails:
        print("[kernel_check] FAIL " + f)
    print(f"[kernel_check] {len(recs)} kernels, {len(fails)} failures, {time.time() - t0:.0f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
