"""The case matrix of the CUDA emulation (run by check.py, listed by tests/test_cuda_emulation.py).

Every operator and gradient; depthwise, grouped and full weights; NCHW and channels-last;
float64/float32/float16/bfloat16; batch 0, empty images, C = 1, one-pixel outputs, non-finite
rotations, offsets and coordinates, non-finite values at pixel (0, 0), in scope cell 0 and in the
output gradient (against skip_reference_*: a value that no tap reads changes nothing), scopes that
take several shared-memory passes; the alerts of torch.use_deterministic_algorithms; and checks of
the emulator itself. A case's ``run()`` returns
a list of error messages (empty: passed). Importing this module needs no compiled code.
"""
import itertools
from typing import List

import torch

from harness import (BF16, DTYPE_NAMES, F16, F32, F64, Case, Geometry, compare, emu,
                     geometry_args, make_tensors, reference_module, run_emulated)
from skip_reference import (compare_nonfinite, skip_reference_depthwise,
                            skip_reference_nd, skip_reference_scope_space)


def dk_case(op, kind, geo: Geometry, dtype, channels_last, nonfinite=False, tag="case"):
    """deform_kernel2d ("dk") or deform_kernel_conv2d ("dkc"), forward and every gradient."""
    name = (f"{op}:{kind}:{tag}:{DTYPE_NAMES[dtype]}:{'cl' if channels_last else 'nchw'}"
            + (":nonfinite" if nonfinite else ""))

    def run():
        errors: List[str] = []
        x, offset, rotation, weight = make_tensors(geo, kind, dtype, nonfinite, seed=len(name))
        leaves = [t.clone().requires_grad_() for t in (x, offset, rotation, weight)]
        geometry = (geo.K, geo.stride, geo.pad, geo.dil, geo.G)
        if op == "dkc":
            ref = reference_module().deform_kernel_conv2d_reference(*leaves, *geometry)
            used = leaves
        else:
            used = [leaves[0], leaves[2], leaves[3]]
            ref = reference_module().deform_kernel2d_reference(*used, *geometry)
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        grad = grad.to(dtype).double()
        want = torch.autograd.grad(ref, used, grad, allow_unused=True)
        want = [torch.zeros_like(u) if w is None else w for u, w in zip(used, want)]
        out, grads = run_emulated(op, x, offset, rotation, weight, grad, geo, dtype,
                                   channels_last)
        names = ["input", "offset", "rotation", "weight"] if op == "dkc" else [
            "input", "rotation", "weight"]
        compare("output", out, ref, dtype, errors)
        for n, g, w in zip(names, grads, want):
            compare("grad_" + n, g, w, dtype, errors)
            if g.dtype != dtype:
                errors.append(f"grad_{n}: dtype {g.dtype}, expected {dtype}")
        if channels_last and x.numel() and geo.C > 1:
            for n, t in (("output", out), ("grad_input", grads[0])):
                if not t.is_contiguous(memory_format=torch.channels_last) and t.numel():
                    errors.append(f"{n}: not channels-last (strides {t.stride()})")
        if dtype == F32 and not errors and ref.numel():
            # Another schedule (shuffled blocks and threads) must give bitwise equal results for
            # every quantity the kernels compute without atomics.
            emu().set_schedule(7, 3)
            try:
                out2, grads2 = run_emulated(op, x, offset, rotation, weight, grad, geo, dtype,
                                             channels_last)
            finally:
                emu().set_schedule(0, 3)
            atomic_input = op == "dkc" or kind != "depthwise"
            checked = [("output", out, out2)] + [
                ("grad_" + n, a, b) for n, a, b in zip(names, grads, grads2)
                if not (n == "input" and atomic_input)]
            for n, a, b in checked:
                if not torch.equal(a, b):
                    errors.append(f"{n}: differs under another schedule (order-dependent)")
        return errors

    return Case(name, run)


