"""README "Migrating from the original release": the recipes for the original's clip options."""
import torch
from torch import nn

from _export_models import with_random_generators
from dk_detectron2.layers import DeformKernel2d, DeformKernelConv2d, deform_kernel_conv2d


def test_original_tuple_rotation_clip_is_the_range_mode():
    """Original ``rotation_clip=(low, high)``: every rotation clamped to [low, high]."""
    module = with_random_generators(DeformKernel2d(
        4, 4, 3, 1, 1, groups=4, scope_size=4, rotation_clip="range",
        rotation_clip_range=(-0.5, 0.75)), std=1.0)
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        rotation = module.rotation_conv(x)
        assert rotation.min() < -0.5 and rotation.max() > 0.75  # the clip has work to do
        torch.testing.assert_close(module._clip(rotation), rotation.clamp(-0.5, 0.75))


def test_original_offset_clip_recipe_clamps_the_image_offset_and_scripts():
    """Original ``DeformKernelConv2d(offset_clip=dict(min=low, max=high))``: ours wraps the
    offset generator in ``nn.Hardtanh(low, high)``."""
    module = with_random_generators(DeformKernelConv2d(4, 4, 3, 1, 1, groups=4, scope_size=4), 2.0)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        offset = module.offset_conv(x)
        assert offset.abs().max() > 1.0
        expected = deform_kernel_conv2d(x, offset.clamp(-1.0, 1.0),
                                        module._clip(module.rotation_conv(x)), module.weight,
                                        3, 1, 1, 1, 1)
    module.offset_conv = nn.Sequential(module.offset_conv, nn.Hardtanh(-1.0, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(torch.jit.script(module)(x), expected, rtol=0, atol=0)
    names = {name for name, _ in module.named_parameters()}
    assert {"offset_conv.0.weight", "offset_conv.0.bias"} <= names
    assert len(list(module.generator_parameters())) == 4  # offset_conv's and rotation_conv's
