"""Exporting a (tiny, random-init) DK Mask R-CNN: each format reloads from disk and agrees with
eager (the AOTInductor package: tests/test_export_aoti.py)."""
import os

import pytest
import torch

from _export_models import image_samples, tiny_export_model
from dk_detectron2.export.formats import export_format, export_format_names
from dk_detectron2.export.trunk import DetectorTrunk, trunk_dynamic_shapes, trunk_images
from dk_detectron2.export.verify import compare_outputs

TOLERANCE = 1e-4  # relative, per output


def _export_and_compare(model, samples, name, tmp_path):
    fmt = export_format(name)
    module = fmt.module(model, samples)
    path = str(tmp_path / fmt.suffix)
    fmt.export(module, fmt.example(module, samples), path)
    assert os.path.getsize(path) > 0
    exported = fmt.load(path)
    results = []
    with torch.no_grad():
        for args in fmt.calls(module, samples):
            results.append(compare_outputs(module(*args), exported(*args)))
    return module, exported, results


def test_formats_are_registered():
    assert export_format_names() == ["aoti", "export", "onnx", "torchscript", "torchscript_script"]
    with pytest.raises(KeyError, match="valid formats: aoti, export, onnx, torchscript, "
                                       "torchscript_script"):
        export_format("tflite")


def test_torchscript_traces_the_whole_mask_rcnn(tmp_path):
    model = tiny_export_model(tmp_path)
    samples = image_samples(((96, 128), (128, 96)))  # traced on the first size, run on both
    module, traced, results = _export_and_compare(model, samples, "torchscript", tmp_path)
    code = traced.inlined_graph if hasattr(traced, "inlined_graph") else traced.graph
    assert "dk_detectron2::deform_kernel_conv2d" in str(code)
    boxes, classes, masks, scores, size = module(samples[0]["image"])
    assert boxes.shape[1] == 4 and masks.shape[1:] == (1, 28, 28) and len(scores) > 0
    for result in results:
        assert result["shapes_equal"] and result["integers_equal"]
        assert result["max_rel"] <= TOLERANCE
        assert result["max_abs"] <= 1e-3 * 128  # boxes within 1e-3 of the image size


@pytest.mark.slow
def test_trace_detector_returns_the_adapter_and_its_trace(tmp_path):
    from dk_detectron2.export.torchscript import trace_detector

    model = tiny_export_model(tmp_path, "deform_kernel")
    sample = image_samples(((96, 128),))[0]
    adapter, traced = trace_detector(model, sample)
    traced.save(str(tmp_path / "model.ts"))
    reloaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        found = compare_outputs(adapter(sample["image"]), reloaded(sample["image"]))
    assert found["shapes_equal"] == 1.0 and found["integers_equal"] == 1.0
    assert found["max_rel"] <= TOLERANCE


def test_torch_export_of_the_trunk_has_dynamic_batch_and_size(tmp_path):
    model = tiny_export_model(tmp_path)
    module, program, results = _export_and_compare(model, image_samples(), "export", tmp_path)
    for result in results:  # three image sizes, one image per call
        assert result["shapes_equal"] and result["max_rel"] <= TOLERANCE
    batch = trunk_images(module, [s["image"] for s in image_samples()])  # batch of 3 at 128 x 128
    with torch.no_grad():
        found = compare_outputs(module(batch), program(batch))
    assert found["shapes_equal"] and found["max_rel"] <= TOLERANCE
    names = module.output_names()
    assert names[:5] == ["p2", "p3", "p4", "p5", "p6"] and names[5].startswith("objectness_")


def test_trunk_images_pads_uint8_images_with_the_pixel_mean(tmp_path):
    trunk = DetectorTrunk(tiny_export_model(tmp_path))
    image = torch.full((3, 70, 100), 200, dtype=torch.uint8)
    batch = trunk_images(trunk, [image])
    assert batch.dtype == torch.float32 and batch.shape == (1, 3, 96, 128)
    assert torch.equal(batch[0, :, :70, :100], image.float())
    assert torch.allclose(batch[0, :, 90, 120], trunk.pixel_mean.view(3))


