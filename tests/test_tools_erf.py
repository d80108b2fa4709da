"""Effective receptive field tool: exact support on plain conv stacks, numbers, Detectron2 levels."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dk_detectron2.tools.erf_measure import (
    average_effective_receptive_field,
    effective_receptive_field,
    erf_statistics,
)
from dk_detectron2.tools.loaders import BackboneLevel


def _conv_stack(*layers):
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 4, 4, 3, stride=s, padding=1) for i, s in enumerate(layers)]
    return nn.Sequential(*convs).double()


def _window(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[max(rows[0], 0) : rows[1] + 1, max(cols[0], 0) : cols[1] + 1] = True
    return mask


def test_erf_of_three_3x3_convs_is_exactly_the_7x7_receptive_field():
    stack = _conv_stack(1, 1, 1)
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    erf = effective_receptive_field(stack, image)  # default: centre cell (16, 16)
    assert erf.shape == (32, 32)
    support = erf.numpy() > 0
    assert np.array_equal(support, _window((32, 32), (13, 19), (13, 19)))
    assert support.sum() == 49


def test_erf_support_is_clipped_by_the_image_border():
    stack = _conv_stack(1, 1, 1)
    erf = effective_receptive_field(stack, torch.randn(1, 3, 20, 24, dtype=torch.float64), (1, 22))
    assert np.array_equal(erf.numpy() > 0, _window((20, 24), (-2, 4), (19, 23)))


def test_erf_of_a_strided_stack_is_centred_on_cell_times_stride():
    # conv 3x3 stride 2 then conv 3x3: the unit of cell i covers pixels 2i-3 .. 2i+3.
    stack = _conv_stack(2, 1)
    erf = effective_receptive_field(stack, torch.randn(3, 32, 32, dtype=torch.float64), (5, 7))
    assert np.array_equal(erf.numpy() > 0, _window((32, 32), (7, 13), (11, 17)))
    stats = erf_statistics(erf, unit_center=(10, 14))
    assert stats["center_shift"] < 3.0


def test_average_erf_crops_to_a_common_size_and_keeps_the_exact_support():
    stack = _conv_stack(1, 1, 1)
    images = [
        torch.randn(3, 30, 34, dtype=torch.float64),
        torch.randn(3, 28, 40, dtype=torch.float64),
    ]
    mean = average_effective_receptive_field(stack, images)
    assert mean.shape == (28, 34)
    assert np.array_equal(mean.numpy() > 0, _window((28, 34), (11, 17), (14, 20)))


def test_erf_statistics_of_a_uniform_square():
    erf = np.zeros((21, 21))
    erf[8:13, 10:15] = 2.0  # a 5x5 square centred at (10, 12)
    erf[10, 12] = 4.0
    stats = erf_statistics(erf, thresholds=(0.01, 0.6), unit_center=(10, 9))
    assert stats["area_pixels"] == {"0.01": 25, "0.6": 1}
    assert stats["area_fraction"]["0.01"] == pytest.approx(25 / 441)
    assert stats["center_of_mass"] == pytest.approx([10.0, 12.0])
    # Second moment of the 5x5 square: 2 per axis over 25 cells of weight 2, plus the 4 at the
    # centre (distance 0): sqrt(2 * 2 * 50 / 52).
    assert stats["spread"] == pytest.approx(math.sqrt(4 * 50 / 52))
    assert stats["center_shift"] == pytest.approx(3.0)


def test_erf_statistics_validates_its_input():
    with pytest.raises(ValueError, match="2-D"):
        erf_statistics(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        erf_statistics(-np.ones((3, 3)))
    assert erf_statistics(np.zeros((3, 3)))["spread"] == 0.0


def test_erf_arguments_are_validated():
    stack = _conv_stack(1)
    with pytest.raises(ValueError, match="position"):
        effective_receptive_field(stack, torch.randn(3, 8, 8, dtype=torch.float64), (8, 0))
    with pytest.raises(ValueError, match="image must be"):
        effective_receptive_field(stack, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def _tiny_detectron2_model(backbone_name):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.RPN.IN_FEATURES = (
        ["p2", "p3", "p4", "p5", "p6"] if "fpn" in backbone_name else ["res4"]
    )
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2"] if "fpn" in backbone_name else ["res4"]
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_backbone_level_of_an_fpn_model_pads_and_returns_the_level():
    from dk_detectron2.tools.loaders import preprocess_image

    model = _tiny_detectron2_model("build_resnet_fpn_backbone")
    level = BackboneLevel(model, "p4")
    assert level.stride == 16
    image = preprocess_image(model, torch.rand(3, 70, 90) * 255)
    erf = effective_receptive_field(level, image, level.cell_of(35, 45))
    assert erf.shape == (70, 90)
    assert torch.isfinite(erf).all() and erf.max() > 0
    stats = erf_statistics(erf, unit_center=level.center_of(level.cell_of(35, 45)))
    assert stats["area_pixels"]["0.01"] > stats["area_pixels"]["0.1"] > 0
    bottom_up = BackboneLevel(model, "res3")  # an FPN's bottom-up levels are reachable too
    assert bottom_up.stride == 8 and bottom_up.size_divisibility == 32
    assert bottom_up(image).shape[-2:] == (12, 12)  # 70x90 padded to 96x96, stride 8
    with pytest.raises(ValueError, match="level must be one of"):
        BackboneLevel(model, "res7")


# ------------------------------------------------------------------------------------------------
# Kernel sample pictures
# ------------------------------------------------------------------------------------------------
def test_kernel_samples_are_the_base_grid_plus_the_rotation_the_layer_used(tmp_path):
    from dk_detectron2.layers.deform_kernel import DeformKernel2d
    from dk_detectron2.tools.kernel_samples import draw_kernel_samples, kernel_samples

    torch.manual_seed(0)
    layer = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=5, rotation_groups=2).eval()
    nn.init.normal_(layer.rotation_conv.weight, std=0.3)
    x = torch.randn(1, 4, 6, 7)
    samples = kernel_samples(layer, x, position=(2, 3), channels=[0, 3])
    rotation = layer.rotation_conv(x).detach()[0, :, 2, 3].reshape(2, 9, 2).numpy()
    base = layer.base_grid().numpy()
    assert np.allclose(samples[0].base, base) and samples[0].base[0].tolist() == [1.0, 1.0]
    assert np.allclose(samples[0].points, base + rotation[0], atol=1e-6)
    assert np.allclose(samples[1].points, base + rotation[1], atol=1e-6)  # channel 3: group 1
    assert samples[1].group == 1
    assert np.allclose(samples[1].scope, layer.weight[3, 0].abs().detach().numpy())
    draw_kernel_samples(samples, str(tmp_path / "k.png"))
    assert (tmp_path / "k.png").stat().st_size > 0


def test_kernel_samples_of_a_global_dk_and_of_a_rigid_conv():
    from dk_detectron2.layers.deform_kernel import GlobalDeformKernel2d
    from dk_detectron2.tools.kernel_samples import kernel_samples

    layer = GlobalDeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=4).eval()
    nn.init.normal_(layer.rotation_fc.bias, std=0.5)
    x = torch.randn(2, 4, 5, 5)
    (sample,) = kernel_samples(layer, x, channels=[1], batch_index=1)
    rotation = layer.rotation_fc(x.mean(dim=(2, 3)))[1].detach().reshape(9, 2).numpy()
    assert sample.position is None
    assert not np.allclose(sample.points, sample.base)
    assert np.allclose(sample.points - sample.base, rotation, atol=1e-6)
    with pytest.raises(ValueError, match="called no Deformable Kernel operator"):
        kernel_samples(nn.Conv2d(4, 4, 3), torch.randn(1, 4, 5, 5))


# ------------------------------------------------------------------------------------------------
# Command lines on a tiny random-init DK Mask R-CNN
# ------------------------------------------------------------------------------------------------
def _write_images(folder, count=2):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_erf_command_line_draws_models_side_by_side_and_writes_numbers(tmp_path):
    import json

    from _tools_configs import tiny_dk_config

    from dk_detectron2.tools.erf import main

    images = _write_images(tmp_path / "images")
    dw = tiny_dk_config(tmp_path, dk_type="rigid_conv")
    dk = tiny_dk_config(tmp_path, dk_type="deform_kernel")
    output = tmp_path / "erf.png"
    models = ["--config-file", dw, "--weights", "", "--label", "DW"]
    models += ["--config-file", dk, "--weights", "", "--label", "DK"]
    images_args = ["--input", str(images), "--num-images", "2", "--average-images", "2"]
    probe = ["--level", "res4", "--position", "30,40", "--thresholds", "0.05", "0.2"]
    report = main(models + images_args + probe + ["--output", str(output)])
    assert output.stat().st_size > 0
    with open(tmp_path / "erf.json") as f:
        assert json.load(f) == report
    assert [m["label"] for m in report["models"]] == ["DW", "DK"]
    for model in report["models"]:
        assert model["stride"] == 16 and len(model["images"]) == 2
        for stats in model["images"] + [model["average"]]:
            assert stats["area_pixels"]["0.05"] >= stats["area_pixels"]["0.2"] > 0
            assert stats["spread"] > 0
        assert model["images"][0]["cell"] == [2, 2]  # pixel (30, 40) at stride 16 (rounded)
        assert model["average"]["num_images"] == 2


def test_kernel_samples_command_line_draws_a_layer_of_a_dk_model(tmp_path):
    from _tools_configs import tiny_dk_config

    from dk_detectron2.tools.kernel_samples import main

    images = _write_images(tmp_path / "images", count=1)
    config = tiny_dk_config(tmp_path, dk_type="deform_kernel")
    output = tmp_path / "kernels.png"
    layer = "backbone.bottom_up.res4.0.conv2.depthwise"
    args = ["--config-file", config, "--input", str(images / "0.png"), "--layer", layer]
    samples = main(args + ["--channels", "0", "5", "--output", str(output)])
    assert output.stat().st_size > 0
    assert [s.channel for s in samples] == [0, 5]
    # A fresh DK's rotation generator is zero: the taps sit on the base grid of the 5x5 scope (the default).
    assert np.allclose(samples[0].points, samples[0].base)
    assert samples[0].scope.shape == (5, 5)
    # --stats --stats-json: the figures it prints, per layer and averaged, in a file
    stats = main(args + ["--stats", "--stats-json", str(tmp_path / "stats.json")])
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["layers"] == stats and len(stats) > 1
    assert saved["mean_over_layers"]["taps_on_scope_edge"] == pytest.approx(
        np.mean([row["taps_on_scope_edge"] for row in stats]))
    assert saved["config"] == config and saved["input"] == str(images / "0.png")
    assert saved["command"].startswith("python -m dk_detectron2.tools.kernel_samples ")
    assert "--stats-json" in saved["command"]


def test_rotation_statistics_find_layers_whose_taps_left_the_scope():
    from dk_detectron2.layers.deform_kernel import (
        DeformKernel2d,
        DeformKernelConv2d,
        GlobalDeformKernel2d,
    )
    from dk_detectron2.tools.rotation_stats import rotation_statistics

    dead = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=4)
    nn.init.constant_(dead.rotation_conv.bias, 10.0)  # every tap at base + 10 >= S: reads zero
    fresh = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=4)
    shifted = GlobalDeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=4)
    nn.init.constant_(shifted.rotation_fc.bias, 1.0)  # taps at base + 1: the last row/column
    with_offsets = DeformKernelConv2d(4, 4, 3, padding=1, groups=4, scope_size=5)
    nn.init.constant_(with_offsets.rotation_conv.bias, -2.0)  # base 1 - 2 = -1: first row reads 0
    model = nn.Sequential(dead, fresh, shifted, with_offsets).eval()
    x = torch.randn(2, 4, 6, 6)
    stats = {row["layer"]: row for row in rotation_statistics(model, lambda: model(x))}
    assert stats["0"]["taps_reading_zero"] == 1.0
    assert stats["0"]["mean_abs_rotation"] == pytest.approx(10.0)
    assert stats["1"]["taps_reading_zero"] == 0.0 and stats["1"]["max_abs_rotation"] == 0.0
    # S 4, K 3, zero rotation: taps at 0.5 .. 2.5, none on the border rows (0 and 3).
    assert stats["1"]["taps_on_scope_edge"] == 0.0
    assert stats["2"]["op"] == "nd_linear_sample"
    assert stats["2"]["mean_abs_rotation"] == pytest.approx(1.0, abs=1e-5)
    assert stats["2"]["taps_reading_zero"] == 0.0  # base + 1 = 1.5 .. 3.5 < 4: still inside
    assert stats["3"]["op"] == "deform_kernel_conv2d"
    assert stats["3"]["taps_reading_zero"] == pytest.approx(5 / 9)  # taps with y or x at -1
    # S 5: points at -1 .. 1; y or x <= 0 for all but the tap at (1, 1).
    assert stats["3"]["taps_on_scope_edge"] == pytest.approx(8 / 9)
    assert stats["2"]["taps_on_scope_edge"] == pytest.approx(5 / 9)  # y or x at 3.5, past row 3
