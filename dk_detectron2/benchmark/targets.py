"""The issue's headline targets, evaluated on one run's results: PASS, MISS or n/a.

Every target is a ratio taken in the same run. ``statistic`` ("min" by default, ``--judge``)
chooses which ratio decides: the fastest repeat of each side (robust on a shared machine, where
load only ever adds time) or the medians. Both are always in the JSON.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

from .shapes import full_dk_shape, headline_shape

__all__ = ["Target", "TARGETS", "evaluate_targets"]


@dataclass(frozen=True)
class Target:
    """``measure(results, statistic, quick)`` returns the measured value, or None (not run)."""

    name: str
    measure: Callable[[dict, str, bool], Optional[float]]
    comparison: str  # "<=" or ">="
    threshold: float
    unit: str = "x"
    informational: bool = False

    def passes(self, value: float) -> bool:
        return value <= self.threshold if self.comparison == "<=" else value >= self.threshold


def _comparison(rows, label, op, pass_name, **match):
    for row in rows or ():
        if (
            row.get("shape", {}).get("label") == label
            and row["op"] == op
            and row["pass"] == pass_name
            and "skipped" not in row
            and all(row.get(k) == v for k, v in match.items())
        ):
            return row
    return None


def _op_ratio(op, pass_name, invert=False):
    def measure(results, statistic, quick):
        rows = results.get("ops", {}).get("comparisons")
        row = _comparison(rows, headline_shape(quick).label(), op, pass_name)
        if row is None:
            return None
        ratio = row[f"ratio_{statistic}"]
        return 1.0 / ratio if invert else ratio

    return measure


def _full_dk_ratio(pass_name):
    def measure(results, statistic, quick):
        section = results.get("full_dk", {})
        row = _comparison(
            section.get("comparisons"), full_dk_shape(quick).label(), "deform_kernel2d", pass_name
        )
        return None if row is None else row[f"ratio_{statistic}"]

    return measure


def _thread_speedup(pass_name, threads=2):
    def measure(results, statistic, quick):
        section = results.get("scaling", {}).get("threads", {})
        for row in section.get("speedups", ()):
            if (
                row["op"] == "deform_kernel2d"
                and row["pass"] == pass_name
                and row["threads"] == threads
            ):
                return row[f"speedup_{statistic}"]
        return None

    return measure


def _model_ratio(task):
    def measure(results, statistic, quick):
        for row in results.get("model", {}).get("comparisons", ()):
            if row["task"] == task:
                return row[f"ratio_{statistic}"]
        return None

    return measure


def _memory_flag(flag):
    def measure(results, statistic, quick):
        value = results.get("memory", {}).get(flag)
        return None if value is None else float(value)

    return measure


def _hw_linearity(results, statistic, quick):
    for fit in results.get("scaling", {}).get("hw", {}).get("fits", ()):
        if fit["op"] == "deform_kernel2d" and fit["pass"] == "forward_backward":
            return fit["r2"]
    return None


def _cuda_ratio(dtype, pass_name="forward"):
    def measure(results, statistic, quick):
        rows = results.get("cuda", {}).get("comparisons")
        row = _comparison(
            rows, headline_shape(quick).label(), "deform_kernel2d", pass_name, dtype=dtype
        )
        return None if row is None else row[f"ratio_{statistic}"]

    return measure


def _cuda_bandwidth(dtype):
    def measure(results, statistic, quick):
        label = headline_shape(quick).label()
        fractions = [
            row["bandwidth_fraction"]
            for row in results.get("cuda", {}).get("timings", ())
            if row.get("op") == "deform_kernel2d"
            and row["pass"] == "forward"
            and row["dtype"] == dtype
            and row["shape"]["label"] == label
            and row.get("bandwidth_fraction") is not None
        ]
        return max(fractions) if fractions else None

    return measure


TARGETS: List[Target] = (
    [
        Target(
            "CPU deform_kernel2d fwd / fastest dw conv2d",
            _op_ratio("deform_kernel2d", "forward"),
            "<=",
            2.0,
        ),
        Target(
            "CPU deform_kernel2d fwd+bwd / fastest dw conv2d",
            _op_ratio("deform_kernel2d", "forward_backward"),
            "<=",
            3.0,
        ),
        Target(
            "CPU deform_kernel_conv2d speedup over torchvision deform_conv2d fwd+bwd",
            _op_ratio("deform_kernel_conv2d", "forward_backward", invert=True),
            ">=",
            100.0,
        ),
        Target(
            "CPU deform_kernel2d fwd+bwd speedup 2 threads / 1",
            _thread_speedup("forward_backward"),
            ">=",
            1.8,
        ),
        Target(
            "CPU deform_kernel2d fwd speedup 2 threads / 1", _thread_speedup("forward"), ">=", 1.8
        ),
        Target(
            "No per-tap column buffer [B, C*K*K, Ho, Wo] (all depthwise DK rows)",
            _memory_flag("column_buffer_free"),
            ">=",
            1.0,
            unit="bool",
        ),
        Target(
            "Extra memory within the output's size (all depthwise DK rows)",
            _memory_flag("extra_within_output"),
            ">=",
            1.0,
            unit="bool",
        ),
        Target(
            "Mask R-CNN DK-R50-FPN inference / plain R50-FPN", _model_ratio("inference"), "<=", 1.15
        ),
        Target(
            "Mask R-CNN DK-R50-FPN training step / plain",
            _model_ratio("training_step"),
            "<=",
            3.0,
            informational=True,
        ),
        Target("CPU full DK (groups 1) fwd / F.conv2d", _full_dk_ratio("forward"), "<=", 2.5),
        Target(
            "CPU full DK (groups 1) fwd+bwd / F.conv2d",
            _full_dk_ratio("forward_backward"),
            "<=",
            3.0,
        ),
        Target(
            "CPU deform_kernel2d fwd+bwd time linear in H*W (R^2)",
            _hw_linearity,
            ">=",
            0.98,
            unit="R^2",
            informational=True,
        ),
    ]
    + [
        Target(f"CUDA {dtype} deform_kernel2d fwd / cuDNN dw conv2d", _cuda_ratio(dtype), "<=", 1.3)
        for dtype in ("float32", "float16", "bfloat16")
    ]
    + [
        Target(
            f"CUDA {dtype} deform_kernel2d fwd DRAM bandwidth / peak",
            _cuda_bandwidth(dtype),
            ">=",
            0.7,
            unit="fraction",
        )
        for dtype in ("float32", "float16", "bfloat16")
    ]
)


def _format(value: float, unit: str) -> str:
    if unit == "bool":
        return "yes" if value >= 1.0 else "no"
    if unit == "fraction":
        return f"{100 * value:.0f}%"
    if unit == "R^2":
        return f"{value:.4f}"
    return f"{value:.2f}x"


def evaluate_targets(results: dict, statistic: str = "min", quick: bool = False) -> List[dict]:
    """One row per target: name, measured (number and text), target text, status."""
    rows = []
    for target in TARGETS:
        value = target.measure(results, statistic, quick)
        threshold = _format(target.threshold, target.unit) if target.unit != "bool" else "yes"
        row = {
            "name": target.name,
            "target": f"{target.comparison} {threshold}" if target.unit != "bool" else "yes",
            "measured": value,
            "measured_text": "not run" if value is None else _format(value, target.unit),
            "statistic": statistic,
            "informational": target.informational,
        }
        if value is None:
            row["status"] = "n/a"
        else:
            row["status"] = "PASS" if target.passes(value) else "MISS"
        rows.append(row)
    return rows
