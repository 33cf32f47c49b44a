"""Build script for tokops.

One extension, ``tokops._C``, is built from the sources listed in
``csrc/sources.txt`` (CMakeLists.txt reads the same list).

CUDA kernels are compiled when CUDA *can be compiled*: a CUDA toolkit with ``nvcc`` is
found, the torch being built against was built with CUDA (same major version), and the
CUDA library headers that torch's own headers include (``cusparse.h``, ``cublas_v2.h``)
are found.  A GPU does not need to be present.  Nothing has to be set for this:

* the toolkit: ``CUDA_HOME`` / ``CUDA_PATH`` if set, else the folder of ``nvcc`` on
  ``PATH`` (following wrappers and links), else ``/usr/local/cuda``, ``/usr/local/cuda-X.Y``;
* the library headers: the toolkit's ``include`` folder first, then the pip
  ``nvidia/*/include`` folders beside the torch being built against (a pip CUDA torch
  brings them; a bare toolkit with only ``nvcc`` and ``cudart`` does not have them).

Otherwise the CPU-only extension is built, with a one-line message saying why.
Environment switches (all optional):

* ``TOKOPS_CUDA=0`` / ``1``  force the CPU-only build / require the CUDA build
  (``FORCE_CUDA=1`` is accepted as an alias of ``TOKOPS_CUDA=1``);
* ``TORCH_CUDA_ARCH_LIST``  GPU architectures, default ``"8.0;9.0a"`` (A100, H100/H200);
* ``MAX_JOBS``  parallel compile jobs (ninja).

The build records the torch it compiled against in ``tokops/_build_info.json``; at import
tokops compares it with the running torch (see ``tokops._registry.extension``).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0a"
# Headers that torch's CUDA headers (ATen/cuda/CUDAContextLight.h) include beyond the CUDA runtime.
NEEDED_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
BUILD_INFO = "_build_info.json"


def log(msg: str) -> None:
    print(f"tokops: {msg}", flush=True)


def read_version() -> str:
    text = (ROOT / "python" / "tokops" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def read_sources() -> list[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _is_toolkit(d) -> bool:
    return bool(d) and Path(d, "bin", "nvcc").is_file() and Path(d, "include", "cuda_runtime.h").is_file()


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit folder that an ``nvcc`` (possibly a wrapper script) really runs from."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    return str(Path(m.group(1).strip()).resolve()) if m else None


def find_cuda_home(torch_cuda: str | None) -> str | None:
    """The CUDA toolkit to build with (see the module docstring), or None."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if _is_toolkit(env) else None
    cands = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent)
        cands.append(lambda: _nvcc_top(nvcc))
    if torch_cuda:
        cands.append(Path(f"/usr/local/cuda-{torch_cuda}"))
    cands.append(Path("/usr/local/cuda"))
    cands += sorted(Path(p) for p in glob.glob("/usr/local/cuda-*"))[::-1]
    for c in cands:
        c = c() if callable(c) else c
        if _is_toolkit(c):
            return str(c)
    return None


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_include_dirs(torch, cuda_home: str) -> list[str] | None:
    """Include folders for the CUDA library headers torch's headers need: the toolkit's own
    ``include`` first (it matches nvcc), then the pip ``nvidia/*/include`` folders beside
    the torch being built against (then beside any other site folder on ``sys.path``).
    None when some of :data:`NEEDED_HEADERS` is in none of them."""
    torch_site = Path(torch.__file__).resolve().parent.parent
    sites = [torch_site] + [Path(p) for p in sys.path if p and Path(p, "nvidia").is_dir()
                            and Path(p).resolve() != torch_site]
    dirs = [str(Path(cuda_home, "include"))]
    for site in sites:
        for d in sorted(glob.glob(str(site / "nvidia" / "*" / "include"))):
            if d not in dirs:
                dirs.append(d)
        if all(any(Path(d, h).is_file() for d in dirs) for h in NEEDED_HEADERS):
            return dirs  # the folders beside torch come first; stop at the first site that completes them
    return None


