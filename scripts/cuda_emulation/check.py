"""Runs the emulated CUDA kernels (torch.ops.dk_emu) against the pure-PyTorch reference."""
import itertools, sys, time, torch
import os
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORK = os.environ.get("DK_EMU_DIR", "/tmp/dk_cuda_emulation")
sys.path.insert(0, REPO)
from torch.utils.cpp_extension import load
load(name="dk_emu_ext", sources=[WORK + "/src/cuda/deform_kernel_cuda.cpp",
     WORK + "/src/cuda/nd_linear_sample_cuda.cpp"], extra_cflags=["-O1", "-std=c++20", "-w"],
     build_directory=WORK + "/build", is_python_module=False)
from dk_detectron2.layers.reference import (deform_kernel2d_reference, deform_kernel_conv2d_reference,
                                            nd_linear_sample_reference)
E = torch.ops.dk_emu
torch.manual_seed(0)

def osz(n, k, s, p, d): return (n + 2 * p - d * (k - 1) - 1) // s + 1

def case(B, C, H, W, K, S, st, pd, dl, G, dtype=torch.float64, cl=False, rs=1.5, os_=2.0):
    Ho, Wo = osz(H, K[0], st[0], pd[0], dl[0]), osz(W, K[1], st[1], pd[1], dl[1])
    x = torch.randn(B, C, H, W, dtype=dtype)
    if cl: x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, *S, dtype=dtype)
    r = (torch.randn(B, G * K[0] * K[1] * 2, Ho, Wo, dtype=dtype) * rs)
    o = (torch.randn(B, K[0] * K[1] * 2, Ho, Wo, dtype=dtype) * os_)
    return x, o, r, w

def check(deformable, B, C, H, W, K, S, st, pd, dl, G, cl=False, dtype=torch.float64, nonfinite=False):
    x, o, r, w = case(B, C, H, W, K, S, st, pd, dl, G, cl=cl)
    # the reference sees the values the kernels see (rounded to dtype)
    x, o, r, w = [t.to(dtype).double() for t in (x, o, r, w)]
    if cl: x = x.contiguous(memory_format=torch.channels_last)
    if nonfinite:
        r.view(-1)[::7] = float("nan"); r.view(-1)[3::11] = float("inf"); r.view(-1)[5::13] = -float("inf")
        o.view(-1)[::5] = float("nan"); o.view(-1)[2::9] = float("inf")
    geo = (list(K), list(st), list(pd), list(dl), G)
    xs, os_, rs, ws = [t.clone().requires_grad_(True) for t in (x, o, r, w)]
    if deformable:
        ref = deform_kernel_conv2d_reference(xs, os_, rs, ws, K, st, pd, dl, G)
    else:
        ref = deform_kernel2d_reference(xs, rs, ws, K, st, pd, dl, G)
    go = torch.randn_like(ref).to(dtype).double()
    ref.backward(go)
    cast = lambda t: t.to(dtype)
    if deformable:
        out = E.deform_kernel_conv2d(cast(x).contiguous(memory_format=torch.channels_last) if cl else cast(x), cast(o), cast(r), cast(w), *geo)
        gi, goff, gr, gw = E._deform_kernel_conv2d_backward(cast(go), cast(x).contiguous(memory_format=torch.channels_last) if cl else cast(x), cast(o), cast(r), cast(w), *geo)
        pairs = [(out, ref), (gi, xs.grad), (goff, os_.grad), (gr, rs.grad), (gw, ws.grad)]
    else:
        xin = cast(x).contiguous(memory_format=torch.channels_last) if cl else cast(x)
        out = E.deform_kernel2d(xin, cast(r), cast(w), *geo)
        gi, gr, gw = E._deform_kernel2d_backward(cast(go), xin, cast(r), cast(w), *geo)
        pairs = [(out, ref), (gi, xs.grad), (gr, rs.grad), (gw, ws.grad)]
    names = ["out", "grad_input"] + (["grad_offset"] if deformable else []) + ["grad_rotation", "grad_weight"]
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=5e-2, rtol=5e-2) if dtype in (torch.float16, torch.bfloat16) else dict(atol=1e-4, rtol=1e-4)
    ok = True
    for name, (a, b) in zip(names, pairs):
        if name in ("out", "grad_input") and x.dim() == 4 and B * C > 0:
            want_cl = cl and not x.is_contiguous()
            if want_cl and not a.is_contiguous(memory_format=torch.channels_last) or (not want_cl and not a.is_contiguous()):
                print("  LAYOUT", name, a.stride()); ok = False
        if not torch.allclose(a.double(), b.double(), **tol, equal_nan=True):
            print("  MISMATCH", name, (a.double() - b.double()).abs().nan_to_num(1e9).max().item()); ok = False
    return ok

