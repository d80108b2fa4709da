"""train_net.py end to end on the CPU with a tiny DK Mask R-CNN: train + COCO evaluation, outputs
(checkpoint, metrics, TensorBoard events, prediction PNGs), ``--eval-only`` reproducing the
metrics exactly, ``--resume``, errors for missing datasets, and a downstream project."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, TESTS)
sys.path.insert(0, REPO)

import train_net  # noqa: E402
from _train_net_runs import driver_env, run_driver  # noqa: E402
from train_net_driver import CONFIG, TINY_OPTS  # noqa: E402  (registers nothing without the env)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-iteration training run with the final evaluation on dk_shapes_tiny_val."""
    tmp = tmp_path_factory.mktemp("train_net")
    out = tmp / "train"
    run_driver(
        tmp / "datasets", "--config-file", CONFIG, *TINY_OPTS,
        "DATASETS.TRAIN", "('dk_shapes_tiny_train',)", "DATASETS.TEST", "('dk_shapes_tiny_val',)",
        "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out),
    )
    return tmp, out


@pytest.mark.slow
def test_train_writes_checkpoint_metrics_events_and_pictures(trained):
    _, out = trained
    files = set(os.listdir(out))
    assert {"model_final.pth", "metrics.json", "config.yaml", "eval_results.json"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)  # TensorBoard
    assert sum(f.startswith("predictions_dk_shapes_tiny_val_") and f.endswith(".png")
               for f in files) == 4
    with open(out / "metrics.json") as f:
        iterations = [json.loads(line).get("iteration") for line in f]
    assert 2 in iterations  # the last of the 3 iterations was logged
    with open(out / "eval_results.json") as f:
        results = json.load(f)
    assert set(results) == {"bbox", "segm"} and "AP" in results["bbox"]
    predictions = torch.load(out / "inference" / "instances_predictions.pth", weights_only=False)
    assert len(predictions) == 4 and sum(len(p["instances"]) for p in predictions) > 0
    state = torch.load(out / "model_final.pth", weights_only=False)
    assert state["iteration"] == 2
    assert any("rotation" in k for k in state["model"])  # the DK model was trained


@pytest.mark.slow
def test_eval_only_reproduces_the_metrics_exactly(trained):
    tmp, out = trained
    eval_out = tmp / "eval_only"
    run_driver(
        tmp / "datasets", "--config-file", CONFIG, "--eval-only", *TINY_OPTS,
        "DATASETS.TEST", "('dk_shapes_tiny_val',)",
        "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(eval_out),
    )
    with open(out / "eval_results.json") as f1, open(eval_out / "eval_results.json") as f2:
        assert f1.read() == f2.read()
    trained_predictions = torch.load(out / "inference" / "instances_predictions.pth",
                                     weights_only=False)
    eval_predictions = torch.load(eval_out / "inference" / "instances_predictions.pth",
                                  weights_only=False)
    assert trained_predictions == eval_predictions


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(trained):
    tmp, out = trained
    resumed = tmp / "resumed"
    resumed.mkdir()
    for name in ("model_final.pth", "last_checkpoint"):
        (resumed / name).write_bytes((out / name).read_bytes())
    proc = run_driver(
        tmp / "datasets", "--config-file", CONFIG, "--resume", *TINY_OPTS,
        "DATASETS.TRAIN", "('dk_shapes_tiny_train',)", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(resumed),
    )
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr
    assert torch.load(resumed / "model_final.pth", weights_only=False)["iteration"] == 3


def test_missing_dataset_explains_how_to_get_one(tmp_path):
    args = train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, "DATASETS.TRAIN", "('no_such_dataset',)",
         "OUTPUT_DIR", str(tmp_path)]
    )
    from dk_detectron2.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError) as info:
        train_net.setup(args)
    message = str(info.value)
    assert "no_such_dataset" in message and "DETECTRON2_DATASETS" in message
    assert "dk_shapes_train" in message


def test_missing_coco_explains_how_to_point_at_it(tmp_path):
    args = train_net.argument_parser().parse_args(
        ["--config-file", CONFIG, "DATASETS.TRAIN", "('coco_2017_train',)",
         "OUTPUT_DIR", str(tmp_path)]
    )
    from dk_detectron2.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="DETECTRON2_DATASETS"):
        train_net.setup(args)


def test_argument_parser_has_the_distributed_options():
    args = train_net.argument_parser().parse_args(
        ["--num-processes", "2", "--dist-backend", "gloo", "--num-machines", "2",
         "--machine-rank", "1", "--dist-url", "tcp://10.0.0.1:1234", "--resume", "--eval-only",
         "SOLVER.MAX_ITER", "7"]
    )
    assert (args.num_processes, args.dist_backend, args.num_machines, args.machine_rank) == (
        2, "gloo", 2, 1)
    assert args.resume and args.eval_only and args.opts == ["SOLVER.MAX_ITER", "7"]
    assert train_net.build_config(args).SOLVER.MAX_ITER == 7


@pytest.mark.parametrize("name", ["dw", "dk", "dkc"])
def test_shapes_configs_load(name):
    args = train_net.argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs", "shapes", f"mask_rcnn_{name}_R18_FPN_shapes.yaml")]
    )
    cfg = train_net.build_config(args)
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_dk_fpn_backbone"
    assert cfg.MODEL.DK.TYPE == {"dw": "rigid_conv", "dk": "deform_kernel",
                                 "dkc": "deform_kernel_conv"}[name]
    assert cfg.DATASETS.TRAIN == ("dk_shapes_train",) and cfg.DATASETS.TEST == ("dk_shapes_val",)
    assert cfg.OUTPUT_DIR.startswith("output/")


@pytest.mark.slow
def test_downstream_project_runs_the_dk_model(tmp_path):
    """tests/downstream_project/ acts as a separate Detectron2 project that imports dk_detectron2."""
    project = os.path.join(TESTS, "downstream_project")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + env.get("PYTHONPATH", "").split(os.pathsep))
    proc = subprocess.run(
        [sys.executable, os.path.join(project, "run_dk_model.py"),
         "--config-file", os.path.join(REPO, "configs", "shapes", "mask_rcnn_dk_R18_FPN_shapes.yaml")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "downstream project OK" in proc.stdout


def test_report_formats_ap_tables():
    from dk_detectron2.engine.report import format_ap_tables

    results = {"bbox": {"AP": 31.25, "AP50": 60.0, "AP75": 30.0, "APs": float("nan"), "APm": 20.0,
                        "APl": 40.0},
               "segm": {"AP": 28.0, "AP50": 55.0, "AP75": 25.0, "APs": 1.0, "APm": 2.0, "APl": 3.0}}
    table = format_ap_tables(results, "run")
    assert "| bbox | 31.2 | 60.0 | 30.0 | nan | 20.0 | 40.0 |" in table
    assert "| segm | 28.0 |" in table and table.startswith("### run")


@pytest.mark.slow
def test_embedded_job_script_runs(tmp_path):
    """scripts/run_embedded_job.sh end to end, shrunk by overrides (tiny model, 2 iterations)."""
    out = tmp_path / "job"
    opts = [o for o in TINY_OPTS]
    env = driver_env(tmp_path / "unused")
    env["DETECTRON2_DATASETS"] = str(tmp_path / "datasets")
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "run_embedded_job.sh"), *opts,
         "DATASETS.TRAIN", "('dk_shapes_val',)", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| bbox |" in proc.stdout and "| segm |" in proc.stdout
    assert "predictions_dk_shapes_val_0.png" in proc.stdout
    assert (out / "predictions_dk_shapes_val_3.png").exists()
