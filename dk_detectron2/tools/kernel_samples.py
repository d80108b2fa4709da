"""Pictures of sampled kernels: a DK layer's S x S scope and where its K x K taps were read.

For one Deformable Kernel layer, one input and one output position, the scope of a channel is
drawn as a heat map of its weight magnitude; the K x K taps are drawn at their base grid
``(kh + (S-K)/2, kw + (S-K)/2)`` (hollow) and where the rotation moved them (filled, with an
arrow). The rotations are the ones the layer actually passed to the operator (after clipping),
captured with a dispatch mode, so any module calling ``deform_kernel2d``,
``deform_kernel_conv2d`` (local DK, one rotation per position) or ``nd_linear_sample`` (global
DK, one rotation per image) can be drawn.

Command line::

    python -m dk_detectron2.tools.kernel_samples \\
        --config-file configs/shapes/mask_rcnn_dk_R18_FPN_shapes.yaml \\
        --weights output/shapes_dk_R18_FPN/model_final.pth --input image.png \\
        [--layer backbone.bottom_up.res5.0.conv2.depthwise] [--position Y,X] \\
        [--channels 0 1 2 3] --output kernel_samples.png

and, for every DK layer of the model, the rotation size and the share of taps that left the
scope (they read zero: a layer at 100% is dead) or are held on its edge, with ``--stats``
instead of ``--output``; ``--stats-json FILE`` also writes them, with their means over the layers
(the figures a report quotes), as JSON.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..checkpoint.atomic import atomic_write
from ..layers.geometry import base_grid
from ..layers.ops import arguments_by_name

__all__ = [
    "SamplingCall",
    "KernelSamples",
    "capture_kernel_sampling",
    "kernel_samples",
    "draw_kernel_samples",
    "main",
]

logger = logging.getLogger(__name__)

LOCAL_OPS = ("dk_detectron2::deform_kernel2d", "dk_detectron2::deform_kernel_conv2d")
GLOBAL_OP = "dk_detectron2::nd_linear_sample"


@dataclasses.dataclass
class SamplingCall:
    """One captured call of a kernel-sampling operator.

    ``op`` is its name; for the local ops ``rotation`` is [B, G*Kh*Kw*2, Ho, Wo], ``weight`` the
    scope [C_out, C_in/groups, Sh, Sw]; for ``nd_linear_sample`` ``coord`` is [P, 2] and
    ``weight`` the sampled scopes [M, Sh, Sw].
    """

    op: str
    weight: torch.Tensor
    rotation: Optional[torch.Tensor] = None
    coord: Optional[torch.Tensor] = None
    kernel_size: Optional[Tuple[int, int]] = None
    rotation_groups: int = 1


def _local_call(name: str):
    """Reader of a local DK op's arguments (by their schema names) into a SamplingCall."""

    def read(arguments) -> SamplingCall:
        return SamplingCall(
            name,
            arguments["weight"].detach(),
            rotation=arguments["rotation"].detach(),
            kernel_size=tuple(arguments["kernel_size"]),
            rotation_groups=int(arguments["rotation_groups"]),
        )

    return read


# Operator name -> reader of its arguments, by name, into a SamplingCall.
_CALL_READERS = {
    "dk_detectron2::deform_kernel2d": _local_call("dk_detectron2::deform_kernel2d"),
    "dk_detectron2::deform_kernel_conv2d": _local_call("dk_detectron2::deform_kernel_conv2d"),
    GLOBAL_OP: lambda arguments: SamplingCall(
        GLOBAL_OP, arguments["input"].detach(), coord=arguments["coord"].detach()
    ),
}


class _CaptureMode(TorchDispatchMode):
    def __init__(self, calls: List[SamplingCall]):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reader = _CALL_READERS.get(func._schema.name)
        if reader is not None:
            self.calls.append(reader(arguments_by_name(func, args, kwargs)))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def capture_kernel_sampling() -> Iterator[List[SamplingCall]]:
    """Records every DK kernel-sampling operator call made inside the ``with`` block."""
    calls: List[SamplingCall] = []
    with _CaptureMode(calls):
        yield calls


@dataclasses.dataclass
class KernelSamples:
    """What :func:`draw_kernel_samples` draws for one channel.

    scope: [Sh, Sw] weight magnitude of the channel's scope (|w| summed over input channels).
    base: [Kh*Kw, 2] (y, x) scope coordinates of the taps at zero rotation.
    points: [Kh*Kw, 2] (y, x) scope coordinates where the taps were read.
    """

    scope: np.ndarray
    base: np.ndarray
    points: np.ndarray
    channel: int
    group: int
    position: Optional[Tuple[int, int]]
    label: str = ""


def _base_grid(kernel_size, scope_size) -> np.ndarray:
    return base_grid(tuple(kernel_size), tuple(scope_size), torch.float64).numpy()


