"""ERF size against object size (``python -m dk_detectron2.tools.erf_scale``): the object geometry
replayed from the generator, ERF sizes of models with known receptive fields, the regression and
bootstrap on synthetic data, the command line on tiny trained runs, and clear errors."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from torch import nn

import dk_detectron2  # noqa: F401  (registers the models)
from dk_detectron2.classification.shapes_data import (
    ShapesClsSpec,
    ensure_shapes_cls,
    load_split_meta,
    object_geometry,
)
from dk_detectron2.tools import erf_scale
from dk_detectron2.tools.erf_scale import measure_erf_sizes, select_images
from dk_detectron2.tools.erf_scale_stats import analyse, bootstrap_fit, fit_line

TINY = {"train": ShapesClsSpec(num_images=12, image_size=32),
        "val": ShapesClsSpec(num_images=24, image_size=32)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return ensure_shapes_cls(str(tmp_path_factory.mktemp("data")), TINY)


def test_geometry_replay_matches_the_generated_meta(data_dir):
    spec = TINY["val"]
    meta = load_split_meta(os.path.join(data_dir, "val"))
    for index, record in enumerate(meta["images"]):
        geo = object_geometry(spec, "val", index)
        assert (geo["object_size"], geo["class"], geo["label"]) == (
            record["object_size"], record["class"], record["label"])
        x0, y0, x1, y1 = geo["box_xyxy"]
        assert geo["center_xy"] == pytest.approx([(x0 + x1) / 2, (y0 + y1) / 2])
        assert max(x1 - x0, y1 - y0) / spec.image_size == pytest.approx(geo["object_size"],
                                                                          abs=1e-4)
        if geo["object_size"] < 0.9:  # placed inside the image with a 1 px gap
            assert x0 >= 0.99 and y0 >= 0.99 and x1 <= 31.01 and y1 <= 31.01


def test_select_images_balances_sizes():
    sizes = np.concatenate([np.full(100, 0.2), np.full(10, 0.6), np.full(100, 0.9)])
    chosen = select_images(sizes, 30, num_bins=3)
    assert len(chosen) == len(set(chosen)) == 30 and chosen == sorted(chosen)
    counts = [int((sizes[chosen] == v).sum()) for v in (0.2, 0.6, 0.9)]
    assert counts == [10, 10, 10]
    # A short bin is topped up from the others.
    assert sorted(np.unique(sizes[select_images(sizes, 60, 3)], return_counts=True)[1]) == [
        10, 25, 25]
    with pytest.raises(ValueError, match="num_images"):
        select_images(sizes, 0)


class _BoxNet(nn.Module):
    """``depth`` all-ones k x k convs (stride 1): each unit's ERF is a known positive pyramid of
    side ``depth * (k - 1) + 1``; ``forward_intermediates`` as timm's, every level the same."""

    def __init__(self, kernel: int, depth: int = 1):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 1, 1, kernel, padding=kernel // 2,
                                               bias=False) for i in range(depth)])
        for conv in self.convs:
            nn.init.ones_(conv.weight)

    def forward_intermediates(self, x, indices, intermediates_only, stop_early):
        return [self.convs(x)]


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_erf_size_of_a_known_receptive_field(kernel):
    image = torch.rand(3, 32, 32)
    (record,) = measure_erf_sizes(_BoxNet(kernel), [image], [(16.5, 16.5)], levels=["res5"])[
        "res5"]
    assert record["cell"] == [16, 16] and record["map"] == [32, 32]
    assert record["size10"] == record["size01"] == pytest.approx(kernel)  # a flat k x k box
    # spread of a uniform k x k box: sqrt(2 (k^2 - 1) / 12)
    assert record["spread"] == pytest.approx(np.sqrt(2 * (kernel**2 - 1) / 12))
    assert record["center_shift"] == pytest.approx(0.0, abs=1e-6)


def test_larger_receptive_field_gives_larger_erf_size():
    image = torch.rand(3, 48, 48)
    small, large = (measure_erf_sizes(net, [image], [(24, 24)], ["res4"])["res4"][0]
                    for net in (_BoxNet(3, depth=2), _BoxNet(3, depth=6)))
    for key in ("size10", "size01", "spread"):
        assert large[key] > small[key]
    # The cell holding the centre on a strided map: (x=40, y=8) on 4x4 cells of 12 px.
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(12))
    pooled.forward_intermediates = lambda x, **_: [pooled(x)]
    (rec,) = measure_erf_sizes(pooled, [image], [(40.0, 8.0)], ["res4"])["res4"]
    assert rec["cell"] == [0, 3] and rec["map"] == [4, 4]


