"""bfloat16 and float16 on the CPU: forward and backward of every operator (deform_kernel2d,
deform_kernel_conv2d, nd_linear_sample) within a rounding of the float64 reference, and sums
(outputs, weight gradients) accumulated in float32."""
import pytest
import torch

from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample
from dk_detectron2.layers.reference import (
    deform_kernel_conv2d_reference,
    nd_linear_sample_reference,
)

from _op_cases import make_case


def _half_precision_errors(dtype, grouped, with_offset, scale_error=1.0):
    """Elements of the half-precision op's output and gradients (times ``scale_error``) outside
    their tolerance against the float64 reference on the same (rounded) values; {name: count}.

    Tolerances: the depthwise kernels accumulate in float32 and round once, so their output is
    within half a unit in the last place (x 1.05) of the exact value; the grouped path also rounds
    its scope-space columns to the dtype, so its errors are bounded by eps x the magnitude of the
    summed terms. Gradients: eps x the magnitude of their terms.
    """
    eps = torch.finfo(dtype).eps
    x, offset, rotation, weight, geo = make_case(C=8, H=8, W=8, dtype=torch.float64)
    if grouped:
        weight = torch.randn(8, 4, 4, 4, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1))
    names = ["input", "offset", "rotation", "weight"] if with_offset else ["input", "rotation",
                                                                           "weight"]
    values = {"input": x, "offset": offset, "rotation": rotation, "weight": weight}
    inputs = [values[n].to(dtype) for n in names]

    def reference(*tensors):
        tensors = list(tensors)
        if not with_offset:
            tensors.insert(1, None)
        return deform_kernel_conv2d_reference(*tensors, **geo)

    leaves = [t.clone().requires_grad_() for t in inputs]
    out = (deform_kernel_conv2d if with_offset else deform_kernel2d)(*leaves, **geo)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2)).to(dtype)
    out.backward(grad_out)
    exact = [t.double().requires_grad_() for t in inputs]
    expected = reference(*exact)
    expected.backward(grad_out.double())
    # Magnitudes of the terms: the reference on |values| (rotations/offsets kept).
    magnitudes = [t.double().abs() if n in ("input", "weight") else t.double()
                  for n, t in zip(names, inputs)]
    magnitudes = [t.requires_grad_() for t in magnitudes]
    bound = reference(*magnitudes)
    bound.backward(grad_out.double().abs())
    if grouped:
        out_tolerance = eps * bound.detach()
    else:
        out_tolerance = 0.5 * eps * 1.05 * expected.detach().abs() + 1e-6 * bound.detach()
    errors = {"output": int(((out.double() * scale_error - expected).abs() > out_tolerance).sum())}
    for name, leaf, ref_leaf, magnitude in zip(names, leaves, exact, magnitudes):
        tolerance = eps * (2 * ref_leaf.grad.abs() + 0.1 * magnitude.grad.abs().max())
        errors[name] = int(((leaf.grad.double() * scale_error - ref_leaf.grad).abs()
                            > tolerance).sum())
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("with_offset", [False, True])
def test_half_precision_forward_and_backward_on_cpu(dtype, grouped, with_offset):
    errors = _half_precision_errors(dtype, grouped, with_offset)
    assert not any(errors.values()), errors
    # The tolerances are tight enough to see a 4 % scale error in the output and the gradients of
    # input and weight (those of rotation and offset are differences of terms, bounded by their
    # tensor's scale).
    scaled = _half_precision_errors(dtype, grouped, with_offset, scale_error=1.04)
    assert scaled["output"] and scaled["input"] and scaled["weight"], scaled


