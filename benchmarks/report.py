"""The report of a run: its tables on the terminal, as Markdown (``results.md``) and JSON (the
targets and their verdicts are in ``targets.py``).

:func:`build_tables` turns the results dict into ``(title, headers, rows)`` tables; the terminal
and the Markdown file render the same tables (``tabulate`` "simple" and "github" formats).
Ratios print as ``median (min-max)``: the ratio of the two sides' medians over the rounds both
ran, and the range of the per-round ratios.
"""

import json
import os
from collections import defaultdict
from typing import List, Tuple

from tabulate import tabulate

Table = Tuple[str, List[str], List[list]]
_MB = 1024.0**2

def _ratio(row) -> str:
    if row is None:
        return "-"
    if "skipped" in row:
        return "skipped"
    return f"{row['ratio_median']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"


def _speedup(row) -> str:
    if row is None:
        return "-"
    if "skipped" in row:
        return "skipped"
    return f"{1 / row['ratio_median']:.0f} ({1 / row['ratio_max']:.0f}-{1 / row['ratio_min']:.0f})"


def _ms(row, side) -> str:
    if row is None or "skipped" in row:
        return "-"
    return f"{row[f'{side}_median_ms']:.3f} ({row[f'{side}_layout'][:2]})"


def _index(comparisons):
    return {(r["shape"]["label"], r["op"], r["pass"]): r for r in comparisons or ()}


def _ops_table(results) -> List[Table]:
    section = results.get("ops")
    if not section:
        return []
    index = _index(section["comparisons"])
    labels = list(dict.fromkeys(r["shape"]["label"] for r in section["comparisons"]))
    rows = []
    for label in labels:
        fwd = index.get((label, "deform_kernel2d", "forward"))
        both = index.get((label, "deform_kernel2d", "forward_backward"))
        rows.append(
            [
                label,
                _ms(fwd, "op"),
                _ms(fwd, "baseline"),
                _ratio(fwd),
                _ms(both, "op"),
                _ms(both, "baseline"),
                _ratio(both),
                _ms(index.get((label, "deform_kernel_conv2d", "forward_backward")), "op"),
                _ms(index.get((label, "deform_kernel_conv2d", "forward_backward")), "baseline"),
                _speedup(index.get((label, "deform_kernel_conv2d", "forward_backward"))),
                _ratio(index.get((label, "global_deform_kernel2d", "forward"))),
                _ratio(index.get((label, "global_deform_kernel2d", "forward_backward"))),
            ]
        )
    headers = [
        "shape (K3)",
        "DK fwd ms",
        "dw conv fwd ms",
        "DK/dw fwd",
        "DK f+b ms",
        "dw conv f+b ms",
        "DK/dw f+b",
        "DK+DCN f+b ms",
        "torchvision f+b ms",
        "DK+DCN speedup f+b",
        "global DK/dw fwd",
        "global DK/dw f+b",
    ]
    return [
        (
            "Op level, CPU float32 (medians in ms, layout nc=NCHW ch=channels-last; "
            "ratios median (min-max over the shared rounds); speedup = torchvision / DK+DCN)",
            headers,
            rows,
        )
    ]


def _full_dk_table(results) -> List[Table]:
    section = results.get("full_dk")
    if not section:
        return []
    title = f"Full DK (groups 1) vs F.conv2d, CPU float32, {section['shape']['label']}"
    rows = [
        [r["pass"], _ms(r, "op"), _ms(r, "baseline"), _ratio(r)] for r in section["comparisons"]
    ]
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
    hw = section["hw"]
    rows = []
    for fit in hw["fits"]:
        rows.append(
            [
                fit["op"],
                fit["pass"],
                f"{fit['r2']:.4f}",
                " ".join(f"{t:.3f}" for t in fit["median_ms"]),
                " ".join(f"{t:.2f}" for t in fit["ns_per_output_element"]),
            ]
        )
    sizes = " ".join(str(int(v**0.5)) for v in hw["fits"][0]["hw"]) if hw["fits"] else ""
    tables = [
        (
            f"Scaling with H*W ({hw['shape']['label']} at sizes {sizes}; fastest layout)",
            ["op", "pass", "R^2 of t = a + b*H*W", "median ms per size", "ns per output element"],
            rows,
        )
    ]
    threads = section["threads"]
    rows = [
        [r["op"], r["pass"], r["threads"],
         f"{r['speedup_median']:.2f} ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"]
        for r in threads["speedups"]
        if r["threads"] != 1
    ]
    tables.append(
        (
            f"Thread scaling ({threads['shape']['label']}, channels-last): "
            "t(1 thread) / t(n threads)",
            ["op", "pass", "threads", "speedup median (min-max)"],
            rows,
        )
    )
    return tables


