"""The MobileNet-V2 backbones: stages, strides and channels, MODEL.DK placement, norms and
freezing, errors that name the config key, a Mask R-CNN training step, the hand-over of a
classification checkpoint (the detector's backbone computes the timm model's stages), and
TorchScript / torch.export of the backbone."""
import logging
import os

import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.utils.events import EventStorage
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d
from torch import nn

import dk_detectron2  # noqa: F401  (registers the backbones and models)
from dk_detectron2 import add_dk_config
from dk_detectron2.checkpoint import DKCheckpointer
from dk_detectron2.layers import CondConv2d, DeformKernel2d
from dk_detectron2.modeling.backbone import DKMobileNetV2Backbone

from _classification_checkpoints import assert_stages_match, save_timm_checkpoint, trained_like
from _export_models import with_random_generators
from _training_inputs import two_training_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/shapes/mask_rcnn_{}_MNV2_FPN_shapes_pretrained.yaml")
INPUT = ShapeSpec(channels=3)
STAGES = ("res2", "res3", "res4", "res5")
# Detectron2 stage -> the timm block stage it ends with (stride 4, 8, 16, 32).
STAGE_ENDS = {"res2": 1, "res3": 2, "res4": 4, "res5": 6}
TOLERANCE = 1e-5  # relative, per stage


def _cfg(**dk):
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_dk_mobilenetv2_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.MOBILENETV2.WIDTH = 0.5
    cfg.MODEL.MOBILENETV2.NORM = "BN"
    for key, value in dk.items():
        setattr(cfg.MODEL.DK, key, value)
    return cfg


def _load_config(variant: str, opts=()):
    """The shapes pipeline config of the rigid ("dw") or DK ("dk") MobileNet-V2 detector, with
    config ``opts`` (key, value, ...)."""
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(CONFIG.format(variant))
    cfg.merge_from_list(list(opts))
    return cfg


def _depthwise_convs(backbone):
    """timm block stage index -> the depthwise convs of its blocks."""
    convs = {}
    for stage in ("stem",) + STAGES:
        for index, blocks in getattr(backbone, stage).blocks.items():
            convs[int(index)] = [block.conv_dw for block in blocks]
    return convs


def test_backbones_are_registered():
    assert "build_dk_mobilenetv2_backbone" in BACKBONE_REGISTRY
    assert "build_dk_mobilenetv2_fpn_backbone" in BACKBONE_REGISTRY


def test_stages_strides_channels_and_gradients():
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(), INPUT)
    shapes = backbone.output_shape()
    # MobileNet-V2's 24, 32, 96, 320 channels at width 0.5, rounded to multiples of 8.
    expected = {"res2": (16, 4), "res3": (16, 8), "res4": (48, 16), "res5": (160, 32)}
    assert {stage: (s.channels, s.stride) for stage, s in shapes.items()} == expected
    x = torch.randn(2, 3, 64, 64)
    features = backbone(x)
    assert list(features) == list(STAGES)
    for stage in STAGES:
        stride = shapes[stage].stride
        assert features[stage].shape == (2, shapes[stage].channels, 64 // stride, 64 // stride)
    sum(f.square().sum() for f in features.values()).backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert backbone.res5.blocks["6"][0].conv_dw.rotation_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "on_per_stage, dk_type, cls, dk_blocks",
    [
        ([False, True, True, True], "deform_kernel", DeformKernel2d, {2, 3, 4, 5, 6}),
        ([True, False, True, False], "deform_kernel", DeformKernel2d, {1, 3, 4}),
        ([False, False, False, True], "cond_conv", CondConv2d, {5, 6}),
    ],
)
def test_on_per_stage_places_the_type_in_the_stages_that_are_on(on_per_stage, dk_type, cls,
                                                                  dk_blocks):
    backbone = build_backbone(_cfg(ON_PER_STAGE=on_per_stage, TYPE=dk_type), INPUT)
    assert backbone.dk_stages == tuple(sorted(dk_blocks))
    convs = _depthwise_convs(backbone)
    assert sorted(convs) == list(range(7))
    for index, stage_convs in convs.items():
        expected = cls if index in dk_blocks else nn.Conv2d
        assert {type(conv) for conv in stage_convs} == {expected}, index
        assert all(conv.groups == conv.in_channels for conv in stage_convs), index  # depthwise


