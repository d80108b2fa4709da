"""TorchScript of a whole Detectron2 model, traced or scripted.

* Tracing, through Detectron2's ``TracingAdapter`` (:func:`trace_detector`): the adapter
  flattens the model's list-of-dicts input into the image tensor and its ``Instances`` output into
  tensors, so ``torch.jit.trace`` records the whole Mask R-CNN (backbone with the DK operators,
  RPN, NMS, ROIAlign, heads) for one input size's control flow.
* Scripting, through Detectron2's ``scripting_with_instances`` (:func:`script_detector`): the
  model's Python is compiled, control flow included, with ``Instances`` replaced by a statically
  typed class whose fields are declared up front (:data:`MASK_RCNN_FIELDS` for a Mask R-CNN). The
  DK modules and the DK ResNet backbones compile: their Python-only argument checks run in eager
  mode only (``torch.jit.is_scripting()``), and the operator wrappers of
  :mod:`dk_detectron2.layers.ops` call ``torch.ops.dk_detectron2.*`` directly when scripted. The
  scripted model takes ``List[Dict[str, Tensor]]`` as the eager one does; call
  ``scripted.inference(inputs, do_postprocess=False)`` (or :class:`DetectorCall` for flat tensors).

Either way the DK operators appear in the graph as ``dk_detectron2::*`` calls; loading the ``.ts``
file needs the operator library (``import dk_detectron2`` in Python, or ``dk_detectron2/_C*.so``
loaded into a C++ program) and, for the detector's ops, torchvision's.
"""
import warnings
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from detectron2.export import TracingAdapter, scripting_with_instances
from detectron2.structures import Boxes
from torch import nn

__all__ = [
    "MASK_RCNN_FIELDS", "DetectorCall", "detector_adapter", "detector_inference",
    "flatten_instances", "load_torchscript", "script_detector", "trace_adapter", "trace_detector",
]

# The Instances fields a Mask R-CNN uses at inference (Detectron2's own scripting test declares
# the same): the proposals' and the detections'.
MASK_RCNN_FIELDS: Dict[str, type] = {
    "proposal_boxes": Boxes,
    "objectness_logits": torch.Tensor,
    "pred_boxes": Boxes,
    "scores": torch.Tensor,
    "pred_classes": torch.Tensor,
    "pred_masks": torch.Tensor,
}


def detector_inference(model: nn.Module, inputs: List[Dict]) -> List[Dict]:
    """The model's predictions before rescaling to the original size (as Detectron2's
    ``export_model.py``): boxes and masks in the input image's resolution."""
    instances = model.inference(inputs, do_postprocess=False)
    return [{"instances": item} for item in instances]


def detector_adapter(model: nn.Module, sample: Dict) -> TracingAdapter:
    """``TracingAdapter`` of ``model`` (a GeneralizedRCNN in eval mode) for inputs like ``sample``
    (``{"image": [3, H, W]}``): call it with the image tensor; it returns the flattened
    predictions: boxes [N, 4], classes [N], masks [N, 1, M, M], scores [N], image size [2] (see
    ``adapter.outputs_schema``)."""
    return TracingAdapter(model, [{"image": sample["image"]}], detector_inference)


def trace_adapter(adapter: TracingAdapter, image: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``adapter`` on ``image`` [3, H, W]; Detectron2's tracing-friendly
    code asserts on shapes, so its ``TracerWarning``\ s are silenced."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(adapter, (image,), check_trace=False)


def trace_detector(model: nn.Module, sample: Dict) -> Tuple[TracingAdapter, torch.jit.ScriptModule]:
    """Traces ``model`` (a GeneralizedRCNN in eval mode) on one input dict ``{"image": [3, H, W]}``.

    Returns the adapter (eager: call it with the image tensor) and the traced module (same call
    and outputs, see :func:`detector_adapter`); ``traced.save(path)`` writes the ``.ts`` file.
    """
    adapter = detector_adapter(model, sample)
    return adapter, trace_adapter(adapter, sample["image"])


def script_detector(model: nn.Module,
                    fields: Optional[Mapping[str, type]] = None) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of ``model`` (a GeneralizedRCNN in eval mode, on the CPU or a GPU)
    through Detectron2's ``scripting_with_instances``.

    Args:
        model: the detector; must be in eval mode (Detectron2 scripts inference only).
        fields: ``{Instances field: type}`` of every field the model reads or writes
            (default :data:`MASK_RCNN_FIELDS`; a keypoint model adds e.g. ``pred_keypoints``).
    Returns:
        the scripted model: ``scripted(inputs)`` / ``scripted.inference(inputs,
        do_postprocess=False)`` with ``inputs`` a list of ``{"image": [3, H, W]}``, as the eager
        model; ``scripted.save(path)`` writes the ``.ts`` file.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "inference"):
        raise TypeError(
            f"model must be a Detectron2 meta-architecture with inference() "
            f"(e.g. GeneralizedRCNN), got {type(model).__name__}"
        )
    if model.training:
        raise ValueError("model must be in eval mode (call model.eval()): Detectron2 scripts "
                         "inference only")
    return scripting_with_instances(model, dict(MASK_RCNN_FIELDS if fields is None else fields))


def flatten_instances(instances) -> Tuple[torch.Tensor, ...]:
    """A Mask R-CNN's detections (eager ``Instances`` or a scripted model's) as the tensors
    ``(boxes [N, 4], classes [N], masks [N, 1, M, M], scores [N], image size [2])``: the
    order of :func:`detector_adapter`'s outputs."""
    return (
        instances.pred_boxes.tensor,
        instances.pred_classes,
        instances.pred_masks,
        instances.scores,
        torch.tensor(list(instances.image_size)),
    )


class DetectorCall:
    """``call(image) -> flatten_instances(...)``: one image [3, H, W] through
    ``model.inference([{"image": image}], do_postprocess=False)``, for an eager or a scripted
    detector alike (the scripted one returns its own ``Instances`` class)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        instances = self.model.inference([{"image": image}], do_postprocess=False)
        return flatten_instances(instances[0])


def load_torchscript(path: str) -> torch.jit.ScriptModule:
    """Loads a traced or scripted ``.ts`` file on the CPU (needs the DK operators:
    ``import dk_detectron2``)."""
    return torch.jit.load(path, map_location="cpu")
