"""Converting a checkpoint file: loading it, the DK scope shapes its blocks need, and writing the
converted checkpoint (what ``python -m dk_detectron2.checkpoint`` runs; the state-dict conversion
itself is :mod:`.conversion`).

The 3x3 block weights (``res<N>.<block>.conv2.weight`` of bottlenecks, ``conv1``/``conv2`` of basic
blocks) of the chosen stages become SxS DK scopes that reproduce them at zero rotation; every
other tensor is kept, under Detectron2's names. The output is a Detectron2 checkpoint
(``{"model": ..., "matching_heuristics": True}``) usable as ``MODEL.WEIGHTS``.
"""
import re
from typing import Dict, Mapping, Sequence, Tuple
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .atomic import atomic_write
from .conversion import ConversionResult, convert_state_dict
from .source_formats import detect_source_format, rename_to_detectron2

__all__ = [
    "load_checkpoint_file", "block_scope_shapes", "model_shapes", "convert_checkpoint_file"
]

# A block conv of a ResNet stage: res<N>.<block>.conv<j>.weight (3x3 when not 1x1).
_BLOCK_CONV = re.compile(r"(?:^|\.)(res\d+)\.\d+\.conv\d\.weight$")


def load_checkpoint_file(path: str) -> Dict:
    """Reads a checkpoint as Detectron2 does (``.pkl`` model zoo, ``.pth``, ``.pyth``).

    Returns:
        ``{"model": state_dict, ...}``, with ``"__author__"`` for model-zoo files.
    """
    checkpointer = DetectionCheckpointer(torch.nn.Module())
    checkpointer._parsed_url_during_load = urlparse(path)  # as DetectionCheckpointer.load sets it
    try:
        return checkpointer._load_file(path)
    finally:
        checkpointer._parsed_url_during_load = None


def block_scope_shapes(
    state_dict: Mapping[str, torch.Tensor],
    scope_size: Tuple[int, int],
    stages: Sequence[str],
) -> Dict[str, Tuple[int, ...]]:
    """Target shapes for a DK backbone with full/grouped DK layers in ``stages``.

    Every KxK (K > 1) block conv of those stages becomes a scope: the bottleneck's ``conv2``, both
    convs of a basic block (R18/R34); 1x1 convs, shortcuts and the stem are kept.

    Args:
        state_dict: a checkpoint in Detectron2's names.
        scope_size: (Sh, Sw).
        stages: e.g. ``("res3", "res4", "res5")``.

    Returns:
        name -> shape: ``[O, I, Sh, Sw]`` for each ``res<N>.<block>.conv<j>.weight`` [O, I, K, K]
        (K > 1) of those stages, the checkpoint's own shape for everything else.
    """
    shapes = {}
    for name, value in state_dict.items():
        shape = tuple(value.shape)
        match = _BLOCK_CONV.search(name)
        if (
            match is not None
            and match.group(1) in stages
            and len(shape) == 4
            and shape[2:] != (1, 1)
        ):
            shape = shape[:2] + tuple(scope_size)
        shapes[name] = shape
    return shapes


def model_shapes(config_file: str, opts: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """Parameter shapes of the model ``config_file`` builds (on the CPU)."""
    import dk_detectron2  # noqa: F401  (registers the DK backbones)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from dk_detectron2.config import add_dk_config

    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def convert_checkpoint_file(
    input_path: str,
    output_path: str,
    scope_size: Tuple[int, int],
    source_format: str = "auto",
    stages: Sequence[str] = ("res3", "res4", "res5"),
    target_shapes: Mapping[str, Tuple[int, ...]] = None,
) -> ConversionResult:
    """Converts ``input_path`` and writes a Detectron2 checkpoint to ``output_path``.

    ``target_shapes`` (model name -> shape) overrides the block rule of
    :func:`block_scope_shapes`. Nothing is written if the checkpoint does not fit; the file is
    written atomically (:func:`~dk_detectron2.checkpoint.atomic.atomic_write`): complete, or the
    previous ``output_path`` left as it was.
    """
    checkpoint = load_checkpoint_file(input_path)
    if source_format == "auto":
        source_format = detect_source_format(checkpoint)
    state_dict = checkpoint["model"]
    if target_shapes is None:
        renamed = rename_to_detectron2(state_dict, source_format)
        target_shapes = block_scope_shapes(renamed, scope_size, stages)
        match_by_suffix = False
    else:
        match_by_suffix = True
    result = convert_state_dict(
        state_dict, target_shapes, source_format=source_format, match_by_suffix=match_by_suffix
    )
    converted = {
        "model": result.state_dict,
        "__author__": "dk_detectron2.checkpoint",
        "matching_heuristics": True,
    }
    # a process killed while saving leaves the previous file (if any), never a truncated one
    atomic_write(output_path, lambda f: torch.save(converted, f))
    return result