def test_norms_and_freezing():
    cfg = _cfg()
    cfg.MODEL.MOBILENETV2.NORM = "FrozenBN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    backbone = build_backbone(cfg, INPUT)
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not norms
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in backbone.modules())
    for name, parameter in backbone.named_parameters():
        assert parameter.requires_grad == (not name.startswith(("stem.", "res2."))), name

    cfg = _cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 1
    backbone = build_backbone(cfg, INPUT)
    assert isinstance(backbone.stem.bn1, FrozenBatchNormAct2d)  # frozen stage: frozen norms
    assert isinstance(backbone.res2.blocks["1"][0].bn1, BatchNormAct2d)  # others train theirs
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert all(p.requires_grad for p in backbone.res2.parameters())

    cfg = _cfg()
    cfg.MODEL.MOBILENETV2.NORM = "SyncBN"
    backbone = build_backbone(cfg, INPUT)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())


def test_out_features_choose_the_stages_returned():
    cfg = _cfg()
    cfg.MODEL.MOBILENETV2.OUT_FEATURES = ["stem", "res3"]
    backbone = build_backbone(cfg, INPUT)
    assert sorted(backbone.output_shape()) == ["res3", "stem"]
    features = backbone(torch.randn(2, 3, 32, 32))
    assert list(features) == ["stem", "res3"]
    assert features["stem"].shape[-1] == 16 and features["res3"].shape[-1] == 4
    # The stages after res3 are not built: no parameters to train, and the stages that are built
    # compute what the full backbone's do with the same weights.
    assert backbone.built_stages == ("stem", "res2", "res3")
    assert not list(backbone.res4.parameters()) and not list(backbone.res5.parameters())
    assert backbone.dk_stages == (2,)  # res3 (timm block stage 2); res2 is off by default
    cfg.MODEL.MOBILENETV2.OUT_FEATURES = list(STAGES)
    full = build_backbone(cfg, INPUT).eval()
    missing, unexpected = backbone.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(("res4.", "res5.")) for k in unexpected)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x)["res3"], full(x)["res3"])
    cfg.MODEL.BACKBONE.FREEZE_AT = 5  # freezing counts the stages built
    cfg.MODEL.MOBILENETV2.OUT_FEATURES = ["res2"]
    frozen = build_backbone(cfg, INPUT)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("DK", "TYPE", "deformable_kernel"),
        ("DK", "BASE_TYPE", "deform_kernel"),
        ("DK", "DEPTHWISE", False),
        ("DK", "ON_PER_STAGE", [True, True, True]),
        ("DK", "SCOPE_SIZE", 2),
        ("MOBILENETV2", "WIDTH", 0.0),
        ("MOBILENETV2", "NORM", "GN"),
        ("MOBILENETV2", "OUT_FEATURES", ["res6"]),
        ("MOBILENETV2", "KERNEL_SIZE", 4),
        ("MOBILENETV2", "DEPTHWISE_INIT", "timm"),
        ("BACKBONE", "FREEZE_AT", 6),
    ],
)
def test_bad_config_fails_at_build_naming_the_key(section, key, value):
    cfg = _cfg()
    setattr(getattr(cfg.MODEL, section), key, value)
    with pytest.raises(ValueError, match=rf"MODEL\.{section}\.{key}"):
        build_backbone(cfg, INPUT)


@pytest.mark.parametrize("depthwise_init", ["msra", "rigid_pytorch"])
def test_depthwise_init_reaches_the_trunk(depthwise_init):
    """MODEL.MOBILENETV2.DEPTHWISE_INIT is the trunk's ``depthwise_init``: with "msra" (the default)
    the rigid depthwise convs of the stages that are on start at c2_msra_fill's std, sqrt(2 / 9C)."""
    cfg = _cfg(TYPE="rigid_conv")
    assert cfg.MODEL.MOBILENETV2.DEPTHWISE_INIT == "msra"
    cfg.MODEL.MOBILENETV2.DEPTHWISE_INIT = depthwise_init
    torch.manual_seed(0)
    backbone = build_backbone(cfg, INPUT)
    # the registry's rigid convs (Detectron2's Conv2d) replaced timm's (nn.Conv2d) where DK is on
    convs = [m for m in backbone.modules() if isinstance(m, Conv2d) and m.groups == m.in_channels]
    assert convs
    ratios = [float(c.weight.std()) / ((2.0 / (9 * c.out_channels)) ** 0.5) for c in convs]
    mean_ratio = sum(ratios) / len(ratios)
    if depthwise_init == "msra":
        assert mean_ratio == pytest.approx(1, abs=0.1), ratios
    else:
        assert mean_ratio > 3, ratios


