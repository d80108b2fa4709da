"""The export command line on a tiny DK Mask R-CNN and a tiny dk_shapes split; the comparison
helpers."""
import json

import pytest
import torch

from _tools_configs import tiny_dk_config
from dk_detectron2.data import ShapesSpec, register_shapes_dataset
from dk_detectron2.export.formats import EXPORT_FORMATS
from dk_detectron2.export.verify import compare_outputs, flatten_outputs, median_seconds
from dk_detectron2.tools.export import export_and_verify, main

INF, NAN = float("inf"), float("nan")


def test_command_line_exports_verifies_and_reports(tmp_path):
    dataset = "dk_shapes_export_tool_test"
    register_shapes_dataset(dataset, str(tmp_path / "data"), "val",
                            ShapesSpec(num_images=2, image_size=96, max_objects=2))
    config = tiny_dk_config(tmp_path, "deform_kernel")
    output = tmp_path / "export"
    report = main(["--config-file", config, "--weights", "", "--format", "torchscript",
                   "--output", str(output), "--samples", "2", "--repeats", "1",
                   "--dataset", dataset, "--opts", "INPUT.MIN_SIZE_TEST", "96"])
    assert (output / "model.ts").is_file()
    saved = json.loads((output / "export_torchscript.json").read_text())
    assert saved["samples"] == 2 and saved["part"] == "model"
    assert report["max_abs"] == saved["max_abs"] <= 1e-4
    assert report["shapes_equal"] == 1.0 and report["integers_equal"] == 1.0
    assert report["eager_seconds"] > 0 and report["exported_seconds"] > 0
    assert saved["tool_seconds"] > report["exported_seconds"] and saved["repeats"] == 1


@pytest.mark.parametrize(
    "name,artefact",
    [("export", "trunk.pt2"), ("onnx", "trunk.onnx"), ("torchscript_script", "model_scripted.ts")],
)
def test_command_line_exports_the_other_formats(name, artefact, tmp_path, capsys):
    if name == "onnx":
        import onnxruntime  # noqa: F401
    dataset = f"dk_shapes_export_tool_{name}"
    register_shapes_dataset(dataset, str(tmp_path / "data"), "val",
                            ShapesSpec(num_images=2, image_size=96, max_objects=2))
    config = tiny_dk_config(tmp_path, "deform_kernel")
    output = tmp_path / "export"
    report = main(["--config-file", config, "--weights", "", "--format", name,
                   "--output", str(output), "--samples", "2", "--repeats", "1",
                   "--dataset", dataset, "--opts", "INPUT.MIN_SIZE_TEST", "96"])
    assert (output / artefact).is_file()
    saved = json.loads((output / f"export_{name}.json").read_text())
    assert saved["format"] == name and saved["samples"] == 2 and saved["fixed_batch"] is None
    assert report["shapes_equal"] == 1.0 and report["max_rel"] <= 1e-4
    printed = capsys.readouterr().out
    assert f"format {name} (" in printed and "median time per image" in printed
    if name != "torchscript_script":  # trunk formats: also one batch of both samples
        assert saved["part"] == "trunk" and saved["batched"]["max_rel"] <= 1e-4
        assert "one batch of all samples" in printed


def test_command_line_rejects_an_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config-file", "x.yaml", "--format", "tflite"])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_compare_outputs_reports_differences_and_shape_changes():
    eager = (torch.tensor([[1.0, -4.0]]), torch.tensor([2, 3]), {"s": torch.tensor([0.5])})
    close = (torch.tensor([[1.0, -4.5]]), torch.tensor([2, 3]), {"s": torch.tensor([0.5])})
    found = compare_outputs(eager, close)
    assert found == {"max_abs": 0.5, "max_rel": 0.125, "integers_equal": 1.0, "shapes_equal": 1.0,
                     "finite_equal": 1.0}
    other_class = (eager[0], torch.tensor([2, 4]), eager[2])
    assert compare_outputs(eager, other_class)["integers_equal"] == 0.0
    fewer = (torch.zeros(0, 2), eager[1], eager[2])  # e.g. fewer detections
    found = compare_outputs(eager, fewer)
    assert found["shapes_equal"] == 0.0 and found["max_abs"] == float("inf")
    with pytest.raises(ValueError, match="eager gives 3 outputs, the export 1"):
        compare_outputs(eager, eager[0])
    assert len(flatten_outputs(eager)) == 3


