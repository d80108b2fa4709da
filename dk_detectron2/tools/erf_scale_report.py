"""The tables, the figure and the JSON of :mod:`.erf_scale`'s report: the dict of
:func:`~.erf_scale_stats.analyse` plus the command, the headline level and metric, the images and
the runs' measurements."""
import json
import re
from typing import Dict, List

import numpy as np

from .erf_scale_stats import SIZE_BINS, fit_line

__all__ = ["format_markdown", "plot", "compact_json", "rounded_geometry"]


def _pm(stats: Dict, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{stats['mean']:{sign}.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f} (s.e. {stats['se']:.{digits}f})"
    return text


def _ci_text(ci, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _config_table(report: Dict, key: str) -> List[str]:
    base = report["baseline"]
    lines = ["", "| config | seeds | slope, mean ± std (s.e.) [95 % CI, seeds × images] | "
             "r, mean ± std (s.e.) [95 % CI] | paired Δslope vs " + base + " [CI] | "
             "paired Δr vs " + base + " [CI] |", "|---|---|---|---|---|---|"]
    for label, c in report["configs"][key].items():
        p = report["paired"][key].get(label)
        ds = f"{_pm(p['slope_diff'], signed=True)} {_ci_text(p['slope_diff']['ci'])}" if p else ""
        dr = f"{_pm(p['r_diff'], signed=True)} {_ci_text(p['r_diff']['ci'])}" if p else ""
        lines.append(f"| {label} | {len(c['seeds'])} | {_pm(c['slope'])} "
                     f"{_ci_text(c['slope']['ci'])} | {_pm(c['r'])} {_ci_text(c['r']['ci'])} | "
                     f"{ds} | {dr} |")
    return lines


def format_markdown(report: Dict, headline_only: bool = False) -> str:
    """The report's tables: the headline level and metric in full (per run, per config, paired),
    then the other levels and metrics per config and paired."""
    head = report.get("headline") or {"level": next(iter(report["fits"])).split("/")[0],
                                      "metric": next(iter(report["fits"])).split("/")[1]}
    key = f"{head['level']}/{head['metric']}"
    base = report["baseline"]
    lines = [] if headline_only else [
        "## Do effective receptive fields adapt to the object? (dk_shapes_cls)", "",
        f"Made by `{report.get('command', '?')}`.", "",
        f"For each run, {report.get('num_images', '?')} validation images balanced over object "
        "size; per image the ERF (|d unit / d pixel|, summed over the unit's channels and the "
        "colours) of the unit whose cell holds the object's box centre. ERF sizes in pixels: "
        "`size10` / `size01` = sqrt of the area above 10 % / 1 % of the ERF's maximum, `spread` = "
        "the ERF-weighted RMS distance to its centre of mass; object size = the box's largest "
        "extent in pixels. Slope and Pearson r of the least-squares line ERF size ~ object size; "
        f"95 % percentile bootstrap CIs ({report.get('num_bootstrap')} resamples) over images per "
        "run, over seeds then images for a config's mean and the paired difference (images "
        "resampled jointly: every model saw the same images).", ""]
    lines += [f"### ERF size ({head['metric']}) of the {head['level']} unit at the object's "
             "centre against object size (pixels)", "",
             "| config | seed | top-1 | slope [95 % CI] | r [95 % CI] | mean ERF size (px) |",
             "|---|---|---|---|---|---|"]
    for f in report["fits"][key]:
        top1 = f"{f['top1']:.1f}" if f.get("top1") is not None else "—"
        lines.append(f"| {f['label']} | {f['seed']} | {top1} | {f['slope']:.3f} "
                     f"{_ci_text(f['slope_ci'])} | {f['r']:.3f} {_ci_text(f['r_ci'])} | "
                     f"{f['mean_y']:.1f} |")
    lines += _config_table(report, key)
    if key + "@pos" in report["configs"]:
        lines += ["", "The same with the object's distance from the image centre partialled out of "
                  "both sizes (partial slope and correlation; large objects sit near the centre):"]
        lines += _config_table(report, key + "@pos")
    lines += ["", "Mean ERF size (px) by object size (largest extent as a fraction of the "
              f"{report.get('image_size', 64):g} px image; all seeds' images):",
              "", "| config | " + " | ".join(f"{n} (< {hi:g})" if hi != float("inf") else
                                              f"{n} (>= {lo:g})" for n, lo, hi in SIZE_BINS)
              + " |", "|---" * (len(SIZE_BINS) + 1) + "|"]
    for label, c in report["configs"][key].items():
        cells = [f"{b['mean']:.1f} (n={b['n']})" if b["mean"] is not None else "—"
                 for b in c["mean_size_by_bin"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if headline_only:
        return "\n".join(lines) + "\n"
    lines += ["", "### Every level and ERF-size metric (mean over seeds; paired Δ vs "
              f"{base})", "", "| level / metric | config | slope | r | mean size (px) | "
              "Δslope [CI] | Δr [CI] |", "|---|---|---|---|---|---|---|"]
    for k in report["configs"]:
        for label, c in report["configs"][k].items():
            p = report["paired"][k].get(label)
            lines.append(
                f"| {k} | {label} | {_pm(c['slope'])} | {_pm(c['r'])} | "
                f"{c['mean_size']['mean']:.1f} | "
                + (f"{p['slope_diff']['mean']:+.3f} {_ci_text(p['slope_diff']['ci'])} | "
                   f"{p['r_diff']['mean']:+.3f} {_ci_text(p['r_diff']['ci'])} |" if p else " | |"))
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: str) -> None:
    """Three panels at the headline level and metric: ERF size against object size (every run's
    images, one colour per config, its line fitted to all its seeds' points), then slope and r
    with their 95 % CIs per config and seed (raw, and with the object's position partialled
    out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    level, metric = report["headline"]["level"], report["headline"]["metric"]
    key = f"{level}/{metric}"
    labels = report["configs_order"]
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for label in labels:
        xs, ys = [], []
        for run in report["runs"]:
            if run["label"] == label:
                images = run.get("images") or report["images"]
                xs += [g["object_size_px"] for g in images]
                ys += list(run["erf"][level][metric])
        xs, ys = np.array(xs), np.array(ys)
        axes[0].scatter(xs, ys, s=5, alpha=0.25, color=colors[label])
        fit = fit_line(xs, ys)
        grid = np.linspace(xs.min(), xs.max(), 2)
        axes[0].plot(grid, fit["slope"] * grid + fit["intercept"], color=colors[label], lw=2,
                     label=f"{label}: slope {fit['slope']:.3f}, r {fit['r']:.2f}")
    axes[0].set(xlabel="object size (px, largest extent)", ylabel=f"ERF size {metric} (px)",
                title=f"{level} unit at the object's centre")
    axes[0].legend(fontsize=8)
    for ax, name in ((axes[1], "slope"), (axes[2], "r")):
        ticks = []
        for shift, k, style in ((0.0, key, "o"), (0.25, key + "@pos", "s")):
            for i, f in enumerate(report["fits"].get(k, [])):
                lo, hi = f[f"{name}_ci"]
                ax.errorbar([i + shift], [f[name]], yerr=[[f[name] - lo], [hi - f[name]]],
                            fmt=style, color=colors[f["label"]], capsize=3,
                            mfc="none" if shift else None)
                if not shift:
                    ticks.append(f"s{f['seed']}")
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(handles=[Line2D([], [], color=colors[label], marker="o", ls="none", label=label)
                           for label in labels], fontsize=7)
        ax.set(ylabel=name, title=f"{name} ± 95 % bootstrap CI (images), per run\n"
               "(open squares: object position partialled out)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounded_geometry(images: List[Dict]) -> List[Dict]:
    """The images' records with their centres and boxes rounded to 1/1000 pixel."""
    return [{k: [round(v, 3) for v in val] if k in ("center_xy", "box_xyxy") else val
             for k, val in g.items()} for g in images]


def compact_json(payload) -> str:
    """Indented JSON with each list of plain numbers on one line (the per-image columns)."""
    text = json.dumps(payload, indent=1)
    compact = re.sub(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]",
                     lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                     text)
    same = json.dumps(json.loads(compact)) == json.dumps(json.loads(text))  # NaN-safe
    return compact if same else text
