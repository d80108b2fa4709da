"""What the DK layers of trained classification runs learned: how far the rotations move the
taps, how many sit on the scope's edge, and how large the scope's cells outside the rigid grid
are against those inside it. The command line ``python -m dk_detectron2.tools.deformation_stats``.

For each run folder of ``python -m dk_detectron2.classification.train`` (``results.json``,
``last.pth.tar``, ``args.json``; loaded as :func:`.erf_scale.load_run` does) the model runs in
eval mode on validation images balanced over object size, and per DK layer
:func:`.rotation_stats.rotation_statistics` records the rotations it used. Besides, per layer:

* ``grid_abs_weight``: mean |w| of the scope cells the taps read at zero rotation (for a 3×3
  kernel in a scope 5, its centre 3×3);
* ``ring_abs_weight``: mean |w| of the other cells (``None`` when there are none, e.g. scope 4,
  whose zero-rotation taps sit between cells and read all 16). A tap that rotates reads the ring
  in proportion to how far it moves; a ring far smaller than the grid says the ring is barely
  trained, one of the same size that it is used.

Per config, the means over the layers of each run, then mean ± sample std over seeds. With
``--correlate CONFIG ...`` the report adds, over every run of those configs, Spearman's rank
correlation of the run's final top-1 with how far its taps move (mean |rotation|), with a
percentile bootstrap interval resampling the runs: does a variant lose in proportion to how much
it deforms? (Give configs of one scope size: a cell is a different distance at another.)

Example (the classification study)::

    python -m dk_detectron2.tools.deformation_stats --study output/study_cls \\
        --configs dk dk_frozen --seeds 0 1 2 3 4 --num-images 120 \\
        --json deformation_cls.json --markdown deformation_cls.md --correlate dk dk_frozen
"""
import argparse
import json
import logging
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..checkpoint.atomic import atomic_write
from ..layers.geometry import zero_rotation_cells
from .erf_scale import _load_images, _seed_of, load_run
from .erf_scale_stats import _ci, select_images
from .rotation_stats import find_dk_layers, rotation_statistics
from .study_report import _mean_std

__all__ = ["scope_weight_statistics", "measure_run", "summarize", "rank_correlation", "main"]

logger = logging.getLogger(__name__)
LAYER_METRICS = ("mean_abs_rotation", "max_abs_rotation", "taps_on_scope_edge",
                 "taps_reading_zero", "grid_abs_weight", "ring_abs_weight")


def scope_weight_statistics(module: torch.nn.Module) -> Dict[str, Optional[float]]:
    """Mean |w| of a DK layer's scope inside and outside its zero-rotation grid."""
    weight = module.weight.detach().abs()
    mask = zero_rotation_cells(module.kernel_size, tuple(weight.shape[-2:]))
    ring = weight[..., ~mask]
    return {"grid_abs_weight": float(weight[..., mask].mean()),
            "ring_abs_weight": float(ring.mean()) if ring.numel() else None}


def measure_run(run_dir: str, num_images: int = 120, data_dir: Optional[str] = None) -> Dict:
    """``{"info", "layers": [per DK layer: rotation and scope statistics], "means": ...}`` of one
    run folder. Raises ValueError for a model without DK layers."""
    from ..classification.shapes_data import load_split_meta

    model, info = load_run(run_dir)
    if not find_dk_layers(model):
        raise ValueError(f"{run_dir}: model {info['model']!r} has no DK layer to measure")
    data_dir = data_dir or info["data_dir"]
    if not data_dir:
        raise ValueError(f"{run_dir}/args.json names no data_dir: pass --data-dir")
    meta = load_split_meta(os.path.join(data_dir, info["val_split"]))
    indices = select_images([r["object_size"] for r in meta["images"]], num_images)
    images, _ = _load_images(data_dir, info["val_split"], indices, info["img_size"])
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    batch = (torch.stack(images) - mean) / std
    layers = rotation_statistics(model, lambda: model(batch))
    for row in layers:
        row.update(scope_weight_statistics(model.get_submodule(row["layer"])))
    info["num_images"] = len(indices)
    return {"info": info, "layers": layers, "means": _layer_means(layers)}


