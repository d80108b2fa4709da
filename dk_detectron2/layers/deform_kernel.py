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
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .conv_base import KernelConvBase
from .generators import GENERATOR_KINDS, build_generator, global_average_pool, zero_init_
from .geometry import IntPair, base_grid, check_divisor, pair, scope_base, zero_rotation_cells
from .ops import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample

__all__ = [
    "ROTATION_CLIP_MODES",
    "SCOPE_INIT_MODES",
    "RotationClip",
    "KernelConvBase",
    "zero_init_",
    "GlobalDeformKernel2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
]

ROTATION_CLIP_MODES = ("none", "scope", "range")
# How a fresh scope is filled: "full", every cell like a K x K kernel's weight; "grid", only the
# cells the zero-rotation taps read (the rest start at zero, as in a converted rigid checkpoint).
SCOPE_INIT_MODES = ("full", "grid")


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
        taps = kernel_size[0] * kernel_size[1]
        if mode == "scope":  # sample point base + r within [0, S - 1]
            base = base_grid(kernel_size, scope_size)
            lower = -base
            upper = torch.tensor([scope_size[0] - 1.0, scope_size[1] - 1.0]) - base
        else:
            lower = torch.full((taps, 2), low)
            upper = torch.full((taps, 2), high)
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
        # One clamp (not minimum + maximum): fvcore's FlopCountAnalysis ignores aten::clamp as it
        # ignores relu, so a DK model analyses without "unsupported operator" warnings.
        return torch.clamp(rotation, lower, upper)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (
            f", range={self.clip_range}" if self.mode == "range" else ""
        )


