"""Builds dk_detectron2 and its compiled extension dk_detectron2._C.

The C++ CPU kernels are always built. The CUDA kernels are added whenever a CUDA toolkit is found
(CUDA_HOME or nvcc) or FORCE_CUDA=1, also on a machine with no GPU; DK_WITH_CUDA=0 leaves them out.
TORCH_CUDA_ARCH_LIST is respected; without it we build for Turing, Ampere and Hopper (sm_90, with
PTX for newer GPUs; CUDA 13 dropped Volta), since torch's own detection needs a visible GPU.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;9.0+PTX"


def _want_cuda() -> bool:
    if os.environ.get("DK_WITH_CUDA", "") == "0":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _cuda_include_dirs():
    # The venv's CUDA wheels carry cuBLAS/cuSPARSE headers that a bare toolkit may lack.
    try:
        import nvidia  # noqa: F401

        roots = [os.path.dirname(p) for p in getattr(nvidia, "__path__", [])]
    except ImportError:
        roots = []
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(root, "nvidia", "*", "include"))
    return sorted(set(found))


def make_extension():
    sources = [os.path.join("csrc", "ops.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -fno-trapping-math lets GCC turn the kernels' branch-free selects and floor() into vector code
    # (results are unchanged; only floating-point exception flags are not preserved).
    # -Wno-psabi: the kernels' 64-byte vector helpers are always inlined into their target_clones
    # callers, so GCC's note that such vectors change the call ABI without AVX-512 is moot.
    extra_compile_args = {"cxx": ["-O3", "-fno-trapping-math", "-Wno-psabi", *openmp]}
    extra_link_args = [*openmp]
    define_macros = []
    extension = CppExtension
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extension = CUDAExtension
        define_macros.append(("DK_WITH_CUDA", None))
        isystem = []
        for d in _cuda_include_dirs():
            isystem += ["-isystem", d]
        extra_compile_args["cxx"] += isystem
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", *isystem]
    return extension(
        "dk_detectron2._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )


setup(
    name="dk_detectron2",
    version="0.1.0",
    description="Deformable Kernels (ICLR 2020) for Detectron2: operators, backbones, tools",
    packages=find_packages(include=["dk_detectron2", "dk_detectron2.*"]),
    package_data={"dk_detectron2": ["configs/**/*.yaml", "configs/**/*.py"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "torchvision", "numpy", "fvcore", "pycocotools", "matplotlib"],
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
