"""The trainer state that Detectron2's checkpoints lack, so that a resumed run repeats the
uninterrupted one exactly.

Detectron2 saves the model, the optimizer, the LR scheduler and the iteration. A run resumed from
that still differs from the run that was never stopped, in four ways that :class:`ExactResume`
removes:

- **Data.** The train loader is a :class:`~dk_detectron2.engine.resumable_loader.ResumableBatches`
  stream; the hook starts it at the resumed iteration's batch and saves the run's seed.
- **Randomness of the step.** Before every iteration, the global generators of Python, NumPy and
  torch (CPU and every CUDA device) are seeded from ``(seed, rank, iteration)``: RPN/ROI
  sampling, dropout or any other draw in iteration ``i`` is the same whatever ran before it, on
  every rank, without saving per-rank generator states (only rank 0 writes the checkpoint).
- **The final evaluation.** A run resumed after its last iteration only evaluates, and logs the
  results at the iteration the uninterrupted run logs them.
- **Logged metrics.** Detectron2's writers log medians over the last 20 values of each scalar;
  the tail of each scalar's history (and its global average and count) is saved, so the first
  logged values after a resume are the ones the uninterrupted run logs. Detectron2 saves a
  checkpoint before it writes the iteration's ``metrics.json`` record: a run killed in between
  would lose that record, so a resumed run writes it again (from the restored state, the same
  values) when the uninterrupted run wrote one at that iteration. A record that a killed process
  left half-written at the end of ``metrics.json`` is removed before the file is appended to
  (:func:`remove_torn_last_line`).
"""
import logging
import os
from typing import Dict

import numpy as np
import torch
import random
from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import HistoryBuffer, JSONWriter

from .resumable_loader import ResumableBatches, seed_for

__all__ = ["ExactResume", "remove_torn_last_line", "run_seed"]

logger = logging.getLogger(__name__)


def remove_torn_last_line(path: str) -> int:
    """Truncates ``path`` (a file of newline-terminated records, such as ``metrics.json``) after
    its last newline, removing a last record that a killed process left half-written; returns the
    number of bytes removed (0 when the file is whole or absent). Records appended afterwards then
    start on a line of their own instead of continuing the torn one."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(end - 65536, 0)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end == size:
            return 0
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    logger.warning(f"{path} ended with a half-written record (a process killed while writing "
                   f"it): removed its {size - end} bytes")
    return size - end


def run_seed(cfg) -> int:
    """The seed of a training run: ``cfg.SEED`` when >= 0, else one random seed shared by all
    processes (a collective call: every rank must call it). :class:`ExactResume` stores it in
    checkpoints, so a resumed run keeps it."""
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


class ExactResume(HookBase):
    """Makes a resumed run repeat the uninterrupted one (see the module docstring).

    Args:
        batches: the train loader's dataset (its ``seed`` and ``start_batch`` are set here).
        history_length: values per scalar kept in checkpoints; at least the writers' window (20).
    """

    def __init__(self, batches: ResumableBatches, history_length: int = 100):
        self.batches = batches
        self.history_length = history_length
        self._saved_history: Dict = {}

    @property
    def seed(self) -> int:
        return self.batches.seed

    def before_train(self):
        self.batches.start_batch = self.trainer.start_iter
        if self.trainer.start_iter >= self.trainer.max_iter:
            # Resumed after the last iteration (e.g. killed in the final evaluation): Detectron2's
            # loop would end at max_iter + 1 and log the evaluation one iteration late.
            self.trainer.iter = self.trainer.max_iter - 1
        storage = self.trainer.storage
        for name, saved in self._saved_history.get("scalars", {}).items():
            buffer = HistoryBuffer(max_length=saved["max_length"])
            buffer._data = list(saved["tail"])
            buffer._count = saved["count"]
            buffer._global_avg = saved["global_avg"]
            storage._history[name] = buffer
        storage._latest_scalars.update(self._saved_history.get("latest", {}))
        storage._smoothing_hints.update(self._saved_history.get("smoothing_hints", {}))
        if self._saved_history and self.trainer.start_iter > 0:
            self._write_record_of_checkpoint(self.trainer.start_iter - 1)
        self._saved_history = {}

    def _write_record_of_checkpoint(self, iteration):
        """Writes the ``metrics.json`` record of the checkpoint's ``iteration`` again, if the
        uninterrupted run wrote one there: the run that saved the checkpoint may have been killed
        before writing it. The restored history gives the same values (timings aside: the
        console writer's ``eta_seconds`` is not in it); a reader takes the last record of an
        iteration, as with the iterations that a resumed run repeats."""
        for hook in self.trainer._hooks:
            if not isinstance(hook, PeriodicWriter):
                continue
            if (iteration + 1) % hook._period and iteration != self.trainer.max_iter - 1:
                continue
            for writer in hook._writers:
                if isinstance(writer, JSONWriter):
                    writer._last_write = iteration - 1  # only this iteration's scalars
                    writer.write()

    def before_step(self):
        seed = seed_for(self.seed, comm.get_rank(), self.trainer.iter, 1)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # the CPU generator and every CUDA device's

    def state_dict(self):
        storage = getattr(self.trainer, "storage", None)
        history = {}
        if storage is not None:
            history = {
                "scalars": {
                    name: {"tail": buffer._data[-self.history_length:], "count": buffer._count,
                           "global_avg": buffer._global_avg, "max_length": buffer._max_length}
                    for name, buffer in storage._history.items()
                },
                "latest": dict(storage._latest_scalars),
                "smoothing_hints": dict(storage._smoothing_hints),
            }
        return {"seed": self.seed, "history": history}

    def load_state_dict(self, state_dict):
        self.batches.seed = int(state_dict["seed"])
        self._saved_history = state_dict.get("history", {})
