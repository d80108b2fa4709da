"""The compiled Deformable Kernel operators against the pure-PyTorch reference (CPU): agreement on
a matrix of geometries, gradcheck, identities, layouts and edge cases, argument errors, and the
torch.library integration. The float32 fast paths are tested in test_ops_float32_paths.py,
bfloat16 and float16 in test_ops_half_precision.py."""
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

import dk_detectron2
from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample
from dk_detectron2.layers import _extension
from dk_detectron2.layers.reference import (
    deform_kernel2d_reference,
    deform_kernel_conv2d_reference,
    nd_linear_sample_reference,
)

from _op_cases import GEOMETRIES, make_case


def test_compiled_extension_is_in_use():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = _extension.extension_path()
    assert path.startswith(os.path.join(root, "dk_detectron2")), path
    assert hasattr(torch.ops.dk_detectron2, "deform_kernel2d")
    kernel = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    assert "dk_detectron2::deform_kernel2d" in kernel
    assert dk_detectron2.layers.deform_kernel2d.__module__ == "dk_detectron2.layers.ops"


# ------------------------------------------------------------------------------------------------
# Agreement with the reference on a matrix of geometries
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_offset", [False, True])
def test_matches_reference(geometry, with_offset):
    K, S, stride, padding, dilation, G = geometry
    x, offset, rotation, weight, geo = make_case(
        C=8, H=9, W=8, K=K, S=S, stride=stride, padding=padding, dilation=dilation, G=G
    )
    inputs = [x, offset, rotation, weight] if with_offset else [x, rotation, weight]
    inputs = [t.clone().requires_grad_() for t in inputs]
    if with_offset:
        out = deform_kernel_conv2d(*inputs, **geo)
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        expected = deform_kernel_conv2d_reference(*ref_inputs, **geo)
    else:
        out = deform_kernel2d(*inputs, **geo)
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        expected = deform_kernel2d_reference(*ref_inputs, **geo)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, ref_inputs, grad)
    names = ["input", "offset", "rotation", "weight"] if with_offset else ["input", "rotation", "weight"]
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_samples_pushed_out_of_scope_and_image_read_zero():
    x, offset, rotation, weight, geo = make_case(C=2, H=5, W=5)
    far = torch.full_like(rotation, 50.0)
    assert deform_kernel2d(x, far, weight, **geo).abs().max() == 0
    assert deform_kernel_conv2d(x, torch.full_like(offset, -50.0), rotation, weight, **geo).abs().max() == 0


# ------------------------------------------------------------------------------------------------
# gradcheck in float64, every op and every differentiable argument
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G,stride", [(1, 1), (2, 2)])
def test_gradcheck_deform_kernel2d(G, stride):
    x, _, rotation, weight, geo = make_case(B=2, C=4, H=5, W=5, S=(5, 4), stride=stride, G=G,
                                            rotation_scale=0.7)
    inputs = tuple(t.requires_grad_() for t in (x, rotation, weight))
    assert torch.autograd.gradcheck(lambda a, b, c: deform_kernel2d(a, b, c, **geo), inputs)


@pytest.mark.parametrize("G,dilation", [(1, 1), (2, 2)])
def test_gradcheck_deform_kernel_conv2d(G, dilation):
    x, offset, rotation, weight, geo = make_case(B=2, C=4, H=6, W=5, S=(4, 4), dilation=dilation,
                                                 padding=2, G=G, rotation_scale=0.7)
    inputs = tuple(t.requires_grad_() for t in (x, offset, rotation, weight))
    assert torch.autograd.gradcheck(lambda *a: deform_kernel_conv2d(*a, **geo), inputs)


def test_gradcheck_nd_linear_sample():
    gen = torch.Generator().manual_seed(1)
    scopes = torch.randn(3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    coord = (torch.rand(11, 2, dtype=torch.float64, generator=gen) * 6 - 1.2).requires_grad_()
    assert torch.autograd.gradcheck(nd_linear_sample, (scopes, coord))


def test_nd_linear_sample_matches_reference():
    gen = torch.Generator().manual_seed(2)
    scopes = torch.randn(6, 4, 4, dtype=torch.float64, generator=gen)
    coord = torch.rand(30, 2, dtype=torch.float64, generator=gen) * 8 - 2  # many outside
    torch.testing.assert_close(nd_linear_sample(scopes, coord),
                               nd_linear_sample_reference(scopes, coord))
    # Integer points read the cells themselves.
    grid = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(nd_linear_sample(scopes, grid),
                               torch.stack([scopes[:, 1, 2], scopes[:, 3, 0]]))


# ------------------------------------------------------------------------------------------------
# Identities
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 2)])
def test_scope_equal_kernel_and_zero_rotation_is_depthwise_conv(stride, padding, dilation):
    x, _, rotation, weight, geo = make_case(C=6, H=10, W=9, K=(3, 3), S=(3, 3), stride=stride,
                                            padding=padding, dilation=dilation, G=3)
    out = deform_kernel2d(x, torch.zeros_like(rotation), weight, **geo)
    expected = F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation, groups=6)
    torch.testing.assert_close(out, expected)


