"""What the op-level benchmarks run: one :class:`Workload` per (operator, shape, layout, dtype).

``WORKLOAD_REGISTRY`` maps a name to a builder ``builder(shape, layout, dtype, device)`` that
allocates the inputs and returns a :class:`Workload`. Names:

- ``"deform_kernel2d"``, ``"deform_kernel_conv2d"``: the Deformable Kernel operators of
  :mod:`dk_detectron2.layers` (the depthwise path, or grouped/full when ``shape.groups`` says so);
- ``"global_deform_kernel2d"``: the :class:`~dk_detectron2.layers.GlobalDeformKernel2d` module;
- ``"conv2d"``: ``F.conv2d`` with the shape's groups (depthwise: the baseline of every DK op);
- ``"torchvision_deform_conv2d"``: ``torchvision.ops.deform_conv2d`` with a depthwise weight.

Layouts are ``"nchw"`` (contiguous) and ``"channels_last"``; the rotation and offset use the
input's layout (as when a convolution of the input predicts them).
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils.registry import Registry

from .shapes import OpShape

__all__ = ["WORKLOAD_REGISTRY", "Workload", "build_workload", "LAYOUTS", "dk_ops_backend"]

WORKLOAD_REGISTRY = Registry("DK_BENCHMARK_WORKLOAD")
LAYOUTS = ("nchw", "channels_last")
_MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def dk_ops_backend() -> str:
    """Which implementation ``dk_detectron2.layers`` calls: the compiled extension (its path)."""
    try:
        from dk_detectron2.layers._extension import (
            compiled_with_cuda,
            cpu_vector_lanes,
            extension_path,
        )
    except ImportError:
        return "reference (dk_detectron2._C is not built; pure-PyTorch stand-ins)"
    return (
        f"compiled {extension_path()} (CUDA kernels: {compiled_with_cuda()}; "
        f"CPU vectors of {cpu_vector_lanes()} floats)"
    )


@dataclass
class Workload:
    """One operator call, ready to be timed forward or forward+backward.

    Attributes:
        name, layout: the registry name and memory layout.
        forward: computes the output [B, C_out, Ho, Wo] from the tensors it closes over.
        leaves: the tensors forward+backward differentiates (inputs and parameters).
        grad_output: the incoming gradient, allocated once.
        column_buffer_bytes: size of a per-tap column buffer [B, C*K*K, Ho, Wo] for operators
            that must not allocate one (None for the others).
    """

    name: str
    layout: str
    forward: Callable[[], torch.Tensor]
    leaves: Tuple[torch.Tensor, ...]
    grad_output: torch.Tensor
    column_buffer_bytes: Optional[int] = None

    def forward_fn(self) -> Callable[[], torch.Tensor]:
        """Inference forward (no autograd graph)."""

        def run():
            with torch.no_grad():
                return self.forward()

        return run

    def forward_backward_fn(self) -> Callable[[], Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
        """Forward, then the gradients of every leaf; returns (output, gradients)."""

        def run():
            out = self.forward()
            return out, torch.autograd.grad(out, self.leaves, self.grad_output)

        return run

    def bytes_moved(self, backward: bool) -> int:
        """Compulsory DRAM traffic: read every leaf, write the output; backward also reads the
        incoming gradient and the leaves again and writes one gradient per leaf."""
        leaves = sum(t.numel() * t.element_size() for t in self.leaves)
        output = self.grad_output.numel() * self.grad_output.element_size()
        forward = leaves + output
        return forward + (output + 2 * leaves if backward else 0)


def build_workload(
    name: str, shape: OpShape, layout: str, dtype=torch.float32, device="cpu"
) -> Workload:
    """Allocates the inputs of ``name`` on ``shape`` (seeded, so runs are comparable)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    torch.manual_seed(0)
    return WORKLOAD_REGISTRY.get(name)(shape, layout, dtype, torch.device(device))


def _tensor(shape, layout, dtype, device, scale=1.0) -> torch.Tensor:
    tensor = torch.randn(shape, dtype=torch.float32, device=device) * scale
    tensor = tensor.to(dtype).contiguous(memory_format=_MEMORY_FORMATS[layout])
    return tensor.requires_grad_()


