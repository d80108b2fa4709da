"""The DK ResNet / ResNet-FPN backbones (CPU, narrow widths, tiny images)."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import build_resnet_backbone

import dk_detectron2  # noqa: F401  (registers the backbones)
from dk_detectron2 import add_dk_config
from dk_detectron2.layers import CondConv2d, DeformKernel2d, GlobalDeformKernel2d
from dk_detectron2.modeling.backbone import DKBasicBlock, DKBottleneckBlock, SeparableConv

INPUT = ShapeSpec(channels=3)


def _cfg(depth=50, **dk):
    """A narrow ResNet (fast on the CPU) with MODEL.DK overrides."""
    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16 if depth >= 50 else 8
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    for key, value in dk.items():
        setattr(cfg.MODEL.DK, key, value)
    return cfg


def test_backbones_are_registered():
    assert "build_resnet_dk_backbone" in BACKBONE_REGISTRY
    assert "build_resnet_dk_fpn_backbone" in BACKBONE_REGISTRY


def test_dk_r50_uses_the_type_in_the_stages_that_are_on():
    cfg = _cfg(ON_PER_STAGE=[False, True, False, True], TYPE="global_deform_kernel", SCOPE_SIZE=5)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_backbone"
    backbone = build_backbone(cfg, INPUT)
    expected = {
        "res2": Conv2d,
        "res3": GlobalDeformKernel2d,
        "res4": Conv2d,
        "res5": GlobalDeformKernel2d,
    }
    for stage, cls in expected.items():
        for block in getattr(backbone, stage):
            assert isinstance(block, DKBottleneckBlock)
            assert type(block.conv2) is cls, stage
            channels = block.conv2.in_channels
            assert block.conv2.groups == channels  # depthwise
            if cls is GlobalDeformKernel2d:
                assert block.conv2.scope_size == (5, 5)
    assert backbone.res3[0].conv2.stride == (2, 2)  # stride in the 3x3 conv (STRIDE_IN_1X1 False)
    assert backbone.res3[0].conv1.stride == (1, 1)
    x = torch.randn(2, 3, 64, 64)
    features = backbone(x)
    shapes = backbone.output_shape()
    for name, stride in (("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)):
        assert shapes[name].stride == stride
        assert features[name].shape == (2, shapes[name].channels, 64 // stride, 64 // stride)
    sum(f.sum() for f in features.values()).backward()
    assert backbone.res3[0].conv2.rotation_fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "dk_type", ["deform_kernel", "deform_kernel_conv", "deform_conv", "cond_conv"]
)
def test_dk_fpn_backbone_forward_backward(dk_type):
    torch.manual_seed(0)
    cfg = _cfg(TYPE=dk_type)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_fpn_backbone"
    backbone = build_backbone(cfg, INPUT)
    features = backbone(torch.randn(2, 3, 64, 64))
    assert sorted(features) == ["p2", "p3", "p4", "p5", "p6"]
    assert features["p2"].shape == (2, 8, 16, 16) and features["p6"].shape == (2, 8, 1, 1)
    sum(f.square().sum() for f in features.values()).backward()
    for name, param in backbone.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_parameter_names_match_detectron2_resnet():
    """Same names as detectron2's ResNet, plus only the DK generators."""
    cfg = _cfg(TYPE="deform_kernel", DEPTHWISE=False, SCOPE_SIZE=3)
    cfg.MODEL.RESNETS.NUM_GROUPS = 2
    stock = build_resnet_backbone(cfg, INPUT).state_dict()
    dk = _build_bottom_up(cfg).state_dict()
    extra = set(dk) - set(stock)
    assert set(stock) <= set(dk)
    assert extra and all(".conv2.rotation_conv." in key for key in extra), sorted(extra)[:5]
    for key, value in stock.items():
        assert dk[key].shape == value.shape, key  # S = K: even the 3x3 weights fit
    # Rigid baseline: exactly detectron2's names and shapes.
    cfg.MODEL.DK.TYPE = "rigid_conv"
    rigid = _build_bottom_up(cfg).state_dict()
    assert {k: v.shape for k, v in rigid.items()} == {k: v.shape for k, v in stock.items()}


def _build_bottom_up(cfg):
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_backbone"
    return build_backbone(cfg, INPUT)