def test_even_scope_margin_zero_rotation_reads_the_centre():
    x, _, rotation, weight, geo = make_case(C=3, K=(3, 3), S=(5, 5))
    out = deform_kernel2d(x, torch.zeros_like(rotation), weight, **geo)
    torch.testing.assert_close(out, F.conv2d(x, weight[:, :, 1:4, 1:4], padding=1, groups=3))


def test_zero_offset_equals_deform_kernel2d():
    x, offset, rotation, weight, geo = make_case(C=4, G=2, stride=2)
    torch.testing.assert_close(
        deform_kernel_conv2d(x, torch.zeros_like(offset), rotation, weight, **geo),
        deform_kernel2d(x, rotation, weight, **geo),
    )


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 2)])
def test_zero_rotation_equals_torchvision_deform_conv2d(stride, padding, dilation):
    x, offset, rotation, weight, geo = make_case(C=5, H=9, W=10, K=(3, 3), S=(3, 3),
                                                 stride=stride, padding=padding, dilation=dilation)
    out = deform_kernel_conv2d(x, offset, torch.zeros_like(rotation), weight, **geo)
    expected = torchvision.ops.deform_conv2d(x, offset, weight, stride=stride, padding=padding,
                                             dilation=dilation)
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------------------------------------------
# Layouts, batch 0, non-finite values, determinism
# ------------------------------------------------------------------------------------------------
def test_channels_last_and_non_contiguous_inputs():
    x, offset, rotation, weight, geo = make_case(C=8, H=8, W=8, G=2)
    expected = deform_kernel_conv2d(x, offset, rotation, weight, **geo)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = deform_kernel_conv2d(x_cl, offset, rotation, weight, **geo)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)
    # Non-contiguous views of every argument.
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    offset_nc = torch.stack([offset, offset], dim=2).flatten(1, 2)[:, ::2]
    rotation_nc = torch.stack([rotation, rotation], dim=-1)[..., 0]
    weight_nc = torch.cat([weight, weight], dim=1)[:, :1]
    assert not (x_t.is_contiguous() or rotation_nc.is_contiguous() or weight_nc.is_contiguous())
    out = deform_kernel_conv2d(x_t, offset_nc, rotation_nc, weight_nc, **geo)
    torch.testing.assert_close(out, expected)


