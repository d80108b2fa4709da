"""The float32 fast paths of the CPU kernels against the float64 reference: channel blocks in
registers, every vector width, rows of 16 and more, NCHW inputs staged by rows and images, and the
emulated zero padding."""
import os

import pytest
import torch

from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d
from dk_detectron2.layers import _extension
from dk_detectron2.layers.reference import (
    deform_kernel2d_reference,
    deform_kernel_conv2d_reference,
)

from _op_cases import make_case


def test_float32_matches_float64():
    x, offset, rotation, weight, geo = make_case(C=16, H=12, W=11, G=2)
    out64 = deform_kernel_conv2d(x, offset, rotation, weight, **geo)
    out32 = deform_kernel_conv2d(x.float(), offset.float(), rotation.float(), weight.float(), **geo)
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels, groups", [(1, 1), (16, 1), (48, 3), (64, 2), (117, 1), (208, 4)])
def test_float32_strided_forward_channel_blocks_match_reference(channels, groups):
    """float32 runs channel blocks of 64/32/16 in registers plus a scalar tail: every mix of them,
    per rotation group, with taps outside the image and the scope, against the float64 reference."""
    x, _, rotation, weight, geo = make_case(B=2, C=channels, H=9, W=10, G=groups, stride=2, seed=3)
    expected = deform_kernel2d_reference(x, rotation, weight, **geo)
    out = deform_kernel2d(x.float(), rotation.float(), weight.float(), **geo)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def reference_gradients(with_offset, inputs64, geometry, seed):
    """The float64 reference's output, a random output gradient and the inputs' gradients."""
    reference = deform_kernel_conv2d_reference if with_offset else deform_kernel2d_reference
    ref_inputs = [t.clone().requires_grad_() for t in inputs64]
    expected = reference(*ref_inputs, **geometry)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(expected.shape, generator=gen, dtype=inputs64[0].dtype)
    return expected.detach(), grad, torch.autograd.grad(expected, ref_inputs, grad)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("channels, groups", [(1, 1), (16, 1), (48, 3), (64, 2), (117, 1), (208, 4)])
def test_float32_backward_matches_reference(channels, groups, with_offset):
    """float32 backward runs 16-channel vectors plus a partial last vector per rotation group and
    reduces the rotation/offset sums across lanes: every gradient, with taps pushed out of the
    image and the scope, against the float64 reference."""
    x, offset, rotation, weight, geo = make_case(B=2, C=channels, H=9, W=10, G=groups, seed=4)
    inputs64 = [x, offset, rotation, weight] if with_offset else [x, rotation, weight]
    op = deform_kernel_conv2d if with_offset else deform_kernel2d
    _, grad, want = reference_gradients(with_offset, inputs64, geo, seed=5)
    names = ["input", "offset", "rotation", "weight"] if with_offset else ["input", "rotation", "weight"]
    threads = torch.get_num_threads()
    # One thread: the single sweep per (image, rotation group); more: possibly the two passes.
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        try:
            inputs32 = [t.float().requires_grad_() for t in inputs64]
            got = torch.autograd.grad(op(*inputs32, **geo), inputs32, grad.float())
        finally:
            torch.set_num_threads(threads)
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3,
                                       msg=f"grad of {name}, {n} threads")


def assert_float32_matches_reference(with_offset, x, offset, rotation, weight, geo, seed):
    """The float32 op's output and every gradient (for a random grad_output) against float64."""
    inputs64 = [x, offset, rotation, weight] if with_offset else [x, rotation, weight]
    op = deform_kernel_conv2d if with_offset else deform_kernel2d
    expected, grad, want = reference_gradients(with_offset, inputs64, geo, seed=seed)
    inputs32 = [t.float().requires_grad_() for t in inputs64]
    out = op(*inputs32, **geo)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(out, inputs32, grad.float())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("width, scope, groups", [(16, (4, 4), 1), (17, (3, 5), 2), (37, (5, 4), 1)])
def test_float32_rows_of_16_and_more_match_reference(width, scope, groups, with_offset):
    """Rows of 16 outputs or more are sampled in blocks of 16, the last one shifted back to end at
    the row's end, into a zero-padded scope: forward and every gradient, for non-square scopes and
    taps far outside scope and image, against the float64 reference."""
    x, offset, rotation, weight, geo = make_case(B=4, C=32, H=5, W=width, S=scope, G=groups,
                                                 rotation_scale=2.5, seed=6)
    assert_float32_matches_reference(with_offset, x, offset, rotation, weight, geo, seed=7)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("channels, groups", [(7, 1), (56, 2), (100, 1)])
