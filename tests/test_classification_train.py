"""The classification trainer (``python -m dk_detectron2.classification.train``) on a tiny
generated ImageFolder: train + evaluate + resume, EMA and AMP, two gloo processes under torchrun,
the generator parameter group, and clear errors for bad input."""
import csv
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import dk_detectron2  # noqa: F401  (registers the models)
from dk_detectron2.classification.engine import check_image_folder, dk_param_groups
from dk_detectron2.classification.shapes_data import ShapesClsSpec, ensure_shapes_cls
from dk_detectron2.classification.train import main

TINY = {"train": ShapesClsSpec(num_images=12, image_size=32),
        "val": ShapesClsSpec(num_images=6, image_size=32)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return ensure_shapes_cls(str(tmp_path_factory.mktemp("data")), TINY)


def _args(data_dir, out, *extra, model="dk_resnet18_dw_050", epochs=1):
    return ["--data-dir", data_dir, "--model", model, "--img-size", "32", "--crop-pct", "1",
            "--epochs", str(epochs), "-b", "6", "--lr", "0.05", "--workers", "0",
            "--output", str(out), "--experiment", "run", "--log-interval", "1", *extra]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_evaluate_resume(data_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    results = main(_args(data_dir, tmp_path))
    run = tmp_path / "run"
    assert results["epochs"] == 1 and 0 <= results["best_top1"] <= 100
    assert results["generator_parameters"] > 0
    assert (run / "last.pth.tar").exists() and (run / "model_best.pth.tar").exists()
    assert len(_rows(run / "summary.csv")) == 1
    assert "ETA" in caplog.text and "Acc@1" in caplog.text
    # Resume for a second epoch: the first is not trained again, the summary grows to 2 rows.
    caplog.clear()
    results = main(_args(data_dir, tmp_path, "--resume", str(run / "last.pth.tar"), epochs=2))
    assert "Train: 0 " not in caplog.text and "Train: 1 " in caplog.text
    assert [row["epoch"] for row in _rows(run / "summary.csv")] == ["0", "1"]
    with open(run / "results.json") as f:
        saved = json.load(f)
    assert saved["epochs"] == 2 and saved["best_top1"] == max(
        float(row["eval_top1"]) for row in _rows(run / "summary.csv"))
    with open(run / "val_predictions.json") as f:
        predictions = json.load(f)
    assert len(predictions) == 6 and {p["label"] for p in predictions} == set(range(6))
    # The checkpoint is timm's: it loads back into the model with timm's own function.
    model = timm.create_model("dk_resnet18_dw_050", num_classes=6)
    timm.models.load_checkpoint(model, str(run / "last.pth.tar"))


def test_a_seed_repeats_the_run_exactly(data_dir, tmp_path):
    """On one machine a seed fixes the whole run (data order, initialisation, augmentation, the
    DK kernels' forward and backward): two runs of the same seed end with the same summary and
    bit-identical weights, so seed-paired studies compare configs, not noise. (Across CPUs
    the floating-point sums differ and runs diverge: docs/results_classification.md.)"""
    runs = []
    for name in ("first", "second"):
        main(_args(data_dir, tmp_path / name, "--seed", "3", epochs=2))
        runs.append(tmp_path / name / "run")
    assert _rows(runs[0] / "summary.csv") == _rows(runs[1] / "summary.csv")
    first, second = (torch.load(run / "last.pth.tar", map_location="cpu", weights_only=False)
                     ["state_dict"] for run in runs)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # A different seed is a different run.
    main(_args(data_dir, tmp_path / "other", "--seed", "4", epochs=2))
    other = torch.load(tmp_path / "other" / "run" / "last.pth.tar", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert any(not torch.equal(first[key], other[key]) for key in first
               if first[key].is_floating_point())


def test_ema_and_amp_run_and_resume(data_dir, tmp_path):
    results = main(_args(data_dir, tmp_path, "--model-ema", "--amp", model="resnet18_dw_050"))
    assert results["generator_parameters"] == 0
    assert results["macs_per_image"] > 0  # at the 32 px input
    last = tmp_path / "run" / "last.pth.tar"
    checkpoint = torch.load(last, weights_only=False)
    assert "state_dict_ema" in checkpoint
    results = main(_args(data_dir, tmp_path, "--model-ema", "--amp", "--resume", str(last),
                         model="resnet18_dw_050", epochs=2))
    assert results["epochs"] == 2
    assert len(_rows(tmp_path / "run" / "summary.csv")) == 2


def test_a_model_that_cannot_be_counted_still_trains(data_dir, tmp_path, monkeypatch, caplog):
    from dk_detectron2.classification import train as train_module

    def untraceable(model, input_size):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(train_module, "image_model_macs", untraceable)
    caplog.set_level("INFO", logger="train")
    results = main(_args(data_dir, tmp_path, model="resnet18_dw_050"))
    assert results["macs_per_image"] is None and 0 <= results["final_top1"] <= 100
    assert "multiply-adds not counted (RuntimeError: cannot trace this model)" in caplog.text


def test_generators_get_their_own_group(tmp_path):
    model = timm.create_model("dk_resnet18_dw_050", num_classes=6)
    groups = dk_param_groups(model, weight_decay=1e-4, generator_lr_factor=0.01)
    generator_groups = [g for g in groups if g.get("dk_generator")]
    assert len(generator_groups) == 1
    group = generator_groups[0]
    assert group["lr_scale"] == 0.01 and group["weight_decay"] == 0.0
    ids = {id(p) for p in dk_detectron2.classification.generator_parameters(model)}
    assert {id(p) for p in group["params"]} == ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="--generator-lr-factor"):
        dk_param_groups(model, 1e-4, -1.0)


def test_distributed_two_cpu_processes(data_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29531", "-m", "dk_detectron2.classification.train",
               *_args(data_dir, tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "run" / "results.json") as f:
        assert json.load(f)["world_size"] == 2


def test_bad_input_is_named(data_dir, tmp_path):
    with pytest.raises(ValueError, match="--model 'no_such_net'"):
        main(_args(data_dir, tmp_path, model="no_such_net"))
    with pytest.raises(ValueError, match="--num-classes is 5 but .* 6 classes"):
        main(_args(data_dir, tmp_path, "--num-classes", "5"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        main(_args(str(tmp_path / "missing"), tmp_path))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        check_image_folder(str(empty))
    (empty / "train" / "a").mkdir()
    (empty / "val" / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        check_image_folder(str(empty))
    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    (only_train / "train" / "a" / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no 'val' folder"):
        check_image_folder(str(only_train))
    (only_train / "val" / "b").mkdir(parents=True)
    (only_train / "val" / "b" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="classes differ"):
        check_image_folder(str(only_train))
