"""The statistics and the report of :mod:`.erf_scale`: ERF size against object size.

* :func:`select_images`: validation images balanced over object size;
* :func:`fit_line`, :func:`bootstrap_fit`: least-squares slope and Pearson r of one run, with
  percentile bootstrap CIs over images (vectorised);
* :func:`analyse`: every run, level and ERF-size metric; per config the mean over seeds (std,
  s.e., and a CI from a two-level bootstrap: seeds, then images within each); the paired
  difference of each config to the baseline over shared seeds (per seed, mean ± std, s.e., the
  two-level bootstrap CI, images resampled jointly since both models saw the same images);
* :func:`format_markdown`, :func:`plot`.
"""
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["select_images", "fit_line", "bootstrap_fit", "analyse", "format_markdown", "plot"]


def select_images(sizes: Sequence[float], num_images: int, num_bins: int = 8) -> List[int]:
    """Indices of ``num_images`` images balanced over object size: ``num_bins`` equal-width bins
    of ``sizes`` between its min and max, the same count from each (evenly spread over the bin's
    images in index order), a bin short of images topped up from the others. Deterministic."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if num_images < 1 or num_images > len(sizes):
        raise ValueError(f"num_images must be in 1..{len(sizes)} (the split's images), "
                         f"got {num_images}")
    edges = np.linspace(sizes.min(), sizes.max(), num_bins + 1)
    bins = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, num_bins - 1)
    members = [np.flatnonzero(bins == b) for b in range(num_bins)]
    quota = [0] * num_bins
    left = num_images
    while left > 0:  # round robin over bins that still have images
        open_bins = [b for b in range(num_bins) if quota[b] < len(members[b])]
        for b in open_bins[:left]:
            quota[b] += 1
        left = num_images - sum(quota)
    chosen = []
    for b, count in enumerate(quota):
        if count:
            picks = np.linspace(0, len(members[b]) - 1, count).round().astype(int)
            chosen.extend(int(i) for i in members[b][picks])
    return sorted(chosen)


def _fits(x: np.ndarray, y: np.ndarray):
    """Row-wise slope, intercept, r of [B, n] arrays (r is nan where x or y is constant)."""
    x, y = np.atleast_2d(x), np.atleast_2d(y)
    dx, dy = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    sxx, syy, sxy = (dx * dx).sum(1), (dy * dy).sum(1), (dx * dy).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = sxy / sxx
        r = sxy / np.sqrt(sxx * syy)
    intercept = y.mean(1) - slope * x.mean(1)
    return slope, intercept, r


def fit_line(x: Sequence[float], y: Sequence[float]) -> Dict[str, float]:
    """Least-squares ``y = slope * x + intercept`` and Pearson ``r``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"need two 1-D arrays of the same length >= 3, got {x.shape}, {y.shape}")
    slope, intercept, r = _fits(x, y)
    return {"slope": float(slope[0]), "intercept": float(intercept[0]), "r": float(r[0])}


def _ci(samples: np.ndarray, level: float = 0.95) -> List[float]:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return [float("nan"), float("nan")]
    return [float(v) for v in np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])]


def bootstrap_fit(x, y, num_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> Dict:
    """:func:`fit_line` plus percentile bootstrap CIs (resampling the (x, y) pairs) of the slope
    and r: ``{"n", "slope", "slope_ci", "intercept", "r", "r_ci", "mean_y"}``."""
    fit = fit_line(x, y)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(num_bootstrap, len(x)))
    slope, _, r = _fits(x[idx], y[idx])
    return {"n": len(x), **fit, "slope_ci": _ci(slope, level), "r_ci": _ci(r, level),
            "mean_y": float(y.mean())}