def test_float32_channel_blocks_match_reference(channels, groups, with_offset):
    """The float32 kernels run a group's channels in blocks of 4, 2 and 1 vectors and the rest in
    a generic loop: 7, 28 and 100 channels per group reach every block with 4, 8 and 16 lanes
    (100 = 64 + 32 + 4 = 3 * 32 + 4 = 25 * 4); forward and every gradient against float64."""
    x, offset, rotation, weight, geo = make_case(B=2, C=channels, H=4, W=18, G=groups,
                                                 rotation_scale=2.0, seed=11)
    assert_float32_matches_reference(with_offset, x, offset, rotation, weight, geo, seed=12)


@pytest.mark.parametrize("level, lanes", [("1", 4), ("3", 8)])
def test_every_cpu_vector_width_matches_reference(level, lanes):
    """The kernels with explicit vectors have one copy per x86-64 level (16, 8 and 4 floats per
    vector); the machine runs only its widest. DK_DETECTRON2_CPU_LEVEL lowers the level, so the
    float32 tests above run again on each narrower copy, in a fresh process."""
    import subprocess
    import sys

    env = dict(os.environ, DK_DETECTRON2_CPU_LEVEL=level)
    probe = subprocess.run(
        [sys.executable, "-c",
         "from dk_detectron2.layers._extension import cpu_vector_lanes; print(cpu_vector_lanes())"],
        env=env, capture_output=True, text=True, check=True,
    )
    got_lanes = int(probe.stdout.strip())
    native = _extension.cpu_vector_lanes()
    assert got_lanes == min(lanes, native), (level, got_lanes, native)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "float32_channel_blocks or float32_rows_of_16"],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 3, 2), (1, 4, 1)])
def test_nchw_forward_stages_rows_like_channels_last(stride, padding, dilation, with_offset):
    """An NCHW input is transposed a band of rows at a time (a quarter of the image per band
    here, so a thread refills it several times and keeps the rows it shares), and each output
    row is written straight into the NCHW output: the same values as channels-last, for 1 and 2
    threads, padding that leaves whole output rows outside the image, and the float64 reference."""
    x, offset, rotation, weight, geo = make_case(B=3, C=20, H=41, W=9, stride=stride,
                                                 padding=padding, dilation=dilation,
                                                 rotation_scale=2.0, dtype=torch.float32, seed=13)
    inputs = [x, offset, rotation, weight] if with_offset else [x, rotation, weight]
    op = deform_kernel_conv2d if with_offset else deform_kernel2d
    reference = deform_kernel_conv2d_reference if with_offset else deform_kernel2d_reference
    expected = reference(*[t.double() for t in inputs], **geo)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            nchw = op(*inputs, **geo)
            channels_last = op(x.contiguous(memory_format=torch.channels_last), *inputs[1:], **geo)
            assert nchw.is_contiguous()
            assert channels_last.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(nchw, channels_last, rtol=0, atol=0)
            torch.testing.assert_close(nchw.double(), expected, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_nchw_backward_stages_images_like_channels_last(groups, with_offset):
    """With two images or more per thread the backward of an NCHW input transposes one image at a
    time (input, grad_output, then grad_input back): every gradient equals the channels-last one
    exactly and the float64 reference, for 1 and 2 threads."""
    x, offset, rotation, weight, geo = make_case(B=4, C=24, H=9, W=19, G=groups,
                                                 rotation_scale=2.0, seed=14)
    inputs64 = [x, offset, rotation, weight] if with_offset else [x, rotation, weight]
    op = deform_kernel_conv2d if with_offset else deform_kernel2d
    _, grad, want = reference_gradients(with_offset, inputs64, geo, seed=15)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results = []
            for layout in (torch.contiguous_format, torch.channels_last):
                inputs = [t.float() for t in inputs64]
                inputs[0] = inputs[0].contiguous(memory_format=layout)
                inputs = [t.requires_grad_() for t in inputs]
                got = torch.autograd.grad(op(*inputs, **geo), inputs, grad.float())
                assert got[0].is_contiguous(memory_format=layout)
                results.append(got)
            for nchw, channels_last, w in zip(*results, want):
                torch.testing.assert_close(nchw, channels_last.contiguous(), rtol=0, atol=0)
                torch.testing.assert_close(nchw.double(), w, rtol=1e-3, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


def test_taps_outside_the_image_ignore_non_finite_borders():
    """A tap outside the image reads zero even though the zero padding is emulated: an infinite
    pixel at the border reaches only the outputs whose taps really read it."""
    x, _, rotation, weight, geo = make_case(B=1, C=32, H=6, W=6, dtype=torch.float32)
    expected = deform_kernel2d_reference(x.double(), rotation.double(), weight.double(), **geo)
    x[0, :, 0, 0] = float("inf")
    out = deform_kernel2d(x, rotation, weight, **geo)
    reads_corner = ~torch.isfinite(deform_kernel2d_reference(
        x.double(), rotation.double(), weight.double(), **geo))
    finite = ~reads_corner
    assert finite.any()
    torch.testing.assert_close(out.double()[finite], expected[finite], rtol=1e-4, atol=1e-4)
