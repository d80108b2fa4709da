"""ONNX translations of the Deformable Kernel operators, for ``torch.onnx.export(..., dynamo=True)``.

ONNX has no deformable-kernel operator, so each ``dk_detectron2::*`` operator is written as a graph
of standard ONNX ops (opset 18), following ``dk_detectron2.layers.reference``: the bilinear rule
gives four corners per sample point (``Floor``, ``Where`` masks, weights), ``GatherElements`` reads
them, and a DK output is the image value of every tap times the kernel value read from the scope
at the tap's rotated position, summed over the taps and the input channels of the group. The
taps' pixels come from one strided ``Slice`` per tap (or bilinear reads at the DCN offsets);
everything else is computed for all taps at once, about 120 nodes per operator. Kernel size,
stride, padding, dilation and the number of rotation groups are fixed in the graph; batch and
image size stay dynamic. The graph needs no custom operator in the runtime.

Each translation is a Python function of onnxscript ops that the exporter traces.
:func:`dk_onnx_translation_table` maps the operators to them::

    torch.onnx.export(model, args, dynamo=True,
                      custom_translation_table=dk_onnx_translation_table())
"""
from typing import Callable, Dict, List, Sequence

import torch
from onnxscript import INT64
from onnxscript.onnx_opset import opset18 as op

from ..layers import ops as _dk_ops  # noqa: F401  (defines torch.ops.dk_detectron2.*)

__all__ = [
    "onnx_deform_kernel2d",
    "onnx_deform_kernel_conv2d",
    "onnx_nd_linear_sample",
    "dk_onnx_translation_table",
]

_INT64_MAX = 2**63 - 1


def _ints(*values: int):
    """A constant 1-D int64 tensor."""
    return op.Constant(value_ints=[int(v) for v in values])


def _scalar(value: float, like):
    """A scalar constant in the dtype of ``like``."""
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _dim(tensor, axis: int):
    """``tensor.shape[axis]`` as a 1-D int64 tensor of one element."""
    return op.Shape(tensor, start=axis, end=axis + 1)


def _bilinear_corners(y, x, height, width) -> List[tuple]:
    """The four corners of each point (y, x) under the bilinear rule, as ``(index, weight)``.

    ``y``, ``x``: float tensors of one shape; ``height``, ``width``: the grid size, as tensors of
    their dtype. ``index = cy * width + cx`` (int64; 0 for a corner outside the grid) and
    ``weight`` (0 for such a corner, and for every corner of a point that reads zero) keep the
    shape of ``y``. A point with ``y <= -1``, ``y >= height`` (same for x) or a non-finite
    coordinate reads zero.
    """
    zero, one = _scalar(0.0, y), _scalar(1.0, y)
    inside = op.And(
        op.And(op.Greater(y, op.Neg(one)), op.Less(y, height)),
        op.And(op.Greater(x, op.Neg(one)), op.Less(x, width)),
    )
    y, x = op.Where(inside, y, zero), op.Where(inside, x, zero)
    y0, x0 = op.Floor(y), op.Floor(x)
    ly, lx = op.Sub(y, y0), op.Sub(x, x0)
    hy, hx = op.Sub(one, ly), op.Sub(one, lx)
    y1, x1 = op.Add(y0, one), op.Add(x0, one)
    corners = []
    for cy, cx, wy, wx in ((y0, x0, hy, hx), (y0, x1, hy, lx), (y1, x0, ly, hx), (y1, x1, ly, lx)):
        valid = op.And(
            op.And(inside, op.And(op.GreaterOrEqual(cy, zero), op.Less(cy, height))),
            op.And(op.GreaterOrEqual(cx, zero), op.Less(cx, width)),
        )
        # Integer arithmetic: float32 cannot index every pixel of an image above 2^24 pixels.
        row, col = op.Cast(cy, to=INT64.dtype), op.Cast(cx, to=INT64.dtype)
        index = op.Add(op.Mul(row, op.Cast(width, to=INT64.dtype)), col)
        index = op.Where(valid, index, op.Constant(value_int=0))
        corners.append((index, op.Where(valid, op.Mul(wy, wx), zero)))
    return corners


def _tap_offsets(kernel_size, dilation, like):
    """Constant tap positions ``(kh*dh, kw*dw)`` as two [Kh*Kw] tensors in the dtype of ``like``
    (taps in row-major order, as in the rotation and offset layouts)."""
    (kh_, kw_), (dh, dw) = kernel_size, dilation
    ys = [float(kh * dh) for kh in range(kh_) for _ in range(kw_)]
    xs = [float(kw * dw) for _ in range(kh_) for kw in range(kw_)]
    return (op.CastLike(op.Constant(value_floats=ys), like),
            op.CastLike(op.Constant(value_floats=xs), like))


