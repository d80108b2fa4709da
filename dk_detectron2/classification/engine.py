"""The training and evaluation loops of the classification trainer, on timm's utilities.

:func:`train_one_epoch` and :func:`validate` follow timm's ``train.py`` (its meters, ``accuracy``,
``reduce_tensor`` and log format), with an ETA on every progress line; :func:`check_image_folder`
validates the data before anything is built; :func:`dk_param_groups` puts the DK generators in
a parameter group of their own (a learning-rate factor, no weight decay).
"""
import logging
import math
import os
import time
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from timm.utils import AverageMeter, accuracy, reduce_tensor

from ..solver import generator_parameter_names

__all__ = ["check_image_folder", "dk_param_groups", "train_one_epoch", "validate", "format_eta"]

_logger = logging.getLogger("train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def check_image_folder(data_dir: str, splits: Sequence[str] = ("train", "val"),
                       num_classes: Optional[int] = None) -> List[str]:
    """Checks ``data_dir/<split>/<class>/<image>`` for every split; returns the class names.

    Raises:
        FileNotFoundError: ``data_dir`` or a split folder is missing.
        ValueError: a split has no class folders or no images, the splits' classes differ, or
            ``num_classes`` is not the number of classes found.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data-dir {data_dir!r} is not a folder")
    classes = None
    for split in splits:
        split_dir = os.path.join(data_dir, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"--data-dir {data_dir!r} has no {split!r} folder (expected an ImageFolder: "
                f"{data_dir}/{split}/<class>/<image>)"
            )
        found = sorted(d for d in os.listdir(split_dir)
                       if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
        if not found:
            raise ValueError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
        images = sum(
            1 for c in found for f in os.listdir(os.path.join(split_dir, c))
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if images == 0:
            raise ValueError(f"{split_dir} has class folders {found[:5]} but no images in them")
        if classes is not None and found != classes:
            raise ValueError(
                f"the splits' classes differ: {splits[0]!r} has {classes}, {split!r} has {found}"
            )
        classes = found
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(
            f"--num-classes is {num_classes} but {data_dir} has {len(classes)} classes: {classes}"
        )
    return classes


def dk_param_groups(model: torch.nn.Module, weight_decay: float,
                    generator_lr_factor: float) -> List[Dict]:
    """timm's weight-decay groups (no decay on norms and biases), with the DK generators in a
    group of their own: no weight decay and ``lr_scale = generator_lr_factor`` (timm's schedulers
    multiply the scheduled lr by a group's ``lr_scale``)."""
    if generator_lr_factor < 0:
        raise ValueError(f"--generator-lr-factor must be >= 0, got {generator_lr_factor}")
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, weight_decay, no_decay)
    names = generator_parameter_names(model)
    generators = {id(p) for name, p in model.named_parameters() if name in names}
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in generators]
        if rest:
            out.append({**group, "params": rest})
    own = [p for p in model.parameters() if id(p) in generators]
    if own:
        out.append({"params": own, "weight_decay": 0.0, "lr_scale": generator_lr_factor,
                    "dk_generator": True})
    return out


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, *, device, lr_scheduler=None,
                    model_ema=None, autocast=nullcontext, loss_scaler=None, num_epochs=1,
                    start_time=None, start_epoch=0) -> Dict[str, float]:
    """One epoch; returns ``{"loss": mean loss}``. Logs every ``args.log_interval`` steps:
    ``Train: E [step/steps (pct%)] Loss ... Time ... LR ... Data ... ETA h:mm:ss`` (the ETA covers
    the remaining epochs, validations included as measured)."""
    model.train()
    losses, batch_time, data_time = AverageMeter(), AverageMeter(), AverageMeter()
    steps = len(loader)
    num_updates = epoch * steps
    end = time.time()
    start_time = start_time or end
    for step, (inputs, target) in enumerate(loader):
        inputs, target = inputs.to(device), target.to(device)
        data_time.update(time.time() - end)
        with autocast():
            loss = loss_fn(model(inputs), target)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model.parameters())
        else:
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        num_updates += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        losses.update(loss.item(), inputs.size(0))
        batch_time.update(time.time() - end)
        last = step == steps - 1
        if (step % args.log_interval == 0 or last) and args.rank == 0:
            done = (epoch - start_epoch) * steps + step + 1
            remaining = (num_epochs - epoch) * steps - step - 1
            eta = (time.time() - start_time) / done * remaining
            lr = optimizer.param_groups[0]["lr"]
            _logger.info(
                f"Train: {epoch} [{step:>4d}/{steps} ({100.0 * (step + 1) / steps:>3.0f}%)]  "
                f"Loss: {losses.val:#.3g} ({losses.avg:#.3g})  "
                f"Time: {batch_time.val:.3f}s, {inputs.size(0) * args.world_size / batch_time.val:>7.2f}/s  "
                f"LR: {lr:.3e}  Data: {data_time.val:.3f}  ETA: {format_eta(eta)}"
            )
        end = time.time()
    loss_avg = torch.tensor([losses.avg], device=device)
    if args.distributed:
        loss_avg = reduce_tensor(loss_avg, args.world_size)
    return {"loss": float(loss_avg.item())}


@torch.no_grad()
def validate(model, loader, loss_fn, args, *, device, autocast=nullcontext,
             log_suffix="") -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over ``loader``, averaged over processes."""
    model.eval()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    k = min(5, args.num_classes)
    for inputs, target in loader:
        inputs, target = inputs.to(device), target.to(device)
        with autocast():
            output = model(inputs)
        loss = loss_fn(output.float(), target)
        acc1, acc5 = accuracy(output.float(), target, topk=(1, k))
        n = inputs.size(0)
        if args.distributed:
            stats = torch.tensor([loss.item() * n, acc1.item() * n, acc5.item() * n, n],
                                 device=device, dtype=torch.float64)
            dist.all_reduce(stats)
            loss_sum, acc1_sum, acc5_sum, n = stats.tolist()
            losses.update(loss_sum / n, n)
            top1.update(acc1_sum / n, n)
            top5.update(acc5_sum / n, n)
        else:
            losses.update(loss.item(), n)
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
    metrics = {"loss": losses.avg, "top1": top1.avg, "top5": top5.avg}
    if args.rank == 0:
        _logger.info(f"Test{log_suffix}: Loss: {losses.avg:>6.4f}  Acc@1: {top1.avg:>7.3f}  "
                     f"Acc@{k}: {top5.avg:>7.3f}")
    return metrics
