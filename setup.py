"""Builds the fused ops of dgr.py (csrc/) as the module dgr_ops:

    python setup.py build_ext --inplace     # next to dgr.py; dgr.py imports it if present
    DGR_NO_EXTENSION=1 pip install .        # dgr.py alone, PyTorch reference ops only
    DGR_NO_CUDA=1 python setup.py build_ext --inplace   # CPU kernels only

A CUDAExtension when a CUDA toolkit is found (CUDA_HOME, else /usr/local/cuda), else a CppExtension.
Set TORCH_CUDA_ARCH_LIST (e.g. 9.0 for H100/H200) when building without a GPU, or it builds for all.
"""
import os

from setuptools import setup

import dgr  # noqa: E402  (sets CUDA_HOME to the toolkit dgr.py would use, before cpp_extension reads it)

dgr.prefer_cuda_toolkit()
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402

ext_modules = []
if os.environ.get("DGR_NO_EXTENSION") != "1":
    with_cuda = CUDA_HOME is not None and os.environ.get("DGR_NO_CUDA") != "1"
    kind = CUDAExtension if with_cuda else CppExtension
    ext_modules.append(kind(dgr.EXTENSION_NAME, dgr.extension_sources(with_cuda),
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]} if with_cuda
                            else {"cxx": ["-O3"]}))

setup(name="dgr", version="0.1.0", description="Deep Generative Replay (Shin et al. 2017), one file",
      py_modules=["dgr"], ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