class _DeformKernelBase(KernelConvBase):
    """A scope weight [C_out, C_in/groups, S, S] plus rotation groups and rotation clipping."""

    def _build(
        self,
        *,
        scope_size: Optional[IntPair] = None,
        rotation_groups: int = 1,
        rotation_clip: str = "none",
        rotation_clip_range: Sequence[float] = (-1.0, 1.0),
        generator: str = "full",
        scope_init: str = "full",
    ) -> None:
        self.scope_size = pair(
            "scope_size", self.kernel_size if scope_size is None else scope_size, 1
        )
        if self.scope_size[0] < self.kernel_size[0] or self.scope_size[1] < self.kernel_size[1]:
            raise ValueError(
                f"scope_size {self.scope_size} must be at least kernel_size {self.kernel_size}"
            )
        self.rotation_groups = check_divisor(
            "rotation_groups", rotation_groups, "out_channels", self.out_channels
        )
        if generator not in GENERATOR_KINDS:
            raise ValueError(f"generator must be one of {GENERATOR_KINDS}, got {generator!r}")
        self.generator = generator
        if scope_init not in SCOPE_INIT_MODES:
            raise ValueError(f"scope_init must be one of {SCOPE_INIT_MODES}, got {scope_init!r}")
        self.scope_init = scope_init
        self.rotation_clip = RotationClip(
            self.kernel_size, self.scope_size, rotation_clip, rotation_clip_range
        )
        self.weight = nn.Parameter(
            torch.empty(self.out_channels, self.in_channels // self.groups, *self.scope_size)
        )
        self._reset_weight()
        self._build_generators()

    def _build_generators(self) -> None:
        """Creates the submodules named in ``generator_names`` (zero output at start)."""
        raise NotImplementedError

    def rigid_gain(self) -> float:
        """Std of the zero-rotation kernel over the std of i.i.d. scope cells.

        With ``S - K`` odd the taps sit between cells, and each reads a bilinear mix whose
        variance is ``(1 - f)^2 + f^2`` (f = 0.5) of a cell's per axis: the rigid kernel of a
        scope filled like a K x K kernel would start 2x (both axes odd) too small.
        """
        gain = 1.0
        for s, k in zip(self.scope_size, self.kernel_size):
            f = scope_base(k, s) % 1.0
            gain *= (1.0 - f) ** 2 + f**2
        return math.sqrt(gain)

    def _reset_weight(self) -> None:
        super()._reset_weight()
        self._finish_scope_init()

    def c2_msra_fill_(self) -> None:
        """``c2_msra_fill`` of the rigid kernel: the scope is scaled by ``1 / rigid_gain()`` so that
        the zero-rotation K x K kernel has the He-normal std of a K x K conv."""
        super().c2_msra_fill_()
        self._finish_scope_init()

    def _finish_scope_init(self) -> None:
        """Divides a scope initialised like a K x K kernel by ``rigid_gain()``; with
        ``scope_init="grid"`` then zeroes the cells the zero-rotation taps do not read."""
        with torch.no_grad():
            self.weight.div_(self.rigid_gain())
            if self.scope_init == "grid":
                ring = ~zero_rotation_cells(self.kernel_size, self.scope_size)
                self.weight[..., ring.to(self.weight.device)] = 0.0

    @property
    def num_rotations(self) -> int:
        """G * K * K * 2, the channels of the predicted rotation."""
        return self.rotation_groups * self.kernel_size[0] * self.kernel_size[1] * 2

    def base_grid(self) -> torch.Tensor:
        """[K*K, 2] (y, x) scope coordinates of the taps at zero rotation."""
        return base_grid(self.kernel_size, self.scope_size, self.weight.dtype, self.weight.device)

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
        channels, per_group, n = weight.shape[0], weight.shape[1], coord.shape[0]
        scopes = weight.reshape(-1, self.scope_size[0], self.scope_size[1])
        sampled = nd_linear_sample(scopes, coord.reshape(-1, 2))
        sampled = sampled.reshape(n, self.kernel_size[0], self.kernel_size[1], channels, per_group)
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
        if self.scope_init != "full":
            s += f", scope_init={self.scope_init!r}"
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
        scope_size: S (int or pair, >= kernel_size); default kernel_size (the rigid kernel). A
            model built from its config uses MODEL.DK.SCOPE_SIZE (default 5, :class:`DKOptions`).
        rotation_groups: G, blocks of output channels sharing a rotation.
        rotation_clip, rotation_clip_range: see :class:`RotationClip`.
        generator: the kind of the local variants' generators, ``"full"`` or ``"separable"``
            (:mod:`dk_detectron2.layers.generators`); the global variant's is a linear layer on
            the pooled input and takes only ``"full"``.
        scope_init: ``"full"`` (every scope cell initialised like a K x K kernel's weight) or
            ``"grid"`` (only the cells the zero-rotation taps read; the others start at zero, so
            a tap that moves reads a blend towards zero instead of untrained noise).
        norm, activation: as ``detectron2.layers.Conv2d``.
    Input [B, C_in, H, W] -> output [B, C_out, Ho, Wo] (Ho, Wo as the rigid convolution's).
    """

    generator_names = ("rotation_fc",)

    def _build_generators(self) -> None:
        if self.generator != "full":
            raise ValueError(
                f"GlobalDeformKernel2d predicts its rotation with a linear layer: generator must "
                f"be 'full', got {self.generator!r}"
            )
        self.rotation_fc = zero_init_(nn.Linear(self.in_channels, self.num_rotations))

    def sample_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_out, C_in/groups, K, K]: the kernel each sample of ``x`` is convolved with."""
        batch = x.shape[0]
        taps = self.kernel_size[0] * self.kernel_size[1]
        pooled = global_average_pool(x)
        rotation = self.rotation_fc(pooled).reshape(batch, self.rotation_groups, taps * 2)
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
        return self._convolve_per_sample(x, self.sample_kernels(x).to(x.dtype))


class DeformKernel2d(_DeformKernelBase):
    """Local Deformable Kernel: a rotation per output position, tap and rotation group.

    A rigid convolution ``rotation_conv`` with this module's kernel size, stride, padding and
    dilation predicts ``G*K*K*2`` rotations per position (zero-initialised); the op
    :func:`dk_detectron2.layers.deform_kernel2d` then samples every tap from the S x S scope.
    Arguments as :class:`GlobalDeformKernel2d`. With S = K and zero rotation it is the rigid
    convolution ``F.conv2d(x, weight, ...)``.
    """

    generator_names = ("rotation_conv",)

    def _build_generators(self) -> None:
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        self.rotation_conv = build_generator(
            self.generator, self.in_channels, self.num_rotations, *geometry
        )

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        rotation = self._clip(self.rotation_conv(x))
        return deform_kernel2d(
            x, rotation, self.weight.to(x.dtype), self.kernel_size, self.stride, self.padding,
            self.dilation, self.rotation_groups,
        )


class DeformKernelConv2d(_DeformKernelBase):
    """Deformable Kernel + deformable convolution: kernel rotation AND image offset are learnt.

    Two zero-initialised rigid convolutions predict the rotation [B, G*K*K*2, Ho, Wo]
    (``rotation_conv``) and the image offset [B, K*K*2, Ho, Wo] in DCN's layout (``offset_conv``);
    :func:`dk_detectron2.layers.deform_kernel_conv2d` reads the input at the offset sample points
    and the kernel at the rotated scope points. Arguments as :class:`GlobalDeformKernel2d`.
    """

    generator_names = ("offset_conv", "rotation_conv")

    def _build_generators(self) -> None:
        taps = self.kernel_size[0] * self.kernel_size[1]
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        self.offset_conv = build_generator(self.generator, self.in_channels, taps * 2, *geometry)
        self.rotation_conv = build_generator(
            self.generator, self.in_channels, self.num_rotations, *geometry
        )

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        rotation = self._clip(self.rotation_conv(x))
        return deform_kernel_conv2d(
            x, offset, rotation, self.weight.to(x.dtype), self.kernel_size, self.stride,
            self.padding, self.dilation, self.rotation_groups,
        )