def _image_and_rotation(shape: OpShape, layout, dtype, device):
    b, c, h, k = shape.batch, shape.channels, shape.size, shape.kernel_size
    image = _tensor((b, c, h, h), layout, dtype, device)
    rotation = _tensor((b, shape.rotation_groups * k * k * 2, h, h), layout, dtype, device, 0.5)
    weight = _tensor(
        (c, c // shape.conv_groups, shape.scope_size, shape.scope_size), "nchw", dtype, device, 0.1
    )
    grad_output = _tensor((b, c, h, h), layout, dtype, device).detach()
    return image, rotation, weight, grad_output


def _column_buffer_bytes(shape: OpShape, dtype) -> int:
    taps = shape.kernel_size**2
    return shape.batch * shape.channels * taps * shape.size**2 * torch.finfo(dtype).bits // 8


@WORKLOAD_REGISTRY.register()
def deform_kernel2d(shape: OpShape, layout, dtype, device) -> Workload:
    from dk_detectron2.layers import deform_kernel2d as op

    image, rotation, weight, grad_output = _image_and_rotation(shape, layout, dtype, device)
    k, p, g = shape.kernel_size, shape.padding, shape.rotation_groups
    return Workload(
        "deform_kernel2d",
        layout,
        lambda: op(image, rotation, weight, k, 1, p, 1, g),
        (image, rotation, weight),
        grad_output,
        _column_buffer_bytes(shape, dtype) if shape.depthwise else None,
    )


@WORKLOAD_REGISTRY.register()
def deform_kernel_conv2d(shape: OpShape, layout, dtype, device) -> Workload:
    from dk_detectron2.layers import deform_kernel_conv2d as op

    image, rotation, weight, grad_output = _image_and_rotation(shape, layout, dtype, device)
    k, p, g = shape.kernel_size, shape.padding, shape.rotation_groups
    offset = _tensor((shape.batch, k * k * 2, shape.size, shape.size), layout, dtype, device, 0.5)
    return Workload(
        "deform_kernel_conv2d",
        layout,
        lambda: op(image, offset, rotation, weight, k, 1, p, 1, g),
        (image, offset, rotation, weight),
        grad_output,
        _column_buffer_bytes(shape, dtype) if shape.depthwise else None,
    )


@WORKLOAD_REGISTRY.register()
def global_deform_kernel2d(shape: OpShape, layout, dtype, device) -> Workload:
    from dk_detectron2.layers import GlobalDeformKernel2d

    c, k = shape.channels, shape.kernel_size
    module = GlobalDeformKernel2d(
        c,
        c,
        k,
        padding=shape.padding,
        groups=shape.conv_groups,
        scope_size=shape.scope_size,
        rotation_groups=shape.rotation_groups,
    ).to(device=device, dtype=dtype)
    # A random (not zero) rotation generator, as after training.
    torch.nn.init.normal_(module.rotation_fc.weight, std=0.1)
    image = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device)
    grad_output = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device).detach()
    return Workload(
        "global_deform_kernel2d",
        layout,
        lambda: module(image),
        (image, *[p for p in module.parameters() if p.requires_grad]),
        grad_output,
    )


@WORKLOAD_REGISTRY.register()
def conv2d(shape: OpShape, layout, dtype, device) -> Workload:
    c, k = shape.channels, shape.kernel_size
    image = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device)
    weight = _tensor((c, c // shape.conv_groups, k, k), layout, dtype, device, 0.1)
    grad_output = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device).detach()
    groups, padding = shape.conv_groups, shape.padding
    return Workload(
        "conv2d",
        layout,
        lambda: F.conv2d(image, weight, None, 1, padding, 1, groups),
        (image, weight),
        grad_output,
    )


@WORKLOAD_REGISTRY.register()
def torchvision_deform_conv2d(shape: OpShape, layout, dtype, device) -> Workload:
    from torchvision.ops import deform_conv2d as op

    c, k, h = shape.channels, shape.kernel_size, shape.size
    image = _tensor((shape.batch, c, h, h), layout, dtype, device)
    offset = _tensor((shape.batch, k * k * 2, h, h), layout, dtype, device, 0.5)
    weight = _tensor((c, c // shape.conv_groups, k, k), "nchw", dtype, device, 0.1)
    grad_output = _tensor((shape.batch, c, h, h), layout, dtype, device).detach()
    padding = shape.padding
    return Workload(
        "torchvision_deform_conv2d",
        layout,
        lambda: op(image, offset, weight, None, 1, padding, 1),
        (image, offset, weight),
        grad_output,
    )
