"""Retrieval annotation files (Karpathy splits, the reference's JSON format) as datasets.

Train files: a list of `{"image": path, "caption": str, "image_id": any}`, one
entry per caption. Val/test files: a list of `{"image": path, "caption": [str, ...]}`,
one entry per image. Paths are relative to an image root (absolute paths are
kept as they are), or name members of image shards (`pipeline/image_store.py`):
every dataset here takes a folder path or an image store.

Bad entries never vanish silently. Every problem becomes a report
`{"file", "entry", "image", "reason", "detail"}` in `dataset.problems`:
- train: a malformed entry, an empty caption or a missing image file is left
  out (reported); an `image_id` shared by two different files, or one file
  under two ids, is reported and resolved by giving each image FILE its own
  `idx` (what the idx-aware losses need: captions of the same picture are
  positives, different pictures are not); an image that fails to decode while
  training is replaced by the next loadable entry and returned in the batch's
  `load_failures`, so the batch size (and the queue arithmetic) stays fixed.
- eval: each entry is one image slot, whatever its state, so queries keep
  their places. A missing/undecodable image makes that slot unusable
  (`image_ok` False), an empty caption makes that text unusable (`text_ok`
  False); a second entry for an image already listed hands its captions to the
  first entry and is itself unusable. The metric function then counts every
  unusable query as a miss and lists it.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.captions import pre_caption
from pipeline.image_store import ImageStore, as_store
from pipeline.images import decode_rgb
from pipeline.tokenize import text_batch
from pipeline.transforms import ImageTransform

MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_CAPTION = "empty caption"
MALFORMED = "malformed entry"
DUPLICATE_IMAGE = "duplicate image entry"
ID_CONFLICT = "image_id names two image files"
IMAGE_TWO_IDS = "image file listed under two image_ids"

T = TypeVar("T")


def read_annotation_file(path: str | Path) -> list:
    """Load one annotation JSON list; a file that is not one fails with its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"annotation file {path} must hold a JSON list of entries, "
                         f"found {type(data).__name__}")
    return data


def _problem(file, entry, image, reason, detail=""):
    return {"file": str(file), "entry": entry, "image": image, "reason": reason, "detail": detail}


