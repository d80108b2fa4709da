"""``dk_shapes_cls``: the miniature classification dataset, one deformed shape per image.

Made like the detection dataset ``dk_shapes`` (:mod:`dk_detectron2.data.shapes`: the same textured
backgrounds, distractor strokes, random affine deformations and noise), but with one object per
image, six classes (``dk_shapes``' four plus ``cross`` and ``chevron``) and a wide range of
object sizes: the longest side before shear is log-uniform in ``[min_scale, max_scale]`` of the
image (0.25-0.95 by default, a 3.8x range against ``dk_shapes``' 2.8x), so a fixed receptive
field cannot fit every object. The default splits (9,600 training and 1,200 validation images of
64 x 64 pixels) take about a minute to make and 0.2 GB.
An object too large to fit after rotation is centred and cropped by the image border.

Layout (an ImageFolder, what timm's and torchvision's loaders read)::

    <root>/dk_shapes_cls/<split>/<class>/<index>.png
    <root>/dk_shapes_cls/<split>/meta.json    # spec, and per image: file, class, object size

``object_size`` in ``meta.json`` is the object's largest extent (width or height of its box after
deformation) as a fraction of the image side: what per-size accuracy is binned by. Generation
depends only on ``(spec, split, index)``; a split is written into a temporary folder and renamed
into place, so concurrent first uses never see half a split.
"""
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from ..data.atomic_dir import build_dir_atomically
from ..data.shapes import (
    _CANONICAL,
    _background,
    _object_color,
    _polygon_mask,
    _random_deformation,
    default_datasets_root,
)

__all__ = [
    "CLS_CLASSES",
    "ShapesClsSpec",
    "DEFAULT_CLS_SPLITS",
    "ensure_shapes_cls",
    "load_split_meta",
    "object_geometry",
]

logger = logging.getLogger(__name__)
_FORMAT_VERSION = 1
DATASET_DIR = "dk_shapes_cls"


def _extra_polygons() -> Dict[str, np.ndarray]:
    """Vertices (N, 2) of the classification-only classes, centred at 0, inside the unit disc."""
    arm = 0.3
    cross = np.array([
        [-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm], [arm, 1],
        [-arm, 1], [-arm, arm], [-1, arm], [-1, -arm], [-arm, -arm],
    ]) / np.hypot(1, arm)
    chevron = np.array([[-1, -0.6], [0, 0.2], [1, -0.6], [1, 0.0], [0, 0.8], [-1, 0.0]]) / np.hypot(1, 0.8)
    return {"cross": cross, "chevron": chevron}


_POLYGONS = {**_CANONICAL, **_extra_polygons()}
CLS_CLASSES: Tuple[str, ...] = ("ellipse", "triangle", "rectangle", "star", "cross", "chevron")


@dataclass(frozen=True)
class ShapesClsSpec:
    """What a split contains; equal specs give byte-identical splits.

    Attributes:
        num_images: images in the split (classes balanced: image ``i`` has class ``i % 6``).
        image_size: side of the square RGB images, in pixels (>= 16).
        seed: base seed; the split name is mixed in, so splits never share images.
        min_scale, max_scale: range of the object's size (longest side before shear) as a
            fraction of ``image_size``, sampled log-uniformly; 0 < min_scale <= max_scale <= 1.
    """

    num_images: int
    image_size: int = 64
    seed: int = 0
    min_scale: float = 0.25
    max_scale: float = 0.95

    def __post_init__(self):
        if not isinstance(self.num_images, int) or self.num_images < len(CLS_CLASSES):
            raise ValueError(
                f"num_images must be an int >= {len(CLS_CLASSES)} (one per class), "
                f"got {self.num_images!r}"
            )
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16 pixels, got {self.image_size!r}")
        if not 0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(
                "need 0 < min_scale <= max_scale <= 1, got "
                f"min_scale={self.min_scale}, max_scale={self.max_scale}"
            )


DEFAULT_CLS_SPLITS: Dict[str, ShapesClsSpec] = {
    "train": ShapesClsSpec(num_images=9600),
    "val": ShapesClsSpec(num_images=1200),
}


def _place_object(spec: ShapesClsSpec, split: str, index: int):
    """The random draws of image ``index`` up to the object's placement, in the generator's order:
    ``(rng, background, category, vertices, lo, hi, offset)`` with the object's polygon at
    ``vertices + offset`` and its unshifted box ``[lo, hi]``."""
    split_key = sum(ord(ch) * 31**i for i, ch in enumerate(split)) % (2**31)
    rng = np.random.default_rng([spec.seed, split_key, index, _FORMAT_VERSION, 7])
    n = spec.image_size
    background = _background(rng, n)
    category = index % len(CLS_CLASSES)
    size = float(np.exp(rng.uniform(np.log(spec.min_scale), np.log(spec.max_scale)))) * n
    vertices = _POLYGONS[CLS_CLASSES[category]] @ _random_deformation(rng, size).T
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    gap = 1.0
    offset = np.where(
        hi - lo < n - 2 * gap,
        rng.uniform(gap - lo, np.maximum(gap - lo, n - gap - hi)),
        n / 2 - (lo + hi) / 2,
    )
    return rng, background, category, vertices, lo, hi, offset


