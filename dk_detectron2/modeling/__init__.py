"""Detectron2 model pieces of dk_detectron2 (importing registers the DK backbones)."""

from .backbone import (  # noqa: F401
    build_resnet_dk_backbone,
    build_resnet_dk_fpn_backbone,
    make_resnet_dk_stages,
)
