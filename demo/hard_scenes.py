"""Harder generated data than the demo's: one or two objects on textured backgrounds.

Each image (128 px by default, twice the demo's side) shows one or two shapes,
each with a colour and a size, on a striped or spotted background of a colour;
with two objects the caption names their relation:

    "a big red star at the top left on a striped blue background"
    "a small green circle to the left of a big yellow diamond on a spotted gray background"

What makes it harder than `demo/make_data.py` (one flat-coloured shape on a flat
background): the background is a texture, not a flat colour, so the image's mean
colour no longer names the caption; objects are often small (a small object at
32 px is a blob of 3-6 pixels); two-object scenes need colour, shape and size of
both objects and their relation (left of / right of / above / below). Pixel noise
and jitter make every image distinct.

Held-out scenes are unique under a canonical key ("A left of B" = "B right of A")
and their captions never occur in training, so retrieval on them has one right
answer per query: chance R@K = K / n_test.

    python -m demo.hard_scenes OUT --train 3000 --test 200 [--size 128] [--seed 0]

writes `OUT/images/`, `OUT/train.json` (`[{image, caption}]`, the annotation list
`python -m pipeline.download --source coco --input OUT/train.json --image-root OUT`
packs into shards) and `OUT/test.json` (`[{image, caption: [..]}]`, the reference's
retrieval format, for `train.eval_annotation` / `model.evaluate`). `--shards DIR`
also writes WebDataset shards with a manifest directly (no img2dataset), the
layout the training loader reads, and prints the `data.shards=` override
shell-quoted: the spec is a brace range (`DIR/{00000..00005}.tar`) that an
unquoted shell argument expands into one `data.shards=` override per shard,
of which the last wins (one shard of 500 pairs: 15 batches per rank per epoch
at 2 x 16 instead of 93).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from demo.make_data import COLOURS  # the same palette as the demo (8 named colours)

SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": (0.07, 0.10), "big": (0.14, 0.19)}   # radius as a fraction of the image side
TEXTURES = ("striped", "spotted")
POSITIONS = {  # one-object scenes: name -> centre as a fraction of the side
    "top left": (0.28, 0.28), "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
           "above": "below", "below": "above"}
TWO_OBJECT_SHARE = 0.5


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Thing, ...]       # one or two
    where: str                       # a POSITIONS name (one object) or a RELATIONS phrase (two)
    background: str                  # colour name
    texture: str
    pattern_colour: str = ""         # the texture's second colour (never named)

    def caption(self, name_background: bool = False) -> str:
        bg = f" on a {self.texture} {self.background} background" if name_background else ""
        if len(self.objects) == 1:
            prefix = "at the " if self.where != "center" else "in the "
            return f"a {self.objects[0].words()} {prefix}{self.where}{bg}"
        a, b = self.objects
        return f"a {a.words()} {self.where} a {b.words()}{bg}"

    def key(self, name_background: bool = False) -> tuple:
        """Canonical identity of what the caption says: "A left of B" and "B right of A" are the same."""
        bg = (self.background, self.texture) if name_background else ()
        if len(self.objects) == 2 and self.where in ("to the right of", "below"):
            return (self.objects[1], self.objects[0], INVERSE[self.where], *bg)
        return (*self.objects, self.where, *bg)


def random_scene(rng: random.Random) -> Scene:
    background, pattern = rng.sample(list(COLOURS), 2)
    texture = rng.choice(TEXTURES)
    colours = [c for c in COLOURS if c not in (background, pattern)]

    def thing() -> Thing:
        return Thing(rng.choice(colours), rng.choice(SHAPES), rng.choice(list(SIZES)))

    if rng.random() >= TWO_OBJECT_SHARE:
        return Scene((thing(),), rng.choice(list(POSITIONS)), background, texture, pattern)
    a = thing()
    b = thing()
    while (b.colour, b.shape) == (a.colour, a.shape):   # the two must be told apart by the caption
        b = thing()
    return Scene((a, b), rng.choice(RELATIONS), background, texture, pattern)


def _background(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    base = COLOURS[scene.background]
    # the pattern's second tone: another palette colour, toned half-way towards the background
    other = tuple((a + b) // 2 for a, b in zip(COLOURS[scene.pattern_colour], base))
    img = Image.new("RGB", (size, size), base)
    pen = ImageDraw.Draw(img)
    if scene.texture == "striped":
        period = size * rng.uniform(0.08, 0.14)
        width = period * rng.uniform(0.35, 0.55)
        angle = rng.choice((0.0, 45.0, 90.0, 135.0)) + rng.uniform(-10, 10)
        dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        offset = rng.uniform(0, period)
        reach = size * 1.5
        k = -int(reach / period) - 1
        while k * period < reach:
            # a band across the image, perpendicular to (dx, dy), at distance k*period from the centre
            d = k * period + offset
            cx, cy = size / 2 + dx * d, size / 2 + dy * d
            px, py = -dy * reach, dx * reach
            hw_x, hw_y = dx * width / 2, dy * width / 2
            pen.polygon([(cx + px - hw_x, cy + py - hw_y), (cx - px - hw_x, cy - py - hw_y),
                         (cx - px + hw_x, cy - py + hw_y), (cx + px + hw_x, cy + py + hw_y)], fill=other)
            k += 1
    else:  # spotted
        for _ in range(rng.randint(25, 45)):
            r = size * rng.uniform(0.015, 0.04)
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            pen.ellipse((x - r, y - r, x + r, y + r), fill=other)
    return img


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9
        pen.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        pen.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "star":
        points = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        pen.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _centres(scene: Scene, radii: list[float], size: int, rng: random.Random) -> list[tuple[float, float]]:
    """Object centres (pixels) that make the caption true, inside the image."""
    if len(scene.objects) == 1:
        fx, fy = POSITIONS[scene.where]
        return [((fx + rng.uniform(-0.05, 0.05)) * size, (fy + rng.uniform(-0.05, 0.05)) * size)]
    # object a is `where` object b: a sits on that side, b on the other, offset a little across the axis
    near, far = rng.uniform(0.22, 0.32), rng.uniform(0.68, 0.78)
    across_a, across_b = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    first, second = {"to the left of": (near, far), "to the right of": (far, near),
                     "above": (near, far), "below": (far, near)}[scene.where]
    if scene.where in ("to the left of", "to the right of"):
        pts = [(first, across_a), (second, across_b)]
    else:
        pts = [(across_a, first), (across_b, second)]
    out = []
    for (fx, fy), r in zip(pts, radii):
        x = min(max(fx * size, r + 1), size - r - 1)
        y = min(max(fy * size, r + 1), size - r - 1)
        out.append((x, y))
    return out


def draw(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    img = _background(scene, size, rng)
    pen = ImageDraw.Draw(img)
    radii = [size * rng.uniform(*SIZES[t.size]) for t in scene.objects]
    for thing, (cx, cy), r in zip(scene.objects, _centres(scene, radii, size, rng), radii):
        _draw_shape(pen, thing.shape, cx, cy, r, COLOURS[thing.colour])
    # sensor-like grain, so that no two images are equal and flat areas are not flat
    noise = Image.effect_noise((size, size), rng.uniform(8, 16)).convert("RGB")
    return Image.blend(img, noise, 0.12)


def make(out: Path, n_train: int, n_test: int, size: int = 128, seed: int = 0,
         name_background: bool = False) -> dict:
    """Write images/, train.json ({image, caption} list) and test.json ({image, caption: [..]})."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    test: list[Scene] = []
    test_keys: set = set()
    while len(test) < n_test:
        scene = random_scene(rng)
        if scene.key(name_background) not in test_keys:
            test_keys.add(scene.key(name_background))
            test.append(scene)
    train: list[Scene] = []
    while len(train) < n_train:
        scene = random_scene(rng)
        if scene.key(name_background) not in test_keys:   # held-out scenes never occur in training
            train.append(scene)

    def write(split: str, i: int, scene: Scene) -> str:
        rel = f"images/{split}_{i:05d}.jpg"
        draw(scene, size, rng).save(out / rel, quality=92)
        return rel

    train_rows = [{"image": write("train", i, s), "caption": s.caption(name_background)}
                  for i, s in enumerate(train)]
    test_rows = [{"image": write("test", i, s), "caption": [s.caption(name_background)]}
                 for i, s in enumerate(test)]
    (out / "train.json").write_text(json.dumps(train_rows, indent=0))
    (out / "test.json").write_text(json.dumps(test_rows, indent=0))
    two = sum(len(s.objects) == 2 for s in train)
    return {"train": len(train_rows), "test": len(test_rows), "two_object_share": round(two / max(1, n_train), 3),
            "size": size, "root": str(out)}


