"""Predictions drawn on validation images, saved as PNGs beside the metrics.

Drawn with PIL (masks blended in a per-class colour, boxes, "class score" labels) so it needs no
OpenCV, which Detectron2's ``Visualizer`` imports.
"""
import colorsys
import os
from typing import List

import numpy as np
import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.data import detection_utils as utils
from PIL import Image, ImageDraw

__all__ = ["draw_instances", "save_prediction_images"]


def _class_color(class_id: int, num_classes: int):
    r, g, b = colorsys.hsv_to_rgb((class_id / max(num_classes, 1) + 0.05) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image_rgb: np.ndarray, instances, class_names: List[str],
                   score_threshold: float = 0.5) -> Image.Image:
    """Draws ``instances`` (Detectron2 ``Instances`` on the CPU: pred_boxes, scores, pred_classes,
    optional pred_masks) whose score is >= ``score_threshold`` on an (H, W, 3) uint8 RGB image."""
    canvas = image_rgb.astype(np.float32)
    keep = instances.scores >= score_threshold
    instances = instances[keep]
    classes = instances.pred_classes.tolist()
    if instances.has("pred_masks"):
        for mask, cls in zip(instances.pred_masks.numpy().astype(bool), classes):
            color = np.array(_class_color(cls, len(class_names)), dtype=np.float32)
            canvas[mask] = 0.5 * canvas[mask] + 0.5 * color
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for box, cls, score in zip(instances.pred_boxes.tensor.tolist(), classes,
                               instances.scores.tolist()):
        color = _class_color(cls, len(class_names))
        draw.rectangle(box, outline=color, width=2)
        label = f"{class_names[cls] if cls < len(class_names) else cls} {score:.2f}"
        draw.text((box[0] + 2, max(box[1] - 11, 0)), label, fill=color)
    return picture


def save_prediction_images(cfg, model, dataset_name: str, output_dir: str, num_images: int = 4,
                           score_threshold: float = 0.5) -> List[str]:
    """Runs ``model`` (trained or loaded; a DDP wrapper is fine) on the first ``num_images`` of
    ``dataset_name``, fed by Detectron2's test loader, and writes
    ``<output_dir>/predictions_<dataset>_<i>.png``. Returns the paths written."""
    class_names = MetadataCatalog.get(dataset_name).get("thing_classes", [])
    os.makedirs(output_dir, exist_ok=True)
    loader = build_detection_test_loader(cfg, dataset_name)
    paths = []
    was_training = model.training
    model.eval()
    try:
        for i, inputs in enumerate(loader):
            if i >= num_images:
                break
            with torch.no_grad():
                instances = model(inputs)[0]["instances"].to("cpu")
            image_rgb = utils.read_image(inputs[0]["file_name"], format="RGB")
            picture = draw_instances(image_rgb, instances, class_names, score_threshold)
            path = os.path.join(output_dir, f"predictions_{dataset_name}_{i}.png")
            picture.save(path)
            paths.append(path)
    finally:
        model.train(was_training)
    return paths
