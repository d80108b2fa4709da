"""fvcore FLOP and activation counting for the Deformable Kernel operators.

fvcore (and Detectron2's ``FlopCountAnalysis``, ``tools/analyze_model.py``) counts a traced model
op by op; it skips operators it has no handle for, with a warning. This module provides the
handles of ``torch.ops.dk_detectron2.*`` and, on request, of ``torchvision::deform_conv2d`` (used by
the ``LearntOffsetDeformConv2d`` rival).

Counting convention (fvcore's): one "flop" is one multiply-add (MAC). For every output element
and every kernel tap:

* ``deform_kernel2d``: 1 MAC per input channel of the group (input x kernel value) plus 4 MACs
  per input channel of the group for the kernel-space bilinear read of that kernel value from
  the S x S scope (4 corners, each weight x corner value):
  ``B * C_out * Ho * Wo * Kh * Kw * (C_in / groups) * (1 + 4)``.
* ``deform_kernel_conv2d``: the same, plus the image-space bilinear read of the input, done once
  per input channel, output position and tap (4 MACs):
  ``... + B * C_in * Ho * Wo * Kh * Kw * 4``.
* ``nd_linear_sample``: 4 MACs per sample: ``P * M * 4``.
* ``torchvision::deform_conv2d``: ``B * C_out * Ho * Wo * Kh * Kw * (C_in / groups)`` MACs of
  the convolution, plus the image-space bilinear read ``B * C_in * Ho * Wo * Kh * Kw * 4``, plus
  one multiply by the modulation mask per read when the mask is used.

Not counted (as fvcore skips elementwise work): the bilinear weights themselves (a few flops per
sample point, shared by every channel of a rotation group), bias additions, clipping (one
``aten::clamp``, which fvcore ignores). Global DK's average pooling is ``adaptive_avg_pool2d``,
counted by fvcore's own handle (one per input element). So a DK model's analysis reports no
unsupported operator that the same model with rigid convolutions would not.

``import dk_detectron2`` calls :func:`register_default_handles`, which adds the handles of the
package's own operators (``dk_detectron2::*``) to fvcore's default tables: every
``FlopCountAnalysis`` / ``ActivationCountAnalysis`` made afterwards (fvcore's, Detectron2's
subclass, ``flop_count``, Detectron2's ``tools/analyze_model.py``) counts the DK operators with no
"unsupported operator" warning::

    import dk_detectron2
    from detectron2.utils.analysis import FlopCountAnalysis
    print(FlopCountAnalysis(model, inputs).total())

The import leaves every other operator's counting alone: a model without DK operators counts the
same before and after it. The ``torchvision::deform_conv2d`` handle, which fvcore lacks and which
would change the count of any model using torchvision's ``DeformConv2d``, is added only when asked:
``register_default_handles(torchvision=True)`` (fvcore's defaults, from then on) or
``add_dk_flop_handles(analysis, torchvision=True)`` (one analysis; what
``python -m dk_detectron2.tools.analyze_model`` does, for the ``LearntOffsetDeformConv2d`` rival).

Handles set on an analysis with ``set_op_handle`` still take precedence;
:func:`add_dk_flop_handles` sets ours explicitly (e.g. on an analysis made with other defaults).
"""

import importlib
from typing import Any, Dict, List, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import Handle, generic_activation_jit, get_shape

from ..layers.geometry import is_int
from ..layers.ops import arguments_by_name

try:
    from math import prod
except ImportError:  # pragma: no cover - Python < 3.8
    from numpy import prod

__all__ = [
    "KERNEL_BILINEAR_MACS",
    "IMAGE_BILINEAR_MACS",
    "deform_kernel2d_flop_jit",
    "deform_kernel_conv2d_flop_jit",
    "nd_linear_sample_flop_jit",
    "deform_conv2d_flop_jit",
    "dk_flop_handles",
    "dk_activation_handles",
    "add_dk_flop_handles",
    "add_dk_activation_handles",
    "register_default_handles",
    "image_model_macs",
]

