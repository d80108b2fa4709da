"""timm ``pretrained_cfg`` of the classification models: no weights to download (``url`` empty);
a local checkpoint is given as ``pretrained_cfg_overlay=dict(file=PATH)``."""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["classification_cfg"]


def classification_cfg(**kwargs) -> dict:
    """timm's usual ImageNet cfg (224 px, crop 0.875, bilinear, ImageNet mean/std) with no url."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        **kwargs,
    }
