"""Effective receptive fields (ERF) of Detectron2 models, with or without Deformable Kernels,
drawn side by side: the command line ``python -m dk_detectron2.tools.erf``.

Deformable Kernels exist to adapt the ERF to the object. For each model (``--config-file``,
``--weights``) this runs a backbone level (:class:`BackboneLevel`, ``res2``..``res5``,
``p2``..``p6``) on images of a registered dataset or files, measures the ERF of one unit per image
(:mod:`.erf_measure`: :func:`effective_receptive_field`, :func:`erf_statistics`, re-exported here),
draws one column per model and one row per image (:func:`draw`), and writes the numbers as JSON.

Example::

    python -m dk_detectron2.tools.erf \\
        --config-file configs/shapes/mask_rcnn_dw_R18_FPN_shapes.yaml \\
        --weights output/shapes_dw_R18_FPN/model_final.pth --label DW \\
        --config-file configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml \\
        --weights output/shapes_dk_R18_FPN/model_final.pth --label DK \\
        --dataset dk_shapes_val --num-images 3 --average-images 16 --level res5 \\
        --output erf.png --json erf.json
"""

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .erf_measure import (
    DEFAULT_THRESHOLDS,
    average_effective_receptive_field,
    center_crop,
    effective_receptive_field,
    erf_statistics,
)
from .loaders import BackboneLevel  # the probe of a model level; re-exported

__all__ = [
    "BackboneLevel",
    "effective_receptive_field",
    "average_effective_receptive_field",
    "erf_statistics",
    "center_crop",
    "draw",
    "main",
]

logger = logging.getLogger(__name__)


# Display scales of the heat map (maps normalised to max 1).
_SCALES = {
    "linear": lambda m: m,
    "sqrt": np.sqrt,
    "log": lambda m: np.log10(np.maximum(m, 1e-4)) / 4 + 1,
}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.tools.erf",
        description="Effective receptive fields of Detectron2 (DK) models, side by side.",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        required=True,
        metavar="FILE",
        help="a model config; repeat for several models (side by side)",
    )
    parser.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="PTH",
        help="checkpoint per --config-file, in order ('' = random init); "
        "default: each config's MODEL.WEIGHTS",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=None,
        help="column title per --config-file (default: the config's file name)",
    )
    parser.add_argument("--level", default="res5", help="feature level: res2..res5, p2..p6")
    parser.add_argument(
        "--input", nargs="+", default=None, help="image files, folders or glob patterns"
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="a registered dataset to take images from (e.g. dk_shapes_val)",
    )
    parser.add_argument(
        "--num-images", type=int, default=3, help="images drawn one per row (the first N inputs)"
    )
    parser.add_argument(
        "--average-images",
        type=int,
        default=0,
        help="also draw the mean ERF of the centre unit over this many inputs",
    )
    parser.add_argument(
        "--position",
        default="center",
        help="probed unit: 'center', 'object' (centre of the largest annotated "
        "object, --dataset only) or 'Y,X' in pixels of the resized image",
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="fractions of the maximum for the ERF area",
    )
    parser.add_argument(
        "--scale",
        choices=sorted(_SCALES),
        default="sqrt",
        help="display scale of the heat map (the numbers are always linear)",
    )
    parser.add_argument("--output", default="erf.png", help="PNG figure")
    parser.add_argument("--json", default=None, help="JSON numbers (default: --output with .json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides applied to every model",
    )
    return parser


def _image_records(args) -> List[Dict]:
    """``[{"file_name", "annotations"?}]`` from --input or --dataset."""
    if (args.input is None) == (args.dataset is None):
        raise ValueError("give exactly one of --input and --dataset")
    count = max(args.num_images, args.average_images)
    if args.input is not None:
        from dk_detectron2.tools.loaders import expand_inputs

        return [{"file_name": name} for name in expand_inputs(args.input)][:count]
    from detectron2.data import DatasetCatalog

    if args.dataset not in DatasetCatalog.list():
        raise KeyError(
            f"--dataset {args.dataset!r} is not registered; registered: {DatasetCatalog.list()}"
        )
    return list(DatasetCatalog.get(args.dataset))[:count]


def _probe_pixel(position: str, record: Dict, scale: float, size: Tuple[int, int]):
    """Pixel (y, x) of the resized image where the probed unit sits."""
    if position == "center":
        return (size[0] - 1) / 2.0, (size[1] - 1) / 2.0
    if position == "object":
        from detectron2.structures import BoxMode

        annotations = record.get("annotations")
        if not annotations:
            raise ValueError(
                f"--position object needs dataset annotations; {record['file_name']} has none"
            )
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        return (y0 + y1) / 2.0 * scale, (x0 + x1) / 2.0 * scale
    try:
        y, x = (float(v) for v in position.split(","))
    except ValueError:
        raise ValueError(f"--position must be 'center', 'object' or 'Y,X', got {position!r}")
    if not (0 <= y < size[0] and 0 <= x < size[1]):
        raise ValueError(f"--position {position} lies outside the {size[0]}x{size[1]} image")
    return y, x


