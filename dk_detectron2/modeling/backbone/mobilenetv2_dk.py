"""MobileNet-V2 and MobileNet-V2-FPN backbones whose depthwise convs are Deformable Kernels.

The trunk is the classification model :class:`~dk_detectron2.classification.DKMobileNetV2` (timm's
MobileNet-V2 with ``DK_CONV_REGISTRY`` depthwise convs) without its head, regrouped into
Detectron2's stages so that the FPN configs of the ResNets apply unchanged:

======  ==================  ======  =====================================
stage   timm block stages   stride  channels at width 1.0 (0.5)
======  ==================  ======  =====================================
stem    stem conv, 0        2       16 (8)
res2    1                   4       24 (16)
res3    2                   8       32 (16)
res4    3, 4                16      96 (48)
res5    5, 6                32      320 (160)
======  ==================  ======  =====================================

Every module keeps its timm name under its stage (``res3.blocks.2.0.conv_dw.weight``,
``stem.conv_stem.weight``), so a checkpoint of ``dk_mobilenetv2_*`` from the classification
trainer (``blocks.2.0.conv_dw.weight`` ...) loads by Detectron2's suffix matching, and
``DKCheckpointer`` reports it per stage like a DK ResNet's (the head ``conv_head``, ``bn2``,
``classifier`` is reported as not used). ``MODEL.DK.ON_PER_STAGE`` (res2..res5) says which stages'
depthwise convs are ``MODEL.DK.TYPE``; the others stay timm's rigid convs.
"""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
from torch import nn

from ...classification.mobilenetv2 import DEPTHWISE_INITS, DKMobileNetV2, mobilenetv2_kwargs
from ...layers.registry import DKOptions
from .resnet_dk import check_conv_type, check_on_per_stage, fpn_from_config

__all__ = [
    "DKMobileNetV2Backbone",
    "build_dk_mobilenetv2_backbone",
    "build_dk_mobilenetv2_fpn_backbone",
]

# Detectron2 stage -> indices of timm's block stages (``DKMobileNetV2.blocks``) it holds.
STAGE_BLOCKS: Dict[str, Tuple[int, ...]] = {
    "stem": (0,),
    "res2": (1,),
    "res3": (2,),
    "res4": (3, 4),
    "res5": (5, 6),
}
STAGE_NAMES = tuple(STAGE_BLOCKS)
NORMS = ("BN", "FrozenBN", "SyncBN")
RIGID_TYPE = "rigid_conv"
KERNEL_SIZE = 3  # of every depthwise conv of MobileNet-V2 (the default)


