"""Prints the bbox/segm AP tables of a finished run (``eval_results.json`` in its output folder).

Usage: ``python -m dk_detectron2.engine.report OUTPUT_DIR [OUTPUT_DIR ...]``
"""
import glob
import json
import math
import os
import sys
from typing import Dict

__all__ = ["format_ap_tables", "load_results"]

_COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_results(output_dir: str) -> Dict:
    """The evaluation results ``DKTrainer`` wrote into ``output_dir``; one dataset's or a
    ``{dataset: results}`` dict when several were evaluated."""
    path = os.path.join(output_dir, "eval_results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the run in {output_dir} did not finish its evaluation")
    with open(path) as f:
        return json.load(f)


def format_ap_tables(results: Dict, title: str = "") -> str:
    """Markdown tables (one row per task: bbox, segm) of COCO AP metrics, in percent."""
    if results and all(isinstance(v, dict) and "bbox" in v for v in results.values()):
        return "\n\n".join(format_ap_tables(v, f"{title} {k}".strip()) for k, v in results.items())
    lines = [f"### {title}" if title else "", "| task | " + " | ".join(_COLUMNS) + " |",
             "|---" * (len(_COLUMNS) + 1) + "|"]
    for task in ("bbox", "segm"):
        if task in results:
            values = [results[task].get(c, float("nan")) for c in _COLUMNS]
            cells = ["nan" if v is None or math.isnan(v) else f"{v:.1f}" for v in values]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line)


def main(argv=None):
    for output_dir in argv if argv is not None else sys.argv[1:]:
        print(format_ap_tables(load_results(output_dir), output_dir))
        pictures = sorted(glob.glob(os.path.join(output_dir, "predictions_*.png")))
        print(f"\nPredictions drawn on validation images: {', '.join(pictures) or 'none'}\n")


if __name__ == "__main__":
    main()
