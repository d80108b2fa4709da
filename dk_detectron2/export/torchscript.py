"""TorchScript of a whole Detectron2 model by tracing, through Detectron2's ``TracingAdapter``.

The adapter flattens the model's list-of-dicts input into the image tensor and its
``Instances`` output into tensors, so ``torch.jit.trace`` records the whole Mask R-CNN (backbone
with the DK operators, RPN, NMS, ROIAlign, heads). The DK operators appear in the graph as
``dk_detectron2::*`` calls; loading the ``.ts`` file needs the operator library (``import
dk_detectron2`` in Python, or ``dk_detectron2/_C*.so`` loaded into a C++ program) and, for the
detector's ops, torchvision's. Scripting (``torch.jit.script``) is not supported: the DK modules
validate their arguments in plain Python.
"""
import warnings
from typing import Dict, List, Tuple

import torch
from detectron2.export import TracingAdapter
from torch import nn

__all__ = [
    "detector_adapter", "detector_inference", "load_torchscript", "trace_adapter", "trace_detector",
]


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


def load_torchscript(path: str) -> torch.jit.ScriptModule:
    """Loads a traced ``.ts`` file on the CPU (needs the DK operators: ``import dk_detectron2``)."""
    return torch.jit.load(path, map_location="cpu")
