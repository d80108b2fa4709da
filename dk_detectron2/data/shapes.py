"""``dk_shapes``: a small, deterministic COCO-format instance-segmentation dataset of deformed shapes.

It exists so that the embedded job can train and evaluate a Mask R-CNN in minutes with nothing
downloaded. Each image (``image_size`` x ``image_size`` RGB) shows 1 to ``max_objects`` objects of
the classes in :data:`SHAPE_CLASSES`, each a canonical polygon deformed by a random affine map
(scale, aspect ratio, shear and rotation), painted with a noisy colour on a textured, noisy
background with distractor strokes. Objects never overlap (their boxes keep a gap), so every
annotation's polygon is exactly the object's visible mask: the pixels are painted with the very
raster that ``pycocotools`` makes of the annotated polygon.

Registered splits (:data:`DEFAULT_SPLITS`): ``dk_shapes_train`` / ``dk_shapes_val`` (objects
0.18-0.5 of the image, the embedded job's) and the second version ``dk_shapes_wide_train`` /
``dk_shapes_wide_val`` (objects 0.1-0.85 of the image, :data:`WIDE_SCALE_RANGE`).

Layout under ``<root>/dk_shapes/`` (``root`` defaults to ``$DETECTRON2_DATASETS`` or ``datasets``,
as for Detectron2's builtin datasets)::

    dk_shapes/<split>/images/000000.jpg ...
    dk_shapes/<split>/annotations.json     # COCO instances json, "info" holds the generator spec

A split is generated on first use into a temporary folder that is then renamed into place, so two
processes starting at once (e.g. the workers of a multi-process run) never see a half-written split.
Generation depends only on ``(seed, split, index)``: the same spec gives byte-identical files.
"""
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image, ImageDraw

from .atomic_dir import build_dir_atomically

__all__ = [
    "SHAPE_CLASSES",
    "ShapesSpec",
    "DEFAULT_SPLITS",
    "WIDE_SCALE_RANGE",
    "generate_shapes_split",
    "ensure_shapes_split",
    "shapes_split_paths",
    "default_datasets_root",
]

logger = logging.getLogger(__name__)

SHAPE_CLASSES: Tuple[str, ...] = ("ellipse", "triangle", "rectangle", "star")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShapesSpec:
    """What a split contains; two equal specs give byte-identical splits.

    Attributes:
        num_images: number of images in the split.
        image_size: side of the square images, in pixels.
        seed: base seed; the split name is mixed in, so train and val never share images.
        max_objects: at most this many objects per image (at least 1).
        min_scale, max_scale: object size (longest side before shear) as a fraction of image_size.
    """

    num_images: int
    image_size: int = 256
    seed: int = 0
    max_objects: int = 4
    min_scale: float = 0.18
    max_scale: float = 0.5

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 0.9:
            raise ValueError(
                f"need 0 < min_scale <= max_scale <= 0.9, got {self.min_scale}, {self.max_scale}"
            )


# Object sizes of the second dataset version, dk_shapes_wide: 0.1-0.85 of the image, so that the
# box sides of its objects span about 7x between their 5th and 95th percentiles (dk_shapes: 3x),
# for studies of how receptive fields and detectors adapt to scale.
WIDE_SCALE_RANGE: Tuple[float, float] = (0.1, 0.85)

# Specs of the registered datasets dk_shapes_<split>: train / val (the embedded job's) and
# wide_train / wide_val. A registered spec never changes: a new version gets new split names.
DEFAULT_SPLITS: Dict[str, ShapesSpec] = {
    "train": ShapesSpec(num_images=600, seed=0),
    "val": ShapesSpec(num_images=100, seed=0),
    "wide_train": ShapesSpec(num_images=600, seed=0, min_scale=WIDE_SCALE_RANGE[0],
                             max_scale=WIDE_SCALE_RANGE[1]),
    "wide_val": ShapesSpec(num_images=100, seed=0, min_scale=WIDE_SCALE_RANGE[0],
                           max_scale=WIDE_SCALE_RANGE[1]),
}


