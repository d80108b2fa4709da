"""The op benchmarks on a GPU: float32, float16 and bfloat16 against cuDNN, with DRAM bandwidth.

Runs only where ``torch.cuda.is_available()``. For each stage (batch, channels, size) and dtype,
the DK operators (every S, G and layout) and the baselines (cuDNN depthwise ``conv2d`` in both
layouts; torchvision's ``deform_conv2d`` for the DK+DCN operator) are timed round-robin with CUDA
synchronisation around each repeat. Achieved bandwidth is the compulsory traffic of
:meth:`cases.Workload.bytes_moved` over the median time, and its
fraction of the device's peak DRAM bandwidth (:func:`peak_bandwidth`). The full DK shape is
compared with cuDNN's dense ``conv2d`` the same way.
"""

import itertools
from collections import defaultdict

import torch

from .cases import (
    LAYOUTS,
    PASSES,
    build_workload,
    full_dk_shape,
    measurement_rows,
    op_shapes,
    timing_key,
    workload_callables,
)
from .measure import compare, time_interleaved

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CUDA_COMPARISONS = (
    ("deform_kernel2d", "conv2d", LAYOUTS),
    ("deform_kernel_conv2d", "torchvision_deform_conv2d", ("nchw",)),
)

# Peak DRAM bandwidth in bytes/s by device-name substring; the first match wins, so the more
# specific names come first.
PEAK_DRAM_BANDWIDTH = (
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80 GB HBM3
    ("H800", 3.35e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB, SXM4 and PCIe
    ("A800", 2.039e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("L4", 0.300e12),
    ("A10G", 0.600e12),
    ("A10", 0.600e12),
    ("V100", 0.900e12),
    ("T4", 0.320e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
)


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
    """The device the section measures (a function, so tests can stand the CPU in for it)."""
    return torch.device("cuda")


def _probed_callables(name, shape, layout, dtype, device, errors):
    """``{key: callable}`` of one workload, or {} (and an error line) if it cannot run."""
    try:
        workload = build_workload(name, shape, layout, dtype, device)
        workload.forward_fn()()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
        errors.append(f"{name} {shape.label()} {layout} {dtype}: {type(error).__name__}: {error}")
        return None, {}
    return workload, workload_callables(workload)


def _stage_callables(stage_shapes, dtype, device):
    """All callables of one stage: baselines keyed "baseline|...", DK ops keyed "<index>|..."."""
    stage = stage_shapes[0]
    callables, owner, workloads, errors = {}, {}, {}, []
    for name, layout in [("conv2d", l) for l in LAYOUTS] + [("torchvision_deform_conv2d", "nchw")]:
        _, fns = _probed_callables(name, stage, layout, dtype, device, errors)
        callables.update({"baseline|" + key: fn for key, fn in fns.items()})
    for index, (shape, (op, _, _), layout) in enumerate(
        itertools.product(stage_shapes, CUDA_COMPARISONS, LAYOUTS)
    ):
        workload, fns = _probed_callables(op, shape, layout, dtype, device, errors)
        for key, fn in fns.items():
            callables[f"{index}|{key}"] = fn
            owner[f"{index}|{key}"] = shape
            workloads[f"{index}|{key}"] = workload
    return callables, owner, workloads, errors


def cuda(args, progress):
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "torch.cuda.is_available() is False"}
    device = benchmark_device()
    peak, peak_source = peak_bandwidth(device)
    result = {
        "status": "measured",
        "device_name": torch.cuda.get_device_name(device),
        "peak_bandwidth_bytes_per_s": peak,
        "peak_bandwidth_source": peak_source,
        "timings": [],
        "comparisons": [],
        "errors": [],
    }
    stages = defaultdict(list)
    for shape in op_shapes(args.quick):
        stages[shape.stage_key].append(shape)
    bar = progress(total=len(stages) * len(DTYPES) * args.repeats + 1, desc="ops (CUDA)")
    for (dtype_name, dtype), stage_shapes in itertools.product(DTYPES.items(), stages.values()):
        callables, owner, workloads, errors = _stage_callables(stage_shapes, dtype, device)
        result["errors"] += errors
        if not callables:
            continue
        measured = time_interleaved(
            callables, args.repeats, args.sample_time, device=device, on_round=lambda: bar.update(1)
        )
        baselines = {
            k.split("|", 1)[1]: m for k, m in measured.items() if k.startswith("baseline|")
        }
        common = dict(device="cuda", dtype=dtype_name)
        result["timings"] += measurement_rows(
            baselines, shape=stage_shapes[0].to_dict(), shared_baseline=True, **common
        )
        for key, measurement in measured.items():
            if key in owner:
                row = measurement_rows(
                    {key.split("|", 1)[1]: measurement}, shape=owner[key].to_dict(), **common
                )[0]
                moved = workloads[key].bytes_moved(row["pass"] == "forward_backward")
                row["bytes_moved"] = moved
                row["bandwidth_bytes_per_s"] = moved / (measurement.median_ms * 1e-3)
                row["bandwidth_fraction"] = row["bandwidth_bytes_per_s"] / peak if peak else None
                result["timings"].append(row)
        for shape in stage_shapes:
            mine = {k.split("|", 1)[1]: m for k, m in measured.items() if owner.get(k) is shape}
            for (op, base, base_layouts), pass_name in itertools.product(CUDA_COMPARISONS, PASSES):
                base_times = {
                    l: baselines[timing_key(base, l, pass_name)]
                    for l in base_layouts
                    if timing_key(base, l, pass_name) in baselines
                }
                op_times = {
                    l: mine[timing_key(op, l, pass_name)]
                    for l in LAYOUTS
                    if timing_key(op, l, pass_name) in mine
                }
                if not base_times or not op_times:
                    continue
                row = {"shape": shape.to_dict(), "op": op, "baseline": base, "pass": pass_name}
                row.update(compare(op_times, base_times), **common)
                result["comparisons"].append(row)
    result["full_dk"] = _full_dk(args, device)
    bar.update(1)
    bar.close()
    return result


def _full_dk(args, device):
    shape = full_dk_shape(args.quick)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        try:
            callables = {}
            for op, layout in itertools.product(("deform_kernel2d", "conv2d"), LAYOUTS):
                callables.update(
                    workload_callables(build_workload(op, shape, layout, dtype, device))
                )
            measured = time_interleaved(callables, args.repeats, args.sample_time, device=device)
        except (ValueError, RuntimeError, NotImplementedError) as error:
            rows.append(
                {
                    "dtype": dtype_name,
                    "status": "unsupported",
                    "error": f"{type(error).__name__}: {error}",
                }
            )
            continue
        for pass_name in PASSES:
            row = {
                "shape": shape.to_dict(),
                "dtype": dtype_name,
                "pass": pass_name,
                "op": "deform_kernel2d",
                "baseline": "conv2d",
                "status": "measured",
            }
            row.update(
                compare(
                    {l: measured[timing_key("deform_kernel2d", l, pass_name)] for l in LAYOUTS},
                    {l: measured[timing_key("conv2d", l, pass_name)] for l in LAYOUTS},
                )
            )
            rows.append(row)
    return rows
