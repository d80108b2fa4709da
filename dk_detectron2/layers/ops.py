"""Functional Deformable Kernel operators.

Each public function validates its arguments (clear ``TypeError``/``ValueError`` naming the
argument, the expected and the received shape/dtype/device), then calls the compiled operator
``torch.ops.dk_detectron2.<name>``. This module also registers, for every compiled operator, its
fake (meta) kernel, its autograd formula and its autocast rule, so the operators work under
``torch.compile``, ``torch.jit.trace``, ``torch.autocast`` and ``torch.autograd.gradcheck``.

The public functions also compile with ``torch.jit.script`` (their signatures use TorchScript's
types): scripted, they pass their arguments straight to the operator, whose C++ checks then do
the validation (``RuntimeError`` instead of the messages below), and autocast is the operator's
own registration.

Shapes are NCHW. ``K = (Kh, Kw)`` is the sampled kernel size, ``S = (Sh, Sw)`` the scope size
(``S >= K``) and ``G`` the number of rotation groups. The bilinear rule, in kernel and in image
space: a point with ``y <= -1`` or ``y >= size`` (same for x, and any non-finite coordinate) reads
zero; otherwise corners outside the grid contribute zero. See ``dk_detectron2.layers.reference``
for a readable pure-PyTorch definition of every operator.
"""

import torch

try:  # layout tests that answer False instead of guarding on symbolic sizes (torch.export)
    from torch._prims_common import (
        is_channels_last_contiguous_or_false as _is_channels_last_or_false,
        is_contiguous_or_false as _is_contiguous_or_false,
    )
except ImportError:  # a torch without them: the eager tests (exact for real tensors)
    def _is_channels_last_or_false(tensor: torch.Tensor) -> bool:
        return tensor.is_contiguous(memory_format=torch.channels_last)

    def _is_contiguous_or_false(tensor: torch.Tensor) -> bool:
        return tensor.is_contiguous()

from . import _extension  # noqa: F401  (loads dk_detectron2._C, which defines the operators)
from .geometry import IntPair, is_int, output_size, pair, pair_list

