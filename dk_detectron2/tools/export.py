"""Exports a (DK) Detectron2 model and checks the artefact against eager PyTorch.

In the spirit of Detectron2's ``tools/deploy/export_model.py``::

    python -m dk_detectron2.tools.export --config-file configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml \\
        --weights output/shapes_dk_R18_FPN/model_final.pth --format onnx --output output/export

Formats (``dk_detectron2.export.formats.EXPORT_FORMATS``): ``torchscript`` (the whole Mask R-CNN,
traced), ``torchscript_script`` (the whole Mask R-CNN, scripted with Detectron2's
``scripting_with_instances``: control flow kept, any image size), ``export`` (``torch.export`` program of the trunk: normalisation, backbone, RPN head; dynamic
batch and image size), ``aoti`` (that program compiled by AOTInductor) and ``onnx`` (the trunk
in standard ONNX ops, run in ONNX Runtime). The sample inputs are the first ``--samples`` images
of the config's test dataset (the embedded ``dk_shapes_val`` for the shapes configs, generated
on first use). The artefact is written, reloaded from disk and run on every sample, one image per
call, and (trunk formats) once more on all samples as one batch (not when the artefact's batch is
fixed: ``onnx`` of a model holding global DK takes one image per call); the tool prints the largest
absolute and relative differences from eager and the median time per image of both (timed in
turns, call by call), and writes
them to ``<output>/export_<format>.json`` (with the command's own wall time, ``tool_seconds``).
"""
import argparse
import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["get_parser", "export_and_verify", "main"]

logger = logging.getLogger("dk_detectron2.export")


def get_parser() -> argparse.ArgumentParser:
    from dk_detectron2.export.formats import export_format_names

    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.tools.export",
        description="Export a (DK) Detectron2 model and verify it against eager PyTorch.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a yacs config")
    parser.add_argument("--weights", default=None,
                        help="checkpoint (overrides MODEL.WEIGHTS; '' for random initialisation)")
    parser.add_argument("--format", required=True, choices=export_format_names(),
                        help="artefact format")
    parser.add_argument("--output", default="output/export", help="folder for the artefact")
    parser.add_argument("--samples", type=int, default=4,
                        help="number of test-dataset images to verify on (default 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes over the samples (the median call is reported)")
    parser.add_argument("--dataset", default="",
                        help="dataset to take the samples from (default DATASETS.TEST[0])")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE config overrides")
    return parser


def export_and_verify(model: torch.nn.Module, samples: Sequence[Dict], format_name: str,
                      output_dir: str, repeats: int = 3) -> Dict[str, object]:
    """Exports ``model`` (eval mode, CPU) in ``format_name``, reloads the artefact and compares
    it with eager on ``samples`` (inputs as Detectron2's test loader gives them).

    Returns ``{"format", "part", "artefact", "fixed_batch": the batch size the artefact is fixed
    to (``None``: any), "max_abs", "max_rel", "integers_equal", "shapes_equal", "finite_equal"
    (the worst over the samples; a NaN or inf where eager has none, or the reverse, makes
    ``max_abs`` and ``max_rel`` infinite and ``finite_equal`` 0.0), "batched": the
    same differences for one call on all samples (trunk formats whose batch is not fixed),
    "eager_seconds", "exported_seconds": median time per image over ``repeats`` passes}``.
    ``max_rel`` is, per output tensor, max |exported - eager| / max |eager| (the largest over the
    outputs and samples), as :func:`dk_detectron2.export.verify.compare_outputs` defines it.
    """
    from dk_detectron2.export.formats import export_format
    from dk_detectron2.export.trunk import trunk_images
    from dk_detectron2.export.verify import compare_outputs, median_seconds, merge_comparisons

    if not samples:
        raise ValueError("samples must hold at least one input dict, got none")
    fmt = export_format(format_name)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, fmt.suffix)
    module = fmt.module(model, samples)
    fixed_batch = fmt.fixed_batch(module)
    if fixed_batch is not None and fmt.part == "trunk":
        logger.info("%s: the trunk holds GlobalDeformKernel2d, so the batch is fixed at %d image "
                    "(height and width stay dynamic)", format_name, fixed_batch)
    fmt.export(module, fmt.example(module, samples), path)
    exported = fmt.load(path)
    calls = fmt.calls(module, samples)
    report: Dict[str, object] = {"format": format_name, "part": fmt.part, "artefact": path,
                                 "fixed_batch": fixed_batch}
    worst: Dict[str, float] = {}
    with torch.no_grad():
        for args in calls:  # NaN-aware: a non-finite mismatch in any call is the worst
            worst = merge_comparisons(worst, compare_outputs(module(*args), exported(*args)))
        if fmt.part == "trunk" and len(calls) > 1 and fixed_batch is None:
            # one batch padded to the largest sample, as Detectron2 batches images of several sizes
            batch = (trunk_images(module, [sample["image"] for sample in samples]),)
            report["batched"] = compare_outputs(module(*batch), exported(*batch))
    report.update(worst)
    eager_seconds, exported_seconds = median_seconds([module, exported], calls, repeats=repeats)
    report.update(eager_seconds=eager_seconds, exported_seconds=exported_seconds)
    return report


def _summary(report: Dict[str, object]) -> str:
    lines = [
        f"format {report['format']} ({report['part']}): {report['artefact']}",
        f"  max |exported - eager| = {report['max_abs']:.3g} (relative {report['max_rel']:.3g}), "
        f"integer outputs equal: {bool(report['integers_equal'])}, "
        f"shapes equal: {bool(report['shapes_equal'])}, "
        f"same NaN/inf as eager: {bool(report['finite_equal'])}",
    ]
    if report.get("fixed_batch") is not None and report["part"] == "trunk":
        lines.append(f"  batch fixed at {report['fixed_batch']} (the model holds "
                     "GlobalDeformKernel2d: ONNX's Conv takes batch x groups groups as a "
                     "constant); height and width dynamic")
    if "batched" in report:
        batched = report["batched"]
        lines.append(f"  one batch of all samples: max |difference| {batched['max_abs']:.3g} "
                     f"(relative {batched['max_rel']:.3g})")
    lines.append(f"  median time per image: eager {1e3 * report['eager_seconds']:.1f} ms, "
                 f"exported {1e3 * report['exported_seconds']:.1f} ms")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    started = time.perf_counter()
    parser = get_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--samples", args.samples), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import dk_detectron2  # noqa: F401  (operators, backbones, datasets)
    from dk_detectron2.export.samples import dataset_samples
    from dk_detectron2.tools.loaders import load_model, setup_cfg

    cfg = setup_cfg(args.config_file, args.opts, weights=args.weights, device="cpu")
    model = load_model(cfg)
    samples = dataset_samples(cfg, args.samples, args.dataset)
    report = export_and_verify(model, samples, args.format, args.output, args.repeats)
    report.update(config=args.config_file, weights=cfg.MODEL.WEIGHTS, samples=len(samples),
                  repeats=args.repeats, torch=torch.__version__,
                  tool_seconds=time.perf_counter() - started)  # loading, export, checks, timing
    with open(os.path.join(args.output, f"export_{args.format}.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(_summary(report))
    return report


if __name__ == "__main__":
    main()
