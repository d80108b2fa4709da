"""Sample inputs for export and verification: the first images of the config's test dataset."""
from typing import Dict, List

from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader

__all__ = ["dataset_samples"]


def dataset_samples(cfg: CfgNode, count: int, dataset: str = "") -> List[Dict]:
    """The first ``count`` inputs of ``dataset`` (default ``cfg.DATASETS.TEST[0]``, e.g. the
    embedded ``dk_shapes_val``, generated on first use) as the model sees them at test time:
    ``{"image": [3, H, W] float32 pixels after the test resize, "height", "width", ...}``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not dataset:
        if not cfg.DATASETS.TEST:
            raise ValueError("cfg.DATASETS.TEST is empty: name a dataset to take samples from")
        dataset = cfg.DATASETS.TEST[0]
    samples: List[Dict] = []
    for batch in build_detection_test_loader(cfg, dataset):
        samples.extend(batch)
        if len(samples) >= count:
            break
    return samples[:count]
