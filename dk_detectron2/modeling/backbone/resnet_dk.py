"""ResNet and ResNet-FPN backbones whose 3x3 convolutions are Deformable Kernels (or their rivals).

Detectron2's ResNet pieces are reused as they are (``BasicStem``, ``ResNet``, ``ResNet.make_stage``,
``FPN``, ``LastLevelMaxPool``); only the blocks differ, and only in their 3x3 convolutions, which
come from ``DK_CONV_REGISTRY``:

- :class:`DKBottleneckBlock` (R50 and deeper): detectron2's ``BottleneckBlock`` with ``conv2``
  built by the registry, depthwise (groups = bottleneck channels, the paper's DW-ResNet) or with
  ``MODEL.RESNETS.NUM_GROUPS`` groups (full DK for ResNet, grouped for ResNeXt).
- :class:`DKBasicBlock` (R18/R34): detectron2's ``BasicBlock`` with ``conv1``/``conv2`` from the
  registry. With ``depthwise`` each becomes a depthwise-separable conv (registry depthwise 3x3 then
  a 1x1 with the norm), since a purely depthwise basic block would not mix channels at all.

Parameter names follow detectron2's ResNet (``conv1``, ``conv2``, ``conv3``, ``shortcut``,
``*.norm``), so standard checkpoints map onto the same names (the DK scope ``conv2.weight`` is
S x S; see ``dk_detectron2.checkpoint`` for the conversion). The generators are extra parameters
(``conv2.rotation_conv``, ``conv2.offset_conv``, ...), zero-initialised.
"""

from typing import List, Optional, Sequence

import fvcore.nn.weight_init as weight_init
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn

from ...layers.registry import (
    DKOptions,
    build_dk_conv,
    c2_msra_fill_dk_conv,
    dk_conv_names,
    resolve_dk_conv_name,
)

__all__ = [
    "DKBottleneckBlock",
    "DKBasicBlock",
    "SeparableConv",
    "check_conv_type",
    "check_on_per_stage",
    "fpn_from_config",
    "make_resnet_dk_stages",
    "build_resnet_dk_backbone",
    "build_resnet_dk_fpn_backbone",
]

NUM_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}
KERNEL_SIZE = 3


class DKBottleneckBlock(BottleneckBlock):
    """detectron2's ``BottleneckBlock`` with its 3x3 ``conv2`` taken from ``DK_CONV_REGISTRY``.

    Args:
        conv_type: registry name of ``conv2``.
        depthwise: True: ``conv2`` is depthwise (groups = bottleneck_channels); False: it has
            ``num_groups`` groups.
        dk_options: :class:`DKOptions` for the registry (scope size, rotation groups, ...).
        kernel_size: K of ``conv2`` (odd; 3 in every standard ResNet, 5 for a rigid control with
            the support of a 5x5 DK scope).
        Others as ``BottleneckBlock``.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        bottleneck_channels,
        stride=1,
        num_groups=1,
        norm="BN",
        stride_in_1x1=False,
        dilation=1,
        conv_type: str = "deform_kernel",
        depthwise: bool = True,
        dk_options: Optional[DKOptions] = None,
        kernel_size: int = KERNEL_SIZE,
    ):
        groups = bottleneck_channels if depthwise else num_groups
        super().__init__(
            in_channels,
            out_channels,
            bottleneck_channels=bottleneck_channels,
            stride=stride,
            num_groups=groups,
            norm=norm,
            stride_in_1x1=stride_in_1x1,
            dilation=dilation,
        )
        self.conv_type = conv_type
        self.conv2 = build_dk_conv(
            conv_type,
            bottleneck_channels,
            bottleneck_channels,
            kernel_size,
            stride=1 if stride_in_1x1 else stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=False,
            norm=get_norm(norm, bottleneck_channels),
            options=dk_options,
        )
        c2_msra_fill_dk_conv(self.conv2)


class SeparableConv(nn.Module):
    """A depthwise conv (any registry variant) followed by a 1x1 ``Conv2d`` (with the norm)."""

    def __init__(self, depthwise: nn.Module, pointwise: Conv2d):
        super().__init__()
        self.depthwise = depthwise
        self.pointwise = pointwise

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class DKBasicBlock(BasicBlock):
    """detectron2's ``BasicBlock`` (R18/R34) with both 3x3 convs from ``DK_CONV_REGISTRY``.

    Args:
        conv_type: registry name of the 3x3 convs.
        depthwise: True: each 3x3 conv is a :class:`SeparableConv` (depthwise registry conv, then
            a 1x1 conv with the norm); False: a registry conv with ``num_groups`` groups and the
            norm, as ``BasicBlock``'s (checkpoint-compatible names ``conv1``/``conv2``).
        dk_options: :class:`DKOptions`.
        Others as ``BasicBlock``.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        stride=1,
        norm="BN",
        num_groups: int = 1,
        conv_type: str = "deform_kernel",
        depthwise: bool = True,
        dk_options: Optional[DKOptions] = None,
        kernel_size: int = KERNEL_SIZE,
    ):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        self.conv_type = conv_type
        conv = dict(norm=norm, num_groups=num_groups, conv_type=conv_type, depthwise=depthwise,
                    options=dk_options, kernel_size=kernel_size)
        self.conv1 = self._make_conv(in_channels, out_channels, stride, **conv)
        self.conv2 = self._make_conv(out_channels, out_channels, 1, **conv)

    @staticmethod
    def _make_conv(
        in_channels, out_channels, stride, *, norm, num_groups, conv_type, depthwise, options,
        kernel_size,
    ):
        def conv3x3(channels_in, channels_out, groups, norm_layer):
            conv = build_dk_conv(
                conv_type,
                channels_in,
                channels_out,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=False,
                norm=norm_layer,
                options=options,
            )
            c2_msra_fill_dk_conv(conv)
            return conv

        if not depthwise:
            return conv3x3(in_channels, out_channels, num_groups, get_norm(norm, out_channels))
        pointwise = Conv2d(
            in_channels, out_channels, kernel_size=1, bias=False, norm=get_norm(norm, out_channels)
        )
        weight_init.c2_msra_fill(pointwise)
        return SeparableConv(conv3x3(in_channels, in_channels, in_channels, None), pointwise)


