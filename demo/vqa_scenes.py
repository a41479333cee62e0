"""Generated VQA data: one coloured shape on a grey background, two kinds of question.

`write_vqa_dataset(root)` draws scenes (shape colour, shape, background shade)
and writes, in the reference's formats: `train.json` (VQA entries with 10
human answers, some of them wrong, and VG entries with one answer), `val.json`
(held-out scenes: combinations never drawn for training, all 10 human answers
right), `test.json` (the same questions without answers) and
`answer_list.json` (5 colours, 3 shapes). Questions: "What colour is the
shape?" and "What shape is it?"; words missing from configs/tiny_vocab.txt
become word pieces. Used by `make demo-tasks` (demo/tasks.py) and the tests.
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "white": (245, 245, 245)}
BACKGROUNDS = {"dark": (40, 40, 40), "grey": (110, 110, 110), "light": (170, 170, 170)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}
IMAGE_SIZE = 32


@dataclass
class VQAFiles:
    root: Path
    train: Path
    val: Path
    test: Path
    answer_list: Path
    val_majority_acc: float      # accuracy of always answering the most frequent held-out answer


def draw(colour: str, shape: str, background: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(img)
    # large shapes: at 32 px in 8-px patches the shape must show in the outer patches to be told apart
    cx, cy = (0.5 + rng.uniform(-0.04, 0.04)) * size, (0.5 + rng.uniform(-0.04, 0.04)) * size
    r = size * rng.uniform(0.38, 0.44)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


def _human_answers(truth: str, wrong: list[str], rng: random.Random) -> list[str]:
    """10 answers: mostly the truth, 0-3 annotators wrong (exercises the answer weights)."""
    n_wrong = rng.choice((0, 0, 1, 2, 3))
    return [truth] * (10 - n_wrong) + [rng.choice(wrong) for _ in range(n_wrong)]


def write_vqa_dataset(root: Path, n_train_images: int = 240, n_val_scenes: int = 15, images_per_val_scene: int = 2,
                      seed: int = 0) -> VQAFiles:
    rng = random.Random(seed)
    scenes = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))   # (colour, shape, background)
    rng.shuffle(scenes)
    val_scenes, train_scenes = scenes[:n_val_scenes], scenes[n_val_scenes:]
    (root / "images").mkdir(parents=True, exist_ok=True)
    qid = iter(range(1000, 10**6))

    def entries(split: str, i: int, scene, vg: bool) -> list[dict]:
        colour, shape, background = scene
        image = f"images/{split}_{i:04d}.png"
        draw(colour, shape, background, rng).save(root / image)
        out = []
        for kind, truth in (("colour", colour), ("shape", shape)):
            wrong = [c for c in (COLOURS if kind == "colour" else SHAPES) if c != truth]
            if vg and kind == "shape":
                out.append({"dataset": "vg", "image": image, "question": QUESTIONS[kind], "answer": truth})
            else:
                out.append({"dataset": "vqa", "image": image, "question": QUESTIONS[kind],
                            "question_id": next(qid), "answer": _human_answers(truth, wrong, rng)})
        return out

    train = [e for i in range(n_train_images)
             for e in entries("train", i, rng.choice(train_scenes), vg=i % 4 == 0)]
    val = [e for i, scene in enumerate(val_scenes * images_per_val_scene) for e in entries("val", i, scene, vg=False)]
    for e in val:   # held-out ground truth: the 10 human answers all right
        e["answer"] = [Counter(e["answer"]).most_common(1)[0][0]] * 10
    test = [{k: v for k, v in e.items() if k != "answer"} for e in val]
    answer_list = [*COLOURS, *SHAPES]
    files = {"train": train, "val": val, "test": test, "answer_list": answer_list}
    for name, data in files.items():
        (root / f"{name}.json").write_text(json.dumps(data))
    majority = Counter(e["answer"][0] for e in val).most_common(1)[0][1] / len(val)
    return VQAFiles(root, root / "train.json", root / "val.json", root / "test.json", root / "answer_list.json",
                    100.0 * majority)