def _model_specs(args) -> List[Tuple[str, Optional[str], str]]:
    configs = args.config_file
    weights = args.weights if args.weights is not None else [None] * len(configs)
    labels = (
        args.label
        if args.label is not None
        else [os.path.splitext(os.path.basename(c))[0] for c in configs]
    )
    if len(weights) != len(configs):
        raise ValueError(
            f"--weights must be given once per --config-file ({len(configs)}), got {len(weights)}"
        )
    if len(labels) != len(configs):
        raise ValueError(
            f"--label must be given once per --config-file ({len(configs)}), got {len(labels)}"
        )
    return list(zip(configs, weights, labels))


def compute(args) -> Dict:
    """Runs every model on every image; returns the maps (numpy) and the numbers."""
    from dk_detectron2.tools.loaders import load_image, load_model, preprocess_image, setup_cfg

    records = _image_records(args)
    if not records:
        raise ValueError("no input image")
    results = {"level": args.level, "position": args.position, "models": []}
    for config_file, weights, label in _model_specs(args):
        start = time.perf_counter()
        cfg = setup_cfg(config_file, args.opts, weights=weights, device=args.device)
        model = load_model(cfg)
        level = BackboneLevel(model, args.level)
        entry = {
            "label": label,
            "config": config_file,
            "weights": cfg.MODEL.WEIGHTS,
            "stride": level.stride,
            "images": [],
        }
        inputs = []
        for index, record in enumerate(records):
            rgb, image, scale = load_image(record["file_name"], cfg)
            normalised = preprocess_image(model, image)[0]
            if index < args.average_images:
                inputs.append(normalised)
            if index >= args.num_images:
                continue
            pixel = _probe_pixel(args.position, record, scale, rgb.shape[:2])
            cell = level.cell_of(*pixel)
            erf = effective_receptive_field(level, normalised, cell).numpy()
            stats = erf_statistics(erf, args.thresholds, level.center_of(cell))
            stats.update(file_name=record["file_name"], cell=list(cell))
            entry["images"].append({"rgb": rgb, "erf": erf, "stats": stats})
        if inputs:
            height = min(int(i.shape[-2]) for i in inputs)
            width = min(int(i.shape[-1]) for i in inputs)
            cell = level.cell_of((height - 1) / 2.0, (width - 1) / 2.0)
            erf = average_effective_receptive_field(level, inputs, cell).numpy()
            stats = erf_statistics(erf, args.thresholds, level.center_of(cell))
            stats["num_images"] = len(inputs)
            entry["average"] = {"erf": erf, "stats": stats}
        logger.info("%s: %d ERF maps in %.1f s", label, len(records), time.perf_counter() - start)
        results["models"].append(entry)
    return results


def draw(results: Dict, path: str, scale: str = "sqrt", thresholds=DEFAULT_THRESHOLDS) -> None:
    """Grid figure: one column per model, one row per image (+ a row for the mean ERF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    rows = max(len(m["images"]) for m in models) + int(any("average" in m for m in models))
    fig, axes = plt.subplots(
        rows, len(models), figsize=(3.2 * len(models), 3.4 * rows), squeeze=False
    )
    shown = max(thresholds)  # the area reported in the titles
    for column, model in enumerate(models):
        cells = [(i["rgb"], i["erf"], i["stats"]) for i in model["images"]]
        if "average" in model:
            cells.append((None, model["average"]["erf"], model["average"]["stats"]))
        for row in range(rows):
            ax = axes[row][column]
            ax.axis("off")
            if row >= len(cells):
                continue
            rgb, erf, stats = cells[row]
            heat = _SCALES[scale](erf / erf.max()) if erf.max() > 0 else erf
            if rgb is not None:
                ax.imshow(rgb.mean(axis=2), cmap="gray", vmin=0, vmax=255)
                # Heat map over the grey image, opaque where the ERF is strong.
                overlay = plt.get_cmap("jet")(np.clip(heat, 0, 1))
                overlay[..., 3] = 0.85 * np.clip(heat, 0, 1) ** 0.5
                ax.imshow(overlay)
            else:
                ax.imshow(heat, cmap="jet", vmin=0, vmax=1)
            if "unit_center" in stats:
                ax.plot(stats["unit_center"][1], stats["unit_center"][0], "w+", markersize=8)
            area = stats["area_pixels"].get(f"{shown:g}", 0)
            title = model["label"] if row == 0 else ""
            if rgb is None:
                title = f"{model['label']}: mean of {stats['num_images']}"
            ax.set_title(
                f"{title}\narea@{shown:g}={area}px  spread={stats['spread']:.1f}px", fontsize=8
            )
    fig.suptitle(f"ERF of {results['level']} (position: {results['position']})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def numbers(results: Dict) -> Dict:
    """The JSON part of ``results`` (statistics only, no maps)."""
    out = {"level": results["level"], "position": results["position"], "models": []}
    for model in results["models"]:
        entry = {k: model[k] for k in ("label", "config", "weights", "stride")}
        entry["images"] = [image["stats"] for image in model["images"]]
        if "average" in model:
            entry["average"] = model["average"]["stats"]
        out["models"].append(entry)
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="dk_detectron2")
    import dk_detectron2  # noqa: F401  (registers the DK backbones and the embedded datasets)

    results = compute(args)
    draw(results, args.output, args.scale, args.thresholds)
    report = numbers(results)
    json_path = args.json or os.path.splitext(args.output)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    logger.info("wrote %s and %s", args.output, json_path)
    return report


if __name__ == "__main__":
    main()
