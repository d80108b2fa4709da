"""Deformable Kernel operators and modules (as ``detectron2.layers`` / ``torchvision.ops``)."""
from .ops import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample

__all__ = ["deform_kernel2d", "deform_kernel_conv2d", "nd_linear_sample"]
