"""The case matrix of the CUDA emulation (run by check.py, listed by tests/test_cuda_emulation.py).

Every operator and gradient; depthwise, grouped and full weights; NCHW and channels-last;
float64/float32/float16/bfloat16; batch 0, empty images, C = 1, one-pixel outputs, non-finite
rotations, offsets and coordinates, non-finite values at pixel (0, 0), in scope cell 0 and in the
output gradient (against skip_reference_*: a value that no tap reads changes nothing), scopes that
take several shared-memory passes; the alerts of torch.use_deterministic_algorithms; and checks of
the emulator itself. A case's ``run()`` returns
a list of error messages (empty: passed). Importing this module needs no compiled code.
"""
import importlib.util
import itertools
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {F64: "f64", F32: "f32", F16: "f16", BF16: "bf16"}
# max |emulated - reference| / max(1, max |reference|)
TOLERANCE = {F64: 1e-9, F32: 2e-4, F16: 2e-2, BF16: 8e-2}


def _reference():
    """dk_detectron2/layers/reference.py (and geometry.py, which it imports), loaded by path as
    a stand-alone package: they need torch only, not dk_detectron2 (whose import needs the
    compiled dk_detectron2._C)."""
    global _REFERENCE
    if _REFERENCE is None:
        layers = os.path.join(REPO, "dk_detectron2", "layers")
        package = types.ModuleType("_dk_layers")
        package.__path__ = [layers]
        sys.modules[package.__name__] = package
        for name in ("geometry", "reference"):
            spec = importlib.util.spec_from_file_location(
                f"_dk_layers.{name}", os.path.join(layers, f"{name}.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        _REFERENCE = module
    return _REFERENCE


_REFERENCE = None


def _emu():
    return torch.ops.dk_emu


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@dataclass
class Geometry:
    B: int
    C: int
    H: int
    W: int
    K: Tuple[int, int]
    S: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    pad: Tuple[int, int] = (1, 1)
    dil: Tuple[int, int] = (1, 1)
    G: int = 1

    def out(self):
        return (_out_size(self.H, self.K[0], self.stride[0], self.pad[0], self.dil[0]),
                _out_size(self.W, self.K[1], self.stride[1], self.pad[1], self.dil[1]))


@dataclass
class Case:
    name: str
    run: Callable[[], List[str]] = field(repr=False)


def _compare(name, got, want, dtype, errors):
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        errors.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return
    if want.numel() == 0:
        return
    if not torch.isfinite(got).all():
        errors.append(f"{name}: non-finite values")
        return
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    if err > TOLERANCE[dtype]:
        errors.append(f"{name}: error {err:.2e} > {TOLERANCE[dtype]:.0e}")


def _weights(kind, geo: Geometry):
    """(in channels, out channels, weight.size(1)) of depthwise / grouped / full weights."""
    if kind == "depthwise":
        return geo.C, geo.C, 1
    groups = 2 if kind == "grouped" else 1
    c_out = geo.C + 2 * geo.G if (geo.C + 2 * geo.G) % (groups * geo.G) == 0 else geo.C
    return geo.C, c_out, geo.C // groups


def _tensors(geo: Geometry, kind, dtype, nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out, per_group = _weights(kind, geo)
    ho, wo = geo.out()
    taps = geo.K[0] * geo.K[1]

    def randn(*shape, scale=1.0):
        # values the kernels can hold exactly: the reference sees the same (rounded) numbers
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype).double()

    x = randn(geo.B, c_in, geo.H, geo.W)
    offset = randn(geo.B, taps * 2, ho, wo, scale=2.0)
    rotation = randn(geo.B, geo.G * taps * 2, ho, wo, scale=1.5)
    weight = randn(c_out, per_group, *geo.S)
    if nonfinite and rotation.numel():
        rotation.view(-1)[::7] = float("nan")
        rotation.view(-1)[3::11] = float("inf")
        rotation.view(-1)[5::13] = -float("inf")
        offset.view(-1)[::5] = float("nan")
        offset.view(-1)[2::9] = float("inf")
    return x, offset, rotation, weight


def _geometry_args(geo: Geometry):
    return [list(geo.K), list(geo.stride), list(geo.pad), list(geo.dil), geo.G]


def _run_emulated(op, x, offset, rotation, weight, grad, geo, dtype, channels_last):
    E = _emu()
    xs = x.to(dtype)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    args = [xs, offset.to(dtype)] if op == "dkc" else [xs]
    args += [rotation.to(dtype), weight.to(dtype)]
    g = _geometry_args(geo)
    if op == "dkc":
        out = E.deform_kernel_conv2d(*args, *g)
        grads = E._deform_kernel_conv2d_backward(grad.to(dtype), *args, *g)
    else:
        out = E.deform_kernel2d(*args, *g)
        grads = E._deform_kernel2d_backward(grad.to(dtype), *args, *g)
    return out, list(grads)


def dk_case(op, kind, geo: Geometry, dtype, channels_last, nonfinite=False, tag="case"):
    """deform_kernel2d ("dk") or deform_kernel_conv2d ("dkc"), forward and every gradient."""
    name = (f"{op}:{kind}:{tag}:{DTYPE_NAMES[dtype]}:{'cl' if channels_last else 'nchw'}"
            + (":nonfinite" if nonfinite else ""))

    def run():
        errors: List[str] = []
        x, offset, rotation, weight = _tensors(geo, kind, dtype, nonfinite, seed=len(name))
        leaves = [t.clone().requires_grad_() for t in (x, offset, rotation, weight)]
        geometry = (geo.K, geo.stride, geo.pad, geo.dil, geo.G)
        if op == "dkc":
            ref = _reference().deform_kernel_conv2d_reference(*leaves, *geometry)
            used = leaves
        else:
            used = [leaves[0], leaves[2], leaves[3]]
            ref = _reference().deform_kernel2d_reference(*used, *geometry)
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        grad = grad.to(dtype).double()
        want = torch.autograd.grad(ref, used, grad, allow_unused=True)
        want = [torch.zeros_like(u) if w is None else w for u, w in zip(used, want)]
        out, grads = _run_emulated(op, x, offset, rotation, weight, grad, geo, dtype,
                                   channels_last)
        names = ["input", "offset", "rotation", "weight"] if op == "dkc" else [
            "input", "rotation", "weight"]
        _compare("output", out, ref, dtype, errors)
        for n, g, w in zip(names, grads, want):
            _compare("grad_" + n, g, w, dtype, errors)
            if g.dtype != dtype:
                errors.append(f"grad_{n}: dtype {g.dtype}, expected {dtype}")
        if channels_last and x.numel() and geo.C > 1:
            for n, t in (("output", out), ("grad_input", grads[0])):
                if not t.is_contiguous(memory_format=torch.channels_last) and t.numel():
                    errors.append(f"{n}: not channels-last (strides {t.stride()})")
        if dtype == F32 and not errors and ref.numel():
            # Another schedule (shuffled blocks and threads) must give bitwise equal results for
            # every quantity the kernels compute without atomics.
            _emu().set_schedule(7, 3)
            try:
                out2, grads2 = _run_emulated(op, x, offset, rotation, weight, grad, geo, dtype,
                                             channels_last)
            finally:
                _emu().set_schedule(0, 3)
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
        ref = _reference().nd_linear_sample_reference(*leaves)
        grad = torch.randn(ref.shape, generator=gen, dtype=F64).to(dtype).double()
        want = torch.autograd.grad(ref, leaves, grad, allow_unused=True)
        want = [torch.zeros_like(u) if w is None else w for u, w in zip(leaves, want)]
        out = _emu().nd_linear_sample(inp.to(dtype), coord.to(dtype))
        gi, gc = _emu()._nd_linear_sample_backward(grad.to(dtype), inp.to(dtype), coord.to(dtype))
        for n, g, w in (("output", out, ref), ("grad_input", gi, want[0]),
                        ("grad_coord", gc, want[1])):
            _compare(n, g, w, dtype, errors)
        return errors

    return Case(name, run)


def empty_image_case(op, kind):
    """H = 0 with padding: the output is made of padding only and must be zero, gradients too
    (the grouped path once read the zero-byte image here)."""
    name = f"{op}:{kind}:empty-image"

    def run():
        errors: List[str] = []
        geo = Geometry(2, 4, 0, 3, (3, 3), (4, 4), pad=(2, 1))
        x, offset, rotation, weight = _tensors(geo, kind, F64, False, seed=3)
        grad = torch.randn(geo.B, weight.shape[0], *geo.out(), dtype=F64)
        out, grads = _run_emulated(op, x, offset, rotation, weight, grad, geo, F64, False)
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
        x, offset, rotation, weight = _tensors(geo, kind, F64, False, seed=5)
        if op == "nd":
            args = (torch.randn(5, 3), torch.randn(3, 4, 4), torch.rand(5, 2) * 3)  # grad [P, M]
            call = lambda: _emu()._nd_linear_sample_backward(*args)  # noqa: E731
        else:
            grad = torch.randn(1, weight.shape[0], *geo.out(), dtype=F64)
            call = lambda: _run_emulated(op, x, offset, rotation, weight, grad, geo, F64,  # noqa
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
        launch = lambda *a: _emu().selftest_launch(*a)  # noqa: E731
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
            _emu().set_schedule(schedule, 3)
            good = _emu().selftest_block_sum(values, 64, True)
            bad = _emu().selftest_block_sum(values, 64, False)
            if not torch.equal(good, want):
                errors.append(f"schedule {schedule}: the correct kernel gave {good.tolist()}")
            # Reverse order (schedule 1) runs this tree like a serial loop and may get it right;
            # index order (every case's first run) and a shuffle (its second run) must not.
            if schedule != 1 and torch.equal(bad, want):
                errors.append(f"schedule {schedule}: a missing barrier went unnoticed")
        _emu().set_schedule(0, 3)
        return errors

    def block_order():
        seen = set()
        for schedule in (0, 1, 7):
            _emu().set_schedule(schedule, 3)
            seen.add(_emu().selftest_last_writer(9))
        _emu().set_schedule(0, 3)
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


# ------------------------------------------------------------------------------------------------
# Non-finite values where no tap reads them. dk_detectron2/layers/reference.py multiplies every
# corner by its weight (a corner outside the grid reads cell 0 with weight 0, so inf there gives
# NaN): it is exact for finite values only. The functions below state the rule of csrc/bilinear.h
# for any value: a tap whose image point or scope point reads nothing is skipped, and a corner
# outside the grid is never read (torch.where, not a product with 0), gradients included.
# ------------------------------------------------------------------------------------------------
def _skip_corners(y, x, height, width):
    """(inside [same shape as y], [(index, weight, valid)] * 4), weight 0 where not valid."""
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y).detach(), torch.floor(x).detach()
    ly, lx = y - y0, x - x0
    corners = []
    for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)),
                      (1, 1, ly * lx)):
        cy, cx = y0 + dy, x0 + dx
        valid = inside & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        index = torch.where(valid, cy * width + cx, torch.zeros_like(cy)).long()
        corners.append((index, torch.where(valid, w, torch.zeros_like(w)), valid))
    return inside, corners


