"""Classification with Deformable Kernels: timm models, a trainer on timm's library, a miniature
dataset.

``import dk_detectron2`` (or this package) registers the models in timm's registry, so
``timm.create_model("dk_resnet50_dw", num_classes=N, scope_size=5)`` works like any timm model:

- :mod:`.resnet`: ``resnet50_dw`` / ``dk_resnet50_dw`` / ``dkdcn_resnet50_dw``, the R18 siblings
  ``resnet18_dw`` / ``dk_resnet18_dw`` / ``dkdcn_resnet18_dw`` and their half-width ``*_050``;
- :mod:`.mobilenetv2`: ``dk_mobilenetv2_100`` / ``_075`` / ``_050`` beside timm's
  ``mobilenetv2_100`` / ``_075`` / ``_050``.

:func:`generator_parameters` gives the DK generators (for their own learning rate); a checkpoint of
these models is a valid ``MODEL.WEIGHTS`` of the matching Detectron2 config (``DKCheckpointer``).
``python -m dk_detectron2.classification.train`` trains them on an ImageFolder.
"""
from typing import List

import torch

from ..solver import generator_parameter_names
from . import mobilenetv2, resnet  # noqa: F401  (registers the models in timm)
from .checkpoint_filter import checkpoint_filter_fn, unwrap_checkpoint
from .mobilenetv2 import DKMobileNetV2
from .resnet import DKResNet, MODEL_SPECS

__all__ = [
    "DKResNet",
    "DKMobileNetV2",
    "MODEL_NAMES",
    "checkpoint_filter_fn",
    "generator_parameters",
    "unwrap_checkpoint",
]

MODEL_NAMES = tuple(MODEL_SPECS) + (
    "dk_mobilenetv2_100", "dk_mobilenetv2_075", "dk_mobilenetv2_050"
)


def generator_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters of ``model``'s DK generators (rotation / offset predictors), in
    ``named_parameters`` order; empty for a rigid model."""
    names = generator_parameter_names(model)
    return [p for name, p in model.named_parameters() if name in names]