def check_conv_type(key: str, name: str) -> str:
    """The registered ``DK_CONV_REGISTRY`` name of config value ``name`` (an alias resolved);
    ValueError naming ``key`` and the valid names if there is none."""
    try:
        return resolve_dk_conv_name(name)
    except KeyError:
        raise ValueError(
            f"{key} = {name!r} is not a DK_CONV_REGISTRY name; valid: {', '.join(dk_conv_names())}"
        ) from None


def check_on_per_stage(on_per_stage: Sequence[bool]) -> List[bool]:
    """MODEL.DK.ON_PER_STAGE as a list of 4 booleans (res2..res5); ValueError otherwise."""
    on_per_stage = list(on_per_stage)
    if len(on_per_stage) != 4 or not all(isinstance(v, bool) for v in on_per_stage):
        raise ValueError(
            "MODEL.DK.ON_PER_STAGE must be 4 booleans (res2, res3, res4, res5), "
            f"got {on_per_stage!r}"
        )
    return on_per_stage


def make_resnet_dk_stages(
    depth: int = 50,
    *,
    on_per_stage: Sequence[bool] = (False, True, True, True),
    dk_type: str = "deform_kernel",
    base_type: str = "rigid_conv",
    depthwise: bool = True,
    dk_options: Optional[DKOptions] = None,
    norm="BN",
    num_groups: int = 1,
    width_per_group: int = 64,
    stem_out_channels: int = 64,
    res2_out_channels: int = 256,
    stride_in_1x1: bool = False,
    res5_dilation: int = 1,
    kernel_size: int = KERNEL_SIZE,
) -> List[List[CNNBlockBase]]:
    """The four stages (res2..res5) of a DK ResNet, for ``detectron2.modeling.ResNet``.

    Arguments mirror the config keys (named in every error message): ``depth``
    (MODEL.RESNETS.DEPTH), ``on_per_stage`` (MODEL.DK.ON_PER_STAGE), ``dk_type`` (MODEL.DK.TYPE),
    ``base_type`` (MODEL.DK.BASE_TYPE), ``depthwise`` (MODEL.DK.DEPTHWISE), ``dk_options``
    (MODEL.DK.SCOPE_SIZE, ROTATION_GROUPS, ROTATION_CLIP, ROTATION_CLIP_RANGE, NUM_EXPERTS) and
    MODEL.RESNETS.{NORM, NUM_GROUPS, WIDTH_PER_GROUP, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS,
    STRIDE_IN_1X1, RES5_DILATION}. ``kernel_size`` (odd, default 3) is K of the registry convs;
    the configs keep 3, the classification models' rigid 5x5 control sets 5.

    Returns:
        list of 4 lists of blocks (:class:`DKBottleneckBlock` for depth >= 50, else
        :class:`DKBasicBlock`).
    """
    options = dk_options or DKOptions()
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH must be one of {sorted(NUM_BLOCKS_PER_STAGE)}, got {depth}"
        )
    on_per_stage = check_on_per_stage(on_per_stage)
    check_conv_type("MODEL.DK.TYPE", dk_type)
    check_conv_type("MODEL.DK.BASE_TYPE", base_type)
    # DKOptions checked its own fields; what depends on the architecture is checked here.
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    if options.scope_size < kernel_size:
        raise ValueError(
            f"MODEL.DK.SCOPE_SIZE must be >= the kernel size {kernel_size}, got {options.scope_size!r}"
        )
    if res5_dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}")
    basic = depth < 50
    if basic and res5_dilation != 1:
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 for R{depth}, got {res5_dilation}")

    groups_key = "MODEL.DK.DEPTHWISE" if depthwise else "MODEL.RESNETS.NUM_GROUPS"
    stages = []
    in_channels = stem_out_channels
    out_channels = res2_out_channels
    bottleneck_channels = num_groups * width_per_group
    for index, num_blocks in enumerate(NUM_BLOCKS_PER_STAGE[depth]):
        stage = f"res{index + 2}"
        conv_type = dk_type if on_per_stage[index] else base_type
        dilation = res5_dilation if index == 3 else 1
        first_stride = 1 if index == 0 or dilation == 2 else 2
        conv_channels = [in_channels, out_channels] if basic else [bottleneck_channels]
        for channels in conv_channels:
            if channels % options.rotation_groups:
                raise ValueError(
                    f"MODEL.DK.ROTATION_GROUPS ({options.rotation_groups}) must divide the channels "
                    f"of every 3x3 conv; {stage} has a 3x3 conv with {channels} channels"
                )
            if not depthwise and channels % num_groups:
                raise ValueError(
                    f"{groups_key} ({num_groups}) must divide the channels of every 3x3 conv; "
                    f"{stage} has a 3x3 conv with {channels} channels"
                )
        kwargs = dict(
            num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels,
            out_channels=out_channels,
            norm=norm,
            num_groups=num_groups,
            conv_type=conv_type,
            depthwise=depthwise,
            dk_options=options,
            kernel_size=kernel_size,
        )
        if basic:
            block_class = DKBasicBlock
        else:
            block_class = DKBottleneckBlock
            kwargs.update(
                bottleneck_channels=bottleneck_channels,
                stride_in_1x1=stride_in_1x1,
                dilation=dilation,
            )
        stages.append(ResNet.make_stage(block_class, **kwargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return stages


def resnet_dk_stage_kwargs(cfg) -> dict:
    """The :func:`make_resnet_dk_stages` arguments of a config."""
    resnets, dk = cfg.MODEL.RESNETS, cfg.MODEL.DK
    return dict(
        depth=resnets.DEPTH,
        on_per_stage=list(dk.ON_PER_STAGE),
        dk_type=dk.TYPE,
        base_type=dk.BASE_TYPE,
        depthwise=dk.DEPTHWISE,
        dk_options=DKOptions.from_config(cfg),
        norm=resnets.NORM,
        num_groups=resnets.NUM_GROUPS,
        width_per_group=resnets.WIDTH_PER_GROUP,
        stem_out_channels=resnets.STEM_OUT_CHANNELS,
        res2_out_channels=resnets.RES2_OUT_CHANNELS,
        stride_in_1x1=resnets.STRIDE_IN_1X1,
        res5_dilation=resnets.RES5_DILATION,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_dk_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """A detectron2 ``ResNet`` whose 3x3 convs follow ``MODEL.DK`` (see :func:`make_resnet_dk_stages`).

    Needs :func:`dk_detectron2.add_dk_config`. ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` must be all
    False: deformable convolution is ``MODEL.DK.TYPE = "deform_conv"`` here.
    """
    if "DK" not in cfg.MODEL:
        raise KeyError(
            "MODEL.DK is missing from the config: call dk_detectron2.add_dk_config(cfg) before "
            "merging a dk_detectron2 config file"
        )
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE must be all False with build_resnet_dk_backbone; "
            'use MODEL.DK.TYPE = "deform_conv" with MODEL.DK.ON_PER_STAGE instead'
        )
    stem = BasicStem(
        in_channels=input_shape.channels,
        out_channels=cfg.MODEL.RESNETS.STEM_OUT_CHANNELS,
        norm=cfg.MODEL.RESNETS.NORM,
    )
    stages = make_resnet_dk_stages(**resnet_dk_stage_kwargs(cfg))
    return ResNet(
        stem,
        stages,
        out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


@BACKBONE_REGISTRY.register()
def build_resnet_dk_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's ``FPN`` (with ``LastLevelMaxPool``) on :func:`build_resnet_dk_backbone`."""
    return fpn_from_config(cfg, build_resnet_dk_backbone(cfg, input_shape))


def fpn_from_config(cfg, bottom_up) -> FPN:
    """detectron2's ``FPN`` with ``LastLevelMaxPool`` (P6) on the backbone ``bottom_up``, from
    ``MODEL.FPN`` (as detectron2's ``build_resnet_fpn_backbone``)."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