def _pixel_columns(input, kernel_size, stride, padding, dilation):
    """Without image offsets: the pixels ``[B, C_in, Kh*Kw, Ho*Wo]`` each tap reads (im2col).

    Tap (kh, kw) is a strided ``Slice`` of the zero-padded input; it starts at the tap and stops
    before the rows (columns) of the taps after it, so it has exactly Ho (Wo) rows (columns) for
    any image size.
    """
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    padded = op.Pad(input, _ints(0, 0, ph, pw, 0, 0, ph, pw))
    taps = []
    for kh in range(kh_):
        for kw in range(kw_):
            end_h = -(kh_ - 1 - kh) * dh or _INT64_MAX
            end_w = -(kw_ - 1 - kw) * dw or _INT64_MAX
            window = op.Slice(
                padded, _ints(kh * dh, kw * dw), _ints(end_h, end_w), _ints(2, 3), _ints(sh, sw)
            )
            taps.append(op.Reshape(window, _ints(0, 0, 1, -1)))
    return op.Concat(*taps, axis=2)


def _sampled_columns(input, offset, kernel_size, stride, padding, dilation):
    """With image offsets ``[B, Kh*Kw*2, Ho, Wo]`` (DCN's layout): the bilinear reads
    ``[B, C_in, Kh*Kw, Ho*Wo]`` at ``(y*sh - ph + kh*dh + o_y, x*sw - pw + kw*dw + o_x)``."""
    (sh, sw), (ph, pw) = stride, padding
    taps = kernel_size[0] * kernel_size[1]
    height = op.CastLike(_dim(input, 2), input)
    width = op.CastLike(_dim(input, 3), input)
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    grid = op.Concat(_dim(offset, 2), _dim(offset, 3), axis=0)
    rows = op.Range(zero, op.Squeeze(_dim(offset, 2), _ints(0)), one)
    cols = op.Range(zero, op.Squeeze(_dim(offset, 3), _ints(0)), one)
    rows = op.Sub(op.Mul(op.CastLike(rows, input), _scalar(sh, input)), _scalar(ph, input))
    cols = op.Sub(op.Mul(op.CastLike(cols, input), _scalar(sw, input)), _scalar(pw, input))
    # Sample point of tap (0, 0) at every output position: [1, 1, Ho*Wo].
    base_y = op.Reshape(op.Expand(op.Unsqueeze(rows, _ints(1)), grid), _ints(1, 1, -1))
    base_x = op.Reshape(op.Expand(op.Unsqueeze(cols, _ints(0)), grid), _ints(1, 1, -1))
    tap_y, tap_x = _tap_offsets(kernel_size, dilation, input)
    offset = op.Reshape(offset, _ints(0, taps, 2, -1))  # [B, K*K, 2, P]
    y = op.Add(op.Add(base_y, op.Unsqueeze(tap_y, _ints(0, 2))), _component(offset, 0, axis=2))
    x = op.Add(op.Add(base_x, op.Unsqueeze(tap_x, _ints(0, 2))), _component(offset, 1, axis=2))
    flat_input = op.Reshape(input, _ints(0, 0, -1))  # [B, C_in, H*W]
    channels = op.Concat(_ints(1), _dim(input, 1), _ints(1), axis=0)
    value = None
    for index, weight in _bilinear_corners(y, x, height, width):  # [B, K*K, P] each
        index = op.Expand(op.Reshape(index, _ints(0, 1, -1)), channels)  # [B, C_in, K*K*P]
        term = op.Mul(op.GatherElements(flat_input, index, axis=2),
                      op.Reshape(weight, _ints(0, 1, -1)))
        value = term if value is None else op.Add(value, term)
    return op.Reshape(value, _ints(0, 0, taps, -1))


def _component(tensor, which: int, axis: int):
    """``tensor`` indexed at ``which`` along ``axis`` (that axis removed)."""
    return op.Squeeze(op.Slice(tensor, _ints(which), _ints(which + 1), _ints(axis)), _ints(axis))


def _kernel_values(rotation, weight, kernel_size, rotation_groups: int):
    """The kernel values ``[B, G, (C_out/G)*(C_in/groups), Kh*Kw*Ho*Wo]`` read bilinearly from
    the scope ``weight`` [C_out, C_in/groups, Sh, Sw] at ``(kh + r_y + (Sh-Kh)/2,
    kw + r_x + (Sw-Kw)/2)``, with the rotation of each output channel's rotation group."""
    kh_, kw_ = kernel_size
    groups, taps = rotation_groups, kh_ * kw_
    scope_h = op.CastLike(_dim(weight, 2), rotation)
    scope_w = op.CastLike(_dim(weight, 3), rotation)
    # (S - K) / 2 restates layers.geometry.scope_base as graph ops: the scope size is symbolic here.
    centre_h = op.Div(op.Sub(scope_h, _scalar(kh_, rotation)), _scalar(2.0, rotation))
    centre_w = op.Div(op.Sub(scope_w, _scalar(kw_, rotation)), _scalar(2.0, rotation))
    tap_y, tap_x = _tap_offsets(kernel_size, (1, 1), rotation)
    tap_y, tap_x = op.Add(tap_y, centre_h), op.Add(tap_x, centre_w)
    rotation = op.Reshape(rotation, _ints(0, groups, taps, 2, -1))  # [B, G, K*K, 2, P]
    y = op.Add(_component(rotation, 0, axis=3), op.Unsqueeze(tap_y, _ints(0, 1, 3)))
    x = op.Add(_component(rotation, 1, axis=3), op.Unsqueeze(tap_x, _ints(0, 1, 3)))
    # [B, G, M, Sh*Sw], M = (C_out/G) * (C_in/groups): every sample of the batch reads the scope.
    cells = op.Mul(_dim(weight, 2), _dim(weight, 3))
    flat_weight = op.Reshape(weight, op.Concat(_ints(1, groups, -1), cells, axis=0))
    flat_weight = op.Expand(flat_weight, op.Concat(_dim(rotation, 0), _ints(1, 1, 1), axis=0))
    pairs = op.Concat(_ints(1, 1), _dim(flat_weight, 2), _ints(1), axis=0)
    value = None
    for index, corner in _bilinear_corners(y, x, scope_h, scope_w):  # [B, G, K*K, P] each
        # Every (output, input) channel pair of a rotation group reads the same cell.
        index = op.Expand(op.Reshape(index, _ints(0, 0, 1, -1)), pairs)
        term = op.Mul(op.GatherElements(flat_weight, index, axis=3),
                      op.Reshape(corner, _ints(0, 0, 1, -1)))
        value = term if value is None else op.Add(value, term)
    return value


