"""Property-based tests of the compiled operators (hypothesis): random geometries, convolution and
rotation groups, every supported dtype, memory formats and non-contiguous views, batch 0, empty
images, and rotations/offsets/coordinates of +-1e30, NaN, +-inf and denormals. Every output and
every gradient is compared with ``layers/reference.py`` evaluated in float64 on the same values;
any disagreement or crash fails.

Budget: the ``ci`` profile (the default) is derandomised (the same examples on every run) with a
fixed number of examples per property; ``HYPOTHESIS_PROFILE=dev`` draws new random examples, and
``DK_FUZZ_EXAMPLES`` sets the number of examples of either.

Also: the operators called from 4 Python threads at once give the serial results, and 1,000
forward+backward calls do not grow the process's resident memory.
"""

import gc
import os
import threading

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample
from dk_detectron2.layers.reference import (
    deform_kernel_conv2d_reference,
    nd_linear_sample_reference,
)

_EXAMPLES = int(os.environ.get("DK_FUZZ_EXAMPLES", "100"))
_COMMON = dict(
    max_examples=_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# CI: the same examples on every run, no shrinking (a failure prints its example as drawn).
settings.register_profile(
    "ci", derandomize=True, phases=[Phase.explicit, Phase.generate], **_COMMON
)
settings.register_profile("dev", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]  # _FLOAT_DTYPES of ops.py
# Tolerance relative to the magnitude of the summed terms: float32 accumulation, results (and,
# in half precision, the bilinear weights of the inputs' precision) rounded once more.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
EXTREMES = [1e30, -1e30, float("nan"), float("inf"), -float("inf")]


def _tiny(dtype):
    return torch.finfo(dtype).tiny / 4  # a denormal (float16/32/64); bfloat16 flushes it to 0


@st.composite
def geometries(draw):
    """One call's shapes: K, S >= K, stride, padding, dilation, B, C_in, groups, C_out, G, H, W."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = kh + draw(st.integers(0, 2)), kw + draw(st.integers(0, 2))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    groups = draw(st.sampled_from([1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 2))
    rotation_groups = draw(st.sampled_from([1, 2]))
    out_channels = groups * rotation_groups * draw(st.integers(1, 2))
    height, width = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    assume(out_h > 0 and out_w > 0)
    return dict(
        batch=draw(st.sampled_from([0, 1, 2])),
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        size=(height, width),
        out_size=(out_h, out_w),
        kernel_size=(kh, kw),
        scope=(sh, sw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        rotation_groups=rotation_groups,
    )


def _values(draw, shape, dtype, extremes):
    """A tensor of ``shape``: normal values (scaled), with some elements replaced by denormals and,
    if ``extremes``, by +-1e30 / NaN / +-inf."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    values = (
        torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * scale
    )
    if values.numel():
        flat = values.view(-1)
        specials = [_tiny(dtype), -_tiny(dtype)] + (EXTREMES if extremes else [])
        count = draw(st.integers(0, min(4, flat.numel())))
        for _ in range(count):
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(specials))
    return values.to(dtype)


