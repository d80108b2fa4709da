"""Non-finite values on the CPU follow the rule of csrc/bilinear.h, as the CUDA kernels do.

The rule: a tap whose image point or scope point reads nothing is skipped (its gradients too), and
a bilinear corner outside the grid is never read -- not even with weight 0, since 0 * inf is NaN.
So inf / -inf / NaN at pixel (0, 0), in scope cell 0 or in grad_output reaches only the outputs
and gradients of the taps that really read it. The expected values come from the pure-PyTorch
``skip_reference_*`` of scripts/cuda_emulation/skip_reference.py (the ones the CUDA emulation is checked
against): same non-finite places, finite values within the dtype's tolerance.

Every CPU path is run: depthwise (direct kernels: float32 vectors and the generic loop, the
single sweep per (image, rotation group) and the two-sweep backward, NCHW staging and
channels-last) and grouped / full weights (scope-space columns), float64, float32 and bfloat16;
deform_kernel2d, deform_kernel_conv2d and nd_linear_sample, forward and backward.
"""
import os
import sys

import pytest
import torch

import dk_detectron2.layers  # noqa: F401  (loads dk_detectron2._C)
from dk_detectron2.layers import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts", "cuda_emulation"))
import harness  # noqa: E402  (geometry, test tensors; needs torch only)
import skip_reference  # noqa: E402  (the skip references; needs torch only)

OPS = torch.ops.dk_detectron2
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
PLACES = ("pixel00", "scope-cell0", "grad")


