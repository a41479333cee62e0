"""Bad inputs are skipped and counted by reason, never raised, never slept on."""
import io
import json
import random
import struct
import tarfile
import time
import zlib

import pytest
import webdataset as wds

from pipeline.loader import ShardLoader
from pipeline.samples import SampleDecoder
from pipeline.shards import RawSample, read_segment
from pipeline.tokenize import load_tokenizer
from pipeline.transforms import ImageTransform
from tests.fixtures.shards import good_sample, jpeg_bytes, write_manifest_file, write_shards, write_tar


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces huge dimensions: a decompression bomb."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))


def _bad_samples(rng: random.Random) -> dict[str, dict]:
    """One sample per reason, keyed by the reason it must be counted under."""
    jpeg = jpeg_bytes(rng, 48, 40)
    caption = {"txt": b"a dog on the grass"}
    return {
        "missing_image": {"txt": b"a cat", "json": b'{"caption": "a cat"}'},
        "empty_image": {"jpg": b"", **caption},
        "corrupt_image": {"jpg": bytes(rng.randrange(256) for _ in range(500)), **caption},
        "corrupt_image/truncated": {"jpg": jpeg[: len(jpeg) // 2], **caption},
        "image_too_large": {"png": _png_claiming(100_000, 100_000), **caption},
        "missing_caption": {"jpg": jpeg},
        "empty_caption": {"jpg": jpeg, "txt": b"?!... ,"},
        "bad_text_encoding": {"jpg": jpeg, "txt": b"a \xff\xfe dog"},
        "bad_metadata": {"jpg": jpeg, "json": b"{not json"},
    }


def _decoder(**kw) -> SampleDecoder:
    return SampleDecoder(ImageTransform(32, train=True), **kw)


def test_decoder_names_each_reason():
    decoder = _decoder()
    for reason, files in _bad_samples(random.Random(0)).items():
        sample, got = decoder(RawSample("k", "u", files), random.Random(0))
        assert sample is None and got == reason.split("/")[0], reason


def test_decoder_max_pixels_is_configurable():
    files = {"jpg": jpeg_bytes(random.Random(0), 60, 50), "txt": b"a dog"}
    assert _decoder(max_pixels=60 * 50)(RawSample("k", "u", files), random.Random(0))[1] is None
    assert _decoder(max_pixels=60 * 50 - 1)(RawSample("k", "u", files), random.Random(0))[1] == "image_too_large"


def test_decoder_picks_one_of_several_captions_and_reads_image_id():
    files = {"jpg": jpeg_bytes(random.Random(0), 40, 40),
             "json": json.dumps({"caption": ["A red car.", "A Blue bike!"], "image_id": 7}).encode()}
    picks = {_decoder()(RawSample("k", "u", files), random.Random(s))[0].caption for s in range(20)}
    assert picks == {"a red car", "a blue bike"}
    assert _decoder()(RawSample("k", "u", files), random.Random(0))[0].idx == 7


def _tar_bytes(samples) -> bytes:
    out = io.BytesIO()
    with wds.TarWriter(out, encoder=False) as writer:
        for s in samples:
            writer.write(s)
    return out.getvalue()


def _member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Tar member name -> (header offset, data offset)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def test_truncated_tar_yields_the_samples_before_the_damage(tmp_path):
    rng = random.Random(1)
    samples = [good_sample(f"k{i}", rng) for i in range(6)]
    data = _tar_bytes(samples)
    offsets = _member_offsets(data)
    cuts = {"mid_jpg_of_k3": (offsets["k3.jpg"][1] + 100, ["k0", "k1", "k2"]),
            "in_header_of_k4": (offsets["k4.jpg"][0] + 100, ["k0", "k1", "k2", "k3"])}
    for name, (cut, expected) in cuts.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data[:cut])
        got = list(read_segment(str(path), 0, 6))
        assert len(got) == 6, name
        assert [g.key for g in got if g.reason is None] == expected, name
        assert all(g.reason == "shard_damaged" for g in got[len(expected):]), name
    # a segment starting inside the shard skips to its start and keeps its length
    got = list(read_segment(str(tmp_path / "in_header_of_k4.tar"), 2, 5))
    assert [g.key for g in got][:2] == ["k2", "k3"] and len(got) == 3 and got[2].reason == "shard_damaged"


@pytest.fixture
def damaged_shards(tmp_path):
    """Good samples around every kind of damage; returns (spec, good keys, expected counts)."""
    rng = random.Random(3)
    good_keys, counts = [], {}

    def goods(prefix, n):
        out = [good_sample(f"{prefix}{i:03d}", rng) for i in range(n)]
        good_keys.extend(s["__key__"] for s in out)
        return out

    write_tar(tmp_path / "00000.tar", goods("a", 10))
    mixed = []
    for i, files in enumerate(_bad_samples(rng).values()):
        mixed += goods(f"b{i}", 1 if i % 2 else 2)
        mixed.append({"__key__": f"bad{i}", **files})
    mixed += goods("b_end", 1)
    counts["00001.tar"] = write_tar(tmp_path / "00001.tar", mixed)
    whole = [good_sample(f"c{i}", rng) for i in range(6)]
    good_keys.extend(["c0", "c1", "c2"])
    data = _tar_bytes(whole)
    (tmp_path / "00002.tar").write_bytes(data[: _member_offsets(data)["c3.jpg"][1] + 100])
    (tmp_path / "00004.tar").write_bytes(b"this is not a tar file" * 50)
    n_good_before_last = len(good_keys)
    write_tar(tmp_path / "00005.tar", goods("d", 40 - n_good_before_last))
    counts.update({"00000.tar": 10, "00002.tar": 6, "00003.tar": 2, "00004.tar": 2,
                   "00005.tar": 40 - n_good_before_last})
    write_manifest_file(tmp_path, counts)  # 00003.tar is listed but missing
    expected = {"missing_image": 1, "empty_image": 1, "corrupt_image": 2, "image_too_large": 1,
                "missing_caption": 1, "empty_caption": 1, "bad_text_encoding": 1, "bad_metadata": 1,
                "shard_damaged": 3 + 2, "shard_unreadable": 2}
    assert len(good_keys) == 40 and sum(counts.values()) == 40 + sum(expected.values())
    return f"{tmp_path}/{{00000..00005}}.tar", good_keys, expected


@pytest.mark.timeout(60)
def test_loader_skips_and_counts_every_bad_input_without_sleeping(damaged_shards, tiny_shards_vocab, monkeypatch,
                                                                  caplog):
    spec, good_keys, expected = damaged_shards

    def no_sleep(seconds):
        raise AssertionError(f"the loader slept {seconds} s")

    monkeypatch.setattr(time, "sleep", no_sleep)
    # 56 raw samples, batch 20: 2 batches of exactly the 40 good ones, read in stream order
    loader = ShardLoader(spec, load_tokenizer(tiny_shards_vocab), batch_size=20, train=False,
                         image_res=32, num_workers=0)
    assert loader.batches_per_epoch == 2
    keys = [k for batch in loader for k in batch["__key__"]]
    assert keys == good_keys
    assert loader.stats() == {"good": 40, "bad": expected, "repeated": 0}
    reported = caplog.text
    assert "00003.tar could not be opened" in reported and "00002.tar is damaged after 3 samples" in reported


def _two_shards_second_missing(folder, good_second: int):
    """00000.tar: 10 good; 00001.tar: `good_second` good; 00002.tar listed (5) but missing."""
    rng = random.Random(7)
    write_tar(folder / "00000.tar", [good_sample(f"a{i}", rng) for i in range(10)])
    write_tar(folder / "00001.tar", [good_sample(f"b{i}", rng) for i in range(good_second)])
    write_manifest_file(folder, {"00000.tar": 10, "00001.tar": good_second, "00002.tar": 5})
    return f"{folder}/{{00000..00002}}.tar"


def test_a_rank_short_of_good_samples_wraps_and_keeps_lockstep(tmp_path, tiny_shards_vocab):
    spec = _two_shards_second_missing(tmp_path, 5)
    tokenizer = load_tokenizer(tiny_shards_vocab)
    # 20 listed samples, 2 ranks x batch 4: 2 batches each; rank 1's range is 5 good + 5 missing
    ranks = [ShardLoader(spec, tokenizer, batch_size=4, rank=r, world_size=2, train=False, image_res=32)
             for r in range(2)]
    keys = [[k for b in loader for k in b["__key__"]] for loader in ranks]
    assert [len(k) for k in keys] == [8, 8]
    assert keys[1] == [f"b{i}" for i in range(5)] + ["b0", "b1", "b2"]
    assert ranks[1].stats() == {"good": 8, "bad": {"shard_unreadable": 5}, "repeated": 3}


@pytest.mark.timeout(60)
def test_a_range_with_no_good_sample_fails_instead_of_hanging(tmp_path, tiny_shards_vocab):
    spec = _two_shards_second_missing(tmp_path, 0)
    # 15 listed samples, 3 ranks x batch 5: rank 2 reads samples 10-14, all in the missing shard
    loader = ShardLoader(spec, load_tokenizer(tiny_shards_vocab), batch_size=5, rank=2, world_size=3,
                         train=False, image_res=32, num_workers=1)
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        list(loader)


@pytest.mark.timeout(60)
def test_worker_counts_reach_stats(tmp_path, tiny_shards_vocab):
    """Counts made inside DataLoader worker processes arrive in the training process's stats()."""
    write_shards(tmp_path, (6, 6, 6, 6), seed=2)
    write_manifest_file(tmp_path, {"00000.tar": 6, "00001.tar": 6, "00002.tar": 6, "00003.tar": 6, "00004.tar": 4})
    # 28 listed, batch 4: 7 batches, workers' quotas 4 + 3; in stream order worker 1 reads
    # samples 16-27: 8 good, 4 missing, then wraps for 4 more good ones
    loader = ShardLoader(f"{tmp_path}/{{00000..00004}}.tar", load_tokenizer(tiny_shards_vocab), batch_size=4,
                         num_workers=2, train=False, image_res=32)
    assert sum(len(b["__key__"]) for b in loader) == 28
    assert loader.stats() == {"good": 28, "bad": {"shard_unreadable": 4}, "repeated": 4}