def _layout(tensor, layout):
    """``tensor``'s values in the memory ``layout``: contiguous, channels_last, or a strided view
    (every other element of a larger tensor along the last dimension)."""
    tensor = tensor.detach()
    if layout == "channels_last" and tensor.dim() == 4:
        return tensor.clone(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    return tensor.clone(memory_format=torch.contiguous_format)


def _magnitudes(tensors, coordinates):
    """The tensors with values replaced by their magnitudes (non-finite -> 0), except the sample
    coordinates (indices in ``coordinates``), kept as they are: the reference on them gives, per
    element, the sum of the magnitudes of the terms (bilinear weights are >= 0)."""
    return [
        t if i in coordinates else torch.nan_to_num(t.abs(), nan=0.0, posinf=0.0)
        for i, t in enumerate(tensors)
    ]


def _assert_agrees(name, got, expected, bound, dtype):
    """``got`` (dtype) equals ``expected`` (float64) to RTOL[dtype] of the terms' magnitude, with
    NaN and inf at the same places."""
    got = got.double()
    assert (
        got.shape == expected.shape
    ), f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{name}: NaN at other places"
    assert torch.equal(
        got[~finite & ~torch.isnan(expected)], expected[~finite & ~torch.isnan(expected)]
    ), f"{name}: inf differs"
    # Rounding the sample points to the dtype moves every bilinear weight by ~eps, whatever the
    # weight: a tenth of the largest magnitude of the tensor joins each element's own.
    scale = float(bound.abs().max()) if bound.numel() else 0.0
    tolerance = RTOL[dtype] * (bound.abs() + 0.1 * scale) + torch.finfo(dtype).tiny
    error = (got - expected).abs()
    bad = finite & (error > tolerance)
    assert not bad.any(), (
        f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements differ, "
        f"max error {error[bad].max().item():.3g} at tolerance "
        f"{tolerance[bad].min().item():.3g}"
    )


def _check_op(geometry, dtype, layout, with_offset, draw):
    g = geometry
    b, (h, w), (ho, wo) = g["batch"], g["size"], g["out_size"]
    taps = g["kernel_size"][0] * g["kernel_size"][1]
    x = _values(draw, (b, g["in_channels"], h, w), dtype, extremes=False)
    weight = _values(
        draw,
        (g["out_channels"], g["in_channels"] // g["groups"], *g["scope"]),
        dtype,
        extremes=False,
    )
    rotation = _values(draw, (b, g["rotation_groups"] * taps * 2, ho, wo), dtype, extremes=True)
    offset = _values(draw, (b, taps * 2, ho, wo), dtype, extremes=True) if with_offset else None
    geo = dict(
        kernel_size=g["kernel_size"],
        stride=g["stride"],
        padding=g["padding"],
        dilation=g["dilation"],
        rotation_groups=g["rotation_groups"],
    )
    inputs = [x, offset, rotation, weight] if with_offset else [x, rotation, weight]

    def reference(*tensors):
        tensors = list(tensors)
        if not with_offset:
            tensors.insert(1, None)
        return deform_kernel_conv2d_reference(*tensors, **geo)

    leaves = [_layout(t, layout).requires_grad_() for t in inputs]
    op = deform_kernel_conv2d if with_offset else deform_kernel2d
    out = op(*leaves, **geo)
    grad_out = _values(draw, tuple(out.shape), dtype, extremes=False)
    out.backward(grad_out)

    ref_leaves = [t.detach().double().clone().requires_grad_() for t in inputs]
    expected = reference(*ref_leaves)
    expected.backward(grad_out.double())
    names = (
        ["input", "offset", "rotation", "weight"]
        if with_offset
        else ["input", "rotation", "weight"]
    )
    coordinates = {i for i, n in enumerate(names) if n in ("offset", "rotation")}
    abs_leaves = [
        t.detach().clone().requires_grad_()
        for t in _magnitudes([t.double() for t in inputs], coordinates)
    ]
    bound = reference(*abs_leaves)
    _assert_agrees("output", out, expected, bound.detach(), dtype)
    bound.backward(grad_out.double().abs())
    for name, leaf, ref_leaf, abs_leaf in zip(names, leaves, ref_leaves, abs_leaves):
        for t in (ref_leaf, abs_leaf):  # the reference does not reach a tensor of a batch of 0
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        assert leaf.grad is not None, f"grad {name}: missing"
        # Rotation/offset gradients are differences of terms: bound them by the tensor's scale.
        bound = (
            abs_leaf.grad
            if name in ("input", "weight")
            else torch.full_like(
                ref_leaf.grad,
                (
                    float(abs_leaf.grad.abs().max() + ref_leaf.grad.nan_to_num(0).abs().max())
                    if ref_leaf.grad.numel()
                    else 0.0
                ),
            )
        )
        _assert_agrees(f"grad {name}", leaf.grad, ref_leaf.grad, bound, dtype)


@given(
    geometry=geometries(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    data=st.data(),
)
def test_deform_kernel2d_agrees_with_reference(geometry, dtype, layout, data):
    _check_op(geometry, dtype, layout, with_offset=False, draw=data.draw)


@given(
    geometry=geometries(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    data=st.data(),
)
def test_deform_kernel_conv2d_agrees_with_reference(geometry, dtype, layout, data):
    _check_op(geometry, dtype, layout, with_offset=True, draw=data.draw)


@given(
    channels=st.integers(0, 4),
    scope=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    points=st.integers(0, 12),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "strided"]),
    data=st.data(),
)
def test_nd_linear_sample_agrees_with_reference(channels, scope, points, dtype, layout, data):
    scopes = _values(data.draw, (channels, *scope), dtype, extremes=False)
    coord = _values(data.draw, (points, 2), dtype, extremes=True) + 1.0
    leaves = [_layout(scopes, layout).requires_grad_(), _layout(coord, layout).requires_grad_()]
    out = nd_linear_sample(*leaves)
    grad_out = _values(data.draw, tuple(out.shape), dtype, extremes=False)
    out.backward(grad_out)
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in (scopes, coord)]
    expected = nd_linear_sample_reference(*ref_leaves)
    expected.backward(grad_out.double())
    bounds = nd_linear_sample_bounds(scopes, coord, grad_out)
    _assert_agrees("output", out, expected, bounds["output"], dtype)
    _assert_agrees("grad input", leaves[0].grad, ref_leaves[0].grad, bounds["grad input"], dtype)
    _assert_agrees("grad coord", leaves[1].grad, ref_leaves[1].grad, bounds["grad coord"], dtype)


def nd_linear_sample_bounds(scopes, coord, grad_out):
    """Per element, the sum of the magnitudes of the terms of ``nd_linear_sample``'s output and
    of each gradient, from that gradient's own terms (float64):

    - output [P, M]: sum over the 4 corners of |scope value| x bilinear weight (the reference on
      |scopes|);
    - grad input [M, Sh, Sw]: sum over the points of |grad_out| x bilinear weight (<= 1) (the
      reference's backward of |grad_out| on |scopes|); independent of the scope values;
    - grad coord [P, 2]: per point, sum over the channels of |grad_out| x the corners' |scope
      values| (d weight / d coordinate is within [-1, 1] per corner), the same bound for y and x.
    """
    magnitude = torch.nan_to_num(scopes.detach().double().abs(), nan=0.0, posinf=0.0)
    magnitude.requires_grad_()
    grad_magnitude = grad_out.detach().double().abs()
    output = nd_linear_sample_reference(magnitude, coord.detach().double())
    output.backward(grad_magnitude)
    corners = magnitude.detach().flatten(1).max(1).values * 4  # [M]: 4 corners at most
    per_point = grad_magnitude @ corners if corners.numel() else grad_magnitude.sum(1)
    return {"output": output.detach(), "grad input": magnitude.grad,
            "grad coord": per_point.unsqueeze(1).expand(-1, 2).clone()}


@pytest.mark.parametrize("dtype, error", [(torch.float16, 1.04), (torch.bfloat16, 1.2)])
def test_nd_linear_sample_tolerances_see_a_gradient_error_of_a_few_percent(dtype, error):
    """Each gradient's tolerance comes from its own terms: a gradient 4 % too large fails in
    float16, 20 % in bfloat16 (RTOL 2e-2). A tolerance of (1 + sum |scopes|) x sum |grad_out|
    for both gradients is 35-180x their largest value here: it would pass any error."""
    gen = torch.Generator().manual_seed(0)
    scopes = torch.randn(6, 5, 5, generator=gen, dtype=torch.float64).to(dtype)
    coord = (torch.rand(40, 2, generator=gen, dtype=torch.float64) * 5 - 0.5).to(dtype)
    grad_out = torch.randn(40, 6, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [t.double().requires_grad_() for t in (scopes, coord)]
    nd_linear_sample_reference(*leaves).backward(grad_out.double())
    bounds = nd_linear_sample_bounds(scopes, coord, grad_out)
    for index, name in enumerate(("grad input", "grad coord")):
        exact = leaves[index].grad
        _assert_agrees(name, exact.to(dtype), exact, bounds[name], dtype)  # a rounding passes
        with pytest.raises(AssertionError, match=f"{name} .* elements differ"):
            _assert_agrees(name, exact * error, exact, bounds[name], dtype)


# ------------------------------------------------------------------------------------------------
# Threads and memory
# ------------------------------------------------------------------------------------------------
def _call(seed, with_offset, batch=2, size=(9, 8), depthwise=False):
    """One forward+backward; returns the output and the gradients. Grouped: a float64 case of the
    GEMM path (2 input channels per group). Depthwise: a float32 case wide enough for the CPU
    kernels' vector paths and per-call staging buffers."""
    gen = torch.Generator().manual_seed(seed)
    channels, per_group, dtype = (8, 1, torch.float32) if depthwise else (4, 2, torch.float64)
    if depthwise:
        size = (size[0], size[1] + 16)
    x = torch.randn(batch, channels, *size, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(channels, per_group, 5, 5, generator=gen, dtype=dtype,
                         requires_grad=True)
    rotation = (
        torch.randn(batch, 2 * 18, *size, generator=gen, dtype=dtype) * 1.5
    ).requires_grad_()
    offset = (
        torch.randn(batch, 18, *size, generator=gen, dtype=dtype) * 2
    ).requires_grad_()
    geo = dict(kernel_size=3, padding=1, rotation_groups=2)
    if with_offset:
        out = deform_kernel_conv2d(x, offset, rotation, weight, **geo)
    else:
        out = deform_kernel2d(x, rotation, weight, **geo)
    out.backward(torch.cos(out.detach()))
    grads = [
        t.grad for t in ((x, offset, rotation, weight) if with_offset else (x, rotation, weight))
    ]
    return [out.detach()] + grads


@pytest.mark.parametrize("depthwise", [False, True], ids=["grouped", "depthwise"])
def test_four_threads_give_the_serial_results(depthwise):
    calls = [(seed, seed % 2 == 1) for seed in range(16)]
    serial = [_call(*c, depthwise=depthwise) for c in calls]
    parallel = [None] * len(calls)
    errors = []

    def worker(indices):
        try:
            for i in indices:
                parallel[i] = _call(*calls[i], depthwise=depthwise)
        except Exception as error:  # reported below; a thread cannot fail the test itself
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(range(t, len(calls), 4),)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i, (a, b) in enumerate(zip(serial, parallel)):
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"call {i}: threaded result differs from the serial one"


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("depthwise", [False, True], ids=["grouped", "depthwise"])
def test_a_thousand_calls_do_not_grow_memory(depthwise):
    for seed in range(100):  # warm-up: allocator pools, autograd and dispatcher caches
        _call(seed, seed % 2 == 1, batch=1, size=(4, 4), depthwise=depthwise)
    gc.collect()
    before = _resident_bytes()
    for seed in range(1000):
        _call(seed, seed % 2 == 1, batch=1, size=(4, 4), depthwise=depthwise)
    gc.collect()
    grown = _resident_bytes() - before
    # One call holds about 30 kB of tensors (depthwise: 60 kB); a leak of its outputs, gradients
    # or workspace (>= 4 kB per call) would pass 4 MB over 1,000 calls.
    assert grown < 4 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MB over 1,000 calls"
