"""ONNX translations of the DK operators: layers exported with torch.onnx (dynamo) and run in
ONNX Runtime agree with eager PyTorch, with dynamic batch and image size."""
import onnxruntime  # noqa: F401  (pinned in requirements.txt: its absence is an error)
import pytest
import torch
from torch import nn

from _export_models import with_random_generators
from dk_detectron2.export.onnx_model import OnnxRuntimeRunner, export_onnx
from dk_detectron2.export.verify import compare_outputs
from dk_detectron2.layers import (
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    nd_linear_sample,
)

TOLERANCE = 1e-4  # max |onnx - eager| / max |eager|, per output


def _dynamic(batch=True):
    shapes = {2: torch.export.Dim("height", min=4, max=256), 3: torch.export.Dim("width", min=4, max=256)}
    if batch:
        shapes[0] = torch.export.Dim("batch", min=1, max=64)
    return (shapes,)


def _assert_close(reference: torch.Tensor, value: torch.Tensor):
    """max |value - reference| / max |reference| <= TOLERANCE: ``compare_outputs``' max_rel
    (the export tool's metric), whatever the output's magnitude."""
    found = compare_outputs(reference, value)
    assert found["shapes_equal"] == 1.0, (tuple(reference.shape), tuple(value.shape))
    assert float(reference.abs().max()) > 0  # a zero output would make the check absolute
    assert found["max_rel"] <= TOLERANCE, found


def _check(module, shapes, tmp_path, batch=True):
    generator = torch.Generator().manual_seed(1)
    example = torch.randn(shapes[0], generator=generator)
    path = str(tmp_path / "layer.onnx")
    export_onnx(module, (example,), path, _dynamic(batch))
    runner = OnnxRuntimeRunner(path)
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            _assert_close(module(x), runner(x)[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=6, out_channels=6, groups=6, scope_size=5),  # depthwise, the paper's DK
        dict(in_channels=6, out_channels=6, groups=6, scope_size=4, stride=2, rotation_groups=3),
        dict(in_channels=4, out_channels=6, groups=2, scope_size=5, dilation=2, padding=2,
             rotation_groups=2, rotation_clip="scope"),  # grouped, dilated
        dict(in_channels=3, out_channels=4, groups=1, scope_size=(5, 4)),  # full conv, S - K odd
    ],
)
def test_deform_kernel_layer_in_onnx_runtime(kwargs, tmp_path):
    options = dict(kernel_size=3, padding=1)
    options.update(kwargs)
    module = with_random_generators(DeformKernel2d(**options))
    channels = options["in_channels"]
    _check(module, [(2, channels, 11, 9), (3, channels, 7, 16), (1, channels, 5, 5)], tmp_path)


@pytest.mark.parametrize("groups,stride", [(6, 1), (2, 2)])
def test_deform_kernel_conv_layer_in_onnx_runtime(groups, stride, tmp_path):
    module = DeformKernelConv2d(6, 6, 3, stride=stride, padding=1, groups=groups, scope_size=5,
                                rotation_groups=2)
    module = with_random_generators(module, std=1.5)  # offsets reach past the image border
    _check(module, [(2, 6, 10, 9), (3, 6, 13, 6)], tmp_path)


def test_global_deform_kernel_layer_in_onnx_runtime(tmp_path):
    # The per-sample kernels run as one convolution with batch x groups groups: ONNX's Conv
    # takes the group count as an attribute, so the batch is fixed at export, the size is not.
    module = GlobalDeformKernel2d(6, 6, 3, padding=1, groups=6, scope_size=5, rotation_groups=2)
    module = with_random_generators(module, std=1.0)
    _check(module, [(2, 6, 11, 9), (2, 6, 6, 14)], tmp_path, batch=False)


class _Sampler(nn.Module):
    def forward(self, scopes, coord):
        return nd_linear_sample(scopes, coord)


def test_nd_linear_sample_follows_the_bilinear_rule_in_onnx_runtime(tmp_path):
    scopes = torch.randn(5, 4, 6)
    # Interior points, points in the border band (-1, 0) and (size - 1, size), points outside.
    coord = torch.tensor([[0.5, 1.25], [-0.5, 2.0], [3.5, 5.5], [-1.0, 0.0], [4.0, 1.0],
                          [2.0, -0.999], [1.0, 6.0], [3.0, 5.0]])
    path = str(tmp_path / "sampler.onnx")
    dynamic = ({}, {0: torch.export.Dim("points", min=2, max=1000)})
    export_onnx(_Sampler(), (scopes, coord), path, dynamic)
    runner = OnnxRuntimeRunner(path)
    _assert_close(nd_linear_sample(scopes, coord), runner(scopes, coord)[0])
    more = torch.rand(50, 2) * 8 - 1.5
    _assert_close(nd_linear_sample(scopes, more), runner(scopes, more)[0])


def test_onnx_graph_uses_standard_ops_only(tmp_path):
    import onnx

    module = with_random_generators(DeformKernelConv2d(4, 4, 3, padding=1, groups=4, scope_size=5))
    path = str(tmp_path / "dkc.onnx")
    export_onnx(module, (torch.randn(2, 4, 8, 8),), path, _dynamic())
    graph = onnx.load(path).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert "GatherElements" in {node.op_type for node in graph.node}


def test_runner_without_spinning_tells_onnx_runtime(tmp_path):
    """The export tool times ONNX Runtime in turns with eager PyTorch: its runner turns off the
    intra-op threads' busy-wait, which would slow the eager calls between runs."""
    from dk_detectron2.export.formats import export_format

    module = torch.nn.Conv2d(2, 3, 3, padding=1).eval()
    path = str(tmp_path / "conv.onnx")
    export_onnx(module, (torch.randn(1, 2, 8, 8),), path, _dynamic(True))
    key = "session.intra_op.allow_spinning"
    for runner in (OnnxRuntimeRunner(path, spinning=False), export_format("onnx").load(path)):
        assert runner.session.get_session_options().get_session_config_entry(key) == "0"
