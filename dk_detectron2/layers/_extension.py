"""Loads the compiled extension ``dk_detectron2._C`` (which registers ``torch.ops.dk_detectron2``)."""
import os

try:
    from dk_detectron2 import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "dk_detectron2._C, the compiled Deformable Kernel extension, is not built. Run "
        "`make test` (or `python setup.py build_ext --inplace`, or `pip install --no-build-isolation -e .`) in the "
        f"dk_detectron2 checkout first. ({error})"
    ) from error

__all__ = ["extension_path", "compiled_with_cuda", "cpu_vector_lanes"]


def extension_path() -> str:
    """Absolute path of the loaded shared library (the tests check it is this checkout's)."""
    return os.path.abspath(_C.__file__)


def compiled_with_cuda() -> bool:
    """Whether the loaded build contains the CUDA kernels."""
    return bool(_C.compiled_with_cuda())


def cpu_vector_lanes() -> int:
    """Floats per vector in the CPU kernels that run on this machine: 16 (AVX-512), 8 (AVX2 + FMA)
    or 4 (baseline x86-64 and other architectures). The environment variable
    ``DK_DETECTRON2_CPU_LEVEL`` (``1`` or ``3``, read when the library loads) lowers it."""
    return int(_C.cpu_vector_lanes())
