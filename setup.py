"""Builds the fused ops of dgr.py (csrc/) as the module dgr_ops:

    python setup.py build_ext --inplace     # next to dgr.py; dgr.py imports it if present
    DGR_NO_EXTENSION=1 pip install .        # dgr.py alone, PyTorch reference ops only
    DGR_NO_CUDA=1 python setup.py build_ext --inplace   # CPU kernels only

CPU kernels always; CUDA kernels too when a CUDA toolkit is found (CUDA_HOME, else /usr/local/cuda) and
torch is a CUDA build. The CUDA architectures: those of the visible GPUs; with no GPU visible (a login
node, a build machine), every architecture this torch was built for that nvcc can target, the newest
also as PTX. TORCH_CUDA_ARCH_LIST (e.g. "9.0") overrides either. One line says what is built.
"""
import os
import re
import subprocess

from setuptools import setup

import dgr

dgr.prefer_cuda_toolkit()   # before cpp_extension reads CUDA_HOME
dgr.quiet_cpp_extension()
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402


def nvcc_archs() -> set[str] | None:
    """The sm_XY that this toolkit's nvcc can target, or None if it cannot say."""
    try:
        listed = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--list-gpu-arch"],
                                capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sm_" + m for m in re.findall(r"compute_(\d+)", listed)} or None


def default_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for a machine without a visible GPU: torch's own architectures, newest + PTX."""
    archs = [a for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)]
    if (can := nvcc_archs()) is not None:
        archs = [a for a in archs if a in can]
    versions = sorted({(int(a[3:]) // 10, int(a[3:]) % 10) for a in archs})
    return ";".join(f"{major}.{minor}" for major, minor in versions) + "+PTX" if versions else ""


ext_modules = []
if os.environ.get("DGR_NO_EXTENSION") != "1":
    with_cuda = (CUDA_HOME is not None and torch.version.cuda is not None
                 and os.environ.get("DGR_NO_CUDA") != "1")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.device_count():
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
        with_cuda = bool(os.environ["TORCH_CUDA_ARCH_LIST"])
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs' architectures"
        print(f"dgr_ops: CPU and CUDA kernels (CUDA {torch.version.cuda}, {CUDA_HOME}; for {archs}); "
              "a few minutes on a small machine", flush=True)
    else:
        why = ("DGR_NO_CUDA=1" if os.environ.get("DGR_NO_CUDA") == "1" else "no CUDA toolkit found"
               if CUDA_HOME is None else "this torch is not a CUDA build")
        print(f"dgr_ops: CPU kernels only ({why})", flush=True)
    kind = CUDAExtension if with_cuda else CppExtension
    # nvcc --threads=0: the architectures compile in parallel
    ext_modules.append(kind(dgr.EXTENSION_NAME, dgr.extension_sources(with_cuda),
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--threads=0"]} if with_cuda
                            else {"cxx": ["-O3"]}))

setup(name="dgr", version="0.1.0", description="Deep Generative Replay (Shin et al. 2017), one file",
      py_modules=["dgr"], ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
