"""Do effective receptive fields adapt to the object? ERF size against object size on
``dk_shapes_cls``: the command line ``python -m dk_detectron2.tools.erf_scale``.

For each trained classification run (a folder of ``python -m dk_detectron2.classification.train``:
``results.json``, ``last.pth.tar``, ``args.json``) this loads the model in eval mode, takes
validation images balanced over object sizes (:func:`select_images`), probes the unit of a stage
(``res4`` and ``res5`` by default) at the cell holding the object's centre (replayed from the
generator: :func:`~dk_detectron2.classification.shapes_data.object_geometry`), measures its ERF
(:mod:`.erf_measure`) and relates the ERF's linear size to the object's size
(:mod:`.erf_scale_stats`: least-squares slope and Pearson r with bootstrap CIs over images, the
mean over seeds, the paired difference to a baseline config, each also with the object's position
partialled out; :mod:`.erf_scale_report`: the tables and the figure). Deformable Kernels' claim is a
steeper, tighter relation than the rigid model's.

ERF sizes (pixels): ``size10`` / ``size01`` = sqrt of the area above 10 % / 1 % of the ERF's
maximum, ``spread`` = the ERF-weighted RMS distance to its centre of mass.

Example (a study's runs; ``--runs DIR ...`` takes run folders instead)::

    python -m dk_detectron2.tools.erf_scale --study output/study_cls \\
        --configs rigid3 dk rigid5 --seeds 0 1 2 --baseline rigid3 \\
        --json erf_scale.json --markdown erf_scale.md --plot erf_scale.png
"""
import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .erf_measure import effective_receptive_field, erf_statistics
from .erf_scale_stats import select_images

__all__ = ["LEVELS", "SIZE_METRICS", "load_run", "select_images", "stage_fn",
           "measure_erf_sizes", "measure_run", "main"]

logger = logging.getLogger(__name__)
LEVELS = ("stem", "res2", "res3", "res4", "res5")  # forward_intermediates' indices 0-4
SIZE_METRICS = ("size10", "size01", "spread")


def load_run(run_dir: str):
    """The trained model of a classification run folder (eval mode, on the CPU) and its facts:
    ``model``, ``model_kwargs``, ``data_dir``, ``val_split``, ``img_size``, ``mean``, ``std``,
    ``checkpoint``, ``top1``. Raises FileNotFoundError naming what is missing."""
    import timm
    from timm.data import resolve_data_config

    import dk_detectron2  # noqa: F401  (registers the models in timm)
    from ..classification import unwrap_checkpoint

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist")
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results_path):
        raise FileNotFoundError(
            f"{run_dir} has no results.json: not a finished classification run (still training?)")
    checkpoint = os.path.join(run_dir, "last.pth.tar")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{run_dir} has no last.pth.tar checkpoint")
    with open(results_path) as f:
        results = json.load(f)
    args = {}
    if os.path.isfile(os.path.join(run_dir, "args.json")):
        with open(os.path.join(run_dir, "args.json")) as f:
            args = json.load(f)
    for key in ("model", "num_classes"):
        if key not in results:
            raise KeyError(f"{results_path} lacks {key!r}")
    kwargs = results.get("model_kwargs") or {}
    model = timm.create_model(results["model"], num_classes=results["num_classes"], **kwargs)
    state = unwrap_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=False))
    model.load_state_dict(state)
    model.eval()
    data = resolve_data_config({k: args.get(k) for k in ("img_size", "mean", "std", "crop_pct",
                                                          "interpolation") if args.get(k)},
                               model=model)
    info = {"run": run_dir, "model": results["model"], "model_kwargs": kwargs,
            "checkpoint": checkpoint, "top1": results.get("final_top1"),
            "data_dir": args.get("data_dir"), "val_split": args.get("val_split", "val"),
            "img_size": int(data["input_size"][-1]), "mean": list(data["mean"]),
            "std": list(data["std"])}
    return model, info


