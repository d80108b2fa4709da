"""The hand-over of a classification checkpoint (``dk_detectron2.classification``) to Detectron2.

The timm ResNets of :mod:`dk_detectron2.classification.resnet` are built from the Detectron2
backbone's own pieces under its names (``stem.conv1.weight``, ``res3.0.conv2.weight``,
``res3.0.conv2.rotation_conv.weight`` ...) plus timm's classifier ``head.fc``; the MobileNet-V2
backbone keeps timm's names under its stages (``res3.blocks.2.0.conv_dw.weight`` for the
checkpoint's ``blocks.2.0.conv_dw.weight``). So their checkpoints need no renaming, only
Detectron2's suffix matching onto ``backbone.bottom_up.``. What this module
adds for :class:`~dk_detectron2.checkpoint.DKCheckpointer`:

- :func:`unwrap_checkpoint`: the model state dict of timm's training checkpoint (written by timm's
  ``CheckpointSaver``: ``{"state_dict", "arch", "epoch", "optimizer", "args", ...,
  optionally "state_dict_ema"}``), of Detectron2's (``{"model": ...}``) or a plain state dict;
- :func:`read_timm_checkpoint`: a file loaded by fvcore (which wraps a dict without a ``"model"``
  key as ``{"model": dict}``) -> Detectron2's ``{"model": state dict, "__author__": "timm"}``;
- :func:`split_classifier` and :func:`format_handover_report`: the classifier reported as not
  used by the detector, one line per backbone stage saying what was loaded, and the backbone
  tensors nothing was loaded into (the loader refuses to leave those random).
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch

from .conversion import ConversionResult

__all__ = [
    "TIMM_AUTHOR",
    "unwrap_checkpoint",
    "is_timm_training_checkpoint",
    "read_timm_checkpoint",
    "split_classifier",
    "format_handover_report",
    "backbone_tensors_left",
]

TIMM_AUTHOR = "timm"
# The classification heads, which no detector has: DKResNet's ClassifierHead (``head.fc.*``) and
# DKMobileNetV2's 1x1 conv, norm and classifier (``conv_head.*``, ``bn2.*``, ``classifier.*``).
CLASSIFIER_PREFIXES = ("head.", "conv_head.", "bn2.", "classifier.")

# Entries of a training checkpoint that hold a model state dict, in order of preference: timm's
# CheckpointSaver writes "state_dict" (and "state_dict_ema" with --model-ema), Detectron2 "model".
_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema")
_STAGE = re.compile(r"(?:^|\.)(stem|res\d+)\.")


def _strip_module(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    if state_dict and all(name.startswith("module.") for name in state_dict):
        return {name[len("module."):]: value for name, value in state_dict.items()}
    return dict(state_dict)


def unwrap_checkpoint(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The model state dict of a loaded checkpoint: a plain state dict, timm's training checkpoint
    (``{"state_dict": ..., "arch": ..., "epoch": ...}``; its ``"state_dict"``, not the EMA's) or
    Detectron2's (``{"model": ...}``); a ``module.`` prefix (DistributedDataParallel) is removed.
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a mapping, got {type(checkpoint).__name__}")
    state_dict = checkpoint
    for key in _STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            state_dict = checkpoint[key]
            break
    return _strip_module(state_dict)


def is_timm_training_checkpoint(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` is timm's training checkpoint: a ``"state_dict"`` mapping (beside
    ``"arch"``, ``"epoch"`` ... in what timm's ``CheckpointSaver`` writes; Detectron2 never writes
    that key)."""
    return isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping)


def read_timm_checkpoint(loaded: Dict[str, Any]) -> Dict[str, Any]:
    """fvcore's view of a timm training checkpoint -> Detectron2's checkpoint dict.

    Args:
        loaded: as returned by ``DetectionCheckpointer._load_file`` for a file without a
            ``"model"`` key: ``{"model": {"state_dict": ..., "arch": ..., "epoch": ...}}``.

    Returns:
        ``loaded`` unchanged unless ``loaded["model"]`` is a timm training checkpoint; then
        ``{"model": its state dict, "__author__": "timm", "matching_heuristics": True,
        "timm": {"arch", "epoch", "weights", "unused"}}`` (``weights``: the entry loaded;
        ``unused``: the other state dicts in the file, e.g. ``"state_dict_ema"``). The optimizer,
        ``args`` and the rest of timm's training state are left out: none of it is the detector's.
    """
    inner = loaded.get("model")
    if not is_timm_training_checkpoint(inner):
        return loaded
    unused = [key for key in _STATE_DICT_KEYS[1:] if isinstance(inner.get(key), Mapping)]
    return {
        "model": _strip_module(inner["state_dict"]),
        "__author__": TIMM_AUTHOR,
        "matching_heuristics": True,
        "timm": {
            "arch": inner.get("arch"),
            "epoch": inner.get("epoch"),
            "weights": "state_dict",
            "unused": unused,
        },
    }


