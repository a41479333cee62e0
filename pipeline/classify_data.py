"""SNLI-VE and NLVR2 annotation files (the reference's JSON) as one map-style dataset.

- SNLI-VE: `[{"image": "2248275918", "sentence": str, "label": "entailment"|"neutral"|"contradiction"}]`,
  the image file is `<image_root>/<image>.jpg`; label ids are the reference's
  (contradiction 0, neutral 1, entailment 2).
- NLVR2: `[{"images": ["dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png"], "sentence": str,
  "label": "True"|"False"}]`, paths relative to `image_root`; label 1 = "True".

Images come from a folder or from tar shards (`pipeline/image_store.py`): the
same names either way.

A record with a label outside its task's names (JSON `true`, "yes", "Neutral",
...), a missing field or a sentence that cleans to nothing is refused with the
file and the record's position: the reference reads any NLVR2 label other than
the string "True" as False and raises a bare KeyError on a bad VE label. Image
files that do not exist are refused up front too (first few named).

Sentences are cleaned with `pre_caption` (30 words). Each image of a record
gets its own augmentation draws; they come from (seed, epoch, index), so a
sample is augmented the same way whichever worker or rank loads it and a
resumed run sees the augmentations the uninterrupted one would have. A
training image that fails to decode is replaced by the next record (reported
in the batch's `load_failures`); at evaluation the record is counted wrong
and listed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.annotations import load_or_next, read_annotation_file
from pipeline.captions import pre_caption
from pipeline.image_store import FolderImages, ImageStore, as_store
from pipeline.tokenize import text_batch
from pipeline.transforms import ImageTransform

VE_LABELS = ("contradiction", "neutral", "entailment")
NLVR_LABELS = ("False", "True")


@dataclass(frozen=True)
class Example:
    images: tuple[str, ...]     # 1 (SNLI-VE) or 2 (NLVR2) images, as the image store names them
    sentence: str               # cleaned
    label: int
    file: str
    entry: int                  # position in its file


def _record_error(file, entry: int, message: str) -> ValueError:
    return ValueError(f"{file}: record {entry}: {message}")


def _label(file, entry: int, value, names: Sequence[str]) -> int:
    if not isinstance(value, str) or value not in names:
        raise _record_error(file, entry, f"label {value!r} is not one of {', '.join(map(repr, names))}")
    return names.index(value)


def _sentence(file, entry: int, ann: dict, max_words: int) -> str:
    raw = ann.get("sentence")
    if not isinstance(raw, str) or not pre_caption(raw, max_words).strip():
        raise _record_error(file, entry, f"sentence {raw!r} is not a non-empty string")
    return pre_caption(raw, max_words)


def read_ve(file: str | Path, images: ImageStore, max_words: int = 30) -> list[Example]:
    out = []
    for n, ann in enumerate(read_annotation_file(file)):
        if not isinstance(ann, dict) or not isinstance(ann.get("image"), (str, int)):
            raise _record_error(file, n, "needs 'image' (image id), 'sentence' and 'label'")
        label = _label(file, n, ann.get("label"), VE_LABELS)
        out.append(Example((images.locate(f"{ann['image']}.jpg"),),
                           _sentence(file, n, ann, max_words), label, str(file), n))
    return out


def read_nlvr(file: str | Path, images: ImageStore, max_words: int = 30) -> list[Example]:
    out = []
    for n, ann in enumerate(read_annotation_file(file)):
        pair = ann.get("images") if isinstance(ann, dict) else None
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(i, str) for i in pair)):
            raise _record_error(file, n, f"'images' must be a list of two paths, got {pair!r}")
        label = _label(file, n, ann.get("label"), NLVR_LABELS)
        out.append(Example(tuple(images.locate(i) for i in pair),
                           _sentence(file, n, ann, max_words), label, str(file), n))
    return out


READERS = {"ve": read_ve, "nlvr": read_nlvr}


def read_examples(task: str, files: str | Path | Sequence[str | Path], images: ImageStore | str | Path,
                  max_words: int = 30) -> list[Example]:
    """All records of `files` (one path or several) for task "ve" or "nlvr"; images the store
    (a folder or shards, pipeline/image_store.py) lacks are refused."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    images = as_store(images)
    examples = [ex for file in files for ex in READERS[task](file, images, max_words)]
    if not examples:
        raise ValueError(f"no records in {', '.join(map(str, files))}")
    checked: dict[str, bool] = {}
    absent = [(ex, path) for ex in examples for path in ex.images
              if not checked.setdefault(path, images.exists(path))]
    if absent:
        shown = "; ".join(f"{ex.file} record {ex.entry}: {path}" for ex, path in absent[:3])
        raise FileNotFoundError(f"{len(absent)} image file(s) named by the annotations are not in the {images!r}: "
                                f"{shown}{' ...' if len(absent) > 3 else ''} (check data.image_root / image_shards)")
    return examples


class ClassifyDataset(Dataset):
    """Items: `image` [3,R,R] (one image) or [2,3,R,R] (a pair), `sentence`, `label`, `index`."""

    def __init__(self, examples: list[Example], transform: ImageTransform, seed: int = 0,
                 max_load_retries: int = 10, images: ImageStore | None = None):
        self.examples = examples
        self.images = images or FolderImages("")   # the store `read_examples` located the images in

        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_load_retries = max_load_retries

    def set_epoch(self, epoch: int) -> None:
        """New augmentation draws each epoch (the loader calls it before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def _images(self, i: int) -> torch.Tensor:
        ex = self.examples[i]
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        images = [self.transform(self.images.load(ref), rng) for ref in ex.images]
        return images[0] if len(images) == 1 else torch.stack(images)

    def __getitem__(self, index: int) -> dict:
        i, image, failures = load_or_next(
            len(self.examples), index, self._images,
            lambda i: {"entry": self.examples[i].entry, "file": self.examples[i].file}, self.max_load_retries)
        ex = self.examples[i]
        return {"image": image, "sentence": ex.sentence, "label": ex.label, "index": i, "load_failures": failures}


class EvalDataset(ClassifyDataset):
    """Test-time items in order; an unreadable image gives a zero image and its `error` (no replacement),
    so every rank still runs the same number of forwards."""

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        try:
            image, error = self._images(index), None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            res = self.transform.image_res
            image = torch.zeros((3, res, res) if len(ex.images) == 1 else (len(ex.images), 3, res, res))
            error = f"{type(err).__name__}: {err}"
        return {"image": image, "sentence": ex.sentence, "label": ex.label, "index": index, "error": error}


class ClassifyCollate:
    """Stack images, tokenise sentences (`[CLS] w1 .. wn`, truncated at `max_tokens`), labels as long."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, batch: Sequence[dict]) -> dict:
        ids, mask = text_batch(self.tokenizer, [b["sentence"] for b in batch], self.max_tokens)
        return {
            "image": torch.stack([b["image"] for b in batch]),
            "input_ids": ids,
            "attention_mask": mask,
            "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
            "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
            "error": [b.get("error") for b in batch],                       # evaluation: unreadable images
            "load_failures": [f for b in batch for f in b.get("load_failures", ())],   # training: replaced ones
        }