__all__ = ["deform_kernel2d", "deform_kernel_conv2d", "nd_linear_sample", "arguments_by_name"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OPS = torch.ops.dk_detectron2


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _check_tensor(name: str, tensor, dim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dim() != dim:
        raise ValueError(
            f"{name} must be {dim}-D {layout}, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be floating point (float16, bfloat16, float32 or float64), "
            f"got {tensor.dtype}"
        )


def _check_like(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    if tensor.dtype != input.dtype:
        raise TypeError(f"{name} must have the dtype of input ({input.dtype}), got {tensor.dtype}")
    if tensor.device != input.device:
        raise ValueError(
            f"{name} must be on the device of input ({input.device}), got {tensor.device}"
        )


def _autocast_inputs(*tensors):
    """Under ``torch.autocast`` the operators compute in float32 (see the registration below):
    cast before validation so mixed autocast dtypes are not reported as a mismatch."""
    first = tensors[0]
    if isinstance(first, torch.Tensor) and torch.is_autocast_enabled(first.device.type):
        return tuple(
            t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in tensors
        )
    return tensors


def _validate(
    input, offset, rotation, weight, kernel_size, stride, padding, dilation, rotation_groups
):
    """Checks every argument; returns the normalised pairs and the output size."""
    _check_tensor("input", input, 4, "[B, C_in, H, W]")
    _check_tensor("weight", weight, 4, "[C_out, C_in/groups, Sh, Sw]")
    _check_like("weight", weight, input)
    k = pair("kernel_size", kernel_size, 1)
    s = pair("stride", stride, 1)
    p = pair("padding", padding, 0)
    d = pair("dilation", dilation, 1)
    if not is_int(rotation_groups):
        raise TypeError(f"rotation_groups must be an int, got {rotation_groups!r}")
    if rotation_groups < 1:
        raise ValueError(f"rotation_groups must be positive, got {rotation_groups}")

    batch, in_channels, height, width = input.shape
    out_channels, channels_per_group, scope_h, scope_w = weight.shape
    if scope_h < k[0] or scope_w < k[1]:
        raise ValueError(
            f"the scope (weight's last two dims, {scope_h}x{scope_w}) must be at least "
            f"kernel_size {k[0]}x{k[1]}"
        )
    if channels_per_group < 1 or in_channels % channels_per_group != 0:
        raise ValueError(
            f"weight.size(1) ({channels_per_group}) must divide input channels ({in_channels}): "
            "weight is [C_out, C_in/groups, Sh, Sw]"
        )
    groups = in_channels // channels_per_group
    if out_channels % groups != 0:
        raise ValueError(
            f"weight.size(0) (C_out = {out_channels}) must be divisible by groups "
            f"(C_in / weight.size(1) = {groups})"
        )
    if out_channels % rotation_groups != 0:
        raise ValueError(
            f"output channels ({out_channels}) must be divisible by rotation_groups "
            f"({rotation_groups})"
        )
    out_h = output_size(height, k[0], s[0], p[0], d[0])
    out_w = output_size(width, k[1], s[1], p[1], d[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"input of spatial size {height}x{width} is too small for kernel_size {k}, "
            f"stride {s}, padding {p}, dilation {d} (output would be {out_h}x{out_w})"
        )
    taps = k[0] * k[1]
    _check_tensor("rotation", rotation, 4, "[B, G*Kh*Kw*2, Ho, Wo]")
    _check_like("rotation", rotation, input)
    expected = (batch, rotation_groups * taps * 2, out_h, out_w)
    if tuple(rotation.shape) != expected:
        raise ValueError(
            f"rotation must be [B, G*Kh*Kw*2, Ho, Wo] = {list(expected)} for G = "
            f"{rotation_groups}, K = {k}, got {list(rotation.shape)}"
        )
    if offset is not None:
        _check_tensor("offset", offset, 4, "[B, Kh*Kw*2, Ho, Wo]")
        _check_like("offset", offset, input)
        expected = (batch, taps * 2, out_h, out_w)
        if tuple(offset.shape) != expected:
            raise ValueError(
                f"offset must be [B, Kh*Kw*2, Ho, Wo] = {list(expected)} for K = {k}, "
                f"got {list(offset.shape)}"
            )
    return k, s, p, d, (batch, out_channels, out_h, out_w)


# ------------------------------------------------------------------------------------------------
# Public operators
# ------------------------------------------------------------------------------------------------
def deform_kernel2d(
    input: torch.Tensor,
    rotation: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    rotation_groups: int = 1,
) -> torch.Tensor:
    """Local Deformable Kernel: resamples each kernel tap from a larger scope.

    Args:
        input: [B, C, H, W].
        rotation: [B, G*Kh*Kw*2, Ho, Wo] kernel-space offsets. Channel
            ``g*Kh*Kw*2 + (kh*Kw + kw)*2 + 0`` is the y offset ``r_y`` of tap (kh, kw) for rotation
            group g, ``+ 1`` its x offset ``r_x``.
        weight: [C_out, C_in/groups, Sh, Sw], the S x S scope of each kernel (S >= K). groups is
            inferred from the shapes: [C, 1, Sh, Sw] is depthwise (the paper's setting),
            [C_out, C_in, Sh, Sw] a full convolution, anything between a grouped one.
        kernel_size: K = (Kh, Kw), the number of taps sampled from the scope.
        stride, padding, dilation: as for ``torch.nn.functional.conv2d`` with kernel K.
        rotation_groups: G; output channel o uses the rotation of group ``g = o // (C_out/G)``
            (contiguous blocks, as DCN's offset groups). The original release interleaved them (``c % G``);
            since the rotation comes from a learnt convolution, the two differ only by a
            permutation of that convolution's output channels.

    Returns:
        [B, C_out, Ho, Wo] (Ho, Wo as for a convolution with the same K, stride, padding,
        dilation), in the memory format of ``input`` (channels-last in, channels-last out)::

            out[b,o,y,x] = sum_{c in o's group} sum_{kh,kw}
                           in[b, c, y*sh - ph + kh*dh, x*sw - pw + kw*dw]
                           * bilinear(weight[o, c'], kh + r_y + (Sh-Kh)/2, kw + r_x + (Sw-Kw)/2)

        (c' = c's index inside its group). Input taps outside the image read zero; scope samples
        follow the bilinear rule above. With S = K and zero rotation this is ``conv2d`` with the
        same groups. Depthwise weights run a fused direct kernel; other groupings build
        "scope-space columns" tile by tile and multiply them with the weight (a GEMM
        Sh*Sw/(Kh*Kw) times a convolution's). Differentiable with respect
        to input, rotation and weight.
    """
    if torch.jit.is_scripting():  # the eager checks below are Python-only
        return torch.ops.dk_detectron2.deform_kernel2d(
            input, rotation, weight, pair_list(kernel_size), pair_list(stride),
            pair_list(padding), pair_list(dilation), rotation_groups,
        )
    input, rotation, weight = _autocast_inputs(input, rotation, weight)
    k, s, p, d, _ = _validate(
        input, None, rotation, weight, kernel_size, stride, padding, dilation, rotation_groups
    )
    return _OPS.deform_kernel2d(input, rotation, weight, k, s, p, d, rotation_groups)


def deform_kernel_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    rotation: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    rotation_groups: int = 1,
) -> torch.Tensor:
    """Deformable Kernel integrated with deformable convolution.

    As :func:`deform_kernel2d`, but tap (kh, kw) of output (y, x) also reads the input bilinearly
    at ``(y*sh - ph + kh*dh + o_y, x*sw - pw + kw*dw + o_x)``.

    Args:
        offset: [B, Kh*Kw*2, Ho, Wo] image-space offsets in DCN's layout: channel
            ``(kh*Kw + kw)*2 + 0`` is ``o_y`` of tap (kh, kw), ``+ 1`` is ``o_x``.
        Others as for :func:`deform_kernel2d`.

    Returns:
        [B, C_out, Ho, Wo]. With zero offset it equals :func:`deform_kernel2d`; with zero rotation
        and S = K it equals ``torchvision.ops.deform_conv2d`` with the same weight and groups. Differentiable
        with respect to input, offset, rotation and weight.
    """
    if torch.jit.is_scripting():  # the eager checks below are Python-only
        return torch.ops.dk_detectron2.deform_kernel_conv2d(
            input, offset, rotation, weight, pair_list(kernel_size), pair_list(stride),
            pair_list(padding), pair_list(dilation), rotation_groups,
        )
    input, offset, rotation, weight = _autocast_inputs(input, offset, rotation, weight)
    k, s, p, d, _ = _validate(
        input, offset, rotation, weight, kernel_size, stride, padding, dilation, rotation_groups
    )
    return _OPS.deform_kernel_conv2d(input, offset, rotation, weight, k, s, p, d, rotation_groups)


def nd_linear_sample(input: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
    """Samples M kernels at P points: the global Deformable Kernel's kernel sampler.

    Args:
        input: [M, Sh, Sw], M scopes (e.g. a depthwise weight reshaped to [C, Sh, Sw]).
        coord: [P, 2] sample points (y, x) in scope cells, same dtype and device as input.

    Returns:
        [P, M], ``out[p, m] = bilinear(input[m], coord[p, 0], coord[p, 1])`` under the bilinear
        rule above. Differentiable with respect to input and coord.
    """
    if torch.jit.is_scripting():  # the eager checks below are Python-only
        return torch.ops.dk_detectron2.nd_linear_sample(input, coord)
    input, coord = _autocast_inputs(input, coord)
    _check_tensor("input", input, 3, "[M, Sh, Sw]")
    _check_tensor("coord", coord, 2, "[P, 2]")
    _check_like("coord", coord, input)
    if coord.shape[1] != 2:
        raise ValueError(f"coord must be [P, 2] (y, x), got shape {tuple(coord.shape)}")
    return _OPS.nd_linear_sample(input, coord)


def arguments_by_name(op, args, kwargs=None) -> dict:
    """A call's arguments keyed by the operator schema's argument names.

    Args:
        op: an operator overload, e.g. ``torch.ops.dk_detectron2.deform_kernel2d.default``.
        args: its positional arguments, in schema order (values of any kind: tensors in a
            dispatch mode, ``torch._C.Value``\ s in an fvcore handle).
        kwargs: its keyword arguments, if any.
    Returns:
        ``{name: value}``, e.g. ``["rotation_groups"]`` of a ``deform_kernel2d`` call.
    """
    schema = getattr(op, "_schema", None)
    if schema is None:
        raise TypeError(
            "op must be an operator overload with a schema (e.g. "
            f"torch.ops.dk_detectron2.deform_kernel2d.default), got {type(op).__name__}"
        )
    if len(args) > len(schema.arguments):
        raise ValueError(
            f"{schema.name} takes {len(schema.arguments)} arguments, got {len(args)} positional"
        )
    arguments = {a.name: value for a, value in zip(schema.arguments, args)}
    arguments.update(kwargs or {})
    return arguments


# ------------------------------------------------------------------------------------------------
# Fake kernels (shapes and strides only), autograd and autocast of the compiled operators
# ------------------------------------------------------------------------------------------------
def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """The output layout rule shared with the C++ kernels (a channels-last input stays so).

    Decided without guarding on data-dependent sizes (``torch.export`` of a whole detector traces
    image sizes read from tensors): a layout that cannot be proven channels-last is contiguous.
    """
    if _is_channels_last_or_false(tensor) and not _is_contiguous_or_false(tensor):
        return torch.channels_last
    return torch.contiguous_format


def _out_shape(input, weight, kernel_size, stride, padding, dilation):
    return (
        input.shape[0],
        weight.shape[0],
        output_size(input.shape[2], kernel_size[0], stride[0], padding[0], dilation[0]),
        output_size(input.shape[3], kernel_size[1], stride[1], padding[1], dilation[1]),
    )


@torch.library.register_fake("dk_detectron2::deform_kernel2d")
def _deform_kernel2d_fake(input, rotation, weight, kernel_size, stride, padding, dilation, groups):
    shape = _out_shape(input, weight, kernel_size, stride, padding, dilation)
    return torch.empty(
        shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(input)
    )


@torch.library.register_fake("dk_detectron2::deform_kernel_conv2d")
def _deform_kernel_conv2d_fake(
    input, offset, rotation, weight, kernel_size, stride, padding, dilation, groups
):
    shape = _out_shape(input, weight, kernel_size, stride, padding, dilation)
    return torch.empty(
        shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(input)
    )


@torch.library.register_fake("dk_detectron2::_deform_kernel2d_backward")
def _deform_kernel2d_backward_fake(grad, input, rotation, weight, *args):
    return (
        torch.empty_like(input, memory_format=_memory_format(input)),
        torch.empty_like(rotation, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("dk_detectron2::_deform_kernel_conv2d_backward")
def _deform_kernel_conv2d_backward_fake(grad, input, offset, rotation, weight, *args):
    return (
        torch.empty_like(input, memory_format=_memory_format(input)),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        torch.empty_like(rotation, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("dk_detectron2::nd_linear_sample")
def _nd_linear_sample_fake(input, coord):
    return input.new_empty((coord.shape[0], input.shape[0]))


@torch.library.register_fake("dk_detectron2::_nd_linear_sample_backward")
def _nd_linear_sample_backward_fake(grad, input, coord):
    return torch.empty_like(input, memory_format=torch.contiguous_format), torch.empty_like(
        coord, memory_format=torch.contiguous_format
    )


def _setup_deform_kernel2d(ctx, inputs, output):
    input, rotation, weight, *geometry = inputs
    ctx.save_for_backward(input, rotation, weight)
    ctx.geometry = geometry


def _backward_deform_kernel2d(ctx, grad_output):
    input, rotation, weight = ctx.saved_tensors
    grad_input, grad_rotation, grad_weight = _OPS._deform_kernel2d_backward(
        grad_output, input, rotation, weight, *ctx.geometry
    )
    return grad_input, grad_rotation, grad_weight, None, None, None, None, None


def _setup_deform_kernel_conv2d(ctx, inputs, output):
    input, offset, rotation, weight, *geometry = inputs
    ctx.save_for_backward(input, offset, rotation, weight)
    ctx.geometry = geometry


def _backward_deform_kernel_conv2d(ctx, grad_output):
    input, offset, rotation, weight = ctx.saved_tensors
    grads = _OPS._deform_kernel_conv2d_backward(
        grad_output, input, offset, rotation, weight, *ctx.geometry
    )
    return (*grads, None, None, None, None, None)


def _setup_nd_linear_sample(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_nd_linear_sample(ctx, grad_output):
    input, coord = ctx.saved_tensors
    return tuple(_OPS._nd_linear_sample_backward(grad_output, input, coord))


torch.library.register_autograd(
    "dk_detectron2::deform_kernel2d",
    _backward_deform_kernel2d,
    setup_context=_setup_deform_kernel2d,
)
torch.library.register_autograd(
    "dk_detectron2::deform_kernel_conv2d",
    _backward_deform_kernel_conv2d,
    setup_context=_setup_deform_kernel_conv2d,
)
torch.library.register_autograd(
    "dk_detectron2::nd_linear_sample",
    _backward_nd_linear_sample,
    setup_context=_setup_nd_linear_sample,
)

# Under autocast the operators run in float32: the kernel-space bilinear weights and the gradient
# with respect to the rotation lose too much in float16. Explicit float16/bfloat16 calls (outside
# autocast) run the half-precision kernels, which accumulate in float32.
for _op in ("deform_kernel2d", "deform_kernel_conv2d", "nd_linear_sample"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(f"dk_detectron2::{_op}", _device, torch.float32)
