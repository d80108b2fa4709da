"""How the benchmark measures: interleaved wall-clock timing, ratios, peak memory, linear fits.

The machines these benchmarks run on are shared and noisy, so every figure is a ratio between
callables timed *in the same run*. :func:`time_interleaved` runs a set of callables round-robin
(round r runs every callable once), so a burst of load from a neighbour slows all of them alike.
:func:`compare` takes both sides of a ratio from the same rounds, the same number of samples each,
and reports the median of the per-round ratios with their range.
"""

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch.profiler import ProfilerActivity, profile


def synchronize(device: Union[str, torch.device, None]) -> None:
    """Waits for queued kernels on ``device`` (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Seconds per call of one callable, one entry per repeat (= per round it ran in).

    Attributes:
        label: what was timed.
        times_s: per-call time of each repeat (a repeat runs the callable ``number`` times and
            divides), in round order.
        number: calls per repeat (chosen so a repeat lasts at least the sample time).
        threads: ``torch.get_num_threads()`` while it ran.
    """

    label: str
    times_s: List[float] = field(default_factory=list)
    number: int = 1
    threads: int = 1

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.times_s)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times_s)

    def to_dict(self) -> Dict[str, object]:
        return {
            "min_ms": self.min_ms,
            "median_ms": self.median_ms,
            "max_ms": 1e3 * max(self.times_s),
            "repeats": len(self.times_s),
            "number": self.number,
            "threads": self.threads,
            "times_ms": [1e3 * t for t in self.times_s],
        }


def _time_calls(fn: Callable[[], object], number: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / number


def time_interleaved(
    callables: Mapping[str, Callable[[], object]],
    repeats: Union[int, Mapping[str, int]],
    sample_time_s: float = 0.02,
    warmup: int = 1,
    device: Union[str, torch.device, None] = None,
    max_number: int = 1000,
    on_round: Optional[Callable[[], None]] = None,
) -> Dict[str, Measurement]:
    """Times ``callables`` round-robin and returns a :class:`Measurement` per name.

    Args:
        callables: name -> zero-argument callable (it runs the operation once).
        repeats: repeats of every callable, or name -> repeats (slow callables get fewer: round
            r runs only the callables with more than r repeats, so a callable's first n samples
            come from rounds 0..n-1, the same rounds as any other callable's first n).
        sample_time_s: each repeat calls a fast callable ``number`` times so that a repeat lasts
            at least this long; ``number`` is calibrated after the warm-up. 0: one call per
            repeat, no calibration.
        warmup: untimed calls before calibration (allocator, caches, lazy initialisation).
        device: synchronised around every repeat when it is a CUDA device.
        on_round: called after each round (e.g. to advance a progress bar).
    """
    counts = {
        name: int(repeats[name] if isinstance(repeats, Mapping) else repeats) for name in callables
    }
    if any(count < 1 for count in counts.values()):
        raise ValueError(f"repeats must be positive, got {counts}")
    threads = torch.get_num_threads()
    results = {name: Measurement(label=name, threads=threads) for name in callables}
    for name, fn in callables.items():
        for _ in range(warmup):
            fn()
        if sample_time_s > 0:
            once = _time_calls(fn, 1, device)
            results[name].number = int(
                min(max_number, max(1, math.ceil(sample_time_s / max(once, 1e-9))))
            )
    for round_index in range(max(counts.values())):
        for name, fn in callables.items():
            if round_index < counts[name]:
                results[name].times_s.append(_time_calls(fn, results[name].number, device))
        if on_round is not None:
            on_round()
    return results


def ratio(op: Measurement, baseline: Measurement) -> Dict[str, float]:
    """op / baseline over the rounds both ran (the first n samples of each, n the smaller count):
    the median of the per-round ratios (both sides of a round ran one after the other, so a
    burst of load falls on both), and the smallest and largest per-round ratio. The ratio of the
    two sides' medians would pair samples of different rounds."""
    n = min(len(op.times_s), len(baseline.times_s))
    per_round = [a / b for a, b in zip(op.times_s[:n], baseline.times_s[:n])]
    return {
        "samples": n,
        "ratio_median": statistics.median(per_round),
        "ratio_min": min(per_round),
        "ratio_max": max(per_round),
    }


def compare(
    op: Mapping[str, Measurement], baseline: Mapping[str, Measurement]
) -> Dict[str, object]:
    """Compares two sets of measurements keyed by layout. Both sides keep the rounds they share
    (the same number of samples); each side takes its layout of lowest median over those rounds.

    Returns the layouts, each side's median, min and max (ms) over those rounds, and
    :func:`ratio` of the two (above 1: the operation is slower than the baseline).
    """
    n = min(len(m.times_s) for m in (*op.values(), *baseline.values()))
    shared = lambda m: Measurement(m.label, m.times_s[:n], m.number, m.threads)  # noqa: E731
    op = {layout: shared(m) for layout, m in op.items()}
    baseline = {layout: shared(m) for layout, m in baseline.items()}
    op_layout = min(op, key=lambda layout: op[layout].median_ms)
    base_layout = min(baseline, key=lambda layout: baseline[layout].median_ms)
    mine, theirs = op[op_layout].to_dict(), baseline[base_layout].to_dict()
    row = {"op_layout": op_layout, "baseline_layout": base_layout}
    for side, stats in (("op", mine), ("baseline", theirs)):
        row.update({f"{side}_{key}_ms": stats[f"{key}_ms"] for key in ("median", "min", "max")})
    row.update(ratio(op[op_layout], baseline[base_layout]))
    return row


def linear_fit(xs, ys):
    """Least squares ``y = a + b*x``; returns (a, b, r2)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    intercept = mean_y - slope * mean_x
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - mean_y) ** 2 for y in ys)
    return intercept, slope, (1.0 - ss_res / ss_tot) if ss_tot else 1.0


# ------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------
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
        if event.name() != "[memory]":
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
    """Runs ``fn()`` once under ``torch.profiler(profile_memory=True)`` and returns its
    :class:`MemoryRecord`: the allocator's events summed in time order give what the call held
    at each instant; whatever it returns is still alive at the end, so ``extra = peak -
    returned`` is the scratch memory it needed on top of its results.

    The call runs with one intra-op thread: the profiler records allocations of the thread that
    holds its state, and with one thread ``at::parallel_for`` runs inline there, so scratch
    buffers allocated inside parallel regions are counted too.
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
