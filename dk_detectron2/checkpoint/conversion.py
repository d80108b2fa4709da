"""Converting a standard ResNet state dict into the parameters of a DK model.

:func:`convert_state_dict` renames a checkpoint into Detectron2's names (see
:mod:`.source_formats`), matches it to the target's parameters with Detectron2's suffix matching
(``res3.0.conv2.weight`` -> ``backbone.bottom_up.res3.0.conv2.weight``), and converts every
``[O, I, K, K]`` kernel whose target is an ``[O, I, S, S]`` DK scope with S > K
(:func:`.scope_init.kernel_to_scope`). Every pair is validated before anything is returned, so a
checkpoint that does not fit raises one :class:`CheckpointShapeError` listing each offending
layer with both shapes, and the caller never loads half a model.
"""
import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from tabulate import tabulate

from .scope_init import kernel_to_scope, reproduction_error
from .source_formats import rename_to_detectron2

__all__ = [
    "CheckpointShapeError",
    "ConversionResult",
    "LayerConversion",
    "convert_state_dict",
    "match_checkpoint_names",
    "format_conversion_report",
    "format_stage_report",
]

Shape = Tuple[int, ...]
TargetSpec = Union[torch.nn.Module, Mapping[str, Union[torch.Tensor, Sequence[int]]]]


class CheckpointShapeError(ValueError):
    """A checkpoint tensor does not fit the model parameter it was matched to."""


@dataclass
class LayerConversion:
    """One kernel converted into a DK scope.

    Attributes:
        name: the target (model) parameter, e.g. ``backbone.bottom_up.res3.0.conv2.weight``.
        source_name: its name in the checkpoint after renaming to Detectron2's convention.
        source_shape: [O, I, Kh, Kw].
        target_shape: [O, I, Sh, Sw].
        error: max |kernel - zero-rotation samples of the scope|, in float64 on the stored tensors.
        kernel_max: max |kernel|, the scale of ``error``.
    """

    name: str
    source_name: str
    source_shape: Shape
    target_shape: Shape
    error: float
    kernel_max: float

    @property
    def relative_error(self) -> float:
        return self.error / self.kernel_max if self.kernel_max > 0 else self.error


@dataclass
class ConversionResult:
    """Output of :func:`convert_state_dict`.

    Attributes:
        state_dict: target names -> tensors (shapes of the target), plus the checkpoint entries
            that matched no target under their Detectron2 names (reported as unexpected keys when
            loaded, as Detectron2 does).
        converted: one entry per kernel turned into a scope.
        copied: target names loaded unchanged.
        unmatched: checkpoint names that matched no target.
        skipped: ``(name, checkpoint shape, target shape)`` left out with ``skip_mismatched``.
    """

    state_dict: Dict[str, torch.Tensor]
    converted: List[LayerConversion] = field(default_factory=list)
    copied: List[str] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, Shape, Shape]] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.converted), default=0.0)


def _target_shapes(target: TargetSpec) -> Dict[str, Shape]:
    if isinstance(target, torch.nn.Module):
        return {name: tuple(value.shape) for name, value in target.state_dict().items()}
    if not isinstance(target, Mapping):
        raise TypeError(
            "target must be a torch.nn.Module or a mapping name -> tensor or shape, got "
            f"{type(target).__name__}"
        )
    return {
        name: tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        for name, value in target.items()
    }