KERNEL_BILINEAR_MACS = 4  # kernel-space bilinear read: 4 corners
IMAGE_BILINEAR_MACS = 4  # image-space bilinear read: 4 corners


def _shape(value: Any, name: str) -> List[int]:
    shape = get_shape(value)
    if shape is None:
        raise ValueError(f"cannot count flops: the shape of {name} is unknown in the trace")
    return list(shape)


def _arguments(op_name: str, inputs: List[Any]) -> Dict[str, Any]:
    """The traced call's input values keyed by the operator schema's argument names
    (``op_name``: ``"namespace::name"``; fvcore passes the inputs positionally)."""
    namespace, name = op_name.split("::")
    return arguments_by_name(getattr(getattr(torch.ops, namespace), name).default, inputs)


def _conv_like_macs(arguments: Dict[str, Any], outputs: List[Any]) -> Dict[str, int]:
    """Shared terms of the deformable-kernel ops: output taps and input reads."""
    batch, out_channels, out_h, out_w = _shape(outputs[0], "output")
    in_channels = _shape(arguments["input"], "input")[1]
    per_group, scope_h, scope_w = _shape(arguments["weight"], "weight")[1:]
    rotation = _shape(arguments["rotation"], "rotation")[1]
    return {
        "outputs": batch * out_channels * out_h * out_w,
        "per_group": per_group,
        "in_reads": batch * in_channels * out_h * out_w,
        "rotation_channels": rotation,
    }


def _taps(rotation_channels: int, rotation_groups: Any) -> int:
    groups = rotation_groups.toIValue() if hasattr(rotation_groups, "toIValue") else rotation_groups
    if not is_int(groups) or groups < 1:
        raise ValueError(f"cannot count flops: rotation_groups is not a constant int ({groups!r})")
    return rotation_channels // (2 * groups)


def deform_kernel2d_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``dk_detectron2::deform_kernel2d(input, rotation, weight, k, s, p, d, rotation_groups)``."""
    arguments = _arguments("dk_detectron2::deform_kernel2d", inputs)
    terms = _conv_like_macs(arguments, outputs)
    taps = _taps(terms["rotation_channels"], arguments["rotation_groups"])
    return terms["outputs"] * taps * terms["per_group"] * (1 + KERNEL_BILINEAR_MACS)


def deform_kernel_conv2d_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``dk_detectron2::deform_kernel_conv2d(input, offset, rotation, weight, k, s, p, d,
    rotation_groups)``."""
    arguments = _arguments("dk_detectron2::deform_kernel_conv2d", inputs)
    terms = _conv_like_macs(arguments, outputs)
    taps = _taps(terms["rotation_channels"], arguments["rotation_groups"])
    kernel = terms["outputs"] * taps * terms["per_group"] * (1 + KERNEL_BILINEAR_MACS)
    return kernel + terms["in_reads"] * taps * IMAGE_BILINEAR_MACS


def nd_linear_sample_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``dk_detectron2::nd_linear_sample(input [M, Sh, Sw], coord [P, 2]) -> [P, M]``."""
    return prod(_shape(outputs[0], "output")) * KERNEL_BILINEAR_MACS


def deform_conv2d_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``torchvision::deform_conv2d(input, weight, offset, mask, bias, stride_h, stride_w, pad_h,
    pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask)``."""
    arguments = _arguments("torchvision::deform_conv2d", inputs)
    batch, out_channels, out_h, out_w = _shape(outputs[0], "output")
    in_channels = _shape(arguments["input"], "input")[1]
    per_group, kernel_h, kernel_w = _shape(arguments["weight"], "weight")[1:]
    taps = kernel_h * kernel_w
    use_mask = arguments["use_mask"].toIValue() if "use_mask" in arguments else False
    reads = batch * in_channels * out_h * out_w * taps
    conv = batch * out_channels * out_h * out_w * taps * per_group
    return conv + reads * (IMAGE_BILINEAR_MACS + int(bool(use_mask)))


