"""Deploying DK models with the ecosystem's tools: TorchScript, torch.export, AOTInductor, ONNX.

* :mod:`.trunk`: :class:`DetectorTrunk`, the part of a Detectron2 R-CNN that exports as one graph
  with dynamic batch and image size (normalisation, backbone, RPN head);
* :mod:`.torchscript`: the whole detector traced with Detectron2's ``TracingAdapter``, or
  scripted with Detectron2's ``scripting_with_instances``;
* :mod:`.program`: ``torch.export`` programs and AOTInductor packages;
* :mod:`.onnx_translations`: the DK operators in standard ONNX ops, and :mod:`.onnx_model`:
  export with them and run in ONNX Runtime;
* :mod:`.formats`: ``EXPORT_FORMATS``, the registry the command line uses;
  :mod:`.verify`: differences from eager and speed; :mod:`.samples`: test-dataset inputs.

The command line is :mod:`dk_detectron2.tools.export`. Nothing is imported here, so
``import dk_detectron2`` stays light and onnx/onnxscript are only needed for the ONNX format.
"""
