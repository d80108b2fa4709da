"""Peak extra memory of every operator, and the "no per-tap column buffer" check.

Each (operator, shape, layout, pass) runs once under the memory profiler (one thread, see
:func:`~dk_detectron2.benchmark.memory.measure_memory`). ``extra`` is what it held at its peak
beyond the output (and, forward+backward, the gradients) it returns. For the depthwise DK
operators the row also says whether any single allocation reached the size of a per-tap column
buffer ``[B, C*K*K, Ho, Wo]`` (``column_buffer_free``) and whether ``extra`` stays within the
size of the output (``extra_within_output``), the two memory requirements of the issue.
"""

import itertools

from ..comparison import PASSES
from ..memory import measure_memory
from ..shapes import full_dk_shape, op_shapes
from ..workloads import LAYOUTS, build_workload
from .ops import skip_torchvision
from .registry import SECTION_REGISTRY

MEMORY_OPS = ("deform_kernel2d", "deform_kernel_conv2d", "global_deform_kernel2d", "conv2d")


def memory_row(workload, shape, pass_name):
    fn = workload.forward_fn() if pass_name == "forward" else workload.forward_backward_fn()
    record = measure_memory(fn, "cpu")
    output_bytes = workload.grad_output.numel() * workload.grad_output.element_size()
    row = {
        "shape": shape.to_dict(),
        "op": workload.name,
        "layout": workload.layout,
        "pass": pass_name,
    }
    row.update(record.to_dict(), output_bytes=output_bytes)
    row["column_buffer_bytes"] = workload.column_buffer_bytes
    if workload.column_buffer_bytes is not None:
        row["column_buffer_free"] = record.largest_allocation_bytes < workload.column_buffer_bytes
        row["extra_within_output"] = record.extra_bytes <= output_bytes
    return row


@SECTION_REGISTRY.register()
def memory(args, progress):
    jobs = [
        (shape, op, layout)
        for shape in op_shapes(args.quick)
        for op, layout in itertools.product(MEMORY_OPS, LAYOUTS)
    ]
    jobs += [
        (shape, "torchvision_deform_conv2d", "nchw")
        for shape in op_shapes(args.quick)
        if not skip_torchvision(args, shape)
    ]
    rows, plain_done = [], set()
    bar = progress(total=len(jobs) + 1, desc="memory (CPU)")
    for shape, op, layout in jobs:
        if op in ("conv2d", "torchvision_deform_conv2d"):
            if (op, layout, shape.stage_key) in plain_done:  # they do not depend on S or G
                bar.update(1)
                continue
            plain_done.add((op, layout, shape.stage_key))
        workload = build_workload(op, shape, layout)
        rows += [memory_row(workload, shape, p) for p in PASSES]
        bar.update(1)
    full = full_dk_shape(args.quick)
    for layout in LAYOUTS:
        try:
            workload = build_workload("deform_kernel2d", full, layout)
            rows += [memory_row(workload, full, p) for p in PASSES]
        except (ValueError, RuntimeError, NotImplementedError) as error:
            rows.append(
                {
                    "shape": full.to_dict(),
                    "op": "deform_kernel2d",
                    "layout": layout,
                    "status": "unsupported",
                    "error": f"{type(error).__name__}: {error}",
                }
            )
            break
    bar.update(1)
    bar.close()
    checked = [r for r in rows if "column_buffer_free" in r]
    return {
        "rows": rows,
        "threads": 1,
        "column_buffer_free": all(r["column_buffer_free"] for r in checked) if checked else None,
        "extra_within_output": all(r["extra_within_output"] for r in checked) if checked else None,
    }
