"""Prediction demo in Detectron2's style: config + weights + images in, drawn predictions out.

``demo.py`` at the repository root is this module's command line::

    python demo.py --config-file output/shapes_dk_R18_FPN/config.yaml \\
        --input datasets/dk_shapes/val/*.png \\
        --output output/demo --confidence-threshold 0.5 \\
        --opts MODEL.WEIGHTS output/shapes_dk_R18_FPN/model_final.pth

Predictions are drawn with Detectron2's ``Visualizer``; it imports OpenCV, so where ``cv2`` is
not installed the demo draws with :func:`dk_detectron2.engine.visualize.draw_instances` (PIL:
masks, boxes, "class score" labels) and says so once.
"""

import argparse
import logging
import os
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from dk_detectron2.tools.loaders import IMAGE_EXTENSIONS, expand_inputs

__all__ = ["get_parser", "setup_demo_cfg", "Demo", "expand_inputs", "montage", "main"]

logger = logging.getLogger("dk_detectron2.demo")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="demo.py", description="Draw the predictions of a (DK) Detectron2 model on images."
    )
    parser.add_argument(
        "--config-file",
        required=True,
        metavar="FILE",
        help="a yacs config, e.g. configs/shapes/*.yaml or a run's config.yaml",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="image files, folders or glob patterns ('dir/*.png')",
    )
    parser.add_argument(
        "--output",
        default="output/demo",
        help="folder for the drawn images (or a file name for a single input)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the predictions drawn",
    )
    parser.add_argument("--device", default="cpu", help="MODEL.DEVICE (cpu, cuda)")
    parser.add_argument(
        "--montage",
        default=None,
        metavar="FILE",
        help="also write all drawn images side by side in this one PNG (e.g. for a README)",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS path/model_final.pth",
    )
    return parser


def setup_demo_cfg(args):
    """The frozen config: ``args.config_file`` + ``args.opts`` + the confidence threshold."""
    from dk_detectron2.tools.loaders import setup_cfg

    threshold = args.confidence_threshold
    opts = list(args.opts) + [
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        str(threshold),
        "MODEL.RETINANET.SCORE_THRESH_TEST",
        str(threshold),
        "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
        str(threshold),
    ]
    return setup_cfg(args.config_file, opts, device=args.device)


def _visualizer_available() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


class Demo:
    """Runs Detectron2's ``DefaultPredictor`` and draws its instances on the input image."""

    def __init__(self, cfg):
        from detectron2.data import MetadataCatalog
        from detectron2.engine import DefaultPredictor

        self.cfg = cfg
        self.predictor = DefaultPredictor(cfg)
        name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        self.metadata = MetadataCatalog.get(name)
        self.use_visualizer = _visualizer_available()
        if not self.use_visualizer:
            logger.warning(
                "OpenCV (cv2), which Detectron2's Visualizer imports, is not installed: drawing "
                "with dk_detectron2.engine.visualize instead (pip install opencv-python-headless)."
            )

    def run_on_image(self, rgb: np.ndarray):
        """``rgb``: [H, W, 3] uint8. Returns (predictions dict, drawn [H, W, 3] uint8 image)."""
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        predictions = self.predictor(bgr)
        if "instances" not in predictions:
            raise ValueError(
                "demo.py draws instance predictions; this model returned "
                f"{sorted(predictions)} (MODEL.META_ARCHITECTURE {self.cfg.MODEL.META_ARCHITECTURE})"
            )
        instances = predictions["instances"].to("cpu")
        if self.use_visualizer:
            from detectron2.utils.visualizer import ColorMode, Visualizer

            visualizer = Visualizer(rgb, self.metadata, instance_mode=ColorMode.IMAGE)
            drawn = visualizer.draw_instance_predictions(instances).get_image()
        else:
            from dk_detectron2.engine.visualize import draw_instances

            names = self.metadata.get("thing_classes", [])
            threshold = self.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
            drawn = np.asarray(draw_instances(rgb, instances, names, threshold))
        return predictions, drawn


def montage(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """[H, W, 3] uint8 images side by side on a white background (tops aligned)."""
    if not images:
        raise ValueError("images must not be empty")
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    left = 0
    for image in images:
        canvas[: image.shape[0], left : left + image.shape[1]] = image
        left += image.shape[1] + gap
    return canvas


def _output_path(output: str, input_path: str, single: bool) -> str:
    if single and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS:
        return output
    stem = os.path.splitext(os.path.basename(input_path))[0]
    return os.path.join(output, f"{stem}.png")


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Runs the demo; returns the paths of the images written."""
    args = get_parser().parse_args(argv)
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.logger import setup_logger
    from PIL import Image

    setup_logger(name="dk_detectron2")
    import dk_detectron2  # noqa: F401  (registers the DK backbones and the embedded datasets)

    inputs = expand_inputs(args.input)
    demo = Demo(setup_demo_cfg(args))
    written, drawings = [], []
    for path in inputs:
        rgb = read_image(path, format="RGB")
        start = time.perf_counter()
        with torch.no_grad():
            predictions, drawn = demo.run_on_image(rgb)
        logger.info(
            "%s: detected %d instances in %.2fs",
            path,
            len(predictions["instances"]),
            time.perf_counter() - start,
        )
        out = _output_path(args.output, path, len(inputs) == 1)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        Image.fromarray(drawn).save(out)
        written.append(out)
        drawings.append(drawn)
    if args.montage:
        os.makedirs(os.path.dirname(os.path.abspath(args.montage)), exist_ok=True)
        Image.fromarray(montage(drawings)).save(args.montage)
        logger.info("wrote the montage %s", args.montage)
    logger.info("wrote %d image(s) under %s", len(written), args.output)
    return written
