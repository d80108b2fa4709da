"""Deformable Kernel modules (Gao et al., ICLR 2020) with the interface of ``detectron2.layers.Conv2d``.

Every module here owns a scope weight ``[C_out, C_in/groups, S, S]`` (``S >= K``) and a generator
that predicts kernel-space offsets ("rotations"); K taps are read bilinearly from the scope at the
base grid plus the rotation. The generators are initialised to zero, so a fresh module computes
``F.conv2d(x, module.rigid_weight(), ...)``: the convolution with the kernel sampled at zero
rotation (the centre K x K of the scope when ``S - K`` is even, e.g. the weight itself for S = K).

Like ``detectron2.layers.Conv2d`` the modules take ``norm`` (a module applied after the
convolution) and ``activation`` (a callable applied after the norm).

Rotation layout: ``[..., G*K*K*2, ...]`` where channel ``g*K*K*2 + (kh*K + kw)*2 + 0`` is the y
rotation of tap (kh, kw) in rotation group g and ``+ 1`` its x rotation; output channel o belongs to
rotation group ``o // (C_out / G)``.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .generators import GENERATOR_KINDS, build_generator, zero_init_
from .ops import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample

__all__ = [
    "ROTATION_CLIP_MODES",
    "RotationClip",
    "KernelConvBase",
    "zero_init_",
    "GlobalDeformKernel2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
]

IntPair = Union[int, Sequence[int]]
ROTATION_CLIP_MODES = ("none", "scope", "range")


def _pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value[0]), int(value[1])


class RotationClip(nn.Module):
    """Clamps rotations ``[..., G, K*K*2, ...]`` tap by tap.

    Modes:
        ``"none"``: rotations are used as predicted (samples outside the scope read zero).
        ``"scope"``: each tap's sample point ``kh + r_y + (S-K)/2`` is kept inside the scope
            ``[0, S-1]``, i.e. ``r_y in [-(S-K)/2 - kh, (S+K)/2 - 1 - kh]`` (same for x with kw).
        ``"range"``: every rotation is clamped to the fixed interval ``clip_range = (low, high)``.
    Clamping stops the gradient of a rotation that is outside its interval.
    """

    def __init__(
        self,
        kernel_size: Tuple[int, int],
        scope_size: Tuple[int, int],
        mode: str = "none",
        clip_range: Sequence[float] = (-1.0, 1.0),
    ):
        super().__init__()
        if mode not in ROTATION_CLIP_MODES:
            raise ValueError(f"rotation_clip must be one of {ROTATION_CLIP_MODES}, got {mode!r}")
        low, high = (float(v) for v in clip_range)
        if mode == "range" and not low <= high:
            raise ValueError(
                f"rotation_clip_range must be (low, high) with low <= high, got {clip_range!r}"
            )
        self.mode = mode
        self.clip_range = (low, high)
        (kh_, kw_), (sh, sw) = kernel_size, scope_size
        taps_y = torch.arange(kh_, dtype=torch.float32).repeat_interleave(kw_)
        taps_x = torch.arange(kw_, dtype=torch.float32).repeat(kh_)
        if mode == "scope":
            lower = torch.stack([-(sh - kh_) / 2.0 - taps_y, -(sw - kw_) / 2.0 - taps_x], dim=1)
            upper = torch.stack(
                [(sh + kh_) / 2.0 - 1 - taps_y, (sw + kw_) / 2.0 - 1 - taps_x], dim=1
            )
        else:
            lower = torch.full((kh_ * kw_, 2), low)
            upper = torch.full((kh_ * kw_, 2), high)
        # [K*K*2] in the rotation layout (tap-major, then y/x).
        self.register_buffer("lower", lower.reshape(-1), persistent=False)
        self.register_buffer("upper", upper.reshape(-1), persistent=False)

    def forward(self, rotation: torch.Tensor, tap_dim: int) -> torch.Tensor:
        """rotation: any tensor whose dim ``tap_dim`` has size K*K*2 (one rotation group)."""
        if self.mode == "none":
            return rotation
        shape = [1] * rotation.dim()
        shape[tap_dim] = -1
        lower = self.lower.to(rotation.dtype).view(shape)
        upper = self.upper.to(rotation.dtype).view(shape)
        return torch.maximum(torch.minimum(rotation, upper), lower)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (
            f", range={self.clip_range}" if self.mode == "range" else ""
        )


class KernelConvBase(nn.Module):
    """Shared conv-like plumbing: geometry, validation, bias, ``norm`` and ``activation``.

    Subclasses create ``self.weight`` and implement ``_convolve(x)``. Those that predict where
    they sample (kernel rotations, image offsets) from the input name the predicting submodules in
    ``generator_names``; :meth:`generator_parameters` yields their parameters, which training
    usually gives a smaller learning rate (``MODEL.DK.GENERATOR_LR_FACTOR``).
    """

    generator_names: Tuple[str, ...] = ()

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = False,
        norm: Optional[nn.Module] = None,
        activation=None,
    ):
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                f"by groups ({groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self.groups = groups
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("bias", None)
        self.norm = norm
        self.activation = activation

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects input [B, {self.in_channels}, H, W], got {got}"
            )

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._finish(self._convolve(x))

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generator_parameters(self):
        """The parameters of the submodules named in ``generator_names``."""
        for name in self.generator_names:
            yield from getattr(self, name).parameters()

    def c2_msra_fill_(self) -> None:
        """Detectron2's ``c2_msra_fill`` (He normal, fan-out of the K x K kernel, zero bias).

        Generators are left at zero.
        """
        fan_out = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _reset_weight(self) -> None:
        # nn.Conv2d's default initialisation, with the fan-in of the sampled K x K kernel.
        fan_in = self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)

    def _conv_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class _DeformKernelBase(KernelConvBase):
    """A scope weight [C_out, C_in/groups, S, S] plus rotation groups and rotation clipping."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        *,
        scope_size: Optional[IntPair] = None,
        rotation_groups: int = 1,
        rotation_clip: str = "none",
        rotation_clip_range: Sequence[float] = (-1.0, 1.0),
        generator: str = "full",
        norm=None,
        activation=None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            norm,
            activation,
        )
        self.scope_size = _pair(
            "scope_size", self.kernel_size if scope_size is None else scope_size, 1
        )
        if self.scope_size[0] < self.kernel_size[0] or self.scope_size[1] < self.kernel_size[1]:
            raise ValueError(
                f"scope_size {self.scope_size} must be at least kernel_size {self.kernel_size}"
            )
        if (
            isinstance(rotation_groups, bool)
            or not isinstance(rotation_groups, int)
            or rotation_groups < 1
        ):
            raise ValueError(f"rotation_groups must be a positive int, got {rotation_groups!r}")
        if out_channels % rotation_groups:
            raise ValueError(
                f"out_channels ({out_channels}) must be divisible by rotation_groups ({rotation_groups})"
            )
        self.rotation_groups = rotation_groups
        if generator not in GENERATOR_KINDS:
            raise ValueError(f"generator must be one of {GENERATOR_KINDS}, got {generator!r}")
        self.generator = generator
        self.rotation_clip = RotationClip(
            self.kernel_size, self.scope_size, rotation_clip, rotation_clip_range
        )
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.scope_size)
        )
        self._reset_weight()

    def rigid_gain(self) -> float:
        """Std of the zero-rotation kernel over the std of i.i.d. scope cells.

        With ``S - K`` odd the taps sit between cells, and each reads a bilinear mix whose
        variance is ``(1 - f)^2 + f^2`` (f = 0.5) of a cell's per axis: the rigid kernel of a
        scope filled like a K x K kernel would start 2x (both axes odd) too small.
        """
        gain = 1.0
        for s, k in zip(self.scope_size, self.kernel_size):
            f = ((s - k) / 2.0) % 1.0
            gain *= (1.0 - f) ** 2 + f**2
        return math.sqrt(gain)

    def _reset_weight(self) -> None:
        super()._reset_weight()
        self._scale_for_rigid_kernel()

    def c2_msra_fill_(self) -> None:
        """``c2_msra_fill`` of the rigid kernel: the scope is scaled by ``1 / rigid_gain()`` so that
        the zero-rotation K x K kernel has the He-normal std of a K x K conv."""
        super().c2_msra_fill_()
        self._scale_for_rigid_kernel()

    def _scale_for_rigid_kernel(self) -> None:
        """Divides a scope initialised like a K x K kernel by ``rigid_gain()``."""
        with torch.no_grad():
            self.weight.div_(self.rigid_gain())

    @property
    def num_rotations(self) -> int:
        """G * K * K * 2, the channels of the predicted rotation."""
        return self.rotation_groups * self.kernel_size[0] * self.kernel_size[1] * 2

    def base_grid(self) -> torch.Tensor:
        """[K*K, 2] (y, x) scope coordinates of the taps at zero rotation."""
        (kh_, kw_), (sh, sw) = self.kernel_size, self.scope_size
        ys = (
            torch.arange(kh_, dtype=self.weight.dtype, device=self.weight.device) + (sh - kh_) / 2.0
        )
        xs = (
            torch.arange(kw_, dtype=self.weight.dtype, device=self.weight.device) + (sw - kw_) / 2.0
        )
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)

    def sample_kernel(
        self, coord: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Samples ``weight`` (default: the scope) at K*K taps per kernel.

        Args:
            coord: [N, K*K, 2] scope coordinates (y, x), N sets of taps.
            weight: [C, C_in/groups, S, S].
        Returns:
            [N, C, C_in/groups, Kh, Kw].
        """
        weight = self.weight if weight is None else weight
        channels, per_group = weight.shape[:2]
        n, taps = coord.shape[:2]
        sampled = nd_linear_sample(weight.reshape(-1, *self.scope_size), coord.reshape(-1, 2))
        sampled = sampled.reshape(n, *self.kernel_size, channels, per_group)
        return sampled.permute(0, 3, 4, 1, 2)

    def rigid_weight(self) -> torch.Tensor:
        """[C_out, C_in/groups, K, K]: the kernel at zero rotation (what a fresh module convolves with)."""
        return self.sample_kernel(self.base_grid().unsqueeze(0))[0]

    def _clip(self, rotation: torch.Tensor) -> torch.Tensor:
        """Clips a local rotation [B, G*K*K*2, H, W] group by group."""
        if self.rotation_clip.mode == "none":
            return rotation
        b, _, h, w = rotation.shape
        clipped = self.rotation_clip(rotation.reshape(b, self.rotation_groups, -1, h, w), tap_dim=2)
        return clipped.reshape(b, -1, h, w)

    def _dk_repr(self) -> str:
        s = f"{self._conv_repr()}, scope_size={self.scope_size}"
        if self.rotation_groups != 1:
            s += f", rotation_groups={self.rotation_groups}"
        if self.rotation_clip.mode != "none":
            s += f", rotation_clip={self.rotation_clip.mode!r}"
            if self.rotation_clip.mode == "range":
                s += f", rotation_clip_range={self.rotation_clip.clip_range}"
        if self.generator != "full":
            s += f", generator={self.generator!r}"
        return s

    def extra_repr(self) -> str:
        return self._dk_repr()


class GlobalDeformKernel2d(_DeformKernelBase):
    """Global Deformable Kernel: one rotation of the whole kernel per sample (and rotation group).

    ``rotation = linear(GAP(x))`` gives [B, G, K*K, 2]; each sample's kernel is read from the scope
    with :func:`nd_linear_sample` at ``base_grid + rotation``, and the B per-sample convolutions run
    as one grouped convolution (batch folded into the groups).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias:
            as ``nn.Conv2d`` (``groups = in_channels = out_channels`` for depthwise).
        scope_size: S (int or pair, >= kernel_size); default kernel_size.
        rotation_groups: G, blocks of output channels sharing a rotation.
        rotation_clip, rotation_clip_range: see :class:`RotationClip`.
        generator: the kind of the local variants' generators, ``"full"`` or ``"separable"``
            (:mod:`dk_detectron2.layers.generators`); the global variant's is a linear layer on
            the pooled input and takes only ``"full"``.
        norm, activation: as ``detectron2.layers.Conv2d``.
    Input [B, C_in, H, W] -> output [B, C_out, Ho, Wo] (Ho, Wo as the rigid convolution's).
    """

    generator_names = ("rotation_fc",)

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        **kwargs,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            **kwargs,
        )
        if self.generator != "full":
            raise ValueError(
                f"GlobalDeformKernel2d predicts its rotation with a linear layer: generator must "
                f"be 'full', got {self.generator!r}"
            )
        self.rotation_fc = zero_init_(nn.Linear(in_channels, self.num_rotations))

    def sample_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_out, C_in/groups, K, K]: the kernel each sample of ``x`` is convolved with."""
        batch = x.shape[0]
        taps = self.kernel_size[0] * self.kernel_size[1]
        rotation = self.rotation_fc(x.mean(dim=(2, 3))).reshape(
            batch, self.rotation_groups, taps * 2
        )
        rotation = self.rotation_clip(rotation, tap_dim=2).reshape(
            batch, self.rotation_groups, taps, 2
        )
        coord = self.base_grid() + rotation.to(self.weight.dtype)  # [B, G, K*K, 2]
        per_group = self.out_channels // self.rotation_groups
        kernels = [
            self.sample_kernel(coord[:, g], self.weight[g * per_group : (g + 1) * per_group])
            for g in range(self.rotation_groups)
        ]
        return torch.cat(kernels, dim=1)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        kernels = self.sample_kernels(x).to(x.dtype)
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width),
            kernels.reshape(batch * self.out_channels, *kernels.shape[2:]),
            None,
            self.stride,
            self.padding,
            self.dilation,
            batch * self.groups,
        )
        return out.reshape(batch, self.out_channels, *out.shape[2:])


