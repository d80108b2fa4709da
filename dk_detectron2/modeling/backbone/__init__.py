"""DK ResNet and MobileNet-V2 backbones, registered in detectron2's ``BACKBONE_REGISTRY`` on
import."""

from .mobilenetv2_dk import (  # noqa: F401
    DKMobileNetV2Backbone,
    build_dk_mobilenetv2_backbone,
    build_dk_mobilenetv2_fpn_backbone,
)
from .resnet_dk import (  # noqa: F401
    DKBasicBlock,
    DKBottleneckBlock,
    SeparableConv,
    build_resnet_dk_backbone,
    check_conv_type,
    build_resnet_dk_fpn_backbone,
    make_resnet_dk_stages,
    resnet_dk_stage_kwargs,
)
