"""``python -m dk_detectron2.classification.train``: train a timm model (DK or not) on an ImageFolder.

Built on timm's library, with timm ``train.py``'s flag names for what they share: timm's dataset
and loader (``create_dataset``, ``create_loader``: its transforms, augmentation and distributed
sampler), ``create_optimizer_v2``, ``create_scheduler_v2``, ``ModelEmaV3``, ``CheckpointSaver``
(``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar``), ``resume_checkpoint``,
``update_summary`` (``summary.csv``, one row per epoch) and ``accuracy`` (top-1/top-5). What it
adds: the DK generators in their own parameter group (``--generator-lr-factor`` x the lr, no weight
decay), input checks with clear errors, an ETA on the progress line, ``results.json`` (best and
final top-1 and their epochs, parameters, multiply-adds per image) and ``val_predictions.json``
(the final model's prediction for every validation image, for per-object-size accuracy).

Data: ``--data-dir DIR`` holding ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.
Distributed: ``torchrun --nproc_per_node N -m dk_detectron2.classification.train ...`` (NCCL on
GPUs, gloo on CPUs); ``-b`` is the batch per process.

Example (the miniature dataset, see the README)::

    python -m dk_detectron2.classification.train --data-dir datasets/dk_shapes_cls \\
        --model dk_resnet18_dw_050 --num-classes 6 --img-size 64 --epochs 12 -b 64 --lr 0.1 \\
        --output output/classification
"""
import argparse
import json
import logging
import os
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import timm
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, ParseKwargs, random_seed, update_summary

from . import checkpoint_filter_fn, generator_parameters  # noqa: F401  (registers the models)
from ..tools.flops import image_model_macs
from .engine import check_image_folder, dk_param_groups, format_eta, train_one_epoch, validate

__all__ = ["build_parser", "main"]

