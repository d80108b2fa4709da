"""A Detectron2 checkpointer that loads standard ResNet checkpoints into DK models, refuses
checkpoints that do not fit, and saves atomically."""
import argparse
import os
from typing import List

import torch
from fvcore.common.checkpoint import _IncompatibleKeys
from detectron2.checkpoint import DetectionCheckpointer

from .atomic import atomic_write
from .conversion import (
    CheckpointShapeError,
    LayerConversion,
    convert_state_dict,
    format_conversion_report,
    format_stage_report,
)
from .source_formats import detect_source_format
from .timm_format import (
    backbone_tensors_left,
    format_handover_report,
    read_timm_checkpoint,
    split_classifier,
)
from ..solver import generator_parameter_names

__all__ = ["CheckpointFileError", "CheckpointMismatchError", "DKCheckpointer"]

_LISTED = 5  # names shown per kind of mismatch


class CheckpointFileError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a checkpoint)."""


class CheckpointMismatchError(CheckpointShapeError):
    """A checkpoint is not one of the model's configuration (strict loading)."""


def _first(names: List[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else "")


class DKCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that converts 3x3 kernels into DK scopes on load.

    ``MODEL.WEIGHTS`` may name a Detectron2 / Caffe2 model-zoo ``.pkl`` (e.g. ``R-50.pkl``), a
    Detectron2 ``.pth``, a torchvision ResNet state dict (``layer1.0.conv2.weight`` ...) or a
    checkpoint of the timm ResNets of :mod:`dk_detectron2.classification` (timm's training
    checkpoint ``model_best.pth.tar`` or a plain state dict; see below). Names are mapped to the
    model's with Detectron2's machinery; every ``[O, I, K, K]`` kernel whose
    parameter is a larger ``[O, I, S, S]`` DK scope is replaced by the scope that reproduces it at
    zero rotation (:func:`dk_detectron2.checkpoint.kernel_to_scope`), so the loaded DK model
    starts out computing what the checkpoint's model computed. One INFO line per stage reports
    the conversion (:func:`~dk_detectron2.checkpoint.format_stage_report`: exact, or the
    minimum-norm error for odd S - K); the per-layer table is logged at DEBUG level.

    Unlike ``DetectionCheckpointer``:

    - a checkpoint tensor that fits neither its parameter nor a scope of it raises
      :class:`~dk_detectron2.checkpoint.CheckpointShapeError` naming each such layer and both
      shapes, before the model is touched; pass ``skip_mismatched=True`` to get Detectron2's
      behaviour (skip them with a warning), e.g. to fine-tune with a new number of classes;
    - DK scopes of another ``SCOPE_SIZE`` are never converted as if they were kernels: they
      raise :class:`CheckpointMismatchError` (in training too), or with ``skip_mismatched`` are
      left out with a warning;
    - with ``strict=True`` (``--eval-only``), a checkpoint of another configuration (another
      ``MODEL.DK.TYPE`` or depth) raises :class:`CheckpointMismatchError` naming the first
      parameters the model has and the checkpoint lacks and the checkpoint's tensors that fit
      nothing. A rigid
      checkpoint whose 3x3 kernels become scopes still loads: the generators of those layers
      keep their zero-rotation initialisation;
    - a file that cannot be read raises :class:`CheckpointFileError` naming it;
    - timm checkpoints (``resnet50_dw``, ``dk_resnet50_dw``, ``dkdcn_resnet50_dw``, the R18 and
      ``_050`` ones): the model weights (``"state_dict"``; not the EMA's) are loaded, the rest of
      timm's training state (optimizer, ``args``) is dropped; DK scopes and generators are
      carried over unchanged (rigid kernels converted as above); one INFO line per backbone stage
      says what was loaded, the classifier ``head.fc`` is reported as not used by the detector,
      and a backbone tensor the checkpoint does not load (another depth, width or
      ``MODEL.DK.DEPTHWISE``) raises :class:`CheckpointMismatchError` naming it (with
      ``skip_mismatched``, a warning);
    - :meth:`save` and the ``last_checkpoint`` tag are atomic
      (:func:`~dk_detectron2.checkpoint.atomic_write`): a process killed while saving leaves the
      previous checkpoint and tag intact.
    """

    def __init__(self, model, save_dir="", *, skip_mismatched=False, strict=False,
                 save_to_disk=None, **kwargs):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **kwargs)
        self.skip_mismatched = skip_mismatched
        self.strict = strict

    def _is_local(self, path: str) -> bool:
        return "://" not in path or path.startswith("file://")

    def _local_save_dir(self) -> str:
        """``save_dir`` as a file-system path (``file:///a/b`` -> ``/a/b``)."""
        prefix = "file://"
        return self.save_dir[len(prefix):] if self.save_dir.startswith(prefix) else self.save_dir

    def save(self, name: str, **kwargs) -> None:
        """``Checkpointer.save``, written through a temporary file, fsync'd and renamed."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local(self.save_dir):
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_dir = self._local_save_dir()
        save_file = os.path.join(save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(save_dir, exist_ok=True)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Writes ``last_checkpoint`` atomically (the old tag stays until the new one is whole)."""
        if not self._is_local(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(os.path.join(self._local_save_dir(), "last_checkpoint"),
                     lambda f: f.write(last_filename_basename.encode()))

    def _torch_load(self, f):
        # timm's CheckpointSaver stores its argparse.Namespace of flags ("args"): allow it beside
        # tensors under torch.load's weights_only default.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return super()._torch_load(f)

    def _load_file(self, filename):
        try:
            loaded = super()._load_file(filename)
        except Exception as error:
            raise CheckpointFileError(
                f"cannot read the checkpoint {filename}: {type(error).__name__}: {error} "
                "(the file is truncated or corrupt, or not a checkpoint)"
            ) from error
        return read_timm_checkpoint(loaded)

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
        self._refuse_resampled_scopes(result)
        if source_format == "timm_dk":
            self._report_handover(result, checkpoint.get("timm") or {})
        elif result.converted:
            # One line per stage; the per-layer table only at DEBUG level.
            for line in format_stage_report(result):
                self.logger.info(f"[DKCheckpointer] {source_format} checkpoint, {line}")
            self.logger.debug(
                "[DKCheckpointer] per-layer conversion:\n" + format_conversion_report(result)
            )
        checkpoint["model"] = result.state_dict
        checkpoint["matching_heuristics"] = False  # already matched
        if self.strict:
            self._check_fits(result)
        incompatible = super()._load_model(checkpoint)
        return _IncompatibleKeys(
            missing_keys=incompatible.missing_keys,
            unexpected_keys=incompatible.unexpected_keys,
            incorrect_shapes=list(incompatible.incorrect_shapes) + result.skipped,
        )

    def _report_handover(self, result, timm_info: dict) -> None:
        """A timm classification checkpoint: the classifier reported as not used, one line per
        backbone stage, and no backbone tensor left as initialised (see the class docstring)."""
        origin = ", ".join(f"{key} {timm_info[key]}" for key in ("arch", "epoch")
                           if timm_info.get(key) is not None)
        prefix = f"[DKCheckpointer] timm checkpoint{f' ({origin})' if origin else ''}"
        if timm_info.get("unused"):
            self.logger.info(f"{prefix}: loading its 'state_dict'; not used: "
                             f"{', '.join(timm_info['unused'])}")
        classifier = split_classifier(result)
        if classifier:
            shown = ", ".join(f"{name} {list(shape)}" for name, shape in classifier)
            self.logger.info(f"{prefix}: the classifier ({shown}) is not used by the detector")
        model_state = self.model.state_dict()
        generators = generator_parameter_names(self.model)
        scopes = {f"{name}.weight" for name, module in self.model.named_modules()
                  if getattr(module, "scope_size", None) is not None}
        for line in format_handover_report(result, model_state, generators, scopes):
            self.logger.info(f"{prefix}, {line}")
        for line in format_stage_report(result):
            self.logger.info(f"{prefix}, {line}")
        if result.unmatched:
            self.logger.warning(f"{prefix}: {len(result.unmatched)} tensor(s) not used by the "
                                f"detector: {_first(result.unmatched)}")
        left = backbone_tensors_left(result, model_state, generators)
        if not left:
            return
        message = (f"the timm checkpoint{f' ({origin})' if origin else ''} does not fit this "
                   f"backbone (another depth, width or MODEL.DK.DEPTHWISE?): {len(left)} backbone "
                   f"tensor(s) would be left as initialised: {_first(left)}")
        if not self.skip_mismatched:
            raise CheckpointMismatchError(
                message + ". Set MODEL.ALLOW_PARTIAL_WEIGHTS True to load what fits and keep the "
                "rest as initialised."
            )
        self.logger.warning(f"[DKCheckpointer] {message}")

    def _resampled_scopes(self, result) -> List[LayerConversion]:
        """The converted layers whose checkpoint tensor is not a kernel of the layer's
        ``kernel_size`` (a DK scope of another ``SCOPE_SIZE``): converting it as a kernel would
        give a scope unrelated to the trained one."""
        resampled = []
        for layer in result.converted:
            module_name = layer.name.rsplit(".", 1)[0]
            kernel_size = getattr(self.model.get_submodule(module_name), "kernel_size", None)
            if kernel_size is not None and tuple(layer.source_shape[-2:]) != tuple(kernel_size):
                resampled.append(layer)
        return resampled

    def _refuse_resampled_scopes(self, result) -> None:
        """Raises :class:`CheckpointMismatchError` for DK scopes of another size, in training as
        in evaluation; with ``skip_mismatched`` they are left out (the model keeps its own)."""
        resampled = self._resampled_scopes(result)
        if not resampled:
            return
        described = [f"{layer.name} (scope {list(layer.source_shape[-2:])} in the checkpoint, "
                     f"{list(layer.target_shape[-2:])} in the model)" for layer in resampled]
        if not self.skip_mismatched:
            raise CheckpointMismatchError(
                f"the checkpoint does not fit this configuration (another SCOPE_SIZE?): "
                f"{len(described)} DK scopes of another size: {_first(described)}. Set "
                "MODEL.ALLOW_PARTIAL_WEIGHTS True to load what fits and keep the rest as "
                "initialised."
            )
        for layer in resampled:
            del result.state_dict[layer.name]
            result.converted.remove(layer)
            result.skipped.append((layer.name, layer.source_shape, layer.target_shape))
        self.logger.warning(f"[DKCheckpointer] left out {len(described)} DK scopes of another "
                            f"size: {_first(described)}")

    def _check_fits(self, result) -> None:
        """Raises :class:`CheckpointMismatchError` unless ``result`` loads every parameter and
        buffer of the model from a tensor made for it (see the class docstring)."""
        model_state = self.model.state_dict()
        converted_modules = [layer.name.rsplit(".", 1)[0] + "." for layer in result.converted]
        missing = [n for n in model_state if n not in result.state_dict
                   and not any(n.startswith(prefix) for prefix in converted_modules)]
        unexpected = [n for n in result.state_dict if n not in model_state]
        skipped = [f"{n} ({list(a)} in the checkpoint, {list(b)} in the model)"
                   for n, a, b in result.skipped]
        problems = []
        if missing:
            problems.append(f"{len(missing)} model tensors missing from it: {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint tensors the model does not have: "
                            f"{_first(unexpected)}")
        if skipped:
            problems.append(f"{len(skipped)} tensors with other shapes: {_first(skipped)}")
        if problems:
            raise CheckpointMismatchError(
                "the checkpoint does not fit this configuration (another MODEL.DK.TYPE, depth or "
                "SCOPE_SIZE?): " + "; ".join(problems) + ". Set MODEL.ALLOW_PARTIAL_WEIGHTS True "
                "to load what fits and keep the rest as initialised."
            )
