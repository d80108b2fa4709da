"""A Detectron2 checkpointer that loads standard ResNet checkpoints into DK models."""
from fvcore.common.checkpoint import _IncompatibleKeys
from detectron2.checkpoint import DetectionCheckpointer

from .conversion import convert_state_dict, format_conversion_report, format_stage_report
from .source_formats import detect_source_format

__all__ = ["DKCheckpointer"]


class DKCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that converts 3x3 kernels into DK scopes on load.

    ``MODEL.WEIGHTS`` may name a Detectron2 / Caffe2 model-zoo ``.pkl`` (e.g. ``R-50.pkl``), a
    Detectron2 ``.pth`` or a torchvision ResNet state dict (``layer1.0.conv2.weight`` ...). Names
    are mapped to the model's with Detectron2's machinery; every ``[O, I, K, K]`` kernel whose
    parameter is a larger ``[O, I, S, S]`` DK scope is replaced by the scope that reproduces it at
    zero rotation (:func:`dk_detectron2.checkpoint.kernel_to_scope`), so the loaded DK model
    starts out computing what the checkpoint's model computed. One INFO line per stage reports
    the conversion (:func:`~dk_detectron2.checkpoint.format_stage_report`: exact, or the
    minimum-norm error for odd S - K); the per-layer table is logged at DEBUG level.

    Unlike ``DetectionCheckpointer``, a checkpoint tensor that fits neither its parameter nor a
    scope of it raises :class:`~dk_detectron2.checkpoint.CheckpointShapeError` naming each such
    layer and both shapes, before the model is touched; pass ``skip_mismatched=True`` to get
    Detectron2's behaviour (skip them with a warning), e.g. to fine-tune with a new number of
    classes.
    """

    def __init__(self, model, save_dir="", *, skip_mismatched=False, save_to_disk=None, **kwargs):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **kwargs)
        self.skip_mismatched = skip_mismatched

    def _load_model(self, checkpoint):
        source_format = detect_source_format(checkpoint)
        result = convert_state_dict(
            checkpoint["model"],
            self.model,
            source_format=source_format,
            # Names without the model's prefix (model-zoo and torchvision files) need
            # Detectron2's suffix matching; Detectron2's own .pth files match exactly.
            match_by_suffix=checkpoint.get("matching_heuristics", False)
            or source_format != "detectron2",
            skip_mismatched=self.skip_mismatched,
        )
        if result.converted:
            # One line per stage; the per-layer table only at DEBUG level.
            for line in format_stage_report(result):
                self.logger.info(f"[DKCheckpointer] {source_format} checkpoint, {line}")
            self.logger.debug(
                "[DKCheckpointer] per-layer conversion:\n" + format_conversion_report(result)
            )
        checkpoint["model"] = result.state_dict
        checkpoint["matching_heuristics"] = False  # already matched
        incompatible = super()._load_model(checkpoint)
        return _IncompatibleKeys(
            missing_keys=incompatible.missing_keys,
            unexpected_keys=incompatible.unexpected_keys,
            incorrect_shapes=list(incompatible.incorrect_shapes) + result.skipped,
        )
