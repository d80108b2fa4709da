"""The CPU sections: op timings, full DK, peak memory, and scaling with H*W and threads.

Every section is a function ``section(args, progress) -> dict`` (JSON-serialisable); ``args`` is
the parsed command line (``benchmarks/__main__.py``), ``progress(total, desc)`` makes a tqdm bar.

- :func:`ops`: for each ResNet-50 stage (batch, channels, size) every callable of that stage --
  the baselines once, the DK operators for every (S, G), each in both layouts and both passes --
  is timed round-robin in one :func:`~measure.time_interleaved` call. Comparisons (op / baseline,
  each at its fastest layout, over the rounds both ran): ``deform_kernel2d`` / depthwise
  ``conv2d``; ``deform_kernel_conv2d`` / ``torchvision.ops.deform_conv2d`` (NCHW; two to three
  orders of magnitude slower, so it gets ``--slow-repeats`` rounds and the DK side is compared
  over those same rounds); ``global_deform_kernel2d`` / depthwise ``conv2d``.
- :func:`full_dk`: the full (groups 1) DK against the dense ``F.conv2d``.
- :func:`memory`: each (operator, shape, layout, pass) once under the memory profiler; ``extra``
  is what it held at its peak beyond the output (and gradients) it returns, also as a fraction of
  the output and of a per-tap column buffer ``[B, C*K*K, Ho, Wo]``.
- :func:`scaling`: time against H*W (least-squares fit, R^2) and speedup with threads.
"""

import itertools
from collections import defaultdict
from dataclasses import replace

import torch

from .cases import (
    LAYOUTS,
    PASSES,
    build_workload,
    full_dk_shape,
    headline_shape,
    measurement_rows,
    op_shapes,
    scaling_sizes,
    timing_key,
    workload_callables,
)
from .measure import compare, linear_fit, measure_memory, ratio, time_interleaved

# (operation, its baseline, the baseline's layouts)
COMPARISONS = (
    ("deform_kernel2d", "conv2d", LAYOUTS),
    ("deform_kernel_conv2d", "torchvision_deform_conv2d", ("nchw",)),
    ("global_deform_kernel2d", "conv2d", LAYOUTS),
)
DK_OPS = ("deform_kernel2d", "deform_kernel_conv2d", "global_deform_kernel2d")
MEMORY_OPS = ("deform_kernel2d", "deform_kernel_conv2d", "global_deform_kernel2d", "conv2d")
SCALING_OPS = ("deform_kernel2d", "conv2d")
# torchvision's deform_conv2d takes ~1.5 s forward+backward at B8 C64 56x56 (12.5 MB of input);
# --skip-slow-baselines skips it above this many input elements.
SLOW_BASELINE_MAX_ELEMENTS = 400_000


def skip_torchvision(args, shape) -> bool:
    elements = shape.batch * shape.channels * shape.size**2
    return args.skip_slow_baselines and elements > SLOW_BASELINE_MAX_ELEMENTS


def _compare_passes(shape, op, baseline, measured, op_layouts, base_layouts):
    """One comparison row per pass of ``op`` against ``baseline`` (both keyed op/layout/pass)."""
    rows = []
    for pass_name in PASSES:
        row = {"shape": shape.to_dict(), "op": op, "baseline": baseline, "pass": pass_name}
        base = {l: measured[timing_key(baseline, l, pass_name)] for l in base_layouts
                if timing_key(baseline, l, pass_name) in measured}
        if not base:
            row["skipped"] = "baseline skipped (--skip-slow-baselines)"
        else:
            row.update(compare({l: measured[timing_key(op, l, pass_name)] for l in op_layouts}, base))
        rows.append(row)
    return rows


