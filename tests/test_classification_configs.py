"""The configs that start from a classification checkpoint: the COCO ones
(``mask_rcnn_{dw,dk,dkdcn}_R_50_FPN_1x_imagenet``, YAML and LazyConfig) and the embedded job's
(``shapes/mask_rcnn_{dw,dk}_R18_FPN_shapes_pretrained``). Each builds the backbone of its timm
model (same names and shapes), normalises the input as the classification trainer does, and loads
a timm checkpoint with the per-stage report; the LazyConfig twins describe the same model.
"""
import logging
import os

import pytest
import timm
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from timm.data import resolve_data_config

import dk_detectron2  # noqa: F401
from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import DKCheckpointer
from dk_detectron2.modeling.backbone import build_resnet_dk_backbone, resnet_dk_stage_kwargs

from _classification_checkpoints import save_timm_checkpoint, trained_like
from _training_inputs import two_training_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# config (relative to configs/, no extension) -> the timm model whose checkpoint it starts from
COCO = {
    "COCO-InstanceSegmentation/mask_rcnn_dw_R_50_FPN_1x_imagenet": "resnet50_dw",
    "COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN_1x_imagenet": "dk_resnet50_dw",
    "COCO-InstanceSegmentation/mask_rcnn_dkdcn_R_50_FPN_1x_imagenet": "dkdcn_resnet50_dw",
}
SHAPES = {
    "shapes/mask_rcnn_dw_R18_FPN_shapes_pretrained": "resnet18_dw_050",
    "shapes/mask_rcnn_dk_R18_FPN_shapes_pretrained": "dk_resnet18_dw_050",
}
TYPES = {"dw": "rigid_conv", "dk": "deform_kernel", "dkdcn": "deform_kernel_conv"}


def load_yaml(name: str):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name + ".yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _variant(name: str) -> str:
    return os.path.basename(name).split("_")[2]


def _backbone_shapes(module: torch.nn.Module, prefix: str = "") -> dict:
    """name -> shape of the ResNet's tensors, without BatchNorm's counters and the classifier."""
    return {
        name[len(prefix):]: tuple(value.shape)
        for name, value in module.state_dict().items()
        if name.startswith(prefix) and not name.endswith("num_batches_tracked")
        and not name.startswith("head.")
    }


@pytest.mark.parametrize("name", list(COCO) + list(SHAPES), ids=os.path.basename)
def test_yaml_config_builds_its_timm_models_backbone_and_input(name):
    arch = {**COCO, **SHAPES}[name]
    cfg = load_yaml(name)
    assert arch in cfg.MODEL.WEIGHTS and cfg.MODEL.WEIGHTS.endswith("model_best.pth.tar")
    assert cfg.MODEL.DK.TYPE == TYPES[_variant(name)]
    assert cfg.MODEL.DK.DEPTHWISE and list(cfg.MODEL.DK.ON_PER_STAGE) == [False, True, True, True]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    # The pixels the classification trainer feeds: RGB, timm's ImageNet mean / std x 255.
    data = resolve_data_config({}, model=timm.create_model(arch))
    assert cfg.INPUT.FORMAT == "RGB"
    torch.testing.assert_close(list(cfg.MODEL.PIXEL_MEAN), [255 * v for v in data["mean"]])
    torch.testing.assert_close(list(cfg.MODEL.PIXEL_STD), [255 * v for v in data["std"]])
    # Same tensors, names and shapes as the timm model (so nothing is left random on load).
    backbone = build_resnet_dk_backbone(cfg, ShapeSpec(channels=3))
    assert _backbone_shapes(backbone) == _backbone_shapes(timm.create_model(arch))


def test_coco_configs_are_detectron2s_1x_mask_rcnn_with_frozen_pretrained_bn():
    for name in COCO:
        cfg = load_yaml(name)
        assert cfg.MODEL.MASK_ON and cfg.MODEL.RESNETS.DEPTH == 50
        assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))
        assert (cfg.MODEL.DK.SCOPE_SIZE, cfg.MODEL.DK.ROTATION_CLIP) == (5, "scope")
        assert cfg.MODEL.DK.GENERATOR_LR_FACTOR == 0.01


@pytest.mark.parametrize("name", list(SHAPES), ids=os.path.basename)
def test_shapes_pretrained_config_differs_from_its_scratch_twin_only_in_what_the_checkpoint_needs(
    name,
):
    ours = load_yaml(name)
    scratch = load_yaml(name.replace("_pretrained", ""))
    # The same normalisation as the scratch config's (BGR there), in RGB order.
    assert list(ours.MODEL.PIXEL_MEAN) == list(reversed(scratch.MODEL.PIXEL_MEAN))
    assert list(ours.MODEL.PIXEL_STD) == list(reversed(scratch.MODEL.PIXEL_STD))
    differing = ("MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT",
                 "OUTPUT_DIR", "MODEL.RESNETS.STRIDE_IN_1X1")
    for key in differing:
        node_ours, node_scratch = ours, scratch
        for part in key.split(".")[:-1]:
            node_ours, node_scratch = node_ours[part], node_scratch[part]
        node_scratch[key.split(".")[-1]] = node_ours[key.split(".")[-1]]
    assert ours == scratch


