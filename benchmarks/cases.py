"""What the benchmark measures: the shapes, and one :class:`Workload` per (operator, shape,
layout, dtype).

Shapes: a ResNet-50's bottleneck 3x3 convolutions (tiny ones for ``--quick``). Workloads, by name
(:data:`WORKLOADS`, built by :func:`build_workload`):

- ``"deform_kernel2d"``, ``"deform_kernel_conv2d"``: the Deformable Kernel operators of
  :mod:`dk_detectron2.layers` (the depthwise path, or grouped/full when ``shape.groups`` says so);
- ``"global_deform_kernel2d"``: the :class:`~dk_detectron2.layers.GlobalDeformKernel2d` module;
- ``"conv2d"``: ``F.conv2d`` with the shape's groups (depthwise: the baseline of every DK op);
- ``"torchvision_deform_conv2d"``: ``torchvision.ops.deform_conv2d`` with a depthwise weight.

Layouts are ``"nchw"`` (contiguous) and ``"channels_last"``; the rotation and offset use the
input's layout (as when a convolution of the input predicts them).
"""

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

LAYOUTS = ("nchw", "channels_last")
PASSES = ("forward", "forward_backward")
_MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# (channels, spatial size) of the bottleneck 3x3 convolution of res2..res5 at a 224x224 input.
RESNET50_STAGES: Tuple[Tuple[int, int], ...] = ((64, 56), (128, 28), (256, 14), (512, 7))
_QUICK_STAGES: Tuple[Tuple[int, int], ...] = ((8, 8), (16, 4))


@dataclass(frozen=True)
class OpShape:
    """One operator problem: input [batch, channels, size, size], K x K taps from an S x S scope.

    ``groups`` is the convolution's groups (``channels`` = depthwise); stride 1 and padding
    ``kernel_size // 2`` keep the spatial size, as in a bottleneck's 3x3 convolution.
    """

    batch: int
    channels: int
    size: int
    kernel_size: int = 3
    scope_size: int = 4
    rotation_groups: int = 1
    groups: int = 0  # 0 means depthwise (groups = channels)

    @property
    def conv_groups(self) -> int:
        return self.groups or self.channels

    @property
    def depthwise(self) -> bool:
        return self.conv_groups == self.channels

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    @property
    def stage_key(self) -> Tuple[int, int, int, int]:
        """What a plain convolution's cost depends on (not the scope or rotation groups)."""
        return (self.batch, self.channels, self.size, self.conv_groups)

    def label(self) -> str:
        text = f"B{self.batch} C{self.channels} {self.size}x{self.size} S{self.scope_size}"
        text += f" G{self.rotation_groups}"
        if not self.depthwise:
            text += f" groups{self.conv_groups}"
        return text

    def to_dict(self):
        return dict(asdict(self), groups=self.conv_groups, label=self.label())


def op_shapes(quick: bool) -> List[OpShape]:
    """Every (stage, batch, S, G) combination: 32 shapes, or 4 tiny ones with ``quick``."""
    stages = _QUICK_STAGES if quick else RESNET50_STAGES
    batches = (2,) if quick else (1, 8)
    scopes = (4,) if quick else (4, 5)
    rotation_groups = (1, 2) if quick else (1, 4)
    return [OpShape(batch, channels, size, 3, scope, g) for batch in batches
            for channels, size in stages for scope in scopes for g in rotation_groups]


def headline_shape(quick: bool) -> OpShape:
    """The shape of the issue's CPU targets: B 8, C 64, 56x56, K 3, S 4, G 1."""
    return OpShape(2, 8, 8, 3, 4, 1) if quick else OpShape(8, 64, 56, 3, 4, 1)


def full_dk_shape(quick: bool) -> OpShape:
    """Full (groups 1) Deformable Kernel: B 8, C 256, 28x28, K 3, S 4."""
    return OpShape(2, 16, 8, 3, 4, 1, groups=1) if quick else OpShape(8, 256, 28, 3, 4, 1, groups=1)


def scaling_sizes(quick: bool) -> List[int]:
    """Spatial sizes of the H*W scaling sweep (B and C as the headline shape)."""
    return [4, 8, 16] if quick else [14, 28, 56, 112]


def dk_ops_backend() -> str:
    """Which build of the DK operators runs: the compiled extension's path and capabilities."""
    from dk_detectron2.layers._extension import compiled_with_cuda, cpu_vector_lanes, extension_path

    return (f"compiled {extension_path()} (CUDA kernels: {compiled_with_cuda()}; "
            f"CPU vectors of {cpu_vector_lanes()} floats)")


