"""What trained DK layers learned (``python -m dk_detectron2.tools.deformation_stats``): the
grid / ring weights, the rotation statistics of classification
runs (zero generators: no rotation, no tap on the edge), the rank correlation of top-1 with the
deformation, the report, and clear errors."""
import json
import os

import numpy as np
import pytest
import timm
import torch

import dk_detectron2  # noqa: F401  (registers the models)
from dk_detectron2.classification.shapes_data import ShapesClsSpec, ensure_shapes_cls
from dk_detectron2.layers.deform_kernel import DeformKernel2d
from dk_detectron2.tools import deformation_stats
from dk_detectron2.tools.deformation_stats import rank_correlation, scope_weight_statistics

TINY = {"train": ShapesClsSpec(num_images=12, image_size=32),
        "val": ShapesClsSpec(num_images=24, image_size=32)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return ensure_shapes_cls(str(tmp_path_factory.mktemp("data")), TINY)


def test_scope_weights_split_into_grid_and_ring():
    layer = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=5)
    with torch.no_grad():
        layer.weight.fill_(-2.0)
        layer.weight[..., 1:4, 1:4] = 0.5
    assert scope_weight_statistics(layer) == {"grid_abs_weight": 0.5, "ring_abs_weight": 2.0}
    layer4 = DeformKernel2d(4, 4, 3, padding=1, groups=4, scope_size=4)
    assert scope_weight_statistics(layer4)["ring_abs_weight"] is None


def _fake_run(folder, model_name, data_dir, generator_std, top1=20.0):
    from _classification_checkpoints import trained_like

    os.makedirs(folder)
    model = trained_like(timm.create_model(model_name, num_classes=6), generator_std=generator_std)
    torch.save({"state_dict": model.state_dict(), "arch": model_name},
               os.path.join(folder, "last.pth.tar"))
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"model": model_name, "model_kwargs": {}, "num_classes": 6, "final_top1": top1}, f)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"data_dir": data_dir, "val_split": "val", "img_size": 32}, f)


def test_command_line_on_runs(data_dir, tmp_path):
    study = tmp_path / "study"
    for seed, top1 in ((0, 20.0), (1, 30.0)):
        _fake_run(str(study / "dk" / f"seed_{seed}"), "dk_resnet18_dw_050", data_dir, 0.05, top1)
        _fake_run(str(study / "frozen" / f"seed_{seed}"), "dk_resnet18_dw_050", data_dir, 0.0)
    os.makedirs(study / "dk" / "seed_2")  # unfinished: skipped without --seeds
    out = tmp_path / "out"
    report = deformation_stats.main([
        "--study", str(study), "--configs", "dk", "frozen", "--num-images", "8",
        "--json", str(out / "d.json"), "--markdown", str(out / "d.md"),
        "--correlate", "dk", "frozen"])
    assert [(r["label"], r["seed"]) for r in report["runs"]] == [
        ("dk", 0), ("dk", 1), ("frozen", 0), ("frozen", 1)]
    for run in report["runs"]:
        assert len(run["layers"]) == 12  # DK in res3-res5: 2 blocks x 2 convs x 3 stages
        assert run["info"]["num_images"] == 8
    frozen, moving = report["summary"]["frozen"], report["summary"]["dk"]
    assert frozen["mean_abs_rotation"]["mean"] == 0.0
    assert frozen["taps_on_scope_edge"]["mean"] == 0.0
    assert moving["mean_abs_rotation"]["mean"] > 0.0
    assert moving["top1"] == pytest.approx({"n": 2, "mean": 25.0, "std": 50 ** 0.5})
    saved = json.loads((out / "d.json").read_text())
    assert saved["summary"]["dk"]["seeds"] == [0, 1]
    text = (out / "d.md").read_text()
    assert "| `frozen` | 0 1 |" in text and "deformation_stats --study" in text
    # Over the four runs: the frozen ones (no rotation, top-1 20) rank below the moving ones in
    # |rotation|; top-1 ties three runs at 20 and the moving seed 1 is highest.
    correlation = saved["correlation"]
    assert correlation["configs"] == ["dk", "frozen"] and correlation["n"] == 4
    rotation = [r["means"]["mean_abs_rotation"] for r in report["runs"]]
    top1 = [r["info"]["top1"] for r in report["runs"]]
    assert correlation["rho"] == pytest.approx(rank_correlation(rotation, top1)["rho"])
    assert correlation["rho"] > 0
    assert f"**{correlation['rho']:+.2f}**" in text


def test_errors_name_the_problem(data_dir, tmp_path):
    rigid = tmp_path / "rigid"
    _fake_run(str(rigid), "resnet18_dw_050", data_dir, 0.0)
    with pytest.raises(ValueError, match="no DK layer"):
        deformation_stats.main(["--runs", f"rigid={rigid}"])
    with pytest.raises(ValueError, match="LABEL=DIR"):
        deformation_stats.main(["--runs", str(rigid)])
    with pytest.raises(FileNotFoundError, match="no config folder 'nope'"):
        deformation_stats.main(["--study", str(tmp_path), "--configs", "nope"])
    with pytest.raises(ValueError, match="num-images"):
        deformation_stats.main(["--runs", f"rigid={rigid}", "--num-images", "0"])
    with pytest.raises(ValueError, match="nothing to measure"):
        deformation_stats.main([])
    with pytest.raises(ValueError, match=r"--correlate .*\['dk'\]; measured: \['rigid'\]"):
        deformation_stats.main(["--runs", f"rigid={rigid}", "--correlate", "dk"])


def test_rank_correlation_is_spearmans():
    """Without ties it is 1 - 6 sum d^2 / (n (n^2 - 1)); ties share their mean rank; monotone
    pairs give +-1 with an interval at it; bad input is refused."""
    rng = np.random.default_rng(0)
    x, y = rng.permutation(12).astype(float), rng.permutation(12).astype(float)
    d2 = ((x - y) ** 2).sum()  # x and y are their own 0-based ranks
    result = rank_correlation(x, y, num_bootstrap=200)
    assert result["rho"] == pytest.approx(1 - 6 * d2 / (12 * (12 ** 2 - 1)))
    assert result["n"] == 12 and result["ci"][0] <= result["rho"] <= result["ci"][1]
    # Ties: x's two 2s share rank 1.5, so the ranks are [0, 1.5, 1.5, 3] and [0, 2, 1, 3].
    expected = np.corrcoef([0, 1.5, 1.5, 3], [0, 2, 1, 3])[0, 1]
    assert rank_correlation([1, 2, 2, 3], [1, 3, 2, 4])["rho"] == pytest.approx(expected)
    falling = rank_correlation([0.0, 0.1, 0.2, 0.4, 0.9], [30, 29, 27, 25, 24])
    assert falling["rho"] == pytest.approx(-1.0) and falling["ci"] == pytest.approx([-1.0, -1.0])
    with pytest.raises(ValueError, match="at least 3 pairs"):
        rank_correlation([1, 2], [2, 1])
    with pytest.raises(ValueError, match="one length"):
        rank_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="constant"):
        rank_correlation([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="num_bootstrap must be >= 1"):
        rank_correlation([1, 2, 3], [1, 2, 3], num_bootstrap=0)