def test_channels_last_gradients_match():
    x, offset, rotation, weight, geo = make_case(C=8, H=8, W=8)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.detach().clone().contiguous(memory_format=fmt).requires_grad_()
        wi = weight.clone().requires_grad_()
        deform_kernel2d(xi, rotation, wi, **geo).square().sum().backward()
        grads.append((xi.grad, wi.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_batch_zero_returns_empty_output_and_gradients():
    x, offset, rotation, weight, geo = make_case(B=0, C=4)
    x.requires_grad_()
    weight.requires_grad_()
    out = deform_kernel_conv2d(x, offset, rotation, weight, **geo)
    assert out.shape == (0, 4, 7, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape and weight.grad.abs().sum() == 0
    assert deform_kernel2d(x, rotation, weight, **geo).shape == (0, 4, 7, 6)
    assert nd_linear_sample(weight[:, 0], torch.zeros(0, 2, dtype=weight.dtype)).shape == (0, 4)


@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_image_reads_zero_everywhere(with_offset, full, channels_last):
    """H = 0 with padding 2: an output made of padding only. It is zero, as are all gradients,
    on the depthwise and the grouped/full path (no read of the empty image). An empty input has
    no memory format of its own (every stride fits both), so the output's layout is not checked."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 0, 5, dtype=torch.float64)
    weight = torch.randn(6 if full else 4, 4 if full else 1, 4, 4, generator=gen, dtype=torch.float64)
    rotation = torch.randn(2, 18, 2, 7, generator=gen, dtype=torch.float64)
    offset = torch.randn(2, 18, 2, 7, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_() for t in ([x, offset, rotation, weight] if with_offset
                                           else [x, rotation, weight])]
    geo = dict(kernel_size=3, padding=2)
    out = (deform_kernel_conv2d if with_offset else deform_kernel2d)(*inputs, **geo)
    assert out.shape == (2, weight.shape[0], 2, 7) and out.abs().max() == 0
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    for grad, tensor in zip(grads, inputs):
        assert grad.shape == tensor.shape and (grad.numel() == 0 or grad.abs().max() == 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_rotation_and_offset_read_zero(bad):
    x, offset, rotation, weight, geo = make_case(C=4, G=1)
    rotation, offset = rotation.clone(), offset.clone()
    rotation[:, :, 1, 1] = bad
    offset[:, :, 2, 2] = bad
    inputs = [t.requires_grad_() for t in (x, offset, rotation, weight)]
    out = deform_kernel_conv2d(*inputs, **geo)
    ref = deform_kernel_conv2d_reference(*[t.detach() for t in inputs], **geo)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    for t in inputs:
        assert torch.isfinite(t.grad).all()
    # A sample point that reads zero passes no gradient to its rotation.
    assert rotation.grad[:, :, 1, 1].abs().max() == 0


def test_backward_is_deterministic_across_runs_and_threads():
    x, offset, rotation, weight, geo = make_case(B=2, C=32, H=20, W=20, G=2, dtype=torch.float32)
    results = []
    threads = torch.get_num_threads()
    for n in (1, max(2, threads), max(2, threads)):
        torch.set_num_threads(n)
        try:
            inputs = [t.clone().requires_grad_() for t in (x, offset, rotation, weight)]
            deform_kernel_conv2d(*inputs, **geo).sin().sum().backward()
            results.append([t.grad for t in inputs])
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ------------------------------------------------------------------------------------------------
def _call(**overrides):
    x, offset, rotation, weight, geo = make_case(C=4, dtype=torch.float32)
    args = dict(input=x, offset=offset, rotation=rotation, weight=weight, **geo)
    args.update(overrides)
    return deform_kernel_conv2d(**args)


@pytest.mark.parametrize(
    "overrides,error,message",
    [  # the whole message: the argument, what was expected and what was received
        (dict(input=torch.randn(4, 7, 6)), ValueError,
         "input must be 4-D [B, C_in, H, W], got shape (4, 7, 6)"),
        (dict(input=torch.randn(2, 4, 7, 6).int()), TypeError,
         "input must be floating point (float16, bfloat16, float32 or float64), got torch.int32"),
        (dict(weight=torch.randn(5, 2, 4, 4)), ValueError,
         "weight.size(0) (C_out = 5) must be divisible by groups (C_in / weight.size(1) = 2)"),
        (dict(weight=torch.randn(4, 3, 4, 4)), ValueError,
         "weight.size(1) (3) must divide input channels (4): weight is "
         "[C_out, C_in/groups, Sh, Sw]"),
        (dict(weight=torch.randn(4, 1, 4, 4).double()), TypeError,
         "weight must have the dtype of input (torch.float32), got torch.float64"),
        (dict(weight=torch.randn(4, 1, 2, 4)), ValueError,
         "the scope (weight's last two dims, 2x4) must be at least kernel_size 3x3"),
        (dict(rotation=torch.randn(2, 18, 7, 5)), ValueError,
         "rotation must be [B, G*Kh*Kw*2, Ho, Wo] = [2, 18, 7, 6] for G = 1, K = (3, 3), "
         "got [2, 18, 7, 5]"),
        (dict(rotation=torch.randn(2, 36, 7, 6)), ValueError,
         "rotation must be [B, G*Kh*Kw*2, Ho, Wo] = [2, 18, 7, 6] for G = 1, K = (3, 3), "
         "got [2, 36, 7, 6]"),
        (dict(offset=torch.randn(2, 9, 7, 6)), ValueError,
         "offset must be [B, Kh*Kw*2, Ho, Wo] = [2, 18, 7, 6] for K = (3, 3), got [2, 9, 7, 6]"),
        (dict(offset="zeros"), TypeError,
         "offset must be a torch.Tensor [B, Kh*Kw*2, Ho, Wo], got str"),
        (dict(stride=0), ValueError, "stride must be positive, got 0"),
        (dict(stride=(1, -1)), ValueError, "stride must be positive, got (1, -1)"),
        (dict(padding=-1), ValueError, "padding must be non-negative, got -1"),
        (dict(dilation=0), ValueError, "dilation must be positive, got 0"),
        (dict(kernel_size=(3, 3, 3)), TypeError,
         "kernel_size must be an int or a pair of ints, got (3, 3, 3)"),
        (dict(kernel_size=1.5), TypeError, "kernel_size must be an int or a pair of ints, got 1.5"),
        (dict(rotation_groups=3), ValueError,
         "output channels (4) must be divisible by rotation_groups (3)"),
        (dict(rotation_groups=0), ValueError, "rotation_groups must be positive, got 0"),
        (dict(input=torch.randn(2, 4, 1, 1), padding=0), ValueError,
         "input of spatial size 1x1 is too small for kernel_size (3, 3), stride (1, 1), padding "
         "(0, 0), dilation (1, 1) (output would be -1x-1)"),
    ],
)
def test_bad_input_raises_clear_error(overrides, error, message):
    with pytest.raises(error) as info:
        _call(**overrides)
    assert str(info.value) == message


def test_device_mismatch_is_reported():
    x, offset, rotation, weight, geo = make_case(C=4, dtype=torch.float32)
    with pytest.raises(ValueError) as info:
        deform_kernel2d(x, rotation.to("meta"), weight, **geo)
    assert str(info.value) == "rotation must be on the device of input (cpu), got meta"


@pytest.mark.parametrize("scopes, coord, error, message", [
    ((2, 3, 3), (4, 3), ValueError, "coord must be [P, 2] (y, x), got shape (4, 3)"),
    ((3, 3), (4, 2), ValueError, "input must be 3-D [M, Sh, Sw], got shape (3, 3)"),
    ((2, 3, 3), (4, 2, "double"), TypeError,
     "coord must have the dtype of input (torch.float32), got torch.float64"),
])
def test_nd_linear_sample_bad_input(scopes, coord, error, message):
    coord_tensor = torch.randn(*[n for n in coord if isinstance(n, int)])
    if "double" in coord:
        coord_tensor = coord_tensor.double()
    with pytest.raises(error) as info:
        nd_linear_sample(torch.randn(*scopes), coord_tensor)
    assert str(info.value) == message


# ------------------------------------------------------------------------------------------------
# torch.library integration: opcheck, torch.compile, jit.trace, autocast
# ------------------------------------------------------------------------------------------------
def test_opcheck_all_operators():
    x, offset, rotation, weight, geo = make_case(C=4, G=2)
    k, s, p, d = (3, 3), (1, 1), (1, 1), (1, 1)
    torch.library.opcheck(torch.ops.dk_detectron2.deform_kernel2d.default,
                          (x, rotation, weight.requires_grad_(), k, s, p, d, 2))
    torch.library.opcheck(torch.ops.dk_detectron2.deform_kernel_conv2d.default,
                          (x.requires_grad_(), offset, rotation, weight, k, s, p, d, 2))
    torch.library.opcheck(torch.ops.dk_detectron2.nd_linear_sample.default,
                          (weight[:, 0].detach(), torch.rand(5, 2, dtype=torch.float64)))


class _TinyDK(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rotation = torch.nn.Conv2d(4, 18, 3, padding=1)
        self.weight = torch.nn.Parameter(torch.randn(4, 1, 4, 4))

    def forward(self, x):
        return deform_kernel2d(x, self.rotation(x), self.weight, 3, padding=1).relu()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_of_a_module_using_the_op(backend):
    """Values and gradients of the compiled module are those of the eager one."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyDK()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    expected = model(x)
    expected.pow(2).sum().backward()
    expected_grads = [t.grad.clone() for t in (x, model.weight, model.rotation.weight)]
    for t in (x, model.weight, model.rotation.weight):
        t.grad = None
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    for name, t, grad in zip(("input", "weight", "rotation conv"),
                             (x, model.weight, model.rotation.weight), expected_grads):
        torch.testing.assert_close(t.grad, grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_jit_trace():
    model = _TinyDK().eval()
    x = torch.randn(1, 4, 8, 8)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


def test_autocast_computes_in_float32():
    """Under autocast the op casts its inputs to float32: values and gradients are those of the
    float32 op on the (bfloat16-rounded) inputs, exactly; a bfloat16 computation would differ."""
    x, offset, rotation, weight, geo = make_case(C=4, dtype=torch.float32)
    x16 = x.bfloat16().requires_grad_()
    weight32 = weight.clone().requires_grad_()
    rotation32 = rotation.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_kernel2d(x16, rotation32, weight32, **geo)
    assert out.dtype == torch.float32
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    leaves = [x16.detach().float().requires_grad_(), rotation.clone().requires_grad_(),
              weight.clone().requires_grad_()]
    expected = deform_kernel2d(*leaves, **geo)
    expected.backward(grad_out)
    assert torch.equal(out, expected)
    assert torch.equal(x16.grad, leaves[0].grad.bfloat16())  # cast back to the input's dtype
    assert torch.equal(rotation32.grad, leaves[1].grad)
    assert torch.equal(weight32.grad, leaves[2].grad)
    in_bfloat16 = deform_kernel2d(x16.detach(), rotation.bfloat16(), weight.bfloat16(), **geo)
    assert not torch.equal(in_bfloat16.float(), expected.detach())


def test_scope_geometry_matrix_is_covered():
    """Guards the matrix above: every S from K to K+3 appears for K = 3."""
    scopes = {S[0] - K[0] for K, S, *_ in GEOMETRIES if K == (3, 3)}
    assert scopes >= {0, 1, 2, 3}
    groups = {G for *_, G in GEOMETRIES}
    assert groups == {1, 2, 4}