def _layer_means(layers: List[Dict]) -> Dict[str, Optional[float]]:
    means = {}
    for key in LAYER_METRICS:
        values = [row[key] for row in layers if row.get(key) is not None]
        means[key] = (max(values) if key == "max_abs_rotation" else sum(values) / len(values)) \
            if values else None
    return means


def summarize(runs: List[Dict]) -> Dict[str, Dict]:
    """Per label: the seeds, and mean ± std over them of each run's layer means and top-1."""
    summary: Dict[str, Dict] = {}
    for run in runs:
        entry = summary.setdefault(run["label"], {"seeds": [], "_values": {}})
        entry["seeds"].append(run["seed"])
        values = dict(run["means"], top1=run["info"].get("top1"))
        for key, value in values.items():
            if value is not None:
                entry["_values"].setdefault(key, []).append(value)
    for entry in summary.values():
        for key, values in entry.pop("_values").items():
            entry[key] = _mean_std(values)
    return summary


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks of a 1-D array; tied values share the mean of their positions."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="mergesort")] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _average_ranks(x), _average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_correlation(x: Sequence[float], y: Sequence[float], num_bootstrap: int = 2000,
                     seed: int = 0, level: float = 0.95) -> Dict:
    """Spearman's rank correlation of the pairs ``(x[i], y[i])`` (the Pearson r of their average
    ranks) and its percentile bootstrap interval, resampling the pairs ``num_bootstrap`` times
    (resamples in which x or y is constant are left out).

    Returns ``{"n", "rho", "ci": [low, high], "level", "num_bootstrap"}``.

    Raises:
        ValueError: x and y differ in length, have fewer than 3 pairs, or one of them is constant;
            ``num_bootstrap`` < 1 or ``level`` outside (0, 1).
    """
    if num_bootstrap < 1 or not 0 < level < 1:
        raise ValueError(f"num_bootstrap must be >= 1 and level in (0, 1), got {num_bootstrap} "
                         f"and {level}")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"a rank correlation needs at least 3 pairs, got {len(x)}")
    rho = _spearman(x, y)
    if np.isnan(rho):
        raise ValueError("a rank correlation needs x and y that vary; one of them is constant")
    rng = np.random.default_rng(seed)
    samples = np.array([_spearman(x[i], y[i])
                        for i in rng.integers(0, len(x), size=(num_bootstrap, len(x)))])
    return {"n": int(len(x)), "rho": rho, "ci": _ci(samples, level), "level": level,
            "num_bootstrap": num_bootstrap}


def _check_measured(configs: Sequence[str], labels) -> None:
    unknown = sorted(set(configs) - set(labels))
    if unknown:
        raise ValueError(f"--correlate names config(s) that are not measured: {unknown}; "
                         f"measured: {sorted(set(labels))}")


def correlate_deformation_with_top1(runs: List[Dict], configs: Sequence[str]) -> Dict:
    """:func:`rank_correlation` of each run's top-1 with its mean |rotation|, over the runs of
    ``configs`` (labels of ``runs``)."""
    _check_measured(configs, [run["label"] for run in runs])
    chosen = [run for run in runs if run["label"] in configs
              and run["info"].get("top1") is not None]
    result = rank_correlation([run["means"]["mean_abs_rotation"] for run in chosen],
                              [run["info"]["top1"] for run in chosen])
    return {"configs": list(configs), "x": "mean_abs_rotation", "y": "top1", **result}


def _cell(stats: Optional[Dict], scale: float = 1.0, digits: int = 3) -> str:
    if not stats or stats["mean"] is None:
        return "—"
    text = f"{stats['mean'] * scale:.{digits}f}"
    return text + (f" ± {stats['std'] * scale:.{digits}f}" if stats["std"] is not None else "")


