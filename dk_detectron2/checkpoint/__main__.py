r"""Command line: convert a standard ResNet checkpoint into one for a DK backbone.

Example::

    python -m dk_detectron2.checkpoint --input R-50.pkl --output R-50-dk5.pth --scope-size 5
    python -m dk_detectron2.checkpoint --input resnet50.pth --output r50-dk5.pth \
        --format torchvision --stages res3 res4 res5

See :mod:`.files` for what is converted. With ``--config-file`` the target shapes come from the
model that config builds instead (so a checkpoint that does not fit it is reported before anything
is written); the table printed gives, per layer, the reproduction error (max |kernel - bilinear
samples of its scope|).
"""
import argparse
import sys
from typing import Sequence, Tuple

from ..layers.registry import DKOptions
from .conversion import CheckpointShapeError, format_conversion_report
from .files import convert_checkpoint_file, model_shapes
from .source_formats import SOURCE_FORMAT_REGISTRY

DEFAULT_SCOPE_SIZE = DKOptions().scope_size  # the model's default, MODEL.DK.SCOPE_SIZE


def _scope_size(values: Sequence[int]) -> Tuple[int, int]:
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"--scope-size takes S or Sh Sw, got {list(values)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.checkpoint",
        description="Convert a ResNet checkpoint (Detectron2/Caffe2 .pkl, Detectron2 .pth or a "
        "torchvision state dict) into a checkpoint for a DK backbone.",
    )
    parser.add_argument("--input", required=True, help="checkpoint to convert (.pkl or .pth)")
    parser.add_argument("--output", required=True, help="converted checkpoint to write (.pth)")
    parser.add_argument(
        "--scope-size", type=int, nargs="+", default=[DEFAULT_SCOPE_SIZE], metavar="S",
        help=f"DK scope size: S, or Sh Sw (default {DEFAULT_SCOPE_SIZE}, as MODEL.DK.SCOPE_SIZE)",
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
    target_shapes = model_shapes(args.config_file, args.opts) if args.config_file else None
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
