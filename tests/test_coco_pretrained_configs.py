"""The COCO configs that start from the model zoo's ImageNet ResNets (``*_dk_c3-c5`` and
``*_dkdcn_c3-c5``, YAML and LazyConfig) mirror Detectron2's configs key for key, keep the DK recipe
in one place, and their LazyConfig twins describe the same model and schedule.

Only configs are read here (cheap); tests/test_coco_pretrained_reproduction.py builds, loads and
trains the models.
"""
import os
import pickle
import re

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import dk_detectron2  # noqa: F401  (registers the DK backbones)
from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import DKCheckpointer
from dk_detectron2.modeling.backbone import resnet_dk_stage_kwargs

from _model_zoo_checkpoints import CHECKPOINTS, COCO_PRETRAINED_CONFIGS, write_model_zoo_pkl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
BASE = os.path.join(CONFIGS, "Base-DK-ImageNet-RCNN-FPN.yaml")
LAZY_COMMON = os.path.join(CONFIGS, "common", "dk_rcnn_fpn_imagenet.py")
RECIPE_KEYS = ("SCOPE_SIZE", "ROTATION_CLIP", "GENERATOR_LR_FACTOR")
# What may differ from the mirrored Detectron2 config: the backbone, and DCN's own keys.
OURS_ONLY = ("MODEL.BACKBONE.NAME", "MODEL.DK.", "MODEL.RESNETS.DEFORM_")


def load_yaml(name: str) -> CfgNode:
    """One of the new configs (``COCO_PRETRAINED_CONFIGS`` key) as a yacs config."""
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name + ".yaml"))
    return cfg


def load_detectron2(path: str) -> CfgNode:
    """A config of Detectron2's model zoo (``Misc/...yaml``), with MODEL.DK added for comparison."""
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(path))
    return cfg


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_config_has_a_yaml_and_a_lazy_config():
    for folder in ("COCO-InstanceSegmentation", "COCO-Detection"):
        for name in os.listdir(os.path.join(CONFIGS, folder)):
            if name.endswith(("_c3-c5.yaml", "_c3-c5.py")):
                assert f"{folder}/{os.path.splitext(name)[0]}" in COCO_PRETRAINED_CONFIGS, name
    for name in COCO_PRETRAINED_CONFIGS:
        for extension in (".yaml", ".py"):
            assert os.path.isfile(os.path.join(CONFIGS, name + extension)), name + extension


@pytest.mark.parametrize("name", list(COCO_PRETRAINED_CONFIGS), ids=os.path.basename)
def test_yaml_config_mirrors_detectron2_key_for_key(name):
    mirrored, _ = COCO_PRETRAINED_CONFIGS[name]
    ours, theirs = _flatten(load_yaml(name)), _flatten(load_detectron2(mirrored))
    differing = {
        key: (ours[key], theirs[key])
        for key in ours
        if ours[key] != theirs[key] and not key.startswith(OURS_ONLY)
    }
    assert not differing, f"{name} differs from Detectron2's {mirrored}: {differing}"
    cfg = load_yaml(name)
    # DK sits exactly where the mirrored DCN config deforms (res3-res5).
    assert list(cfg.MODEL.DK.ON_PER_STAGE) == [False, True, True, True]
    if "dconv" in mirrored:
        assert list(load_detectron2(mirrored).MODEL.RESNETS.DEFORM_ON_PER_STAGE) == list(
            cfg.MODEL.DK.ON_PER_STAGE
        )
    assert not any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)  # DCN is MODEL.DK.TYPE here
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_dk_fpn_backbone"
    assert cfg.MODEL.DK.DEPTHWISE is False and cfg.MODEL.DK.BASE_TYPE == "rigid_conv"
    assert cfg.MODEL.DK.TYPE == ("deform_kernel_conv" if "_dkdcn_" in name else "deform_kernel")
    assert cfg.MODEL.WEIGHTS in CHECKPOINTS  # a model-zoo ImageNet checkpoint
    # The model zoo's freezing: FrozenBN everywhere, stem and res2 frozen.
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2


def test_dk_recipe_is_written_once_for_the_yaml_configs_and_once_for_the_lazy_configs():
    base = load_yaml("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_dk_c3-c5")
    recipe = {key: base.MODEL.DK[key] for key in RECIPE_KEYS}
    assert recipe == {"SCOPE_SIZE": 5, "ROTATION_CLIP": "scope", "GENERATOR_LR_FACTOR": 0.01}
    with open(BASE) as file:
        base_text = file.read()
    with open(LAZY_COMMON) as file:
        lazy_text = file.read()
    for key in RECIPE_KEYS:
        assert len(re.findall(rf"^\s*{key}:", base_text, flags=re.M)) == 1, key
        assert len(re.findall(rf"^{key} = ", lazy_text, flags=re.M)) == 1, key
    for name in COCO_PRETRAINED_CONFIGS:
        cfg = load_yaml(name)
        assert {key: cfg.MODEL.DK[key] for key in RECIPE_KEYS} == recipe, name
        for extension in (".yaml", ".py"):
            with open(os.path.join(CONFIGS, name + extension)) as file:
                text = file.read()
            for word in RECIPE_KEYS + ("scope_size", "rotation_clip", "generator_lr_factor"):
                assert word not in text, f"{name}{extension} sets {word} itself"


