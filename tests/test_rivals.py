"""The rivals of the Deformable Kernel in DK_CONV_REGISTRY against their definitions (CPU, tiny
shapes): deformable convolution against torchvision's ``deform_conv2d`` (and on the CPU through
the DK operator), global DK against a per-sample loop, CondConv against its expert mixture."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dk_detectron2.layers import CondConv2d, GlobalDeformKernel2d, LearntOffsetDeformConv2d
from dk_detectron2.layers.reference import nd_linear_sample_reference


@pytest.mark.parametrize("groups", [1, 2])
def test_deform_conv2d_with_offsets_matches_torchvision(groups):
    import torchvision

    torch.manual_seed(0)
    module = LearntOffsetDeformConv2d(4, 6, 3, padding=1, groups=groups)
    with torch.no_grad():
        module.offset_conv.weight.normal_(std=0.3)
    x = torch.randn(2, 4, 7, 6)
    offset = module.offset_conv(x)
    expected = torchvision.ops.deform_conv2d(x.double(), offset.double(), module.weight.double(),
                                             padding=1)
    torch.testing.assert_close(module(x).double(), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, F.conv2d(x.double(), module.weight.double(), padding=1,
                                                 groups=groups))


def _global_reference(module, x):
    """Per-sample loop: sample the kernel at base + rotation, convolve the sample alone."""
    outs = []
    taps = module.kernel_size[0] * module.kernel_size[1]
    per_group = module.out_channels // module.rotation_groups
    for sample in x.split(1):
        rotation = module.rotation_fc(sample.mean(dim=(2, 3))).reshape(
            module.rotation_groups, taps, 2
        )
        kernels = []
        for g in range(module.rotation_groups):
            scope = module.weight[g * per_group : (g + 1) * per_group]
            values = nd_linear_sample_reference(
                scope.reshape(-1, *module.scope_size), module.base_grid() + rotation[g]
            )  # [K*K, C/G * C_in/groups]
            kernels.append(values.t().reshape(per_group, scope.shape[1], *module.kernel_size))
        kernel = torch.cat(kernels)
        outs.append(
            F.conv2d(
                sample, kernel, None, module.stride, module.padding, module.dilation, module.groups
            )
        )
    return torch.cat(outs)


def test_global_deform_kernel_equals_a_per_sample_loop():
    torch.manual_seed(0)
    module = GlobalDeformKernel2d(4, 6, 3, padding=1, groups=2, scope_size=5, rotation_groups=3)
    nn.init.normal_(module.rotation_fc.weight, std=0.5)
    nn.init.normal_(module.rotation_fc.bias, std=0.5)
    x = torch.randn(3, 4, 7, 7)
    torch.testing.assert_close(module(x), _global_reference(module, x), rtol=1e-4, atol=1e-5)


def test_cond_conv_mixes_experts_per_sample():
    torch.manual_seed(0)
    module = CondConv2d(4, 6, 3, padding=1, groups=2, num_experts=3)
    nn.init.normal_(module.routing_fc.weight, std=1.0)
    x = torch.randn(3, 4, 7, 7)
    out = module(x)
    routing = module.routing(x)
    assert routing.shape == (3, 3)
    for b in range(3):
        kernel = torch.einsum("e,eoikl->oikl", routing[b], module.weight)
        expected = F.conv2d(x[b : b + 1], kernel, None, 1, 1, 1, 2)
        torch.testing.assert_close(out[b : b + 1], expected, rtol=1e-4, atol=1e-5)
    # Fresh routing weighs every expert 0.5.
    fresh = CondConv2d(4, 4, 3, num_experts=2)
    torch.testing.assert_close(fresh.routing(x[:, :4]), torch.full((3, 2), 0.5))


@pytest.mark.parametrize("stride, dilation, groups", [(1, 1, 4), (2, 1, 1), (1, 2, 2)])
def test_deform_conv_on_the_cpu_runs_the_dk_operator_and_trains_as_torchvision(
    stride, dilation, groups
):
    """One offset group on the CPU goes through deform_kernel_conv2d with a zero rotation: the
    output and every gradient (input, weight, offset generator) equal torchvision's in float64."""
    from torchvision.ops import deform_conv2d

    torch.manual_seed(0)
    module = LearntOffsetDeformConv2d(4, 4, 3, stride=stride, padding=dilation, dilation=dilation,
                                      groups=groups).double()
    nn.init.normal_(module.offset_conv.weight, std=0.2)
    nn.init.normal_(module.offset_conv.bias, std=0.7)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True)
    twin = copy.deepcopy(module)
    x_twin = x.detach().clone().requires_grad_()
    grad_out = torch.randn_like(module(x))

    with mock.patch("dk_detectron2.layers.rivals.deform_conv2d",
                    side_effect=AssertionError("torchvision must not run")):
        module(x).backward(grad_out)
    deform_conv2d(x_twin, twin.offset_conv(x_twin), twin.weight, stride=stride,
                  padding=dilation, dilation=dilation).backward(grad_out)

    torch.testing.assert_close(x.grad, x_twin.grad)
    torch.testing.assert_close(module.weight.grad, twin.weight.grad)
    torch.testing.assert_close(module.offset_conv.weight.grad, twin.offset_conv.weight.grad)
    torch.testing.assert_close(module.offset_conv.bias.grad, twin.offset_conv.bias.grad)


def test_deform_conv_matches_torchvision_with_its_offsets():
    from torchvision.ops import deform_conv2d

    torch.manual_seed(0)
    module = LearntOffsetDeformConv2d(4, 4, 3, padding=1, groups=4, offset_groups=2)
    nn.init.normal_(module.offset_conv.bias, std=0.7)
    x = torch.randn(2, 4, 6, 6)
    expected = deform_conv2d(x, module.offset_conv(x), module.weight, padding=1)
    torch.testing.assert_close(module(x), expected)
    assert module.offset_conv.out_channels == 2 * 9 * 2
