"""The Deformable Kernel modules and DK_CONV_REGISTRY (CPU, tiny shapes); the rivals against their
definitions are in test_rivals.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dk_detectron2.layers import (
    DK_CONV_REGISTRY,
    CondConv2d,
    DeformKernel2d,
    DeformKernelConv2d,
    DKOptions,
    GlobalDeformKernel2d,
    LearntOffsetDeformConv2d,
    build_dk_conv,
    deform_kernel2d,
)
from dk_detectron2.layers.deform_kernel import RotationClip
from dk_detectron2.layers.reference import (
    deform_kernel2d_reference,
    deform_kernel_conv2d_reference,
)
from dk_detectron2.layers.registry import dk_conv_names

NAMES = [
    "rigid_conv",
    "global_deform_kernel",
    "deform_kernel",
    "deform_kernel_conv",
    "deform_conv",
    "cond_conv",
]
DK_CLASSES = [GlobalDeformKernel2d, DeformKernel2d, DeformKernelConv2d]
ALL_CLASSES = DK_CLASSES + [LearntOffsetDeformConv2d, CondConv2d]
GENERATORS = ("rotation_conv", "rotation_fc", "offset_conv", "routing_fc")


def _generators(module):
    return [getattr(module, name) for name in GENERATORS if hasattr(module, name)]


def test_registry_holds_exactly_the_agreed_names():
    assert dk_conv_names() == sorted(NAMES)
    for name in NAMES:
        assert name in DK_CONV_REGISTRY


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_name_builds_runs_forward_and_backward(name, stride):
    torch.manual_seed(0)
    module = build_dk_conv(name, 8, 8, 3, stride=stride, padding=1, groups=8, scope_size=4)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    out = module(x)
    expected = 9 if stride == 1 else 5
    assert out.shape == (2, 8, expected, expected)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, param in module.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
    # The generators (zero at start) receive a gradient, so they learn.
    for generator in _generators(module):
        assert generator.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", NAMES)
def test_grouped_and_full_convs(name):
    """Groups 1 and 2 (grouped and full convolutions): the output has the convolution's shape, a
    fresh module (generators at zero) with a rigid kernel equals ``F.conv2d`` with that kernel,
    and every trainable parameter receives a gradient. (The operators with non-zero rotations are
    compared with the float64 reference in tests/test_ops.py.)"""
    torch.manual_seed(0)
    for groups in (1, 2):
        module = build_dk_conv(name, 4, 6, 3, padding=1, groups=groups, scope_size=4, num_experts=3)
        x = torch.randn(2, 4, 5, 5)
        out = module(x)
        assert out.shape == (2, 6, 5, 5)
        if hasattr(module, "rigid_weight"):
            torch.testing.assert_close(out, F.conv2d(x, module.rigid_weight(), None, 1, 1, 1,
                                                     groups), rtol=1e-5, atol=1e-5)
        out.sum().backward()
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(cls, {"scope_size": s}) for cls in DK_CLASSES for s in (3, 4, 5)]
    + [(LearntOffsetDeformConv2d, {}), (CondConv2d, {"num_experts": 3})],
)
def test_fresh_module_equals_its_rigid_convolution(cls, kwargs):
    torch.manual_seed(0)
    module = cls(6, 6, 3, stride=2, padding=2, dilation=2, groups=6, **kwargs)
    for generator in _generators(module):
        assert generator.weight.abs().sum() == 0 and generator.bias.abs().sum() == 0
    x = torch.randn(2, 6, 11, 10)
    kernel = module.rigid_weight()
    if cls in DK_CLASSES:  # the kernel at zero rotation, computed here, not by the module
        kernel = _zero_rotation_kernel(module.weight, 3)
        torch.testing.assert_close(module.rigid_weight(), kernel)
    rigid = F.conv2d(x, kernel, None, 2, 2, 2, 6)
    torch.testing.assert_close(module(x), rigid, rtol=1e-5, atol=1e-5)


def _zero_rotation_kernel(scope, kernel_size):
    """[O, I, K, K] read from an [O, I, S, S] scope at zero rotation: tap k sits at k + (S-K)/2,
    a cell (S - K even) or the centre of four cells (S - K odd, their mean)."""
    margin2 = scope.shape[-1] - kernel_size
    lo = margin2 // 2
    kernel = scope[..., lo:lo + kernel_size, lo:lo + kernel_size]
    if margin2 % 2:
        kernel = 0.25 * (kernel + scope[..., lo + 1:lo + 1 + kernel_size, lo:lo + kernel_size]
                         + scope[..., lo:lo + kernel_size, lo + 1:lo + 1 + kernel_size]
                         + scope[..., lo + 1:lo + 1 + kernel_size, lo + 1:lo + 1 + kernel_size])
    return kernel


def test_the_rigid_comparison_sees_a_wrong_tap_position():
    """_zero_rotation_kernel is not the module's own code: a kernel read one cell off differs."""
    module = DeformKernel2d(6, 6, 3, padding=1, groups=6, scope_size=5)
    shifted = module.weight[..., 2:5, 2:5]
    assert not torch.allclose(_zero_rotation_kernel(module.weight, 3), shifted)


