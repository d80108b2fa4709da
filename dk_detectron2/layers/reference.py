"""Slow, readable pure-PyTorch reference of every Deformable Kernel operator.

These functions define the semantics that the compiled kernels implement; the tests compare the
two. They are built only from differentiable PyTorch ops (gathers and arithmetic), so autograd
gives the reference gradients too. Memory grows with ``B * C_out * C_in/groups * Ho * Wo`` per
tap: use them on small shapes only.

The bilinear rule (shared with ``csrc/bilinear.h``): a point with ``y <= -1``, ``y >= height``,
``x <= -1`` or ``x >= width`` (or a non-finite coordinate) reads zero; otherwise the four corners
``floor(y) + {0, 1}`` x ``floor(x) + {0, 1}`` contribute their bilinear weights, and corners
outside the grid contribute zero.

Non-finite values follow the same rule as the kernels: a tap whose image point or scope point
reads nothing is skipped, and a corner outside the grid is never read. Both are masked with
``torch.where``, never multiplied by a weight 0 (0 * inf is NaN), so an inf or NaN at pixel
(0, 0), in scope cell 0 or in the output gradient reaches only the outputs and gradients of the
taps that really read it.
"""
from typing import Iterator, Optional, Tuple

import torch

from .geometry import output_size, pair, scope_base

__all__ = [
    "bilinear_corners",
    "deform_kernel2d_reference",
    "deform_kernel_conv2d_reference",
    "nd_linear_sample_reference",
]