def test_regression_and_bootstrap_recover_a_known_slope():
    rng = np.random.default_rng(0)
    x = rng.uniform(10, 60, 400)
    y = 0.5 * x + 3 + rng.normal(0, 2, 400)
    fit = bootstrap_fit(x, y, num_bootstrap=500)
    assert fit["slope"] == pytest.approx(0.5, abs=0.03)
    assert fit["intercept"] == pytest.approx(3, abs=1)
    assert fit["slope_ci"][0] < 0.5 < fit["slope_ci"][1]
    assert fit["slope_ci"][1] - fit["slope_ci"][0] < 0.1
    assert fit["r"] == pytest.approx(np.corrcoef(x, y)[0, 1]) and fit["r_ci"][0] > 0.9
    assert fit_line([1, 2, 3], [2, 4, 6]) == pytest.approx({"slope": 2, "intercept": 0, "r": 1})
    with pytest.raises(ValueError, match="same length"):
        fit_line([1, 2, 3], [1, 2])

    # Seeds of a steep config against a flat baseline: the paired difference and its CI.
    images = [{"index": i, "object_size_px": float(v)} for i, v in enumerate(x[:120])]
    runs = []
    for seed in range(3):
        for label, slope in (("rigid", 0.1), ("dk", 0.4)):
            noise = np.random.default_rng(seed * 10 + len(label)).normal(0, 1, 120)
            sizes = slope * x[:120] + 5 + noise
            runs.append({"label": label, "seed": seed, "images": images,
                         "erf": {"res5": [{"size10": float(v)} for v in sizes]}})
    report = analyse(runs, ["res5"], ["size10"], baseline="rigid", num_bootstrap=300)
    dk = report["configs"]["res5/size10"]["dk"]
    assert dk["seeds"] == [0, 1, 2] and dk["slope"]["mean"] == pytest.approx(0.4, abs=0.02)
    assert dk["slope"]["ci"][0] < dk["slope"]["mean"] < dk["slope"]["ci"][1]
    paired = report["paired"]["res5/size10"]["dk"]
    assert paired["slope_diff"]["mean"] == pytest.approx(0.3, abs=0.02)
    assert paired["slope_diff"]["ci"][0] > 0.25 and len(paired["slope_diff"]["values"]) == 3
    assert "res5/size10@pos" not in report["configs"]  # no object centres: no position control
    with pytest.raises(ValueError, match="baseline"):
        analyse(runs, ["res5"], ["size10"], baseline="nope")


def test_position_control_removes_a_relation_that_position_makes():
    """ERF size set by the object's distance from the image centre alone, object size correlated
    with that distance: a raw slope, none once position is partialled out."""
    rng = np.random.default_rng(1)
    distance = rng.uniform(0, 20, 200)
    size = 60 - 2 * distance + rng.normal(0, 3, 200)
    angle = rng.uniform(0, 2 * np.pi, 200)
    images = [{"index": i, "object_size_px": float(s),
               "center_xy": [32 + d * np.cos(a), 32 + d * np.sin(a)]}
              for i, (s, d, a) in enumerate(zip(size, distance, angle))]
    erf = 10 + 0.5 * distance + rng.normal(0, 0.5, 200)
    runs = [{"label": "rigid", "seed": 0, "images": images, "info": {"img_size": 64},
             "erf": {"res5": [{"size10": float(v)} for v in erf]}}]
    report = analyse(runs, ["res5"], ["size10"], baseline="rigid", num_bootstrap=200)
    raw, = report["fits"]["res5/size10"]
    controlled, = report["fits"]["res5/size10@pos"]
    assert raw["slope"] < -0.15 and raw["slope_ci"][1] < 0
    assert abs(controlled["slope"]) < 0.05 and controlled["slope_ci"][0] > raw["slope_ci"][1]
    assert abs(controlled["r"]) < 0.2 < abs(raw["r"])


