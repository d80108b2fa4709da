"""Initialising a Deformable Kernel scope from an ordinary convolution kernel.

A DK layer with kernel size K and scope size S reads tap ``k`` of its kernel bilinearly from the
scope at ``k + r + (S - K) / 2``. With zero rotation ``r`` this read is a fixed linear map per axis,
``B [K, S]`` (:func:`scope_sampling_matrix`), so the sampled kernel of a scope ``Y [S_h, S_w]`` is
``B_h @ Y @ B_w^T``. :func:`kernel_to_scope` inverts it: the returned scope reproduces the given
kernel exactly, so a DK layer initialised from a convolution's weight computes that convolution
until its rotation moves away from zero.

- ``S - K`` even: the samples fall on scope cells; the kernel is placed at the scope's centre and
  the other cells are zero.
- ``S - K`` odd: the samples fall half-way between cells; many scopes reproduce the kernel and the
  one of minimum Frobenius norm is returned, ``pinv(B_h) @ kernel @ pinv(B_w)^T`` (the
  pseudo-inverse of a Kronecker product is the Kronecker product of the pseudo-inverses).

Since ``B`` has full row rank ``K`` whenever ``S >= K``, ``B @ pinv(B) = I`` and the reproduction
is exact up to rounding; the computation runs in float64 and :func:`reproduction_error` reports
what is left after casting back.
"""
import math
from typing import Sequence, Union

import torch

from ..layers.geometry import pair, scope_base

__all__ = ["scope_sampling_matrix", "kernel_to_scope", "sample_scope", "reproduction_error"]

SizePair = Union[int, Sequence[int]]


def scope_sampling_matrix(
    kernel_size: int, scope_size: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The zero-rotation bilinear read of one axis.

    Args:
        kernel_size: K, the number of taps.
        scope_size: S >= K, the number of scope cells.

    Returns:
        B [K, S] with ``B[k, s]`` the bilinear weight of cell ``s`` in the read of tap ``k`` at
        ``k + (S - K) / 2`` (the operators' bilinear rule; with ``S >= K`` every sample lies
        inside the scope). Row k sums to 1; ``B`` has full row rank K.
    """
    if scope_size < kernel_size:
        raise ValueError(
            f"scope_size ({scope_size}) must be at least kernel_size ({kernel_size})"
        )
    matrix = torch.zeros(kernel_size, scope_size, dtype=dtype)
    for tap in range(kernel_size):
        position = tap + scope_base(kernel_size, scope_size)
        low = math.floor(position)
        fraction = position - low
        matrix[tap, low] += 1.0 - fraction
        if fraction > 0:
            matrix[tap, low + 1] += fraction
    return matrix


def _right_pseudo_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """pinv of a full-row-rank [K, S] matrix, ``B^T (B B^T)^{-1}`` (exact for a selection)."""
    gram = matrix @ matrix.t()
    return torch.linalg.solve(gram, matrix).t()


def kernel_to_scope(weight: torch.Tensor, scope_size: SizePair) -> torch.Tensor:
    """Converts convolution kernels into DK scopes that reproduce them at zero rotation.

    Args:
        weight: [C_out, C_in/groups, Kh, Kw] (any leading dims), a floating-point kernel.
        scope_size: S = (Sh, Sw), or an int for a square scope; S >= K on each axis.

    Returns:
        [..., Sh, Sw], same dtype and device as ``weight``, such that
        ``sample_scope(scope, (Kh, Kw)) == weight`` (up to rounding in ``weight``'s dtype): the
        kernel at the scope's centre when ``S - K`` is even, the minimum-norm solution when odd.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor [..., Kh, Kw], got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(f"weight must be [..., Kh, Kw], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    scope_h, scope_w = pair("scope_size", scope_size, 1)
    kernel_h, kernel_w = weight.shape[-2:]
    if scope_h < kernel_h or scope_w < kernel_w:
        raise ValueError(
            f"scope_size {scope_h}x{scope_w} must be at least the kernel size "
            f"{kernel_h}x{kernel_w} (weight of shape {tuple(weight.shape)})"
        )
    inverse_h = _right_pseudo_inverse(scope_sampling_matrix(kernel_h, scope_h))  # [Sh, Kh]
    inverse_w = _right_pseudo_inverse(scope_sampling_matrix(kernel_w, scope_w))  # [Sw, Kw]
    kernel = weight.detach().to(device="cpu", dtype=torch.float64)
    scope = inverse_h @ kernel @ inverse_w.t()
    return scope.to(device=weight.device, dtype=weight.dtype)


def sample_scope(scope: torch.Tensor, kernel_size: SizePair) -> torch.Tensor:
    """The kernel a DK layer reads from ``scope`` [..., Sh, Sw] at zero rotation: [..., Kh, Kw].

    Computed in float64 with the separable sampling matrices; the result has ``scope``'s dtype.
    """
    kernel_h, kernel_w = pair("kernel_size", kernel_size, 1)
    scope_h, scope_w = scope.shape[-2:]
    sampling_h = scope_sampling_matrix(kernel_h, scope_h)
    sampling_w = scope_sampling_matrix(kernel_w, scope_w)
    kernel = sampling_h @ scope.detach().to(device="cpu", dtype=torch.float64) @ sampling_w.t()
    return kernel.to(device=scope.device, dtype=scope.dtype)


def reproduction_error(kernel: torch.Tensor, scope: torch.Tensor) -> float:
    """Max absolute difference between ``kernel`` [..., Kh, Kw] and the zero-rotation samples of
    ``scope`` [..., Sh, Sw], measured in float64 on the tensors as stored."""
    samples = sample_scope(scope.to(torch.float64), tuple(kernel.shape[-2:]))
    if samples.numel() == 0:
        return 0.0
    return float((samples - kernel.detach().cpu().to(torch.float64)).abs().max())
