"""Datasets: the embedded ``dk_shapes`` generator, its registration, and dataset checks.

Importing this package registers ``dk_shapes_train`` and ``dk_shapes_val``.
"""
from . import builtin  # noqa: F401  (registers dk_shapes_train / dk_shapes_val)
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
