"""`ShardLoader`: WebDataset shards -> ALBEF batches, in lockstep across ranks, resumable mid-epoch.

A torch `DataLoader` over an `IterableDataset` whose workers each make whole
batches (decode, augment, tokenise in the worker; `batch_size=None` in the
DataLoader). What each worker reads is a pure function of (seed, epoch,
rank, worker, position), planned in `pipeline.order`:

- Every rank yields exactly `batches_per_epoch = N // (world_size *
  batch_size)` batches, N being the samples the manifests list, whatever the
  shard sizes or bad samples, so collectives never wait on a rank that ran
  dry. The documented drop: N - world_size * batches_per_epoch * batch_size
  samples per epoch (fewer than one global batch), different ones each epoch.
  Bad samples are made up from that remainder; a worker whose whole range
  cannot fill its quota wraps and re-reads part of it (`repeated` in stats).
- Position: per worker, the raw samples emitted and batches made, updated in
  the training process as each batch is consumed (each batch carries its
  worker's position; prefetched batches don't count). `state_dict()` ->
  `load_state_dict()` restarts every worker where it stood and rotates
  which DataLoader worker plays which logical worker so the interleaving
  continues too. Exactness: the resumed run yields the same batches in the
  same order with the same augmentations (each batch's RNG is seeded by
  (seed, epoch, rank, worker, batch index)), given the same shard files,
  manifests, world size, num_workers, batch size, seed and shuffle buffer;
  `load_state_dict` refuses a state taken under different settings.
- Bad samples never raise and never sleep (remote shards' retries do wait,
  bounded: `remote_timeout_s`, `remote_retries`): each batch carries its
  worker's counts by reason since its previous batch (`_bad`); the training
  process sums those of consumed batches into `stats()` and `bad_samples()`.
  A bad sample met again in the same epoch is not counted again: after a
  wrap (exact, resume included), or when resampling draws its shard again
  (remembered by the worker while it runs; a resume starts afresh).
- `bad_samples()` is the flat {reason: count} of DISTINCT bad samples this
  rank met in the current epoch; the ranks' ranges of an epoch do not
  overlap, so its sum over ranks is the epoch's distinct bad samples
  (resampled mode draws with replacement: there, distinct per worker).
  `shard_problems` ({reason: shards} left out or cut short while resolving
  the spec) is the same on every rank: show it once, do not sum it.

WebDataset provides the pipe opener, the sample-key rule and the reading of
compressed tars (`pipeline.shards`; uncompressed tars are read by
`pipeline.tar_members`, member for member the same); its pipeline stages are not used, for these reasons: `with_epoch`
counts per worker, its node splitting leaves ranks with unequal sample
counts, it has no mid-epoch position, and `warn_and_continue` sleeps.

Batches: `image` uint8 [B, 3, res, res] (augmented pixels; the consumer
normalises them on its device with `pipeline.transforms.normalize_images`, a
quarter of the bytes to copy and no float work on the loader's core) or, with
`augment.on_device: true`, the crops and their augmentation plans instead
(`image_crops`, `image_shapes`, `image_plan`: `pipeline.device_augment`), `input_ids` and
`attention_mask` long [B, L], `idx` long [B] when every sample's json has an
integer `image_id`, and `__key__` (list of B sample keys, for tracing).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from collections import Counter
from typing import Iterator, Sequence

import cv2
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.captions import DEFAULT_MAX_WORDS
from pipeline.device_augment import augment_on_device, pack_crops
from pipeline.order import Layout, RangePlan, ResampledPlan, derive_seed, emit_from, epoch_order
from pipeline.samples import DEFAULT_MAX_PIXELS, Decoded, SampleDecoder
from pipeline.shards import Remote, read_segment, redact, resolve_sources
from pipeline.tokenize import text_batch
from pipeline.transforms import AugmentConfig, ImageTransform, normalize_images, stack_pixels

log = logging.getLogger(__name__)

# Fork-started workers inherit the tokenizer; its Rust thread pool must not be live in them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STATE_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 1000
_POSITION_KEY = "_position"
_BAD_KEY = "_bad"
_REPEATED_KEY = "_repeated"
# Settings a saved position is only valid under (checked by load_state_dict).
_STATE_SETTINGS = ("rank", "world_size", "workers", "batch_size", "seed", "resampled",
                   "train", "shuffle_buffer", "shards_digest")


class _EpochStream(IterableDataset):
    """One epoch of one rank: each DataLoader worker plays a logical worker and makes its batches."""

    def __init__(self, loader: "ShardLoader", epoch: int, positions: list[dict], rotation: int):
        self.loader = loader
        self.epoch = epoch
        self.positions = positions
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            cv2.setNumThreads(1)  # a worker is one core's worth of work, like torch's in workers
        worker = ((info.id if info is not None else 0) + self.rotation) % self.loader.layout.workers
        yield from self.loader._worker_batches(self.epoch, worker, self.positions[worker])


class ShardLoader:
    """Streaming ALBEF batches from a shard spec; see the module docstring for the guarantees.

    Args:
        spec: shard spec (`pipeline.shards`): brace patterns, `::`-joined
            sources, optional `:weight`, local paths or fsspec URLs.
        tokenizer: a `BertTokenizerFast` (`pipeline.tokenize.load_tokenizer`).
        batch_size: per-rank batch.
        rank, world_size: this rank and the number of ranks.
        num_workers: DataLoader worker processes (0: load in this process).
        seed: base of every random draw (shard order, block shuffles, augmentation);
            the SAME on every rank, since it fixes the global order the ranks split.
        train: pretraining transform and shuffling; False: test transform, stream order.
        image_res: output resolution.
        max_tokens: tokeniser truncation (25 pretraining, 30 retrieval).
        resampled: draw shards with replacement, honouring source weights.
        shuffle_buffer: raw samples a worker permutes at a time.
        max_words: pre_caption's word limit.
        max_pixels: images above this many pixels are rejected as absurd.
        augment: overrides of `AugmentConfig` (reference values by default).
        pin_memory, prefetch_factor: passed to the DataLoader.
        allow_pipe: accept `pipe:COMMAND` sources, which run shell commands (refused by default).
        remote_timeout_s: the longest one remote open or read may take before it counts as failed.
        remote_retries: further attempts after a transient remote failure, with backoff; then the
            shard's samples are skipped as `remote_timeout` or `unreachable`.
    """

    def __init__(self, spec: str | Sequence[str], tokenizer, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, seed: int = 0, train: bool = True,
                 image_res: int = 256, max_tokens: int = 25, resampled: bool = False,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, max_words: int = DEFAULT_MAX_WORDS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, augment: dict | None = None,
                 pin_memory: bool = False, prefetch_factor: int = 2, allow_pipe: bool = False,
                 remote_timeout_s: float = 60.0, remote_retries: int = 3):
        for name, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1),
                                 ("max_tokens", max_tokens, 2), ("max_words", max_words, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.spec = spec
        self.remote = Remote(remote_timeout_s, remote_retries)
        self.sources = resolve_sources(spec, allow_pipe=allow_pipe, remote=self.remote)
        if not resampled and any(s.weight is not None for s in self.sources):
            raise ValueError(f"shard spec {redact(spec)!r} gives source weights; weights mix sources only "
                             f"with resampled=True")
        self.shard_problems = dict(sum((s.problems for s in self.sources), Counter()))
        self._read = functools.partial(read_segment, allow_pipe=allow_pipe, remote=self.remote)
        self.shards = [shard for source in self.sources for shard in source.shards]
        self.layout = Layout(sum(s.samples for s in self.shards), world_size, max(1, num_workers), batch_size)
        self.tokenizer = tokenizer
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.batch_size, self.seed, self.train, self.resampled = batch_size, seed, train, resampled
        self.shuffle_buffer, self.max_tokens = shuffle_buffer, max_tokens
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.augment = AugmentConfig.from_dict(augment)
        self.image_res = image_res
        self.decoder = SampleDecoder(ImageTransform(image_res, train, self.augment), max_words, max_pixels)
        self.shards_digest = hashlib.sha1(
            json.dumps([(s.url, s.samples) for s in self.shards]).encode()).hexdigest()
        self._stats = {"good": 0, "bad": Counter(), "repeated": 0}
        self._start_epoch(0)
        if rank == 0:
            log.info("ShardLoader: %d samples in %d shards from %d source(s); global batch %d; "
                     "%d batches per epoch per rank; %d samples dropped per epoch",
                     self.layout.total, len(self.shards), len(self.sources), self.global_batch_size,
                     self.batches_per_epoch, self.layout.dropped_per_epoch)

    # ---- sizes --------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (identical on all ranks)."""
        return self.layout.batches_per_epoch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def samples_per_epoch(self) -> int:
        """Samples all ranks together consume per epoch."""
        return self.batches_per_epoch * self.global_batch_size

    @property
    def total_samples(self) -> int:
        return self.layout.total

    def __len__(self) -> int:
        return self.batches_per_epoch

    def images(self, batch: dict, device: torch.device) -> torch.Tensor:
        """A batch's pixels as the model's input on `device`: float32 [B, 3, res, res], normalised
        there (and resized + augmented there first with augment.on_device)."""
        if self.augment.on_device:
            pixels = augment_on_device(batch, self.image_res, self.augment, device)
        else:
            pixels = batch["image"].to(device, non_blocking=True)
        return normalize_images(pixels, self.augment.mean, self.augment.std)

    # ---- epochs and positions -----------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._epoch_bad: Counter = Counter()
        self._batches = 0
        self._positions = [{"raw": 0, "batches": 0} for _ in range(self.layout.workers)]
        self._advance_when_done = True

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate. The current epoch keeps its position, so
        `load_state_dict(s); set_epoch(s["epoch"])` continues it (and yields
        nothing if it was finished); another epoch starts from its beginning."""
        if epoch != self._epoch:
            self._start_epoch(epoch)
        self._advance_when_done = False

    def __iter__(self) -> Iterator[dict]:
        """The rest of the selected epoch. Without a `set_epoch` call since the
        current epoch finished, the next epoch: `for _ in range(E): for b in loader`
        walks through epochs."""
        if self._batches >= self.batches_per_epoch and self._advance_when_done:
            self._start_epoch(self._epoch + 1)
        self._advance_when_done = True
        stream = _EpochStream(self, self._epoch, [dict(p) for p in self._positions],
                              self._batches % self.layout.workers)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        for batch in loader:
            worker, raw, made = (int(v) for v in batch.pop(_POSITION_KEY))
            self._positions[worker] = {"raw": raw, "batches": made}
            self._batches += 1
            self._stats["good"] += len(batch["__key__"])
            bad = batch.pop(_BAD_KEY)
            self._stats["bad"].update(bad)
            self._epoch_bad.update(bad)
            self._stats["repeated"] += int(batch.pop(_REPEATED_KEY))
            yield batch
        if self._batches != self.batches_per_epoch:
            raise RuntimeError(f"epoch {self._epoch} ended after {self._batches} of "
                               f"{self.batches_per_epoch} batches on rank {self.rank}")

    def _settings(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "workers": self.layout.workers,
                "batch_size": self.batch_size, "seed": self.seed, "resampled": self.resampled,
                "train": self.train, "shuffle_buffer": self.shuffle_buffer,
                "shards_digest": self.shards_digest}

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank: epoch, batches consumed, per-worker positions."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches": self._batches,
                "positions": [dict(p) for p in self._positions], **self._settings(),
                "stats": self.stats(), "epoch_bad": self.bad_samples()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses one taken under other settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; expected {STATE_VERSION}")
        mine = self._settings()
        for key in _STATE_SETTINGS:
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this loader has "
                                 f"{key}={mine[key]!r}: the position cannot be continued exactly")
        self._start_epoch(int(state["epoch"]))
        self._batches = int(state["batches"])
        self._positions = [{"raw": int(p["raw"]), "batches": int(p["batches"])} for p in state["positions"]]
        stats = state.get("stats", {})
        self._stats = {"good": int(stats.get("good", 0)), "bad": Counter(stats.get("bad", {})),
                       "repeated": int(stats.get("repeated", 0))}
        self._epoch_bad = Counter(state.get("epoch_bad", {}))

    def stats(self) -> dict:
        """Samples delivered, bad samples skipped by reason (each once per epoch), and samples
        re-read after a wrap (all counted over consumed batches since construction or the loaded
        state, so a sample bad in every epoch counts once per epoch; see `bad_samples`)."""
        return {"good": self._stats["good"], "bad": dict(self._stats["bad"]),
                "repeated": self._stats["repeated"]}

    def bad_samples(self) -> dict[str, int]:
        """Distinct bad samples this rank met in the current epoch, by reason (sum over ranks)."""
        return dict(self._epoch_bad)

    # ---- worker side ----------------------------------------------------------
    def _plan(self, epoch: int, worker: int) -> RangePlan | ResampledPlan:
        if self.resampled:
            return ResampledPlan(self.sources, derive_seed(self.seed, epoch, self.rank, worker))
        lo, hi = self.layout.slot_range(self.rank, worker)
        return RangePlan(epoch_order(self.shards, self.seed, epoch, self.train), lo, hi)

    def _worker_batches(self, epoch: int, worker: int, position: dict) -> Iterator[dict]:
        made = position["batches"]
        quota = self.layout.worker_quota(worker)
        if made >= quota:
            return
        plan = self._plan(epoch, worker)
        stream = emit_from(plan, position["raw"], self.shuffle_buffer,
                           (self.seed, epoch, self.rank, worker), self.train, self._read)
        # A pass over everything this worker can read without one good sample means it never will.
        give_up = plan.length if plan.length is not None else self.layout.total
        bad_run = 0
        counted: set[tuple[str, str]] = set()  # bad samples this worker counted this epoch
        while made < quota:
            rng = random.Random(derive_seed(self.seed, epoch, self.rank, worker, made))
            samples: list[Decoded] = []
            bad: Counter = Counter()
            repeated = 0
            raw_position = position["raw"]
            while len(samples) < self.batch_size:
                emitted = next(stream)
                raw_position = emitted.position
                sample, reason = self.decoder(emitted.raw, rng)
                if reason is not None:
                    identity = (emitted.raw.url, emitted.raw.key)
                    if not emitted.repeated and identity not in counted:  # else met before this epoch
                        counted.add(identity)
                        bad[reason] += 1
                    bad_run += 1
                    if bad_run > give_up:
                        raise RuntimeError(
                            f"rank {self.rank} worker {worker}: {bad_run} bad samples in a row, more than "
                            f"all {give_up} it can read this epoch (counts {dict(bad)}); "
                            f"spec {redact(self.spec)!r}")
                    continue
                bad_run = 0
                repeated += emitted.repeated
                samples.append(sample)
            made += 1
            position = {"raw": raw_position, "batches": made}
            batch = self._collate(samples)
            batch[_POSITION_KEY] = torch.tensor([worker, raw_position, made], dtype=torch.long)
            batch[_BAD_KEY] = dict(bad)
            batch[_REPEATED_KEY] = repeated
            yield batch

    def _collate(self, samples: list[Decoded]) -> dict:
        input_ids, attention_mask = text_batch(self.tokenizer, [s.caption for s in samples], self.max_tokens)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "__key__": [s.key for s in samples]}
        if self.augment.on_device:   # crops + plans: augment_on_device, then normalize_images, on the device
            batch.update(pack_crops([s.pixels for s in samples], [s.plan for s in samples], self.augment.randaug_n))
        else:
            batch["image"] = stack_pixels([s.pixels for s in samples])   # uint8: normalize_images on the device
        if all(s.idx is not None for s in samples):
            batch["idx"] = torch.tensor([s.idx for s in samples], dtype=torch.long)
        return batch
