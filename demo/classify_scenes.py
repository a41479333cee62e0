"""Generated SNLI-VE and NLVR2 data: scenes of one coloured shape, statements about them.

Images are drawn by `demo.make_data.draw` (a shape of one of 3 colours, any
shape and place, on one of 3 other background colours). Statements name colours
only: the fine-tuning augmentation crops and flips, and a tiny model learns
colours in a few hundred steps. Every word is in configs/tiny_vocab.txt.

- VE, "a {c} shape on a {b} background": entailment when both colours are the
  scene's, neutral when the shape colour is right and the background is not,
  contradiction when the shape colour is wrong. The statement alone is uniform
  over (c, b) in every class and the scene alone says nothing of the label, so
  accuracy above 1/3 needs both.
- NLVR2, "the {left|right} image has a {c} shape" on a pair: True when the
  named image's shape has colour c; a False statement names the other image's
  colour half of the time (so the side must be read) and a colour in neither
  image otherwise.

Held-out files are drawn with other seeds: new images and new pairings. Used by
`make demo-tasks` (demo/tasks.py) and the tests (tests/fixtures/classify.py).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from demo.make_data import POSITIONS, draw

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "purple")
VE_NAMES = ("contradiction", "neutral", "entailment")


def _scene(rng: random.Random) -> tuple[str, str, str, str]:
    return rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(list(POSITIONS)), rng.choice(BACKGROUNDS)


def _other(rng: random.Random, options, not_this):
    return rng.choice([o for o in options if o != not_this])


def ve_statement(colour: str, background: str, label: int, rng: random.Random) -> str:
    if label == 2:
        c, b = colour, background
    elif label == 1:
        c, b = colour, _other(rng, BACKGROUNDS, background)
    else:
        c, b = _other(rng, COLOURS, colour), rng.choice(BACKGROUNDS)
    return f"a {c} shape on a {b} background"


def write_ve(root: Path, name: str, n: int, seed: int, size: int = 32) -> Path:
    """n records in `root/name.json`, their images as `root/images/<name>_<i>.jpg` (ids `<name>_<i>`)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour, shape, position, background = _scene(rng)
        draw(colour, shape, position, background, size, rng).save(root / "images" / f"{name}_{i}.jpg",
                                                                   quality=95)
        label = rng.randrange(3)
        records.append({"image": f"{name}_{i}", "sentence": ve_statement(colour, background, label, rng),
                        "label": VE_NAMES[label]})
    path = root / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


def nlvr_statement(colours: list[str], label: bool, rng: random.Random) -> str:
    side = rng.randrange(2)
    if label:
        c = colours[side]
    elif rng.random() < 0.5 and colours[1 - side] != colours[side]:
        c = colours[1 - side]
    else:
        c = rng.choice([c for c in COLOURS if c not in colours])
    return f"the {('left', 'right')[side]} image has a {c} shape"


def write_nlvr(root: Path, name: str, n: int, seed: int, size: int = 32) -> Path:
    """n records in `root/name.json` with image pairs `images/<name>_<i>_img{0,1}.png`."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        scenes, paths = [], []
        for j in range(2):
            colour, shape, position, background = _scene(rng)
            rel = f"images/{name}_{i}_img{j}.png"
            draw(colour, shape, position, background, size, rng).save(root / rel)
            scenes.append(colour)
            paths.append(rel)
        label = rng.random() < 0.5
        records.append({"images": paths, "sentence": nlvr_statement(scenes, label, rng), "label": str(label)})
    path = root / f"{name}.json"
    path.write_text(json.dumps(records))
    return path