def cuda_config(torch):
    """``(cuda_home, include_dirs)`` when the CUDA kernels can and should be built, else ``None``
    (after a one-line message saying why).  ``TOKOPS_CUDA=1`` turns every "cannot" into an error."""
    flag = os.environ.get("TOKOPS_CUDA", os.environ.get("FORCE_CUDA", "")).strip()
    if flag == "0":
        log("TOKOPS_CUDA=0: building the CPU-only extension (no CUDA kernels)")
        return None
    torch_cuda = torch.version.cuda
    cuda_home = find_cuda_home(torch_cuda)
    why = None
    if torch_cuda is None:
        why = f"torch {torch.__version__} was built without CUDA"
    elif cuda_home is None:
        env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        why = (f"CUDA_HOME={env} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)" if env
               else "no CUDA toolkit found (no nvcc on PATH, no /usr/local/cuda)")
    else:
        nv = nvcc_version(cuda_home)
        if nv is None or nv.split(".")[0] != torch_cuda.split(".")[0]:
            why = f"nvcc {nv} at {cuda_home} does not match torch's CUDA {torch_cuda} (major version)"
    inc = None
    if why is None:
        inc = cuda_include_dirs(torch, cuda_home)
        if inc is None:
            why = (f"the CUDA library headers torch needs ({', '.join(NEEDED_HEADERS)}) are neither in "
                   f"{cuda_home}/include nor in a pip nvidia/*/include folder beside torch")
    if why is not None:
        if flag == "1":
            sys.exit(f"tokops: TOKOPS_CUDA=1 but the CUDA kernels cannot be compiled: {why}")
        log(f"building the CPU-only extension (no CUDA kernels): {why}")
        return None
    return cuda_home, inc


def extensions():
    import torch

    sources = read_sources()
    cfg = cuda_config(torch)
    if cfg is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is first imported.
        os.environ["CUDA_HOME"] = cfg[0]
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3"]  # the C++ standard comes from torch.utils.cpp_extension (C++20 for torch >= 2.13)
    if cfg is None:
        return [CppExtension("tokops._C", [s for s in sources if not s.endswith(".cu")],
                             extra_compile_args={"cxx": cxx})], None
    cuda_home, inc = cfg
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    log(f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"with {cuda_home}; headers from {', '.join(inc)}")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    ext = CUDAExtension("tokops._C", sources, include_dirs=inc,
                        define_macros=[("TOKOPS_WITH_CUDA", "1")],
                        extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], os.environ["TORCH_CUDA_ARCH_LIST"]


def build_info(torch, archs: str | None) -> dict:
    """What this build compiled against; written next to the extension as tokops/_build_info.json."""
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_kernels": archs is not None,
            "torch_cuda_arch_list": archs, "python": ".".join(map(str, sys.version_info[:3]))}


def build_ext_class(info: dict):
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def run(self):
            inplace = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()
            # Beside the built extension (build_lib, so it goes into the wheel), and in the source
            # package for editable and in-place builds (setuptools copies only the .so there).
            dests = {Path(self.build_lib) / "tokops"}
            if inplace:
                dests.add(ROOT / "python" / "tokops")
            for d in dests:
                d.mkdir(parents=True, exist_ok=True)
                (d / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")

    return BuildExt


def find_packages() -> list[str]:
    """Every folder with an __init__.py under python/tokops, plus tokops.triton_kernels."""
    base = ROOT / "python"
    pkgs = sorted(".".join(p.parent.relative_to(base).parts)
                  for p in (base / "tokops").rglob("__init__.py"))
    return pkgs + ["tokops.triton_kernels"]


def main():
    import torch

    exts, archs = extensions()
    setup(
        name="tokops",
        version=read_version(),
        description="GPU kernels that make transformers cheaper per token: "
                    "sparse attention, token merging, quantized KV.",
        long_description=(ROOT / "README.md").read_text(),
        long_description_content_type="text/markdown",
        license="Apache-2.0",
        python_requires=">=3.10",
        packages=find_packages(),
        package_dir={"tokops": "python/tokops", "tokops.triton_kernels": "triton_kernels"},
        ext_modules=exts,
        cmdclass={"build_ext": build_ext_class(build_info(torch, archs))},
        install_requires=["torch>=2.11"],
        extras_require={"triton": ["triton>=3.6"],
                        "test": ["pytest", "pytest-benchmark", "numpy", "hypothesis"],
                        "bench": ["matplotlib", "pytest-benchmark"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
