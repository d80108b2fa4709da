"""TorchScript scripting (``torch.jit.script``) of the DK operators, layers and backbone, and of a
whole tiny DK / DK+DCN Mask R-CNN through Detectron2's ``scripting_with_instances``: saved,
reloaded and equal to eager."""
import io

import pytest
import torch

from _tools_configs import tiny_dk_config
from _export_models import with_random_generators
from dk_detectron2.export.torchscript import (
    MASK_RCNN_FIELDS,
    DetectorCall,
    load_torchscript,
    script_detector,
)
from dk_detectron2.export.verify import compare_outputs
from dk_detectron2.layers import (
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    deform_kernel2d,
    deform_kernel_conv2d,
    nd_linear_sample,
)
from dk_detectron2.layers.geometry import pair_list
from dk_detectron2.tools.loaders import load_model, setup_cfg

TOLERANCE = 1e-4  # relative to the largest output magnitude (verify.compare_outputs' max_rel)


def _reloaded(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_pair_list_scripts_and_matches_eager():
    scripted = torch.jit.script(pair_list)
    for value, expected in ((3, [3, 3]), ((1, 2), [1, 2]), ([4, 5], [4, 5])):
        assert pair_list(value) == scripted(value) == expected


def test_scripted_operator_wrappers_equal_eager():
    generator = torch.Generator().manual_seed(2)
    x, weight = torch.randn(2, 4, 9, 8, generator=generator), torch.randn(4, 1, 5, 5)
    rotation = torch.randn(2, 2 * 9 * 2, 5, 4, generator=generator)
    offset = torch.randn(2, 9 * 2, 5, 4, generator=generator)
    dk, dkc = torch.jit.script(deform_kernel2d), torch.jit.script(deform_kernel_conv2d)
    # int, tuple and list geometry, as the eager wrappers take them
    torch.testing.assert_close(dk(x, rotation, weight, 3, (2, 2), [1, 1], 1, 2),
                               deform_kernel2d(x, rotation, weight, 3, 2, 1, 1, 2), rtol=0, atol=0)
    torch.testing.assert_close(dkc(x, offset, rotation, weight, (3, 3), 2, 1, 1, 2),
                               deform_kernel_conv2d(x, offset, rotation, weight, 3, 2, 1, 1, 2),
                               rtol=0, atol=0)
    scopes, coord = torch.randn(6, 5, 5), torch.rand(7, 2) * 5 - 0.5
    torch.testing.assert_close(torch.jit.script(nd_linear_sample)(scopes, coord),
                               nd_linear_sample(scopes, coord), rtol=0, atol=0)
    # scripted, the operator's own checks reject what the eager wrappers reject
    with pytest.raises(RuntimeError, match="rotation"):
        dk(x, rotation[:, :18], weight, 3, 2, 1, 1, 2)


@pytest.mark.parametrize(
    "module",
    [
        DeformKernel2d(6, 6, 3, padding=1, groups=6, scope_size=5, rotation_groups=2,
                       rotation_clip="scope"),
        DeformKernel2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, scope_size=(5, 4),
                       rotation_clip="range", rotation_clip_range=(-0.5, 0.5), bias=True),
        DeformKernelConv2d(6, 6, 3, padding=1, groups=6, scope_size=5, rotation_groups=3,
                           rotation_clip="scope"),
        DeformKernelConv2d(4, 4, 3, stride=2, padding=1, scope_size=4, generator="separable",
                           norm=torch.nn.BatchNorm2d(4), activation=torch.nn.ReLU()),
        GlobalDeformKernel2d(6, 6, 3, padding=1, groups=6, scope_size=5, rotation_groups=2,
                             rotation_clip="scope"),
        GlobalDeformKernel2d(6, 6, 3, stride=2, padding=1, groups=3, scope_size=4),
    ],
    ids=["dk", "dk-grouped-range", "dkc", "dkc-separable-norm", "global-dk", "global-dk-grouped"],
)
def test_scripted_dk_layers_equal_eager_after_reload(module):
    module = with_random_generators(module)
    scripted = _reloaded(torch.jit.script(module))
    generator = torch.Generator().manual_seed(1)
    channels = module.in_channels
    for shape in [(2, channels, 11, 9), (1, channels, 6, 13)]:  # sizes and batch not fixed
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected, found = module(x), scripted(x)
        assert found.shape == expected.shape
        assert float((found - expected).abs().max()) <= TOLERANCE * float(expected.abs().max())