def split_classifier(result: ConversionResult) -> List[Tuple[str, Tuple[int, ...]]]:
    """Removes the checkpoint's classification head (names under :data:`CLASSIFIER_PREFIXES` that
    matched no model tensor) from ``result`` (its ``state_dict`` and ``unmatched``); returns their
    ``(name, shape)``."""
    classifier = [name for name in result.unmatched if name.startswith(CLASSIFIER_PREFIXES)]
    for name in classifier:
        result.unmatched.remove(name)
    return [(name, tuple(result.state_dict.pop(name).shape)) for name in classifier]


def _stage(name: str) -> Optional[str]:
    match = _STAGE.search(name)
    return match.group(1) if match else None


def _converted_modules(result: ConversionResult) -> Tuple[str, ...]:
    return tuple(layer.name.rsplit(".", 1)[0] + "." for layer in result.converted)


def backbone_tensors_left(
    result: ConversionResult, model_state: Mapping[str, torch.Tensor], generators: Set[str]
) -> List[str]:
    """Model tensors of the ResNet stages (``stem``, ``res2`` ...) that ``result`` does not load:
    they would stay as initialised. The generators of a converted (rigid -> DK) layer and
    BatchNorm's ``num_batches_tracked`` are not counted: their initial values are the right ones
    (zero rotations: the DK layer computes the checkpoint's kernel)."""
    converted = _converted_modules(result)
    return [
        name for name in model_state
        if _stage(name) is not None
        and name not in result.state_dict
        and not name.endswith("num_batches_tracked")
        and not (name in generators and name.startswith(converted))
    ]


def format_handover_report(
    result: ConversionResult,
    model_state: Mapping[str, torch.Tensor],
    generators: Set[str],
    scopes: Set[str],
) -> List[str]:
    """One line per ResNet stage of the model: the tensors loaded, of which DK scopes and generator
    tensors carried over as trained, the rigid kernels converted to scopes, the generators kept at
    zero, and the tensors left as initialised. For example::

        res3: 104 tensor(s) loaded (4 DK scope(s), 8 generator tensor(s) as trained)

    Args:
        result: the conversion of the checkpoint to the model's names.
        model_state: the model's ``state_dict()``.
        generators: names of the model's generator parameters.
        scopes: names of the model's DK scope weights.
    """
    converted = {layer.name for layer in result.converted}
    converted_modules = _converted_modules(result)
    left = set(backbone_tensors_left(result, model_state, generators))
    stages: Dict[str, List[str]] = {}
    for name in model_state:
        stage = _stage(name)
        if stage is not None:
            stages.setdefault(stage, []).append(name)
    lines = []
    for stage, names in stages.items():
        loaded = [n for n in names if n in result.state_dict]
        as_trained = [n for n in loaded if n not in converted]
        parts = [f"{len(loaded)} tensor(s) loaded"]
        trained_scopes = sum(n in scopes for n in as_trained)
        trained_generators = sum(n in generators for n in as_trained)
        if trained_scopes or trained_generators:
            parts[0] += (f" ({trained_scopes} DK scope(s), {trained_generators} generator "
                         "tensor(s) as trained)")
        kernels = sum(n in converted for n in names)
        if kernels:
            parts.append(f"{kernels} rigid kernel(s) converted to DK scopes")
        zero = sum(n in generators and n.startswith(converted_modules) and n not in loaded
                   for n in names)
        if zero:
            parts.append(f"{zero} generator tensor(s) at zero (the DK layers start as the "
                         "checkpoint's rigid kernels)")
        stage_left = [n for n in names if n in left]
        if stage_left:
            parts.append(f"{len(stage_left)} left as initialised")
        lines.append(f"{stage}: " + ", ".join(parts))
    return lines
