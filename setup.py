"""Builds rnnkern._C, the CPU kernels (csrc/bindings.cpp, csrc/python_calls.cpp and
csrc/cpu/*.cpp), as a plain C++ extension of torch."""
import glob
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def _extension():
    sources = ["csrc/bindings.cpp", "csrc/python_calls.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3"]  # the C++ standard: the one torch's BuildExtension picks for its headers
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    return CppExtension("rnnkern._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
