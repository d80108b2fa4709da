"""``train_net.py`` with tiny dk_shapes datasets registered; the train_net/distributed tests run it.

Datasets (under ``$DK_TEST_DATASETS``): ``dk_shapes_tiny_train`` (8 images, 64 px),
``dk_shapes_tiny_val`` (4 images), ``dk_shapes_one`` (1 image, so that every process of a
multi-process run sees the same picture) and ``dk_shapes_two`` (2 images, one object each). Registration is at module level so that the workers
spawned by ``launch`` (which re-import this file) have them too.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_net  # noqa: E402
from dk_detectron2.data import ShapesSpec, register_shapes_dataset  # noqa: E402

ROOT = os.environ.get("DK_TEST_DATASETS")  # unset when a test only imports CONFIG/TINY_OPTS
TINY_DATASETS = {
    "dk_shapes_tiny_train": ("tiny_train", ShapesSpec(num_images=8, image_size=64, max_objects=2)),
    "dk_shapes_tiny_val": ("tiny_val", ShapesSpec(num_images=4, image_size=64, max_objects=2)),
    "dk_shapes_one": ("one", ShapesSpec(num_images=1, image_size=64, max_objects=2)),
    "dk_shapes_two": ("two", ShapesSpec(num_images=2, image_size=64, max_objects=1)),
}
if ROOT:
    for _name, (_split, _spec) in TINY_DATASETS.items():
        register_shapes_dataset(_name, ROOT, _split, _spec)

# A DK Mask R-CNN small enough for a test: the embedded job's config with tiny widths.
CONFIG = os.path.join(REPO, "configs", "shapes", "mask_rcnn_dk_R18_FPN_shapes.yaml")
TINY_OPTS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "8", "MODEL.RESNETS.RES2_OUT_CHANNELS", "8",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "16",  # GN: 32 groups
    "MODEL.ROI_BOX_HEAD.CONV_DIM", "32", "MODEL.ROI_BOX_HEAD.NUM_CONV", "1",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
]

if __name__ == "__main__":
    train_net.launch_from_args(train_net.argument_parser().parse_args())