@dataclass
class Workload:
    """One operator call, ready to be timed forward or forward+backward.

    Attributes:
        name, layout: the workload's name (a key of :data:`WORKLOADS`) and memory layout.
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


def _tensor(shape, layout, dtype, device, scale=1.0) -> torch.Tensor:
    tensor = torch.randn(shape, dtype=torch.float32, device=device) * scale
    tensor = tensor.to(dtype).contiguous(memory_format=_MEMORY_FORMATS[layout])
    return tensor.requires_grad_()


def _image_and_rotation(shape: OpShape, layout, dtype, device):
    b, c, h, k = shape.batch, shape.channels, shape.size, shape.kernel_size
    image = _tensor((b, c, h, h), layout, dtype, device)
    rotation = _tensor((b, shape.rotation_groups * k * k * 2, h, h), layout, dtype, device, 0.5)
    weight = _tensor((c, c // shape.conv_groups, shape.scope_size, shape.scope_size), "nchw",
                     dtype, device, 0.1)
    grad_output = _tensor((b, c, h, h), layout, dtype, device).detach()
    return image, rotation, weight, grad_output


def _column_buffer_bytes(shape: OpShape, dtype) -> int:
    taps = shape.kernel_size**2
    return shape.batch * shape.channels * taps * shape.size**2 * torch.finfo(dtype).bits // 8


def deform_kernel2d(shape: OpShape, layout, dtype, device) -> Workload:
    from dk_detectron2.layers import deform_kernel2d as op

    image, rotation, weight, grad_output = _image_and_rotation(shape, layout, dtype, device)
    k, p, g = shape.kernel_size, shape.padding, shape.rotation_groups
    return Workload("deform_kernel2d", layout, lambda: op(image, rotation, weight, k, 1, p, 1, g),
                    (image, rotation, weight), grad_output,
                    _column_buffer_bytes(shape, dtype) if shape.depthwise else None)


def deform_kernel_conv2d(shape: OpShape, layout, dtype, device) -> Workload:
    from dk_detectron2.layers import deform_kernel_conv2d as op

    image, rotation, weight, grad_output = _image_and_rotation(shape, layout, dtype, device)
    k, p, g = shape.kernel_size, shape.padding, shape.rotation_groups
    offset = _tensor((shape.batch, k * k * 2, shape.size, shape.size), layout, dtype, device, 0.5)
    return Workload("deform_kernel_conv2d", layout,
                    lambda: op(image, offset, rotation, weight, k, 1, p, 1, g),
                    (image, offset, rotation, weight), grad_output,
                    _column_buffer_bytes(shape, dtype) if shape.depthwise else None)


def global_deform_kernel2d(shape: OpShape, layout, dtype, device) -> Workload:
    from dk_detectron2.layers import GlobalDeformKernel2d

    c, k = shape.channels, shape.kernel_size
    module = GlobalDeformKernel2d(c, c, k, padding=shape.padding, groups=shape.conv_groups,
                                  scope_size=shape.scope_size,
                                  rotation_groups=shape.rotation_groups).to(device, dtype)
    # A random (not zero) rotation generator, as after training.
    torch.nn.init.normal_(module.rotation_fc.weight, std=0.1)
    image = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device)
    grad_output = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device).detach()
    return Workload("global_deform_kernel2d", layout, lambda: module(image),
                    (image, *[p for p in module.parameters() if p.requires_grad]), grad_output)


def conv2d(shape: OpShape, layout, dtype, device) -> Workload:
    c, k = shape.channels, shape.kernel_size
    image = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device)
    weight = _tensor((c, c // shape.conv_groups, k, k), layout, dtype, device, 0.1)
    grad_output = _tensor((shape.batch, c, shape.size, shape.size), layout, dtype, device).detach()
    groups, padding = shape.conv_groups, shape.padding
    return Workload("conv2d", layout, lambda: F.conv2d(image, weight, None, 1, padding, 1, groups),
                    (image, weight), grad_output)


def torchvision_deform_conv2d(shape: OpShape, layout, dtype, device) -> Workload:
    from torchvision.ops import deform_conv2d as op

    c, k, h = shape.channels, shape.kernel_size, shape.size
    image = _tensor((shape.batch, c, h, h), layout, dtype, device)
    offset = _tensor((shape.batch, k * k * 2, h, h), layout, dtype, device, 0.5)
    weight = _tensor((c, c // shape.conv_groups, k, k), "nchw", dtype, device, 0.1)
    grad_output = _tensor((shape.batch, c, h, h), layout, dtype, device).detach()
    padding = shape.padding
    return Workload("torchvision_deform_conv2d", layout,
                    lambda: op(image, offset, weight, None, 1, padding, 1), (image, offset, weight),
                    grad_output)


WORKLOADS = {
    "deform_kernel2d": deform_kernel2d,
    "deform_kernel_conv2d": deform_kernel_conv2d,
    "global_deform_kernel2d": global_deform_kernel2d,
    "conv2d": conv2d,
    "torchvision_deform_conv2d": torchvision_deform_conv2d,
}


def build_workload(name: str, shape: OpShape, layout: str, dtype=torch.float32,
                   device="cpu") -> Workload:
    """Allocates the inputs of workload ``name`` on ``shape`` (seeded, so runs are comparable)."""
    if name not in WORKLOADS:
        raise ValueError(f"name must be one of {sorted(WORKLOADS)}, got {name!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    torch.manual_seed(0)
    return WORKLOADS[name](shape, layout, dtype, torch.device(device))


def timing_key(op: str, layout: str, pass_name: str) -> str:
    return f"{op}/{layout}/{pass_name}"


def workload_callables(workload: Workload, passes=PASSES) -> Dict[str, Callable[[], object]]:
    """``{op/layout/pass: callable}`` for the forward and forward+backward of ``workload``."""
    makers = {"forward": workload.forward_fn, "forward_backward": workload.forward_backward_fn}
    return {timing_key(workload.name, workload.layout, p): makers[p]() for p in passes}


def measurement_rows(measurements: Mapping, **common) -> list:
    """Flattens ``{op/layout/pass: Measurement}`` into JSON rows (with ``common`` fields)."""
    rows = []
    for key, measurement in measurements.items():
        op, layout, pass_name = key.split("/")
        rows.append(dict(common, op=op, layout=layout, **{"pass": pass_name},
                         **measurement.to_dict()))
    return rows
