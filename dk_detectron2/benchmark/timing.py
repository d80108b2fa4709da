"""Interleaved wall-clock timing: warm-up, calibration, repeats, min and median.

The machines these benchmarks run on are shared and noisy, so every figure is a ratio between
callables timed *in the same run*. :func:`time_interleaved` runs a set of callables round-robin
(round r runs every callable once), so a burst of load from a neighbour slows all of them
alike instead of biasing whichever happened to be running.
"""

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch

__all__ = ["Measurement", "time_interleaved", "synchronize"]


def synchronize(device: Union[str, torch.device, None]) -> None:
    """Waits for queued kernels on ``device`` (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Seconds per call of one callable, one entry per repeat.

    Attributes:
        label: what was timed.
        times_s: per-call time of each repeat (a repeat runs the callable ``number`` times and
            divides).
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

    def ms(self, statistic: str) -> float:
        """``statistic`` is "min" or "median"."""
        return self.min_ms if statistic == "min" else self.median_ms

    def to_dict(self) -> Dict[str, object]:
        return {
            "min_ms": self.min_ms,
            "median_ms": self.median_ms,
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
            r runs only the callables with more than r repeats).
        sample_time_s: each repeat calls a fast callable ``number`` times so that a repeat lasts
            at least this long (timer resolution and Python overhead then vanish); ``number``
            is calibrated after the warm-up. 0: one call per repeat, no calibration.
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
        if sample_time_s > 0:  # calibrate; with no sample time every repeat is one call
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