def test_deform_conv2d_is_a_deprecated_alias():
    """The former name still works, with a warning that it is not torchvision's contract."""
    import dk_detectron2.layers as layers

    with pytest.warns(DeprecationWarning, match="use LearntOffsetDeformConv2d"):
        alias = layers.DeformConv2d
    assert alias is LearntOffsetDeformConv2d
    with pytest.warns(DeprecationWarning):
        from dk_detectron2.layers import DeformConv2d  # noqa: F401
    assert "DeformConv2d" not in layers.__all__
    with pytest.raises(AttributeError, match="no attribute 'DeformConv3d'"):
        layers.DeformConv3d


def test_deform_kernel_with_scope_equal_to_kernel_is_the_depthwise_conv():
    torch.manual_seed(0)
    dk = DeformKernel2d(8, 8, 3, padding=1, groups=8, scope_size=3)
    rigid = build_dk_conv("rigid_conv", 8, 8, 3, padding=1, groups=8)
    # "depthwise", the former name of "rigid_conv", builds the same convolution.
    assert type(build_dk_conv("depthwise", 8, 8, 3, padding=1, groups=8)) is type(rigid)
    rigid.weight.data.copy_(dk.weight.data)
    torch.testing.assert_close(dk.rigid_weight(), dk.weight)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(dk(x), rigid(x), rtol=1e-5, atol=1e-5)


def test_even_scope_margin_takes_the_centre_of_the_scope():
    module = DeformKernel2d(2, 2, 3, groups=2, scope_size=5)
    torch.testing.assert_close(module.rigid_weight(), module.weight[:, :, 1:4, 1:4])


def test_deform_kernel_passes_the_predicted_rotation_to_the_op():
    torch.manual_seed(0)
    module = DeformKernel2d(4, 4, 3, stride=1, padding=1, groups=4, scope_size=5, rotation_groups=2)
    nn.init.normal_(module.rotation_conv.weight, std=0.3)
    nn.init.normal_(module.rotation_conv.bias, std=0.5)
    x = torch.randn(2, 4, 6, 6)
    rotation = module.rotation_conv(x)
    expected = deform_kernel2d_reference(x, rotation, module.weight, 3, 1, 1, 1, 2)
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)


def test_deform_kernel_conv_learns_offset_and_rotation():
    torch.manual_seed(0)
    module = DeformKernelConv2d(4, 4, 3, padding=1, groups=4, scope_size=4)
    x = torch.randn(2, 4, 6, 6)
    module(x).square().sum().backward()
    assert module.offset_conv.weight.grad.abs().sum() > 0
    assert module.rotation_conv.weight.grad.abs().sum() > 0
    nn.init.normal_(module.offset_conv.bias, std=0.5)
    nn.init.normal_(module.rotation_conv.bias, std=0.5)
    expected = deform_kernel_conv2d_reference(
        x, module.offset_conv(x), module.rotation_conv(x), module.weight, 3, 1, 1, 1, 1
    )
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", DK_CLASSES)
def test_nonzero_rotation_changes_the_output(cls):
    torch.manual_seed(0)
    module = cls(4, 4, 3, padding=1, groups=4, scope_size=4)
    x = torch.randn(2, 4, 6, 6)
    before = module(x)
    generator = module.rotation_fc if cls is GlobalDeformKernel2d else module.rotation_conv
    nn.init.constant_(generator.bias, 0.4)
    assert (module(x) - before).abs().max() > 1e-3