def _as_tensors(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """numpy arrays (``.pkl`` files) -> tensors; a DataParallel ``module.`` prefix is removed."""
    tensors = {
        name: torch.as_tensor(value) if isinstance(value, (np.ndarray, np.generic)) else value
        for name, value in state_dict.items()
    }
    if tensors and all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module."):]: value for name, value in tensors.items()}
    return tensors


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def match_checkpoint_names(
    target_names: Sequence[str], source_names: Sequence[str]
) -> Dict[str, str]:
    """Detectron2's name matching, on names only.

    Runs ``detectron2.checkpoint.c2_model_loading.align_and_update_state_dicts`` (a target name
    matches a source name equal to it or ending it after a ``.``; the longest match wins; one
    source name matching two targets is an error) on placeholder tensors, so that shapes, which
    differ on purpose for DK scopes, play no part.

    Returns:
        target name -> source name, for every matched target.
    """
    placeholders = {name: torch.empty(0) for name in source_names}
    source_of = {id(value): name for name, value in placeholders.items()}
    targets = {name: torch.empty(0) for name in target_names}
    with _quiet("detectron2.checkpoint.c2_model_loading"):
        aligned = align_and_update_state_dicts(targets, placeholders, c2_conversion=False)
    return {name: source_of[id(value)] for name, value in aligned.items() if name in targets}


def _is_scope_target(source: Shape, target: Shape) -> bool:
    """[O, I, K, K'] -> [O, I, S, S'] with S >= K, S' >= K' and a larger scope."""
    return (
        len(source) == 4
        and len(target) == 4
        and source[:2] == target[:2]
        and target[2] >= source[2]
        and target[3] >= source[3]
        and target[2:] != source[2:]
    )


def _mismatch_message(name: str, source_name: str, source: Shape, target: Shape) -> str:
    message = (
        f"{name}: checkpoint tensor '{source_name}' has shape {list(source)}, the model expects "
        f"{list(target)}"
    )
    if len(source) == 4 and len(target) == 4 and target[1] != source[1] and target[1] == 1:
        message += (
            " (the model's convolution is depthwise; a standard ResNet checkpoint needs full or "
            "grouped DK layers, MODEL.DK.DEPTHWISE False)"
        )
    elif len(source) == 4 and len(target) == 4 and source[:2] == target[:2]:
        message += " (a DK scope must be at least as large as the checkpoint's kernel)"
    return message


def convert_state_dict(
    source_state_dict: Mapping[str, Any],
    target: TargetSpec,
    *,
    source_format: str = "detectron2",
    match_by_suffix: bool = True,
    skip_mismatched: bool = False,
) -> ConversionResult:
    """Converts a ResNet checkpoint into the parameters of ``target``.

    Args:
        source_state_dict: checkpoint name -> tensor (or numpy array, as in ``.pkl`` files).
        target: the model to load into, or a mapping target name -> tensor or shape.
        source_format: naming convention of the checkpoint, a ``SOURCE_FORMAT_REGISTRY`` name
            (``"detectron2"``, ``"caffe2"``, ``"torchvision"``).
        match_by_suffix: match names with Detectron2's suffix heuristic (needed when the target
            names carry a prefix such as ``backbone.bottom_up.``); otherwise names must be equal.
        skip_mismatched: leave out (and list in ``skipped``) checkpoint tensors whose shape fits
            neither the target nor a DK scope, as Detectron2 does, instead of raising.

    Returns:
        A :class:`ConversionResult`. Tensors keep the checkpoint's dtype; scopes are computed in
        float64 and cast back.

    Raises:
        CheckpointShapeError: some matched tensor fits neither its target's shape nor a DK scope
            of it (unless ``skip_mismatched``); the message names every such layer with both
            shapes. Raised before anything is converted.
    """
    if not isinstance(source_state_dict, Mapping):
        raise TypeError(
            f"source_state_dict must be a mapping name -> tensor, got "
            f"{type(source_state_dict).__name__}"
        )
    target_shapes = _target_shapes(target)
    source = rename_to_detectron2(_as_tensors(source_state_dict), source_format)
    if match_by_suffix:
        matches = match_checkpoint_names(list(target_shapes), list(source))
    else:
        matches = {name: name for name in source if name in target_shapes}

    # Validate every pair before converting anything.
    plan: Dict[str, str] = {}  # target name -> "copy" | "scope"
    errors: List[str] = []
    skipped: List[Tuple[str, Shape, Shape]] = []
    for name, source_name in matches.items():
        value = source[source_name]
        if not isinstance(value, torch.Tensor):
            errors.append(
                f"{name}: checkpoint entry '{source_name}' is a {type(value).__name__}, not a "
                "tensor"
            )
            continue
        source_shape, target_shape = tuple(value.shape), target_shapes[name]
        if source_shape == target_shape:
            plan[name] = "copy"
        elif _is_scope_target(source_shape, target_shape) and value.is_floating_point():
            plan[name] = "scope"
        elif skip_mismatched:
            skipped.append((name, source_shape, target_shape))
        else:
            errors.append(_mismatch_message(name, source_name, source_shape, target_shape))
    if errors:
        raise CheckpointShapeError(
            f"{len(errors)} checkpoint tensor(s) do not fit the model; nothing was converted or "
            "loaded:\n  "
            + "\n  ".join(errors)
        )

    result = ConversionResult(state_dict={}, skipped=skipped)
    for name, action in plan.items():
        value = source[matches[name]]
        if action == "copy":
            result.state_dict[name] = value
            result.copied.append(name)
            continue
        scope = kernel_to_scope(value, target_shapes[name][2:])
        result.state_dict[name] = scope
        result.converted.append(
            LayerConversion(
                name=name,
                source_name=matches[name],
                source_shape=tuple(value.shape),
                target_shape=tuple(scope.shape),
                error=reproduction_error(value, scope),
                kernel_max=float(value.detach().abs().max()) if value.numel() else 0.0,
            )
        )
    used = set(matches.values())
    for source_name, value in source.items():
        if source_name in used:
            continue
        if source_name.endswith("num_batches_tracked"):
            continue  # BatchNorm's counter; FrozenBatchNorm2d and the DK layers do not keep it.
        result.unmatched.append(source_name)
        result.state_dict[source_name] = value
    return result


def format_conversion_report(result: ConversionResult, max_rows: Optional[int] = None) -> str:
    """A table of the converted layers with their reproduction errors, and a summary line."""
    rows = [
        (
            layer.name,
            list(layer.source_shape),
            list(layer.target_shape),
            f"{layer.error:.3e}",
            f"{layer.relative_error:.3e}",
        )
        for layer in result.converted[:max_rows]
    ]
    headers = ["layer", "kernel", "scope", "reproduction error", "relative to max|kernel|"]
    table = tabulate(rows, headers=headers, tablefmt="pipe")
    summary = (
        f"{len(result.converted)} kernel(s) converted to DK scopes (max reproduction error "
        f"{result.max_error:.3e}), {len(result.copied)} tensor(s) copied, "
        f"{len(result.unmatched)} unmatched, {len(result.skipped)} skipped"
    )
    return f"{table}\n{summary}" if rows else summary


_STAGE = re.compile(r"(?:^|\.)(stem|res\d+)\.")


def _stage_of(name: str) -> str:
    """``backbone.bottom_up.res3.0.conv2.weight`` -> ``res3``; names outside a ResNet stage
    are grouped by their parent module."""
    match = _STAGE.search(name)
    if match is not None:
        return match.group(1)
    return name.rsplit(".", 2)[0] if name.count(".") >= 2 else name


def format_stage_report(result: ConversionResult) -> List[str]:
    """One line per stage with converted kernels, in the order the stages were converted.

    Each line gives the number of KxK kernels that became SxS DK scopes, whether the scopes
    reproduce the kernels exactly at zero rotation (S - K even: each kernel sits at its scope's
    centre) or are minimum-norm scopes (S - K odd), and the largest reproduction error (max
    |kernel - zero-rotation samples of the scope|), absolute and relative to max |kernel|.
    For example::

        res3: 4 3x3 kernel(s) -> 5x5 DK scopes, exact: kernels at the scope centres (max
        reproduction error 0.000e+00, relative 0.000e+00)
    """
    stages: Dict[str, List[LayerConversion]] = {}
    for layer in result.converted:
        stages.setdefault(_stage_of(layer.name), []).append(layer)
    lines = []
    for stage, layers in stages.items():
        kernels = sorted({"x".join(map(str, layer.source_shape[2:])) for layer in layers})
        scopes = sorted({"x".join(map(str, layer.target_shape[2:])) for layer in layers})
        error = max(layer.error for layer in layers)
        relative = max(layer.relative_error for layer in layers)
        even = all(
            (scope - kernel) % 2 == 0
            for layer in layers
            for kernel, scope in zip(layer.source_shape[2:], layer.target_shape[2:])
        )
        kind = "exact: kernels at the scope centres" if even else "minimum-norm"
        lines.append(
            f"{stage}: {len(layers)} {'/'.join(kernels)} kernel(s) -> {'/'.join(scopes)} DK "
            f"scopes, {kind} (max reproduction error {error:.3e}, relative {relative:.3e})"
        )
    return lines