def format_markdown(report: Dict) -> str:
    lines = ["# What the DK layers learned", "",
             f"Command: `{report['command']}`", "",
             "Per run the means over its DK layers (max: the largest over them) on "
             f"{report['num_images']} validation images; mean ± sample std over seeds.", "",
             "| config | seeds | top-1 | mean \\|rotation\\| (cells) | max \\|rotation\\| | taps on "
             "the scope edge (%) | grid mean \\|w\\| | ring mean \\|w\\| | ring / grid |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, entry in report["summary"].items():
        ratio = [r["means"]["ring_abs_weight"] / r["means"]["grid_abs_weight"]
                 for r in report["runs"] if r["label"] == label
                 and r["means"]["ring_abs_weight"] is not None]
        lines.append(
            f"| `{label}` | {' '.join(map(str, entry['seeds']))} | {_cell(entry.get('top1'), 1, 1)} "
            f"| {_cell(entry.get('mean_abs_rotation'))} | {_cell(entry.get('max_abs_rotation'))} "
            f"| {_cell(entry.get('taps_on_scope_edge'), 100, 2)} "
            f"| {_cell(entry.get('grid_abs_weight'), 1, 4)} | {_cell(entry.get('ring_abs_weight'), 1, 4)} "
            f"| {_cell(_mean_std(ratio), 1, 2)} |")
    correlation = report.get("correlation")
    if correlation:
        low, high = correlation["ci"]
        lines += ["", f"Rank correlation (Spearman) of top-1 with mean |rotation| over the "
                  f"{correlation['n']} runs of {', '.join(f'`{c}`' for c in correlation['configs'])}: "
                  f"**{correlation['rho']:+.2f}** ({100 * correlation['level']:.0f} % bootstrap "
                  f"interval over runs [{low:+.2f}, {high:+.2f}], {correlation['num_bootstrap']} "
                  "resamples)."]
    lines += ["", "## Runs", "", "| config | seed | mean \\|rotation\\| | edge (%) | ring / grid |",
              "|---|---|---|---|---|"]
    for run in report["runs"]:
        m = run["means"]
        ratio = (f"{m['ring_abs_weight'] / m['grid_abs_weight']:.2f}"
                 if m["ring_abs_weight"] is not None else "—")
        lines.append(f"| `{run['label']}` | {run['seed']} | {m['mean_abs_rotation']:.4f} "
                     f"| {100 * m['taps_on_scope_edge']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dk_detectron2.tools.deformation_stats",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--study", help="a study folder (CONFIG/seed_S run folders)")
    p.add_argument("--configs", nargs="+", default=[], help="config names in --study")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds to measure (default: every finished one)")
    p.add_argument("--runs", nargs="+", default=[], metavar="LABEL=DIR",
                   help="run folders instead of --study, each LABEL=DIR")
    p.add_argument("--num-images", type=int, default=120)
    p.add_argument("--data-dir", default=None, help="default: each run's args.json")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--correlate", nargs="+", default=[], metavar="CONFIG",
                   help="configs (of one scope size) whose runs enter the rank correlation of "
                        "top-1 with mean |rotation|")
    return p


def _run_list(args) -> List[Dict]:
    runs = []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"--runs takes LABEL=DIR, got {item!r}")
        runs.append({"label": label, "seed": None, "dir": folder})
    if args.study:
        if not args.configs:
            raise ValueError("--study needs --configs")
        for name in args.configs:
            folder = os.path.join(args.study, name)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"--study {args.study!r} has no config folder {name!r}")
            seeds = args.seeds if args.seeds is not None else sorted(
                _seed_of(d) for d in os.listdir(folder) if _seed_of(d) is not None
                and os.path.isfile(os.path.join(folder, d, "results.json")))
            runs += [{"label": name, "seed": s, "dir": os.path.join(folder, f"seed_{s}")}
                     for s in seeds]
    if not runs:
        raise ValueError("nothing to measure: give --study with --configs, or --runs")
    return runs


def main(argv=None) -> Dict:
    args = get_parser().parse_args(argv)
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    items = _run_list(args)
    _check_measured(args.correlate, [item["label"] for item in items])  # before minutes of measuring
    runs = []
    for item in items:
        logger.info("measuring %s seed %s (%s)", item["label"], item["seed"], item["dir"])
        measured = measure_run(item["dir"], args.num_images, args.data_dir)
        runs.append({**item, **measured})
    command = "python -m dk_detectron2.tools.deformation_stats " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = {"command": command, "num_images": args.num_images, "runs": runs,
              "summary": summarize(runs)}
    if args.correlate:
        report["correlation"] = correlate_deformation_with_top1(runs, args.correlate)
    for path in (args.json, args.markdown):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    text = format_markdown(report)
    if args.markdown:
        atomic_write(args.markdown, lambda f: f.write(text.encode()))
    print(text)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    main()
