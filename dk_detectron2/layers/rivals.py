"""The rivals of Deformable Kernels in the paper, under the same conv-like interface.

- :class:`LearntOffsetDeformConv2d`: deformable convolution (Dai et al. 2017) on
  ``torchvision.ops.deform_conv2d`` (CPU and CUDA), its offsets predicted by a zero-initialised
  rigid convolution it owns. Unlike ``torchvision.ops.DeformConv2d``, whose ``forward`` takes the
  offset, it is called on the input alone, like the DK modules. (Its former name
  ``dk_detectron2.layers.DeformConv2d`` still works, with a ``DeprecationWarning``.)
- :class:`CondConv2d`: soft conditional computation (Yang et al. 2019, "SCC" in the DK paper):
  E expert kernels mixed per sample with routing ``sigmoid(linear(GAP(x)))``.

Both start as a rigid convolution with :meth:`rigid_weight` (zero generator).
"""

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d

from .conv_base import KernelConvBase
from .generators import global_average_pool, zero_init_
from .geometry import check_divisor, check_int
from .ops import deform_kernel_conv2d

__all__ = ["LearntOffsetDeformConv2d", "CondConv2d"]


class LearntOffsetDeformConv2d(KernelConvBase):
    """Deformable convolution with learnt offsets (depthwise when ``groups = C_in = C_out``).

    ``offset_conv`` (a rigid convolution with this module's geometry, zero-initialised) predicts
    ``offset_groups*K*K*2`` offsets per output position in DCN's layout (tap-major, (y, x)).

    On the CPU with one offset group the convolution runs through this package's
    :func:`~dk_detectron2.layers.deform_kernel_conv2d` with a zero rotation (the same function:
    a K x K scope read at its own cells), whose CPU kernel is two orders of magnitude faster than
    torchvision's forward + backward (``benchmarks/results.md``); elsewhere, and when traced (a
    FLOP count then sees deformable convolution's cost on every device), through
    ``torchvision.ops.deform_conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d``.
        offset_groups: input-channel blocks with their own offsets (torchvision's convention).
        norm, activation: as ``detectron2.layers.Conv2d``.
    Input [B, C_in, H, W] -> output [B, C_out, Ho, Wo].
    """

    generator_names = ("offset_conv",)

    def _build(self, *, offset_groups: int = 1) -> None:
        self.offset_groups = check_divisor(
            "offset_groups", offset_groups, "in_channels", self.in_channels
        )
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        )
        self._reset_weight()
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.offset_conv = zero_init_(
            nn.Conv2d(
                self.in_channels,
                offset_groups * taps * 2,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                bias=True,
            )
        )

    def rigid_weight(self) -> torch.Tensor:
        return self.weight

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        if self.offset_groups == 1 and x.device.type == "cpu" and not torch.jit.is_tracing():
            return deform_kernel_conv2d(
                x, offset, torch.zeros_like(offset), self.weight.to(x.dtype), self.kernel_size,
                self.stride, self.padding, self.dilation,
            )
        # torchvision's CPU kernel has no float16/bfloat16: half inputs run in float32 (as under
        # autocast on CUDA) and come back in their dtype.
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = deform_conv2d(
            x.to(dtype),
            offset.to(dtype),
            self.weight.to(dtype),
            None,
            self.stride,
            self.padding,
            self.dilation,
        )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        s = self._conv_repr()
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        return s


class CondConv2d(KernelConvBase):
    """Soft conditional convolution: a per-sample mixture of E expert kernels.

    ``routing = sigmoid(routing_fc(GAP(x)))`` [B, E] (zero-initialised, so every expert starts at
    0.5); sample b is convolved with ``sum_e routing[b, e] * weight[e]``, all samples in one grouped
    convolution (batch folded into the groups).

    Args:
        num_experts: E.
        Others as :class:`LearntOffsetDeformConv2d`.
    Weight [E, C_out, C_in/groups, K, K]. Input [B, C_in, H, W] -> output [B, C_out, Ho, Wo].
    """

    def _build(self, *, num_experts: int = 4) -> None:
        check_int("num_experts", num_experts)
        self.num_experts = num_experts
        self.weight = nn.Parameter(
            torch.empty(
                num_experts, self.out_channels, self.in_channels // self.groups, *self.kernel_size
            )
        )
        self._reset_weight()
        self.routing_fc = zero_init_(nn.Linear(self.in_channels, num_experts))

    def c2_msra_fill_(self) -> None:
        # Each expert gets He-normal; at start the mix (0.5 * sum of E experts) has the variance
        # of E/4 experts, so scale to keep the mixed kernel He-normal.
        super().c2_msra_fill_()
        with torch.no_grad():
            self.weight.mul_(2.0 / math.sqrt(self.num_experts))

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """[B, E] expert weights of each sample."""
        return torch.sigmoid(self.routing_fc(global_average_pool(x)))

    def rigid_weight(self) -> torch.Tensor:
        """The kernel under zero-initialised routing: ``0.5 * sum_e weight[e]``."""
        return 0.5 * self.weight.sum(dim=0)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        kernels = torch.einsum("be,eoikl->boikl", self.routing(x), self.weight.to(x.dtype))
        return self._convolve_per_sample(x, kernels)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, num_experts={self.num_experts}"