class DeformKernel2d(_DeformKernelBase):
    """Local Deformable Kernel: a rotation per output position, tap and rotation group.

    A rigid convolution ``rotation_conv`` with this module's kernel size, stride, padding and
    dilation predicts ``G*K*K*2`` rotations per position (zero-initialised); the op
    :func:`dk_detectron2.layers.deform_kernel2d` then samples every tap from the S x S scope.
    Arguments as :class:`GlobalDeformKernel2d`. With S = K and zero rotation it is the rigid
    convolution ``F.conv2d(x, weight, ...)``.
    """

    generator_names = ("rotation_conv",)

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        **kwargs,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            **kwargs,
        )
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        self.rotation_conv = build_generator(
            self.generator, in_channels, self.num_rotations, *geometry
        )

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        rotation = self._clip(self.rotation_conv(x))
        return deform_kernel2d(
            x,
            rotation,
            self.weight.to(x.dtype),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.rotation_groups,
        )


class DeformKernelConv2d(_DeformKernelBase):
    """Deformable Kernel + deformable convolution: kernel rotation AND image offset are learnt.

    Two zero-initialised rigid convolutions predict the rotation [B, G*K*K*2, Ho, Wo]
    (``rotation_conv``) and the image offset [B, K*K*2, Ho, Wo] in DCN's layout (``offset_conv``);
    :func:`dk_detectron2.layers.deform_kernel_conv2d` reads the input at the offset sample points
    and the kernel at the rotated scope points. Arguments as :class:`GlobalDeformKernel2d`.
    """

    generator_names = ("offset_conv", "rotation_conv")

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=False,
        **kwargs,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            **kwargs,
        )
        taps = self.kernel_size[0] * self.kernel_size[1]
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        self.offset_conv = build_generator(self.generator, in_channels, taps * 2, *geometry)
        self.rotation_conv = build_generator(
            self.generator, in_channels, self.num_rotations, *geometry
        )

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        rotation = self._clip(self.rotation_conv(x))
        return deform_kernel_conv2d(
            x,
            offset,
            rotation,
            self.weight.to(x.dtype),
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.rotation_groups,
        )
