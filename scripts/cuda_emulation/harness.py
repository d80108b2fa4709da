"""What every case of the CUDA emulation stands on: the geometry of a call, the Case record, the
test tensors, the tolerance comparison, and the calls into the emulated operators
(``torch.ops.dk_emu``) and into dk_detectron2/layers/reference.py. Importing it needs no compiled
code."""
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {F64: "f64", F32: "f32", F16: "f16", BF16: "bf16"}
# max |emulated - reference| / max(1, max |reference|)
TOLERANCE = {F64: 1e-9, F32: 2e-4, F16: 2e-2, BF16: 8e-2}


def reference_module():
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


def emu():
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


def compare(name, got, want, dtype, errors):
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


def weight_channels(kind, geo: Geometry):
    """(in channels, out channels, weight.size(1)) of depthwise / grouped / full weights."""
    if kind == "depthwise":
        return geo.C, geo.C, 1
    groups = 2 if kind == "grouped" else 1
    c_out = geo.C + 2 * geo.G if (geo.C + 2 * geo.G) % (groups * geo.G) == 0 else geo.C
    return geo.C, c_out, geo.C // groups


def make_tensors(geo: Geometry, kind, dtype, nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out, per_group = weight_channels(kind, geo)
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


def geometry_args(geo: Geometry):
    return [list(geo.K), list(geo.stride), list(geo.pad), list(geo.dil), geo.G]


def run_ops(ops, op, x, offset, rotation, weight, grad, geo, dtype, channels_last):
    """Forward and every gradient of deform_kernel2d ("dk") or deform_kernel_conv2d ("dkc") from
    the operator namespace ``ops`` (``torch.ops.dk_emu`` or ``torch.ops.dk_detectron2``), the
    tensors cast to ``dtype`` (the input channels-last if asked): (output, [gradients])."""
    xs = x.to(dtype)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    args = [xs, offset.to(dtype)] if op == "dkc" else [xs]
    args += [rotation.to(dtype), weight.to(dtype)]
    g = geometry_args(geo)
    if op == "dkc":
        out = ops.deform_kernel_conv2d(*args, *g)
        grads = ops._deform_kernel_conv2d_backward(grad.to(dtype), *args, *g)
    else:
        out = ops.deform_kernel2d(*args, *g)
        grads = ops._deform_kernel2d_backward(grad.to(dtype), *args, *g)
    return out, list(grads)


def run_emulated(op, x, offset, rotation, weight, grad, geo, dtype, channels_last):
    """:func:`run_ops` on the emulated CUDA operators."""
    return run_ops(emu(), op, x, offset, rotation, weight, grad, geo, dtype, channels_last)
