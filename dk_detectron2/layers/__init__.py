"""Deformable Kernel operators and modules (as ``detectron2.layers`` / ``torchvision.ops``)."""
from .ops import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample
from .deform_kernel import DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d
from .rivals import CondConv2d, DeformConv2d, LearntOffsetDeformConv2d
from .registry import DK_CONV_REGISTRY, DKOptions, build_dk_conv

__all__ = ["deform_kernel2d", "deform_kernel_conv2d", "nd_linear_sample"]
__all__ += ["GlobalDeformKernel2d", "DeformKernel2d", "DeformKernelConv2d",
            "LearntOffsetDeformConv2d", "DeformConv2d", "CondConv2d"]
__all__ += ["DK_CONV_REGISTRY", "DKOptions", "build_dk_conv"]
