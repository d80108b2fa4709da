"""The statistics and the report of :mod:`.erf_scale`: ERF size against object size.

* :func:`select_images`: validation images balanced over object size;
* :func:`fit_line`, :func:`bootstrap_fit`: least-squares slope and Pearson r of one run, with
  percentile bootstrap CIs over images (vectorised);
* :func:`analyse`: every run, level and ERF-size metric; per config the mean over seeds (std,
  s.e., and a CI from a two-level bootstrap: seeds, then images within each); the paired
  difference of each config to the baseline over shared seeds (per seed, mean ± std, s.e., the
  two-level bootstrap CI, images resampled jointly since both models saw the same images);

:mod:`.erf_scale_report` writes the tables and the figure.
"""
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["select_images", "fit_line", "bootstrap_fit", "analyse", "SIZE_BINS"]


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


def _residual(v: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    """``v`` less its least-squares line on ``covariate``, plus its mean (Frisch-Waugh: the
    slope and r of two such residuals are the partial slope and correlation)."""
    slope, intercept, _ = _fits(covariate, v)
    return v - (slope[0] * covariate + intercept[0]) + v.mean()


def analyse(runs: Sequence[Dict], levels: Sequence[str], metrics: Sequence[str], baseline: str,
            num_bootstrap: int = 1000, seed: int = 0) -> Dict:
    """Fits and summaries of measured runs (``{"label", "seed", "images": [{"object_size_px",
    "center_xy"}], "erf": level -> [{metric: value}]}``, :func:`~.erf_scale.measure_run` plus
    label and seed), keyed ``level/metric``; where the images give ``center_xy`` also
    ``level/metric@pos``: the same with the object's distance from the image centre partialled
    out of both sizes (large objects sit near the centre, so position could fake a relation)."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    if baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the runs' configs {labels}")
    side = float((runs[0].get("info") or {}).get("img_size") or 64)
    out = {"baseline": baseline, "configs_order": labels, "num_bootstrap": num_bootstrap,
           "image_size": side,
           "fits": {}, "configs": {}, "paired": {}}
    controls = [""] + (["@pos"] if all("center_xy" in g for r in runs for g in r["images"])
                       else [])
    for level, metric, control in ((lv, m, c) for lv in levels for m in metrics for c in controls):
        key = f"{level}/{metric}{control}"
        data = {}
        fits = []
        for run in runs:
            x = np.array([g["object_size_px"] for g in run["images"]])
            y = np.array([e[metric] for e in run["erf"][level]])
            if control:  # partial out the object's distance from the image centre
                d = np.array([np.hypot(*(np.asarray(g["center_xy"]) - side / 2))
                              for g in run["images"]])
                x, y = _residual(x, d), _residual(y, d)
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
                "mean_size_by_bin": None if control else _by_bin(groups, side)}
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