def default_datasets_root() -> str:
    """The datasets folder, resolved like Detectron2's builtin datasets."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def shapes_split_paths(root: str, split: str) -> Tuple[str, str]:
    """Returns ``(json_file, image_root)`` of a split under ``<root>/dk_shapes/``."""
    split_dir = os.path.join(root, "dk_shapes", split)
    return os.path.join(split_dir, "annotations.json"), os.path.join(split_dir, "images")


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
def _canonical_polygon(name: str) -> np.ndarray:
    """Vertices (N, 2) of the undeformed shape, centred at 0, inside the unit disc."""
    if name == "ellipse":
        t = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "triangle":
        t = np.pi / 2 + np.array([0.0, 2.0, 4.0]) * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) / np.sqrt(2)
    if name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    raise KeyError(f"unknown shape class {name!r}; known: {SHAPE_CLASSES}")


_CANONICAL = {name: _canonical_polygon(name) for name in SHAPE_CLASSES}


def _random_deformation(rng: np.random.Generator, size: float) -> np.ndarray:
    """A 2x2 map: rotation @ shear @ anisotropic scale, mapping the unit disc to ~size/2."""
    aspect = np.exp(rng.uniform(np.log(0.55), np.log(1 / 0.55)))
    scale = np.diag([np.sqrt(aspect), 1 / np.sqrt(aspect)]) * (size / 2) / max(
        np.sqrt(aspect), 1 / np.sqrt(aspect)
    )
    shear = np.array([[1.0, rng.uniform(-0.45, 0.45)], [0.0, 1.0]])
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    return rotation @ shear @ scale


# ------------------------------------------------------------------------------------------------
# Painting
# ------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float (n, n, 3) image in [0, 255]: colour gradient + blurred texture + strokes + noise."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    c0, c1 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    t = (np.cos(direction) * xx + np.sin(direction) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    # Low-frequency texture: coarse noise upsampled bilinearly.
    coarse = rng.normal(0, 25, size=(8, 8, 3)).astype(np.float32)
    texture = np.asarray(
        Image.fromarray(coarse[..., 0]).resize((n, n), Image.BILINEAR), dtype=np.float32
    )
    img += texture[..., None] + 0.3 * coarse.mean(axis=(0, 1))
    # Distractor strokes: thin random lines and arcs, not annotated.
    strokes = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(strokes)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0, x1, y1 = rng.uniform(0, n, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=255, width=int(rng.integers(1, 4)))
    stroke_mask = np.asarray(strokes, dtype=np.float32)[..., None] / 255
    stroke_color = rng.uniform(0, 255, size=3).astype(np.float32)
    img = img * (1 - stroke_mask) + stroke_color * stroke_mask
    return img


def _object_color(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A colour that differs from the local background by at least 60 grey levels on some channel."""
    for _ in range(20):
        color = rng.uniform(0, 255, size=3)
        if np.abs(color - background_mean).max() >= 60:
            return color.astype(np.float32)
    return (255 - background_mean).astype(np.float32)


def _polygon_mask(polygon: np.ndarray, n: int) -> np.ndarray:
    """The binary (n, n) mask that COCO tools rasterise from one polygon (N, 2) in x, y."""
    rle = mask_util.frPyObjects([polygon.reshape(-1).tolist()], n, n)
    return mask_util.decode(rle)[..., 0].astype(bool)