def test_full_dk_backbone_groups_follow_num_groups():
    cfg = _cfg(TYPE="deform_kernel", DEPTHWISE=False, SCOPE_SIZE=4)
    cfg.MODEL.RESNETS.NUM_GROUPS = 2
    backbone = _build_bottom_up(cfg)
    conv = backbone.res4[0].conv2
    assert isinstance(conv, DeformKernel2d) and conv.groups == 2
    assert conv.weight.shape == (conv.out_channels, conv.in_channels // 2, 4, 4)
    assert backbone.res2[0].conv2.groups == 2  # BASE_TYPE rigid_conv, same groups


def test_fresh_dk_backbone_equals_the_rigid_backbone_with_the_same_weights():
    torch.manual_seed(0)
    cfg = _cfg(TYPE="deform_kernel", SCOPE_SIZE=3, ON_PER_STAGE=[True, True, True, True])
    dk = _build_bottom_up(cfg).eval()
    cfg.MODEL.DK.TYPE = "rigid_conv"
    rigid = _build_bottom_up(cfg).eval()
    result = rigid.load_state_dict(dk.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all("rotation_conv" in k for k in result.unexpected_keys)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = dk(x), rigid(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("depthwise", [True, False])
def test_dk_r18_basic_blocks(depthwise):
    cfg = _cfg(depth=18, TYPE="deform_kernel", DEPTHWISE=depthwise)
    backbone = _build_bottom_up(cfg)
    block = backbone.res3[0]
    assert isinstance(block, DKBasicBlock)
    if depthwise:
        assert isinstance(block.conv1, SeparableConv)
        assert (
            isinstance(block.conv1.depthwise, DeformKernel2d) and block.conv1.depthwise.groups == 8
        )
        assert block.conv1.depthwise.stride == (2, 2) and block.conv2.depthwise.stride == (1, 1)
        assert block.conv1.pointwise.out_channels == 16 and block.conv1.pointwise.norm is not None
        assert isinstance(backbone.res2[0].conv1.depthwise, Conv2d)  # res2 off: rigid
    else:
        assert isinstance(block.conv1, DeformKernel2d) and block.conv1.groups == 1
        assert block.conv1.norm is not None
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # stock R18
        stock = build_resnet_backbone(cfg, INPUT).state_dict()
        full = _build_bottom_up(cfg).state_dict()
        assert set(stock) <= set(full)
        assert all(".rotation_conv." in key for key in set(full) - set(stock))
    if depthwise:
        features = backbone(torch.randn(2, 3, 64, 64))
        assert features["res5"].shape == (2, 64, 2, 2)
        features["res5"].sum().backward()


def test_full_dk_r18_and_r50_run():
    """Full (non-depthwise) DK+DCN R18 and R50: the feature shapes of their depth, and gradients
    that reach every parameter, the rotation and offset generators of every DK layer included."""
    for depth in (18, 50):
        cfg = _cfg(depth=depth, TYPE="deform_kernel_conv", DEPTHWISE=False)
        backbone = _build_bottom_up(cfg)
        features = backbone(torch.randn(2, 3, 64, 64))
        # res5 has 8x the channels of res2 (basic and bottleneck blocks alike)
        assert features["res5"].shape[:2] == (2, 8 * cfg.MODEL.RESNETS.RES2_OUT_CHANNELS)
        assert torch.isfinite(features["res5"]).all()
        features["res5"].sum().backward()
        generators = [(n, p) for n, p in backbone.named_parameters()
                      if ".rotation_conv." in n or ".offset_conv." in n]
        assert len(generators) >= 2 * 3  # res3-res5 each hold DK layers with both generators
        missing = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        silent = [n for n, p in generators if n.endswith("weight") and p.grad.abs().sum() == 0]
        assert not silent, silent


def test_cond_conv_options_reach_the_blocks():
    cfg = _cfg(TYPE="cond_conv", NUM_EXPERTS=3)
    conv = _build_bottom_up(cfg).res5[0].conv2
    assert isinstance(conv, CondConv2d) and conv.num_experts == 3


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"TYPE": "deformable_kernel"}, "MODEL.DK.TYPE"),
        ({"BASE_TYPE": "conv"}, "MODEL.DK.BASE_TYPE"),
        ({"ON_PER_STAGE": [True, True, True]}, "MODEL.DK.ON_PER_STAGE"),
        ({"SCOPE_SIZE": 2}, "MODEL.DK.SCOPE_SIZE"),
        ({"ROTATION_GROUPS": 3}, "MODEL.DK.ROTATION_GROUPS"),
        ({"ROTATION_CLIP": "clip"}, "MODEL.DK.ROTATION_CLIP"),
        ({"ROTATION_CLIP_RANGE": [1.0, -1.0]}, "MODEL.DK.ROTATION_CLIP_RANGE"),
        ({"NUM_EXPERTS": 0}, "MODEL.DK.NUM_EXPERTS"),
    ],
)
def test_bad_config_fails_at_build_naming_the_key(overrides, key):
    cfg = _cfg(**overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _build_bottom_up(cfg)


def test_other_bad_configs():
    cfg = _cfg(depth=18, DEPTHWISE=False)  # 3x3 convs of 8, 16, 32, 64 channels
    cfg.MODEL.RESNETS.NUM_GROUPS = 3
    with pytest.raises(ValueError, match=r"MODEL\.RESNETS\.NUM_GROUPS"):
        _build_bottom_up(cfg)
    cfg = _cfg()
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    with pytest.raises(ValueError, match=r'MODEL\.DK\.TYPE = "deform_conv"'):
        _build_bottom_up(cfg)
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_dk_backbone"
    with pytest.raises(KeyError, match="add_dk_config"):
        build_backbone(cfg, INPUT)
