"""MobileNet-V2 with Deformable Kernels in its depthwise convs, as timm models.

timm's ``EfficientNet`` builds the network exactly as timm's ``mobilenetv2_100``; then the 3x3
depthwise conv (``conv_dw``) of every inverted-residual block in ``dk_stages`` is replaced by a
``DK_CONV_REGISTRY`` conv of the same geometry (groups = channels). Every other module, name and
initialisation is timm's, so a ``mobilenetv2_100`` checkpoint loads into ``dk_mobilenetv2_100``
through the 3x3 -> scope conversion (:mod:`.checkpoint_filter`).

Registered names: ``dk_mobilenetv2_100`` (width 1.0), ``dk_mobilenetv2_075`` (width 0.75) and
``dk_mobilenetv2_050`` (width 0.5, for small data and CPUs); their rigid twins are timm's
``mobilenetv2_100`` / ``_075`` / ``_050``. With ``dk_type=rigid_conv`` the width-0.75 network is the
rigid control at DK-0.5's parameters and multiply-adds. Keyword arguments:
``dk_type`` (a ``DK_CONV_REGISTRY`` name, default ``"deform_kernel"``), ``dk_stages`` (indices of
timm's ``blocks`` stages; default 2-6, the blocks at stride 8 and beyond, as res3-res5 of the
ResNets), ``scope_size``, ``rotation_groups``, ``rotation_clip``, ``rotation_clip_range``,
``generator``, ``num_experts``, ``scope_init`` (defaults of ``add_dk_config``), ``kernel_size`` (K of
the replaced convs, odd; default the blocks' own 3; ``dk_type=rigid_conv, kernel_size=5`` is the
rigid control with a 5x5 scope's support), ``depthwise_init`` (how the replaced convs start, see
:data:`DEPTHWISE_INITS`), and timm's ``EfficientNet`` arguments (``num_classes``, ``drop_rate``,
``drop_path_rate``, ...).
"""
from functools import partial
from typing import Optional, Sequence, Tuple

from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import decode_arch_def, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet
from torch import nn

from ..layers.registry import DKOptions, build_dk_conv, c2_msra_fill_dk_conv
from .checkpoint_filter import checkpoint_filter_fn
from .pretrained_cfgs import classification_cfg

__all__ = ["DEPTHWISE_INITS", "DKMobileNetV2", "mobilenetv2_kwargs"]

# MobileNet-V2's stages in timm's block notation (Sandler et al. 2018, Table 2).
ARCH_DEF = (
    ("ds_r1_k3_s1_c16",),
    ("ir_r2_k3_s2_e6_c24",),
    ("ir_r3_k3_s2_e6_c32",),
    ("ir_r4_k3_s2_e6_c64",),
    ("ir_r3_k3_s1_e6_c96",),
    ("ir_r3_k3_s2_e6_c160",),
    ("ir_r1_k3_s1_e6_c320",),
)
DEFAULT_DK_STAGES = (2, 3, 4, 5, 6)

# How the replaced depthwise convs are initialised (``depthwise_init``):
# - "msra" (the default): Detectron2's ``c2_msra_fill`` of the K x K kernel for every variant
#   (He normal, std sqrt(2 / (C_out K^2)), ~0.05 at 100 channels; the DK variants scale their
#   scope so that the zero-rotation kernel has it), as the DK ResNets initialise theirs: the rigid
#   conv starts where DK's layer starts, so that it is DK's fair baseline.
# - "rigid_pytorch": the same, except that the rigid conv keeps PyTorch's default (uniform, std
#   1 / (K sqrt(3)), 0.19 at K = 3: 4-9x larger at width 0.5). At lr 0.01 this start costs the
#   rigid network 4.4 +/- 2.3 top-1 points on dk_shapes_cls (docs/results_classification.md); the
#   studies' rigid rows trained at that start name it to reproduce.
DEPTHWISE_INITS = ("msra", "rigid_pytorch")


