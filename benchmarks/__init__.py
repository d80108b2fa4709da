"""The Deformable Kernel benchmark suite, a tool of the repository (not part of the installed
package): ``python -m benchmarks`` from the repository root (``make benchmark`` runs it with
``--output benchmarks``). This module is its command line; docs/notes/benchmark.md describes it.

Examples::

    python -m benchmarks --output benchmarks            # everything (minutes)
    python -m benchmarks --quick --output /tmp/bench    # tiny shapes, seconds
    python -m benchmarks --ops --repeats 5              # op level only

Sections (all when none is named; ``cuda`` only where a GPU is available): ``--ops`` (op
timings, full DK, memory), ``--scaling``, ``--model``, ``--cuda``. Writes ``results.json``,
``results.md`` and ``results.png`` under ``--output`` and prints the tables and targets.

Files: ``cases.py`` (shapes and workloads: what an op call is), ``measure.py`` (round-robin timer,
ratios, memory profiler, linear fit), ``sections.py`` (the op-level sections, CPU and CUDA),
``model.py`` (Mask R-CNN), ``report.py`` (targets, verdicts, tables, Markdown, JSON), ``plot.py``
(the figure), ``recompute.py`` (``python -m benchmarks.recompute``: the ratios and verdicts of a
stored run again, from its per-round samples).
"""

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import List, Optional

import torch
from tqdm import tqdm

from . import model, sections
from .cases import dk_ops_backend
from .plot import plot_results
from .report import evaluate_targets, render_terminal, write_json, write_markdown

# Section flag -> the sections it runs, in order (plain functions ``section(args, progress)``).
SECTIONS = {
    "ops": {"ops": sections.ops, "full_dk": sections.full_dk, "memory": sections.memory},
    "scaling": {"scaling": sections.scaling},
    "model": {"model": model.model},
    "cuda": {"cuda": sections.cuda},
}
# option: (default with --quick, default otherwise)
DEFAULTS = {
    "repeats": (2, 7),
    "slow_repeats": (1, 3),
    "model_repeats": (1, 3),
    "sample_time": (0.002, 0.02),
    "model_size": (64, 320),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Deformable Kernel benchmark suite: ratios to baselines measured in one run.",
    )
    for flag, sections in SECTIONS.items():
        parser.add_argument(f"--{flag}", action="store_true", help=f"run {', '.join(sections)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and few repeats (seconds; for tests, not for figures)")
    parser.add_argument("--repeats", type=int, help="timed rounds per op (default 7, --quick 2)")
    parser.add_argument("--slow-repeats", type=int,
                        help="rounds of torchvision's deform_conv2d (default 3, --quick 1); its "
                        "ratios use the DK timings of the same rounds")
    parser.add_argument("--model-repeats", type=int,
                        help="rounds of each model inference/training step (default 3, --quick 1)")
    parser.add_argument("--sample-time", type=float,
                        help="seconds a repeat lasts at least (calls are batched; default 0.02)")
    parser.add_argument("--skip-slow-baselines", action="store_true",
                        help="skip torchvision's deform_conv2d on big shapes (> 400k input "
                        "elements)")
    parser.add_argument("--model-size", type=int,
                        help="side of the square model input (default 320, --quick 64)")
    parser.add_argument("--model-config",
                        help="DK Mask R-CNN config (default: the shipped "
                        "COCO-InstanceSegmentation/)")
    parser.add_argument("--model-full-heads", action="store_true",
                        help="keep the config's proposal/detection counts (default: light heads, "
                        "a conservative DK/plain ratio)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (default torch.get_num_threads())")
    parser.add_argument("--output", default="benchmarks",
                        help="directory of results.{json,md,png}")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    for name, (quick, full) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.slow_repeats = min(args.slow_repeats, args.repeats)
    if min(args.repeats, args.slow_repeats, args.model_repeats, args.threads) < 1:
        parser.error("--repeats, --slow-repeats, --model-repeats and --threads must be positive")
    chosen = [flag for flag in SECTIONS if getattr(args, flag)]
    if not chosen:
        chosen = [flag for flag in SECTIONS if flag != "cuda" or torch.cuda.is_available()]
    args.sections = [section for flag in chosen for section in SECTIONS[flag]]
    args.command = " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks"]
                            + (sys.argv[1:] if argv is None else list(argv)))
    return args


def progress_factory(enabled: bool):
    def progress(total, desc):
        return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                    dynamic_ncols=True)

    return progress


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(
                        flags & {"avx2", "avx512f", "avx512bw", "avx512vl", "fma", "amx_tile"}
                    )
    except OSError:
        pass
    return []


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        return commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    import torchvision

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "dk_ops": dk_ops_backend(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["cudnn_version"] = torch.backends.cudnn.version()
    return info


CONFIG_KEYS = ("sections", "quick", "repeats", "slow_repeats", "model_repeats", "sample_time",
               "skip_slow_baselines", "model_size", "model_config", "model_full_heads", "threads",
               "command")


def run_benchmarks(args: argparse.Namespace) -> dict:
    """Runs the selected sections; returns the results dict (machine, config, sections, targets)."""
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {"machine": machine_info(), "config": {k: getattr(args, k) for k in CONFIG_KEYS}}
    progress = progress_factory(not args.no_progress)
    runners = {name: fn for sections in SECTIONS.values() for name, fn in sections.items()}
    for name in args.sections:
        section_start = time.time()
        results[name] = runners[name](args, progress)
        results[name]["seconds"] = time.time() - section_start
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["seconds"] = time.time() - started
    results["targets"] = evaluate_targets(results, args.quick)
    return results


def main(argv: Optional[List[str]] = None) -> dict:
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
