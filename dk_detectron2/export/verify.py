"""Comparing an exported artefact with eager PyTorch: largest differences and speed."""
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["flatten_outputs", "compare_outputs", "median_seconds"]


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
    "shapes_equal": 1.0 or 0.0}``.
    Shapes that differ (e.g. a different number of detections) make the differences infinite.
    """
    eager, exported = flatten_outputs(eager), flatten_outputs(exported)
    result = {"max_abs": 0.0, "max_rel": 0.0, "integers_equal": 1.0, "shapes_equal": 1.0}
    if len(eager) != len(exported):
        raise ValueError(f"eager gives {len(eager)} outputs, the export {len(exported)}")
    for reference, value in zip(eager, exported):
        value = value.to(reference.device)
        if reference.shape != value.shape:
            result.update(max_abs=float("inf"), max_rel=float("inf"), shapes_equal=0.0)
            continue
        if not reference.is_floating_point():
            result["integers_equal"] *= float(torch.equal(reference, value.to(reference.dtype)))
            continue
        if reference.numel() == 0:
            continue
        difference = float((reference.double() - value.double()).abs().max())
        scale = float(reference.double().abs().max())
        result["max_abs"] = max(result["max_abs"], difference)
        result["max_rel"] = max(result["max_rel"], difference / scale if scale > 0 else difference)
    return result


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
