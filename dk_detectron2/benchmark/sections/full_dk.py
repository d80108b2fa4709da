"""Full Deformable Kernel (groups 1: weight [C, C, S, S]) against the dense ``F.conv2d``.

Shape of the grouped-DK issue: B 8, C 256, 28x28, K 3, S 4, G 1 (tiny with ``--quick``). Both
sides are timed in both layouts, round-robin, and each takes its fastest layout. When the
operator does not accept non-depthwise weights yet, the section records ``"unsupported"`` with
the operator's message instead of failing the run.
"""

import itertools

from ..comparison import PASSES, compare, measurement_rows, timing_key, workload_callables
from ..shapes import full_dk_shape
from ..timing import time_interleaved
from ..workloads import LAYOUTS, build_workload
from .registry import SECTION_REGISTRY


def _probe(op: str, shape):
    """Calls the operator once on a tiny input of the same kind; returns an error text or None."""
    tiny = type(shape)(
        1,
        shape.channels,
        5,
        shape.kernel_size,
        shape.scope_size,
        shape.rotation_groups,
        groups=shape.conv_groups,
    )
    try:
        build_workload(op, tiny, "nchw").forward_fn()()
    except (ValueError, RuntimeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


@SECTION_REGISTRY.register()
def full_dk(args, progress):
    shape = full_dk_shape(args.quick)
    result = {"shape": shape.to_dict(), "comparisons": [], "timings": []}
    error = _probe("deform_kernel2d", shape)
    if error is not None:
        result.update(status="unsupported", error=error)
        return result
    callables = {}
    for op, layout in itertools.product(("deform_kernel2d", "conv2d"), LAYOUTS):
        callables.update(workload_callables(build_workload(op, shape, layout)))
    bar = progress(total=args.repeats, desc="full DK (CPU)")
    measured = time_interleaved(
        callables, args.repeats, args.sample_time, device="cpu", on_round=lambda: bar.update(1)
    )
    bar.close()
    result["status"] = "measured"
    result["timings"] = measurement_rows(
        measured, shape=shape.to_dict(), device="cpu", dtype="float32"
    )
    for pass_name in PASSES:
        row = {
            "shape": shape.to_dict(),
            "op": "deform_kernel2d",
            "baseline": "conv2d",
            "pass": pass_name,
        }
        row.update(
            compare(
                {l: measured[timing_key("deform_kernel2d", l, pass_name)] for l in LAYOUTS},
                {l: measured[timing_key("conv2d", l, pass_name)] for l in LAYOUTS},
            )
        )
        result["comparisons"].append(row)
    return result
