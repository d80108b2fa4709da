"""``scope_init`` (MODEL.DK.SCOPE_INIT): a fresh DK scope filled everywhere ("full") or only on the
cells its zero-rotation taps read ("grid", the ring at zero), for every DK variant and every way a
model is built (the module, the registry, a Detectron2 config, a timm model)."""
import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

import dk_detectron2  # noqa: F401  (registers the timm models)
from dk_detectron2 import add_dk_config
from dk_detectron2.layers.deform_kernel import (
    SCOPE_INIT_MODES,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
)
from dk_detectron2.layers.geometry import zero_rotation_cells
from dk_detectron2.layers.registry import DKOptions, build_dk_conv
from dk_detectron2.modeling.backbone.resnet_dk import build_resnet_dk_backbone
from dk_detectron2.tools.rotation_stats import find_dk_layers

VARIANTS = (DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d)


def test_zero_rotation_cells():
    centre = torch.zeros(5, 5, dtype=torch.bool)
    centre[1:4, 1:4] = True
    assert torch.equal(zero_rotation_cells((3, 3), (5, 5)), centre)
    assert bool(zero_rotation_cells((3, 3), (4, 4)).all())  # taps between cells read all 16
    assert bool(zero_rotation_cells((3, 3), (3, 3)).all())
    six = zero_rotation_cells((3, 3), (6, 6))
    assert six.sum() == 16 and bool(six[1:5, 1:5].all())
    wide = zero_rotation_cells((1, 3), (3, 5))
    assert wide.sum() == 3 and bool(wide[1, 1:4].all())


@pytest.mark.parametrize("cls", VARIANTS)
def test_grid_init_zeroes_the_ring_and_keeps_the_rigid_kernel(cls):
    torch.manual_seed(0)
    full = cls(4, 4, 3, padding=1, groups=4, scope_size=5)
    torch.manual_seed(0)
    grid = cls(4, 4, 3, padding=1, groups=4, scope_size=5, scope_init="grid")
    ring = ~zero_rotation_cells((3, 3), (5, 5))
    assert full.scope_init == "full" and grid.scope_init == "grid"
    assert bool((grid.weight[..., ring] == 0).all())
    assert bool((full.weight[..., ring] != 0).all())
    # Same draw: the zero-rotation kernel (what a fresh module convolves with) is unchanged.
    assert torch.equal(grid.rigid_weight(), full.rigid_weight())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(grid(x), full(x), rtol=0, atol=0)
    assert "scope_init='grid'" in repr(grid) and "scope_init" not in repr(full)
    # Detectron2's initialisation keeps the rule.
    grid.c2_msra_fill_()
    assert bool((grid.weight[..., ring] == 0).all()) and grid.rigid_weight().abs().sum() > 0


def test_the_ring_learns_from_zero_through_moved_taps():
    layer = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=5, scope_init="grid")
    with torch.no_grad():
        layer.rotation_conv.bias.fill_(0.5)  # every tap moves half a cell
    layer(torch.randn(2, 4, 7, 7)).square().sum().backward()
    ring = ~zero_rotation_cells((3, 3), (5, 5))
    assert layer.weight.grad[..., ring].abs().sum() > 0


def test_scope_4_has_no_ring_to_zero():
    torch.manual_seed(0)
    full = DeformKernel2d(4, 4, 3, groups=4, scope_size=4)
    torch.manual_seed(0)
    grid = DeformKernel2d(4, 4, 3, groups=4, scope_size=4, scope_init="grid")
    assert torch.equal(full.weight, grid.weight)


def test_bad_values_name_the_argument():
    assert SCOPE_INIT_MODES == ("full", "grid")
    with pytest.raises(ValueError, match=r"scope_init must be one of \('full', 'grid'\), got 'ring'"):
        DeformKernel2d(4, 4, 3, groups=4, scope_size=5, scope_init="ring")
    with pytest.raises(ValueError, match=r"MODEL.DK.SCOPE_INIT \(scope_init\) must be one of"):
        DKOptions(scope_init="zero")


def test_the_registry_and_the_config_pass_it_on():
    conv = build_dk_conv("deform_kernel", 8, 8, 3, padding=1, groups=8, scope_init="grid")
    assert conv.scope_init == "grid"
    cfg = add_dk_config(get_cfg())
    cfg.MODEL.DK.SCOPE_INIT = "grid"
    assert DKOptions.from_config(cfg).scope_init == "grid"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    backbone = build_resnet_dk_backbone(cfg, ShapeSpec(channels=3))
    layers = find_dk_layers(backbone)
    assert layers
    ring = ~zero_rotation_cells((3, 3), (5, 5))
    for name in layers:
        module = backbone.get_submodule(name)
        assert module.scope_init == "grid" and bool((module.weight[..., ring] == 0).all()), name


def test_timm_models_take_it_as_a_keyword():
    ring = ~zero_rotation_cells((3, 3), (5, 5))
    for arch in ("dk_resnet18_dw_050", "dk_mobilenetv2_050"):
        model = timm.create_model(arch, num_classes=6, scope_init="grid")
        layers = find_dk_layers(model)
        assert layers, arch
        for name in layers:
            weight = model.get_submodule(name).weight
            assert bool((weight[..., ring] == 0).all()), (arch, name)
            assert bool((weight[..., ~ring] != 0).any()), (arch, name)