def _summary(values: Sequence[float]) -> Dict:
    v = np.asarray(values, np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    return {"n": len(v), "mean": float(v.mean()), "std": std,
            "se": std / np.sqrt(len(v)) if std is not None else None,
            "values": [float(a) for a in v]}


def _two_level(groups, num_bootstrap: int, seed: int):
    """Bootstrap over groups (seeds) then over images within each: per resample the mean over
    the drawn groups of (slope, r), or of their differences for paired groups ``(x, y, y_ref)``.
    Returns ``(slope samples, r samples)``."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(groups), size=(num_bootstrap, len(groups)))
    per_group = []
    for g in groups:
        x = g[0]
        idx = rng.integers(0, len(x), size=(num_bootstrap, len(x)))
        s, _, r = _fits(x[idx], g[1][idx])
        if len(g) == 3:
            s_ref, _, r_ref = _fits(x[idx], g[2][idx])
            s, r = s - s_ref, r - r_ref
        per_group.append((s, r))
    s_all = np.stack([p[0] for p in per_group])  # [groups, B]
    r_all = np.stack([p[1] for p in per_group])
    cols = np.arange(num_bootstrap)
    slopes = s_all[picks.T, cols].mean(0)
    rs = r_all[picks.T, cols].mean(0)
    return slopes, rs


# (label, low, high) of the object's largest extent in pixels, as a fraction of the image side:
# the classification study's size bins.
SIZE_BINS = (("small", 0.0, 0.25), ("medium", 0.25, 0.5), ("large", 0.5, float("inf")))


def _by_bin(groups, side: float) -> Dict:
    """Mean ERF size per :data:`SIZE_BINS` bin over every group's (seed's) images; ``side``: the
    image side in pixels (the bins are fractions of it)."""
    x = np.concatenate([g[0] for g in groups])
    y = np.concatenate([g[1] for g in groups])
    out = {}
    for name, low, high in SIZE_BINS:
        mask = (x >= low * side) & (x < high * side)
        out[name] = {"n": int(mask.sum()), "mean": float(y[mask].mean()) if mask.any() else None}
    return out


def analyse(runs: Sequence[Dict], levels: Sequence[str], metrics: Sequence[str], baseline: str,
            num_bootstrap: int = 1000, seed: int = 0) -> Dict:
    """Fits and summaries of measured runs (``{"label", "seed", "images": [{"object_size_px"}],
    "erf": level -> [{metric: value}]}``, as :func:`~.erf_scale.measure_run` plus label/seed)."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    if baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the runs' configs {labels}")
    side = float((runs[0].get("info") or {}).get("img_size") or 64)
    out = {"baseline": baseline, "configs_order": labels, "num_bootstrap": num_bootstrap,
           "image_size": side,
           "fits": {}, "configs": {}, "paired": {}}
    for level in levels:
        for metric in metrics:
            key = f"{level}/{metric}"
            data = {}
            fits = []
            for run in runs:
                x = np.array([g["object_size_px"] for g in run["images"]])
                y = np.array([e[metric] for e in run["erf"][level]])
                data[(run["label"], run["seed"])] = (x, y, [g["index"] for g in run["images"]])
                fit = bootstrap_fit(x, y, num_bootstrap, seed)
                top1 = (run.get("info") or {}).get("top1")
                fits.append({"label": run["label"], "seed": run["seed"], "top1": top1, **fit})
            out["fits"][key] = fits
            out["configs"][key] = {}
            for label in labels:
                mine = [f for f in fits if f["label"] == label]
                groups = [data[(label, f["seed"])][:2] for f in mine]
                s_boot, r_boot = _two_level(groups, num_bootstrap, seed)
                out["configs"][key][label] = {
                    "seeds": [f["seed"] for f in mine],
                    "slope": {**_summary([f["slope"] for f in mine]), "ci": _ci(s_boot)},
                    "r": {**_summary([f["r"] for f in mine]), "ci": _ci(r_boot)},
                    "mean_size": _summary([f["mean_y"] for f in mine]),
                    "mean_size_by_bin": _by_bin([data[(label, f["seed"])][:2] for f in mine], side)}
            out["paired"][key] = {}
            for label in labels:
                if label == baseline:
                    continue
                seeds = sorted(s for (lab, s) in data if lab == label and (baseline, s) in data)
                groups = []
                for s in seeds:
                    x, y, idx = data[(label, s)]
                    x_ref, y_ref, idx_ref = data[(baseline, s)]
                    if idx != idx_ref:
                        raise ValueError(f"{label} and {baseline} seed {s} saw other images")
                    groups.append((x, y, y_ref))
                if not groups:
                    continue
                per = {(f["label"], f["seed"]): f for f in fits}
                ds = [per[(label, s)]["slope"] - per[(baseline, s)]["slope"] for s in seeds]
                dr = [per[(label, s)]["r"] - per[(baseline, s)]["r"] for s in seeds]
                s_boot, r_boot = _two_level(groups, num_bootstrap, seed)
                out["paired"][key][label] = {
                    "seeds": seeds, "slope_diff": {**_summary(ds), "ci": _ci(s_boot)},
                    "r_diff": {**_summary(dr), "ci": _ci(r_boot)}}
    return out


def _pm(stats: Dict, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{stats['mean']:{sign}.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std']:.{digits}f} (s.e. {stats['se']:.{digits}f})"
    return text


def _ci_text(ci, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


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
    lines += ["", "| config | seeds | slope, mean ± std (s.e.) [95 % CI, seeds × images] | "
              "r, mean ± std (s.e.) [95 % CI] | paired Δslope vs " + base + " [CI] | "
              "paired Δr vs " + base + " [CI] |", "|---|---|---|---|---|---|"]
    for label, c in report["configs"][key].items():
        p = report["paired"][key].get(label)
        ds = f"{_pm(p['slope_diff'], signed=True)} {_ci_text(p['slope_diff']['ci'])}" if p else ""
        dr = f"{_pm(p['r_diff'], signed=True)} {_ci_text(p['r_diff']['ci'])}" if p else ""
        lines.append(f"| {label} | {len(c['seeds'])} | {_pm(c['slope'])} "
                     f"{_ci_text(c['slope']['ci'])} | {_pm(c['r'])} {_ci_text(c['r']['ci'])} | "
                     f"{ds} | {dr} |")
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
    with their 95 % CIs per config and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        for i, f in enumerate(report["fits"][key]):
            lo, hi = f[f"{name}_ci"]
            ax.errorbar([i], [f[name]], yerr=[[f[name] - lo], [hi - f[name]]], fmt="o",
                        color=colors[f["label"]], capsize=3)
            ticks.append(f"{f['label']}\ns{f['seed']}")
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(ylabel=name, title=f"{name} ± 95 % bootstrap CI (images), per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
