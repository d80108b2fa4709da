"""Datasets: the embedded ``dk_shapes`` generator, its registration, and dataset checks.

Importing this package registers ``dk_shapes_train`` and ``dk_shapes_val`` (the embedded job's) and
``dk_shapes_wide_train`` and ``dk_shapes_wide_val`` (objects 0.1-0.85 of the image).
"""
from . import builtin  # noqa: F401  (registers the dk_shapes datasets)
from .builtin import ensure_registered_shapes, register_shapes_dataset
from .checks import DatasetNotFoundError, check_datasets_available
from .shapes import SHAPE_CLASSES, ShapesSpec, ensure_shapes_split, generate_shapes_split

__all__ = [
    "SHAPE_CLASSES",
    "ShapesSpec",
    "DatasetNotFoundError",
    "check_datasets_available",
    "ensure_registered_shapes",
    "ensure_shapes_split",
    "generate_shapes_split",
    "register_shapes_dataset",
]
