"""``DK_CONV_REGISTRY``: config name -> builder of a Deformable Kernel conv or one of its rivals.

A builder is called as ``builder(in_channels, out_channels, kernel_size, *, stride, padding,
dilation, groups, bias, norm, activation, options)`` with ``options`` a :class:`DKOptions`, and
returns an ``nn.Module`` mapping [B, C_in, H, W] to [B, C_out, Ho, Wo]. Names:

- ``"rigid_conv"``: the rigid convolution (``detectron2.layers.Conv2d``; depthwise when
  ``groups = channels``, full or grouped otherwise), the baseline of the same architecture.
  ``"depthwise"``, its former name, is accepted as an alias (:data:`DK_CONV_ALIASES`).
- ``"global_deform_kernel"``: :class:`GlobalDeformKernel2d`.
- ``"deform_kernel"``: :class:`DeformKernel2d` (local DK).
- ``"deform_kernel_conv"``: :class:`DeformKernelConv2d` (DK + deformable convolution).
- ``"deform_conv"``: :class:`LearntOffsetDeformConv2d` (deformable convolution, one offset group).
- ``"cond_conv"``: :class:`CondConv2d` (soft conditional computation, SCC).

Register a new variant with ``@DK_CONV_REGISTRY.register()`` on a builder named as the variant.
"""

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry
from torch import nn

from .deform_kernel import (
    ROTATION_CLIP_MODES,
    SCOPE_INIT_MODES,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
)
from .generators import GENERATOR_KINDS
from .geometry import check_int
from .rivals import CondConv2d, LearntOffsetDeformConv2d

__all__ = [
    "DK_CONV_REGISTRY",
    "DK_CONV_ALIASES",
    "DKOptions",
    "build_dk_conv",
    "c2_msra_fill_dk_conv",
    "dk_conv_names",
    "resolve_dk_conv_name",
]

DK_CONV_REGISTRY = Registry("DK_CONV")
# Former names -> registered names (configs that use them keep working).
DK_CONV_ALIASES = {"depthwise": "rigid_conv"}


def c2_msra_fill_dk_conv(conv: nn.Module) -> None:
    """Detectron2's ``c2_msra_fill`` (He normal, fan-out, zero bias) for any registry conv: the
    variant's own ``c2_msra_fill_`` where it has one (the DK variants scale the scope so that the
    zero-rotation K x K kernel gets the He std; generators stay at zero), fvcore's otherwise."""
    if hasattr(conv, "c2_msra_fill_"):
        conv.c2_msra_fill_()
    else:
        weight_init.c2_msra_fill(conv)


@dataclass(frozen=True)
class DKOptions:
    """The variant-specific options (``MODEL.DK.*``); each builder reads the ones it needs.

    Checked once, on construction: a bad value raises ValueError naming the config key and the
    field (``MODEL.DK.SCOPE_SIZE (scope_size) must be ...``). The modules default to S = K when
    built without options; a model's default scope is this class's (that of ``add_dk_config``).
    """

    scope_size: int = 5  # S of the DK scope (DK variants)
    rotation_groups: int = 1  # G, output-channel blocks sharing a rotation (DK variants)
    rotation_clip: str = "scope"  # "scope" | "range" | "none" (DK variants)
    rotation_clip_range: Tuple[float, float] = (-1.0, 1.0)  # bounds for rotation_clip="range"
    generator: str = "full"  # "full" | "separable" (local DK variants' generators)
    scope_init: str = "full"  # "full" | "grid": cells outside the zero-rotation grid at zero (DK)
    num_experts: int = 4  # E (cond_conv)

    def __post_init__(self):
        def name(field):
            return f"MODEL.DK.{field.upper()} ({field})"

        for field in ("scope_size", "rotation_groups", "num_experts"):
            check_int(name(field), getattr(self, field))
        if self.rotation_clip not in ROTATION_CLIP_MODES:
            raise ValueError(
                f"{name('rotation_clip')} must be one of {ROTATION_CLIP_MODES}, "
                f"got {self.rotation_clip!r}"
            )
        clip_range = tuple(self.rotation_clip_range)
        if len(clip_range) != 2 or not clip_range[0] <= clip_range[1]:
            raise ValueError(
                f"{name('rotation_clip_range')} must be [low, high] with low <= high, "
                f"got {list(clip_range)}"
            )
        if self.generator not in GENERATOR_KINDS:
            raise ValueError(
                f"{name('generator')} must be one of {GENERATOR_KINDS}, got {self.generator!r}"
            )
        if self.scope_init not in SCOPE_INIT_MODES:
            raise ValueError(
                f"{name('scope_init')} must be one of {SCOPE_INIT_MODES}, got {self.scope_init!r}"
            )

    @classmethod
    def from_config(cls, cfg) -> "DKOptions":
        """Reads ``cfg.MODEL.DK`` (see :func:`dk_detectron2.add_dk_config`)."""
        dk = cfg.MODEL.DK
        return cls(
            scope_size=dk.SCOPE_SIZE,
            rotation_groups=dk.ROTATION_GROUPS,
            rotation_clip=dk.ROTATION_CLIP,
            rotation_clip_range=tuple(dk.ROTATION_CLIP_RANGE),
            generator=dk.GENERATOR,
            num_experts=dk.NUM_EXPERTS,
            scope_init=dk.SCOPE_INIT,
        )

    def deform_kernel_kwargs(self) -> dict:
        return dict(
            scope_size=self.scope_size,
            rotation_groups=self.rotation_groups,
            rotation_clip=self.rotation_clip,
            rotation_clip_range=self.rotation_clip_range,
            generator=self.generator,
            scope_init=self.scope_init,
        )