def stage_fn(model: torch.nn.Module, level: str, mean, std):
    """``image [1, 3, H, W] in [0, 1] -> the stage's [1, C, h, w]``: the model's input
    normalisation and its stages up to ``level``, so the ERF is per raw pixel."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    index = LEVELS.index(level)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def run(image: torch.Tensor) -> torch.Tensor:
        return model.forward_intermediates((image - mean_t) / std_t, indices=[index],
                                           intermediates_only=True, stop_early=True)[0]

    return run


def measure_erf_sizes(model: torch.nn.Module, images: Sequence[torch.Tensor],
                      centers_xy: Sequence[Sequence[float]], levels: Sequence[str] = ("res4",
                                                                                     "res5"),
                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> Dict[str, List[Dict]]:
    """ERF sizes of the unit at each image's object centre, per level.

    Args:
        model: a timm model with ``forward_intermediates`` (``DKResNet``), in the mode to probe
            (eval for a trained model).
        images: [3, H, W] tensors in [0, 1].
        centers_xy: per image the object's centre (x, y) in pixels; the probed unit is the cell
            holding it (``floor(c * h / H)``, clipped to the map).
        levels: stages to probe (:data:`LEVELS`).
        mean, std: the model's input normalisation.

    Returns:
        level -> per image ``{"cell": [y, x], "size10", "size01", "spread" (pixels),
        "center_shift" (pixels from the object's centre to the ERF's centre of mass)}``.
    """
    if len(images) != len(centers_xy):
        raise ValueError(f"{len(images)} images but {len(centers_xy)} centres")
    out: Dict[str, List[Dict]] = {}
    for level in levels:
        fn = stage_fn(model, level, mean, std)
        records = []
        for image, (cx, cy) in zip(images, centers_xy):
            height, width = image.shape[-2:]
            with torch.no_grad():
                h, w = fn(image[None]).shape[-2:]
            cell = (min(h - 1, max(0, int(math.floor(cy * h / height)))),
                    min(w - 1, max(0, int(math.floor(cx * w / width)))))
            erf = effective_receptive_field(fn, image, cell)
            # (y, x) pixel indices: the centre (cx, cy) lies in pixel (floor(cy), floor(cx)),
            # whose index-space centre is (cy - 0.5, cx - 0.5).
            stats = erf_statistics(erf, (0.01, 0.1), unit_center=(cy - 0.5, cx - 0.5))
            records.append({
                "cell": list(cell), "map": [int(h), int(w)],
                "size10": math.sqrt(stats["area_pixels"]["0.1"]),
                "size01": math.sqrt(stats["area_pixels"]["0.01"]),
                "spread": stats["spread"], "center_shift": stats.get("center_shift"),
            })
        out[level] = records
    return out


def _load_images(data_dir: str, split: str, indices: Sequence[int], img_size: int):
    from PIL import Image

    from ..classification.shapes_data import ShapesClsSpec, load_split_meta, object_geometry

    split_dir = os.path.join(data_dir, split)
    meta = load_split_meta(split_dir)
    info = meta["info"]
    spec = ShapesClsSpec(num_images=info["num_images"], image_size=info["image_size"],
                         seed=info["seed"], min_scale=info["min_scale"],
                         max_scale=info["max_scale"])
    if spec.image_size != img_size:
        raise ValueError(f"the run's models see {img_size} px images, the split {split_dir} has "
                         f"{spec.image_size} px: object geometry would not map onto the input")
    images, geometry = [], []
    for i in indices:
        record = meta["images"][i]
        pixels = np.asarray(Image.open(os.path.join(split_dir, record["file_name"])).convert("RGB"))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
        geo = object_geometry(spec, split, i)
        if geo["object_size"] != record["object_size"]:
            raise RuntimeError(f"object geometry replay disagrees with {split_dir}/meta.json at "
                               f"image {i}: was the split made by another generator version?")
        geometry.append({"index": int(i), "file_name": record["file_name"],
                         "object_size_px": record["object_size"] * spec.image_size, **geo})
    return images, geometry


def measure_run(run_dir: str, num_images: int = 240, levels: Sequence[str] = ("res4", "res5"),
                data_dir: Optional[str] = None, num_bins: int = 8) -> Dict:
    """Loads a run (:func:`load_run`), selects and measures its validation images; returns
    ``{"info", "images": [{index, object_size_px, center_xy, ...}], "erf": level -> records}``."""
    from ..classification.shapes_data import load_split_meta

    model, info = load_run(run_dir)
    data_dir = data_dir or info["data_dir"]
    if not data_dir:
        raise ValueError(f"{run_dir}/args.json names no data_dir: pass --data-dir")
    meta = load_split_meta(os.path.join(data_dir, info["val_split"]))
    indices = select_images([r["object_size"] for r in meta["images"]], num_images, num_bins)
    images, geometry = _load_images(data_dir, info["val_split"], indices, info["img_size"])
    start = time.time()
    erf = measure_erf_sizes(model, images, [g["center_xy"] for g in geometry], levels,
                            info["mean"], info["std"])
    info["seconds"] = round(time.time() - start, 1)
    return {"info": info, "images": geometry, "erf": erf}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR",
                   help="run folders (label: the folder above seed_<s>, seed from the name)")
    p.add_argument("--study", help="a study folder; with --configs and --seeds")
    p.add_argument("--configs", nargs="+", default=[], help="config names under --study")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds (default: every seed_<s> folder with results.json)")
    p.add_argument("--baseline", default=None, help="config for the paired differences "
                   "(default the first)")
    p.add_argument("--num-images", type=int, default=240)
    p.add_argument("--levels", nargs="+", default=["res4", "res5"], choices=LEVELS)
    p.add_argument("--headline-level", default="res5", choices=LEVELS,
                   help="level of the headline table and plot (default res5: the last stage)")
    p.add_argument("--metric", default="size10", choices=SIZE_METRICS,
                   help="headline ERF size")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over images")
    p.add_argument("--data-dir", default=None, help="override the runs' data_dir")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip unfinished runs of --study (otherwise an error)")
    p.add_argument("--json", default="erf_scale.json")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    return p


def _run_list(args) -> List[Dict]:
    runs = [{"dir": d, "label": os.path.basename(os.path.dirname(os.path.normpath(d))) or d,
             "seed": _seed_of(d)} for d in args.runs]
    if args.study:
        if not os.path.isdir(args.study):
            raise FileNotFoundError(f"study folder {args.study!r} does not exist")
        if not args.configs:
            raise ValueError("--study needs --configs")
        for config in args.configs:
            folder = os.path.join(args.study, config)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder} does not exist: no config {config!r} in the "
                                        "study")
            seeds = args.seeds if args.seeds is not None else sorted(
                _seed_of(d) for d in os.listdir(folder) if _seed_of(d) is not None
                and os.path.isfile(os.path.join(folder, d, "results.json")))
            for seed in seeds:
                run = os.path.join(folder, f"seed_{seed}")
                if args.skip_missing and not os.path.isfile(os.path.join(run, "results.json")):
                    logger.warning("skipping %s: not finished", run)
                    continue
                runs.append({"dir": run, "label": config, "seed": seed})
    if not runs:
        raise ValueError("no runs: give --runs DIR ... or --study with --configs")
    return runs


def _seed_of(path: str) -> Optional[int]:
    name = os.path.basename(os.path.normpath(path))
    return int(name[5:]) if name.startswith("seed_") and name[5:].isdigit() else None


def _columns(erf: Dict[str, List[Dict]]) -> Dict[str, Dict[str, list]]:
    """level -> per-image records  =>  level -> field -> per-image values (rounded): compact."""
    return {level: {key: [round(r[key], 3) if isinstance(r[key], float) else r[key]
                          for r in records] for key in records[0]}
            for level, records in erf.items() if records}


def main(argv=None) -> Dict:
    from . import erf_scale_report as report_out
    from . import erf_scale_stats as stats

    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.headline_level not in args.levels:
        raise ValueError(f"--headline-level {args.headline_level} is not among --levels")
    runs = _run_list(args)
    for run in runs:  # fail before measuring anything
        if not os.path.isdir(run["dir"]):
            raise FileNotFoundError(f"run folder {run['dir']!r} does not exist")
        if not os.path.isfile(os.path.join(run["dir"], "results.json")):
            raise FileNotFoundError(f"{run['dir']} has no results.json: not a finished "
                                    "classification run (still training?)")
    torch.manual_seed(0)
    for run in runs:
        logger.info("Measuring %s (seed %s) ...", run["dir"], run["seed"])
        run.update(measure_run(run["dir"], args.num_images, args.levels, args.data_dir))
        logger.info("  %s: %.1fs", run["info"]["model"], run["info"]["seconds"])
    report = stats.analyse(runs, levels=args.levels, metrics=SIZE_METRICS,
                           baseline=args.baseline or runs[0]["label"],
                           num_bootstrap=args.bootstrap)
    report.update(command="python -m dk_detectron2.tools.erf_scale " + shlex.join(argv),
                  headline={"level": args.headline_level, "metric": args.metric},
                  num_images=args.num_images)
    shared = all(r["images"] == runs[0]["images"] for r in runs)
    rounded = report_out.rounded_geometry
    report["images"] = rounded(runs[0]["images"]) if shared else None  # else per run
    report["runs"] = [{"label": r["label"], "seed": r["seed"], "dir": r["dir"], "info": r["info"],
                       **({} if shared else {"images": rounded(r["images"])}),
                       "erf": _columns(r["erf"])} for r in runs]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        f.write(report_out.compact_json(report))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report_out.format_markdown(report))
    if args.plot:
        report_out.plot(report, args.plot)
    print(report_out.format_markdown(report, headline_only=True))
    return report


if __name__ == "__main__":
    main()
