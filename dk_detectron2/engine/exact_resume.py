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
  logged values after a resume are the ones the uninterrupted run logs.
- **The end of the checkpoint's iteration.** At an iteration, Detectron2 saves the checkpoint,
  then evaluates (every ``TEST.EVAL_PERIOD``), then, every writer period (20), writes the
  ``metrics.json`` records of the iterations that logged something since its last write (the
  iteration's own, and each evaluation's at the iteration it ran). A run killed after the save
  loses what came after it; the resumed run starts at the next iteration. ``metrics.json`` tells
  what was kept: every record up to its largest iteration. When that is before the checkpoint's
  iteration, the resumed run evaluates at that iteration if the uninterrupted run did (the
  checkpoint holds the weights it evaluated; the results reach the file with the next write, as
  they would have) and, if the writer writes at that iteration, writes now (from the restored
  state and that evaluation: the same values). The writer then goes on after the file's last
  record, so that no record is written twice (a kill after a later write leaves records beyond
  the checkpoint's iteration) and none is lost, whatever the writer's, the checkpoints' and the
  evaluations' periods. A record that a killed process left half-written at the end of
  ``metrics.json`` is removed before the file is read or appended to
  (:func:`remove_torn_last_line`).
"""
import json
import logging
import os
from typing import Dict

import numpy as np
import torch
import random
from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook, PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import HistoryBuffer, JSONWriter

from .resumable_loader import ResumableBatches, seed_for

__all__ = ["ExactResume", "largest_record_iteration", "remove_torn_last_line", "run_seed"]

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


def largest_record_iteration(path: str) -> int:
    """The largest ``iteration`` of the records of ``path`` (a ``metrics.json``), -1 when the file
    is absent or holds none. Not the last line's: one write lists an iteration's record before
    those of evaluations logged at earlier iterations. Lines that are not records are skipped (a
    half-written last record must have been removed first: :func:`remove_torn_last_line`)."""
    largest = -1
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return largest
    with f:
        for line in f:
            try:
                largest = max(largest, int(json.loads(line)["iteration"]))
            except (ValueError, KeyError, TypeError):
                continue
    return largest


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
            self._finish_checkpoint_iteration(self.trainer.start_iter - 1)
        self._saved_history = {}

    def _finish_checkpoint_iteration(self, iteration):
        """Does what the run that saved the checkpoint of ``iteration`` did after the save, if
        ``metrics.json`` shows that it was lost (its records end before ``iteration``): the
        evaluation (when ``iteration`` is one of the EvalHook's) and the write (when the writers
        write there), from the restored history and that evaluation, so with the uninterrupted
        run's values (timings aside: the console writer's ``eta_seconds`` is not in the history).
        Then each ``metrics.json`` writer goes on after the last record the file holds (or, for a
        file without those records, e.g. a run resumed in another folder, after the last write
        the uninterrupted run made before ``iteration``): a record in the file is not written
        again (the one of an evaluation that followed the save holds results that the
        checkpoint's history lacks), and none after it is skipped.

        Every process calls it (the evaluation is a collective); the main process, which has the
        writers, decides for all."""
        writers = [(hook, writer) for hook in self.trainer._hooks
                   if isinstance(hook, PeriodicWriter)
                   for writer in hook._writers if isinstance(writer, JSONWriter)]
        paths = [getattr(writer._file_handle, "name", None) for _, writer in writers]
        # None: no metrics.json, so no way to tell what was lost (nothing is redone).
        last = max((largest_record_iteration(p) for p in paths if p), default=None)
        if comm.get_world_size() > 1:
            last = comm.all_gather(last)[0]
        lost = last is not None and last < iteration
        final = iteration == self.trainer.max_iter - 1  # its evaluation comes in after_train
        evaluations = [hook for hook in self.trainer._hooks
                       if lost and not final and isinstance(hook, EvalHook) and hook._period > 0
                       and (iteration + 1) % hook._period == 0]
        writes = [(hook, writer) for hook, writer in writers
                  if lost and (final or (iteration + 1) % hook._period == 0)]
        if evaluations or writes:
            logger.warning(f"metrics.json ends at iteration {last}: finishing iteration "
                           f"{iteration} of the checkpoint ("
                           + " and ".join(["its evaluation"] * bool(evaluations)
                                          + ["its write"] * bool(writes)) + ")")
        storage = self.trainer.storage
        for hook in evaluations:
            resumed_at, storage.iter = storage.iter, iteration  # logged at iteration
            try:
                hook._do_eval()
            finally:
                storage.iter = resumed_at
        for hook, writer in writers:
            if last is None:  # nothing known: as if everything up to the checkpoint was written
                writer._last_write = iteration
                continue
            # The uninterrupted run's last write before this iteration (writes follow iterations
            # w with (w + 1) % period == 0): the file holds at least what it wrote, when it is
            # the run's own metrics.json.
            before = hook._period * (iteration // hook._period) - 1
            writer._last_write = max(last, before)
            if (hook, writer) in writes:
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
