"""Convert the REFER layout (RefCOCO / RefCOCO+ / RefCOCOg) into the grounding JSON form.

    python -m pipeline.refer_convert --refs data/refcoco+/refs(unc).p \
        --instances data/refcoco+/instances.json --dets data/refcoco+/dets.json --out data/grounding

Inputs (the reference's evaluation files, `docs/tasks/GROUNDING.md`):
- `--refs`: the refs pickle (a list of {ref_id, ann_id, image_id, split,
  sentences: [{sent, ...}]}), read by a restricted unpickler that builds only
  builtin containers, strings and numbers (a pickle naming any other global is
  refused, so a tampered file cannot run code); or the same list pre-converted
  to a `.json` file.
- `--instances`: COCO-style instances.json (images {id, file_name, height,
  width}, annotations {id, bbox}); the ground-truth box of a ref is its
  annotation's bbox.
- `--dets`: detector proposals {"<image_id>": [[x, y, w, h, ...], ...]} (the
  reference uses MAttNet's Mask R-CNN detections).

Output, one entry per sentence in the form of `pipeline/grounding_data.py`:
`<out>/train.json`, `<out>/val.json` and `<out>/test.json`, which holds every
split named test* (testA and testB for RefCOCO / RefCOCO+ unc, as the
reference's refcoco+_test.json; each entry keeps its own split). Image paths are `--image-prefix` + the COCO
file name (default `train2014/`, relative to a COCO image root). Training
entries carry no proposals. An image with no detections gets an empty
proposal list (every one of its expressions then counts as a miss) and is
counted in the printed summary, as are refs whose annotation is missing.
"""
from __future__ import annotations

import argparse
import builtins
import json
import pickle
import sys
from collections import Counter, defaultdict
from pathlib import Path

# The globals a refs pickle may name (Python 2 pickles say `__builtin__`).
_SAFE_NAMES = ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool")
_SAFE_GLOBALS = {(module, name) for module in ("builtins", "__builtin__") for name in _SAFE_NAMES}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds builtin containers, strings and numbers only; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refuses global {module}.{name}: a refs pickle holds only builtin "
                                     f"containers, strings and numbers")


def load_refs(path: str | Path) -> list[dict]:
    """The refs list from a REFER pickle (restricted) or a pre-converted JSON file."""
    path = Path(path)
    if path.suffix == ".json":
        refs = json.loads(path.read_text())
    else:
        with path.open("rb") as f:
            try:
                refs = RestrictedUnpickler(f, encoding="utf-8").load()
            except pickle.UnpicklingError as err:
                raise ValueError(f"{path}: {err}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, found {type(refs).__name__}")
    return refs


def output_name(split: str) -> str:
    """The file a split goes to: test* splits share test.json."""
    return "test" if split.startswith("test") else split


def convert(refs: list[dict], instances: dict, dets: dict, image_prefix: str = "train2014/"
            ) -> tuple[dict[str, list[dict]], dict]:
    """({file name: entries}, summary counts) from the three REFER inputs."""
    images = {img["id"]: img for img in instances["images"]}
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    out: dict[str, list[dict]] = defaultdict(list)
    counts: Counter = Counter()
    for ref in refs:
        image = images.get(ref["image_id"])
        if image is None or ref["ann_id"] not in boxes:
            counts["refs without image or annotation (left out)"] += 1
            continue
        split = ref["split"]
        proposals = dets.get(str(ref["image_id"]))
        if proposals is None and split != "train":
            counts["refs whose image has no detections (empty proposals)"] += 1
        for sentence in ref["sentences"]:
            entry = {"image": image_prefix + image["file_name"], "expression": sentence.get("sent"),
                     "split": split, "box": boxes[ref["ann_id"]], "width": image["width"],
                     "height": image["height"], "ref_id": ref["ref_id"], "image_id": ref["image_id"]}
            if split != "train":
                entry["proposals"] = [list(p) for p in proposals or []]
            out[output_name(split)].append(entry)
            counts[f"{split} expressions"] += 1
    return dict(out), dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.refer_convert", description=__doc__.split("\n")[0])
    parser.add_argument("--refs", required=True, help="refs(unc).p (restricted unpickling) or a .json of the same list")
    parser.add_argument("--instances", required=True, help="instances.json of the REFER data set")
    parser.add_argument("--dets", required=True, help='detections JSON {"<image_id>": [[x, y, w, h, ...], ...]}')
    parser.add_argument("--out", required=True, type=Path, help="folder for train.json, val.json, test.json")
    parser.add_argument("--image-prefix", default="train2014/", help="prepended to the COCO file names")
    args = parser.parse_args(argv)
    try:
        refs = load_refs(args.refs)
        instances = json.loads(Path(args.instances).read_text())
        dets = json.loads(Path(args.dets).read_text())
        files, summary = convert(refs, instances, dets, args.image_prefix)
    except (OSError, ValueError, KeyError) as err:
        print(f"pipeline.refer_convert: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, entries in files.items():
        (args.out / f"{name}.json").write_text(json.dumps(entries))
    print(json.dumps({"out": str(args.out), **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
