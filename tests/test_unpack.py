"""Shards of an image-caption list turn back into retrieval annotations with one slot per image."""
import io
import json

import webdataset as wds
from PIL import Image

from pipeline.annotations import RetrievalEvalDataset, RetrievalTrainDataset
from pipeline.unpack import unpack


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_unpack_groups_captions_by_image_and_skips_bad_samples(tmp_path):
    rows = [("coco/a.jpg", "a red square", (255, 0, 0)), ("coco/a.jpg", "something red", (255, 0, 0)),
            ("coco/b.jpg", "a blue square", (0, 0, 255)), ("coco/c.jpg", "", (0, 255, 0)),
            ("coco/b.jpg", "blue again", (0, 0, 255))]
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard, part in ((0, rows[:3]), (1, rows[3:])):
        with wds.TarWriter(str(shards / f"{shard:05d}.tar")) as sink:
            for i, (url, caption, colour) in enumerate(part):
                sink.write({"__key__": f"{shard:04d}{i:04d}", "jpg": _jpeg(colour), "txt": caption,
                            "json": json.dumps({"url": url, "caption": caption}).encode()})
    counts = unpack(str(shards / "{00000..00001}.tar"), tmp_path / "out")
    assert counts == {"images": 2, "pairs": 4, "empty_caption": 1}

    evaluation = RetrievalEvalDataset(tmp_path / "out" / "eval.json", tmp_path / "out", transform=None)
    assert evaluation.texts == ["a red square", "something red", "a blue square", "blue again"]
    assert evaluation.txt2img == [0, 0, 1, 1] and not evaluation.problems
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    assert [t["image_id"] for t in train] == [0, 0, 1, 1]
    assert len(RetrievalTrainDataset([tmp_path / "out" / "train.json"], tmp_path / "out", transform=None)) == 4
