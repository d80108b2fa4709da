"""The op-level sections: CPU op timings, full DK, peak memory, scaling, and the same on a GPU.

Every section is a function ``section(args, progress) -> dict`` (JSON-serialisable); ``args`` is
the parsed command line (:func:`benchmarks.parse_args`), ``progress(total, desc)`` makes a bar.

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
- :func:`cuda` (only where ``torch.cuda.is_available()``): the ops and the full DK in float32,
  float16 and bfloat16 against cuDNN, timed the same way with CUDA synchronisation around each
  repeat, and the achieved DRAM bandwidth: the compulsory traffic of
  :meth:`cases.Workload.bytes_moved` over the median time, as a fraction of the device's peak
  (:func:`peak_bandwidth`).
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

# (operation, its baseline, the baseline's layouts); the CUDA section leaves out the global DK.
COMPARISONS = (
    ("deform_kernel2d", "conv2d", LAYOUTS),
    ("deform_kernel_conv2d", "torchvision_deform_conv2d", ("nchw",)),
    ("global_deform_kernel2d", "conv2d", LAYOUTS),
)
CUDA_COMPARISONS = COMPARISONS[:2]
BASELINES = [("conv2d", layout) for layout in LAYOUTS] + [("torchvision_deform_conv2d", "nchw")]
MEMORY_OPS = ("deform_kernel2d", "deform_kernel_conv2d", "global_deform_kernel2d", "conv2d")
SCALING_OPS = ("deform_kernel2d", "conv2d")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torchvision's deform_conv2d takes ~1.5 s forward+backward at B8 C64 56x56 (12.5 MB of input);
# --skip-slow-baselines skips it above this many input elements.
SLOW_BASELINE_MAX_ELEMENTS = 400_000

# Peak DRAM bandwidth in bytes/s by device-name substring; the first match wins, so the more
# specific names come first.
PEAK_DRAM_BANDWIDTH = (
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80 GB HBM3
    ("H800", 3.35e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB, SXM4 and PCIe
    ("A800", 2.039e12), ("L40S", 0.864e12), ("L40", 0.864e12), ("L4", 0.300e12),
    ("A10G", 0.600e12), ("A10", 0.600e12), ("V100", 0.900e12), ("T4", 0.320e12),
    ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12),
)


def skip_torchvision(args, shape) -> bool:
    elements = shape.batch * shape.channels * shape.size**2
    return args.skip_slow_baselines and elements > SLOW_BASELINE_MAX_ELEMENTS


def _compare_passes(shape, op, baseline, measured, base_layouts, skipped=None, **common):
    """One comparison row per pass of ``op`` (at any of LAYOUTS) against ``baseline`` (at any of
    ``base_layouts``), both keyed op/layout/pass in ``measured``. A side that was not measured
    gives a row saying ``skipped`` when given, else no row."""
    rows = []
    for pass_name in PASSES:
        side = lambda name, layouts: {  # noqa: E731
            l: measured[timing_key(name, l, pass_name)] for l in layouts
            if timing_key(name, l, pass_name) in measured}
        mine, base = side(op, LAYOUTS), side(baseline, base_layouts)
        row = {"shape": shape.to_dict(), "op": op, "baseline": baseline, "pass": pass_name}
        if mine and base:
            rows.append(dict(row, **compare(mine, base), **common))
        elif skipped is not None:
            rows.append(dict(row, skipped=skipped))
    return rows


def _time_stage(args, stage_shapes, dk_ops, device, dtype, torchvision_rounds, on_round,
                errors=None):
    """Times one stage round-robin: its baselines once (torchvision's deform_conv2d for
    ``torchvision_rounds`` rounds, none when 0) and every DK op of ``dk_ops`` on every shape of
    the stage, in both layouts and both passes.

    With ``errors`` (a list), a baseline that fails its first call is left out and its error
    appended (a dtype torchvision does not support); the DK ops' errors raise. Returns (baseline
    measurements, {shape: its DK measurements}, {(shape, key): DK workload}), keyed
    op/layout/pass."""
    callables, repeats, owner, workloads = {}, {}, {}, {}

    def add(prefix, name, shape, layout, rounds):
        tolerant = errors is not None and prefix == "baseline"
        try:
            workload = build_workload(name, shape, layout, dtype, device)
            if tolerant:
                workload.forward_fn()()
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
            if not tolerant:
                raise
            errors.append(f"{name} {shape.label()} {layout} {dtype}: "
                          f"{type(error).__name__}: {error}")
            return
        for key, fn in workload_callables(workload).items():
            callables[f"{prefix}|{key}"], repeats[f"{prefix}|{key}"] = fn, rounds
            owner[f"{prefix}|{key}"], workloads[(shape, key)] = shape, workload

    for name, layout in BASELINES:
        rounds = torchvision_rounds if name == "torchvision_deform_conv2d" else args.repeats
        if rounds:
            add("baseline", name, stage_shapes[0], layout, rounds)
    for index, (shape, op, layout) in enumerate(itertools.product(stage_shapes, dk_ops, LAYOUTS)):
        add(index, op, shape, layout, args.repeats)
    measured = time_interleaved(callables, repeats, args.sample_time, device=device,
                                on_round=on_round) if callables else {}
    part = lambda keep: {k.split("|", 1)[1]: m for k, m in measured.items() if keep(k)}  # noqa
    base = part(lambda k: k.startswith("baseline|"))
    per_shape = {shape: part(lambda k: not k.startswith("baseline|") and owner[k] is shape)
                 for shape in stage_shapes}
    return base, per_shape, workloads


def _stages(quick):
    stages = defaultdict(list)
    for shape in op_shapes(quick):
        stages[shape.stage_key].append(shape)
    return list(stages.values())


def ops(args, progress):
    stages = _stages(args.quick)
    timings, comparisons = [], []
    bar = progress(total=len(stages) * args.repeats, desc="ops (CPU)")
    dk_ops = [op for op, _, _ in COMPARISONS]
    cpu = torch.device("cpu")
    for stage_shapes in stages:
        slow = 0 if skip_torchvision(args, stage_shapes[0]) else args.slow_repeats
        base, per_shape, _ = _time_stage(args, stage_shapes, dk_ops, cpu, torch.float32, slow,
                                         lambda: bar.update(1))
        common = dict(device="cpu", dtype="float32")
        timings += measurement_rows(base, shape=stage_shapes[0].to_dict(), shared_baseline=True,
                                    **common)
        for shape, mine in per_shape.items():
            timings += measurement_rows(mine, shape=shape.to_dict(), **common)
            for op, baseline, base_layouts in COMPARISONS:
                comparisons += _compare_passes(shape, op, baseline, {**mine, **base}, base_layouts,
                                               skipped="baseline skipped (--skip-slow-baselines)")
    bar.close()
    return {"timings": timings, "comparisons": comparisons}


def _time_full_dk(args, device, dtype, on_round=None):
    """The full DK shape's ``deform_kernel2d`` and ``F.conv2d``, both layouts, round-robin."""
    shape = full_dk_shape(args.quick)
    callables = {}
    for op, layout in itertools.product(("deform_kernel2d", "conv2d"), LAYOUTS):
        callables.update(workload_callables(build_workload(op, shape, layout, dtype, device)))
    measured = time_interleaved(callables, args.repeats, args.sample_time, device=device,
                                on_round=on_round)
    return shape, measured


