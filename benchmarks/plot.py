"""``results.png``: the ratio of every operator to its baseline per shape, scaling, and the model.

Panels: DK / depthwise conv per shape; DK+DCN speedup over torchvision per shape; global DK /
depthwise conv per shape; time against H*W (log-log, with a slope-1 guide); the headline ratios
(full DK, threads, Mask R-CNN) against their targets; the CUDA ratios when a GPU ran. Ratios are
medians (the JSON also has the minima); dashed lines are the targets of :data:`report.TARGETS`.
"""

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator  # noqa: E402

from .report import threshold  # noqa: E402

_PASS_COLORS = {"forward": "tab:blue", "forward_backward": "tab:orange"}


def _plain_log_ticks(axis):
    """Log scale with ticks at 1, 2, 5 x 10^k printed as plain numbers."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(FormatStrFormatter(""))


def _bars(ax, comparisons, op, title, ylabel, invert=False, targets=()):
    rows = [r for r in comparisons if r["op"] == op and "skipped" not in r]
    labels = list(dict.fromkeys(r["shape"]["label"] for r in rows))
    if not labels:
        ax.set_title(title + " (not measured)")
        ax.axis("off")
        return
    width = 0.4
    for offset, pass_name in enumerate(("forward", "forward_backward")):
        values = {r["shape"]["label"]: r["ratio_median"] for r in rows if r["pass"] == pass_name}
        xs = [i + (offset - 0.5) * width for i, label in enumerate(labels) if label in values]
        ys = [(1 / values[l] if invert else values[l]) for l in labels if l in values]
        ax.bar(xs, ys, width, label=pass_name.replace("_", "+"), color=_PASS_COLORS[pass_name])
    for value, text, color in targets:
        ax.axhline(value, linestyle="--", color=color, linewidth=1)
        ax.text(len(labels) - 0.5, value, text, color=color, fontsize=7, ha="right", va="bottom")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


def _scaling(ax, results):
    section = results.get("scaling")
    if not section:
        ax.set_title("scaling (not run)")
        ax.axis("off")
        return
    for fit in section["hw"]["fits"]:
        style = "-" if fit["op"] == "deform_kernel2d" else ":"
        ax.plot(fit["hw"], fit["median_ms"], style, marker="o", color=_PASS_COLORS[fit["pass"]],
                label=f"{fit['op']} {fit['pass'].replace('_', '+')} (R^2 {fit['r2']:.3f})")
    first = section["hw"]["fits"][0]
    x0, y0 = first["hw"][0], first["median_ms"][0]
    ax.plot(first["hw"], [y0 * x / x0 for x in first["hw"]], color="gray", linewidth=0.8,
            label="slope 1 (linear)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(first["hw"])
    ax.set_xticklabels([f"{int(round(v ** 0.5))}²" for v in first["hw"]], fontsize=7)
    ax.minorticks_off()
    _plain_log_ticks(ax.yaxis)
    ax.set_xlabel("H*W", fontsize=8)
    ax.set_ylabel("median ms", fontsize=8)
    ax.set_title(f"time vs H*W ({section['hw']['shape']['label']})", fontsize=9)
    ax.legend(fontsize=6)


def _headlines(ax, results):
    bars = [
        (t["name"], t["measured"], t["threshold"], t["status"], t.get("measured_range"))
        for t in results.get("targets", ())
        if t["measured"] is not None and t["target"].endswith("x") and "CUDA" not in t["name"]
    ]
    if not bars:
        ax.set_title("headline targets (none measured)")
        ax.axis("off")
        return
    ys = range(len(bars))
    colors = ["tab:green" if b[3] == "PASS" else "tab:red" for b in bars]
    ax.barh(ys, [b[1] for b in bars], color=colors)
    for y, b in zip(ys, bars):
        if b[4] is not None:  # the per-round range
            ax.plot(b[4], [y, y], color="black", linewidth=1)
    ax.scatter([b[2] for b in bars], ys, marker="|", s=300, color="black", label="target", zorder=3)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([textwrap.fill(b[0], 34) for b in bars], fontsize=6)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_title("headline ratios (median, line = min-max; green PASS, red MISS, | target)",
                 fontsize=9)
    ax.legend(fontsize=7)


def _cuda(ax, results):
    section = results.get("cuda", {})
    if section.get("status") != "measured":
        ax.set_title("CUDA: " + section.get("reason", "not run"), fontsize=9)
        ax.axis("off")
        return
    rows = [r for r in section["comparisons"]
            if r["op"] == "deform_kernel2d" and r["pass"] == "forward"]
    labels = list(dict.fromkeys(r["shape"]["label"] for r in rows))
    width = 0.27
    for offset, dtype in enumerate(("float32", "float16", "bfloat16")):
        values = {r["shape"]["label"]: r["ratio_median"] for r in rows if r["dtype"] == dtype}
        ax.bar([i + (offset - 1) * width for i, l in enumerate(labels) if l in values],
               [values[l] for l in labels if l in values], width, label=dtype)
    ax.axhline(threshold("cuda/float32"), linestyle="--", color="tab:red", linewidth=1)
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_title(f"CUDA deform_kernel2d fwd / cuDNN dw conv ({section['device_name']})", fontsize=9)
    ax.legend(fontsize=7)


def plot_results(results: dict, path: str) -> None:
    """Writes the six-panel figure to ``path`` (PNG)."""
    comparisons = results.get("ops", {}).get("comparisons", [])
    fig, axes = plt.subplots(2, 3, figsize=(20, 11))
    fwd, both = threshold("ops/deform_kernel2d/forward"), threshold(
        "ops/deform_kernel2d/forward_backward")
    speedup = threshold("ops/deform_kernel_conv2d/forward_backward/speedup")
    _bars(axes[0, 0], comparisons, "deform_kernel2d", "deform_kernel2d / fastest depthwise conv2d",
          "time ratio (median)", targets=((fwd, f"fwd target {fwd:g}x", "tab:blue"),
                                          (both, f"f+b target {both:g}x", "tab:orange")))
    _bars(axes[0, 1], comparisons, "deform_kernel_conv2d",
          "speedup of deform_kernel_conv2d over torchvision deform_conv2d", "speedup (median)",
          invert=True, targets=((speedup, f"f+b target {speedup:g}x", "tab:orange"),))
    _bars(axes[0, 2], comparisons, "global_deform_kernel2d",
          "GlobalDeformKernel2d / fastest depthwise conv2d", "time ratio (median)")
    _scaling(axes[1, 0], results)
    _headlines(axes[1, 1], results)
    _cuda(axes[1, 2], results)
    m = results["machine"]
    fig.suptitle(
        f"Deformable Kernel benchmark, {m['date_utc']} UTC: {m['cpu_model']}, "
        f"{m['torch_threads']} threads, torch {m['torch']}"
        + (" [--quick]" if results.get("config", {}).get("quick") else ""),
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