class MobileNetV2Stage(nn.Module):
    """Consecutive timm block stages under their timm names (``blocks.<index>``); the first
    stage also holds timm's stem conv and norm (``conv_stem``, ``bn1``; identities elsewhere).
    [B, C, H, W] -> [B, C', H / s, W / s]."""

    def __init__(
        self, blocks: Dict[int, nn.Module], stem: Optional[Tuple[nn.Module, nn.Module]] = None
    ):
        super().__init__()
        self.conv_stem, self.bn1 = stem if stem is not None else (nn.Identity(), nn.Identity())
        self.blocks = nn.ModuleDict({str(index): block for index, block in blocks.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        for block in self.blocks.values():
            x = block(x)
        return x

    def freeze(self) -> "MobileNetV2Stage":
        """No gradients, and BatchNorm replaced by timm's frozen BatchNorm (statistics fixed, as
        Detectron2's ``CNNBlockBase.freeze``); returns self."""
        for parameter in self.parameters():
            parameter.requires_grad = False
        return freeze_batch_norm_2d(self)


class DKMobileNetV2Backbone(Backbone):
    """MobileNet-V2 with ``dk_type`` depthwise convs in the stages of ``on_per_stage``, as a
    Detectron2 backbone: [B, C_in, H, W] -> {stage: [B, C, H / stride, W / stride]} for
    ``out_features``.

    Args (the config key of each in parentheses, named in every error message):
        width: channel multiplier (MODEL.MOBILENETV2.WIDTH), e.g. 1.0, 0.75, 0.5.
        dk_type: a ``DK_CONV_REGISTRY`` name (MODEL.DK.TYPE).
        on_per_stage: 4 booleans for res2..res5 (MODEL.DK.ON_PER_STAGE).
        dk_options: scope size, rotation groups and clipping, generator, experts (MODEL.DK.*).
        norm: "BN" (trainable BatchNorm), "FrozenBN" or "SyncBN" (MODEL.MOBILENETV2.NORM).
        out_features: stages to return, from stem, res2..res5 (MODEL.MOBILENETV2.OUT_FEATURES);
            the stages after the deepest of them are not built.
        freeze_at: 0 trains everything; n freezes the first n stages (stem, res2, ...)
            (MODEL.BACKBONE.FREEZE_AT), as Detectron2's ResNet.
        in_channels: channels of the input image.
        kernel_size: K of the depthwise convs in the stages that are on, odd
            (MODEL.MOBILENETV2.KERNEL_SIZE); 3 is MobileNet-V2's own, 5 with ``dk_type``
            "rigid_conv" the rigid control with a 5x5 scope's support.
        depthwise_init: how those convs start (MODEL.MOBILENETV2.DEPTHWISE_INIT), one of
            ``DEPTHWISE_INITS``: "msra" or "rigid_pytorch".
    """

    def __init__(
        self,
        *,
        width: float = 1.0,
        dk_type: str = "deform_kernel",
        on_per_stage: Sequence[bool] = (False, True, True, True),
        dk_options: Optional[DKOptions] = None,
        norm: str = "BN",
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        freeze_at: int = 0,
        in_channels: int = 3,
        kernel_size: int = KERNEL_SIZE,
        depthwise_init: str = "msra",
    ):
        super().__init__()
        check_conv_type("MODEL.DK.TYPE", dk_type)
        on_per_stage = check_on_per_stage(on_per_stage)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"MODEL.MOBILENETV2.WIDTH must be a positive number, got {width!r}")
        if norm not in NORMS:
            raise ValueError(f"MODEL.MOBILENETV2.NORM must be one of {NORMS}, got {norm!r}")
        out_features = list(out_features)
        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(
                f"MODEL.MOBILENETV2.OUT_FEATURES must be stages among {list(STAGE_NAMES)}, "
                f"got {out_features!r}"
            )
        if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) \
                or not 0 <= freeze_at <= len(STAGE_NAMES):
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT must be an int in 0-{len(STAGE_NAMES)}, "
                f"got {freeze_at!r}"
            )
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(
                f"MODEL.MOBILENETV2.KERNEL_SIZE must be an odd positive int, got {kernel_size!r}"
            )
        if depthwise_init not in DEPTHWISE_INITS:
            raise ValueError(
                f"MODEL.MOBILENETV2.DEPTHWISE_INIT must be one of {DEPTHWISE_INITS}, "
                f"got {depthwise_init!r}"
            )
        options = dk_options or DKOptions()
        if options.scope_size < kernel_size:
            raise ValueError(f"MODEL.DK.SCOPE_SIZE must be >= the kernel size {kernel_size} of "
                             f"the depthwise convs, got {options.scope_size!r}")
        dk_stages = [
            index
            for stage, on in zip(STAGE_NAMES[1:], on_per_stage) if on
            for index in STAGE_BLOCKS[stage]
        ]
        trunk = DKMobileNetV2(**mobilenetv2_kwargs(
            width,
            dk_type=dk_type,
            dk_stages=dk_stages,
            kernel_size=kernel_size,
            depthwise_init=depthwise_init,
            in_chans=in_channels,
            **dataclasses.asdict(options),
            num_classes=0,
        ))
        ends = {info["module"]: info for info in trunk.feature_info}
        self._out_feature_channels, self._out_feature_strides = {}, {}
        # As Detectron2's ResNet, stages after the deepest one returned are not built (an identity
        # keeps forward one scriptable chain): no computation, and no parameters without
        # gradients for DistributedDataParallel to wait for.
        depth = max(STAGE_NAMES.index(name) for name in out_features) + 1
        self.built_stages = STAGE_NAMES[:depth]
        for stage, indices in STAGE_BLOCKS.items():
            if stage not in self.built_stages:
                self.add_module(stage, nn.Identity())
                continue
            blocks = {index: trunk.blocks[index] for index in indices}
            stem = (trunk.conv_stem, trunk.bn1) if stage == "stem" else None
            self.add_module(stage, MobileNetV2Stage(blocks, stem))
            end = ends[f"blocks.{indices[-1]}"]
            self._out_feature_channels[stage] = end["num_chs"]
            self._out_feature_strides[stage] = end["reduction"]
        if norm == "FrozenBN":
            freeze_batch_norm_2d(self)
        elif norm == "SyncBN":
            for stage in self.built_stages:
                self.add_module(stage, convert_sync_batchnorm(getattr(self, stage)))
        for stage in self.built_stages[:freeze_at]:
            self.add_module(stage, getattr(self, stage).freeze())
        self._out_features = out_features
        # timm block stages whose depthwise convs are dk_type, among those built
        built_blocks = {index for stage in self.built_stages for index in STAGE_BLOCKS[stage]}
        self.dk_stages = tuple(index for index in dk_stages if index in built_blocks)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"DKMobileNetV2Backbone takes [B, C, H, W] inputs, got {x.shape}")
        # Written out for scripting; the stages after the deepest one returned are identities.
        stages = {}
        stages["stem"] = x = self.stem(x)
        stages["res2"] = x = self.res2(x)
        stages["res3"] = x = self.res3(x)
        stages["res4"] = x = self.res4(x)
        stages["res5"] = self.res5(x)
        return {name: stages[name] for name in self._out_features}


