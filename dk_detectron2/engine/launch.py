"""Multi-process launch with an explicit backend, so CPU models can use gloo on GPU machines too.

Detectron2's :func:`detectron2.engine.launch` picks NCCL whenever CUDA is visible; a model kept on
the CPU (``MODEL.DEVICE cpu``) then cannot all-reduce. This launcher takes the backend from the
caller (``"gloo"`` for CPU models, ``"nccl"`` for CUDA ones) and otherwise behaves the same: one
machine spawns ``num_processes_per_machine`` workers, each joins the process group and calls
``main_func(*args)``. With a world size of 1 it just calls ``main_func``.
"""
import gc
import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "backend_for_device"]


def backend_for_device(device: str) -> str:
    """``"nccl"`` for a CUDA ``MODEL.DEVICE``, ``"gloo"`` otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: str = "gloo",
):
    """Like :func:`detectron2.engine.launch`, with ``backend`` ("gloo" or "nccl") chosen by the caller.

    Args:
        main_func: called as ``main_func(*args)`` in every worker.
        num_processes_per_machine: workers on this machine (GPUs for nccl; any number for gloo).
        num_machines, machine_rank: the multi-machine layout; every machine calls ``launch``.
        dist_url: rendezvous URL, e.g. ``"tcp://127.0.0.1:8686"``, or ``"auto"`` (one machine).
        backend: ``"gloo"`` (CPU tensors) or ``"nccl"`` (CUDA tensors, one GPU per worker).
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if num_processes_per_machine < 1:
        raise ValueError(
            f"num_processes_per_machine must be >= 1, got {num_processes_per_machine}"
        )
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only; pass a tcp:// URL")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if backend == "nccl" and num_processes_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"nccl needs one GPU per process: {num_processes_per_machine} processes per machine "
            f"requested, {torch.cuda.device_count()} GPUs visible (use MODEL.DEVICE cpu for gloo)"
        )
    mp.start_processes(
        _distributed_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
              timeout, backend),
        daemon=False,
    )


def _distributed_worker(
    local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
    timeout, backend,
):
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(
            backend=backend, init_method=dist_url, world_size=world_size, rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    comm.create_local_process_group(num_processes_per_machine)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    main_func(*args)
    _leave_process_groups()


def _leave_process_groups():
    """Every rank leaves together, and its process groups are freed before the worker returns.

    A group still alive at interpreter finalization is destroyed there, when its backend's threads
    can no longer take the GIL: the process aborts after its work has finished ("terminate called
    without an active exception", SIGABRT). ``dist.destroy_process_group`` only unregisters the
    groups; Detectron2's ``comm`` module keeps two of them alive (the local group, and the cached
    global gloo group of ``comm.all_gather``), so those references are dropped here too, and the
    groups' threads are joined now, while the interpreter is whole.
    """
    comm.synchronize()
    dist.destroy_process_group()
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
    comm.create_local_process_group.cache_clear()  # a later launch in this process makes a new one
    gc.collect()
