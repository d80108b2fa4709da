"""``EXPORT_FORMATS``: format name -> how a Detectron2 (DK) model is exported, reloaded and called.

Each format object has:

* ``part``: what is exported, ``"model"`` (the whole detector) or ``"trunk"``
  (:class:`~dk_detectron2.export.trunk.DetectorTrunk`: normalisation, backbone, RPN head);
* ``suffix``: the artefact's file name in the output folder;
* ``module(model, samples)``: the eager module that is exported (the reference);
* ``calls(module, samples)``: per sample, the arguments of one call;
* ``export(module, example, path)``: writes the artefact (``example``: the arguments traced);
* ``load(path)``: a callable taking the same arguments, from the artefact alone;
* ``fixed_batch(module)``: the batch size the artefact is fixed to, or ``None`` when it takes any.

Register a new format with ``@EXPORT_FORMATS.register()`` on a class named as the format.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import nn

from .trunk import DetectorTrunk, trunk_dynamic_shapes, trunk_images

__all__ = [
    "EXPORT_FORMATS", "export_format", "export_format_names", "example_batch", "holds_global_dk",
]

EXPORT_FORMATS = Registry("DK_EXPORT_FORMAT")


def export_format_names() -> List[str]:
    return sorted(name for name, _ in EXPORT_FORMATS)


def export_format(name: str):
    """An instance of the format ``name`` (see :func:`export_format_names`)."""
    if name not in EXPORT_FORMATS:
        raise KeyError(
            f"unknown export format {name!r}; valid formats: {', '.join(export_format_names())}"
        )
    return EXPORT_FORMATS.get(name)()


def example_batch(trunk: DetectorTrunk, samples: Sequence[Dict]) -> Tuple[torch.Tensor]:
    """A batch of two sample images for tracing the trunk (a batch of one would fix the batch
    size: ``torch.export`` specialises dimensions of size 1)."""
    images = [sample["image"] for sample in samples[:2]]
    return (trunk_images(trunk, images * (2 // len(images))),)


def holds_global_dk(module: nn.Module) -> bool:
    """Whether ``module`` holds a :class:`~dk_detectron2.layers.GlobalDeformKernel2d`."""
    from ..layers import GlobalDeformKernel2d

    return any(isinstance(m, GlobalDeformKernel2d) for m in module.modules())


class _TrunkFormat:
    part = "trunk"

    def fixed_batch(self, module: nn.Module) -> Optional[int]:
        return None

    def module(self, model: nn.Module, samples: Sequence[Dict]) -> nn.Module:
        return DetectorTrunk(model).eval()

    def calls(self, module: nn.Module, samples: Sequence[Dict]) -> List[tuple]:
        return [(trunk_images(module, [sample["image"]]),) for sample in samples]

    def example(self, module: nn.Module, samples: Sequence[Dict]) -> tuple:
        return example_batch(module, samples)


@EXPORT_FORMATS.register()
class torchscript:  # noqa: N801  (registry name)
    """The whole detector, traced (Detectron2's ``TracingAdapter`` + ``torch.jit.trace``)."""

    part = "model"
    suffix = "model.ts"

    def fixed_batch(self, module):
        return 1  # the adapter takes one image

    def module(self, model, samples):
        from .torchscript import detector_adapter

        return detector_adapter(model, samples[0])

    def calls(self, module, samples):
        return [(sample["image"],) for sample in samples]

    def example(self, module, samples):
        return (samples[0]["image"],)

    def export(self, module, example, path):
        from .torchscript import trace_adapter

        trace_adapter(module, *example).save(path)

    def load(self, path) -> Callable:
        from .torchscript import load_torchscript

        return load_torchscript(path)


@EXPORT_FORMATS.register()
class torchscript_script:  # noqa: N801
    """The whole detector, scripted (Detectron2's ``scripting_with_instances``, the Mask R-CNN
    fields); the artefact is called as the eager model, ``inference([{"image": ...}])``."""

    part = "model"
    suffix = "model_scripted.ts"

    def fixed_batch(self, module):
        return None  # the scripted model takes a list of any number of images

    def module(self, model, samples):
        from .torchscript import DetectorCall

        return DetectorCall(model)

    def calls(self, module, samples):
        return [(sample["image"],) for sample in samples]

    def example(self, module, samples):
        return ()  # scripting compiles the code: no example input

    def export(self, module, example, path):
        from .torchscript import script_detector

        script_detector(module.model).save(path)

    def load(self, path) -> Callable:
        from .torchscript import DetectorCall, load_torchscript

        return DetectorCall(load_torchscript(path))


@EXPORT_FORMATS.register()
class export(_TrunkFormat):  # noqa: N801
    """``torch.export`` ExportedProgram of the trunk, dynamic batch and image size."""

    suffix = "trunk.pt2"

    def export(self, module, example, path):
        from .program import export_program

        export_program(module, example, path, trunk_dynamic_shapes(module))

    def load(self, path):
        from .program import load_program

        return load_program(path)


@EXPORT_FORMATS.register()
class aoti(_TrunkFormat):  # noqa: N801
    """AOTInductor package of the trunk's ExportedProgram (compiled C++, dynamic shapes)."""

    suffix = "trunk_aoti.pt2"

    def export(self, module, example, path):
        from .program import export_program, package_aoti

        package_aoti(export_program(module, example, None, trunk_dynamic_shapes(module)), path)

    def load(self, path):
        from .program import load_aoti

        return load_aoti(path)


@EXPORT_FORMATS.register()
class onnx(_TrunkFormat):  # noqa: N801
    """ONNX (dynamo exporter, DK ops as standard ONNX ops) of the trunk, run in ONNX Runtime.

    Batch, height and width are dynamic, except that a trunk holding a
    :class:`~dk_detectron2.layers.GlobalDeformKernel2d` is exported with a batch of one image:
    global DK convolves every sample with its own kernel in one convolution of batch x groups
    groups, and ONNX's ``Conv`` takes its group count as a constant attribute.
    """

    suffix = "trunk.onnx"

    def fixed_batch(self, module):
        return 1 if holds_global_dk(module) else None

    def example(self, module, samples):
        if self.fixed_batch(module) is not None:
            return (trunk_images(module, [samples[0]["image"]]),)
        return example_batch(module, samples)

    def export(self, module, example, path):
        from .onnx_model import export_onnx

        (shapes,) = trunk_dynamic_shapes(module)
        if self.fixed_batch(module) is not None:
            shapes = {axis: dim for axis, dim in shapes.items() if axis != 0}
        export_onnx(module, example, path, (shapes,), ["images"], module.output_names())

    def load(self, path):
        from .onnx_model import OnnxRuntimeRunner

        # the check times ONNX Runtime in turns with eager PyTorch in this process
        return OnnxRuntimeRunner(path, spinning=False)