def test_a_function_activation_blocks_scripting_as_in_detectron2_conv2d():
    """As ``detectron2.layers.Conv2d``: TorchScript calls a module attribute, not a function one
    (``activation=nn.ReLU()`` scripts, ``activation=F.relu`` does not)."""
    from detectron2.layers import Conv2d

    for conv in (Conv2d(4, 4, 3, activation=torch.nn.functional.relu),
                 DeformKernel2d(4, 4, 3, activation=torch.nn.functional.relu)):
        with pytest.raises(RuntimeError, match="function cannot be used as a value"):
            torch.jit.script(conv)


def test_scripted_layer_checks_its_input_and_eager_keeps_its_message():
    module = DeformKernel2d(4, 4, 3, padding=1, groups=4).eval()
    scripted = torch.jit.script(module)
    with pytest.raises(ValueError, match=r"DeformKernel2d expects input \[B, 4, H, W\], got "
                                         r"\(1, 3, 5, 5\)"):
        module(torch.randn(1, 3, 5, 5))
    with pytest.raises(Exception, match=r"expects input \[B, 4, H, W\]"):
        scripted(torch.randn(1, 3, 5, 5))


def test_scripted_dk_resnet_backbone_equals_eager(tmp_path):
    torch.manual_seed(0)
    cfg = setup_cfg(tiny_dk_config(tmp_path, "deform_kernel_conv"), device="cpu")
    backbone = with_random_generators(load_model(cfg).backbone, std=0.05)
    scripted = _reloaded(torch.jit.script(backbone))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        found = compare_outputs(backbone(x), scripted(x))
    assert found["shapes_equal"] == 1.0 and found["max_rel"] <= TOLERANCE


def _tiny_model(tmp_path, dk_type):
    """The tiny Mask R-CNN of the export tests, with non-zero DK generators (seeded)."""
    torch.manual_seed(0)
    model = load_model(setup_cfg(tiny_dk_config(tmp_path, dk_type), device="cpu"))
    return with_random_generators(model, std=0.05)


@pytest.mark.parametrize("dk_type", ["deform_kernel", "deform_kernel_conv", "global_deform_kernel"])
def test_scripted_mask_rcnn_saves_reloads_and_equals_eager(dk_type, tmp_path):
    model = _tiny_model(tmp_path, dk_type)
    path = str(tmp_path / "model_scripted.ts")
    script_detector(model).save(path)
    eager, scripted = DetectorCall(model), DetectorCall(load_torchscript(path))
    code = str(scripted.model.backbone.inlined_graph)
    op = "deform_kernel_conv2d" if dk_type == "deform_kernel_conv" else (
        "nd_linear_sample" if dk_type == "global_deform_kernel" else "deform_kernel2d")
    assert f"dk_detectron2::{op}" in code
    generator = torch.Generator().manual_seed(1)
    # Scripting keeps the control flow: other sizes than any example run the same code.
    for height, width in ((96, 128), (128, 96), (64, 64)):
        image = torch.rand(3, height, width, generator=generator) * 255
        with torch.no_grad():
            expected, found = eager(image), scripted(image)
        boxes, classes, masks, scores, size = expected
        assert len(scores) > 0 and masks.shape[1:] == (1, 28, 28)
        result = compare_outputs(expected, found)  # boxes, classes, masks, scores, image size
        assert result["shapes_equal"] == 1.0 and result["integers_equal"] == 1.0
        assert result["max_rel"] <= TOLERANCE


def test_script_detector_rejects_a_training_model_and_a_non_detector(tmp_path):
    model = _tiny_model(tmp_path, "deform_kernel").train()
    with pytest.raises(ValueError, match="model must be in eval mode"):
        script_detector(model)
    with pytest.raises(TypeError, match="model must be a Detectron2 meta-architecture"):
        script_detector(torch.nn.Conv2d(3, 3, 1))
    assert set(MASK_RCNN_FIELDS) >= {"pred_boxes", "pred_masks", "proposal_boxes"}