def _deform_kernel(input, offset, rotation, weight, kernel_size, stride, padding, dilation,
                   rotation_groups):
    """The DK sum shared by both operators; returns [B, C_out, Ho, Wo]."""
    geometry = [tuple(int(v) for v in pair) for pair in (kernel_size, stride, padding, dilation)]
    taps = geometry[0][0] * geometry[0][1]
    if offset is None:
        image = _pixel_columns(input, *geometry)
    else:
        image = _sampled_columns(input, offset, *geometry)
    kernel = _kernel_values(rotation, weight, geometry[0], int(rotation_groups))
    per_group = _dim(weight, 1)  # C_in / groups
    groups = op.Div(_dim(input, 1), per_group)
    outputs_per_group = op.Div(_dim(weight, 0), groups)
    # image [B, C_in, K*K, P] -> [B, groups, 1, C_in/groups, K*K, P]; kernel [B, G, M, K*K*P] ->
    # [B, groups, C_out/groups, C_in/groups, K*K, P]; multiply and sum over channels and taps.
    image = op.Reshape(image, op.Concat(_ints(0), groups, _ints(1), per_group, _ints(taps, -1),
                                        axis=0))
    kernel = op.Reshape(kernel, op.Concat(_ints(0), groups, outputs_per_group, per_group,
                                          _ints(taps, -1), axis=0))
    out = op.ReduceSum(op.Mul(image, kernel), _ints(3, 4), keepdims=0)
    out_shape = op.Concat(_ints(0), _dim(weight, 0), op.Shape(rotation, start=2, end=4), axis=0)
    return op.Reshape(out, out_shape)


# ------------------------------------------------------------------------------------------------
# The translations (signatures mirror the operator schemas in csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------
def onnx_deform_kernel2d(
    input,
    rotation,
    weight,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    rotation_groups: int,
):
    """``dk_detectron2::deform_kernel2d`` in standard ONNX ops: [B, C_out, Ho, Wo]."""
    return _deform_kernel(input, None, rotation, weight, kernel_size, stride, padding, dilation,
                          rotation_groups)


def onnx_deform_kernel_conv2d(
    input,
    offset,
    rotation,
    weight,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    rotation_groups: int,
):
    """``dk_detectron2::deform_kernel_conv2d`` in standard ONNX ops: [B, C_out, Ho, Wo]."""
    return _deform_kernel(input, offset, rotation, weight, kernel_size, stride, padding, dilation,
                          rotation_groups)


def onnx_nd_linear_sample(input, coord):
    """``dk_detectron2::nd_linear_sample`` in standard ONNX ops: input [M, Sh, Sw], coord [P, 2]
    -> [P, M]."""
    height = op.CastLike(_dim(input, 1), coord)
    width = op.CastLike(_dim(input, 2), coord)
    flat = op.Reshape(input, _ints(0, -1))  # [M, Sh*Sw]
    y = op.Squeeze(op.Slice(coord, _ints(0), _ints(1), _ints(1)), _ints(1))  # [P]
    x = op.Squeeze(op.Slice(coord, _ints(1), _ints(2), _ints(1)), _ints(1))
    out = None
    for index, weight in _bilinear_corners(y, x, height, width):
        term = op.Mul(op.Gather(flat, index, axis=1), weight)  # [M, P]
        out = term if out is None else op.Add(out, term)
    return op.Transpose(out, perm=[1, 0])


def dk_onnx_translation_table() -> Dict[torch._ops.OpOverload, Callable]:
    """``{operator overload: ONNX translation}`` for ``torch.onnx.export``'s
    ``custom_translation_table`` (a new dict each call; merge your own entries into it)."""
    ops = torch.ops.dk_detectron2
    return {
        ops.deform_kernel2d.default: onnx_deform_kernel2d,
        ops.deform_kernel_conv2d.default: onnx_deform_kernel_conv2d,
        ops.nd_linear_sample.default: onnx_nd_linear_sample,
    }