def full_dk(args, progress):
    """Full Deformable Kernel (groups 1: weight [C, C, S, S]) against ``F.conv2d``: B 8, C 256,
    28x28, K 3, S 4, G 1 (tiny with ``--quick``), both layouts, round-robin."""
    bar = progress(total=args.repeats, desc="full DK (CPU)")
    shape, measured = _time_full_dk(args, torch.device("cpu"), torch.float32,
                                    lambda: bar.update(1))
    bar.close()
    return {
        "shape": shape.to_dict(),
        "timings": measurement_rows(measured, shape=shape.to_dict(), device="cpu", dtype="float32"),
        "comparisons": _compare_passes(shape, "deform_kernel2d", "conv2d", measured, LAYOUTS),
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
    jobs = [(s, op, layout) for s in shapes
            for op, layout in itertools.product(MEMORY_OPS, LAYOUTS)]
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


def peak_bandwidth(device=None):
    """(bytes/s, source) of the device's peak DRAM bandwidth: the table above, else the memory
    clock and bus width the driver reports (double data rate), else (None, reason)."""
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_DRAM_BANDWIDTH:
        if key.lower() in name.lower():
            return value, f"table ({key})"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width"
    return None, f"unknown device {name!r}: add it to PEAK_DRAM_BANDWIDTH"


def benchmark_device() -> torch.device:
    """The device the CUDA section measures (a function, so tests can stand the CPU in for it)."""
    return torch.device("cuda")


def cuda(args, progress):
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "torch.cuda.is_available() is False"}
    device = benchmark_device()
    peak, peak_source = peak_bandwidth(device)
    result = {"status": "measured", "device_name": torch.cuda.get_device_name(device),
              "peak_bandwidth_bytes_per_s": peak, "peak_bandwidth_source": peak_source,
              "timings": [], "comparisons": [], "errors": [], "full_dk": [],
              "full_dk_timings": []}
    stages = _stages(args.quick)
    bar = progress(total=len(stages) * len(DTYPES) * args.repeats + len(DTYPES), desc="ops (CUDA)")
    dk_ops = [op for op, _, _ in CUDA_COMPARISONS]
    for (dtype_name, dtype), stage_shapes in itertools.product(DTYPES.items(), stages):
        base, per_shape, workloads = _time_stage(args, stage_shapes, dk_ops, device, dtype,
                                                 args.repeats, lambda: bar.update(1),
                                                 result["errors"])
        common = dict(device="cuda", dtype=dtype_name)
        result["timings"] += measurement_rows(base, shape=stage_shapes[0].to_dict(),
                                              shared_baseline=True, **common)
        for shape, mine in per_shape.items():
            for key, measurement in mine.items():
                row = measurement_rows({key: measurement}, shape=shape.to_dict(), **common)[0]
                moved = workloads[(shape, key)].bytes_moved(row["pass"] == "forward_backward")
                row["bytes_moved"] = moved
                row["bandwidth_bytes_per_s"] = moved / (measurement.median_ms * 1e-3)
                row["bandwidth_fraction"] = row["bandwidth_bytes_per_s"] / peak if peak else None
                result["timings"].append(row)
            for op, baseline, base_layouts in CUDA_COMPARISONS:
                result["comparisons"] += _compare_passes(shape, op, baseline, {**mine, **base},
                                                         base_layouts, **common)
    for dtype_name, dtype in DTYPES.items():
        shape, measured = _time_full_dk(args, device, dtype)
        bar.update(1)
        # the per-round samples, so that benchmarks.recompute can rebuild the ratios
        result["full_dk_timings"] += measurement_rows(measured, shape=shape.to_dict(),
                                                      device="cuda", dtype=dtype_name)
        result["full_dk"] += _compare_passes(shape, "deform_kernel2d", "conv2d", measured,
                                             LAYOUTS, dtype=dtype_name, status="measured")
    bar.close()
    return result
