r"""Command line: convert a standard ResNet checkpoint into one for a DK backbone.

Example::

    python -m dk_detectron2.checkpoint.convert --input R-50.pkl --output R-50-dk4.pth \
        --scope-size 4
    python -m dk_detectron2.checkpoint.convert --input resnet50.pth --output r50-dk4.pth \
        --scope-size 4 --format torchvision --stages res3 res4 res5

The 3x3 block weights (``res<N>.<block>.conv2.weight`` of bottlenecks, ``conv1``/``conv2`` of basic
blocks) of the chosen stages become SxS DK scopes that reproduce them at zero rotation; every
other tensor is kept, under Detectron2's names.
With ``--config-file`` the target shapes come from the model that config builds instead (so a
checkpoint that does not fit it is reported before anything is written). The output is a
Detectron2 checkpoint (``{"model": ..., "matching_heuristics": True}``) usable as
``MODEL.WEIGHTS``; the table printed gives, per layer, the reproduction error (max |kernel -
bilinear samples of its scope|).
"""
import argparse
import re
import sys
from typing import Dict, Mapping, Sequence, Tuple
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .conversion import (
    CheckpointShapeError,
    ConversionResult,
    convert_state_dict,
    format_conversion_report,
)
from .source_formats import SOURCE_FORMAT_REGISTRY, detect_source_format, rename_to_detectron2

__all__ = ["load_checkpoint_file", "block_scope_shapes", "convert_checkpoint_file", "main"]

# A block conv of a ResNet stage: res<N>.<block>.conv<j>.weight (3x3 when not 1x1).
_BLOCK_CONV = re.compile(r"(?:^|\.)(res\d+)\.\d+\.conv\d\.weight$")


def load_checkpoint_file(path: str) -> Dict:
    """Reads a checkpoint as Detectron2 does (``.pkl`` model zoo, ``.pth``, ``.pyth``).

    Returns:
        ``{"model": state_dict, ...}``, with ``"__author__"`` for model-zoo files.
    """
    checkpointer = DetectionCheckpointer(torch.nn.Module())
    checkpointer._parsed_url_during_load = urlparse(path)  # as DetectionCheckpointer.load sets it
    try:
        return checkpointer._load_file(path)
    finally:
        checkpointer._parsed_url_during_load = None


def block_scope_shapes(
    state_dict: Mapping[str, torch.Tensor],
    scope_size: Tuple[int, int],
    stages: Sequence[str],
) -> Dict[str, Tuple[int, ...]]:
    """Target shapes for a DK backbone with full/grouped DK layers in ``stages``.

    Every KxK (K > 1) block conv of those stages becomes a scope: the bottleneck's ``conv2``, both
    convs of a basic block (R18/R34); 1x1 convs, shortcuts and the stem are kept.

    Args:
        state_dict: a checkpoint in Detectron2's names.
        scope_size: (Sh, Sw).
        stages: e.g. ``("res3", "res4", "res5")``.

    Returns:
        name -> shape: ``[O, I, Sh, Sw]`` for each ``res<N>.<block>.conv<j>.weight`` [O, I, K, K]
        (K > 1) of those stages, the checkpoint's own shape for everything else.
    """
    shapes = {}
    for name, value in state_dict.items():
        shape = tuple(value.shape)
        match = _BLOCK_CONV.search(name)
        if (
            match is not None
            and match.group(1) in stages
            and len(shape) == 4
            and shape[2:] != (1, 1)
        ):
            shape = shape[:2] + tuple(scope_size)
        shapes[name] = shape
    return shapes


def _model_shapes(config_file: str, opts: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """Parameter shapes of the model ``config_file`` builds (on the CPU)."""
    import dk_detectron2  # noqa: F401  (registers the DK backbones)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from dk_detectron2.config import add_dk_config

    cfg = get_cfg()
    add_dk_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def convert_checkpoint_file(
    input_path: str,
    output_path: str,
    scope_size: Tuple[int, int],
    source_format: str = "auto",
    stages: Sequence[str] = ("res3", "res4", "res5"),
    target_shapes: Mapping[str, Tuple[int, ...]] = None,
) -> ConversionResult:
    """Converts ``input_path`` and writes a Detectron2 checkpoint to ``output_path``.

    ``target_shapes`` (model name -> shape) overrides the block rule of
    :func:`block_scope_shapes`. Nothing is written if the checkpoint does not fit.
    """
    checkpoint = load_checkpoint_file(input_path)
    if source_format == "auto":
        source_format = detect_source_format(checkpoint)
    state_dict = checkpoint["model"]
    if target_shapes is None:
        renamed = rename_to_detectron2(state_dict, source_format)
        target_shapes = block_scope_shapes(renamed, scope_size, stages)
        match_by_suffix = False
    else:
        match_by_suffix = True
    result = convert_state_dict(
        state_dict, target_shapes, source_format=source_format, match_by_suffix=match_by_suffix
    )
    torch.save(
        {
            "model": result.state_dict,
            "__author__": "dk_detectron2.checkpoint.convert",
            "matching_heuristics": True,
        },
        output_path,
    )
    return result


def _scope_size(values: Sequence[int]) -> Tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"--scope-size takes S or Sh Sw, got {list(values)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.checkpoint.convert",
        description="Convert a ResNet checkpoint (Detectron2/Caffe2 .pkl, Detectron2 .pth or a "
        "torchvision state dict) into a checkpoint for a DK backbone.",
    )
    parser.add_argument("--input", required=True, help="checkpoint to convert (.pkl or .pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument(
        "--scope-size", type=int, nargs="+", default=[4], metavar="S",
        help="DK scope size: S, or Sh Sw (default 4)",
    )
    parser.add_argument(
        "--format", default="auto",
        choices=["auto"] + sorted(name for name, _ in SOURCE_FORMAT_REGISTRY),
        help="naming convention of the input (default: detected)",
    )
    parser.add_argument(
        "--stages", nargs="+", default=["res3", "res4", "res5"],
        help="stages whose 3x3 block convs become DK scopes (default res3 res4 res5)",
    )
    parser.add_argument(
        "--config-file", default="",
        help="take the target shapes from the model this config builds instead of --stages",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides (KEY VALUE ...) for --config-file",
    )
    return parser


def main(argv: Sequence[str] = None) -> int:
    args = build_parser().parse_args(argv)
    scope_size = _scope_size(args.scope_size)
    target_shapes = _model_shapes(args.config_file, args.opts) if args.config_file else None
    try:
        result = convert_checkpoint_file(
            args.input, args.output, scope_size, args.format, args.stages, target_shapes
        )
    except CheckpointShapeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_conversion_report(result))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
