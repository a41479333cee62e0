"""`pipeline.unpack` never writes outside its output folder, whatever the tar's member names."""
import io
import json
import tarfile

import pytest
from PIL import Image

from pipeline.shards import is_safe_key
from pipeline.unpack import unpack


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path, samples):
    """Members named exactly KEY.EXT (tarfile keeps '..' and leading '/' as written)."""
    with tarfile.open(path, "w") as tar:
        for key, url in samples:
            for ext, data in (("jpg", _jpeg()), ("txt", f"a picture of {url}".encode()),
                              ("json", json.dumps({"url": url}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("key, safe", [
    ("000010002", True), ("train/0001", True), ("../../../x", False), ("/etc/x", False),
    ("a/../../x", False), ("./x", False), ("a//b", False), ("a\\..\\x", False), ("", False)])
def test_is_safe_key(key, safe):
    assert is_safe_key(key) is safe


def test_unsafe_and_duplicate_keys_are_skipped_and_counted(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", [("k0", "u0"), ("../../../escape", "u1"), (f"{tmp_path}/abs", "u2"),
                                ("sub/../../../up", "u3"), ("sub/k1", "u4")])
    _tar(shards / "00001.tar", [("k0", "u5")])  # same key, another image: its file is taken
    out = tmp_path / "deep" / "a" / "out"
    out.parent.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    counts = unpack(str(shards / "{00000..00001}.tar"), out)
    assert counts == {"images": 2, "pairs": 2, "unsafe_key": 3, "duplicate_key": 1}
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.is_relative_to(out) for p in new), sorted(new)
    assert sorted(p.relative_to(out).as_posix() for p in new if p.is_file()) == [
        "eval.json", "images/k0.jpg", "images/sub/k1.jpg", "train.json"]