def test_rotation_clip_scope_keeps_every_tap_inside_the_scope():
    clip = RotationClip((3, 3), (5, 5), "scope")
    rotation = torch.linspace(-10, 10, 7).view(7, 1).expand(7, 18)
    clipped = clip(rotation, tap_dim=1).view(7, 9, 2)
    base = (
        torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1).view(
            9, 2
        )
        + 1
    )
    coord = base + clipped
    assert coord.min() == 0 and coord.max() == 4  # [0, S-1]
    assert (coord[0] == 0).all() and (coord[-1] == 4).all()
    # Rotations already inside are kept.
    small = torch.full((1, 18), 0.25)
    torch.testing.assert_close(clip(small, tap_dim=1), small)


def test_rotation_clip_range_and_none():
    rotation = torch.linspace(-3, 3, 18).view(1, 18, 1, 1)
    clipped = RotationClip((3, 3), (4, 4), "range", (-0.5, 1.0))(rotation, tap_dim=1)
    assert clipped.min() == -0.5 and clipped.max() == 1.0
    assert RotationClip((3, 3), (4, 4), "none")(rotation, tap_dim=1) is rotation


@pytest.mark.parametrize("mode", ["range", "scope"])
def test_rotation_clip_gradient_passes_inside_the_interval_only(mode):
    """The gradient of a clipped rotation is 1 inside its interval and 0 outside (exactly on a
    bound torch's clamp shares it, as minimum and maximum do)."""
    clip = RotationClip((1, 1), (3, 3), mode, (-1.0, 1.0))  # both modes: r in [-1, 1]
    values = torch.tensor([-1.5, -1.001, -0.999, 0.0, 0.999, 1.001, 1.5], dtype=torch.float64)
    rotation = values.view(-1, 1).expand(-1, 2).clone().requires_grad_(True)
    clip(rotation, tap_dim=1).sum().backward()
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rotation.grad, expected.view(-1, 1).expand(-1, 2), rtol=0, atol=0)


def test_deform_kernel_clips_predicted_rotation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)
    clipped = DeformKernel2d(
        2,
        2,
        3,
        padding=1,
        groups=2,
        scope_size=4,
        rotation_clip="range",
        rotation_clip_range=(-0.5, 0.5),
    )
    nn.init.constant_(clipped.rotation_conv.bias, 3.0)
    reference = DeformKernel2d(2, 2, 3, padding=1, groups=2, scope_size=4)
    reference.weight.data.copy_(clipped.weight.data)
    nn.init.constant_(reference.rotation_conv.bias, 0.5)
    torch.testing.assert_close(clipped(x), reference(x))


def test_norm_and_activation_like_detectron2_conv2d():
    torch.manual_seed(0)
    for name in NAMES:
        module = build_dk_conv(
            name, 4, 4, 3, padding=1, groups=4, norm=nn.GroupNorm(2, 4), activation=F.relu
        )
        out = module(torch.randn(2, 4, 6, 6))
        assert (out >= 0).all() and (out == 0).any(), name
        assert isinstance(module.norm, nn.GroupNorm), name


def test_bias():
    module = DeformKernel2d(2, 2, 3, groups=2, bias=True)
    nn.init.constant_(module.bias, 2.0)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(module(x), F.conv2d(x, module.rigid_weight(), module.bias, groups=2))


def test_extra_repr_mentions_the_key_parameters():
    text = repr(
        DeformKernel2d(
            8,
            8,
            3,
            stride=2,
            padding=1,
            groups=8,
            scope_size=5,
            rotation_groups=2,
            rotation_clip="range",
            rotation_clip_range=(-2, 2),
        )
    )
    for part in (
        "8, 8",
        "kernel_size=(3, 3)",
        "stride=(2, 2)",
        "groups=8",
        "scope_size=(5, 5)",
        "rotation_groups=2",
        "rotation_clip='range'",
        "rotation_clip_range=(-2.0, 2.0)",
    ):
        assert part in text, (part, text)
    assert "scope_size=(4, 4)" in repr(GlobalDeformKernel2d(4, 4, 3, scope_size=4))
    assert "scope_size=(4, 4)" in repr(DeformKernelConv2d(4, 4, 3, scope_size=4))
    assert "num_experts=3" in repr(CondConv2d(4, 4, 3, num_experts=3))
    assert "offset_groups=2" in repr(LearntOffsetDeformConv2d(4, 4, 3, offset_groups=2))