def _lazy_vs_yaml(lazy, cfg) -> dict:
    """What the YAML config decides, read from the LazyConfig; returns the mismatches."""
    stages = lazy.model.backbone.bottom_up.stages
    options = stages.dk_options
    yaml_stages = resnet_dk_stage_kwargs(cfg)
    keys = ("depth", "on_per_stage", "dk_type", "base_type", "depthwise", "norm", "num_groups",
            "width_per_group", "stride_in_1x1")
    got = {
        **{key: stages[key] for key in keys},
        "scope_size": options.scope_size,
        "rotation_clip": options.rotation_clip,
        "generator_lr_factor": lazy.optimizer.params.generator_lr_factor,
        "stem_norm": lazy.model.backbone.bottom_up.stem.norm,
        "freeze_at": lazy.model.backbone.bottom_up.freeze_at,
        "input_format": lazy.model.input_format,
        "train_format": lazy.dataloader.train.mapper.image_format,
        "pixel_mean": list(lazy.model.pixel_mean),
        "pixel_std": list(lazy.model.pixel_std),
        "weights": lazy.train.init_checkpoint,
        "max_iter": lazy.train.max_iter,
        "steps": list(lazy.lr_multiplier.scheduler.milestones[:2]),
        "lr": lazy.optimizer.lr,
        "batch": lazy.dataloader.train.total_batch_size,
    }
    expected = {
        **{key: yaml_stages[key] for key in keys},
        "scope_size": cfg.MODEL.DK.SCOPE_SIZE,
        "rotation_clip": cfg.MODEL.DK.ROTATION_CLIP,
        "generator_lr_factor": cfg.MODEL.DK.GENERATOR_LR_FACTOR,
        "stem_norm": cfg.MODEL.RESNETS.NORM,
        "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        "input_format": cfg.INPUT.FORMAT,
        "train_format": cfg.INPUT.FORMAT,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "weights": cfg.MODEL.WEIGHTS,
        "max_iter": cfg.SOLVER.MAX_ITER,
        "steps": list(cfg.SOLVER.STEPS),
        "lr": cfg.SOLVER.BASE_LR,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
    }
    return {key: (got[key], expected[key]) for key in expected if got[key] != expected[key]}


@pytest.mark.parametrize("name", list(COCO), ids=os.path.basename)
def test_lazy_config_is_the_twin_of_its_yaml(name):
    lazy = LazyConfig.load(os.path.join(CONFIGS, name + ".py"))
    assert set(lazy) == {"model", "dataloader", "optimizer", "lr_multiplier", "train"}
    assert lazy.dataloader.test.mapper.image_format == "RGB"
    mismatches = _lazy_vs_yaml(lazy, load_yaml(name))
    assert not mismatches, f"{name}.py vs .yaml (LazyConfig, YAML): {mismatches}"


def test_lazy_config_builds_the_yaml_model_loads_a_timm_checkpoint_and_trains(tmp_path, caplog):
    name = "COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN_1x_imagenet"
    lazy = LazyConfig.load(os.path.join(CONFIGS, name + ".py"))
    lazy.model.proposal_generator.post_nms_topk = (64, 64)
    lazy.model.roi_heads.batch_size_per_image = 32
    model = instantiate(lazy.model)
    reference = {k: tuple(v.shape) for k, v in build_model(load_yaml(name)).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
    classifier = trained_like(timm.create_model("dk_resnet50_dw", num_classes=10))
    path = save_timm_checkpoint(classifier, tmp_path, arch="dk_resnet50_dw")
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        DKCheckpointer(model).load(path)  # in place of lazyconfig_train_net.py's checkpointer
    assert "res5: 56 tensor(s) loaded (3 DK scope(s), 6 generator tensor(s) as trained)" in (
        caplog.text
    )
    assert "head.fc.weight [10, 2048]" in caplog.text
    loaded = model.backbone.bottom_up.res4[2].conv2.rotation_conv.weight
    assert torch.equal(loaded, classifier.res4[2].conv2.rotation_conv.weight)
    lazy.optimizer.params.model = model
    optimizer = instantiate(lazy.optimizer)
    model.train()
    with EventStorage(0):
        losses = model(two_training_images(64))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