configs = [
    # deformable, B, C, H, W, K, S, stride, pad, dil, G
    (False, 2, 4, 7, 6, (3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 1),
    (True, 2, 4, 7, 6, (3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 1),
    (False, 1, 4, 9, 8, (3, 3), (5, 6), (2, 2), (2, 2), (2, 2), 2),
    (True, 1, 4, 9, 8, (3, 3), (5, 6), (2, 2), (2, 2), (2, 2), 4),
    (False, 2, 8, 6, 7, (1, 1), (3, 2), (2, 1), (0, 0), (1, 1), 2),
    (True, 2, 8, 6, 7, (1, 1), (1, 1), (2, 1), (0, 1), (1, 1), 2),
    (False, 1, 4, 8, 9, (5, 5), (6, 8), (1, 2), (2, 1), (1, 1), 4),
    (True, 1, 4, 8, 9, (5, 3), (7, 5), (1, 1), (2, 0), (1, 2), 2),
    (False, 1, 2, 5, 5, (3, 3), (12, 11), (1, 1), (1, 1), (1, 1), 1),   # 132 cells > 96: two passes (float)
    (True, 1, 2, 5, 5, (3, 3), (8, 7), (1, 1), (1, 1), (1, 1), 1),     # 56 cells > 48: two passes (double)
    (False, 3, 4, 20, 20, (3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 2),  # several grad_weight chunks
    (False, 2, 42, 6, 7, (3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 2),   # uneven forward channel chunks
    (True, 2, 42, 6, 7, (3, 3), (5, 4), (2, 1), (1, 1), (1, 1), 2),
    (True, 1, 6, 6, 7, (1, 9), (2, 9), (1, 1), (0, 4), (1, 1), 3),     # 9 taps, not 3x3
]
allok = True
t0 = time.time()
for cfg in configs:
    for dtype, cl in [(torch.float64, False), (torch.float32, True), (torch.float32, False)]:
        ok = check(*cfg, cl=cl, dtype=dtype)
        print(("ok  " if ok else "FAIL"), dtype, "cl" if cl else "nchw", cfg, flush=True)
        allok &= ok
for cfg in configs[:2]:
    for dtype in (torch.float16, torch.bfloat16):
        ok = check(*cfg, dtype=dtype, cl=True); print(("ok  " if ok else "FAIL"), dtype, cfg); allok &= ok
    ok = check(*cfg, nonfinite=True); print(("ok  " if ok else "FAIL"), "nonfinite", cfg); allok &= ok
# batch 0
x, o, r, w = case(0, 4, 5, 5, (3, 3), (4, 4), (1, 1), (1, 1), (1, 1), 1)
geo = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
out = E.deform_kernel2d(x, r, w, *geo); assert out.shape == (0, 4, 5, 5)
gi, gr, gw = E._deform_kernel2d_backward(out, x, r, w, *geo); assert (gw == 0).all() and gw.shape == w.shape
out = E.deform_kernel_conv2d(x, o, r, w, *geo); assert out.shape == (0, 4, 5, 5)
g = E._deform_kernel_conv2d_backward(out, x, o, r, w, *geo); assert (g[3] == 0).all()
# empty image with padding
x = torch.randn(1, 2, 0, 3, dtype=torch.float64); w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
r = torch.randn(1, 18, 2, 5, dtype=torch.float64)
out = E.deform_kernel2d(x, r, w, [1, 1][:1]*2 if False else [3, 3], [1, 1], [2, 2], [1, 1], 1)
print("empty image out", out.shape, out.abs().sum().item())
# nd_linear_sample
for dtype in (torch.float64, torch.float32):
    inp = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    coord = (torch.randn(11, 2, dtype=torch.float64) * 3).requires_grad_(True)
    with torch.no_grad(): coord[0, 0] = float("nan"); coord[1, 1] = float("inf")
    ref = nd_linear_sample_reference(inp, coord); go = torch.randn_like(ref); ref.backward(go)
    out = E.nd_linear_sample(inp.detach().to(dtype), coord.detach().to(dtype))
    gi, gc = E._nd_linear_sample_backward(go.to(dtype), inp.detach().to(dtype), coord.detach().to(dtype))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for name, a, b in (("out", out, ref), ("gi", gi, inp.grad), ("gc", gc, coord.grad)):
        ok = torch.allclose(a.double(), b.double(), atol=tol, rtol=tol)
        allok &= ok
        print("nd", dtype, name, "ok" if ok else "FAIL", (a.double() - b.double()).abs().max().item())
print("ALL OK" if allok else "SOME FAILED", "launches", time.time() - t0)