def nd_case(tag, M, Sh, Sw, P, dtype, nonfinite=False):
    name = f"nd_linear_sample:{tag}:{DTYPE_NAMES[dtype]}" + (":nonfinite" if nonfinite else "")

    def run():
        errors: List[str] = []
        gen = torch.Generator().manual_seed(P + M)
        inp = torch.randn(M, Sh, Sw, generator=gen, dtype=F64).to(dtype).double()
        coord = ((torch.rand(P, 2, generator=gen, dtype=F64) * (max(Sh, Sw) + 3) - 1.7)
                 .to(dtype).double())
        if nonfinite and P >= 3:
            coord[0, 0], coord[1, 1], coord[2, 0] = float("nan"), float("inf"), -float("inf")
        leaves = [inp.clone().requires_grad_(), coord.clone().requires_grad_()]
        ref = reference_module().nd_linear_sample_reference(*leaves)
        grad = torch.randn(ref.shape, generator=gen, dtype=F64).to(dtype).double()
        want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
        want = [torch.zeros_like(u) if w is None else w for u, w in zip(leaves, want)]
        out = emu().nd_linear_sample(inp.to(dtype), coord.to(dtype))
        gi, gc = emu()._nd_linear_sample_backward(grad.to(dtype), inp.to(dtype), coord.to(dtype))
        for n, g, w in (("output", out, ref), ("grad_input", gi, want[0]),
                        ("grad_coord", gc, want[1])):
            compare(n, g, w, dtype, errors)
        return errors

    return Case(name, run)


def empty_image_case(op, kind):
    """H = 0 with padding: the output is made of padding only and must be zero, gradients too
    (the grouped path once read the zero-byte image here)."""
    name = f"{op}:{kind}:empty-image"

    def run():
        errors: List[str] = []
        geo = Geometry(2, 4, 0, 3, (3, 3), (4, 4), pad=(2, 1))
        x, offset, rotation, weight = make_tensors(geo, kind, F64, False, seed=3)
        grad = torch.randn(geo.B, weight.shape[0], *geo.out(), dtype=F64)
        out, grads = run_emulated(op, x, offset, rotation, weight, grad, geo, F64, False)
        if tuple(out.shape) != (geo.B, weight.shape[0], *geo.out()) or out.abs().max() != 0:
            errors.append(f"output: {tuple(out.shape)}, max {out.abs().max().item()}")
        for g, t in zip(grads, ([x, offset] if op == "dkc" else [x]) + [rotation, weight]):
            if g.shape != t.shape or (g.numel() and g.abs().max() != 0):
                errors.append(f"gradient {tuple(g.shape)} not zero / wrong shape")
        return errors

    return Case(name, run)


def alert_case(op, kind, expect_alert):
    """torch.use_deterministic_algorithms(True) raises exactly where atomics reduce."""
    name = f"{op}:{kind}:deterministic-alert" if expect_alert else f"{op}:{kind}:no-alert"

    def run():
        geo = Geometry(1, 4, 5, 5, (3, 3), (4, 4), G=2)
        x, offset, rotation, weight = make_tensors(geo, kind, F64, False, seed=5)
        if op == "nd":
            args = (torch.randn(5, 3), torch.randn(3, 4, 4), torch.rand(5, 2) * 3)  # grad [P, M]
            call = lambda: emu()._nd_linear_sample_backward(*args)  # noqa: E731
        else:
            grad = torch.randn(1, weight.shape[0], *geo.out(), dtype=F64)
            call = lambda: run_emulated(op, x, offset, rotation, weight, grad, geo, F64,  # noqa
                                         False)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            call()
            raised = None
        except RuntimeError as e:
            raised = str(e)
        finally:
            torch.use_deterministic_algorithms(previous)
        if expect_alert and (raised is None or "deterministic" not in raised):
            return [f"expected the non-determinism alert, got {raised!r}"]
        if not expect_alert and raised is not None:
            return [f"unexpected error: {raised}"]
        return []

    return Case(name, run)


