"""Referring-expression data for weakly supervised grounding: the JSON form, datasets and transform.

The JSON form (`python -m pipeline.refer_convert` writes it from the REFER
layout; `docs/tasks/GROUNDING.md`): a file holds a list of entries, one per
referring expression:

    {"image": "train2014/COCO_train2014_000000581857.jpg",   # relative to data.image_root
     "expression": "lady in the blue shirt",
     "split": "val",                                          # val, testA, testB, train, ...
     "box": [x, y, w, h],                                     # ground truth, pixels
     "proposals": [[x, y, w, h], ...],                        # candidate boxes (extra values ignored)
     "width": 640, "height": 480,                             # optional: the frame of the boxes
     "ref_id": 123, "image_id": 581857}                       # optional: copied into the results

Training reads only `image` and `expression` (no boxes: the supervision is
weak); evaluation needs all of `split`, `box` and `proposals`. Boxes are in the
pixel frame `width` x `height`, by default the image file's own size (the
reference upsamples its map to the size instances.json gives).

Bad entries never vanish: training leaves them out and reports them in
`dataset.problems`; an evaluation entry of the chosen split that cannot be
used (missing image, empty expression, malformed box) stays in place, is
reported, and counts as a miss (`dataset.reasons[i]`).

Train transform (`ResizeFlipAugment`, the reference's grounding transform):
Resize((res, res)) bicubic WITHOUT a crop (a crop could cut the named object
out), horizontal flip, RandAugment; test: the plain resize (`ImageTransform(train=False)`).
"""
from __future__ import annotations

import random
from numbers import Real
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.annotations import (EMPTY_CAPTION, MALFORMED, MISSING_IMAGE, UNREADABLE_IMAGE, RetrievalTrainDataset,
                                  _problem, read_annotation_file)
from pipeline.captions import pre_caption
from pipeline.image_store import ImageStore, as_store
from pipeline.tokenize import text_batch
from pipeline.transforms import AugmentConfig, ImageTransform, rand_augment, resize_bicubic

BAD_BOX = "malformed box"
BAD_PROPOSALS = "malformed proposals"
NO_SPLIT = "no split"


def _is_box(value, empty_ok: bool = False) -> bool:
    """[x, y, w, h, ...] numbers with w, h > 0 (>= 0 with `empty_ok`: an empty proposal just never wins)."""
    return (isinstance(value, (list, tuple)) and len(value) >= 4
            and all(isinstance(v, Real) and not isinstance(v, bool) for v in value[:4])
            and min(value[2], value[3]) >= 0 and (empty_ok or min(value[2], value[3]) > 0))


