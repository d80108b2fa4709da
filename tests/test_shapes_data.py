"""The embedded dk_shapes dataset: deterministic, valid COCO, exact masks, safe concurrent creation,
registration in Detectron2's catalogs, and helpful errors when a dataset is missing."""
import filecmp
import json
import os
import threading

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO

import dk_detectron2  # noqa: F401
from dk_detectron2.data.shapes import WIDE_SCALE_RANGE
from dk_detectron2.data import (
    SHAPE_CLASSES,
    DatasetNotFoundError,
    ShapesSpec,
    check_datasets_available,
    ensure_shapes_split,
    register_shapes_dataset,
)

TINY = ShapesSpec(num_images=8, image_size=96, max_objects=3)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    json_file, image_root = ensure_shapes_split(root, "train", TINY)
    return root, json_file, image_root


def test_generation_is_deterministic(tiny_split, tmp_path):
    _, json_file, image_root = tiny_split
    json_again, images_again = ensure_shapes_split(str(tmp_path), "train", TINY)
    with open(json_file) as f1, open(json_again) as f2:
        assert json.load(f1) == json.load(f2)
    names = sorted(os.listdir(image_root))
    assert names == sorted(os.listdir(images_again)) and len(names) == TINY.num_images
    match, mismatch, errors = filecmp.cmpfiles(image_root, images_again, names, shallow=False)
    assert mismatch == [] and errors == []


def test_splits_differ(tiny_split, tmp_path):
    _, json_file, _ = tiny_split
    val_json, _ = ensure_shapes_split(str(tmp_path), "val", TINY)
    with open(json_file) as f1, open(val_json) as f2:
        assert json.load(f1)["annotations"] != json.load(f2)["annotations"]


def test_valid_coco_with_exact_masks(tiny_split):
    _, json_file, image_root = tiny_split
    coco = COCO(json_file)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    assert len(coco.getImgIds()) == TINY.num_images
    assert len(coco.getAnnIds()) >= TINY.num_images  # at least one object per image
    n = TINY.image_size
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(SHAPE_CLASSES)
        (polygon,) = ann["segmentation"]
        assert len(polygon) >= 6 and len(polygon) % 2 == 0
        xy = np.array(polygon).reshape(-1, 2)
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= n and y + h <= n
        # the box is the polygon's bounds
        np.testing.assert_allclose(xy.min(0), [x, y], atol=0.011)
        np.testing.assert_allclose(xy.max(0), [x + w, y + h], atol=0.011)
        mask = coco.annToMask(ann).astype(bool)
        assert mask.sum() == ann["area"] > 0
        ys, xs = np.nonzero(mask)
        assert xs.min() >= np.floor(x) and xs.max() <= np.ceil(x + w)
        assert ys.min() >= np.floor(y) and ys.max() <= np.ceil(y + h)
        assert mask_util.area(mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))) == ann["area"]


def test_objects_do_not_overlap(tiny_split):
    _, json_file, _ = tiny_split
    coco = COCO(json_file)
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert max(int(np.sum(masks, axis=0).max()), 1) == 1


def test_images_show_the_objects(tiny_split):
    """Object pixels differ from the background around them (the masks are what is painted)."""
    _, json_file, image_root = tiny_split
    coco = COCO(json_file)
    for image_info in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(os.path.join(image_root, image_info["file_name"])), np.float32)
        assert pixels.shape == (TINY.image_size, TINY.image_size, 3)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_info["id"])):
            mask = coco.annToMask(ann).astype(bool)
            inside = pixels[mask].mean(0)
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            ring = np.zeros_like(mask)
            ring[max(y - 3, 0): y + h + 3, max(x - 3, 0): x + w + 3] = True
            ring &= ~mask
            if ring.sum() > 20:
                assert np.abs(inside - pixels[ring].mean(0)).max() > 10


