"""Builds dk_detectron2 and its compiled extension dk_detectron2._C against the installed torch.

Install into an environment that already has torch (the build must see it, so pip's isolated
build environment cannot be used, as for Detectron2 and torchvision):

    pip install --no-build-isolation -e .

The project's metadata and build system are in pyproject.toml; this file builds the extension.

The C++ CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit is found
(CUDA_HOME or nvcc) and torch sees a GPU, or when asked: DK_WITH_CUDA=1 (or Detectron2's
FORCE_CUDA=1) builds them without a GPU (CI, Docker images), DK_WITH_CUDA=0 never. Architectures:
TORCH_CUDA_ARCH_LIST if set, else those of the visible GPUs (torch's own detection), else (no GPU
visible) the default list below. The build prints which it chose.
"""
import glob
import os
import shutil
import sys
import sysconfig
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pip's default isolated build environment has no torch
    raise RuntimeError(
        "dk_detectron2 compiles against the installed torch, but this build environment has none "
        f"({error}). Install torch first, then build without isolation:\n"
        "    pip install --no-build-isolation -e .\n"
        "(an isolated build, pip's default, cannot see the environment's torch)"
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;9.0+PTX"


def _log(message: str) -> None:
    print(f"[dk_detectron2] {message}", file=sys.stderr, flush=True)


def _want_cuda() -> bool:
    asked = os.environ.get("DK_WITH_CUDA", "")
    if asked == "0":
        _log("CUDA kernels: not built (DK_WITH_CUDA=0)")
        return False
    if asked == "1" or os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None:
            raise RuntimeError("DK_WITH_CUDA=1 (or FORCE_CUDA=1) asks for the CUDA kernels, but no "
                               "CUDA toolkit was found: set CUDA_HOME to one (with bin/nvcc)")
        if torch.version.cuda is None:
            raise RuntimeError(f"DK_WITH_CUDA=1 asks for the CUDA kernels, but torch "
                               f"{torch.__version__} is a CPU-only build")
        return True
    if CUDA_HOME is None or torch.version.cuda is None:
        _log("CUDA kernels: not built (no CUDA toolkit or a CPU-only torch)")
        return False
    if not torch.cuda.is_available():
        _log("CUDA kernels: not built (no GPU visible; DK_WITH_CUDA=1 builds them anyway)")
        return False
    return True


def _cuda_arch_list() -> str:
    """Sets TORCH_CUDA_ARCH_LIST when nothing else decides it and says what will be built."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        chosen, why = os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    elif torch.cuda.is_available():
        # torch's own detection: the capabilities of the visible GPUs, the newest with PTX
        devices = range(torch.cuda.device_count())
        caps = sorted({torch.cuda.get_device_capability(i) for i in devices})
        chosen = ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"
        names = sorted({torch.cuda.get_device_name(i) for i in devices})
        why = "the visible GPU(s): " + ", ".join(names)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        chosen, why = DEFAULT_CUDA_ARCH_LIST, "default list, no GPU visible"
    _log(f"CUDA kernels: built with CUDA {torch.version.cuda} ({CUDA_HOME}) for compute "
         f"capabilities {chosen} ({why})")
    return chosen


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
        _cuda_arch_list()
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extension = CUDAExtension
        define_macros.append(("DK_WITH_CUDA", None))
        isystem = []
        for d in _cuda_include_dirs():
            isystem += ["-isystem", d]
        extra_compile_args["cxx"] += isystem
        # -lineinfo: source lines in compute-sanitizer and Nsight Compute reports (no cost at run time)
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *isystem]
    return extension(
        "dk_detectron2._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with ninja. An editable install (pip install -e) compiles into the
    same build/temp.* folder as `setup.py build_ext --inplace` instead of a throw-away one, so
    either reuses the other's objects and a develop-mode install does not compile twice."""

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")

    def copy_file(self, infile, outfile, *args, **kwargs):
        """Puts the built library in place (dk_detectron2/_C*.so) in one step: copied to a
        temporary file in the same folder, then renamed over the old one. A plain copy would
        overwrite the old file's contents while running processes (a training, the tests) have
        it mapped, and crash them (SIGBUS); after the rename they keep the old file."""
        if self.dry_run:
            return super().copy_file(infile, outfile, *args, **kwargs)
        outfile = os.fspath(outfile)
        if os.path.isdir(outfile):
            outfile = os.path.join(outfile, os.path.basename(infile))
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(outfile)}.", suffix=".tmp",
                                         dir=os.path.dirname(os.path.abspath(outfile)))
        os.close(fd)
        try:
            shutil.copy2(infile, temporary)
            with open(temporary, "rb") as written:  # on disk before the name points at it
                os.fsync(written.fileno())
            os.replace(temporary, outfile)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        _log(f"installed {os.path.relpath(outfile, ROOT)} (replaced atomically)")
        return outfile, True


class BuildPyWithConfigs(build_py):
    """Ships the repository's configs/ inside the package (dk_detectron2/configs/...), so that an
    installed wheel carries them: importlib.resources.files("dk_detectron2") / "configs"."""

    def run(self):
        super().run()
        source = os.path.join(ROOT, "configs")
        for path in sorted(glob.glob(os.path.join(source, "**", "*"), recursive=True)):
            if os.path.isfile(path) and path.endswith((".yaml", ".py")):
                target = os.path.join(self.build_lib, "dk_detectron2", "configs",
                                      os.path.relpath(path, source))
                self.mkpath(os.path.dirname(target))
                self.copy_file(path, target)


# Name, version, description, Python version and packages: pyproject.toml. Here: what it declares
# dynamic (the dependencies) and the build of the extension and of the configs.
setup(
    # torch: the oldest release the extension was built and tested with (the CUDA path's
    # at::mm(a, b, out_dtype) alone needs 2.8; scripts/gpu_check.sh reports the torch it ran with)
    install_requires=["torch>=2.14", "torchvision", "numpy", "fvcore", "pycocotools", "matplotlib"],
    extras_require={"onnx": ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.20"]},
    ext_modules=[make_extension()],
    cmdclass={
        "build_ext": BuildExt,
        "build_py": BuildPyWithConfigs,
    },
    zip_safe=False,
)