def _record(spec: ShapesClsSpec, category: int, lo: np.ndarray, hi: np.ndarray) -> Dict:
    return {
        "class": CLS_CLASSES[category],
        "label": category,
        "object_size": round(float((hi - lo).max()) / spec.image_size, 4),
    }


def _make_image(spec: ShapesClsSpec, split: str, index: int) -> Tuple[np.ndarray, Dict]:
    """The uint8 (n, n, 3) RGB image of ``index`` and its record (class, object size)."""
    rng, img, category, vertices, lo, hi, offset = _place_object(spec, split, index)
    n = spec.image_size
    mask = _polygon_mask(vertices + offset, n)
    color = _object_color(rng, img[mask].mean(axis=0) if mask.any() else img.mean(axis=(0, 1)))
    shade = rng.normal(0, 12, size=(n, n, 1)).astype(np.float32)
    img = np.where(mask[..., None], color + shade, img)
    img = img + rng.normal(0, 8, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8), _record(spec, category, lo, hi)


def object_geometry(spec: ShapesClsSpec, split: str, index: int) -> Dict:
    """Where the object of image ``index`` is, replayed from the generator without painting it.

    Draws the same random numbers as :func:`_make_image`, in the same order, up to the object's
    placement (the background's draws included, their pixels discarded), so it holds for splits
    already on disk: ``meta.json`` does not record the object's position.

    Returns:
        ``{"class", "label", "object_size"}`` equal to the image's ``meta.json`` record, plus
        ``center_xy``: the centre of the object's bounding box (x, y) in pixels (polygon
        coordinates, as rasterised: pixel ``(i, j)`` spans ``[j, j + 1) x [i, i + 1)``) and
        ``box_xyxy``: that box, unclipped (an object larger than the image overhangs it).
    """
    _, _, category, _, lo, hi, offset = _place_object(spec, split, index)
    box = np.concatenate([lo + offset, hi + offset])
    return {
        **_record(spec, category, lo, hi),
        "center_xy": [float((box[0] + box[2]) / 2), float((box[1] + box[3]) / 2)],
        "box_xyxy": [float(v) for v in box],
    }


def _spec_info(spec: ShapesClsSpec, split: str) -> Dict:
    return {"description": DATASET_DIR, "split": split, "version": _FORMAT_VERSION,
            "classes": list(CLS_CLASSES), **asdict(spec)}


def _generate(split_dir: str, split: str, spec: ShapesClsSpec) -> None:
    for name in CLS_CLASSES:
        os.makedirs(os.path.join(split_dir, name))
    images: List[Dict] = []
    for index in range(spec.num_images):
        pixels, record = _make_image(spec, split, index)
        file_name = os.path.join(record["class"], f"{index:06d}.png")
        Image.fromarray(pixels).save(os.path.join(split_dir, file_name))
        images.append({"file_name": file_name, **record})
    with open(os.path.join(split_dir, "meta.json"), "w") as f:
        json.dump({"info": _spec_info(spec, split), "images": images}, f)


def ensure_shapes_cls(
    root: str = None, splits: Dict[str, ShapesClsSpec] = None
) -> str:
    """Generates the missing splits of ``<root>/dk_shapes_cls`` and returns that folder (the
    ``--data-dir`` of the trainer).

    Args:
        root: datasets folder (default ``$DETECTRON2_DATASETS`` or ``datasets``).
        splits: split name -> spec (default :data:`DEFAULT_CLS_SPLITS`: train 9600, val 1200).
    Raises:
        RuntimeError: an existing split was made with another spec (delete it to regenerate).
    """
    root = default_datasets_root() if root is None else root
    splits = DEFAULT_CLS_SPLITS if splits is None else splits
    data_dir = os.path.join(root, DATASET_DIR)
    os.makedirs(data_dir, exist_ok=True)
    for split, spec in splits.items():
        split_dir = os.path.join(data_dir, split)
        meta_file = os.path.join(split_dir, "meta.json")
        if not os.path.exists(meta_file):
            logger.info("Generating %s split %r (%s) in %s ...", DATASET_DIR, split, spec,
                        split_dir)
            build_dir_atomically(split_dir, lambda path: _generate(path, split, spec), meta_file)
        info = load_split_meta(split_dir)["info"]
        expected = _spec_info(spec, split)
        if info != expected:
            raise RuntimeError(
                f"{split_dir} holds a {DATASET_DIR} split made with another spec: found {info}, "
                f"expected {expected}. Delete {split_dir} to regenerate it."
            )
    return data_dir


def load_split_meta(split_dir: str) -> Dict:
    """``meta.json`` of a split: ``{"info": spec, "images": [{file_name, class, label,
    object_size}, ...]}``."""
    path = os.path.join(split_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a dk_shapes_cls split")
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    """``python -m dk_detectron2.classification.shapes_data [ROOT]``: make the dataset, print its
    folder."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", nargs="?", default=None, help="datasets folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(ensure_shapes_cls(args.root))


if __name__ == "__main__":
    main()