def test_median_seconds_times_the_functions_in_turns():
    calls = []
    seconds = median_seconds([lambda x: calls.append(("a", x)), lambda x: calls.append(("b", x))],
                             [(1,), (2,)], warmup=1, repeats=1)
    assert calls == [("a", 1), ("b", 1), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert len(seconds) == 2 and min(seconds) >= 0


@pytest.mark.parametrize("flag", ["--samples", "--repeats"])
def test_command_line_rejects_counts_below_one(flag, capsys):
    with pytest.raises(SystemExit):
        main(["--config-file", "x.yaml", "--format", "export", flag, "0"])
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("eager_value, exported_value", [
    (1.0, NAN), (NAN, 1.0), (1.0, INF), (-2.0, -INF), (INF, 1.0), (INF, -INF), (INF, NAN),
])
def test_compare_outputs_counts_a_non_finite_mismatch_as_the_worst(eager_value, exported_value):
    """NaN - x is NaN and max(0, NaN) is 0: a NaN must not read as a perfect match."""
    eager = (torch.tensor([[1.0, -4.0, eager_value]]), torch.tensor([2, 3]))
    exported = (torch.tensor([[1.0, -4.0, exported_value]]), torch.tensor([2, 3]))
    found = compare_outputs(eager, exported)
    assert found["finite_equal"] == 0.0
    assert found["max_abs"] == INF and found["max_rel"] == INF
    assert not found["max_rel"] <= 1e-4  # what the export tests check


def test_compare_outputs_accepts_the_same_non_finite_values_and_compares_the_rest():
    eager = torch.tensor([NAN, INF, -INF, 2.0, -4.0])
    found = compare_outputs(eager, torch.tensor([NAN, INF, -INF, 2.0, -4.5]))
    assert found["finite_equal"] == 1.0
    assert found["max_abs"] == 0.5 and found["max_rel"] == 0.125
    assert compare_outputs(torch.tensor([NAN]), torch.tensor([NAN]))["max_rel"] == 0.0


class _PlantedNaN:
    """An export format whose reloaded artefact is the module itself, with a NaN planted in its
    output from the second call on (the first call is exact: the worst must not be the first)."""

    part, suffix = "model", "planted.txt"

    def fixed_batch(self, module):
        return None

    def module(self, model, samples):
        return model

    def calls(self, module, samples):
        return [(sample["image"],) for sample in samples]

    def example(self, module, samples):
        return self.calls(module, samples)[0]

    def export(self, module, example, path):
        with open(path, "w") as f:
            f.write("planted")

    def load(self, path):
        seen = []

        def run(image):
            out = _Scale()(image).clone()
            if seen:
                out.view(-1)[0] = NAN
            seen.append(1)
            return out

        return run


class _Scale(torch.nn.Module):
    def forward(self, image):
        return image.float() * 0.5


def test_export_and_verify_reports_a_nan_in_any_call_as_a_failure(tmp_path):
    name = "planted_nan_test_format"
    EXPORT_FORMATS._do_register(name, _PlantedNaN)
    try:
        samples = [{"image": torch.arange(12.0).view(3, 2, 2) + i} for i in range(3)]
        report = export_and_verify(_Scale(), samples, name, str(tmp_path), repeats=1)
    finally:
        EXPORT_FORMATS._obj_map.pop(name)
    assert report["finite_equal"] == 0.0
    assert report["max_rel"] == INF and report["max_abs"] == INF
    assert report["shapes_equal"] == 1.0
