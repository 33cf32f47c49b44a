"""Build and load the CUDA-emulation test extension (csrc/emu/README in cuda_emu.h).

Every ``.cu`` file of ``csrc/sources.txt`` is compiled by g++ as C++ against the emulator
(``-DTOKOPS_EMU``), with ASan + UBSan, into one library loaded with ``torch.ops.load_library``.
The ``tokops`` namespace is renamed ``tokops_emu`` (``-Dtokops=tokops_emu``) so that the ops
(``torch.ops.tokops_emu.<name>_cuda``, registered for CPU tensors) never collide with the real
``tokops._C`` of a CUDA build. Cached by torch's extension builder under ``build/emu``.

The library must be loaded into a process that has the ASan runtime preloaded::

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0 python -m pytest tests/emu
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NAME = "tokops_cuda_emu"
ASAN_OPTIONS = "detect_leaks=0"
# the registry ops whose "cuda" backend the emulated kernels implement
CUDA_OPS = ("kv_quantize", "kv_dequantize", "kv_quantize_fp8", "kv_dequantize_fp8", "kv_decode_attention",
            "kv_paged_decode_attention",
            "tome_match", "block_sparse_attn_fwd", "block_sparse_attn_bwd")


def asan_loaded() -> bool:
    """True when the ASan runtime is in this process (LD_PRELOAD)."""
    try:
        ctypes.CDLL(None).__asan_init  # noqa: B018
        return True
    except AttributeError:
        return False


def libasan() -> str | None:
    try:
        p = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    path = p.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def cuda_include() -> Path | None:
    """The CUDA toolkit headers (cuda_fp16.h ...): CUDA_HOME, then nvcc on PATH, then /usr/local/cuda*."""
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent)
    cands += [Path("/usr/local/cuda-13.0"), Path("/usr/local/cuda")]
    for c in cands:
        if (c / "include" / "cuda_fp16.h").exists():
            return c / "include"
    return None


def kernel_sources() -> list[Path]:
    lines = (CSRC / "sources.txt").read_text().splitlines()
    srcs = [ROOT / ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [s for s in srcs if s.suffix == ".cu" and s.name != "cuda_info.cu"]


def build(verbose: bool = False) -> str:
    """Compile (cached) and return the path of the library."""
    from torch.utils import cpp_extension

    inc = cuda_include()
    if inc is None:
        raise RuntimeError("the CUDA emulator needs the CUDA toolkit headers (cuda_fp16.h); set CUDA_HOME")
    build_dir = ROOT / "build" / "emu"
    wrap_dir = build_dir / "src"
    wrap_dir.mkdir(parents=True, exist_ok=True)
    sources = [CSRC / "emu" / "runtime.cpp", CSRC / "emu" / "module.cpp", CSRC / "emu" / "selftest.cu"]
    sources += kernel_sources()
    wrappers = []
    for s in sources:
        if s.suffix == ".cpp":
            wrappers.append(str(s))
            continue
        # g++ compiles the .cu file as C++ through a one-line wrapper (the file itself is unchanged)
        w = wrap_dir / (s.stem + "_emu.cpp")
        text = f'#include "{s}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    flags = ["-DTOKOPS_EMU", "-Dtokops=tokops_emu", "-std=c++20", "-O0", "-g1", "-fno-omit-frame-pointer",
             "-ffp-contract=off", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fsanitize-sections=tokops_emu_shared", "-Wno-unused-variable", "-Wno-unused-function"]
    cpp_extension.load(
        name=NAME,
        sources=wrappers,
        extra_include_paths=[str(CSRC / "emu" / "include"), str(CSRC), str(inc)],
        extra_cflags=flags,
        extra_ldflags=["-fsanitize=address,undefined"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return str(build_dir / f"{NAME}.so")


if __name__ == "__main__":  # build (and load: run it with the LD_PRELOAD above)
    print(build(verbose=True))