def emulator_cases() -> List[Case]:
    """The emulator itself: limits, barriers, block order."""

    def limits():
        errors = []
        launch = lambda *a: emu().selftest_launch(*a)  # noqa: E731
        for config, why in [((1, 1, 1, 1025, 1, 1, 0, 0), "1025 threads"),
                            ((1, 1, 1, 32, 32, 2, 0, 0), "2048 threads"),
                            ((1, 65536, 1, 32, 1, 1, 0, 0), "grid.y 65536"),
                            ((1, 1, 65536, 32, 1, 1, 0, 0), "grid.z 65536"),
                            ((1, 1, 1, 32, 1, 1, 48 * 1024 + 4, 0), "48 KiB + 4 shared"),
                            ((1, 1, 1, 32, 1, 1, 100 * 1024, 64 * 1024), "above the opt-in"),
                            ((0, 1, 1, 32, 1, 1, 0, 0), "empty grid")]:
            try:
                launch(*config)
                errors.append(f"launch with {why} was accepted")
            except RuntimeError:
                pass
        for config in [(1, 65535, 1, 1, 1, 1, 0, 0), (2, 1, 1, 1024, 1, 1, 0, 0),
                       (1, 1, 1, 8, 8, 16, 0, 0), (2, 1, 1, 32, 1, 1, 48 * 1024, 0),
                       (1, 1, 1, 32, 1, 1, 100 * 1024, 100 * 1024)]:
            try:
                launch(*config)
            except RuntimeError as e:
                errors.append(f"valid launch {config} refused: {e}")
        return errors

    def barriers():
        values = torch.arange(3 * 64, dtype=F32)
        want = values.view(3, 64).sum(1)
        errors = []
        for schedule in (0, 1, 7):
            emu().set_schedule(schedule, 3)
            good = emu().selftest_block_sum(values, 64, True)
            bad = emu().selftest_block_sum(values, 64, False)
            if not torch.equal(good, want):
                errors.append(f"schedule {schedule}: the correct kernel gave {good.tolist()}")
            # Reverse order (schedule 1) runs this tree like a serial loop and may get it right;
            # index order (every case's first run) and a shuffle (its second run) must not.
            if schedule != 1 and torch.equal(bad, want):
                errors.append(f"schedule {schedule}: a missing barrier went unnoticed")
        emu().set_schedule(0, 3)
        return errors

    def block_order():
        seen = set()
        for schedule in (0, 1, 7):
            emu().set_schedule(schedule, 3)
            seen.add(emu().selftest_last_writer(9))
        emu().set_schedule(0, 3)
        return [] if len(seen) > 1 else ["every schedule ran the blocks in the same order"]

    return [Case("emulator:launch-limits", limits), Case("emulator:missing-barrier", barriers),
            Case("emulator:block-order", block_order)]


DK_GEOMETRIES = {
    # tag: geometry (every op and weight kind)
    "3x3-S4": Geometry(2, 4, 7, 6, (3, 3), (4, 4)),
    "stride2-dil2-G2": Geometry(1, 4, 9, 8, (3, 3), (5, 6), (2, 2), (2, 2), (2, 2), G=2),
    "1x1-S3x2": Geometry(2, 8, 6, 7, (1, 1), (3, 2), (2, 1), (0, 0), G=2),
    "5x3-S7x5": Geometry(1, 4, 8, 9, (5, 3), (7, 5), (1, 1), (2, 0), (1, 2), G=2),
    "1x9-G3": Geometry(1, 6, 6, 7, (1, 9), (2, 9), (1, 1), (0, 4), G=3),
    "one-pixel": Geometry(2, 4, 3, 3, (3, 3), (4, 4), pad=(0, 0)),
    "one-pixel-1x1": Geometry(1, 2, 1, 1, (1, 1), (2, 2), pad=(0, 0)),
    "C1": Geometry(2, 1, 5, 4, (3, 3), (4, 4)),
    "batch0": Geometry(0, 4, 5, 5, (3, 3), (4, 4)),
}
DEPTHWISE_GEOMETRIES = {
    # shared-memory passes of the weight gradient: 132 cells > 96 (float), > 48 (double)
    "S12x11-passes": Geometry(1, 2, 5, 5, (3, 3), (12, 11)),
    "C42-uneven-chunks": Geometry(2, 42, 6, 7, (3, 3), (5, 4), (2, 1), G=2),
    "many-chunks": Geometry(3, 4, 20, 20, (3, 3), (4, 4), G=2),
}
ALL_FORMATS = [(F64, False), (F64, True), (F32, False), (F32, True), (F16, False), (F16, True),
               (BF16, False), (BF16, True)]
SOME_FORMATS = [(F64, False), (F32, True)]


