"""One timing table of the DK CUDA kernels at real shapes, for scripts/gpu_check.sh's report.

    python scripts/gpu_check_bench.py [--budget SECONDS] [--markdown OUT.md] [--json OUT.json]

Shapes: the depthwise 3x3 layers of ResNet-50's res3-res5 at batch 32 (224 px input: 128 x 28^2,
256 x 14^2, 512 x 7^2; scope 5) and of the embedded job's ResNet-18 (batch 4, 256 px: 64 x 32^2,
128 x 16^2, 256 x 8^2). Rows: deform_kernel2d forward and forward + backward against cuDNN's
depthwise conv2d (float32 with TF32 off and on, bfloat16), and deform_kernel_conv2d (DK + DCN)
against torchvision's deform_conv2d (float32). Each time is the median of >= 20 runs between CUDA
events after warm-up runs; GB/s is the least traffic of the call over that time, a lower bound
of the achieved bandwidth: the forward reads every input and writes the output once, forward +
backward is counted as three times that (the backward reads grad_output and the inputs again and
writes one gradient per input). A slow kernel is
reported, not failed: the exit status is non-zero only when a call raises. Rows that do not fit
in --budget are listed as skipped.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dk_detectron2.layers import deform_kernel2d, deform_kernel_conv2d  # noqa: E402

SHAPES = [  # (name, B, C, H, W); K = 3, S = 5, stride 1, padding 1
    ("R50 res3, B32", 32, 128, 28, 28),
    ("R50 res4, B32", 32, 256, 14, 14),
    ("R50 res5, B32", 32, 512, 7, 7),
    ("shapes R18 res3, B4", 4, 64, 32, 32),
    ("shapes R18 res4, B4", 4, 128, 16, 16),
    ("shapes R18 res5, B4", 4, 256, 8, 8),
]
K, S = 3, 5


def median_ms(fn, runs=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tensors(B, C, H, W, dtype, grad, offset=False):
    dev = "cuda"
    t = dict(
        x=torch.randn(B, C, H, W, device=dev, dtype=dtype),
        rotation=torch.randn(B, 2 * K * K, H, W, device=dev, dtype=dtype) * 0.5,
        weight=torch.randn(C, 1, S, S, device=dev, dtype=dtype) * 0.1,
        rigid=torch.randn(C, 1, K, K, device=dev, dtype=dtype) * 0.1,
    )
    if offset:
        t["offset"] = torch.randn(B, 2 * K * K, H, W, device=dev, dtype=dtype) * 0.5
    for v in t.values():
        v.requires_grad_(grad)
    return t


def least_bytes(tensors_read, outputs):
    return sum(t.numel() * t.element_size() for t in list(tensors_read) + list(outputs))


def rows_for(name, B, C, H, W):
    """(label, dtype, tf32, fn_fwd, fn_fwd_bwd, bytes_fwd, bytes_fwd_bwd) of one shape."""
    rows = []
    geo = dict(kernel_size=K, padding=1)
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        t = tensors(B, C, H, W, dtype, grad=True)
        out = torch.empty(B, C, H, W, device="cuda", dtype=dtype)
        dk_in = [t["x"], t["rotation"], t["weight"]]
        dk = (lambda t=t: deform_kernel2d(t["x"], t["rotation"], t["weight"], **geo))
        conv = (lambda t=t: F.conv2d(t["x"], t["rigid"], padding=1, groups=C))
        for label, fn, inputs in (("DK deform_kernel2d", dk, dk_in),
                                  ("cuDNN depthwise conv", conv, [t["x"], t["rigid"]])):
            if label.startswith("DK") and tf32:
                continue  # TF32 does not touch the DK kernels (float32 FMA): timed once
            fwd_bytes = least_bytes(inputs, [out])
            rows.append((label, dtype, tf32, fn, fwd_bytes, 2 * fwd_bytes + fwd_bytes))
    t = tensors(B, C, H, W, torch.float32, grad=True, offset=True)
    out = torch.empty(B, C, H, W, device="cuda")
    try:
        from torchvision.ops import deform_conv2d
    except ImportError:  # reported as skipped
        deform_conv2d = None
    dkc = (lambda t=t: deform_kernel_conv2d(t["x"], t["offset"], t["rotation"], t["weight"],
                                            kernel_size=K, padding=1))
    inputs = [t["x"], t["offset"], t["rotation"], t["weight"]]
    rows.append(("DK+DCN deform_kernel_conv2d", torch.float32, False, dkc,
                 least_bytes(inputs, [out]), 3 * least_bytes(inputs, [out])))
    if deform_conv2d is not None:
        tv = (lambda t=t: deform_conv2d(t["x"], t["offset"], t["rigid"], padding=1))
        inputs = [t["x"], t["offset"], t["rigid"]]
        rows.append(("torchvision deform_conv2d", torch.float32, False, tv,
                     least_bytes(inputs, [out]), 3 * least_bytes(inputs, [out])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=None, help="seconds (default: no limit)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_bench.py: no GPU visible to torch")
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    results, skipped = [], []
    for name, B, C, H, W in SHAPES:
        for label, dtype, tf32, fn, bytes_fwd, bytes_both in rows_for(name, B, C, H, W):
            row = dict(shape=name, op=label, dtype=str(dtype).replace("torch.", ""), tf32=tf32)
            if args.budget is not None and time.perf_counter() - start > args.budget:
                skipped.append(row)
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32

            def both(fn=fn):
                fn().sum().backward()

            with torch.no_grad():
                fwd = median_ms(fn, args.runs)
            fwd_bwd = median_ms(both, args.runs)
            row.update(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_gbps=bytes_fwd / fwd / 1e6,
                       fwd_bwd_gbps=bytes_both / fwd_bwd / 1e6)
            results.append(row)
            print(f"{name:22s} {label:30s} {row['dtype']:8s} tf32={tf32!s:5s} fwd {fwd:8.3f} ms "
                  f"fwd+bwd {fwd_bwd:8.3f} ms", flush=True)
    base = {(r["shape"], r["dtype"], r["tf32"]): r for r in results if r["op"].startswith("cuDNN")}
    dcn = {r["shape"]: r for r in results if r["op"].startswith("torchvision")}
    lines = [f"Timing ({torch.cuda.get_device_name(0)}, torch {torch.__version__}; CUDA events, "
             f"median of {args.runs} after 3 warm-ups; K 3, scope 5; GB/s: least traffic / time; "
             "x: time / the rival's, cuDNN depthwise conv (same dtype and TF32) or torchvision "
             "deform_conv2d):", "",
             "| shape | op | dtype | TF32 | fwd ms | fwd GB/s | fwd x | fwd+bwd ms | "
             "fwd+bwd GB/s | fwd+bwd x |", "| --- | --- | --- | --- | --- | --- | --- | --- | "
             "--- | --- |"]
    for r in results:
        rival = None
        if r["op"].startswith("DK deform_kernel2d"):
            rival = base.get((r["shape"], r["dtype"], False))
        elif r["op"].startswith("DK+DCN"):
            rival = dcn.get(r["shape"])
        ratio = (lambda key: f"{r[key] / rival[key]:.2f}" if rival else "")
        lines.append(f"| {r['shape']} | {r['op']} | {r['dtype']} | {'on' if r['tf32'] else 'off'}"
                     f" | {r['fwd_ms']:.3f} | {r['fwd_gbps']:.0f} | {ratio('fwd_ms')} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_gbps']:.0f} | {ratio('fwd_bwd_ms')} |")
    if skipped:
        lines += ["", f"Skipped (over the {args.budget:.0f} s budget): " + "; ".join(
            f"{r['shape']} {r['op']} {r['dtype']}" for r in skipped)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
    main()
