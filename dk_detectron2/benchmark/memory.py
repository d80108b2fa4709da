"""Peak memory an operation allocates beyond what it returns, measured with ``torch.profiler``.

With ``profile_memory=True`` the profiler records every allocation and free of the CPU (and
CUDA) allocator as a ``[memory]`` event carrying a signed byte count. Summing them in time order
gives the memory the profiled region holds at each instant; its maximum is the region's peak.
Whatever the region returns (the output, or the output and the gradients) is still alive at the
end, so ``extra = peak - returned`` is the scratch memory the operation needed on top of its
results -- e.g. a per-tap column buffer ``[B, C*K*K, Ho, Wo]`` would show up both in ``extra``
and as the largest single allocation.
"""

import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["MemoryRecord", "measure_memory", "tensor_bytes"]

_MEMORY_EVENT = "[memory]"


def tensor_bytes(value) -> int:
    """Bytes of the storage of every tensor in ``value`` (a tensor or nested tuples/lists)."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    return 0


@dataclass
class MemoryRecord:
    """Memory of one profiled call, in bytes.

    Attributes:
        peak_bytes: most memory the call held at once (allocations minus frees, from its start).
        returned_bytes: size of what it returned (output and gradients).
        extra_bytes: ``peak_bytes - returned_bytes``, the scratch memory (>= 0).
        largest_allocation_bytes: the largest single allocation during the call.
        device: "cpu" or "cuda".
    """

    peak_bytes: int
    returned_bytes: int
    extra_bytes: int
    largest_allocation_bytes: int
    device: str

    def to_dict(self):
        return asdict(self)


def _memory_events(prof, device_type: str) -> Iterable:
    wanted = torch.device(device_type).type
    for event in prof.profiler.kineto_results.events():
        if event.name() != _MEMORY_EVENT:
            continue
        if str(event.device_type()).split(".")[-1].lower() == wanted:
            yield event


@contextlib.contextmanager
def _silence_native_output():
    """Sends file descriptors 1 and 2 to /dev/null (the profiler's native library prints a line
    per start and stop), restoring them afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def measure_memory(fn: Callable[[], object], device: str = "cpu") -> MemoryRecord:
    """Runs ``fn()`` once under the profiler and returns its :class:`MemoryRecord`.

    The call runs with one intra-op thread: the profiler records allocations of the thread that
    holds its state, and with one thread ``at::parallel_for`` runs inline there, so scratch
    buffers allocated inside parallel regions are counted too (with T threads, per-thread
    scratch would be T times what is reported).
    """
    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _silence_native_output():
            with profile(activities=activities, profile_memory=True) as prof:
                result = fn()
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
    finally:
        torch.set_num_threads(threads)
    events = sorted(_memory_events(prof, device), key=lambda event: event.start_ns())
    held = peak = largest = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
        largest = max(largest, event.nbytes())
    returned = tensor_bytes(result)
    del result
    return MemoryRecord(
        peak_bytes=int(peak),
        returned_bytes=int(returned),
        extra_bytes=int(max(0, peak - returned)),
        largest_allocation_bytes=int(largest),
        device=torch.device(device).type,
    )
