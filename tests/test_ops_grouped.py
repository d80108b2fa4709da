"""Grouped and full Deformable Kernels (weight [C_out, C_in/groups, Sh, Sw]) on the CPU."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from _op_cases import make_case
from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d
from dk_detectron2.layers.reference import deform_kernel_conv2d_reference


def grouped_case(Cin=4, Cout=6, groups=2, S=4, **kwargs):
    """A grouped or full case (weight [Cout, Cin/groups, S, S]) of _op_cases.make_case, its
    rotations unscaled."""
    return make_case(C=Cin, C_out=Cout, groups=groups, S=(S, S), rotation_scale=1.0, **kwargs)


CASES = [
    # (Cin, Cout, groups, G, S, stride, dilation)
    (4, 6, 1, 1, 4, 1, 1),   # full
    (4, 6, 1, 2, 5, 2, 1),   # full, 2 rotation groups
    (4, 6, 2, 1, 3, 1, 2),   # grouped
    (4, 6, 2, 3, 4, 1, 1),   # rotation groups cutting across conv groups
    (6, 6, 3, 2, 6, 2, 1),
    (3, 6, 3, 1, 4, 1, 1),   # depthwise with channel multiplier 2
    (8, 8, 8, 2, 4, 1, 1),   # depthwise (direct kernel) for comparison
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_offset", [False, True])
def test_grouped_matches_reference(case, with_offset):
    Cin, Cout, groups, G, S, stride, dilation = case
    x, offset, rotation, weight, geo = grouped_case(Cin=Cin, Cout=Cout, groups=groups, G=G, S=S,
                                                    stride=stride, dilation=dilation)
    inputs = [t.requires_grad_() for t in (x, offset, rotation, weight)]
    if with_offset:
        out = deform_kernel_conv2d(*inputs, **geo)
        expected = deform_kernel_conv2d_reference(*inputs, **geo)
        used = inputs
    else:
        out = deform_kernel2d(x, rotation, weight, **geo)
        expected = deform_kernel_conv2d_reference(x, None, rotation, weight, **geo)
        used = [x, rotation, weight]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, used, grad),
                         torch.autograd.grad(expected, used, grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("groups,G", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_gradcheck_grouped(groups, G):
    x, offset, rotation, weight, geo = grouped_case(B=1, Cin=4, Cout=4, groups=groups, G=G, H=5,
                                                    W=5)
    rotation = rotation * 0.6
    inputs = tuple(t.requires_grad_() for t in (x, offset, rotation, weight))
    assert torch.autograd.gradcheck(lambda *a: deform_kernel_conv2d(*a, **geo), inputs)
    assert torch.autograd.gradcheck(lambda a, r, w: deform_kernel2d(a, r, w, **geo),
                                    (inputs[0], inputs[2], inputs[3]))


@pytest.mark.parametrize("groups", [1, 2])
def test_zero_rotation_scope_equal_kernel_is_conv2d(groups):
    x, _, rotation, weight, geo = grouped_case(Cin=4, Cout=6, groups=groups, S=3, stride=2,
                                               dilation=2, padding=2)
    out = deform_kernel2d(x, torch.zeros_like(rotation), weight, **geo)
    torch.testing.assert_close(out, F.conv2d(x, weight, stride=2, padding=2, dilation=2,
                                             groups=groups))


@pytest.mark.parametrize("groups", [1, 2])
def test_dkc_zero_rotation_equals_torchvision_deform_conv2d(groups):
    x, offset, rotation, weight, geo = grouped_case(Cin=4, Cout=6, groups=groups, S=3)
    out = deform_kernel_conv2d(x, offset, torch.zeros_like(rotation), weight, **geo)
    torch.testing.assert_close(out, torchvision.ops.deform_conv2d(x, offset, weight, padding=1))


def test_full_dk_float32_channels_last_and_batch_zero():
    x, offset, rotation, weight, geo = grouped_case(Cin=16, Cout=8, groups=1, dtype=torch.float32)
    expected = deform_kernel2d(x.double(), rotation.double(), weight.double(), **geo)
    out = deform_kernel2d(x.contiguous(memory_format=torch.channels_last), rotation, weight, **geo)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    empty_x = x[:0].clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    empty = deform_kernel2d(empty_x, rotation[:0], weight, **geo)
    assert empty.shape == (0, 8, 7, 6)
    empty.sum().backward()
    assert empty_x.grad.shape == empty_x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))  # no image, no gradient


def test_full_dk_tiles_many_positions():
    """More positions than one column tile holds, so the tiling boundary is exercised."""
    x, _, rotation, weight, geo = grouped_case(B=2, Cin=64, Cout=4, groups=1, H=40, W=40, S=5,
                                               dtype=torch.float32)
    out = deform_kernel2d(x, rotation * 0.3, weight, **geo)
    expected = deform_kernel_conv2d_reference(x.double(), None, rotation.double() * 0.3,
                                              weight.double(), **geo)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "Cin,Cout,cpg,G,match",
    [
        (4, 6, 3, 1, "must divide input channels"),
        (4, 5, 2, 1, "divisible by groups"),
        (4, 6, 2, 4, "divisible by rotation_groups"),
    ],
)
def test_grouped_bad_input(Cin, Cout, cpg, G, match):
    x = torch.randn(1, Cin, 5, 5)
    weight = torch.randn(Cout, cpg, 4, 4)
    rotation = torch.zeros(1, G * 18, 5, 5)
    with pytest.raises(ValueError, match=match):
        deform_kernel2d(x, rotation, weight, 3, padding=1, rotation_groups=G)
