"""Recomputes a run's ratios, speedups and target verdicts from the per-round samples that its
``results.json`` stores (``times_ms`` of every timing row), without timing anything::

    python -m benchmarks.recompute benchmarks     # rewrites benchmarks/results.{json,md,png}

The comparisons (op / baseline, each side at its layout of lowest median over the shared rounds:
:func:`benchmarks.measure.compare`), the model's DK / plain ratios and the thread speedups are
rebuilt from the samples with the same functions a run uses; the targets are judged again. So a
committed result can be checked against its own samples (``tests/test_benchmark.py``), and a
result written under an older ratio rule brought to the current one. Memory, H*W fits and the
CUDA bandwidth are not ratios of rounds and are left as they are.
"""

import argparse
import copy
import os
from typing import Dict, List, Optional

from .measure import Measurement, compare, ratio
from .plot import plot_results
from .report import evaluate_targets, render_terminal, write_json, write_markdown

__all__ = ["recompute", "main"]

RECOMPUTED_NOTE = ("ratios and verdicts recomputed from the stored per-round samples "
                   "(python -m benchmarks.recompute)")


def _measurement(row: Dict) -> Measurement:
    """The :class:`Measurement` of one stored timing row (``times_ms`` in round order)."""
    return Measurement(label=row["op"], times_s=[t / 1e3 for t in row["times_ms"]],
                       number=row["number"], threads=row["threads"])


def _stage_key(shape: Dict) -> tuple:
    """What a plain convolution's cost depends on (``cases.OpShape.stage_key``)."""
    return (shape["batch"], shape["channels"], shape["size"], shape["groups"])


def _sides(row: Dict, timings: List[Dict]):
    """The stored measurements of a comparison row's two sides, keyed by layout: the operation's
    rows of the same shape, pass and dtype, and the baseline's, of that shape or shared by its
    stage (the op sections time a stage's baselines once, on its first shape)."""
    def same(timing):  # CPU full-DK rows name no dtype (float32): then any dtype
        dtype = timing.get("dtype")
        return timing["pass"] == row["pass"] and row.get("dtype", dtype) == dtype

    label = row["shape"]["label"]
    mine = {t["layout"]: _measurement(t) for t in timings
            if same(t) and t["op"] == row["op"] and not t.get("shared_baseline")
            and t["shape"]["label"] == label}
    base = {t["layout"]: _measurement(t) for t in timings
            if same(t) and t["op"] == row["baseline"]
            and (t["shape"]["label"] == label
                 or (t.get("shared_baseline")
                     and _stage_key(t["shape"]) == _stage_key(row["shape"])))}
    return mine, base


def _recompute_comparisons(rows: List[Dict], timings: List[Dict], where: str) -> None:
    for row in rows:
        if "skipped" in row:
            continue
        mine, base = _sides(row, timings)
        if not mine or not base:
            raise ValueError(f"{where}: no stored samples for {row['op']} / {row['baseline']} "
                             f"{row['pass']} at {row['shape']['label']}")
        row.update(compare(mine, base))


def _recompute_model(section: Dict) -> None:
    timings = section["timings"]
    for row in section["comparisons"]:
        dk, plain = (Measurement(key, [t / 1e3 for t in timings[key]["times_ms"]])
                     for key in (f"dk/{row['task']}", f"plain/{row['task']}"))
        row.update(dk_median_ms=dk.median_ms, plain_median_ms=plain.median_ms,
                   dk_min_ms=dk.min_ms, plain_min_ms=plain.min_ms, **ratio(dk, plain))


def _recompute_thread_speedups(section: Dict) -> None:
    def timing(op, pass_name, threads):
        return next(_measurement(t) for t in section["timings"]
                    if (t["op"], t["pass"], t["threads"], t["layout"])
                    == (op, pass_name, threads, "channels_last"))

    for row in section["speedups"]:
        one = timing(row["op"], row["pass"], 1)
        many = timing(row["op"], row["pass"], row["threads"])
        row.update({k.replace("ratio", "speedup"): v for k, v in ratio(one, many).items()})


def recompute(results: Dict) -> Dict:
    """A copy of ``results`` (a run's ``results.json``) with every comparison, model ratio,
    thread speedup and target verdict recomputed from its stored per-round samples."""
    results = copy.deepcopy(results)
    for name in ("ops", "full_dk"):
        if name in results:
            _recompute_comparisons(results[name]["comparisons"], results[name]["timings"], name)
    cuda = results.get("cuda", {})
    if cuda.get("status") == "measured":
        _recompute_comparisons(cuda["comparisons"], cuda["timings"], "cuda")
        if cuda.get("full_dk"):
            _recompute_comparisons(cuda["full_dk"], cuda["full_dk_timings"], "cuda full DK")
    if results.get("model", {}).get("comparisons"):
        _recompute_model(results["model"])
    if "scaling" in results:
        _recompute_thread_speedups(results["scaling"]["threads"])
    results["targets"] = evaluate_targets(results, results["config"]["quick"])
    results["recomputed"] = RECOMPUTED_NOTE
    return results


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recompute",
        description="Recompute a benchmark run's ratios and verdicts from its stored samples and "
                    "rewrite its results.{json,md,png}.")
    parser.add_argument("folder", nargs="?", default="benchmarks",
                        help="folder of results.json (default benchmarks)")
    args = parser.parse_args(argv)
    import json

    paths = {name: os.path.join(args.folder, f"results.{name}") for name in ("json", "md", "png")}
    with open(paths["json"]) as f:
        results = recompute(json.load(f))
    write_json(results, paths["json"])
    plot_results(results, paths["png"])
    write_markdown(results, paths["md"], os.path.basename(paths["png"]))
    print(render_terminal(results))
    print("wrote " + ", ".join(paths.values()))
    return results


if __name__ == "__main__":
    main()