def _model_table(results) -> List[Table]:
    section = results.get("model")
    if not section:
        return []
    title = f"Mask R-CNN R50-FPN, CPU, one {section['image_size']}x{section['image_size']} image"
    if section.get("status") != "measured":
        return [
            (title, ["status", "detail"], [[section["status"], section.get("error", "")[:200]]])
        ]
    title += f" (DK: {section['dk_type']} S{section['scope_size']}, plain: {section['plain_type']})"
    rows = [
        [
            r["task"],
            f"{r['dk_median_ms']:.0f}",
            f"{r['plain_median_ms']:.0f}",
            f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})",
        ]
        for r in section["comparisons"]
    ]
    return [(title, ["task", "DK median ms", "plain median ms", "DK/plain median (min-max)"], rows)]


def _cuda_tables(results) -> List[Table]:
    section = results.get("cuda")
    if not section:
        return []
    if section.get("status") != "measured":
        return [
            ("CUDA", ["status", "reason"], [[section.get("status"), section.get("reason", "")]])
        ]
    bandwidth = {}
    for row in section["timings"]:
        if row.get("bandwidth_fraction") is not None:
            key = (row["shape"]["label"], row["op"], row["pass"], row["dtype"])
            bandwidth[key] = max(bandwidth.get(key, 0.0), row["bandwidth_fraction"])
    rows = []
    for r in section["comparisons"]:
        key = (r["shape"]["label"], r["op"], r["pass"], r["dtype"])
        rows.append(
            [
                r["dtype"],
                r["shape"]["label"],
                r["op"],
                r["pass"],
                _ms(r, "op"),
                _ms(r, "baseline"),
                _ratio(r),
                f"{100 * bandwidth.get(key, 0):.0f}%",
            ]
        )
    peak = section.get("peak_bandwidth_bytes_per_s")
    title = (
        f"CUDA {section['device_name']} (peak DRAM {peak / 1e12:.2f} TB/s, "
        f"{section['peak_bandwidth_source']})"
        if peak
        else f"CUDA {section['device_name']}"
    )
    tables = [
        (
            title,
            [
                "dtype",
                "shape",
                "op",
                "pass",
                "op ms",
                "baseline ms",
                "ratio median (min-max)",
                "DRAM BW / peak",
            ],
            rows,
        )
    ]
    full = section.get("full_dk", [])
    if full:
        rows = [
            [
                r["dtype"],
                r.get("pass", "-"),
                _ms(r, "op") if "op_layout" in r else "-",
                _ms(r, "baseline") if "op_layout" in r else "-",
                _ratio(r) if "op_layout" in r else r.get("error", "")[:80],
            ]
            for r in full
        ]
        tables.append(
            (
                "CUDA full DK (groups 1) vs cuDNN conv2d",
                ["dtype", "pass", "full DK ms", "conv2d ms", "ratio median (min-max)"],
                rows,
            )
        )
    return tables


def _targets_table(results) -> List[Table]:
    rows = [
        [
            t["name"],
            t["target"],
            t["measured_text"],
            t["status"] + (" (info)" if t["informational"] else ""),
        ]
        for t in results.get("targets", ())
    ]
    return [("Targets (judged on the median; range = per-round min-max)",
             ["target", "wanted", "measured", "status"], rows)]


def build_tables(results) -> List[Table]:
    tables = []
    for builder in (
        _ops_table,
        _full_dk_table,
        _memory_tables,
        _scaling_tables,
        _model_table,
        _cuda_tables,
        _targets_table,
    ):
        tables += builder(results)
    return tables


def _machine_lines(results) -> List[str]:
    m = results["machine"]
    lines = [
        f"machine: {m['cpu_model']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical cores, "
        f"{m['usable_cores']} usable, torch {m['torch']} ({m['torch_cpu_capability']}), "
        f"torchvision {m['torchvision']}, threads {m['torch_threads']}",
        f"date {m['date_utc']} UTC, git {m['git_commit']}, load average at start "
        f"{' '.join(f'{v:.2f}' for v in m['load_average_at_start'])}",
        f"DK ops: {m['dk_ops']}",
    ]
    if m.get("cuda_device"):
        lines.append(
            f"CUDA: {m['cuda_device']} (CUDA {m['cuda_version']}, cuDNN {m['cudnn_version']})"
        )
    config = results.get("config", {})
    lines.append("command: " + config.get("command", ""))
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