def write_shards(data: Path, shards: Path, samples_per_shard: int = 500) -> str:
    """WebDataset shards (KEY.jpg, KEY.txt, KEY.json) + manifest.json of data/train.json; returns the spec.

    The layout `pipeline.download`/`pipeline.pack` write, without img2dataset
    (images are stored as generated): for tests and quick experiments.
    """
    import webdataset as wds

    from pipeline.manifest import MANIFEST_NAME, manifest_for_shards

    rows = json.loads((data / "train.json").read_text())
    shards.mkdir(parents=True, exist_ok=True)
    counts = {}
    for s, lo in enumerate(range(0, len(rows), samples_per_shard)):
        name = f"{s:05d}.tar"
        part = rows[lo:lo + samples_per_shard]
        with wds.TarWriter(str(shards / name), encoder=False) as writer:
            for i, row in enumerate(part):
                key = f"{s:05d}{i:04d}"
                writer.write({"__key__": key, "jpg": (data / row["image"]).read_bytes(),
                              "txt": row["caption"].encode(),
                              "json": json.dumps({"caption": row["caption"], "source": "hard_scenes"}).encode()})
        counts[name] = len(part)
    (shards / MANIFEST_NAME).write_text(json.dumps(manifest_for_shards(counts, "hard_scenes")))
    return f"{shards}/{{00000..{len(counts) - 1:05d}}}.tar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name-background", action="store_true",
                    help="captions also name the background (easier: the image's dominant colour is named)")
    ap.add_argument("--shards", type=Path, help="also write training shards + manifest here")
    args = ap.parse_args()
    info = make(args.out, args.train, args.test, args.size, args.seed, args.name_background)
    if args.shards:
        info["shards"] = write_shards(args.out, args.shards)
        # quoted: an unquoted brace range is expanded by the shell into one override per shard
        info["train_override"] = shlex.quote(f"data.shards={info['shards']}")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
