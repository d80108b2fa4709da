"""Scaling: time against H*W (it should be linear) and against the number of threads.

- ``hw``: ``deform_kernel2d`` and the depthwise ``conv2d`` (headline B, C, K, S, G; both layouts,
  each at its fastest) at several spatial sizes, timed round-robin. A least-squares fit
  ``t = a + b*H*W`` gives R^2 (1 = perfectly linear) and the time per output element.
- ``threads``: the headline shape at 1, 2 and all threads (``--threads``, default the
  process's ``torch.get_num_threads()``), every thread count timed round-robin (the callable sets
  ``torch.set_num_threads`` before each call). ``speedup`` is t(1 thread) / t(n threads).
"""

import itertools
from dataclasses import replace

import torch

from ..comparison import PASSES, measurement_rows, timing_key, workload_callables
from ..shapes import headline_shape, scaling_sizes
from ..timing import time_interleaved
from ..workloads import LAYOUTS, build_workload
from .registry import SECTION_REGISTRY

SCALING_OPS = ("deform_kernel2d", "conv2d")


def linear_fit(xs, ys):
    """Least squares ``y = a + b*x``; returns (a, b, r2)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    return intercept, slope, (1.0 - ss_res / ss_tot) if ss_tot else 1.0


def _hw_scaling(args, progress):
    base = headline_shape(args.quick)
    callables, owner = {}, {}
    for size, op, layout in itertools.product(scaling_sizes(args.quick), SCALING_OPS, LAYOUTS):
        for key, fn in workload_callables(
            build_workload(op, replace(base, size=size), layout)
        ).items():
            callables[f"{size}|{key}"] = fn
            owner[f"{size}|{key}"] = size
    bar = progress(total=args.repeats, desc="scaling H*W")
    measured = time_interleaved(
        callables, args.repeats, args.sample_time, device="cpu", on_round=lambda: bar.update(1)
    )
    bar.close()
    rows, fits = [], []
    for size in scaling_sizes(args.quick):
        mine = {k.split("|", 1)[1]: m for k, m in measured.items() if owner[k] == size}
        rows += measurement_rows(
            mine,
            shape=replace(base, size=size).to_dict(),
            device="cpu",
            dtype="float32",
            hw=size * size,
        )
    for op, pass_name in itertools.product(SCALING_OPS, PASSES):
        points = []
        for size in scaling_sizes(args.quick):
            best = min(
                measured[f"{size}|" + timing_key(op, l, pass_name)].median_ms for l in LAYOUTS
            )
            points.append((size * size, best))
        intercept, slope, r2 = linear_fit([p[0] for p in points], [p[1] for p in points])
        elements = base.batch * base.channels
        fits.append(
            {
                "op": op,
                "pass": pass_name,
                "hw": [p[0] for p in points],
                "median_ms": [p[1] for p in points],
                "intercept_ms": intercept,
                "ms_per_hw": slope,
                "r2": r2,
                "ns_per_output_element": [1e6 * t / (hw * elements) for hw, t in points],
            }
        )
    return {"timings": rows, "fits": fits, "shape": base.to_dict()}


def _with_threads(fn, threads):
    def run():
        torch.set_num_threads(threads)
        return fn()

    return run


def _thread_scaling(args, progress):
    shape = headline_shape(args.quick)
    all_threads = args.threads
    counts = sorted({1, min(2, all_threads), all_threads})
    callables = {}
    for count, op in itertools.product(counts, SCALING_OPS):
        layout = "channels_last"
        for key, fn in workload_callables(build_workload(op, shape, layout)).items():
            callables[f"{count}|{key}"] = _with_threads(fn, count)
    bar = progress(total=args.repeats, desc="scaling threads")
    try:
        measured = time_interleaved(
            callables, args.repeats, args.sample_time, device="cpu", on_round=lambda: bar.update(1)
        )
    finally:
        torch.set_num_threads(all_threads)
        bar.close()
    rows, speedups = [], []
    for key, measurement in measured.items():
        count, rest = key.split("|", 1)
        measurement.threads = int(count)
        rows += measurement_rows(
            {rest: measurement}, shape=shape.to_dict(), device="cpu", dtype="float32"
        )
    for op, pass_name, count in itertools.product(SCALING_OPS, PASSES, counts):
        one = measured[f"1|" + timing_key(op, "channels_last", pass_name)]
        many = measured[f"{count}|" + timing_key(op, "channels_last", pass_name)]
        speedups.append(
            {
                "op": op,
                "pass": pass_name,
                "threads": count,
                "layout": "channels_last",
                "speedup_min": one.min_ms / many.min_ms,
                "speedup_median": one.median_ms / many.median_ms,
            }
        )
    return {
        "timings": rows,
        "speedups": speedups,
        "thread_counts": counts,
        "shape": shape.to_dict(),
    }


@SECTION_REGISTRY.register()
def scaling(args, progress):
    return {"hw": _hw_scaling(args, progress), "threads": _thread_scaling(args, progress)}
