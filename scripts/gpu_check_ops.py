"""Calls every dk_detectron2 operator forward and backward on the GPU, in every dtype, on small
shapes that reach every CUDA kernel: depthwise and grouped/full weights, both memory formats,
batch 0, an empty image, C = 1, one-pixel outputs, non-finite rotations and offsets, inf at pixel
(0, 0) and in scope cell 0, a scope whose weight gradient takes several shared-memory passes. Meant
to run under compute-sanitizer (scripts/gpu_check.sh), with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so
that every tensor is its own allocation and an out-of-bounds access cannot hide inside the caching
allocator's blocks.

    python scripts/gpu_check_ops.py [--all-dtypes]   # default: float32 and bfloat16
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d, nd_linear_sample  # noqa

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [
    # (B, C_in, C_out, groups, H, W, K, S, stride, padding, dilation, G); groups None: depthwise
    (2, 8, 8, None, 9, 8, (3, 3), (4, 4), 1, 1, 1, 2),
    (1, 4, 4, None, 5, 5, (3, 3), (12, 11), 1, 1, 1, 1),   # several shared-memory passes
    (2, 1, 1, None, 5, 4, (3, 3), (4, 4), 1, 1, 1, 1),     # C = 1
    (1, 6, 6, None, 3, 3, (3, 3), (4, 4), 1, 0, 1, 3),     # one-pixel output
    (0, 4, 4, None, 5, 5, (3, 3), (4, 4), 1, 1, 1, 1),     # batch 0
    (2, 4, 4, None, 0, 5, (3, 3), (4, 4), 1, 2, 1, 1),     # empty image
    (2, 4, 6, 1, 9, 8, (3, 3), (4, 4), 1, 1, 1, 3),        # full
    (2, 8, 8, 4, 7, 9, (3, 3), (5, 4), 2, 2, 2, 2),        # grouped (ResNeXt-like)
    (1, 2, 4, 1, 1, 1, (1, 1), (2, 2), 1, 0, 1, 1),        # full, one pixel
    (2, 4, 6, 2, 0, 5, (3, 3), (4, 4), 1, 2, 1, 1),        # grouped, empty image
]


def out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def call_all(shape, dtype, channels_last, nonfinite):
    B, c_in, c_out, groups, H, W, K, S, stride, padding, dilation, G = shape
    dev = "cuda"
    ho = out_size(H, K[0], stride, padding, dilation)
    wo = out_size(W, K[1], stride, padding, dilation)
    x = torch.randn(B, c_in, H, W, device=dev, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    per_group = 1 if groups is None else c_in // groups
    weight = torch.randn(c_out, per_group, *S, device=dev, dtype=dtype)
    rotation = torch.randn(B, G * K[0] * K[1] * 2, ho, wo, device=dev, dtype=dtype) * 1.5
    offset = torch.randn(B, K[0] * K[1] * 2, ho, wo, device=dev, dtype=dtype) * 2
    if nonfinite and rotation.numel():
        rotation.view(-1)[::7] = float("nan")
        rotation.view(-1)[3::11] = float("inf")
        offset.view(-1)[::5] = -float("inf")
    if nonfinite and x.numel():
        x[:, :, 0, 0] = float("inf")
        weight[:, :, 0, 0] = float("nan")
    geo = dict(kernel_size=K, stride=stride, padding=padding, dilation=dilation,
               rotation_groups=G)
    for with_offset in (False, True):
        leaves = [t.detach().requires_grad_() for t in
                  ([x, offset, rotation, weight] if with_offset else [x, rotation, weight])]
        op = deform_kernel_conv2d if with_offset else deform_kernel2d
        out = op(*leaves, **geo)
        out.backward(torch.randn_like(out))
    scopes = weight[:, 0].detach().clone().requires_grad_()
    coord = (torch.rand(17, 2, device=dev, dtype=dtype) * 8 - 2).requires_grad_()
    if nonfinite:
        with torch.no_grad():
            coord[0, 0] = float("nan")
    nd_linear_sample(scopes, coord).sum().backward()
    with torch.no_grad():
        nd_linear_sample(scopes, coord[:0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-dtypes", action="store_true",
                        help="float64, float32, float16 and bfloat16 (default: float32, bfloat16)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_ops.py: no GPU visible to torch")
    dtypes = DTYPES if args.all_dtypes else [torch.float32, torch.bfloat16]
    calls = 0
    for shape in SHAPES:
        for dtype in dtypes:
            for channels_last in (False, True):
                call_all(shape, dtype, channels_last, nonfinite=False)
                calls += 1
        call_all(shape, torch.float32, False, nonfinite=True)
        calls += 1
    torch.cuda.synchronize()
    print(f"gpu_check_ops: {calls} rounds of every operator forward + backward completed")


if __name__ == "__main__":
    main()