def _skip_taps(input, offset, rotation, weight, geo: Geometry):
    """Yields, per tap: the image corners [(read [B, C_in, P], weight [B, P], valid [B, P])],
    reads_image [B, P], the scope corners [(index, weight, valid)] over [B, G, P], and
    reads_scope [B, G, P]. An integer tap (offset None) has one image corner of weight 1."""
    B, c_in, H, W = input.shape
    ho, wo = geo.out()
    P = ho * wo
    Sh, Sw = weight.shape[2:]
    flat = input.reshape(B, c_in, H * W)
    rot = rotation.reshape(B, geo.G, geo.K[0] * geo.K[1], 2, P)
    oy = (torch.arange(ho, dtype=F64) * geo.stride[0] - geo.pad[0]).view(-1, 1).expand(ho, wo)
    ox = (torch.arange(wo, dtype=F64) * geo.stride[1] - geo.pad[1]).view(1, -1).expand(ho, wo)
    for kh in range(geo.K[0]):
        for kw in range(geo.K[1]):
            tap = kh * geo.K[1] + kw
            iy = (oy + kh * geo.dil[0]).reshape(1, P).expand(B, P)
            ix = (ox + kw * geo.dil[1]).reshape(1, P).expand(B, P)
            if offset is None:
                reads_image = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                index = torch.where(reads_image, iy * W + ix, torch.zeros_like(iy)).long()
                corners = [(index, torch.ones_like(iy), reads_image)]
            else:
                py = iy + offset[:, 2 * tap].reshape(B, P)
                px = ix + offset[:, 2 * tap + 1].reshape(B, P)
                reads_image, corners = _skip_corners(py, px, H, W)
            image = [(flat.gather(2, index.unsqueeze(1).expand(-1, c_in, -1)), w, valid)
                     for index, w, valid in (corners if H * W else ())]
            sy = rot[:, :, tap, 0] + kh + (Sh - geo.K[0]) / 2
            sx = rot[:, :, tap, 1] + kw + (Sw - geo.K[1]) / 2
            reads_scope, scope = _skip_corners(sy, sx, Sh, Sw)
            yield image, reads_image, scope, reads_scope


