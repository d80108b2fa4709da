"""Loading a classification checkpoint into a timm DK model: the timm side of the 3x3 -> scope
conversion.

timm calls :func:`checkpoint_filter_fn` (the ``pretrained_filter_fn`` of every model of this
package) on the state dict of ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))``; ``timm.models.load_checkpoint(model, path,
filter_fn=checkpoint_filter_fn)`` does the same for a model built without it. The checkpoint goes
through :func:`dk_detectron2.checkpoint.convert_state_dict`, the very conversion Detectron2's
``DKCheckpointer`` applies: a rigid ``[C, 1, 3, 3]`` kernel whose parameter is a DK scope
``[C, 1, S, S]`` becomes the scope that reproduces it at zero rotation (exactly for S - 3 even),
so a rigid ``resnet50_dw`` checkpoint loads into ``dk_resnet50_dw`` and the DK model starts out
computing what the rigid one computed. Parameters the checkpoint lacks only because the model is
a DK one (its generators) keep their zero initialisation; anything else that does not fit raises.
"""
import logging
from typing import Dict, Mapping

import torch
from torch import nn

from ..checkpoint.conversion import CheckpointShapeError, convert_state_dict, format_stage_report
from ..checkpoint.timm_format import unwrap_checkpoint
from ..solver import generator_parameter_names

__all__ = ["checkpoint_filter_fn", "unwrap_checkpoint"]

logger = logging.getLogger(__name__)


def _classifier_prefixes(model: nn.Module) -> tuple:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else classifier
    return tuple(f"{name}." for name in names)


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``filter_fn``: ``state_dict`` (a checkpoint of this model, of its rigid twin, or of a
    DK model with the same scope size) -> a state dict ``model.load_state_dict`` takes strictly.

    A classifier of another number of classes is passed through unchanged: timm's
    ``load_pretrained`` drops it when ``num_classes`` differs from the ``pretrained_cfg``'s (1000
    unless ``pretrained_cfg_overlay=dict(file=..., num_classes=N)`` says the checkpoint has N), and
    ``load_checkpoint`` refuses it, naming the layer and both shapes.

    Raises:
        CheckpointShapeError: a tensor fits neither its parameter nor a DK scope of it (another
            model, or DK scopes of another scope size), or the checkpoint lacks a parameter that
            is not a DK generator. The message names each layer with both shapes.
    """
    state_dict = unwrap_checkpoint(state_dict)
    target = model.state_dict()
    classifier = {
        name: value for name, value in state_dict.items()
        if name.startswith(_classifier_prefixes(model)) and name in target
        and tuple(value.shape) != tuple(target[name].shape)
    }
    body = {name: value for name, value in state_dict.items() if name not in classifier}
    result = convert_state_dict(body, target, match_by_suffix=False)
    generators = generator_parameter_names(model)
    # A DK scope of another scope size would be resampled as if it were a rigid kernel: a layer is
    # converted only when the checkpoint has no generator for it, i.e. it was rigid.
    resampled = [
        layer for layer in result.converted
        if any(name in generators and name.startswith(layer.name.rsplit(".", 1)[0] + ".")
               for name in body)
    ]
    if resampled:
        raise CheckpointShapeError(
            f"{len(resampled)} DK scope(s) of the checkpoint have another scope size than the "
            f"model's, e.g. {resampled[0].name}: checkpoint {list(resampled[0].source_shape)}, "
            f"model {list(resampled[0].target_shape)}"
        )
    own = {name for name in target if not name.endswith("num_batches_tracked")}
    missing = sorted(own - set(result.state_dict) - set(classifier))
    not_generators = [name for name in missing if name not in generators]
    if not_generators:
        shown = ", ".join(not_generators[:5])
        more = f" (and {len(not_generators) - 5} more)" if len(not_generators) > 5 else ""
        raise CheckpointShapeError(
            f"the checkpoint lacks {len(not_generators)} parameter(s) of the model: {shown}{more}; "
            "it is a checkpoint of another architecture"
        )
    loaded = {name: value for name, value in result.state_dict.items() if name in target}
    loaded.update(classifier)
    for name in missing:  # the generators of a rigid checkpoint's layers: zero, the rigid kernel
        loaded[name] = target[name]
    for name in target:  # BatchNorm's counters, if the checkpoint did not keep them
        if name.endswith("num_batches_tracked"):
            loaded.setdefault(name, target[name])
    for line in format_stage_report(result):
        logger.info(line)
    if missing:
        logger.info(
            "%d DK generator tensor(s) not in the checkpoint keep their zero initialisation "
            "(the DK layers start as the checkpoint's rigid kernels)", len(missing)
        )
    if result.unmatched:
        raise CheckpointShapeError(
            f"{len(result.unmatched)} checkpoint tensor(s) fit no parameter of the model: "
            f"{', '.join(result.unmatched[:5])}; it is a checkpoint of another architecture"
        )
    return loaded
