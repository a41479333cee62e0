"""Which raw sample each (rank, worker) reads next: a pure function of seed, epoch and position.

Every rank computes the same plan from the same shard list, so no rank talks
to another. The plan for one epoch:

1. Global order: the shards permuted by a generator seeded with (seed, epoch)
   (identity order when not shuffling). Laid end to end they form one virtual
   stream of N raw samples (N from the manifests).
2. Quotas: every rank yields B = N // (world_size * batch_size) batches; a
   rank's B batches are dealt round-robin to its W DataLoader workers
   (worker w makes B // W batches, one more if w < B % W), which is exactly
   the order in which torch's DataLoader collects them.
3. Split by rank, then by worker: the virtual stream is cut into
   world_size * W contiguous slot ranges, slot (rank, w) getting a length
   proportional to its quota and never less than quota * batch_size. A slot
   range may start or end inside a shard (the reader skips into it).
4. Inside its range a slot reads blocks of `shuffle_buffer` raw samples and
   emits each block in an order permuted by (seed, epoch, rank, worker,
   block start). It stops at its quota of good samples; what is left of its
   range is the epoch's drop: N - world_size * B * batch_size < world_size *
   batch_size samples per epoch, different ones each epoch. Bad samples
   are made up from that remainder; only when a slot's whole range cannot
   fill its quota does it wrap to the start of its range (the re-read
   samples are counted as `repeated`).

Resampled mode replaces steps 1 and 3: each slot draws shards with
replacement from a generator seeded by (seed, epoch, rank, worker), picking
a source with probability proportional to weight / mean shard size (so the
weights are shares of samples) and a shard uniformly within it.

A slot's position is the number of raw samples it has emitted (good or bad)
in this epoch; `emit_from(position)` regenerates the stream from any
position, reading at most one block of raw samples that precede it.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.shards import RawSample, Shard, Source

_SEED_MASK = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integer parts (order matters; negative parts allowed)."""
    state = np.random.SeedSequence([int(p) & _SEED_MASK for p in parts]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def epoch_order(shards: Sequence[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    """The global shard order of an epoch, identical on every rank."""
    if not shuffle:
        return list(shards)
    perm = np.random.default_rng(derive_seed(seed, epoch)).permutation(len(shards))
    return [shards[i] for i in perm]


@dataclass(frozen=True)
class Layout:
    """Epoch sizing and the rank/worker split of the virtual sample stream."""

    total: int
    world_size: int
    workers: int  # DataLoader workers per rank (1 when loading in the main process)
    batch_size: int

    def __post_init__(self):
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the shards hold {self.total} samples, fewer than one global batch "
                f"(world_size {self.world_size} x batch_size {self.batch_size} = "
                f"{self.world_size * self.batch_size}): no rank could make a batch")

    @property
    def batches_per_epoch(self) -> int:
        return self.total // (self.world_size * self.batch_size)

    @property
    def dropped_per_epoch(self) -> int:
        return self.total - self.batches_per_epoch * self.world_size * self.batch_size

    def worker_quota(self, worker: int) -> int:
        """Batches DataLoader worker `worker` makes per epoch (the same on every rank)."""
        b, w = self.batches_per_epoch, self.workers
        return b // w + (1 if worker < b % w else 0)

    def slot_range(self, rank: int, worker: int) -> tuple[int, int]:
        """[lo, hi) of the epoch's virtual stream read by (rank, worker)."""
        before = rank * self.batches_per_epoch + sum(self.worker_quota(v) for v in range(worker))
        slots_total = self.world_size * self.batches_per_epoch

        def bound(batches: int) -> int:
            return self.total * batches // slots_total

        return bound(before), bound(before + self.worker_quota(worker))


@dataclass(frozen=True)
class Segment:
    url: str
    start: int  # first sample index within the shard
    stop: int
    repeated: bool  # read again after the slot wrapped its range


class RangePlan:
    """A slot's range of the epoch's virtual stream, read in passes that wrap."""

    def __init__(self, ordered: Sequence[Shard], lo: int, hi: int):
        self.shards = list(ordered)
        self.offsets = list(itertools.accumulate((s.samples for s in self.shards), initial=0))
        self.lo, self.hi = lo, hi
        self.length = hi - lo

    def segments_from(self, position: int) -> Iterator[Segment]:
        if self.length <= 0:
            return
        passes = itertools.count(position // self.length)
        first = self.lo + position % self.length
        for pass_index in passes:
            yield from self._pass(first, pass_index > 0)
            first = self.lo

    def _pass(self, begin: int, repeated: bool) -> Iterator[Segment]:
        i = bisect.bisect_right(self.offsets, begin) - 1
        while begin < self.hi:
            shard_lo = self.offsets[i]
            stop = min(self.offsets[i + 1], self.hi)
            yield Segment(self.shards[i].url, begin - shard_lo, stop - shard_lo, repeated)
            begin, i = stop, i + 1

    def block_bounds(self, position: int, block: int) -> tuple[int, int]:
        """Blocks restart at every pass, so no block holds a sample twice."""
        pass_start = position - position % self.length
        within = position - pass_start
        lo = pass_start + within - within % block
        return lo, min(lo + block, pass_start + self.length)


class ResampledPlan:
    """A slot's endless stream of whole shards drawn with replacement."""

    def __init__(self, sources: Sequence[Source], seed: int):
        self.sources = [s for s in sources if s.shards]
        means = np.array([s.samples / len(s.shards) for s in self.sources], dtype=np.float64)
        weights = np.array([s.weight if s.weight is not None else s.samples for s in self.sources],
                           dtype=np.float64)
        probs = weights / means
        self.probs = probs / probs.sum()
        self.seed = seed
        self.length = None  # endless: no range, no passes

    def _draws(self) -> Iterator[Shard]:
        rng = np.random.default_rng(self.seed)
        while True:
            source = self.sources[rng.choice(len(self.sources), p=self.probs)]
            yield source.shards[rng.integers(len(source.shards))]

    def segments_from(self, position: int) -> Iterator[Segment]:
        begin = 0
        for shard in self._draws():
            end = begin + shard.samples
            if end > position:
                yield Segment(shard.url, max(0, position - begin), shard.samples, False)
            begin = end

    @staticmethod
    def block_bounds(position: int, block: int) -> tuple[int, int]:
        lo = position - position % block
        return lo, lo + block


@dataclass(frozen=True)
class Emitted:
    position: int  # the slot's position after this sample
    repeated: bool
    raw: RawSample


def emit_from(plan: RangePlan | ResampledPlan, position: int, block: int, block_seed: Sequence[int],
              shuffle: bool, read: Callable[[str, int, int], Iterator[RawSample]]) -> Iterator[Emitted]:
    """The slot's raw samples from `position` on, block-shuffled; endless (the caller stops it)."""
    block = max(1, block if shuffle else 1)
    lo, _ = plan.block_bounds(position, block)
    raw = ((seg.repeated, item) for seg in plan.segments_from(lo) for item in read(seg.url, seg.start, seg.stop))
    while True:
        lo, hi = plan.block_bounds(lo, block)
        items = list(itertools.islice(raw, hi - lo))
        if not items:
            return
        order = (np.random.default_rng(derive_seed(*block_seed, lo)).permutation(len(items))
                 if shuffle else range(len(items)))
        for j, k in enumerate(order):
            if lo + j >= position:
                repeated, item = items[k]
                yield Emitted(lo + j + 1, repeated, item)
        lo = hi