def _nd_linear_sample_errors(dtype, scale_error=1.0):
    """Elements of the half-precision ``nd_linear_sample`` output and gradients (times
    ``scale_error``) outside their tolerance against the float64 reference on the same (rounded)
    values; {name: count}. Tolerances as above, each from its own terms: eps x (2 |exact| + a
    tenth of the largest magnitude of the terms), the magnitudes being the reference on |scopes|
    (output, input gradient: sums of |value| x bilinear weight) and, for the coordinate
    gradient, per point the sum over channels of |grad_out| x 4 x the channel's largest |scope|.
    """
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(3)
    scopes = torch.randn(8, 5, 5, generator=gen, dtype=torch.float64).to(dtype)
    coord = (torch.rand(64, 2, generator=gen, dtype=torch.float64) * 6 - 1).to(dtype)
    grad_out = torch.randn(64, 8, generator=gen, dtype=torch.float64).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (scopes, coord)]
    out = nd_linear_sample(*leaves)
    assert out.dtype == dtype
    out.backward(grad_out)
    exact = [t.double().requires_grad_() for t in (scopes, coord)]
    expected = nd_linear_sample_reference(*exact)
    expected.backward(grad_out.double())
    magnitude = scopes.double().abs().requires_grad_()
    bound = nd_linear_sample_reference(magnitude, coord.double())
    bound.backward(grad_out.double().abs())
    per_point = grad_out.double().abs() @ (magnitude.detach().flatten(1).max(1).values * 4)
    magnitudes = {"output": bound.detach(), "input": magnitude.grad,
                  "coord": per_point.unsqueeze(1).expand(-1, 2)}
    found = {"output": (out, expected.detach()), "input": (leaves[0].grad, exact[0].grad),
             "coord": (leaves[1].grad, exact[1].grad)}
    errors = {}
    for name, (value, reference) in found.items():
        tolerance = eps * (2 * reference.abs() + 0.1 * magnitudes[name].max())
        errors[name] = int(((value.double() * scale_error - reference).abs() > tolerance).sum())
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_nd_linear_sample_forward_and_backward_on_cpu(dtype):
    errors = _nd_linear_sample_errors(dtype)
    assert not any(errors.values()), errors
    # tight enough to see a 4 % scale error in the output and in each gradient
    scaled = _nd_linear_sample_errors(dtype, scale_error=1.04)
    assert all(scaled.values()), scaled


@pytest.mark.parametrize("dtype, kernel, channels", [
    # More terms than the dtype counts exactly (bfloat16: 256, float16: 2048), all 1.0: a sum
    # accumulated in the dtype stalls there; accumulated in float32 it is exact before rounding.
    (torch.bfloat16, 17, 1), (torch.float16, 47, 1),  # depthwise: K*K taps
    (torch.bfloat16, 3, 64), (torch.float16, 3, 512),  # full convolution: C*K*K terms
])
def test_half_precision_sums_accumulate_in_float32(dtype, kernel, channels):
    x = torch.ones(1, channels, kernel, kernel, dtype=dtype)
    weight = torch.ones(1 if channels > 1 else channels, channels if channels > 1 else 1,
                        kernel, kernel, dtype=dtype)
    rotation = torch.zeros(1, kernel * kernel * 2, 1, 1, dtype=dtype)
    out = deform_kernel2d(x, rotation, weight, kernel)
    terms = channels * kernel * kernel
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == torch.tensor(float(terms)).to(dtype).item(), (out.item(), terms)
    # Input gradient: each input element receives one term; weight gradient: one per element.
    x.requires_grad_()
    weight.requires_grad_()
    deform_kernel2d(x, rotation, weight, kernel).backward(torch.ones(1, 1, 1, 1, dtype=dtype))
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(weight.grad, torch.ones_like(weight))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("full", [False, True])
def test_half_precision_weight_gradient_accumulates_in_float32(dtype, kernel, full):
    # Every weight-gradient element sums one term per output position: 48 x 48 = 2304 terms of
    # 1.0. 2304 = 9 x 2^8 is representable in both dtypes, so a float32 accumulator gives it
    # exactly; a running sum in the dtype stalls at 256 (bfloat16) or 2048 (float16).
    terms = 48 * 48
    naive = torch.zeros((), dtype=dtype)
    for _ in range(terms):
        naive = naive + torch.ones((), dtype=dtype)
    assert naive.item() != terms and torch.tensor(float(terms)).to(dtype).item() == terms
    channels = 2
    x = torch.ones(1, channels, 47 + kernel, 47 + kernel, dtype=dtype, requires_grad=True)
    weight = torch.ones(channels, channels if full else 1, kernel, kernel, dtype=dtype,
                        requires_grad=True)
    rotation = torch.zeros(1, kernel * kernel * 2, 48, 48, dtype=dtype)
    out = deform_kernel2d(x, rotation, weight, kernel)
    assert out.shape == (1, channels, 48, 48)
    out.backward(torch.ones_like(out))
    assert weight.grad.dtype == dtype
    assert torch.equal(weight.grad, torch.full_like(weight, terms)), weight.grad.unique()
