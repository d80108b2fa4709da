"""Classification runs in a seeded study (``python -m dk_detectron2.tools.study`` with a spec of
``kind: classification``).

Each run is ``python -m dk_detectron2.classification.train --model MODEL --seed s --output
ROOT/NAME --experiment seed_s TRAIN_ARGS... OPTS...``; it is finished when its ``results.json``
exists. Metrics per run: the final epoch's top-1 (``top1``; no model selection on the validation
set), the best epoch's (``best_top1``), top-1 per object-size bin (``top1_small``,
``top1_medium``, ``top1_large``: the object's largest extent < 0.25, 0.25-0.5, >= 0.5 of the image,
from the run's ``val_predictions.json`` and the split's ``meta.json``), the parameter count,
the multiply-adds of one image (``macs_m``, millions: the run's ``results.json``, or counted from
its model and input size for runs that predate that field), the seconds per epoch, and the final
epoch's mean training and validation losses (``train_loss``, ``val_loss``, from timm's
``summary.csv``: a model that is behind on both fits worse; one behind on validation only
overfits). The report: ``study.md`` (mean ± std per config; paired difference to the
baseline with its standard error and a 2-s.e. verdict) and ``study.png``.

Spec::

    kind: classification
    train_args: [--data-dir, datasets/dk_shapes_cls, --img-size, "64", --epochs, "12", ...]
    configs:
      - {name: rigid3, config: resnet18_dw_050}
      - {name: dk, config: dk_resnet18_dw_050, opts: [--generator-lr-factor, "0.01"]}
"""
import csv
import json
import math
import os
import shlex
from typing import Dict, List, Optional, Sequence

from .study import StudyRun, _atomic_write
from .study_report import format_stats

__all__ = ["ClassificationRunner", "SIZE_BINS", "size_bin_accuracy"]

# (label, low, high) of the object's largest extent as a fraction of the image side.
SIZE_BINS = (("small", 0.0, 0.25), ("medium", 0.25, 0.5), ("large", 0.5, float("inf")))
TRAIN_MODULE = "dk_detectron2.classification.train"


def size_bin_accuracy(predictions: Sequence[Dict], meta: Dict) -> Dict[str, Optional[float]]:
    """Top-1 (%) per :data:`SIZE_BINS` bin: ``predictions`` as ``val_predictions.json``
    (``file_name``, ``label``, ``pred``), ``meta`` as the split's ``meta.json``."""
    sizes = {os.path.normpath(image["file_name"]): image["object_size"] for image in meta["images"]}
    hits: Dict[str, List[int]] = {name: [] for name, _, _ in SIZE_BINS}
    for p in predictions:
        size = sizes.get(os.path.normpath(p["file_name"]))
        if size is None:
            raise KeyError(f"{p['file_name']} of the predictions is not in the split's meta.json")
        for name, low, high in SIZE_BINS:
            if low <= size < high:
                hits[name].append(int(p["pred"] == p["label"]))
    return {name: (100.0 * sum(v) / len(v) if v else None) for name, v in hits.items()}