def _check_config(cfg) -> None:
    if "DK" not in cfg.MODEL or "MOBILENETV2" not in cfg.MODEL:
        raise KeyError(
            "MODEL.DK / MODEL.MOBILENETV2 are missing from the config: call "
            "dk_detectron2.add_dk_config(cfg) before merging a dk_detectron2 config file"
        )
    if not cfg.MODEL.DK.DEPTHWISE:
        raise ValueError("MODEL.DK.DEPTHWISE must be True with a MobileNet-V2 backbone (its 3x3 "
                         "convs are depthwise), got False")
    if check_conv_type("MODEL.DK.BASE_TYPE", cfg.MODEL.DK.BASE_TYPE) != RIGID_TYPE:
        raise ValueError(
            f"MODEL.DK.BASE_TYPE must be {RIGID_TYPE!r} with a MobileNet-V2 backbone (the stages "
            f"that are off keep timm's rigid depthwise convs), got {cfg.MODEL.DK.BASE_TYPE!r}"
        )


@BACKBONE_REGISTRY.register()
def build_dk_mobilenetv2_backbone(cfg, input_shape: ShapeSpec) -> DKMobileNetV2Backbone:
    """:class:`DKMobileNetV2Backbone` from ``MODEL.MOBILENETV2``, ``MODEL.DK`` and
    ``MODEL.BACKBONE.FREEZE_AT``. Needs :func:`dk_detectron2.add_dk_config`."""
    _check_config(cfg)
    return DKMobileNetV2Backbone(
        width=cfg.MODEL.MOBILENETV2.WIDTH,
        dk_type=cfg.MODEL.DK.TYPE,
        on_per_stage=list(cfg.MODEL.DK.ON_PER_STAGE),
        dk_options=DKOptions.from_config(cfg),
        norm=cfg.MODEL.MOBILENETV2.NORM,
        out_features=cfg.MODEL.MOBILENETV2.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
        kernel_size=cfg.MODEL.MOBILENETV2.KERNEL_SIZE,
        depthwise_init=cfg.MODEL.MOBILENETV2.DEPTHWISE_INIT,
    )


@BACKBONE_REGISTRY.register()
def build_dk_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """detectron2's ``FPN`` (with ``LastLevelMaxPool``) on :func:`build_dk_mobilenetv2_backbone`."""
    return fpn_from_config(cfg, build_dk_mobilenetv2_backbone(cfg, input_shape))