def test_missing_config_section_and_bad_input():
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_dk_mobilenetv2_backbone"
    with pytest.raises(KeyError, match="add_dk_config"):
        build_backbone(cfg, INPUT)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*\[3, 32, 32\]"):
        DKMobileNetV2Backbone(width=0.5)(torch.randn(3, 32, 32))


@pytest.mark.parametrize("variant", ["dw", "dk"])
def test_mask_rcnn_training_step(variant):
    torch.manual_seed(0)
    model = build_model(_load_config(variant))
    model.train()
    with EventStorage():
        losses = model(two_training_images())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.bottom_up.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def _timm_stages(model, x):
    """res2..res5 of a timm MobileNet-V2 on x: its stem, then the block stages, read where each
    Detectron2 stage ends."""
    outputs = {}
    x = model.bn1(model.conv_stem(x))
    for index, stage in enumerate(model.blocks):
        x = stage(x)
        for name, end in STAGE_ENDS.items():
            if end == index:
                outputs[name] = x
    return outputs


# classification model (name, kwargs) -> the detection config it is handed to, and its options
HANDOVER_CASES = {
    "dk_mobilenetv2_050": ({}, "dk", []),
    "dk_mobilenetv2_050 rigid_conv": ({"dk_type": "rigid_conv"}, "dw", []),
    "mobilenetv2_050": ({}, "dw", []),  # timm's own
    # the rigid 5x5 control and CondConv of the classification study
    "dk_mobilenetv2_050 rigid_conv 5x5": (
        {"dk_type": "rigid_conv", "kernel_size": 5}, "dw", ["MODEL.MOBILENETV2.KERNEL_SIZE", 5]
    ),
    "dk_mobilenetv2_050 cond_conv": (
        {"dk_type": "cond_conv", "num_experts": 3}, "dw",
        ["MODEL.DK.TYPE", "cond_conv", "MODEL.DK.NUM_EXPERTS", 3],
    ),
}


@pytest.mark.parametrize("case", list(HANDOVER_CASES))
def test_the_detector_backbone_from_a_classification_checkpoint_computes_its_stages(
    case, tmp_path, caplog
):
    arch = case.split()[0]
    kwargs, variant, opts = HANDOVER_CASES[case]
    torch.manual_seed(0)
    classifier = trained_like(timm.create_model(arch, num_classes=6, **kwargs)).eval()
    path = save_timm_checkpoint(classifier, tmp_path, arch=arch)
    detector = build_model(_load_config(variant, opts))
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        DKCheckpointer(detector).load(path)
    log = caplog.text
    for stage in ("stem",) + STAGES:
        assert f"timm checkpoint (arch {arch}, epoch 3), {stage}: " in log, (stage, log)
    assert "classifier.weight [6, " in log and "is not used by the detector" in log
    assert "left as initialised" not in log and "not used by the detector: " not in log
    if variant == "dk":
        assert "res5: 80 tensor(s) loaded (4 DK scope(s), 8 generator tensor(s) as trained)" in log
    backbone = detector.backbone.bottom_up.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_stages_match(backbone(x), _timm_stages(classifier, x), STAGES, TOLERANCE)


def test_a_rigid_checkpoint_into_the_dk_config_computes_the_rigid_model(tmp_path, caplog):
    torch.manual_seed(0)
    rigid = trained_like(timm.create_model("mobilenetv2_050", num_classes=6)).eval()
    path = save_timm_checkpoint(rigid, tmp_path, arch="mobilenetv2_050")
    detector = build_model(_load_config("dk"))
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        DKCheckpointer(detector).load(path)
    assert "3x3 kernel(s) -> 5x5 DK scopes, exact" in caplog.text
    assert "generator tensor(s) at zero" in caplog.text
    backbone = detector.backbone.bottom_up.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_stages_match(backbone(x), _timm_stages(rigid, x), STAGES, TOLERANCE)


def test_scripted_and_exported_backbone_equal_eager(tmp_path):
    """Deployment: TorchScript (saved and reloaded) and torch.export of the DK backbone run the
    DK operator and compute the eager features."""
    torch.manual_seed(0)
    backbone = with_random_generators(DKMobileNetV2Backbone(width=0.5, norm="BN"), std=0.05)
    path = str(tmp_path / "backbone.ts")
    torch.jit.script(backbone).save(path)
    scripted = torch.jit.load(path)
    assert "dk_detectron2::deform_kernel2d" in str(scripted.inlined_graph)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    exported = torch.export.export(backbone, (x,)).module()
    with torch.no_grad():
        expected = backbone(x)
        assert_stages_match(scripted(x), expected, STAGES, TOLERANCE)
        assert_stages_match(exported(x), expected, STAGES, TOLERANCE)
