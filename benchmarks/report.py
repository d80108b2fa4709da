"""The report of a run: the targets and their verdicts, and the tables on the terminal, as
Markdown (``results.md``) and as JSON (``results.json``; the figure is :mod:`benchmarks.plot`).

Targets are data (:data:`TARGETS`): each names a metric of :func:`headline_metrics` (a ratio of two
sides timed in the same rounds, a speedup, a memory fraction or a fit) with a comparison and a
threshold. Ratios are judged on their median; the range of the per-round ratios is reported beside
it. :func:`build_tables` turns the results into ``(title, headers, rows)`` tables; the terminal and
the Markdown file render the same tables (``tabulate`` "simple" and "github" formats). Ratios print
as ``median (min-max)``: the median of the per-round ratios over the rounds both sides ran, and the
range of those ratios.
"""

import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from tabulate import tabulate

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


def threshold(metric: str) -> float:
    """The threshold of the target that reads ``metric`` (the figure draws it)."""
    return next(t[3] for t in TARGETS if t[1] == metric)


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


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
Table = Tuple[str, List[str], List[list]]
_MB = 1024.0**2


def _ratio(row, invert=False, digits=2) -> str:
    """``median (min-max)`` of a comparison row's ratio (its inverse, a speedup, with invert)."""
    if row is None:
        return "-"
    if "skipped" in row:
        return "skipped"
    median, low, high = _ratio_of(row, invert)
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def _ms(row, side) -> str:
    if row is None or "skipped" in row:
        return "-"
    return f"{row[f'{side}_median_ms']:.3f} ({row[f'{side}_layout'][:2]})"


def _ops_table(results) -> List[Table]:
    section = results.get("ops")
    if not section:
        return []
    index = {(r["shape"]["label"], r["op"], r["pass"]): r for r in section["comparisons"]}
    rows = []
    for label in dict.fromkeys(r["shape"]["label"] for r in section["comparisons"]):
        fwd, both, dcn, gfwd, gboth = (index.get((label, op, p)) for op, p in (
            ("deform_kernel2d", "forward"), ("deform_kernel2d", "forward_backward"),
            ("deform_kernel_conv2d", "forward_backward"), ("global_deform_kernel2d", "forward"),
            ("global_deform_kernel2d", "forward_backward")))
        rows.append([label, _ms(fwd, "op"), _ms(fwd, "baseline"), _ratio(fwd), _ms(both, "op"),
                     _ms(both, "baseline"), _ratio(both), _ms(dcn, "op"), _ms(dcn, "baseline"),
                     _ratio(dcn, invert=True, digits=0), _ratio(gfwd), _ratio(gboth)])
    headers = ["shape (K3)", "DK fwd ms", "dw conv fwd ms", "DK/dw fwd", "DK f+b ms",
               "dw conv f+b ms", "DK/dw f+b", "DK+DCN f+b ms", "torchvision f+b ms",
               "DK+DCN speedup f+b", "global DK/dw fwd", "global DK/dw f+b"]
    title = ("Op level, CPU float32 (medians in ms, layout nc=NCHW ch=channels-last; ratios median "
             "(min-max over the shared rounds); speedup = torchvision / DK+DCN)")
    return [(title, headers, rows)]


def _full_dk_table(results) -> List[Table]:
    section = results.get("full_dk")
    if not section:
        return []
    title = f"Full DK (groups 1) vs F.conv2d, CPU float32, {section['shape']['label']}"
    rows = [[r["pass"], _ms(r, "op"), _ms(r, "baseline"), _ratio(r)]
            for r in section["comparisons"]]
    return [(title, ["pass", "full DK ms", "F.conv2d ms", "ratio median (min-max)"], rows)]


def _memory_tables(results) -> List[Table]:
    section = results.get("memory")
    if not section:
        return []
    summary = defaultdict(list)
    for row in section["rows"]:
        if "extra_bytes" in row:
            summary[(row["op"], row["layout"], row["pass"])].append(row)
    rows = []
    for (op, layout, pass_name), group in summary.items():
        worst = max(group, key=lambda r: r["extra_per_output"])
        checked = [r["extra_per_column_buffer"] for r in group if "extra_per_column_buffer" in r]
        rows.append([
            op, layout, pass_name, len(group),
            f"{worst['extra_per_output']:.2f} ({worst['shape']['label']})",
            f"{max(checked):.2f}" if checked else "-",
            f"{max(r['extra_bytes'] for r in group) / _MB:.1f}",
            f"{max(r['largest_allocation_bytes'] for r in group) / _MB:.1f}",
        ])
    title = ("Peak extra memory beyond output and gradients (CPU, 1 thread, torch.profiler), "
             "worst shape per row")
    headers = ["op", "layout", "pass", "shapes", "max extra / output",
               "max extra / column buffer", "max extra MB", "largest alloc MB"]
    return [(title, headers, rows)]


