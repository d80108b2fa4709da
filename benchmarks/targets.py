"""The benchmark's targets, as data, and their verdicts on one run's results.

Each target names a metric of :func:`headline_metrics` (a ratio of two sides timed in the same
rounds, a speedup, a memory fraction or a fit) with a comparison and a threshold. Ratios are judged
on their median; the range of the per-round ratios is reported beside it.
"""

from typing import Dict, List, Optional, Tuple

from .cases import full_dk_shape, headline_shape

# The targets: (name, metric, comparison, threshold, unit, informational). A metric names a
# value of :func:`headline_metrics`; ratios are judged on their median, with their range shown.
TARGETS = [
    ("CPU deform_kernel2d fwd / fastest dw conv2d", "ops/deform_kernel2d/forward",
     "<=", 2.0, "x", False),
    ("CPU deform_kernel2d fwd+bwd / fastest dw conv2d", "ops/deform_kernel2d/forward_backward",
     "<=", 3.0, "x", False),
    ("CPU deform_kernel_conv2d speedup over torchvision deform_conv2d fwd+bwd",
     "ops/deform_kernel_conv2d/forward_backward/speedup", ">=", 100.0, "x", False),
    ("CPU deform_kernel2d fwd+bwd speedup 2 threads / 1", "threads/forward_backward",
     ">=", 1.8, "x", False),
    ("CPU deform_kernel2d fwd speedup 2 threads / 1", "threads/forward", ">=", 1.8, "x", False),
    ("No per-tap column buffer: total extra memory / [B, C*K*K, Ho, Wo] (worst depthwise DK row)",
     "memory/extra_per_column_buffer", "<=", 0.5, "x", False),
    ("Extra memory / output (worst depthwise DK row)", "memory/extra_per_output",
     "<=", 1.0, "x", False),
    ("Mask R-CNN DK-R50-FPN inference / plain R50-FPN", "model/inference", "<=", 1.15, "x", False),
    ("Mask R-CNN DK-R50-FPN training step / plain", "model/training_step", "<=", 3.0, "x", True),
    ("CPU full DK (groups 1) fwd / F.conv2d", "full_dk/forward", "<=", 2.5, "x", False),
    ("CPU full DK (groups 1) fwd+bwd / F.conv2d", "full_dk/forward_backward", "<=", 3.0, "x",
     False),
    ("CPU deform_kernel2d fwd+bwd time linear in H*W (R^2)", "scaling/r2", ">=", 0.98, "R^2", True),
] + [
    (f"CUDA {dtype} deform_kernel2d fwd / cuDNN dw conv2d", f"cuda/{dtype}", "<=", 1.3, "x", False)
    for dtype in ("float32", "float16", "bfloat16")
] + [
    (f"CUDA {dtype} deform_kernel2d fwd DRAM bandwidth / peak", f"cuda_bandwidth/{dtype}",
     ">=", 0.7, "fraction", False)
    for dtype in ("float32", "float16", "bfloat16")
]

Value = Tuple[float, Optional[float], Optional[float]]  # (median or value, min, max)


def _ratio_of(row, invert=False) -> Optional[Value]:
    if row is None or "skipped" in row:
        return None
    values = (row["ratio_median"], row["ratio_min"], row["ratio_max"])
    return tuple(1 / v for v in (values[0], values[2], values[1])) if invert else values


def headline_metrics(results: dict, quick: bool) -> Dict[str, Value]:
    """The values the targets name, from one run's results (absent when not measured)."""
    metrics = {}
    headline, full = headline_shape(quick).label(), full_dk_shape(quick).label()
    for row in results.get("ops", {}).get("comparisons", ()):
        if row["shape"]["label"] == headline:
            key = f"ops/{row['op']}/{row['pass']}"
            metrics[key] = _ratio_of(row)
            metrics[key + "/speedup"] = _ratio_of(row, invert=True)
    for row in results.get("full_dk", {}).get("comparisons", ()):
        if row["shape"]["label"] == full:
            metrics[f"full_dk/{row['pass']}"] = _ratio_of(row)
    for row in results.get("scaling", {}).get("threads", {}).get("speedups", ()):
        if row["op"] == "deform_kernel2d" and row["threads"] == 2:
            metrics[f"threads/{row['pass']}"] = (
                row["speedup_median"], row["speedup_min"], row["speedup_max"])
    for fit in results.get("scaling", {}).get("hw", {}).get("fits", ()):
        if fit["op"] == "deform_kernel2d" and fit["pass"] == "forward_backward":
            metrics["scaling/r2"] = (fit["r2"], None, None)
    memory = results.get("memory", {})
    for name in ("extra_per_column_buffer", "extra_per_output"):
        if memory.get(f"worst_{name}") is not None:
            metrics[f"memory/{name}"] = (memory[f"worst_{name}"], None, None)
    for row in results.get("model", {}).get("comparisons", ()):
        metrics[f"model/{row['task']}"] = _ratio_of(row)
    cuda = results.get("cuda", {})
    for row in cuda.get("comparisons", ()):
        if (row["shape"]["label"], row["op"], row["pass"]) == (headline, "deform_kernel2d",
                                                              "forward"):
            metrics[f"cuda/{row['dtype']}"] = _ratio_of(row)
    for row in cuda.get("timings", ()):
        if (row.get("op") == "deform_kernel2d" and row["pass"] == "forward"
                and row["shape"]["label"] == headline
                and row.get("bandwidth_fraction") is not None):
            key = f"cuda_bandwidth/{row['dtype']}"
            best = max(metrics.get(key, (0.0,))[0], row["bandwidth_fraction"])
            metrics[key] = (best, None, None)
    return {k: v for k, v in metrics.items() if v is not None}


def _format(value: float, unit: str) -> str:
    if unit == "fraction":
        return f"{100 * value:.0f}%"
    if unit == "R^2":
        return f"{value:.4f}"
    return f"{value:.2f}x"


def evaluate_targets(results: dict, quick: bool = False) -> List[dict]:
    """One row per target: name, measured (median and range, number and text), target, status."""
    metrics = headline_metrics(results, quick)
    rows = []
    for name, metric, comparison, threshold, unit, informational in TARGETS:
        value = metrics.get(metric)
        row = {"name": name, "metric": metric, "target": f"{comparison} {_format(threshold, unit)}",
               "threshold": threshold, "comparison": comparison, "informational": informational,
               "measured": None if value is None else value[0], "status": "n/a",
               "measured_text": "not run"}
        if value is not None:
            median, low, high = value
            row["measured_range"] = None if low is None else [low, high]
            row["measured_text"] = _format(median, unit) + (
                "" if low is None else f" ({_format(low, unit)}-{_format(high, unit)})")
            passed = median <= threshold if comparison == "<=" else median >= threshold
            row["status"] = "PASS" if passed else "MISS"
        rows.append(row)
    return rows
