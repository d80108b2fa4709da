"""Registers the embedded ``dk_shapes`` datasets in Detectron2's catalogs.

``dk_shapes_train`` and ``dk_shapes_val``, and the wide-scale version ``dk_shapes_wide_train`` and
``dk_shapes_wide_val`` (specs in :data:`shapes.DEFAULT_SPLITS`), are registered on
``import dk_detectron2`` with Detectron2's ``register_coco_instances``, so ``COCOEvaluator`` and the
Visualizer work on them as on COCO. The files are generated on first use (``DatasetCatalog.get``)
under ``$DETECTRON2_DATASETS/dk_shapes`` (default ``datasets/dk_shapes``).
"""
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .shapes import DEFAULT_SPLITS, SHAPE_CLASSES, ShapesSpec, default_datasets_root
from .shapes import ensure_shapes_split, shapes_split_paths

__all__ = ["register_shapes_dataset", "register_all_dk_shapes", "ensure_registered_shapes"]


def register_shapes_dataset(name: str, root: str, split: str, spec: ShapesSpec) -> None:
    """Registers ``name`` as a COCO-format dataset made by the shapes generator on first use.

    Args:
        name: dataset name for ``DATASETS.TRAIN``/``DATASETS.TEST``.
        root: datasets folder; files go to ``<root>/dk_shapes/<split>/``.
        split: split name (mixed into the generator's seed).
        spec: what to generate (see :class:`ShapesSpec`).
    """
    json_file, image_root = shapes_split_paths(root, split)
    register_coco_instances(name, {"thing_classes": list(SHAPE_CLASSES)}, json_file, image_root)

    def load_generating_if_missing():
        ensure_shapes_split(root, split, spec)
        return load_coco_json(json_file, image_root, name)

    # Same metadata as register_coco_instances, but the loader makes the files first if needed.
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load_generating_if_missing)
    MetadataCatalog.get(name).set(dk_shapes_spec=spec, dk_shapes_split=split, dk_shapes_root=root)


def ensure_registered_shapes(dataset_name: str) -> bool:
    """Generates the files of a registered shapes dataset now (e.g. before a COCOEvaluator reads
    its json). Returns False when ``dataset_name`` is not a shapes dataset."""
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, "dk_shapes_spec"):
        return False
    ensure_shapes_split(meta.dk_shapes_root, meta.dk_shapes_split, meta.dk_shapes_spec)
    return True


def register_all_dk_shapes(root: str = None) -> None:
    """Registers ``dk_shapes_<split>`` for every split of :data:`DEFAULT_SPLITS`."""
    root = default_datasets_root() if root is None else root
    for split, spec in DEFAULT_SPLITS.items():
        name = f"dk_shapes_{split}"
        if name not in DatasetCatalog.list():
            register_shapes_dataset(name, root, split, spec)


register_all_dk_shapes()