def test_trunk_rejects_a_model_without_a_backbone():
    with pytest.raises(TypeError, match="meta-architecture"):
        DetectorTrunk(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.slow
def test_onnx_of_the_trunk_runs_in_onnx_runtime(tmp_path):
    import onnxruntime  # noqa: F401
    model = tiny_export_model(tmp_path)
    module, runner, results = _export_and_compare(model, image_samples(), "onnx", tmp_path)
    for result in results:
        assert result["shapes_equal"] and result["max_rel"] <= TOLERANCE
    batch = trunk_images(module, [s["image"] for s in image_samples()])
    with torch.no_grad():
        found = compare_outputs(module(batch), runner(batch))
    assert found["shapes_equal"] and found["max_rel"] <= TOLERANCE


def test_onnx_of_a_global_dk_trunk_fixes_the_batch_at_one_image(tmp_path):
    """Global DK runs its per-sample kernels as one convolution of batch x groups groups, a
    constant in ONNX: its trunk exports with a batch of one image (height and width dynamic)."""
    import onnxruntime  # noqa: F401
    from dk_detectron2.tools.export import _summary, export_and_verify

    model = tiny_export_model(tmp_path, "global_deform_kernel")
    samples = image_samples()  # three sizes, one image per call
    report = export_and_verify(model, samples, "onnx", str(tmp_path / "out"), repeats=1)
    assert report["fixed_batch"] == 1 and "batched" not in report
    assert report["shapes_equal"] == 1.0 and report["max_rel"] <= TOLERANCE
    assert "batch fixed at 1 (the model holds GlobalDeformKernel2d" in _summary(report)
    runner = export_format("onnx").load(report["artefact"])
    two = trunk_images(DetectorTrunk(model), [s["image"] for s in samples[:2]])
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        runner(two)  # the fixed batch is enforced by the runtime


def test_only_onnx_of_a_global_dk_model_fixes_the_batch(tmp_path):
    local = tiny_export_model(tmp_path)
    global_dk = tiny_export_model(tmp_path, "global_deform_kernel")
    samples = image_samples()
    for name in ("export", "aoti", "onnx"):
        fmt = export_format(name)
        assert fmt.fixed_batch(fmt.module(local, samples)) is None
        expected = 1 if name == "onnx" else None
        assert fmt.fixed_batch(fmt.module(global_dk, samples)) == expected
    onnx = export_format("onnx")
    assert onnx.example(onnx.module(global_dk, samples), samples)[0].shape[0] == 1
    assert onnx.example(onnx.module(local, samples), samples)[0].shape[0] == 2


@pytest.mark.slow
def test_whole_mask_rcnn_stops_at_the_proposal_selection_in_torch_export(tmp_path):
    """Where torch.export (and so the dynamo ONNX exporter) stops on the whole detector: the
    backbone and the RPN head trace, Detectron2's proposal selection branches on tensor values."""
    from dk_detectron2.export.torchscript import detector_adapter

    model = tiny_export_model(tmp_path)
    adapter = detector_adapter(model, image_samples()[0])
    with pytest.raises(Exception) as info:
        torch.export.export(adapter, tuple(adapter.flattened_inputs), strict=False)
    assert "data-dependent" in str(info.value)
    assert "find_top_rpn_proposals" in str(info.value) or "proposal_utils" in str(info.value)


@pytest.mark.slow
def test_whole_mask_rcnn_stops_at_the_proposal_selection_in_dynamo_onnx_export(tmp_path):
    """The dynamo ONNX exporter's step 1 is torch.export (non-strict, then strict): it stops at
    the same place, Detectron2's ``if not valid_mask.all()`` in find_top_rpn_proposals."""
    import onnxscript  # noqa: F401
    from dk_detectron2.export.onnx_translations import dk_onnx_translation_table
    from dk_detectron2.export.torchscript import detector_adapter

    model = tiny_export_model(tmp_path)
    sample = image_samples()[0]
    adapter = detector_adapter(model, sample)
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.onnx.export(adapter, (sample["image"],), dynamo=True,
                          custom_translation_table=dk_onnx_translation_table())
    message = str(info.value)
    assert "Failed to export the model with torch.export" in message
    assert "data-dependent" in message
    assert "find_top_rpn_proposals" in message and "valid_mask.all()" in message


@pytest.mark.slow
def test_whole_mask_rcnn_stops_only_at_the_dk_operators_in_legacy_onnx_export(tmp_path):
    """Detectron2's route (``TracingAdapter`` + the legacy TorchScript-based ``torch.onnx.export``)
    stops at the first DK operator, which has no ONNX symbolic; with a placeholder symbolic (a
    custom-domain node) the rest of the Mask R-CNN exports, so the DK operators are the only
    blocker on that route."""
    import onnx
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    from dk_detectron2.export.torchscript import detector_adapter

    model = tiny_export_model(tmp_path)
    sample = image_samples()[0]
    adapter = detector_adapter(model, sample)
    path = str(tmp_path / "legacy.onnx")
    with pytest.raises(Exception, match="unrecognized namespace "
                                        "dk_detectron2::deform_kernel_conv2d"), torch.no_grad():
        torch.onnx.export(adapter, (sample["image"],), path, dynamo=False, opset_version=17)

    def placeholder(g, input, offset, rotation, weight, *geometry):
        return g.op("dk_detectron2::DeformKernelConv2d", input, offset, rotation, weight)

    register_custom_op_symbolic("dk_detectron2::deform_kernel_conv2d", placeholder, 17)
    try:
        with torch.no_grad():
            torch.onnx.export(adapter, (sample["image"],), path, dynamo=False, opset_version=17)
    finally:
        unregister_custom_op_symbolic("dk_detectron2::deform_kernel_conv2d", 17)
    nodes = onnx.load(path).graph.node
    custom = {(node.domain, node.op_type) for node in nodes if node.domain not in ("", "ai.onnx")}
    assert custom == {("dk_detectron2", "DeformKernelConv2d")}
    assert any(node.op_type == "RoiAlign" for node in nodes)  # the heads made it in


def test_fake_kernels_trace_data_dependent_image_sizes():
    """A detector reads image sizes from tensors; the DK fake kernels must not guard on them."""
    from dk_detectron2.layers import DeformKernel2d, DeformKernelConv2d

    class Crop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dk = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=5)
            self.dkc = DeformKernelConv2d(4, 4, 3, padding=1, groups=4, scope_size=5)

        def forward(self, x, size):
            # A canvas whose size is read from a tensor (as ImageList batching does).
            rows, cols = size.tolist()
            canvas = x.new_zeros(x.shape[0], x.shape[1], rows, cols)
            return self.dkc(self.dk(canvas + x.mean()))

    module = Crop().eval()
    x, size = torch.randn(1, 4, 12, 9), torch.tensor([7, 5])
    program = torch.export.export(module, (x, size))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, size), module(x, size))


def test_export_and_verify_batches_samples_of_different_sizes(tmp_path):
    """The batched check pads every sample to the largest one (test images of a COCO config
    differ in size), and the report holds its differences next to the per-image ones."""
    from dk_detectron2.tools.export import export_and_verify

    model = tiny_export_model(tmp_path, "deform_kernel")
    samples = image_samples(((96, 128), (128, 96)))
    report = export_and_verify(model, samples, "export", str(tmp_path / "out"), repeats=1)
    assert report["part"] == "trunk" and os.path.isfile(report["artefact"])
    assert report["shapes_equal"] == 1.0 and report["max_rel"] <= TOLERANCE
    assert report["batched"]["shapes_equal"] == 1.0
    assert report["batched"]["max_rel"] <= TOLERANCE
    with pytest.raises(ValueError, match="samples must hold at least one input dict"):
        export_and_verify(model, [], "export", str(tmp_path / "out"))
