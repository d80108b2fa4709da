"""The grouped / full CUDA path (scope-space columns + cuBLAS; MODEL.DK.DEPTHWISE False and
ResNeXt) against the CPU kernels, in float64, float32, float16 and bfloat16; empty shapes on both
paths. Needs a GPU (skips without one); the helpers are those of tests/test_ops_cuda.py.
"""
import pytest
import torch

from test_ops_cuda import arguments, cuda, make_case, names, requires_cuda, run

# ------------------------------------------------------------------------------------------------
# Grouped and full weights: the scope-space + cuBLAS path (MODEL.DK.DEPTHWISE False, ResNeXt)
# ------------------------------------------------------------------------------------------------
GROUPED = [
    # (groups, C_in, C_out, G, K, S, stride, padding, dilation)
    (1, 4, 6, 1, (3, 3), (4, 4), 1, 1, 1),     # full
    (1, 6, 6, 3, (3, 3), (5, 5), 2, 1, 1),     # full, rotation groups
    (2, 4, 6, 3, (3, 3), (4, 4), 1, 1, 1),     # grouped, segments cross rotation groups
    (4, 8, 8, 2, (3, 3), (5, 4), 1, 2, 2),     # ResNeXt-like
    (2, 6, 4, 1, (1, 3), (2, 5), (2, 1), (0, 1), 1),
]


@requires_cuda
@pytest.mark.parametrize("config", GROUPED)
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_and_full_cuda_match_cpu(config, with_offset, channels_last):
    groups, c_in, c_out, G, K, S, stride, padding, dilation = config
    case = make_case(B=2, C=c_in, H=9, W=8, K=K, S=S, stride=stride, padding=padding,
                     dilation=dilation, G=G, groups=groups, C_out=c_out)
    tensors, geo = arguments(case, with_offset), case[-1]
    grad = torch.randn(run(with_offset, tensors, geo)[0].shape, dtype=torch.float64)
    out_cpu, grads_cpu = run(with_offset, tensors, geo, grad)
    gpu = cuda(tensors)
    if channels_last:
        gpu[0] = gpu[0].contiguous(memory_format=torch.channels_last)
    out_gpu, grads_gpu = run(with_offset, gpu, geo, grad)
    assert out_gpu.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-10, atol=1e-10)
    for name, g, c in zip(names(with_offset), grads_gpu, grads_cpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@requires_cuda
@pytest.mark.parametrize("with_offset", [False, True])
def test_grouped_cuda_on_a_larger_shape_in_float32(with_offset):
    """Several row tiles' worth of positions and channels; float32 against the float64 CPU."""
    case = make_case(B=2, C=32, H=40, W=36, S=(5, 5), G=2, groups=4, C_out=64)
    tensors, geo = arguments(case, with_offset), case[-1]
    out_cpu, grads_cpu = run(with_offset, tensors, geo)
    out32, grads32 = run(with_offset, cuda([t.float() for t in tensors]), geo)
    scale = out_cpu.abs().max().item()
    torch.testing.assert_close(out32.double().cpu(), out_cpu, rtol=1e-4, atol=1e-4 * scale)
    for name, g, c in zip(names(with_offset), grads32, grads_cpu):
        torch.testing.assert_close(g.double().cpu(), c, rtol=1e-3,
                                   atol=1e-3 * c.abs().max().item(), msg=f"grad of {name}")


@requires_cuda
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_half_precision_matches_float32_and_cpu(dtype, tolerance, with_offset, groups):
    case = make_case(B=2, C=8, H=12, W=11, S=(5, 5), G=2, groups=groups, C_out=8,
                     dtype=torch.float32)
    tensors = [t.to(dtype) for t in arguments(case, with_offset)]  # values both runs can hold
    grad = torch.randn(run(with_offset, tensors, case[-1])[0].shape).to(dtype)
    out_half, grads_half = run(with_offset, cuda(tensors), case[-1], grad)
    out_float, grads_float = run(with_offset, cuda([t.float() for t in tensors]), case[-1],
                                 grad.float())
    out_cpu, grads_cpu = run(with_offset, [t.float() for t in tensors], case[-1], grad.float())
    assert out_half.dtype == dtype and all(g.dtype == dtype for g in grads_half)
    for name, h, f, c in zip(["output"] + names(with_offset), [out_half, *grads_half],
                             [out_float, *grads_float], [out_cpu, *grads_cpu]):
        scale = f.abs().max().item()
        torch.testing.assert_close(h.float(), f, rtol=tolerance, atol=tolerance * scale, msg=name)
        torch.testing.assert_close(h.float().cpu(), c, rtol=tolerance, atol=tolerance * scale,
                                   msg=name + " (vs CPU)")


@requires_cuda
def test_grouped_half_precision_gemm_does_not_overflow():
    """The GEMM grad_output x weight exceeds float16's range at two scope cells with opposite
    signs (about +-96000) while every gradient fits: the products reach the float32 accumulators
    unrounded, so the gradients are finite and right."""
    x = torch.full((1, 2, 4, 4), 0.01).half()
    weight = torch.empty(4, 2, 2, 1)
    weight[:, :, 0, 0], weight[:, :, 1, 0] = 60.0, -59.75
    rotation = torch.zeros(1, 2, 4, 4)
    grad = torch.full((1, 4, 4, 4), 400.0)
    geo = dict(kernel_size=(1, 1), stride=1, padding=0, dilation=1, rotation_groups=1)
    tensors = [x, rotation.half(), weight.half()]
    out, grads = run(False, cuda(tensors), geo, grad.half())
    out_ref, grads_ref = run(False, [t.double() for t in tensors], geo, grad.double())
    assert all(torch.isfinite(g).all() for g in grads)
    for name, g, r in zip(["output"] + names(False), [out, *grads], [out_ref, *grads_ref]):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double().cpu(), r, rtol=2e-2, atol=2e-2 * scale, msg=name)


@requires_cuda
@pytest.mark.parametrize("with_offset", [False, True])
@pytest.mark.parametrize("groups", [None, 1])
def test_empty_image_and_batch_zero_return_zeros(with_offset, groups):
    """H = 0 with padding: an output of padding only, zero, as are the gradients (the grouped
    path once addressed the zero-byte image here); batch 0: empty results."""
    for B, H in ((2, 0), (0, 5)):
        case = make_case(B=B, C=4, H=H, W=5, padding=2, groups=groups, C_out=6 if groups else None)
        tensors, geo = cuda(arguments(case, with_offset)), case[-1]
        out, grads = run(with_offset, tensors, geo)
        assert out.shape[0] == B and (out.numel() == 0 or out.abs().max() == 0)
        for g, t in zip(grads, tensors):
            assert g.shape == t.shape and (g.numel() == 0 or g.abs().max() == 0)
