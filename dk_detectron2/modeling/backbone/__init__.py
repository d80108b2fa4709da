"""DK ResNet backbones, registered in detectron2's ``BACKBONE_REGISTRY`` on import."""

from .resnet_dk import (  # noqa: F401
    DKBasicBlock,
    DKBottleneckBlock,
    SeparableConv,
    build_resnet_dk_backbone,
    build_resnet_dk_fpn_backbone,
    make_resnet_dk_stages,
    resnet_dk_stage_kwargs,
)