def ops(args, progress):
    stages = defaultdict(list)
    for shape in op_shapes(args.quick):
        stages[shape.stage_key].append(shape)
    timings, comparisons = [], []
    bar = progress(total=len(stages) * args.repeats, desc="ops (CPU)")
    for stage_shapes in stages.values():
        stage = stage_shapes[0]
        callables, repeats, owner = {}, {}, {}
        baselines = [build_workload("conv2d", stage, layout) for layout in LAYOUTS]
        if not skip_torchvision(args, stage):
            baselines.append(build_workload("torchvision_deform_conv2d", stage, "nchw"))
        for workload in baselines:
            slow = workload.name == "torchvision_deform_conv2d"
            for key, fn in workload_callables(workload).items():
                callables["baseline|" + key] = fn
                repeats["baseline|" + key] = args.slow_repeats if slow else args.repeats
        for index, (shape, op, layout) in enumerate(
            itertools.product(stage_shapes, DK_OPS, LAYOUTS)
        ):
            for key, fn in workload_callables(build_workload(op, shape, layout)).items():
                callables[f"{index}|{key}"] = fn
                repeats[f"{index}|{key}"] = args.repeats
                owner[f"{index}|{key}"] = shape
        measured = time_interleaved(
            callables, repeats, args.sample_time, device="cpu", on_round=lambda: bar.update(1)
        )
        base = {k.split("|", 1)[1]: m for k, m in measured.items() if k.startswith("baseline|")}
        timings += measurement_rows(
            base, shape=stage.to_dict(), device="cpu", dtype="float32", shared_baseline=True
        )
        for shape in stage_shapes:
            mine = {k.split("|", 1)[1]: m for k, m in measured.items() if owner.get(k) is shape}
            timings += measurement_rows(mine, shape=shape.to_dict(), device="cpu", dtype="float32")
            for op, baseline, base_layouts in COMPARISONS:
                comparisons += _compare_passes(
                    shape, op, baseline, {**mine, **base}, LAYOUTS, base_layouts
                )
    bar.close()
    return {"timings": timings, "comparisons": comparisons}


def full_dk(args, progress):
    """Full Deformable Kernel (groups 1: weight [C, C, S, S]) against ``F.conv2d``: B 8, C 256,
    28x28, K 3, S 4, G 1 (tiny with ``--quick``), both layouts, round-robin."""
    shape = full_dk_shape(args.quick)
    callables = {}
    for op, layout in itertools.product(("deform_kernel2d", "conv2d"), LAYOUTS):
        callables.update(workload_callables(build_workload(op, shape, layout)))
    bar = progress(total=args.repeats, desc="full DK (CPU)")
    measured = time_interleaved(
        callables, args.repeats, args.sample_time, device="cpu", on_round=lambda: bar.update(1)
    )
    bar.close()
    return {
        "shape": shape.to_dict(),
        "timings": measurement_rows(measured, shape=shape.to_dict(), device="cpu", dtype="float32"),
        "comparisons": _compare_passes(shape, "deform_kernel2d", "conv2d", measured, LAYOUTS,
                                       LAYOUTS),
    }


def _memory_row(workload, shape, pass_name):
    fn = workload.forward_fn() if pass_name == "forward" else workload.forward_backward_fn()
    record = measure_memory(fn, "cpu")
    output_bytes = workload.grad_output.numel() * workload.grad_output.element_size()
    row = {"shape": shape.to_dict(), "op": workload.name, "layout": workload.layout,
           "pass": pass_name}
    row.update(record.to_dict(), output_bytes=output_bytes)
    row["extra_per_output"] = record.extra_bytes / output_bytes
    row["column_buffer_bytes"] = workload.column_buffer_bytes
    if workload.column_buffer_bytes is not None:
        row["extra_per_column_buffer"] = record.extra_bytes / workload.column_buffer_bytes
    return row


