"""Loading standard ResNet checkpoints into Deformable Kernel models.

- :func:`kernel_to_scope`: a KxK kernel -> the SxS DK scope that reproduces it at zero rotation.
- :func:`convert_state_dict`: a Detectron2 / Caffe2 / torchvision ResNet state dict -> a DK model's.
- :class:`DKCheckpointer`: a ``DetectionCheckpointer`` applying it when ``MODEL.WEIGHTS`` is loaded,
  refusing checkpoints of another configuration, and saving atomically (:func:`atomic_write`).
- ``python -m dk_detectron2.checkpoint``: converts a checkpoint file offline (:mod:`.files`).
"""
from .conversion import (
    CheckpointShapeError,
    ConversionResult,
    LayerConversion,
    convert_state_dict,
    format_conversion_report,
    format_stage_report,
    match_checkpoint_names,
)
from .atomic import atomic_write
from .loader import CheckpointFileError, CheckpointMismatchError, DKCheckpointer
from .scope_init import kernel_to_scope, reproduction_error, sample_scope, scope_sampling_matrix
from .source_formats import SOURCE_FORMAT_REGISTRY, detect_source_format, rename_to_detectron2

__all__ = [k for k in globals().keys() if not k.startswith("_")]