def test_concurrent_creation_is_safe(tmp_path):
    root = str(tmp_path)
    results, errors = [], []

    def make():
        try:
            results.append(ensure_shapes_split(root, "train", TINY))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert sorted(os.listdir(os.path.join(root, "dk_shapes"))) == ["train"]  # no temp folders left
    assert len(os.listdir(results[0][1])) == TINY.num_images


def test_different_spec_is_an_error(tiny_split):
    root, _, _ = tiny_split
    with pytest.raises(RuntimeError, match="different spec"):
        ensure_shapes_split(root, "train", ShapesSpec(num_images=9, image_size=96, max_objects=3))


def test_spec_validation():
    with pytest.raises(ValueError, match="num_images"):
        ShapesSpec(num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesSpec(num_images=1, image_size=8)


def test_builtin_names_registered():
    for name in ("dk_shapes_train", "dk_shapes_val", "dk_shapes_wide_train", "dk_shapes_wide_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SHAPE_CLASSES) and meta.evaluator_type == "coco"
    # The embedded job's splits keep their spec (the wide version is a new dataset, not a change).
    for name in ("dk_shapes_train", "dk_shapes_val"):
        spec = MetadataCatalog.get(name).dk_shapes_spec
        assert (spec.min_scale, spec.max_scale) == (0.18, 0.5) and spec.image_size == 256
    for name, split in (("dk_shapes_wide_train", "wide_train"), ("dk_shapes_wide_val", "wide_val")):
        meta = MetadataCatalog.get(name)
        assert meta.dk_shapes_split == split
        assert (meta.dk_shapes_spec.min_scale, meta.dk_shapes_spec.max_scale) == WIDE_SCALE_RANGE


def _box_side_spread(root, split, spec):
    """The ratio of the 95th to the 5th percentile of the objects' longest box sides, and the
    sides as fractions of the image."""
    json_file, _ = ensure_shapes_split(root, split, spec)
    with open(json_file) as f:
        sides = np.array([max(a["bbox"][2:]) for a in json.load(f)["annotations"]])
    sides = sides / spec.image_size
    return np.percentile(sides, 95) / np.percentile(sides, 5), sides


def test_wide_version_spans_a_wider_range_of_object_sizes(tmp_path):
    low, high = WIDE_SCALE_RANGE
    default = ShapesSpec(num_images=60, image_size=128)
    wide = ShapesSpec(num_images=60, image_size=128, min_scale=low, max_scale=high)
    default_spread, default_sides = _box_side_spread(str(tmp_path), "train", default)
    wide_spread, wide_sides = _box_side_spread(str(tmp_path), "wide_train", wide)
    assert default_spread < 3.5 < 5 < wide_spread
    assert wide_sides.min() < 0.9 * default_sides.min()
    assert wide_sides.max() > 1.3 * default_sides.max()
    # Large objects still leave room for others: on average more than 2 objects per image.
    assert len(wide_sides) > 2 * wide.num_images


def test_registered_dataset_generated_on_first_use(tmp_path):
    name = "dk_shapes_test_first_use"
    register_shapes_dataset(name, str(tmp_path), "first_use", TINY)
    try:
        assert not os.path.exists(tmp_path / "dk_shapes")
        records = DatasetCatalog.get(name)
        assert len(records) == TINY.num_images
        assert all(os.path.exists(r["file_name"]) and r["annotations"] for r in records)
        assert os.path.exists(MetadataCatalog.get(name).json_file)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_missing_dataset_explains_what_to_do():
    with pytest.raises(DatasetNotFoundError, match="not registered") as info:
        check_datasets_available(["no_such_dataset"])
    assert "dk_shapes_train" in str(info.value) and "DETECTRON2_DATASETS" in str(info.value)


def test_registered_dataset_with_missing_files_explains(tmp_path):
    name = "dk_shapes_test_missing_files"
    MetadataCatalog.get(name).set(json_file=str(tmp_path / "nope.json"), image_root=str(tmp_path))
    DatasetCatalog.register(name, lambda: [])
    try:
        with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
            check_datasets_available([name])
        assert "DETECTRON2_DATASETS" in str(info.value)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
