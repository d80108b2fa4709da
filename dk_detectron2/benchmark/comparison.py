"""Ratios between an operation and its baseline, each at its fastest memory layout."""

from typing import Callable, Dict, Mapping

from .timing import Measurement
from .workloads import Workload

__all__ = ["PASSES", "timing_key", "workload_callables", "compare", "measurement_rows"]

PASSES = ("forward", "forward_backward")


def timing_key(op: str, layout: str, pass_name: str) -> str:
    return f"{op}/{layout}/{pass_name}"


def workload_callables(workload: Workload, passes=PASSES) -> Dict[str, Callable[[], object]]:
    """``{op/layout/pass: callable}`` for the forward and forward+backward of ``workload``."""
    makers = {"forward": workload.forward_fn, "forward_backward": workload.forward_backward_fn}
    return {timing_key(workload.name, workload.layout, p): makers[p]() for p in passes}


def compare(
    op: Mapping[str, Measurement], baseline: Mapping[str, Measurement]
) -> Dict[str, object]:
    """Compares two sets of measurements keyed by layout; each side takes its fastest layout.

    Returns ``ratio_min`` (fastest op repeat / fastest baseline repeat) and ``ratio_median``
    (same with medians), the times, and the layouts that were fastest (by median). A ratio above 1
    means the operation is slower than the baseline.
    """
    op_layout = min(op, key=lambda layout: op[layout].median_ms)
    base_layout = min(baseline, key=lambda layout: baseline[layout].median_ms)
    op_min = min(m.min_ms for m in op.values())
    base_min = min(m.min_ms for m in baseline.values())
    return {
        "op_layout": op_layout,
        "baseline_layout": base_layout,
        "op_min_ms": op_min,
        "op_median_ms": op[op_layout].median_ms,
        "baseline_min_ms": base_min,
        "baseline_median_ms": baseline[base_layout].median_ms,
        "ratio_min": op_min / base_min,
        "ratio_median": op[op_layout].median_ms / baseline[base_layout].median_ms,
    }


def measurement_rows(measurements: Mapping[str, Measurement], **common) -> list:
    """Flattens ``{op/layout/pass: Measurement}`` into JSON rows (with ``common`` fields)."""
    rows = []
    for key, measurement in measurements.items():
        op, layout, pass_name = key.split("/")
        rows.append(
            dict(common, op=op, layout=layout, **{"pass": pass_name}, **measurement.to_dict())
        )
    return rows