def all_cases() -> List[Case]:
    cases: List[Case] = emulator_cases()
    for op, kind in itertools.product(("dk", "dkc"), ("depthwise", "grouped", "full")):
        for tag, geo in DK_GEOMETRIES.items():
            if kind == "grouped" and tag == "C1":
                geo = Geometry(geo.B, 2, geo.H, geo.W, geo.K, geo.S)  # C_in/groups = 1
            formats = ALL_FORMATS if tag in ("3x3-S4", "stride2-dil2-G2") else SOME_FORMATS
            for dtype, cl in formats:
                cases.append(dk_case(op, kind, geo, dtype, cl, tag=tag))
        cases.append(dk_case(op, kind, DK_GEOMETRIES["3x3-S4"], F64, False, True, tag="3x3-S4"))
        cases.append(dk_case(op, kind, DK_GEOMETRIES["3x3-S4"], F32, True, True, tag="3x3-S4"))
        cases.append(empty_image_case(op, kind))
        cases.append(alert_case(op, kind, expect_alert=(op == "dkc" or kind != "depthwise")))
    for op, (tag, geo) in itertools.product(("dk", "dkc"), DEPTHWISE_GEOMETRIES.items()):
        for dtype, cl in SOME_FORMATS + [(F16, True)]:
            cases.append(dk_case(op, "depthwise", geo, dtype, cl, tag=tag))
    for dtype in (F64, F32, F16, BF16):
        cases.append(nd_case("M5-S4x3-P11", 5, 4, 3, 11, dtype, nonfinite=True))
    cases += [nd_case("M1-S1x1", 1, 1, 1, 7, F64), nd_case("P0", 3, 4, 4, 0, F64),
              nd_case("M0", 0, 4, 4, 5, F64), nd_case("many-points", 64, 4, 5, 300, F32),
              alert_case("nd", "sampler", expect_alert=True)]
    cases.append(half_overflow_case())
    for op, kind, place in itertools.product(("dk", "dkc"), ("depthwise", "grouped", "full"),
                                             NONFINITE_PLACES):
        for dtype, cl in ((F64, False), (F32, True)):
            cases.append(nonfinite_case(op, kind, place, dtype, cl))
    cases.append(nonfinite_case("dkc", "depthwise", "grad", BF16, False))
    for place in ("scope-cell0", "grad"):
        cases.append(nd_nonfinite_case(place, F32))
    return cases


NONFINITE_PLACES = ("pixel00", "scope-cell0", "grad")


def nonfinite_case(op, kind, place, dtype, channels_last):
    """inf / -inf / NaN at pixel (0, 0) of every channel, in scope cell 0 of every kernel, or in
    grad_output: only the taps that really read such a value may see it (none reads it through a
    corner outside the grid with weight 0), forward and every gradient."""
    name = (f"{op}:{kind}:nonfinite-{place}:{DTYPE_NAMES[dtype]}:"
            f"{'cl' if channels_last else 'nchw'}")
    geo = Geometry(2, 4, 6, 5, (3, 3), (4, 4), G=2)

    def run():
        errors: List[str] = []
        x, offset, rotation, weight = make_tensors(geo, kind, dtype, False, seed=len(name))
        if place == "pixel00":
            x[:, :, 0, 0] = float("inf")
            x[0, 1, 0, 0], x[1, 0, 0, 0] = float("nan"), -float("inf")
        if place == "scope-cell0":
            weight[:, :, 0, 0] = float("inf")
            weight[0, 0, 0, 0], weight[-1, -1, 0, 0] = float("nan"), -float("inf")
        leaves = [t.clone().requires_grad_() for t in (x, offset, rotation, weight)]
        if op == "dk":
            used, off = [leaves[0], leaves[2], leaves[3]], None
        else:
            used, off = leaves, leaves[1]
        if kind == "depthwise":
            ref = skip_reference_depthwise(leaves[0], off, leaves[2], leaves[3], geo)
        else:
            groups = geo.C // weight.shape[1]
            ref = skip_reference_scope_space(leaves[0], off, leaves[2], leaves[3], groups, geo)
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        grad = grad.to(dtype).double()
        if place == "grad":
            grad[0, :, 0, 0] = float("inf")
            grad[1, 0, -1, -1], grad[0, -1, 1, 2] = float("nan"), -float("inf")
        want = torch.autograd.grad(ref, used, grad, allow_unused=True)
        want = [torch.zeros_like(u) if w is None else w for u, w in zip(used, want)]
        out, grads = run_emulated(op, x, offset, rotation, weight, grad, geo, dtype,
                                   channels_last)
        names = ["input", "offset", "rotation", "weight"] if op == "dkc" else [
            "input", "rotation", "weight"]
        compare_nonfinite("output", out, ref.detach(), dtype, errors)
        for n, g, w in zip(names, grads, want):
            compare_nonfinite("grad_" + n, g, w, dtype, errors)
        return errors

    return Case(name, run)


