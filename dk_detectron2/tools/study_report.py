"""The report of a seeded study (:mod:`dk_detectron2.tools.study`): statistics over seeds, the
Markdown table and the picture.

A run's record is ``{"name", "seed", "metrics": {"bbox/AP": ..., ...} or None, "seconds",
"command", ...}``; the summary gives per config the mean and sample std of each metric over its
finished seeds and the paired difference to its baseline over the seeds both finished.
"""
import math
import shlex
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Union

if TYPE_CHECKING:  # the spec's config entries; study.py imports this module
    from .study import StudyConfig

__all__ = ["METRICS", "format_markdown", "format_stats", "metric", "plot_study", "summarize"]

METRICS = (("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"))


def metric(results: Dict, task: str, key: str) -> Optional[float]:
    """``results[task][key]`` of an ``eval_results.json``; None when absent or NaN."""
    value = results.get(task, {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _mean_std(values: Sequence[float]) -> Dict:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def summarize(records: Sequence[Dict], baseline: Union[None, str, Dict[str, str]],
              labels: Sequence[str] = tuple(f"{t}/{k}" for t, k in METRICS)) -> Dict:
    """Per config: mean/std of each metric (``labels``, keys of the records' ``metrics``); paired
    differences to its baseline over the seeds both finished. ``baseline``: one config name for
    all, or ``{config: its baseline}``."""
    by_config: Dict[str, Dict[int, Dict]] = {}
    for r in records:
        if r.get("metrics"):
            by_config.setdefault(r["name"], {})[r["seed"]] = r["metrics"]
    summary = {}
    for name, per_seed in by_config.items():
        base = baseline.get(name) if isinstance(baseline, dict) else baseline
        entry = {"seeds": sorted(per_seed), "baseline": base if base != name else None}
        for label in labels:
            entry[label] = _mean_std([m[label] for m in per_seed.values() if m.get(label) is not None])
            if base and name != base and base in by_config:
                common = sorted(set(per_seed) & set(by_config[base]))
                diffs = [per_seed[s][label] - by_config[base][s][label] for s in common
                         if per_seed[s].get(label) is not None
                         and by_config[base][s].get(label) is not None]
                entry[f"{label} - {base}"] = _mean_std(diffs)
        summary[name] = entry
    return summary


def format_stats(stats: Optional[Dict], signed: bool = False, digits: int = 1,
                 with_n: bool = True) -> str:
    """``mean ± std (n=N)`` of a :func:`summarize` entry ("—" when it has no value)."""
    if not stats or stats.get("mean") is None:
        return "—"
    mean = f"{stats['mean']:+.{digits}f}" if signed else f"{stats['mean']:.{digits}f}"
    text = mean + (f" ± {stats['std']:.{digits}f}" if stats.get("std") is not None else "")
    return text + (f" (n={stats['n']})" if with_n else "")


_fmt = format_stats


def format_markdown(configs: Sequence["StudyConfig"], records: Sequence[Dict], summary: Dict) -> str:
    lines = ["# Study results", "",
             "Mean ± sample std over seeds; Δ: paired difference to the row's baseline over the "
             "seeds both finished, mean ± std.", "",
             "| config | seeds | box AP | mask AP | box AP50 | baseline | Δ box AP | Δ mask AP |",
             "|---|---|---|---|---|---|---|---|"]
    for c in configs:
        s = summary.get(c.name)
        if not s:
            lines.append(f"| `{c.name}` | — | — | — | — | — | — | — |")
            continue
        base = s.get("baseline")
        lines.append(
            f"| `{c.name}` | {' '.join(map(str, s['seeds']))} | {_fmt(s['bbox/AP'])} | "
            f"{_fmt(s['segm/AP'])} | {_fmt(s['bbox/AP50'])} | {f'`{base}`' if base else '—'} | "
            f"{_fmt(s.get(f'bbox/AP - {base}'), True)} | {_fmt(s.get(f'segm/AP - {base}'), True)} |")
    lines += ["", "## Configs", ""]
    for c in configs:
        lines.append(f"- `{c.name}`: `{c.config}` {shlex.join(c.opts)}".rstrip())
    lines += ["", "## Runs", "", "| config | seed | box AP | mask AP | minutes | command |",
              "|---|---|---|---|---|---|"]
    def cell(value, scale=1.0):
        return "—" if value is None else f"{value / scale:.1f}"

    for r in records:
        m = r.get("metrics") or {}
        lines.append(
            f"| `{r['name']}` | {r['seed']} | {cell(m.get('bbox/AP'))} | {cell(m.get('segm/AP'))} | "
            f"{cell(r.get('seconds'), 60.0)} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def plot_study(configs: Sequence["StudyConfig"], records: Sequence[Dict], summary: Dict,
               path: str, metric: str = "bbox/AP") -> None:
    """Box AP per config: every seed a point, the mean a bar, ± std a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in configs if c.name in summary]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 4.2), dpi=120)
    seeds = sorted({r["seed"] for r in records if r.get("metrics")})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(seeds)}
    for i, name in enumerate(names):
        stats = summary[name][metric]
        ax.bar(i, stats["mean"], width=0.6, color="0.85", edgecolor="0.4")
        if stats["std"] is not None:
            ax.errorbar(i, stats["mean"], yerr=stats["std"], color="k", capsize=6, lw=1.5)
        for r in records:
            if r["name"] == name and r.get("metrics") and r["metrics"].get(metric) is not None:
                jitter = (seeds.index(r["seed"]) - (len(seeds) - 1) / 2) * 0.08
                ax.plot(i + jitter, r["metrics"][metric], "o", color=colors[r["seed"]], ms=6,
                        label=f"seed {r['seed']}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=9)
    values = [r["metrics"][metric] for r in records if r.get("metrics") and r["name"] in names]
    ax.set_ylim(max(0.0, min(values) - 8), max(values) + 4)
    task, key = metric.split("/")
    ax.set_ylabel(f"{ {'bbox': 'box', 'segm': 'mask'}.get(task, task)} {key}")
    ax.set_title("dk_shapes: mean ± std over seeds (bars), each seed a point")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
