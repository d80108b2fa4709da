"""Deformable Kernel operators and modules (as ``detectron2.layers`` / ``torchvision.ops``)."""
import warnings

from .ops import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample
from .deform_kernel import DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d
from .rivals import CondConv2d, LearntOffsetDeformConv2d
from .registry import DK_CONV_REGISTRY, DKOptions, build_dk_conv

__all__ = ["deform_kernel2d", "deform_kernel_conv2d", "nd_linear_sample"]
__all__ += ["GlobalDeformKernel2d", "DeformKernel2d", "DeformKernelConv2d",
            "LearntOffsetDeformConv2d", "CondConv2d"]
__all__ += ["DK_CONV_REGISTRY", "DKOptions", "build_dk_conv"]


def __getattr__(name: str):
    # DeformConv2d, the former name of LearntOffsetDeformConv2d, reads like
    # torchvision.ops.DeformConv2d, whose forward takes the offset as an input; this one predicts it.
    if name == "DeformConv2d":
        warnings.warn(
            "dk_detectron2.layers.DeformConv2d is deprecated: it is LearntOffsetDeformConv2d, "
            "which predicts its offsets itself (unlike torchvision.ops.DeformConv2d, which takes "
            "them as input); use LearntOffsetDeformConv2d",
            DeprecationWarning,
            stacklevel=2,
        )
        return LearntOffsetDeformConv2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
