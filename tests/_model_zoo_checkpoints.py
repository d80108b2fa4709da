"""Checkpoints in the format of Detectron2's model-zoo ImageNet ResNets, with random weights.

The model zoo's ``ImageNetPretrained/MSRA/R-{50,101}.pkl`` and ``ImageNetPretrained/FAIR/
X-101-32x8d.pkl`` are pickled dicts of numpy float32 arrays under Caffe2 / Detectron1 blob names:
``conv1_w`` (and ``conv1_b``), ``res_conv1_bn_{s,b}``, ``res{2..5}_{i}_branch{2a,2b,2c}_w`` with
``..._bn_{s,b}`` (BatchNorm folded into an affine scale and bias), ``res{2..5}_0_branch1_*`` for the
projection shortcuts and the classifier ``fc1000_{w,b}``. :func:`write_model_zoo_pkl` writes such a
file with the real names and shapes of a ResNet / ResNeXt and random values scaled so that
activations stay of order one through 101 layers.
"""
import pickle
from typing import Dict

import numpy as np

__all__ = [
    "BLOCKS_PER_STAGE",
    "CHECKPOINTS",
    "COCO_PRETRAINED_CONFIGS",
    "model_zoo_blobs",
    "write_model_zoo_pkl",
]

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def model_zoo_blobs(
    depth: int = 50, num_groups: int = 1, width_per_group: int = 64, seed: int = 0
) -> Dict[str, np.ndarray]:
    """Caffe2 blob name -> float32 array of an ImageNet ResNet-``depth`` (ResNeXt when
    ``num_groups`` > 1; bottleneck width ``num_groups * width_per_group`` in res2)."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth}")
    rng = np.random.default_rng(seed)
    blobs: Dict[str, np.ndarray] = {}

    def conv(name, out_channels, in_channels_per_group, kernel):
        fan_in = in_channels_per_group * kernel * kernel
        shape = (out_channels, in_channels_per_group, kernel, kernel)
        blobs[f"{name}_w"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def affine(name, channels, scale):
        blobs[f"{name}_bn_s"] = rng.uniform(0.5 * scale, scale, channels).astype(np.float32)
        blobs[f"{name}_bn_b"] = rng.uniform(-0.1, 0.1, channels).astype(np.float32)

    conv("conv1", 64, 3, 7)
    blobs["conv1_b"] = np.zeros(64, np.float32)  # the MSRA files carry an unused stem bias
    affine("res_conv1", 64, 0.02)  # pixels are ~±128: activations of order one
    in_channels, out_channels = 64, 256
    bottleneck = num_groups * width_per_group
    for stage, num_blocks in enumerate(BLOCKS_PER_STAGE[depth], start=2):
        for index in range(num_blocks):
            prefix = f"res{stage}_{index}"
            if index == 0:
                conv(f"{prefix}_branch1", out_channels, in_channels, 1)
                affine(f"{prefix}_branch1", out_channels, 1.0)
            conv(f"{prefix}_branch2a", bottleneck, in_channels if index == 0 else out_channels, 1)
            affine(f"{prefix}_branch2a", bottleneck, 1.0)
            conv(f"{prefix}_branch2b", bottleneck, bottleneck // num_groups, 3)
            affine(f"{prefix}_branch2b", bottleneck, 1.0)
            conv(f"{prefix}_branch2c", out_channels, bottleneck, 1)
            affine(f"{prefix}_branch2c", out_channels, 0.3)  # keeps the residual sums tame
        in_channels, out_channels, bottleneck = out_channels, out_channels * 2, bottleneck * 2
    blobs["fc1000_w"] = (rng.standard_normal((1000, in_channels)) * 0.01).astype(np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    return blobs


def write_model_zoo_pkl(path, **kwargs) -> str:
    """Writes :func:`model_zoo_blobs` (``kwargs``) to ``path`` as the model zoo pickles them."""
    with open(path, "wb") as file:
        pickle.dump(model_zoo_blobs(**kwargs), file, protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


# ------------------------------------------------------------------------------------------------
# The COCO configs that start from these checkpoints
# ------------------------------------------------------------------------------------------------
# Keyword arguments of model_zoo_blobs for each ImageNet checkpoint the configs name.
CHECKPOINTS = {
    "detectron2://ImageNetPretrained/MSRA/R-50.pkl": dict(depth=50),
    "detectron2://ImageNetPretrained/MSRA/R-101.pkl": dict(depth=101),
    "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl": dict(
        depth=101, num_groups=32, width_per_group=8
    ),
}
_MASK_R50_1X = ("Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml",
                "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
_MASK_R50_3X = ("Misc/mask_rcnn_R_50_FPN_3x_dconv_c3-c5.yaml",
                "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
_MASK_R101 = ("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml",) * 2
_MASK_X101 = ("COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",) * 2
_FASTER_R50 = ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",) * 2
# Config (relative to configs/, without extension; a .yaml and its LazyConfig twin .py) ->
# (the Detectron2 config it mirrors, the rigid Detectron2 config of the same model), in an order
# that keeps the configs sharing a rigid model together.
COCO_PRETRAINED_CONFIGS = {
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_dk_c3-c5": _MASK_R50_1X,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_dkdcn_c3-c5": _MASK_R50_1X,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_dk_c3-c5": _MASK_R50_3X,
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_dkdcn_c3-c5": _MASK_R50_3X,
    "COCO-Detection/faster_rcnn_R_50_FPN_1x_dk_c3-c5": _FASTER_R50,
    "COCO-Detection/faster_rcnn_R_50_FPN_1x_dkdcn_c3-c5": _FASTER_R50,
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x_dk_c3-c5": _MASK_R101,
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x_dkdcn_c3-c5": _MASK_R101,
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x_dk_c3-c5": _MASK_X101,
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x_dkdcn_c3-c5": _MASK_X101,
}