def _read(got, weight, keep):
    """sum_j where(keep_j, got_j, 0) * weight_j: a masked value is never multiplied, so neither
    the sum nor autograd's chain rule meets 0 * inf."""
    total = 0
    for g, w, k in zip(got, weight, keep):
        total = total + torch.where(k, g, torch.zeros_like(g)) * w
    return total


def skip_reference_depthwise(input, offset, rotation, weight, geo: Geometry):
    """The depthwise kernels' rule (offset None: deform_kernel2d): out = sum over the taps that
    read something of value * kernel, each a sum over the corners inside the grid."""
    B, C = input.shape[:2]
    ho, wo = geo.out()
    flat_w = weight.reshape(1, C, -1).expand(B, -1, -1)
    out = input.new_zeros(B, C, ho * wo)

    def per_channel(t):  # [B, G, P] -> [B, C, P]
        return t.repeat_interleave(C // geo.G, dim=1)

    for image, reads_image, scope, reads_scope in _skip_taps(input, offset, rotation, weight,
                                                             geo):
        reads = per_channel(reads_scope) & reads_image.unsqueeze(1)
        value = _read([g for g, _, _ in image], [w.unsqueeze(1) for _, w, _ in image],
                      [v.unsqueeze(1) & reads for _, _, v in image])
        kernel = _read([flat_w.gather(2, per_channel(i)) for i, _, _ in scope],
                       [per_channel(w) for _, w, _ in scope],
                       [per_channel(v) & reads for _, _, v in scope])
        if not image:  # an empty image: nothing is read
            continue
        out = out + torch.where(reads, value * kernel, torch.zeros_like(kernel))
    return out.reshape(B, C, ho, wo)


def skip_reference_scope_space(input, offset, rotation, weight, groups, geo: Geometry):
    """The grouped / full path's rule: columns U[b, g, c, s, p] built from the taps that read
    something and the corners inside the grid, then out[o] = sum_{c, s} W[o, c, s] U[g(o), c, s]
    (a GEMM: a non-finite weight reaches every output of its channel, as in any convolution)."""
    B, c_in = input.shape[:2]
    c_out, cq, Sh, Sw = weight.shape
    ho, wo = geo.out()
    P = ho * wo
    U = input.new_zeros(B, geo.G, c_in, Sh * Sw, P)
    for image, reads_image, scope, reads_scope in _skip_taps(input, offset, rotation, weight,
                                                             geo):
        if not image:
            continue
        reads = (reads_scope & reads_image.unsqueeze(1)).unsqueeze(2)  # [B, G, 1, P]
        value = _read([g.unsqueeze(1) for g, _, _ in image],
                      [w.unsqueeze(1).unsqueeze(2) for _, w, _ in image],
                      [v.unsqueeze(1).unsqueeze(2) & reads for _, _, v in image])  # [B,G,C,P]
        for index, w, valid in scope:
            keep = valid.unsqueeze(2) & reads
            product = w.unsqueeze(2) * value
            spread = torch.where(keep, product, torch.zeros_like(product))
            at = index.unsqueeze(2).unsqueeze(3).expand(-1, -1, c_in, 1, -1)
            U = U.scatter_add(3, at, spread.unsqueeze(3))
    outs = []
    for o in range(c_out):
        g, q = o // (c_out // geo.G), o // (c_out // groups)
        outs.append(torch.einsum("cs,bcsp->bp", weight[o].reshape(cq, -1),
                                 U[:, g, q * cq:(q + 1) * cq]))
    return torch.stack(outs, 1).reshape(B, c_out, ho, wo)


def skip_reference_nd(input, coord):
    M, H, W = input.shape
    flat = input.reshape(M, H * W)
    out = input.new_zeros(coord.shape[0], M)
    for index, w, valid in _skip_corners(coord[:, 0], coord[:, 1], H, W)[1]:
        got = flat[:, index].t()
        out = out + torch.where(valid.unsqueeze(1), got, torch.zeros_like(got)) * w.unsqueeze(1)
    return out


def _compare_nonfinite(name, got, want, dtype, errors):
    """Non-finite at the same places, finite values within tolerance. (Whether a place holds NaN
    or inf depends on where the product with inf is taken: inf * (a - b) in a kernel, inf * a -
    inf * b in autograd; the rule is about which places a non-finite value reaches.)"""
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        errors.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        return
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    if not torch.equal(bad_got, bad_want):
        extra = (bad_got & ~bad_want).nonzero()[:3].tolist()
        missing = (bad_want & ~bad_got).nonzero()[:3].tolist()
        errors.append(f"{name}: non-finite at {int(bad_got.sum())} places, expected "
                      f"{int(bad_want.sum())} (unexpected at {extra}, missing at {missing})")
        return
    if (~bad_want).any():
        _compare(name, got[~bad_want], want[~bad_want], dtype, errors)


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
        x, offset, rotation, weight = _tensors(geo, kind, dtype, False, seed=len(name))
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
        out, grads = _run_emulated(op, x, offset, rotation, weight, grad, geo, dtype,
                                   channels_last)
        names = ["input", "offset", "rotation", "weight"] if op == "dkc" else [
            "input", "rotation", "weight"]
        _compare_nonfinite("output", out, ref.detach(), dtype, errors)
        for n, g, w in zip(names, grads, want):
            _compare_nonfinite("grad_" + n, g, w, dtype, errors)
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
        out = _emu().nd_linear_sample(inp.to(dtype), coord.to(dtype))
        gi, gc = _emu()._nd_linear_sample_backward(grad.to(dtype), inp.to(dtype), coord.to(dtype))
        for n, g, w in (("output", out, ref.detach()), ("grad_input", gi, want[0]),
                        ("grad_coord", gc, want[1])):
            _compare_nonfinite(n, g, w, dtype, errors)
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
        ref = _reference().deform_kernel2d_reference(*leaves, geo.K, geo.stride, geo.pad, geo.dil,
                                                     geo.G)
        want = torch.autograd.grad(ref, leaves, grad)
        args = [t.to(F16) for t in (x, rotation, weight)]
        out = _emu().deform_kernel2d(*args, *_geometry_args(geo))
        grads = _emu()._deform_kernel2d_backward(grad.to(F16), *args, *_geometry_args(geo))
        _compare("output", out, ref, F16, errors)
        for n, g, w in zip(("input", "rotation", "weight"), grads, want):
            _compare("grad_" + n, g, w, F16, errors)
        return errors

    return Case("dk:full:f16-gemm-overflow", run)
