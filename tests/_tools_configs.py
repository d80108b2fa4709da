"""A tiny DK Mask R-CNN config (random init, 64 px) for the tools' tests."""

import os

from detectron2 import model_zoo
from detectron2.config import get_cfg

from dk_detectron2.config import add_dk_config


def tiny_dk_config(directory, dk_type="deform_kernel", fpn=True):
    """Writes ``<directory>/tiny_<dk_type>.yaml`` (a complete dumped config); returns its path."""
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_fpn_backbone" if fpn else "build_resnet_dk_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.DK.TYPE = dk_type
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATASETS.TRAIN = ("dk_shapes_train",)
    cfg.DATASETS.TEST = ("dk_shapes_val",)
    path = os.path.join(str(directory), f"tiny_{dk_type}.yaml")
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path
