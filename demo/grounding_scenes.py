"""Generated grounding data: two shapes of different colours per picture, one expression per shape.

`write_grounding_scenes` draws scenes with two non-overlapping objects (colour
and shape drawn at random, the two colours always different) on a grey
background and writes, in the JSON form of `pipeline/grounding_data.py`:
- `train.json`: one entry per object ("the red circle"), no boxes needed;
- `val.json` (split val) and `test.json` (splits testA and testB, alternately,
  as the reference's test file): held-out scenes (never trained on), both
  objects asked for, with proposals = the two objects' boxes + one
  empty-background box of similar size, so a proposal picked at random is
  right 1 time in 3.

Colours are what tells the two objects apart (every word is in
configs/tiny_vocab.txt); there are no position words, since training flips.
Used by `make demo-tasks` (demo/tasks.py) and the tests (tests/fixtures/grounding.py).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from model.grounding import box_iou

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (240, 220, 30), "black": (15, 15, 15), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (128, 128, 128)
TEMPLATES = ("the {c} {s}", "a {c} {s}")
N_PROPOSALS = 3           # the two objects + one background box: chance is 1 / 3


def _draw(pen: ImageDraw.ImageDraw, shape: str, box: list[int], fill) -> None:
    x, y, w, h = box
    if shape == "circle":
        pen.ellipse((x, y, x + w - 1, y + h - 1), fill=fill)
    elif shape == "square":
        pen.rectangle((x, y, x + w - 1, y + h - 1), fill=fill)
    else:
        pen.polygon([(x + w / 2, y), (x, y + h - 1), (x + w - 1, y + h - 1)], fill=fill)


def _free_box(size: int, side: int, taken: list[list[int]], rng: random.Random) -> list[int] | None:
    """A side x side box inside the picture that overlaps none of `taken` (margin 2 px), or None."""
    for _ in range(100):
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        if all(x + side + 2 <= tx or tx + tw + 2 <= x or y + side + 2 <= ty or ty + th + 2 <= y
               for tx, ty, tw, th in taken):
            return [x, y, side, side]
    return None


def _layout(size: int, rng: random.Random) -> tuple[list[list[int]], list[int]]:
    """Two disjoint object boxes and a background box (IoU < 0.2 with both) of their mean size."""
    while True:
        first = _free_box(size, int(size * rng.uniform(0.28, 0.36)), [], rng)
        second = _free_box(size, int(size * rng.uniform(0.28, 0.36)), [first], rng)
        if second is None:
            continue
        for _ in range(100):
            empty = _free_box(size, (first[2] + second[2]) // 2, [], rng)
            if box_iou(empty, first) < 0.2 and box_iou(empty, second) < 0.2:
                return [first, second], empty


def scene(size: int, rng: random.Random) -> tuple[Image.Image, list[dict], list[int]]:
    """(picture, [{colour, shape, box}] x 2, an empty background box)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    boxes, empty = _layout(size, rng)
    objects = []
    for colour, box in zip(rng.sample(sorted(COLOURS), 2), boxes):
        shape = rng.choice(SHAPES)
        _draw(pen, shape, box, COLOURS[colour])
        objects.append({"colour": colour, "shape": shape, "box": box})
    return img, objects, empty


def write_grounding_scenes(root: Path, n_train: int = 240, n_val: int = 40, n_test: int = 20,
                           size: int = 48, seed: int = 0) -> dict:
    """Write images/ and train.json, val.json, test.json under `root`; returns their paths.

    Scenes: `n_train` for training, `n_val` for val, `n_test` for testA + testB.
    """
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for name, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        entries = []
        for i in range(count):
            split = ("testA", "testB")[i % 2] if name == "test" else name
            img, objects, empty = scene(size, rng)
            rel = f"images/{name}_{i:04d}.png"
            img.save(root / rel)
            proposals = [o["box"] for o in objects] + [empty]
            rng.shuffle(proposals)
            for o in objects:
                entry = {"image": rel, "expression": rng.choice(TEMPLATES).format(c=o["colour"], s=o["shape"]),
                         "split": split, "box": o["box"], "image_id": f"{name}_{i}"}
                if split != "train":
                    entry["proposals"] = proposals
                entries.append(entry)
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(entries))
    return {"root": root, **files, "chance": 1 / N_PROPOSALS}