def final_losses(summary_csv: str) -> Dict[str, float]:
    """``{"train_loss", "val_loss"}`` of the last epoch in timm's ``summary.csv`` (``{}`` when the
    file is missing or has no epoch)."""
    if not os.path.exists(summary_csv):
        return {}
    with open(summary_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {"train_loss": float(rows[-1]["train_loss"]), "val_loss": float(rows[-1]["eval_loss"])}


class ClassificationRunner:
    """The classification counterpart of :class:`~dk_detectron2.tools.study.DetectionRunner`."""

    kind = "classification"
    results_file = "results.json"
    metric_labels = ("top1", "best_top1", "top1_small", "top1_medium", "top1_large",
                     "params_k", "macs_m", "seconds_per_epoch", "train_loss", "val_loss")

    def __init__(self, train_args: Sequence[str]):
        self.train_args = [str(a) for a in train_args]
        if "--data-dir" not in self.train_args:
            raise ValueError("a classification study's train_args must give --data-dir")
        self.data_dir = self.train_args[self.train_args.index("--data-dir") + 1]
        self.val_split = (self.train_args[self.train_args.index("--val-split") + 1]
                          if "--val-split" in self.train_args else "val")
        self._meta = None
        self._macs_cache: Dict[str, int] = {}

    def check(self) -> None:
        """Makes the default miniature dataset if the study names it and it is not there yet."""
        missing = not os.path.isdir(self.data_dir)
        if missing and os.path.basename(os.path.normpath(self.data_dir)) == "dk_shapes_cls":
            from ..classification.shapes_data import ensure_shapes_cls

            ensure_shapes_cls(os.path.dirname(os.path.normpath(self.data_dir)))
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"--data-dir {self.data_dir!r} of the study is not a folder")

    def command(self, run: StudyRun, python: str) -> List[str]:
        opts = [v.replace("{seed}", str(run.seed)).replace("{root}", run.root)
                for v in run.config.opts]
        return [python, "-m", TRAIN_MODULE, "--model", run.config.config, "--seed", str(run.seed),
                "--output", os.path.dirname(run.output_dir),
                "--experiment", os.path.basename(run.output_dir), *self.train_args, *opts]

    def _split_meta(self) -> Optional[Dict]:
        if self._meta is None:
            path = os.path.join(self.data_dir, self.val_split, "meta.json")
            if os.path.exists(path):
                with open(path) as f:
                    self._meta = json.load(f)
        return self._meta

    def _macs_per_image(self, run: StudyRun, results: Dict) -> Optional[int]:
        """``results["macs_per_image"]``, or, for a run whose trainer did not record it, the count
        for the model, keyword arguments, classes and input size in its ``args.json`` (None when
        neither is available: the trainer could not trace the model, or ``args.json`` is gone)."""
        if results.get("macs_per_image") is not None:
            return int(results["macs_per_image"])
        args_path = os.path.join(run.output_dir, "args.json")
        if "macs_per_image" in results or not os.path.exists(args_path):
            return None  # recorded as not countable, or nothing to count from
        import timm
        from timm.data import resolve_data_config

        from .. import classification  # noqa: F401  (registers the models)
        from .flops import image_model_macs

        with open(args_path) as f:
            args = json.load(f)
        key = json.dumps([args["model"], args.get("model_kwargs") or {}, results["num_classes"],
                          args.get("img_size"), args.get("input_size")], sort_keys=True)
        if key not in self._macs_cache:
            model = timm.create_model(args["model"], num_classes=results["num_classes"],
                                      **(args.get("model_kwargs") or {}))
            size = resolve_data_config(args, model=model)["input_size"]
            self._macs_cache[key] = image_model_macs(model, size)
        return self._macs_cache[key]

    def metrics(self, run: StudyRun) -> Dict:
        with open(run.results_path) as f:
            results = json.load(f)
        macs = self._macs_per_image(run, results)
        metrics = {"top1": results["final_top1"], "best_top1": results["best_top1"],
                   "params_k": results["parameters"] / 1e3,
                   "macs_m": None if macs is None else macs / 1e6,
                   "seconds_per_epoch": results["train_seconds"] / max(1, results["epochs"])}
        metrics.update(final_losses(os.path.join(run.output_dir, "summary.csv")))
        predictions = os.path.join(run.output_dir, "val_predictions.json")
        meta = self._split_meta()
        if meta is not None and os.path.exists(predictions):
            with open(predictions) as f:
                bins = size_bin_accuracy(json.load(f), meta)
            metrics.update({f"top1_{name}": value for name, value in bins.items()})
        return metrics

    def status(self, metrics: Dict) -> str:
        return f"top-1 {metrics['top1']:.1f}"

    def write_report(self, root, configs, records, summary) -> None:
        _atomic_write(os.path.join(root, "study.md"),
                      format_classification_markdown(configs, records, summary, self.train_args))
        plot_classification_study(configs, summary, os.path.join(root, "study.png"))


def _fmt(stats: Optional[Dict], signed: bool = False, digits: int = 1) -> str:
    return format_stats(stats, signed, digits, with_n=False)


