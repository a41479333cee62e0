"""Shard specs: syntax, URLs through fsspec, clear failures."""
import random

import fsspec
import pytest

from pipeline.loader import ShardLoader
from pipeline.shards import expand_pattern, resolve_sources, split_spec
from pipeline.tokenize import load_tokenizer
from tests.fixtures.shards import SHARD_SIZES, good_sample, write_tar


@pytest.mark.parametrize("spec, expected", [
    ("/data/cc3m/{00000..00331}.tar", [("/data/cc3m/{00000..00331}.tar", None)]),
    ("/data/cc3m/{00000..00331}.tar:0.5::s3://bucket/sbu/{00000..00099}.tar:1.5",
     [("/data/cc3m/{00000..00331}.tar", 0.5), ("s3://bucket/sbu/{00000..00099}.tar", 1.5)]),
    ("https://host:8080/a/{0..3}.tar::gs://b/c.tar",
     [("https://host:8080/a/{0..3}.tar", None), ("gs://b/c.tar", None)]),
    ("http://[::1]:8000/x/{0..1}.tar:2", [("http://[::1]:8000/x/{0..1}.tar", 2.0)]),
    (["a.tar:1", "b.tar:1::c.tar:3e-1"], [("a.tar", 1.0), ("b.tar", 1.0), ("c.tar", 0.3)]),
])
def test_split_spec(spec, expected):
    assert split_spec(spec) == expected


def test_split_spec_refuses_partial_weights():
    with pytest.raises(ValueError, match="every source"):
        split_spec("a.tar:1::b.tar")


def test_spec_matching_no_shard_fails_with_the_spec(tmp_path):
    spec = f"{tmp_path}/nothing/{{00000..00009}}.tar"
    with pytest.raises(ValueError, match="matches no shard") as err:
        resolve_sources(spec)
    assert spec in str(err.value)
    with pytest.raises(ValueError, match="matches no shard"):
        resolve_sources(f"{tmp_path}/*.tar")


def test_globs_and_holes(tiny_shards):
    assert expand_pattern(f"{tiny_shards.folder}/*.tar") == [
        f"{tiny_shards.folder}/{i:05d}.tar" for i in range(len(SHARD_SIZES))]
    # a brace range reaching past the last shard keeps the shards that exist
    sources = resolve_sources(f"{tiny_shards.folder}/{{00000..00099}}.tar")
    assert [s.samples for s in sources[0].shards] == list(SHARD_SIZES)


def _epoch_keys(spec, tokenizer):
    loader = ShardLoader(spec, tokenizer, batch_size=4, num_workers=0, seed=3, image_res=32)
    return [k for batch in loader for k in batch["__key__"]]


@pytest.mark.timeout(60)
def test_fsspec_urls_memory_and_file(tiny_shards, tiny_shards_vocab):
    tokenizer = load_tokenizer(tiny_shards_vocab)
    local = _epoch_keys(tiny_shards.spec, tokenizer)
    memory = fsspec.filesystem("memory")
    for path in tiny_shards.folder.iterdir():
        memory.pipe(f"/tiny_shards/{path.name}", path.read_bytes())
    try:
        assert _epoch_keys(f"memory://tiny_shards/{{00000..{len(SHARD_SIZES) - 1:05d}}}.tar", tokenizer) == local
    finally:
        memory.rm("/tiny_shards", recursive=True)
    assert _epoch_keys(f"file://{tiny_shards.spec}", tokenizer) == local


def test_shards_without_a_manifest_are_counted_by_reading_them(tmp_path, caplog):
    rng = random.Random(0)
    for shard, size in enumerate((4, 2)):
        write_tar(tmp_path / f"{shard:05d}.tar", [good_sample(f"{shard}-{i}", rng) for i in range(size)])
    sources = resolve_sources(f"{tmp_path}/{{00000..00001}}.tar")
    assert [s.samples for s in sources[0].shards] == [4, 2]
    assert "counting its samples by reading it" in caplog.text