def nd_nonfinite_case(place, dtype):
    """nd_linear_sample with inf / NaN in cell 0 of the scopes, or in grad_output of points that
    read nothing and of points that do."""
    name = f"nd_linear_sample:nonfinite-{place}:{DTYPE_NAMES[dtype]}"

    def run():
        errors: List[str] = []
        gen = torch.Generator().manual_seed(11)
        M, Sh, Sw, P = 4, 4, 3, 23
        inp = torch.randn(M, Sh, Sw, generator=gen, dtype=F64).to(dtype).double()
        coord = (torch.rand(P, 2, generator=gen, dtype=F64) * 8 - 2.5).to(dtype).double()
        coord[0] = torch.tensor([-0.5, -0.5])  # reads cell 0 with weight 0.25
        coord[1] = torch.tensor([-3.0, 1.0])   # reads nothing
        grad = torch.randn(P, M, generator=gen, dtype=F64).to(dtype).double()
        if place == "scope-cell0":
            inp[:, 0, 0] = float("inf")
            inp[1, 0, 0] = float("nan")
        else:
            grad[1] = float("nan")
            grad[0, 0], grad[2, 1] = float("inf"), -float("inf")
        leaves = [inp.clone().requires_grad_(), coord.clone().requires_grad_()]
        ref = skip_reference_nd(*leaves)
        want = torch.autograd.grad(ref, leaves, grad)
        out = emu().nd_linear_sample(inp.to(dtype), coord.to(dtype))
        gi, gc = emu()._nd_linear_sample_backward(grad.to(dtype), inp.to(dtype), coord.to(dtype))
        for n, g, w in (("output", out, ref.detach()), ("grad_input", gi, want[0]),
                        ("grad_coord", gc, want[1])):
            compare_nonfinite(n, g, w, dtype, errors)
        return errors

    return Case(name, run)


def half_overflow_case() -> Case:
    """Grouped path, float16: the GEMM of grad_output and the weight exceeds half's range (about
    96000 at two scope cells, with opposite signs) while every gradient fits. A product rounded
    to half before the float32 accumulators becomes +-inf and the gradients NaN."""

    def run():
        errors: List[str] = []
        geo = Geometry(1, 2, 4, 4, (1, 1), (2, 1), pad=(0, 0))
        x = torch.full((1, 2, 4, 4), 0.01, dtype=F64).to(F16).double()
        weight = torch.empty(4, 2, 2, 1, dtype=F64)
        weight[:, :, 0, 0], weight[:, :, 1, 0] = 60.0, -59.75
        rotation = torch.zeros(1, 2, 4, 4, dtype=F64)
        grad = torch.full((1, 4, 4, 4), 400.0, dtype=F64)
        leaves = [t.clone().requires_grad_() for t in (x, rotation, weight)]
        ref = reference_module().deform_kernel2d_reference(*leaves, geo.K, geo.stride, geo.pad, geo.dil,
                                                     geo.G)
        want = torch.autograd.grad(ref, leaves, grad)
        args = [t.to(F16) for t in (x, rotation, weight)]
        out = emu().deform_kernel2d(*args, *geometry_args(geo))
        grads = emu()._deform_kernel2d_backward(grad.to(F16), *args, *geometry_args(geo))
        compare("output", out, ref, F16, errors)
        for n, g, w in zip(("input", "rotation", "weight"), grads, want):
            compare("grad_" + n, g, w, F16, errors)
        return errors

    return Case("dk:full:f16-gemm-overflow", run)
