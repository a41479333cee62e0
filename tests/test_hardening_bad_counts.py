"""bad_samples(): distinct bad samples per epoch, so the trainer can sum it over ranks."""
import json
import random

import pytest

from pipeline.loader import ShardLoader
from pipeline.tokenize import load_tokenizer
from tests.fixtures.shards import good_sample, write_manifest_file, write_tar


def _corrupt(key):
    return {"__key__": key, "jpg": b"not a jpeg", "txt": b"a dog"}


def _write(folder, shards: dict[str, list], listed: dict[str, int] | None = None):
    """Shards from lists of 'g' (good) / 'b' (corrupt image); `listed` adds manifest-only (missing) shards."""
    rng = random.Random(9)
    counts = {}
    for name, kinds in shards.items():
        samples = [good_sample(f"{name[:5]}-{i}", rng) if k == "g" else _corrupt(f"{name[:5]}-{i}")
                   for i, k in enumerate(kinds)]
        counts[name] = write_tar(folder / name, samples)
    write_manifest_file(folder, {**counts, **(listed or {})})
    return f"{folder}/{{00000..{len(counts) + len(listed or {}) - 1:05d}}}.tar"


@pytest.fixture
def tokenizer(tiny_shards_vocab):
    return load_tokenizer(tiny_shards_vocab)


def test_a_wrap_and_a_new_epoch_do_not_count_a_bad_sample_again(tmp_path, tokenizer):
    # 8 listed, batch 4: 2 batches need 8 good, 3 exist; the worker wraps through the 2 corrupt
    # and 3 missing samples twice more, which used to count them again each time
    spec = _write(tmp_path, {"00000.tar": list("gbgbg")}, {"00001.tar": 3})
    loader = ShardLoader(spec, tokenizer, batch_size=4, train=False, image_res=32)
    distinct = {"corrupt_image": 2, "shard_unreadable": 3}
    for epoch in range(2):
        assert sum(len(b["__key__"]) for b in loader) == 8
        assert loader.bad_samples() == distinct, epoch
    stats = loader.stats()
    assert stats["bad"] == {"corrupt_image": 4, "shard_unreadable": 6}  # once per epoch
    assert stats["repeated"] == 2 * 5


def test_resume_keeps_the_epoch_counts(tmp_path, tokenizer):
    spec = _write(tmp_path, {"00000.tar": list("gbggbggg"), "00001.tar": list("ggbggggg")})
    full = ShardLoader(spec, tokenizer, batch_size=3, train=False, image_res=32)
    list(full)
    first = ShardLoader(spec, tokenizer, batch_size=3, train=False, image_res=32)
    next(iter(first))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = ShardLoader(spec, tokenizer, batch_size=3, train=False, image_res=32)
    resumed.load_state_dict(state)
    assert resumed.bad_samples() == first.bad_samples() == {"corrupt_image": 1}
    resumed.set_epoch(state["epoch"])
    list(resumed)
    assert resumed.bad_samples() == full.bad_samples() == {"corrupt_image": 3}


def test_ranks_sum_to_the_distinct_bad_samples(tmp_path, tokenizer):
    # 12 samples, 2 ranks x batch 5: one batch each from disjoint ranges of 6, one corrupt in each
    spec = _write(tmp_path, {"00000.tar": list("ggbggg"), "00001.tar": list("gggbgg")})
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(spec, tokenizer, batch_size=5, rank=rank, world_size=2, train=False, image_res=32)
        list(loader)
        per_rank.append(loader.bad_samples())
    assert per_rank == [{"corrupt_image": 1}, {"corrupt_image": 1}]


def test_a_shard_drawn_again_in_resampled_mode_counts_once(tmp_path, tokenizer):
    # one shard [corrupt, good], batch 2: the batch needs 2 good, so the shard is drawn twice
    # and its corrupt sample met twice
    spec = _write(tmp_path, {"00000.tar": list("bg")})
    loader = ShardLoader(spec, tokenizer, batch_size=2, resampled=True, train=False, image_res=32)
    assert [k for b in loader for k in b["__key__"]] == ["00000-1", "00000-1"]
    assert loader.bad_samples() == loader.stats()["bad"] == {"corrupt_image": 1}
