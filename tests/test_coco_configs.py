"""Every COCO config (and the LazyConfig) builds a Mask R-CNN that does one training step.

The models are the configs' own (R50-FPN, GroupNorm, full width); only the image size, the
sampling sizes and the batch are made small so a step takes seconds on the CPU.
"""

import glob
import os

import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import dk_detectron2  # noqa: F401
from dk_detectron2 import add_dk_config
from dk_detectron2.engine import DKTrainer
from _training_inputs import two_training_images
from dk_detectron2.layers import (
    CondConv2d,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    LearntOffsetDeformConv2d,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(ROOT, "configs", "COCO-InstanceSegmentation")
CONV2_OF_RES4 = {
    "dw": "Conv2d",
    "gdk": GlobalDeformKernel2d.__name__,
    "dk": DeformKernel2d.__name__,
    "dkdcn": DeformKernelConv2d.__name__,
    "dcn": LearntOffsetDeformConv2d.__name__,
    "scc": CondConv2d.__name__,
}
SIZE = 64


def _config_files():
    return sorted(f for f in glob.glob(os.path.join(COCO, "mask_rcnn_*_R_50_FPN_scratch_3x.yaml")))


def _load(path):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def _one_step(model, optimizer):
    model.train()
    with EventStorage(0):
        losses = model(two_training_images(SIZE))
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any("backbone.bottom_up.res4" in n for n in changed)
    assert any("roi_heads.mask_head" in n for n in changed)
    return losses


def test_every_variant_has_a_config():
    names = [os.path.basename(f).split("_")[2] for f in _config_files()]
    assert sorted(names) == sorted(CONV2_OF_RES4)


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_coco_config_builds_mask_rcnn_and_trains_one_step(path):
    cfg = _load(path)
    # What the file promises: from-scratch Mask R-CNN, DK R50-FPN, GroupNorm, long schedule.
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.MASK_ON
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_dk_fpn_backbone"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.NORM == "GN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.SOLVER.MAX_ITER == 270000
    # Small enough for a CPU test.
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TRAIN = (SIZE,)
    cfg.INPUT.MAX_SIZE_TRAIN = SIZE
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.SOLVER.IMS_PER_BATCH = 2
    torch.manual_seed(0)
    model = build_model(cfg)
    short = os.path.basename(path).split("_")[2]
    assert type(model.backbone.bottom_up.res4[0].conv2).__name__ == CONV2_OF_RES4[short]
    assert type(model.backbone.bottom_up.res2[0].conv2).__name__ == "Conv2d"
    assert model.backbone.bottom_up.res4[0].conv2.groups == 256  # depthwise
    _one_step(model, DKTrainer.build_optimizer(cfg, model))


def test_lazy_config_builds_the_dk_mask_rcnn_and_trains_one_step():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "mask_rcnn_dk_R_50_FPN_scratch_3x.py"))
    assert cfg.train.init_checkpoint == ""
    cfg.model.proposal_generator.post_nms_topk = (64, 64)
    cfg.model.roi_heads.batch_size_per_image = 32
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert isinstance(model.backbone.bottom_up.res4[0].conv2, DeformKernel2d)
    assert model.backbone.bottom_up.res4[0].conv2.scope_size == (5, 5)
    assert model.backbone.bottom_up.res4[0].conv2.rotation_clip.mode == "scope"
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    lr = {p: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    conv2 = model.backbone.bottom_up.res4[0].conv2
    assert lr[conv2.rotation_conv.weight] == pytest.approx(0.01 * lr[conv2.weight])
    _one_step(model, optimizer)
