"""Convolution geometry and argument checks shared by the operators, modules and tools.

- :func:`is_int`, :func:`check_int`, :func:`pair`: the one check of an int argument (a bool is not
  one) and of an int-or-pair argument, with messages naming the argument.
- :func:`pair_list`: an int-or-pair argument as the ``[v0, v1]`` list the operators take, in a
  form TorchScript compiles (the scripted operator wrappers use it; the operators check it).
- :func:`output_size`: a convolution's output size along one axis.
- :func:`scope_base`, :func:`base_grid`: where the taps of a K-tap kernel read an S-cell scope at
  zero rotation: tap ``k`` at ``k + (S - K) / 2`` along each axis (the rule of ``csrc/bilinear.h``
  and of :mod:`dk_detectron2.layers.reference`); :func:`zero_rotation_cells`: the scope cells
  those taps read.
"""
import math
from typing import List, Optional, Tuple, Union

import torch

__all__ = [
    "IntPair", "is_int", "check_int", "check_divisor", "pair", "pair_list", "output_size",
    "scope_base", "base_grid", "zero_rotation_cells",
]

# An int, or a pair of ints as a tuple (torch.Size included) or a list: what :func:`pair` takes.
# Spelt with TorchScript's types so that scripted code can pass a module's (int, int) attributes.
IntPair = Union[int, Tuple[int, int], List[int]]


def is_int(value) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """Returns ``value`` if it is an int (not a bool) >= ``minimum``.

    Raises (naming ``name``, the expectation and ``value``, as the operators do):
        TypeError: not an int (a bool, a float, a string, ...).
        ValueError: an int below ``minimum``.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_divisor(name: str, divisor, of_name: str, of: int) -> int:
    """Returns ``divisor`` if it is an int >= 1 (:func:`check_int`) that divides ``of``; the
    error names both: ``"out_channels (6) must be divisible by rotation_groups (4)"``."""
    check_int(name, divisor)
    if of % divisor:
        raise ValueError(f"{of_name} ({of}) must be divisible by {name} ({divisor})")
    return divisor


def pair(name: str, value: IntPair, minimum: int = 0) -> Tuple[int, int]:
    """``(v, v)`` for an int, ``(v0, v1)`` for a pair of ints (tuple, list or torch.Size).

    Raises:
        TypeError: anything else (a bool, a float, a triple), naming ``name``.
        ValueError: a value below ``minimum`` ("positive" for 1, "non-negative" for 0).
    """
    received = value  # errors name what the caller passed, not its expansion
    if is_int(value):
        value = (value, value)
    if (not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2
            or not all(is_int(v) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {received!r}")
    if min(value) < minimum:
        bound = {1: "positive", 0: "non-negative"}.get(minimum, f">= {minimum}")
        raise ValueError(f"{name} must be {bound}, got {received!r}")
    return int(value[0]), int(value[1])


def pair_list(value: IntPair) -> List[int]:
    """``[v, v]`` for an int, ``[v0, v1]`` for a pair: TorchScript's form of :func:`pair`, without
    its checks (scripted code hands the list to an operator, which checks it)."""
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, tuple):
        return [value[0], value[1]]
    return list(value)


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """A convolution's output size along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def scope_base(kernel: int, scope: int) -> float:
    """``(S - K) / 2``: tap k of a K-tap axis reads scope coordinate ``k + scope_base(K, S)`` at
    zero rotation (the kernel centred in the scope; on cells when S - K is even)."""
    return (scope - kernel) / 2.0


def base_grid(kernel_size: Tuple[int, int], scope_size: Tuple[int, int],
              dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """[Kh*Kw, 2] (y, x) scope coordinates of the taps at zero rotation, tap-major (kh, kw)."""
    (kh, kw), (sh, sw) = kernel_size, scope_size
    ys = torch.arange(kh, dtype=dtype, device=device) + scope_base(kh, sh)
    xs = torch.arange(kw, dtype=dtype, device=device) + scope_base(kw, sw)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def zero_rotation_cells(kernel_size: Tuple[int, int], scope_size: Tuple[int, int]) -> torch.Tensor:
    """[Sh, Sw] bool: the scope cells a K x K kernel reads with a non-zero bilinear weight at zero
    rotation (for K = 3 in S = 5 the centre 3 x 3; with S - K odd the taps sit between cells and,
    for S = K + 1, read every cell)."""
    mask = torch.zeros(tuple(scope_size), dtype=torch.bool)
    for y, x in base_grid(kernel_size, scope_size, torch.float64).tolist():
        for cy in {math.floor(y), math.ceil(y)}:
            for cx in {math.floor(x), math.ceil(x)}:
                mask[cy, cx] = True
    return mask
