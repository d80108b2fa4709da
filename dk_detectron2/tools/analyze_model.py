"""FLOP, activation, parameter and structure reports of (DK) Detectron2 models.

The same tasks as Detectron2's ``tools/analyze_model.py``, with the Deformable Kernel operators
counted (see :mod:`dk_detectron2.tools.flops` for the counting convention)::

    python -m dk_detectron2.tools.analyze_model \\
        --config-file configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml \\
        --tasks flop parameter --num-inputs 2 [--synthetic] [--opts KEY VALUE ...]

Inputs come from the test loader of ``DATASETS.TEST[0]`` (as Detectron2's tool), or, with
``--synthetic`` or when that dataset is not registered, from random images of the test size.
Yacs (``.yaml``) and LazyConfig (``.py``) configs are accepted.
"""

import argparse
import logging
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dk_detectron2.tools.flops import add_dk_flop_handles, dk_activation_handles

__all__ = ["count_flops", "count_activations", "main", "get_parser"]

logger = logging.getLogger("dk_detectron2.analyze_model")
TASKS = ("flop", "activation", "parameter", "structure")


def count_flops(model: nn.Module, inputs: Iterable[List[Dict]]) -> Dict[str, object]:
    """FLOPs (multiply-adds) of ``model`` over batches of Detectron2 inputs.

    Args:
        model: a Detectron2 model (put in eval mode here).
        inputs: batches of size one, ``[{"image": [3, H, W] tensor, ...}]``.

    Returns:
        ``{"total": [flops per input], "by_operator": Counter of the mean flops per operator,
        "table": fvcore's per-module table of the first input}``.
    """
    from fvcore.nn import flop_count_table

    from detectron2.utils.analysis import FlopCountAnalysis

    model.eval()
    by_operator: Counter = Counter()
    totals: List[float] = []
    table = ""
    for index, batch in enumerate(inputs):
        analysis = add_dk_flop_handles(FlopCountAnalysis(model, batch), torchvision=True)
        if index > 0:
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        else:
            table = flop_count_table(analysis, max_depth=5)
        by_operator.update(analysis.by_operator())
        totals.append(float(analysis.total()))
    if not totals:
        raise ValueError("inputs must hold at least one batch")
    mean = Counter({name: value / len(totals) for name, value in by_operator.items()})
    return {"total": totals, "by_operator": mean, "table": table}


def count_activations(model: nn.Module, inputs: Iterable[List[Dict]]) -> Dict[str, object]:
    """Activations (output elements) per operator, averaged over batches of size one."""
    from detectron2.utils.analysis import activation_count_operators

    model.eval()
    counts: Counter = Counter()
    totals: List[float] = []
    for batch in inputs:
        # torchvision=True: the DK model may hold the LearntOffsetDeformConv2d rival
        handles = dk_activation_handles(torchvision=True)
        count = activation_count_operators(model, batch, supported_ops=handles)
        counts.update(count)
        totals.append(float(sum(count.values())))
    if not totals:
        raise ValueError("inputs must hold at least one batch")
    mean = Counter({name: value / len(totals) for name, value in counts.items()})
    return {"total": totals, "by_operator": mean}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.tools.analyze_model",
        description="FLOP / activation / parameter / structure reports of a (DK) Detectron2 model.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["flop", "parameter"])
    parser.add_argument("--num-inputs", type=int, default=1, help="inputs to average over")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="random images of the test size instead of DATASETS.TEST[0]",
    )
    parser.add_argument("--max-depth", type=int, default=5, help="depth of the parameter table")
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="KEY VALUE config overrides (KEY=VALUE for LazyConfig)",
    )
    return parser


class _Setup:
    """Model and input batches for a yacs or LazyConfig config."""

    def __init__(self, args):
        self.args = args
        if args.config_file.endswith(".py"):
            from detectron2.config import LazyConfig, instantiate

            cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
            self.model = instantiate(cfg.model).to("cpu").eval()
            self.image_size = 256
            self._loader = lambda: instantiate(cfg.dataloader.test)
            self._dataset = None
            if "dataloader" in cfg and "test" in cfg.dataloader:
                self._dataset = getattr(cfg.dataloader.test.dataset, "names", None)
        else:
            from dk_detectron2.tools.loaders import load_model, setup_cfg

            cfg = setup_cfg(args.config_file, args.opts, device="cpu")
            self.model = load_model(cfg)
            self.image_size = cfg.INPUT.MIN_SIZE_TEST
            self._dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None

            def loader():
                from detectron2.data import build_detection_test_loader

                return build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])

            self._loader = loader

    def inputs(self) -> List[List[Dict]]:
        from detectron2.data import DatasetCatalog

        count = self.args.num_inputs
        dataset = self._dataset
        registered = isinstance(dataset, str) and dataset in DatasetCatalog.list()
        if self.args.synthetic or not registered:
            if not self.args.synthetic:
                logger.warning("Dataset %r is not registered: using random images.", dataset)
            generator = torch.Generator().manual_seed(0)
            size = self.image_size
            return [
                [{"image": torch.rand(3, size, size, generator=generator) * 255}]
                for _ in range(count)
            ]
        batches = []
        for batch in self._loader():
            batches.append(batch)
            if len(batches) == count:
                break
        return batches


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    from detectron2.utils.analysis import parameter_count_table
    from detectron2.utils.logger import setup_logger

    setup_logger(name="fvcore")
    setup_logger(name="dk_detectron2")
    import dk_detectron2  # noqa: F401  (registers the DK backbones and the embedded datasets)

    setup = _Setup(args)
    model = setup.model
    report: Dict[str, object] = {}
    if "flop" in args.tasks or "activation" in args.tasks:
        inputs = setup.inputs()
    if "flop" in args.tasks:
        flops = count_flops(model, inputs)
        report["flop"] = flops
        logger.info("Flops table computed from only one input sample:\n%s", flops["table"])
        per_op = ", ".join(f"{k}: {v / 1e9:.4f}" for k, v in flops["by_operator"].most_common())
        logger.info("Average GFlops per operator type: %s", per_op)
        logger.info(
            "Total GFlops: %.4f±%.4f",
            np.mean(flops["total"]) / 1e9,
            np.std(flops["total"]) / 1e9,
        )
    if "activation" in args.tasks:
        activations = count_activations(model, inputs)
        report["activation"] = activations
        per_op = ", ".join(f"{k}: {v:.4f}" for k, v in activations["by_operator"].most_common())
        logger.info("Average activations (M) per operator type: %s", per_op)
        logger.info(
            "Total activations (M): %.4f±%.4f",
            np.mean(activations["total"]),
            np.std(activations["total"]),
        )
    if "parameter" in args.tasks:
        table = parameter_count_table(model, max_depth=args.max_depth)
        report["parameter"] = table
        logger.info("Parameter count:\n%s", table)
    if "structure" in args.tasks:
        report["structure"] = str(model)
        logger.info("Model structure:\n%s", model)
    return report


if __name__ == "__main__":
    main()