class DKMobileNetV2(EfficientNet):
    """timm's MobileNet-V2 (an ``EfficientNet`` with MobileNet-V2's blocks) whose depthwise convs
    in ``dk_stages`` are ``dk_type`` convs. Input [B, 3, H, W] -> logits [B, num_classes]."""

    def __init__(
        self,
        *,
        dk_type: str = "deform_kernel",
        dk_stages: Sequence[int] = DEFAULT_DK_STAGES,
        scope_size: int = DKOptions.scope_size,
        rotation_groups: int = DKOptions.rotation_groups,
        rotation_clip: str = DKOptions.rotation_clip,
        rotation_clip_range: Tuple[float, float] = DKOptions.rotation_clip_range,
        generator: str = DKOptions.generator,
        num_experts: int = DKOptions.num_experts,
        scope_init: str = DKOptions.scope_init,
        kernel_size: Optional[int] = None,
        depthwise_init: str = "msra",
        **kwargs,
    ):
        if depthwise_init not in DEPTHWISE_INITS:
            raise ValueError(
                f"depthwise_init must be one of {DEPTHWISE_INITS}, got {depthwise_init!r}"
            )
        if kernel_size is not None and (
            isinstance(kernel_size, bool) or not isinstance(kernel_size, int)
            or kernel_size < 1 or kernel_size % 2 == 0
        ):
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        super().__init__(**kwargs)
        stages = [int(s) for s in dk_stages]
        bad = [s for s in stages if not 0 <= s < len(self.blocks)]
        if bad:
            raise ValueError(
                f"dk_stages must be indices of the {len(self.blocks)} block stages "
                f"(0-{len(self.blocks) - 1}), got {list(dk_stages)}"
            )
        options = DKOptions(
            scope_size=scope_size,
            rotation_groups=rotation_groups,
            rotation_clip=rotation_clip,
            rotation_clip_range=tuple(rotation_clip_range),
            generator=generator,
            num_experts=num_experts,
            scope_init=scope_init,
        )
        self.dk_type = dk_type
        self.dk_stages = tuple(stages)
        self.depthwise_init = depthwise_init
        for stage in stages:
            for block in self.blocks[stage]:
                block.conv_dw = _registry_depthwise(
                    dk_type, block.conv_dw, options, kernel_size, depthwise_init
                )


def _registry_depthwise(
    name: str,
    conv: nn.Conv2d,
    options: DKOptions,
    kernel_size: Optional[int] = None,
    depthwise_init: str = "msra",
) -> nn.Module:
    """A ``DK_CONV_REGISTRY`` conv with the geometry of the depthwise ``conv`` (K x K with
    ``kernel_size``, padded to keep the output size), initialised as ``depthwise_init`` says
    (:data:`DEPTHWISE_INITS`)."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != conv.in_channels:
        raise TypeError(f"expected a depthwise nn.Conv2d, got {conv!r}")
    size, padding = conv.kernel_size, conv.padding
    if kernel_size is not None and (kernel_size, kernel_size) != tuple(size):
        size = (kernel_size, kernel_size)
        padding = tuple(d * (kernel_size // 2) for d in conv.dilation)
    replacement = build_dk_conv(
        name,
        conv.in_channels,
        conv.out_channels,
        size,
        stride=conv.stride,
        padding=padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        options=options,
    )
    if depthwise_init == "msra" or hasattr(replacement, "c2_msra_fill_"):
        c2_msra_fill_dk_conv(replacement)  # "rigid_pytorch" leaves only the rigid conv as built
    return replacement


def mobilenetv2_kwargs(channel_multiplier: float, **kwargs) -> dict:
    """The :class:`DKMobileNetV2` arguments of MobileNet-V2 at width ``channel_multiplier`` (timm's
    ``mobilenetv2_*`` architecture: channels rounded to multiples of 8, ReLU6, BatchNorm), with
    ``kwargs`` (``dk_type``, ``num_classes`` ...) passed on. The Detectron2 backbone
    (:mod:`dk_detectron2.modeling.backbone.mobilenetv2_dk`) builds its trunk from the same."""
    if isinstance(channel_multiplier, bool) or not isinstance(channel_multiplier, (int, float)) \
            or not channel_multiplier > 0:
        raise ValueError(f"channel_multiplier must be a positive number, got {channel_multiplier!r}")
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    act_layer = get_act_layer(kwargs.pop("act_layer", "relu6"))
    return dict(
        block_args=decode_arch_def([list(stage) for stage in ARCH_DEF]),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        norm_layer=kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=act_layer,
        **kwargs,
    )


def _create(variant: str, pretrained: bool, channel_multiplier: float, **kwargs) -> DKMobileNetV2:
    return build_model_with_cfg(
        DKMobileNetV2,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True),
        **mobilenetv2_kwargs(channel_multiplier, **kwargs),
    )


default_cfgs = generate_default_cfgs(
    {
        name: classification_cfg(first_conv="conv_stem", classifier="classifier", pool_size=(7, 7))
        for name in ("dk_mobilenetv2_100", "dk_mobilenetv2_075", "dk_mobilenetv2_050")
    }
)


@register_model
def dk_mobilenetv2_100(pretrained: bool = False, **kwargs) -> DKMobileNetV2:
    """MobileNet-V2 (width 1.0) with Deformable Kernels in the depthwise convs of stages 2-6."""
    return _create("dk_mobilenetv2_100", pretrained, 1.0, **kwargs)


@register_model
def dk_mobilenetv2_075(pretrained: bool = False, **kwargs) -> DKMobileNetV2:
    """MobileNet-V2 (width 0.75) with Deformable Kernels in the depthwise convs of stages 2-6."""
    return _create("dk_mobilenetv2_075", pretrained, 0.75, **kwargs)


@register_model
def dk_mobilenetv2_050(pretrained: bool = False, **kwargs) -> DKMobileNetV2:
    """MobileNet-V2 (width 0.5) with Deformable Kernels in the depthwise convs of stages 2-6."""
    return _create("dk_mobilenetv2_050", pretrained, 0.5, **kwargs)
