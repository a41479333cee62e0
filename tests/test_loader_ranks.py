"""Lockstep across ranks, deterministic epochs, exact mid-epoch resume (ranks simulated in one process)."""
import json
from collections import Counter

import pytest
import torch

from pipeline.loader import ShardLoader
from pipeline.order import Layout, ResampledPlan
from pipeline.tokenize import load_tokenizer
from tests.fixtures.shards import SHARD_SIZES, sample_key, write_shards

ALL_KEYS = {sample_key(s, i) for s, n in enumerate(SHARD_SIZES) for i in range(n)}
TOTAL = sum(SHARD_SIZES)


@pytest.fixture(scope="module")
def tokenizer(tiny_shards_vocab):
    return load_tokenizer(tiny_shards_vocab)


def _loader(spec, tokenizer, **kw):
    settings = dict(batch_size=3, world_size=2, num_workers=2, seed=11, image_res=32, shuffle_buffer=4)
    settings.update(kw)
    return ShardLoader(spec, tokenizer, **settings)


def _keys(batches):
    return [b["__key__"] for b in batches]


@pytest.mark.parametrize("total, world, workers, batch", [
    (52, 2, 2, 3), (52, 3, 4, 5), (1000, 8, 6, 7), (17, 2, 3, 4), (9, 1, 4, 1)])
def test_layout_ranges_tile_the_stream_and_cover_every_quota(total, world, workers, batch):
    layout = Layout(total, world, workers, batch)
    bounds = []
    for rank in range(world):
        assert sum(layout.worker_quota(w) for w in range(workers)) == layout.batches_per_epoch
        for w in range(workers):
            lo, hi = layout.slot_range(rank, w)
            assert hi - lo >= layout.worker_quota(w) * batch
            bounds.append((lo, hi))
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert layout.dropped_per_epoch == total - layout.batches_per_epoch * world * batch < world * batch


def test_fewer_samples_than_a_global_batch_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"52 samples.*world_size 4 x batch_size 16"):
        Layout(52, 4, 1, 16)


@pytest.mark.timeout(90)
def test_two_ranks_two_workers_lockstep_no_repeats_and_full_coverage(tiny_shards, tokenizer):
    per_rank = [list(_loader(tiny_shards.spec, tokenizer, rank=r)) for r in range(2)]
    expected_batches = TOTAL // (2 * 3)
    assert [len(b) for b in per_rank] == [expected_batches, expected_batches]
    for batches in per_rank:
        for b in batches:
            assert b["image"].shape == (3, 3, 32, 32) and b["image"].dtype == torch.uint8
            assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == 3
    seen = [k for batches in per_rank for keys in _keys(batches) for k in keys]
    assert len(seen) == len(set(seen)), "a sample was seen twice in one epoch"
    assert set(seen) <= ALL_KEYS
    # documented drop: fewer than one global batch, here 52 - 8 * 6 = 4
    assert len(ALL_KEYS) - len(seen) == TOTAL - expected_batches * 6 == 4


@pytest.mark.timeout(60)
def test_same_seed_and_epoch_same_order_next_epoch_different(tiny_shards, tokenizer):
    first = _loader(tiny_shards.spec, tokenizer, num_workers=0)
    again = _loader(tiny_shards.spec, tokenizer, num_workers=0)
    epoch0 = _keys(first)
    assert epoch0 == _keys(again)
    epoch1 = _keys(first)  # a finished epoch moves on by itself
    assert first.epoch == 1 and epoch1 != epoch0
    again.set_epoch(1)
    assert _keys(again) == epoch1
    other_seed = _loader(tiny_shards.spec, tokenizer, num_workers=0, seed=12)
    assert _keys(other_seed) != epoch0
    flat0, flat1 = ([k for keys in e for k in keys] for e in (epoch0, epoch1))
    assert len(flat1) == len(set(flat1))
    # a new global shard order each epoch, not only a new order inside the same shards:
    # this rank's drop (2 samples) alone could change at most 4 members of its set
    assert len(set(flat0) ^ set(flat1)) > 4


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop_after, resampled", [(3, False), (6, False), (5, True)])
def test_resume_continues_with_exactly_the_unseen_batches(tiny_shards, tokenizer, stop_after, resampled):
    full = list(_loader(tiny_shards.spec, tokenizer, rank=1, resampled=resampled))
    interrupted = _loader(tiny_shards.spec, tokenizer, rank=1, resampled=resampled)
    taken = []
    for batch in interrupted:
        taken.append(batch)
        if len(taken) == stop_after:
            break
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = _loader(tiny_shards.spec, tokenizer, rank=1, resampled=resampled)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])
    rest = list(resumed)
    assert _keys(taken) + _keys(rest) == _keys(full)
    for a, b in zip(taken + rest, full):  # same augmentation and tokens, not just the same keys
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert resumed.stats()["good"] == len(full) * 3


def test_resume_from_the_end_of_an_epoch_goes_on_with_the_next(tiny_shards, tokenizer):
    loader = _loader(tiny_shards.spec, tokenizer, num_workers=0)
    list(loader)
    state = loader.state_dict()
    reference = _loader(tiny_shards.spec, tokenizer, num_workers=0)
    reference.set_epoch(1)
    epoch1 = _keys(reference)
    resumed = _loader(tiny_shards.spec, tokenizer, num_workers=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # what a trainer's epoch loop does
    assert list(resumed) == []
    resumed.set_epoch(state["epoch"] + 1)
    assert _keys(resumed) == epoch1


def test_state_from_other_settings_is_refused(tiny_shards, tokenizer):
    state = _loader(tiny_shards.spec, tokenizer, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="workers"):
        _loader(tiny_shards.spec, tokenizer, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rank"):
        _loader(tiny_shards.spec, tokenizer, num_workers=0, rank=1).load_state_dict(state)


@pytest.mark.timeout(60)
def test_resampled_mode_mixes_sources_by_weight(tiny_shards, tokenizer, tmp_path):
    other = tmp_path / "other"
    write_shards(other, (6, 6, 6, 6), seed=5, key_prefix="other")
    spec = f"{tiny_shards.spec}:0.8::{other}/{{00000..00003}}.tar:0.2"
    loaders = [_loader(spec, tokenizer, rank=r, num_workers=0, resampled=True) for r in range(2)]
    assert loaders[0].batches_per_epoch == (TOTAL + 24) // 6
    from_other = Counter()
    for epoch in range(12):
        counts = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            counts.append(len(batches))
            from_other.update(k.startswith("other") for keys in _keys(batches) for k in keys)
        assert counts[0] == counts[1] == loaders[0].batches_per_epoch
    # weights are shares of samples: 0.2 here, where sizes alone would give 24 / 76 = 0.32
    assert 0.12 < from_other[True] / sum(from_other.values()) < 0.28
    drawn = Counter()
    for segment, _ in zip(ResampledPlan(loaders[0].sources, seed=0).segments_from(0), range(4000)):
        drawn[segment.url.startswith(str(other))] += segment.stop - segment.start
    assert 0.18 < drawn[True] / sum(drawn.values()) < 0.22


def test_weights_without_resampling_are_refused(tiny_shards, tokenizer):
    with pytest.raises(ValueError, match="resampled=True"):
        _loader(f"{tiny_shards.spec}:0.5", tokenizer, num_workers=0)