def _fake_run(folder, model_name, data_dir, seed=0):
    """A run folder as the trainer leaves it, with a checkpoint saved by hand."""
    from _classification_checkpoints import trained_like

    os.makedirs(folder)
    model = trained_like(timm.create_model(model_name, num_classes=6), seed=seed)
    torch.save({"state_dict": model.state_dict(), "arch": model_name},
               os.path.join(folder, "last.pth.tar"))
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"model": model_name, "model_kwargs": {}, "num_classes": 6,
                   "final_top1": 20.0}, f)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"data_dir": data_dir, "val_split": "val", "img_size": 32}, f)


def test_command_line_on_tiny_runs(data_dir, tmp_path):
    from dk_detectron2.classification.train import main as train

    study = tmp_path / "study"
    for seed in (0, 1):  # rigid: trained one epoch; DK: checkpoints saved by hand
        train(["--data-dir", data_dir, "--model", "resnet18_dw_050", "--img-size", "32",
               "--crop-pct", "1", "--epochs", "1", "-b", "6", "--workers", "0", "--seed",
               str(seed), "--output", str(study / "rigid"), "--experiment", f"seed_{seed}"])
        _fake_run(str(study / "dk" / f"seed_{seed}"), "dk_resnet18_dw_050", data_dir, seed)
    os.makedirs(study / "dk" / "seed_2")  # unfinished: no results.json
    out = tmp_path / "out"
    report = erf_scale.main([
        "--study", str(study), "--configs", "rigid", "dk", "--num-images", "12",
        "--bootstrap", "50", "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
        "--plot", str(out / "r.png")])
    assert [(r["label"], r["seed"]) for r in report["runs"]] == [
        ("rigid", 0), ("rigid", 1), ("dk", 0), ("dk", 1)]
    with open(out / "r.json") as f:
        saved = json.load(f)
    assert saved["command"].startswith("python -m dk_detectron2.tools.erf_scale --study")
    assert set(saved["fits"]) == {f"{lvl}/{m}{c}" for lvl in ("res4", "res5")
                                  for m in ("size10", "size01", "spread") for c in ("", "@pos")}
    run = saved["runs"][0]
    assert len(saved["images"]) == 12 and "images" not in run  # the same images for every run
    assert len(run["erf"]["res5"]["size10"]) == 12 and run["erf"]["res5"]["map"][0] == [1, 1]
    assert run["erf"]["res4"]["map"][0] == [2, 2] and run["info"]["img_size"] == 32
    # Same images for every run: the paired difference exists.
    assert saved["paired"]["res5/size10"]["dk"]["seeds"] == [0, 1]
    text = (out / "r.md").read_text()
    assert "paired Δslope vs rigid" in text and "| dk | 1 |" in text
    assert "Mean ERF size (px) by object size" in text and "small (< 0.25)" in text
    assert "partialled out" in text and "res5/size10@pos" in saved["paired"]
    bins = saved["configs"]["res5/size10"]["rigid"]["mean_size_by_bin"]
    assert sum(b["n"] for b in bins.values()) == 24  # 12 images x 2 seeds
    assert (out / "r.png").stat().st_size > 10_000

    # An explicit unfinished seed is an error unless skipped.
    with pytest.raises(FileNotFoundError, match="no results.json"):
        erf_scale.main(["--study", str(study), "--configs", "dk", "--seeds", "0", "2",
                        "--json", str(out / "x.json")])
    report = erf_scale.main(["--study", str(study), "--configs", "dk", "--seeds", "0", "2",
                             "--skip-missing", "--num-images", "6", "--bootstrap", "20",
                             "--levels", "res5", "--json", str(out / "y.json")])
    assert [r["seed"] for r in report["runs"]] == [0]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        erf_scale.main(["--runs", str(tmp_path / "missing"), "--json", str(tmp_path / "a.json")])
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        erf_scale.main(["--runs", str(tmp_path / "run"), "--json", str(tmp_path / "a.json")])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        erf_scale.load_run(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="no config 'x'"):
        erf_scale.main(["--study", str(tmp_path), "--configs", "x"])
    with pytest.raises(ValueError, match="no runs"):
        erf_scale.main([])
    with pytest.raises(ValueError, match="headline-level"):
        erf_scale.main(["--runs", str(tmp_path / "run"), "--levels", "res4",
                        "--headline-level", "res5"])
    with pytest.raises(ValueError, match="level must be one of"):
        erf_scale.stage_fn(nn.Identity(), "res9", (0,) * 3, (1,) * 3)
