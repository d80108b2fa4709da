"""The traceable part of a Detectron2 R-CNN: everything before the proposals are selected.

Detectron2's RPN picks its proposals with Python decisions on tensor values
(``find_top_rpn_proposals``: ``if not valid_mask.all()``, then NMS keeps a data-dependent number
of boxes), which ``torch.export`` (and so the dynamo ONNX exporter) cannot capture as one graph.
Everything before that point is a fixed graph with dynamic batch and image size: pixel
normalisation, the (DK) backbone with its FPN, and the RPN head. :class:`DetectorTrunk` is that
part, as one module for ``torch.export``, AOTInductor and ONNX; TorchScript tracing (Detectron2's
``TracingAdapter``) handles the whole model instead.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.structures import ImageList
from torch import nn

__all__ = ["DetectorTrunk", "trunk_dynamic_shapes", "trunk_images"]


class DetectorTrunk(nn.Module):
    """Pixel normalisation + backbone (+ the RPN head when the model has one).

    Args:
        model: a Detectron2 meta-architecture with ``pixel_mean``, ``pixel_std`` and
            ``backbone`` (e.g. ``GeneralizedRCNN``); its modules are shared, not copied.
        with_rpn_head: also run ``model.proposal_generator.rpn_head`` on the backbone features
            named in ``model.proposal_generator.in_features``.

    ``forward(images)``: images [B, 3, H, W] in the model's input format, pixel values in [0, 255],
    H and W multiples of ``size_divisibility`` (see :func:`trunk_images`). Returns a flat tuple:
    the backbone features in ``feature_names`` order ([B, C, H/stride, W/stride] each), then, with
    the RPN head, per RPN level its objectness logits [B, A, Hi, Wi] and then per level its anchor
    deltas [B, A*4, Hi, Wi].
    """

    def __init__(self, model: nn.Module, with_rpn_head: bool = True):
        super().__init__()
        for name in ("pixel_mean", "pixel_std", "backbone"):
            if not hasattr(model, name):
                raise TypeError(
                    f"model must be a Detectron2 meta-architecture with {name!r} "
                    f"(e.g. GeneralizedRCNN), got {type(model).__name__}"
                )
        self.backbone = model.backbone
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), persistent=False)
        self.feature_names: List[str] = list(self.backbone.output_shape())
        rpn = getattr(model, "proposal_generator", None)
        self.rpn_head = rpn.rpn_head if with_rpn_head and rpn is not None else None
        self.rpn_features: List[str] = list(rpn.in_features) if self.rpn_head is not None else []
        self.size_divisibility = max(1, int(self.backbone.size_divisibility))

    def output_names(self) -> List[str]:
        """Names of the outputs, in order (``p2`` ..., ``objectness_p2`` ..., ``deltas_p2`` ...)."""
        names = list(self.feature_names)
        names += [f"objectness_{name}" for name in self.rpn_features]
        names += [f"deltas_{name}" for name in self.rpn_features]
        return names

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features: Dict[str, torch.Tensor] = self.backbone((images - self.pixel_mean) / self.pixel_std)
        outputs = [features[name] for name in self.feature_names]
        if self.rpn_head is not None:
            objectness, deltas = self.rpn_head([features[name] for name in self.rpn_features])
            outputs += list(objectness) + list(deltas)
        return tuple(outputs)


def trunk_images(trunk: DetectorTrunk, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pads [3, Hi, Wi] images (uint8 or float pixel values, as Detectron2's loaders give them)
    into one float32 [B, 3, H, W] batch for ``trunk``.

    H and W are the largest sizes rounded up to ``trunk.size_divisibility``; the padding is the
    pixel mean, so it normalises to zero as in Detectron2's own batching.
    """
    if not images:
        raise ValueError("images must hold at least one [3, H, W] tensor, got none")
    mean = trunk.pixel_mean.to(torch.float32)
    centred = [image.to(mean.device, torch.float32) - mean for image in images]
    batch = ImageList.from_tensors(centred, trunk.size_divisibility).tensor
    return batch + mean


def trunk_dynamic_shapes(trunk: DetectorTrunk, max_size: int = 4096):
    """``dynamic_shapes`` for ``torch.export`` of ``trunk``: dynamic batch; H and W any multiple of
    ``size_divisibility`` larger than the coarsest feature stride (a 1-pixel-wide feature map
    would broadcast differently), up to ``max_size``."""
    step = trunk.size_divisibility
    coarsest = max(spec.stride for spec in trunk.backbone.output_shape().values())
    blocks = dict(min=coarsest // step + 1, max=max(max_size // step, coarsest // step + 2))
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = step * torch.export.Dim("height_blocks", **blocks)
    width = step * torch.export.Dim("width_blocks", **blocks)
    return ({0: batch, 2: height, 3: width},)
