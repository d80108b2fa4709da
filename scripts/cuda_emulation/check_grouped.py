"""Emulated CUDA grouped path (scope-space) vs the pure-PyTorch reference."""
import sys, torch
import os
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORK = os.environ.get("DK_EMU_DIR", "/tmp/dk_cuda_emulation")
sys.path.insert(0, REPO)
from torch.utils.cpp_extension import load
load(name="dk_emu_ext2", sources=[WORK + "/src/cuda/deform_kernel_cuda.cpp",
     WORK + "/src/cuda/scope_space_cuda.cpp"], extra_cflags=["-O1", "-std=c++20", "-w"],
     extra_include_paths=[WORK + "/src", WORK + "/src/cuda"],
     build_directory=WORK + "/build2", is_python_module=False)
from dk_detectron2.layers.reference import deform_kernel_conv2d_reference as ref
E = torch.ops.dk_emu
torch.manual_seed(0)
fails = 0
for (Cin, Cout, groups, G, S, st, dl, dtype, cl) in [
    (4, 6, 1, 1, 4, 1, 1, torch.float64, False), (4, 6, 2, 3, 4, 2, 1, torch.float64, True),
    (6, 6, 3, 2, 5, 1, 2, torch.float64, False), (3, 6, 3, 1, 3, 1, 1, torch.float64, False),
    (8, 4, 2, 2, 4, 1, 1, torch.float32, True), (8, 4, 1, 1, 4, 1, 1, torch.bfloat16, False)]:
    B, H, W, K, p = 2, 7, 6, 3, 1
    Ho = (H + 2 * p - dl * (K - 1) - 1) // st + 1; Wo = (W + 2 * p - dl * (K - 1) - 1) // st + 1
    x = torch.randn(B, Cin, H, W, dtype=torch.float64); w = torch.randn(Cout, Cin // groups, S, S, dtype=torch.float64)
    r = torch.randn(B, G * 18, Ho, Wo, dtype=torch.float64) * 1.5; o = torch.randn(B, 18, Ho, Wo, dtype=torch.float64) * 2
    r.view(-1)[::17] = float("nan")
    x, w, r, o = [t.to(dtype).double() for t in (x, w, r, o)]
    for deformable in (False, True):
        ins = [t.clone().requires_grad_() for t in (x, o, r, w)]
        expect = ref(ins[0], ins[1] if deformable else None, ins[2], ins[3], K, st, p, dl, G)
        g = torch.randn_like(expect)
        grads = torch.autograd.grad(expect, [ins[0], ins[1], ins[2], ins[3]] if deformable else [ins[0], ins[2], ins[3]], g)
        xd = x.to(dtype); xd = xd.contiguous(memory_format=torch.channels_last) if cl else xd
        args = [t.to(dtype) for t in ((o, r, w) if deformable else (r, w))]
        geo = ([K, K], [st, st], [p, p], [dl, dl], G)
        if deformable:
            out = E.deform_kernel_conv2d(xd, *args, *geo)
            got = E._deform_kernel_conv2d_backward(g.to(dtype), xd, *args, *geo)
        else:
            out = E.deform_kernel2d(xd, *args, *geo)
            got = E._deform_kernel2d_backward(g.to(dtype), xd, *args, *geo)
        tol = 1e-9 if dtype == torch.float64 else (1e-3 if dtype == torch.float32 else 0.1)
        errs = [(out.double() - expect).abs().max().item()] + [(a.double() - b).abs().max().item() / (1 + b.abs().max().item()) for a, b in zip(got, grads)]
        ok = all(e < tol * 50 for e in errs) and (not cl or out.is_contiguous(memory_format=torch.channels_last))
        fails += not ok
        print("OK " if ok else "BAD", Cin, Cout, groups, G, S, st, dl, dtype, cl, deformable, ["%.1e" % e for e in errs])
print("FAILURES", fails)
