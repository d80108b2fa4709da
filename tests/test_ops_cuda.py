"""The CUDA kernels of the Deformable Kernel operators against the CPU kernels.

Every test but the first needs a GPU and skips without one (scripts/gpu_check.sh runs them on a GPU
machine; tests/test_cuda_emulation.py runs the same kernels emulated on the CPU). The CPU kernels
are themselves tested against the pure-PyTorch reference in tests/test_ops.py, so agreement with
them in float64 checks the CUDA kernels' semantics: the depthwise kernels and the grouped / full
path (scope-space columns + cuBLAS). The half-precision tests check accumulation in float32.
"""
import functools
import warnings

import pytest
import torch

from _op_cases import GEOMETRIES as SHARED_GEOMETRIES
from _op_cases import make_case as shared_make_case
from dk_detectron2.layers import _extension, deform_kernel2d, deform_kernel_conv2d, nd_linear_sample

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

OPS = ("deform_kernel2d", "_deform_kernel2d_backward", "deform_kernel_conv2d",
       "_deform_kernel_conv2d_backward", "nd_linear_sample", "_nd_linear_sample_backward")


# The cases of tests/test_ops.py, a little larger by default.
make_case = functools.partial(shared_make_case, C=8, H=9, W=8)


def run(with_offset, tensors, geometry, grad=None):
    """Output and gradients of every tensor argument (input, [offset], rotation, weight)."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    op = deform_kernel_conv2d if with_offset else deform_kernel2d
    out = op(*tensors, **geometry)
    grad = torch.ones_like(out) if grad is None else grad.to(out.device, out.dtype)
    grads = torch.autograd.grad(out, tensors, grad)
    return out, grads


def arguments(case, with_offset):
    x, offset, rotation, weight, _ = case
    return [x, offset, rotation, weight] if with_offset else [x, rotation, weight]


def names(with_offset):
    return ["input", "offset", "rotation", "weight"] if with_offset else ["input", "rotation", "weight"]


def cuda(tensors):
    return [t.cuda() for t in tensors]


def test_cuda_kernels_are_registered_when_compiled_with_cuda():
    if not _extension.compiled_with_cuda():
        pytest.skip("this build of dk_detectron2._C has no CUDA kernels")
    registered = torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
    for op in OPS:
        assert f"dk_detectron2::{op}" in registered, op


# ------------------------------------------------------------------------------------------------
# CUDA vs CPU on a matrix of geometries (float64: the kernels must agree to rounding)
# ------------------------------------------------------------------------------------------------
GEOMETRIES = SHARED_GEOMETRIES + [
    ((3, 3), (8, 7), 1, 1, 1, 2),  # 56 scope cells: two grad_weight passes in float64
]


@requires_cuda
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_offset", [False, True])
def test_cuda_matches_cpu(geometry, with_offset):
    K, S, stride, padding, dilation, G = geometry
    case = make_case(K=K, S=S, stride=stride, padding=padding, dilation=dilation, G=G)
    tensors, geo = arguments(case, with_offset), case[-1]
    grad = torch.randn(run(with_offset, tensors, geo)[0].shape, dtype=torch.float64)
    out_cpu, grads_cpu = run(with_offset, tensors, geo, grad)
    out_gpu, grads_gpu = run(with_offset, cuda(tensors), geo, grad)
    assert out_gpu.is_cuda
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-10, atol=1e-10)
    for name, g, c in zip(names(with_offset), grads_gpu, grads_cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@requires_cuda
@pytest.mark.parametrize("with_offset", [False, True])
def test_cuda_matches_cpu_on_a_larger_shape(with_offset):
    """Many (b, position) chunks in the weight-gradient reduction, several channels per thread
    (21 per rotation group: uneven chunks) in the 3x3 forward, several blocks everywhere.
    Gradients are compared in float64 only: a float32 rotation may round across a scope cell
    boundary, where the bilinear derivative jumps."""
    case = make_case(B=2, C=42, H=45, W=47, S=(5, 5), G=2)
    tensors, geo = arguments(case, with_offset), case[-1]
    out_cpu, grads_cpu = run(with_offset, tensors, geo)
    out_gpu, grads_gpu = run(with_offset, cuda(tensors), geo)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-10, atol=1e-10)
    for name, g, c in zip(names(with_offset), grads_gpu, grads_cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")
    out32 = run(with_offset, cuda([t.float() for t in tensors]), geo)[0]
    torch.testing.assert_close(out32.double().cpu(), out_cpu, rtol=1e-4, atol=1e-4)


@requires_cuda
def test_samples_pushed_out_of_scope_and_image_read_zero():
    x, offset, rotation, weight, geo = (t.cuda() if torch.is_tensor(t) else t
                                        for t in make_case(C=2, H=5, W=5))
    assert deform_kernel2d(x, torch.full_like(rotation, 50.0), weight, **geo).abs().max() == 0
    out = deform_kernel_conv2d(x, torch.full_like(offset, -50.0), rotation, weight, **geo)
    assert out.abs().max() == 0


# ------------------------------------------------------------------------------------------------
# gradcheck on the GPU in float64
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("G,stride", [(1, 1), (2, 2)])
def test_gradcheck_deform_kernel2d_cuda(G, stride):
    x, _, rotation, weight, geo = make_case(B=2, C=4, H=5, W=5, S=(5, 4), stride=stride, G=G,
                                            rotation_scale=0.7)
    inputs = tuple(t.cuda().requires_grad_() for t in (x, rotation, weight))
    assert torch.autograd.gradcheck(lambda a, b, c: deform_kernel2d(a, b, c, **geo), inputs)


@requires_cuda
@pytest.mark.parametrize("G,dilation", [(1, 1), (2, 2)])
def test_gradcheck_deform_kernel_conv2d_cuda(G, dilation):
    x, offset, rotation, weight, geo = make_case(B=2, C=4, H=6, W=5, S=(4, 4), dilation=dilation,
                                                 padding=2, G=G, rotation_scale=0.7)
    inputs = tuple(t.cuda().requires_grad_() for t in (x, offset, rotation, weight))
    assert torch.autograd.gradcheck(lambda *a: deform_kernel_conv2d(*a, **geo), inputs)


@requires_cuda
def test_gradcheck_nd_linear_sample_cuda():
    gen = torch.Generator().manual_seed(1)
    scopes = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen).cuda().requires_grad_()
    coord = (torch.rand(11, 2, dtype=torch.float64, generator=gen) * 6 - 1.2).cuda()
    assert torch.autograd.gradcheck(nd_linear_sample, (scopes, coord.requires_grad_()))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nd_linear_sample_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(2)
    scopes = torch.randn(64, 4, 5, dtype=dtype, generator=gen)
    coord = torch.rand(300, 2, dtype=dtype, generator=gen) * 9 - 2.5  # many outside
    coord[0, 0], coord[1, 1], coord[2, 0] = float("nan"), float("inf"), -float("inf")
    grad = torch.randn(300, 64, dtype=dtype, generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        s = scopes.to(device).requires_grad_()
        c = coord.to(device).requires_grad_()
        out = nd_linear_sample(s, c)
        results.append([out, *torch.autograd.grad(out, (s, c), grad.to(device))])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, c, g in zip(("output", "grad_input", "grad_coord"), *results):
        torch.testing.assert_close(g.cpu(), c, rtol=tol, atol=tol, msg=name)


# ------------------------------------------------------------------------------------------------
# Half precision: float16 and bfloat16 accumulate in float32
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_offset", [False, True])
def test_half_precision_matches_float32(dtype, tolerance, with_offset):
    case = make_case(B=2, C=16, H=12, W=11, S=(5, 5), G=2, dtype=torch.float32)
    # Both runs see the same (rounded) values, so only the arithmetic's precision differs.
    tensors = cuda([t.to(dtype) for t in arguments(case, with_offset)])
    grad = torch.randn(run(with_offset, tensors, case[-1])[0].shape).to(dtype)
    out_half, grads_half = run(with_offset, tensors, case[-1], grad)
    out_float, grads_float = run(with_offset, [t.float() for t in tensors], case[-1], grad.float())
    assert out_half.dtype == dtype and all(g.dtype == dtype for g in grads_half)
    for name, h, f in zip(["output"] + names(with_offset), [out_half, *grads_half],
                          [out_float, *grads_float]):
        scale = f.abs().max().item()
        torch.testing.assert_close(h.float(), f, rtol=tolerance, atol=tolerance * scale,
                                   msg=name)


# ------------------------------------------------------------------------------------------------
# Layouts, batch 0, non-finite values, determinism, devices
# ------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("with_offset", [False, True])
def test_channels_last_input_gives_channels_last_output_and_grad_input(with_offset):
    case = make_case(C=8, H=10, W=9, G=2)
    tensors, geo = cuda(arguments(case, with_offset)), case[-1]
    out, grads = run(with_offset, tensors, geo)
    tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    out_cl, grads_cl = run(with_offset, tensors, geo)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert grads_cl[0].is_contiguous(memory_format=torch.channels_last)
    assert all(g.is_contiguous() for g in grads_cl[1:])
    torch.testing.assert_close(out_cl, out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(names(with_offset), grads_cl, grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")


@requires_cuda
def test_non_contiguous_arguments():
    x, offset, rotation, weight, geo = (t.cuda() if torch.is_tensor(t) else t
                                        for t in make_case(C=8, G=2))
    expected = deform_kernel_conv2d(x, offset, rotation, weight, **geo)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    offset_nc = torch.stack([offset, offset], dim=2).flatten(1, 2)[:, ::2]
    rotation_nc = torch.stack([rotation, rotation], dim=-1)[..., 0]
    weight_nc = torch.cat([weight, weight], dim=1)[:, :1]
    out = deform_kernel_conv2d(x_t, offset_nc, rotation_nc, weight_nc, **geo)
    torch.testing.assert_close(out, expected)


@requires_cuda
def test_batch_zero_returns_empty_output_and_gradients():
    x, offset, rotation, weight, geo = (t.cuda() if torch.is_tensor(t) else t
                                        for t in make_case(B=0, C=4))
    x.requires_grad_()
    weight.requires_grad_()
    out = deform_kernel_conv2d(x, offset, rotation, weight, **geo)
    assert out.shape == (0, 4, 9, 8) and out.is_cuda
    out.sum().backward()
    assert x.grad.shape == x.shape and weight.grad.abs().sum() == 0
    out = deform_kernel2d(x, rotation, weight, **geo)
    assert out.shape == (0, 4, 9, 8)
    weight.grad = None
    out.sum().backward()
    assert weight.grad.shape == weight.shape and weight.grad.abs().sum() == 0
    scopes = weight[:, 0].detach()
    assert nd_linear_sample(scopes, torch.zeros(0, 2, dtype=scopes.dtype, device="cuda")).shape == (0, 4)


@requires_cuda
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_rotation_and_offset_read_zero(bad):
    case = make_case(C=4, G=2)
    x, offset, rotation, weight, geo = case
    rotation, offset = rotation.clone(), offset.clone()
    rotation[:, :, 1, 1] = bad
    rotation[:, ::3, 2:4, 0] = bad
    offset[:, :, 2, 2] = bad
    offset[:, 1::4, 0, 1:3] = bad
    tensors = [x, offset, rotation, weight]
    out_cpu, grads_cpu = run(True, tensors, geo)
    out_gpu, grads_gpu = run(True, cuda(tensors), geo)
    assert torch.isfinite(out_gpu).all() and all(torch.isfinite(g).all() for g in grads_gpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu)
    for name, g, c in zip(names(True), grads_gpu, grads_cpu):
        torch.testing.assert_close(g.cpu(), c, msg=f"grad of {name}")
    assert grads_gpu[2][:, :, 1, 1].abs().max() == 0  # a zero read passes no gradient
    out2d, grads2d = run(False, cuda([x, rotation, weight]), geo)
    torch.testing.assert_close(out2d.cpu(), run(False, [x, rotation, weight], geo)[0])
    assert all(torch.isfinite(g).all() for g in grads2d)


@requires_cuda
def test_backward_without_atomics_is_deterministic():
    """Gradients computed without atomics are bitwise reproducible: with depthwise weights every
    gradient of deform_kernel2d, and every gradient but grad_input of deform_kernel_conv2d (its
    bilinear image reads scatter grad_input with atomics, as do nd_linear_sample's grad_input
    and the grouped / full path's grad_input)."""
    case = make_case(B=2, C=32, H=30, W=30, G=2, dtype=torch.float32)
    for with_offset in (False, True):
        tensors, geo = cuda(arguments(case, with_offset)), case[-1]
        first, second = run(with_offset, tensors, geo)[1], run(with_offset, tensors, geo)[1]
        deterministic = first[1:] if with_offset else first
        for name, a, b in zip(names(with_offset)[-len(deterministic):], deterministic,
                              second[-len(deterministic):]):
            assert torch.equal(a, b), name


def _alerts(fn):
    """The non-determinism alerts fn raises under torch.use_deterministic_algorithms(True,
    warn_only=True), as strings."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
    return [str(w.message) for w in caught if "dk_detectron2" in str(w.message)]


@requires_cuda
@pytest.mark.parametrize("with_offset,groups,expected", [
    (False, None, False),  # depthwise deform_kernel2d: gathers only
    (True, None, True),    # depthwise deform_kernel_conv2d: grad_input atomics
    (False, 2, True),      # grouped path: grad_input atomics
    (True, 1, True),       # full path
])
def test_atomic_gradients_raise_the_non_determinism_alert(with_offset, groups, expected):
    case = make_case(C=4, H=6, W=6, groups=groups, C_out=6 if groups else None)
    tensors, geo = cuda(arguments(case, with_offset)), case[-1]
    alerts = _alerts(lambda: run(with_offset, tensors, geo))
    assert bool(alerts) == expected, alerts
    if expected:
        assert "does not have a deterministic implementation" in alerts[0]


@requires_cuda
def test_nd_linear_sample_backward_raises_the_non_determinism_alert():
    scopes = torch.randn(4, 3, 3, device="cuda", requires_grad=True)
    coord = torch.rand(5, 2, device="cuda") * 2
    alerts = _alerts(lambda: nd_linear_sample(scopes, coord).sum().backward())
    assert alerts and "nd_linear_sample" in alerts[0]
    with pytest.raises(RuntimeError, match="deterministic"):
        torch.use_deterministic_algorithms(True)
        try:
            nd_linear_sample(scopes, coord).sum().backward()
        finally:
            torch.use_deterministic_algorithms(False)


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_input_device():
    case = make_case(C=4)
    tensors = [t.to("cuda:1") for t in arguments(case, True)]
    out, grads = run(True, tensors, case[-1])
    assert out.device == torch.device("cuda:1") and all(g.device == out.device for g in grads)
    torch.testing.assert_close(out.cpu(), run(True, arguments(case, True), case[-1])[0])
