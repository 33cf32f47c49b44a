"""Build script for tokops.

One extension, ``tokops._C``, is built from the sources listed in
``csrc/sources.txt`` (CMakeLists.txt reads the same list).

CUDA kernels are compiled when CUDA *can be compiled*: ``nvcc`` is found
(``CUDA_HOME`` or ``PATH``) and the installed torch was built with CUDA.  A GPU
does not need to be present.  Environment switches:

* ``TOKOPS_CUDA=0`` / ``1``  force the CPU-only build / require the CUDA build
  (``FORCE_CUDA=1`` is accepted as an alias of ``TOKOPS_CUDA=1``);
* ``TORCH_CUDA_ARCH_LIST``  GPU architectures, default ``"8.0;9.0a"`` (A100, H100/H200);
* ``MAX_JOBS``  parallel compile jobs (ninja).
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0a"


def read_version() -> str:
    text = (ROOT / "python" / "tokops" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def read_sources() -> list[str]:
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def cuda_wanted(torch) -> bool:
    flag = os.environ.get("TOKOPS_CUDA", os.environ.get("FORCE_CUDA", "")).strip()
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc_ok = CUDA_HOME is not None and (
        Path(CUDA_HOME, "bin", "nvcc").exists() or shutil.which("nvcc") is not None
    )
    torch_cuda = torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not (nvcc_ok and torch_cuda):
            sys.exit(
                "tokops: TOKOPS_CUDA=1 but CUDA cannot be compiled: "
                f"nvcc found={nvcc_ok} (CUDA_HOME={CUDA_HOME}), torch built with CUDA={torch_cuda} "
                f"(torch {torch.__version__})"
            )
        return True
    return nvcc_ok and torch_cuda


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = read_sources()
    with_cuda = cuda_wanted(torch)
    cxx = ["-O3"]  # the C++ standard comes from torch.utils.cpp_extension (C++20 for torch >= 2.13)
    if not with_cuda:
        print("tokops: building the CPU-only extension (no CUDA kernels)")
        return [CppExtension("tokops._C", [s for s in sources if not s.endswith(".cu")],
                             extra_compile_args={"cxx": cxx})], False
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"tokops: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    ext = CUDAExtension("tokops._C", sources,
                        define_macros=[("TOKOPS_WITH_CUDA", "1")],
                        extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], True


def find_packages() -> list[str]:
    """Every folder with an __init__.py under python/tokops, plus tokops.triton_kernels."""
    base = ROOT / "python"
    pkgs = sorted(".".join(p.parent.relative_to(base).parts)
                  for p in (base / "tokops").rglob("__init__.py"))
    return pkgs + ["tokops.triton_kernels"]


def main():
    from torch.utils.cpp_extension import BuildExtension

    exts, _ = extensions()
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
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        install_requires=["torch>=2.11"],
        extras_require={"triton": ["triton>=3.6"],
                        "test": ["pytest", "pytest-benchmark", "numpy", "hypothesis"],
                        "bench": ["matplotlib", "pytest-benchmark"]},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