@pytest.fixture(autouse=True)
def one_thread():
    """The backward picks its sweep from B * G and the thread count: pin the count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _geometry(sweep, channels):
    # B * G >= 2 (one thread): the single sweep per (image, rotation group), staging NCHW images;
    # B * G == 1: the two sweeps (parameters, then the input gradient).
    if sweep == "one":
        return harness.Geometry(2, channels, 6, 5, (3, 3), (4, 4), G=2)
    return harness.Geometry(1, channels, 6, 5, (3, 3), (4, 4), G=1)


def _poison(place, x, weight, grad):
    if place == "pixel00":
        x[:, :, 0, 0] = float("inf")
        x[0, 1, 0, 0] = float("nan")
        x[-1, 0, 0, 0] = -float("inf")
    if place == "scope-cell0":
        weight[:, :, 0, 0] = float("inf")
        weight[0, 0, 0, 0], weight[-1, -1, 0, 0] = float("nan"), -float("inf")
    if place == "grad":
        grad[0, :, 0, 0] = float("inf")
        grad[-1, 0, -1, -1], grad[0, -1, 1, 2] = float("nan"), -float("inf")


def _run_cpu(op, x, offset, rotation, weight, grad, geo, dtype, channels_last):
    return harness.run_ops(OPS, op, x, offset, rotation, weight, grad, geo, dtype, channels_last)


def _check(op, kind, place, dtype, channels_last, sweep, channels):
    geo = _geometry(sweep, channels)
    x, offset, rotation, weight = harness.make_tensors(geo, kind, dtype, False, seed=channels + 7)
    ref_shape = (geo.B, harness.weight_channels(kind, geo)[1], *geo.out())
    grad = torch.randn(ref_shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    grad = grad.to(dtype).double()
    _poison(place, x, weight, grad)
    leaves = [t.clone().requires_grad_() for t in (x, offset, rotation, weight)]
    off = leaves[1] if op == "dkc" else None
    if kind == "depthwise":
        ref = skip_reference.skip_reference_depthwise(leaves[0], off, leaves[2], leaves[3], geo)
    else:
        groups = geo.C // weight.shape[1]
        ref = skip_reference.skip_reference_scope_space(leaves[0], off, leaves[2], leaves[3], groups, geo)
    used = leaves if op == "dkc" else [leaves[0], leaves[2], leaves[3]]
    want = torch.autograd.grad(ref, used, grad, allow_unused=True)
    want = [torch.zeros_like(u) if w is None else w for u, w in zip(used, want)]
    out, grads = _run_cpu(op, x, offset, rotation, weight, grad, geo, dtype, channels_last)
    names = ["input", "offset", "rotation", "weight"] if op == "dkc" else [
        "input", "rotation", "weight"]
    errors = []
    skip_reference.compare_nonfinite("output", out, ref.detach(), dtype, errors)
    for n, got, w in zip(names, grads, want):
        skip_reference.compare_nonfinite("grad_" + n, got, w, dtype, errors)
    # The poisoned value must reach something (else the case tests nothing), but not everything.
    bad = int((~torch.isfinite(ref)).sum()) + sum(int((~torch.isfinite(w)).sum()) for w in want)
    assert bad > 0
    assert not errors, errors


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("op", ["dk", "dkc"])
@pytest.mark.parametrize("sweep", ["one", "two"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_depthwise(dtype, channels_last, sweep, op, place):
    """The direct kernels; float32 with channels that fill 4, 1 native vectors and a tail."""
    channels = 166 if dtype == F32 else 6
    _check(op, "depthwise", place, dtype, channels_last, sweep, channels)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("op", ["dk", "dkc"])
@pytest.mark.parametrize("sweep", ["one", "two"])
def test_depthwise_bfloat16(sweep, op, place):
    _check(op, "depthwise", place, BF16, False, sweep, 6)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("op", ["dk", "dkc"])
@pytest.mark.parametrize("kind", ["grouped", "full"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
def test_scope_space(dtype, kind, op, place):
    """Grouped / full weights: scope-space columns, then a GEMM (a non-finite weight reaches every
    output of its channel there, as in any convolution; the reference multiplies the same way)."""
    _check(op, kind, place, dtype, dtype == F32, "one", 4)


@pytest.mark.parametrize("place", ["scope-cell0", "grad"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("M", [4, 37])
def test_nd_linear_sample(M, dtype, place):
    """inf / NaN in cell 0 of the scopes, or in grad_output of points that read nothing and of
    points that do."""
    gen = torch.Generator().manual_seed(11)
    Sh, Sw, P = 4, 3, 23
    inp = torch.randn(M, Sh, Sw, generator=gen, dtype=F64).to(dtype).double()
    coord = (torch.rand(P, 2, generator=gen, dtype=F64) * 8 - 2.5).to(dtype).double()
    coord[0] = torch.tensor([-0.5, -0.5])  # reads cell 0 with weight 0.25
    coord[1] = torch.tensor([-3.0, 1.0])   # reads nothing
    coord[2] = torch.tensor([-0.5, 2.5])   # corner (0, 3) outside: reads cell (0, 2) only
    grad = torch.randn(P, M, generator=gen, dtype=F64).to(dtype).double()
    if place == "scope-cell0":
        inp[:, 0, 0] = float("inf")
        inp[1, 0, 0] = float("nan")
    else:
        grad[1] = float("nan")
        grad[0, 0], grad[2, 1] = float("inf"), -float("inf")
    leaves = [inp.clone().requires_grad_(), coord.clone().requires_grad_()]
    ref = skip_reference.skip_reference_nd(*leaves)
    want = torch.autograd.grad(ref, leaves, grad)
    out = OPS.nd_linear_sample(inp.to(dtype), coord.to(dtype))
    gi, gc = OPS._nd_linear_sample_backward(grad.to(dtype), inp.to(dtype), coord.to(dtype))
    errors = []
    for n, got, w in (("output", out, ref.detach()), ("grad_input", gi, want[0]),
                      ("grad_coord", gc, want[1])):
        skip_reference.compare_nonfinite(n, got, w, dtype, errors)
    assert not errors, errors


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("op", ["dk", "dkc"])
def test_reference_follows_the_rule(op, place):
    """dk_detectron2/layers/reference.py skips the same taps and corners as the skip reference
    (depthwise weights, where the two compute the same sums)."""
    geo = _geometry("one", 4)
    x, offset, rotation, weight = harness.make_tensors(geo, "depthwise", F64, False, seed=5)
    grad = torch.randn((geo.B, geo.C, *geo.out()), generator=torch.Generator().manual_seed(3),
                       dtype=F64)
    _poison(place, x, weight, grad)
    geometry = (geo.K, geo.stride, geo.pad, geo.dil, geo.G)
    results = []
    for skip in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, offset, rotation, weight)]
        used = leaves if op == "dkc" else [leaves[0], leaves[2], leaves[3]]
        off = leaves[1] if op == "dkc" else None
        if skip:
            out = skip_reference.skip_reference_depthwise(leaves[0], off, leaves[2], leaves[3], geo)
        else:
            out = reference.deform_kernel_conv2d_reference(leaves[0], off, leaves[2], leaves[3],
                                                           *geometry)
        results.append([out.detach()] + list(torch.autograd.grad(out, used, grad)))
    errors = []
    for i, (got, want) in enumerate(zip(*results)):
        skip_reference.compare_nonfinite(f"result {i}", got, want, F64, errors)
    assert not errors, errors


def test_nd_reference_follows_the_rule():
    inp = torch.randn(3, 4, 3, dtype=F64)
    inp[:, 0, 0] = float("inf")
    coord = torch.tensor([[-0.5, -0.5], [-3.0, 1.0], [2.5, 1.5], [-0.5, 2.5]], dtype=F64)
    grad = torch.randn(4, 3, dtype=F64)
    grad[1] = float("nan")
    results = []
    for fn in (reference.nd_linear_sample_reference, skip_reference.skip_reference_nd):
        leaves = [inp.clone().requires_grad_(), coord.clone().requires_grad_()]
        out = fn(*leaves)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, grad)))
    errors = []
    for i, (got, want) in enumerate(zip(*results)):
        skip_reference.compare_nonfinite(f"result {i}", got, want, F64, errors)
    assert not errors, errors