# The package's own operators: registered in fvcore's defaults by `import dk_detectron2`.
_FLOP_HANDLES: Dict[str, Handle] = {
    "dk_detectron2::deform_kernel2d": deform_kernel2d_flop_jit,
    "dk_detectron2::deform_kernel_conv2d": deform_kernel_conv2d_flop_jit,
    "dk_detectron2::nd_linear_sample": nd_linear_sample_flop_jit,
}
# Another library's operator: only on request (torchvision=True below).
_TORCHVISION_FLOP_HANDLES: Dict[str, Handle] = {
    "torchvision::deform_conv2d": deform_conv2d_flop_jit,
}


def dk_flop_handles(torchvision: bool = False) -> Dict[str, Handle]:
    """``{traced op name: fvcore flop handle}`` for the DK operators (a new dict each call), and
    for ``torchvision::deform_conv2d`` with ``torchvision=True``."""
    return {**_FLOP_HANDLES, **(_TORCHVISION_FLOP_HANDLES if torchvision else {})}


def dk_activation_handles(torchvision: bool = False) -> Dict[str, Handle]:
    """``{traced op name: fvcore activation handle}``: the elements of each op's output (the
    operators of :func:`dk_flop_handles`)."""
    return {name: generic_activation_jit() for name in dk_flop_handles(torchvision)}


def add_dk_flop_handles(analysis, torchvision: bool = False):
    """Registers the DK flop handles (and the ``torchvision::deform_conv2d`` one with
    ``torchvision=True``) on an fvcore/Detectron2 ``FlopCountAnalysis``; returns it."""
    return analysis.set_op_handle(**dk_flop_handles(torchvision))


def add_dk_activation_handles(analysis, torchvision: bool = False):
    """Registers the DK activation handles on an fvcore ``ActivationCountAnalysis``; returns it."""
    return analysis.set_op_handle(**dk_activation_handles(torchvision))


def register_default_handles(torchvision: bool = False) -> None:
    """Adds the DK flop and activation handles to fvcore's default handle tables (idempotent);
    with ``torchvision=True`` also the ``torchvision::deform_conv2d`` ones (``import
    dk_detectron2`` does not: it must not change how other models count).

    fvcore's ``FlopCountAnalysis`` and ``ActivationCountAnalysis`` copy their module's default
    table (``_DEFAULT_SUPPORTED_OPS``) into every new analysis; Detectron2's ``FlopCountAnalysis``
    subclass calls that constructor too. An operator already in a table keeps its handle.
    """
    # fvcore.nn re-exports functions named like these modules: import the modules themselves.
    flop_defaults = importlib.import_module("fvcore.nn.flop_count")._DEFAULT_SUPPORTED_OPS
    activation_defaults = importlib.import_module("fvcore.nn.activation_count")._DEFAULT_SUPPORTED_OPS
    for name, handle in dk_flop_handles(torchvision).items():
        flop_defaults.setdefault(name, handle)
    for name, handle in dk_activation_handles(torchvision).items():
        activation_defaults.setdefault(name, handle)


def image_model_macs(model: torch.nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of an image model (``model(x)``, x of shape
    [1, C, H, W], e.g. a timm classifier) on one image of ``input_size`` = (C, H, W), with the DK
    operators and ``torchvision::deform_conv2d`` counted (the convention above: pooling, additions
    and other elementwise work are not counted).

    The model is traced in eval mode under ``torch.no_grad`` (BatchNorm statistics are not
    touched) and handed back in the mode it came in.
    """
    if len(input_size) != 3 or not all(is_int(v) and v > 0 for v in input_size):
        raise ValueError(f"input_size must be (C, H, W) of positive ints, got {tuple(input_size)}")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    image = torch.zeros(1, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = add_dk_flop_handles(FlopCountAnalysis(model, image), torchvision=True)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(was_training)
