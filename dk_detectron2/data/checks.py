"""Clear errors when a config names a dataset that is not registered or whose files are missing."""
import os
from typing import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog

from .builtin import ensure_registered_shapes

__all__ = ["DatasetNotFoundError", "check_datasets_available"]

_HOW_TO = (
    "How to get a dataset:\n"
    "  * the embedded one needs nothing: use DATASETS.TRAIN ('dk_shapes_train',) and DATASETS.TEST "
    "('dk_shapes_val',) (or the wide-scale version, dk_shapes_wide_train and dk_shapes_wide_val); "
    "it is generated on first use under $DETECTRON2_DATASETS/dk_shapes (default "
    "./datasets/dk_shapes);\n"
    "  * COCO: point DETECTRON2_DATASETS at the folder holding coco/annotations/instances_*2017.json "
    "and coco/{train2017,val2017}/ and use Detectron2's names (coco_2017_train, coco_2017_val);\n"
    "  * your own COCO-format data: call detectron2.data.datasets.register_coco_instances(name, {}, "
    "json_file, image_root) before training (see tests/downstream_project/)."
)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset named in the config is not registered, or its files are missing."""


def check_datasets_available(names: Iterable[str]) -> None:
    """Generates embedded datasets that are still missing, and raises
    :class:`DatasetNotFoundError` explaining how to make or point at a dataset otherwise.

    Args:
        names: dataset names, e.g. ``cfg.DATASETS.TRAIN + cfg.DATASETS.TEST``.
    """
    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise DatasetNotFoundError(
                f"Dataset {name!r} (from DATASETS.TRAIN/DATASETS.TEST) is not registered.\n" + _HOW_TO
            )
        if ensure_registered_shapes(name):
            continue
        meta = MetadataCatalog.get(name)
        for key in ("json_file", "image_root"):
            path = getattr(meta, key, None)
            if path is not None and not os.path.exists(path):
                root = os.getenv("DETECTRON2_DATASETS", "datasets")
                raise DatasetNotFoundError(
                    f"Dataset {name!r} is registered but its {key} {path!r} does not exist "
                    f"(DETECTRON2_DATASETS={root!r}).\n" + _HOW_TO
                )
