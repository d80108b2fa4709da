"""Loading for the analysis tools: a config, a model with its weights, and input images, as Detectron2 sees them."""

import glob
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from detectron2.config import CfgNode, get_cfg
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..checkpoint import DKCheckpointer

__all__ = [
    "IMAGE_EXTENSIONS",
    "expand_inputs",
    "setup_cfg",
    "load_model",
    "load_image",
    "resize_image",
    "preprocess_image",
]

logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Image files from files, folders (their images, sorted) and glob patterns, in order."""
    files: List[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            matches = sorted(
                os.path.join(pattern, name)
                for name in os.listdir(pattern)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no image file")
        files.extend(matches)
    return files


def setup_cfg(
    config_file: str,
    opts: Sequence[str] = (),
    weights: Optional[str] = None,
    device: Optional[str] = None,
) -> CfgNode:
    """A frozen Detectron2 config with the ``MODEL.DK.*`` keys.

    Args:
        config_file: a yacs ``.yaml`` config (``_BASE_`` inheritance allowed), e.g. one under
            ``configs/`` or the ``config.yaml`` that ``train_net.py`` writes beside a checkpoint.
        opts: ``KEY VALUE`` overrides, as on Detectron2's command lines.
        weights: if not None, overrides ``MODEL.WEIGHTS`` ("" means random initialisation).
        device: ``MODEL.DEVICE``; default "cuda" when available, else "cpu".
    """
    from dk_detectron2.config import add_dk_config

    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg


def load_model(cfg: CfgNode) -> nn.Module:
    """Builds ``cfg``'s model in eval mode and loads ``cfg.MODEL.WEIGHTS`` (random init if empty)."""
    model = build_model(cfg)
    model.eval()
    if cfg.MODEL.WEIGHTS:
        DKCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation.")
    return model


def load_image(path: str, cfg: CfgNode) -> Tuple[np.ndarray, torch.Tensor, float]:
    """Reads an image file and resizes it as Detectron2's test-time pipeline does.

    Returns:
        rgb: [H, W, 3] uint8 RGB image after the test-time resize (for drawing).
        image: [3, H, W] float32 tensor in ``cfg.INPUT.FORMAT`` channel order, pixel values in
            [0, 255]: the ``"image"`` a Detectron2 model takes.
        scale: resized size / original size (to map annotations onto the resized image).
    """
    original = detection_utils.read_image(path, format="RGB")
    return resize_image(original, cfg)


def resize_image(rgb: np.ndarray, cfg: CfgNode) -> Tuple[np.ndarray, torch.Tensor, float]:
    """As :func:`load_image`, for an [H, W, 3] uint8 RGB array already in memory."""
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    transform = resize.get_transform(rgb)
    resized = transform.apply_image(rgb)
    scale = resized.shape[0] / rgb.shape[0]
    channels = resized if cfg.INPUT.FORMAT == "RGB" else resized[:, :, ::-1]
    image = torch.as_tensor(np.ascontiguousarray(channels.transpose(2, 0, 1)).astype("float32"))
    return resized, image, scale


def preprocess_image(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Normalises a [3, H, W] image in [0, 255] with the model's pixel mean and std: [1, 3, H, W].

    This is what a Detectron2 meta-architecture feeds its backbone (before padding).
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    image = image.to(model.pixel_mean.device, torch.float32)
    return ((image - model.pixel_mean) / model.pixel_std).unsqueeze(0)
