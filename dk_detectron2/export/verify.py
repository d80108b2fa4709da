"""Comparing an exported artefact with eager PyTorch: largest differences and speed."""
import math
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["flatten_outputs", "compare_outputs", "merge_comparisons", "median_seconds"]


def flatten_outputs(outputs) -> List[torch.Tensor]:
    """The tensors of an output (a tensor, or nested tuples / lists / dicts of them), in order."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    flat: List[torch.Tensor] = []
    for item in outputs:
        flat.extend(flatten_outputs(item))
    return flat


def compare_outputs(eager, exported) -> Dict[str, float]:
    """Largest differences between two outputs of the same structure.

    Returns ``{"max_abs": largest |eager - exported| over the floating outputs, "max_rel": the
    largest of each floating output's max |difference| / max |eager| (the absolute difference
    for an all-zero output), "integers_equal": 1.0 if every integer output is equal else 0.0,
    "shapes_equal": 1.0 or 0.0, "finite_equal": 1.0 if every floating output holds its
    non-finite values (NaN, +inf, -inf) at the same places as eager's, with the same values,
    else 0.0}``.
    The differences are taken over the places where both are finite; a non-finite value on one
    side only (or another non-finite value: NaN against inf, inf against -inf) makes
    ``max_abs`` and ``max_rel`` infinite, so that no tolerance accepts it. Shapes that differ
    (e.g. a different number of detections) make the differences infinite too.
    """
    eager, exported = flatten_outputs(eager), flatten_outputs(exported)
    result = {"max_abs": 0.0, "max_rel": 0.0, "integers_equal": 1.0, "shapes_equal": 1.0,
              "finite_equal": 1.0}
    if len(eager) != len(exported):
        raise ValueError(f"eager gives {len(eager)} outputs, the export {len(exported)}")
    for reference, value in zip(eager, exported):
        value = value.to(reference.device)
        if reference.shape != value.shape:
            result = merge_comparisons(result, {"max_abs": float("inf"), "max_rel": float("inf"),
                                                "shapes_equal": 0.0})
            continue
        if not reference.is_floating_point():
            result["integers_equal"] *= float(torch.equal(reference, value.to(reference.dtype)))
            continue
        if reference.numel() == 0:
            continue
        reference, value = reference.double(), value.double()
        finite = reference.isfinite()
        # the same non-finite values (NaN, +inf, -inf) at the same places (NaN != NaN, hence
        # the comparison after nan_to_num, which maps them to 0, +max, -max)
        same_non_finite = torch.equal(finite, value.isfinite()) and torch.equal(
            reference[~finite].nan_to_num(), value[~finite].nan_to_num())
        if not same_non_finite:
            result = merge_comparisons(result, {"max_abs": float("inf"), "max_rel": float("inf"),
                                                "finite_equal": 0.0})
            continue
        if not bool(finite.any()):
            continue
        difference = float((reference[finite] - value[finite]).abs().max())
        scale = float(reference[finite].abs().max())
        result = merge_comparisons(result, {
            "max_abs": difference, "max_rel": difference / scale if scale > 0 else difference})
    return result


def merge_comparisons(worst: Dict[str, float], found: Dict[str, float]) -> Dict[str, float]:
    """The worse of two :func:`compare_outputs` results, key by key (keys of either): the larger
    difference (``max_*``; NaN counts as the worst, infinite) and the smaller flag (``*_equal``;
    0.0 = some output differs). A key that only one side has keeps that side's value."""
    merged = dict(worst)
    for key, value in found.items():
        if key not in merged:
            merged[key] = value
        elif key.endswith("equal"):
            merged[key] = min(merged[key], value)
        else:
            values = [float("inf") if math.isnan(v) else v for v in (merged[key], value)]
            merged[key] = max(values)
    return merged


def median_seconds(functions: Sequence[Callable], calls: Sequence[tuple], warmup: int = 1,
                   repeats: int = 3) -> List[float]:
    """Median wall time of one call of each function, timed in turns on the same arguments.

    Every function is called ``warmup`` times untimed on the first arguments; then, ``repeats``
    times over ``calls``, each function runs once on the arguments, one after the other, so a
    shared machine's bursts of load fall on all of them alike. Returns the median seconds per
    call of each function, in order. Runs under ``torch.no_grad``.
    """
    times: List[List[float]] = [[] for _ in functions]
    with torch.no_grad():
        for function in functions:
            for _ in range(warmup):
                function(*calls[0])
        for _ in range(repeats):
            for args in calls:
                for function, spent in zip(functions, times):
                    start = time.perf_counter()
                    function(*args)
                    spent.append(time.perf_counter() - start)
    return [float(statistics.median(spent)) for spent in times]
