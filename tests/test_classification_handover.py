"""The hand-over of a classification checkpoint to Detectron2: a timm checkpoint of
``resnet50_dw`` / ``dk_resnet50_dw`` / ``dkdcn_resnet50_dw`` (and the half-width R18 ones) is the
``MODEL.WEIGHTS`` of the matching config, and the Detectron2 backbone loaded from it by
``DKCheckpointer`` computes the timm model's stage outputs (eval mode, 1e-5 relative) on the same
image, normalised by the detector as the classification trainer normalises it.
"""
import copy
import logging
import os

import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import dk_detectron2  # noqa: F401  (registers the models and backbones)
from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import (
    CheckpointMismatchError,
    CheckpointShapeError,
    DKCheckpointer,
    detect_source_format,
)
from dk_detectron2.classification import generator_parameters
from dk_detectron2.modeling.backbone import build_resnet_dk_backbone

from _classification_checkpoints import (
    STAGES,
    assert_stages_match,
    relative_difference,
    save_timm_checkpoint,
    stage_outputs,
    trained_like,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
R50 = "COCO-InstanceSegmentation/mask_rcnn_{}_R_50_FPN_1x_imagenet"
R18 = "shapes/mask_rcnn_{}_R18_FPN_shapes_pretrained"
TOLERANCE = 1e-5  # relative, per stage
SIZE = 64
# model name -> (config, config options): rigid, DK and DK+DCN; R50 (FrozenBN, stem and res2
# frozen) and the embedded job's half-width R18 (BN; DK+DCN also with stem and res2 frozen).
CASES = {
    "resnet50_dw": (R50.format("dw"), []),
    "dk_resnet50_dw": (R50.format("dk"), []),
    "dkdcn_resnet50_dw": (R50.format("dkdcn"), []),
    "resnet18_dw_050": (R18.format("dw"), []),
    "dk_resnet18_dw_050": (R18.format("dk"), []),
    "dkdcn_resnet18_dw_050": (
        R18.format("dk"), ["MODEL.DK.TYPE", "deform_kernel_conv", "MODEL.BACKBONE.FREEZE_AT", 2]
    ),
}


def load_config(name: str, opts=()):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name + ".yaml"))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def timm_model(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return trained_like(timm.create_model(name, num_classes=6, **kwargs), seed=seed).eval()


def an_image(seed: int = 0) -> torch.Tensor:
    """uint8 [3, SIZE, SIZE], RGB."""
    return torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def timm_input(image: torch.Tensor) -> torch.Tensor:
    """The classification trainer's normalisation (timm's ImageNet mean / std) -> [1, 3, H, W]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return ((image.float() / 255 - mean) / std)[None]


@pytest.mark.parametrize("name", list(CASES))
def test_detectron2_backbone_from_a_timm_checkpoint_computes_the_timm_stages(
    name, tmp_path, caplog
):
    classifier = timm_model(name)
    path = save_timm_checkpoint(classifier, tmp_path, arch=name)
    config, opts = CASES[name]
    cfg = load_config(config, opts)
    cfg.MODEL.WEIGHTS = path
    detector = build_model(cfg)
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        DKCheckpointer(detector).load(cfg.MODEL.WEIGHTS)
    log = caplog.text
    # The report: what each stage loaded, and the classifier as not used by the detector.
    for stage in ("stem",) + STAGES:
        assert f"timm checkpoint (arch {name}, epoch 3), {stage}: " in log, (stage, log)
    assert "head.fc.weight [6, " in log and "is not used by the detector" in log
    assert "not used: state_dict_ema" in log
    assert "left as initialised" not in log

    detector.eval()
    image = an_image()
    with torch.no_grad():
        normalised = detector.preprocess_image([{"image": image}]).tensor
        ours = detector.backbone.bottom_up(normalised)
    theirs = stage_outputs(classifier, timm_input(image))
    assert_stages_match(ours, theirs, STAGES, TOLERANCE)
    if name.startswith("dk"):  # the generators were carried over: at zero they would differ
        at_zero = copy.deepcopy(classifier)
        for parameter in generator_parameters(at_zero):
            parameter.data.zero_()
        assert relative_difference(stage_outputs(at_zero, timm_input(image))["res5"],
                                   theirs["res5"]) > 1e-3


def test_plain_state_dict_with_a_ddp_prefix_loads_into_a_bare_backbone(tmp_path):
    classifier = timm_model("dk_resnet18_dw_050", seed=1)
    state_dict = {f"module.{k}": v for k, v in classifier.state_dict().items()}
    path = str(tmp_path / "dk_resnet18_dw_050.pth")
    torch.save(state_dict, path)
    assert detect_source_format({"model": state_dict}) == "timm_dk"
    cfg = load_config(R18.format("dk"))
    backbone = build_resnet_dk_backbone(cfg, ShapeSpec(channels=3))
    DKCheckpointer(backbone).load(path)
    backbone.eval()
    x = timm_input(an_image(1))
    with torch.no_grad():
        ours = backbone(x)
    theirs = stage_outputs(classifier, x)
    assert_stages_match(ours, theirs, STAGES, TOLERANCE)


def test_rigid_checkpoint_into_a_dk_config_computes_the_rigid_model(tmp_path, caplog):
    rigid = timm_model("resnet18_dw_050", seed=2)
    path = save_timm_checkpoint(rigid, tmp_path, arch="resnet18_dw_050")
    cfg = load_config(R18.format("dk"))
    detector = build_model(cfg)
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        DKCheckpointer(detector).load(path)
    assert "rigid kernel(s) converted to DK scopes" in caplog.text
    assert "generator tensor(s) at zero" in caplog.text
    assert "3x3 kernel(s) -> 5x5 DK scopes, exact" in caplog.text
    detector.eval()
    x = timm_input(an_image(2))
    with torch.no_grad():
        ours = detector.backbone.bottom_up(x)
    theirs = stage_outputs(rigid, x)
    assert_stages_match(ours, theirs, STAGES, TOLERANCE)


def _load(config, path, opts=()):
    cfg = load_config(config, opts)
    partial = cfg.MODEL.ALLOW_PARTIAL_WEIGHTS
    DKCheckpointer(build_model(cfg), skip_mismatched=partial).load(path)


def test_checkpoint_of_another_model_raises_naming_the_layer(tmp_path):
    path = save_timm_checkpoint(timm_model("resnet18_dw"), tmp_path / "r18", arch="resnet18_dw")
    with pytest.raises(CheckpointShapeError, match=r"res2\.0\.conv1\.pointwise\.weight.*\[64, 64"):
        _load(R18.format("dw"), path)  # full width into the half-width backbone
    dk = save_timm_checkpoint(timm_model("dk_resnet18_dw_050"), tmp_path / "dk", arch="dk")
    with pytest.raises(CheckpointShapeError, match=r"res3\.0\.conv1\.depthwise\.weight.*5, 5\]"):
        _load(R18.format("dw"), dk)  # DK scopes into rigid 3x3 convs


def test_checkpoint_of_another_scope_size_raises_naming_the_layer(tmp_path):
    path = save_timm_checkpoint(timm_model("dk_resnet18_dw_050"), tmp_path, arch="dk")
    with pytest.raises(CheckpointMismatchError, match=r"SCOPE_SIZE.*res3\.0\.conv1\.depthwise"):
        _load(R18.format("dk"), path, ["MODEL.DK.SCOPE_SIZE", 7])


def test_backbone_tensors_the_checkpoint_lacks_are_never_left_random(tmp_path):
    state_dict = timm_model("dk_resnet18_dw_050").state_dict()
    path = str(tmp_path / "partial.pth")
    torch.save({k: v for k, v in state_dict.items() if not k.startswith("res4.1.")}, path)
    with pytest.raises(CheckpointMismatchError, match=r"left as initialised.*res4\.1\."):
        _load(R18.format("dk"), path)
    _load(R18.format("dk"), path, ["MODEL.ALLOW_PARTIAL_WEIGHTS", True])  # what fits, warned