def kernel_samples(
    module: nn.Module,
    x: torch.Tensor,
    position: Optional[Tuple[int, int]] = None,
    channels: Sequence[int] = (0,),
    batch_index: int = 0,
    label: str = "",
) -> List[KernelSamples]:
    """Runs ``module`` on ``x`` and returns the scope and sample points of ``channels``.

    Args:
        module: a DK layer (``DeformKernel2d``, ``DeformKernelConv2d``, ``GlobalDeformKernel2d``
            or any module calling the DK operators once).
        x: its input [B, C_in, H, W].
        position: (y, x) output cell of a local DK; default the centre. Ignored for a global DK.
        channels: output channels to draw.
        batch_index: which image of the batch.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x))}")
    with torch.no_grad(), capture_kernel_sampling() as calls:
        module(x)
    local = [c for c in calls if c.op in LOCAL_OPS]
    sampled = [c for c in calls if c.op == GLOBAL_OP]
    if local:
        return _local_samples(local[-1], position, channels, batch_index, label)
    if sampled:
        return _global_samples(module, sampled, x.shape[0], channels, batch_index, label)
    raise ValueError(
        f"module {type(module).__name__} called no Deformable Kernel operator: "
        "it is not a DK layer (a rigid or deformable convolution has no scope to draw)"
    )


def _local_samples(call, position, channels, batch_index, label) -> List[KernelSamples]:
    weight, rotation = call.weight, call.rotation
    out_channels = weight.shape[0]
    _, _, out_h, out_w = rotation.shape
    y, x = (out_h // 2, out_w // 2) if position is None else (int(position[0]), int(position[1]))
    if not (0 <= y < out_h and 0 <= x < out_w):
        raise ValueError(f"position must be a cell of the {out_h}x{out_w} output, got ({y}, {x})")
    taps = call.kernel_size[0] * call.kernel_size[1]
    groups = call.rotation_groups
    base = _base_grid(call.kernel_size, weight.shape[-2:])
    results = []
    for channel in channels:
        if not 0 <= channel < out_channels:
            raise ValueError(f"channels must lie in [0, {out_channels}), got {channel}")
        group = channel // (out_channels // groups)
        block = rotation[batch_index, group * taps * 2 : (group + 1) * taps * 2, y, x]
        points = base + block.reshape(taps, 2).double().cpu().numpy()
        scope = weight[channel].abs().sum(dim=0).double().cpu().numpy()
        results.append(KernelSamples(scope, base, points, channel, group, (y, x), label))
    return results


def _global_samples(module, calls, batch, channels, batch_index, label) -> List[KernelSamples]:
    # GlobalDeformKernel2d samples each rotation group's block of scopes with one call.
    weight = getattr(module, "weight", None)
    kernel_size = getattr(module, "kernel_size", None)
    if weight is None or kernel_size is None:
        raise ValueError("a global DK module must expose .weight and .kernel_size")
    out_channels, per_group_in = weight.shape[:2]
    groups = len(calls)
    taps = kernel_size[0] * kernel_size[1]
    base = _base_grid(kernel_size, weight.shape[-2:])
    results = []
    for channel in channels:
        if not 0 <= channel < out_channels:
            raise ValueError(f"channels must lie in [0, {out_channels}), got {channel}")
        group = channel // (out_channels // groups)
        coord = calls[group].coord.reshape(batch, taps, 2)[batch_index]
        scope = weight[channel].detach().abs().sum(dim=0).double().cpu().numpy()
        results.append(
            KernelSamples(scope, base, coord.double().cpu().numpy(), channel, group, None, label)
        )
    return results


def draw_kernel_samples(samples: Sequence[KernelSamples], path: str, title: str = "") -> None:
    """One panel per :class:`KernelSamples`: scope heat map, base taps (o), read taps (*)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        raise ValueError("samples must not be empty")
    fig, axes = plt.subplots(1, len(samples), figsize=(3.3 * len(samples), 3.6), squeeze=False)
    for ax, sample in zip(axes[0], samples):
        sh, sw = sample.scope.shape
        image = ax.imshow(
            sample.scope, cmap="viridis", origin="upper", extent=(-0.5, sw - 0.5, sh - 0.5, -0.5)
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="|weight|")
        # Bilinear reads are non-zero strictly inside (-1, S): the dashed box.
        ax.add_patch(
            matplotlib.patches.Rectangle(
                (-1, -1), sw + 1, sh + 1, fill=False, linestyle="--", edgecolor="gray"
            )
        )
        for (by, bx), (py, px) in zip(sample.base, sample.points):
            if abs(py - by) + abs(px - bx) > 1e-3:
                ax.annotate(
                    "",
                    xy=(px, py),
                    xytext=(bx, by),
                    arrowprops=dict(arrowstyle="->", color="white", lw=1),
                )
        ax.scatter(
            sample.base[:, 1],
            sample.base[:, 0],
            s=40,
            facecolors="none",
            edgecolors="white",
            label="base grid",
        )
        ax.scatter(sample.points[:, 1], sample.points[:, 0], s=25, c="red", label="sampled")
        ys, xs = sample.points[:, 0], sample.points[:, 1]
        ax.set_xlim(min(-1.5, xs.min() - 0.5), max(sw + 0.5, xs.max() + 0.5))
        ax.set_ylim(max(sh + 0.5, ys.max() + 0.5), min(-1.5, ys.min() - 0.5))
        where = "global" if sample.position is None else f"cell {sample.position}"
        ax.set_title(
            f"{sample.label}\nchannel {sample.channel} (group {sample.group}), {where}", fontsize=8
        )
    axes[0][0].legend(loc="lower left", fontsize=6, framealpha=0.6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.tools.kernel_samples",
        description="Draw a DK layer's scope and where its taps were sampled at one position.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", default=None, help="checkpoint (default: MODEL.WEIGHTS)")
    parser.add_argument("--input", required=True, help="an image file")
    parser.add_argument(
        "--layer",
        default=None,
        help="module name of the DK layer (default: the last one); " "--list-layers prints them",
    )
    parser.add_argument("--list-layers", action="store_true")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print, for every DK layer, the rotation size and the share of taps reading zero "
        "(outside the scope) on --input, instead of drawing",
    )
    parser.add_argument(
        "--stats-json",
        default=None,
        metavar="FILE",
        help="with --stats: also write the statistics (per layer and their means over the "
        "layers) to FILE as JSON",
    )
    parser.add_argument(
        "--position", default="center", help="'center' or 'Y,X' in pixels of the resized image"
    )
    parser.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        help="channels to draw (default: the 4 with the largest scopes)",
    )
    parser.add_argument("--output", default="kernel_samples.png")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER)
    return parser