_logger = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dk_detectron2.classification.train",
        description="Train a timm classification model (DK or rigid) on an ImageFolder.",
    )
    p.add_argument("--data-dir", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--model", default="dk_resnet18_dw_050", help="timm model name")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                   help="model keyword arguments, e.g. scope_size=4 generator=separable")
    p.add_argument("--num-classes", type=int, default=None, help="default: the classes found")
    p.add_argument("--initial-checkpoint", default="", help="weights to start from (filtered: "
                   "a rigid checkpoint loads into its DK twin)")
    p.add_argument("--resume", default="", help="a checkpoint of this run to continue from")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--mean", type=float, nargs=3, default=None)
    p.add_argument("--std", type=float, nargs=3, default=None)
    p.add_argument("--interpolation", default="", help="resize interpolation")
    p.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="batch per process")
    p.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    p.add_argument("--opt", default="sgd", help="timm optimizer name")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--generator-lr-factor", type=float, default=0.01,
                   help="lr of the DK generators as a fraction of --lr (MODEL.DK.GENERATOR_LR_FACTOR)")
    p.add_argument("--sched", default="cosine", help="timm scheduler")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--warmup-lr", type=float, default=1e-5)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--decay-epochs", type=float, default=90)
    p.add_argument("--decay-rate", type=float, default=0.1)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--no-aug", action="store_true", help="no training augmentation")
    p.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random-resized-crop area")
    p.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="crop aspect ratio")
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--color-jitter", type=float, default=0.4)
    p.add_argument("--drop", type=float, default=0.0, help="dropout before the classifier")
    p.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights")
    p.add_argument("--model-ema-decay", type=float, default=0.9998)
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, "
                   "bfloat16 on the CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("-j", "--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--checkpoint-hist", type=int, default=3)
    p.add_argument("--output", default="output/classification", help="parent of the run folder")
    p.add_argument("--experiment", default="", help="run folder name (default: the model name)")
    return p


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.img_size is not None and args.img_size < 16:
        raise ValueError(f"--img-size must be >= 16, got {args.img_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.model not in timm.list_models():
        close = timm.list_models(f"*{args.model.split('_')[0]}*")[:8]
        raise ValueError(f"--model {args.model!r} is not a timm model name (close: {close})")


def _init_distributed(args) -> torch.device:
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.rank = int(os.environ.get("RANK", 0))
    args.distributed = args.world_size > 1
    wanted = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(wanted)
    if args.distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def _autocast(args, device):
    if not args.amp:
        return nullcontext, None
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = NativeScaler(device=device.type) if dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def _write_json(path: str, payload) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


@torch.no_grad()
def _save_predictions(model, dataset, loader_kwargs, path, device, autocast) -> None:
    """The model's label for every image of ``dataset``, in the dataset's order."""
    loader = create_loader(dataset, is_training=False, distributed=False, **loader_kwargs)
    model.eval()
    predictions = []
    for inputs, _ in loader:
        with autocast():
            predictions += model(inputs.to(device)).argmax(1).tolist()
    files = [os.path.relpath(f, dataset.reader.root) if hasattr(dataset.reader, "root") else f
             for f in (dataset.filename(i, absolute=True) for i in range(len(dataset)))]
    labels = [int(t) for _, t in dataset.reader.samples]
    _write_json(path, [{"file_name": f, "label": t, "pred": p}
                       for f, t, p in zip(files, labels, predictions)])


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _check_args(args)
    classes = check_image_folder(args.data_dir, (args.train_split, args.val_split), args.num_classes)
    args.num_classes = len(classes)
    device = _init_distributed(args)
    random_seed(args.seed, args.rank)

    model = timm.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop,
                              **args.model_kwargs)
    if args.initial_checkpoint:
        load_checkpoint(model, args.initial_checkpoint, filter_fn=checkpoint_filter_fn)
    model.to(device)
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    macs_per_image = None
    if args.rank == 0:
        generators = sum(p.numel() for p in generator_parameters(model))
        try:  # informational: a model fvcore cannot trace still trains
            macs_per_image = image_model_macs(model, data_config["input_size"])
            macs = f"{macs_per_image / 1e6:.2f} M multiply-adds per image"
        except Exception as e:  # noqa: BLE001
            macs = f"multiply-adds not counted ({type(e).__name__}: {e})"
        _logger.info(f"Model {args.model} ({sum(p.numel() for p in model.parameters()):,} "
                     f"parameters, {generators:,} in DK generators, {macs}), data {data_config}")

    optimizer = create_optimizer_v2(
        dk_param_groups(model, args.weight_decay, args.generator_lr_factor),
        opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
    )
    autocast, loss_scaler = _autocast(args, device)
    resume_epoch = None
    if args.resume:
        resume_epoch = resume_checkpoint(model, args.resume, optimizer, loss_scaler,
                                         log_info=args.rank == 0, weights_only=False)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
        if args.resume:
            load_checkpoint(model_ema.module, args.resume, use_ema=True)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    dataset_train = create_dataset("", root=args.data_dir, split=args.train_split, is_training=True,
                                   seed=args.seed)
    dataset_eval = create_dataset("", root=args.data_dir, split=args.val_split, is_training=False)
    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"], num_workers=args.workers,
                  device=device, use_prefetcher=False, persistent_workers=False)
    loader_train = create_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, color_jitter=args.color_jitter,
        distributed=args.distributed, **common)
    eval_kwargs = dict(batch_size=args.validation_batch_size or args.batch_size,
                       crop_pct=data_config["crop_pct"], **common)
    loader_eval = create_loader(dataset_eval, is_training=False, distributed=args.distributed,
                                **eval_kwargs)

    train_loss = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else torch.nn.CrossEntropyLoss()
    eval_loss = torch.nn.CrossEntropyLoss()
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, step_on_epochs=False, updates_per_epoch=len(loader_train))
    start_epoch = resume_epoch or 0
    if start_epoch:
        lr_scheduler.step_update(start_epoch * len(loader_train))

    output_dir = os.path.join(args.output, args.experiment or args.model)
    saver = None
    if args.rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                                amp_scaler=loss_scaler, checkpoint_dir=output_dir,
                                recovery_dir=output_dir, decreasing=False,
                                max_history=args.checkpoint_hist)
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1, default=str)
    summary_csv = os.path.join(output_dir, "summary.csv")
    history = []
    if args.rank == 0 and start_epoch and os.path.exists(summary_csv):
        import csv
        with open(summary_csv) as f:
            history = [row for row in csv.DictReader(f) if int(row["epoch"]) < start_epoch]

    start_time = time.time()
    for epoch in range(start_epoch, num_epochs):
        if args.distributed and hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, model, loader_train, optimizer, train_loss, args, device=device,
            lr_scheduler=lr_scheduler, model_ema=model_ema, autocast=autocast,
            loss_scaler=loss_scaler, num_epochs=num_epochs, start_time=start_time,
            start_epoch=start_epoch)
        eval_metrics = validate(model, loader_eval, eval_loss, args, device=device,
                                autocast=autocast)
        if model_ema is not None:
            eval_metrics = validate(model_ema, loader_eval, eval_loss, args, device=device,
                                    autocast=autocast, log_suffix=" (EMA)")
        if args.rank == 0:
            lr = optimizer.param_groups[0]["lr"]
            update_summary(epoch, train_metrics, eval_metrics, summary_csv, lr=lr)
            history.append({"epoch": epoch, **{f"eval_{k}": v for k, v in eval_metrics.items()}})
            saver.save_checkpoint(epoch, metric=eval_metrics["top1"])
            elapsed = time.time() - start_time
            _logger.info(f"Epoch {epoch} done: top-1 {eval_metrics['top1']:.2f}, "
                         f"{elapsed:.0f}s elapsed, ETA "
                         f"{format_eta(elapsed / (epoch + 1 - start_epoch) * (num_epochs - epoch - 1))}")

    results = {}
    if args.rank == 0:
        final_model = model_ema.module if model_ema is not None else getattr(model, "module", model)
        _save_predictions(final_model, dataset_eval, eval_kwargs,
                          os.path.join(output_dir, "val_predictions.json"), device, autocast)
        best = max(history, key=lambda row: float(row["eval_top1"]))
        results = {
            "model": args.model, "model_kwargs": args.model_kwargs, "seed": args.seed,
            "num_classes": args.num_classes, "classes": classes, "epochs": num_epochs,
            "best_top1": float(best["eval_top1"]), "best_epoch": int(best["epoch"]),
            "final_top1": float(history[-1]["eval_top1"]),
            "final_top5": float(history[-1]["eval_top5"]),
            "parameters": sum(p.numel() for p in final_model.parameters()),
            "generator_parameters": sum(p.numel() for p in generator_parameters(final_model)),
            "macs_per_image": macs_per_image,
            "train_seconds": round(time.time() - start_time, 1),
            "world_size": args.world_size,
        }
        _write_json(os.path.join(output_dir, "results.json"), results)
        _logger.info(f"*** Best top-1 {results['best_top1']:.2f} (epoch {results['best_epoch']}), "
                     f"final {results['final_top1']:.2f}; {output_dir}/results.json")
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
