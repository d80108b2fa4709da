"""Effective receptive fields (ERF, Luo et al., NeurIPS 2016): the measurement.

The ERF of an output unit is the map of how much each input pixel moves it:
``|d sum_c f[c, y, x] / d image|``, summed over the image's colour channels.

* :func:`effective_receptive_field`: the ERF of one unit of any callable ``image -> feature map``
  (a plain ``nn.Sequential`` of convolutions as well as a Detectron2 backbone level,
  :class:`~dk_detectron2.tools.loaders.BackboneLevel`);
* :func:`average_effective_receptive_field`: its mean over several images (centre-cropped to a
  common size by :func:`center_crop`);
* :func:`erf_statistics`: the numbers (area above a fraction of the maximum, spread around the
  centre of mass).

:mod:`dk_detectron2.tools.erf` draws them for Detectron2 models (its command line).
"""

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "effective_receptive_field",
    "average_effective_receptive_field",
    "erf_statistics",
    "center_crop",
    "DEFAULT_THRESHOLDS",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_THRESHOLDS = (0.01, 0.1)


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image must be a torch.Tensor [C, H, W] or [1, C, H, W], got {type(image)}"
        )
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [C, H, W] or [1, C, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point, got {image.dtype}")
    return image


def effective_receptive_field(
    feature_fn: FeatureFn, image: torch.Tensor, position: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """ERF of one output unit of ``feature_fn`` on ``image``.

    Args:
        feature_fn: any differentiable callable ``[1, C, H, W] -> [1, D, h, w]`` (an
            ``nn.Sequential``, a :class:`BackboneLevel`, ...). Run as is: put modules in eval mode
            first if their train-mode behaviour (BatchNorm statistics) is not wanted.
        image: [C, H, W] or [1, C, H, W] floating point input of ``feature_fn``.
        position: (y, x) cell of the feature map whose unit is probed; default its centre
            ``(h // 2, w // 2)``.

    Returns:
        [H, W] float32 tensor (on the CPU), ``sum_ch |d (sum_d f[0, d, y, x]) / d image[0, ch]|``:
        the gradient of the unit summed over the feature channels, in absolute value, summed over
        the image channels. Zero exactly where the unit does not depend on the pixel.
    """
    image = _check_image(image).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        feature = feature_fn(image)
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4 or feature.shape[0] != 1:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature)
            raise ValueError(f"feature_fn must return a [1, D, h, w] tensor, got {shape}")
        height, width = feature.shape[-2:]
        y, x = (
            (height // 2, width // 2) if position is None else (int(position[0]), int(position[1]))
        )
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(
                f"position must be a cell of the {height}x{width} feature map, got ({y}, {x})"
            )
        (grad,) = torch.autograd.grad(feature[0, :, y, x].sum(), image)
    return grad[0].abs().sum(dim=0).float().cpu()


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height x width`` window of a [..., H, W] tensor (H >= height, W >= width)."""
    full_h, full_w = image.shape[-2:]
    if full_h < height or full_w < width:
        raise ValueError(f"cannot crop {height}x{width} out of an image of {full_h}x{full_w}")
    top, left = (full_h - height) // 2, (full_w - width) // 2
    return image[..., top : top + height, left : left + width]


def average_effective_receptive_field(
    feature_fn: FeatureFn,
    images: Sequence[torch.Tensor],
    position: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Mean ERF of one unit (default the central one) over several images, as in the ERF literature.

    Images of different sizes are centre-cropped to the smallest height and width among them, so
    the probed unit sits at the same place in every map.

    Args:
        feature_fn, position: as for :func:`effective_receptive_field` (``position`` is a cell of
            the feature map of the cropped images).
        images: a non-empty sequence of [C, H, W] tensors.

    Returns:
        [h_min, w_min] float32 tensor, the average of the per-image ERFs.
    """
    if len(images) == 0:
        raise ValueError("images must be a non-empty sequence of [C, H, W] tensors")
    height = min(int(image.shape[-2]) for image in images)
    width = min(int(image.shape[-1]) for image in images)
    total = torch.zeros(height, width)
    for image in images:
        total += effective_receptive_field(feature_fn, center_crop(image, height, width), position)
    return total / len(images)


def erf_statistics(
    erf, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, unit_center=None
) -> Dict[str, object]:
    """Measures an ERF map.

    Args:
        erf: [H, W] non-negative map (tensor or array).
        thresholds: fractions of the maximum; for each ``t`` the area ``#{erf >= t * max}``.
        unit_center: optional (y, x) pixel centre of the probed unit's rigid receptive field,
            to report how far the ERF's centre of mass moved from it.

    Returns:
        A JSON-serialisable dict: ``max``, ``total`` (sum), ``area_pixels`` and ``area_fraction``
        (keyed by threshold as ``"0.01"``), ``center_of_mass`` (y, x) in pixels, ``spread`` =
        sqrt of the ERF-weighted mean squared distance to the centre of mass (pixels), and, when
        ``unit_center`` is given, ``center_shift`` (distance from it to the centre of mass).
    """
    erf = np.asarray(erf.detach().cpu() if isinstance(erf, torch.Tensor) else erf, np.float64)
    if erf.ndim != 2:
        raise ValueError(f"erf must be a 2-D [H, W] map, got shape {erf.shape}")
    if (erf < 0).any():
        raise ValueError("erf must be non-negative (an absolute gradient)")
    peak, total = float(erf.max()), float(erf.sum())
    stats: Dict[str, object] = {"height": erf.shape[0], "width": erf.shape[1]}
    stats.update(max=peak, total=total)
    if total == 0:
        stats.update(
            area_pixels={f"{t:g}": 0 for t in thresholds},
            area_fraction={f"{t:g}": 0.0 for t in thresholds},
            center_of_mass=None,
            spread=0.0,
        )
        return stats
    stats["area_pixels"] = {f"{t:g}": int((erf >= t * peak).sum()) for t in thresholds}
    stats["area_fraction"] = {key: value / erf.size for key, value in stats["area_pixels"].items()}
    ys, xs = np.mgrid[0 : erf.shape[0], 0 : erf.shape[1]]
    cy, cx = float((erf * ys).sum() / total), float((erf * xs).sum() / total)
    stats["center_of_mass"] = [cy, cx]
    stats["spread"] = math.sqrt(float((erf * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum() / total))
    if unit_center is not None:
        stats["unit_center"] = [float(unit_center[0]), float(unit_center[1])]
        stats["center_shift"] = math.hypot(cy - unit_center[0], cx - unit_center[1])
    return stats
