"""Builds rnnkern._C: the CPU kernels always, the CUDA kernels (csrc/cuda/*.cu) when there are
any and a CUDA toolkit and a CUDA build of torch are both present (RNNKERN_NO_CUDA=1 turns them
off). Without .cu files the build is a plain C++ extension, linked to no CUDA library."""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _cuda_sources() -> list[str]:
    if os.environ.get("RNNKERN_NO_CUDA") == "1" or CUDA_HOME is None or torch.version.cuda is None:
        return []
    return sorted(glob.glob("csrc/cuda/*.cu"))


def _extension():
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3"]  # the C++ standard: the one torch's BuildExtension picks for its headers
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    cuda_sources = _cuda_sources()
    if not cuda_sources:
        return CppExtension(
            "rnnkern._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
    for cc in ("80", "90"):
        nvcc_flags += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    return CUDAExtension(
        "rnnkern._C",
        sources + cuda_sources,
        define_macros=[("RNNKERN_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
