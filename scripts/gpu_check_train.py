"""Trains the DK Mask R-CNN (R50-FPN, the COCO config) and its rigid depthwise baseline for a few
iterations on the GPU, in float32 and with AMP, on the embedded dk_shapes dataset; fails when a
loss is not finite, and reports (does not judge) the DK / rigid iteration time ratio.

    python scripts/gpu_check_train.py --iters 20 [--budget SECONDS] [--json OUT.json]
                                      [--markdown OUT.md]

Both models see the same batches (same seed, same data order); the iteration time is the median
over the iterations after --warmup, each timed between CUDA synchronisations. --budget bounds the
whole run: each of the four runs stops after its share of it (at least 3 iterations), and the
report says how many iterations ran.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import build_detection_train_loader  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import dk_detectron2  # noqa: E402
from dk_detectron2.solver import build_dk_optimizer  # noqa: E402

CONFIGS = {
    "dk": "configs/COCO-InstanceSegmentation/mask_rcnn_dk_R_50_FPN_scratch_3x.yaml",
    "rigid": "configs/COCO-InstanceSegmentation/mask_rcnn_dw_R_50_FPN_scratch_3x.yaml",
}


def build_cfg(name, args):
    cfg = get_cfg()
    dk_detectron2.add_dk_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIGS[name]))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cuda", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "4",
        "DATASETS.TRAIN", "('dk_shapes_train',)", "DATASETS.TEST", "()",
        "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MAX_SIZE_TRAIN", str(args.size),
        "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.BASE_LR", "0.01",
        "SOLVER.WARMUP_ITERS", "10", "DATALOADER.NUM_WORKERS", "4", "SEED", "0",
    ])
    cfg.freeze()
    return cfg


def train(name, amp, args, seconds):
    torch.manual_seed(0)
    cfg = build_cfg(name, args)
    model = build_model(cfg).train()
    optimizer = build_dk_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loader = iter(build_detection_train_loader(cfg))
    losses, times = [], []
    deadline = time.perf_counter() + seconds
    with EventStorage(0):
        for it in range(args.iters):
            if it >= 3 and time.perf_counter() > deadline:
                break
            data = next(loader)
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss_dict = model(data)
                loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append({k: float(v) for k, v in loss_dict.items()})
    timed = times[min(args.warmup, len(times) - 1):]
    finite = all(math.isfinite(v) for step in losses for v in step.values())
    return {
        "model": name, "amp": amp, "iterations": len(times), "finite": finite,
        "median_s": statistics.median(timed), "min_s": min(timed),
        "first_total_loss": sum(losses[0].values()), "last_total_loss": sum(losses[-1].values()),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default: no limit)")
    parser.add_argument("--markdown", default=None, help="write the summary table here")
    parser.add_argument("--size", type=int, default=512, help="input side (default 512)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check_train.py: no GPU visible to torch")
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    runs = []
    for amp in (False, True):
        for name in ("rigid", "dk"):
            torch.cuda.reset_peak_memory_stats()
            left = 4 - len(runs)
            share = float("inf") if args.budget is None else (
                (args.budget - (time.perf_counter() - start)) / left)
            runs.append(train(name, amp, args, share))
            r = runs[-1]
            print(f"{name:5s} amp={amp!s:5s} {r['iterations']} iterations, median "
                  f"{r['median_s'] * 1000:.1f} ms/iter, loss "
                  f"{r['first_total_loss']:.3f} -> {r['last_total_loss']:.3f}, "
                  f"finite={r['finite']}",
                  flush=True)
    ratios = []
    for amp in (False, True):
        rigid, dk = [r for r in runs if r["amp"] == amp]
        ratio = dk["median_s"] / rigid["median_s"]
        ratios.append({"amp": amp, "dk_over_rigid": ratio})
        print(f"amp={amp}: DK / rigid iteration time {ratio:.2f}")
    ok = all(r["finite"] for r in runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios": ratios, "ok": ok, "args": vars(args),
                       "device": torch.cuda.get_device_name(0)}, f, indent=1)
    if args.markdown:
        lines = [f"Training, Mask R-CNN R50-FPN, {args.size} px, batch {args.batch} "
                 f"({torch.cuda.get_device_name(0)}; median after {args.warmup} warm-up "
                 "iterations):", "",
                 "| model | AMP | iterations | median ms/iter | peak GiB | loss first -> last "
                 "| finite |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            lines.append(f"| {r['model']} | {r['amp']} | {r['iterations']} | "
                         f"{r['median_s'] * 1000:.1f} | {r['peak_memory_gib']:.2f} | "
                         f"{r['first_total_loss']:.3f} -> {r['last_total_loss']:.3f} | "
                         f"{r['finite']} |")
        lines.append("")
        lines += [f"DK / rigid iteration time, {'AMP' if c['amp'] else 'float32'}: "
                  f"{c['dk_over_rigid']:.2f}" for c in ratios]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