def dk_conv_names() -> Sequence[str]:
    """The registered variant names, sorted (aliases not included)."""
    return sorted(name for name, _ in DK_CONV_REGISTRY)


def resolve_dk_conv_name(name: str) -> str:
    """The registered name of ``name`` (itself, or what an alias stands for); KeyError listing
    the valid names if there is none."""
    name = DK_CONV_ALIASES.get(name, name)
    if name not in DK_CONV_REGISTRY:
        raise KeyError(
            f"unknown Deformable Kernel conv type {name!r}; valid names: "
            f"{', '.join(dk_conv_names())} (aliases: {', '.join(sorted(DK_CONV_ALIASES))})"
        )
    return name


def build_dk_conv(
    name: str,
    in_channels: int,
    out_channels: int,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bias: bool = False,
    norm: Optional[nn.Module] = None,
    activation=None,
    options: Optional[DKOptions] = None,
    **option_overrides,
) -> nn.Module:
    """Builds the variant ``name`` with a convolution's geometry.

    Args:
        name: a registered name (see :func:`dk_conv_names`) or an alias (:data:`DK_CONV_ALIASES`).
        in_channels ... activation: as ``detectron2.layers.Conv2d``.
        options: a :class:`DKOptions` (e.g. ``DKOptions.from_config(cfg)``); default DKOptions().
        option_overrides: fields of :class:`DKOptions` to override, e.g. ``scope_size=5``.
    Raises:
        KeyError: unknown ``name`` (the message lists the valid names).
        TypeError: an unknown option.
    """
    name = resolve_dk_conv_name(name)
    options = options or DKOptions()
    if option_overrides:
        valid = {f.name for f in fields(DKOptions)}
        unknown = sorted(set(option_overrides) - valid)
        if unknown:
            raise TypeError(f"unknown DK option(s) {unknown}; valid options: {sorted(valid)}")
        options = DKOptions(**{**options.__dict__, **option_overrides})
    return DK_CONV_REGISTRY.get(name)(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        norm=norm,
        activation=activation,
        options=options,
    )


@DK_CONV_REGISTRY.register()
def rigid_conv(in_channels, out_channels, kernel_size, *, options, **conv):
    """The rigid convolution (``detectron2.layers.Conv2d``); depthwise when groups = channels."""
    return Conv2d(in_channels, out_channels, kernel_size, **conv)


@DK_CONV_REGISTRY.register()
def global_deform_kernel(in_channels, out_channels, kernel_size, *, options, **conv):
    return GlobalDeformKernel2d(
        in_channels, out_channels, kernel_size, **conv, **options.deform_kernel_kwargs()
    )


@DK_CONV_REGISTRY.register()
def deform_kernel(in_channels, out_channels, kernel_size, *, options, **conv):
    return DeformKernel2d(
        in_channels, out_channels, kernel_size, **conv, **options.deform_kernel_kwargs()
    )


@DK_CONV_REGISTRY.register()
def deform_kernel_conv(in_channels, out_channels, kernel_size, *, options, **conv):
    return DeformKernelConv2d(
        in_channels, out_channels, kernel_size, **conv, **options.deform_kernel_kwargs()
    )


@DK_CONV_REGISTRY.register()
def deform_conv(in_channels, out_channels, kernel_size, *, options, **conv):
    return LearntOffsetDeformConv2d(in_channels, out_channels, kernel_size, **conv)


@DK_CONV_REGISTRY.register()
def cond_conv(in_channels, out_channels, kernel_size, *, options, **conv):
    return CondConv2d(
        in_channels, out_channels, kernel_size, num_experts=options.num_experts, **conv
    )
