"""Effective receptive fields (ERF) of Detectron2 backbones, with or without Deformable Kernels.

The ERF of an output unit (Luo et al., NeurIPS 2016) is the map of how much each input pixel
moves it: ``|d sum_c f[c, y, x] / d image|``, summed over the image's colour channels. Deformable
Kernels exist to adapt it to the object, so this module computes it for any model and measures it:

* :func:`effective_receptive_field`: the ERF of one unit of any callable ``image -> feature map``
  (a plain ``nn.Sequential`` of convolutions as well as a Detectron2 backbone level);
* :class:`BackboneLevel` (from :mod:`.loaders`): that callable for a level (``res2``..``res5``, ``p2``..``p6``) of a
  Detectron2 model, on the image its meta-architecture would feed the backbone;
* :func:`erf_statistics`: the numbers (area above a fraction of the maximum, spread around the
  centre of mass);
* a command line (``python -m dk_detectron2.tools.erf``) that draws several models side by side
  over images of a registered dataset or files and writes the numbers as JSON.

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
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .loaders import BackboneLevel  # the probe of a model level; re-exported

__all__ = [
    "BackboneLevel",
    "effective_receptive_field",
    "average_effective_receptive_field",
    "erf_statistics",
    "center_crop",
    "main",
]

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_THRESHOLDS = (0.01, 0.1)


# ------------------------------------------------------------------------------------------------
# Core
# ------------------------------------------------------------------------------------------------
def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image must be a torch.Tensor [C, H, W] or [1, C, H, W], got {type(image)}"
        )
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [C, H, W] or [1, C, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point, got {image.dtype}")
    return image


def effective_receptive_field(
    feature_fn: FeatureFn, image: torch.Tensor, position: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """ERF of one output unit of ``feature_fn`` on ``image``.

    Args:
        feature_fn: any differentiable callable ``[1, C, H, W] -> [1, D, h, w]`` (an
            ``nn.Sequential``, a :class:`BackboneLevel`, ...). Run as is: put modules in eval mode
            first if their train-mode behaviour (BatchNorm statistics) is not wanted.
        image: [C, H, W] or [1, C, H, W] floating point input of ``feature_fn``.
        position: (y, x) cell of the feature map whose unit is probed; default its centre
            ``(h // 2, w // 2)``.

    Returns:
        [H, W] float32 tensor (on the CPU), ``sum_ch |d (sum_d f[0, d, y, x]) / d image[0, ch]|``:
        the gradient of the unit summed over the feature channels, in absolute value, summed over
        the image channels. Zero exactly where the unit does not depend on the pixel.
    """
    image = _check_image(image).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feature = feature_fn(image)
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4 or feature.shape[0] != 1:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature)
            raise ValueError(f"feature_fn must return a [1, D, h, w] tensor, got {shape}")
        height, width = feature.shape[-2:]
        y, x = (
            (height // 2, width // 2) if position is None else (int(position[0]), int(position[1]))
        )
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(
                f"position must be a cell of the {height}x{width} feature map, got ({y}, {x})"
            )
        (grad,) = torch.autograd.grad(feature[0, :, y, x].sum(), image)
    return grad[0].abs().sum(dim=0).float().cpu()


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height x width`` window of a [..., H, W] tensor (H >= height, W >= width)."""
    full_h, full_w = image.shape[-2:]
    if full_h < height or full_w < width:
        raise ValueError(f"cannot crop {height}x{width} out of an image of {full_h}x{full_w}")
    top, left = (full_h - height) // 2, (full_w - width) // 2
    return image[..., top : top + height, left : left + width]


def average_effective_receptive_field(
    feature_fn: FeatureFn,
    images: Sequence[torch.Tensor],
    position: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Mean ERF of one unit (default the central one) over several images, as in the ERF literature.

    Images of different sizes are centre-cropped to the smallest height and width among them, so
    the probed unit sits at the same place in every map.

    Args:
        feature_fn, position: as for :func:`effective_receptive_field` (``position`` is a cell of
            the feature map of the cropped images).
        images: a non-empty sequence of [C, H, W] tensors.

    Returns:
        [h_min, w_min] float32 tensor, the average of the per-image ERFs.
    """
    if len(images) == 0:
        raise ValueError("images must be a non-empty sequence of [C, H, W] tensors")
    height = min(int(image.shape[-2]) for image in images)
    width = min(int(image.shape[-1]) for image in images)
    total = torch.zeros(height, width)
    for image in images:
        total += effective_receptive_field(feature_fn, center_crop(image, height, width), position)
    return total / len(images)


def erf_statistics(
    erf, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, unit_center=None
) -> Dict[str, object]:
    """Measures an ERF map.

    Args:
        erf: [H, W] non-negative map (tensor or array).
        thresholds: fractions of the maximum; for each ``t`` the area ``#{erf >= t * max}``.
        unit_center: optional (y, x) pixel centre of the probed unit's rigid receptive field,
            to report how far the ERF's centre of mass moved from it.

    Returns:
        A JSON-serialisable dict: ``max``, ``total`` (sum), ``area_pixels`` and ``area_fraction``
        (keyed by threshold as ``"0.01"``), ``center_of_mass`` (y, x) in pixels, ``spread`` =
        sqrt of the ERF-weighted mean squared distance to the centre of mass (pixels), and, when
        ``unit_center`` is given, ``center_shift`` (distance from it to the centre of mass).
    """
    erf = np.asarray(erf.detach().cpu() if isinstance(erf, torch.Tensor) else erf, np.float64)
    if erf.ndim != 2:
        raise ValueError(f"erf must be a 2-D [H, W] map, got shape {erf.shape}")
    if (erf < 0).any():
        raise ValueError("erf must be non-negative (an absolute gradient)")
    peak, total = float(erf.max()), float(erf.sum())
    stats: Dict[str, object] = {"height": erf.shape[0], "width": erf.shape[1]}
    stats.update(max=peak, total=total)
    if total == 0:
        stats.update(
            area_pixels={f"{t:g}": 0 for t in thresholds},
            area_fraction={f"{t:g}": 0.0 for t in thresholds},
            center_of_mass=None,
            spread=0.0,
        )
        return stats
    stats["area_pixels"] = {f"{t:g}": int((erf >= t * peak).sum()) for t in thresholds}
    stats["area_fraction"] = {key: value / erf.size for key, value in stats["area_pixels"].items()}
    ys, xs = np.mgrid[0 : erf.shape[0], 0 : erf.shape[1]]
    cy, cx = float((erf * ys).sum() / total), float((erf * xs).sum() / total)
    stats["center_of_mass"] = [cy, cx]
    stats["spread"] = math.sqrt(float((erf * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum() / total))
    if unit_center is not None:
        stats["unit_center"] = [float(unit_center[0]), float(unit_center[1])]
        stats["center_shift"] = math.hypot(cy - unit_center[0], cx - unit_center[1])
    return stats


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
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
