"""A training data loader whose stream is a pure function of (seed, rank, batch number).

Detectron2's ``TrainingSampler`` restarts its index stream when a run is resumed, and its
augmentations draw from whatever state the process-global (or worker) random generators are in;
a resumed run therefore trains on other images, augmented otherwise, than the uninterrupted run.
Here every batch is planned, mapped and augmented from numbers that a checkpoint restores:

- **Plan.** Each rank reads Detectron2's ``TrainingSampler`` stream (one shuffle of the dataset
  per epoch from ``seed``; rank ``r`` of ``W`` takes positions ``r, r + W, ...``), groups it
  into batches of ``batch_size`` (by aspect ratio, as ``AspectRatioGroupedDataset`` does, when
  ``aspect_ratio_grouping``), and numbers the batches 0, 1, 2, ... Planning touches only indices
  and the dicts' ``width``/``height``, so replaying it up to batch ``start_batch`` is cheap
  (microseconds per image).
- **Map.** Element ``k`` of the per-rank stream is mapped with Python's, NumPy's and torch's
  global generators seeded from ``(seed, rank, k)`` and restored afterwards, so its augmentation
  does not depend on which process maps it or on what ran before.
- **Workers.** With ``num_workers`` DataLoader workers, worker ``w`` maps batches
  ``start_batch + w, start_batch + w + num_workers, ...``; the DataLoader's round-robin returns
  them in batch order.

Batch ``i`` of a run is therefore the same whether the run started at 0 or was resumed at
``start_batch = i``.
"""
import random
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableBatches", "build_resumable_train_loader", "seed_for"]


def seed_for(*numbers: int) -> int:
    """A 32-bit seed derived from ``numbers`` (e.g. run seed, rank, position); distinct tuples
    give statistically independent seeds (NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(n) % (2**63) for n in numbers]).generate_state(1)[0])


class _SeededGlobalRNG:
    """Within the block, ``random``, ``numpy.random`` and torch's CPU generator are seeded with
    ``seed``; their previous states are restored on exit."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self._states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.random.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        random.setstate(self._states[0])
        np.random.set_state(self._states[1])
        torch.random.set_rng_state(self._states[2])
        return False


class ResumableBatches(torchdata.IterableDataset):
    """Iterable of per-rank batches (lists of mapped dataset dicts), resumable at any batch.

    Args:
        dataset_dicts: the training dataset (Detectron2 dicts with ``width``/``height``).
        mapper: dataset dict -> model input (e.g. ``DatasetMapper(cfg, is_train=True)``); called
            on a fresh copy of the dict.
        batch_size: images per batch on this rank.
        seed: the run's seed; the same on every rank.
        rank, world_size: this process's place in the job.
        aspect_ratio_grouping: batches hold only landscape (w > h) or only portrait images.
        shuffle: shuffle the dataset once per epoch (``TrainingSampler``'s stream).

    Attributes ``seed`` and ``start_batch`` may be changed before iteration starts (the trainer
    sets them when it resumes from a checkpoint).
    """

    def __init__(self, dataset_dicts: Sequence[Dict], mapper: Callable, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, aspect_ratio_grouping: bool = True,
                 shuffle: bool = True):
        if len(dataset_dicts) == 0:
            raise ValueError("dataset_dicts must not be empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
        # Serialised once (as Detectron2's loaders do), so that workers share one buffer.
        self.dataset = DatasetFromList(list(dataset_dicts), copy=True, serialize=True)
        # 0: landscape (w > h) or unknown, 1: portrait; the plan needs nothing else of a dict.
        self.buckets = np.array(
            [0 if d.get("width") is None or d.get("height") is None or d["width"] > d["height"]
             else 1 for d in dataset_dicts], dtype=np.uint8) if aspect_ratio_grouping else None
        self.mapper = mapper
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.shuffle = shuffle
        self.start_batch = 0

    def _bucket(self, index: int) -> int:
        return 0 if self.buckets is None else int(self.buckets[index])

    def _rank_stream(self) -> Iterator[int]:
        sampler = TrainingSampler(len(self.dataset), shuffle=self.shuffle, seed=self.seed)
        # TrainingSampler reads the rank from the process group; the plan takes it from here.
        sampler._rank, sampler._world_size = self.rank, self.world_size
        return iter(sampler)

    def plan(self) -> Iterator[List[Tuple[int, int]]]:
        """Batches as lists of ``(stream position, dataset index)``, from batch 0 on, forever."""
        buckets: List[List[Tuple[int, int]]] = [[], []]
        for position, index in enumerate(self._rank_stream()):
            bucket = buckets[self._bucket(index)]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def map_element(self, position: int, index: int):
        """The model input of stream element ``position`` (dataset index ``index``)."""
        with _SeededGlobalRNG(seed_for(self.seed, self.rank, position)):
            mapped = self.mapper(self.dataset[index])
        if mapped is None:
            raise RuntimeError(
                f"the mapper returned None for dataset index {index} "
                f"({self.dataset[index].get('file_name', '?')}); a resumable stream cannot "
                "replace it by a random other image"
            )
        return mapped

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for number, batch in enumerate(self.plan()):
            if number < self.start_batch or (number - self.start_batch) % num_workers != worker:
                continue
            yield [self.map_element(position, index) for position, index in batch]


def _no_collation(batch):
    return batch


def build_resumable_train_loader(dataset_dicts, mapper, *, total_batch_size: int, seed: int,
                                 rank: int, world_size: int, aspect_ratio_grouping: bool = True,
                                 num_workers: int = 0) -> torchdata.DataLoader:
    """A DataLoader over :class:`ResumableBatches` (its ``.dataset``) yielding per-rank batches."""
    if total_batch_size % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be divisible by the "
                         f"number of processes ({world_size})")
    batches = ResumableBatches(dataset_dicts, mapper, total_batch_size // world_size, seed, rank,
                               world_size, aspect_ratio_grouping)
    # Its own generator: starting an iterator draws the workers' base seed from it, which would
    # otherwise shift the global generator in the first iteration of every (resumed) run.
    generator = torch.Generator().manual_seed(seed_for(seed, rank, 2))
    return torchdata.DataLoader(batches, batch_size=None, num_workers=num_workers,
                                collate_fn=_no_collation, generator=generator)
