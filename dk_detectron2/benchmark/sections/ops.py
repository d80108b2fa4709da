"""Op level on the CPU: every DK operator against its baseline on a ResNet-50's stage shapes.

For each stage (batch, channels, size) every callable of that stage -- the baselines once, the
DK operators for every (S, G), each in both layouts and both passes -- is timed round-robin in one
:func:`~dk_detectron2.benchmark.timing.time_interleaved` call, so the ratios compare figures taken
side by side. Comparisons (op / baseline, each at its fastest layout):

- ``deform_kernel2d`` / depthwise ``conv2d``;
- ``deform_kernel_conv2d`` / ``torchvision.ops.deform_conv2d`` (NCHW; torchvision's CPU kernel is
  two to three orders of magnitude slower, so it gets ``--slow-repeats`` repeats and is skipped on
  big shapes with ``--skip-slow-baselines``);
- ``global_deform_kernel2d`` (the module) / depthwise ``conv2d``.
"""

import itertools
from collections import defaultdict

from ..comparison import PASSES, compare, measurement_rows, timing_key, workload_callables
from ..shapes import op_shapes
from ..timing import time_interleaved
from ..workloads import LAYOUTS, build_workload
from .registry import SECTION_REGISTRY

# (operation, its baseline, the baseline's layouts)
COMPARISONS = (
    ("deform_kernel2d", "conv2d", LAYOUTS),
    ("deform_kernel_conv2d", "torchvision_deform_conv2d", ("nchw",)),
    ("global_deform_kernel2d", "conv2d", LAYOUTS),
)
DK_OPS = ("deform_kernel2d", "deform_kernel_conv2d", "global_deform_kernel2d")
# torchvision's deform_conv2d takes ~1.5 s forward+backward at B8 C64 56x56 (12.5 MB of input);
# --skip-slow-baselines skips it above this many input elements.
SLOW_BASELINE_MAX_ELEMENTS = 400_000


def skip_torchvision(args, shape) -> bool:
    elements = shape.batch * shape.channels * shape.size**2
    return args.skip_slow_baselines and elements > SLOW_BASELINE_MAX_ELEMENTS


@SECTION_REGISTRY.register()
def ops(args, progress):
    shapes = op_shapes(args.quick)
    stages = defaultdict(list)
    for shape in shapes:
        stages[shape.stage_key].append(shape)
    timings, comparisons = [], []
    bar = progress(total=len(stages) * args.repeats, desc="ops (CPU)")
    for stage_shapes in stages.values():
        stage = stage_shapes[0]
        callables, repeats, owner = {}, {}, {}
        baseline_workloads = [build_workload("conv2d", stage, layout) for layout in LAYOUTS]
        if not skip_torchvision(args, stage):
            baseline_workloads.append(build_workload("torchvision_deform_conv2d", stage, "nchw"))
        for workload in baseline_workloads:
            for key, fn in workload_callables(workload).items():
                callables["baseline|" + key] = fn
                slow = workload.name == "torchvision_deform_conv2d"
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
        baselines = {
            k.split("|", 1)[1]: m for k, m in measured.items() if k.startswith("baseline|")
        }
        timings += measurement_rows(
            baselines, shape=stage.to_dict(), device="cpu", dtype="float32", shared_baseline=True
        )
        for shape in stage_shapes:
            mine = {k.split("|", 1)[1]: m for k, m in measured.items() if owner.get(k) is shape}
            timings += measurement_rows(mine, shape=shape.to_dict(), device="cpu", dtype="float32")
            for (op, base, base_layouts), pass_name in itertools.product(COMPARISONS, PASSES):
                base_times = {
                    layout: baselines[timing_key(base, layout, pass_name)]
                    for layout in base_layouts
                    if timing_key(base, layout, pass_name) in baselines
                }
                row = {"shape": shape.to_dict(), "op": op, "baseline": base, "pass": pass_name}
                if not base_times:
                    row["skipped"] = "baseline skipped (--skip-slow-baselines)"
                else:
                    op_times = {l: mine[timing_key(op, l, pass_name)] for l in LAYOUTS}
                    row.update(compare(op_times, base_times))
                comparisons.append(row)
    bar.close()
    return {"timings": timings, "comparisons": comparisons}
