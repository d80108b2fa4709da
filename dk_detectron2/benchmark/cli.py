"""Command line of the benchmark suite.

Examples::

    python -m dk_detectron2.benchmark                       # everything (minutes)
    python -m dk_detectron2.benchmark --quick --output /tmp/bench   # tiny shapes, seconds
    python -m dk_detectron2.benchmark --ops --repeats 5     # op level only

Sections (all when none is named; ``cuda`` only where a GPU is available): ``--ops`` (op
timings, full DK, memory), ``--scaling``, ``--model``, ``--cuda``. Writes ``results.json``,
``results.md`` and ``results.png`` under ``--output`` and prints the tables and targets.
"""

import argparse
import os
import shlex
import sys
import time
from typing import List, Optional

import torch
from tqdm import tqdm

__all__ = ["main", "parse_args", "run_benchmarks"]

# Section flags -> registered sections, in the order they run.
SECTION_FLAGS = {
    "ops": ("ops", "full_dk", "memory"),
    "scaling": ("scaling",),
    "model": ("model",),
    "cuda": ("cuda",),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dk_detectron2.benchmark",
        description="Deformable Kernel benchmark suite: ratios to baselines measured in one run.",
    )
    for flag, sections in SECTION_FLAGS.items():
        parser.add_argument(f"--{flag}", action="store_true", help=f"run {', '.join(sections)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and few repeats (seconds; for tests, not for figures)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per op (default 7, --quick 2)"
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=None,
        help="repeats of torchvision's deform_conv2d (default 3, --quick 1)",
    )
    parser.add_argument(
        "--model-repeats",
        type=int,
        default=None,
        help="repeats of each model inference/training step (default 3, --quick 1)",
    )
    parser.add_argument(
        "--sample-time",
        type=float,
        default=None,
        help="seconds a repeat lasts at least (calls are batched; default 0.02)",
    )
    parser.add_argument(
        "--skip-slow-baselines",
        action="store_true",
        help="skip torchvision's deform_conv2d on big shapes (> 400k input elements)",
    )
    parser.add_argument(
        "--model-size",
        type=int,
        default=None,
        help="side of the square model input (default 320, --quick 64)",
    )
    parser.add_argument(
        "--model-config",
        default=None,
        help="DK Mask R-CNN config (default: configs/COCO-InstanceSegmentation/)",
    )
    parser.add_argument(
        "--model-full-heads",
        action="store_true",
        help="keep the config's proposal/detection counts (default: light heads, "
        "a conservative DK/plain ratio)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="intra-op threads (default torch.get_num_threads())",
    )
    parser.add_argument(
        "--judge",
        choices=("min", "median"),
        default="min",
        help="ratio that decides PASS/MISS (both are reported)",
    )
    parser.add_argument("--output", default="benchmarks", help="directory of results.{json,md,png}")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    defaults = dict(
        repeats=(2, 7),
        slow_repeats=(1, 3),
        model_repeats=(1, 3),
        sample_time=(0.002, 0.02),
        model_size=(64, 320),
    )
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.slow_repeats = min(args.slow_repeats, args.repeats)
    if min(args.repeats, args.slow_repeats, args.model_repeats, args.threads) < 1:
        parser.error("--repeats, --slow-repeats, --model-repeats and --threads must be positive")
    chosen = [flag for flag in SECTION_FLAGS if getattr(args, flag)]
    if not chosen:
        chosen = [flag for flag in SECTION_FLAGS if flag != "cuda" or torch.cuda.is_available()]
    args.sections = [section for flag in chosen for section in SECTION_FLAGS[flag]]
    args.command = " ".join(
        shlex.quote(a)
        for a in ["python", "-m", "dk_detectron2.benchmark"]
        + (sys.argv[1:] if argv is None else list(argv))
    )
    return args


def _progress_factory(enabled: bool):
    def progress(total, desc):
        return tqdm(
            total=total,
            desc=desc,
            disable=not enabled,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    return progress


def run_benchmarks(args: argparse.Namespace) -> dict:
    """Runs the selected sections; returns the results dict (machine, config, sections, targets)."""
    from .machine import machine_info
    from .sections import SECTION_REGISTRY
    from .targets import evaluate_targets

    torch.set_num_threads(args.threads)
    started = time.time()
    results = {
        "machine": machine_info(),
        "config": {
            key: getattr(args, key)
            for key in (
                "sections",
                "quick",
                "repeats",
                "slow_repeats",
                "model_repeats",
                "sample_time",
                "skip_slow_baselines",
                "model_size",
                "model_config",
                "model_full_heads",
                "threads",
                "judge",
                "command",
            )
        },
    }
    progress = _progress_factory(not args.no_progress)
    for name in args.sections:
        section_start = time.time()
        results[name] = SECTION_REGISTRY.get(name)(args, progress)
        results[name]["seconds"] = time.time() - section_start
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["seconds"] = time.time() - started
    results["targets"] = evaluate_targets(results, args.judge, args.quick)
    return results


def main(argv: Optional[List[str]] = None) -> dict:
    from .plot import plot_results
    from .report import render_terminal, write_json, write_markdown

    args = parse_args(argv)
    results = run_benchmarks(args)
    os.makedirs(args.output, exist_ok=True)
    paths = {name: os.path.join(args.output, f"results.{name}") for name in ("json", "md", "png")}
    write_json(results, paths["json"])
    plot_results(results, paths["png"])
    write_markdown(results, paths["md"], os.path.basename(paths["png"]))
    print(render_terminal(results))
    print(f"\n{results['seconds']:.0f} s; wrote " + ", ".join(paths.values()))
    return results
