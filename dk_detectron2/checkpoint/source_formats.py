"""Naming conventions of the checkpoints a DK model can start from.

Each entry of :data:`SOURCE_FORMAT_REGISTRY` renames a checkpoint's state dict into Detectron2's
ResNet names (``stem.conv1.weight``, ``res3.0.conv2.weight``, ``res3.0.conv2.norm.running_mean``,
``res3.0.shortcut.weight`` ...): ``fn(state_dict) -> state_dict``. The renamed keys may still lack
the model's prefix (``backbone.bottom_up.``); Detectron2's suffix matching adds it.

- ``"detectron2"``: already Detectron2 names (Detectron2 ``.pth`` files and ``.pkl`` model-zoo
  files written by Detectron2's converters).
- ``"caffe2"``: Caffe2 / Detectron1 blob names (``res2_0_branch2a_w`` ...; e.g. ``MSRA/R-50.pkl``),
  renamed by Detectron2's ``convert_c2_detectron_names``.
- ``"torchvision"``: ``torchvision.models.ResNet`` state dicts (``layer1.0.conv2.weight`` ...).
- ``"timm_dk"``: checkpoints of the classification models of :mod:`dk_detectron2.classification`
  (timm's training checkpoint or a plain state dict): the backbones' names already (the ResNets
  are built from the backbone's pieces, the MobileNet-V2 backbone keeps timm's names), plus the
  classification head (``head.fc.*``; MobileNet-V2's ``conv_head.*``, ``bn2.*``, ``classifier.*``),
  which the loader reports as not used by the detector (:mod:`.timm_format`).
"""
import re
from typing import Any, Dict, Mapping

from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
from fvcore.common.registry import Registry

__all__ = ["SOURCE_FORMAT_REGISTRY", "rename_to_detectron2", "detect_source_format"]

SOURCE_FORMAT_REGISTRY = Registry("DK_CHECKPOINT_SOURCE_FORMAT")
SOURCE_FORMAT_REGISTRY.__doc__ = """
Registry of checkpoint naming conventions: name -> ``fn(state_dict) -> state_dict`` returning the
same tensors under Detectron2's ResNet names. An entry's name is its function's name.
"""


@SOURCE_FORMAT_REGISTRY.register()
def detectron2(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Detectron2 names already: unchanged."""
    return dict(state_dict)


@SOURCE_FORMAT_REGISTRY.register()
def caffe2(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Caffe2 / Detectron1 blob names, renamed by Detectron2's ``convert_c2_detectron_names``."""
    renamed, _ = convert_c2_detectron_names(dict(state_dict))
    return renamed


# torchvision ResNet -> Detectron2 ResNet, applied in order to each key.
_TORCHVISION_RULES = (
    (re.compile(r"^conv1\."), "stem.conv1."),
    (re.compile(r"^bn1\."), "stem.conv1.norm."),
    (re.compile(r"^layer(\d+)\.(\d+)\.downsample\.0\."), "res{stage}.\\2.shortcut."),
    (re.compile(r"^layer(\d+)\.(\d+)\.downsample\.1\."), "res{stage}.\\2.shortcut.norm."),
    (re.compile(r"^layer(\d+)\.(\d+)\.conv(\d)\."), "res{stage}.\\2.conv\\3."),
    (re.compile(r"^layer(\d+)\.(\d+)\.bn(\d)\."), "res{stage}.\\2.conv\\3.norm."),
    (re.compile(r"^fc\."), "linear."),
)


def _torchvision_key(key: str) -> str:
    for pattern, replacement in _TORCHVISION_RULES:
        match = pattern.match(key)
        if match is None:
            continue
        if "{stage}" in replacement:
            # torchvision's layer1..layer4 are Detectron2's res2..res5.
            replacement = replacement.format(stage=int(match.group(1)) + 1)
        return pattern.sub(replacement, key, count=1)
    return key


@SOURCE_FORMAT_REGISTRY.register()
def torchvision(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """torchvision ResNet names (``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``)."""
    return {_torchvision_key(key): value for key, value in state_dict.items()}


@SOURCE_FORMAT_REGISTRY.register()
def timm_dk(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The timm DK ResNets (``dk_resnet50_dw`` ...) and MobileNet-V2s (``dk_mobilenetv2_050`` ...):
    the backbones' names already; unchanged (the classification head matches nothing in a
    detector and is reported by the loader)."""
    return dict(state_dict)


def rename_to_detectron2(state_dict: Mapping[str, Any], source_format: str) -> Dict[str, Any]:
    """Renames ``state_dict`` from ``source_format`` (a :data:`SOURCE_FORMAT_REGISTRY` name)."""
    if source_format not in SOURCE_FORMAT_REGISTRY:
        known = ", ".join(sorted(name for name, _ in SOURCE_FORMAT_REGISTRY))
        raise ValueError(f"source_format must be one of {known}, got {source_format!r}")
    return SOURCE_FORMAT_REGISTRY.get(source_format)(state_dict)


_TORCHVISION_MARKERS = re.compile(r"^(module\.)?(layer\d+\.\d+\.(conv|bn)\d\.|bn1\.)")
_TIMM_DK_STEM = re.compile(r"^(module\.)?(stem\.conv1|conv_stem)\.")
_TIMM_DK_HEAD = re.compile(r"^(module\.)?(head\.fc|classifier)\.")


def detect_source_format(checkpoint: Mapping[str, Any]) -> str:
    """Guesses the naming convention of a loaded checkpoint.

    Args:
        checkpoint: as returned by ``DetectionCheckpointer._load_file``: a dict with ``"model"``
            (the state dict) and optionally ``"__author__"``.

    Returns:
        ``"caffe2"`` for Caffe2 / Detectron1 files (``__author__ == "Caffe2"``), ``"timm_dk"``
        for timm's training checkpoints (``__author__ == "timm"``, set by the loader for a file
        with a ``"state_dict"``) and for state dicts of the timm DK ResNets (``stem.conv1.*`` and
        the classifier ``head.fc.*``, without a model prefix) and MobileNet-V2s (``conv_stem.*``
        and ``classifier.*``), ``"torchvision"`` when the keys
        follow torchvision's ResNet (``layer1.0.conv1.weight``, ``bn1.weight``), else
        ``"detectron2"``.
    """
    author = checkpoint.get("__author__")
    if author == "Caffe2":
        return "caffe2"
    if author == "timm":
        return "timm_dk"
    keys = list(checkpoint["model"])
    if author is None and any(_TIMM_DK_STEM.match(key) for key in keys) and any(
        _TIMM_DK_HEAD.match(key) for key in keys
    ):
        return "timm_dk"
    if any(_TORCHVISION_MARKERS.match(key) for key in keys):
        return "torchvision"
    return "detectron2"