def _make_image(
    spec: ShapesSpec, split: str, index: int
) -> Tuple[np.ndarray, List[Dict]]:
    """Returns the uint8 (n, n, 3) RGB image and its annotations (COCO, without ids)."""
    split_key = sum(ord(ch) * 31**i for i, ch in enumerate(split)) % (2**31)
    rng = np.random.default_rng([spec.seed, split_key, index, _FORMAT_VERSION])
    n = spec.image_size
    img = _background(rng, n)
    annotations = []
    boxes: List[np.ndarray] = []
    num_objects = int(rng.integers(1, spec.max_objects + 1))
    gap = max(2.0, n / 64)
    for _ in range(num_objects):
        for _attempt in range(30):
            category = int(rng.integers(len(SHAPE_CLASSES)))
            size = rng.uniform(spec.min_scale, spec.max_scale) * n
            vertices = _CANONICAL[SHAPE_CLASSES[category]] @ _random_deformation(rng, size).T
            lo, hi = vertices.min(axis=0), vertices.max(axis=0)
            if np.any(hi - lo >= n - 2 * gap):
                continue
            center = rng.uniform(gap - lo, n - gap - hi)
            polygon = np.round(vertices + center, 2)  # the annotation's exact vertices
            box = np.concatenate([polygon.min(axis=0), polygon.max(axis=0)])
            if all(
                box[0] > b[2] + gap or box[2] < b[0] - gap or box[1] > b[3] + gap or box[3] < b[1] - gap
                for b in boxes
            ):
                break
        else:
            continue
        mask = _polygon_mask(polygon, n)
        if mask.sum() < 16:
            continue
        boxes.append(box)
        background_mean = img[mask].mean(axis=0)
        color = _object_color(rng, background_mean)
        shade = rng.normal(0, 12, size=(n, n, 1)).astype(np.float32)
        img = np.where(mask[..., None], color + shade, img)
        annotations.append(
            {
                "category_id": category + 1,
                "segmentation": [polygon.reshape(-1).tolist()],
                "bbox": [
                    round(float(box[0]), 2),
                    round(float(box[1]), 2),
                    round(float(box[2] - box[0]), 2),
                    round(float(box[3] - box[1]), 2),
                ],
                "area": int(mask.sum()),
                "iscrowd": 0,
            }
        )
    img = img + rng.normal(0, 8, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), annotations


# ------------------------------------------------------------------------------------------------
# Splits on disk
# ------------------------------------------------------------------------------------------------
def _spec_info(spec: ShapesSpec, split: str) -> Dict:
    return {"description": "dk_shapes", "split": split, "version": _FORMAT_VERSION, **asdict(spec)}


def generate_shapes_split(split_dir: str, split: str, spec: ShapesSpec) -> None:
    """Writes ``split_dir/images/*.jpg`` and ``split_dir/annotations.json`` (COCO instances).

    ``split_dir`` must not exist yet; use :func:`ensure_shapes_split` for the safe, idempotent
    entry point.
    """
    image_dir = os.path.join(split_dir, "images")
    os.makedirs(image_dir)
    images, annotations = [], []
    for index in range(spec.num_images):
        pixels, anns = _make_image(spec, split, index)
        file_name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=95)
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": spec.image_size,
             "width": spec.image_size}
        )
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    coco = {
        "info": _spec_info(spec, split),
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPE_CLASSES)
        ],
    }
    with open(os.path.join(split_dir, "annotations.json"), "w") as f:
        json.dump(coco, f)


def ensure_shapes_split(root: str, split: str, spec: ShapesSpec) -> Tuple[str, str]:
    """Generates ``<root>/dk_shapes/<split>`` if missing; returns ``(json_file, image_root)``.

    Safe when several processes call it at once: each writes into its own temporary folder and
    renames it into place; the first rename wins and the others discard their copy. An existing
    split made with a different spec is an error (delete the folder to regenerate it).
    """
    json_file, image_root = shapes_split_paths(root, split)
    split_dir = os.path.dirname(json_file)
    if not os.path.exists(json_file):
        logger.info(f"Generating dk_shapes split {split!r} ({spec}) in {split_dir} ...")
        build_dir_atomically(
            split_dir, lambda path: generate_shapes_split(path, split, spec), json_file
        )
    with open(json_file) as f:
        info = json.load(f).get("info", {})
    expected = _spec_info(spec, split)
    if info != expected:
        raise RuntimeError(
            f"{split_dir} holds a dk_shapes split made with a different spec: found {info}, "
            f"expected {expected}. Delete {split_dir} to regenerate it."
        )
    return json_file, image_root