def _lazy_matches_yaml(lazy, cfg):
    """Everything the yacs config decides, read from the LazyConfig; returns the mismatches."""
    stages = lazy.model.backbone.bottom_up.stages
    yaml_stages = resnet_dk_stage_kwargs(cfg)
    options = stages.dk_options
    got = {
        **{key: stages[key] for key in ("depth", "on_per_stage", "dk_type", "base_type",
                                        "depthwise", "norm", "num_groups", "width_per_group",
                                        "stride_in_1x1")},
        "scope_size": options.scope_size,
        "rotation_clip": options.rotation_clip,
        "rotation_groups": options.rotation_groups,
        "generator_lr_factor": lazy.optimizer.params.generator_lr_factor,
        "freeze_at": lazy.model.backbone.bottom_up.freeze_at,
        "pixel_mean": list(lazy.model.pixel_mean),
        "pixel_std": list(lazy.model.pixel_std),
        "mask_on": lazy.model.roi_heads.get("mask_head") is not None,
        "use_instance_mask": lazy.dataloader.train.mapper.use_instance_mask,
        "weights": lazy.train.init_checkpoint,
        "max_iter": lazy.train.max_iter,
        "steps": list(lazy.lr_multiplier.scheduler.milestones[:2]),
        "warmup_iters": round(lazy.lr_multiplier.warmup_length * lazy.train.max_iter),
        "lr": lazy.optimizer.lr,
        "momentum": lazy.optimizer.momentum,
        "weight_decay": lazy.optimizer.weight_decay,
        "batch": lazy.dataloader.train.total_batch_size,
        "min_size_train": list(lazy.dataloader.train.mapper.augmentations[0].short_edge_length),
        "max_size_train": lazy.dataloader.train.mapper.augmentations[0].max_size,
    }
    expected = {
        **{key: yaml_stages[key] for key in ("depth", "on_per_stage", "dk_type", "base_type",
                                             "depthwise", "norm", "num_groups",
                                             "width_per_group", "stride_in_1x1")},
        "scope_size": cfg.MODEL.DK.SCOPE_SIZE,
        "rotation_clip": cfg.MODEL.DK.ROTATION_CLIP,
        "rotation_groups": cfg.MODEL.DK.ROTATION_GROUPS,
        "generator_lr_factor": cfg.MODEL.DK.GENERATOR_LR_FACTOR,
        "freeze_at": cfg.MODEL.BACKBONE.FREEZE_AT,
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "mask_on": cfg.MODEL.MASK_ON,
        "use_instance_mask": cfg.MODEL.MASK_ON,
        "weights": cfg.MODEL.WEIGHTS,
        "max_iter": cfg.SOLVER.MAX_ITER,
        "steps": list(cfg.SOLVER.STEPS),
        "warmup_iters": cfg.SOLVER.WARMUP_ITERS,
        "lr": cfg.SOLVER.BASE_LR,
        "momentum": cfg.SOLVER.MOMENTUM,
        "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
        "max_size_train": cfg.INPUT.MAX_SIZE_TRAIN,
    }
    return {key: (got[key], expected[key]) for key in expected if got[key] != expected[key]}


@pytest.mark.parametrize("name", list(COCO_PRETRAINED_CONFIGS), ids=os.path.basename)
def test_lazy_config_is_the_twin_of_its_yaml(name):
    lazy = LazyConfig.load(os.path.join(CONFIGS, name + ".py"))
    assert set(lazy) == {"model", "dataloader", "optimizer", "lr_multiplier", "train"}
    mismatches = _lazy_matches_yaml(lazy, load_yaml(name))
    assert not mismatches, f"{name}.py vs .yaml (LazyConfig, YAML): {mismatches}"


def _one_lazy_training_step(model, lazy):
    lazy.optimizer.params.model = model
    optimizer = instantiate(lazy.optimizer)
    size = 64
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 40.0, 50.0]]))
    instances.gt_classes = torch.tensor([3])
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 10:50, 8:40] = True
    instances.gt_masks = BitMasks(mask)
    model.train()
    with EventStorage(0):
        losses = model([{"image": image, "height": size, "width": size, "instances": instances}])
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return losses


@pytest.mark.parametrize(
    "name",
    ["COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_dk_c3-c5",
     "COCO-Detection/faster_rcnn_R_50_FPN_1x_dkdcn_c3-c5"],
    ids=os.path.basename,
)
def test_lazy_config_builds_the_yaml_model_loads_the_model_zoo_pkl_and_trains(name, tmp_path):
    lazy = LazyConfig.load(os.path.join(CONFIGS, name + ".py"))
    lazy.model.proposal_generator.post_nms_topk = (64, 64)
    lazy.model.roi_heads.batch_size_per_image = 32
    model = instantiate(lazy.model)
    cfg = load_yaml(name)
    cfg.MODEL.DEVICE = "cpu"
    reference = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
    weights = write_model_zoo_pkl(tmp_path / "R-50.pkl", **CHECKPOINTS[lazy.train.init_checkpoint])
    DKCheckpointer(model).load(weights)  # the one change to lazyconfig_train_net.py
    with open(weights, "rb") as file:
        kernel = torch.as_tensor(pickle.load(file)["res3_0_branch2b_w"])
    scope = model.backbone.bottom_up.res3[0].conv2.weight.detach()
    assert torch.equal(scope[..., 1:4, 1:4], kernel)  # S 5: the kernel at the scope's centre
    assert not scope[..., 0, :].any() and not scope[..., :, 4].any()
    losses = _one_lazy_training_step(model, lazy)
    assert ("loss_mask" in losses) == ("mask_rcnn" in name)
