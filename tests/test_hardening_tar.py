"""A damaged tar in a folder without manifest.json: counted as far as it reads, named, never a crash."""
import io
import random
import tarfile

import pytest
import webdataset as wds

from pipeline.loader import ShardLoader
from pipeline.shards import resolve_sources
from pipeline.tokenize import load_tokenizer
from tests.fixtures.shards import good_sample, write_tar


def _truncated_tar(path, keys, cut_in: str):
    """A tar of good samples cut 100 bytes into the data of member `cut_in`."""
    rng = random.Random(5)
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as writer:
        for key in keys:
            writer.write(good_sample(key, rng))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmember(cut_in).offset_data
    path.write_bytes(data[:offset + 100])


@pytest.mark.timeout(60)
def test_damaged_shards_without_manifest_are_counted_named_and_skipped(tmp_path, tiny_shards_vocab, caplog):
    rng = random.Random(4)
    write_tar(tmp_path / "00000.tar", [good_sample(f"a{i}", rng) for i in range(4)])
    _truncated_tar(tmp_path / "00001.tar", [f"b{i}" for i in range(6)], cut_in="b3.jpg")
    (tmp_path / "00002.tar").write_bytes(b"not a tar at all" * 64)
    spec = f"{tmp_path}/{{00000..00002}}.tar"

    sources = resolve_sources(spec)
    assert [(s.url.rsplit("/", 1)[1], s.samples) for s in sources[0].shards] == [("00000.tar", 4), ("00001.tar", 3)]
    assert sources[0].problems == {"shard_damaged": 2}
    assert "00001.tar is damaged after 3 samples" in caplog.text
    assert "00002.tar is damaged after 0 samples" in caplog.text

    loader = ShardLoader(spec, load_tokenizer(tiny_shards_vocab), batch_size=7, train=False, image_res=32)
    assert loader.shard_problems == {"shard_damaged": 2}
    assert [k for b in loader for k in b["__key__"]] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
    assert loader.bad_samples() == {}
