"""DistributedDataParallel wrapping that works for CPU models as well as CUDA ones."""
import contextlib

import torch.distributed as dist
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["create_ddp_model", "device_aware_ddp", "share_rank0_buffers"]

_d2_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model, *, fp16_compression=False, **kwargs):
    """Detectron2's ``create_ddp_model``, except that a model on the CPU gets no ``device_ids``
    (DistributedDataParallel rejects them for CPU modules; gloo then all-reduces CPU tensors)."""
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        device = next(model.parameters()).device
        kwargs["device_ids"] = None if device.type == "cpu" else [comm.get_local_rank()]
    return _d2_create_ddp_model(model, fp16_compression=fp16_compression, **kwargs)


@contextlib.contextmanager
def device_aware_ddp():
    """Within the block, ``DefaultTrainer.__init__`` wraps models with :func:`create_ddp_model`.

    ``DefaultTrainer`` calls the module-level ``create_ddp_model`` of ``detectron2.engine.defaults``
    directly; swapping that one name for the construction is the smallest change that keeps all of
    its other logic.
    """
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _d2_create_ddp_model


def share_rank0_buffers(model) -> None:
    """Copies rank 0's buffers (BatchNorm running statistics) into every process's DDP model.

    DDP broadcasts them at the start of each training forward, but the last training step leaves
    each process with statistics updated by its own images; evaluating then would mix the
    per-process statistics, and the metrics would differ from those of the saved checkpoint
    (rank 0's) evaluated alone, or of a run resumed from it. A no-op outside DDP.
    """
    if not isinstance(model, DistributedDataParallel) or comm.get_world_size() == 1:
        return
    for buffer in model.module.buffers():
        dist.broadcast(buffer.data, src=0)