class ResizeFlipAugment(ImageTransform):
    """Resize((res, res)) bicubic, no crop -> horizontal flip -> RandAugment (the reference's grounding
    train transform). `augment.crop_scale` does not apply: nothing is cropped."""

    def __init__(self, image_res: int, augment: AugmentConfig | None = None):
        super().__init__(image_res, train=True, augment=augment)

    def pixels(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        flip = rng.random() < self.augment.flip_p
        return rand_augment(resize_bicubic(img, self.image_res, self.augment.resize_backend, flip=flip),
                            self.augment, rng)


class GroundingTrainDataset(RetrievalTrainDataset):
    """(image, expression, idx) pairs for retrieval-style fine-tuning on referring expressions.

    Loading, retries and the (seed, epoch, index) augmentation draws are
    RetrievalTrainDataset's; only the file format differs, so the parent's
    parser is replaced. `idx` numbers the image FILES (the reference numbers
    image basenames): expressions of one picture are ITC positives of each other.
    """

    def _add(self, file, n: int, ann, max_words: int) -> None:
        expression = self._text(file, n, ann, "expression", max_words)
        path = self._path(file, n, ann["image"]) if expression is not None else None
        if path is not None:
            self.entries.append((path, expression, self.idx_of_file.setdefault(path, len(self.idx_of_file))))


class GroundingEvalDataset(Dataset):
    """The expressions of one split, read from every evaluation file, in file order.

    `entries[i]`: {"image" (path), "expression" (cleaned), "box", "proposals",
    "width", "height", "ref_id", "image_id", "file", "entry"}; `reasons[i]`:
    why entry i cannot be scored, or None. Items: {"index", "expression", "image"
    (tensor or None), "frame" (height, width) of the boxes, "error"}.
    """

    def __init__(self, ann_files: str | Path | Sequence[str | Path], image_root: ImageStore | str | Path, split: str,
                 transform: ImageTransform, max_words: int = 30):
        files = [ann_files] if isinstance(ann_files, (str, Path)) else list(ann_files)
        self.store = as_store(image_root)
        self.split = split
        self.transform = transform
        self.entries: list[dict] = []
        self.reasons: list[str | None] = []
        self.problems: list[dict] = []
        found: set[str] = set()
        for file in files:
            for n, ann in enumerate(read_annotation_file(file)):
                entry_split = ann.get("split") if isinstance(ann, dict) else None
                if not isinstance(entry_split, str):
                    self.problems.append(_problem(file, n, ann.get("image") if isinstance(ann, dict) else None,
                                                  NO_SPLIT, "an evaluation entry needs a string 'split'"))
                    continue
                found.add(entry_split)
                if entry_split == split:
                    self._add(file, n, ann, max_words)
        if not self.entries:
            raise ValueError(f"no '{split}' expressions in {', '.join(map(str, files))}; splits found: "
                             f"{', '.join(sorted(found)) or 'none'}")

    def _add(self, file, n: int, ann: dict, max_words: int) -> None:
        image = ann.get("image")
        expression = ann.get("expression")
        reason = detail = None
        if not isinstance(image, str) or not isinstance(expression, str):
            reason, detail = MALFORMED, "needs string 'image' and string 'expression'"
        elif not _is_box(ann.get("box")):
            reason, detail = BAD_BOX, f"box {ann.get('box')!r} is not [x, y, w, h] with w, h > 0"
        elif not (isinstance(ann.get("proposals"), list)
                  and all(_is_box(p, empty_ok=True) for p in ann["proposals"])):
            reason, detail = BAD_PROPOSALS, "proposals must be a list of [x, y, w, h, ...] with w, h >= 0"
        elif not all(isinstance(ann.get(k, 1), int) and ann.get(k, 1) > 0 for k in ("width", "height")):
            reason, detail = MALFORMED, "width and height, when given, must be positive integers"
        path = self.store.locate(image) if isinstance(image, str) else None
        text = pre_caption(expression, max_words) if isinstance(expression, str) else ""
        if reason is None and not text.strip():
            reason, detail = EMPTY_CAPTION, repr(expression)
        if reason is None and not self.store.exists(path):
            reason, detail = MISSING_IMAGE, f"{path} ({self.store!r})"
        if reason is not None:
            self.problems.append(_problem(file, n, image, reason, detail))
        self.entries.append({"image": path, "expression": text, "box": ann.get("box"),
                             "proposals": ann.get("proposals") or [], "width": ann.get("width"),
                             "height": ann.get("height"), "ref_id": ann.get("ref_id"),
                             "image_id": ann.get("image_id"), "file": str(file), "entry": n})
        self.reasons.append(reason)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        item = {"index": index, "expression": entry["expression"], "image": None, "frame": None,
                "error": self.reasons[index]}
        if item["error"] is not None:
            return item
        try:
            img = self.store.load(entry["image"])
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return {**item, "error": f"{UNREADABLE_IMAGE}: {type(err).__name__}: {err}"}
        frame = (entry["height"] or img.height, entry["width"] or img.width)
        return {**item, "image": self.transform(img, random.Random(index)), "frame": frame}


class GroundingEvalCollate:
    """Stack images (a zero image stands in for one that failed, so every batch has the same forward)
    and tokenise the expressions; `errors[i]` marks the stand-ins."""

    def __init__(self, tokenizer, max_tokens: int, image_res: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.image_res = image_res

    def __call__(self, batch: Sequence[dict]) -> dict:
        blank = torch.zeros(3, self.image_res, self.image_res)
        ids, mask = text_batch(self.tokenizer, [b["expression"] for b in batch], self.max_tokens)
        return {"image": torch.stack([b["image"] if b["image"] is not None else blank for b in batch]),
                "input_ids": ids, "attention_mask": mask,
                "index": [b["index"] for b in batch], "frame": [b["frame"] for b in batch],
                "error": [b["error"] for b in batch]}
