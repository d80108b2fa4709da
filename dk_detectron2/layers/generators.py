"""Generators: the small convolutions that predict where a DK layer samples.

A generator maps the layer's input [B, C_in, H, W] to ``out_channels`` coordinates per output
position [B, out_channels, Ho, Wo] with the layer's own kernel size, stride, padding and dilation
(so Ho, Wo match the layer's output). Every generator starts with a zero output, so a fresh DK
layer is its rigid convolution. Kinds (``MODEL.DK.GENERATOR``):

- ``"full"``: one K x K convolution from all C_in channels (C_in * K * K * out_channels weights);
- ``"separable"``: a depthwise K x K convolution followed by a 1 x 1 convolution
  (C_in * K * K + C_in * out_channels weights, about 1/6 of ``"full"`` for a 3 x 3 kernel with
  18 outputs); only the 1 x 1 starts at zero, so the depthwise part gets gradient from the start.
"""
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GENERATOR_KINDS", "build_generator", "global_average_pool", "zero_init_"]

Pair = Tuple[int, int]


def zero_init_(module: nn.Module) -> nn.Module:
    """Zeroes a generator's weight and bias in place (a fresh module is then rigid); returns it."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]: the mean over H and W, what per-sample generators (global DK's
    rotations, CondConv's routing) read. Written as ``adaptive_avg_pool2d``, which fvcore's
    ``FlopCountAnalysis`` counts (it has no handle for ``aten::mean`` and would warn)."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _full(in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair, padding: Pair,
          dilation: Pair) -> nn.Module:
    return zero_init_(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=True)
    )


def _separable(in_channels: int, out_channels: int, kernel_size: Pair, stride: Pair,
               padding: Pair, dilation: Pair) -> nn.Module:
    depthwise = nn.Conv2d(
        in_channels, in_channels, kernel_size, stride, padding, dilation, groups=in_channels,
        bias=False,
    )
    return nn.Sequential(depthwise, zero_init_(nn.Conv2d(in_channels, out_channels, 1, bias=True)))


_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"full": _full, "separable": _separable}
GENERATOR_KINDS = tuple(_BUILDERS)


def build_generator(kind: str, in_channels: int, out_channels: int, kernel_size: Pair,
                    stride: Pair, padding: Pair, dilation: Pair) -> nn.Module:
    """A zero-output generator of ``kind`` (one of :data:`GENERATOR_KINDS`) with the layer's
    geometry: [B, in_channels, H, W] -> [B, out_channels, Ho, Wo]."""
    if kind not in _BUILDERS:
        raise ValueError(f"generator must be one of {GENERATOR_KINDS}, got {kind!r}")
    return _BUILDERS[kind](in_channels, out_channels, kernel_size, stride, padding, dilation)