def reads_anything(y: torch.Tensor, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Whether each point ``(y, x)`` reads anything (False for a non-finite coordinate)."""
    return (y > -1) & (y < height) & (x > -1) & (x < width)


def inside_corners(
    y: torch.Tensor, x: torch.Tensor, height: int, width: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yields ``(flat_index, weight, inside)`` for the four corners of each point ``(y, x)``.

    ``inside`` tells whether the corner is a cell of the grid (and the point reads anything);
    where it is False, ``flat_index`` is 0 and ``weight`` 0 (selected, so no gradient flows
    through it). Read a corner with :func:`_masked`, never as ``value * weight`` alone.
    """
    inside = reads_anything(y, x, height, width)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0 = torch.floor(y).detach()
    x0 = torch.floor(x).detach()
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    for dy, dx, weight in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        cy, cx = y0 + dy, x0 + dx
        valid = inside & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        index = torch.where(valid, cy * width + cx, torch.zeros_like(cy)).long()
        yield index, torch.where(valid, weight, torch.zeros_like(weight)), valid


def bilinear_corners(
    y: torch.Tensor, x: torch.Tensor, height: int, width: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yields ``(flat_index, weight)`` for the four corners of each point ``(y, x)``.

    ``flat_index = cy * width + cx`` (0 for a corner outside the grid) and ``weight`` is the
    differentiable bilinear weight (0 for a corner outside the grid, or for a point that reads
    zero). Shapes of ``y`` and ``x`` are kept. Exact for finite values; see
    :func:`inside_corners` for the mask that keeps a non-finite cell 0 out.
    """
    for index, weight, _ in inside_corners(y, x, height, width):
        yield index, weight


def _masked(value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``value`` where ``keep``, else 0: selected, not multiplied, so neither the result nor
    autograd's chain rule meets 0 * inf."""
    return torch.where(keep, value, torch.zeros_like(value))


def deform_kernel_conv2d_reference(
    input: torch.Tensor,
    offset: Optional[torch.Tensor],
    rotation: torch.Tensor,
    weight: torch.Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    rotation_groups: int = 1,
) -> torch.Tensor:
    """Reference of ``deform_kernel_conv2d`` (and of ``deform_kernel2d`` when ``offset`` is None).

    Args:
        input: [B, C_in, H, W].
        offset: [B, Kh*Kw*2, Ho, Wo] image-space offsets in DCN's layout (channel
            ``(kh*Kw + kw)*2 + 0`` is the y offset of tap (kh, kw), ``+ 1`` the x offset), or None
            for integer image taps.
        rotation: [B, G*Kh*Kw*2, Ho, Wo] kernel-space offsets; channel
            ``g*Kh*Kw*2 + (kh*Kw + kw)*2 + 0/1`` is the y/x rotation of tap (kh, kw) for group g.
        weight: [C_out, C_in/groups, Sh, Sw], the scope of each kernel.
    Returns:
        [B, C_out, Ho, Wo] with
        ``out[b,o,y,x] = sum_{c in o's group, kh, kw} read(in[b,c], y*s - p + kh*d (+ o_y), ...)
        * bilinear(weight[o, c], kh + r_y + (Sh-Kh)/2, kw + r_x + (Sw-Kw)/2)`` where output
        channel o uses rotation group ``o // (C_out/G)``.
    """
    kh_, kw_ = pair("kernel_size", kernel_size, 1)
    sh, sw = pair("stride", stride, 1)
    ph, pw = pair("padding", padding, 0)
    dh, dw = pair("dilation", dilation, 1)
    batch, in_channels, height, width = input.shape
    out_channels, channels_per_group, scope_h, scope_w = weight.shape
    groups = in_channels // channels_per_group
    out_h = output_size(height, kh_, sh, ph, dh)
    out_w = output_size(width, kw_, sw, pw, dw)
    positions = out_h * out_w
    G = rotation_groups

    base_y = (torch.arange(out_h, dtype=input.dtype, device=input.device) * sh - ph).view(-1, 1)
    base_x = (torch.arange(out_w, dtype=input.dtype, device=input.device) * sw - pw).view(1, -1)
    flat_input = input.reshape(batch, in_channels, height * width)
    flat_weight = weight.reshape(1, out_channels, channels_per_group, scope_h * scope_w).expand(
        batch, -1, -1, -1
    )
    rot = rotation.reshape(batch, G, kh_ * kw_, 2, positions)
    out = input.new_zeros(batch, out_channels, positions)
    for kh in range(kh_):
        for kw in range(kw_):
            tap = kh * kw_ + kw
            iy = (base_y + kh * dh).expand(out_h, out_w).reshape(1, positions)
            ix = (base_x + kw * dw).expand(out_h, out_w).reshape(1, positions)
            if offset is not None:
                iy = iy + offset[:, 2 * tap].reshape(batch, positions)
                ix = ix + offset[:, 2 * tap + 1].reshape(batch, positions)
            iy, ix = iy.expand(batch, positions), ix.expand(batch, positions)
            if offset is None:  # an integer tap reads one pixel, or nothing outside the image
                reads_image = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
                index = torch.where(reads_image, iy * width + ix, torch.zeros_like(iy)).long()
                corners = [(index, None, reads_image)]
            else:
                reads_image = reads_anything(iy, ix, height, width)  # [B, P]
                corners = list(inside_corners(iy, ix, height, width))
            # Kernel-space read of this tap for every output channel: [B, C_out, C_in/groups, P].
            ry = rot[:, :, tap, 0] + kh + scope_base(kh_, scope_h)  # [B, G, P]
            rx = rot[:, :, tap, 1] + kw + scope_base(kw_, scope_w)
            ry = ry.repeat_interleave(out_channels // G, dim=1)  # [B, C_out, P]
            rx = rx.repeat_interleave(out_channels // G, dim=1)
            # The tap counts for output channel o only if it reads both the image and the scope.
            reads = (reads_anything(ry, rx, scope_h, scope_w) & reads_image.unsqueeze(1))
            reads = reads.unsqueeze(2)  # [B, C_out, 1, P]
            kernel = input.new_zeros(batch, out_channels, channels_per_group, positions)
            for index, w, inside in inside_corners(ry, rx, scope_h, scope_w):
                index = index.unsqueeze(2).expand(-1, -1, channels_per_group, -1)
                read = _masked(flat_weight.gather(3, index), inside.unsqueeze(2) & reads)
                kernel = kernel + read * w.unsqueeze(2)
            # Image-space read, per output channel (each reads the input channels of its
            # convolution group), masked where that channel skips the tap.
            value = input.new_zeros(batch, out_channels, channels_per_group, positions)
            # An empty image (H or W = 0) has nothing to gather: every tap reads zero.
            for index, w, inside in corners if height * width else ():
                gathered = flat_input.gather(2, index.unsqueeze(1).expand(-1, in_channels, -1))
                gathered = gathered.reshape(batch, groups, channels_per_group, positions)
                gathered = gathered.repeat_interleave(out_channels // groups, dim=1)
                read = _masked(gathered, inside.view(batch, 1, 1, positions) & reads)
                value = value + (read if w is None else read * w.view(batch, 1, 1, positions))
            out = out + _masked(value * kernel, reads).sum(dim=2)
    return out.reshape(batch, out_channels, out_h, out_w)


def deform_kernel2d_reference(
    input, rotation, weight, kernel_size, stride=1, padding=0, dilation=1, rotation_groups=1
) -> torch.Tensor:
    """Reference of ``deform_kernel2d``: ``deform_kernel_conv2d_reference`` without offsets."""
    return deform_kernel_conv2d_reference(
        input, None, rotation, weight, kernel_size, stride, padding, dilation, rotation_groups
    )


def nd_linear_sample_reference(input: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
    """Reference of ``nd_linear_sample``: input [M, Sh, Sw], coord [P, 2] (y, x) -> [P, M]."""
    channels, height, width = input.shape
    flat = input.reshape(channels, height * width)
    out = input.new_zeros(coord.shape[0], channels)
    for index, w, inside in inside_corners(coord[:, 0], coord[:, 1], height, width):
        out = out + _masked(flat[:, index].t(), inside.unsqueeze(1)) * w.unsqueeze(1)
    return out
