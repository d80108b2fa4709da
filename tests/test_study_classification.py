"""Classification studies (``kind: classification`` specs of ``python -m dk_detectron2.tools.study``):
per-size accuracy, the report, and a real two-config study on tiny generated data."""
import json
import os

import pytest

from dk_detectron2.classification.shapes_data import ShapesClsSpec, ensure_shapes_cls
from dk_detectron2.tools import study as study_tool
from dk_detectron2.tools.study import load_spec_settings
from dk_detectron2.tools.study_classification import (
    final_losses,
    paired_verdict,
    size_bin_accuracy,
)


def test_size_bins_count_each_prediction_once():
    meta = {"images": [{"file_name": "a/0.png", "object_size": 0.1},
                       {"file_name": "b/1.png", "object_size": 0.3},
                       {"file_name": "a/2.png", "object_size": 0.5},
                       {"file_name": "b/3.png", "object_size": 0.9}]}
    predictions = [{"file_name": "a/0.png", "label": 0, "pred": 0},
                   {"file_name": "b/1.png", "label": 1, "pred": 0},
                   {"file_name": "a/2.png", "label": 0, "pred": 0},
                   {"file_name": "b/3.png", "label": 1, "pred": 0}]
    assert size_bin_accuracy(predictions, meta) == {"small": 100.0, "medium": 0.0, "large": 50.0}
    with pytest.raises(KeyError, match="c/9.png"):
        size_bin_accuracy([{"file_name": "c/9.png", "label": 0, "pred": 0}], meta)


def test_final_losses_read_the_last_epoch_of_the_summary(tmp_path):
    summary = tmp_path / "summary.csv"
    assert final_losses(str(summary)) == {}
    summary.write_text("epoch,train_loss,eval_loss,eval_top1\n")
    assert final_losses(str(summary)) == {}
    summary.write_text("epoch,train_loss,eval_loss,eval_top1\n0,1.9,1.8,20\n1,1.5,1.6,30\n")
    assert final_losses(str(summary)) == {"train_loss": 1.5, "val_loss": 1.6}


def test_paired_verdict_uses_two_standard_errors():
    assert paired_verdict({"n": 4, "mean": 3.0, "std": 2.0}) == "1.0; beyond 2 s.e."
    assert paired_verdict({"n": 4, "mean": 1.5, "std": 2.0}) == "1.0; within 2 s.e."
    assert paired_verdict({"n": 1, "mean": 1.5, "std": None}) == "—"


def test_spec_settings_are_checked(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("kind: regression\nconfigs: [{name: a, config: b}]\n")
    with pytest.raises(ValueError, match="kind must be"):
        load_spec_settings(str(spec))
    spec.write_text("kind: classification\nepochs: 3\nconfigs: [{name: a, config: b}]\n")
    with pytest.raises(ValueError, match="unknown spec keys"):
        load_spec_settings(str(spec))


def test_a_classification_study_trains_resumes_and_reports(tmp_path):
    data = ensure_shapes_cls(str(tmp_path / "data"),
                             {"train": ShapesClsSpec(12, image_size=32),
                              "val": ShapesClsSpec(6, image_size=32)})
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "kind: classification\n"
        f"train_args: [--data-dir, {data}, --img-size, '32', --crop-pct, '1', --epochs, '1',\n"
        "             -b, '6', --workers, '0', --log-interval, '10']\n"
        "configs:\n"
        "  - {name: rigid, config: resnet18_dw_050}\n"
        "  - {name: dk, config: dk_resnet18_dw_050, opts: [--generator-lr-factor, '0.1']}\n")
    root = tmp_path / "study"
    args = ["--spec", str(spec), "--seeds", "3", "--output", str(root), "--baseline", "rigid"]
    assert study_tool.main(args) == 0
    with open(root / "study.json") as f:
        payload = json.load(f)
    assert payload["kind"] == "classification"
    runs = {r["name"]: r for r in payload["runs"]}
    assert set(runs) == {"rigid", "dk"}
    for r in runs.values():
        assert 0 <= r["metrics"]["top1"] <= 100
        assert {"top1_small", "top1_medium", "top1_large"} <= set(r["metrics"])
        assert r["metrics"]["train_loss"] > 0 and r["metrics"]["val_loss"] > 0
        assert "-m dk_detectron2.classification.train --model" in r["command"]
    assert "--generator-lr-factor 0.1" in runs["dk"]["command"]
    # Multiply-adds of one 32 px image: DK's generators and kernel reads cost more than rigid.
    assert 0 < runs["rigid"]["metrics"]["macs_m"] < runs["dk"]["metrics"]["macs_m"]
    delta = payload["summary"]["dk"]["top1 - rigid"]
    assert delta["n"] == 1
    markdown = (root / "study.md").read_text()
    assert "| `dk` | `dk_resnet18_dw_050` | 1 |" in markdown
    assert os.path.getsize(root / "study.png") > 1000
    # Resuming trains nothing: both runs are finished.
    mtime = os.path.getmtime(root / "dk" / "seed_3" / "results.json")
    assert study_tool.main(args) == 0
    assert os.path.getmtime(root / "dk" / "seed_3" / "results.json") == mtime
    # A run whose results.json predates the multiply-add field is counted from its args.json.
    results_path = root / "dk" / "seed_3" / "results.json"
    results = json.loads(results_path.read_text())
    recorded = results.pop("macs_per_image")
    results_path.write_text(json.dumps(results))
    assert study_tool.main(args + ["--summarize-only"]) == 0
    with open(root / "study.json") as f:
        backfilled = {r["name"]: r for r in json.load(f)["runs"]}["dk"]["metrics"]["macs_m"]
    assert backfilled == pytest.approx(recorded / 1e6)
    # A trainer that could not trace its model records None: no count, the rest of the report.
    results_path.write_text(json.dumps({**results, "macs_per_image": None}))
    assert study_tool.main(args + ["--summarize-only"]) == 0
    with open(root / "study.json") as f:
        dk = {r["name"]: r for r in json.load(f)["runs"]}["dk"]["metrics"]
    assert dk["macs_m"] is None and dk["top1"] == runs["dk"]["metrics"]["top1"]
    assert "MMACs/image" in (root / "study.md").read_text()