def test_c2_msra_fill_keeps_generators_at_zero():
    for cls in ALL_CLASSES:
        module = cls(8, 8, 3, groups=8)
        module.c2_msra_fill_()
        for generator in _generators(module):
            assert generator.weight.abs().sum() == 0
        assert module.weight.std() > 0


def test_options_from_registry_kwargs_and_dataclass():
    module = build_dk_conv(
        "deform_kernel", 4, 4, 3, options=DKOptions(scope_size=6, rotation_groups=2)
    )
    assert module.scope_size == (6, 6) and module.rotation_groups == 2
    module = build_dk_conv("deform_kernel", 4, 4, 3, options=DKOptions(scope_size=6), scope_size=5)
    assert module.scope_size == (5, 5)
    assert build_dk_conv("cond_conv", 4, 4, 3, num_experts=7).num_experts == 7


def test_bad_inputs_name_the_argument():
    with pytest.raises(KeyError, match="valid names: cond_conv, deform_conv"):
        build_dk_conv("deformable", 4, 4, 3)
    with pytest.raises(TypeError, match="scope"):
        build_dk_conv("deform_kernel", 4, 4, 3, scope=4)
    with pytest.raises(ValueError, match="scope_size"):
        DeformKernel2d(4, 4, 3, scope_size=2)
    with pytest.raises(ValueError, match="rotation_groups"):
        DeformKernel2d(4, 6, 3, rotation_groups=4)
    with pytest.raises(ValueError, match="groups"):
        GlobalDeformKernel2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="rotation_clip"):
        DeformKernel2d(4, 4, 3, rotation_clip="scopes")
    with pytest.raises(ValueError, match="num_experts"):
        CondConv2d(4, 4, 3, num_experts=0)
    with pytest.raises(ValueError, match=r"expects input \[B, 4, H, W\], got \(1, 3, 5, 5\)"):
        DeformKernel2d(4, 4, 3)(torch.zeros(1, 3, 5, 5))


@pytest.mark.parametrize("name", NAMES)
def test_every_name_runs_under_autocast_and_in_bfloat16(name):
    torch.manual_seed(0)
    module = build_dk_conv(name, 8, 8, 3, padding=1, groups=8, rotation_clip="scope")
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # A rigid conv before, as in a bottleneck: the module sees a bfloat16 activation.
        out = module(F.conv2d(x, torch.eye(8).view(8, 8, 1, 1)))
    assert out.shape == (2, 8, 6, 6) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    with torch.no_grad():
        half = module.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and half.shape == (2, 8, 6, 6)


@pytest.mark.parametrize("scope, gain", [(3, 1.0), (4, 0.5), (5, 1.0), (6, 0.5)])
def test_rigid_kernel_starts_with_the_he_std_of_a_3x3_conv(scope, gain):
    """With S - K odd the zero-rotation taps are bilinear mixes of 4 cells (variance 1/4 of a
    cell's); the scope is scaled so that the kernel a fresh module convolves with has the std of
    a c2_msra_fill'ed 3 x 3 depthwise conv either way."""
    torch.manual_seed(0)
    module = DeformKernel2d(1024, 1024, 3, groups=1024, scope_size=scope)
    assert module.rigid_gain() == pytest.approx(gain)
    module.c2_msra_fill_()
    he_std = math.sqrt(2.0 / (1024 * 9))
    assert module.weight.std().item() == pytest.approx(he_std / gain, rel=0.05)
    assert module.rigid_weight().std().item() == pytest.approx(he_std, rel=0.05)


def test_group_counts_must_divide_the_channels_they_split():
    with pytest.raises(ValueError, match=r"out_channels \(6\) must be divisible by "
                                         r"rotation_groups \(4\)"):
        DeformKernel2d(6, 6, 3, groups=6, rotation_groups=4)
    with pytest.raises(ValueError, match=r"in_channels \(6\) must be divisible by "
                                         r"offset_groups \(4\)"):
        LearntOffsetDeformConv2d(6, 6, 3, offset_groups=4)
    with pytest.raises(TypeError, match="rotation_groups must be an int >= 1, got 2.0"):
        DeformKernel2d(6, 6, 3, groups=6, rotation_groups=2.0)
