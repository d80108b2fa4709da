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
    "BackboneLevel",
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


class BackboneLevel(nn.Module):
    """``normalised image -> model.backbone(image)[level]`` for a Detectron2 meta-architecture.

    The input is [1, 3, H, W], already normalised by the model's pixel mean and std (see
    :func:`dk_detectron2.tools.loaders.preprocess_image`); it is zero-padded at the bottom and right
    to the backbone's size divisibility as ``ImageList`` does, so gradients land on the real
    pixels only.

    Args:
        model: a Detectron2 model with a ``backbone`` (GeneralizedRCNN, RetinaNet, ...).
        level: a key of ``model.backbone.output_shape()``, e.g. "res4" or "p3"; for an FPN, also
            a level of its bottom-up network (``res2``..``res5``).
    """

    def __init__(self, model: nn.Module, level: str):
        super().__init__()
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            raise ValueError(f"model must have a .backbone, got {type(model).__name__}")
        # The levels of an FPN's bottom-up network (res2..res5) are reachable too.
        self.size_divisibility = int(getattr(backbone, "size_divisibility", 0) or 0)
        shapes = dict(backbone.output_shape())
        bottom_up = getattr(backbone, "bottom_up", None)
        if level not in shapes and bottom_up is not None:
            if level in bottom_up.output_shape():
                backbone, shapes = bottom_up, dict(bottom_up.output_shape())
            else:
                shapes.update(bottom_up.output_shape())
        if level not in shapes:
            raise ValueError(
                f"level must be one of {sorted(shapes)} for this backbone, got {level!r}"
            )
        self.backbone = backbone
        self.level = level
        self.stride = int(shapes[level].stride)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        divisibility = self.size_divisibility
        height, width = image.shape[-2:]
        if divisibility > 1:
            pad_h = (divisibility - height % divisibility) % divisibility
            pad_w = (divisibility - width % divisibility) % divisibility
            image = nn.functional.pad(image, (0, pad_w, 0, pad_h))
        return self.backbone(image)[self.level]

    def cell_of(self, pixel_y: float, pixel_x: float) -> Tuple[int, int]:
        """The feature cell whose unit is centred nearest to image pixel (y, x) (see center_of)."""
        return int(round(pixel_y / self.stride)), int(round(pixel_x / self.stride))

    def center_of(self, cell: Tuple[int, int]) -> Tuple[float, float]:
        """Pixel centre of a cell's rigid receptive field: ``cell * stride``.

        Exact for ResNet/FPN, whose strided convolutions and pooling use "same" padding
        (a k x k, stride-2 layer with padding (k-1)/2 centres output i on input 2i).
        """
        return float(cell[0] * self.stride), float(cell[1] * self.stride)
