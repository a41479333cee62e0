"""Built-in demo data: compositional image-caption pairs that only match their own image.

Each image shows one shape of one colour at one position on a background of
another colour; the caption names all four ("a red circle at the top left on a
blue background"). The held-out split uses combinations the training split
never shows, each exactly once, so retrieval on it has one right answer per
query and chance is 1 / (number of held-out images).

`python -m demo.make_data OUT --train 3000 --test 200`
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (245, 140, 20),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> centre as a fraction of the image side
    "top left": (0.3, 0.3), "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
}


def combinations() -> list[tuple[str, str, str, str]]:
    """All (colour, shape, position, background) with a background unlike the shape."""
    return [c for c in itertools.product(COLOURS, SHAPES, POSITIONS, COLOURS) if c[0] != c[3]]


def caption(colour: str, shape: str, position: str, background: str) -> str:
    return f"a {colour} {shape} at the {position} on a {background} background"


def draw(colour: str, shape: str, position: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """Render one scene with a little jitter in place and size, so no two images are identical."""
    img = Image.new("RGB", (size, size), COLOURS[background])
    pen = ImageDraw.Draw(img)
    cx, cy = POSITIONS[position]
    cx = (cx + rng.uniform(-0.05, 0.05)) * size
    cy = (cy + rng.uniform(-0.05, 0.05)) * size
    r = size * rng.uniform(0.16, 0.22)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make(out: Path, n_train: int, n_test: int, size: int = 64, seed: int = 0) -> dict:
    """Write images/, train.json ({image, caption} list) and test.json ({image, caption: [..]})."""
    rng = random.Random(seed)
    combos = combinations()
    rng.shuffle(combos)
    if n_test >= len(combos):
        raise ValueError(f"n_test={n_test} must be below the {len(combos)} distinct scenes")
    test_combos, train_combos = combos[:n_test], combos[n_test:]
    (out / "images").mkdir(parents=True, exist_ok=True)

    def write(split: str, i: int, combo) -> str:
        rel = f"images/{split}_{i:05d}.jpg"
        draw(*combo, size=size, rng=rng).save(out / rel, quality=92)
        return rel

    train = [{"image": write("train", i, c), "caption": caption(*c)}
             for i, c in enumerate(rng.choice(train_combos) for _ in range(n_train))]
    test = [{"image": write("test", i, c), "caption": [caption(*c)]} for i, c in enumerate(test_combos)]
    (out / "train.json").write_text(json.dumps(train, indent=0))
    (out / "test.json").write_text(json.dumps(test, indent=0))
    return {"train": len(train), "test": len(test), "scenes": len(combos), "root": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(make(args.out, args.train, args.test, args.size, args.seed)))


if __name__ == "__main__":
    main()