STATS_KEYS = ("mean_abs_rotation", "max_abs_rotation", "taps_reading_zero", "taps_on_scope_edge")


def _write_stats_json(path: str, stats: List[Dict], **about) -> Dict:
    """Writes ``{**about, "layers": stats, "mean_over_layers": {key: mean over the layers}}`` to
    ``path`` (``STATS_KEYS``: rotation sizes in scope cells, taps as fractions); returns it."""
    mean = {key: float(np.mean([row[key] for row in stats])) if stats else None
            for key in STATS_KEYS}
    payload = {**about, "layers": stats, "mean_over_layers": mean}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    return payload


def main(argv: Optional[Sequence[str]] = None) -> List:
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="dk_detectron2")
    import dk_detectron2  # noqa: F401

    from dk_detectron2.tools.loaders import load_image, load_model, preprocess_image, setup_cfg
    from dk_detectron2.tools.loaders import BackboneLevel
    from dk_detectron2.tools.rotation_stats import find_dk_layers, rotation_statistics

    cfg = setup_cfg(args.config_file, args.opts, weights=args.weights, device="cpu")
    model = load_model(cfg)
    layers = find_dk_layers(model)
    if args.list_layers:
        print("\n".join(layers))
        return []
    if not layers:
        raise ValueError(f"{args.config_file} builds no DK layer (MODEL.DK.ON_PER_STAGE/TYPE)")
    if args.stats:
        _, image, _ = load_image(args.input, cfg)
        level = next(iter(model.backbone.output_shape()))
        x = preprocess_image(model, image)
        stats = rotation_statistics(model, lambda: BackboneLevel(model, level)(x))
        for row in stats:
            print(
                f"{row['layer']:50s} |rotation| mean {row['mean_abs_rotation']:7.2f} "
                f"max {row['max_abs_rotation']:7.2f}  taps reading zero "
                f"{100 * row['taps_reading_zero']:5.1f}%  on the scope edge "
                f"{100 * row['taps_on_scope_edge']:5.1f}%"
            )
        if args.stats_json:
            command = "python -m dk_detectron2.tools.kernel_samples " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
            _write_stats_json(args.stats_json, stats, command=command, config=args.config_file,
                              weights=cfg.MODEL.WEIGHTS, input=args.input)
        return stats
    name = args.layer or layers[-1]
    if name not in layers:
        raise ValueError(f"--layer must be one of the DK layers {layers}, got {name!r}")
    module = model.get_submodule(name)

    rgb, image, _ = load_image(args.input, cfg)
    captured = []
    hook = module.register_forward_hook(
        lambda m, inputs, output: captured.append((inputs[0], output))
    )
    level = next(iter(model.backbone.output_shape()))
    with torch.no_grad():
        BackboneLevel(model, level)(preprocess_image(model, image))
    hook.remove()
    x, output = captured[0]
    height, width = rgb.shape[:2]
    if args.position == "center":
        pixel = ((height - 1) / 2.0, (width - 1) / 2.0)
    else:
        pixel = tuple(float(v) for v in args.position.split(","))
    stride = x.shape[-2] / output.shape[-2] * (image.shape[-2] / x.shape[-2])
    cell = (int(round(pixel[0] / stride)), int(round(pixel[1] / stride)))
    channels = args.channels
    if channels is None:
        norms = module.weight.detach().abs().flatten(1).sum(dim=1)
        channels = sorted(torch.argsort(norms, descending=True)[:4].tolist())
    samples = kernel_samples(module, x, cell, channels, label=name)
    draw_kernel_samples(
        samples,
        args.output,
        title=f"{os.path.basename(args.input)}: pixel ({pixel[0]:.0f}, {pixel[1]:.0f})",
    )
    logger.info("wrote %s", args.output)
    return samples


if __name__ == "__main__":
    main()