def _scaling_tables(results) -> List[Table]:
    section = results.get("scaling")
    if not section:
        return []
    hw, threads = section["hw"], section["threads"]
    rows = [[fit["op"], fit["pass"], f"{fit['r2']:.4f}",
             " ".join(f"{t:.3f}" for t in fit["median_ms"]),
             " ".join(f"{t:.2f}" for t in fit["ns_per_output_element"])] for fit in hw["fits"]]
    sizes = " ".join(str(int(v**0.5)) for v in hw["fits"][0]["hw"]) if hw["fits"] else ""
    tables = [(f"Scaling with H*W ({hw['shape']['label']} at sizes {sizes}; fastest layout)",
               ["op", "pass", "R^2 of t = a + b*H*W", "median ms per size",
                "ns per output element"], rows)]
    rows = [[r["op"], r["pass"], r["threads"],
             f"{r['speedup_median']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"]
            for r in threads["speedups"] if r["threads"] != 1]
    tables.append((f"Thread scaling ({threads['shape']['label']}, channels-last): "
                   "t(1 thread) / t(n threads)",
                   ["op", "pass", "threads", "speedup median (min-max)"], rows))
    return tables


def _model_table(results) -> List[Table]:
    section = results.get("model")
    if not section:
        return []
    title = f"Mask R-CNN R50-FPN, CPU, one {section['image_size']}x{section['image_size']} image"
    title += f" (DK: {section['dk_type']} S{section['scope_size']}, plain: {section['plain_type']})"
    rows = [[r["task"], f"{r['dk_median_ms']:.0f}", f"{r['plain_median_ms']:.0f}",
             _ratio(r, digits=3)] for r in section["comparisons"]]
    return [(title, ["task", "DK median ms", "plain median ms", "DK/plain median (min-max)"], rows)]


def _cuda_tables(results) -> List[Table]:
    section = results.get("cuda")
    if not section:
        return []
    if section.get("status") != "measured":
        reason = section.get("reason", "")
        return [("CUDA", ["status", "reason"], [[section.get("status"), reason]])]
    bandwidth = {}
    for row in section["timings"]:
        if row.get("bandwidth_fraction") is not None:
            key = (row["shape"]["label"], row["op"], row["pass"], row["dtype"])
            bandwidth[key] = max(bandwidth.get(key, 0.0), row["bandwidth_fraction"])
    rows = []
    for r in section["comparisons"]:
        fraction = bandwidth.get((r["shape"]["label"], r["op"], r["pass"], r["dtype"]), 0)
        rows.append([r["dtype"], r["shape"]["label"], r["op"], r["pass"], _ms(r, "op"),
                     _ms(r, "baseline"), _ratio(r), f"{100 * fraction:.0f}%"])
    peak = section.get("peak_bandwidth_bytes_per_s")
    title = f"CUDA {section['device_name']}"
    if peak:
        title += f" (peak DRAM {peak / 1e12:.2f} TB/s, {section['peak_bandwidth_source']})"
    headers = ["dtype", "shape", "op", "pass", "op ms", "baseline ms", "ratio median (min-max)",
               "DRAM BW / peak"]
    tables = [(title, headers, rows)]
    if section.get("errors"):
        tables.append(("CUDA baselines that could not run", ["error"],
                       [[error[:160]] for error in section["errors"]]))
    if section.get("full_dk"):
        rows = [[r["dtype"], r["pass"], _ms(r, "op"), _ms(r, "baseline"), _ratio(r)]
                for r in section["full_dk"]]
        tables.append(("CUDA full DK (groups 1) vs cuDNN conv2d",
                       ["dtype", "pass", "full DK ms", "conv2d ms", "ratio median (min-max)"],
                       rows))
    return tables


def _targets_table(results) -> List[Table]:
    rows = [[t["name"], t["target"], t["measured_text"],
             t["status"] + (" (info)" if t["informational"] else "")]
            for t in results.get("targets", ())]
    return [("Targets (judged on the median; range = per-round min-max)",
             ["target", "wanted", "measured", "status"], rows)]


def build_tables(results) -> List[Table]:
    builders = (_ops_table, _full_dk_table, _memory_tables, _scaling_tables, _model_table,
                _cuda_tables, _targets_table)
    return [table for builder in builders for table in builder(results)]


def _machine_lines(results) -> List[str]:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu_model']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical "
        f"cores, {m['usable_cores']} usable, torch {m['torch']} ({m['torch_cpu_capability']}), "
        f"torchvision {m['torchvision']}, threads {m['torch_threads']}",
        f"date {m['date_utc']} UTC, git {m['git_commit']}, load average at start "
        f"{' '.join(f'{v:.2f}' for v in m['load_average_at_start'])}",
        f"DK ops: {m['dk_ops']}",
    ]
    if m.get("cuda_device"):
        lines.append(f"CUDA: {m['cuda_device']} (CUDA {m['cuda_version']}, "
                     f"cuDNN {m['cudnn_version']})")
    lines.append("command: " + results.get("config", {}).get("command", ""))
    if results.get("recomputed"):
        lines.append(results["recomputed"])
    return lines


def render_terminal(results) -> str:
    parts = ["\n".join(_machine_lines(results))]
    for title, headers, rows in build_tables(results):
        parts.append(f"\n== {title}\n" + tabulate(rows, headers=headers, tablefmt="simple"))
    return "\n".join(parts)


def write_markdown(results, path: str, png_name: str = "results.png") -> None:
    lines = ["# Deformable Kernel benchmark results", ""]
    lines += [f"- {line}" for line in _machine_lines(results)]
    lines += ["", f"![ratio per shape]({png_name})", ""]
    for title, headers, rows in build_tables(results):
        lines += [f"## {title}", "", tabulate(rows, headers=headers, tablefmt="github"), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_json(results, path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False, allow_nan=True)
