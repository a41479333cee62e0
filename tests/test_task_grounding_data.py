"""Grounding data: the JSON form's datasets, the no-crop train transform, the REFER converter, the PNGs."""
import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.grounding import box_iou
from pipeline.grounding_data import (BAD_BOX, BAD_PROPOSALS, GroundingEvalCollate, GroundingEvalDataset,
                                     GroundingTrainDataset, ResizeFlipAugment)
from pipeline.refer_convert import load_refs, main as refer_main
from pipeline.transforms import AugmentConfig, ImageTransform
from demo.grounding_scenes import COLOURS, N_PROPOSALS, scene, write_grounding_scenes

RES = 32


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_grounding_scenes(tmp_path_factory.mktemp("grounding"), n_train=6, n_val=3, n_test=2, size=48)


def test_generated_scenes_have_two_disjoint_objects_and_a_background_proposal():
    rng = random.Random(3)
    for _ in range(20):
        img, objects, empty = scene(48, rng)
        a, b = (o["box"] for o in objects)
        assert objects[0]["colour"] != objects[1]["colour"]
        assert box_iou(a, b) == 0.0 and box_iou(empty, a) < 0.2 and box_iou(empty, b) < 0.2
        for o in objects:                   # a point inside every shape (circle, square, triangle) has its colour
            x, y, w, h = o["box"]
            assert img.getpixel((x + w // 2, y + 3 * h // 4)) == COLOURS[o["colour"]]


def test_train_dataset_numbers_images_and_reports_bad_entries(scenes, tmp_path):
    entries = json.loads(scenes["train"].read_text())
    bad = [{"image": "images/nowhere.png", "expression": "the red circle"},
           {"image": entries[0]["image"], "expression": "?!"},
           {"expression": "no image"}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries + bad))
    ds = GroundingTrainDataset(path, scenes["root"], ResizeFlipAugment(RES), seed=1)
    assert len(ds) == 12 and ds.n_images == 6
    assert [p["reason"] for p in ds.problems] == ["missing image file", "empty caption", "malformed entry"]
    first, second = ds[0], ds[1]                       # the two expressions of one picture share idx
    assert first["idx"] == second["idx"] == 0 and first["caption"] != second["caption"]
    assert first["image"].shape == (3, RES, RES)


def test_resize_flip_augment_never_crops():
    """With RandAugment off the train transform is the test resize or its mirror image."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    plain = ImageTransform(RES, train=False).pixels(img, random.Random(0))
    flip_only = ResizeFlipAugment(RES, AugmentConfig(randaug_n=0))
    seen = set()
    for seed in range(8):
        out = flip_only.pixels(img, random.Random(seed))
        flipped = np.array_equal(out, plain[:, ::-1])
        assert flipped or np.array_equal(out, plain)
        seen.add(flipped)
    assert seen == {True, False}
    assert ResizeFlipAugment(RES)(img, random.Random(0)).shape == (3, RES, RES)


def test_eval_dataset_reads_one_split_and_keeps_bad_entries_as_misses(scenes, tmp_path):
    val = json.loads(scenes["val"].read_text())
    good = val[0]
    extra = [{**good, "box": [1, 2, 0, 4]}, {**good, "proposals": [[1, 2, 3]]},
             {**good, "image": "images/gone.png"}, {"image": good["image"], "expression": "x"},
             {**good, "proposals": good["proposals"] + [[5, 5, 0, 3]]}]   # an empty proposal never wins: usable
    path = tmp_path / "val.json"
    path.write_text(json.dumps(val + extra))
    ds = GroundingEvalDataset([path, scenes["test"]], scenes["root"], "val", ImageTransform(RES, train=False))
    assert len(ds) == len(val) + 4                       # the entry without a split cannot join any split
    assert ds.reasons[-4:] == [BAD_BOX, BAD_PROPOSALS, "missing image file", None] and ds.reasons[0] is None
    assert [p["reason"] for p in ds.problems] == [BAD_BOX, BAD_PROPOSALS, "missing image file", "no split"]
    assert len(ds.entries[0]["proposals"]) == N_PROPOSALS
    item = ds[0]
    assert item["frame"] == (48, 48) and item["image"].shape == (3, RES, RES)
    assert ds[len(ds) - 2]["image"] is None
    with pytest.raises(ValueError, match="no 'testC' expressions in .*; splits found: testA, testB, val"):
        GroundingEvalDataset([path, scenes["test"]], scenes["root"], "testC", ImageTransform(RES, train=False))


def test_eval_frame_comes_from_the_entry_when_given(scenes, tmp_path, tiny_tokenizer):
    entry = {**json.loads(scenes["val"].read_text())[0], "width": 480, "height": 320}
    path = tmp_path / "val.json"
    path.write_text(json.dumps([entry, {**entry, "image": "images/gone.png"}]))
    ds = GroundingEvalDataset(path, scenes["root"], "val", ImageTransform(RES, train=False))
    batch = GroundingEvalCollate(tiny_tokenizer, 30, RES)([ds[0], ds[1]])
    assert batch["frame"] == [(320, 480), None] and batch["error"][0] is None and batch["error"][1]
    assert batch["image"].shape == (2, 3, RES, RES) and torch.count_nonzero(batch["image"][1]) == 0
    assert batch["input_ids"].shape[0] == 2


# ------------------------------------------------------------------ REFER converter


def _refer_files(tmp):
    refs = [{"ref_id": 1, "ann_id": 10, "image_id": 100, "split": "train", "category_id": 1,
             "sentences": [{"sent": "man on left", "raw": "Man on left!", "sent_id": 7, "tokens": []}]},
            {"ref_id": 2, "ann_id": 11, "image_id": 101, "split": "testA", "category_id": 1,
             "sentences": [{"sent": "woman in red", "sent_id": 8}, {"sent": "red shirt", "sent_id": 9}]},
            {"ref_id": 3, "ann_id": 12, "image_id": 102, "split": "val", "category_id": 1,
             "sentences": [{"sent": "the dog", "sent_id": 10}]},
            {"ref_id": 4, "ann_id": 99, "image_id": 102, "split": "val", "sentences": [{"sent": "lost"}]}]
    instances = {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640}
                            for i in (100, 101, 102)],
                 "annotations": [{"id": 10, "image_id": 100, "bbox": [1.0, 2.0, 30.0, 40.0]},
                                 {"id": 11, "image_id": 101, "bbox": [5.5, 6.5, 50.0, 60.0]},
                                 {"id": 12, "image_id": 102, "bbox": [0, 0, 10, 10]}],
                 "categories": [{"id": 1, "name": "person"}]}
    dets = {"101": [[5, 6, 50, 60, 0.9], [100, 100, 20, 20, 0.5]], "100": [[0, 0, 5, 5]]}
    (tmp / "refs.p").write_bytes(pickle.dumps(refs, protocol=2))
    (tmp / "instances.json").write_text(json.dumps(instances))
    (tmp / "dets.json").write_text(json.dumps(dets))
    return refs


def test_refer_convert_writes_one_entry_per_sentence(tmp_path, capsys):
    refs = _refer_files(tmp_path)
    out = tmp_path / "out"
    assert refer_main(["--refs", str(tmp_path / "refs.p"), "--instances", str(tmp_path / "instances.json"),
                       "--dets", str(tmp_path / "dets.json"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["refs without image or annotation (left out)"] == 1
    assert summary["refs whose image has no detections (empty proposals)"] == 1      # image 102
    assert summary["testA expressions"] == 2 and summary["val expressions"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["test.json", "train.json", "val.json"]
    test_a = json.loads((out / "test.json").read_text())
    assert [e["expression"] for e in test_a] == ["woman in red", "red shirt"]
    assert test_a[0] == {"image": "train2014/COCO_train2014_000000000101.jpg", "expression": "woman in red",
                         "split": "testA", "box": [5.5, 6.5, 50.0, 60.0], "width": 640, "height": 480,
                         "ref_id": 2, "image_id": 101, "proposals": [[5, 6, 50, 60, 0.9], [100, 100, 20, 20, 0.5]]}
    train = json.loads((out / "train.json").read_text())
    assert "proposals" not in train[0] and train[0]["expression"] == "man on left"
    assert json.loads((out / "val.json").read_text())[0]["proposals"] == []
    # the same refs pre-converted to JSON give the same list
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    assert load_refs(tmp_path / "refs.json") == load_refs(tmp_path / "refs.p") == refs


def test_refs_pickle_with_a_foreign_global_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    _refer_files(tmp_path)
    (tmp_path / "evil.p").write_bytes(pickle.dumps([{"ref_id": 1, "x": Payload()}]))
    with pytest.raises(ValueError, match="refuses global builtins.print"):
        load_refs(tmp_path / "evil.p")
    assert refer_main(["--refs", str(tmp_path / "evil.p"), "--instances", str(tmp_path / "instances.json"),
                       "--dets", str(tmp_path / "dets.json"), "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "this must never run" not in captured.out and "refuses global builtins.print" in captured.err


# ------------------------------------------------------------------ pictures


def test_heatmap_picture_is_written(scenes, tmp_path):
    from model.tasks.grounding_draw import draw_grounding
    entry = json.loads(scenes["val"].read_text())[0]
    heat = torch.zeros(4, 4)
    heat[1, 1] = 1.0
    png = draw_grounding(tmp_path / "pics" / "0.png", str(scenes["root"] / entry["image"]), (48, 48), heat,
                         entry["expression"], entry["box"], entry["proposals"][0], entry["proposals"], 0.3)
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 200
    assert draw_grounding(tmp_path / "none.png", str(scenes["root"] / entry["image"]), (48, 48), heat,
                          entry["expression"], entry["box"], None).is_file()
