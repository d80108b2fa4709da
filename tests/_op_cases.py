"""Shared test cases of the Deformable Kernel operators (tests/test_ops*.py import them)."""
import torch

from dk_detectron2.layers.geometry import output_size, pair

# The geometries every operator test runs: (K, S, stride, padding, dilation, G). Scopes from K
# (S - K = 0) to K + 3, rotation groups 1, 2 and 4, strides, paddings and dilations per axis.
GEOMETRIES = [
    ((1, 1), (1, 1), 1, 0, 1, 1),
    ((1, 1), (3, 2), 2, 0, 1, 2),
    ((3, 3), (3, 3), 1, 1, 1, 1),
    ((3, 3), (4, 4), 1, 1, 1, 4),
    ((3, 3), (5, 5), 2, 1, 1, 2),
    ((3, 3), (6, 6), 1, 2, 2, 1),
    ((3, 3), (4, 5), 2, 0, 2, 4),
    ((5, 5), (5, 5), 1, 2, 1, 2),
    ((5, 5), (7, 8), 2, 2, 1, 1),
    ((3, 5), (4, 6), 1, (1, 2), 1, 2),
    ((2, 3), (3, 3), (1, 2), 1, (2, 1), 1),
]


def make_case(B=2, C=4, H=7, W=6, K=(3, 3), S=(4, 4), stride=1, padding=1, dilation=1, G=1,
              rotation_scale=1.5, offset_scale=2.0, dtype=torch.float64, seed=0, groups=None,
              C_out=None):
    """CPU tensors (x, offset, rotation, weight, geometry kwargs) for one call; rotations and
    offsets are large enough to leave the scope and the image. groups=None: depthwise weights
    [C, 1, Sh, Sw]; else [C_out or C, C / groups, Sh, Sw] (grouped or full)."""
    gen = torch.Generator().manual_seed(seed)
    (sh, sw), (ph, pw) = pair("stride", stride), pair("padding", padding)
    dh, dw = pair("dilation", dilation)
    ho, wo = output_size(H, K[0], sh, ph, dh), output_size(W, K[1], sw, pw, dw)
    x = torch.randn(B, C, H, W, generator=gen, dtype=dtype)
    if groups is None:
        weight = torch.randn(C, 1, *S, generator=gen, dtype=dtype)
    else:
        weight = torch.randn(C_out or C, C // groups, *S, generator=gen, dtype=dtype)
    rotation = torch.randn(B, G * K[0] * K[1] * 2, ho, wo, generator=gen, dtype=dtype)
    offset = torch.randn(B, K[0] * K[1] * 2, ho, wo, generator=gen, dtype=dtype)
    geometry = dict(kernel_size=K, stride=stride, padding=padding, dilation=dilation,
                    rotation_groups=G)
    return x, offset * offset_scale, rotation * rotation_scale, weight, geometry
