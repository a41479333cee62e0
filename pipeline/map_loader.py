"""Resumable per-rank batches from a map-style dataset (annotation files of the fine-tuning tasks).

The same contract as `pipeline.loader.ShardLoader`, so one training engine
serves both: every rank yields exactly `batches_per_epoch` full batches per
epoch; `iter()` continues the current epoch from its saved position and the
next `iter()` starts the next epoch; `state_dict()` / `load_state_dict()` carry
(epoch, batches consumed) across a restart.

The order is the reference's: a `DistributedSampler` shuffled with (seed,
epoch), padded so every rank has the same number of samples, batches with
`drop_last`. A dataset with `set_epoch(epoch)` is told the epoch before its
samples are read (new augmentation draws each epoch); when its augmentation
draws from (seed, epoch, index), as the annotation datasets here do, a resumed
run reads exactly the samples, and the same augmentations, the uninterrupted
run would have.

A batch may carry `load_failures` (images that could not be read, each replaced
by the dataset); they are taken out of the batch and counted by reason in `stats()`.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset


class MapLoader:
    def __init__(self, dataset: Dataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                 collate_fn: Callable, num_workers: int = 0, pin_memory: bool = False, shuffle: bool = True):
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False)
        self.batches_per_epoch = len(self.sampler) // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(dataset)} training samples over {world_size} ranks give no full batch of "
                             f"{batch_size} per rank: lower train.batch_size_per_rank or add data")
        self._epoch = 0
        self._consumed = 0          # batches of the current epoch already yielded
        self._failures: Counter = Counter()

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        if self._consumed >= self.batches_per_epoch:
            self._epoch, self._consumed = self._epoch + 1, 0
        self.sampler.set_epoch(self._epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._epoch)
        indices = list(self.sampler)[self._consumed * self.batch_size: self.batches_per_epoch * self.batch_size]
        loader = DataLoader(Subset(self.dataset, indices), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, collate_fn=self.collate_fn, drop_last=True,
                            pin_memory=self.pin_memory)
        for batch in loader:
            for failure in batch.pop("load_failures", None) or ():
                self._failures[failure.get("reason", "unreadable")] += 1
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size, "samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "world_size", "batch_size", "samples"):
            if state.get(key) != mine[key]:
                raise ValueError(f"cannot resume the data position: the checkpoint's loader had {key}="
                                 f"{state.get(key)}, this run has {mine[key]}")
        self._epoch, self._consumed = state["epoch"], state["consumed"]

    def stats(self) -> dict:
        """Images that failed to load and were replaced, by reason (this rank)."""
        return dict(self._failures)

    def bad_samples(self) -> dict[str, int]:
        """The same counts, as the engine sums them over ranks for the progress line."""
        return dict(self._failures)