def paired_verdict(stats: Optional[Dict]) -> str:
    """``s.e. x; beyond 2 s.e.`` (or ``within``) of a paired difference's mean."""
    if not stats or stats.get("std") is None or stats["n"] < 2:
        return "—"
    se = stats["std"] / math.sqrt(stats["n"])
    beyond = abs(stats["mean"]) > 2 * se
    return f"{se:.1f}; {'beyond' if beyond else 'within'} 2 s.e."


def format_classification_markdown(configs, records, summary, train_args) -> str:
    lines = [
        "# Classification study", "",
        "Top-1 (%) of the final epoch, mean ± sample std over seeds; per object size (largest "
        "extent / image side: small < 0.25 <= medium < 0.5 <= large); Δ: paired difference to the "
        "row's baseline over the seeds both finished (mean ± std), its standard error and whether "
        "|mean| > 2 s.e.", "",
        f"Common trainer arguments: `{shlex.join(train_args)}`", "",
        "| config | model | seeds | top-1 | small | medium | large | train / val loss "
        "| params (k) | MMACs/image | s/epoch | baseline | Δ top-1 | s.e.; verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        s = summary.get(c.name)
        if not s:
            lines.append(f"| `{c.name}` | `{c.config}` | — |" + " — |" * 11)
            continue
        base = s.get("baseline")
        delta = s.get(f"top1 - {base}") if base else None
        lines.append(
            f"| `{c.name}` | `{c.config}` | {len(s['seeds'])} | {_fmt(s['top1'])} | "
            f"{_fmt(s['top1_small'])} | {_fmt(s['top1_medium'])} | {_fmt(s['top1_large'])} | "
            f"{_fmt(s.get('train_loss'), digits=3)} / {_fmt(s.get('val_loss'), digits=3)} | "
            f"{_fmt(s['params_k'], digits=0)} | {_fmt(s.get('macs_m'), digits=1)} | "
            f"{_fmt(s['seconds_per_epoch'])} | "
            f"{f'`{base}`' if base else '—'} | {_fmt(delta, True)} | {paired_verdict(delta)} |")
    lines += ["", "## Configs", ""]
    for c in configs:
        lines.append(f"- `{c.name}`: `{c.config}` {shlex.join(c.opts)}".rstrip())
    lines += ["", "## Runs", "", "| config | seed | top-1 | best top-1 | minutes | command |",
              "|---|---|---|---|---|---|"]
    for r in records:
        m = r.get("metrics") or {}
        cell = lambda v, k=1.0: "—" if v is None else f"{v / k:.1f}"  # noqa: E731
        lines.append(f"| `{r['name']}` | {r['seed']} | {cell(m.get('top1'))} | "
                     f"{cell(m.get('best_top1'))} | {cell(r.get('seconds'), 60.0)} | "
                     f"`{r['command']}` |")
    return "\n".join(lines) + "\n"


def plot_classification_study(configs, summary, path: str) -> None:
    """Left: top-1 per config (mean ± std). Right: paired Δ top-1 to the baseline with ± 2 s.e."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in configs if c.name in summary and summary[c.name]["top1"]["n"]]
    if not names:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.4 * len(names), 4.4), dpi=110)
    for i, name in enumerate(names):
        stats = summary[name]["top1"]
        left.bar(i, stats["mean"], color="0.85", edgecolor="0.4")
        if stats["std"] is not None:
            left.errorbar(i, stats["mean"], yerr=stats["std"], color="k", capsize=5)
        base = summary[name].get("baseline")
        delta = summary[name].get(f"top1 - {base}") if base else None
        if delta and delta["mean"] is not None:
            se = delta["std"] / math.sqrt(delta["n"]) if delta["std"] is not None else 0.0
            color = "tab:green" if delta["mean"] - 2 * se > 0 else (
                "tab:red" if delta["mean"] + 2 * se < 0 else "tab:gray")
            right.errorbar(i, delta["mean"], yerr=2 * se, fmt="o", color=color, capsize=5)
    values = [summary[n]["top1"]["mean"] for n in names]
    left.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 6))
    for ax, title in ((left, "top-1 (%), mean ± std over seeds"),
                      (right, "paired Δ top-1 vs baseline, ± 2 s.e.")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    right.axhline(0, color="k", lw=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