def _hashable(value):
    """An image_id usable as a dict key (ids are usually ints or strings; lists/dicts by content)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def load_rgb(path: str) -> Image.Image:
    """Decode fully (so truncation is caught here, not later in a transform), as the shard path does."""
    return decode_rgb(path)


def load_or_next(n: int, index: int, load: Callable[[int], T], describe: Callable[[int], dict],
                 max_retries: int) -> tuple[int, T, list[dict]]:
    """`load(index)`, or of the next entries (wrapping) while images fail to decode, so a training
    batch keeps its size: (the entry used, what `load` gave, the failures met, each `describe(i)` plus
    reason and detail). More than `max_retries` failures in a row stop with the last one."""
    failures: list[dict] = []
    for attempt in range(max_retries + 1):
        i = (index + attempt) % n
        try:
            return i, load(i), failures
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            failures.append({**describe(i), "reason": UNREADABLE_IMAGE, "detail": f"{type(err).__name__}: {err}"})
    raise RuntimeError(f"{len(failures)} consecutive entries failed to load from entry {index} "
                       f"(max_load_retries={max_retries}): {failures[-1]}")


class RetrievalTrainDataset(Dataset):
    """Map-style (image, caption, idx) pairs for retrieval fine-tuning.

    `idx` is a dense image number (0..n_images-1) shared by all captions of one
    image file; it drives the idx-aware ITC targets and ITM negatives.
    Augmentation draws from a `random.Random` seeded by (seed, epoch, index), so
    a sample is augmented the same way whichever worker or rank loads it.
    """

    def __init__(self, ann_files: str | Path | Sequence[str | Path], image_root: ImageStore | str | Path,
                 transform: ImageTransform, max_words: int = 30, max_load_retries: int = 10,
                 seed: int = 0):
        files = [ann_files] if isinstance(ann_files, (str, Path)) else list(ann_files)
        self.store = as_store(image_root)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_load_retries = max_load_retries
        self.problems: list[dict] = []
        self.entries: list[tuple[str, str, int]] = []   # (path, caption, idx)
        self.idx_of_file: dict[str, int] = {}
        self._file_of_id: dict = {}
        self._id_of_file: dict = {}
        for file in files:
            for n, ann in enumerate(read_annotation_file(file)):
                self._add(file, n, ann, max_words)
        if not self.entries:
            raise ValueError(f"no usable entries in {', '.join(map(str, files))}; "
                             f"problems: {Counter(p['reason'] for p in self.problems)}")

    def _text(self, file, n: int, ann, key: str, max_words: int, needs: tuple[str, ...] = ()) -> str | None:
        """The cleaned `ann[key]` of an entry with a string 'image', or None (the problem recorded)."""
        if not (isinstance(ann, dict) and isinstance(ann.get("image"), str) and isinstance(ann.get(key), str)
                and all(k in ann for k in needs)):
            wanted = ", ".join(["string 'image'", f"string '{key}'", *(f"'{k}'" for k in needs)])
            self.problems.append(_problem(file, n, ann.get("image") if isinstance(ann, dict) else None,
                                          MALFORMED, f"needs {wanted}"))
            return None
        text = pre_caption(ann[key], max_words)
        if not text.strip():
            self.problems.append(_problem(file, n, ann["image"], EMPTY_CAPTION, repr(ann[key])))
            return None
        return text

    def _path(self, file, n: int, image: str) -> str | None:
        """The store's name of an entry's image, or None when the store lacks it (recorded)."""
        path = self.store.locate(image)
        if path not in self.idx_of_file and not self.store.exists(path):
            self.problems.append(_problem(file, n, image, MISSING_IMAGE, f"{path} ({self.store!r})"))
            return None
        return path

    def _add(self, file, n: int, ann, max_words: int) -> None:
        caption = self._text(file, n, ann, "caption", max_words, needs=("image_id",))
        path = self._path(file, n, ann["image"]) if caption is not None else None
        if path is None:
            return
        image, image_id = ann["image"], ann["image_id"]
        key = _hashable(image_id)
        if self._file_of_id.setdefault(key, path) != path:
            self.problems.append(_problem(file, n, image, ID_CONFLICT,
                                          f"image_id {image_id!r} also names {self._file_of_id[key]}; "
                                          f"kept as separate images"))
        if self._id_of_file.setdefault(path, key) != key:
            self.problems.append(_problem(file, n, image, IMAGE_TWO_IDS,
                                          f"image_id {image_id!r} and {self._id_of_file[path]!r}; "
                                          f"treated as one image"))
        self.entries.append((path, caption, self.idx_of_file.setdefault(path, len(self.idx_of_file))))

    @property
    def n_images(self) -> int:
        return len(self.idx_of_file)

    def set_epoch(self, epoch: int) -> None:
        """New augmentation draws each epoch (call before iterating, as a sampler's set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, i: int) -> torch.Tensor:
        return self.transform(self.store.load(self.entries[i][0]), random.Random(f"{self.seed}/{self.epoch}/{i}"))

    def __getitem__(self, index: int) -> dict:
        i, image, failures = load_or_next(len(self.entries), index, self._image,
                                          lambda i: {"entry": i, "image": self.entries[i][0]}, self.max_load_retries)
        _, caption, idx = self.entries[i]
        return {"image": image, "caption": caption, "idx": idx, "index": i, "load_failures": failures}



class RetrievalEvalDataset(Dataset):
    """One image slot per annotation entry plus the flat caption list, as the reference.

    Attributes: `images` (paths, None when absent), `texts` (cleaned captions),
    `txt2img` [n_texts], `img2txt` [n_images][...], `image_ok`, `text_ok`,
    `problems`. Items are images: `{"image": tensor or None, "index", "error"}`.
    """

    def __init__(self, ann_file: str | Path, image_root: ImageStore | str | Path, transform: ImageTransform,
                 max_words: int = 30):
        self.ann_file = str(ann_file)
        self.store = as_store(image_root)
        self.transform = transform
        self.images: list[str | None] = []
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        self.image_ok: list[bool] = []
        self.text_ok: list[bool] = []
        self.problems: list[dict] = []
        first_slot: dict[str, int] = {}
        for n, ann in enumerate(read_annotation_file(ann_file)):
            image = ann.get("image") if isinstance(ann, dict) else None
            captions = ann.get("caption") if isinstance(ann, dict) else None
            if isinstance(captions, str):
                captions = [captions]
            ok = True
            if not isinstance(image, str) or not isinstance(captions, list):
                self.problems.append(_problem(ann_file, n, image, MALFORMED,
                                              "needs string 'image' and a list 'caption'"))
                ok = False
                image = image if isinstance(image, str) else None
                captions = captions if isinstance(captions, list) else []
            path = self.store.locate(image) if image is not None else None
            owner = n
            if ok and path in first_slot:
                owner = first_slot[path]
                self.problems.append(_problem(ann_file, n, image, DUPLICATE_IMAGE,
                                              f"same image as entry {owner}; its captions go to entry {owner}"))
                ok = False
            elif ok and not self.store.exists(path):
                self.problems.append(_problem(ann_file, n, image, MISSING_IMAGE, f"{path} ({self.store!r})"))
                ok = False
            elif ok:
                first_slot[path] = n
            self.images.append(path)
            self.image_ok.append(ok)
            self.img2txt.append([])
            for c, raw in enumerate(captions):
                text = pre_caption(raw, max_words) if isinstance(raw, str) else ""
                good = bool(text.strip())
                if not good:
                    self.problems.append(_problem(ann_file, n, image, EMPTY_CAPTION,
                                                  f"caption {c}: {raw!r}"))
                t = len(self.texts)
                self.texts.append(text)
                self.text_ok.append(good)
                self.txt2img.append(owner)
                self.img2txt[owner].append(t)
            if not captions:
                self.problems.append(_problem(ann_file, n, image, EMPTY_CAPTION, "no captions"))

    def mark_unreadable(self, index: int, error: str) -> None:
        """Record an image that failed to decode during feature extraction."""
        self.image_ok[index] = False
        self.problems.append(_problem(self.ann_file, index, self.images[index], UNREADABLE_IMAGE, error))

    def problem_counts(self) -> dict:
        return dict(Counter(p["reason"] for p in self.problems))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        if not self.image_ok[index]:
            return {"image": None, "index": index, "error": None}
        try:
            image = self.transform(self.store.load(self.images[index]), random.Random(index))
            return {"image": image, "index": index, "error": None}
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return {"image": None, "index": index, "error": f"{type(err).__name__}: {err}"}


def collate_eval_images(batch: Iterable[dict]) -> dict:
    """Stack the loaded images; carry the indices of those that failed with their errors."""
    batch = list(batch)
    good = [b for b in batch if b["image"] is not None]
    return {
        "image": torch.stack([b["image"] for b in good]) if good else None,
        "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
        "failed": [(b["index"], b["error"]) for b in batch if b["error"] is not None],
    }


class TrainCollate:
    """Batch train items: stack images, tokenise captions, keep idx and load failures."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, batch: Sequence[dict]) -> dict:
        ids, mask = text_batch(self.tokenizer, [b["caption"] for b in batch], self.max_tokens)
        return {
            "image": torch.stack([b["image"] for b in batch]),
            "input_ids": ids,
            "attention_mask": mask,
            "idx": torch.tensor([b["idx"] for b in batch], dtype=torch.long),
            "load_failures": [f for b in batch for f in b["load_failures"]],
        }