def memory(args, progress):
    shapes = op_shapes(args.quick)
    jobs = [(s, op, layout) for s in shapes for op, layout in itertools.product(MEMORY_OPS, LAYOUTS)]
    jobs += [(s, "torchvision_deform_conv2d", "nchw") for s in shapes
             if not skip_torchvision(args, s)]
    jobs += [(full_dk_shape(args.quick), "deform_kernel2d", layout) for layout in LAYOUTS]
    rows, plain_done = [], set()
    bar = progress(total=len(jobs), desc="memory (CPU)")
    for shape, op, layout in jobs:
        bar.update(1)
        if op in ("conv2d", "torchvision_deform_conv2d"):
            if (op, layout, shape.stage_key) in plain_done:  # they do not depend on S or G
                continue
            plain_done.add((op, layout, shape.stage_key))
        workload = build_workload(op, shape, layout)
        rows += [_memory_row(workload, shape, p) for p in PASSES]
    bar.close()
    checked = [r for r in rows if "extra_per_column_buffer" in r]
    return {
        "rows": rows,
        "threads": 1,
        # Over every depthwise DK row: the largest total extra memory, per column buffer and
        # per output (the report judges these against its targets).
        "worst_extra_per_column_buffer": max(r["extra_per_column_buffer"] for r in checked),
        "worst_extra_per_output": max(r["extra_per_output"] for r in checked),
    }


def _hw_scaling(args, progress):
    base = headline_shape(args.quick)
    sizes = scaling_sizes(args.quick)
    callables = {}
    for size, op, layout in itertools.product(sizes, SCALING_OPS, LAYOUTS):
        workload = build_workload(op, replace(base, size=size), layout)
        callables.update({f"{size}|{key}": fn for key, fn in workload_callables(workload).items()})
    bar = progress(total=args.repeats, desc="scaling H*W")
    measured = time_interleaved(
        callables, args.repeats, args.sample_time, device="cpu", on_round=lambda: bar.update(1)
    )
    bar.close()
    rows, fits = [], []
    for size in sizes:
        mine = {k.split("|", 1)[1]: m for k, m in measured.items() if k.startswith(f"{size}|")}
        rows += measurement_rows(mine, shape=replace(base, size=size).to_dict(), device="cpu",
                                 dtype="float32", hw=size * size)
    for op, pass_name in itertools.product(SCALING_OPS, PASSES):
        points = [
            (size * size,
             min(measured[f"{size}|" + timing_key(op, l, pass_name)].median_ms for l in LAYOUTS))
            for size in sizes
        ]
        intercept, slope, r2 = linear_fit([p[0] for p in points], [p[1] for p in points])
        elements = base.batch * base.channels
        fits.append({
            "op": op, "pass": pass_name,
            "hw": [p[0] for p in points], "median_ms": [p[1] for p in points],
            "intercept_ms": intercept, "ms_per_hw": slope, "r2": r2,
            "ns_per_output_element": [1e6 * t / (hw * elements) for hw, t in points],
        })
    return {"timings": rows, "fits": fits, "shape": base.to_dict()}


def _with_threads(fn, threads):
    def run():
        torch.set_num_threads(threads)
        return fn()

    return run


def _thread_scaling(args, progress):
    """The headline shape at 1, 2 and all threads (``--threads``), every count timed round-robin
    (the callable sets ``torch.set_num_threads`` before each call); speedup = t(1) / t(n)."""
    shape = headline_shape(args.quick)
    all_threads = args.threads
    counts = sorted({1, min(2, all_threads), all_threads})
    callables = {}
    for count, op in itertools.product(counts, SCALING_OPS):
        for key, fn in workload_callables(build_workload(op, shape, "channels_last")).items():
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
        rows += measurement_rows({rest: measurement}, shape=shape.to_dict(), device="cpu",
                                 dtype="float32")
    for op, pass_name, count in itertools.product(SCALING_OPS, PASSES, counts):
        one = measured["1|" + timing_key(op, "channels_last", pass_name)]
        many = measured[f"{count}|" + timing_key(op, "channels_last", pass_name)]
        # speedup = t(1) / t(n): the ratio of the one-thread timing to the n-thread one
        speedup = {k.replace("ratio", "speedup"): v for k, v in ratio(one, many).items()}
        speedups.append({"op": op, "pass": pass_name, "threads": count, "layout": "channels_last",
                         **speedup})
    return {"timings": rows, "speedups": speedups, "thread_counts": counts,
            "shape": shape.to_dict()}


def scaling(args, progress):
    return {"hw": _hw_scaling(args, progress), "threads": _thread_scaling(args, progress)}
