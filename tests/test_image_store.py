"""Task images from tar shards (pipeline/image_store.py, pipeline/pack_images.py).

The same annotation names resolve in a folder and in shards packed from it, to
the same pixels; untrusted shards are indexed without extracting anything, and
what cannot be served is counted or refused with a message.
"""
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.annotations import RetrievalEvalDataset
from pipeline.classify_data import ClassifyDataset, read_examples
from pipeline.image_store import FolderImages, ShardImages, image_store, normalise_name
from pipeline.pack_images import pack_images
from pipeline.transforms import ImageTransform
from pipeline.vqa_data import VQAEvalDataset
from demo.classify_scenes import write_nlvr, write_ve

REPO = Path(__file__).resolve().parents[1]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> Path:
    """members: (name, data or None, type) with tarfile type codes (REGTYPE, SYMTYPE, ...)."""
    with tarfile.open(path, "w") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_names_are_normalised_and_unsafe_ones_refused():
    assert normalise_name("./a//b.jpg") == "a/b.jpg" and normalise_name("a/./b.png") == "a/b.png"
    for bad in ("", "/etc/x.jpg", "../x.jpg", "a/../../x.jpg", "..", "a\\b.jpg", "a\0.jpg"):
        assert normalise_name(bad) is None, bad


def test_packed_shards_serve_the_folders_bytes_under_the_same_names(tmp_path):
    ve = write_ve(tmp_path, "train", 12, seed=4)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "link.jpg").symlink_to(tmp_path / "images" / "train_0.jpg")
    result = pack_images(tmp_path / "images", tmp_path / "shards", per_shard=5)
    assert result["images"] == 12 and len(result["shards"]) == 3
    assert result["skipped"] == {"not an image extension": 1, "symbolic link": 1}
    again = pack_images(tmp_path / "images", tmp_path / "again", per_shard=5)
    assert [Path(s).read_bytes() for s in again["shards"]] == [Path(s).read_bytes() for s in result["shards"]]

    shards = image_store(shards=str(tmp_path / "shards" / "images-{000000..000002}.tar"))
    assert image_store(shards=str(tmp_path / "shards")) is shards          # one index per process
    folder = FolderImages(tmp_path / "images")
    transform = ImageTransform(16, train=True)
    from_folder = ClassifyDataset(read_examples("ve", ve, folder), transform, seed=3, images=folder)
    from_shards = ClassifyDataset(read_examples("ve", ve, shards), transform, seed=3, images=shards)
    assert from_shards.examples[0].images == ("train_0.jpg",)
    for i in range(len(from_folder)):
        assert torch.equal(from_folder[i]["image"], from_shards[i]["image"])   # same pixels, same draws


def test_nlvr_pairs_vqa_and_retrieval_read_from_shards(tmp_path):
    root = tmp_path / "nlvr"                      # NLVR2 names images relative to this folder: images/...
    nlvr = write_nlvr(root, "dev", 6, seed=1)
    assert pack_images(root, tmp_path / "shards")["skipped"] == {"not an image extension": 1}   # dev.json
    shards = image_store(shards=[str(tmp_path / "shards" / "images-000000.tar")])
    examples = read_examples("nlvr", nlvr, shards)
    item = ClassifyDataset(examples, ImageTransform(16, train=False), images=shards)[0]
    assert item["image"].shape == (2, 3, 16, 16)

    name = examples[0].images[0]
    (tmp_path / "vqa.json").write_text(json.dumps([{"dataset": "vqa", "image": name, "question": "what colour?",
                                                     "question_id": 1, "answer": ["red"] * 10}]))
    vqa = VQAEvalDataset(tmp_path / "vqa.json", {"vqa": shards, "vg": None}, ImageTransform(16, train=False))
    assert vqa[0]["image"].shape == (3, 16, 16)
    (tmp_path / "ret.json").write_text(json.dumps([{"image": name, "caption": ["a shape"]},
                                                    {"image": "absent.png", "caption": ["another"]}]))
    ret = RetrievalEvalDataset(tmp_path / "ret.json", shards, ImageTransform(16, train=False))
    assert ret.image_ok == [True, False] and ret.problems[0]["reason"] == "missing image file"
    assert torch.equal(ret[0]["image"], RetrievalEvalDataset(tmp_path / "ret.json", root,
                                                            ImageTransform(16, train=False))[0]["image"])


def test_hostile_members_are_skipped_counted_and_never_served(tmp_path):
    shard = _tar(tmp_path / "bad.tar", [
        ("../outside.png", _png("red"), tarfile.REGTYPE),
        ("/abs.png", _png("red"), tarfile.REGTYPE),
        ("link.png", None, tarfile.SYMTYPE),
        ("./ok/fine.png", _png("blue"), tarfile.REGTYPE),
    ])
    store = ShardImages(str(shard))
    assert set(store.index) == {"ok/fine.png"}
    assert store.skipped == {"unsafe member name": 2, "not a regular file": 1}
    assert not store.exists("link.png") and not store.exists(store.locate("../outside.png"))
    with pytest.raises(FileNotFoundError, match="not in the image shards"):
        store.load("link.png")
    assert np.asarray(store.load(store.locate("ok/fine.png")))[0, 0].tolist() == [0, 0, 255]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]          # nothing extracted


def test_bad_shard_specs_fail_with_one_clear_line(tmp_path):
    _tar(tmp_path / "a.tar", [("x.png", _png("red"), tarfile.REGTYPE)])
    _tar(tmp_path / "b.tar", [("x.png", _png("blue"), tarfile.REGTYPE)])
    with pytest.raises(ValueError, match=r"'x.png' is in .*a.tar and again in .*b.tar"):
        ShardImages(str(tmp_path / "{a,b}.tar"))
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("y.png")
        data = _png("red")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="not an uncompressed tar file"):
        ShardImages(str(tmp_path / "c.tar.gz"))
    with pytest.raises(ValueError, match="must be local files"):
        ShardImages("https://example.invalid/images-000000.tar")
    with pytest.raises(FileNotFoundError, match="image shard .*nope.tar not found"):
        ShardImages(str(tmp_path / "nope.tar"))
    with pytest.raises(ValueError, match="give exactly one"):
        image_store(str(tmp_path), str(tmp_path / "a.tar"))
    with pytest.raises(ValueError, match="give exactly one .* got neither"):
        image_store(None, None)


def test_pack_images_command_refuses_an_empty_folder_and_a_hostile_prefix(tmp_path):
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, "-m", "pipeline.pack_images"]
    proc = subprocess.run([*cmd, str(tmp_path / "empty"), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no image files below" in proc.stderr
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes(_png("red"))
    proc = subprocess.run([*cmd, str(tmp_path / "one"), str(tmp_path / "out"), "--prefix", "../escape"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "--prefix" in proc.stderr and not (tmp_path / "escape-000000.tar").exists()
    proc = subprocess.run([*cmd, str(tmp_path / "one"), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "packed 1 images into 1 shard(s)" in proc.stdout
